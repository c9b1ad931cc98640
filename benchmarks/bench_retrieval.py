"""Retrieval benchmark: query latency (embedding and search apart) and recall@10 vs exact search
for flat, HNSW and IVF indexes at 10^3 .. 10^6 chunks, plus ingest throughput.

    .venv/bin/python benchmarks/bench_retrieval.py                 # up to 10^5 (about 2 minutes)
    .venv/bin/python benchmarks/bench_retrieval.py --max-size 1000000 --json bench-results/retrieval.json
    .venv/bin/python benchmarks/bench_retrieval.py --sweep         # ef_search / nprobe trade-off

Collections are synthetic 384-d unit vectors. By default (--data fitted) they are drawn from a
Gaussian with the mean and covariance of ~800 real MiniLM embeddings (HaluEval knowledge texts,
questions and answers, and the sample corpus's chunks), so they share the anisotropy of real
embeddings; queries come from the same distribution. Having no cluster structure, this is a
harder case for approximate search than a real corpus of topical documents. --data clusters
draws well-separated clusters instead (an easy case). Index parameters are the production
defaults of retrieval.index.IndexConfig unless --sweep is given.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import storage
from retrieval.index import FaissIndex, IndexConfig

DIM = 384
NOISE = 0.7  # per-dimension noise around a centre: same-cluster cosine about 1 / (1 + 0.7^2) = 0.67
SIZES = [1_000, 10_000, 100_000, 1_000_000]


FITTED: tuple[np.ndarray, np.ndarray] | None = None  # (mean, Cholesky factor), set by main()


def real_embedding_texts() -> list[str]:
    from evals.retrieval import halueval_corpus
    from retrieval.chunking import Chunker
    from retrieval.embedders import HashingEmbedder
    from retrieval.loaders import iter_files
    from retrieval.sample import SAMPLE_DOCUMENTS_DIR

    texts: list[str] = []
    halueval = Path("/work/shared/data/halueval_qa/dev.jsonl")
    if halueval.is_file():
        documents, questions = halueval_corpus(halueval)
        texts += [d.text for d in documents] + [q.question for q in questions]
        texts += [json.loads(line)["right_answer"] for line in halueval.read_text().splitlines() if line]
    chunker = Chunker(HashingEmbedder().tokenizer)
    for loaded in iter_files([SAMPLE_DOCUMENTS_DIR]):
        texts += [c.text for d in loaded.documents for c in chunker.chunk(d)]
    return texts


def fit_gaussian(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = vectors.mean(axis=0)
    cov = np.cov(vectors.T) + 1e-4 * np.eye(vectors.shape[1])
    return mean.astype(np.float32), np.linalg.cholesky(cov).astype(np.float32)


def synthetic(n: int, seed: int, clusters: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).standard_normal((clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):  # in slices, to keep peak memory near the output's size
        m = min(step, n - start)
        noise = rng.standard_normal((m, DIM)).astype(np.float32)
        if FITTED is not None:
            mean, factor = FITTED
            block = mean + noise @ factor.T
        else:
            block = centres[rng.integers(0, clusters, m)] + NOISE * noise
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def time_queries(index: FaissIndex, queries: np.ndarray, k: int = 10) -> tuple[list[float], np.ndarray]:
    """One query at a time, as a request would search."""
    index.search(queries[:1], k)  # warm-up
    times, results = [], []
    for row in range(len(queries)):
        started = time.perf_counter()
        _, ids = index.search(queries[row : row + 1], k)
        times.append((time.perf_counter() - started) * 1e3)
        results.append(ids[0])
    return times, np.stack(results)


def recall_at(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth, strict=True)]))


def bench_indexes(n: int, n_queries: int, kinds: list[str], sweep: bool) -> list[dict[str, Any]]:
    clusters = max(50, n // 200)
    data = synthetic(n, seed=1, clusters=clusters)
    queries = synthetic(n_queries, seed=2, clusters=clusters)
    exact = FaissIndex.build(data, IndexConfig(kind="flat"))
    _, truth = exact.search(queries, 10)  # batched: fast, and the reference for recall
    rows = []
    for kind in kinds:
        if kind == "flat":
            index, build_s = exact, 0.0
            started = time.perf_counter()
            index = FaissIndex.build(data, IndexConfig(kind="flat"))
            build_s = time.perf_counter() - started
        else:
            started = time.perf_counter()
            index = FaissIndex.build(data, IndexConfig(kind=kind))
            build_s = time.perf_counter() - started
        settings: list[tuple[str, int]] = [("default", 0)]
        if sweep and index.kind == "hnsw":
            settings = [("ef_search", v) for v in (32, 64, 128, 256, 320, 512)]
        elif sweep and index.kind == "ivf":
            nlist = int(index._index.nlist)
            settings = [("nprobe", max(1, nlist // d)) for d in (32, 16, 8, 4, 2)]
        for name, value in settings:
            if name == "ef_search":
                index.ef_search = value
            elif name == "nprobe":
                index.nprobe = value
            times, got = time_queries(index, queries)
            rows.append(
                {
                    "size": n,
                    "kind": index.kind,
                    "build_s": round(build_s, 2),
                    "param": "" if name == "default" else f"{name}={value}",
                    "ef_search": index.ef_search if index.kind == "hnsw" else None,
                    "nprobe": index.nprobe if index.kind == "ivf" else None,
                    "search_p50_ms": round(percentile(times, 50), 3),
                    "search_p99_ms": round(percentile(times, 99), 3),
                    "recall_at_10": round(recall_at(got, truth), 4),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del index
        gc.collect()
    del exact, data
    gc.collect()
    return rows


def bench_embedding(n_queries: int, torch_threads: int | None) -> dict[str, Any]:
    from retrieval.embedders import SentenceTransformerEmbedder
    from retrieval.sample import SAMPLE_QUESTIONS

    embedder = SentenceTransformerEmbedder.load_sync(torch_threads=torch_threads)
    questions = [json.loads(line)["question"] for line in SAMPLE_QUESTIONS.read_text().splitlines() if line]
    questions = (questions * (n_queries // len(questions) + 1))[:n_queries]
    embedder.embed_sync(questions[:2])
    times = []
    for question in questions:
        started = time.perf_counter()
        embedder.embed_sync([question])
        times.append((time.perf_counter() - started) * 1e3)
    import torch

    return {
        "model": embedder.name,
        "torch_threads": torch.get_num_threads(),
        "queries": len(times),
        "embed_p50_ms": round(percentile(times, 50), 2),
        "embed_p99_ms": round(percentile(times, 99), 2),
        "embedder": embedder,
    }


async def bench_end_to_end(embedder: Any, n: int, n_queries: int) -> dict[str, Any]:
    """A real CollectionStore search (embed + executor hops + FAISS + hit building) at size n."""
    from retrieval.store import CollectionStore

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        vectors = synthetic(n, seed=3, clusters=max(50, n // 200))
        records = storage.ChunkRecords(
            chunk_id=[f"d{i}#0" for i in range(n)],
            document_id=[f"d{i}" for i in range(n)],
            position=[0] * n,
            title=[f"Doc {i}" for i in range(n)],
            source=["synthetic"] * n,
            text=[f"synthetic passage {i}" for i in range(n)],
            heading_path=[[] for _ in range(n)],
            content_hash=["0" * 64] * n,
            token_count=[3] * n,
        )
        storage.write_snapshot(
            data_dir,
            "bench",
            records=records,
            vectors=vectors,
            embedding_model=embedder.name,
            dimension=embedder.dimension,
            documents={f"d{i}": "0" for i in range(n)},
            config=IndexConfig(),
        )
        store = CollectionStore(data_dir, embedder)
        questions = [
            "How long is the warranty?",
            "Which countries do you ship to?",
            "What does error E4 mean?",
            "How do I store the mower battery in winter?",
        ]
        await store.search("bench", "warm-up", top_k=4)
        totals, embeds, searches = [], [], []
        for i in range(n_queries):
            started = time.perf_counter()
            outcome = await store.search_detailed("bench", questions[i % len(questions)] + f" {i}", top_k=4)
            totals.append((time.perf_counter() - started) * 1e3)
            embeds.append(outcome.embed_ms)
            searches.append(outcome.search_ms)
        info = await store.info("bench")
        await store.aclose()
    return {
        "size": n,
        "index_type": info["index_type"],
        "queries": n_queries,
        "total_p50_ms": round(percentile(totals, 50), 2),
        "total_p99_ms": round(percentile(totals, 99), 2),
        "embed_p50_ms": round(percentile(embeds, 50), 2),
        "search_p50_ms": round(percentile(searches, 50), 3),
    }


async def bench_ingest(embedder: Any) -> list[dict[str, Any]]:
    """Chunks/s for a real ingest (load, chunk, embed, index, SQL) of the sample corpus + HaluEval."""
    from evals.retrieval import halueval_corpus
    from gateway.migrate import upgrade
    from retrieval.embedders import HashingEmbedder
    from retrieval.ingest import Ingestor
    from retrieval.sample import SAMPLE_DOCUMENTS_DIR

    halueval = Path("/work/shared/data/halueval_qa/dev.jsonl")
    have_halueval = halueval.is_file()  # noqa: ASYNC240 - one stat before any work starts
    out = []
    for model in (embedder, HashingEmbedder()):
        with tempfile.TemporaryDirectory() as scratch:
            ingestor = await Ingestor.open(Path(scratch), None, model, ensure_schema=upgrade)
            async with ingestor:
                report = await ingestor.ingest_paths("sample", [SAMPLE_DOCUMENTS_DIR])
                out.append({"corpus": "sample", "embedder": model.name, **_ingest_row(report)})
                if have_halueval:
                    documents, _ = halueval_corpus(halueval)
                    report = await ingestor.ingest_documents("halueval", documents)
                    out.append({"corpus": "halueval-250", "embedder": model.name, **_ingest_row(report)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def _ingest_row(report: Any) -> dict[str, Any]:
    return {
        "documents": report.ingested,
        "chunks": report.chunks,
        "seconds": round(report.seconds, 2),
        "embed_seconds": round(report.embed_seconds, 2),
        "chunks_per_s": round(report.chunks_per_s, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| chunks | index | params | build s | search p50 ms | search p99 ms | recall@10 |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in result["indexes"]:
        params = row["param"] or (
            f"ef_search={row['ef_search']}"
            if row["ef_search"]
            else f"nprobe={row['nprobe']}"
            if row["nprobe"]
            else "exact"
        )
        lines.append(
            f"| {row['size']:,} | {row['kind']} | {params} | {row['build_s']} | {row['search_p50_ms']} | "
            f"{row['search_p99_ms']} | {row['recall_at_10']} |"
        )
    if "embedding" in result:
        e = result["embedding"]
        lines.append(
            f"\nquery embedding ({e['model']}, {e['torch_threads']} torch threads, one query at a time): "
            f"p50 {e['embed_p50_ms']} ms, "
            f"p99 {e['embed_p99_ms']} ms"
        )
    for row in result.get("end_to_end", []):
        lines.append(
            f"end to end via CollectionStore at {row['size']:,} chunks ({row['index_type']}): "
            f"p50 {row['total_p50_ms']} ms, p99 {row['total_p99_ms']} ms "
            f"(embed p50 {row['embed_p50_ms']} ms, search p50 {row['search_p50_ms']} ms)"
        )
    for row in result.get("ingest", []):
        lines.append(
            f"ingest {row['corpus']} with {row['embedder']}: {row['documents']} documents, "
            f"{row['chunks']} chunks in {row['seconds']} s = {row['chunks_per_s']} chunks/s"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size", type=int, default=100_000, help="largest index size (default 10^5)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes instead of 10^3..--max-size")
    parser.add_argument("--queries", type=int, default=300, help="queries per measurement")
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument("--sweep", action="store_true", help="try several ef_search / nprobe values")
    parser.add_argument(
        "--no-model", action="store_true", help="skip the MiniLM embedding, end-to-end and ingest parts"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="only the embedding, end-to-end (at --max-size, at most 10^5) and ingest parts",
    )
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads for MiniLM")
    parser.add_argument(
        "--data",
        choices=["fitted", "clusters"],
        default="fitted",
        help="synthetic vector distribution (see above; default fitted)",
    )
    args = parser.parse_args()

    global FITTED
    if args.data == "fitted" and not args.model_only:
        from retrieval.embedders import SentenceTransformerEmbedder

        model = SentenceTransformerEmbedder.load_sync()
        real = model.embed_sync(real_embedding_texts())
        FITTED = fit_gaussian(real)
        print(f"fitted the synthetic distribution to {len(real)} real MiniLM embeddings", file=sys.stderr)

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "data": args.data, "indexes": []}
    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else [s for s in SIZES if s <= args.max_size]
    for n in [] if args.model_only else sizes:
        result["indexes"].extend(bench_indexes(n, args.queries, args.kinds.split(","), args.sweep))
    if not args.no_model:
        embedding = bench_embedding(args.queries, args.torch_threads)
        embedder = embedding.pop("embedder")
        result["embedding"] = embedding
        result["end_to_end"] = [asyncio.run(bench_end_to_end(embedder, min(100_000, max(sizes)), args.queries))]
        result["ingest"] = asyncio.run(bench_ingest(embedder))
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
