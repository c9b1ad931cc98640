from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evals.retrieval import (
    LabelledQuestion,
    configure_parser,
    document_ranking,
    evaluate,
    halueval_corpus,
    load_questions,
    run,
)
from retrieval.embedders import HashingEmbedder, SentenceTransformerEmbedder
from retrieval.ingest import Ingestor
from retrieval.loaders import iter_files
from retrieval.sample import SAMPLE_DOCUMENTS_DIR, SAMPLE_QUESTIONS, ensure_sample_collection
from retrieval.store import CollectionStore
from tests.retrieval.conftest import make_doc
from tests.retrieval.schema import create_rag_tables


def test_sample_corpus_loads_cleanly_and_questions_point_at_real_documents() -> None:
    files = list(iter_files([SAMPLE_DOCUMENTS_DIR]))
    assert [s for f in files for s in f.skipped] == []
    formats = {d.format for f in files for d in f.documents}
    assert formats == {"markdown", "html", "text", "pdf", "jsonl"}
    ids = {d.id for f in files for d in f.documents}
    questions = load_questions(SAMPLE_QUESTIONS)
    assert len(questions) >= 40
    for question in questions:
        assert question.documents <= ids, question
    assert ids <= {doc for q in questions for doc in q.documents}  # every document is asked about


async def test_ensure_sample_collection_runs_once(tmp_path: Path) -> None:
    embedder = HashingEmbedder(512)
    first = await ensure_sample_collection(tmp_path, None, embedder, ensure_schema=create_rag_tables)
    assert first is not None and first.ingested >= 12 and first.skipped == []
    assert (tmp_path / "gateway.db").is_file()
    assert await ensure_sample_collection(tmp_path, None, embedder, ensure_schema=create_rag_tables) is None
    store = CollectionStore(tmp_path, embedder)
    hits = await store.search("sample", "Kestrel Care extended warranty price", top_k=3)
    assert hits[0].document_id == "policies/warranty.md"
    await store.aclose()


async def test_metrics_are_computed_from_document_ranks(tmp_path: Path) -> None:
    embedder = HashingEmbedder(512)
    async with await Ingestor.open(tmp_path, None, embedder, ensure_schema=create_rag_tables) as ingestor:
        await ingestor.ingest_documents(
            "kb",
            [
                make_doc("walrus", "Walruses eat clams in the Arctic."),
                make_doc("camel", "Camels cross hot deserts."),
                make_doc("tea", "Green tea leaves are steamed."),
            ],
        )
    store = CollectionStore(tmp_path, embedder)
    questions = [
        LabelledQuestion("what do walruses eat", frozenset({"walrus"})),  # rank 1
        LabelledQuestion("camels deserts", frozenset({"tea"})),  # wrong label: rank > 1
        LabelledQuestion("steamed green tea", frozenset({"tea", "camel"})),  # rank 1
    ]
    result = await evaluate(store, "kb", questions)
    await store.aclose()
    assert result.questions == 3
    assert result.recall_at_1 == pytest.approx(2 / 3)
    assert result.recall_at_5 == pytest.approx(1.0)
    assert 2 / 3 + (1 / 3) * (1 / 3) <= result.mrr <= 2 / 3 + (1 / 3) * (1 / 2) + 1e-9
    assert [m["question"] for m in result.misses] == ["camels deserts"]
    assert document_ranking(["a", "b", "a", "c"]) == ["a", "b", "c"]


def test_halueval_corpus_shape(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    rows = [
        {"knowledge": "K one.", "question": "Q1?"},
        {"knowledge": "K two.", "question": "Q2?"},
        {"knowledge": "K one.", "question": "Q3?"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    documents, questions = halueval_corpus(path)
    assert [d.id for d in documents] == ["halueval-0", "halueval-1"]
    assert [sorted(q.documents) for q in questions] == [["halueval-0"], ["halueval-1"], ["halueval-0"]]


def test_eval_cli_with_a_collection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    asyncio.run(ensure_sample_collection(tmp_path, None, HashingEmbedder(384), ensure_schema=create_rag_tables))
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(
        ["--collection", "sample", "--questions", str(SAMPLE_QUESTIONS), "--embedding-model", "hashing", "--json"]
    )
    args.data_dir = tmp_path
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["questions"] >= 40
    assert 0 <= out["recall_at_1"] <= out["recall_at_5"] <= 1
    assert out["latency_p50_ms"] <= out["latency_p99_ms"]
    args.collection = "missing"
    assert run(args) == 1
    assert "unknown collection 'missing'" in capsys.readouterr().err


@pytest.mark.slow
async def test_minilm_finds_the_sample_answers(tmp_path: Path, minilm: SentenceTransformerEmbedder) -> None:
    """The shipped corpus and labels with the real model: the quality bar the README quotes."""
    report = await ensure_sample_collection(tmp_path, None, minilm, ensure_schema=create_rag_tables)
    assert report is not None
    store = CollectionStore(tmp_path, minilm)
    result = await evaluate(store, "sample", load_questions(SAMPLE_QUESTIONS))
    await store.aclose()
    assert result.recall_at_5 >= 0.95
    assert result.recall_at_1 >= 0.85


async def test_sample_is_rebuilt_for_another_embedding_model(tmp_path: Path) -> None:
    assert (
        await ensure_sample_collection(tmp_path, None, HashingEmbedder(512), ensure_schema=create_rag_tables)
        is not None
    )
    report = await ensure_sample_collection(tmp_path, None, HashingEmbedder(256), ensure_schema=create_rag_tables)
    assert report is not None and report.ingested >= 12
    store = CollectionStore(tmp_path, HashingEmbedder(256))
    hits = await store.search("sample", "Kestrel Care extended warranty price", top_k=1)
    assert hits[0].document_id == "policies/warranty.md"
    await store.aclose()
    assert await ensure_sample_collection(tmp_path, None, HashingEmbedder(256), ensure_schema=create_rag_tables) is None


def test_eval_cli_halueval_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dev.jsonl"
    rows = [
        {"knowledge": "The walrus lives in the Arctic and eats clams.", "question": "What does the walrus eat?"},
        {"knowledge": "Camels cross deserts and store fat in humps.", "question": "Where do camels store fat?"},
        {"knowledge": "Green tea leaves are steamed before drying.", "question": "Are green tea leaves steamed?"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--halueval", str(path), "--embedding-model", "hashing", "--json"])
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["questions"] == 3 and out["ingest"]["ingested"] == 3
    assert out["recall_at_1"] == 1.0 and out["mrr"] == 1.0
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args([])) == 2  # neither a collection nor --halueval
