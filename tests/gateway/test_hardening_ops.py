"""Operating edges over HTTP: request ids on every response, OpenAI error bodies for the server's own
errors, `/readyz` details for admins only, and backends that come up late or lack `/health`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from aiohttp import web
from litestar.exceptions import ValidationException

from gateway.app import _http_error, create_app
from gateway.httpserver import GatewayHttpToolsProtocol
from gateway.settings import Settings
from serving.fake import FakeBackend, FakeBackendThread, FakeConfig
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    assert "error" in resp.json()  # (plus "gateway" with the verdicts when guards ran)
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["code"] == code
    assert len(resp.headers["x-gateway-request-id"]) == 32


# --- 13: every response carries x-gateway-request-id; errors name their audit row ------------------


def test_error_responses_carry_the_request_id_of_their_audit_row(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    auth = bearer(client_key[1])
    answers = [
        httpx.post(gateway.url + "/v1/chat/completions", content=b"{not json", headers=auth),
        httpx.post(gateway.url + "/v1/chat/completions", json={**CHAT, "model": "no-such-model"}, headers=auth),
        httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=bearer("sk-gw-wrong")),
        httpx.post(gateway.url + "/v1/chat/completions", json={**CHAT, "fake": {"status": 500}}, headers=auth),
    ]
    assert [r.status_code for r in answers] == [400, 404, 401, 502]
    rows = audit_rows(settings)
    assert [r.headers["x-gateway-request-id"] for r in answers] == [row["request_id"] for row in rows]


def test_responses_outside_the_pipeline_carry_a_request_id(gateway: GatewayServer, client_key: tuple[str, str]) -> None:
    answers = [
        httpx.get(gateway.url + "/healthz"),
        httpx.get(gateway.url + "/readyz"),
        httpx.get(gateway.url + "/v1/models", headers=bearer(client_key[1])),
        httpx.get(gateway.url + "/v1/models"),  # 401
    ]
    ids = [r.headers.get("x-gateway-request-id") for r in answers]
    assert all(i and len(i) == 32 for i in ids) and len(set(ids)) == len(ids)


def test_the_servers_own_errors_use_the_openai_body(gateway: GatewayServer) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/nothing-here"), 404, "not_found")
    wrong_method = httpx.get(gateway.url + "/v1/chat/completions")
    assert_openai_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]  # the exception's own headers are kept
    bad_form = httpx.post(
        gateway.url + "/review/login", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
    )
    assert_openai_error(bad_form, 400, "invalid_request")


def test_a_validation_error_names_the_parameter() -> None:
    exc = ValidationException("Validation failed for GET /x", extra=[{"key": "limit", "message": "expected int"}])
    resp = _http_error(None, exc)  # type: ignore[arg-type]
    assert resp.status_code == 400 and resp.headers["x-gateway-request-id"]
    assert b"limit: expected int" in resp.content  # type: ignore[operator]


@contextmanager
def served_with_gateway_protocol(settings: Settings) -> Iterator[int]:
    """The app behind the HTTP protocol `gateway serve` uses."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, loop="asyncio", http=GatewayHttpToolsProtocol, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_malformed_http_gets_an_openai_error_body(settings: Settings) -> None:
    with served_with_gateway_protocol(settings) as port, socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"NOT\x00HTTP / HTTP/1.1\r\n\r\n")
        raw = b""
        while chunk := conn.recv(4096):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head and b"x-gateway-request-id: " in head
    error = httpx.Response(400, content=body).json()["error"]
    assert error["code"] == "invalid_http" and error["type"] == "invalid_request_error"


# --- 16: /readyz shows details to admins only -------------------------------------------------------


def test_readyz_shows_details_to_admins_only(gateway: GatewayServer, settings: Settings) -> None:
    _, client = create_key(settings, "client")
    _, reviewer = create_key(settings, "reviewer")
    _, admin = create_key(settings, "admin")
    for headers in ({}, bearer(client), bearer(reviewer), bearer("sk-gw-wrong"), {"authorization": "Basic x"}):
        resp = httpx.get(gateway.url + "/readyz", headers=headers)
        assert (resp.status_code, resp.json()) == (200, {"status": "ready"}), headers
    details = httpx.get(gateway.url + "/readyz", headers=bearer(admin))
    assert details.status_code == 200 and details.json()["status"] == "ready"
    assert details.json()["backends"][0]["url"] == settings.backend[0]
    assert "guardrails" in details.json() and "models" in details.json()


def test_readyz_not_ready_is_minimal_without_an_admin_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"http://127.0.0.1:{free_port()}")
    with GatewayServer(settings) as gw:
        resp = httpx.get(gw.url + "/readyz")
    assert (resp.status_code, resp.json()) == (503, {"status": "not_ready"})


# --- 15, 18: a backend that comes up late; a backend without /health -------------------------------


def test_a_backend_that_comes_up_after_the_gateway_is_ready_and_listed_at_once(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there when the gateway starts
    settings = make_settings(tmp_path, f"http://127.0.0.1:{port}", open_mode=True)
    with GatewayServer(settings) as gw:
        assert httpx.get(gw.url + "/readyz").status_code == 503
        with FakeBackendThread(FakeConfig(models=("fake-model",)), port=port):
            ready = httpx.get(gw.url + "/readyz")
            assert ready.status_code == 200 and ready.json()["models"] == ["fake-model"]
            assert "fake-model" in [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]]
            missing = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "no-such-model"})
            assert_openai_error(missing, 404, "model_not_found")


def test_an_unknown_model_is_model_not_found_while_the_model_map_is_unknown(tmp_path: Path) -> None:
    """The backend was down at start, so no model map; a model miss is still `model_not_found`, not "404"."""
    port = free_port()
    settings = make_settings(tmp_path, f"http://127.0.0.1:{port}", open_mode=True)
    with GatewayServer(settings) as gw, FakeBackendThread(FakeConfig(models=("fake-model",)), port=port):
        missing = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "no-such-model"})
        assert_openai_error(missing, 404, "model_not_found")
        assert missing.json()["error"]["param"] == "model"
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200


@pytest.fixture
def backend_without_health() -> Iterator[str]:
    """An OpenAI-compatible server with no `/health` route (the fake's handlers, minus that one)."""
    fake = FakeBackend(FakeConfig(models=("fake-model",)))
    app = web.Application()
    app.add_routes([web.get("/v1/models", fake._models), web.post("/v1/chat/completions", fake._chat)])
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_a_backend_without_a_health_route_is_ready(tmp_path: Path, backend_without_health: str) -> None:
    settings = make_settings(tmp_path, backend_without_health, open_mode=True)
    with GatewayServer(settings) as gw:
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["backends"] == [{"url": backend_without_health, "healthy": True}]
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
