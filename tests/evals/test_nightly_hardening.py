"""The nightly eval finishes whatever clients sent: odd logged rows are re-scored or left out,
never fatal; eval items get a bounded `max_tokens`; one broken item is that item's error."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from evals import dataset as ds
from evals import store
from evals.dataset import EvalItem, RunOptions
from evals.nightly import EXIT_ERROR, evaluate_dataset, evaluate_traffic
from evals.thresholds import Threshold
from gateway.cli import main as gateway_main
from gateway.db import audit_records, review_labels
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.evals.test_nightly import running

# Request bodies as a client may send them (the gateway logs rejected requests as they came).
ODD_REQUESTS = [
    '{"model": "fake-model", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud800 broken"}]}',
    '{"model": "fake-model", "messages": [{"role": "user", "content": "\\udfff\\ud800"}]}',
    '{"model": "fake-model", "messages": {"a": 1}}',
    '{"model": "fake-model", "messages": 5}',
    '{"model": "fake-model", "messages": [1, 2]}',
    '{"model": "fake-model", "messages": [{"role": 5, "content": {"x": 1}}, {"role": "user"}]}',
    '{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": 7}, "x"]}]}',
    '{"model": "fake-model", "prompt": ["a \\ud800", 1, null]}',
    '{"model": "fake-model", "messages": ' + "[" * 5000 + "]" * 5000 + "}",
    "[" * 100_000,
    "not json at all",
    "5",
    "",
]
ODD_PASSAGES = [
    None,
    "not json",
    '[{"text": 5, "title": [1], "source": {"a": 1}, "score": "high"}, 7, null]',
    '[{"text": "t \\ud800", "score": NaN}, {"text": "u", "score": Infinity}]',
    '{"a": 1}',
]


def _odd_rows(now: datetime) -> list[dict[str, object]]:
    rows = []
    for i, body in enumerate(ODD_REQUESTS):
        rows.append(
            {
                "request_id": f"odd-{i}",
                "created_at": now - timedelta(hours=1, minutes=i),
                "finished_at": now - timedelta(hours=1, minutes=i),
                "endpoint": "chat.completions",
                "model": "fake-model",
                "status": "rejected" if i % 2 else "ok",
                "http_status": 400 if i % 2 else 200,
                "request_json": body,
                "response_text": "An answer, café." if i % 3 == 0 else None,
                "passages_json": ODD_PASSAGES[i % len(ODD_PASSAGES)],
                "flagged_by": "groundedness" if i % 4 == 0 else None,
            }
        )
    return rows


@pytest.fixture
def eval_settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return make_settings(tmp_path, fake_backend.url)


async def test_traffic_eval_finishes_over_lone_surrogates_and_odd_rows(eval_settings: Settings) -> None:
    now = datetime.now(UTC)
    rows = _odd_rows(now)
    async with running(eval_settings) as services:
        async with services.engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
            labels = [
                {"request_id": r["request_id"], "label": "ok", "reviewer": "key_rev", "created_at": now} for r in rows
            ]
            await conn.execute(insert(review_labels), labels)
        summary = await evaluate_traffic(services, since="24h", now=now)
        assert summary["status"] == "unchecked", summary.get("error")
        assert summary["metrics"]["requests"] == len(rows)
        assert summary["metrics"]["rescore_errors"] == 0
        run = await store.get_run(services.engine, summary["run_id"], with_items=True)
    assert run is not None and len(run["items"]) == len(rows)
    queries = {i["request_id"]: i["input"]["query"] for i in run["items"]}
    assert queries["odd-0"] == "café \ufffd broken"  # the lone surrogate became U+FFFD, the rest is intact
    assert queries["odd-7"] == "a \ufffd"
    report = await asyncio.to_thread(Path(summary["report"]).read_text, encoding="utf-8")
    assert "café" in report
    json.loads(await asyncio.to_thread(Path(summary["summary"]).read_text, encoding="utf-8"))


async def test_a_row_the_guards_cannot_rescore_is_left_out_and_counted(
    eval_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evals import traffic

    now = datetime.now(UTC)
    rows = _odd_rows(now)[:3]
    real = traffic.rescore

    async def breaks_on_one(rails: object, row: dict[str, object]) -> traffic.Rescored:
        if row["request_id"] == "odd-1":
            raise RuntimeError("a guard fell over")
        return await real(rails, row)  # type: ignore[arg-type]

    monkeypatch.setattr(traffic, "rescore", breaks_on_one)
    async with running(eval_settings) as services:
        async with services.engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
        summary = await evaluate_traffic(services, since="24h", now=now)
    assert summary["status"] == "unchecked", summary.get("error")
    assert summary["metrics"]["requests"] == 2 and summary["metrics"]["rescore_errors"] == 1


async def test_items_without_max_tokens_get_the_default_and_an_items_own_value_wins(
    eval_settings: Settings, fake_backend: FakeBackendThread
) -> None:
    items = [
        EvalItem(position=0, question="Say something long."),
        EvalItem(position=1, question="Say something short.", extra={"max_tokens": 3}),
        EvalItem(position=2, question="Newer spelling.", extra={"max_completion_tokens": 4}),
    ]
    async with running(eval_settings) as services:
        summary = await evaluate_dataset(
            services, items, name="bounded", options=RunOptions(progress=False, max_tokens=7)
        )
    assert summary["metrics"]["errors"] == 0
    received = await asyncio.to_thread(httpx.get, fake_backend.url + "/fake/requests")
    seen = {b["messages"][-1]["content"]: b for b in received.json()}
    assert seen["Say something long."]["max_tokens"] == 7
    assert seen["Say something short."]["max_tokens"] == 3
    assert seen["Newer spelling."]["max_completion_tokens"] == 4 and "max_tokens" not in seen["Newer spelling."]


def test_the_default_max_tokens_comes_from_settings() -> None:
    assert Settings().eval_max_tokens == 256
    assert RunOptions().max_tokens == 256
    item = EvalItem(position=0, question="q")
    assert ds._body(item, RunOptions(max_tokens=None), "m").get("max_tokens") is None


def test_cli_max_tokens_flag_and_setting(
    tmp_path: Path,
    fake_backend: FakeBackendThread,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_EMBEDDING_MODEL", "hashing")
    monkeypatch.setenv("GATEWAY_SAMPLE_CORPUS", "false")
    monkeypatch.setenv("GATEWAY_EVAL_MAX_TOKENS", "9")
    dataset = tmp_path / "set.jsonl"
    dataset.write_text(json.dumps({"question": "Hello?"}) + "\n", encoding="utf-8")
    argv = ["eval", "run", "--dataset", str(dataset), "--data-dir", str(tmp_path / "data"), "--backend",
            fake_backend.url, "--latency-margin", "1e9", "--json"]  # fmt: skip
    assert gateway_main(argv) == 0
    captured = capsys.readouterr()
    # Progress is on by default: what the run is doing, then the bar.
    assert "1 items against" in captured.err and "max_tokens 9" in captured.err
    assert httpx.get(fake_backend.url + "/fake/requests").json()[-1]["max_tokens"] == 9
    assert gateway_main([*argv, "--max-tokens", "5", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert httpx.get(fake_backend.url + "/fake/requests").json()[-1]["max_tokens"] == 5
    assert gateway_main([*argv, "--max-tokens", "0"]) == EXIT_ERROR
    assert "--max-tokens" in capsys.readouterr().err


async def test_one_broken_item_is_its_own_error_not_the_runs(
    eval_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ds._run_one

    async def breaks_on_one(services: object, item: EvalItem, options: RunOptions, model: str | None) -> object:
        if item.position == 1:
            raise KeyError("choices")
        return await real(services, item, options, model)  # type: ignore[arg-type]

    monkeypatch.setattr(ds, "_run_one", breaks_on_one)
    items = [EvalItem(position=i, question=f"q{i}") for i in range(3)]
    async with running(eval_settings) as services:
        summary = await evaluate_dataset(
            services, items, name="one-breaks", options=RunOptions(progress=False),
            thresholds=[Threshold("pass_rate", ">=", 0.6, "flag")],
        )  # fmt: skip
    assert summary["status"] == "passed"  # 2 of 3 passed
    assert summary["metrics"]["errors"] == 1 and summary["failed_items"] == [1]
