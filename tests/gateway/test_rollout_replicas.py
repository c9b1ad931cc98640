"""Two replicas on one PostgreSQL database: a reload on one and a rollback from the CLI reach both
(each polls the live config version; here every 0.2 s, at most 30 s in production)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as gateway_main
from serving.fake import FakeBackendThread
from tests.gateway.test_rollout import MODELS, config_text, settings_from
from tests.helpers import PG_ADMIN, GatewayServer, create_key, throwaway_postgres


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeBackendThread]]:
    from serving.fake import FakeConfig

    threads = {name: FakeBackendThread(FakeConfig(models=(model,))) for name, model in MODELS.items()}
    for fake in threads.values():
        fake.__enter__()
    yield threads
    for fake in threads.values():
        fake.__exit__(None, None, None)


def wait_version(gateway: GatewayServer, version: str) -> None:
    deadline = time.monotonic() + 10
    while gateway.services.rollout.version != version and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.services.rollout.version == version


@pytest.mark.postgres
def test_reload_and_rollback_reach_every_replica(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    with throwaway_postgres("gw_rollout") as name:
        database = f"{PG_ADMIN}/{name}"
        config = tmp_path / "gateway.toml"
        config.write_text(config_text(fakes), encoding="utf-8")
        replicas = []
        for i in range(2):
            data_dir = tmp_path / f"replica{i}"
            data_dir.mkdir()
            replicas.append(settings_from(config, data_dir, database=database))
        _, admin = create_key(replicas[0], "admin")
        with GatewayServer(replicas[0]) as a, GatewayServer(replicas[1]) as b:
            first = a.services.rollout.version
            assert b.services.rollout.version == first

            config.write_text(config_text(fakes, blue=0.0001, green=100), encoding="utf-8")
            reply = httpx.post(a.url + "/admin/reload", headers={"authorization": f"Bearer {admin}"})
            assert reply.status_code == 200
            second = reply.json()["version"]
            wait_version(b, second)  # b never read the file: it followed the database
            answer = httpx.post(
                b.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {admin}"},
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert answer.headers["x-gateway-deployment"] == "green"

            assert gateway_main(["rollout", "rollback", first, "--database", database]) == 0
            wait_version(a, first)
            wait_version(b, first)
        # A replica that restarts with the (already stored) file follows the live version: the rollback stays.
        config.write_text(config_text(fakes, blue=0.0001, green=100), encoding="utf-8")
        with GatewayServer(settings_from(config, tmp_path / "replica0", database=database)) as again:
            assert again.services.rollout.version == first
