"""Run an eval set through the live pipeline and score every item.

One line per item: `question` (required), and optionally `reference`, `documents`, `collection`,
`model`, `expect` and `id`. Every other field goes into the request body unchanged (for example
`temperature`, `max_tokens`, or the fake backend's `"fake": {"answer": ...}`). The first line may
instead be the set's header, `{"thresholds": {"pass_rate": 0.8, ...}, "description": "..."}`
(see `evals.thresholds`). An item without `max_tokens` (or `max_completion_tokens`) gets
`RunOptions.max_tokens` (the `eval_max_tokens` setting, 256 by default): a small model left
unbounded may write until its context is full.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from tqdm import tqdm

from evals import metrics
from evals.thresholds import Threshold, ThresholdError, from_header
from gateway.auth import KeyInfo
from gateway.errors import GatewayError
from gateway.pipeline import CHAT
from gateway.services import Services

EVAL_KEY = KeyInfo(id="eval", name="nightly eval", role="client")
_KNOWN = frozenset({"question", "reference", "documents", "collection", "model", "expect", "id", "system"})
_HEADER_KEYS = frozenset({"thresholds", "description"})


class DatasetError(ValueError):
    """The eval set cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class EvalItem:
    position: int
    question: str
    reference: str | None = None
    documents: tuple[str, ...] = ()
    collection: str | None = None
    model: str | None = None
    expect: str | None = None
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def as_input(self) -> dict[str, Any]:
        out: dict[str, Any] = {"question": self.question}
        for name in ("id", "reference", "collection", "model", "expect", "system"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.documents:
            out["documents"] = list(self.documents)
        return out | self.extra


@dataclass(frozen=True)
class EvalSet:
    """An eval set as read from its file: the items, and the thresholds of its header (if any)."""

    items: list[EvalItem]
    thresholds: list[Threshold] = field(default_factory=list)
    description: str | None = None


def load_dataset(path: Path) -> list[EvalItem]:
    """The items of a JSONL eval set (see `load_eval_set`)."""
    return load_eval_set(path).items


def load_eval_set(path: Path) -> EvalSet:
    """Parse a JSONL eval set; blank lines and lines starting with # are skipped. The first line
    may be a header (an object without `question`): `thresholds` and `description`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    items: list[EvalItem] = []
    thresholds: list[Threshold] = []
    description: str | None = None
    first = True
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON: {exc.msg}") from exc
        if first and isinstance(raw, dict) and "question" not in raw and raw:
            first = False
            unknown = sorted(set(raw) - _HEADER_KEYS)
            if unknown:
                raise DatasetError(
                    f"{where}: a header line holds only 'thresholds' and 'description', not {', '.join(unknown)} "
                    "(an item needs a 'question')"
                )
            try:
                thresholds = from_header(raw.get("thresholds", {}), where)
            except ThresholdError as exc:
                raise DatasetError(str(exc)) from exc
            if raw.get("description") is not None and not isinstance(raw["description"], str):
                raise DatasetError(f"{where}: 'description' must be a string")
            description = raw.get("description")
            continue
        first = False
        if not isinstance(raw, dict) or not isinstance(raw.get("question"), str) or not raw["question"].strip():
            raise DatasetError(f"{where}: each line must be an object with a non-empty 'question'")
        documents = raw.get("documents", [])
        if isinstance(documents, str):
            documents = [documents]
        if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
            raise DatasetError(f"{where}: 'documents' must be a list of document ids")
        for name in ("reference", "collection", "model", "expect", "system"):
            if name in raw and not isinstance(raw[name], str):
                raise DatasetError(f"{where}: '{name}' must be a string")
        expect = raw.get("expect")
        if expect is not None and expect.split(":", 1)[0].strip().lower() not in metrics.EXPECT_KINDS:
            raise DatasetError(f"{where}: 'expect' must be allowed, clean, blocked[:GUARD] or flagged[:GUARD]")
        items.append(
            EvalItem(
                position=len(items),
                question=raw["question"],
                reference=raw.get("reference"),
                documents=tuple(documents),
                collection=raw.get("collection"),
                model=raw.get("model"),
                expect=expect,
                system=raw.get("system"),
                extra={k: v for k, v in raw.items() if k not in _KNOWN},
                id=str(raw["id"]) if raw.get("id") is not None else None,
            )
        )
    if not items:
        raise DatasetError(f"{path}: no items")
    return EvalSet(items, thresholds, description)


@dataclass(frozen=True)
class RunOptions:
    model: str | None = None  # for items that name none; None: the backend's first model
    collection: str | None = None  # for items that name none; None: no retrieval for them
    top_k: int | None = None
    min_score: float | None = None
    concurrency: int = 4
    similarity_threshold: float = 0.7  # semantic similarity at or above which an answer counts as correct
    progress: bool = True
    max_tokens: int | None = 256  # for items that set no max_tokens; None: the backend's own limit


async def run_items(services: Services, items: Sequence[EvalItem], options: RunOptions) -> list[dict[str, Any]]:
    """Send every item through the pipeline (bounded concurrency, progress on stderr); returns
    one result dict per item, in order, ready for `evals.store.add_items`."""
    default_model = options.model
    if default_model is None and any(i.model is None for i in items):
        models = await services.backend.models()
        if not models:
            raise RuntimeError("the backend lists no models: pass --model")
        default_model = models[0].id
    limit = asyncio.Semaphore(max(1, options.concurrency))
    bar = tqdm(
        total=len(items), desc="eval", unit="item", file=sys.stderr, disable=not options.progress, dynamic_ncols=True
    )

    async def one(item: EvalItem) -> dict[str, Any]:
        async with limit:
            try:
                return await _run_one(services, item, options, default_model)
            except Exception as exc:  # one broken item is that item's error, never the whole run's
                return {"position": item.position, "input": item.as_input(), "output_text": "", "scores": {},
                        "latency_ms": None, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
            finally:
                bar.update(1)

    try:
        results = await asyncio.gather(*(one(i) for i in items))
    finally:
        bar.close()
    await _add_similarity(services, items, results, options.similarity_threshold)
    return list(results)


def _body(item: EvalItem, options: RunOptions, default_model: str | None) -> dict[str, Any]:
    messages = [{"role": "system", "content": item.system}] if item.system else []
    messages.append({"role": "user", "content": item.question})
    body: dict[str, Any] = {**item.extra, "model": item.model or default_model, "messages": messages}
    body.pop("stream", None)  # scored on the complete answer; the stream path is the live suite's job
    body.pop("stream_options", None)
    if options.max_tokens is not None and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = options.max_tokens
    collection = item.collection or (options.collection if item.model is None else None)
    if collection and "rag" not in body:
        rag: dict[str, Any] = {"collection": collection}
        if options.top_k is not None:
            rag["top_k"] = options.top_k
        if options.min_score is not None:
            rag["min_score"] = options.min_score
        body["rag"] = rag
    return body


async def _run_one(
    services: Services, item: EvalItem, options: RunOptions, default_model: str | None
) -> dict[str, Any]:
    body = _body(item, options, default_model)
    raw = msgspec.json.encode(body)

    async def read_body() -> bytes:
        return raw

    began = time.perf_counter()
    result: dict[str, Any] = {"position": item.position, "input": item.as_input()}
    answer = ""
    citations: list[dict[str, Any]] = []
    guards: list[dict[str, Any]] = []
    blocked: dict[str, Any] | None = None
    retrieved: list[str] = []
    try:
        trace, payload = await services.pipeline.handle(CHAT, read_body, None, "eval", key=EVAL_KEY, origin="eval")
        assert isinstance(payload, bytes)  # never a stream: `_body` drops "stream"
        response = msgspec.json.decode(payload)
        result["request_id"] = trace.request_id
        answer = ((response.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        gateway = response.get("gateway") or {}
        citations = gateway.get("citations") or []
        guards = gateway.get("guards") or []
        blocked = trace.blocked
        retrieved = [h.document_id for h in trace.hits]
        result["backend_ms"] = round(trace.backend_s * 1000, 3)
    except GatewayError as error:
        gateway = error.extra.get("gateway") or {}
        result["request_id"] = gateway.get("request_id")
        guards = gateway.get("guards") or []
        blocked = gateway.get("blocked")
        if blocked is None:
            result["error"] = f"{error.status} {error.code}: {error.message}"
    result["latency_ms"] = round((time.perf_counter() - began) * 1000, 3)
    result["output_text"] = answer
    outcome = metrics.Outcome(
        blocked_by=blocked.get("guard") if blocked else None,
        flagged=frozenset(g["guard"] for g in guards if g.get("action") in ("flag", "redact")),
    )
    scores: dict[str, Any] = {"outcome": outcome.label}
    grounded = [float(g["score"]) for g in guards if g.get("guard") == "groundedness" and g.get("stage") == "output"]
    toxic = [g for g in guards if g.get("guard") == "toxicity"]
    if grounded:
        scores["groundedness"] = min(grounded)
        scores["grounded"] = not any(g.get("action") != "allow" for g in guards if g.get("guard") == "groundedness")
    if toxic:
        scores["toxicity"] = max(float(g["score"]) for g in toxic)
        scores["toxic"] = any(g.get("action") != "allow" for g in toxic)
    if item.reference is not None and "error" not in result and outcome.blocked_by is None:
        scores["exact_match"] = metrics.exact_match(answer, item.reference)
        scores["contains"] = metrics.contains(answer, item.reference)
    if item.documents and "error" not in result and outcome.blocked_by is None:
        cited = metrics.cited_documents(answer, citations)
        scores["cited_documents"] = cited
        scores["retrieved_documents"] = list(dict.fromkeys(retrieved))
        scores["citation_precision"] = metrics.citation_precision(cited, item.documents)
        scores["retrieval_recall"] = metrics.recall(retrieved, item.documents)
    if item.expect is not None and "error" not in result:
        scores["guard_ok"] = metrics.outcome_matches(item.expect, outcome)
    result["scores"] = scores
    return result


async def _add_similarity(
    services: Services, items: Sequence[EvalItem], results: list[dict[str, Any]], threshold: float
) -> None:
    """Cosine similarity of answer and reference with the gateway's embedding model (unit vectors),
    then each item's correctness and pass/fail."""
    pairs = [(i, r) for i, r in zip(items, results, strict=True) if "exact_match" in r["scores"]]
    if pairs and services.embedder is not None:
        texts = [t for item, r in pairs for t in (r["output_text"] or " ", item.reference or " ")]
        vectors = await services.embedder.embed(texts)
        for k, (_, r) in enumerate(pairs):
            r["scores"]["similarity"] = round(float(np.dot(vectors[2 * k], vectors[2 * k + 1])), 4)
    for item, r in zip(items, results, strict=True):
        s = r["scores"]
        if "exact_match" in s:
            s["correct"] = bool(s["exact_match"] or s["contains"] or s.get("similarity", -1.0) >= threshold)
        checks = [s[k] for k in ("correct", "guard_ok") if k in s]
        if item.expect is None and item.reference is not None and "correct" not in s and "error" not in r:
            checks.append(False)  # an answer was wanted and none came (blocked unexpectedly)
        r["passed"] = "error" not in r and all(checks)


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run-level metrics from item results."""
    scores = [r["scores"] for r in results]
    latencies = [float(r["latency_ms"]) for r in results if r.get("latency_ms") is not None and "error" not in r]
    answered = [s for s in scores if "toxic" in s]
    out: dict[str, Any] = {
        "items": len(results),
        "errors": sum(1 for r in results if "error" in r),
        "error_rate": metrics.rate("error" in r for r in results),
        "pass_rate": metrics.rate(r.get("passed") for r in results),
        "exact_match": metrics.rate(s.get("exact_match") for s in scores),
        "contains": metrics.rate(s.get("contains") for s in scores),
        "semantic_similarity": metrics.mean(s.get("similarity") for s in scores),
        "correctness": metrics.rate(s.get("correct") for s in scores),
        "groundedness_mean": metrics.mean(s.get("groundedness") for s in scores),
        "grounded_rate": metrics.rate(s.get("grounded") for s in scores),
        "citation_precision": metrics.mean(s.get("citation_precision") for s in scores),
        "retrieval_recall": metrics.mean(s.get("retrieval_recall") for s in scores),
        "toxicity_rate": metrics.rate(s.get("toxic") for s in answered) if answered else None,
        "guard_accuracy": metrics.rate(s.get("guard_ok") for s in scores),
        "blocked_rate": metrics.rate(str(s.get("outcome", "")).startswith("blocked") for s in scores),
        "latency_mean_ms": metrics.mean(latencies),
        "latency_p50_ms": metrics.percentile(latencies, 50),
        "latency_p95_ms": metrics.percentile(latencies, 95),
        "latency_p99_ms": metrics.percentile(latencies, 99),
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
