"""The gateway's error tree, written to the client in OpenAI's error format in one place.

    GatewayError                 status  type                   code
     +-- InvalidRequest           400    invalid_request_error  (varies, e.g. invalid_json)
     |    +-- InputBlocked        400    invalid_request_error  input_blocked (names the guard)
     +-- RequestTooLarge          413    invalid_request_error  request_too_large
     +-- AuthenticationFailed     401    authentication_error   invalid_api_key
     +-- PermissionDenied         403    permission_error       insufficient_role
     +-- NotFound                 404    invalid_request_error  not_found / model_not_found
     +-- UpstreamError            502/503/504 or the backend's 4xx, naming the backend
     +-- InternalError            500    server_error           internal_error (a gateway bug; logged)
     +-- RateLimited              429    requests | tokens      rate_limit_exceeded / insufficient_quota
     +-- LimitsUnavailable        503    server_error           limits_unavailable (Redis down, fail-closed)

Backend errors (`serving.errors`) are translated by `from_serving_error`.
"""

from __future__ import annotations

from typing import Any

from serving.errors import (
    BackendBadAnswer,
    BackendHTTPError,
    BackendTimeout,
    BackendUnavailable,
    NoBackendForModel,
    ServingError,
)


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    wire: dict[str, Any] | None = None  # a backend's error object, sent as it came (field types kept)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra = extra or {}  # extra top-level objects for the body, e.g. "gateway"
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = self.wire or {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error, **self.extra}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InputBlocked(InvalidRequest):
    """An input guard blocked the request; no backend call was made."""

    code = "input_blocked"

    def __init__(self, message: str, *, guard: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, headers={"x-gateway-blocked-by": guard})
        self.guard = guard


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "insufficient_role"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "backend_error"


class RateLimited(GatewayError):
    """Over a rate limit or quota (`gateway.limits`); OpenAI's 429, with Retry-After so SDKs retry."""

    status = 429
    type = "requests"  # or "tokens", as OpenAI says which limit was hit
    code = "rate_limit_exceeded"  # or "insufficient_quota" for a spent daily or monthly quota


class LimitsUnavailable(GatewayError):
    """The shared limit counters (Redis) cannot be reached and the gateway is set to fail closed."""

    status = 503
    type = "server_error"
    code = "limits_unavailable"


class InternalError(GatewayError):
    """Something the gateway did not expect; the request is still audited and answered in OpenAI's format."""

    status = 500
    type = "server_error"
    code = "internal_error"


def from_serving_error(exc: ServingError) -> GatewayError:
    """Translate a backend failure into what the client sees."""
    if isinstance(exc, NoBackendForModel):
        return NotFound(exc.message, param="model", code="model_not_found")
    if isinstance(exc, BackendTimeout):
        return UpstreamError(exc.message, status=504, code="backend_timeout")
    if isinstance(exc, BackendUnavailable):
        return UpstreamError(exc.message, status=502, code="backend_unavailable")
    if isinstance(exc, BackendBadAnswer):
        return UpstreamError(exc.message, status=502, code=exc.code)
    if isinstance(exc, BackendHTTPError):
        if 400 <= exc.status < 500:
            # vLLM's own rejection (bad parameter, context too long, unknown model): pass it on.
            upstream = exc.body.get("error") if isinstance(exc.body, dict) else None
            upstream = upstream if isinstance(upstream, dict) else (exc.body if isinstance(exc.body, dict) else {})
            kind = upstream.get("type")
            error = GatewayError(
                exc.message,
                status=exc.status,
                type=kind if isinstance(kind, str) else "invalid_request_error",
                param=upstream.get("param") if isinstance(upstream.get("param"), str) else None,
                code=str(upstream.get("code")) if upstream.get("code") is not None else "backend_rejected",
            )
            # The client gets the backend's own fields as they came (`"code": 400` stays an
            # integer); the string form above is what the audit row and the metrics keep.
            error.wire = {
                "message": exc.message,
                "type": error.type,
                "param": upstream.get("param"),
                "code": upstream.get("code", error.code),
            }
            return error
        return UpstreamError(
            f"backend {exc.backend} failed with HTTP {exc.status}: {exc.message}", status=502, code="backend_error"
        )
    return UpstreamError(exc.message, status=502)
