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
