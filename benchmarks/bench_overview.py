"""Benchmark: the reviewer overview's queries over a large audit log (SQLite by default).

Fills a fresh database with N synthetic records spread over the last 30 days (a share blocked,
flagged, failed), then times `gateway.overview.overview` for each window the page offers.

    .venv/bin/python benchmarks/bench_overview.py [--records 1000000] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.db import audit_records, create_engine
from gateway.migrate import upgrade
from gateway.overview import WINDOWS, overview
from gateway.usage import parse_since


async def fill(url: str, records: int) -> None:
    engine = create_engine(url)
    now = datetime.now(UTC)
    rng = random.Random(7)
    # Oldest first, as the audit writer inserts them (ids grow with time).
    ages = sorted((rng.random() * 30 * 86400 for _ in range(records)), reverse=True)
    try:
        for start in range(0, records, 20_000):
            rows = []
            for age in ages[start : start + 20_000]:
                at = now - timedelta(seconds=age)
                roll = rng.random()
                status = "blocked" if roll < 0.03 else "backend_error" if roll < 0.035 else "ok"
                total = rng.lognormvariate(3, 1.2)
                rows.append({
                    "request_id": uuid.uuid4().hex, "created_at": at, "finished_at": at, "endpoint": "chat.completions",
                    "stream": False, "status": status, "http_status": 200, "total_ms": total,
                    "blocked_by": rng.choice(("injection", "keywords", "toxicity")) if status == "blocked" else None,
                    "flagged_by": "toxicity" if rng.random() < 0.02 else None,
                })  # fmt: skip
            async with engine.begin() as conn:
                await conn.execute(audit_records.insert(), rows)
    finally:
        await engine.dispose()


async def measure(url: str) -> None:
    engine = create_engine(url)
    try:
        for window in WINDOWS:
            since = parse_since(window)
            began = time.perf_counter()
            full = await overview(engine, since, datetime.now(UTC))  # every row read (an explicit end)
            took = time.perf_counter() - began
            timings = []
            for _ in range(2):  # the live page: first load, then with its closed buckets kept
                began = time.perf_counter()
                data = await overview(engine, since)
                timings.append(time.perf_counter() - began)
            print(f"window {window:>4}: {data.totals['requests']:>9,} records, {len(data.buckets):>3} buckets, "
                  f"full read {took * 1000:8.1f} ms, live page first {timings[0] * 1000:8.1f} ms, "
                  f"next {timings[1] * 1000:8.1f} ms (full read counted {full.totals['requests']:,})")  # fmt: skip
    finally:
        await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--database", default=None, help="an empty database URL (default: a temporary SQLite file)")
    parser.add_argument("--reuse", action="store_true", help="the database is already filled: only measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database or f"sqlite:///{Path(tmp) / 'bench.db'}"
        if not args.reuse:
            upgrade(url)
            began = time.perf_counter()
            asyncio.run(fill(url, args.records))
            print(f"inserted {args.records:,} records in {time.perf_counter() - began:.0f} s")
        asyncio.run(measure(url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
