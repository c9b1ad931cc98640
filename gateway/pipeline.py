"""The request pipeline: authenticate, validate, call the backend, shape the answer, audit it.

Plain code that a test can drive without HTTP: a route hands it the raw body reader, the
Authorization header and the client address, and gets back either the JSON bytes of a
complete answer or an async iterator of server-sent-event bytes.

Every request leaves exactly one audit row. The client's final bytes (the JSON body, or the
stream's last event and `[DONE]`) are released only after that row is committed. A stream
holds back only the event that can be the last one (the one carrying `finish_reason`, or the
usage event), so tokens flow through as they arrive.

Nothing a client or a backend sends can end a request without its row: a malformed request is
a 400, an answer of the wrong shape (checked before any field is used) or a stream cut short is
a 502 (an SSE `error` event once the stream has begun), and anything unforeseen is a logged 500,
each with its audit row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import guarding, rag, shapes
from gateway.audit import AuditWriter
from gateway.auth import OPEN_MODE_KEY, KeyInfo, KeyStore
from gateway.citations import CitationConfig, Sources
from gateway.errors import (
    GatewayError,
    InputBlocked,
    InternalError,
    InvalidRequest,
    LimitsUnavailable,
    NotFound,
    RateLimited,
    UpstreamError,
    from_serving_error,
)
from gateway.limits import UNLIMITED, Admission, Limiter, estimate_tokens, release_after, tokens_used
from gateway.logs import new_request_id
from gateway.relay import StreamGuard, StreamRelay, ask_for_usage
from gateway.rollout import audit_columns as rollout_columns
from gateway.shapes import Shape, answer_problem
from gateway.tracing import current_trace_id
from gateway.validation import Limits, decode_body, validate_chat, validate_completion, validate_embeddings
from guardrails import Guardrails, Passage, Verdict
from retrieval import CollectionStore, Hit, UnknownCollection, build_rag_messages, citations, retrieval_query
from serving.backend import Backend
from serving.errors import ServingError

if TYPE_CHECKING:
    from gateway.rollout import Rollout
    from serving.router import RouteContext

log = logging.getLogger("gateway")
_encode = msgspec.json.Encoder().encode
EMBEDDING_MODEL_ALIAS = "text-embedding-gateway"  # also accepted as the embedding model's name


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI route the pipeline serves."""

    name: str
    path: str
    shape: Shape  # where its answers keep their text (chat or text completion)
    validate: Callable[[dict[str, Any], Limits], None]

    @property
    def chat(self) -> bool:
        return self.shape is shapes.CHAT


CHAT = Endpoint("chat.completions", "/v1/chat/completions", shapes.CHAT, validate_chat)
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", shapes.TEXT, validate_embeddings)
COMPLETIONS = Endpoint("completions", "/v1/completions", shapes.TEXT, validate_completion)


@dataclass(slots=True)
class Trace:
    """What the audit row of one request will say; filled in as the request moves on."""

    endpoint: Endpoint
    client_ip: str | None
    request_id: str = field(default_factory=new_request_id)  # also the id on this request's log lines
    trace_id: str | None = field(default_factory=current_trace_id)  # W3C trace id (gateway.tracing)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    api_key_id: str | None = None
    origin: str | None = None  # None: live traffic; "eval": an eval run's request (kept out of review, usage, drift)
    model: str | None = None  # as the client asked (an alias stays the alias)
    backend_model: str | None = None  # the model an alias stands for, asked of the backend
    stream: bool = False
    request_json: str | None = None
    status: str = "ok"
    http_status: int = 200
    error_code: str | None = None
    error_message: str | None = None
    response_text: str | None = None
    response_json: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    backend: str | None = None
    backend_s: float = 0.0
    ttft_s: float | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    blocked: dict[str, Any] | None = None  # which guard withheld the answer, and why
    hits: list[Hit] = field(default_factory=list)  # the passages the model saw
    retrieval: dict[str, Any] | None = None
    refusal: dict[str, Any] | None = None  # the gateway's own answer (empty retrieval, policy "refuse")
    rate_headers: dict[str, str] | None = None  # x-ratelimit-* of the key's limits, for the answer
    route: RouteContext | None = None  # the deployment that answered (gateway.rollout)
    sources: Sources | None = None  # a RAG answer's citations, shown as annotations (and a footer)
    _cited: list[dict[str, Any]] | None = None  # citations(hits), built once (row, answer, sources)
    versions: Mapping[str, Any] = field(default_factory=dict)  # config, policy and gateway versions at the start
    auth_s: float | None = None  # stage timings for the metrics (gateway.metrics.stage_seconds)
    audit_s: float | None = None
    #: Input checks that can only flag, still running beside the backend call (InputResult.deferred);
    #: `settle` adds their verdicts before anything shows the verdicts (answer, last event, row).
    deferred: asyncio.Task[list[Verdict]] | None = None

    async def settle(self) -> None:
        """Wait for the deferred input checks and add their verdicts (once). A check that failed
        is logged and leaves no verdict: it could only have flagged, and the row must be written."""
        task, self.deferred = self.deferred, None
        if task is None:
            return
        try:
            self.verdicts.extend(await asyncio.shield(task))
        except asyncio.CancelledError:
            if task.done():  # the task itself was cancelled (shutdown), not our caller
                return
            self.deferred = task  # our caller is being cancelled: whoever records next settles it
            raise
        except Exception:
            log.exception("a deferred input check of request %s failed; its verdict is missing", self.request_id)

    def settled_now(self) -> None:
        """`settle` without waiting, for a caller that cannot await: the verdicts when they are in."""
        task = self.deferred
        if task is not None and task.done():
            self.deferred = None
            if not task.cancelled() and task.exception() is None:
                self.verdicts.extend(task.result())

    @property
    def cited(self) -> list[dict[str, Any]]:
        """The citations of the passages the model saw (hits are set once, by retrieval)."""
        if not self.hits:
            return []
        if self._cited is None:
            self._cited = citations(self.hits)
        return self._cited

    @property
    def passages(self) -> tuple[Passage, ...]:
        return tuple(rag.as_passage(h) for h in self.hits)

    def fail(self, error: GatewayError, status: str) -> None:
        self.status = status
        self.http_status = error.status
        self.error_code = error.code
        self.error_message = error.message

    def row(self) -> dict[str, Any]:
        total = time.perf_counter() - self.started
        usage = self.usage or {}
        finish = self.finish_reason
        return {
            "request_id": self.request_id,
            "created_at": self.created_at,
            "finished_at": self.created_at + timedelta(seconds=total),
            "api_key_id": self.api_key_id,
            "endpoint": self.endpoint.name,
            "model": self.model,  # the audit writer fits every text to its column (audit_rows)
            "backend_model": self.backend_model,
            "backend": self.backend,
            "stream": self.stream,
            "status": self.status,
            "http_status": self.http_status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "request_json": self.request_json,
            "response_text": self.response_text,
            "response_json": self.response_json,
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": _count(usage.get("prompt_tokens")),
            "completion_tokens": _count(usage.get("completion_tokens")),
            "total_tokens": _count(usage.get("total_tokens")),
            "gateway_ms": round((total - self.backend_s) * 1000, 3),
            "backend_ms": round(self.backend_s * 1000, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
            "total_ms": round(total * 1000, 3),
            "client_ip": self.client_ip,
            "trace_id": self.trace_id,
            "origin": self.origin,
            **guarding.audit_columns(self.verdicts),
            "passages_json": _encode([rag.passage_record(h) for h in self.hits]).decode() if self.hits else None,
            "citations_json": _encode(self.cited).decode() if self.hits else None,
            **rollout_columns(self),
        }

    def gateway_object(self) -> dict[str, Any]:
        """The extra top-level `gateway` object on responses."""
        gateway: dict[str, Any] = {
            "request_id": self.request_id,
            "citations": self.cited,
            "guards": [guarding.public(v) for v in self.verdicts],
        }
        if self.retrieval is not None:
            gateway["retrieval"] = self.retrieval
        if self.blocked:
            gateway["blocked"] = self.blocked
        if self.route is not None and self.route.deployment:
            gateway["deployment"] = self.route.deployment
        return gateway


def _status_for(error: GatewayError) -> str:
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, LimitsUnavailable):
        return "limits_unavailable"
    if isinstance(error, InputBlocked):
        return "blocked"
    if error.status in (401, 403):
        return "unauthorized"
    if isinstance(error, UpstreamError):
        return "backend_error"
    return "rejected"


class Pipeline:
    """Runs requests end to end over one backend seam (a `Router` in production)."""

    def __init__(
        self,
        backend: Backend,
        audit: AuditWriter,
        keys: KeyStore,
        *,
        rails: Guardrails | None = None,
        store: CollectionStore | None = None,
        aliases: dict[str, tuple[str, str]] | None = None,
        rag_top_k: int = 4,
        rag_min_score: float = 0.3,
        open_mode: bool = False,
        max_n: int = 16,
        limiter: Limiter | None = None,
        citation: CitationConfig | None = None,
    ) -> None:
        self.backend = backend
        self.audit = audit
        self.keys = keys
        self.rails = rails
        self.store = store
        self.aliases = aliases or {}
        self.rag_top_k = rag_top_k
        self.rag_min_score = rag_min_score
        self.open_mode = open_mode
        self.limits = Limits(max_n=max_n)
        self.limiter = limiter  # rate limits and quotas (gateway.limits); None: none at all
        self._background: set[asyncio.Task[None]] = set()  # rows waiting for deferred input checks
        self.citation = citation or CitationConfig()  # how answers show their sources
        self._active: dict[tuple[str | None, str | None, str], bool] = {}
        self.observers: list[Callable[[Trace], None]] = []  # metrics, traces: told once per request, in record
        self.rollout: Rollout | None = None  # deployments, versions, shadow copies (set by Services)

    def _guarded(self, key: KeyInfo, model: str | None, stage: str) -> bool:
        """Whether any guard of `stage` is on for this key and model (cached: policies are static)."""
        if self.rails is None:
            return False
        # Keyed by the names the policy overrides, not the client's strings: bounded by the policy.
        policy = self.rails.policy
        cache_key = (
            key.id if key.id in policy.key_overrides else None,
            model if model in policy.model_overrides else None,
            stage,
        )
        active = self._active.get(cache_key)
        if active is None:
            guards = self.rails.request_policy(key.id, model).guards.values()
            active = any(g.enabled and stage in g.stages for g in guards)
            self._active[cache_key] = active
        return active

    def output_guarded(self, key: KeyInfo, model: str | None) -> bool:
        return self._guarded(key, model, "output")

    async def record(self, trace: Trace) -> None:
        """Commit the trace's audit row; shielded so a client that leaves cannot cancel the write."""
        await trace.settle()
        began = time.perf_counter()
        await asyncio.shield(self.audit.submit(trace.row()))
        trace.audit_s = time.perf_counter() - began
        self.observe(trace)

    def _record_nowait(self, trace: Trace) -> None:
        """Submit the row without waiting (the caller is being cancelled), then tell the observers.
        Deferred input checks still running: a task records once they are in."""
        trace.settled_now()
        if trace.deferred is not None:
            task = asyncio.get_running_loop().create_task(self.record(trace))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        self.audit.submit(trace.row())
        self.observe(trace)

    def observe(self, trace: Trace) -> None:
        """Hand the finished request to the observers (metrics, traces); they never raise."""
        for observer in self.observers:
            observer(trace)

    async def handle(
        self,
        endpoint: Endpoint,
        read_body: Callable[[], Awaitable[bytes]],
        authorization: str | None,
        client_ip: str | None,
        key: KeyInfo | None = None,
        origin: str | None = None,
    ) -> tuple[Trace, bytes | AsyncIterator[bytes]]:
        """Serve one request. Errors are recorded, then raised as `GatewayError` for the HTTP layer.

        In-process callers (the nightly eval runner) pass `key` and skip HTTP authentication, and
        `origin="eval"` to mark the audit row as not live traffic."""
        trace = Trace(endpoint, client_ip, origin=origin)
        admission = UNLIMITED
        if self.rollout is not None:
            trace.versions = self.rollout.versions
        try:
            key, body, size = await self._accept(trace, read_body, authorization, key)
            if self.limiter is not None:
                admission = await self._admit(trace, key, size)
            answer = await self._serve(trace, key, body)
            if not isinstance(answer, bytes) and admission is not UNLIMITED:
                # The stream gives the admission back when it ends.
                answer, admission = self._release_after(trace, answer, admission), UNLIMITED
            return trace, answer
        except GatewayError as error:
            await self._refused(trace, error)
            raise
        except Exception as exc:
            raise await self._crashed(trace, exc) from exc
        finally:
            if admission is not UNLIMITED:
                await self._release(trace, admission)

    async def _accept(
        self,
        trace: Trace,
        read_body: Callable[[], Awaitable[bytes]],
        authorization: str | None,
        key: KeyInfo | None,
    ) -> tuple[KeyInfo, dict[str, Any], int]:
        """Authenticate, read, parse and validate: (the key, the body, its size in bytes)."""
        if key is None:
            began = time.perf_counter()
            try:
                key = OPEN_MODE_KEY if self.open_mode else await self.keys.authenticate(authorization)
            finally:
                trace.auth_s = time.perf_counter() - began
        trace.api_key_id = key.id
        raw = await read_body()
        trace.request_json = raw.decode("utf-8", "replace")
        body = decode_body(raw)
        if isinstance(body.get("model"), str):
            trace.model = body["model"]
        trace.stream = body.get("stream") is True
        trace.endpoint.validate(body, self.limits)
        return key, body, len(raw)

    async def _serve(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> bytes | AsyncIterator[bytes]:
        """An admitted request: embeddings, or input guards, retrieval and the backend call."""
        if trace.endpoint is EMBEDDINGS:
            return await self._embed(trace, body)
        if self.rollout is not None:  # its route: sticky id, a deployment an admin forced
            trace.route = self.rollout.begin(key, body)
        wanted = rag.resolve(
            body,
            shape=trace.endpoint.shape,
            aliases=self.aliases,
            key_collection=key.default_collection,
            default_top_k=self.rag_top_k,
            default_min_score=self.rag_min_score,
        )
        if body.get("model") != trace.model:  # an alias: answers still name it, the row both
            trace.backend_model = body.get("model")
        if wanted is not None and not key.may_use(wanted.collection):
            raise self._unknown_collection(key, wanted.collection)
        await self._guard_input(trace, key, body)
        if wanted is not None:
            await self._retrieve(trace, key, body, wanted)
        if trace.stream:
            return await self._open_stream(trace, key, body)
        return await self._complete(trace, key, body)

    async def _refused(self, trace: Trace, error: GatewayError) -> None:
        """A request that ends in an error before any answer: its row, and headers naming it."""
        trace.fail(error, _status_for(error))
        await trace.settle()
        if trace.rate_headers:
            error.headers.update(trace.rate_headers)
        error.headers["x-gateway-request-id"] = trace.request_id  # the error names its audit row
        if trace.verdicts:
            error.extra["gateway"] = trace.gateway_object()
            error.headers["x-gateway-guards"] = guarding.header(trace.verdicts)
        await self.record(trace)

    async def _crashed(self, trace: Trace, exc: Exception) -> InternalError:
        """A bug, not the client's fault nor the backend's: still one row and an OpenAI error body."""
        log.error("unexpected error in request %s", trace.request_id, exc_info=exc)
        error = InternalError(
            f"internal gateway error ({type(exc).__name__}); see the gateway log",
            headers={"x-gateway-request-id": trace.request_id},
        )
        trace.fail(error, "error")
        await self.record(trace)
        return error

    async def _admit(self, trace: Trace, key: KeyInfo, body_bytes: int) -> Admission:
        """Rate limits and quotas: one check (one Redis round trip when shared); raises RateLimited."""
        assert self.limiter is not None
        admission = await self.limiter.acquire(key, trace.model, estimate_tokens(body_bytes))
        if admission.headers:
            trace.rate_headers = admission.headers
        return admission

    def _tokens_used(self, trace: Trace, admission: Admission) -> int:
        return tokens_used(admission, trace.usage, trace.response_text, trace.backend is not None)

    async def _release(self, trace: Trace, admission: Admission) -> None:
        assert self.limiter is not None
        await self.limiter.finish(admission, self._tokens_used(trace, admission))

    def _release_after(self, trace: Trace, stream: AsyncIterator[bytes], admission: Admission) -> AsyncIterator[bytes]:
        assert self.limiter is not None
        return release_after(stream, self.limiter, admission, lambda: self._tokens_used(trace, admission))

    async def _guard_input(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> None:
        """Input guards on every text the backend reads (all message fields, tools, schemas):
        block (400, no backend call), redact in place, or flag. A prompt of token ids has no
        text: 400 `token_prompt_not_checked` while an input guard reads user text."""
        if self.rails is None or not self._guarded(key, trace.model, "input"):
            return
        shape = trace.endpoint.shape
        messages = shape.prompt_messages(body)
        unreadable = shape.unreadable_prompt(body)
        if unreadable is not None:
            names = self.rails.input_guards(key.id, trace.model, "user")
            if names:
                raise InvalidRequest(
                    f"'{unreadable}' is given as token ids or embeddings, which the input guard(s) "
                    f"{', '.join(names)} cannot check; send the prompt as text.",
                    param=unreadable,
                    code="token_prompt_not_checked",
                )
            messages = None  # no guard reads it: the request fields are still checked
        extra = guarding.request_texts(body)
        if messages is None and not extra:
            return
        result = await self.rails.check_input(messages or [], (), key.id, trace.model, extra, defer_flags=True)
        trace.verdicts.extend(result.verdicts)
        trace.deferred = result.deferred
        if result.blocked_by is not None:
            verdict = result.blocked_by
            trace.blocked = {"guard": verdict.guard, "stage": "input", "reason": verdict.reason}
            raise InputBlocked(
                result.message or f"The request was blocked by the {verdict.guard} guard: {verdict.reason}",
                guard=verdict.guard,
                param=guarding.blocked_param(shape, body, verdict),
            )
        if messages is not None and any(v.action == "redact" for v in result.verdicts):
            shape.put_back(body, result.messages)

    async def _embed(self, trace: Trace, body: dict[str, Any]) -> bytes:
        """`/v1/embeddings` with the gateway's own embedding model, in OpenAI's format."""
        store = self.store
        if store is None:
            raise InvalidRequest("embeddings are turned off on this gateway (rag = false)", param="model")
        embedder = store.embedder
        if body["model"] not in (embedder.name, EMBEDDING_MODEL_ALIAS):
            raise NotFound(
                f"The model `{body['model']}` does not exist; this gateway embeds with `{embedder.name}`.",
                param="model",
                code="model_not_found",
            )
        texts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
        began = time.perf_counter()
        vectors = await embedder.embed(texts)
        trace.backend_s = time.perf_counter() - began
        trace.backend = "gateway:" + embedder.name
        base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": b64encode(vector.astype("<f4").tobytes()).decode() if base64 else vector.tolist(),
            }
            for i, vector in enumerate(vectors)
        ]
        tokens = sum(embedder.count_tokens(t) for t in texts)
        trace.usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        payload = _encode({"object": "list", "data": data, "model": embedder.name, "usage": trace.usage})
        await self.record(trace)
        return payload

    async def _retrieve(self, trace: Trace, key: KeyInfo, body: dict[str, Any], wanted: rag.RagRequest) -> None:
        """Search the collection, guard the passages, and put them in the prompt with markers."""
        if self.store is None:
            raise InvalidRequest("retrieval is turned off on this gateway (rag = false)", param="rag")
        query = retrieval_query(body["messages"])
        trace.retrieval = {
            "collection": wanted.collection,
            "query": query,
            "top_k": wanted.top_k,
            "min_score": wanted.min_score,
        }
        if not query:
            return
        try:
            outcome = await self.store.search_detailed(wanted.collection, query, wanted.top_k, wanted.min_score)
        except UnknownCollection as exc:
            raise self._unknown_collection(key, exc.name) from exc
        hits = list(outcome.hits)
        trace.retrieval.update(
            embed_ms=round(outcome.embed_ms, 2), search_ms=round(outcome.search_ms, 2), index_version=outcome.version
        )
        if hits and self.rails is not None:
            # A document in the index must not smuggle instructions in: input guards on passages.
            checked = await self.rails.check_passages([rag.as_passage(h) for h in hits], key.id, trace.model)
            trace.verdicts.extend(checked.verdicts)
            hits = rag.apply_passage_guards(hits, checked.passages)
            if checked.dropped:
                trace.retrieval["dropped"] = list(checked.dropped)
        trace.hits = hits
        if hits:
            body["messages"] = build_rag_messages(body["messages"], hits)
            mode = self.citation.mode(wanted.sources, key.rag_sources, trace.model)
            trace.sources = Sources(mode, trace.cited, self.citation.base_urls)
            return
        policy = self.rails.request_policy(key.id, trace.model) if self.rails is not None else None
        if policy is not None and policy.on_empty_retrieval == "refuse":
            trace.retrieval["empty"] = "refused"
            trace.refusal = rag.refusal(body.get("model"), policy.refusal_message, trace.request_id)
        else:
            trace.retrieval["empty"] = "answered without passages"

    def _unknown_collection(self, key: KeyInfo, name: str) -> InvalidRequest:
        """The same answer for a collection that does not exist and one this key may not use; it
        lists only the collections the key may use."""
        names = self.store.list_collections() if self.store is not None else []
        known = ", ".join(n for n in names if key.may_use(n)) or "none"
        return InvalidRequest(
            f"unknown collection {name!r} (collections: {known})", param="rag.collection", code="unknown_collection"
        )

    async def _complete(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> bytes:
        began = time.perf_counter()
        try:
            answer = trace.refusal or await self.backend.complete(trace.endpoint.path, body)
        except ServingError as exc:
            trace.backend_s = time.perf_counter() - began
            trace.backend = exc.backend
            raise from_serving_error(exc) from exc
        trace.backend_s = time.perf_counter() - began
        trace.backend = self.backend.name
        if self.rollout is not None and trace.refusal is None:
            self.rollout.after_send(trace, body)  # shadow copies, off the client's path
        await trace.settle()  # the input flags that ran beside the backend call
        shape = trace.endpoint.shape
        problem = answer_problem(shape, answer)
        if problem is not None:
            raise UpstreamError(
                f"backend {trace.backend} sent an invalid answer: {problem}", code="backend_invalid_answer"
            )
        choices = answer.get("choices") or []
        if choices:
            first = choices[0]
            trace.response_text = shape.text(first)
            trace.finish_reason = first.get("finish_reason")
        trace.usage = answer.get("usage")
        if choices and self.output_guarded(key, trace.model):
            await self._guard_answer(trace, key, body, choices)
        if trace.sources is not None:
            for choice in choices:
                trace.sources.message(choice)
        if trace.backend_model is not None:
            answer["model"] = trace.model
        answer["gateway"] = trace.gateway_object()
        payload = _encode(answer)
        trace.response_json = payload.decode()
        await self.record(trace)
        return payload

    async def _guard_answer(
        self, trace: Trace, key: KeyInfo, body: dict[str, Any], choices: list[dict[str, Any]]
    ) -> None:
        """Output guards on each choice: block (content withheld, finish_reason content_filter),
        redact (masked text), or flag (verdict attached). The audit row keeps the raw text."""
        assert self.rails is not None
        shape = trace.endpoint.shape
        prompt = guarding.last_user_text(shape.prompt_messages(body))
        texts = [shape.text(choice) or "" for choice in choices]
        checks = [i for i, text in enumerate(texts) if text]
        passages = trace.passages
        results = await asyncio.gather(
            *(self.rails.check_output(texts[i], passages, key.id, trace.model, prompt) for i in checks)
        )
        for i, result in zip(checks, results, strict=True):
            trace.verdicts.extend(result.verdicts)
            if result.blocked_by is not None:
                verdict = result.blocked_by
                shape.set_text(choices[i], result.message or "")
                choices[i]["finish_reason"] = "content_filter"
                trace.status = "blocked"
                trace.blocked = {"guard": verdict.guard, "stage": "output", "reason": verdict.reason}
                if i == 0:
                    trace.finish_reason = "content_filter"
            elif result.text != texts[i]:
                shape.set_text(choices[i], result.text)

    async def _open_stream(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Start the upstream stream; failures before the first event become proper HTTP errors."""
        began = time.perf_counter()
        guarded = self.output_guarded(key, trace.model)
        usage = None
        if trace.refusal is not None:
            upstream: AsyncIterator[list[bytes]] = _replay([rag.refusal_events(trace.refusal)])
        else:
            # Guarded: usage on every event, so a stream a guard stops still records its tokens.
            sent, usage = ask_for_usage(body) if guarded else (body, None)
            upstream = self.backend.stream(trace.endpoint.path, sent).__aiter__()
        try:
            first: list[bytes] | None = await upstream.__anext__()
        except StopAsyncIteration:
            first = None
        except ServingError as exc:
            trace.backend_s = time.perf_counter() - began
            trace.backend = exc.backend
            raise from_serving_error(exc) from exc
        trace.backend = self.backend.name
        if self.rollout is not None and trace.refusal is None:
            self.rollout.after_send(trace, body)  # shadow copies, off the client's path
        guard = None
        if guarded:
            assert self.rails is not None
            prompt = guarding.last_user_text(trace.endpoint.shape.prompt_messages(body))
            optimistic = self.rails.request_policy(key.id, trace.model).stream_mode == "optimistic"
            guard = StreamGuard(self.rails, key.id, trace.model, prompt, trace.passages, optimistic)
        relay = StreamRelay(trace, guard, began, self.record, self._record_nowait, usage)
        return relay.run(upstream, first)


def _count(value: object) -> int | None:
    """A token count for an integer column: a backend's nonsense (text, floats, 10**30) becomes None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


async def _replay(batches: list[list[bytes]]) -> AsyncIterator[list[bytes]]:
    """An upstream made of events the gateway wrote itself (a refusal)."""
    for batch in batches:
        yield batch
