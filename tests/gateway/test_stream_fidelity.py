"""Stream fidelity (issue 19): what a client streams through the guarded gateway equals what it
would have had directly, only later. Held-back chunks keep every field (logprobs entries, token
ids, stop_reason, any other) for every choice; aliases answer as the alias; a backend's error
body keeps its field types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.relay import closing_text, merge_fields
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

ANSWERS = (
    ["The ", "capital ", "of ", "France ", "is ", "Paris", ".", " It ", "has ", "many ", "fine ", "museums", "."],
    ["Paris ", "is ", "the ", "capital", ".", " Its ", "river ", "is ", "the ", "Seine", "."],
)
STOP_REASONS = (128009, "END")  # vLLM: a stop token id (int) or the stop string that ended it


def _logprob(token: str, k: int) -> dict[str, Any]:
    top = [{"token": token, "logprob": -0.01 * k, "bytes": list(token.encode())}]
    return {"token": token, "logprob": -0.01 * k, "bytes": list(token.encode()), "top_logprobs": top}


def scripted_events(chat: bool) -> list[dict[str, Any]]:
    """A vLLM-like stream with logprobs, n=2, token ids and stop_reason, one token per event."""
    base = {"id": "x-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1}
    events: list[dict[str, Any]] = []
    if chat:
        for i in range(2):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            events.append({**base, "model": "fake-model", "choices": [role]})
    k = 0
    for step in range(max(len(a) for a in ANSWERS)):
        for i, tokens in enumerate(ANSWERS):
            if step >= len(tokens):
                continue
            k += 1
            token, last = tokens[step], step == len(tokens) - 1
            if chat:
                text: dict[str, Any] = {"delta": {"content": token}}
                logprobs: dict[str, Any] = {"content": [_logprob(token, k)]}
            else:
                text = {"text": token}
                logprobs = {
                    "tokens": [token],
                    "token_logprobs": [-0.01 * k],
                    "top_logprobs": [{token: -0.01 * k}],
                    "text_offset": [k],
                }
            choice = {
                "index": i,
                **text,
                "logprobs": logprobs,
                "finish_reason": "stop" if last else None,
                "stop_reason": STOP_REASONS[i] if last else None,
                "token_ids": [1000 + k],
            }
            events.append({**base, "model": "fake-model", "choices": [choice]})
    usage = {"prompt_tokens": 9, "completion_tokens": k, "total_tokens": 9 + k}
    events.append({**base, "model": "fake-model", "choices": [], "usage": usage})
    return events


def per_choice(events: list[dict[str, Any]], chat: bool) -> dict[int, dict[str, Any]]:
    """What a client makes of a stream: per choice, the text, logprob entries, token ids, finish."""
    out: dict[int, dict[str, Any]] = {}
    for event in events:
        for choice in event.get("choices") or []:
            seen = out.setdefault(
                choice["index"], {"text": "", "logprobs": [], "token_ids": [], "finish": None, "stop": None}
            )
            seen["text"] += (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
            logprobs = choice.get("logprobs") or {}
            if chat:
                seen["logprobs"] += logprobs.get("content") or []
            else:
                keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
                seen["logprobs"] += list(zip(*(logprobs.get(k) or [] for k in keys), strict=True))
            seen["token_ids"] += choice.get("token_ids") or []
            seen["finish"] = choice.get("finish_reason") or seen["finish"]
            seen["stop"] = choice.get("stop_reason") if choice.get("stop_reason") is not None else seen["stop"]
    return out


def sse_events(text: str) -> list[dict[str, Any]]:
    lines = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture
def gateway_and_key(tmp_path: Path, fake_backend: FakeBackendThread) -> Iterator[tuple[GatewayServer, str, Settings]]:
    # Default settings: every guard on with its defaults, so the output guards hold text back.
    settings = make_settings(tmp_path, fake_backend.url, sample_corpus=True, alias=("fast=sample:fake-model",))
    _, key = create_key(settings, "client", "fidelity")
    with GatewayServer(settings) as server:
        yield server, key, settings


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_held_chunks_keep_logprobs_token_ids_and_stop_reason_for_every_choice(
    gateway_and_key: tuple[GatewayServer, str, Settings], chat: bool
) -> None:
    server, key, settings = gateway_and_key
    direct = scripted_events(chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "Capital of France?"}]} if chat else {"prompt": "Capital of France?"}
    )
    body = {
        "model": "fake-model",
        **prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
        "logprobs": True,
        "fake": {"events": direct},
    }
    reply = httpx.post(server.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert reply.status_code == 200
    through = sse_events(reply.text)
    want, got = per_choice(direct, chat), per_choice(through, chat)
    assert set(got) == {0, 1}
    for index in (0, 1):
        assert got[index] == want[index], index
        assert got[index]["text"] == "".join(ANSWERS[index])
        assert len(got[index]["logprobs"]) == len(ANSWERS[index])  # one entry per token, in order
    assert got[0]["stop"] == 128009 and got[1]["stop"] == "END"  # types kept
    # The guards did hold text back (fewer events than direct), so the merge was exercised.
    content_events = [e for e in through if any(per_choice([e], chat).values())]
    assert len(content_events) < len(direct) - 1
    assert through[-1]["usage"] == direct[-1]["usage"]
    [row] = audit_rows(settings)
    assert row["status"] == "ok" and row["response_text"] == "".join(ANSWERS[0])


def test_an_alias_answers_as_the_alias_and_the_row_names_the_backend_model(
    gateway_and_key: tuple[GatewayServer, str, Settings],
) -> None:
    server, key, settings = gateway_and_key
    headers = {"authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "What does the gateway log?"}]
    plain = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "fast", "messages": messages}, headers=headers, timeout=30
    )
    assert plain.status_code == 200 and plain.json()["model"] == "fast"
    streamed = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "fast", "messages": messages, "stream": True, "stream_options": {"include_usage": True}},
        headers=headers,
        timeout=30,
    )
    events = sse_events(streamed.text)
    assert len(events) > 2 and {e["model"] for e in events} == {"fast"}
    rows = audit_rows(settings)
    assert [(r["model"], r["backend_model"]) for r in rows] == [("fast", "fake-model")] * 2
    direct = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": messages},
        headers=headers,
        timeout=30,
    )
    assert direct.json()["model"] == "fake-model"  # no alias: the backend's name, as before
    assert audit_rows(settings)[-1]["backend_model"] is None


def test_a_backend_error_body_keeps_its_field_types(
    gateway_and_key: tuple[GatewayServer, str, Settings], fake_backend: FakeBackendThread
) -> None:
    server, key, settings = gateway_and_key
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "fake": {"status": 400, "message": "This model's maximum context length is 4096 tokens."},
    }
    direct = httpx.post(fake_backend.url + "/v1/chat/completions", json=body, timeout=30).json()["error"]
    reply = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == direct["code"] == 400  # an integer, as vLLM sent it
    assert error["message"] == direct["message"] and error["type"] == direct["type"]
    [row] = audit_rows(settings)
    assert row["error_code"] == "400"  # the audit column stays text


def test_merge_fields_concatenates_lists_and_keeps_the_last_non_null() -> None:
    earlier = {"logprobs": {"content": [1, 2]}, "token_ids": [7], "stop_reason": None, "x": "a"}
    later = {"logprobs": {"content": [3]}, "token_ids": [8, 9], "stop_reason": 5, "x": None, "y": True}
    assert merge_fields(earlier, later) == {
        "logprobs": {"content": [1, 2, 3]},
        "token_ids": [7, 8, 9],
        "stop_reason": 5,
        "x": "a",
        "y": True,
    }
    assert merge_fields({"logprobs": None}, {"logprobs": {"content": [1]}}) == {"logprobs": {"content": [1]}}


TOXIC = "You are a stupid idiot and I hate you."


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage-asked", "usage-not-asked"])
def test_a_blocked_stream_ends_with_the_policy_message_then_usage_and_records_usage(
    gateway_and_key: tuple[GatewayServer, str, Settings], fake_backend: FakeBackendThread, include_usage: bool
) -> None:
    server, key, settings = gateway_and_key
    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"answer": f"Hello there, happy to help. {TOXIC} Goodbye now."},
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    reply = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    assert "idiot" not in reply.text and "Goodbye" not in reply.text
    events = sse_events(reply.text)
    text = per_choice(events, chat=True)[0]["text"]
    # The words the guards passed (a checked stream may release the harmless "You" of the blocked
    # sentence), then the policy's message; never the toxic words.
    released, _, message = text.partition("\n\n")
    assert released in ("Hello there, happy to help.", "Hello there, happy to help. You ")
    assert message == "The answer was withheld because it may contain toxic content."
    closing = [e for e in events if e["choices"] and e["choices"][0].get("finish_reason")]
    assert [e["choices"][0]["finish_reason"] for e in closing] == ["content_filter"]
    assert all("usage" not in e for e in events if e["choices"])  # per-event usage is the gateway's own
    [row] = audit_rows(settings)
    assert row["status"] == "blocked" and row["finish_reason"] == "content_filter"
    assert row["prompt_tokens"] == 1 and row["completion_tokens"] and row["completion_tokens"] >= 6
    if include_usage:
        usage = events[-1]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == row["completion_tokens"]
        assert usage["gateway"]["blocked"]["guard"] == "toxicity"
    else:
        assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert "usage" not in events[-1]
    [sent] = httpx.get(fake_backend.url + "/fake/requests").json()
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_a_clean_guarded_stream_records_usage_the_client_did_not_ask_for(
    gateway_and_key: tuple[GatewayServer, str, Settings],
) -> None:
    server, key, settings = gateway_and_key
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
    reply = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    events = sse_events(reply.text)
    assert all("usage" not in e for e in events)  # the client did not ask: no usage event, none per event
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    [row] = audit_rows(settings)
    assert row["status"] == "ok" and row["prompt_tokens"] == 2 and row["completion_tokens"] == 16


def test_closing_text_closes_an_open_code_block_before_the_message() -> None:
    assert closing_text("Here:\n```python\nprint(1)\n", "Withheld.") == "\n```\n\nWithheld."
    assert closing_text("Fine so far. ", "Withheld.") == "\n\nWithheld."
    assert closing_text("", "Withheld.") == "Withheld."
    assert closing_text("Anything", "") == ""
