"""`gateway keys create/update/list` with limits, and `gateway usage` over a known audit log."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.db import audit_records, create_engine
from gateway.migrate import upgrade
from gateway.settings import Settings, SettingsError, load_settings
from gateway.usage import parse_since, usage


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_keys_with_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path)]
    code, out, err = cli(capsys, "keys", "create", "--role", "client", "--name", "app", "--rpm", "600",
                         "--tpm", "200000", "--max-concurrent", "16", "--tokens-per-day", "5000000", *d)  # fmt: skip
    assert code == 0 and out.startswith("sk-gw-")
    assert "rpm=600 tpm=200000 max-concurrent=16 tokens-per-day=5000000" in err
    _, listed, _ = cli(capsys, "keys", "list", *d)
    key_id = listed.split("\t")[0]
    assert listed.rstrip().endswith("app\trpm=600 tpm=200000 max-concurrent=16 tokens-per-day=5000000")

    code, out, _ = cli(capsys, "keys", "update", key_id, "--rpm", "1200", *d)
    assert code == 0 and "rpm=1200 tpm=200000" in out
    cli(capsys, "keys", "update", key_id, "--rpm", "0", "--tokens-per-month", "9", *d)
    _, listed, _ = cli(capsys, "keys", "list", *d)
    assert listed.rstrip().endswith("app\ttpm=200000 max-concurrent=16 tokens-per-day=5000000 tokens-per-month=9")

    code, _, err = cli(capsys, "keys", "update", "key_nope", "--rpm", "5", *d)
    assert code == 1 and "no key with id 'key_nope'" in err
    code, _, err = cli(capsys, "keys", "update", key_id, *d)
    assert code == 2 and "nothing to change" in err


@pytest.mark.parametrize(("flag", "value"), [("--rpm", "-5"), ("--tpm", "1.5"), ("--max-concurrent", "many")])
def test_bad_limit_flags_name_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--role", "client", flag, value, "--data-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert f"not '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"GATEWAY_MODEL_LIMITS": "m:rpm=-1"}, "'-1'"),
        ({"GATEWAY_MODEL_LIMITS": "m:max_in_flight=2.5"}, "'2.5'"),
        ({"GATEWAY_MODEL_LIMITS": "m:queue_timeout=soon"}, "'soon'"),
        ({"GATEWAY_LIMITS_FAIL": "sometimes"}, "'sometimes'"),
        ({"GATEWAY_REDIS": "localhost:6379"}, "'localhost:6379'"),
    ],
)
def test_bad_limit_settings_name_the_value(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings({}, environ=environ)


def test_model_limits_from_the_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[model_limits."smollm2"]\nmax_in_flight = 8\nrpm = 600\nqueue_timeout = 10\n')
    settings = load_settings({"config": config}, environ={})
    assert settings.model_limits == ("smollm2:max_in_flight=8", "smollm2:rpm=600", "smollm2:queue_timeout=10")
    config.write_text('[model_limits."smollm2"]\nmax_in_flight = -8\n')
    with pytest.raises(SettingsError, match="'-8'"):
        load_settings({"config": config}, environ={})


def _rows(now: datetime) -> list[dict[str, Any]]:
    base = {"endpoint": "chat.completions", "stream": False, "http_status": 200}

    def row(key: str, model: str, status: str, ms: float, tokens: int | None, age_h: float) -> dict[str, Any]:
        created = now - timedelta(hours=age_h)
        half = tokens // 2 if tokens is not None else None
        return {**base, "request_id": uuid.uuid4().hex, "created_at": created, "finished_at": created,
                "api_key_id": key, "model": model, "status": status, "total_ms": ms, "total_tokens": tokens,
                "prompt_tokens": half, "completion_tokens": half}  # fmt: skip

    rows = [row("key_a", "small", "ok", float(ms), 10, 1) for ms in range(1, 101)]  # 1..100 ms
    rows += [row("key_a", "small", "rate_limited", 0.5, None, 2), row("key_b", "big", "blocked", 5, None, 3)]
    rows += [row("key_b", "big", "backend_error", 7, None, 3), row("key_b", "big", "ok", 9, 50, 30)]  # a day ago
    for r in rows:
        r["origin"] = None
    # An eval run's requests (origin 'eval'): not usage, so `gateway usage` leaves them out.
    rows += [{**row("eval", "small", "ok", 3.0, 1000, 1), "origin": "eval"} for _ in range(5)]
    return rows


def test_usage_from_the_audit_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.database_url)
    now = datetime.now(UTC)

    async def fill() -> None:
        engine = create_engine(settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(audit_records.insert(), _rows(now))
        finally:
            await engine.dispose()

    asyncio.run(fill())
    code, out, _ = cli(capsys, "usage", "--since", "24h", "--by", "key", "--json", "--data-dir", str(tmp_path))
    assert code == 0
    rows = {r["group"]: r for r in json.loads(out)["rows"]}
    assert set(rows) == {"key_a", "key_b"}  # no "eval" group
    a, b = rows["key_a"], rows["key_b"]
    assert (a["requests"], a["ok"], a["rate_limited"], a["tokens"], a["p50_ms"], a["p95_ms"]) == (
        101,
        100,
        1,
        1000,
        50.0,
        95.0,
    )
    assert (b["requests"], b["blocked"], b["errors"], b["tokens"]) == (2, 1, 1, 0)  # the day-old request is outside

    code, out, _ = cli(capsys, "usage", "--since", "2d", "--by", "model", "--data-dir", str(tmp_path))
    lines = out.splitlines()
    assert lines[1].split() == [
        "model",
        "requests",
        "ok",
        "blocked",
        "rate_limited",
        "errors",
        "tokens",
        "p50_ms",
        "p95_ms",
    ]
    assert lines[2].split()[:2] == ["small", "101"] and lines[3].split()[:7] == ["big", "3", "1", "1", "0", "1", "50"]
    assert lines[4].split()[:2] == ["total", "104"]

    code, out, _ = cli(capsys, "usage", "--since", "3d", "--by", "day", "--json", "--data-dir", str(tmp_path))
    days = [r["group"] for r in json.loads(out)["rows"]]
    assert days == sorted(days) and len(days) in (2, 3)


def test_usage_rejects_a_bad_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "usage", "--since", "yesterday", "--data-dir", str(tmp_path))
    assert code == 2 and "'yesterday'" in err


def test_parse_since() -> None:
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)


async def test_usage_unknown_grouping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'week'"):
        await usage(None, datetime.now(UTC), "week")  # type: ignore[arg-type]
