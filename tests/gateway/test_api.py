"""The OpenAI-compatible API end to end: openai SDK -> gateway -> fake backend, and the audit row of each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import msgspec
import openai
import pytest

from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.helpers import GatewayServer, audit_rows

_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def sdk(gateway: GatewayServer, key: str) -> openai.OpenAI:
    """A stock OpenAI client pointed at the gateway (no retries, so every failure shows)."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)
    _clients.append(client)
    return client


def received(fake: FakeBackendThread) -> list[dict]:
    return httpx.get(fake.url + "/fake/requests").json()


def test_chat_completion_answers_and_is_audited(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    key_id, key = client_key
    response = sdk(gateway, key).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Tell me about audits"}], temperature=0.2
    )
    completion = response.parse()
    request_id = response.headers["x-gateway-request-id"]
    assert completion.choices[0].finish_reason == "stop"
    assert len(completion.choices[0].message.content.split()) == 16
    assert completion.usage.completion_tokens == 16  # the backend's own figures
    assert completion.model_extra["gateway"]["request_id"] == request_id

    # The record is committed before the client got its bytes: no waiting here.
    [row] = audit_rows(settings, request_id=request_id)
    assert row["status"] == "ok" and row["http_status"] == 200
    assert row["api_key_id"] == key_id
    assert row["model"] == "fake-model" and row["endpoint"] == "chat.completions" and row["stream"] is False
    assert json.loads(row["request_json"]) == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Tell me about audits"}],
        "temperature": 0.2,
    }
    assert row["response_text"] == completion.choices[0].message.content
    assert row["finish_reason"] == "stop"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (4, 16, 20)
    assert row["backend_ms"] > 0 and row["gateway_ms"] >= 0 and row["total_ms"] >= row["backend_ms"]
    assert row["ttft_ms"] is None
    assert row["created_at"] <= row["finished_at"]


def test_streaming_chat_with_usage_ends_with_done(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    key = client_key[1]
    chunks = list(
        sdk(gateway, key).chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    request_id = chunks[-1].model_extra["gateway"]["request_id"]
    [row] = audit_rows(settings, request_id=request_id)
    assert row["stream"] is True and row["status"] == "ok"
    assert row["response_text"] == text
    assert row["finish_reason"] == "stop" and row["completion_tokens"] == 16
    assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["total_ms"]

    # On the wire: server-sent events closed by [DONE].
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    final = json.loads(events[-2][6:])
    assert final["choices"][0]["finish_reason"] == "stop" and "gateway" in final


def test_streaming_without_usage_never_sends_an_empty_choices_chunk(
    gateway: GatewayServer, client_key: tuple[str, str]
) -> None:
    # A stock client indexes chunk.choices[0] on every chunk; an empty list would crash it.
    chunks = list(
        sdk(gateway, client_key[1]).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert "gateway" in chunks[-1].model_extra


def test_completions_and_models(gateway: GatewayServer, client_key: tuple[str, str], settings: Settings) -> None:
    client = sdk(gateway, client_key[1])
    completion = client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=5)
    assert len(completion.choices[0].text.split()) == 5 and completion.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="fake-model", prompt="Once", stream=True))
    assert len("".join(c.choices[0].text for c in streamed).split()) == 16
    models = client.models.list().data
    assert {m.id for m in models if m.owned_by != "gateway"} == {"fake-model", "other-model"}  # the backend's
    assert [m.model_extra["kind"] for m in models if m.owned_by == "gateway"] == ["embedding"]  # /v1/embeddings
    rows = audit_rows(settings, endpoint="completions")
    assert [r["stream"] for r in rows] == [False, True]
    assert rows[0]["response_text"] == completion.choices[0].text and rows[0]["finish_reason"] == "length"


def test_unknown_fields_and_sampling_parameters_reach_the_backend_untouched(
    gateway: GatewayServer, client_key: tuple[str, str], fake_backend: FakeBackendThread
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    completion = sdk(gateway, client_key[1]).chat.completions.create(
        model="fake-model",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        n=2,
        temperature=0.7,
        top_p=0.9,
        max_tokens=8,
        stop=["\n\n"],
        seed=42,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
        tools=tools,
        tool_choice="auto",
        extra_body={"top_k": 20, "repetition_penalty": 1.1, "guided_choice": ["a", "b"], "vendor": {"x": [1, None]}},
    )
    assert len(completion.choices) == 2
    [body] = received(fake_backend)
    expected = {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 8,
        "stop": ["\n\n"],
        "seed": 42,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "tools": tools,
        "tool_choice": "auto",
        "top_k": 20,
        "repetition_penalty": 1.1,
        "guided_choice": ["a", "b"],
        "vendor": {"x": [1, None]},
    }
    assert body == expected


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b'{"model": "fake-model"}', 400, "missing_messages", "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "missing_model", "model"),
        (b'{"model": "fake-model", "messages": "hi"}', 400, "invalid_type", "messages"),
        (b'{"model": "fake-model", "messages": []}', 400, "invalid_value", "messages"),
        (b'{"model": "fake-model", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "invalid_role",
         "messages[0].role"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": 5}]}', 400, "invalid_type",
         "messages[0].content"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400,
         "invalid_type", "temperature"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400,
         "invalid_value", "max_tokens"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400,
         "invalid_type", "stream"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}', 400,
         "invalid_value", "stream_options"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_openai_error_and_an_audit_row(
    gateway: GatewayServer,
    client_key: tuple[str, str],
    settings: Settings,
    fake_backend: FakeBackendThread,
    body: bytes,
    status: int,
    code: str,
    param: str | None,
) -> None:
    resp = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {client_key[1]}", "content-type": "application/json"},
    )
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]
    [row] = audit_rows(settings)
    assert row["status"] == "rejected" and row["http_status"] == status and row["error_code"] == code
    assert row["request_json"] == body.decode()
    assert received(fake_backend) == []  # nothing reached the backend


def test_body_over_the_limit_is_413(tmp_path, fake_backend: FakeBackendThread) -> None:
    from tests.conftest import make_settings
    from tests.helpers import create_key

    settings = make_settings(tmp_path, fake_backend.url, max_body_bytes=4096)
    _, key = create_key(settings)
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 5000}]}
    with GatewayServer(settings) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw, key).chat.completions.create(**big)
        # Also without a Content-Length header (chunked upload), the limit holds.
        chunked = httpx.post(
            gw.url + "/v1/chat/completions",
            content=iter([msgspec.json.encode(big)]),
            headers={"authorization": f"Bearer {key}"},
        )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large" and "4096" in caught.value.body["message"]
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    rows = audit_rows(settings)
    assert [r["http_status"] for r in rows] == [413, 413]


def test_missing_or_wrong_key_is_401(gateway: GatewayServer, settings: Settings) -> None:
    for key in ("wrong-key", "sk-gw-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(gateway, key).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.body["code"] == "invalid_api_key" and caught.value.body["type"] == "authentication_error"
    resp = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "fake-model"})
    assert resp.status_code == 401 and "Bearer" in resp.json()["error"]["message"]
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    rows = audit_rows(settings)
    assert [r["status"] for r in rows] == ["unauthorized"] * 3
    assert all(r["api_key_id"] is None for r in rows)


def test_revoked_key_stops_working(tmp_path, fake_backend: FakeBackendThread) -> None:
    import asyncio

    from gateway.auth import KeyStore
    from gateway.db import create_engine
    from tests.conftest import make_settings
    from tests.helpers import create_key

    settings = make_settings(tmp_path, fake_backend.url)
    key_id, key = create_key(settings, "client")
    with GatewayServer(settings) as gw:
        client = sdk(gw, key)
        client.models.list()

        async def revoke() -> bool:
            engine = create_engine(settings.database_url)
            try:
                return await KeyStore(engine).revoke(key_id)
            finally:
                await engine.dispose()

        assert asyncio.run(revoke())
        gw.services.keys._cache.clear()  # the gateway's cache would otherwise keep it for up to 30 s
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_unknown_model_is_404_and_backend_4xx_passes_through(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    client = sdk(gateway, client_key[1])
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as rejected:
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"status": 400, "message": "This model's maximum context length is 4096 tokens."}},
        )
    assert rejected.value.body["message"] == "This model's maximum context length is 4096 tokens."
    with pytest.raises(openai.BadRequestError):  # the same for a stream: a real 400, not a 200 with an error event
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"fake": {"status": 400, "message": "bad"}},
        )
    rows = audit_rows(settings)
    assert [r["http_status"] for r in rows] == [404, 400, 400]
    assert rows[1]["error_message"] == "This model's maximum context length is 4096 tokens."


def test_backend_5xx_becomes_502(gateway: GatewayServer, client_key: tuple[str, str]) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway, client_key[1]).chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"status": 500, "message": "engine dead"}},
        )
    assert caught.value.status_code == 502 and "engine dead" in caught.value.body["message"]


def test_unreachable_backend_is_502_naming_it(tmp_path) -> None:
    from tests.conftest import make_settings
    from tests.helpers import create_key

    with socket_port() as port:
        pass  # a port that was free a moment ago: nothing listens there
    settings = make_settings(tmp_path, f"http://127.0.0.1:{port}")
    _, key = create_key(settings)
    with GatewayServer(settings) as gw:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                sdk(gw, key).chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=stream
                )
            assert caught.value.status_code == 502
            assert f"127.0.0.1:{port}" in caught.value.body["message"]
            assert caught.value.body["code"] == "backend_unavailable"
        _, admin = create_key(settings, "admin")
        ready = httpx.get(gw.url + "/readyz", headers={"authorization": f"Bearer {admin}"})  # details: admins only
    assert ready.status_code == 503 and ready.json()["backends"][0]["healthy"] is False
    rows = audit_rows(settings)
    assert [r["status"] for r in rows] == ["backend_error", "backend_error"]


def test_backend_timeout_is_504(tmp_path, fake_backend: FakeBackendThread) -> None:
    from tests.conftest import make_settings
    from tests.helpers import create_key

    settings = make_settings(tmp_path, fake_backend.url, backend_timeout=0.3)
    _, key = create_key(settings)
    with GatewayServer(settings) as gw:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw, key).chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"fake": {"delay_ms": 3000}},
            )
    assert caught.value.status_code == 504 and caught.value.body["code"] == "backend_timeout"
    assert time.monotonic() - started < 2.5
    [row] = audit_rows(settings)
    assert row["status"] == "backend_error" and row["http_status"] == 504


def test_client_disconnect_mid_stream_cancels_upstream_and_is_logged(tmp_path, slow_backend: FakeBackendThread) -> None:
    from tests.conftest import make_settings
    from tests.helpers import create_key

    settings = make_settings(tmp_path, slow_backend.url)
    _, key = create_key(settings)
    with GatewayServer(settings) as gw:
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": "long story"}], "stream": True},
        ) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens, then hang up
        assert any("content" in line for line in got)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = httpx.get(slow_backend.url + "/fake/stats").json()
            rows = audit_rows(settings)
            if stats["aborted"] and rows:
                break
            time.sleep(0.05)
    assert stats == {"requests": 1, "completed": 0, "aborted": 1}
    [row] = rows
    assert row["status"] == "client_disconnected" and row["stream"] is True
    assert 0 < len(row["response_text"].split()) < 60  # what had been generated before the client left


def test_health_and_readiness(gateway: GatewayServer, settings: Settings) -> None:
    from tests.helpers import create_key

    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    _, admin = create_key(settings, "admin")
    ready = httpx.get(gateway.url + "/readyz", headers={"authorization": f"Bearer {admin}"})  # details: admins only
    assert ready.status_code == 200
    report = ready.json()
    assert report["status"] == "ready" and report["database"]["ok"] is True
    assert set(report["models"]) == {"fake-model", "other-model"}


def test_unknown_route_and_method_use_the_openai_error_format(gateway: GatewayServer) -> None:
    missing = httpx.get(gateway.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(gateway.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_each_leave_exactly_one_row(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    client = sdk(gateway, client_key[1])
    ids: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"q{i}"}])
        with lock:
            ids.append(r.model_extra["gateway"]["request_id"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = audit_rows(settings)
    assert sorted(r["request_id"] for r in rows) == sorted(ids) and len(ids) == 40
    assert gateway.services.audit.batches < 40  # commits were shared


class socket_port:
    """Reserve, then release, an ephemeral port."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
