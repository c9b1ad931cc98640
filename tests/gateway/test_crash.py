"""Kill -9 the gateway under load: every response a client fully received has its audit record."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.helpers import audit_rows, create_key, prepare_database

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load(url: str, key: str, received: list[str], stop: asyncio.Event) -> None:
    """16 workers alternate plain and streamed chats until the gateway dies."""
    headers = {"authorization": f"Bearer {key}"}

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            stream = (i + n) % 2 == 0
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"w{i} r{n}"}], "stream": stream}
            try:
                async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    raw = await resp.read()  # raises if the connection dies before the end
                    if resp.status != 200:
                        continue
                    if stream:
                        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
                        if not events or events[-1] != "[DONE]":
                            continue  # not fully received
                        received.append(json.loads(events[-2])["gateway"]["request_id"])
                    else:
                        received.append(json.loads(raw)["gateway"]["request_id"])
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, KeyError):
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(i, session) for i in range(16)))


@pytest.mark.slow
def test_sigkill_under_load_loses_no_received_response(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    settings = Settings(data_dir=tmp_path, backend=(fake_backend.url,), embedding_model="hashing")
    prepare_database(settings)
    _, key = create_key(settings)
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_DATA_DIR": str(tmp_path),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--backend", fake_backend.url, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the models load first: 30 s was not enough at load 6
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:  # listening and models loaded
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)

        received: list[str] = []

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(load(url, key, received, stop))
            while len(received) < 300:  # noqa: ASYNC110 - polls a plain list the workers fill
                await asyncio.sleep(0.005)
            os.kill(process.pid, signal.SIGKILL)  # mid-load: requests are in flight right now
            await asyncio.sleep(0.5)
            stop.set()
            await task

        asyncio.run(scenario())
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    stored = {row["request_id"] for row in audit_rows(settings)}
    missing = [rid for rid in received if rid not in stored]
    assert len(received) >= 300
    assert missing == []
