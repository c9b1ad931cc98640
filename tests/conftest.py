"""Shared fixtures: a fake backend (a real HTTP server on loopback) and a gateway in front of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from serving.fake import FakeBackendThread, FakeConfig
from tests.helpers import GatewayServer, create_key, prepare_database

#: One ONNX export cache for every gateway the tests start (in this process or as `gateway serve`
#: subprocesses, which inherit the variable): the MiniLM is exported and checked once (about 10 s
#: and a PyTorch import), not once per fresh data dir. It is the default gateway's own cache.
TEST_ONNX_CACHE = Path(__file__).resolve().parents[1] / "data" / "onnx"
os.environ.setdefault("GATEWAY_ONNX_CACHE", str(TEST_ONNX_CACHE))
#: `gateway serve` subprocesses run one process, as the tests expect of them, unless a test asks
#: for workers (`--workers N` beats this variable; tests/gateway/test_workers.py tests "auto").
os.environ.setdefault("GATEWAY_WORKERS", "1")


@pytest.fixture(scope="session")
def fake_backend() -> Iterator[FakeBackendThread]:
    with FakeBackendThread(FakeConfig(models=("fake-model", "other-model"), answer_tokens=16)) as fake:
        yield fake


@pytest.fixture(scope="session")
def slow_backend() -> Iterator[FakeBackendThread]:
    """Streams 20 tokens/s, 60 tokens: long enough to disconnect from mid-stream."""
    with FakeBackendThread(FakeConfig(models=("fake-model",), tokens_per_s=20, answer_tokens=60)) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> None:
    for name in ("fake_backend", "slow_backend"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            httpx.post(fake.url + "/fake/reset")


def make_settings(tmp_path: Path, backend: str, **changes: object) -> Settings:
    """Settings for a test gateway: the fast fake embedder and no sample corpus unless asked for."""
    values: dict[str, object] = {
        "embedding_model": "hashing",
        "sample_corpus": False,
        "onnx_cache": Path(os.environ["GATEWAY_ONNX_CACHE"]),
        **changes,
    }
    settings = Settings(data_dir=tmp_path, backend=(backend,), **values)  # type: ignore[arg-type]
    prepare_database(settings)
    return settings


@pytest.fixture
def settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return make_settings(tmp_path, fake_backend.url)


@pytest.fixture
def client_key(settings: Settings) -> tuple[str, str]:
    return create_key(settings, "client", "tests")


@pytest.fixture
def gateway(settings: Settings, client_key: tuple[str, str]) -> Iterator[GatewayServer]:
    with GatewayServer(settings) as server:
        yield server
