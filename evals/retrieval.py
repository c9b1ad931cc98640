"""`gateway eval retrieval`: recall@1, recall@5 and MRR of a collection on labelled questions.

    gateway eval retrieval --collection NAME --questions FILE.jsonl [--json]
    gateway eval retrieval --halueval PATH/dev.jsonl [--json]

A questions file has one JSON object per line: {"question": ..., "documents": [ids...]}
("document": id is accepted too). Hits are chunks; they are collapsed to documents in rank
order, and a question counts as found at k when any labelled document is among the first k
documents. MRR uses the rank of the first labelled document (0 when not in the first 20 chunks).

--halueval indexes the `knowledge` text of every item of a HaluEval QA file as its own
document, in a scratch data directory, and asks every item's question; the expected document
is the item's own knowledge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.documents import Document
from retrieval.embedders import Embedder, create_embedder_async
from retrieval.errors import RetrievalError
from retrieval.ingest import Ingestor
from retrieval.loaders import paragraphs
from retrieval.store import CollectionStore

if TYPE_CHECKING:
    from gateway.settings import Settings

SEARCH_DEPTH = 20


@dataclass(frozen=True)
class LabelledQuestion:
    question: str
    documents: frozenset[str]


@dataclass
class RetrievalEvalResult:
    collection: str
    questions: int
    recall_at_1: float
    recall_at_5: float
    mrr: float
    latency_p50_ms: float
    latency_p99_ms: float
    embed_p50_ms: float
    search_p50_ms: float
    misses: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
        return out

    def summary(self) -> str:
        return (
            f"{self.collection}: {self.questions} questions  recall@1 {self.recall_at_1:.3f}  "
            f"recall@5 {self.recall_at_5:.3f}  MRR {self.mrr:.3f}  "
            f"latency p50 {self.latency_p50_ms:.1f} ms p99 {self.latency_p99_ms:.1f} ms "
            f"(embed p50 {self.embed_p50_ms:.1f} ms, search p50 {self.search_p50_ms:.2f} ms)"
        )


def load_questions(path: Path) -> list[LabelledQuestion]:
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            labels = obj.get("documents") or [obj["document"]]
            questions.append(LabelledQuestion(str(obj["question"]), frozenset(map(str, labels))))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected {{'question': ..., 'documents': [...]}}: {exc}") from exc
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def document_ranking(document_ids: Sequence[str]) -> list[str]:
    """Chunk hits' document ids collapsed to documents, in order of their best chunk."""
    return list(dict.fromkeys(document_ids))


async def evaluate(
    store: CollectionStore, collection: str, questions: Sequence[LabelledQuestion], *, depth: int = SEARCH_DEPTH
) -> RetrievalEvalResult:
    await store.search(collection, "warm-up", top_k=1)  # first-load and first-call costs left out
    found_1 = found_5 = 0
    reciprocal = 0.0
    latencies, embeds, searches = [], [], []
    misses = []
    for item in questions:
        started = time.perf_counter()
        outcome = await store.search_detailed(collection, item.question, top_k=depth)
        latencies.append((time.perf_counter() - started) * 1e3)
        embeds.append(outcome.embed_ms)
        searches.append(outcome.search_ms)
        ranking = document_ranking([hit.document_id for hit in outcome.hits])
        rank = next((i for i, doc in enumerate(ranking, start=1) if doc in item.documents), None)
        if rank is not None:
            reciprocal += 1.0 / rank
            found_1 += rank == 1
            found_5 += rank <= 5
        if rank != 1:
            misses.append(
                {"question": item.question, "expected": sorted(item.documents), "rank": rank, "got": ranking[:3]}
            )
    n = len(questions)
    return RetrievalEvalResult(
        collection=collection,
        questions=n,
        recall_at_1=found_1 / n,
        recall_at_5=found_5 / n,
        mrr=reciprocal / n,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p99_ms=float(np.percentile(latencies, 99)),
        embed_p50_ms=float(np.percentile(embeds, 50)),
        search_p50_ms=float(np.percentile(searches, 50)),
        misses=misses,
    )


def halueval_corpus(path: Path, limit: int | None = None) -> tuple[list[Document], list[LabelledQuestion]]:
    """HaluEval QA items as (knowledge documents, questions labelled with their own knowledge)."""
    documents: list[Document] = []
    questions: list[LabelledQuestion] = []
    by_text: dict[str, str] = {}
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines[:limit] if limit else lines):
        item = json.loads(line)
        knowledge = str(item["knowledge"]).strip()
        doc_id = by_text.get(knowledge)
        if doc_id is None:  # identical knowledge texts share one document
            doc_id = by_text[knowledge] = f"halueval-{number}"
            documents.append(
                Document(doc_id, doc_id, f"{path}:{number + 1}", tuple(paragraphs(knowledge)), format="jsonl")
            )
        questions.append(LabelledQuestion(str(item["question"]), frozenset({doc_id})))
    return documents, questions


async def run_halueval(
    path: Path, embedder: Embedder, work_dir: Path, limit: int | None = None
) -> tuple[dict[str, Any], RetrievalEvalResult]:
    from gateway.migrate import upgrade  # the gateway's migrations own the schema, rag_ tables included

    documents, questions = halueval_corpus(path, limit)
    ingestor = await Ingestor.open(work_dir, None, embedder, ensure_schema=upgrade)
    async with ingestor:
        report = await ingestor.ingest_documents("halueval", documents)
    store = CollectionStore(work_dir, embedder)
    try:
        result = await evaluate(store, "halueval", questions)
    finally:
        await store.aclose()
    return report.to_dict(), result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Retrieval quality (recall@1, recall@5, MRR) and latency on labelled questions."
    parser.add_argument("--collection", help="collection to evaluate (under DATA_DIR/indexes)")
    parser.add_argument("--questions", type=Path, help="JSONL of {question, documents}")
    parser.add_argument(
        "--halueval",
        type=Path,
        metavar="DEV_JSONL",
        help="index HaluEval QA knowledge texts in a scratch directory and ask its questions",
    )
    parser.add_argument("--limit", type=int, default=None, help="with --halueval: only the first N items")
    parser.add_argument(
        "--embedding-model",
        default=None,
        metavar="PATH_OR_NAME",
        help="embedding model (default: the embedding_model setting, else the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--show-misses", action="store_true", help="list questions not found at rank 1")


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Run `gateway eval retrieval`. The data dir and `--embedding-model` are settings
    (`data_dir`, `embedding_model`); without settings, `args.data_dir` and the flag."""
    data_dir = settings.data_dir if settings is not None else Path(getattr(args, "data_dir", None) or "data")
    model = settings.embedding_model if settings is not None else args.embedding_model
    if args.halueval is None and (args.collection is None or args.questions is None):
        print("gateway eval retrieval: give --collection and --questions, or --halueval", file=sys.stderr)
        return 2
    try:
        output = asyncio.run(_run(args, data_dir, model))
    except (RetrievalError, ValueError, OSError) as exc:
        print(f"gateway eval retrieval: {exc}", file=sys.stderr)
        return 1
    result: RetrievalEvalResult = output["result"]
    if args.json:
        payload = result.to_dict()
        if not args.show_misses:
            payload.pop("misses")
        if "ingest" in output:
            payload["ingest"] = output["ingest"]
        print(json.dumps(payload, indent=2))
    else:
        if "ingest" in output:
            ingest = output["ingest"]
            print(
                f"indexed {ingest['ingested']} documents, {ingest['chunks']} chunks in {ingest['seconds']} s "
                f"({ingest['chunks_per_s']} chunks/s)"
            )
        print(result.summary())
        if args.show_misses:
            for miss in result.misses:
                print(f"  rank {miss['rank']}: {miss['question']!r} expected {miss['expected']} got {miss['got']}")
    return 0


async def _run(args: argparse.Namespace, data_dir: Path, model: str | None) -> dict[str, Any]:
    embedder = await create_embedder_async(model)
    try:
        if args.halueval is not None:
            with tempfile.TemporaryDirectory(prefix="halueval-") as scratch:
                ingest, result = await run_halueval(args.halueval, embedder, Path(scratch), args.limit)
            return {"ingest": ingest, "result": result}
        store = CollectionStore(data_dir, embedder)
        try:
            return {"result": await evaluate(store, args.collection, load_questions(args.questions))}
        finally:
            await store.aclose()
    finally:
        await embedder.aclose()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m evals.retrieval")
    cli.add_argument("--data-dir", type=Path, default=Path("data"))
    configure_parser(cli)
    sys.exit(run(cli.parse_args()))
