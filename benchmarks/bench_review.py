"""Reviewer list paging at scale: time the pages a reviewer asks for over 1,000,000 audit records.

Fills a fresh SQLite audit log (the default database) with synthetic records spread over 30
days (5 % blocked, 10 % flagged, 3 models, 20 keys, random scores), then times
`ReviewStore.page` (the query behind /review and /api/review/requests): the first page, a page
deep in the list (following the keyset cursor), and pages under each filter. Prints p50/p99.

    .venv/bin/python benchmarks/bench_review.py [--records 1000000] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.db import create_engine
from gateway.migrate import upgrade
from gateway.review_store import Filters, ReviewStore


def fill(path: Path, records: int) -> None:
    rng = random.Random(7)
    now = datetime.now(UTC)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    sql = ("INSERT INTO audit_records (request_id, created_at, finished_at, api_key_id, endpoint, model, stream, "
           "status, http_status, request_json, response_text, blocked_by, flagged_by, groundedness, toxicity, "
           "total_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")  # fmt: skip
    words = [
        "vacuum", "battery", "robot", "warranty", "cleaner", "mop", "charger", "app", "schedule", "map", "room",
        "filter",
    ]  # fmt: skip
    batch = []
    for _i in range(records):
        created = (now - timedelta(seconds=rng.uniform(0, 30 * 86400))).strftime("%Y-%m-%d %H:%M:%S.%f")
        roll = rng.random()
        blocked = rng.choice(["toxicity", "injection", "keywords"]) if roll < 0.05 else None
        flagged = "groundedness" if 0.05 <= roll < 0.15 else None
        question = " ".join(rng.choices(words, k=8))
        batch.append((uuid.UUID(int=rng.getrandbits(128)).hex, created, created, f"key_{rng.randrange(20):02d}",
                      "chat.completions", rng.choice(["smollm2", "llama-8b", "qwen-7b"]), 0,
                      "blocked" if blocked else "ok", 400 if blocked == "injection" else 200,
                      f'{{"messages": [{{"role": "user", "content": "{question}"}}]}}',
                      " ".join(rng.choices(words, k=30)),
                      blocked, flagged, rng.random(), rng.random() ** 4, rng.uniform(50, 2000)))  # fmt: skip
        if len(batch) == 20000:
            con.executemany(sql, batch)
            con.commit()
            batch.clear()
    if batch:
        con.executemany(sql, batch)
        con.commit()
    con.execute("ANALYZE")
    con.close()


async def measure(url: str) -> list[tuple[str, float, float, int]]:
    engine = create_engine(url)
    store = ReviewStore(engine)
    now = datetime.now(UTC)
    cases = {
        "first page, no filter": Filters(),
        "status=blocked": Filters(status="blocked"),
        "blocked by toxicity": Filters(guard="toxicity"),
        "model=qwen-7b": Filters(model="qwen-7b"),
        "api_key=key_07": Filters(api_key="key_07"),
        "last 24 hours": Filters(since=now - timedelta(days=1)),
        "toxicity > 0.9": Filters(toxicity_above=0.9),
        "groundedness < 0.1": Filters(groundedness_below=0.1),
        "text 'warranty charger'": Filters(q="warranty charger"),
    }
    out = []
    try:
        for name, filters in cases.items():
            times = []
            rows = 0
            for _ in range(15):
                started = time.perf_counter()
                page = await store.page(filters, limit=50)
                times.append((time.perf_counter() - started) * 1000)
                rows = len(page["data"])
            times.sort()
            out.append((name, statistics.median(times), times[-1], rows))
        # Deep paging: follow the cursor 200 pages (10,000 records) in and time the next pages there.
        cursor = None
        for _ in range(200):
            cursor = (await store.page(Filters(), before=cursor, limit=50))["next"]
        times = []
        for _ in range(15):
            started = time.perf_counter()
            await store.page(Filters(), before=cursor, limit=50)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        out.append(("page 201 (cursor), no filter", statistics.median(times), times[-1], 50))
    finally:
        await engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gw-review-bench-"))
    path = folder / "gateway.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    started = time.perf_counter()
    fill(path, args.records)
    print(f"filled {args.records:,} audit records in {time.perf_counter() - started:.0f} s "
          f"({path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)  # fmt: skip
    results = asyncio.run(measure(url))
    print(f"\n## Reviewer list pages (50 rows) over {args.records:,} audit records, SQLite")
    print("| query | p50 | max of 15 | rows |")
    print("|---|---|---|---|")
    for name, p50, worst, rows in results:
        print(f"| {name} | {p50:.1f} ms | {worst:.1f} ms | {rows} |")
    path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
