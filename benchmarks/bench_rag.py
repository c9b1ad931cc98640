"""Benchmark: RAG retrieval requests/s with the real MiniLM on the sample corpus, before and after
query batching and caching (issue 15), on PyTorch and on ONNX Runtime, in the same run.

"before": every query is its own model call (batches of one) and nothing is cached; "after": the
defaults (concurrent queries share model calls; query vectors and results cached). Each request
is `CollectionStore.search_detailed` on the `sample` collection (embedding + FAISS search), the
retrieval part of a RAG request. Distinct queries measure batching; the "repeated" rows send 16
different questions over and over (a FAQ-like load) and measure the caches too. Each runtime
(`embedding_runtime`: torch, onnx) gets the same rows, against the same index.

First, per-text embedding time of each runtime: one query per call (p50 over 64 calls), and
per text in batches of 8 and 64 (a batch of concurrent queries, an ingest batch).

    .venv/bin/python benchmarks/bench_rag.py [--requests 256] [--concurrency 1 8 32] [--runtimes torch onnx]
    .venv/bin/python benchmarks/bench_rag.py --gateway [--requests 128] [--concurrency 1 8]

--gateway instead measures whole RAG requests through `gateway serve` (a process per runtime, with
`GATEWAY_EMBEDDING_RUNTIME`, open mode, guards off, the SQLite audit log on) in front of the
zero-delay fake backend: each request is a chat completion with `rag: {"collection": "sample"}`
and a question of its own, so every request embeds its query.

The ONNX export is made at its first load into the user cache (retrieval/onnx_encoder.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def embed_times(embedders: dict[str, Any], loads: dict[str, float]) -> list[dict[str, Any]]:
    """Per-text embedding time of each runtime: one text per call (p50 of 64 calls), and in batches
    of 8 and 64. The runtimes take turns call by call, so both see the same load on a shared machine."""
    texts = queries(64, distinct=True)
    for embedder in embedders.values():
        embedder.embed_sync(texts[:8])  # first-call costs left out
    single: dict[str, list[float]] = {runtime: [] for runtime in embedders}
    for text in texts:
        for runtime, embedder in embedders.items():
            started = time.perf_counter()
            embedder.embed_sync([text])
            single[runtime].append((time.perf_counter() - started) * 1e3)
    rows = {
        runtime: {
            "scenario": "embed",
            "runtime": runtime,
            "load_s": round(loads[runtime], 1),
            "single_p50_ms": round(float(np.percentile(single[runtime], 50)), 2),
        }
        for runtime in embedders
    }
    for size in (8, 64):
        spent = dict.fromkeys(embedders, 0.0)
        for start in range(0, len(texts), size):
            for runtime, embedder in embedders.items():
                started = time.perf_counter()
                embedder.embed_sync(texts[start : start + size])
                spent[runtime] += time.perf_counter() - started
        for runtime in embedders:
            rows[runtime][f"batch{size}_ms_per_text"] = round(spent[runtime] * 1e3 / len(texts), 2)
    return list(rows.values())


async def measure(
    data_dir: Path, requests: int, concurrency: list[int], runtimes: tuple[str, ...] = ("torch", "onnx")
) -> list[dict[str, Any]]:
    from retrieval.embedders import create_embedder_async
    from retrieval.sample import ensure_sample_collection
    from retrieval.store import CollectionStore

    embedders: dict[str, Any] = {}
    loads: dict[str, float] = {}
    for runtime in runtimes:
        started = time.perf_counter()
        embedder = await create_embedder_async(None, runtime=runtime)  # the first ONNX load exports (seconds)
        embedders[embedder.runtime] = embedder
        loads[embedder.runtime] = time.perf_counter() - started
    rows = embed_times(embedders, loads)
    # One index for every runtime: the same model name, vectors within cosine 0.999.
    await ensure_sample_collection(data_dir, None, next(iter(embedders.values())))
    for c in concurrency:
        for distinct in (True, False):
            for runtime, embedder in embedders.items():  # runtimes take turns, cell by cell
                figures: dict[str, Any] = {
                    "scenario": "search",
                    "runtime": runtime,
                    "concurrency": c,
                    "queries": "distinct" if distinct else "repeated",
                }
                for mode in ("before", "after"):  # the same run, the same embedder, one after the other
                    store = CollectionStore(data_dir, embedder, cache_size=0 if mode == "before" else 4096)
                    embedder.batcher.max_texts = 1 if mode == "before" else 256
                    await store.search("sample", "warm-up", 4)
                    figures[mode] = await drive(store, queries(requests, distinct), c)
                    await store.aclose()
                figures["speedup"] = figures["after"] / figures["before"]
                rows.append(figures)
    for embedder in embedders.values():
        await embedder.aclose()
    return rows


async def drive_gateway(url: str, texts: list[str], concurrency: int, rag: bool = True) -> tuple[float, int]:
    """RAG chat completions (plain ones with `rag` False) through the gateway, `concurrency` in
    flight: (requests/s, errors)."""
    import aiohttp

    pending = iter(texts)
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            nonlocal errors
            for text in pending:
                body: dict[str, object] = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
                if rag:
                    body["rag"] = {"collection": "sample"}
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    errors += resp.status != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(texts) / (time.perf_counter() - started), errors


def wait_ready(url: str, timeout: float = 600) -> None:
    """Until /readyz answers 200: the models load (and the first ONNX start exports) in the background."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                return
        except OSError:  # 503 while starting, or not listening yet
            time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready in {timeout:.0f} s")


def run_gateway(
    requests: int, concurrency: list[int], data_dir: Path, runtimes: tuple[str, ...] = ("torch", "onnx")
) -> list[dict[str, Any]]:
    """Whole RAG requests/s through `gateway serve`, one process per runtime, one data dir (the
    sample collection is ingested by the first, the ONNX export made by the first ONNX start)."""
    from benchmarks.bench_gateway import GATEWAY, GUARDS_OFF, Proc, free_port, start_fake

    fake, fake_url = start_fake()
    rows = []
    try:
        for runtime in runtimes:
            env = {
                "GATEWAY_DATA_DIR": str(data_dir),
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_OPEN": "true",
                "GATEWAY_EMBEDDING_RUNTIME": runtime,
            }
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            args = [
                *GATEWAY,
                "serve",
                "--workers",
                "1",
                "--backend",
                fake_url,
                "--port",
                str(port),
                "--policy",
                str(GUARDS_OFF),
            ]
            started = time.perf_counter()
            gateway = Proc(args, f"{url}/healthz", env)
            wait_ready(url)
            start_s = time.perf_counter() - started
            try:
                for c in concurrency:
                    texts = [f"{q} (run {runtime} {c})" for q in queries(requests, distinct=True)]
                    asyncio.run(drive_gateway(url, texts[:4], 1))  # warm-up
                    rps, errors = asyncio.run(drive_gateway(url, texts, c))
                    rows.append(
                        {
                            "scenario": "gateway",
                            "runtime": runtime,
                            "concurrency": c,
                            "rps": rps,
                            "errors": errors,
                            "start_s": round(start_s, 1),
                        }
                    )
            finally:
                gateway.stop()
    finally:
        fake.stop()
    return rows


def run_all(
    requests: int, concurrency: list[int], data_dir: Path, runtimes: tuple[str, ...] = ("torch", "onnx")
) -> list[dict[str, Any]]:
    from gateway.migrate import upgrade

    upgrade(f"sqlite:///{data_dir / 'gateway.db'}")
    return asyncio.run(measure(data_dir, requests, concurrency, runtimes))


def report(rows: list[dict[str, Any]]) -> None:
    gateways = [r for r in rows if r.get("scenario") == "gateway"]
    if gateways:
        print("\n## Whole RAG requests through the gateway (guards off, zero-delay fake backend): requests/s")
        print("| runtime | concurrency | requests/s | errors | start-up to ready (s) |")
        print("|---|---|---|---|---|")
        for r in gateways:
            print(f"| {r['runtime']} | {r['concurrency']} | {r['rps']:.1f} | {r['errors']} | {r['start_s']:.1f} |")
        return
    embeds = [r for r in rows if r.get("scenario") == "embed"]
    searches = [r for r in rows if r.get("scenario", "search") == "search"]
    if embeds:
        print("\n## Query embedding with the real MiniLM: ms per text, by runtime")
        print("| runtime | one text per call (p50) | batches of 8 | batches of 64 | load (s) |")
        print("|---|---|---|---|---|")
        for r in embeds:
            print(
                f"| {r['runtime']} | {r['single_p50_ms']:.2f} | {r['batch8_ms_per_text']:.2f} "
                f"| {r['batch64_ms_per_text']:.2f} | {r['load_s']:.1f} |"
            )
    print("\n## RAG retrieval with the real MiniLM (sample corpus): requests/s before and after batching + caches")
    print("| runtime | concurrency | queries | before req/s | after req/s | after / before |")
    print("|---|---|---|---|---|---|")
    for r in searches:
        print(
            f"| {r.get('runtime', 'torch')} | {r['concurrency']} | {r['queries']} | {r['before']:.1f} "
            f"| {r['after']:.1f} | **{r['speedup']:.2f}x** |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--gateway", action="store_true", help="whole RAG requests through `gateway serve` instead")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-rag-"))
    try:
        run = run_gateway if args.gateway else run_all
        rows = run(args.requests, args.concurrency, data_dir, tuple(args.runtimes))
        report(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
