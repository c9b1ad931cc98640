"""Settings precedence and validation, the CLI's key and database commands, and router failover."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.settings import SettingsError, load_settings
from serving.fake import FakeBackendThread, FakeConfig
from serving.router import Router
from serving.vllm import VLLMBackend
from tests.helpers import audit_rows

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_is_flags_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\nbackend = ["http://file:1"]\nmax_body_bytes = 2048\n')
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_PORT": "9100", "GATEWAY_BACKEND": "http://a:1 http://b:2"}
    settings = load_settings({"port": 9200}, environ=env)
    assert settings.port == 9200  # flag
    assert settings.backend == ("http://a:1", "http://b:2")  # environment over file
    assert settings.host == "0.0.0.0" and settings.max_body_bytes == 2048  # file
    assert settings.database_url.startswith("sqlite+aiosqlite:///") and settings.database_url.endswith("gateway.db")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "70000"}, "port 70000"),
        ({"GATEWAY_BACKEND": "localhost:8000"}, "must start with http"),
        ({"GATEWAY_DATABASE": "mysql://x/y"}, "unsupported database"),
        ({"GATEWAY_OPEN_MODE": "perhaps"}, "expected true or false"),
        ({"GATEWAY_CONFIG": "/nonexistent/gw.toml"}, "does not exist"),
    ],
)
def test_bad_settings_fail_at_start_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=env)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"broken\.toml.*line 1"):
        load_settings(environ={"GATEWAY_CONFIG": str(broken)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 80\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(environ={"GATEWAY_CONFIG": str(unknown)})


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_keys_and_db_honour_gateway_database(tmp_path: Path) -> None:
    env = {"GATEWAY_DATABASE": f"sqlite:///{tmp_path / 'elsewhere.db'}", "GATEWAY_DATA_DIR": str(tmp_path / "d")}
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    created = run_cli("keys", "create", "--role", "reviewer", "--name", "ana", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sk-gw-") and len(secret) > 40
    listed = run_cli("keys", "list", env=env)
    assert "reviewer" in listed.stdout and "ana" in listed.stdout and secret not in listed.stdout
    assert (tmp_path / "elsewhere.db").exists()
    bad = run_cli("keys", "create", "--role", "emperor", env=env)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    wrong_db = run_cli("db", "upgrade", env={"GATEWAY_DATABASE": "oracle://x"})
    assert wrong_db.returncode == 2 and "unsupported database" in wrong_db.stderr


async def test_router_fails_over_to_a_live_backend(fake_backend: FakeBackendThread) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    router = Router([VLLMBackend(dead, connect_timeout=1), VLLMBackend(fake_backend.url)])
    try:
        await router.refresh()
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        answers = [await router.complete("/v1/chat/completions", body) for _ in range(4)]
        assert all(a["choices"][0]["message"]["content"] for a in answers)
        streamed = [p async for p in router.stream("/v1/chat/completions", {**body, "stream": True})]
        assert streamed
        assert await router.health_by_backend() == {dead: False, fake_backend.url: True}
    finally:
        await router.aclose()


async def test_router_sends_each_model_to_the_backend_that_serves_it() -> None:
    with (
        FakeBackendThread(FakeConfig(models=("alpha",))) as a,
        FakeBackendThread(FakeConfig(models=("beta",))) as b,
    ):
        router = Router([VLLMBackend(a.url), VLLMBackend(b.url)])
        try:
            await router.refresh()
            for model in ("alpha", "beta", "alpha"):
                await router.complete("/v1/completions", {"model": model, "prompt": "x"})
            assert sorted(m.id for m in await router.models()) == ["alpha", "beta"]
        finally:
            await router.aclose()
        stats_a = await asyncio.to_thread(httpx.get, a.url + "/fake/stats")
        stats_b = await asyncio.to_thread(httpx.get, b.url + "/fake/stats")
        assert stats_a.json()["requests"] == 2
        assert stats_b.json()["requests"] == 1


def test_open_mode_needs_no_key(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    from tests.conftest import make_settings
    from tests.helpers import serving

    settings = make_settings(tmp_path, fake_backend.url, open_mode=True)
    with serving(settings, key="anything") as (gw, client):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(gw.url + "/readyz").json()["open_mode"] is True
    assert [r["api_key_id"] for r in audit_rows(settings)] == ["open"]
