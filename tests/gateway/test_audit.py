"""The audit log: group commit, the durable spool when the database is down, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
import sqlalchemy.exc
from sqlalchemy import func, select

from gateway.audit import AuditWriter, FailedAuthAllowance
from gateway.audit_rows import TRUNCATED
from gateway.audit_sinks import EngineSink, SQLiteSink, is_refusal, sink_for
from gateway.db import audit_records, create_engine
from gateway.migrate import upgrade
from gateway.settings import Settings, SettingsError, load_settings
from serving.fake import FakeBackendThread
from tests.helpers import PG_ADMIN, GatewayServer, audit_rows, create_key, serving, throwaway_postgres


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
    with throwaway_postgres("gw_test") as name:
        url = f"{PG_ADMIN}/{name}"
        upgrade(url)
        yield url


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


# --- Rows a database would refuse (issue 12, item 1) ---------------------------------------------


async def stored(url: str, request_id: object) -> dict[str, object]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = select(audit_records).where(audit_records.c.request_id == request_id)
            return dict((await conn.execute(query)).mappings().one())
    finally:
        await engine.dispose()


async def count_of(url: str, rows: list[dict[str, object]]) -> int:
    """How many of these rows are in the table (the PostgreSQL database is shared by the session's tests)."""
    engine = create_engine(url)
    try:
        query = select(func.count()).where(audit_records.c.request_id.in_([r["request_id"] for r in rows]))
        async with engine.connect() as conn:
            return int((await conn.execute(query.select_from(audit_records))).scalar_one())
    finally:
        await engine.dispose()


class RefusingSink:
    """A healthy sink that refuses, like a database would (a DataError), any batch holding a marked row."""

    def __init__(self, inner: object, marker: str = "refuse-me") -> None:
        self.inner = inner
        self.marker = marker
        self.writes = 0

    async def write(self, rows: list[dict[str, object]]) -> None:
        self.writes += 1
        if any(r.get("error_message") == self.marker for r in rows):
            raise sqlalchemy.exc.DataError("INSERT ...", {}, ValueError("value refused"))
        await self.inner.write(rows)  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


def poisoned_rows() -> list[dict[str, object]]:
    """What a client or a backend can put in a row: each one made a whole batch go to the spool."""
    return [
        row(request_json='{"model":"fake-model","messages":[{"role":"user","content":"a\x00b"}]}'),
        row(model="m" * 201, http_status=404, status="rejected"),
        row(prompt_tokens=10**30, completion_tokens=[1], total_tokens="12"),
        row(response_text={"role": "assistant", "content": "an object"}),  # type: ignore[arg-type]
        row(response_text="lone \ud800 surrogate"),  # only the thorough scrub catches this one
    ]


async def test_rows_a_database_would_refuse_are_stored_fitted(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink_for(engine, audit_records))
    await writer.start()
    good = [row() for _ in range(20)]
    poison = poisoned_rows()
    try:
        await asyncio.gather(*(writer.submit(r) for r in [*good[:10], *poison, *good[10:]]))  # one batch
    finally:
        await writer.stop()
        await engine.dispose()
    assert writer.spooled == 0 and writer.dead_lettered == 0
    assert not (tmp_path / "spool.jsonl").exists()
    for r in good:
        assert (await stored(database_url, r["request_id"]))["response_text"] == "héllo ✓"
    nul, long_model, usage, content, surrogate = [await stored(database_url, r["request_id"]) for r in poison]
    assert "\x00" not in str(nul["request_json"]) and "a\ufffdb" in str(nul["request_json"])
    assert len(str(long_model["model"])) == 200 and str(long_model["model"]).endswith(TRUNCATED)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (None, None, 12)
    assert msgspec.json.decode(str(content["response_text"])) == {"role": "assistant", "content": "an object"}
    assert surrogate["response_text"] == "lone \ufffd surrogate"


async def test_a_row_still_refused_is_set_aside_and_the_good_rows_commit(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    sink = RefusingSink(sink_for(engine, audit_records))
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink)
    await writer.start()
    good = [row() for _ in range(40)]
    bad = row(error_message="refuse-me", model="kept-in-the-stub", api_key_id="key_x")
    try:
        await asyncio.gather(*(writer.submit(r) for r in [*good[:25], bad, *good[25:]]))
    finally:
        await writer.stop()
        await engine.dispose()
    assert writer.spooled == 0 and writer.dead_lettered == 1
    assert await count_of(database_url, [*good, bad]) == 41  # the 40 good rows, and the refused one's stub
    stub = await stored(database_url, bad["request_id"])
    assert stub["error_code"] == "audit_row_refused" and stub["api_key_id"] == "key_x"
    assert "value refused" in str(stub["error_message"]) and stub["model"] is None
    (letter,) = [msgspec.json.decode(line) for line in writer.dead_letter_path.read_bytes().splitlines()]
    assert "value refused" in letter["error"]
    assert letter["row"]["model"] == "kept-in-the-stub" and letter["row"]["request_id"] == bad["request_id"]


def spool_lines(rows: list[dict[str, object]]) -> bytes:
    return b"".join(msgspec.json.encode(r) + b"\n" for r in rows)


async def test_a_poisoned_spool_replays_and_the_next_start_succeeds(database_url: str, tmp_path: Path) -> None:
    """The spool as the old writer left it: raw rows the database refuses, a torn line; start-up must go on."""
    spool = tmp_path / "spool.jsonl"
    good = [row() for _ in range(30)]
    poison = poisoned_rows()[:4]  # a lone surrogate never reaches the spool: msgspec cannot encode it
    spool.write_bytes(spool_lines([*good[:15], *poison, *good[15:]]) + b'{"request_id": "torn')
    engine = create_engine(database_url)
    writer = AuditWriter(engine, spool_path=spool, sink=sink_for(engine, audit_records))
    await writer.start()  # an error here stopped the process before
    live = row()
    await writer.submit(live)
    await writer.stop()
    await engine.dispose()
    assert not spool.exists() and writer.spooled == 0
    assert await count_of(database_url, [*good, *poison, live]) == 30 + 4 + 1
    assert (await stored(database_url, poison[1]["request_id"]))["model"] == "m" * 188 + TRUNCATED


async def test_a_refused_spooled_row_does_not_slow_or_spool_live_commits(database_url: str, tmp_path: Path) -> None:
    """Before: every commit replayed the spool, failed on the bad row and spooled the live batch too."""
    spool = tmp_path / "spool.jsonl"
    spooled = [row(), row(error_message="refuse-me"), row()]
    spool.write_bytes(spool_lines(spooled))
    engine = create_engine(database_url)
    writer = AuditWriter(engine, spool_path=spool, sink=RefusingSink(sink_for(engine, audit_records)))
    await writer.start()
    live = [row() for _ in range(5)]
    for r in live:
        await writer.submit(r)
    await writer.stop()
    await engine.dispose()
    assert writer.spooled == 0 and writer.dead_lettered == 1
    assert not spool.exists() and not spool.with_name(spool.name + ".replaying").exists()
    assert await count_of(database_url, [*spooled, *live]) == 3 + 5  # the refused row as its stub


class FlakySink:
    """Refuses one marked row like a database would, and is unreachable for every write after that."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.broken = False

    async def write(self, rows: list[dict[str, object]]) -> None:
        if self.broken:
            raise OSError("connection refused")
        if any(r.get("error_message") == "refuse-me" for r in rows):
            self.broken = True  # the database goes away in the middle of splitting the batch
            raise sqlalchemy.exc.DataError("INSERT ...", {}, ValueError("value refused"))
        await self.inner.write(rows)  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


async def test_an_outage_while_splitting_a_batch_spools_instead_of_dead_lettering(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)
    spool = tmp_path / "spool.jsonl"
    engine = create_engine(url)
    writer = AuditWriter(engine, spool_path=spool, sink=FlakySink(sink_for(engine, audit_records)), retry_delay_s=0.01)
    await writer.start()
    rows = [row(), row(error_message="refuse-me"), row(), row()]
    await asyncio.gather(*(writer.submit(r) for r in rows))
    await writer.stop()
    await engine.dispose()
    assert writer.dead_lettered == 0 and writer.spooled == 4
    assert {msgspec.json.decode(line)["request_id"] for line in spool.read_bytes().splitlines()} == {
        r["request_id"] for r in rows
    }


def test_refusal_or_outage_is_told_apart() -> None:
    pg_refused = sqlalchemy.exc.DBAPIError("INSERT", {}, _PgError("22021"))
    pg_down = sqlalchemy.exc.DBAPIError("INSERT", {}, _PgError("55000"))  # not accepting connections
    assert is_refusal(pg_refused) and not is_refusal(pg_down)
    assert is_refusal(sqlite3.ProgrammingError("Error binding parameter 3: type 'list' is not supported"))
    assert is_refusal(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert not is_refusal(sqlite3.OperationalError("database is locked"))
    assert not is_refusal(ConnectionRefusedError(111, "Connect call failed"))
    assert not is_refusal(RuntimeError("something nobody anticipated"))  # unknown: spool, never set aside


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


# --- A locked SQLite file (item 9) ---------------------------------------------------------------


async def test_a_locked_sqlite_file_spools_after_the_configured_wait(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)
    spool = tmp_path / "spool.jsonl"
    engine = create_engine(url)
    sink = sink_for(engine, audit_records, wait_s=0.2)
    writer = AuditWriter(engine, spool_path=spool, sink=sink, db_wait_s=0.2, probe_interval_s=0)
    await writer.start()
    holder = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        first = row()
        # It used to wait 30 s per try, three tries; this bound is far above 0.2 s and far below that.
        await asyncio.wait_for(writer.submit(first), timeout=20)
        assert writer.spooled == 1 and spool.exists()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await writer.submit(row())  # the lock is gone: this commits and the spooled row follows
    await writer.stop()
    await engine.dispose()
    assert await count(url) == 2 and await count(url, request_id=first["request_id"]) == 1
    assert not spool.exists()


def test_audit_db_wait_is_a_validated_setting() -> None:
    assert load_settings(environ={"GATEWAY_AUDIT_DB_WAIT": "0.5"}).audit_db_wait == 0.5
    with pytest.raises(SettingsError, match="audit_db_wait"):
        load_settings(environ={"GATEWAY_AUDIT_DB_WAIT": "0"})


# --- Failed authentications without a key (item 10) ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unauthorized(address: str | None) -> dict[str, object]:
    return row(status="unauthorized", http_status=401, error_code="invalid_api_key", client_ip=address)


async def test_failed_authentications_are_summarised_per_address_and_minute(tmp_path: Path) -> None:
    url = await asyncio.to_thread(sqlite_url, tmp_path)
    engine = create_engine(url)
    clock = Clock()
    allowance = FailedAuthAllowance(allowance=10, window_s=60, clock=clock)
    writer = AuditWriter(
        engine, spool_path=tmp_path / "spool.jsonl", sink=sink_for(engine, audit_records), failed_auth=allowance
    )
    await writer.start()
    await asyncio.gather(*(writer.submit(unauthorized("10.0.0.1")) for _ in range(25)))
    await asyncio.gather(*(writer.submit(unauthorized("10.0.0.2")) for _ in range(3)))
    await writer.submit(row(status="unauthorized", http_status=403, api_key_id="key_1", client_ip="10.0.0.1"))
    clock.now += 61  # a new minute: a new allowance, and last minute's summary is written
    await asyncio.gather(*(writer.submit(unauthorized("10.0.0.1")) for _ in range(12)))
    await writer.stop()  # the open window's summary too
    await engine.dispose()
    full = await count(url, error_code="invalid_api_key")
    assert full == 10 + 3 + 10
    summaries = [r for r in await all_rows(url) if r["error_code"] == "unauthorized_aggregated"]
    assert sorted(msgspec.json.decode(str(s["response_json"]))["count"] for s in summaries) == [2, 15]
    assert {s["client_ip"] for s in summaries} == {"10.0.0.1"} and all(s["http_status"] == 401 for s in summaries)
    assert await count(url, api_key_id="key_1") == 1  # a known key's 403 is never aggregated
    assert writer.failed_auth_suppressed == 15 + 2


def test_failed_authentication_tracking_is_bounded() -> None:
    clock = Clock()
    allowance = FailedAuthAllowance(allowance=1, window_s=60, max_addresses=50, clock=clock)
    admitted = [allowance.admit(unauthorized(f"10.1.{i // 256}.{i % 256}"))[0] for i in range(5000)]
    assert len(allowance._tallies) <= 51  # the tracked addresses and one shared tally
    assert admitted.count(True) == 50 + 1  # each tracked address once, the shared tally once
    (summary,) = allowance.drain()[-1:]
    assert summary["client_ip"] is None and msgspec.json.decode(summary["response_json"])["count"] == 5000 - 51


async def all_rows(url: str) -> list[dict[str, object]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(select(audit_records))]
    finally:
        await engine.dispose()


def test_wrong_keys_over_http_get_their_401_and_bounded_rows(gateway: GatewayServer, settings: Settings) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-wrong"})
        for _ in range(14)
    ]
    assert {a.status_code for a in answers} == {401}
    assert all(a.json()["error"]["code"] == "invalid_api_key" for a in answers)
    gateway.__exit__()  # stop: the open window's summary is written
    rows = audit_rows(settings, status="unauthorized")
    assert [r["error_code"] for r in rows].count("invalid_api_key") == 10
    (summary,) = [r for r in rows if r["error_code"] == "unauthorized_aggregated"]
    assert msgspec.json.decode(summary["response_json"])["count"] == 4 and summary["client_ip"] == "127.0.0.1"


@pytest.mark.postgres
def test_hostile_bodies_are_audited_in_postgresql_and_a_poisoned_spool_does_not_stop_start_up(
    tmp_path: Path, pg_url: str, fake_backend: FakeBackendThread
) -> None:
    settings = Settings(
        data_dir=tmp_path, backend=(fake_backend.url,), database=pg_url, embedding_model="hashing", sample_corpus=False
    )
    key_id, key = create_key(settings, "client")
    left_over = row(request_json='{"content":"a\x00b"}', model="m" * 201, prompt_tokens=10**30, api_key_id=key_id)
    (tmp_path / "audit-spool.jsonl").write_bytes(spool_lines([left_over]))  # what the old writer left behind
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = "/v1/chat/completions"
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, headers=headers) as http:  # started: no exit
        nul = http.post(url, content=b'{"model":"fake-model","messages":[{"role":"user","content":"a\x00b"}]}')
        long_model = http.post(url, json={"model": "m" * 201, "messages": [{"role": "user", "content": "x"}]})
        fine = http.post(url, json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
        assert gw.services.audit.spooled == 0
    assert (nul.status_code, long_model.status_code, fine.status_code) == (400, 404, 200)
    rows = {r["request_id"]: r for r in audit_rows(settings, api_key_id=key_id)}
    answered = [a.headers["x-gateway-request-id"] for a in (nul, long_model, fine)]
    assert sorted(rows) == sorted([*answered, left_over["request_id"]])
    assert "a\ufffdb" in str(rows[answered[0]]["request_json"])
    assert len(str(rows[answered[1]]["model"])) == 200 and rows[answered[1]]["http_status"] == 404
    assert rows[left_over["request_id"]]["model"] == "m" * 188 + TRUNCATED
    assert rows[left_over["request_id"]]["prompt_tokens"] is None
    assert not (tmp_path / "audit-spool.jsonl").exists()
