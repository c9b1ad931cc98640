"""Safe rollout end to end, with three fake backends (blue, green, candidate) behind one client model.

Weighted split within binomial bounds, stickiness, an admin-only forced deployment, failover to the
next deployment, live reload under load with no failed request, an invalid reload that changes
nothing, rollback picked up from the database, versions and deployments in the audit rows.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli import main as gateway_main
from gateway.settings import Settings, load_settings
from serving.fake import FakeBackendThread, FakeConfig
from tests.helpers import GatewayServer, audit_rows, create_key, prepare_database

MODELS = {"blue": "m-blue", "green": "m-green", "candidate": "m-candidate"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeBackendThread]]:
    threads = {name: FakeBackendThread(FakeConfig(models=(model,), answer_tokens=12)) for name, model in MODELS.items()}
    for fake in threads.values():
        fake.__enter__()
    yield threads
    for fake in threads.values():
        fake.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeBackendThread]) -> None:
    for fake in fakes.values():
        httpx.post(fake.url + "/fake/reset")


def dead_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def config_text(
    fakes: dict[str, FakeBackendThread],
    blue: float = 90,
    green: float = 10,
    shadow: float | None = None,
    sticky: str = "none",
    extra: str = "",
    blue_url: str | None = None,
) -> str:
    """The issue's exact TOML shape, pointed at the fakes."""
    text = f"""
sticky = "{sticky}"
config_poll = 0.2
{extra}
[[deployments]]
name = "blue"
model = "chat"                       # the name clients ask for
backend = "{blue_url or fakes["blue"].url}"
backend_model = "m-blue"
weight = {blue}

[[deployments]]
name = "green"
model = "chat"
backend = "{fakes["green"].url}"
backend_model = "m-green"
weight = {green}
"""
    if shadow is not None:
        text += f"""
[[deployments]]
name = "candidate"
model = "chat"
backend = "{fakes["candidate"].url}"
backend_model = "m-candidate"
shadow = {shadow}                        # share of requests copied to it; its answer is never returned
"""
    return text


def settings_from(path: Path, tmp_path: Path, **changes: Any) -> Settings:
    settings = load_settings(
        {"config": path, "data_dir": tmp_path, "embedding_model": "hashing", "sample_corpus": False}
    )
    settings = settings.replace(**changes)
    prepare_database(settings)
    return settings


_open: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


class Client:
    def __init__(self, gateway: GatewayServer, key: str) -> None:
        self.http = httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=30)
        _open.append(self.http)

    def chat(self, content: str = "hello", **extra: Any) -> httpx.Response:
        headers = extra.pop("headers", {})
        body = {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}
        return self.http.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture
def rollout(
    tmp_path: Path, fakes: dict[str, FakeBackendThread]
) -> Iterator[tuple[GatewayServer, Client, Client, Path]]:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(fakes), encoding="utf-8")
    settings = settings_from(path, tmp_path)
    _, key = create_key(settings, "client")
    _, admin = create_key(settings, "admin")
    with GatewayServer(settings) as gateway:
        yield gateway, Client(gateway, key), Client(gateway, admin), path


def stats(fake: FakeBackendThread) -> dict[str, int]:
    return httpx.get(fake.url + "/fake/stats").json()


def test_the_weight_split_over_1000_requests_is_within_binomial_bounds(
    rollout: tuple[GatewayServer, Client, Client, Path], fakes: dict[str, FakeBackendThread]
) -> None:
    _, client, _, _ = rollout
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.chat(f"question {i}"), range(1000)))
    assert all(a.status_code == 200 for a in answers)
    chosen = Counter(a.headers["x-gateway-deployment"] for a in answers)
    # The answer names the backend model that produced it, and the backends saw exactly that many.
    assert all(a.json()["model"] == MODELS[a.headers["x-gateway-deployment"]] for a in answers)
    assert stats(fakes["blue"])["requests"] == chosen["blue"]
    assert stats(fakes["green"])["requests"] == chosen["green"]
    # 90/10 over 1,000: mean 900, sd 9.5; 4.5 sd either side fails a correct router about once in 10^5 runs.
    sd = math.sqrt(1000 * 0.9 * 0.1)
    assert abs(chosen["blue"] - 900) <= 4.5 * sd, chosen
    assert chosen["blue"] + chosen["green"] == 1000


def test_the_audit_row_names_the_deployment_backend_model_and_versions(
    rollout: tuple[GatewayServer, Client, Client, Path],
) -> None:
    gateway, client, _, _ = rollout
    answer = client.chat("which one")
    request_id = answer.headers["x-gateway-request-id"]
    [row] = audit_rows(gateway.settings, request_id=request_id)
    assert row["deployment"] == answer.headers["x-gateway-deployment"]
    assert row["backend_model"] == MODELS[row["deployment"]]
    assert row["model"] == "chat" and row["shadow_of"] is None
    version = gateway.services.rollout.version
    assert row["config_version"] == version and len(version) == 12
    assert row["policy_version"] == "default" and row["gateway_version"]
    assert answer.json()["gateway"]["deployment"] == row["deployment"]
    streamed = client.chat("stream it", stream=True)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: {")]
    last = json.loads(events[-1])
    assert last["gateway"]["deployment"] == streamed.headers["x-gateway-deployment"]
    [row] = audit_rows(gateway.settings, request_id=last["gateway"]["request_id"])
    assert row["deployment"] == last["gateway"]["deployment"] and row["stream"] is True
    # A refused request has its versions too.
    refused = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "chat"}, headers={"authorization": "Bearer nope"}
    )
    [row] = audit_rows(gateway.settings, request_id=refused.headers["x-gateway-request-id"])
    assert row["status"] == "unauthorized" and row["config_version"] == version


def test_sticky_by_user_gives_one_user_one_variant(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(fakes, blue=50, green=50, sticky="user"), encoding="utf-8")
    settings = settings_from(path, tmp_path)
    _, key = create_key(settings, "client")
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        seen: dict[str, set[str]] = {}
        for user in range(40):
            for attempt in range(4):
                answer = client.chat(f"q{attempt}", user=f"user-{user}")
                seen.setdefault(f"user-{user}", set()).add(answer.headers["x-gateway-deployment"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    split = Counter(next(iter(v)) for v in seen.values())
    assert split["blue"] and split["green"]  # 40 users at 50/50: both variants are used


def test_sticky_by_key_gives_one_key_one_variant(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(fakes, blue=50, green=50, sticky="key"), encoding="utf-8")
    settings = settings_from(path, tmp_path)
    keys = [create_key(settings, "client")[1] for _ in range(12)]
    with GatewayServer(settings) as gateway:
        per_key = [{Client(gateway, k).chat(f"q{i}").headers["x-gateway-deployment"] for i in range(5)} for k in keys]
    assert all(len(variants) == 1 for variants in per_key), per_key
    assert {next(iter(v)) for v in per_key} == {"blue", "green"}  # 12 keys at 50/50: both appear


def test_only_an_admin_may_force_a_deployment(
    rollout: tuple[GatewayServer, Client, Client, Path], fakes: dict[str, FakeBackendThread]
) -> None:
    gateway, client, admin, _ = rollout
    forced = [admin.chat(f"q{i}", headers={"x-gateway-deployment": "green"}) for i in range(10)]
    assert {a.headers["x-gateway-deployment"] for a in forced} == {"green"}
    assert stats(fakes["green"])["requests"] == 10

    refused = client.chat("let me pick", headers={"x-gateway-deployment": "green"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "deployment_forbidden"
    [row] = audit_rows(gateway.settings, request_id=refused.headers["x-gateway-request-id"])
    assert row["status"] == "unauthorized" and row["http_status"] == 403
    assert stats(fakes["green"])["requests"] == 10  # the refused request never reached a backend

    unknown = admin.chat("x", headers={"x-gateway-deployment": "purple"})
    assert unknown.status_code == 404 and "purple" in unknown.json()["error"]["message"]


def test_a_dead_deployment_fails_over_to_the_next_one(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(fakes, blue=99, green=1, blue_url=dead_url()), encoding="utf-8")
    settings = settings_from(path, tmp_path)
    _, key = create_key(settings, "client")
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        answers = [client.chat(f"q{i}") for i in range(10)]
        streamed = client.chat("stream", stream=True)
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.headers["x-gateway-deployment"] for a in answers} == {"green"}
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


def test_failover_inside_a_deployment_comes_first(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    text = config_text(fakes, blue=99, green=1).replace(
        f'backend = "{fakes["blue"].url}"', f'backends = ["{dead_url()}", "{fakes["blue"].url}"]'
    )
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    settings = settings_from(path, tmp_path)
    _, key = create_key(settings, "client")
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        answers = [client.chat(f"q{i}", headers={}) for i in range(20)]
    assert all(a.status_code == 200 for a in answers)
    assert Counter(a.headers["x-gateway-deployment"] for a in answers)["blue"] >= 15


def test_reload_under_concurrent_load_fails_no_request(
    rollout: tuple[GatewayServer, Client, Client, Path], fakes: dict[str, FakeBackendThread]
) -> None:
    gateway, client, admin, path = rollout
    before = gateway.services.rollout.version
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load(worker: int) -> None:
        http = Client(gateway, client.http.headers["authorization"].removeprefix("Bearer "))
        i = 0
        while not stop.is_set():
            answer = http.chat(f"load {worker} {i}", stream=i % 2 == 1)
            results.append((answer.status_code, answer.headers.get("x-gateway-deployment")))
            i += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for w in workers:
        w.start()

    def answered(count: int) -> None:  # paced by answers, not time: a busy machine answers slowly
        deadline = time.monotonic() + 30
        while len(results) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        for n, (blue, green) in enumerate(((0.0001, 100), (100, 0.0001), (0.0001, 100))):
            answered(6 * (n + 1))
            path.write_text(config_text(fakes, blue=blue, green=green), encoding="utf-8")
            reply = admin.http.post("/admin/reload")
            assert reply.status_code == 200, reply.text
            assert reply.json()["changed"] is True
        answered(24)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert len(results) > 20  # requests before, between and after the three reloads
    assert [r for r in results if r[0] != 200] == []
    assert gateway.services.rollout.version != before
    after = [client.chat(f"after {i}").headers["x-gateway-deployment"] for i in range(20)]
    assert Counter(after)["green"] >= 19  # the last config (green 100) serves


def test_an_invalid_reload_is_rejected_and_the_old_config_keeps_serving(
    rollout: tuple[GatewayServer, Client, Client, Path], fakes: dict[str, FakeBackendThread]
) -> None:
    gateway, client, admin, path = rollout
    version = gateway.services.rollout.version
    path.write_text(config_text(fakes).replace("weight = 90", 'weight = "lots"'), encoding="utf-8")
    reply = admin.http.post("/admin/reload")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "invalid_config"
    assert "'weight' must be a number" in error["message"] and str(path) in error["message"]
    assert gateway.services.rollout.version == version
    assert client.chat("still there").status_code == 200

    path.write_text(
        config_text(fakes) + "\n[[deployments]]\nname = 'orphan'\nmodel = 'x'\nbackend = 'http://h:1'\nshadow = 0.5\n"
    )
    reply = admin.http.post("/admin/reload")
    assert reply.status_code == 400 and "only shadow deployments" in reply.json()["error"]["message"]

    policy = path.parent / "policy.toml"
    policy.write_text('[guards.keywords]\naction = "obliterate"\n', encoding="utf-8")
    path.write_text(config_text(fakes, extra=f'policy = "{policy}"'), encoding="utf-8")
    reply = admin.http.post("/admin/reload")
    assert reply.status_code == 400 and "policy.toml:2" in reply.json()["error"]["message"]
    described = admin.http.get("/admin/config").json()
    assert described["config_version"] == version and described["failed_reloads"] == 3
    assert "policy.toml:2" in described["last_error"]

    assert client.http.post("/admin/reload").status_code == 403  # admins only


def test_rollback_is_picked_up_from_the_database(
    rollout: tuple[GatewayServer, Client, Client, Path],
    fakes: dict[str, FakeBackendThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway, client, admin, path = rollout
    first = gateway.services.rollout.version
    path.write_text(config_text(fakes, blue=0.0001, green=100), encoding="utf-8")
    assert admin.http.post("/admin/reload").status_code == 200
    second = gateway.services.rollout.version
    assert second != first
    database = ["--database", gateway.settings.database or f"sqlite:///{gateway.settings.data_dir / 'gateway.db'}"]

    assert gateway_main(["rollout", "history", *database]) == 0
    history = capsys.readouterr().out
    assert "* " in history and second in history and first in history

    assert gateway_main(["rollout", "rollback", *database]) == 0  # default: the one before the live one
    assert first in capsys.readouterr().out
    deadline = time.monotonic() + 10
    while gateway.services.rollout.version != first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.services.rollout.version == first  # config_poll is 0.2 s here (at most 30 s allowed)
    assert Counter(client.chat(f"q{i}").headers["x-gateway-deployment"] for i in range(30))["blue"] >= 15

    assert gateway_main(["rollout", "rollback", second[:6], *database]) == 0
    deadline = time.monotonic() + 10
    while gateway.services.rollout.version != second and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.services.rollout.version == second
    assert gateway_main(["rollout", "rollback", "ffffffffffff", *database]) == 1


@pytest.fixture(scope="module")
def slow_candidate() -> Iterator[FakeBackendThread]:
    # 10 s: the two copies in flight must outlast the test's ten requests on a slow, busy machine.
    with FakeBackendThread(FakeConfig(models=("m-candidate",), delay_ms=10_000)) as fake:
        yield fake


def shadowed(
    tmp_path: Path, fakes: dict[str, FakeBackendThread], candidate_url: str, **extra: Any
) -> tuple[Settings, str, str]:
    text = config_text(fakes, shadow=1.0).replace(
        f'backend = "{fakes["candidate"].url}"', f'backend = "{candidate_url}"'
    )
    text = "".join(f"{k} = {v}\n" for k, v in extra.items()) + text
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    settings = settings_from(path, tmp_path)
    return settings, create_key(settings, "client")[1], create_key(settings, "admin")[1]


def wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_shadow_copies_are_counted_at_the_shadow_and_never_returned(
    tmp_path: Path, fakes: dict[str, FakeBackendThread]
) -> None:
    settings, key, admin = shadowed(tmp_path, fakes, fakes["candidate"].url)
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        answers = [client.chat(f"question {i}", stream=i % 2 == 1) for i in range(20)]
        assert all(a.status_code == 200 for a in answers)
        assert "m-candidate" not in "".join(a.text for a in answers)
        assert {a.headers["x-gateway-deployment"] for a in answers} <= {"blue", "green"}
        wait_for(lambda: stats(fakes["candidate"])["completed"] == 20)
        assert stats(fakes["candidate"])["requests"] == 20
        wait_for(lambda: len(audit_rows(settings, deployment="candidate")) == 20)
        metrics = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {admin}"}).text
    copies = audit_rows(settings, deployment="candidate")
    primaries = {r["request_id"]: r for r in audit_rows(settings) if r["shadow_of"] is None}
    assert len(copies) == 20 and {c["shadow_of"] for c in copies} <= set(primaries)
    for copy in copies:
        primary = primaries[copy["shadow_of"]]
        assert copy["backend_model"] == "m-candidate" and copy["model"] == "chat" and copy["status"] == "ok"
        assert copy["response_text"] and copy["stream"] is False
        assert copy["guards_json"] is not None  # the same output guards ran on the copy
        assert copy["config_version"] == primary["config_version"] and copy["api_key_id"] == primary["api_key_id"]
    assert 'gateway_shadow_copies_total{deployment="candidate",outcome="completed"} 20.0' in metrics


def test_a_slow_shadow_costs_the_client_nothing_and_is_bounded(
    tmp_path: Path, fakes: dict[str, FakeBackendThread], slow_candidate: FakeBackendThread
) -> None:
    settings, key, admin = shadowed(tmp_path, fakes, slow_candidate.url, shadow_max_in_flight=2)
    httpx.post(slow_candidate.url + "/fake/reset")
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        with_shadow = []
        for i in range(10):
            began = time.perf_counter()
            assert client.chat(f"q{i}").status_code == 200
            with_shadow.append(time.perf_counter() - began)
        described = Client(gateway, admin).http.get("/admin/config").json()["shadow"]
        # The same gateway without the shadow, in the same run: its latency is the yardstick.
        (tmp_path / "gateway.toml").write_text(config_text(fakes), encoding="utf-8")
        assert Client(gateway, admin).http.post("/admin/reload").status_code == 200
        without = []
        for i in range(10):
            began = time.perf_counter()
            assert client.chat(f"q{i}").status_code == 200
            without.append(time.perf_counter() - began)
    # A copy takes 10 s at the shadow; on the client's path the median would be 10 s above the other.
    assert statistics.median(with_shadow) < statistics.median(without) + 1.0, (with_shadow, without)
    assert described["by_deployment"]["candidate"]["sent"] == 2  # the bound: 2 in flight...
    assert described["by_deployment"]["candidate"]["dropped"] == 8  # ...the rest dropped and counted
    assert stats(slow_candidate)["requests"] == 2


def test_a_dead_shadow_costs_the_client_nothing(tmp_path: Path, fakes: dict[str, FakeBackendThread]) -> None:
    settings, key, _ = shadowed(tmp_path, fakes, dead_url())
    with GatewayServer(settings) as gateway:
        client = Client(gateway, key)
        answers = [client.chat(f"q{i}", stream=i % 2 == 1) for i in range(10)]
        assert [a.status_code for a in answers] == [200] * 10
        wait_for(lambda: len(audit_rows(settings, deployment="candidate")) == 10)
    copies = audit_rows(settings, deployment="candidate")
    assert len(copies) == 10
    assert {c["status"] for c in copies} == {"backend_error"} and {c["error_code"] for c in copies} == {
        "backend_unavailable"
    }
