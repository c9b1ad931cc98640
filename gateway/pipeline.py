"""The request pipeline: authenticate, validate, call the backend, shape the answer, audit it.

Plain code that a test can drive without HTTP: a route hands it the raw body reader, the
Authorization header and the client address, and gets back either the JSON bytes of a
complete answer or an async iterator of server-sent-event bytes.

Every request leaves exactly one audit row. The client's final bytes (the JSON body, or the
stream's last event and `[DONE]`) are released only after that row is committed. A stream
holds back only the event that can be the last one (the one carrying `finish_reason`, or the
usage event), so tokens flow through as they arrive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from gateway.audit import AuditWriter
from gateway.auth import OPEN_MODE_KEY, KeyInfo, KeyStore
from gateway.errors import GatewayError, UpstreamError, from_serving_error
from gateway.validation import decode_body, validate_chat, validate_completion
from serving.backend import Backend
from serving.errors import ServingError

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI route the pipeline serves."""

    name: str
    path: str
    chat: bool
    validate: Callable[[dict[str, Any]], None]


CHAT = Endpoint("chat.completions", "/v1/chat/completions", True, validate_chat)
COMPLETIONS = Endpoint("completions", "/v1/completions", False, validate_completion)


@dataclass(slots=True)
class Trace:
    """What the audit row of one request will say; filled in as the request moves on."""

    endpoint: Endpoint
    client_ip: str | None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
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

    def fail(self, error: GatewayError, status: str) -> None:
        self.status = status
        self.http_status = error.status
        self.error_code = error.code
        self.error_message = error.message

    def row(self) -> dict[str, Any]:
        total = time.perf_counter() - self.started
        usage = self.usage or {}
        return {
            "request_id": self.request_id,
            "created_at": self.created_at,
            "finished_at": self.created_at + timedelta(seconds=total),
            "api_key_id": self.api_key_id,
            "endpoint": self.endpoint.name,
            "model": self.model,
            "backend": self.backend,
            "stream": self.stream,
            "status": self.status,
            "http_status": self.http_status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "request_json": self.request_json,
            "response_text": self.response_text,
            "response_json": self.response_json,
            "finish_reason": self.finish_reason,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "gateway_ms": round((total - self.backend_s) * 1000, 3),
            "backend_ms": round(self.backend_s * 1000, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
            "total_ms": round(total * 1000, 3),
            "client_ip": self.client_ip,
        }

    def gateway_object(self) -> dict[str, Any]:
        """The extra top-level `gateway` object on responses."""
        return {"request_id": self.request_id, "citations": [], "guards": []}


def _status_for(error: GatewayError) -> str:
    if error.status in (401, 403):
        return "unauthorized"
    if isinstance(error, UpstreamError):
        return "backend_error"
    return "rejected"


class Pipeline:
    """Runs requests end to end over one backend seam (a `Router` in production)."""

    def __init__(self, backend: Backend, audit: AuditWriter, keys: KeyStore, *, open_mode: bool = False) -> None:
        self.backend = backend
        self.audit = audit
        self.keys = keys
        self.open_mode = open_mode

    async def record(self, trace: Trace) -> None:
        """Commit the trace's audit row; shielded so a client that leaves cannot cancel the write."""
        await asyncio.shield(self.audit.submit(trace.row()))

    async def handle(
        self,
        endpoint: Endpoint,
        read_body: Callable[[], Awaitable[bytes]],
        authorization: str | None,
        client_ip: str | None,
    ) -> tuple[Trace, bytes | AsyncIterator[bytes]]:
        """Serve one request. Errors are recorded, then raised as `GatewayError` for the HTTP layer."""
        trace = Trace(endpoint, client_ip)
        try:
            key = OPEN_MODE_KEY if self.open_mode else await self.keys.authenticate(authorization)
            trace.api_key_id = key.id
            raw = await read_body()
            trace.request_json = raw.decode("utf-8", "replace")
            body = decode_body(raw)
            if isinstance(body.get("model"), str):
                trace.model = body["model"]
            trace.stream = body.get("stream") is True
            endpoint.validate(body)
            if trace.stream:
                return trace, await self._open_stream(trace, key, body)
            return trace, await self._complete(trace, key, body)
        except GatewayError as error:
            trace.fail(error, _status_for(error))
            await self.record(trace)
            raise

    async def _complete(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> bytes:
        began = time.perf_counter()
        try:
            answer = await self.backend.complete(trace.endpoint.path, body)
        except ServingError as exc:
            trace.backend_s = time.perf_counter() - began
            trace.backend = exc.backend
            raise from_serving_error(exc) from exc
        trace.backend_s = time.perf_counter() - began
        trace.backend = self.backend.name
        choices = answer.get("choices") or []
        if choices:
            first = choices[0]
            if trace.endpoint.chat:
                trace.response_text = (first.get("message") or {}).get("content")
            else:
                trace.response_text = first.get("text")
            trace.finish_reason = first.get("finish_reason")
        usage = answer.get("usage")
        trace.usage = usage if isinstance(usage, dict) else None
        answer["gateway"] = trace.gateway_object()
        payload = _encode(answer)
        trace.response_json = payload.decode()
        await self.record(trace)
        return payload

    async def _open_stream(self, trace: Trace, key: KeyInfo, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Start the upstream stream; failures before the first event become proper HTTP errors."""
        began = time.perf_counter()
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
        return self._relay(trace, upstream, first, began)

    async def _relay(
        self, trace: Trace, upstream: AsyncIterator[list[bytes]], first: list[bytes] | None, began: float
    ) -> AsyncIterator[bytes]:
        chat = trace.endpoint.chat
        texts: dict[int, list[str]] = {}
        finishes: dict[int, str] = {}
        held: dict[str, Any] | None = None  # the event that may be the last one
        recorded = False
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
                        if event.get("usage"):
                            trace.usage = event["usage"]
                            closing = closing or not choices
                        if held is not None:
                            out.append(b"data: " + _encode(held) + b"\n\n")
                            held = None
                        if closing:
                            held = event
                        else:
                            if content and trace.ttft_s is None:
                                trace.ttft_s = time.perf_counter() - trace.started
                            out.append(b"data: " + payload + b"\n\n")
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
                    batch = await anext(upstream, None)
                trace.backend_s = time.perf_counter() - began
            except ServingError as exc:
                trace.backend_s = time.perf_counter() - began
                raise UpstreamError(exc.message, code="backend_stream_error") from exc
            except (msgspec.DecodeError, AttributeError) as exc:
                trace.backend_s = time.perf_counter() - began
                raise UpstreamError(
                    f"backend {trace.backend} sent a malformed event", code="backend_stream_error"
                ) from exc
        except UpstreamError as error:
            # Mid-stream failure: the status line is long gone, so say it in the stream itself.
            trace.fail(error, "backend_error")
            self._summarise(trace, texts, finishes)
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
                self._summarise(trace, texts, finishes)
                self.audit.submit(trace.row())  # no await: we are being cancelled
            raise
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                # Closing the upstream generator drops the backend connection, so vLLM aborts.
                await asyncio.shield(aclose())
        self._summarise(trace, texts, finishes)
        if held is None:
            held = {
                "id": f"gw-{trace.request_id}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(trace.created_at.timestamp()),
                "model": trace.model,
                "choices": [],
            }
        held["gateway"] = trace.gateway_object()
        recorded = True
        await self.record(trace)
        yield b"data: " + _encode(held) + b"\n\n" + _DONE

    @staticmethod
    def _summarise(trace: Trace, texts: dict[int, list[str]], finishes: dict[int, str]) -> None:
        joined = {i: "".join(parts) for i, parts in texts.items()}
        trace.response_text = joined.get(0, "")
        trace.finish_reason = finishes.get(0)
        choices = [
            {"index": i, "text": joined.get(i, ""), "finish_reason": finishes.get(i)}
            for i in sorted(set(joined) | set(finishes))
        ]
        trace.response_json = _encode({"choices": choices, "usage": trace.usage}).decode()


def _upstream_message(event: dict[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "the backend reported an error"))
    return str(error)
