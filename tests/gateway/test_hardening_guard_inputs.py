"""Issue 12, items 4 and 5 through HTTP: input guards see every text the backend reads (tools,
tool-call arguments, input_text parts), token-id prompts are refused while a guard would have
to read them, every such request leaves one audit row, and /healthz answers while a 900 KB
prompt is being guarded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import Settings
from guardrails.keywords import KeywordMatcher
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, serving

POLICY = """
version = 1
[guards.keywords]
action = "block"
terms = ["zorblax"]
[guards.toxicity]
enabled = false
[guards.groundedness]
enabled = false
[overrides.model."other-model".guards.keywords]
enabled = false
[overrides.model."other-model".guards.injection]
enabled = false
"""


@pytest.fixture
def guarded(tmp_path: Path, fake_backend: FakeBackendThread) -> Iterator[tuple[GatewayServer, openai.OpenAI, Settings]]:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    settings = make_settings(tmp_path, fake_backend.url, policy=path)
    with serving(settings) as (gw, client):
        yield gw, client, settings


def _post(gw: GatewayServer, client: openai.OpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"authorization": f"Bearer {client.api_key}"}
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=60)


def sent_to_backend(fake: FakeBackendThread) -> list[dict]:
    return httpx.get(fake.url + "/fake/requests").json()


CHAT = "/v1/chat/completions"
HIDDEN = [
    (
        "tool description",
        {"tools": [{"type": "function", "function": {"name": "f", "description": "the zorblax tool"}}]},
        "tools",
    ),
    (
        "response_format schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "s",
                    "schema": {"type": "object", "properties": {"zorblax": {"type": "string"}}},
                },
            }
        },
        "response_format",
    ),
    (
        "system message",
        {"messages": [{"role": "system", "content": "zorb-lax"}, {"role": "user", "content": "hi"}]},
        "messages[0].content",
    ),
    (
        "input_text part",
        {"messages": [{"role": "user", "content": [{"type": "input_text", "text": "ᴢᴏʀʙʟᴀx"}]}]},
        "messages[0].content[0].text",
    ),
    ("message name", {"messages": [{"role": "user", "name": "zorblax", "content": "hi"}]}, "messages[0].name"),
    (
        "tool-call arguments",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"q": "zorb&#108;ax"}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "1", "content": "ok"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("label", "fields", "param"), HIDDEN, ids=[h[0] for h in HIDDEN])
def test_texts_outside_user_content_are_guarded(guarded, fake_backend, label, fields, param):
    gw, client, settings = guarded
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}
    r = _post(gw, client, CHAT, body)
    assert r.status_code == 400, (label, r.text)
    error = r.json()["error"]
    assert error["code"] == "input_blocked" and error["param"] == param
    assert r.headers["x-gateway-blocked-by"] == "keywords"
    assert sent_to_backend(fake_backend) == []
    assert [(row["http_status"], row["blocked_by"]) for row in audit_rows(settings)] == [(400, "keywords")]


def test_token_id_prompts_are_refused_while_a_guard_reads_them(guarded, fake_backend):
    gw, client, settings = guarded
    for prompt in ([1, 2, 3], [[1, 2], [3]]):
        r = _post(gw, client, "/v1/completions", {"model": "fake-model", "prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "token_prompt_not_checked" and error["param"] == "prompt"
        assert "keywords" in error["message"] and "injection" in error["message"]
    assert sent_to_backend(fake_backend) == []
    # a model with no input guard on: token ids go through
    r = _post(gw, client, "/v1/completions", {"model": "other-model", "prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert len(sent_to_backend(fake_backend)) == 1
    assert [row["http_status"] for row in audit_rows(settings)] == [400, 400, 200]


def test_text_prompts_still_pass_and_blocked_completion_names_the_prompt(guarded):
    gw, client, _ = guarded
    ok = _post(gw, client, "/v1/completions", {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    r = _post(gw, client, "/v1/completions", {"model": "fake-model", "prompt": ["fine", "zor blax"], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"


def test_healthz_answers_while_a_900_kb_prompt_is_guarded(
    tmp_path: Path, fake_backend: FakeBackendThread, monkeypatch: pytest.MonkeyPatch
):
    started = threading.Event()
    release = threading.Event()
    real_find = KeywordMatcher.find

    def held_find(self: KeywordMatcher, text: str) -> Any:
        if len(text) > 100_000:
            started.set()
            # Hold the guard until /healthz has answered. Were the guard on the event loop, the
            # loop would stall here and /healthz could not answer; the wait is bounded so that
            # failure shows as a failed assertion, not a hung test.
            release.wait(timeout=60)
        return real_find(self, text)

    monkeypatch.setattr(KeywordMatcher, "find", held_find)
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    settings = make_settings(tmp_path, fake_backend.url, policy=path)
    big = "lorem ipsum dolor sit amet " * (900_000 // 27)
    with serving(settings) as (gw, client):
        result: dict[str, httpx.Response] = {}

        def send() -> None:
            result["r"] = _post(
                gw, client, CHAT, {"model": "fake-model", "messages": [{"role": "user", "content": big}]}
            )

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert started.wait(timeout=60), "the guard never started"
            health = httpx.get(gw.url + "/healthz", timeout=10)
            assert health.status_code == 200
        finally:
            release.set()
            sender.join(timeout=120)
        assert result["r"].status_code == 200, result["r"].text[:300]
    assert [row["http_status"] for row in audit_rows(settings)] == [200]
