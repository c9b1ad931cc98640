"""Errors raised by backends, drawn as one tree so the gateway maps them to HTTP in one place.

ServingError
 +-- BackendUnavailable   connection refused, reset or DNS failure: no answer at all (502/503)
 +-- BackendTimeout       the backend accepted the request but did not answer in time (504)
 +-- BackendHTTPError     the backend answered with an error status; its body is kept (4xx/5xx)
 +-- BackendBadAnswer     the backend answered 200 with something unusable: malformed, too large,
 |                        or a stream cut short; `code` says which (502)
 +-- NoBackendForModel    no configured backend serves the requested model (404)
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class of every error a backend raises."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend


class BackendUnavailable(ServingError):
    """The backend could not be reached at all."""


class BackendTimeout(ServingError):
    """The backend did not answer (or stopped streaming) within the configured time."""


class BackendHTTPError(ServingError):
    """The backend answered with an error status; `body` is its decoded JSON (or text)."""

    def __init__(self, message: str, *, backend: str | None, status: int, body: object) -> None:
        super().__init__(message, backend=backend)
        self.status = status
        self.body = body


class BackendBadAnswer(ServingError):
    """The backend answered, but the answer cannot be used: `code` is the client-facing error code
    (`backend_invalid_answer`, `backend_answer_too_large`, `backend_stream_truncated`)."""

    def __init__(self, message: str, *, backend: str | None, code: str) -> None:
        super().__init__(message, backend=backend)
        self.code = code


class NoBackendForModel(ServingError):
    """No backend lists the requested model."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model
