"""Eval traffic stays out of live traffic: an eval run's requests go through the real pipeline,
marked origin='eval', and usage, the overview, traffic re-scoring and drift, and the Prometheus
request metrics leave them out by default."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from evals import traffic
from evals.dataset import EvalItem, RunOptions
from evals.nightly import evaluate_dataset, evaluate_traffic
from evals.thresholds import Threshold
from gateway.auth import KeyInfo
from gateway.db import audit_records
from gateway.overview import overview
from gateway.pipeline import CHAT
from gateway.services import Services
from gateway.settings import Settings
from gateway.usage import usage
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.evals.test_nightly import running

LIVE_KEY = KeyInfo(id="key_live", name="app", role="client")


@pytest.fixture
def eval_settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return make_settings(tmp_path, fake_backend.url)


def _metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def _live_request(services: Services, text: str) -> None:
    body = msgspec.json.encode({"model": "fake-model", "messages": [{"role": "user", "content": text}]})

    async def read_body() -> bytes:
        return body

    await services.pipeline.handle(CHAT, read_body, None, "127.0.0.1", key=LIVE_KEY)


async def test_eval_rows_are_left_out_of_usage_overview_traffic_and_metrics(eval_settings: Settings) -> None:
    settings = eval_settings
    assert settings.metrics != "off"
    started = datetime.now(UTC) - timedelta(minutes=1)
    async with running(settings) as services:
        for i in range(3):
            await _live_request(services, f"A live question {i}")
        items = [EvalItem(position=i, question=f"An eval question {i}") for i in range(5)]
        summary = await evaluate_dataset(
            services, items, name="iso", options=RunOptions(progress=False),
            thresholds=[Threshold("pass_rate", ">=", 0.0, "flag")],
        )  # fmt: skip
        assert summary["metrics"]["items"] == 5 and summary["metrics"]["errors"] == 0
        engine = services.engine
        async with engine.connect() as conn:
            origins = [r.origin for r in await conn.execute(select(audit_records.c.origin))]
        assert (origins.count("eval"), origins.count(None), len(origins)) == (5, 3, 8)

        by_key = {r.group: r.requests for r in await usage(engine, started)}
        assert by_key == {"key_live": 3}
        assert {r.group: r.requests for r in await usage(engine, started, origin="eval")} == {"eval": 5}
        assert {r.group: r.requests for r in await usage(engine, started, origin="all")} == {"eval": 5, "key_live": 3}

        assert (await overview(engine, started)).totals["requests"] == 3
        assert (await overview(engine, started, origin="eval")).totals["requests"] == 5
        assert (await overview(engine, started, origin="all")).totals["requests"] == 8

        now = datetime.now(UTC) + timedelta(seconds=1)
        assert len(await traffic.load_rows(engine, started, now, 100)) == 3
        assert len(await traffic.load_rows(engine, started, now, 100, include_eval=True)) == 8
        rescored = await evaluate_traffic(services, since="1h", now=now)
        assert rescored["metrics"]["requests"] == 3

        assert services.metrics is not None
        scraped = services.metrics.render().decode()
    requests = _metric(scraped, "gateway_requests_total")
    assert sum(requests.values()) == 3  # the live ones only
    assert sum(_metric(scraped, "gateway_eval_requests_total").values()) == 5  # counted apart, by outcome
    totals = [v for k, v in _metric(scraped, "gateway_request_stage_duration_seconds_count").items()
              if ("stage", "total") in k]  # fmt: skip
    assert totals == [3.0]


def _row(i: int, created: datetime, score: float, origin: str | None) -> dict[str, object]:
    passage = "The KR-200 robot vacuum costs 449 EUR and runs for 140 minutes on the quiet setting."
    return {
        "request_id": f"r-{origin}-{created:%d%H%M%S}-{i}",
        "created_at": created,
        "finished_at": created,
        "endpoint": "chat.completions",
        "model": "fake-model",
        "status": "ok",
        "http_status": 200,
        "request_json": json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": f"Price {i}?"}]}),
        "response_text": "The KR-200 robot vacuum costs 449 EUR.",
        "passages_json": json.dumps([{"chunk_id": "d#0", "text": passage, "score": score}]),
        "origin": origin,
    }


async def test_eval_rows_do_not_make_drift(eval_settings: Settings) -> None:
    """Live traffic is steady across the two windows; an eval run in the current window with very
    different retrieval scores would read as drift if it were counted."""
    settings = eval_settings
    now = datetime.now(UTC)
    rows = [_row(i, now - timedelta(hours=30, minutes=-i), 0.80 + (i % 10) / 100, None) for i in range(30)]
    rows += [_row(i, now - timedelta(hours=6, minutes=-i), 0.80 + (i % 10) / 100, None) for i in range(30)]
    rows += [_row(i, now - timedelta(hours=5, minutes=-i), 0.20 + (i % 10) / 100, "eval") for i in range(60)]
    async with running(settings) as services:
        async with services.engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
        live = await evaluate_traffic(services, since="24h", now=now)
        mixed = await evaluate_traffic(services, since="24h", now=now, include_eval=True, name="mixed")
    assert live["metrics"]["requests"] == 30 and live["drift"]["retrieval_top_score"]["status"] == "stable"
    assert "retrieval_top_score" not in live["drifted"] and live["exit_code"] == 0
    assert mixed["metrics"]["requests"] == 90 and mixed["drift"]["retrieval_top_score"]["status"] == "drift"
