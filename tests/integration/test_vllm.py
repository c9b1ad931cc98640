"""The gateway in front of a real vLLM (CPU build, bundled SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import Settings
from serving.local import LOCAL_MODEL_NAME
from tests.helpers import GatewayServer, audit_rows, prepare_database, serving

pytestmark = pytest.mark.integration
MESSAGES = [
    {"role": "system", "content": "Answer from this passage: The Zorblat 3000 vacuum weighs 4.2 kg."},
    {"role": "user", "content": "How much does the Zorblat 3000 weigh?"},
]


@pytest.fixture
def setup(tmp_path: Path, vllm_url: str) -> Iterator[tuple[GatewayServer, openai.OpenAI, Settings]]:
    # Real models (MiniLM, the toxicity scorer); no sample corpus: these tests do not use RAG.
    settings = Settings(data_dir=tmp_path, backend=(vllm_url,), sample_corpus=False)
    prepare_database(settings)
    with serving(settings) as (gw, client):
        yield gw, client, settings


def metric(vllm_url: str, name: str) -> float:
    text = httpx.get(vllm_url + "/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} missing from vLLM's metrics"
    return float(match.group(1))


def test_models_lists_the_bundled_model(setup: tuple[GatewayServer, openai.OpenAI, Settings]) -> None:
    _, client, _ = setup
    models = client.models.list().data
    assert [m.id for m in models if m.owned_by != "gateway"] == [LOCAL_MODEL_NAME]
    assert [m.id for m in models if m.owned_by == "gateway"] == ["all-MiniLM-L6-v2"]  # for /v1/embeddings


def test_chat_matches_direct_vllm_and_is_audited(
    setup: tuple[GatewayServer, openai.OpenAI, Settings], vllm_url: str
) -> None:
    _, client, settings = setup
    params = {"model": LOCAL_MODEL_NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 24, "seed": 7}
    through = client.chat.completions.create(**params)
    with openai.OpenAI(base_url=vllm_url + "/v1", api_key="none", max_retries=0) as direct_client:
        direct = direct_client.chat.completions.create(**params)
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.usage.model_dump() == direct.usage.model_dump()  # usage figures are vLLM's
    [row] = audit_rows(settings, request_id=through.model_extra["gateway"]["request_id"])
    assert row["status"] == "ok" and row["response_text"] == through.choices[0].message.content
    assert row["prompt_tokens"] == direct.usage.prompt_tokens
    assert row["completion_tokens"] == direct.usage.completion_tokens
    assert row["backend_ms"] > 0 and row["gateway_ms"] < row["backend_ms"]


def test_stream_with_usage(setup: tuple[GatewayServer, openai.OpenAI, Settings]) -> None:
    _, client, settings = setup
    chunks = list(
        client.chat.completions.create(
            model=LOCAL_MODEL_NAME,
            messages=MESSAGES,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    [row] = audit_rows(settings, request_id=chunks[-1].model_extra["gateway"]["request_id"])
    assert row["stream"] is True and row["status"] == "ok" and row["response_text"] == text
    assert row["completion_tokens"] == usage.completion_tokens and row["finish_reason"] in {"stop", "length"}
    assert row["ttft_ms"] is not None and row["ttft_ms"] < row["total_ms"]


def test_completions_endpoint(setup: tuple[GatewayServer, openai.OpenAI, Settings]) -> None:
    _, client, _ = setup
    completion = client.completions.create(
        model=LOCAL_MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in completion.choices[0].text


def test_vllm_rejection_passes_through(setup: tuple[GatewayServer, openai.OpenAI, Settings]) -> None:
    _, client, settings = setup
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=LOCAL_MODEL_NAME, messages=MESSAGES, max_tokens=100_000)
    assert "4096" in caught.value.body["message"] or "context" in caught.value.body["message"].lower()
    [row] = audit_rows(settings)
    assert row["http_status"] == 400 and row["error_message"] == caught.value.body["message"]


def test_disconnect_aborts_generation_in_vllm(
    setup: tuple[GatewayServer, openai.OpenAI, Settings], vllm_url: str
) -> None:
    gw, client, settings = setup
    before = metric(vllm_url, "vllm:generation_tokens_total")
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {client.api_key}"},
        json={
            "model": LOCAL_MODEL_NAME,
            "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 2000,
            "ignore_eos": True,  # vLLM extension: without the abort it would generate all 2000
            "stream": True,
        },
        timeout=60,
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    # Counted from the disconnect: how long the first events took (a busy CI machine, the guards'
    # first model passes) is not what this test is about.
    at_close = metric(vllm_url, "vllm:generation_tokens_total")
    # vLLM stops: nothing running, and the token counter stops soon after the disconnect.
    deadline = time.monotonic() + 10
    while metric(vllm_url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(vllm_url, "vllm:num_requests_running") == 0
    settled = metric(vllm_url, "vllm:generation_tokens_total")
    time.sleep(2)
    assert metric(vllm_url, "vllm:generation_tokens_total") == settled
    assert settled - at_close < 300, f"{settled - at_close:.0f} tokens generated after the client left"
    assert settled - before < 1500  # without the abort: 2000
    rows = audit_rows(settings)
    assert [r["status"] for r in rows] == ["client_disconnected"]
    assert rows[0]["response_text"]


@pytest.fixture
def rag_setup(tmp_path: Path, vllm_url: str) -> Iterator[tuple[GatewayServer, openai.OpenAI, Settings]]:
    """The embedded default: real MiniLM embeddings, the shipped sample corpus, a RAG alias."""
    settings = Settings(
        data_dir=tmp_path, backend=(vllm_url,), alias=(f"{LOCAL_MODEL_NAME}-rag=sample:{LOCAL_MODEL_NAME}",)
    )
    prepare_database(settings)
    with serving(settings) as (gw, client):
        yield gw, client, settings


def test_grounded_answer_from_the_sample_corpus(rag_setup: tuple[GatewayServer, openai.OpenAI, Settings]) -> None:
    _, client, settings = rag_setup
    reply = client.chat.completions.create(
        model=f"{LOCAL_MODEL_NAME}-rag",
        messages=[{"role": "user", "content": "Who founded Kestrel Home Robotics?"}],
        temperature=0,
        max_tokens=60,
    )
    gateway = reply.model_extra["gateway"]
    assert gateway["citations"][0]["document"].endswith("company/about.md")
    assert reply.choices[0].message.content.strip()
    [row] = audit_rows(settings)
    assert row["model"] == f"{LOCAL_MODEL_NAME}-rag" and row["passages_json"]
    verdicts = {v["guard"]: v for v in json.loads(row["guards_json"])}
    assert "groundedness" in verdicts and row["groundedness"] is not None  # checked against the passages
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["Kestrel robots", "vacuum"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
