"""The nightly eval commands against the real CPU vLLM: `gateway eval run` on a 4-item subset of
the shipped sample set (bounded by max_tokens, so it finishes in a minute or two on two cores),
then `gateway eval traffic` over what that run logged plus a row a client broke on purpose."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from evals.nightly import EXIT_DRIFT, EXIT_PASSED, EXIT_REGRESSED
from gateway.cli import main as gateway_main
from gateway.db import audit_records, create_engine

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[2] / "evals" / "datasets" / "sample.jsonl"
SUBSET = ("about-founded", "kr200-price", "injection-override", "benign-no-rag")
MAX_TOKENS = 32
# A lone surrogate as a JSON escape: any client can send it, and it once failed the whole traffic run.
BROKEN_BODY = '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\\ud800"}]}'


def _last_json(out: str) -> dict[str, object]:
    return dict(json.loads(out.strip().splitlines()[-1]))


async def _eval_rows(database: str) -> list[dict[str, object]]:
    engine = create_engine(database)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(select(audit_records).where(audit_records.c.api_key_id == "eval"))
            return [dict(r._mapping) for r in result]
    finally:
        await engine.dispose()


async def _log_a_broken_request(database: str) -> None:
    now = datetime.now(UTC)
    engine = create_engine(database)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(audit_records).values(
                    request_id="broken-by-a-client",
                    created_at=now,
                    finished_at=now,
                    endpoint="chat.completions",
                    model="smollm2-135m-instruct",
                    stream=False,
                    status="rejected",
                    http_status=400,
                    request_json=BROKEN_BODY,
                )
            )
    finally:
        await engine.dispose()


def test_eval_run_and_traffic_finish_against_the_real_vllm(
    tmp_path: Path, vllm_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("GATEWAY_BACKEND", "GATEWAY_EMBEDDING_MODEL", "GATEWAY_SAMPLE_CORPUS", "GATEWAY_EVAL_MAX_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    lines = [line for line in SAMPLE.read_text(encoding="utf-8").splitlines() if json.loads(line)["id"] in SUBSET]
    assert len(lines) == len(SUBSET)
    dataset = tmp_path / "subset.jsonl"
    dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data_dir = tmp_path / "data"
    common = ["--data-dir", str(data_dir), "--backend", vllm_url, "--json"]

    # --min-pass-rate 0: this test is about the run finishing on the real model, not the 135M model's answers.
    run = ["eval", "run", "--dataset", str(dataset), "--max-tokens", str(MAX_TOKENS), "--min-pass-rate", "0"]
    code = gateway_main([*run, *common])
    captured = capsys.readouterr()
    summary = _last_json(captured.out)
    assert code == EXIT_PASSED, (summary, captured.err[-2000:])
    assert "4 items against" in captured.err  # progress is shown by default
    metrics = summary["metrics"]
    assert isinstance(metrics, dict) and metrics["items"] == 4 and metrics["errors"] == 0
    assert metrics["guard_accuracy"] is not None and Path(str(summary["report"])).is_file()

    database = f"sqlite:///{data_dir / 'gateway.db'}"
    rows = asyncio.run(_eval_rows(database))
    assert len(rows) == 4
    answered = [r for r in rows if r["status"] == "ok"]
    assert answered, rows
    for row in answered:
        assert json.loads(str(row["request_json"]))["max_tokens"] == MAX_TOKENS
        assert row["completion_tokens"] is not None and int(row["completion_tokens"]) <= MAX_TOKENS  # type: ignore[call-overload]

    asyncio.run(_log_a_broken_request(database))
    # --include-eval: the eval run's own rows are left out of traffic by default (origin='eval').
    code = gateway_main(["eval", "traffic", "--since", "1h", "--no-progress", "--include-eval", *common])
    traffic = _last_json(capsys.readouterr().out)
    assert code in (EXIT_PASSED, EXIT_REGRESSED, EXIT_DRIFT), traffic
    assert traffic["status"] != "failed"
    traffic_metrics = traffic["metrics"]
    assert isinstance(traffic_metrics, dict)
    assert traffic_metrics["requests"] == 5 and traffic_metrics["rescore_errors"] == 0
