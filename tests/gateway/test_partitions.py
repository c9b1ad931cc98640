"""The PostgreSQL audit table partitioned by month (migration 0010) and `gateway db maintain`.

On a real PostgreSQL (skipped only where none answers): the upgrade keeps every existing row,
rows land in their month's partition, the default partition catches the rest until `maintain`
moves them out, retention drops whole partitions with their labels and rollups, a duplicate row
is still refused and recognised, the text filter finds words through the GIN index, and the
downgrade gives back one plain table. The text filter is also checked on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, select, text

from gateway import review_store
from gateway.audit import AuditWriter
from gateway.audit_sinks import sink_for
from gateway.db import ROLLUP_LATENCY_COLUMNS, audit_records, audit_rollups, create_engine, review_labels
from gateway.migrate import alembic_config, upgrade
from gateway.partitions import PartitionsAheadTask, maintain, month_start
from gateway.review_store import Filters, ReviewStore, TextMatch
from tests.helpers import PG_ADMIN, insert_rows, throwaway_postgres

ROOT = Path(__file__).resolve().parents[2]
postgres = pytest.mark.postgres


@pytest.fixture
def pg_empty() -> Iterator[str]:
    with throwaway_postgres("gw_parts") as name:
        yield f"{PG_ADMIN}/{name}"


def record(created: datetime, **changes: Any) -> dict[str, Any]:
    return {"request_id": uuid.uuid4().hex, "created_at": created, "finished_at": created,
            "endpoint": "chat.completions", "stream": False, "status": "ok", "http_status": 200,
            "request_json": json.dumps({"messages": [{"role": "user", "content": "hello"}]}),
            "response_text": "an answer", **changes}  # fmt: skip


def sql(url: str, statement: str, **params: Any) -> list[Any]:
    async def go() -> list[Any]:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(go())


def add(url: str, rows: list[dict[str, Any]], table: Any = audit_records) -> None:
    asyncio.run(insert_rows(url, table, rows))


def where_rows_are(url: str) -> dict[str, str]:
    """request_id -> the partition holding it."""
    return {r[0]: r[1] for r in sql(url, "SELECT request_id, tableoid::regclass::text FROM audit_records")}


def cli(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_DATABASE": url, "GATEWAY_DATA_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "db", "maintain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def rollup_row(bucket: datetime) -> dict[str, Any]:
    keys = {"size_s": 3600, "bucket_start": int(bucket.timestamp()) // 3600 * 3600, "origin": "", "model": "m",
            "status": "ok", "blocked_by": "", "flagged_by": ""}  # fmt: skip
    counts = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "latency_n", "toxicity_n",
              "groundedness_n", *ROLLUP_LATENCY_COLUMNS)  # fmt: skip
    sums = ("latency_sum_ms", "toxicity_sum", "groundedness_sum")
    return {**keys, **dict.fromkeys(counts, 1), **dict.fromkeys(sums, 1.0)}


@postgres
def test_upgrade_keeps_every_row_and_new_rows_find_their_partition(pg_empty: str, tmp_path: Path) -> None:
    url = pg_empty
    upgrade(url, "0009")
    now = datetime.now(UTC)
    old = [record(now - timedelta(days=d, minutes=i)) for i, d in enumerate(range(0, 90, 3))]
    add(url, old)
    max_id = sql(url, "SELECT max(id) FROM audit_records")[0][0]
    upgrade(url)
    assert sql(url, "SELECT relkind::text FROM pg_class WHERE relname = 'audit_records'")[0][0] == "p"
    kept = where_rows_are(url)
    assert set(kept) == {r["request_id"] for r in old}  # every row, the same request ids
    assert set(kept.values()) == {"audit_records_legacy"}  # attached as they were, not copied
    # The legacy partition ends at the first month boundary after its newest row; months follow.
    first = month_start(now, 1)
    ahead, far = record(first + timedelta(days=40)), record(datetime(2100, 3, 5, tzinfo=UTC))
    add(url, [ahead, far])
    placed = where_rows_are(url)
    assert placed[ahead["request_id"]] == f"audit_records_p{first + timedelta(days=40):%Y_%m}"
    assert placed[far["request_id"]] == "audit_records_default"  # no insert fails for want of a partition
    assert sql(url, "SELECT min(id) FROM audit_records WHERE id > :m", m=max_id)[0][0] > max_id  # one sequence

    done = cli(url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "audit_records_p2100_03" in done.stdout and "rows moved out of the default partition: 1" in done.stdout
    assert where_rows_are(url)[far["request_id"]] == "audit_records_p2100_03"
    assert sql(url, "SELECT count(*) FROM audit_records_default")[0][0] == 0
    again = cli(url, tmp_path)  # idempotent
    assert again.returncode == 0 and "partitions created: none" in again.stdout
    assert len(where_rows_are(url)) == len(old) + 2


@postgres
def test_retention_drops_whole_partitions_with_their_labels_and_rollups(pg_empty: str, tmp_path: Path) -> None:
    url = pg_empty
    upgrade(url)  # empty: partitions from this month on
    now = datetime.now(UTC)
    ancient, older, recent = record(now - timedelta(days=400)), record(now - timedelta(days=380)), record(now)
    kept = record(now - timedelta(days=100))
    add(url, [ancient, older, kept, recent])
    add(url, [{"request_id": ancient["request_id"], "label": "toxic", "reviewer": "key_r", "created_at": now},
              {"request_id": recent["request_id"], "label": "ok", "reviewer": "key_r", "created_at": now}],
        review_labels)  # fmt: skip
    add(url, [rollup_row(now - timedelta(days=400)), rollup_row(now - timedelta(days=2))], audit_rollups)
    assert where_rows_are(url)[ancient["request_id"]] == "audit_records_default"

    archive = tmp_path / "archive"
    done = cli(url, tmp_path, "--retention-days", "200", "--archive", str(archive))
    assert done.returncode == 0, done.stderr
    gone = {f"audit_records_p{r['created_at']:%Y_%m}" for r in (ancient, older)}
    assert all(name in done.stdout for name in gone) and "1 labels" in done.stdout
    left = where_rows_are(url)
    assert set(left) == {kept["request_id"], recent["request_id"]}
    assert left[kept["request_id"]] == f"audit_records_p{kept['created_at']:%Y_%m}"
    tables = {r[0] for r in sql(url, "SELECT relname FROM pg_class WHERE relname LIKE 'audit_records_p%'")}
    assert not gone & tables  # detached and dropped, not left behind
    assert [r[0] for r in sql(url, "SELECT request_id FROM review_labels")] == [recent["request_id"]]
    buckets = [r[0] for r in sql(url, "SELECT bucket_start FROM audit_rollups")]
    assert buckets == [rollup_row(now - timedelta(days=2))["bucket_start"]]
    archived = {}
    for path in archive.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            archived[item["request_id"]] = item
    assert set(archived) == {ancient["request_id"], older["request_id"]}
    assert archived[ancient["request_id"]]["labels"][0]["label"] == "toxic"
    assert not list(archive.glob(".*"))  # no partial file left

    again = cli(url, tmp_path, "--retention-days", "200")
    assert again.returncode == 0 and "partitions dropped: none" in again.stdout
    assert cli(url, tmp_path, "--archive", str(archive)).returncode == 2  # archive without retention
    assert cli(url, tmp_path, "--months-ahead", "-1").returncode == 2


@postgres
async def test_a_duplicate_row_is_recognised_as_stored_not_failing_its_batch(pg_empty: str, tmp_path: Path) -> None:
    url = pg_empty
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    stored = record(datetime.now(UTC))
    async with engine.begin() as conn:
        await conn.execute(insert(audit_records), [stored])
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink_for(engine, audit_records))
    await writer.start()
    good = [record(datetime.now(UTC)) for _ in range(20)]
    try:
        # A commit whose acknowledgement was lost comes again: the same row, the same created_at.
        await asyncio.gather(*(writer.submit(r) for r in [*good[:10], dict(stored), *good[10:]]))
    finally:
        await writer.stop()
    try:
        async with engine.connect() as conn:
            ids = list((await conn.execute(select(audit_records.c.request_id))).scalars())
    finally:
        await engine.dispose()
    assert writer.refused == 1 and writer.dead_lettered == 0 and writer.spooled == 0
    assert sorted(ids) == sorted([stored["request_id"], *(r["request_id"] for r in good)])  # once each


@postgres
def test_downgrade_gives_back_one_plain_table(pg_empty: str) -> None:
    url = pg_empty
    upgrade(url)
    now = datetime.now(UTC)
    rows = [record(now), record(now + timedelta(days=35)), record(datetime(2090, 1, 1, tzinfo=UTC))]
    add(url, rows)
    command.downgrade(alembic_config(url), "0009")
    assert sql(url, "SELECT relkind::text FROM pg_class WHERE relname = 'audit_records'")[0][0] == "r"
    assert set(where_rows_are(url)) == {r["request_id"] for r in rows}
    assert not sql(url, "SELECT relname FROM pg_class WHERE relname LIKE 'audit_records_p%'")
    with pytest.raises(Exception, match="uq_audit_records_request_id"):
        add(url, [{**record(now), "request_id": rows[0]["request_id"]}])  # unique on its own again
    upgrade(url)  # and up again
    assert set(where_rows_are(url)) == {r["request_id"] for r in rows}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=postgres)])
def searchable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'search.db'}"
        upgrade(url)
        yield url
        return
    with throwaway_postgres("gw_search") as name:
        url = f"{PG_ADMIN}/{name}"
        upgrade(url)
        yield url


async def test_text_search_finds_a_word_in_the_prompt_and_in_the_answer(searchable: str) -> None:
    now = datetime.now(UTC)
    prompt = record(now, request_json=json.dumps({"messages": [{"role": "user", "content": "line one\nzebras"}]}))
    answer = record(now, response_text="Nobody is an IDIOT here.")
    other = record(now, response_text="nothing to see")
    engine = create_engine(searchable)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(audit_records), [prompt, answer, other])
        store = ReviewStore(engine)

        async def found(q: str) -> set[str]:
            page = await store.page(Filters.parse({"q": q}), limit=50)
            return {r["request_id"] for r in page["data"]}

        assert await found("zebra") == {prompt["request_id"]}  # after an escaped line break, a word's start
        assert await found("idiot") == {answer["request_id"]}  # any case
        assert await found("giraffe") == set()
        if engine.dialect.name != "postgresql":
            return
        # Through the GIN index of every partition (the query repeats the index's expression).
        filter_sql = str(
            select(audit_records.c.id)
            .where(TextMatch("zebra"))
            .compile(engine.sync_engine, compile_kwargs={"literal_binds": True})
        )
        async with engine.connect() as conn:
            for setting in ("enable_seqscan", "enable_indexscan", "enable_indexonlyscan"):
                await conn.execute(text(f"SET {setting} = off"))
            plan = "\n".join((await conn.execute(text("EXPLAIN " + filter_sql))).scalars())
        assert "Bitmap Index Scan" in plan and "to_tsvector_idx" in plan, plan
        assert "Seq Scan" not in plan, plan
    finally:
        await engine.dispose()


@postgres
@pytest.mark.parametrize("cap", [20_000, 1])
async def test_word_search_pages_the_same_whether_the_word_is_rare_or_common(
    pg_empty: str, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the cap the page comes from the GIN matches; over it (a common word) from the planner's
    own plan: the same rows, newest first, and the same keyset pages."""
    monkeypatch.setattr(review_store, "TEXT_PROBE_CAP", cap)
    url = pg_empty
    await asyncio.to_thread(upgrade, url)
    now = datetime.now(UTC)
    rows = [record(now - timedelta(hours=i), response_text=f"a quokka number {i}") for i in range(5)]
    rows += [
        record(now - timedelta(minutes=30 + i), status="blocked", response_text="quokka, blocked") for i in range(2)
    ]
    rows.append(record(now, response_text="no marsupial"))
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
        store, seen, before = ReviewStore(engine), [], None
        while True:
            page = await store.page(Filters.parse({"q": "quokka"}), before=before, limit=2)
            seen += [r["request_id"] for r in page["data"]]
            before = page["next"]
            if before is None:
                break
        blocked = await store.page(Filters.parse({"q": "quokka", "status": "blocked"}), limit=50)
        none = await store.page(Filters.parse({"q": "wombat"}), limit=50)
    finally:
        await engine.dispose()
    expected = sorted(rows[:7], key=lambda r: r["created_at"], reverse=True)
    assert seen == [r["request_id"] for r in expected]
    assert {r["request_id"] for r in blocked["data"]} == {r["request_id"] for r in rows[5:7]}
    assert none == {"data": [], "next": None}


def test_maintain_on_sqlite_has_nothing_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    done = cli(url, tmp_path, "--retention-days", "30")
    assert done.returncode == 0 and "nothing to do on SQLite" in done.stdout and "db prune" in done.stdout


@postgres
async def test_maintain_creates_the_months_ahead_once(pg_empty: str) -> None:
    url = pg_empty
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    later = datetime.now(UTC) + timedelta(days=200)
    try:
        first = await maintain(engine, months_ahead=2, now=later)
        second = await maintain(engine, months_ahead=2, now=later)
    finally:
        await engine.dispose()
    assert first.created == [f"audit_records_p{month_start(later, add):%Y_%m}" for add in range(3)]
    assert second.created == [] and second.moved == 0


@postgres
async def test_the_gateway_recreates_a_missing_partition_ahead_by_itself(pg_empty: str) -> None:
    url = pg_empty
    await asyncio.to_thread(upgrade, url)
    name = f"audit_records_p{month_start(datetime.now(UTC), 1):%Y_%m}"
    await asyncio.to_thread(sql, url, f"DROP TABLE {name}")  # next month's, as if maintenance never ran
    engine = create_engine(url)
    task = PartitionsAheadTask(engine)
    try:
        task.start()
        for _ in range(200):
            async with engine.connect() as conn:
                exists = (await conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": name})).scalar()
            if exists:
                break
            await asyncio.sleep(0.05)
        assert exists
    finally:
        await task.stop()
        await engine.dispose()


async def test_the_partitions_task_does_nothing_on_sqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    task = PartitionsAheadTask(engine)
    task.start()
    assert task._task is None
    await task.stop()
    await engine.dispose()
