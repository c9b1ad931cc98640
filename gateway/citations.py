"""Citations where every client sees them: OpenAI `annotations` on the answer message, and an
opt-in "Sources:" footer appended to the answer text.

Pure functions over the answer text and the `citations` list (`retrieval.citations`), so the
pipeline only attaches what they return. An annotation's `url` is the collection's configured
base URL joined with the document's relative path when the documents live on a web site, else
the gateway's own document view, `/v1/documents/{collection}/{path}#chunk-{chunk_id}`.
`start_index`/`end_index` point at the `[n]` markers the model wrote (every occurrence); a
citation the model did not mark is annotated as an empty span at the end of the text, so the
list of annotations always names the same documents as `gateway.citations`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

SOURCES_MODES = ("annotations", "footer")
FOOTER_HEADING = "Sources:"
_MARKER = re.compile(r"\[(\d{1,3})\]")


def document_url(citation: Mapping[str, Any], base_urls: Mapping[str, str], prefix: str = "/v1/documents") -> str:
    """A link a person can open for one citation."""
    collection = str(citation.get("collection") or "")
    source = str(citation.get("source") or citation.get("document") or "")
    if source.startswith(("http://", "https://")):
        return source
    base = base_urls.get(collection)
    if base:
        return base.rstrip("/") + "/" + quote(source.lstrip("/"))
    document = str(citation.get("document") or source)
    anchor = quote(str(citation.get("chunk_id") or ""), safe="")
    return f"{prefix}/{quote(collection, safe='')}/{quote(document)}#chunk-{anchor}"


def marker_spans(text: str) -> dict[int, list[tuple[int, int]]]:
    """Where each `[n]` marker sits in `text`: n -> [(start, end), ...] (character offsets)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for match in _MARKER.finditer(text):
        spans.setdefault(int(match.group(1)), []).append((match.start(), match.end()))
    return spans


def url_annotations(
    text: str, citations: Sequence[Mapping[str, Any]], base_urls: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """OpenAI `url_citation` annotations for `citations` over the answer `text`."""
    if not citations:
        return []
    spans = marker_spans(text) if "[" in text else {}
    out: list[dict[str, Any]] = []
    for citation in citations:
        url = document_url(citation, base_urls or {})
        title = str(citation.get("title") or citation.get("document") or "")
        for start, end in spans.get(int(citation.get("index", 0)), [(len(text), len(text))]):
            out.append(
                {
                    "type": "url_citation",
                    "url_citation": {"url": url, "title": title, "start_index": start, "end_index": end},
                }
            )
    out.sort(key=lambda a: (a["url_citation"]["start_index"], a["url_citation"]["url"]))
    return out


def footer(citations: Sequence[Mapping[str, Any]]) -> str:
    """The short sources block appended to the answer text (empty without citations)."""
    if not citations:
        return ""
    lines = [FOOTER_HEADING]
    for citation in citations:
        title = str(citation.get("title") or citation.get("document") or "")
        source = str(citation.get("source") or "")
        where = f" ({source})" if source and source != title else ""
        lines.append(f"[{citation.get('index')}] {title}{where}")
    return "\n\n" + "\n".join(lines)


def strip_footer(text: str) -> str:
    """The answer text without a footer this module appended (what the groundedness guard reads)."""
    cut = text.rfind("\n\n" + FOOTER_HEADING + "\n")
    return text[:cut] if cut >= 0 else text


def check_mode(value: object) -> str:
    """A `rag.sources` value, checked (raises ValueError with a message for the client)."""
    if value not in SOURCES_MODES:
        raise ValueError(f"'rag.sources' must be one of {', '.join(SOURCES_MODES)}")
    return str(value)


@dataclass(frozen=True, slots=True)
class CitationConfig:
    """The gateway's citation settings: the default way to show sources, per-alias defaults, and
    the web sites collections' documents live on."""

    default: str = "annotations"
    alias_modes: Mapping[str, str] = field(default_factory=dict)
    base_urls: Mapping[str, str] = field(default_factory=dict)

    def mode(self, asked: str | None, key_mode: str | None, model: str | None) -> str:
        """The request's own choice, else the key's default, else the alias's, else the gateway's."""
        return asked or key_mode or (self.alias_modes.get(model) if model else None) or self.default


@dataclass(frozen=True, slots=True)
class Sources:
    """One RAG answer's sources, put where clients see them."""

    mode: str
    citations: Sequence[Mapping[str, Any]]
    base_urls: Mapping[str, str]

    def message(self, choice: dict[str, Any]) -> None:
        """A complete answer's choice: annotations on its message, and the footer when asked."""
        message = choice.get("message")
        if not isinstance(message, dict) or choice.get("finish_reason") in _NO_SOURCES:
            return
        text = message.get("content")
        if not isinstance(text, str) or not text:
            return
        message["annotations"] = url_annotations(text, self.citations, self.base_urls)
        if self.mode == "footer":
            message["content"] = text + footer(self.citations)

    def closing_delta(self, choice: dict[str, Any], delivered: str) -> None:
        """A stream's closing chunk for one choice (`delivered`: the text the client has of it,
        this chunk's included): annotations in its delta, and the footer as its last text."""
        if choice.get("finish_reason") in _NO_SOURCES or not delivered:
            return
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        delta["annotations"] = url_annotations(delivered, self.citations, self.base_urls)
        if self.mode == "footer":
            delta["content"] = (delta.get("content") or "") + footer(self.citations)


_NO_SOURCES = frozenset({"content_filter", "tool_calls"})  # a withheld answer, or no answer text at all
