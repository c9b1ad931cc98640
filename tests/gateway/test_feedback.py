"""POST /v1/feedback end to end: openai SDK and httpx -> gateway -> fake backend, stored in SQL.

The request id comes from the answer the way a chat app gets it (the `x-gateway-request-id`
header through `with_raw_response`, or `gateway.request_id` in a stream's last event); errors
are read back through the SDK, so they are checked in OpenAI's form as a client parses them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth import OPEN_MODE_KEY
from gateway.db import create_engine
from gateway.feedback import MAX_COMMENT_CHARS, FeedbackIn, FeedbackStore, FeedbackUnavailable, ratings
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import PG_ADMIN, GatewayServer, create_key, throwaway_postgres

_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def sdk(gateway: GatewayServer, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)
    _clients.append(client)
    return client


def ask(client: openai.OpenAI, text: str = "How do audits work?") -> str:
    """One chat completion; returns the gateway's request id from the response headers."""
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": text}]
    )
    request_id = raw.headers["x-gateway-request-id"]
    assert (raw.parse().model_extra or {})["gateway"]["request_id"] == request_id
    return request_id


def send_feedback(client: openai.OpenAI, body: object) -> dict[str, Any]:
    """POST /v1/feedback through the SDK's own request machinery (its auth, its error parsing)."""
    response = client.post("/feedback", body=body, cast_to=httpx.Response)
    assert response.status_code == 201
    return dict(response.json())


def stored(settings: Settings, request_id: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        engine = create_engine(settings.database_url)
        try:
            return await FeedbackStore(engine).for_request(request_id)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def rating_of(settings: Settings, request_id: str) -> float | None:
    async def go() -> float | None:
        engine = create_engine(settings.database_url)
        try:
            return (await ratings(engine, [request_id])).get(request_id)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_feedback_on_an_own_request_is_stored_and_the_newest_per_key_counts(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    key_id, key = client_key
    client = sdk(gateway, key)
    request_id = ask(client)

    first = send_feedback(
        client,
        {
            "request_id": request_id,
            "rating": 1,
            "comment": "  Spot on  ",
            "categories": ["Helpful", "helpful", "clear"],
        },
    )
    assert first["object"] == "feedback" and first["request_id"] == request_id and first["rating"] == 1
    assert first["key_id"] == key_id and isinstance(first["id"], int) and first["created_at"] > 1_700_000_000
    assert first["comment"] == "Spot on" and first["categories"] == ["helpful", "clear"]

    # The same key changes its mind: both rows stay, the newest is its rating.
    second = send_feedback(client, {"request_id": request_id, "rating": -1, "categories": ["wrong"]})
    assert second["id"] > first["id"] and second["comment"] is None
    rows = stored(settings, request_id)
    assert [(r["rating"], r["categories"], r["key_id"]) for r in rows] == [
        (1, ["helpful", "clear"], key_id),
        (-1, ["wrong"], key_id),
    ]
    assert rating_of(settings, request_id) == -1.0

    # A reviewer rates it too: the request's rating is the mean of each key's newest.
    reviewer_id, reviewer = create_key(settings, "reviewer", "rev")
    assert send_feedback(sdk(gateway, reviewer), {"request_id": request_id, "rating": 1})["key_id"] == reviewer_id
    assert rating_of(settings, request_id) == 0.0
    # An admin may rate it as well.
    _, admin = create_key(settings, "admin", "adm")
    send_feedback(sdk(gateway, admin), {"request_id": request_id, "rating": 0, "comment": None, "categories": None})
    assert len(stored(settings, request_id)) == 4


def test_a_streamed_answer_is_rateable_as_soon_as_the_stream_ends(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    client = sdk(gateway, client_key[1])
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "stream it"}], stream=True
        )
    )
    request_id = (chunks[-1].model_extra or {})["gateway"]["request_id"]
    assert send_feedback(client, {"request_id": request_id, "rating": -1})["rating"] == -1
    assert rating_of(settings, request_id) == -1.0


def test_another_keys_request_is_403_and_an_unknown_one_404(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    owner = sdk(gateway, client_key[1])
    request_id = ask(owner)
    _, other_key = create_key(settings, "client", "someone else")
    other = sdk(gateway, other_key)

    with pytest.raises(openai.PermissionDeniedError) as denied:
        other.post("/feedback", body={"request_id": request_id, "rating": -1}, cast_to=httpx.Response)
    assert denied.value.status_code == 403
    assert denied.value.code == "not_your_request" and denied.value.type == "permission_error"
    assert denied.value.param == "request_id"

    for unknown in ("0" * 32, "x" * 41, "no-such-request"):
        with pytest.raises(openai.NotFoundError) as missing:
            owner.post("/feedback", body={"request_id": unknown, "rating": 1}, cast_to=httpx.Response)
        assert missing.value.code == "not_found" and missing.value.param == "request_id"

    # No key, or a wrong one: 401 in OpenAI's form.
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "sk-gw-wrong").post("/feedback", body={"request_id": request_id, "rating": 1},
                                         cast_to=httpx.Response)  # fmt: skip
    bare = httpx.post(gateway.url + "/v1/feedback", json={"request_id": request_id, "rating": 1})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert stored(settings, request_id) == []


BAD_BODIES: list[tuple[object, str | None, str]] = [
    ({"rating": 1}, "request_id", "missing_field"),
    ({"request_id": 5, "rating": 1}, "request_id", "invalid_type"),
    ({"request_id": "  ", "rating": 1}, "request_id", "invalid_type"),
    ({"request_id": "REQ"}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": 2}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": -2}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": "1"}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": True}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": 0.5}, "rating", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "comment": 7}, "comment", "invalid_type"),
    ({"request_id": "REQ", "rating": 1, "comment": "x" * (MAX_COMMENT_CHARS + 1)}, "comment", "comment_too_long"),
    ({"request_id": "REQ", "rating": 1, "comment": "a\x00b"}, "comment", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "categories": "wrong"}, "categories", "invalid_type"),
    ({"request_id": "REQ", "rating": 1, "categories": [f"c{i}" for i in range(11)]}, "categories", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "categories": ["x" * 41]}, "categories", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "categories": [""]}, "categories", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "categories": [3]}, "categories", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "categories": ["<script>"]}, "categories", "invalid_value"),
    ({"request_id": "REQ", "rating": 1, "ratings": 1}, "ratings", "unknown_field"),
    (["REQ", 1], None, "invalid_type"),
    ("REQ", None, "invalid_type"),
]


def test_bad_bodies_are_400_in_openai_form_and_store_nothing(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    client = sdk(gateway, client_key[1])
    request_id = ask(client)
    for body, param, code in BAD_BODIES:
        if isinstance(body, dict) and body.get("request_id") == "REQ":
            body = {**body, "request_id": request_id}
        with pytest.raises(openai.BadRequestError) as bad:
            client.post("/feedback", body=body, cast_to=httpx.Response)
        error = bad.value
        assert (error.status_code, error.param, error.code, error.type) == (
            400,
            param,
            code,
            "invalid_request_error",
        ), body
        assert error.message
    # Not JSON at all, and JSON with a trailing comma: 400 invalid_json, never a 500.
    for raw in (b"rating=1", b'{"request_id": "x", "rating": 1,}', b"", b"\xff\xfe"):
        response = httpx.post(
            gateway.url + "/v1/feedback",
            content=raw,
            headers={"authorization": f"Bearer {client_key[1]}", "content-type": "application/json"},
        )
        assert response.status_code == 400, raw
        assert response.json()["error"]["code"] == "invalid_json"
    # A body over the gateway's size limit: 413.
    huge = httpx.post(
        gateway.url + "/v1/feedback",
        content=b'{"comment": "' + b"x" * (settings.max_body_bytes + 10) + b'"}',
        headers={"authorization": f"Bearer {client_key[1]}", "content-type": "application/json"},
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert stored(settings, request_id) == []
    # The longest comment allowed is stored whole.
    ok = send_feedback(client, {"request_id": request_id, "rating": 0, "comment": "y" * MAX_COMMENT_CHARS})
    assert len(ok["comment"]) == MAX_COMMENT_CHARS


def test_a_refused_request_can_be_rated_by_its_key(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings
) -> None:
    # A user may well want to say that a refusal was wrong: its audit row is the request.
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": []},
        headers={"authorization": f"Bearer {client_key[1]}"},
    )
    assert response.status_code == 400
    request_id = response.headers["x-gateway-request-id"]
    assert send_feedback(sdk(gateway, client_key[1]), {"request_id": request_id, "rating": -1})["rating"] == -1


def test_open_mode_needs_no_key(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    settings = make_settings(tmp_path, fake_backend.url, open_mode=True)
    with GatewayServer(settings) as gateway:
        client = sdk(gateway, "unused")
        request_id = ask(client)
        bare = httpx.post(gateway.url + "/v1/feedback", json={"request_id": request_id, "rating": 1})
        assert bare.status_code == 201
        assert bare.json()["key_id"] == OPEN_MODE_KEY.id
    assert rating_of(settings, request_id) == 1.0


def test_feedback_is_limited_per_key_and_request(
    gateway: GatewayServer, client_key: tuple[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.feedback.MAX_PER_KEY_AND_REQUEST", 3)
    client = sdk(gateway, client_key[1])
    request_id = ask(client)
    for rating in (1, 0, -1):
        send_feedback(client, {"request_id": request_id, "rating": rating})
    with pytest.raises(openai.BadRequestError) as bad:
        client.post("/feedback", body={"request_id": request_id, "rating": 1}, cast_to=httpx.Response)
    assert bad.value.code == "feedback_limit_reached"
    assert rating_of(settings, request_id) == -1.0


async def test_an_unreachable_database_is_503_not_500() -> None:
    engine = create_engine("postgresql://user@127.0.0.1:1/none")
    try:
        with pytest.raises(FeedbackUnavailable) as unavailable:
            await FeedbackStore(engine).add(OPEN_MODE_KEY, FeedbackIn("abc", 1))
    finally:
        await engine.dispose()
    assert unavailable.value.status == 503 and unavailable.value.body()["error"]["code"] == "database_unavailable"


@pytest.mark.postgres
def test_feedback_in_postgresql(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    with throwaway_postgres("gw_feedback") as name:
        settings = make_settings(tmp_path, fake_backend.url, database=f"{PG_ADMIN}/{name}")
        key_id, key = create_key(settings)
        with GatewayServer(settings) as gateway:
            client = sdk(gateway, key)
            request_id = ask(client)
            first = send_feedback(client, {"request_id": request_id, "rating": 1, "categories": ["clear"]})
            second = send_feedback(client, {"request_id": request_id, "rating": -1, "comment": "wrong after all"})
        assert second["id"] > first["id"] and first["key_id"] == key_id
        assert [r["comment"] for r in stored(settings, request_id)] == [None, "wrong after all"]
        assert rating_of(settings, request_id) == -1.0
