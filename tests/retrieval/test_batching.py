"""Query embeddings batched across concurrent requests, and the query and result caches (issue 15)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from retrieval.batching import EmbedBatcher, LruCache, normalise_query
from retrieval.embedders import HashingEmbedder, SentenceTransformerEmbedder
from retrieval.store import CollectionStore
from tests.retrieval.conftest import make_doc
from tests.retrieval.test_store import ANIMALS, _ingest

QUERIES = [
    f"question number {i}: which animal lives in the {place}?" for i, place in enumerate(["Arctic", "desert"] * 8)
]


async def test_batched_vectors_equal_one_at_a_time(minilm: SentenceTransformerEmbedder) -> None:
    alone = np.vstack([minilm.embed_sync([q]) for q in QUERIES])
    before = minilm.batcher.batches
    together = await asyncio.gather(*(minilm.embed([q]) for q in QUERIES))
    assert np.allclose(np.vstack(together), alone, atol=1e-5)
    assert minilm.batcher.batches - before < len(QUERIES)  # they shared model calls


async def test_an_idle_batcher_sends_at_once_and_a_busy_one_batches() -> None:
    sizes: list[int] = []

    def embed_sync(texts: list[str]) -> np.ndarray:
        sizes.append(len(texts))
        return np.arange(len(texts), dtype=np.float32).reshape(-1, 1) + 100 * len(sizes)

    with ThreadPoolExecutor(1) as executor:
        batcher = EmbedBatcher(embed_sync, executor, max_texts=5)
        first = await batcher.embed(["a"])
        assert sizes == [1] and first.tolist() == [[100.0]]
        results = await asyncio.gather(*(batcher.embed([f"q{i}", f"r{i}"]) for i in range(4)))
    # The lone call went at once; the four that came together went as batches of at most 5 texts.
    assert sizes[1:] == [4, 4] and batcher.batches == 3 and batcher.calls == 5
    assert all(r.shape == (2, 1) for r in results)


async def test_a_model_error_reaches_every_caller_in_the_batch() -> None:
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("model down")

    with ThreadPoolExecutor(1) as executor:
        batcher = EmbedBatcher(broken, executor)
        outcomes = await asyncio.gather(*(batcher.embed(["x"]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def test_lru_cache_is_bounded_and_counts() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # "b" was used least recently
    assert cache.get("b") is None and cache.get("c") == 3 and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    assert normalise_query("  which   animal\n flies ") == "which animal flies"


async def test_the_cache_never_serves_a_stale_collection_version(
    data_dir: Path, database_url: str, embedder: HashingEmbedder
) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder, check_interval_s=0)
    first = await store.search("zoo", "which animal crosses deserts", top_k=1)
    again = await store.search("zoo", "which  animal crosses deserts ", top_k=1)
    assert [h.document_id for h in first] == [h.document_id for h in again] == ["camel"]
    assert store.result_cache.hits == 1
    await _ingest(data_dir, database_url, embedder, "zoo", [make_doc("dromedary", "Dromedaries cross deserts.")])
    await store.refresh("zoo")
    fresh = await store.search("zoo", "which animal crosses deserts", top_k=1)
    assert [h.document_id for h in fresh] == ["dromedary"]
    assert store.query_cache.hits >= 1  # the query's vector was reused; the hits were not
    await store.aclose()


@pytest.mark.parametrize("size", [0])
async def test_a_zero_cache_keeps_nothing(
    data_dir: Path, database_url: str, embedder: HashingEmbedder, size: int
) -> None:
    await _ingest(data_dir, database_url, embedder, "zoo", ANIMALS)
    store = CollectionStore(data_dir, embedder, cache_size=0)
    for _ in range(2):
        await store.search("zoo", "penguins", top_k=1)
    assert len(store.result_cache) == 0 and store.result_cache.hits == 0
    await store.aclose()
