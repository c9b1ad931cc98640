"""The trained toxicity scorer's cascade gate: what it skips never reaches MiniLM, what it passes
scores exactly as without it, gate = false is today's scorer, the shipped gate matches its
metadata and its training features, and the policy key is validated."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from evals.train_toxicity import DAVIDSON, choose_gate_threshold, gate_matrix, gate_recall
from guardrails import trained_toxicity
from guardrails.errors import PolicyError, ScorerUnavailable
from guardrails.policy import parse_policy
from guardrails.toxicity import ProfanityCheckScorer, ToxicityConfig, build_scorer
from guardrails.trained_toxicity import (
    GATE_CAP,
    GATE_FILE,
    TrainedToxicityScorer,
    build_features,
    chunked,
    gate_batch,
    gate_weights_bytes,
    load_head,
    profanity_logit,
    score_texts,
)

ROOT = Path(__file__).resolve().parents[2]
META = json.loads((trained_toxicity.ARTEFACT_DIR / "meta.json").read_text())

PLAIN = [
    "Sure, here is how to sort a list in Python: use sorted(items, key=len).",
    "The capital of France is Paris.",
    "Thanks for the quick reply, that solved my problem.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]
TOXIC = ["You are a worthless piece of trash and everyone hates you.", "I will find you tonight and break your legs."]


class CountingEmbed:
    """A fake encoder: deterministic unit rows per text, and a record of every text it was given."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.seen += list(texts)
        rows = [
            np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=384) for t in texts
        ]
        out = np.array(rows, dtype=np.float32).reshape(len(texts), 384)
        unit: np.ndarray = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return unit


def test_shipped_gate_is_documented_small_and_chosen_on_validation() -> None:
    gate = META["gate"]
    path = trained_toxicity.ARTEFACT_DIR / GATE_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == gate["sha256"]
    assert path.stat().st_size == gate["bytes"] < 400_000
    assert gate["threshold_chosen_on"] == "val" and gate["recall_on_val"] >= gate["recall_target"] >= 0.995
    for split in ("test", "holdout"):  # the full scorer's positives the gate kept, measured once
        for part in ("davidson", "labelled"):
            if part in gate[split]:
                got = gate[split][part]
                assert got["kept_positives"] >= 0.995 * got["full_positives"], (split, part, got)


def test_the_gate_skips_plain_text_without_calling_the_encoder() -> None:
    fake = CountingEmbed()
    scorer = TrainedToxicityScorer(embed=fake)
    assert scorer.gate is not None
    assert not scorer.gate_passes(PLAIN).any(), "the shipped gate should let these plain sentences skip MiniLM"
    scores = [s["toxicity"] for s in scorer.score_batch(PLAIN)]
    assert fake.seen == [] and all(0.0 < s < GATE_CAP for s in scores)
    # a text the gate passes goes to the encoder (once; it has no quotation to score again)
    assert scorer.gate_passes(TOXIC).all()
    scorer.score_batch(TOXIC + PLAIN)
    assert sorted(fake.seen) == sorted(TOXIC)


def test_gate_off_gives_the_ungated_scores_exactly_and_gate_on_keeps_them_for_passed_texts() -> None:
    texts = [*PLAIN, *TOXIC, "ok", "He said 'you idiot' to me.", '"you are trash"']
    fake = CountingEmbed()
    off = TrainedToxicityScorer(embed=fake, gate=False)
    on = TrainedToxicityScorer(embed=fake)
    assert off.gate is None and off.describe()["gate"] == "off"
    # what the scorer computed before the gate: the head on every text, then the rules
    head = load_head()
    profanity = ProfanityCheckScorer()

    def probs(ts: Sequence[str]) -> np.ndarray:
        return np.array([s["toxicity"] for s in profanity.score_batch(ts)])

    before = score_texts(texts, lambda ts: head.score(build_features(ts, chunked(fake), probs)), probs)
    assert [s["toxicity"] for s in off.score_batch(texts)] == before
    gated = [s["toxicity"] for s in on.score_batch(texts)]
    passed = on.gate_passes(texts)
    assert passed.any() and not passed.all()
    for text, was, now, p in zip(texts, before, gated, passed, strict=True):
        if p and '"' not in text and "'" not in text:  # no quotation rule mixes in a second (gated) text
            assert now == was, text
        elif not p:
            assert now < 0.5, text


def test_gate_decision_equals_the_training_features() -> None:
    """The run-time decision and the matrix the gate was fitted on are the same features."""
    gate = trained_toxicity.load_gate(trained_toxicity.ARTEFACT_DIR, META)
    assert gate is not None
    texts = [*PLAIN, *TOXIC, "", "!!!", "a"]
    profanity = ProfanityCheckScorer()
    logits = profanity_logit(np.array([s["toxicity"] for s in profanity.score_batch(texts)]))
    x = gate_matrix(texts, logits if gate.profanity_feature else None, gate.bits)
    assert np.allclose(x @ gate.weights + gate.bias, gate.decision(texts, logits), atol=1e-9)


def test_a_gate_that_does_not_match_the_head_fails_and_a_missing_gate_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(trained_toxicity.ARTEFACT_DIR, folder)
    gate = trained_toxicity.load_gate(folder, META)
    assert gate is not None  # another gate (its threshold moved) beside the same meta.json
    (folder / GATE_FILE).write_bytes(gate_weights_bytes(gate.weights, gate.bias, gate.threshold + 1.0))
    with pytest.raises(ScorerUnavailable, match="does not match the sha256"):
        TrainedToxicityScorer(folder, embed=CountingEmbed())
    (folder / GATE_FILE).unlink()
    scorer = TrainedToxicityScorer(folder, embed=CountingEmbed())
    assert scorer.gate is None and scorer.describe()["gate"] == "none in the artefact"


def test_the_policy_key_switches_the_gate(tmp_path: Path) -> None:
    assert parse_policy("").toxicity.gate is True
    off = parse_policy("[scorers.toxicity]\ngate = false\n").toxicity
    assert off.gate is False
    with pytest.raises(PolicyError, match="gate must be true or false") as err:
        parse_policy('[scorers.toxicity]\nscorer = "trained"\ngate = "no"\n')
    assert ":3" in str(err.value)  # the key's line
    scorer = build_scorer(off, embed=CountingEmbed())
    assert isinstance(scorer, TrainedToxicityScorer) and scorer.gate is None
    assert build_scorer(ToxicityConfig(), embed=CountingEmbed()).describe()["gate"]["sha256"] == META["gate"]["sha256"]


def test_gate_threshold_is_the_highest_that_keeps_the_recall() -> None:
    decisions = np.array([-3.0, -2.0, -1.0, 0.0, 1.0])
    full = np.array([0.1, 0.6, 0.2, 0.7, 0.9])  # positives at -2, 0 and 1

    def recall_at(t: float) -> float:
        gated = np.where(decisions >= t, full, 0.0)
        return gate_recall(gated, full, [np.ones(5, dtype=bool)])

    t, r = choose_gate_threshold(decisions, recall_at, 1.0)
    assert r == 1.0 and -3.0 < t < -2.0  # halfway below the lowest positive
    t, r = choose_gate_threshold(decisions, recall_at, 0.6)
    assert r >= 0.6 and -1.0 < t < 0.0


def test_the_shipped_gate_loads_in_a_fresh_process() -> None:
    script = (
        "import json\n"
        "from guardrails.trained_toxicity import TrainedToxicityScorer\n"
        "s = TrainedToxicityScorer(embed=lambda texts: (_ for _ in ()).throw(AssertionError(texts)))\n"
        f"print(json.dumps({{'gate': s.describe()['gate'], 'scores': s.score_batch({PLAIN!r})}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["gate"]["sha256"] == META["gate"]["sha256"]
    assert all(s["toxicity"] < GATE_CAP for s in out["scores"])  # no encoder was needed


def reference_rows(text: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One text's (columns, values), computed alone: the per-text code the shipped gate was trained
    with before gate_batch, kept as the oracle that the batched features must equal."""
    low = text.lower()
    mask = np.uint64((1 << bits) - 1)
    families: list[np.ndarray] = []
    chars: list[np.ndarray] = []
    tokens = low.split()
    if tokens:
        padded = " " + "  ".join(tokens) + " "
        c = np.frombuffer(padded.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        pairs = np.concatenate([[0], np.cumsum((c[:-1] == 32) & (c[1:] == 32))])
        for n in trained_toxicity.GATE_CHAR_N:
            m = len(c) - n + 1
            if m <= 0:
                continue
            h = np.zeros(m, dtype=np.uint64)
            for k in range(n):
                h = h * np.uint64(1000003) + c[k : k + m]
            inside = (pairs[n - 1 : n - 1 + m] - pairs[:m]) == 0
            chars.append(trained_toxicity._mix(h[inside] + np.uint64(n)) & mask)
    families.append(np.concatenate(chars) if chars else np.zeros(0, dtype=np.uint64))
    words = re.findall(r"(?u)\b\w\w+\b", low)
    word_ids = np.zeros(0, dtype=np.uint64)
    if words:
        wh = trained_toxicity._mix(np.array([zlib.crc32(w.encode("utf-8")) for w in words], dtype=np.uint64))
        word_ids = wh & mask
        if len(words) > 1:
            bigrams = trained_toxicity._mix(wh[:-1] * np.uint64(31) + wh[1:] + np.uint64(7)) & mask
            word_ids = np.concatenate([word_ids, bigrams])
    families.append(word_ids)
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for family, ids in enumerate(families):
        if len(ids):
            u, counts = np.unique(ids.astype(np.int64), return_counts=True)
            cols.append(u + family * (1 << bits))
            vals.append(counts / np.sqrt(float(counts @ counts)))
    if not cols:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    return np.concatenate(cols), np.concatenate(vals)


def varied_texts() -> list[str]:
    """Benign prompts, toxic tweets (when the Davidson data is there) and the awkward cases."""
    benign = (ROOT / "guardrails" / "benign_prompts.txt").read_text(encoding="utf-8").splitlines()
    texts = [line for line in benign if line.strip() and not line.startswith("#")]
    if DAVIDSON.is_file():
        with DAVIDSON.open(encoding="utf-8", newline="") as fh:
            texts += [row["tweet"] for row in csv.DictReader(fh) if row["class"] in ("0", "1")][:300]
    return [
        *texts,
        *PLAIN,
        *TOXIC,
        "",
        "   \t\n ",
        "a",
        "x",
        "idiot",
        "Café déjà vu, naïve façade 😀🔥 你是个白痴 日本語のテキスト",
        "\u00a0non\u2003breaking\u3000spaces\u00a0",
        "ΟΔΟΣ ΣΟΦΟΣ",
        "ab cd",
        "go go go go go go go go go go",
        " ".join(["the quick brown fox jumps over the lazy dog"] * 60),
        "!!!",
        "  leading and trailing  ",
    ]


def reference_decision(gate: trained_toxicity.ToxicityGate, texts: Sequence[str], logits: np.ndarray) -> np.ndarray:
    out = np.empty(len(texts))
    for i, text in enumerate(texts):
        cols, vals = reference_rows(text, gate.bits)
        out[i] = float(gate.weights[cols] @ vals) + gate.bias
    if gate.profanity_feature:
        out += gate.weights[-1] * trained_toxicity.GATE_PROFANITY_SCALE * logits
    return out


def test_the_batched_gate_equals_the_per_text_features_and_decision() -> None:
    gate = trained_toxicity.load_gate(trained_toxicity.ARTEFACT_DIR, META)
    assert gate is not None
    texts = varied_texts()
    logits = np.random.default_rng(0).uniform(-6.9, 6.9, len(texts))
    expected = reference_decision(gate, texts, logits)
    assert (expected >= gate.threshold).any() and not (expected >= gate.threshold).all()
    rows, cols, vals = gate_batch(texts, gate.bits)
    for i, text in enumerate(texts):
        want_cols, want_vals = reference_rows(text, gate.bits)
        assert np.array_equal(cols[rows == i], want_cols) and np.array_equal(vals[rows == i], want_vals), text
    for size in (1, 2, 7, 64, len(texts)):
        got = np.concatenate(
            [gate.decision(texts[s : s + size], logits[s : s + size]) for s in range(0, len(texts), size)]
        )
        assert np.allclose(got, expected, rtol=0, atol=1e-9), size
        assert np.array_equal(got >= gate.threshold, expected >= gate.threshold), size
    assert len(gate.decision([], np.zeros(0))) == 0


def test_texts_in_a_batch_share_no_ngrams() -> None:
    """Joined end to end, neither a character n-gram ("b  c") nor a word bigram ("you idiot") may
    cross from one text into the next."""
    gate = trained_toxicity.load_gate(trained_toxicity.ARTEFACT_DIR, META)
    assert gate is not None
    for texts in (["ab", "cd"], ["you", "idiot"], ["you are an", "idiot"], ["a", "", "b", "  ", "go home"]):
        logits = np.zeros(len(texts))
        alone = np.concatenate([gate.decision([t], logits[:1]) for t in texts])
        assert np.allclose(gate.decision(texts, logits), alone, rtol=0, atol=1e-9), texts
        rows, cols, vals = gate_batch(texts, gate.bits)
        for i, text in enumerate(texts):
            _, want_cols, want_vals = gate_batch([text], gate.bits)
            assert np.array_equal(cols[rows == i], want_cols) and np.array_equal(vals[rows == i], want_vals)
    # the two words in one text do make a bigram: the test above would see one that leaked
    assert len(gate_batch(["you idiot"], gate.bits)[1]) > len(gate_batch(["you", "idiot"], gate.bits)[1])
