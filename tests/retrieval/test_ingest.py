from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from retrieval import storage
from retrieval.cli import configure_ingest_parser, run_ingest
from retrieval.db import rag_chunks, rag_documents
from retrieval.embedders import HashingEmbedder
from retrieval.errors import EmbeddingMismatch, InvalidCollectionName, UnknownCollection
from retrieval.ingest import Ingestor
from retrieval.store import CollectionStore
from tests.retrieval.conftest import make_doc
from tests.retrieval.schema import create_rag_tables


class CountingEmbedder(HashingEmbedder):
    """Counts the texts it embeds, to prove unchanged documents cost nothing."""

    def __init__(self) -> None:
        super().__init__(dimension=256)
        self.embedded: list[str] = []

    async def embed(self, texts):  # type: ignore[no-untyped-def]
        self.embedded.extend(texts)
        return await super().embed(texts)


def _write_corpus(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "walrus.md").write_text("# Walruses\n\nWalruses live in the Arctic and eat clams.\n")
    (root / "volcano.txt").write_text("Volcanoes erupt molten lava from the mantle.\n")
    (root / "tea.html").write_text("<h1>Tea</h1><p>Green tea is steamed before drying.</p>")


async def _open(data_dir: Path, url: str, embedder: HashingEmbedder) -> Ingestor:
    return await Ingestor.open(data_dir, url, embedder, ensure_schema=create_rag_tables)


async def _sql_counts(ingestor: Ingestor, collection: str) -> tuple[int, int]:
    async with ingestor.repository.engine.connect() as conn:
        docs = (
            await conn.execute(
                select(func.count()).select_from(rag_documents).where(rag_documents.c.collection == collection)
            )
        ).scalar_one()
        chunks = (
            await conn.execute(
                select(func.count()).select_from(rag_chunks).where(rag_chunks.c.collection == collection)
            )
        ).scalar_one()
    return int(docs), int(chunks)


async def test_ingest_then_search(tmp_path: Path, data_dir: Path, database_url: str) -> None:
    _write_corpus(tmp_path / "docs")
    embedder = HashingEmbedder(256)
    async with await _open(data_dir, database_url, embedder) as ingestor:
        report = await ingestor.ingest_paths("kb", [tmp_path / "docs"])
        assert (report.files_seen, report.ingested, report.unchanged, report.skipped) == (3, 3, 0, [])
        assert report.chunks == report.total_chunks == 3
        assert await _sql_counts(ingestor, "kb") == (3, 3)
        rows = await ingestor.repository.chunks("kb", "walrus.md")
        assert rows[0]["chunk_id"] == "walrus.md#0"
        assert rows[0]["heading_path"] == ["Walruses"]
    store = CollectionStore(data_dir, embedder)
    hits = await store.search("kb", "what do walruses eat", top_k=2)
    assert hits[0].document_id == "walrus.md"
    assert hits[0].title == "Walruses"
    assert hits[0].rank == 1 and hits[0].score > hits[1].score
    assert store.list_collections() == ["kb"]
    await store.aclose()


async def test_unchanged_documents_are_not_embedded_again(tmp_path: Path, data_dir: Path, database_url: str) -> None:
    _write_corpus(tmp_path / "docs")
    embedder = CountingEmbedder()
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_paths("kb", [tmp_path / "docs"])
        version = storage.read_pointer(storage.collection_dir(data_dir, "kb"))
        embedder.embedded.clear()
        again = await ingestor.ingest_paths("kb", [tmp_path / "docs"])
        assert (again.ingested, again.unchanged, again.chunks) == (0, 3, 0)
        assert embedder.embedded == []
        # no new version was published either
        assert storage.read_pointer(storage.collection_dir(data_dir, "kb")) == version


async def test_changed_document_replaces_its_chunks(tmp_path: Path, data_dir: Path, database_url: str) -> None:
    docs = tmp_path / "docs"
    _write_corpus(docs)
    embedder = CountingEmbedder()
    store = CollectionStore(data_dir, embedder, check_interval_s=0)
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_paths("kb", [docs])
        embedder.embedded.clear()
        (docs / "walrus.md").write_text("# Walruses\n\nWalruses have tusks.\n\n## Diet\n\nThey eat clams and snails.\n")
        report = await ingestor.ingest_paths("kb", [docs])
        assert (report.ingested, report.unchanged) == (1, 2)
        assert all("Walruses" in text for text in embedder.embedded)  # only the changed one
        assert await _sql_counts(ingestor, "kb") == (3, 4)
        rows = await ingestor.repository.chunks("kb", "walrus.md")
        assert [r["text"] for r in rows] == ["Walruses have tusks.", "They eat clams and snails."]
    await store.refresh("kb")
    hits = await store.search("kb", "walrus tusks", top_k=10)
    walrus_texts = [h.text for h in hits if h.document_id == "walrus.md"]
    assert sorted(walrus_texts) == ["They eat clams and snails.", "Walruses have tusks."]
    assert "Walruses live in the Arctic and eat clams." not in [h.text for h in hits]
    await store.aclose()


async def test_delete_removes_from_index_and_sql(tmp_path: Path, data_dir: Path, database_url: str) -> None:
    docs = tmp_path / "docs"
    _write_corpus(docs)
    embedder = HashingEmbedder(256)
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_paths("kb", [docs])
        report = await ingestor.delete_documents("kb", ["walrus.md", "nope.md"])
        assert report.deleted == 1
        assert [s.path for s in report.skipped] == ["nope.md"]
        assert await _sql_counts(ingestor, "kb") == (2, 2)
        with pytest.raises(UnknownCollection):
            await ingestor.delete_documents("other", ["walrus.md"])
    store = CollectionStore(data_dir, embedder)
    hits = await store.search("kb", "walruses arctic clams", top_k=5)
    assert "walrus.md" not in {h.document_id for h in hits}
    assert len(hits) == 2
    await store.aclose()


async def test_folder_prefix_delete(data_dir: Path, database_url: str) -> None:
    embedder = HashingEmbedder(256)
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_documents("kb", [make_doc("a/x", "one"), make_doc("a/y", "two"), make_doc("ab", "three")])
        report = await ingestor.delete_documents("kb", ["a"])
        assert report.deleted == 2
        snapshot = storage.load_snapshot(data_dir, "kb")
        assert set(snapshot.documents) == {"ab"}


async def test_other_embedding_model_is_refused(data_dir: Path, database_url: str) -> None:
    async with await _open(data_dir, database_url, HashingEmbedder(256)) as ingestor:
        await ingestor.ingest_documents("kb", [make_doc("a", "alpha")])
    async with await _open(data_dir, database_url, HashingEmbedder(128)) as ingestor:
        with pytest.raises(EmbeddingMismatch, match="hashing-256"):
            await ingestor.ingest_documents("kb", [make_doc("b", "beta")])
    store = CollectionStore(data_dir, HashingEmbedder(128))
    with pytest.raises(EmbeddingMismatch):
        await store.search("kb", "alpha")
    await store.aclose()


async def test_invalid_collection_name(data_dir: Path, database_url: str) -> None:
    async with await _open(data_dir, database_url, HashingEmbedder(64)) as ingestor:
        with pytest.raises(InvalidCollectionName):
            await ingestor.ingest_documents("../escape", [make_doc("a", "alpha")])
    assert not (data_dir.parent / "escape").exists()


async def test_index_written_but_sql_not_heals_on_next_ingest(data_dir: Path, database_url: str) -> None:
    """A crash between publishing the index and the SQL commit is repaired by re-ingesting."""
    embedder = CountingEmbedder()
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_documents("kb", [make_doc("a", "alpha")])
        await ingestor.repository.delete_documents("kb", ["a"])  # as if the SQL write was lost
        embedder.embedded.clear()
        report = await ingestor.ingest_documents("kb", [make_doc("a", "alpha")])
        assert report.ingested == 1 and embedder.embedded
        assert await _sql_counts(ingestor, "kb") == (1, 1)
        assert storage.load_snapshot(data_dir, "kb").index.size == 1  # replaced, not duplicated


def _cli_args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_ingest_parser(parser)
    args = parser.parse_args(list(argv))
    args.data_dir = tmp_path / "data"
    args.database = None
    return args


def test_cli_ingest_and_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    _write_corpus(docs)
    (docs / "bad.pdf").write_bytes(b"not a pdf")
    args = _cli_args(
        tmp_path,
        str(docs),
        "--collection",
        "kb",
        "--embedding-model",
        "hashing-128",
        "--chunk-tokens",
        "64",
        "--overlap-tokens",
        "8",
        "--index-type",
        "flat",
        "--json",
    )
    assert run_ingest(args, ensure_schema=create_rag_tables) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ingested"] == 3 and summary["files_seen"] == 4
    assert summary["skipped"][0]["reason"].startswith("unreadable PDF")
    assert summary["index_type"] == "flat" and summary["chunks_per_s"] > 0
    assert (tmp_path / "data" / "gateway.db").is_file()  # default SQLite location

    args = _cli_args(
        tmp_path, str(docs / "tea.html"), "--collection", "kb", "--delete", "--embedding-model", "hashing-128"
    )
    assert run_ingest(args, ensure_schema=create_rag_tables) == 0
    capsys.readouterr()
    assert set(storage.load_snapshot(tmp_path / "data", "kb").documents) == {"walrus.md", "volcano.txt"}


def test_cli_reports_a_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli_args(
        tmp_path,
        str(tmp_path),
        "--collection",
        "kb",
        "--embedding-model",
        "hashing",
        "--chunk-tokens",
        "100",
        "--overlap-tokens",
        "90",
    )
    assert run_ingest(args, ensure_schema=create_rag_tables) == 2
    assert "overlap_tokens" in capsys.readouterr().err


def test_cli_nothing_ingestable_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.pptx").write_bytes(b"PK")
    args = _cli_args(tmp_path, str(tmp_path / "x.pptx"), "--collection", "kb", "--embedding-model", "hashing")
    assert run_ingest(args, ensure_schema=create_rag_tables) == 1
    assert "unsupported file type .pptx" in capsys.readouterr().err
    assert storage.list_collections(tmp_path / "data") == []


async def test_large_ingest_switches_index_type(data_dir: Path, database_url: str) -> None:
    from retrieval.index import IndexConfig

    embedder = HashingEmbedder(32)
    documents = [make_doc(f"d{i}", f"document {i} about topic {i % 97} and item {i % 13}") for i in range(1200)]
    ingestor = await Ingestor.open(
        data_dir,
        database_url,
        embedder,
        ensure_schema=create_rag_tables,
        index_config=IndexConfig(flat_max=1000, ivf_min=10_000),
    )
    async with ingestor:
        report = await ingestor.ingest_documents("big", documents)
    assert report.index_type == "hnsw"
    snapshot = storage.load_snapshot(data_dir, "big", with_vectors=True)
    assert snapshot.index.kind == "hnsw" and snapshot.manifest["index_type"] == "hnsw"
    assert snapshot.vectors is not None and np.allclose(np.linalg.norm(snapshot.vectors, axis=1), 1, atol=1e-5)


async def test_drop_collection(data_dir: Path, database_url: str) -> None:
    embedder = HashingEmbedder(64)
    async with await _open(data_dir, database_url, embedder) as ingestor:
        await ingestor.ingest_documents("kb", [make_doc("a", "alpha"), make_doc("b", "beta")])
        await ingestor.ingest_documents("keep", [make_doc("a", "alpha")])
        assert await ingestor.drop_collection("kb") == 2
        assert await _sql_counts(ingestor, "kb") == (0, 0)
        assert await _sql_counts(ingestor, "keep") == (1, 1)
    assert storage.list_collections(data_dir) == ["keep"]
    store = CollectionStore(data_dir, embedder)
    with pytest.raises(UnknownCollection):
        await store.search("kb", "alpha")
    await store.aclose()


async def test_additions_extend_an_hnsw_index_changes_rebuild_it(
    data_dir: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.index import FaissIndex, IndexConfig

    builds: list[int] = []
    original = FaissIndex.build.__func__  # type: ignore[attr-defined]

    def counting(cls, vectors, config=None, dimension=None):  # type: ignore[no-untyped-def]
        builds.append(len(vectors))
        return original(cls, vectors, config, dimension)

    monkeypatch.setattr(FaissIndex, "build", classmethod(counting))
    embedder = HashingEmbedder(64)
    documents = [make_doc(f"d{i}", f"document {i} about topic {i % 97}") for i in range(300)]
    ingestor = await Ingestor.open(
        data_dir,
        database_url,
        embedder,
        ensure_schema=create_rag_tables,
        index_config=IndexConfig(flat_max=100, ivf_min=10_000),
    )
    async with ingestor:
        await ingestor.ingest_documents("kb", documents)
        assert builds == [300]
        await ingestor.ingest_documents("kb", [make_doc("new", "a brand new walrus document")])
        assert builds == [300]  # extended, not rebuilt
        snapshot = storage.load_snapshot(data_dir, "kb")
        assert snapshot.manifest["index_build"] == "extended" and snapshot.index.size == 301
        await ingestor.ingest_documents("kb", [make_doc("d5", "document five has changed")])
        assert builds == [300, 301]  # a replacement needs a rebuild: HNSW cannot remove
    store = CollectionStore(data_dir, embedder)
    hits = await store.search("kb", "brand new walrus", top_k=1)
    assert hits[0].document_id == "new"
    hits = await store.search("kb", "document five has changed", top_k=1)
    assert hits[0].document_id == "d5" and hits[0].text == "document five has changed"
    await store.aclose()
