"""The nightly evaluation end to end: eval sets through the real pipeline (fake backend, hashing
embedder), stored runs, regressions, reports, traffic drift and reviewer-label feedback."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from evals import store
from evals.dataset import RunOptions, load_dataset
from evals.nightly import (
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_PASSED,
    evaluate_dataset,
    evaluate_traffic,
)
from gateway.cli import main as gateway_main
from gateway.db import audit_records, review_labels
from gateway.services import Services
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings

SAMPLE = Path(__file__).resolve().parents[2] / "evals" / "datasets" / "sample.jsonl"


def _write(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def eval_settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return make_settings(tmp_path, fake_backend.url, sample_corpus=True)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Services]:
    """Services started on the test's own event loop."""
    svc = Services(settings)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def test_sample_set_runs_through_the_pipeline_and_is_stored(eval_settings: Settings) -> None:
    async with running(eval_settings) as services:
        await _test_sample_set_runs_through_the_pipeline_and_is_stored(services)


async def _test_sample_set_runs_through_the_pipeline_and_is_stored(services: Services) -> None:
    items = load_dataset(SAMPLE)
    assert len(items) >= 25
    summary = await evaluate_dataset(services, items, name="sample", options=RunOptions(progress=False))

    # The fake backend's answers are not the references: a first run with a low pass rate is no pass
    # (the sample set names no thresholds, so the default pass_rate >= 0.8 applies).
    assert summary["status"] == "failed" and summary["exit_code"] == EXIT_FAILED
    assert summary["regressed"] is False and summary["comparison"]["previous_run"] is None
    assert summary["thresholds"] == [
        {"metric": "pass_rate", "op": ">=", "value": 0.8, "actual": summary["metrics"]["pass_rate"], "ok": False,
         "source": "default"}
    ]  # fmt: skip
    assert "pass_rate" in summary["verdict"] and "default threshold" in summary["verdict"]
    m = summary["metrics"]
    assert m["items"] == len(items) and m["errors"] == 0
    # Both injection attempts were blocked by the injection guard, as the set expects.
    assert m["guard_accuracy"] == 1.0
    assert 0.0 < m["blocked_rate"] < 0.2
    assert m["retrieval_recall"] is not None and 0.0 <= m["retrieval_recall"] <= 1.0
    assert m["latency_p50_ms"] > 0 and m["latency_p95_ms"] >= m["latency_p50_ms"]
    # The fake's words never contain the reference: correctness is low, similarity is measured.
    assert m["exact_match"] == 0.0 and m["semantic_similarity"] is not None

    run = await store.get_run(services.engine, summary["run_id"], with_items=True)
    assert run is not None and run["status"] == "failed" and run["kind"] == "dataset"
    assert run["regressed"] is False and run["thresholds"] == summary["thresholds"]
    assert len(run["items"]) == len(items)
    blocked = [i for i in run["items"] if i["input"].get("expect") == "blocked:injection"]
    assert blocked and all(i["scores"]["outcome"] == "blocked:injection" and i["passed"] for i in blocked)
    listed = await store.list_runs(services.engine, 10)
    assert listed[0]["id"] == summary["run_id"] and listed[0]["items"] == len(items)
    assert listed[0]["report_path"] == summary["report"]

    async with services.engine.connect() as conn:
        result = await conn.execute(select(audit_records).where(audit_records.c.api_key_id == "eval"))
        rows = [dict(r._mapping) for r in result]
    assert len(rows) == len(items)
    assert {r["origin"] for r in rows} == {"eval"}  # kept apart from live traffic
    assert {r["request_id"] for r in rows} == {i["request_id"] for i in run["items"]}
    assert sum(r["status"] == "blocked" for r in rows) == len(blocked)


def test_cli_regression_exits_non_zero_and_writes_a_self_contained_report(
    tmp_path: Path, fake_backend: FakeBackendThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_EMBEDDING_MODEL", "hashing")
    monkeypatch.setenv("GATEWAY_SAMPLE_CORPUS", "false")
    monkeypatch.delenv("GATEWAY_BACKEND", raising=False)
    questions = [("What colour is the sky?", "The sky is blue."), ("How many legs has a cat?", "A cat has four legs.")]
    lines: list[dict[str, object]] = [{"question": q, "reference": r, "fake": {"answer": r}} for q, r in questions]
    good = _write(tmp_path / "set.jsonl", lines)
    argv = [
        "eval",
        "run",
        "--dataset",
        str(good),
        "--data-dir",
        str(tmp_path / "data"),
        "--backend",
        fake_backend.url,
        "--no-progress",
        "--json",
    ]

    assert gateway_main(argv) == EXIT_PASSED
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["metrics"]["exact_match"] == 1.0 and first["metrics"]["pass_rate"] == 1.0
    assert first["status"] == "passed" and first["regressed"] is False

    # Same name, wrong answers now: below the default threshold (failed, exit 1), and correctness
    # falls far beyond the tolerance (regressed, reported beside the status).
    _write(
        good,
        [{"question": q, "reference": r, "fake": {"answer": "Purple elephants dance at noon."}} for q, r in questions],
    )
    assert gateway_main(argv) == EXIT_FAILED
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["status"] == "failed" and second["regressed"] is True
    assert second["comparison"]["previous_run"] == first["run_id"]
    regressed = {r["metric"] for r in second["comparison"]["regressions"]}
    assert {"exact_match", "pass_rate"} <= regressed

    report = Path(second["report"])
    assert report.parent == tmp_path / "data" / "reports" and report.is_file()
    html = report.read_text(encoding="utf-8")
    assert "<svg" in html and "regressed" in html and "Purple elephants" in html
    assert 'Regressed: <span class="bad">yes</span>' in html and "NOT MET" in html
    assert not re.search(r"<script|<link|<img|src=|url\(|@import", html, re.IGNORECASE)
    assert json.loads(Path(second["summary"]).read_text())["run_id"] == second["run_id"]

    # Without a backend the command says so instead of failing later: it could not run (2).
    assert gateway_main(["eval", "run", "--dataset", str(good), "--data-dir", str(tmp_path / "data")]) == EXIT_ERROR
    assert "no backend" in capsys.readouterr().err


def _row(i: int, created: datetime, prompt: str, answer: str, passages: list[tuple[str, float]]) -> dict[str, object]:
    return {
        "request_id": f"req-{created:%d%H%M%S}-{i}",
        "created_at": created,
        "finished_at": created,
        "api_key_id": "key_test",
        "endpoint": "chat.completions",
        "model": "fake-model",
        "status": "ok",
        "http_status": 200,
        "request_json": json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}),
        "response_text": answer,
        "passages_json": json.dumps(
            [
                {
                    "collection": "docs",
                    "document": f"doc-{k}",
                    "chunk_id": f"doc-{k}#0",
                    "title": "t",
                    "source": "s",
                    "score": score,
                    "rank": k + 1,
                    "text": text,
                }
                for k, (text, score) in enumerate(passages)
            ]
        ),
    }


async def test_traffic_rescoring_flags_drift_and_scores_guards_against_labels(eval_settings: Settings) -> None:
    async with running(eval_settings) as services:
        await _test_traffic_rescoring_flags_drift_and_scores_guards_against_labels(services)


async def _test_traffic_rescoring_flags_drift_and_scores_guards_against_labels(services: Services) -> None:
    now = datetime.now(UTC)
    passage = "The KR-200 robot vacuum costs 449 EUR and runs for 140 minutes on the quiet setting."
    rows = []
    for i in range(40):  # previous window: on-topic questions, grounded answers, strong retrieval
        created = now - timedelta(hours=30) + timedelta(minutes=i)
        rows.append(
            _row(
                i,
                created,
                f"How much does the KR-200 vacuum cost, question {i}?",
                "The KR-200 robot vacuum costs 449 EUR.",
                [(passage, 0.80 + (i % 10) / 100)],
            )
        )
    for i in range(40):  # current window: other topics, unsupported answers, weak retrieval
        created = now - timedelta(hours=6) + timedelta(minutes=i)
        rows.append(
            _row(
                i,
                created,
                f"Tell me about volcano eruptions on planet Zorg number {i}",
                f"Zorg volcano {i} erupted in 1873 killing 4000 dragons near Qwerty City.",
                [(passage, 0.31 + (i % 10) / 100)],
            )
        )
    async with services.engine.begin() as conn:
        await conn.execute(insert(audit_records), rows)
        # Reviewers: the unsupported answers are hallucinations, half the grounded ones are ok.
        labels = [
            {
                "request_id": r["request_id"],
                "label": "hallucination" if "Zorg" in str(r["response_text"]) else "ok",
                "reviewer": "key_rev",
                "created_at": now - timedelta(hours=1),
            }
            for r in rows[20:60]
        ]
        await conn.execute(insert(review_labels), labels)

    summary = await evaluate_traffic(services, since="24h", now=now)

    assert summary["metrics"]["requests"] == 40 and summary["metrics"]["requests_previous"] == 40
    drift = summary["drift"]
    assert drift["retrieval_top_score"]["status"] == "drift" and drift["retrieval_top_score"]["psi"] >= 0.2
    assert drift["retrieval_top_score"]["ks_p"] < 0.01
    assert drift["guard_scores"]["groundedness"]["status"] == "drift"
    assert drift["query_embeddings"]["status"] in {"drift", "watch"}
    assert drift["query_embeddings"]["centroid_cosine_distance"] > 0
    assert "retrieval_top_score" in summary["metrics"]["drifted"]
    assert summary["drifted"] == summary["metrics"]["drifted"]
    # No --threshold: nothing was checked, and the summary says so; drift is its own field and exit code.
    assert summary["status"] == "unchecked" and summary["thresholds"] == [] and "no thresholds" in summary["verdict"]
    assert summary["regressed"] is False and summary["exit_code"] == EXIT_DRIFT

    grounded = summary["labels"]["groundedness"]
    assert grounded["labelled"] == 40 and grounded["positives"] == 20
    assert grounded["precision"] == 1.0 and grounded["recall"] == 1.0
    assert grounded["best_threshold"]["f1"] == 1.0

    run = await store.get_run(services.engine, summary["run_id"], with_items=True)
    assert run is not None and run["kind"] == "traffic" and len(run["items"]) == 40
    assert run["report_path"] == summary["report"]
    # Nothing changed in the logs: a second run finds the same drift but no regression against the first.
    again = await evaluate_traffic(services, since="24h", now=now)
    assert again["comparison"]["previous_run"] == summary["run_id"] and not again["comparison"]["regressed"]
