"""Several replicas on one database and one data volume: migrations at start-up without races, and
per-replica audit spools that a later start takes over only from replicas that are gone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit import AuditWriter, ReplicaSpool
from gateway.audit_sinks import sink_for
from gateway.db import audit_records, create_engine
from tests.gateway.test_audit import BrokenSink, count, row, spool_lines, sqlite_url
from tests.helpers import PG_ADMIN, pg_admin, throwaway_postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """An empty throw-away PostgreSQL database, dropped afterwards."""
    with throwaway_postgres("gw_replicas") as name:
        yield name


@pytest.mark.postgres
def test_replicas_starting_together_migrate_a_fresh_database_once(fresh_db: str) -> None:
    url = f"{PG_ADMIN}/{fresh_db}"
    upgrade = [sys.executable, "-c", "import sys; from gateway.migrate import upgrade; upgrade(sys.argv[1])", url]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replicas = [subprocess.Popen(upgrade, cwd=ROOT, env=env, stderr=subprocess.PIPE) for _ in range(3)]
    errors = [replica.communicate(timeout=120)[1].decode() for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], "\n".join(errors)
    (versions,) = pg_admin("SELECT version_num FROM alembic_version", database=fresh_db)
    assert len(versions) == 1  # one head, written once
    (held,) = pg_admin("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'", database=fresh_db)
    assert held[0]["n"] == 0  # nobody keeps the migration lock


def writer_for(engine: AsyncEngine, folder: Path, **changes: object) -> AuditWriter:
    sink = changes.pop("sink", None) or sink_for(engine, audit_records)
    spool = ReplicaSpool(folder / "spool", legacy=[folder / "audit-spool.jsonl"])
    return AuditWriter(engine, replica_spool=spool, sink=sink, **changes)  # type: ignore[arg-type]


async def test_start_up_takes_over_the_spools_of_gone_replicas_and_never_a_live_ones(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)
    engine = create_engine(url)
    folder = tmp_path / "spool"
    folder.mkdir()
    dead, live, old = [row() for _ in range(3)], [row() for _ in range(2)], [row()]
    (folder / "audit-spool.pod-a.1.aaaa.jsonl").write_bytes(spool_lines(dead[:2]))  # a replica killed mid-replay
    (folder / "audit-spool.pod-a.1.aaaa.jsonl.replaying").write_bytes(spool_lines(dead[2:]))
    (folder / "audit-spool.pod-b.1.bbbb.jsonl").write_bytes(spool_lines(live))
    (tmp_path / "audit-spool.jsonl").write_bytes(spool_lines(old))  # the single spool of older versions
    alive = ReplicaSpool(folder, replica="pod-b.1.bbbb")
    alive.claim()  # pod-b runs: its lock is held (by another open file, as another process would)

    writer = writer_for(engine, tmp_path)
    await writer.start()
    await writer.stop()
    assert await count(url) == 4  # pod-a's rows and the old spool's, not pod-b's
    for taken in live:
        assert await count(url, request_id=taken["request_id"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "audit-spool.pod-b.1.bbbb.jsonl",
        "audit-spool.pod-b.1.bbbb.lock",
    ]
    assert not (tmp_path / "audit-spool.jsonl").exists()

    alive.release()  # pod-b stops with rows it could not store: they stay for the next start
    assert (folder / "audit-spool.pod-b.1.bbbb.jsonl").exists()
    writer = writer_for(engine, tmp_path)
    await writer.start()
    await writer.stop()
    assert await count(url) == 6
    assert list(folder.iterdir()) == []  # a clean stop leaves nothing behind
    await engine.dispose()


async def test_a_replica_spools_to_its_own_file_and_the_next_start_replays_it(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)
    engine = create_engine(url)
    down = writer_for(engine, tmp_path, sink=BrokenSink(), retry_delay_s=0.01)
    await down.start()
    rows = [row() for _ in range(4)]
    await asyncio.gather(*(down.submit(r) for r in rows))  # durable in its spool
    assert down.spool_path.parent == tmp_path / "spool" and down.spool_bytes() > 0
    neighbour = writer_for(engine, tmp_path)  # a second replica starts while the first one runs
    await neighbour.start()
    assert await neighbour.adopt_orphans() == 0
    assert await count(url) == 0 and down.spool_bytes() > 0  # the live replica's spool is its own
    await down.stop()  # the database is still down for it: the rows stay in its spool
    assert down.spool_path.exists()
    # The running neighbour takes it over on its next look (every adopt_interval_s), no restart needed.
    assert await neighbour.adopt_orphans() == 1
    await neighbour.stop()
    assert await count(url) == 4
    assert not down.spool_path.exists()
    assert list((tmp_path / "spool").iterdir()) == []
    await engine.dispose()
