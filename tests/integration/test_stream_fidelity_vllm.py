"""Stream fidelity against the real CPU vLLM (issue 19): with the default guards holding text
back, a streamed answer's logprobs, token texts and per-choice fields equal the direct stream's;
vLLM's error body keeps its field types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from serving.local import LOCAL_MODEL_NAME
from tests.helpers import GatewayServer, audit_rows, create_key, prepare_database

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture
def gateway(tmp_path: Path, vllm_url: str) -> Iterator[tuple[GatewayServer, str, Settings]]:
    settings = Settings(data_dir=tmp_path, backend=(vllm_url,), sample_corpus=False)  # default guards
    prepare_database(settings)
    _, key = create_key(settings, "client", "fidelity")
    with GatewayServer(settings) as server:
        yield server, key, settings


def _events(reply: httpx.Response) -> list[dict[str, Any]]:
    assert reply.status_code == 200, reply.text
    lines = [line[len("data: ") :] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _per_choice(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for event in events:
        for choice in event.get("choices") or []:
            seen = out.setdefault(choice["index"], {"text": "", "logprobs": [], "finish": None, "stop": None})
            seen["text"] += (choice.get("delta") or {}).get("content") or ""
            seen["logprobs"] += (choice.get("logprobs") or {}).get("content") or []
            seen["finish"] = choice.get("finish_reason") or seen["finish"]
            if choice.get("stop_reason") is not None:
                seen["stop"] = choice["stop_reason"]
    return out


def _stream(url: str, body: dict[str, Any], key: str | None = None) -> list[dict[str, Any]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return _events(httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=300))


def test_streamed_logprobs_through_the_guards_equal_direct_vllm(
    gateway: tuple[GatewayServer, str, Settings], vllm_url: str
) -> None:
    server, key, settings = gateway
    # The reproduction: greedy, one choice; 8 logprob entries directly, 1 through the gateway.
    body = {
        "model": LOCAL_MODEL_NAME,
        "messages": QUESTION,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0,
        "max_tokens": 40,
    }
    want, got = _per_choice(_stream(vllm_url, body)), _per_choice(_stream(server.url, body, key))
    assert len(want[0]["logprobs"]) > 1
    assert [e["token"] for e in got[0]["logprobs"]] == [e["token"] for e in want[0]["logprobs"]]
    assert got == want
    # n=2 (sampled, so not compared with a second run): each choice's logprob tokens spell its text.
    sampled = _per_choice(_stream(server.url, {**body, "n": 2, "temperature": 0.8, "seed": 7}, key))
    assert set(sampled) == {0, 1}
    for choice in sampled.values():
        spelled = "".join(e["token"] for e in choice["logprobs"])
        assert choice["text"] and spelled.removesuffix("<|im_end|>") == choice["text"]  # vLLM lists the EOS too
        assert choice["finish"] in ("stop", "length")
    rows = audit_rows(settings)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["completion_tokens"] for r in rows)


def test_vllm_error_body_keeps_its_field_types(gateway: tuple[GatewayServer, str, Settings], vllm_url: str) -> None:
    server, key, _ = gateway
    body = {"model": LOCAL_MODEL_NAME, "messages": QUESTION, "max_tokens": 100_000}
    direct = httpx.post(vllm_url + "/v1/chat/completions", json=body, timeout=60)
    through = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    assert through.status_code == direct.status_code == 400
    want, got = direct.json()["error"], through.json()["error"]
    assert got["code"] == want["code"] and type(got["code"]) is type(want["code"])
    assert got["message"] == want["message"]
