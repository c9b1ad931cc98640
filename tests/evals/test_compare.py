"""`gateway eval compare`: deployments compared on logged primary and shadow rows, a verdict line,
a self-contained HTML report, exit 3 when the candidate is worse beyond the tolerances."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from evals.compare import agreement
from gateway.cli import main as gateway_main
from gateway.db import audit_records, create_engine
from gateway.settings import Settings
from tests.helpers import prepare_database


def row(deployment: str, *, shadow_of: str | None = None, ms: float = 50.0, status: str = "ok",
        text: str = "Paris is the capital of France.", grounded: float | None = 0.9, blocked: str | None = None,
        model: str = "chat", age_h: float = 1.0) -> dict[str, Any]:  # fmt: skip
    created = datetime.now(UTC) - timedelta(hours=age_h)
    return {
        "request_id": uuid.uuid4().hex, "created_at": created, "finished_at": created, "endpoint": "chat.completions",
        "model": model, "stream": False, "status": status, "http_status": 200 if status == "ok" else 502,
        "backend_ms": ms, "total_ms": ms, "response_text": text, "groundedness": grounded, "blocked_by": blocked,
        "deployment": deployment, "backend_model": f"m-{deployment}", "shadow_of": shadow_of,
    }  # fmt: skip


def store(settings: Settings, rows: list[dict[str, Any]]) -> None:
    async def go() -> None:
        engine = create_engine(settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(insert(audit_records), rows)
        finally:
            await engine.dispose()

    asyncio.run(go())


def traffic(n: int = 60, **candidate: Any) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        primary = row("blue" if i % 10 else "green", ms=40.0 + i % 20)
        rows.append(primary)
        rows.append(row("candidate", shadow_of=primary["request_id"], **({"ms": 40.0 + i % 20} | candidate)))
    rows.append(row("blue", model="other"))  # another model: not counted
    rows.append(row("blue", age_h=48))  # outside the window
    return rows


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path, embedding_model="hashing", sample_corpus=False)
    prepare_database(settings)
    return settings


def compare(settings: Settings, *extra: str) -> int:
    return gateway_main(["eval", "compare", "--model", "chat", "--since", "24h", "--data-dir", str(settings.data_dir),
                         "--database", f"sqlite:///{settings.data_dir / 'gateway.db'}", "--json", *extra])  # fmt: skip


def summary(capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_an_equal_candidate_passes_with_a_report(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    store(settings, traffic())
    assert compare(settings) == 0
    out, result = summary(capsys)
    assert "verdict: candidate candidate is within tolerances of blue" in out
    assert result["baseline"] == "blue" and result["candidate"] == "candidate"
    assert result["deployments"]["blue"]["requests"] == 54 and result["deployments"]["green"]["requests"] == 6
    assert result["deployments"]["candidate"]["role"] == "shadow"
    assert result["agreement"] == {"pairs": 60, "mean": 1.0, "identical_rate": 1.0}
    html = Path(result["report"]).read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html and 'Status: <span class="ok">passed' in html
    assert "<script" not in html and "src=" not in html and "href=" not in html  # self-contained


def test_a_worse_candidate_exits_3_and_says_why(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    rows = traffic(ms=200.0, text="Lyon, I think.", grounded=0.4)
    rows += [row("candidate", shadow_of=r["request_id"], status="backend_error", ms=5.0) for r in rows[:20:2]]
    store(settings, rows)
    assert compare(settings, "--min-agreement", "0.5") == 3
    out, result = summary(capsys)
    verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
    assert "candidate candidate is WORSE than blue" in verdict
    for part in ("p95 latency", "error rate", "groundedness", "agreement with the primary"):
        assert part in verdict
    assert result["agreement"]["mean"] == 0.0
    # Wider tolerances accept the same traffic.
    assert compare(settings, "--max-latency-increase", "5", "--max-error-increase", "0.5",
                   "--max-groundedness-drop", "1") == 0  # fmt: skip


def test_too_little_traffic_is_inconclusive_and_nothing_is_exit_1(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare(settings) == 1
    assert "nothing to compare" in capsys.readouterr().out
    store(settings, traffic(5))
    assert compare(settings) == 4
    assert "inconclusive" in capsys.readouterr().out
    assert compare(settings, "--since", "soon") == 2


def test_agreement_is_token_f1() -> None:
    assert agreement("The cat sat.", "the cat sat") == 1.0
    assert agreement("a b c d", "a b x y") == 0.5
    assert agreement("yes", "no") == 0.0 and agreement("", "") == 1.0
