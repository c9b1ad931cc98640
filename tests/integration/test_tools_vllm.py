"""Tool calling on the embedded default (issue 18, item 1): the local vLLM starts with the Hermes
tool parser and a tool-aware ChatML template, so `tools` work end to end through the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.settings import Settings
from serving.local import LOCAL_MODEL_NAME
from tests.helpers import GatewayServer, prepare_database, serving

pytestmark = pytest.mark.integration
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def setup(tmp_path: Path, vllm_url: str) -> Iterator[tuple[GatewayServer, openai.OpenAI]]:
    settings = Settings(data_dir=tmp_path, backend=(vllm_url,), sample_corpus=False)
    prepare_database(settings)
    with serving(settings) as (gw, client):
        yield gw, client


def test_a_tool_call_end_to_end(setup: tuple[GatewayServer, openai.OpenAI]) -> None:
    _, client = setup
    answer = client.chat.completions.create(
        model=LOCAL_MODEL_NAME, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=80, temperature=0
    )
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    # The result goes back as a tool message and the model answers from it (the template renders both).
    follow = client.chat.completions.create(
        model=LOCAL_MODEL_NAME,
        messages=[
            *ASK,
            answer.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_tokens=40,
        temperature=0,
    )
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls


def test_auto_tool_choice_is_accepted(setup: tuple[GatewayServer, openai.OpenAI]) -> None:
    """Before: every request with `tools` (tool_choice defaults to auto) got 400 from vLLM."""
    _, client = setup
    answer = client.chat.completions.create(model=LOCAL_MODEL_NAME, messages=ASK, tools=[WEATHER], max_tokens=16)
    assert answer.choices[0].finish_reason in {"stop", "length", "tool_calls"}


def test_a_streamed_tool_call(setup: tuple[GatewayServer, openai.OpenAI]) -> None:
    _, client = setup
    stream = client.chat.completions.create(
        model=LOCAL_MODEL_NAME, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80,
        temperature=0, stream=True,
    )  # fmt: skip
    names, arguments, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["get_weather"]
    assert isinstance(json.loads(arguments), dict)
    assert finish in {"tool_calls", "stop"}


def test_langchain_bind_tools(setup: tuple[GatewayServer, openai.OpenAI]) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    gw, client = setup
    model = langchain_openai.ChatOpenAI(
        model=LOCAL_MODEL_NAME, base_url=gw.url + "/v1", api_key=client.api_key, temperature=0, max_tokens=80,
        max_retries=0,
    )  # fmt: skip
    message = model.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"], dict)
