"""Shadow traffic: copies of requests sent to a shadow deployment off the client's path.

A copy is launched after the primary was sent and runs as its own task: the client never waits
for it and never sees its answer or its failure. At most `max_in_flight` copies run at once per
replica; a copy beyond that is dropped and counted, so a slow or dead shadow cannot pile up work.
Each copy's answer goes through the same output guards as the primary's (same key, same model,
same passages) and into its own audit row, whose `shadow_of` is the primary's request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from gateway import guarding
from gateway.audit import AuditWriter
from guardrails import Guardrails, Passage, Verdict
from serving.backend import Backend
from serving.errors import BackendHTTPError, BackendTimeout, ServingError
from serving.router import Deployment

log = logging.getLogger("gateway.shadow")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class ShadowSource:
    """What a copy needs from its primary request (taken when the primary was sent)."""

    request_id: str
    endpoint: str  # "chat.completions" or "completions"
    path: str
    chat: bool
    model: str  # the client's model name
    api_key_id: str | None
    body: Mapping[str, Any]  # as the primary's backend got it (passages in, redactions applied)
    passages: tuple[Passage, ...] = ()
    prompt: str | None = None
    trace_id: str | None = None
    versions: Mapping[str, Any] = field(default_factory=dict)  # config, policy, index, gateway versions


@dataclass(slots=True)
class ShadowStats:
    sent: int = 0
    dropped: int = 0  # over the in-flight bound: never sent
    failed: int = 0  # the shadow backend failed (its row says how)
    completed: int = 0


def _answer_text(answer: Mapping[str, Any], chat: bool) -> tuple[str | None, str | None]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None
    first = choices[0]
    finish = first.get("finish_reason") if isinstance(first.get("finish_reason"), str) else None
    if chat:
        message = first.get("message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = first.get("text")
    return (content if isinstance(content, str) else None), finish


class ShadowRunner:
    """Launches bounded, fire-and-forget shadow copies and audits each one."""

    def __init__(
        self,
        audit: AuditWriter,
        max_in_flight: int = 16,
        rails: Callable[[], Guardrails | None] = lambda: None,
    ) -> None:
        self.audit = audit
        self.max_in_flight = max_in_flight
        self._rails = rails
        self.in_flight = 0
        self.stats: dict[str, ShadowStats] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _stats(self, deployment: str) -> ShadowStats:
        stats = self.stats.get(deployment)
        if stats is None:
            stats = self.stats[deployment] = ShadowStats()
        return stats

    def launch(self, source: ShadowSource, targets: Sequence[tuple[Deployment, Backend]]) -> None:
        """Start one copy per target; never waits, never raises."""
        for deployment, backend in targets:
            stats = self._stats(deployment.name)
            if self.in_flight >= self.max_in_flight:
                stats.dropped += 1
                continue
            stats.sent += 1
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(source, deployment, backend))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.stats.values())

    async def _run(self, source: ShadowSource, deployment: Deployment, backend: Backend) -> None:
        row = self._row(source, deployment, backend)
        began = time.perf_counter()
        try:
            await self._call(source, deployment, backend, row)
        except ServingError as exc:
            self._stats(deployment.name).failed += 1
            row.update(_failure(exc), backend=exc.backend or backend.name)
        except Exception as exc:  # a bug must not leak out of a fire-and-forget task
            log.exception("shadow copy of %s to %s failed", source.request_id, deployment.name)
            self._stats(deployment.name).failed += 1
            row.update(status="error", http_status=500, error_code="internal_error", error_message=repr(exc))
        else:
            self._stats(deployment.name).completed += 1
        elapsed = time.perf_counter() - began
        row.update(
            finished_at=row["created_at"] + timedelta(seconds=elapsed),
            backend_ms=round(elapsed * 1000, 3),
            total_ms=round(elapsed * 1000, 3),
            gateway_ms=0.0,
        )
        await asyncio.shield(self.audit.submit(row))

    @staticmethod
    def _row(source: ShadowSource, deployment: Deployment, backend: Backend) -> dict[str, Any]:
        return {
            "request_id": uuid.uuid4().hex,
            "created_at": datetime.now(UTC),
            "api_key_id": source.api_key_id,
            "endpoint": source.endpoint,
            "model": source.model,
            "backend": backend.name,
            "stream": False,
            "status": "ok",
            "http_status": 200,
            "trace_id": source.trace_id,
            **source.versions,
            "deployment": deployment.name,
            "backend_model": deployment.backend_model,
            "shadow_of": source.request_id,
        }

    async def _call(self, source: ShadowSource, deployment: Deployment, backend: Backend, row: dict[str, Any]) -> None:
        body = {**source.body, "model": deployment.backend_model, "stream": False}
        body.pop("stream_options", None)  # a copy is always answered whole
        row["request_json"] = _encode(body).decode()
        answer = await backend.complete(source.path, body)
        text, finish = _answer_text(answer, source.chat)
        raw_usage = answer.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        row.update(
            response_text=text,
            response_json=_encode(answer).decode(),
            finish_reason=finish,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
        )
        rails = self._rails()
        if rails is None or not text:
            return
        result = await rails.check_output(text, source.passages, source.api_key_id, source.model, source.prompt)
        verdicts: list[Verdict] = list(result.verdicts)
        row.update(guarding.audit_columns(verdicts))
        if result.blocked_by is not None:
            row.update(status="blocked", finish_reason="content_filter")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Let copies in flight finish for up to `grace_s`, then cancel the rest (their rows are lost:
        a copy answers nobody)."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _failure(exc: ServingError) -> dict[str, Any]:
    if isinstance(exc, BackendTimeout):
        code, status = "backend_timeout", 504
    elif isinstance(exc, BackendHTTPError):
        code, status = "backend_error", exc.status if 400 <= exc.status < 600 else 502
    else:
        code, status = getattr(exc, "code", None) or "backend_unavailable", 502
    return {"status": "backend_error", "http_status": status, "error_code": code, "error_message": exc.message}
