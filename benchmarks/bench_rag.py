"""Benchmark: RAG retrieval requests/s with the real MiniLM on the sample corpus, before and after
query batching and caching (issue 15), in the same run.

"before": every query is its own model call (batches of one) and nothing is cached; "after": the
defaults (concurrent queries share model calls; query vectors and results cached). Each request
is `CollectionStore.search_detailed` on the `sample` collection (embedding + FAISS search), the
retrieval part of a RAG request. Distinct queries measure batching; the "repeated" rows send 16
different questions over and over (a FAQ-like load) and measure the caches too.

    .venv/bin/python benchmarks/bench_rag.py [--requests 256] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["battery", "warranty", "filter", "noise", "charging", "mapping", "app", "carpet"]


def queries(n: int, distinct: bool) -> list[str]:
    if distinct:
        return [f"question {i}: how does the {TOPICS[i % len(TOPICS)]} work, case {i}?" for i in range(n)]
    return [f"how does the {TOPICS[i % len(TOPICS)]} work? ({i % 16 // 8})" for i in range(n)]


async def drive(store: Any, texts: list[str], concurrency: int) -> float:
    """Requests/s for `texts` sent `concurrency` at a time."""
    pending = iter(texts)

    async def worker() -> None:
        for text in pending:
            await store.search_detailed("sample", text, 4, 0.0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(texts) / (time.perf_counter() - started)


async def measure(data_dir: Path, requests: int, concurrency: list[int]) -> list[dict[str, Any]]:
    from retrieval.embedders import SentenceTransformerEmbedder
    from retrieval.sample import ensure_sample_collection
    from retrieval.store import CollectionStore

    embedder = await SentenceTransformerEmbedder.load()
    await ensure_sample_collection(data_dir, None, embedder)
    rows = []
    for c in concurrency:
        for distinct in (True, False):
            figures: dict[str, Any] = {"concurrency": c, "queries": "distinct" if distinct else "repeated"}
            for mode in ("before", "after"):  # the same run, the same embedder, one after the other
                store = CollectionStore(data_dir, embedder, cache_size=0 if mode == "before" else 4096)
                embedder.batcher.max_texts = 1 if mode == "before" else 256
                await store.search("sample", "warm-up", 4)
                figures[mode] = await drive(store, queries(requests, distinct), c)
                await store.aclose()
            figures["speedup"] = figures["after"] / figures["before"]
            rows.append(figures)
    await embedder.aclose()
    return rows


def run_all(requests: int, concurrency: list[int], data_dir: Path) -> list[dict[str, Any]]:
    from gateway.migrate import upgrade

    upgrade(f"sqlite:///{data_dir / 'gateway.db'}")
    return asyncio.run(measure(data_dir, requests, concurrency))


def report(rows: list[dict[str, Any]]) -> None:
    print("\n## RAG retrieval with the real MiniLM (sample corpus): requests/s before and after batching + caches")
    print("| concurrency | queries | before req/s | after req/s | after / before |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['queries']} | {r['before']:.1f} | {r['after']:.1f} | **{r['speedup']:.2f}x** |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-rag-"))
    try:
        report(run_all(args.requests, args.concurrency, data_dir))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
