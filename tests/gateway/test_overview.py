"""The reviewer overview: figures aggregated in SQL per time bucket, and the page's SVG charts."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy import func, select

from gateway.db import audit_records, audit_rollups, create_engine
from gateway.overview import LATENCY_BINS_MS, bucket_size, histogram_quantile, overview
from gateway.settings import Settings
from tests.helpers import GatewayServer, create_key

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _row(at: datetime, status: str = "ok", total_ms: float = 10.0, **more: Any) -> dict[str, Any]:
    return {
        "request_id": uuid.uuid4().hex,
        "created_at": at,
        "finished_at": at + timedelta(milliseconds=total_ms),
        "endpoint": "chat.completions",
        "stream": False,
        "status": status,
        "http_status": {"ok": 200, "blocked": 400, "rate_limited": 429, "backend_error": 502}.get(status, 200),
        "total_ms": total_ms,
        "blocked_by": None,
        "flagged_by": None,  # every row names every column: an executemany takes the first row's keys
        **more,
    }


def _insert(settings: Settings, rows: list[dict[str, Any]]) -> None:
    async def go() -> None:
        engine = create_engine(settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(audit_records.insert(), rows)
        finally:
            await engine.dispose()

    asyncio.run(go())


def _overview(settings: Settings, since: datetime, until: datetime) -> Any:
    async def go() -> Any:
        engine = create_engine(settings.database_url)
        try:
            return await overview(engine, since, until)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_histogram_quantile_and_bucket_sizes() -> None:
    bins = [0] * (len(LATENCY_BINS_MS) + 1)
    bins[LATENCY_BINS_MS.index(10)] = 100  # all between 5 and 10 ms
    assert histogram_quantile(0.5, bins) == pytest.approx(7.5)
    assert histogram_quantile(0.99, bins) == pytest.approx(9.95)
    assert histogram_quantile(0.5, [0] * len(bins)) is None
    assert bucket_size(3600) == 60 and bucket_size(86400) == 900 and bucket_size(7 * 86400) == 7200


def test_figures_per_bucket_and_guard(settings: Settings) -> None:
    rows = []
    for minute in range(60):  # one hour: 4 requests a minute
        at = NOW - timedelta(minutes=60 - minute)
        rows += [_row(at, total_ms=3.0), _row(at + timedelta(seconds=13.5), total_ms=30.0)]  # seconds apart
        rows.append(
            _row(at + timedelta(seconds=31), "blocked", 2.0, blocked_by="injection")
            if minute % 2
            else _row(at + timedelta(seconds=47), "rate_limited", 1.0)
        )
        rows.append(
            _row(at + timedelta(seconds=59.9), flagged_by="toxicity,groundedness")
            if minute < 30
            else _row(at + timedelta(seconds=5), "backend_error", 400.0)
        )
    rows.append(_row(NOW - timedelta(hours=3)))  # outside the window
    _insert(settings, rows)
    data = _overview(settings, NOW - timedelta(hours=1), NOW)
    assert data.bucket_s == 60 and len(data.buckets) == 61
    totals = data.totals
    assert totals["requests"] == 240
    assert (totals["blocked"], totals["flagged"], totals["errors"], totals["rate_limited"]) == (30, 30, 30, 30)
    assert totals["blocked_rate"] == pytest.approx(0.125)
    assert 2 <= totals["p50_ms"] <= 5 and 200 <= totals["p99_ms"] <= 500
    guards = {g["guard"]: g for g in data.guards}
    assert guards["injection"]["blocked"] == 30 and guards["injection"]["flagged"] == 0
    assert guards["toxicity"]["flagged"] == guards["groundedness"]["flagged"] == 30
    first = data.buckets[0]
    assert first.requests == 4 and first.flagged_by == {"toxicity": 1, "groundedness": 1}
    assert data.buckets[-1].requests == 0  # the current minute: nothing yet


def test_page_and_api(settings: Settings, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    _insert(settings, [_row(now - timedelta(minutes=m), "blocked", 5.0, blocked_by="keywords") for m in range(1, 30)]
            + [_row(now - timedelta(minutes=m)) for m in range(1, 30)])  # fmt: skip
    _, reviewer = create_key(settings, "reviewer", "rev")
    _, client = create_key(settings, "client", "app")
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url) as http:
        page = http.get("/review/overview?window=6h", headers={"authorization": f"Bearer {reviewer}"})
        assert page.status_code == 200
        assert page.text.count("<svg") == 5 and "Block rate per guard" in page.text and "keywords" in page.text
        assert "<script" not in page.text and "http://" not in page.text.replace(
            'xmlns="http://www.w3.org/2000/svg"', ""
        )
        api = http.get("/api/review/overview?window=1h", headers={"authorization": f"Bearer {reviewer}"}).json()
        assert api["totals"]["requests"] == 58 and api["totals"]["blocked"] == 29
        assert api["guards"] == [
            {"guard": "keywords", "blocked": 29, "flagged": 0, "block_rate": 0.5, "flag_rate": 0.0}
        ]
        assert http.get("/api/review/overview", headers={"authorization": f"Bearer {client}"}).status_code == 403
        bad = http.get("/api/review/overview?window=soon", headers={"authorization": f"Bearer {reviewer}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"
        signed_out = http.get("/review/overview", follow_redirects=False)
        assert signed_out.status_code == 303 and signed_out.headers["location"] == "/review/login"
        # The gateway rolls closed buckets up in the background: the records are in audit_rollups.
        deadline = time.monotonic() + 20
        while _rolled_up(settings) < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _rolled_up(settings) >= 50
        api = http.get("/api/review/overview?window=6h", headers={"authorization": f"Bearer {reviewer}"}).json()
        assert api["totals"]["requests"] == 58 and api["totals"]["blocked"] == 29 and api["rollups_through"]
        page = http.get("/review/overview?window=24h", headers={"authorization": f"Bearer {reviewer}"})
        assert "come from the rollups" in page.text


def _rolled_up(settings: Settings) -> int:
    """Records counted in the 5-minute rollups."""

    async def go() -> int:
        engine = create_engine(settings.database_url)
        try:
            async with engine.connect() as conn:
                query = select(func.coalesce(func.sum(audit_rollups.c.requests), 0)).where(
                    audit_rollups.c.size_s == 300
                )
                return int((await conn.execute(query)).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_live_overview_reads_new_rows_at_once(settings: Settings) -> None:
    """The live page (no `until`) equals a full read, and rows arriving in the open bucket show at once."""
    now = datetime.now(UTC)
    _insert(settings, [_row(now - timedelta(minutes=m), "blocked" if m % 3 else "ok", 5.0 + m,
                            blocked_by="keywords" if m % 3 else None) for m in range(1, 170)])  # fmt: skip

    async def go() -> tuple[Any, Any, Any]:
        engine = create_engine(settings.database_url)
        try:
            since = now - timedelta(hours=3)
            live = await overview(engine, since)
            full = await overview(engine, since, datetime.now(UTC))
            async with engine.begin() as conn:  # a new row in the open bucket
                await conn.execute(audit_records.insert(), [_row(datetime.now(UTC), "blocked", 1.0, blocked_by="new")])
            again = await overview(engine, since)
            return live, full, again
        finally:
            await engine.dispose()

    live, full, again = asyncio.run(go())
    assert live.totals == full.totals and live.totals["requests"] == 169
    assert [b.requests for b in live.buckets] == [b.requests for b in full.buckets]
    assert again.totals["requests"] == 170 and any(g["guard"] == "new" for g in again.guards)


def test_drift_of_the_nightly_traffic_runs_is_charted(settings: Settings) -> None:
    """Each finished `eval traffic` run in the window is a point per drift signal (its PSI)."""
    from gateway.db import eval_runs
    from gateway.overview import charts

    def run(at: datetime, toxicity: float | None, embeddings: float) -> dict[str, Any]:
        drift = {"guard_scores": {"toxicity": {"psi": toxicity, "status": "stable"}},
                 "query_embeddings": {"psi": embeddings}, "ratings": {"psi": None}}  # fmt: skip
        return {"kind": "traffic", "name": "last 24h", "started_at": at, "finished_at": at, "status": "unchecked",
                "metrics_json": msgspec.json.encode({"requests": 10, "drift": drift}).decode()}  # fmt: skip

    async def seed() -> None:
        engine = create_engine(settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(eval_runs.insert(), [
                    run(NOW - timedelta(days=3), 0.05, 0.30),
                    run(NOW - timedelta(days=2), None, 0.12),
                    run(NOW - timedelta(days=1), 0.25, 0.02),
                    run(NOW - timedelta(days=40), 0.9, 0.9),  # outside the window
                    {"kind": "dataset", "name": "sample.jsonl", "started_at": NOW, "finished_at": NOW,
                     "status": "passed", "metrics_json": "{}"},  # not a traffic run
                ])  # fmt: skip
        finally:
            await engine.dispose()

    asyncio.run(seed())
    data = _overview(settings, NOW - timedelta(days=7), NOW)
    assert [psi["toxicity"] for _, psi in data.drift] == [0.05, None, 0.25]
    assert [psi["query embeddings"] for _, psi in data.drift] == [0.30, 0.12, 0.02]
    assert data.public()["drift"][0]["psi"]["ratings"] is None
    svg = str(charts(data)[-1])
    assert "Drift" in svg and "toxicity" in svg and "query embeddings" in svg and "ratings" not in svg
    assert svg.count("<polyline") == 1 and svg.count("<circle") >= 2  # embeddings a line; toxicity has a gap
    empty = str(charts(_overview(settings, NOW - timedelta(days=60), NOW - timedelta(days=50)))[-1])
    assert "no traffic run in this window" in empty
