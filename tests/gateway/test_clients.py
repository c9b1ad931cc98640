"""The clients chat apps are built on, driving the gateway (issue 17): LangChain's `ChatOpenAI` and
`OpenAIEmbeddings`, and LlamaIndex's `OpenAILike`. Each must behave as the openai SDK does through
the same gateway (content, streams, usage, tools, structured output, embeddings, errors), and a
RAG answer's sources must reach the user: through annotations where the client keeps them, and
through the opt-in "Sources:" footer in the text where it keeps only content (LangChain).

The backend is the fake (answers are a deterministic function of the prompt); the real vLLM
with LangChain tool calls is in tests/integration/test_tools_vllm.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike
from pydantic import BaseModel

from serving.fake import FakeBackendThread
from tests.gateway.test_citations_api import ANSWER, QUESTION, make_key, rag_settings
from tests.helpers import GatewayServer

FOOTER_RAG = {"rag": {"collection": "products", "min_score": 0.05, "sources": "footer"}, "fake": {"answer": ANSWER}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_ANSWER = {
    "id": "chatcmpl-tool",
    "object": "chat.completion",
    "created": 1,
    "model": "fake-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}


Env = tuple[str, str, httpx.Client]  # the gateway's /v1 URL, a client key, one HTTP client all tests close


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fake_backend: FakeBackendThread) -> Iterator[Env]:
    settings = rag_settings(tmp_path_factory.mktemp("clients"), fake_backend.url)
    key = make_key(settings)
    with GatewayServer(settings) as server, httpx.Client(timeout=60) as http:
        yield server.url + "/v1", key, http


def sdk(env: Env) -> openai.OpenAI:
    return openai.OpenAI(base_url=env[0], api_key=env[1], max_retries=0, http_client=env[2])


def chat(env: Env, **kwargs: Any) -> ChatOpenAI:
    kwargs.setdefault("http_client", env[2])
    return ChatOpenAI(model="fake-model", base_url=env[0], api_key=env[1], max_retries=0, **kwargs)


def llama(env: Env, **kwargs: Any) -> OpenAILike:
    kwargs.setdefault("http_client", env[2])
    return OpenAILike(model="fake-model", api_base=env[0], api_key=env[1], is_chat_model=True, max_retries=0, **kwargs)


def sdk_answer(env: Env, text: str) -> openai.types.chat.ChatCompletion:
    return sdk(env).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}])


# ---------------------------------------------------------------- LangChain


def test_langchain_invoke_stream_batch_and_async_match_the_sdk(env: Env) -> None:
    expected = sdk_answer(env, "Say something about gateways.")
    llm = chat(env)
    reply = llm.invoke("Say something about gateways.")
    assert reply.content == expected.choices[0].message.content
    assert reply.usage_metadata is not None and expected.usage is not None
    assert reply.usage_metadata["total_tokens"] == expected.usage.total_tokens
    assert reply.response_metadata["finish_reason"] == "stop"

    streamed = "".join(str(chunk.content) for chunk in llm.stream("Say something about gateways."))
    assert streamed == expected.choices[0].message.content
    batch = llm.batch(["Say something about gateways.", "Say something about gateways."])
    assert [m.content for m in batch] == [expected.choices[0].message.content] * 2

    async def in_a_loop() -> Any:
        async with httpx.AsyncClient(timeout=60) as http:
            return await chat(env, http_async_client=http).ainvoke([HumanMessage("Say something about gateways.")])

    assert asyncio.run(in_a_loop()).content == expected.choices[0].message.content


def test_langchain_shows_rag_sources_through_the_footer(env: Env) -> None:
    reply = chat(env, extra_body=FOOTER_RAG).invoke(QUESTION)
    text = str(reply.content)
    assert text.startswith(ANSWER)
    # LangChain drops the `gateway` object and the annotations; the footer names the cited document.
    assert "\n\nSources:\n[1] " in text and "zorblat.txt" in text
    streamed = "".join(str(c.content) for c in chat(env, extra_body=FOOTER_RAG).stream(QUESTION))
    assert streamed == text


def test_langchain_bind_tools_gets_the_tool_call(env: Env) -> None:
    direct = sdk(env).chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body={"fake": {"body": TOOL_ANSWER}},
    )
    llm = chat(env, extra_body={"fake": {"body": TOOL_ANSWER}}).bind_tools([WEATHER_TOOL], tool_choice="auto")
    reply = llm.invoke("Weather in Paris?")
    [call] = reply.tool_calls  # type: ignore[attr-defined]
    [sdk_call] = direct.choices[0].message.tool_calls or []
    assert call["name"] == sdk_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call["args"] == json.loads(sdk_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert reply.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_structured_output(env: Env) -> None:
    class Product(BaseModel):
        name: str
        weight_kg: float

    answer = {"fake": {"answer": '{"name": "Zorblat 3000", "weight_kg": 4.2}'}}
    structured = chat(env, extra_body=answer).with_structured_output(Product)
    result = structured.invoke("Extract the product.")
    assert result == Product(name="Zorblat 3000", weight_kg=4.2)


def test_langchain_embeddings_match_the_sdk(env: Env) -> None:
    # check_embedding_ctx_length=False: send text, not tiktoken ids (which need a download).
    embeddings = OpenAIEmbeddings(
        model="hashing-384", base_url=env[0], api_key=env[1], check_embedding_ctx_length=False, max_retries=0,
        http_client=env[2],
    )  # fmt: skip
    vectors = embeddings.embed_documents(["first text", "second text"])
    direct = sdk(env).embeddings.create(model="hashing-384", input=["first text", "second text"])
    for got, want in zip(vectors, [d.embedding for d in direct.data], strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert embeddings.embed_query("first text") == pytest.approx(vectors[0], abs=1e-6)


def test_langchain_errors_are_the_sdk_errors(env: Env) -> None:
    bad = chat(env, extra_body={"rag": {"collection": "products", "sources": "endnotes"}})
    with pytest.raises(openai.BadRequestError) as caught:
        bad.invoke("hi")
    assert caught.value.body["param"] == "rag.sources"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        ChatOpenAI(
            model="fake-model", base_url=env[0], api_key="sk-gw-wrong", max_retries=0, http_client=env[2]
        ).invoke("hi")


# ---------------------------------------------------------------- LlamaIndex


def test_llamaindex_chat_stream_and_complete_match_the_sdk(env: Env) -> None:
    expected = sdk_answer(env, "Tell me about logs.").choices[0].message.content
    llm = llama(env)
    reply = llm.chat([ChatMessage(role="user", content="Tell me about logs.")])
    assert reply.message.content == expected
    streamed = list(llm.stream_chat([ChatMessage(role="user", content="Tell me about logs.")]))
    assert streamed[-1].message.content == expected
    assert llm.complete("Tell me about logs.").text == expected

    async def in_a_loop() -> Any:
        async with httpx.AsyncClient(timeout=60) as http:
            asking = llama(env, async_http_client=http)
            return await asking.achat([ChatMessage(role="user", content="Tell me about logs.")])

    assert asyncio.run(in_a_loop()).message.content == expected


def test_llamaindex_shows_rag_sources(env: Env) -> None:
    llm = llama(env, additional_kwargs={"extra_body": FOOTER_RAG})
    reply = llm.chat([ChatMessage(role="user", content=QUESTION)])
    text = reply.message.content or ""
    assert text.startswith(ANSWER) and "\n\nSources:\n[1] " in text and "zorblat.txt" in text
    # The raw answer keeps what LlamaIndex does not surface: annotations naming the same documents.
    raw = reply.raw
    message = raw["choices"][0]["message"] if isinstance(raw, dict) else raw.choices[0].message.model_dump()
    citations = (raw if isinstance(raw, dict) else raw.model_extra)["gateway"]["citations"]
    urls = {a["url_citation"]["url"].split("#")[0] for a in message["annotations"]}
    assert urls == {f"/v1/documents/products/{c['document']}" for c in citations}
