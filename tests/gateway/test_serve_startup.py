"""`gateway serve` with the local vLLM listens first (issue 18, item 7): /healthz answers at once,
/readyz says 503 "starting local vLLM: N s" until vLLM answers, then 200 and one line with the URLs.

The "vLLM" here is a stand-in executable (GATEWAY_VLLM_PYTHON) that runs the fake backend after a
few seconds, so the test sees every phase without the minutes a real vLLM takes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.gateway.test_serve_lifecycle import GUARDS_OFF, ROOT, free_port, gateway_env

FAKE_VLLM = """#!{python}
import sys, time
sys.path.insert(0, {root!r})
from serving.fake import FakeConfig, serve_fake
args = sys.argv
time.sleep({delay})
name, port = args[args.index("--served-model-name") + 1], int(args[args.index("--port") + 1])
serve_fake(FakeConfig(models=(name,)), "127.0.0.1", port)
"""


def _fake_vllm(tmp_path: Path, delay_s: float) -> Path:
    script = tmp_path / "fake-vllm-python"
    script.write_text(FAKE_VLLM.format(python=sys.executable, root=str(ROOT), delay=delay_s))
    script.chmod(0o755)
    model = tmp_path / "data/models/smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")  # prepared already: no dequantising
    return script


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def test_the_port_listens_before_the_local_vllm_is_ready(tmp_path: Path) -> None:
    port, vllm_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = gateway_env(tmp_path / "data", vllm_python=str(_fake_vllm(tmp_path, 8.0)), local_vllm_port=str(vllm_port))
    env["GATEWAY_LOG_LEVEL"] = "info"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--port", str(port), "--policy", str(GUARDS_OFF)]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60  # generous: a loaded CI machine; the order is what is checked
        while (health := _get(url + "/healthz")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health is not None and health.status_code == 200, log.read_text()
        starting = httpx.get(url + "/readyz", timeout=5)
        assert starting.status_code == 503
        assert starting.json()["status"] == "starting"
        assert starting.json()["message"].startswith("starting local vLLM: ")
        assert "gateway ready" not in log.read_text()
        deadline = time.monotonic() + 120
        while (ready := _get(url + "/readyz")) is None or ready.status_code != 200:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.3)
        time.sleep(0.2)
        lines = log.read_text().splitlines()
        ready_lines = [line for line in lines if "gateway ready: API" in line]
        assert len(ready_lines) == 1 and f"{url}/v1" in ready_lines[0] and f"{url}/review" in ready_lines[0]
        assert not any("ModuleNotFoundError" in line for line in lines)
    finally:
        process.terminate()
        process.wait(60)


def test_a_local_vllm_that_dies_while_starting_stops_the_gateway_with_exit_1(tmp_path: Path) -> None:
    script = _fake_vllm(tmp_path, 0.0)
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    port = free_port()
    env = gateway_env(tmp_path / "data", vllm_python=str(script), local_vllm_port=str(free_port()))
    env["GATEWAY_LOG_LEVEL"] = "info"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--port", str(port), "--policy", str(GUARDS_OFF)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr
    assert "local vLLM failed: vLLM exited with code 3" in done.stderr
    assert "gateway ready" not in done.stderr


def test_models_load_after_the_port_listens(tmp_path: Path, monkeypatch: object) -> None:
    """`create_app(start_in_background=True)` (what `gateway serve` uses): while the models load,
    /healthz is 200, /readyz 503 saying what loads, any other route 503 `starting` with Retry-After;
    then everything answers. A start-up that fails is reported, not raised into the server."""
    import asyncio
    import threading

    import pytest
    from litestar.testing import AsyncTestClient

    from gateway.app import create_app
    from gateway.services import Services
    from gateway.settings import Settings
    from serving.fake import FakeBackendThread, FakeConfig
    from tests.conftest import make_settings

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    real_start = Services.start
    release = threading.Event()  # the app runs on the test client's own loop, in another thread

    async def slow_start(self: Services) -> None:
        await asyncio.to_thread(release.wait, 30)  # the models are "loading" until the test says so
        await real_start(self)

    async def first(settings: Settings) -> None:
        app = create_app(settings, start_in_background=True)
        started: list[bool] = []
        app.state.services.on_started = lambda: started.append(True)
        async with AsyncTestClient(app) as client:
            assert (await client.get("/healthz")).status_code == 200
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503 and readyz.json()["message"].startswith("loading guard models")
            models = await client.get("/v1/models")
            assert models.status_code == 503 and models.headers["retry-after"] == "5"
            assert models.json()["error"]["code"] == "starting"
            assert not started
            release.set()
            for _ in range(200):
                if started:
                    break
                await asyncio.sleep(0.05)
            assert started == [True]
            assert (await client.get("/v1/models")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200

    async def broken_start(self: Services) -> None:
        raise RuntimeError("policy file vanished")

    async def second(settings: Settings) -> None:
        app = create_app(settings, start_in_background=True)
        failures: list[bool] = []
        app.state.services.on_start_failed = lambda: failures.append(True)
        async with AsyncTestClient(app) as client:
            for _ in range(100):
                if failures:
                    break
                await asyncio.sleep(0.02)
            assert failures == [True] and "vanished" in str(app.state.services.start_error)
            assert (await client.get("/healthz")).status_code == 200

    monkeypatch.setattr(Services, "start", slow_start)
    with FakeBackendThread(FakeConfig(models=("fake-model",))) as fake:
        asyncio.run(first(make_settings(tmp_path, fake.url, open_mode=True)))
    monkeypatch.setattr(Services, "start", broken_start)
    asyncio.run(second(make_settings(tmp_path / "second", "http://127.0.0.1:9", open_mode=True)))
