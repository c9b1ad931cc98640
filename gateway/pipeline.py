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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from gateway import guarding, rag
from gateway.audit import AuditWriter
from gateway.auth import OPEN_MODE_KEY, KeyInfo, KeyStore
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
from gateway.tracing import current_trace_id
from gateway.validation import Limits, decode_body, validate_chat, validate_completion, validate_embeddings
from guardrails import Guardrails, Passage, StreamChecker, Verdict
from retrieval import CollectionStore, Hit, UnknownCollection, build_rag_messages, citations, retrieval_query
from serving.backend import Backend
from serving.errors import BackendBadAnswer, BackendTimeout, ServingError

log = logging.getLogger("gateway")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DONE = b"data: [DONE]\n\n"
EMBEDDING_MODEL_ALIAS = "text-embedding-gateway"  # also accepted as the embedding model's name


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI route the pipeline serves."""

    name: str
    path: str
    chat: bool
    validate: Callable[[dict[str, Any], Limits], None]


CHAT = Endpoint("chat.completions", "/v1/chat/completions", True, validate_chat)
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", False, validate_embeddings)
COMPLETIONS = Endpoint("completions", "/v1/completions", False, validate_completion)


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
    model: str | None = None
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
            **guarding.audit_columns(self.verdicts),
            "passages_json": _encode([rag.passage_record(h) for h in self.hits]).decode() if self.hits else None,
            "citations_json": _encode(citations(self.hits)).decode() if self.hits else None,
        }

    def gateway_object(self) -> dict[str, Any]:
        """The extra top-level `gateway` object on responses."""
        gateway: dict[str, Any] = {
            "request_id": self.request_id,
            "citations": citations(self.hits) if self.hits else [],
            "guards": [guarding.public(v) for v in self.verdicts],
        }
        if self.retrieval is not None:
            gateway["retrieval"] = self.retrieval
        if self.blocked:
            gateway["blocked"] = self.blocked
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
        self._active: dict[tuple[str | None, str | None, str], bool] = {}
        self.observers: list[Callable[[Trace], None]] = []  # metrics, traces: told once per request, in record

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
        await asyncio.shield(self.audit.submit(trace.row()))
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
    ) -> tuple[Trace, bytes | AsyncIterator[bytes]]:
        """Serve one request. Errors are recorded, then raised as `GatewayError` for the HTTP layer.

        In-process callers (the nightly eval runner) pass `key` and skip HTTP authentication."""
        trace = Trace(endpoint, client_ip)
        admission = UNLIMITED
        try:
            if key is None:
                key = OPEN_MODE_KEY if self.open_mode else await self.keys.authenticate(authorization)
            trace.api_key_id = key.id
            raw = await read_body()
            trace.request_json = raw.decode("utf-8", "replace")
            body = decode_body(raw)
            if isinstance(body.get("model"), str):
                trace.model = body["model"]
            trace.stream = body.get("stream") is True
            endpoint.validate(body, self.limits)
            if self.limiter is not None:
                admission = await self._admit(trace, key, len(raw))
            if endpoint is EMBEDDINGS:
                return trace, await self._embed(trace, body)
            wanted = rag.resolve(
                body,
                chat=endpoint.chat,
                aliases=self.aliases,
                key_collection=key.default_collection,
                default_top_k=self.rag_top_k,
                default_min_score=self.rag_min_score,
            )
            await self._guard_input(trace, key, body)
            if wanted is not None:
                await self._retrieve(trace, key, body, wanted)
            if trace.stream:
                stream = await self._open_stream(trace, key, body)
                if admission is not UNLIMITED:  # the stream gives the admission back when it ends
                    stream, admission = self._release_after(trace, stream, admission), UNLIMITED
                return trace, stream
            return trace, await self._complete(trace, key, body)
        except GatewayError as error:
            trace.fail(error, _status_for(error))
            if trace.rate_headers:
                error.headers.update(trace.rate_headers)
            error.headers["x-gateway-request-id"] = trace.request_id  # the error names its audit row
            if trace.verdicts:
                error.extra["gateway"] = trace.gateway_object()
                error.headers["x-gateway-guards"] = guarding.header(trace.verdicts)
            await self.record(trace)
            raise
        except Exception as exc:
            # A bug, not the client's fault nor the backend's: still one row and an OpenAI error body.
            log.exception("unexpected error in request %s", trace.request_id)
            error = InternalError(
                f"internal gateway error ({type(exc).__name__}); see the gateway log",
                headers={"x-gateway-request-id": trace.request_id},
            )
            trace.fail(error, "error")
            await self.record(trace)
            raise error from exc
        finally:
            if admission is not UNLIMITED:
                await self._release(trace, admission)

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
        chat = trace.endpoint.chat
        messages = guarding.checked_messages(chat, body)
        unreadable = guarding.unreadable_prompt(chat, body)
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
        result = await self.rails.check_input(messages or [], (), key.id, trace.model, extra)
        trace.verdicts.extend(result.verdicts)
        if result.blocked_by is not None:
            verdict = result.blocked_by
            trace.blocked = {"guard": verdict.guard, "stage": "input", "reason": verdict.reason}
            raise InputBlocked(
                result.message or f"The request was blocked by the {verdict.guard} guard: {verdict.reason}",
                guard=verdict.guard,
                param=guarding.blocked_param(chat, body, verdict),
            )
        if messages is not None and any(v.action == "redact" for v in result.verdicts):
            guarding.put_back(chat, body, result.messages)

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
            known = ", ".join(self.store.list_collections()) or "none"
            raise InvalidRequest(
                f"unknown collection {exc.name!r} (collections: {known})",
                param="rag.collection",
                code="unknown_collection",
            ) from exc
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
            return
        policy = self.rails.request_policy(key.id, trace.model) if self.rails is not None else None
        if policy is not None and policy.on_empty_retrieval == "refuse":
            trace.retrieval["empty"] = "refused"
            trace.refusal = rag.refusal(body.get("model"), policy.refusal_message, trace.request_id)
        else:
            trace.retrieval["empty"] = "answered without passages"

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
        problem = _answer_problem(answer, trace.endpoint.chat)
        if problem is not None:
            raise UpstreamError(
                f"backend {trace.backend} sent an invalid answer: {problem}", code="backend_invalid_answer"
            )
        choices = answer.get("choices") or []
        if choices:
            first = choices[0]
            if trace.endpoint.chat:
                trace.response_text = (first.get("message") or {}).get("content")
            else:
                trace.response_text = first.get("text")
            trace.finish_reason = first.get("finish_reason")
        trace.usage = answer.get("usage")
        if choices and self.output_guarded(key, trace.model):
            await self._guard_answer(trace, key, body, choices)
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
        chat = trace.endpoint.chat
        prompt = guarding.last_user_text(guarding.checked_messages(chat, body))
        texts = [_choice_text(choice, chat) or "" for choice in choices]
        checks = [i for i, text in enumerate(texts) if text]
        passages = trace.passages
        results = await asyncio.gather(
            *(self.rails.check_output(texts[i], passages, key.id, trace.model, prompt) for i in checks)
        )
        for i, result in zip(checks, results, strict=True):
            trace.verdicts.extend(result.verdicts)
            if result.blocked_by is not None:
                verdict = result.blocked_by
                _set_choice_text(choices[i], chat, result.message or "")
                choices[i]["finish_reason"] = "content_filter"
                trace.status = "blocked"
                trace.blocked = {"guard": verdict.guard, "stage": "output", "reason": verdict.reason}
                if i == 0:
                    trace.finish_reason = "content_filter"
            elif result.text != texts[i]:
                _set_choice_text(choices[i], chat, result.text)

    async def _open_stream(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Start the upstream stream; failures before the first event become proper HTTP errors."""
        began = time.perf_counter()
        if trace.refusal is not None:
            upstream: AsyncIterator[list[bytes]] = _replay([rag.refusal_events(trace.refusal)])
        else:
            upstream = self.backend.stream(trace.endpoint.path, body).__aiter__()
        try:
            first: list[bytes] | None = await upstream.__anext__()
        except StopAsyncIteration:
            first = None
        except ServingError as exc:
            trace.backend_s = time.perf_counter() - began
            trace.backend = exc.backend
            raise from_serving_error(exc) from exc
        trace.backend = self.backend.name
        guard = None
        if self.output_guarded(key, trace.model):
            assert self.rails is not None
            prompt = guarding.last_user_text(guarding.checked_messages(trace.endpoint.chat, body))
            guard = _StreamGuard(self.rails, key.id, trace.model, prompt, trace.passages)
        return self._relay(trace, upstream, first, began, guard)

    async def _relay(
        self,
        trace: Trace,
        upstream: AsyncIterator[list[bytes]],
        first: list[bytes] | None,
        began: float,
        guard: _StreamGuard | None,
    ) -> AsyncIterator[bytes]:
        chat = trace.endpoint.chat
        texts: dict[int, list[str]] = {}  # the raw answer, for the audit row
        finishes: dict[int, str] = {}
        held: dict[str, Any] | None = None  # the event that may be the last one
        held_content = False  # whether it carries answer text (for time to first token)
        recorded = False
        stopped = False  # an output guard ended the stream (the rest of the answer is not wanted)
        batch = first
        try:
            try:
                while batch is not None:
                    out: list[bytes] = []  # what this batch releases, sent as one write
                    for payload in batch:
                        event = _decode(payload)
                        if isinstance(event, dict) and "error" in event:
                            if out:
                                yield b"".join(out)
                            raise UpstreamError(_upstream_message(event), code="backend_stream_error")
                        if not _well_formed_event(event, chat):
                            if out:
                                yield b"".join(out)
                            raise UpstreamError(
                                f"backend {trace.backend} sent an invalid event: {_event_problem(event, chat)}",
                                code="backend_invalid_answer",
                            )
                        choices = event.get("choices") or []
                        content = False
                        closing = False
                        for choice in choices:
                            index = choice.get("index", 0)
                            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                            if piece:
                                texts.setdefault(index, []).append(piece)
                                content = True
                            if choice.get("finish_reason"):
                                finishes[index] = choice["finish_reason"]
                                closing = True
                        if guard is not None and choices:
                            # Release only sentences the output guards passed; hold the unfinished one.
                            released, blocked = await guard.filter(event, chat)
                            if blocked is not None:
                                if held is not None:
                                    out.append(b"data: " + _encode(held) + b"\n\n")
                                if out:
                                    yield b"".join(out)
                                held = self._withhold(trace, event, blocked, chat)
                                batch = None
                                stopped = True
                                break
                            if not event["choices"] and not event.get("usage"):
                                continue  # everything in it is held back for now
                            content = released
                            payload = _encode(event)
                        if event.get("usage"):
                            trace.usage = event["usage"]
                            closing = closing or not choices
                        if held is not None:
                            out.append(b"data: " + _encode(held) + b"\n\n")
                            held = None
                            if held_content and trace.ttft_s is None:
                                trace.ttft_s = time.perf_counter() - trace.started
                        if closing:
                            held, held_content = event, content
                        else:
                            if content and trace.ttft_s is None:
                                trace.ttft_s = time.perf_counter() - trace.started
                            out.append(b"data: " + payload + b"\n\n")
                    else:
                        if out:
                            yield out[0] if len(out) == 1 else b"".join(out)
                        batch = await anext(upstream, None)
                trace.backend_s = time.perf_counter() - began
                if not stopped and (not finishes or not finishes.keys() >= texts.keys()):
                    # The backend closed the stream cleanly but mid-answer: not a complete answer.
                    raise UpstreamError(
                        f"backend {trace.backend} ended the stream before the answer was finished",
                        code="backend_stream_truncated",
                    )
            except GatewayError:
                trace.backend_s = time.perf_counter() - began
                raise
            except ServingError as exc:
                trace.backend_s = time.perf_counter() - began
                raise _mid_stream(exc) from exc
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
                trace.backend_s = time.perf_counter() - began
                raise UpstreamError(
                    f"backend {trace.backend} sent a malformed event", code="backend_stream_error"
                ) from exc
            except Exception as exc:
                trace.backend_s = time.perf_counter() - began
                log.exception("unexpected error in stream %s", trace.request_id)
                raise InternalError(f"internal gateway error ({type(exc).__name__}); see the gateway log") from exc
        except GatewayError as error:
            # Mid-stream failure: the status line is long gone, so say it in the stream itself.
            trace.fail(error, "backend_error" if isinstance(error, UpstreamError) else "error")
            self._summarise(trace, texts, finishes, guard)
            recorded = True
            await self.record(trace)
            if held is not None:
                yield b"data: " + _encode(held) + b"\n\n"
            yield b"data: " + _encode(error.body()) + b"\n\n"
            yield _DONE
            return
        except BaseException:
            # The client went away (cancellation) or the generator was closed: log what we had.
            if not recorded:
                recorded = True
                trace.status = "client_disconnected"
                trace.http_status = 499
                trace.backend_s = time.perf_counter() - began
                self._summarise(trace, texts, finishes, guard)
                self.audit.submit(trace.row())  # no await: we are being cancelled
                self.observe(trace)
            raise
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                # Closing the upstream generator drops the backend connection, so vLLM aborts
                # (also after a guard block: nothing more of that answer is wanted).
                await asyncio.shield(aclose())
        self._summarise(trace, texts, finishes, guard)
        if held is None:
            held = {
                "id": f"gw-{trace.request_id}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(trace.created_at.timestamp()),
                "model": trace.model,
                "choices": [],
            }
        held["gateway"] = trace.gateway_object()
        if held_content and trace.ttft_s is None:
            trace.ttft_s = time.perf_counter() - trace.started  # the first text rides in the last event
        recorded = True
        await self.record(trace)
        yield b"data: " + _encode(held) + b"\n\n" + _DONE

    @staticmethod
    def _withhold(trace: Trace, event: dict[str, Any], blocked: tuple[int, Verdict], chat: bool) -> dict[str, Any]:
        """The closing event of a stream an output guard stopped: content_filter, and why."""
        index, verdict = blocked
        trace.status = "blocked"
        trace.blocked = {
            "guard": verdict.guard,
            "stage": "output",
            "reason": verdict.reason,
            "message": verdict.message,
        }
        if index == 0:
            trace.finish_reason = "content_filter"
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": "content_filter"}
        if chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return {key: event[key] for key in ("id", "object", "created", "model") if key in event} | {"choices": [choice]}

    @staticmethod
    def _summarise(
        trace: Trace, texts: dict[int, list[str]], finishes: dict[int, str], guard: _StreamGuard | None = None
    ) -> None:
        if guard is not None:
            trace.verdicts.extend(guard.summary())
        joined = {i: "".join(parts) for i, parts in texts.items()}
        trace.response_text = joined.get(0, "")
        trace.finish_reason = finishes.get(0)
        choices = [
            {"index": i, "text": joined.get(i, ""), "finish_reason": finishes.get(i)}
            for i in sorted(set(joined) | set(finishes))
        ]
        if guard is not None:
            for choice in choices:
                choice["delivered"] = guard.released(int(choice["index"] or 0))
            if trace.blocked and trace.finish_reason == "content_filter" and choices:
                choices[0]["finish_reason"] = "content_filter"
        trace.response_json = _encode({"choices": choices, "usage": trace.usage}).decode()


class _StreamGuard:
    """Output guards over a stream: one sentence-by-sentence checker per choice."""

    def __init__(
        self, rails: Guardrails, api_key_id: str, model: str | None, prompt: str | None, passages: tuple[Passage, ...]
    ) -> None:
        self._rails = rails
        self._passages = passages
        self._api_key_id = api_key_id
        self._model = model
        self._prompt = prompt
        self._checkers: dict[int, StreamChecker] = {}

    def _checker(self, index: int) -> StreamChecker:
        checker = self._checkers.get(index)
        if checker is None:
            checker = self._rails.stream(self._passages, self._api_key_id, self._model, self._prompt)
            self._checkers[index] = checker
        return checker

    async def filter(self, event: dict[str, Any], chat: bool) -> tuple[bool, tuple[int, Verdict] | None]:
        """Rewrite the event's choices to carry only released text; drop choices with nothing to say.

        Returns (whether any text was released, (choice index, blocking verdict) or None).
        """
        kept = []
        released_any = False
        for choice in event["choices"]:
            index = choice.get("index", 0)
            delta = choice.setdefault("delta", {}) if chat else None
            if delta is None and chat:
                delta = choice["delta"] = {}  # vLLM may send "delta": null on the last event
            piece = delta.get("content") if delta is not None else choice.get("text")
            checker = self._checker(index)
            release = ""
            if piece:
                step = await checker.feed(piece)
                if step.blocked and step.blocked_by is not None:
                    return released_any, (index, step.blocked_by)
                release += step.release
            if choice.get("finish_reason"):
                step = await checker.finish()
                if step.blocked and step.blocked_by is not None:
                    return released_any, (index, step.blocked_by)
                release += step.release
            if delta is not None:
                if "content" in delta or release:
                    delta["content"] = release
                keep = bool(release) or choice.get("finish_reason") or any(k != "content" for k in delta)
            else:
                choice["text"] = release
                keep = bool(release) or choice.get("finish_reason")
            if keep:
                kept.append(choice)
            released_any = released_any or bool(release)
        event["choices"] = kept
        return released_any, None

    def summary(self) -> list[Verdict]:
        return [v for checker in self._checkers.values() for v in checker.summary()]

    def released(self, index: int) -> str:
        checker = self._checkers.get(index)
        return checker.released if checker is not None else ""


def _mid_stream(exc: ServingError) -> UpstreamError:
    """A backend failure after the stream began, with the code that says what happened."""
    if isinstance(exc, BackendTimeout):
        return UpstreamError(exc.message, status=504, code="backend_timeout")
    if isinstance(exc, BackendBadAnswer):
        return UpstreamError(exc.message, code=exc.code)
    return UpstreamError(exc.message, code="backend_stream_error")


def _count(value: object) -> int | None:
    """A token count for an integer column: a backend's nonsense (text, floats, 10**30) becomes None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


def _choice_problem(choice: object, chat: bool, stream: bool) -> str | None:
    if not isinstance(choice, dict):
        return f"a choice is a {type(choice).__name__}, not an object"
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        return "a choice's index is not an integer"
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        return "a choice's finish_reason is not a string"
    if chat:
        where = "delta" if stream else "message"
        message = choice.get(where)
        if message is None:
            return None
        if not isinstance(message, dict):
            return f"a choice's {where} is not an object"
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            return f"a choice's {where}.content is not a string"
        return None
    text = choice.get("text")
    if text is not None and not isinstance(text, str):
        return "a choice's text is not a string"
    return None


def _answer_problem(answer: object, chat: bool, stream: bool = False) -> str | None:
    """What is wrong with the shape of a backend answer (or stream event) that the gateway reads; None: fine.

    Only the fields the gateway uses are checked; the rest is the backend's business."""
    if not isinstance(answer, dict):
        return f"a JSON {type(answer).__name__}, not an object"
    choices = answer.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            return "choices is not an array"
        for choice in choices:
            problem = _choice_problem(choice, chat, stream)
            if problem is not None:
                return problem
    usage = answer.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return "usage is not an object"
    return None


def _event_problem(event: object, chat: bool) -> str | None:
    return _answer_problem(event, chat, stream=True)


def _well_formed_event(event: object, chat: bool) -> bool:
    """`_event_problem(event, chat) is None`, in one call: it runs for every event of every stream.

    `type(x) is` on purpose: decoded JSON has no subclasses, and it keeps `True` from passing for an int."""
    if type(event) is not dict:
        return False
    choices = event.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return False
        for choice in choices:
            if type(choice) is not dict or type(choice.get("index", 0)) is not int:
                return False
            finish = choice.get("finish_reason")
            if finish is not None and type(finish) is not str:
                return False
            part = choice.get("delta") if chat else choice
            if part is not None:
                if type(part) is not dict:
                    return False
                text = part.get("content") if chat else part.get("text")
                if text is not None and type(text) is not str:
                    return False
    usage = event.get("usage")
    return usage is None or type(usage) is dict


async def _replay(batches: list[list[bytes]]) -> AsyncIterator[list[bytes]]:
    """An upstream made of events the gateway wrote itself (a refusal)."""
    for batch in batches:
        yield batch


def _choice_text(choice: dict[str, Any], chat: bool) -> str | None:
    if chat:
        content = (choice.get("message") or {}).get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _set_choice_text(choice: dict[str, Any], chat: bool, text: str) -> None:
    if chat:
        choice.setdefault("message", {})["content"] = text
    else:
        choice["text"] = text


def _upstream_message(event: dict[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "the backend reported an error"))
    return str(error)
