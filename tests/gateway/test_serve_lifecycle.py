"""`gateway serve` as a process: a SIGTERM drains what is in flight and exits 0; start-up errors are one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.helpers import audit_rows

ROOT = Path(__file__).resolve().parents[2]
GUARDS_OFF = ROOT / "benchmarks/guards-off.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_LOG_LEVEL": "warning"}
    env |= {"GATEWAY_RAG": "false", "GATEWAY_METRICS": "off"}
    return env | {f"GATEWAY_{name.upper()}": value for name, value in settings.items()}


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def ready(url: str) -> bool:
    """`gateway serve` listens first and loads its models after: ready is /readyz 200."""
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=5)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_finishes_the_stream_in_flight_commits_its_audit_row_and_exits_0(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", fake_backend.url]
    command += ["--port", str(port), "--policy", str(GUARDS_OFF)]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=gateway_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return ready(url)

        wait_until(up, 90, "the gateway did not start")
        # The backend sends the first event at once, then the rest a byte every few milliseconds:
        # the stream is still in flight for seconds after the first event arrives.
        body = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "drain me"}],
            "stream": True,
            "fake": {"answer": "one two three four", "trickle_ms": 4, "trickle_after": 1},
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as answer:
            assert answer.status_code == 200
            chunks = answer.iter_bytes()
            received = next(chunks)
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(url), 30, "the gateway still accepts connections after SIGTERM")
            received += b"".join(chunks)
        events = [line[6:] for line in received.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"  # the whole stream, not a cut one
        chunks_json = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks_json if c.get("choices"))
        assert text == "one two three four"
        request_id = json.loads(events[-2])["gateway"]["request_id"]
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    settings = Settings(data_dir=tmp_path)
    rows = audit_rows(settings, request_id=request_id)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["stream"]


@pytest.mark.slow
def test_an_unreachable_database_at_start_up_is_one_line_and_exit_1(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", "http://127.0.0.1:9"]
    command += ["--database", f"postgresql://gateway@127.0.0.1:{closed}/gateway", "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, env=gateway_env(tmp_path), capture_output=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert lines[0].startswith(f"gateway: cannot reach the database at postgresql+asyncpg://gateway@127.0.0.1:{closed}")
    assert "Traceback" not in done.stdout.decode()


@pytest.mark.slow
def test_a_stream_longer_than_the_grace_is_cut_audited_and_the_exit_is_not_0(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", fake_backend.url]
    command += ["--port", str(port), "--policy", str(GUARDS_OFF)]
    env = gateway_env(tmp_path, shutdown_grace="1")
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return ready(url)

        wait_until(up, 90, "the gateway did not start")
        body = {  # the rest of this stream takes minutes: far past the 1 s of grace
            "model": "fake-model",
            "messages": [{"role": "user", "content": "too slow"}],
            "stream": True,
            "fake": {"answer": " ".join(["word"] * 200), "trickle_ms": 100, "trickle_after": 1},
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as answer:
            request_id = answer.headers["x-gateway-request-id"]
            chunks = answer.iter_bytes()
            next(chunks)
            process.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # cut: the connection ends before the stream does
                b"".join(chunks)
        assert process.wait(60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (record,) = audit_rows(Settings(data_dir=tmp_path), request_id=request_id)  # committed on the way out
    assert record["status"] == "client_disconnected"  # to the pipeline, a cut stream is a stream cut


def test_with_migrate_on_start_off_an_unmigrated_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", "http://127.0.0.1:9"]
    command += ["--port", str(free_port())]
    env = gateway_env(tmp_path, migrate_on_start="false")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines() == [
        f"gateway: the database at sqlite+aiosqlite:///{tmp_path / 'gateway.db'} is not at the newest schema "
        "revision and migrate_on_start is off: run `gateway db upgrade` (the migration Job) first"
    ]


def test_the_new_settings_are_read_and_checked() -> None:
    from gateway.settings import SettingsError, load_settings

    settings = load_settings(environ={"GATEWAY_SHUTDOWN_GRACE": "12.5", "GATEWAY_MIGRATE_ON_START": "false"})
    assert (settings.shutdown_grace, settings.migrate_on_start) == (12.5, False)
    assert (Settings().shutdown_grace, Settings().migrate_on_start) == (30.0, True)
    with pytest.raises(SettingsError, match="shutdown_grace"):
        load_settings(environ={"GATEWAY_SHUTDOWN_GRACE": "-1"})
