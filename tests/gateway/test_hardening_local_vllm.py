"""`gateway serve` without a backend starts a local vLLM; no way out of the gateway may leave it running.

The real vLLM takes minutes to start, so a stand-in takes its place: a small HTTP server that
answers `/health` like vLLM and writes its pid to a file. A driver script swaps it in for the vLLM
command and then runs the real `gateway serve` (`gateway.cli.main`) in a process of its own,
which the tests stop with SIGTERM, SIGINT or SIGKILL, or make crash at start-up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

STAND_IN = """
import http.server, os, sys
port, pid_file = int(sys.argv[1]), sys.argv[2]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "test"}]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Handler)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
server.serve_forever()
"""

DRIVER = """
import sys
from serving import local
from gateway import cli

stand_in, vllm_port, pid_file = sys.argv[1], sys.argv[2], sys.argv[3]
local.LocalVLLM.prepare = lambda self: self.model_dir  # nothing to prepare for the stand-in
local.LocalVLLM.command = lambda self: [sys.executable, stand_in, vllm_port, pid_file]
sys.exit(cli.main(sys.argv[4:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    pid_file: Path
    url: str
    log: Path

    def child_pid(self) -> int:
        wait_until(self.pid_file.exists, 60, "the stand-in vLLM never started")
        return int(self.pid_file.read_text())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Start `gateway serve` (no backend) with the stand-in; clean up whatever a failed test leaves."""
    started: list[Served] = []

    def start(port: int | None = None) -> Served:
        (tmp_path / "stand_in.py").write_text(textwrap.dedent(STAND_IN))
        (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
        pid_file = tmp_path / f"child-{len(started)}.pid"
        port = port or free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GATEWAY_DATA_DIR": str(tmp_path),
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_RAG": "false",
            "GATEWAY_LOCAL_VLLM_PORT": str(free_port()),
        }
        command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "stand_in.py")]
        command += [env["GATEWAY_LOCAL_VLLM_PORT"], str(pid_file)]
        command += ["serve", "--open", "--port", str(port), "--policy", str(ROOT / "benchmarks/guards-off.toml")]
        log = tmp_path / f"gateway-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        served = Served(process, pid_file, f"http://127.0.0.1:{port}", log)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(10)
        if served.pid_file.exists():
            pid = int(served.pid_file.read_text())
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def wait_serving(served: Served) -> None:
    def up() -> bool:
        assert served.process.poll() is None, served.log.read_text()[-2000:]
        try:
            return httpx.get(served.url + "/readyz").status_code == 200  # listening, models loaded
        except httpx.TransportError:
            return False

    wait_until(up, 90, "the gateway did not start")


@pytest.mark.slow
# SIGTERM is a graceful stop (nothing was in flight, so the drain completes): exit 0; Ctrl-C stays 130.
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_stopping_the_gateway_stops_the_local_vllm(serve: object, signum: int, exit_code: int) -> None:
    served: Served = serve()  # type: ignore[operator]
    child = served.child_pid()
    wait_serving(served)
    assert httpx.get(served.url + "/v1/models").json()["data"][0]["id"] == "stand-in"  # really served by it
    served.process.send_signal(signum)
    assert served.process.wait(60) == exit_code
    assert not alive(child), "the local vLLM outlived the gateway"


@pytest.mark.slow
def test_a_crash_at_start_up_stops_the_local_vllm(serve: object) -> None:
    with socket.socket() as taken:  # the gateway's port is taken: uvicorn cannot bind and gives up
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        served: Served = serve(port=taken.getsockname()[1])  # type: ignore[operator]
        child = served.child_pid()
        assert served.process.wait(90) != 0
    assert not alive(child), "the local vLLM outlived the gateway"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_even_sigkill_of_the_gateway_ends_the_local_vllm(serve: object) -> None:
    served: Served = serve()  # type: ignore[operator]
    child = served.child_pid()
    wait_serving(served)
    served.process.kill()
    served.process.wait(10)
    wait_until(lambda: not alive(child), 30, "the local vLLM outlived a SIGKILLed gateway")
