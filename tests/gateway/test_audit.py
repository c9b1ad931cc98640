"""The audit log: group commit, the durable spool when the database is down, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import openai
import pytest
from sqlalchemy import func, select

from gateway.audit import AuditWriter
from gateway.audit_sinks import EngineSink, SQLiteSink, sink_for
from gateway.db import audit_records, create_engine
from gateway.migrate import upgrade
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.helpers import audit_rows, create_key, serving

PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def row(**changes: object) -> dict[str, object]:
    now = datetime.now(UTC)
    base: dict[str, object] = {
        "request_id": uuid.uuid4().hex,
        "created_at": now,
        "finished_at": now,
        "endpoint": "chat.completions",
        "stream": False,
        "status": "ok",
        "http_status": 200,
        "request_json": '{"model": "m"}',
        "response_text": "héllo ✓",
    }
    base.update(changes)
    return base


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    name = f"gw_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN + "/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {PG_ADMIN} is not available: {exc}")
    url = f"{PG_ADMIN}/{name}"
    upgrade(url)
    yield url
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_url"))


async def count(url: str, **where: object) -> int:
    engine = create_engine(url)
    try:
        query = select(func.count()).select_from(audit_records)
        for column, value in where.items():
            query = query.where(audit_records.c[column] == value)
        async with engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def test_group_commit_shares_transactions(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink_for(engine, audit_records))
    await writer.start()
    try:
        marker = uuid.uuid4().hex[:12]
        await asyncio.gather(*(writer.submit(row(model=marker)) for _ in range(300)))
        assert writer.committed == 300
        assert writer.batches < 30  # 300 rows in far fewer transactions
        assert await count(database_url, model=marker) == 300
    finally:
        await writer.stop()
        await engine.dispose()


async def test_rows_read_back_identically_through_sqlalchemy(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink_for(engine, audit_records))
    await writer.start()
    original = row(stream=True, gateway_ms=0.125, prompt_tokens=7, api_key_id="key_1")
    try:
        await writer.submit(original)
    finally:
        await writer.stop()
    async with engine.connect() as conn:
        stored = (
            (await conn.execute(select(audit_records).where(audit_records.c.request_id == original["request_id"])))
            .mappings()
            .one()
        )
    await engine.dispose()
    for key, value in original.items():
        if isinstance(value, datetime):
            # SQLite keeps no zone: compare the instant.
            assert stored[key].replace(tzinfo=UTC) == value, key
        else:
            assert stored[key] == value, key


def test_sqlite_gets_the_fast_sink_and_postgres_the_engine_sink(tmp_path: Path) -> None:
    sqlite_engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    pg_engine = create_engine("postgresql://user@127.0.0.1:1/none")
    assert isinstance(sink_for(sqlite_engine, audit_records), SQLiteSink)
    assert isinstance(sink_for(pg_engine, audit_records), EngineSink)


class BrokenSink:
    """A database that refuses every write."""

    def __init__(self) -> None:
        self.calls = 0

    async def write(self, rows: list[dict[str, object]]) -> None:
        self.calls += 1
        raise OSError("database is down")

    async def close(self) -> None:
        return None


async def test_database_outage_spools_rows_and_replays_them(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)  # Alembic runs its own loop
    spool = tmp_path / "spool.jsonl"
    engine = create_engine(url)
    broken = AuditWriter(engine, spool_path=spool, sink=BrokenSink(), retry_delay_s=0.01)
    await broken.start()
    rows = [row() for _ in range(5)]
    await asyncio.gather(*(broken.submit(r) for r in rows))  # resolves: durable in the spool
    await broken.stop()
    assert broken.spooled == 5 and spool.exists()
    assert await count(url) == 0
    # Next start: the spool goes into SQL, once, and the spool file goes away.
    healthy = AuditWriter(engine, spool_path=spool, sink=sink_for(engine, audit_records))
    await healthy.start()
    await healthy.stop()
    assert not spool.exists()
    assert await count(url) == 5
    spool.write_bytes(b"")  # replaying again (e.g. after a crash mid-replay) never duplicates
    await healthy.replay_spool()
    assert await count(url) == 5
    await engine.dispose()


async def test_a_torn_spool_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    import msgspec

    url = await asyncio.to_thread(sqlite_url, tmp_path)  # Alembic runs its own loop
    spool = tmp_path / "spool.jsonl"
    good = row()
    spool.write_bytes(msgspec.json.encode(good) + b"\n" + b'{"request_id": "trunc')
    engine = create_engine(url)
    writer = AuditWriter(engine, spool_path=spool)
    assert await writer.replay_spool() == 1
    assert await count(url, request_id=good["request_id"]) == 1
    await engine.dispose()


@pytest.mark.postgres
def test_full_requests_audited_in_postgresql(tmp_path: Path, pg_url: str, fake_backend: FakeBackendThread) -> None:
    settings = Settings(data_dir=tmp_path, backend=(fake_backend.url,), database=pg_url, embedding_model="hashing")
    key_id, key = create_key(settings, "client")
    with serving(settings, key) as (_gw, client):
        completion = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "pg"}])
        chunks = list(
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "pg"}], stream=True
            )
        )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fake-model", messages=[{"role": "nobody", "content": "x"}])
    ids = {completion.model_extra["gateway"]["request_id"], chunks[-1].model_extra["gateway"]["request_id"]}
    rows = [r for r in audit_rows(settings) if r["api_key_id"] == key_id]
    assert {r["request_id"] for r in rows if r["status"] == "ok"} == ids
    assert [r["status"] for r in rows].count("rejected") == 1
    streamed = next(r for r in rows if r["stream"])
    assert streamed["response_text"] == "".join(c.choices[0].delta.content or "" for c in chunks)
