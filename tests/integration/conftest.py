"""The integration suite's real CPU vLLM with the bundled model, started once per test session.

Set GATEWAY_TEST_VLLM_URL to reuse a vLLM that is already running (serving
`smollm2-135m-instruct`); otherwise the suite prepares the model under GATEWAY_TEST_DATA_DIR
(default: the repo's ./data, where setup.sh put it) and starts vLLM on a free port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.local import REPO_ROOT, LocalVLLM, stop_process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_url() -> Iterator[str]:
    existing = os.environ.get("GATEWAY_TEST_VLLM_URL")
    if existing:
        yield existing.rstrip("/")
        return
    data_dir = Path(os.environ.get("GATEWAY_TEST_DATA_DIR", REPO_ROOT / "data"))
    local = LocalVLLM(data_dir, port=_free_port())
    log_path = data_dir / "vllm-tests.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    process = local.start(log_path)
    try:
        local.wait_ready(process, timeout_s=900)
        yield local.url
    finally:
        stop_process(process)
