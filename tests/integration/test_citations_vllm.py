"""Citations through the real CPU vLLM and the bundled embedding model (issue 17): the openai SDK's
`message.annotations` name the same documents as `gateway.citations`, and LangChain, which keeps
only the content, shows them through the opt-in footer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.settings import Settings
from serving.local import LOCAL_MODEL_NAME
from tests.helpers import GatewayServer, prepare_database, serving

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "How long is the warranty period?"}]
# Output guards off: this test is about where sources go, not about what a 135M model writes.
POLICY = "[guards.toxicity]\nenabled = false\n\n[guards.groundedness]\nenabled = false\n"


@pytest.fixture
def setup(tmp_path: Path, vllm_url: str) -> Iterator[tuple[GatewayServer, openai.OpenAI]]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    settings = Settings(data_dir=tmp_path, backend=(vllm_url,), sample_corpus=True, policy=policy)
    prepare_database(settings)
    with serving(settings) as (gw, client):
        yield gw, client


def test_annotations_and_the_langchain_footer(setup: tuple[GatewayServer, openai.OpenAI]) -> None:
    from langchain_openai import ChatOpenAI

    gw, client = setup
    rag = {"collection": "sample", "min_score": 0.0, "top_k": 2}
    reply = client.chat.completions.create(
        model=LOCAL_MODEL_NAME, messages=QUESTION, max_tokens=60, temperature=0, extra_body={"rag": rag}
    )
    citations = reply.model_extra["gateway"]["citations"]
    assert citations and reply.choices[0].finish_reason in ("stop", "length")
    urls = {a.url_citation.url.split("#")[0] for a in reply.choices[0].message.annotations or []}
    assert urls == {f"/v1/documents/sample/{c['document']}" for c in citations}

    llm = ChatOpenAI(
        model=LOCAL_MODEL_NAME,
        base_url=gw.url + "/v1",
        api_key=client.api_key,
        max_retries=0,
        max_tokens=60,
        temperature=0,
        extra_body={"rag": {**rag, "sources": "footer"}},
    )
    content = str(llm.invoke(QUESTION[0]["content"]).content)
    footer = content[content.rindex("\n\nSources:\n") :]
    assert all(c["source"] in footer for c in citations)
