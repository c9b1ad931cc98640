"""`GET /metrics` on the main port: Prometheus text format, for admin keys or anyone (settings `metrics`)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.errors import NotFound, PermissionDenied
from gateway.routes import _is_admin
from gateway.services import Services


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    """Prometheus text format; `metrics = "admin"` needs an admin key (or open mode), "open" none."""
    mode = services.settings.metrics
    if services.metrics is None or mode == "off":
        raise NotFound("metrics are off on this port", code="not_found")
    if mode == "admin" and not await _is_admin(request, services):
        raise PermissionDenied("/metrics needs an admin key")
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


METRICS_ROUTES = [metrics_endpoint]
