"""Scores and statistics for eval runs: answer matching, guard outcomes, citations, latency
percentiles, drift statistics (PSI, two-sample Kolmogorov-Smirnov), run-to-run comparison and
guard precision / recall against reviewer labels.

Plain functions over plain data, so each one can be tested on numbers a person can check.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
from scipy import stats

# ------------------------------------------------------------------ answers

_PUNCT = re.compile(r"[^\w\s]")
_CITATION_MARK = re.compile(r"\[(\d{1,3})\]")


def normalise(text: str) -> str:
    """Lower case, NFKC, punctuation dropped, whitespace collapsed (SQuAD-style answer matching)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def contains(answer: str, reference: str) -> bool:
    """The normalised reference appears in the normalised answer, on word boundaries."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(answer)} "


# ------------------------------------------------------------------ guard outcomes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the gateway did with one request: blocked (by which guard), flagged guards."""

    blocked_by: str | None
    flagged: frozenset[str]

    @property
    def label(self) -> str:
        if self.blocked_by:
            return f"blocked:{self.blocked_by}"
        if self.flagged:
            return "flagged:" + ",".join(sorted(self.flagged))
        return "allowed"


def outcome_matches(expect: str, outcome: Outcome) -> bool:
    """`allowed` (not blocked; flags allowed), `blocked`, `blocked:GUARD`, `flagged`, `flagged:GUARD`,
    `clean` (neither blocked nor flagged)."""
    kind, _, guard = expect.strip().lower().partition(":")
    if kind == "allowed":
        return outcome.blocked_by is None
    if kind == "clean":
        return outcome.blocked_by is None and not outcome.flagged
    if kind == "blocked":
        return outcome.blocked_by is not None and (not guard or outcome.blocked_by == guard)
    if kind == "flagged":
        return outcome.blocked_by is None and (bool(outcome.flagged) if not guard else guard in outcome.flagged)
    raise ValueError(f"unknown expected outcome {expect!r}: use allowed, clean, blocked[:GUARD] or flagged[:GUARD]")


EXPECT_KINDS = ("allowed", "clean", "blocked", "flagged")


# ------------------------------------------------------------------ citations and retrieval


def cited_documents(answer: str, citations: Sequence[Mapping[str, Any]]) -> list[str]:
    """Documents the answer cites: those of the [n] markers in it; without markers, every citation
    the gateway attached (the passages the model was given)."""
    by_index = {int(c["index"]): str(c["document"]) for c in citations if "index" in c and "document" in c}
    marked = [by_index[n] for n in (int(m) for m in _CITATION_MARK.findall(answer or "")) if n in by_index]
    chosen = marked or [str(c["document"]) for c in citations if "document" in c]
    return list(dict.fromkeys(chosen))


def citation_precision(cited: Sequence[str], expected: Iterable[str]) -> float | None:
    """Share of cited documents that are expected; None when nothing was cited."""
    if not cited:
        return None
    wanted = set(expected)
    return sum(1 for d in cited if d in wanted) / len(cited)


def recall(found: Iterable[str], expected: Sequence[str]) -> float | None:
    """Share of expected documents among `found`; None when nothing is expected."""
    if not expected:
        return None
    seen = set(found)
    return sum(1 for d in set(expected) if d in seen) / len(set(expected))


# ------------------------------------------------------------------ summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def rate(flags: Iterable[bool | None]) -> float | None:
    kept = [bool(f) for f in flags if f is not None]
    return sum(kept) / len(kept) if kept else None


# ------------------------------------------------------------------ drift

PSI_DRIFT = 0.2  # population stability index at or above which a distribution has drifted
PSI_WATCH = 0.1  # ... and at or above which it is worth watching
KS_ALPHA = 0.01  # two-sample KS p-value below which the shift is reported as significant
MIN_SAMPLES = 20  # fewer values in either window: no verdict


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `current` against `reference`.

    Bins are the reference's deciles (collapsed where values repeat); with fewer than two
    distinct edges, equal-width bins over both samples. Empty bins get a share of 1e-4.
    PSI = sum((cur - ref) * ln(cur / ref)); < 0.1 stable, 0.1-0.2 watch, >= 0.2 drift.
    """
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs values in both samples")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 3:
        low, high = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
        edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    inner = edges[1:-1]
    ref_share = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=inner.size + 1) / ref.size
    cur_share = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=inner.size + 1) / cur.size
    ref_share = np.clip(ref_share, 1e-4, None)
    cur_share = np.clip(cur_share, 1e-4, None)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def drift(reference: Sequence[float], current: Sequence[float]) -> dict[str, Any]:
    """PSI and KS of two samples, with the verdict: drift (PSI >= 0.2), watch (>= 0.1), stable,
    or insufficient_data (fewer than 20 values in a window)."""
    out: dict[str, Any] = {
        "n_reference": len(reference),
        "n_current": len(current),
        "mean_reference": mean(reference),
        "mean_current": mean(current),
    }
    if len(reference) < MIN_SAMPLES or len(current) < MIN_SAMPLES:
        return out | {"psi": None, "ks": None, "ks_p": None, "status": "insufficient_data"}
    value = psi(reference, current)
    ks = stats.ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    status = "drift" if value >= PSI_DRIFT else "watch" if value >= PSI_WATCH else "stable"
    return out | {
        "psi": round(value, 4),
        "ks": round(float(ks.statistic), 4),
        "ks_p": float(ks.pvalue),
        "ks_significant": bool(ks.pvalue < KS_ALPHA),
        "status": status,
    }


# ------------------------------------------------------------------ run comparison

# Direction of each metric that takes part in the comparison: +1 higher is better, -1 lower is.
RATE_METRICS: dict[str, int] = {
    "pass_rate": 1,
    "exact_match": 1,
    "contains": 1,
    "semantic_similarity": 1,
    "correctness": 1,
    "groundedness_mean": 1,
    "grounded_rate": 1,
    "citation_precision": 1,
    "retrieval_recall": 1,
    "guard_accuracy": 1,
    "toxicity_rate": -1,
    "error_rate": -1,
}
LATENCY_METRICS = ("latency_p50_ms", "latency_p95_ms")
LATENCY_FLOOR_MS = 25.0  # latency changes smaller than this never count (timer noise on fast backends)


def compare(
    current: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    *,
    tolerance: float = 0.05,
    latency_margin: float = 0.5,
    directions: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Compare two runs' metrics. A rate regresses when it moves the wrong way by more than
    `tolerance` (absolute); a latency when it grows by more than `latency_margin` (relative) and
    by more than 25 ms. Returns {"regressed": bool, "regressions": [...], "deltas": {...}}."""
    if previous is None:
        return {"previous_run": None, "regressed": False, "regressions": [], "deltas": {}}
    directions = RATE_METRICS if directions is None else directions
    deltas: dict[str, Any] = {}
    regressions: list[dict[str, Any]] = []
    for name, direction in directions.items():
        now, before = current.get(name), previous.get(name)
        if not _number(now) or not _number(before):
            continue
        delta = float(now) - float(before)
        deltas[name] = round(delta, 4)
        if direction * delta < -tolerance - 1e-12:
            regressions.append(
                {
                    "metric": name,
                    "previous": before,
                    "current": now,
                    "delta": round(delta, 4),
                    "rule": f"{'fell' if direction > 0 else 'rose'} by more than {tolerance}",
                }
            )
    for name in LATENCY_METRICS:
        now, before = current.get(name), previous.get(name)
        if not _number(now) or not _number(before):
            continue
        delta = float(now) - float(before)
        deltas[name] = round(delta, 3)
        if delta > LATENCY_FLOOR_MS and float(now) > float(before) * (1.0 + latency_margin):
            regressions.append(
                {
                    "metric": name,
                    "previous": before,
                    "current": now,
                    "delta": round(delta, 3),
                    "rule": f"grew by more than {latency_margin:.0%} and {LATENCY_FLOOR_MS:g} ms",
                }
            )
    return {"regressed": bool(regressions), "regressions": regressions, "deltas": deltas}


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------ reviewer labels vs guards

# Which reviewer label says a guard should have fired. Guards without one (input guards) get
# precision only: a hit labelled false_positive or ok is a false positive, any other label confirms it.
POSITIVE_LABELS: dict[str, frozenset[str]] = {
    "toxicity": frozenset({"toxic"}),
    "groundedness": frozenset({"hallucination"}),
}
NEGATIVE_LABELS = frozenset({"false_positive", "ok"})
# Score direction: +1 a higher score means "hit" (toxicity, injection); -1 a lower one does (groundedness).
SCORE_DIRECTION: dict[str, int] = {"groundedness": -1}


@dataclass(frozen=True, slots=True)
class LabelledScore:
    """One labelled request as one guard saw it."""

    request_id: str
    label: str
    hit: bool
    score: float | None


def label_feedback(
    guard: str,
    items: Sequence[LabelledScore],
    current_threshold: float | None = None,
    *,
    positives: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Precision and recall of `guard` against reviewer labels (or any labels, with `positives`
    naming those that say the guard should have fired), and the score threshold with the best F1
    (ties: the one nearest the current threshold)."""
    positives = POSITIVE_LABELS.get(guard) if positives is None else positives
    hits = [i for i in items if i.hit]
    if positives is None:
        tp = sum(1 for i in hits if i.label not in NEGATIVE_LABELS)
        precision = tp / len(hits) if hits else None
        return {
            "guard": guard,
            "labelled": len(items),
            "hits": len(hits),
            "precision": precision,
            "recall": None,
            "f1": None,
            "true_positives": tp,
            "false_positives": len(hits) - tp,
            "best_threshold": None,
            "note": "no reviewer label names this guard's positive class: precision only",
        }
    truth = [i.label in positives for i in items]
    tp = sum(1 for i, t in zip(items, truth, strict=True) if i.hit and t)
    fp = sum(1 for i, t in zip(items, truth, strict=True) if i.hit and not t)
    fn = sum(1 for i, t in zip(items, truth, strict=True) if not i.hit and t)
    precision = tp / (tp + fp) if tp + fp else None
    recall_value = tp / (tp + fn) if tp + fn else None
    return {
        "guard": guard,
        "labelled": len(items),
        "positives": sum(truth),
        "hits": len(hits),
        "precision": precision,
        "recall": recall_value,
        "f1": _f1(tp, fp, fn),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "best_threshold": best_threshold(guard, items, truth, current_threshold),
    }


def categorical_drift(reference: Mapping[str, int], current: Mapping[str, int]) -> dict[str, Any]:
    """Drift of a distribution over a few categories (the rating mix): PSI over the categories'
    shares, each smoothed by half a count (so one vote in a category that had none moves PSI by a
    little, not by ln(1e4)), and the chi-square test of the two windows' counts. Same verdicts as
    `drift`; insufficient_data below MIN_SAMPLES in either window."""
    names = sorted(set(reference) | set(current))
    n_ref, n_cur = sum(reference.values()), sum(current.values())
    out: dict[str, Any] = {
        "n_reference": n_ref,
        "n_current": n_cur,
        "mix_reference": {k: round(reference.get(k, 0) / n_ref, 4) for k in names} if n_ref else {},
        "mix_current": {k: round(current.get(k, 0) / n_cur, 4) for k in names} if n_cur else {},
    }
    if n_ref < MIN_SAMPLES or n_cur < MIN_SAMPLES:
        return out | {"psi": None, "chi2_p": None, "status": "insufficient_data"}
    half = 0.5 * len(names)
    ref = np.array([(reference.get(k, 0) + 0.5) / (n_ref + half) for k in names])
    cur = np.array([(current.get(k, 0) + 0.5) / (n_cur + half) for k in names])
    value = float(np.sum((cur - ref) * np.log(cur / ref)))
    table = np.array([[reference.get(k, 0) for k in names], [current.get(k, 0) for k in names]])
    table = table[:, table.sum(axis=0) > 0]
    p = float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    status = "drift" if value >= PSI_DRIFT else "watch" if value >= PSI_WATCH else "stable"
    return out | {"psi": round(value, 4), "chi2_p": p, "chi2_significant": p < KS_ALPHA, "status": status}


def best_threshold(
    guard: str, items: Sequence[LabelledScore], truth: Sequence[bool], current: float | None = None
) -> dict[str, Any] | None:
    """Sweep every distinct score (and midpoints between neighbours) as a threshold: a score at or
    above it is a hit (at or below for groundedness, where low means unsupported); keep the best F1."""
    scored = [(float(i.score), t) for i, t in zip(items, truth, strict=True) if i.score is not None]
    if not scored or not any(t for _, t in scored) or all(t for _, t in scored):
        return None
    direction = SCORE_DIRECTION.get(guard, 1)
    values = sorted({s for s, _ in scored})
    candidates = set(values) | {(a + b) / 2 for a, b in itertools.pairwise(values)}
    best: tuple[float, float, float, dict[str, Any]] | None = None
    for threshold in sorted(candidates):
        tp = fp = fn = 0
        for score, positive in scored:
            predicted = score >= threshold if direction > 0 else score <= threshold
            tp += predicted and positive
            fp += predicted and not positive
            fn += (not predicted) and positive
        f1 = _f1(tp, fp, fn) or 0.0
        nearness = -abs(threshold - current) if current is not None else 0.0
        candidate = {
            "threshold": round(threshold, 4),
            "f1": round(f1, 4),
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "rule": "score >= threshold is a hit" if direction > 0 else "score <= threshold is a hit",
        }
        key = (f1, nearness, -threshold if direction > 0 else threshold)
        if best is None or key > best[:3]:
            best = (*key, candidate)
    return best[3] if best else None


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
