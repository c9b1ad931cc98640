"""Retrieval in the request pipeline: which requests use it, and what it adds to them.

A chat request uses RAG when it names a model alias (a model name mapped to a collection and a
backend model), carries the extension field `"rag": {"collection", "top_k", "min_score",
"sources"}`, or comes with an API key that has a default collection. The field is the gateway's
own, so it is taken out of the body before the body goes to vLLM. `sources` says how the answer
shows its sources: "annotations" (OpenAI `url_citation` annotations, always there) or "footer"
(also a "Sources:" block at the end of the text); unset, the key's, then the alias's, then the
gateway's default applies.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from gateway.citations import SOURCES_MODES
from gateway.errors import InvalidRequest
from gateway.shapes import Shape
from guardrails import Passage
from retrieval import Hit


@dataclass(frozen=True, slots=True)
class RagRequest:
    collection: str
    top_k: int
    min_score: float
    sources: str | None = None  # as the request asked; None: the defaults decide


def resolve(
    body: dict[str, Any],
    *,
    shape: Shape,
    aliases: dict[str, tuple[str, str]],
    key_collection: str | None,
    default_top_k: int,
    default_min_score: float,
) -> RagRequest | None:
    """Take the request's RAG settings out of the body (rewriting an aliased model name)."""
    spec = body.pop("rag", None)
    model = body.get("model")
    collection: str | None = None
    if isinstance(model, str) and model in aliases:
        collection, body["model"] = aliases[model]
    if spec is None and collection is None and key_collection is None:
        return None
    if spec is not None and not isinstance(spec, dict):
        raise InvalidRequest('\'rag\' must be an object like {"collection": "docs"}', param="rag", code="invalid_type")
    spec = spec or {}
    unknown = set(spec) - {"collection", "top_k", "min_score", "sources"}
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) in 'rag': {', '.join(sorted(unknown))}", param="rag", code="invalid_value"
        )
    collection = spec.get("collection", collection or key_collection)
    if not isinstance(collection, str) or not collection:
        raise InvalidRequest("'rag.collection' must be a non-empty string", param="rag.collection", code="invalid_type")
    top_k = spec.get("top_k", default_top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 50:
        raise InvalidRequest("'rag.top_k' must be an integer from 1 to 50", param="rag.top_k", code="invalid_value")
    min_score = spec.get("min_score", default_min_score)
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not -1.0 <= min_score <= 1.0:
        raise InvalidRequest(
            "'rag.min_score' must be a number from -1 to 1", param="rag.min_score", code="invalid_value"
        )
    sources = spec.get("sources")
    if sources is not None and sources not in SOURCES_MODES:
        raise InvalidRequest(
            f"'rag.sources' must be one of {', '.join(SOURCES_MODES)}", param="rag.sources", code="invalid_value"
        )
    if not shape.retrieval:
        raise InvalidRequest("retrieval is available on /v1/chat/completions only", param="rag", code="invalid_value")
    return RagRequest(collection, top_k, float(min_score), sources)


def as_passage(hit: Hit) -> Passage:
    return Passage(id=hit.chunk_id, text=hit.text, title=hit.title, source=hit.source)


def apply_passage_guards(hits: list[Hit], kept: tuple[Passage, ...]) -> list[Hit]:
    """Keep the hits whose passages survived the passage guards, with any redaction applied."""
    by_id = {p.id: p for p in kept}
    out = []
    for hit in hits:
        passage = by_id.get(hit.chunk_id)
        if passage is not None:
            out.append(hit if passage.text == hit.text else dataclasses.replace(hit, text=passage.text))
    return out


def passage_record(hit: Hit) -> dict[str, Any]:
    """What the audit row stores of each passage the model saw."""
    return {
        "collection": hit.collection,
        "document": hit.document_id,
        "chunk_id": hit.chunk_id,
        "title": hit.title,
        "source": hit.source,
        "score": round(float(hit.score), 4),
        "rank": hit.rank,
        "text": hit.text,
    }


def refusal(model: str | None, message: str, request_id: str) -> dict[str, Any]:
    """A complete chat answer the gateway gives itself when the policy refuses empty retrieval."""
    return {
        "id": f"gw-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": message},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def refusal_events(answer: dict[str, Any]) -> list[bytes]:
    """The same refusal as stream events (role and text, then the finish)."""
    import msgspec

    base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    text = answer["choices"][0]["message"]["content"]
    first = base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]}
    last = base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return [msgspec.json.encode(first), msgspec.json.encode(last)]
