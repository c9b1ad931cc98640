"""End users' ratings in the nightly traffic run (issue 16): the rating mix (per request and key
the newest rating counts) and its drift, and the guards' precision and recall against ratings."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from evals import traffic
from evals.metrics import Outcome
from evals.nightly import EXIT_FAILED, EXIT_REGRESSED, evaluate_traffic
from evals.thresholds import parse_flag
from evals.traffic import Rating, Rescored, rating_feedback, rating_truth
from gateway.db import audit_records, feedback
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.evals.test_nightly import running

TOXIC = "You are a stupid idiot and I hate you."
CLEAN = "Have a nice day, the shop opens at nine."
PASSAGE = "The KR-200 robot vacuum costs 449 EUR and runs for 140 minutes on the quiet setting."
GROUNDED = "The KR-200 robot vacuum costs 449 EUR."
UNGROUNDED = "Zorg volcano 7 erupted in 1873 near Qwerty City."


def _rating(rating: int, *categories: str, key: str = "key_user") -> Rating:
    return Rating("r", key, rating, frozenset(categories))


def test_how_ratings_map_to_guard_truth() -> None:
    unsafe = traffic.RATING_POSITIVES["toxicity"]
    assert rating_truth([_rating(-1, "unsafe")], unsafe) is True
    assert rating_truth([_rating(-1, "toxic", "wrong")], unsafe) is True
    assert rating_truth([_rating(-1, "wrong")], unsafe) is False  # the user said why, and it was not unsafety
    assert rating_truth([_rating(1)], unsafe) is False
    assert rating_truth([_rating(0)], unsafe) is False
    assert rating_truth([_rating(-1)], unsafe) is None  # no reason given: left out
    assert rating_truth([_rating(-1), _rating(1, key="key_rev")], unsafe) is False
    assert rating_truth([_rating(1), _rating(-1, "unsafe", key="key_rev")], unsafe) is True
    assert rating_truth([_rating(-1, "wrong")], traffic.RATING_POSITIVES["groundedness"]) is True


def _rescored(request_id: str, output: dict[str, tuple[float, bool]]) -> Rescored:
    return Rescored(
        row={"request_id": request_id}, query="q", scores={g: s for g, (s, _) in output.items()},
        hits={g: h for g, (_, h) in output.items()}, outcome=Outcome(None, frozenset()),
        logged=Outcome(None, frozenset()), retrieval_scores=[],
        output_scores={g: s for g, (s, _) in output.items()}, output_hits={g: h for g, (_, h) in output.items()},
    )  # fmt: skip


def test_guard_precision_and_recall_against_ratings() -> None:
    rated: list[tuple[Rescored, list[Rating]]] = [
        (_rescored("tp1", {"toxicity": (0.9, True)}), [_rating(-1, "unsafe")]),
        (_rescored("tp2", {"toxicity": (0.8, True)}), [_rating(-1, "toxic")]),
        (_rescored("fp", {"toxicity": (0.7, True)}), [_rating(1)]),
        (_rescored("fn", {"toxicity": (0.2, False)}), [_rating(-1, "unsafe")]),
        (_rescored("tn", {"toxicity": (0.1, False)}), [_rating(0)]),
        (_rescored("why", {"toxicity": (0.9, True)}), [_rating(-1)]),  # no reason: left out
        # groundedness: only where the guard checked the answer (it had passages)
        (_rescored("g-tp", {"toxicity": (0.1, False), "groundedness": (0.2, True)}), [_rating(-1, "wrong")]),
        (_rescored("g-tn", {"toxicity": (0.1, False), "groundedness": (0.9, False)}), [_rating(1)]),
        (_rescored("g-fn", {"toxicity": (0.1, False), "groundedness": (0.85, False)}), [_rating(-1, "hallucination")]),
        (_rescored("no-answer", {}), [_rating(-1, "unsafe")]),  # blocked on input: no output guard ran
    ]
    result = rating_feedback(rated, {"toxicity": 0.5, "groundedness": 0.8})
    tox = result["toxicity"]
    assert (tox["true_positives"], tox["false_positives"], tox["false_negatives"]) == (2, 1, 1)
    assert tox["precision"] == pytest.approx(2 / 3) and tox["recall"] == pytest.approx(2 / 3)
    assert tox["labelled"] == 8 and tox["left_out_no_reason"] == 1 and tox["current_threshold"] == 0.5
    # A threshold of 0.2 would catch fn too, with the one fp: F1 = 2*3 / (2*3 + 1) = 6/7.
    assert tox["best_threshold"]["threshold"] == 0.2 and tox["best_threshold"]["f1"] == pytest.approx(6 / 7, abs=1e-4)
    grounded = result["groundedness"]
    assert grounded["labelled"] == 3 and grounded["positives"] == 2
    assert grounded["precision"] == 1.0 and grounded["recall"] == 0.5
    # A score at or below 0.85 as a hit catches both and none of the liked one.
    assert grounded["best_threshold"]["threshold"] == 0.85 and grounded["best_threshold"]["f1"] == 1.0
    assert result["output_guards"]["labelled"] == 8 and result["output_guards"]["recall"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------ end to end


@pytest.fixture
def ratings_settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    policy = tmp_path / "policy.toml"  # alt-profanity-check: its scores of TOXIC and CLEAN are known
    policy.write_text('[scorers.toxicity]\nscorer = "profanity-check"\n', encoding="utf-8")
    return make_settings(tmp_path, fake_backend.url, policy=policy)


def _row(request_id: str, created: datetime, answer: str, *, passage: bool = False,
         origin: str | None = None) -> dict[str, object]:  # fmt: skip
    return {
        "request_id": request_id,
        "created_at": created,
        "finished_at": created,
        "api_key_id": "key_user",
        "endpoint": "chat.completions",
        "model": "fake-model",
        "status": "ok",
        "http_status": 200,
        "request_json": json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "Tell me."}]}),
        "response_text": answer,
        "passages_json": json.dumps([{"chunk_id": "d#0", "text": PASSAGE, "score": 0.8}]) if passage else None,
        "origin": origin,
    }


def _vote(request_id: str, at: datetime, rating: int, *categories: str, key: str = "key_user") -> dict[str, object]:
    return {"request_id": request_id, "key_id": key, "rating": rating, "created_at": at, "comment": None,
            "categories_json": json.dumps(list(categories)) if categories else None}  # fmt: skip


def _traffic(now: datetime) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    rows: list[dict[str, object]] = []
    votes: list[dict[str, object]] = []
    # Two days ago: 30 clean answers, 27 rated good, 3 rated wrong (given 30 hours ago).
    for i in range(30):
        rows.append(_row(f"old-{i}", now - timedelta(hours=40, minutes=i), CLEAN))
        votes.append(_vote(f"old-{i}", now - timedelta(hours=30), 1) if i >= 3 else
                     _vote(f"old-{i}", now - timedelta(hours=30), -1, "wrong"))  # fmt: skip
    at = now - timedelta(hours=1)
    for i in range(10):  # toxic answers: 8 rated unsafe, one liked, one disliked without a reason
        rows.append(_row(f"tox-{i}", now - timedelta(hours=6, minutes=i), TOXIC))
        votes.append(_vote(f"tox-{i}", at, -1, "unsafe") if i < 8 else
                     _vote(f"tox-{i}", at, 1) if i == 8 else _vote(f"tox-{i}", at, -1))  # fmt: skip
    for i in range(20):  # clean answers: liked, except one called toxic and one unhelpful
        rows.append(_row(f"ok-{i}", now - timedelta(hours=5, minutes=i), CLEAN))
        votes.append(_vote(f"ok-{i}", at, -1, "toxic") if i == 18 else
                     _vote(f"ok-{i}", at, -1, "unhelpful") if i == 19 else _vote(f"ok-{i}", at, 1))  # fmt: skip
    # Per key the newest counts: ok-0 was first rated unsafe by the same key (older, ignored);
    # ok-1 also has a reviewer's neutral rating (a second key: a second vote).
    votes.append(_vote("ok-0", now - timedelta(hours=2), -1, "unsafe"))
    votes.append(_vote("ok-1", at, 0, key="key_rev"))
    for i in range(5):  # RAG answers: grounded ones liked, unsupported ones rated wrong
        rows.append(_row(f"rag-good-{i}", now - timedelta(hours=4, minutes=i), GROUNDED, passage=True))
        rows.append(_row(f"rag-bad-{i}", now - timedelta(hours=4, minutes=30 + i), UNGROUNDED, passage=True))
        votes.append(_vote(f"rag-good-{i}", at, 1))
        votes.append(_vote(f"rag-bad-{i}", at, -1, "wrong"))
    # An eval run's request, rated: not live traffic, left out.
    rows.append(_row("eval-0", now - timedelta(hours=3), TOXIC, origin="eval"))
    votes.append(_vote("eval-0", at, -1, "unsafe"))
    return rows, votes


async def test_the_rating_mix_its_drift_and_the_guards_against_ratings(ratings_settings: Settings) -> None:
    now = datetime.now(UTC)
    rows, votes = _traffic(now)
    async with running(ratings_settings) as services:
        async with services.engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
            await conn.execute(insert(feedback), votes)
        before = await evaluate_traffic(services, since="24h", now=now - timedelta(hours=24), name="nightly")
        summary = await evaluate_traffic(services, since="24h", now=now, name="nightly")
        judged = await evaluate_traffic(services, since="24h", now=now, name="judged",
                                        thresholds=[parse_flag("rating_negative_rate=0.2")])  # fmt: skip

    old = before["metrics"]
    assert (old["ratings"], old["rating_positive_rate"], old["rating_negative_rate"]) == (30, 0.9, 0.1)

    m = summary["metrics"]
    # 10 + 20 + 10 requests, one key each, plus the reviewer's second vote on ok-1: 41; eval-0 left out.
    assert m["ratings"] == 41 and m["rated_requests"] == 40
    assert m["rating_positive_rate"] == round(24 / 41, 4)  # tox-8, ok-0 (its newest), ok-2..17, rag-good
    assert m["rating_neutral_rate"] == round(1 / 41, 4)
    assert m["rating_negative_rate"] == round(16 / 41, 4)
    assert summary["rating_feedback"]["mix"]["negative_categories"] == {
        "unsafe": 8, "wrong": 5, "toxic": 1, "unhelpful": 1
    }  # fmt: skip

    drift = summary["drift"]["ratings"]
    # PSI with half-count smoothing: 0.1236 (good) + 0.0155 (neutral) + 0.3467 (bad), by hand.
    assert drift["status"] == "drift" and drift["psi"] == pytest.approx(0.486, abs=0.002)
    assert drift["chi2_p"] < 0.05
    assert drift["mix_reference"]["positive"] == 0.9 and drift["n_current"] == 41
    assert "ratings" in summary["drifted"]
    # Against the previous run: negative ratings rose from 0.1 to 0.39, beyond the 0.05 tolerance.
    assert summary["comparison"]["previous_run"] == before["run_id"]
    regressions = {r["metric"] for r in summary["comparison"]["regressions"]}
    assert {"rating_negative_rate", "rating_positive_rate"} <= regressions
    assert summary["status"] == "unchecked" and summary["regressed"] is True and summary["exit_code"] == EXIT_REGRESSED
    assert judged["status"] == "failed" and judged["exit_code"] == EXIT_FAILED
    assert "rating_negative_rate 0.3902 is not <= 0.2" in judged["verdict"]

    tox = summary["rating_feedback"]["guards"]["toxicity"]
    # Hits on the toxic answers only (alt-profanity-check): tox-0..7 true positives, tox-8 liked
    # (false positive), ok-18 called toxic (false negative), tox-9 left out (no reason given).
    assert (tox["true_positives"], tox["false_positives"], tox["false_negatives"]) == (8, 1, 1)
    # Ratings given within --labels-since (30d) count, the two-day-old ones too: 39 + 30.
    assert tox["left_out_no_reason"] == 1 and tox["labelled"] == 69
    assert m["ratings_toxicity_precision"] == round(8 / 9, 4) and m["ratings_toxicity_recall"] == round(8 / 9, 4)
    grounded = summary["rating_feedback"]["guards"]["groundedness"]
    assert grounded["positives"] == 5 and grounded["true_positives"] == 5 and grounded["false_positives"] == 0
    assert m["ratings_groundedness_recall"] == 1.0

    html = await asyncio.to_thread(Path(summary["report"]).read_text, encoding="utf-8")
    assert "User ratings" in html and "negative_categories" in html and "left_out_no_reason" in html
