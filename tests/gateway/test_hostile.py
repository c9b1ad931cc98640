"""Hostile requests and broken backends: each is a 4xx or a 502/504 in OpenAI's form, with one audit row.

One gateway and one fake backend serve the whole module; the fake misbehaves on request (its
`fake` extension field: a verbatim body, verbatim stream events, padding, a cut or a trickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit_rows import TRUNCATED
from gateway.settings import Settings
from serving.fake import FakeBackendThread, FakeConfig
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

ANSWER_LIMIT = 256 * 1024


@dataclass
class Hostile:
    gateway: GatewayServer
    settings: Settings
    client: httpx.Client

    def post(self, body: bytes | dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(path, content=content)

    def stream(self, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
        """POST a streaming request; the response and its `data:` payloads, in order."""
        with self.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        return resp, lines

    def row(self, resp: httpx.Response) -> dict[str, Any]:
        """The one audit row of this response (asserting there is exactly one)."""
        [row] = audit_rows(self.settings, request_id=resp.headers["x-gateway-request-id"])
        return row


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    with FakeBackendThread(FakeConfig(models=("fake-model",), answer_tokens=8)) as fake:
        settings = make_settings(tmp, fake.url, max_answer_bytes=ANSWER_LIMIT, backend_total_timeout=1.0)
        _, key = create_key(settings)
        with (
            GatewayServer(settings) as gateway,
            httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client,
        ):
            yield Hostile(gateway, settings, client)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return value


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    return error


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"[" * 100_000, "invalid_json", None),
        (b'{"a":' * 50_000, "invalid_json", None),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_json", None),
        (json.dumps(chat(vendor=nested(65))).encode(), "invalid_json", None),
        (json.dumps(chat(messages=[{"role": ["user"], "content": "hi"}])).encode(), "invalid_role", "messages[0].role"),
        (json.dumps(chat(messages=[{"role": {"a": 1}, "content": "hi"}])).encode(), "invalid_role",
         "messages[0].role"),
        (json.dumps(chat(n=17)).encode(), "invalid_value", "n"),
        (json.dumps(chat(best_of=1000)).encode(), "invalid_value", "best_of"),
    ],
    ids=["deep-array", "deep-object", "invalid-utf8", "deep-unknown-field", "role-list", "role-object", "n", "best_of"],
)  # fmt: skip
def test_hostile_request_is_400_with_one_audit_row(hostile: Hostile, body: bytes, code: str, param: str | None) -> None:
    resp = hostile.post(body)
    error = assert_openai_error(resp, 400, code)
    assert error["param"] == param
    row = hostile.row(resp)
    assert row["status"] == "rejected" and row["http_status"] == 400 and row["error_code"] == code


def test_n_limit_names_the_limit_and_allows_up_to_it(hostile: Hostile) -> None:
    error = assert_openai_error(hostile.post(chat(n=17)), 400, "invalid_value")
    assert "16" in error["message"] and "max_n" in error["message"]
    assert len(hostile.post(chat(n=16)).json()["choices"]) == 16


def test_nesting_within_the_limit_reaches_the_backend(hostile: Hostile) -> None:
    resp = hostile.post(chat(vendor=nested(60)))
    assert resp.status_code == 200 and hostile.row(resp)["status"] == "ok"


def test_completion_role_check_and_depth_also_apply_to_completions(hostile: Hostile) -> None:
    resp = hostile.post(b'{"model": "fake-model", "prompt": "\xff\xfe"}', "/v1/completions")
    assert_openai_error(resp, 400, "invalid_json")
    assert hostile.row(resp)["endpoint"] == "completions"


# --- non-streaming backend answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("steer", "code"),
    [
        ({"body": [1, 2, 3]}, "backend_invalid_answer"),
        ({"body": {"choices": ["hello"]}}, "backend_invalid_answer"),
        ({"body": {"choices": [{"index": 0, "message": {"content": 5}}]}}, "backend_invalid_answer"),
        ({"body": {"choices": [{"index": 0, "message": "hello"}]}}, "backend_invalid_answer"),
        ({"body": {"choices": "hello"}}, "backend_invalid_answer"),
        ({"body": {"choices": [], "usage": "lots"}}, "backend_invalid_answer"),
        ({"raw": "{not json"}, "backend_invalid_answer"),
        ({"raw": "[" * 100_000}, "backend_invalid_answer"),
        ({"pad_bytes": ANSWER_LIMIT + 1}, "backend_answer_too_large"),
    ],
    ids=["array", "string-choices", "number-content", "string-message", "choices-string", "usage-string",
         "invalid-json", "deep-json", "too-large"],
)  # fmt: skip
def test_broken_backend_answer_is_502_with_one_audit_row(hostile: Hostile, steer: dict[str, Any], code: str) -> None:
    resp = hostile.post(chat(fake=steer))
    assert_openai_error(resp, 502, code)
    row = hostile.row(resp)
    assert row["status"] == "backend_error" and row["http_status"] == 502 and row["error_code"] == code


def test_answer_under_the_size_limit_passes(hostile: Hostile) -> None:
    resp = hostile.post(chat(fake={"pad_bytes": ANSWER_LIMIT // 2}))
    assert resp.status_code == 200
    assert hostile.row(resp)["response_text"].endswith("x" * 100)


def test_backend_nonsense_token_counts_do_not_break_the_audit_row(hostile: Hostile) -> None:
    usage = {"prompt_tokens": "many", "completion_tokens": 10**30, "total_tokens": -1}
    answer = {"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "x" * 100}], "usage": usage}
    resp = hostile.post(chat(fake={"body": answer}))
    assert resp.status_code == 200
    row = hostile.row(resp)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (None, None, None)
    # cut to the column's 32 characters by the audit writer, with its visible marker
    assert row["finish_reason"] == "x" * (32 - len(TRUNCATED)) + TRUNCATED and row["response_text"] == "ok"


# --- streams --------------------------------------------------------------------------------


def event(content: Any = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
            "finish_reason": finish}]}  # fmt: skip


def assert_stream_error(hostile: Hostile, body: dict[str, Any], code: str, http_status: int = 502) -> dict[str, Any]:
    """A stream that failed after it began: 200, an OpenAI error event, then [DONE]; the row says why."""
    resp, payloads = hostile.stream(body)
    assert resp.status_code == 200
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == code and error["message"]
    for payload in payloads[:-2]:
        assert "error" not in json.loads(payload)
    row = hostile.row(resp)
    assert row["status"] == "backend_error" and row["error_code"] == code and row["http_status"] == http_status
    return row


def test_stream_event_with_a_number_as_content_ends_with_an_error_event(hostile: Hostile) -> None:
    events = [event("Hello "), event(42), event("there.", "stop")]
    row = assert_stream_error(hostile, chat(stream=True, fake={"events": events}), "backend_invalid_answer")
    assert row["response_text"] == "Hello "  # what came before the bad event


@pytest.mark.parametrize(
    "steer",
    [
        {"events": [event("Hello "), event("there.")], "done": False},  # no finish_reason, no [DONE]
        {"events": [event("Hello "), event("there.")]},  # [DONE] but no finish_reason
        {"events": [event("Hello "), event("there.", "stop")], "done": False},  # finish_reason but no [DONE]
        {"cut_after": 3},  # the fake's own stream, cut cleanly after 3 tokens
    ],
    ids=["no-finish-no-done", "no-finish", "no-done", "cut"],
)
def test_stream_cut_short_by_the_backend_is_an_error_not_a_completion(hostile: Hostile, steer: dict) -> None:
    row = assert_stream_error(hostile, chat(stream=True, fake=steer), "backend_stream_truncated")
    assert row["response_text"]  # the part that did arrive is kept


def test_stream_with_nothing_at_all_is_502_before_the_first_byte(hostile: Hostile) -> None:
    resp = hostile.post(chat(stream=True, fake={"events": [], "done": False}))
    assert_openai_error(resp, 502, "backend_stream_truncated")
    assert hostile.row(resp)["status"] == "backend_error"


def test_stream_with_malformed_event_json_ends_with_an_error_event(hostile: Hostile) -> None:
    assert_stream_error(hostile, chat(stream=True, fake={"events": [event("a"), "{oops"]}), "backend_stream_error")


def test_stream_over_the_size_limit_ends_with_an_error_event(hostile: Hostile) -> None:
    row = assert_stream_error(hostile, chat(stream=True, fake={"pad_bytes": ANSWER_LIMIT}), "backend_answer_too_large")
    assert len(row["response_text"]) < ANSWER_LIMIT


def test_complete_stream_still_ends_normally(hostile: Hostile) -> None:
    resp, payloads = hostile.stream(chat(stream=True, fake={"events": [event("Hi "), event("there.", "stop")]}))
    assert resp.status_code == 200 and payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "stop"
    row = hostile.row(resp)
    assert row["status"] == "ok" and row["response_text"] == "Hi there."


# --- a backend that trickles (backend_total_timeout = 1 s in this module) --------------------


def test_trickling_answer_is_504_after_the_total_timeout(hostile: Hostile) -> None:
    resp = hostile.post(chat(fake={"trickle_ms": 50}))  # never 50 ms silent, so never idle-timed-out
    error = assert_openai_error(resp, 504, "backend_timeout")
    assert "total" in error["message"]
    row = hostile.row(resp)
    assert row["status"] == "backend_error" and row["http_status"] == 504


def test_trickling_stream_before_its_first_event_is_504(hostile: Hostile) -> None:
    resp = hostile.post(chat(stream=True, fake={"trickle_ms": 50}))
    assert_openai_error(resp, 504, "backend_timeout")
    assert hostile.row(resp)["http_status"] == 504


def test_trickling_stream_mid_answer_ends_with_a_timeout_event(hostile: Hostile) -> None:
    row = assert_stream_error(
        hostile, chat(stream=True, fake={"trickle_ms": 50, "trickle_after": 2}), "backend_timeout", 504
    )
    assert row["response_text"]
