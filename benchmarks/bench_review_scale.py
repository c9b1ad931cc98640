"""Reviewer queries on a big PostgreSQL audit log: partitioned by month (migration 0010) or not.

For each layout, a fresh database of its own (`bench_scale_partitioned`, `bench_scale_plain`, the
prefix set by --db-prefix; dropped at the end unless --keep) is filled with N records spread evenly
over the last 12 months and a few days (in time order, as a gateway writes them): `INSERT ...
SELECT generate_series` joined to 5,000 generated sentences over a 3,000-word vocabulary
(Zipf-like), about 350 bytes of stored request and 450 of answer a record; 2 % blocked, 10 %
flagged, 3 models, 20 keys; one record in 100,000 mentions "zanzibar"; feedback on 1 % (a third
negative; each row with its record's created_at, as `FeedbackStore` writes it since migration
0012), labels on 0.1 %.

- `partitioned`: the head schema (monthly partitions, GIN text index), the past months' partitions
  created as a gateway running all year would have.
- `plain`: the schema before 0010 (revision 0009, one table), with the same GIN index and 0012's
  `feedback.record_created_at` added, so both run the same reviewer code and only the layout differs.

Both are filled with their b-tree indexes in place; the GIN index is built after the fill (filling
through it runs at about 1,000 records/s on 2 shared cores, so an hour for a few million).

Then it times, through the real code (`ReviewStore`, `FeedbackStore`, `gateway.partitions`,
`gateway.retention`): the first list page, a page six months deep (keyset cursor), pages filtered
by status, model and rating (negative, positive), text search (a rare word, two common words, and
a text with punctuation, which keeps the exact-substring scan), the review queue, one record by request id, the feedback
check of a request id; and retention: dropping the oldest month (partitioned: `DETACH` + `DROP`)
against `db prune` deleting row by row (plain: a few days' worth, timed, as a rate). Prints
p50/p99 in ms (with --repeat 20, p99 is about the slowest run).

    .venv/bin/python benchmarks/bench_review_scale.py --rows 500000 [--layouts partitioned,plain] [--keep]
    .venv/bin/python benchmarks/bench_review_scale.py --reuse --layouts partitioned  # queries again
    .venv/bin/python benchmarks/bench_review_scale.py --reuse --cases queue,rating  # some of them
    .venv/bin/python benchmarks/bench_review_scale.py --layouts upgrade --rows 500000  # the migration
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth import KeyInfo
from gateway.db import create_engine
from gateway.feedback import FeedbackIn, FeedbackStore
from gateway.migrate import upgrade
from gateway.partitions import MaintainReport, create_ahead, drop_older, month_start
from gateway.retention import prune
from gateway.review_store import TEXT_SEARCH_SQL, Filters, ReviewStore

CHUNK = 250_000  # rows per INSERT ... SELECT transaction
SENTENCES = 5000
RARE = "zanzibar"


def vocabulary(rng: random.Random) -> list[str]:
    common = [
        "the", "a", "to", "of", "and", "is", "it", "in", "for", "on", "my", "with", "battery", "robot",
        "vacuum", "warranty", "cleaner", "app", "map", "room", "filter", "charger", "schedule", "mop",
        "brush", "wheel", "dock", "error", "light", "sensor", "clean", "floor", "carpet",
    ]  # fmt: skip
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "dra", "sto", "gli", "mar", "ben", "qui"]
    made = {"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(6000)}
    return common + sorted(made - set(common))[: 3000 - len(common)]


def sentences(rng: random.Random) -> list[str]:
    words = vocabulary(rng)
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like: "the" is everywhere
    out = []
    for _ in range(SENTENCES):
        chosen = rng.choices(words, weights=weights, k=rng.randint(35, 75))
        out.append(" ".join(chosen).capitalize() + ".")
    return out


FILL = """
INSERT INTO audit_records (request_id, created_at, finished_at, api_key_id, endpoint, model, stream, status,
    http_status, request_json, response_text, blocked_by, flagged_by, groundedness, toxicity, total_ms,
    total_tokens, passages_json)
SELECT md5(g::text), t.at, t.at + interval '800 milliseconds', 'key_' || lpad((g % 20)::text, 2, '0'),
    'chat.completions',
    CASE WHEN g % 20 = 0 THEN 'llama-8b' WHEN g % 4 = 0 THEN 'qwen-7b' ELSE 'smollm2' END, false,
    CASE WHEN g % 50 = 0 THEN 'blocked' ELSE 'ok' END, CASE WHEN g % 50 = 0 THEN 400 ELSE 200 END,
    '{"model": "smollm2", "messages": [{"role": "system", "content": "You help with robot vacuums."}, '
        || '{"role": "user", "content": "' || p.s
        || CASE WHEN g % 100000 = 7 THEN ' Ship it to ' || CAST(:rare AS text) || '.' ELSE '' END || '"}]}',
    a.s || E'\\n\\n' || b.s,
    CASE WHEN g % 50 = 0 THEN 'toxicity' END, CASE WHEN g % 10 = 3 THEN 'groundedness' END,
    ((g * 7919) % 1000) / 1000.0, ((g * 104729) % 1000) / 10000.0, 200 + (g * 31) % 1800,
    200 + g % 700, CASE WHEN g % 3 = 0 THEN '[{"id": "doc#1"}]' END
FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) g
CROSS JOIN LATERAL (SELECT CAST(:start AS timestamptz) + (g - 1) * CAST(:step AS interval) AS at) t
JOIN bench_sentences p ON p.id = g % 5000
JOIN bench_sentences a ON a.id = (g * 7) % 5000
JOIN bench_sentences b ON b.id = (g * 13 + 1) % 5000
"""


async def fill(engine: AsyncEngine, rows: int, start: datetime, end: datetime) -> float:
    """Fill the audit log (and feedback, labels); returns seconds."""
    rng = random.Random(11)
    began = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE bench_sentences (id int PRIMARY KEY, s text NOT NULL)"))
        await conn.execute(
            text("INSERT INTO bench_sentences VALUES (:id, :s)"),
            [{"id": i, "s": s} for i, s in enumerate(sentences(rng))],
        )
        await conn.execute(text("ANALYZE bench_sentences"))  # a hash join, not a scan of it per row
    step = (end - start) / rows
    for lo in range(1, rows + 1, CHUNK):
        hi = min(rows, lo + CHUNK - 1)
        async with engine.begin() as conn:
            await conn.execute(text(FILL), {"lo": lo, "hi": hi, "start": start, "step": step, "rare": RARE})
        print(f"  {hi:>11,} rows  {time.perf_counter() - began:7.1f} s", flush=True)
    async with engine.begin() as conn:
        columns = "SELECT column_name FROM information_schema.columns WHERE table_name = 'feedback'"
        if "record_created_at" in set((await conn.execute(text(columns))).scalars()):
            # The rated record's created_at (migration 0012), read from the record as the gateway does.
            record, fill_feedback = ", record_created_at", ", a.created_at"
        else:
            record, fill_feedback = "", ""  # the schema before 0012 (`--layouts upgrade`)
        await conn.execute(
            text(
                f"INSERT INTO feedback (request_id, key_id, rating, created_at{record}) "
                "SELECT md5(g::text), 'key_' || lpad((g % 20)::text, 2, '0'), "
                f"CASE WHEN g % 3 = 0 THEN -1 ELSE 1 END, now(){fill_feedback} FROM generate_series(1, :n, 100) g "
                "JOIN audit_records a ON a.request_id = md5(g::text)"
            ),
            {"n": rows},
        )
        await conn.execute(
            text(
                "INSERT INTO review_labels (request_id, label, reviewer, created_at) "
                "SELECT md5(g::text), 'ok', 'key_r', now() FROM generate_series(5, :n, 1000) g"
            ),
            {"n": rows},
        )
    return time.perf_counter() - began


async def timed(repeat: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    samples, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = await call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return statistics.median(samples), p99, result


async def queries(
    engine: AsyncEngine, rows: int, now: datetime, repeat: int, only: list[str] | None = None
) -> list[tuple[str, float, float, str]]:
    store, feedback = ReviewStore(engine), FeedbackStore(engine)
    rng = random.Random(3)
    ids = [hash_of(rng.randint(rows // 10, rows)) for _ in range(repeat)]  # not in the month a run drops
    deep = f"{(now - timedelta(days=182)).isoformat()}|{2**62}"
    reviewer = KeyInfo(id="key_r", name="bench", role="reviewer")
    picks = iter(ids * 3)

    def page(label: str, **filters: str) -> tuple[str, Callable[[], Awaitable[Any]]]:
        return label, lambda: store.page(Filters.parse(filters), limit=50)

    cases: list[tuple[str, Callable[[], Awaitable[Any]], int]] = [
        (*page("list, first page"), repeat),
        ("list, a page 6 months deep", lambda: store.page(Filters(), before=deep, limit=50), repeat),
        (*page("filter status=blocked", status="blocked"), repeat),
        (*page("filter model=llama-8b", model="llama-8b"), repeat),
        (*page("filter status=blocked, model=smollm2", status="blocked", model="smollm2"), repeat),
        (*page("filter rating=negative", rating="negative"), repeat),
        (*page("filter rating=positive", rating="positive"), repeat),
        (*page(f"text: rare word '{RARE}'", q=RARE), repeat),
        (*page("text: two common words 'battery warranty'", q="battery warranty"), repeat),
        (*page(f"text with punctuation '{RARE}.' (substring scan)", q=f"{RARE}."), max(1, repeat // 10)),
        ("review queue (5 % sample)", lambda: store.queue(sample_rate=0.05, limit=50), repeat),
        ("one record by request_id", lambda: store.record(next(picks)), repeat),
        ("feedback: check + store", lambda: feedback.add(reviewer, FeedbackIn(next(picks), 1)), repeat),
    ]
    out = []
    for label, call, times in cases:
        if only and not any(part in label for part in only):
            continue
        p50, p99, result = await timed(times, call)
        found = f"{len(result['data'])} rows" if isinstance(result, dict) and "data" in result else ""
        out.append((label, p50, p99, found))
        print(f"  {label:<52} p50 {p50:9.1f} ms  p99 {p99:9.1f} ms  {found}", flush=True)
    return out


def hash_of(g: int) -> str:
    import hashlib

    return hashlib.md5(str(g).encode()).hexdigest()


async def admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(f"{url}/postgres")
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def retention(engine: AsyncEngine, layout: str, rows: int, start: datetime, end: datetime) -> str:
    oldest_end = month_start(start, 1)
    if layout == "partitioned":
        dropped = MaintainReport()
        began = time.perf_counter()
        await drop_older(engine, oldest_end, None, dropped)
        seconds = time.perf_counter() - began
        return (f"db maintain --retention-days: dropped {', '.join(dropped.dropped)} (~{dropped.dropped_rows:,} "
                f"records) in {seconds:.2f} s")  # fmt: skip
    per_day = rows / ((end - start).total_seconds() / 86400)
    cutoff = start + timedelta(days=3)
    began = time.perf_counter()
    report = await prune(engine, cutoff, batch=2000, pause_s=0.0)
    seconds = time.perf_counter() - began
    rate = report.records / seconds if seconds else 0
    month = per_day * 30
    return (
        f"db prune: {report.records:,} records (3 days) in {seconds:.1f} s, {rate:,.0f} records/s; "
        f"a month (~{month:,.0f} records) would take ~{month / rate:,.0f} s"
        if rate
        else "db prune: nothing"
    )


async def time_upgrade(args: argparse.Namespace, name: str, url: str, now: datetime) -> None:
    """Migration 0010 on a filled table of the schema before it: attach, keys and text index."""
    start = month_start(now, -12)
    print(f"\n== upgrade: {args.rows:,} records at revision 0009, then migration 0010", flush=True)
    await asyncio.to_thread(upgrade, url, "0009")
    engine = create_engine(url)
    try:
        seconds = await fill(engine, args.rows, start, now)
        print(f"  fill: {seconds:.1f} s", flush=True)
        began = time.perf_counter()
        await asyncio.to_thread(upgrade, url)
        print(f"  migration 0010 (attach, (id, created_at) and (request_id, created_at) keys, GIN index): "
              f"{time.perf_counter() - began:.1f} s", flush=True)  # fmt: skip
        async with engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM audit_records_legacy"))).scalar()
        print(f"  rows in the attached legacy partition: {count:,}", flush=True)
    finally:
        await engine.dispose()
        if not args.keep:
            await admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def run_layout(args: argparse.Namespace, layout: str) -> None:
    name = f"{args.db_prefix}_{layout}"
    url = f"{args.pg}/{name}"
    now = datetime.now(UTC)
    if args.reuse:  # the queries again, on a database an earlier run kept
        engine = create_engine(url)
        try:
            print(f"\n== {layout}: the kept database {name}", flush=True)
            await queries(engine, args.rows, now, args.repeat, args.cases)
        finally:
            await engine.dispose()
        return
    await admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    if layout == "upgrade":
        await time_upgrade(args, name, url, now)
        return
    start = month_start(now, -12)
    print(f"\n== {layout}: {args.rows:,} records from {start:%Y-%m-%d} to {now:%Y-%m-%d}", flush=True)
    await asyncio.to_thread(upgrade, url, "head" if layout == "partitioned" else "0009")
    engine = create_engine(url)
    try:
        if layout == "partitioned":
            await create_ahead(engine, 13, start)  # the past months (a gateway running all year made them)
        else:  # 0012's column, which the reviewer code reads; the rest of 0010 to 0012 is the layout
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE feedback ADD COLUMN record_created_at timestamptz"))
        async with engine.begin() as conn:  # the text index is built after the fill, in both layouts
            await conn.execute(text("DROP INDEX IF EXISTS ix_audit_records_text_search"))
        seconds = await fill(engine, args.rows, start, now)
        print(f"  fill: {seconds:.1f} s ({args.rows / seconds:,.0f} records/s, b-tree indexes in place)", flush=True)
        began = time.perf_counter()
        async with engine.begin() as conn:
            await conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
            plain_sql = TEXT_SEARCH_SQL.replace("audit_records.", "")
            index = f"CREATE INDEX ix_audit_records_text_search ON audit_records USING gin (({plain_sql}))"
            await conn.execute(text(index))
        print(f"  GIN text index built: {time.perf_counter() - began:.1f} s", flush=True)
        began = time.perf_counter()
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE"))
        print(f"  vacuum analyze: {time.perf_counter() - began:.1f} s", flush=True)
        async with engine.connect() as conn:
            size = (await conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))"))).scalar()
        print(f"  database size: {size}", flush=True)
        await queries(engine, args.rows, now, args.repeat, args.cases)
        print("  " + await retention(engine, layout, args.rows, start, now), flush=True)
    finally:
        await engine.dispose()
        if not args.keep:
            await admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--layouts", default="partitioned,plain",
                        help="partitioned, plain, upgrade (time migration 0010 on a filled table)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=20, help="runs of each query (p50/p99 over them)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    parser.add_argument("--reuse", action="store_true", help="only the queries, on databases kept by --keep")
    parser.add_argument("--db-prefix", default="bench_scale", help="databases are named PREFIX_LAYOUT")
    parser.add_argument("--cases", type=lambda s: [x.strip() for x in s.split(",") if x.strip()] or None,
                        help="only the queries whose label holds one of these (comma-separated)")  # fmt: skip
    args = parser.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or any(x not in ("partitioned", "plain", "upgrade") for x in layouts):
        parser.error("--layouts: partitioned, plain, upgrade (comma-separated)")
    for layout in layouts:
        await run_layout(args, layout)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
