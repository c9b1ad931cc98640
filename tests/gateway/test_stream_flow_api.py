"""Guarded streams that flow (issue 15), through the gateway: in checked mode the client gets one
event per word as the output guards pass the text, and never a toxic sentence's toxic words,
even when the backend sends the answer one character per event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

MESSAGE = "The answer was withheld by the content filter."
POLICY = f"""version = 1
[scorers.toxicity]
scorer = "profanity-check"

[guards.toxicity]
action = "block"
message = "{MESSAGE}"
"""
CLEAN = "The capital of France is Paris. It has many fine museums and a long river."
TOXIC = "Hello there, happy to help. You are a stupid idiot and I hate you. Goodbye now."
BASE = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 17, "model": "fake-model"}


def _one_char_per_event(text: str) -> list[dict[str, Any]]:
    events = [{**BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{**BASE, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in text]
    events.append({**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return events


def _stream(tmp_path: Path, fake: FakeBackendThread, steer: dict[str, Any]) -> tuple[str, list[dict], Settings]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    settings = make_settings(tmp_path, fake.url, policy=policy)
    _, key = create_key(settings, "client", "flow")
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake": steer}
    with GatewayServer(settings) as server:
        reply = httpx.post(
            server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
        )
    lines = [line[6:] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return reply.text, [json.loads(line) for line in lines[:-1]], settings


def _content(events: list[dict[str, Any]]) -> list[str]:
    return [c["delta"]["content"] for e in events for c in e["choices"] if (c.get("delta") or {}).get("content")]


def test_a_toxic_sentence_sent_one_character_per_event_is_never_released(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    raw, events, settings = _stream(tmp_path, fake_backend, {"events": _one_char_per_event(TOXIC)})
    assert not any(word in raw for word in ("stupid", "idiot", "hate", "Goodbye"))
    text = "".join(_content(events))
    assert text.startswith("Hello there, happy to help.") and text.endswith(f"\n\n{MESSAGE}")
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    [row] = audit_rows(settings)
    assert row["status"] == "blocked" and row["blocked_by"] == "toxicity"
    delivered = json.loads(row["response_json"])["choices"][0]["delivered"]
    assert text == delivered + f"\n\n{MESSAGE}"
    assert "idiot" in row["response_text"] and TOXIC.startswith(row["response_text"])  # reviewers see it


def test_released_text_is_re_chunked_into_one_event_per_word(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    """The backend sends one character per event, the guards release a few words at a time: the
    client gets exactly one event per word, each with the original event's envelope."""
    _, events, settings = _stream(tmp_path, fake_backend, {"events": _one_char_per_event(CLEAN)})
    pieces = _content(events)
    assert "".join(pieces) == CLEAN
    assert [p.strip() for p in pieces] == CLEAN.split(" ")  # one word each, none split
    for event in events:
        assert {k: event[k] for k in BASE} == BASE
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"  # the role still comes first
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    [row] = audit_rows(settings)
    assert row["status"] == "ok" and row["response_text"] == CLEAN


def test_a_clean_answer_streams_about_one_event_per_token(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    """One token (a word) per backend event: as many content events reach the client."""
    _, events, _ = _stream(tmp_path, fake_backend, {"answer": CLEAN})
    pieces = _content(events)
    assert "".join(pieces) == CLEAN and len(pieces) == len(CLEAN.split(" "))
