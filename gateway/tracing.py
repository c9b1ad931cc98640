"""Traces: the caller's W3C trace context continued, passed on to the backend, and (with an OTLP
endpoint, settings `otlp_endpoint`) one OpenTelemetry span per request with a child span per stage.

Two seams, as for metrics. At the HTTP edge, `TraceContextMiddleware` reads `traceparent`,
chooses this request's trace id and span ids, and puts them in context variables: the audit row
(`Trace.trace_id`), the log lines and the backend call (`serving.backend.REQUEST_HEADERS`) read
them from there. At `Pipeline.record`, `RequestTracer.observe` builds the spans from the finished
Trace with explicit start and end times, so nothing inside the pipeline's stages touches a span.

The stage spans carry the stages' measured durations; their start times are laid end to end in
pipeline order (stages that overlap in reality, such as output guards during a stream, are shown
one after the other). With tracing off, a caller's `traceparent` is still passed on unchanged and
its trace id still lands in the audit row; without one, nothing at all is done.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.logs import TRACE_ID
from serving.backend import REQUEST_HEADERS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from gateway.metrics import TraceLike

log = logging.getLogger("gateway.tracing")

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
#: Child spans, in pipeline order (backend_ttft is an attribute of the backend span, total is the root).
SPAN_STAGES = (
    "auth",
    "input_guards",
    "embed",
    "search",
    "passage_guards",
    "backend_total",
    "output_guards",
    "audit_commit",
)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """This request's place in a distributed trace."""

    trace_id: str  # 32 hex digits
    parent_id: str | None  # the caller's span, when it sent a traceparent
    span_id: str | None  # this request's span; None when the gateway records no trace of it
    backend_span_id: str | None  # the span the backend call is made under
    sampled: bool


CURRENT: ContextVar[TraceContext | None] = ContextVar("gateway_trace_context", default=None)


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C `traceparent`; None otherwise."""
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def begin(traceparent: str | None, tracestate: str | None, recording: bool) -> tuple[TraceContext, dict[str, str]]:
    """The request's trace context and the headers for its backend calls."""
    parsed = parse_traceparent(traceparent) if traceparent else None
    if not recording:
        assert parsed is not None  # only called without recording when the caller sent one
        trace_id, parent_id, sampled = parsed
        headers = {"traceparent": traceparent or ""}
        if tracestate:
            headers["tracestate"] = tracestate
        return TraceContext(trace_id, parent_id, None, None, sampled), headers
    caller: str | None = None
    if parsed is None:
        trace_id, sampled = secrets.token_hex(16), True
    else:
        trace_id, caller, sampled = parsed
    span_id, backend_span_id = secrets.token_hex(8), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{backend_span_id}-{'01' if sampled else '00'}"}
    if tracestate and parsed is not None:
        headers["tracestate"] = tracestate
    return TraceContext(trace_id, caller, span_id, backend_span_id, sampled), headers


def current_trace_id() -> str | None:
    """The trace id of the request running now (for its audit row); None outside a traced request."""
    context = CURRENT.get()
    return context.trace_id if context is not None else None


class TraceContextMiddleware:
    """ASGI middleware: sets the trace context of each HTTP request (see the module docstring)."""

    def __init__(self, app: Any, recording: Callable[[], bool]) -> None:
        self.app = app
        self.recording = recording  # asked per request: a tracer may be set after the app is built (tests)

    async def __call__(self, scope: Mapping[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = tracestate = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == b"tracestate":
                tracestate = value.decode("latin-1")
        recording = self.recording()
        if not recording and (traceparent is None or parse_traceparent(traceparent) is None):
            await self.app(scope, receive, send)  # nothing to continue, nothing to record
            return
        context, headers = begin(traceparent, tracestate, recording)
        tokens = (CURRENT.set(context), REQUEST_HEADERS.set(headers), TRACE_ID.set(context.trace_id))
        try:
            await self.app(scope, receive, send)
        finally:
            TRACE_ID.reset(tokens[2])
            REQUEST_HEADERS.reset(tokens[1])
            CURRENT.reset(tokens[0])


def middleware_factory(recording: Callable[[], bool]) -> Callable[[Any], TraceContextMiddleware]:
    def factory(app: Any) -> TraceContextMiddleware:
        return TraceContextMiddleware(app, recording)

    return factory


class RequestTracer:
    """Turns finished requests into OpenTelemetry spans; one per app, with its own TracerProvider."""

    def __init__(
        self, endpoint: str | None = None, *, processor: SpanProcessor | None = None, service_name: str = "gateway"
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            if endpoint is None:
                raise ValueError("an OTLP endpoint or a span processor is needed")
            # The batch processor exports from its own thread: nothing waits on the collector.
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"))
        self._ids = _preset_ids()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}), id_generator=self._ids)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("gateway")

    def observe(self, trace: TraceLike) -> None:
        """Record the spans of one finished request. Never raises."""
        context = CURRENT.get()
        if context is None or context.span_id is None or not context.sampled:
            return
        try:
            self._record(trace, context)
        except Exception:
            log.exception("tracing: recording a request failed")

    def _record(self, trace: TraceLike, context: TraceContext) -> None:
        import time

        from opentelemetry import trace as otel
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

        from gateway.metrics import outcome, stage_seconds

        stages = stage_seconds(trace, time.perf_counter())
        created: Any = getattr(trace, "created_at", None)
        start = int(created.timestamp() * 1e9) if created is not None else time.time_ns() - int(stages["total"] * 1e9)
        end = start + int(stages["total"] * 1e9)
        parent = None
        if context.parent_id is not None:
            remote = SpanContext(
                int(context.trace_id, 16), int(context.parent_id, 16), is_remote=True, trace_flags=TraceFlags(1)
            )
            parent = otel.set_span_in_context(NonRecordingSpan(remote))
        endpoint = trace.endpoint
        attributes: dict[str, Any] = {
            "gateway.request_id": str(getattr(trace, "request_id", "")),
            "gateway.endpoint": endpoint.name,
            "gateway.outcome": outcome(trace.status),
            "gateway.status": trace.status,
            "http.request.method": "POST",
            "url.path": getattr(endpoint, "path", ""),
            "http.response.status_code": trace.http_status,
            "gateway.stream": trace.stream,
        }
        if trace.model:
            attributes["gen_ai.request.model"] = trace.model[:200]
        if trace.backend:
            attributes["gateway.backend"] = trace.backend
        usage = trace.usage or {}
        for name, key in (
            ("gen_ai.usage.input_tokens", "prompt_tokens"),
            ("gen_ai.usage.output_tokens", "completion_tokens"),
        ):
            if type(usage.get(key)) is int:
                attributes[name] = usage[key]
        error_code = getattr(trace, "error_code", None)
        if error_code:
            attributes["error.type"] = error_code
        self._ids.trace_id, self._ids.span_id = int(context.trace_id, 16), int(context.span_id or "0", 16)
        root = self._tracer.start_span(
            f"POST {getattr(endpoint, 'path', endpoint.name)}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=start,
        )
        self._ids.trace_id = self._ids.span_id = None
        inside = otel.set_span_in_context(root)
        cursor = start
        for stage in SPAN_STAGES:
            seconds = stages.get(stage)
            if seconds is None:
                continue
            stage_start = min(cursor, end)
            stage_end = min(stage_start + int(seconds * 1e9), end)
            stage_attributes: dict[str, Any] = {"gateway.stage": stage, "gateway.duration_s": seconds}
            if stage == "backend_total":
                self._ids.span_id = int(context.backend_span_id or "0", 16) or None  # the id the backend was told
                if "backend_ttft" in stages:
                    stage_attributes["gateway.backend_ttft_s"] = stages["backend_ttft"]
            span = self._tracer.start_span(
                stage, context=inside, kind=SpanKind.CLIENT if stage == "backend_total" else SpanKind.INTERNAL,
                attributes=stage_attributes, start_time=stage_start,
            )  # fmt: skip
            self._ids.span_id = None
            span.end(end_time=stage_end)
            cursor = stage_end
        if trace.http_status >= 500:
            root.set_status(Status(StatusCode.ERROR, error_code or ""))
        root.end(end_time=end)

    def close(self) -> None:
        self.provider.shutdown()


def _preset_ids() -> Any:
    """Random ids, except the ones chosen at the edge of the request: set `trace_id` / `span_id` just
    before starting the span that must carry them (all on the event loop, one span at a time)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        trace_id: int | None = None
        span_id: int | None = None

        def generate_trace_id(self) -> int:
            return self.trace_id if self.trace_id is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            return self.span_id if self.span_id is not None else super().generate_span_id()

    return PresetIds()
