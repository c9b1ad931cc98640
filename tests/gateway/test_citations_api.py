"""Citations where every client sees them (issue 17), through the HTTP API: OpenAI `url_citation`
annotations on the message (and on a stream's closing chunk), the opt-in "Sources:" footer and
its defaults (request, key, alias, setting), links to a collection's web site or to the
gateway's own document view, and which keys may use a collection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import openai
import pytest

from gateway.auth import KeyStore
from gateway.db import create_engine
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.gateway.test_rag_api import ingest, write
from tests.helpers import GatewayServer, audit_rows

QUESTION = "How much does the Zorblat 3000 vacuum weigh?"
ANSWER = "The Zorblat 3000 weighs 4.2 kg [1]. It costs 199 euros [1]."


def make_key(
    settings: Settings, role: str = "client", collections: frozenset[str] | None = None, sources: str | None = None
) -> str:
    async def go() -> str:
        engine = create_engine(settings.database_url)
        try:
            _, secret = await KeyStore(engine).create(role, "t", collections=collections, rag_sources=sources)
            return secret
        finally:
            await engine.dispose()

    return asyncio.run(go())


def rag_settings(tmp_path: Path, backend_url: str) -> Settings:
    """A gateway with two collections: "products" (two documents) and "internal" (one)."""
    settings = make_settings(
        tmp_path,
        backend_url,
        alias=("docs-model=products:fake-model", "docs-footer=products:fake-model;sources=footer"),
    )
    docs = tmp_path / "docs"
    write(docs, "zorblat.txt", "The Zorblat 3000 vacuum cleaner weighs 4.2 kg and costs 199 euros.")
    write(docs / "phones", "quibble.md", "# Quibble phone\n\nThe Quibble phone battery lasts 31 hours of talk time.")
    ingest(settings, "products", docs)
    write(tmp_path / "other", "secret.txt", "The internal launch code name is Bluebird.")
    ingest(settings, "internal", tmp_path / "other")
    return settings


@pytest.fixture
def settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return rag_settings(tmp_path, fake_backend.url)


_CLIENTS: list[openai.OpenAI] = []  # closed when the test's gateway stops


@pytest.fixture
def gw(settings: Settings) -> Iterator[GatewayServer]:
    with GatewayServer(settings) as server:
        try:
            yield server
        finally:
            while _CLIENTS:
                _CLIENTS.pop().close()


def client_for(gw: GatewayServer, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)
    _CLIENTS.append(client)
    return client


def ask(client: openai.OpenAI, model: str = "fake-model", **rag: object) -> openai.types.chat.ChatCompletion:
    extra: dict[str, object] = {"fake": {"answer": ANSWER}}
    if rag:
        extra["rag"] = {"min_score": 0.05, **rag}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], extra_body=extra
    )


def test_annotations_name_the_same_documents_as_gateway_citations(gw: GatewayServer, settings: Settings) -> None:
    reply = ask(client_for(gw, make_key(settings)), collection="products", top_k=2)
    message = reply.choices[0].message
    citations = reply.model_extra["gateway"]["citations"]
    assert message.content == ANSWER  # annotations only: the text is the model's
    annotations = message.annotations or []
    assert {a.url_citation.url for a in annotations} == {
        f"/v1/documents/products/{c['document']}#chunk-{quote(c['chunk_id'], safe='')}" for c in citations
    }
    first = citations[0]
    marked = [a.url_citation for a in annotations if a.url_citation.url.endswith(quote(first["chunk_id"], safe=""))]
    # Both "[1]" markers the model wrote are pointed at, in order.
    assert [ANSWER[a.start_index : a.end_index] for a in marked] == ["[1]", "[1]"]
    assert marked[0].title == first["title"]


def test_footer_on_request_is_in_the_text_but_not_in_the_audited_answer(gw: GatewayServer, settings: Settings) -> None:
    reply = ask(client_for(gw, make_key(settings)), collection="products", sources="footer")
    content = reply.choices[0].message.content or ""
    citations = reply.model_extra["gateway"]["citations"]
    assert content.startswith(ANSWER)
    footer = content[len(ANSWER) :]
    assert footer.startswith("\n\nSources:\n[1] ")
    assert all(c["title"] in footer and c["source"] in footer for c in citations)
    [row] = audit_rows(settings)
    assert row["response_text"] == ANSWER  # what the model wrote: what the groundedness guard judged
    assert "Sources:" in json.loads(row["response_json"])["choices"][0]["message"]["content"]


def test_sources_default_comes_from_the_key_then_the_alias(gw: GatewayServer, settings: Settings) -> None:
    footer_key = client_for(gw, make_key(settings, sources="footer"))
    plain_key = client_for(gw, make_key(settings))
    assert "\n\nSources:\n" in (ask(footer_key, collection="products").choices[0].message.content or "")
    assert "Sources:" not in (ask(plain_key, collection="products").choices[0].message.content or "")
    assert "\n\nSources:\n" in (ask(plain_key, model="docs-footer").choices[0].message.content or "")
    # The request's own choice wins over both defaults.
    assert "Sources:" not in (
        ask(footer_key, model="docs-footer", sources="annotations").choices[0].message.content or ""
    )


def test_bad_sources_value_is_a_400_in_openai_form(gw: GatewayServer, settings: Settings) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client_for(gw, make_key(settings)), collection="products", sources="endnotes")
    assert caught.value.body["param"] == "rag.sources"  # type: ignore[index]


@pytest.mark.parametrize("sources", ["annotations", "footer"])
def test_stream_closing_chunk_carries_annotations_and_footer(
    gw: GatewayServer, settings: Settings, sources: str
) -> None:
    client = client_for(gw, make_key(settings))
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            extra_body={
                "rag": {"collection": "products", "min_score": 0.05, "sources": sources},
                "fake": {"answer": ANSWER},
            },
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    closing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(closing) == 1 and closing[0].choices[0].finish_reason == "stop"
    annotations = closing[0].choices[0].delta.model_extra["annotations"]
    citations = chunks[-1].model_extra["gateway"]["citations"]
    assert {unquote(a["url_citation"]["url"].rsplit("#chunk-", 1)[1]) for a in annotations} == {
        c["chunk_id"] for c in citations
    }
    for a in annotations:
        span = a["url_citation"]
        assert text[span["start_index"] : span["end_index"]] in ("[1]", "")
    if sources == "footer":
        assert text.startswith(ANSWER) and text[len(ANSWER) :].startswith("\n\nSources:\n[1] ")
    else:
        assert text == ANSWER


def test_collection_base_url_makes_web_links(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    settings = make_settings(tmp_path, fake_backend.url, citation_base_url=("products=https://docs.example.com/kb/",))
    write(tmp_path / "docs" / "phones", "quibble.md", "# Quibble phone\n\nThe Quibble battery lasts 31 hours.")
    ingest(settings, "products", tmp_path / "docs")
    with (
        GatewayServer(settings) as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key=make_key(settings), max_retries=0) as client,
    ):
        reply = ask(client, collection="products", min_score=-1.0)
    urls = {a.url_citation.url for a in reply.choices[0].message.annotations or []}
    assert urls == {"https://docs.example.com/kb/phones/quibble.md"}


def test_a_key_limited_to_collections_sees_only_those(gw: GatewayServer, settings: Settings) -> None:
    client = client_for(gw, make_key(settings, collections=frozenset({"products"})))
    assert ask(client, collection="products").model_extra["gateway"]["citations"]
    for name in ("internal", "missing"):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, collection=name)
        body = caught.value.body
        assert body["code"] == "unknown_collection"  # type: ignore[index]
        # The same answer for a collection it may not use and one that does not exist: no names leak.
        assert "internal" not in body["message"].replace(repr(name), "") and "products" in body["message"]  # type: ignore[index]
    admin = client_for(gw, make_key(settings, "admin", collections=frozenset({"products"})))
    assert ask(admin, collection="internal").model_extra["gateway"]["citations"]


def test_document_view_serves_the_cited_passage_to_keys_that_may_read_it(gw: GatewayServer, settings: Settings) -> None:
    key = make_key(settings, collections=frozenset({"products"}))
    reply = ask(client_for(gw, key), collection="products", top_k=1)
    [citation] = reply.model_extra["gateway"]["citations"]
    url = gw.url + (reply.choices[0].message.annotations or [])[0].url_citation.url.split("#")[0]
    page = httpx.get(url, headers={"authorization": f"Bearer {key}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'id="chunk-{citation["chunk_id"]}"' in page.text and "4.2 kg" in page.text
    as_json = httpx.get(url, headers={"authorization": f"Bearer {key}", "accept": "application/json"}).json()
    assert [c["chunk_id"] for c in as_json["chunks"]] == [citation["chunk_id"]]

    other = make_key(settings, collections=frozenset({"internal"}))
    denied = httpx.get(url, headers={"authorization": f"Bearer {other}"})
    assert denied.status_code == 403 and denied.json()["error"]["type"]
    assert httpx.get(url).status_code == 401
    browser = httpx.get(url, headers={"accept": "text/html"})
    assert browser.status_code == 303 and browser.headers["location"].startswith("/review/login")
    missing = httpx.get(gw.url + "/v1/documents/products/nope.txt", headers={"authorization": f"Bearer {key}"})
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_document_view_escapes_document_text(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    settings = make_settings(tmp_path, fake_backend.url)
    write(tmp_path / "docs", "x.txt", "Hello <script>alert(1)</script> world of widgets.")
    ingest(settings, "web", tmp_path / "docs")
    key = make_key(settings)
    with GatewayServer(settings) as server:
        page = httpx.get(server.url + "/v1/documents/web/x.txt", headers={"authorization": f"Bearer {key}"})
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text


def test_keys_cli_sets_collections_and_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    d = ["--data-dir", str(tmp_path)]
    assert main(["keys", "create", "--role", "client", "--collections", "a, b", "--sources", "footer", *d]) == 0
    secret = capsys.readouterr().out.strip()
    settings = Settings(data_dir=tmp_path)

    async def lookup() -> tuple[frozenset[str] | None, str | None]:
        engine = create_engine(settings.database_url)
        try:
            info = await KeyStore(engine).authenticate(f"Bearer {secret}")
            return info.collections, info.rag_sources
        finally:
            await engine.dispose()

    assert asyncio.run(lookup()) == (frozenset({"a", "b"}), "footer")
    assert main(["keys", "list", *d]) == 0
    key_id = capsys.readouterr().out.split("\t")[0]
    assert main(["keys", "access", key_id, "--collections", "all", *d]) == 0
    assert asyncio.run(lookup()) == (None, None)
    assert main(["keys", "access", "key_nope", "--collections", "a", *d]) == 1
