"""`kill -HUP` on a running `gateway serve` re-reads its settings file: a valid change is applied
(and stored), an invalid one is logged with the reason and the running config keeps serving."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.fake import FakeBackendThread
from tests.gateway.test_serve_lifecycle import ROOT, free_port, gateway_env, wait_until


def deployments(url: str, blue: int, green: int) -> str:
    return "".join(
        f'[[deployments]]\nname = "{name}"\nmodel = "chat"\nbackend = "{url}"\nbackend_model = "fake-model"\n'
        f"weight = {weight}\n\n"
        for name, weight in (("blue", blue), ("green", green))
    )


@pytest.mark.slow
def test_sighup_reloads_the_settings_file(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(deployments(fake_backend.url, 100, 0), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--open", "--port", str(port), "--config", str(config)],
        cwd=ROOT, env=gateway_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: _up(url), 120, "the gateway did not start")
        first = httpx.get(url + "/admin/config").json()["config_version"]
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url + "/v1/chat/completions", json=chat).headers["x-gateway-deployment"] == "blue"

        config.write_text(deployments(fake_backend.url, 0, 100), encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.get(url + "/admin/config").json()["config_version"] != first, 30, "no reload")
        assert httpx.post(url + "/v1/chat/completions", json=chat).headers["x-gateway-deployment"] == "green"

        config.write_text("[[deployments]]\nname = 'broken'\n", encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.get(url + "/admin/config").json()["failed_reloads"] == 1, 30, "no rejection")
        described = httpx.get(url + "/admin/config").json()
        assert "'model' must be a non-empty string" in described["last_error"]
        assert httpx.post(url + "/v1/chat/completions", json=chat).headers["x-gateway-deployment"] == "green"
        assert [h["action"] for h in described["history"]] == ["reload", "start"]
        assert process.poll() is None  # SIGHUP never stops the gateway
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert "config reload rejected" in (tmp_path / "serve.log").read_text()


def _up(url: str) -> bool:
    try:
        return (
            httpx.get(url + "/healthz", timeout=2).status_code == 200
            and httpx.get(url + "/admin/config").status_code == 200
        )
    except httpx.HTTPError:
        return False
