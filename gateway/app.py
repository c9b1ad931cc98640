"""The Litestar application factory: `create_app(settings) -> Litestar`, with no module-level state."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from gateway.documents_routes import DOCUMENT_ROUTES
from gateway.errors import GatewayError
from gateway.feedback import FEEDBACK_ROUTES
from gateway.metrics_routes import METRICS_ROUTES
from gateway.overview import OVERVIEW_ROUTES
from gateway.review import REVIEW_ROUTES
from gateway.rollout_routes import ROLLOUT_ROUTES
from gateway.routes import ROUTES
from gateway.services import Services
from gateway.settings import Settings
from gateway.tracing import middleware_factory
from gateway.usage_routes import USAGE_ROUTES
from serving.backend import Backend

log = logging.getLogger("gateway")
_encode = msgspec.json.Encoder().encode


REQUEST_ID_HEADER = "x-gateway-request-id"
_ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz"})  # while the models load in the background


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _error_response(
    status: int, message: str, kind: str, code: str | None, headers: Mapping[str, str] | None = None
) -> Response[bytes]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {**(headers or {}), REQUEST_ID_HEADER: _new_request_id()}
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    # A pipeline error carries its audit row's id already; any other gets a fresh one.
    headers = exc.headers if REQUEST_ID_HEADER in exc.headers else {**exc.headers, REQUEST_ID_HEADER: _new_request_id()}
    return Response(_encode(exc.body()), status_code=exc.status, media_type="application/json", headers=headers)


_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (no route, wrong method, bad Content-Type, validation) in OpenAI's body."""
    status = exc.status_code
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = str(exc.detail)
    if isinstance(exc.extra, list) and exc.extra:  # validation errors: say which parameter and why
        message = f"{message}: " + "; ".join(
            f"{e.get('key', '?')}: {e.get('message', '')}" if isinstance(e, dict) else str(e) for e in exc.extra
        )
    # Keep the exception's headers (405's `Allow`, for one).
    return _error_response(status, message, kind, _HTTP_CODES.get(status, f"http_{status}"), exc.headers)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(500, "internal gateway error; see the gateway log", "server_error", "internal_error")


async def _ensure_request_id(response: Response[Any]) -> Response[Any]:
    """Every response carries `x-gateway-request-id`; pipeline routes set the audit row's id themselves.

    Async on purpose: Litestar runs a sync hook in a worker thread."""
    if REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = _new_request_id()
    return response


def create_app(settings: Settings, *, backend: Backend | None = None, start_in_background: bool = False) -> Litestar:
    """Build the gateway. `backend` replaces the router built from `settings.backend` (tests, tools).

    `start_in_background` (`gateway serve`): the port opens before the models load; until they
    have, /healthz answers 200, /readyz 503 with what is loading, every other route 503 `starting`."""
    services = Services(settings, backend)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        if not start_in_background:
            await services.start()
            try:
                yield
            finally:
                await services.stop()
            return
        starting = asyncio.create_task(services.start_in_background(), name="gateway-start")
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            await services.stop()

    async def while_starting(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        loading = services.loading_since is not None and services.loading()
        if not loading or request.url.path in _ALWAYS_ANSWERED:
            return None
        message = f"The gateway is starting ({loading}); retry shortly."
        return _error_response(503, message, "server_error", "starting", {"retry-after": "5"})

    app = Litestar(
        route_handlers=[
            *ROUTES,
            *REVIEW_ROUTES,
            *USAGE_ROUTES,
            *METRICS_ROUTES,
            *OVERVIEW_ROUTES,
            *ROLLOUT_ROUTES,
            *DOCUMENT_ROUTES,
            *FEEDBACK_ROUTES,
        ],
        template_config=TemplateConfig(directory=Path(__file__).with_name("templates"), engine=JinjaTemplateEngine),
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        after_request=_ensure_request_id,
        logging_config=None,  # the process's logging is gateway.logs' (one format), not Litestar's default
        before_request=while_starting if start_in_background else None,
        middleware=[middleware_factory(lambda: services.tracer is not None)],
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app.state.services = services
    return app
