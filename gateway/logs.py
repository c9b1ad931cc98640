"""Logging: plain text or one JSON object per line (settings `log_format`), with the request id.

The request id lives in a context variable that a `Trace` sets when it is created (its id
factory is `new_request_id`), so every log line written while that request runs, in the
pipeline, a guard, the HTTP layer or a library, carries it, through a `logging.Filter` on the
handler. Lines about no request carry none.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
TRACE_ID: ContextVar[str | None] = ContextVar("gateway_trace_id", default=None)  # set by gateway.tracing

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(worker_prefix)s%(name)s: %(message)s%(request_suffix)s"


def new_request_id() -> str:
    """A fresh request id, also made the current one for this task's log lines."""
    request_id = uuid.uuid4().hex
    REQUEST_ID.set(request_id)
    return request_id


class RequestContextFilter(logging.Filter):
    """Puts `request_id` and `trace_id` (None outside a request) on every record, and the index of
    the worker process that wrote it (`gateway serve --workers N`; None in a single process)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self.worker_prefix = f"worker {worker} " if worker is not None else ""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.trace_id = TRACE_ID.get()
        record.request_suffix = f" [request {request_id}]" if request_id else ""
        record.worker = self.worker
        record.worker_prefix = self.worker_prefix
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, trace_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = trace_id
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_handler(log_format: str, stream: Any = None, worker: int | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestContextFilter(worker))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str, worker: int | None = None) -> None:
    """Root logging for `gateway serve`: one handler on stderr, text or JSON; a worker process's
    lines say which worker wrote them (`worker N` in text, `"worker": N` in JSON)."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format, worker=worker)], force=True)
    # faiss tries its AVX512/AVX2 builds first and logs each ModuleNotFoundError at INFO: not news.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
