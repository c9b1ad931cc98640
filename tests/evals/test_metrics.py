"""The statistics behind the nightly evaluation, on numbers small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evals import metrics
from evals.metrics import LabelledScore, Outcome
from evals.traffic import parse_window


def test_answer_matching_ignores_case_and_punctuation() -> None:
    assert metrics.exact_match("Tallinn, Estonia.", "tallinn estonia")
    assert metrics.contains("It is in Tallinn, Estonia, I think.", "Tallinn, Estonia.")
    assert not metrics.contains("Tallinnx", "Tallinn")


def test_expected_guard_outcomes() -> None:
    blocked = Outcome("injection", frozenset())
    flagged = Outcome(None, frozenset({"groundedness"}))
    assert metrics.outcome_matches("blocked:injection", blocked)
    assert not metrics.outcome_matches("blocked:keywords", blocked)
    assert metrics.outcome_matches("allowed", flagged) and not metrics.outcome_matches("clean", flagged)
    assert metrics.outcome_matches("flagged:groundedness", flagged)
    with pytest.raises(ValueError):
        metrics.outcome_matches("vanished", flagged)


def test_citations_follow_the_markers_in_the_answer() -> None:
    cites = [{"index": 1, "document": "a"}, {"index": 2, "document": "b"}]
    assert metrics.cited_documents("See [2].", cites) == ["b"]
    assert metrics.cited_documents("No markers.", cites) == ["a", "b"]
    assert metrics.citation_precision(["a", "b"], ["a"]) == 0.5
    assert metrics.recall(["a", "c"], ["a", "b"]) == 0.5


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 500), rng.normal(0, 1, 500)
    assert metrics.psi(a, a) == pytest.approx(0.0)
    assert metrics.drift(a.tolist(), b.tolist())["status"] == "stable"
    shifted = metrics.drift(a.tolist(), (b + 1.5).tolist())
    assert shifted["status"] == "drift" and shifted["ks_significant"]
    assert metrics.drift([0.1] * 5, [0.2] * 5)["status"] == "insufficient_data"


def test_compare_flags_rates_beyond_tolerance_and_slow_latency() -> None:
    before = {"pass_rate": 0.9, "toxicity_rate": 0.0, "latency_p50_ms": 100.0}
    assert not metrics.compare({"pass_rate": 0.86, "toxicity_rate": 0.04, "latency_p50_ms": 140.0}, before)["regressed"]
    result = metrics.compare({"pass_rate": 0.8, "toxicity_rate": 0.1, "latency_p50_ms": 200.0}, before)
    assert {r["metric"] for r in result["regressions"]} == {"pass_rate", "toxicity_rate", "latency_p50_ms"}
    assert metrics.compare(before, None) == {"previous_run": None, "regressed": False, "regressions": [], "deltas": {}}


def test_label_feedback_precision_recall_and_best_threshold() -> None:
    # Toxicity scores; the guard hits at >= 0.5. Reviewers: the 0.45 one was toxic too (missed),
    # and the 0.6 hit was a false positive.
    items = [
        LabelledScore("r1", "toxic", True, 0.9),
        LabelledScore("r2", "toxic", True, 0.7),
        LabelledScore("r3", "false_positive", True, 0.6),
        LabelledScore("r4", "toxic", False, 0.45),
        LabelledScore("r5", "ok", False, 0.2),
        LabelledScore("r6", "ok", False, 0.1),
    ]
    result = metrics.label_feedback("toxicity", items, current_threshold=0.5)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    best = result["best_threshold"]
    # 0.45 catches all three toxic answers with one false positive (F1 6/7); 0.65 catches two (F1 0.8).
    assert best["threshold"] == pytest.approx(0.45) and best["f1"] == pytest.approx(6 / 7, abs=1e-4)

    # Groundedness: low scores are hits. Perfectly separable at 0.5.
    grounded = [
        LabelledScore(f"g{i}", "hallucination" if s < 0.5 else "ok", s < 0.4, s)
        for i, s in enumerate([0.1, 0.3, 0.45, 0.7, 0.9])
    ]
    g = metrics.label_feedback("groundedness", grounded, current_threshold=0.4)
    assert g["recall"] == pytest.approx(2 / 3) and g["precision"] == 1.0
    assert g["best_threshold"]["f1"] == 1.0 and 0.45 <= g["best_threshold"]["threshold"] < 0.7

    # Input guards: no positive label, so precision only.
    inj = metrics.label_feedback(
        "injection", [LabelledScore("i1", "false_positive", True, 0.6), LabelledScore("i2", "other", True, 0.9)]
    )
    assert inj["precision"] == 0.5 and inj["recall"] is None


def test_windows() -> None:
    assert parse_window("90m").total_seconds() == 5400
    assert parse_window("7d").days == 7
    with pytest.raises(ValueError):
        parse_window("yesterday")
