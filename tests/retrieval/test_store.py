from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from retrieval import storage
from retrieval.embedders import HashingEmbedder
from retrieval.errors import RetrievalError, UnknownCollection
from retrieval.ingest import Ingestor
from retrieval.store import CollectionStore
from tests.retrieval.conftest import make_doc
from tests.retrieval.schema import create_rag_tables

ANIMALS = [
    make_doc("walrus", "Walruses live in the Arctic and eat clams."),
    make_doc("camel", "Camels store fat in their humps and cross deserts."),
    make_doc("penguin", "Penguins cannot fly but swim fast in cold water."),
]


async def _ingest(data_dir: Path, database_url: str, embedder: HashingEmbedder, collection: str, docs) -> None:
    async with await Ingestor.open(data_dir, database_url, embedder, ensure_schema=create_rag_tables) as ingestor:
        await ingestor.ingest_documents(collection, docs)


async def test_unknown_collection(data_dir: Path, embedder: HashingEmbedder) -> None:
    store = CollectionStore(data_dir, embedder)
    with pytest.raises(UnknownCollection) as info:
        await store.search("nope", "anything")
    assert info.value.name == "nope"
    assert isinstance(info.value, RetrievalError)
    with pytest.raises(UnknownCollection):  # not a valid name either: still just unknown
        await store.search("../../etc", "anything")
    assert store.list_collections() == []
    await store.aclose()


async def test_index_persists_across_store_instances(
    data_dir: Path, database_url: str, embedder: HashingEmbedder
) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    for _ in range(2):  # a fresh store (a restarted gateway) reads the same files
        store = CollectionStore(data_dir, embedder)
        hits = await store.search("zoo", "which animal crosses deserts", top_k=1)
        assert [h.document_id for h in hits] == ["camel"]
        info = await store.info("zoo")
        assert (info["chunks"], info["documents"], info["index_type"]) == (3, 3, "flat")
        await store.aclose()


async def test_top_k_and_min_score(data_dir: Path, database_url: str, embedder: HashingEmbedder) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder)
    all_hits = await store.search("zoo", "penguins swim in cold water", top_k=10)
    assert len(all_hits) == 3
    assert [h.rank for h in all_hits] == [1, 2, 3]
    assert all_hits[0].document_id == "penguin"
    strict = await store.search("zoo", "penguins swim in cold water", top_k=10, min_score=all_hits[0].score - 1e-6)
    assert [h.document_id for h in strict] == ["penguin"]
    assert await store.search("zoo", "penguins", top_k=0) == []
    outcome = await store.search_detailed("zoo", "camels", top_k=1)
    assert outcome.embed_ms >= 0 and outcome.search_ms >= 0 and outcome.version.startswith("v-")
    await store.aclose()


async def test_hot_swap_while_searching(data_dir: Path, database_url: str, embedder: HashingEmbedder) -> None:
    """Concurrent searches never fail while new versions are published, and end on the newest."""
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder, check_interval_s=0.005)
    stop = asyncio.Event()
    seen_versions: set[str] = set()
    errors: list[BaseException] = []
    searches = 0

    async def searcher() -> None:
        nonlocal searches
        while not stop.is_set():
            try:
                outcome = await store.search_detailed("zoo", "arctic walrus clams", top_k=3)
                seen_versions.add(outcome.version)
                assert outcome.hits, "a search returned nothing during a swap"
                searches += 1
            except BaseException as exc:  # any failure is what this test looks for
                errors.append(exc)
                return
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(searcher()) for _ in range(4)]
    for round_number in range(6):
        extra = make_doc(f"extra-{round_number}", f"Arctic walrus note number {round_number} about clams.")
        await _ingest(data_dir, database_url, embedder, "zoo", [*ANIMALS, extra])
        await asyncio.sleep(0.05)
    latest = storage.read_pointer(storage.collection_dir(data_dir, "zoo"))
    for _ in range(200):  # the newest version is picked up without a restart
        if (await store.search_detailed("zoo", "walrus", top_k=1)).version == latest:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*tasks)
    assert errors == []
    assert searches > 20
    assert len(seen_versions) >= 3
    assert (await store.search_detailed("zoo", "walrus", top_k=1)).version == latest
    hits = await store.search("zoo", "walrus note number 5", top_k=10)
    assert "extra-5" in {h.document_id for h in hits}
    # old versions are cleaned up: the live one and the previous one remain
    versions = [p for p in storage.collection_dir(data_dir, "zoo").iterdir() if p.name.startswith("v-")]
    assert len(versions) == 2
    await store.aclose()


async def test_broken_new_version_keeps_the_old_one(
    data_dir: Path, database_url: str, embedder: HashingEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder, check_interval_s=0)
    first = (await store.search_detailed("zoo", "camel", top_k=1)).version
    coll = storage.collection_dir(data_dir, "zoo")
    broken = coll / "v-99999999999999999999-broken"
    shutil.copytree(coll / first, broken)
    (broken / "index.faiss").write_bytes(b"garbage")
    (coll / "CURRENT").write_text(broken.name)
    for _ in range(5):
        outcome = await store.search_detailed("zoo", "camel", top_k=1)
        assert outcome.version == first and outcome.hits[0].document_id == "camel"
        await asyncio.sleep(0.01)
    assert "new version not loaded" in caplog.text
    await store.aclose()


async def test_removed_collection_becomes_unknown(data_dir: Path, database_url: str, embedder: HashingEmbedder) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder, check_interval_s=0)
    assert await store.search("zoo", "camel")
    shutil.rmtree(storage.collection_dir(data_dir, "zoo"))
    with pytest.raises(UnknownCollection):
        await store.search("zoo", "camel")
    await store.aclose()


async def test_new_collection_is_found_without_restart(
    data_dir: Path, database_url: str, embedder: HashingEmbedder
) -> None:
    store = CollectionStore(data_dir, embedder)
    with pytest.raises(UnknownCollection):
        await store.search("later", "camel")
    await _ingest(data_dir, database_url, embedder, "later", ANIMALS)
    assert (await store.search("later", "camel humps", top_k=1))[0].document_id == "camel"
    assert store.list_collections() == ["later"]
    await store.aclose()


async def test_first_load_is_shared_by_concurrent_requests(
    data_dir: Path, database_url: str, embedder: HashingEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    loads = 0
    original = storage.load_snapshot

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(storage, "load_snapshot", counting)
    store = CollectionStore(data_dir, embedder)
    results = await asyncio.gather(*(store.search("zoo", "camel", top_k=1) for _ in range(10)))
    assert all(r[0].document_id == "camel" for r in results)
    assert loads == 1
    await store.aclose()


async def test_an_ingest_is_served_by_every_replica_from_its_completion(
    data_dir: Path, database_url: str, embedder: HashingEmbedder
) -> None:
    """Two stores on one shared folder (two replicas): the first search after an ingest returns,
    on both, uses the new version; no sleep, no retry loop."""
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    replicas = [CollectionStore(data_dir, embedder), CollectionStore(data_dir, embedder)]
    for store in replicas:
        assert await store.search("zoo", "camel humps", top_k=1)
    for round_number in range(3):
        extra = make_doc(f"extra-{round_number}", f"Arctic walrus note number {round_number} about clams.")
        await _ingest(data_dir, database_url, embedder, "zoo", [*ANIMALS, extra])
        latest = storage.read_pointer(storage.collection_dir(data_dir, "zoo"))
        for store in replicas:
            outcome = await store.search_detailed("zoo", f"walrus note number {round_number}", top_k=10)
            assert outcome.version == latest
            assert f"extra-{round_number}" in {h.document_id for h in outcome.hits}
    background = CollectionStore(data_dir, embedder, fresh=False)
    first = (await background.search_detailed("zoo", "camel", top_k=1)).version
    await _ingest(data_dir, database_url, embedder, "zoo", [*ANIMALS, make_doc("later", "A later note.")])
    # Without `fresh` the request that notices the new version is still served by the old one.
    assert (await background.search_detailed("zoo", "camel", top_k=1)).version == first
    for store in (*replicas, background):
        await store.aclose()
