"""stream_mode (issue 15): "checked" never sends the words for which an output guard blocks a
sentence (it sends what the guards passed, as they pass it); "optimistic" sends text as it comes
and ends the stream with content_filter and the policy's message when a later check fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardrails import PolicyError
from guardrails.policy import parse_policy
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

TOXIC = "You are a stupid idiot and I hate you."
MESSAGE = "The answer was withheld by the content filter."


def _stream(tmp_path: Path, fake: FakeBackendThread, mode: str | None) -> tuple[str, list[dict[str, Any]], dict]:
    policy = tmp_path / "policy.toml"
    defaults = f'[defaults]\nstream_mode = "{mode}"\n' if mode else ""
    policy.write_text(f'version = 1\n{defaults}\n[guards.toxicity]\naction = "block"\nmessage = "{MESSAGE}"\n')
    settings = make_settings(tmp_path, fake.url, policy=policy)
    _, key = create_key(settings, "client", "modes")
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"answer": f"Hello there, happy to help. {TOXIC} Goodbye now."},
    }
    with GatewayServer(settings) as server:
        reply = httpx.post(
            server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
        )
    lines = [line[6:] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    text = "".join((c.get("delta") or {}).get("content") or "" for e in events for c in e["choices"])
    [row] = audit_rows(settings)
    return text, events, row


@pytest.mark.parametrize("mode", [None, "checked"], ids=["default", "checked"])
def test_checked_mode_never_releases_the_toxic_sentence(
    tmp_path: Path, fake_backend: FakeBackendThread, mode: str | None
) -> None:
    text, events, row = _stream(tmp_path, fake_backend, mode)
    assert "idiot" not in text and "stupid" not in text and "Goodbye" not in text
    # The first sentence, then at most words of the toxic one that passed with their look-ahead
    # (none with the trained scorer, which already finds "You are a" toxic), then the message.
    assert text.startswith("Hello there, happy to help.") and text.endswith(f"\n\n{MESSAGE}")
    assert len(text) <= len(f"Hello there, happy to help. You are a\n\n{MESSAGE}")
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert row["status"] == "blocked" and row["blocked_by"] == "toxicity"


def test_optimistic_mode_sends_as_it_comes_and_ends_with_content_filter(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    text, events, row = _stream(tmp_path, fake_backend, "optimistic")
    # The words went out before the sentence was checked; the check ended the stream.
    assert text.startswith("Hello there, happy to help. You are a stupid idiot")
    assert "Goodbye" not in text and text.endswith(f"\n\n{MESSAGE}")
    content_events = [e for e in events if any((c.get("delta") or {}).get("content") for c in e["choices"])]
    assert len(content_events) >= 10  # one event per token, not a sentence at a time
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert row["status"] == "blocked" and row["finish_reason"] == "content_filter"
    delivered = json.loads(row["response_json"])["choices"][0]["delivered"]
    assert delivered.startswith("Hello there, happy to help. You are a stupid idiot") and "Goodbye" not in delivered


def test_stream_mode_is_checked_in_the_policy() -> None:
    assert parse_policy('version = 1\n[defaults]\nstream_mode = "optimistic"\n').for_request().stream_mode == (
        "optimistic"
    )
    assert parse_policy("version = 1\n").for_request().stream_mode == "checked"
    with pytest.raises(PolicyError, match="stream_mode must be one of checked, optimistic"):
        parse_policy('version = 1\n[defaults]\nstream_mode = "fast"\n')
