"""SQLite's full-text index for the reviewer's text filter (migration 0011): what it costs the
audit writer, and what it saves the reviewer.

1. Writer: three fresh databases, at revision 0010 (no FTS table), at the head (the FTS5 table,
   filled in the background: no trigger on insert), and at the head with a trigger that indexes
   every row in the writer's transaction (the alternative not taken), each sent the same
   `--writes` realistic audit rows through the gateway's own SQLite writer (`SQLiteSink`: one
   executemany + COMMIT per batch), in batches of 1 (a quiet gateway: one commit per request) and
   of 50 (a busy one), each database first in turn, so a change in the machine's load hits all
   alike. Prints ms per row and the cost over 0010, then the background catch-up's ms per row.
2. Reviewer: one database of `--rows` records (default 1,000,000) spread over the last 12 months
   in time order, written at revision 0010 through the same writer: about 350 bytes of stored
   request and 450 of answer a record, from 5,000 generated sentences over a 3,000-word Zipf-like
   vocabulary (as bench_review_scale.py); one record in 100,000 mentions "zanzibar". Times the
   text filter through `ReviewStore.page` with LIKE (the database before 0011), then upgrades it
   (timed: indexing the existing rows) and times the same filters with FTS5: a rare word, a common
   word, a prefix, two words, the second page of a common word (keyset cursor), a word with
   another filter (model), and a text with punctuation (the substring scan either way). Prints
   p50/p99 in ms and the hit counts, which must be equal but for the word filters' new meaning.

    .venv/bin/python benchmarks/bench_sqlite_fts.py [--rows 1000000] [--writes 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy.engine import make_url

from gateway.audit_sinks import SQLiteSink
from gateway.db import audit_records, create_engine
from gateway.migrate import alembic_config, upgrade
from gateway.review_store import FTS_TEXT_SQL, Filters, ReviewStore, index_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_review_scale import RARE, SENTENCES, sentences

WRITERS = {"0010": "0010 (no FTS)", "0011": "0011 (background index)", "trigger": "indexing trigger"}
QUERIES = {
    "rare word": {"q": RARE},
    "common word": {"q": "battery"},
    "prefix": {"q": "warr"},
    "two words": {"q": "robot warranty"},
    "word + model": {"q": "charger", "model": "llama-8b"},
    "punctuation": {"q": "battery."},
}


class Rows:
    """Audit rows as the gateway's writer gets them, made quickly from pre-built texts."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.texts = sentences(self.rng)

    def row(self, n: int, at: datetime) -> dict[str, Any]:
        prompt = self.texts[n % SENTENCES] + (f" Ship it to {RARE}." if n % 100_000 == 7 else "")
        request = {"model": "smollm2", "messages": [{"role": "system", "content": "You help with robot vacuums."},
                                                    {"role": "user", "content": prompt}]}  # fmt: skip
        model = "llama-8b" if n % 20 == 0 else "qwen-7b" if n % 4 == 0 else "smollm2"
        blocked = n % 50 == 0
        answer = self.texts[(n * 7) % SENTENCES] + "\n\n" + self.texts[(n * 13 + 1) % SENTENCES]
        return {
            "request_id": uuid.UUID(int=self.rng.getrandbits(128)).hex, "created_at": at,
            "finished_at": at + timedelta(milliseconds=800), "api_key_id": f"key_{n % 20:02d}",
            "endpoint": "chat.completions", "model": model, "backend": "http://127.0.0.1:8000", "stream": False,
            "status": "blocked" if blocked else "ok", "http_status": 400 if blocked else 200,
            "request_json": json.dumps(request), "response_text": answer,
            "response_json": json.dumps({"id": f"chatcmpl-{n}", "choices": [{"index": 0, "finish_reason": "stop"}]}),
            "finish_reason": "stop", "prompt_tokens": 90, "completion_tokens": 120, "total_tokens": 210,
            "gateway_ms": 1.2, "backend_ms": 700.0, "ttft_ms": 80.0, "total_ms": 800.0, "client_ip": "10.0.0.7",
            "guards_json": '[{"guard": "toxicity", "stage": "output", "action": "allow", "score": 0.01}]',
            "blocked_by": "toxicity" if blocked else None, "flagged_by": "groundedness" if n % 10 == 3 else None,
            "groundedness": (n * 7919 % 1000) / 1000, "toxicity": (n * 104729 % 1000) / 10000,
        }  # fmt: skip


async def writer(directory: Path, writes: int) -> None:
    print(f"writer: {writes:,} rows into each database, through SQLiteSink")
    urls = {name: f"sqlite:///{directory / f'writer-{name}.db'}" for name in WRITERS}
    for name, url in urls.items():
        await asyncio.to_thread(upgrade, url, "0010" if name == "0010" else "head")
    with sqlite3.connect(make_url(urls["trigger"]).database or "") as connection:
        # The alternative not taken: every row indexed by a trigger, in the writer's transaction.
        connection.execute("DROP TRIGGER IF EXISTS audit_records_fts_insert")
        body = FTS_TEXT_SQL.replace("audit_records.", "new.")
        connection.execute(
            "CREATE TRIGGER audit_records_fts_insert AFTER INSERT ON audit_records BEGIN "
            f"INSERT INTO audit_records_fts (rowid, body) VALUES (new.id, {body}); END"
        )
    sinks = {name: SQLiteSink.from_url(url, audit_records) for name, url in urls.items()}
    try:
        for batch in (1, 50):
            rows = Rows(seed=batch)
            now = datetime.now(UTC)
            spent = dict.fromkeys(sinks, 0.0)
            for lo in range(0, writes, batch):
                chunk = [rows.row(n, now + timedelta(microseconds=n)) for n in range(lo, min(writes, lo + batch))]
                order = list(sinks.items())
                rotate = (lo // batch) % len(order)  # each database first in turn
                for name, sink in order[rotate:] + order[:rotate]:
                    copy = [{**r, "request_id": r["request_id"] + name} for r in chunk]
                    began = time.perf_counter()
                    await sink.write(copy)
                    spent[name] += time.perf_counter() - began
            ms = {name: spent[name] * 1000 / writes for name in sinks}
            print(f"  batch {batch:>2}: " + ", ".join(f"{WRITERS[n]} {ms[n]:.4f} ms/row" for n in sinks))
            print(f"            cost over 0010: 0011 {ms['0011'] - ms['0010']:+.4f} ms/row, "
                  f"trigger {ms['trigger'] - ms['0010']:+.4f} ms/row")  # fmt: skip
    finally:
        for sink in sinks.values():
            await sink.close()
    engine = create_engine(urls["0011"])
    try:
        began = time.perf_counter()
        await index_text(engine)
        spent_s = time.perf_counter() - began
    finally:
        await engine.dispose()
    print(
        f"  background catch-up of the 0011 database's {2 * writes:,} rows: {spent_s * 1000 / (2 * writes):.4f} ms/row"
    )


async def fill(url: str, count: int) -> float:
    sink = SQLiteSink.from_url(url, audit_records, synchronous="OFF")
    rows = Rows(seed=11)
    end = datetime.now(UTC)
    start, step = end - timedelta(days=365), timedelta(days=365) / count
    began = time.perf_counter()
    try:
        for lo in range(0, count, 50_000):
            await sink.write([rows.row(n, start + n * step) for n in range(lo, min(count, lo + 50_000))])
            if (lo // 50_000) % 4 == 3:
                print(f"  {lo + 50_000:>11,} rows  {time.perf_counter() - began:7.1f} s", flush=True)
    finally:
        await sink.close()
    return time.perf_counter() - began


async def timed_queries(url: str, repeat: int) -> dict[str, tuple[float, float, int]]:
    engine = create_engine(url)
    store = ReviewStore(engine)
    out = {}
    try:
        cases = [(name, params, None) for name, params in QUERIES.items()]
        first = await store.page(Filters.parse({"q": "battery"}), limit=50)
        cases.insert(2, ("common, page 2", {"q": "battery"}, first["next"]))
        for name, params, before in cases:
            times, hits = [], 0
            for _ in range(repeat):
                began = time.perf_counter()
                page = await store.page(Filters.parse(params), before=before, limit=50)
                times.append((time.perf_counter() - began) * 1000)
                hits = len(page["data"])
            times.sort()
            out[name] = (statistics.median(times), times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], hits)
    finally:
        await engine.dispose()
    return out


async def reviewer(directory: Path, count: int, repeat: int) -> None:
    url = f"sqlite:///{directory / 'reviewer.db'}"
    await asyncio.to_thread(upgrade, url, "0010")
    print(f"reviewer: filling {count:,} rows at revision 0010")
    print(f"  filled in {await fill(url, count):.1f} s")
    before = await timed_queries(url, repeat)
    began = time.perf_counter()
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    print(f"  upgrade to 0011 (indexing {count:,} rows): {time.perf_counter() - began:.1f} s")
    after = await timed_queries(url, repeat)
    size = sum(p.stat().st_size for p in await asyncio.to_thread(lambda: list(directory.glob("reviewer.db*"))))
    print(f"  database {size / 2**20:,.0f} MiB with the index")
    print(f"{'filter':<16}{'LIKE p50':>10}{'p99':>10}{'FTS5 p50':>10}{'p99':>10}  hits (page of 50) LIKE / FTS5")
    for name, (p50, p99, hits) in before.items():
        a50, a99, ahits = after[name]
        print(f"{name:<16}{p50:>10.1f}{p99:>10.1f}{a50:>10.1f}{a99:>10.1f}  {hits} / {ahits}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-writer", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fts-") as tmp:
        if not args.skip_writer:
            await writer(Path(tmp), args.writes)
        if args.rows:
            await reviewer(Path(tmp), args.rows, args.repeat)


if __name__ == "__main__":
    asyncio.run(main())
