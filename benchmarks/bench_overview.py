"""Benchmark: the reviewer overview over a large audit log, before (raw rows) and after (rollups).

Seeds N synthetic records spread over the last 30 days (a share blocked, flagged, failed, eval) by
bulk insert (sqlite3 executemany; COPY on PostgreSQL) into a fresh SQLite file and a fresh
PostgreSQL database, then, in the same run, per database:

* before: `overview(..., rollups=False)`, every raw row of the window aggregated, a first and a
  second (warm) load of each window the page offers;
* the rollup pass (`gateway.rollup.roll_up`): the backfill from an empty table, then a
  steady-state pass (what the background task does every minute, off the request path);
* after: `overview(...)` from the rollups, first and second load of each window; the figures are
  checked against the raw ones.

    .venv/bin/python benchmarks/bench_overview.py [--records 1000000] [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.db import create_engine
from gateway.migrate import upgrade
from gateway.overview import WINDOWS, overview
from gateway.rollup import roll_up
from gateway.usage import parse_since

PG = "postgresql://postgres@127.0.0.1:5432"
_COLUMNS = ("request_id", "created_at", "finished_at", "endpoint", "stream", "status", "http_status", "model",
            "total_ms", "blocked_by", "flagged_by", "origin", "prompt_tokens", "completion_tokens",
            "total_tokens")  # fmt: skip


def synthetic(records: int, now: datetime) -> list[tuple[Any, ...]]:
    """Records oldest first, as the audit writer inserts them (ids grow with time)."""
    rng = random.Random(7)
    ages = sorted((rng.random() * 30 * 86400 for _ in range(records)), reverse=True)
    rows = []
    for age in ages:
        at = now - timedelta(seconds=age)
        roll = rng.random()
        status = "blocked" if roll < 0.03 else "backend_error" if roll < 0.035 else "ok"
        prompt, completion = rng.randint(5, 400), rng.randint(1, 300)
        guard = rng.choice(("injection", "keywords", "toxicity")) if status == "blocked" else None
        rows.append((
            uuid.uuid4().hex, at, at, "chat.completions", False, status, 200, rng.choice(("small", "large")),
            rng.lognormvariate(3, 1.2), guard,
            "toxicity" if rng.random() < 0.02 else None, "eval" if rng.random() < 0.05 else None,
            prompt, completion, prompt + completion,
        ))  # fmt: skip
    return rows


def fill_sqlite(path: Path, rows: list[tuple[Any, ...]]) -> None:
    def text(moment: datetime) -> str:  # how SQLAlchemy stores a DateTime on SQLite (naive UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f")

    conn = sqlite3.connect(path)
    try:
        marks = ", ".join("?" * len(_COLUMNS))
        conn.executemany(
            f"INSERT INTO audit_records ({', '.join(_COLUMNS)}) VALUES ({marks})",
            ((r[0], text(r[1]), text(r[2]), *r[3:]) for r in rows),
        )
        conn.commit()
    finally:
        conn.close()


async def fill_postgres(database: str, rows: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(f"{PG}/{database}")
    try:
        await conn.copy_records_to_table("audit_records", records=rows, columns=list(_COLUMNS))
        await conn.execute("ANALYZE audit_records")
    finally:
        await conn.close()


async def _time(coro: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = await coro
    return (time.perf_counter() - began) * 1000, result


async def measure(url: str) -> None:
    engine = create_engine(url)
    try:
        before: dict[str, tuple[float, float, Any]] = {}
        for window in WINDOWS:
            first, data = await _time(overview(engine, parse_since(window), rollups=False))
            warm, _ = await _time(overview(engine, parse_since(window), rollups=False))
            before[window] = (first, warm, data)
        took, report = await _time(roll_up(engine))
        print(f"  rollup backfill (empty table, in the background): {took / 1000:.1f} s, {report.rows:,} rollup rows, "
              f"longest write transaction {report.longest_write_ms:.0f} ms")  # fmt: skip
        took, report = await _time(roll_up(engine))
        print(f"  rollup pass (steady state, every minute, in the background): {took:.0f} ms, {report.rows:,} rows, "
              f"longest write transaction {report.longest_write_ms:.1f} ms")  # fmt: skip
        for window in WINDOWS:
            first, data = await _time(overview(engine, parse_since(window)))
            warm, _ = await _time(overview(engine, parse_since(window)))
            raw_first, raw_warm, _ = before[window]
            until = datetime.now(UTC)  # the same figures from rollups as from raw rows, for one moment
            since = parse_since(window, until)
            rolled = (await overview(engine, since, until)).public()
            used = rolled.pop("rollups_through") is not None
            raw = (await overview(engine, since, until, rollups=False)).public()
            raw.pop("rollups_through")
            same = f"{rolled == raw}{'' if used else ' (read raw: 1-minute buckets)'}"
            print(f"  window {window:>4}: {data.totals['requests']:>9,} records, {len(data.buckets):>3} buckets | "
                  f"raw first {raw_first:7.1f} ms, warm {raw_warm:7.1f} ms | rollups first {first:6.1f} ms, "
                  f"warm {warm:6.1f} ms | same figures: {same}")  # fmt: skip
    finally:
        await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    args = parser.parse_args()
    began = time.perf_counter()
    rows = synthetic(args.records, datetime.now(UTC))
    print(f"generated {args.records:,} records in {time.perf_counter() - began:.0f} s")
    if args.only != "postgresql":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.db"
            upgrade(f"sqlite:///{path}")
            began = time.perf_counter()
            fill_sqlite(path, rows)
            print(f"SQLite: inserted {args.records:,} records in {time.perf_counter() - began:.0f} s")
            asyncio.run(measure(f"sqlite:///{path}"))
    if args.only != "sqlite":
        name = f"bench_overview_{uuid.uuid4().hex[:8]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        try:
            upgrade(f"{PG}/{name}")
            began = time.perf_counter()
            asyncio.run(fill_postgres(name, rows))
            print(f"PostgreSQL: inserted {args.records:,} records in {time.perf_counter() - began:.0f} s")
            asyncio.run(measure(f"{PG}/{name}"))
        finally:
            asyncio.run(_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
    return 0


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
