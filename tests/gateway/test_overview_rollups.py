"""The overview from rollups (gateway.rollup) gives the figures a raw aggregate gives, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from gateway.db import audit_records, audit_rollups, create_engine
from gateway.migrate import upgrade
from gateway.overview import LATENCY_BINS_MS, WINDOWS, overview
from gateway.retention import prune
from gateway.rollup import COARSE_S, FINE_S, computed_range, roll_up
from gateway.usage import ORIGINS, parse_since
from tests.helpers import PG_ADMIN, throwaway_postgres

GUARDS = ("injection", "keywords", "toxicity")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rollups.db'}"
        upgrade(url)
        yield url
        return
    with throwaway_postgres("gw_rollups") as name:
        url = f"{PG_ADMIN}/{name}"
        upgrade(url)
        yield url


def _rows(now: datetime, count: int, seed: int = 3, span_s: float = 31 * 86400) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        at = now - timedelta(seconds=rng.random() * span_s)
        roll = rng.random()
        status = ("blocked" if roll < 0.1 else "rate_limited" if roll < 0.15 else "backend_error" if roll < 0.2
                  else "ok")  # fmt: skip
        flagged = rng.random()
        rows.append({
            "request_id": uuid.uuid4().hex, "created_at": at, "finished_at": at, "endpoint": "chat.completions",
            "stream": False, "status": status, "http_status": 200,
            "model": rng.choice(("small", "large", None)),
            "total_ms": None if rng.random() < 0.05 else rng.lognormvariate(4, 1.5),
            "blocked_by": rng.choice(GUARDS) if status == "blocked" else None,
            "flagged_by": "toxicity,groundedness" if flagged < 0.05 else "toxicity" if flagged < 0.1 else None,
            "origin": "eval" if rng.random() < 0.2 else None,
            "prompt_tokens": rng.randint(1, 100), "completion_tokens": rng.randint(1, 100), "total_tokens": 0,
        })  # fmt: skip
    return rows


async def _insert(engine: Any, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(audit_records.insert(), rows)


async def _both(engine: Any, window: str, origin: str, until: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    since = parse_since(window, until)
    rolled = (await overview(engine, since, until, origin=origin)).public()
    raw = (await overview(engine, since, until, origin=origin, rollups=False)).public()
    assert raw.pop("rollups_through") is None
    if window != "1h":  # one-minute buckets: raw rows (an hour of them)
        assert rolled["rollups_through"] is not None
    rolled.pop("rollups_through")
    return rolled, raw


def test_rollups_give_the_raw_figures(url: str) -> None:
    async def go() -> None:
        engine = create_engine(url)
        try:
            now = datetime.now(UTC)
            await _insert(engine, _rows(now, 4000) + _rows(now, 200, seed=4, span_s=600))  # some in the open bucket
            report = await roll_up(engine)
            assert report.fine is not None and report.coarse is not None
            async with engine.connect() as conn:
                fine = await computed_range(conn, FINE_S)
                coarse = await computed_range(conn, COARSE_S)
            assert fine is not None and coarse is not None
            assert fine[1] == int(now.timestamp()) // FINE_S * FINE_S or fine[1] > now.timestamp() - FINE_S
            until = datetime.now(UTC)
            for window in (*WINDOWS, "3d"):
                for origin in ORIGINS:
                    rolled, raw = await _both(engine, window, origin, until)
                    assert rolled == raw, (window, origin)
            live = (await overview(engine, parse_since("30d", until), until)).totals
            assert 0 < live["requests"] < 4200 and live["blocked"] > 0 and live["flagged"] > 0

            # The figures really come from the rollups: raw rows deleted behind their back still count.
            at = audit_records.c.created_at
            async with engine.begin() as conn:
                days_ago = (now - timedelta(days=10), now - timedelta(days=3))
                gone = (await conn.execute(delete(audit_records).where(at >= days_ago[0], at < days_ago[1]))).rowcount
            assert gone > 500
            rolled, raw = await _both(engine, "30d", "all", until)
            assert rolled["totals"]["requests"] - raw["totals"]["requests"] == gone

            # Retention drops the rollups with the records: the two agree again.
            await prune(engine, now - timedelta(days=2), pause_s=0)
            for window in ("7d", "30d", "24h"):
                rolled, raw = await _both(engine, window, "live", until)
                assert rolled == raw, window
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_a_pass_is_idempotent_and_counts_late_rows(url: str) -> None:
    async def go() -> None:
        engine = create_engine(url)
        try:
            now = datetime.now(UTC)
            await _insert(engine, _rows(now, 600, span_s=2 * 86400))
            await roll_up(engine)

            async def table() -> list[Any]:
                async with engine.connect() as conn:
                    return sorted(tuple(r) for r in await conn.execute(select(audit_rollups)))

            first = await table()
            await roll_up(engine)
            await asyncio.gather(roll_up(engine), roll_up(engine))  # two replicas at once
            assert await table() == first
            # A stream that started 20 minutes ago is written now, after its bucket was rolled up.
            late = _rows(now, 1, seed=9, span_s=1)[0] | {"created_at": now - timedelta(minutes=20), "origin": None}
            await _insert(engine, [late])
            until = datetime.now(UTC)
            rolled, raw = await _both(engine, "24h", "live", until)
            assert raw["totals"]["requests"] == rolled["totals"]["requests"] + 1  # not rolled up yet
            await roll_up(engine)  # the next pass recomputes the last hour
            rolled, raw = await _both(engine, "24h", "live", until)
            assert rolled == raw
            async with engine.connect() as conn:
                end = await computed_range(conn, FINE_S)
                assert end is not None
                rolled_rows = select(func.sum(audit_rollups.c.requests)).where(audit_rollups.c.size_s == FINE_S)
                raw_rows = select(func.count()).where(audit_records.c.created_at < datetime.fromtimestamp(end[1], UTC))
                counted = (await conn.execute(rolled_rows)).scalar()
                assert counted == (await conn.execute(raw_rows)).scalar_one() and counted > 500
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_percentiles_from_rollups_lie_within_the_bin_of_the_exact_value(url: str) -> None:
    async def go() -> None:
        engine = create_engine(url)
        try:
            now = datetime.now(UTC)
            rows = _rows(now, 3000, seed=11, span_s=7 * 86400)
            rows = [r for r in rows if r["created_at"] < now - timedelta(minutes=10)]
            await _insert(engine, rows)
            await roll_up(engine)
            data = await overview(engine, now - timedelta(days=7), now, origin="all")
            latencies = sorted(r["total_ms"] for r in rows if r["total_ms"] is not None)
            for q in (50, 95, 99):
                exact = latencies[math.ceil(q / 100 * len(latencies)) - 1]  # nearest rank
                upper = next(b for b in LATENCY_BINS_MS if exact <= b)
                lower = max([0, *(b for b in LATENCY_BINS_MS if b < exact)])
                estimate = data.totals[f"p{q}_ms"]
                assert lower <= estimate <= upper, (q, exact, estimate)
                assert abs(estimate - exact) <= upper - lower
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_migration_0009_creates_and_drops_the_rollups_table(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import create_engine as create_sync_engine
    from sqlalchemy import inspect

    from gateway.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    engine = create_sync_engine(url)
    try:
        with engine.connect() as conn:
            assert "audit_rollups" in inspect(conn).get_table_names()
        command.downgrade(alembic_config(url), "0008")
        with engine.connect() as conn:
            assert "audit_rollups" not in inspect(conn).get_table_names()
        upgrade(url)
        with engine.connect() as conn:
            assert {c["name"] for c in inspect(conn).get_columns("audit_rollups")} >= {"bucket_start", "lat_17"}
    finally:
        engine.dispose()


def test_db_rollup_rebuild_counts_rows_that_came_hours_late(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record written three hours after its bucket was rolled up (a replayed spool) is beyond the
    pass's one-hour look-back; `gateway db rollup --rebuild 6h` counts it."""
    from gateway.cli import main

    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    now = datetime.now(UTC)

    async def seed_and_roll() -> None:
        engine = create_engine(url)
        try:
            await _insert(engine, _rows(now, 200, span_s=86400))
            await roll_up(engine)
            late = _rows(now, 1, seed=7, span_s=1)[0] | {"created_at": now - timedelta(hours=3), "origin": None}
            await _insert(engine, [late])
            await roll_up(engine)  # looks back one hour: the late row stays out
        finally:
            await engine.dispose()

    async def counts() -> tuple[int, int]:
        engine = create_engine(url)
        try:
            rolled, raw = await _both(engine, "24h", "live", datetime.now(UTC))
            return rolled["totals"]["requests"], raw["totals"]["requests"]
        finally:
            await engine.dispose()

    asyncio.run(seed_and_roll())
    rolled, raw = asyncio.run(counts())
    assert raw == rolled + 1
    assert main(["db", "rollup", "--rebuild", "6h", "--database", url, "--data-dir", str(tmp_path)]) == 0
    assert "rollups recomputed from" in capsys.readouterr().out
    assert asyncio.run(counts()) == (raw, raw)
    assert main(["db", "rollup", "--rebuild", "yesterday-ish", "--database", url, "--data-dir", str(tmp_path)]) == 2
