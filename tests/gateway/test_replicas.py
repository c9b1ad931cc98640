"""Several replicas on one database and one data volume: migrations at start-up without races."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def admin(*statements: str, database: str = "postgres") -> list[list[asyncpg.Record]]:
    async def run() -> list[list[asyncpg.Record]]:
        conn = await asyncpg.connect(f"{PG_ADMIN}/{database}")
        try:
            return [await conn.fetch(sql) for sql in statements]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """An empty throw-away PostgreSQL database, dropped afterwards."""
    name = f"gw_replicas_{uuid.uuid4().hex[:10]}"
    try:
        admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {PG_ADMIN} is not available: {exc}")
    yield name
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_replicas_starting_together_migrate_a_fresh_database_once(fresh_db: str) -> None:
    url = f"{PG_ADMIN}/{fresh_db}"
    upgrade = [sys.executable, "-c", "import sys; from gateway.migrate import upgrade; upgrade(sys.argv[1])", url]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replicas = [subprocess.Popen(upgrade, cwd=ROOT, env=env, stderr=subprocess.PIPE) for _ in range(3)]
    errors = [replica.communicate(timeout=120)[1].decode() for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], "\n".join(errors)
    (versions,) = admin("SELECT version_num FROM alembic_version", database=fresh_db)
    assert len(versions) == 1  # one head, written once
    (held,) = admin("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'", database=fresh_db)
    assert held[0]["n"] == 0  # nobody keeps the migration lock
