"""The Litestar application factory: `create_app(settings) -> Litestar`, with no module-level state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from gateway.errors import GatewayError
from gateway.review import REVIEW_ROUTES
from gateway.routes import ROUTES
from gateway.services import Services
from gateway.settings import Settings
from serving.backend import Backend

log = logging.getLogger("gateway")
_encode = msgspec.json.Encoder().encode


def _error_response(status: int, message: str, kind: str, code: str | None) -> Response[bytes]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Response(_encode(body), status_code=status, media_type="application/json")


def _gateway_error(_: Request, exc: GatewayError) -> Response[bytes]:
    return Response(_encode(exc.body()), status_code=exc.status, media_type="application/json", headers=exc.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 400: "invalid_request"}


def _http_error(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error_response(status, str(exc.detail), kind, _HTTP_CODES.get(status, f"http_{status}"))


def _unexpected_error(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(500, "internal gateway error; see the gateway log", "server_error", "internal_error")


def create_app(settings: Settings, *, backend: Backend | None = None) -> Litestar:
    """Build the gateway. `backend` replaces the router built from `settings.backend` (tests, tools)."""
    services = Services(settings, backend)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    app = Litestar(
        route_handlers=[*ROUTES, *REVIEW_ROUTES],
        template_config=TemplateConfig(directory=Path(__file__).with_name("templates"), engine=JinjaTemplateEngine),
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app.state.services = services
    return app
