"""HTTP routes: parse, hand the request to the pipeline, shape the answer. Nothing else lives here."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Stream

from gateway import guarding
from gateway.errors import GatewayError, PermissionDenied, RequestTooLarge
from gateway.pipeline import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint
from gateway.rollout import DEPLOYMENT_HEADER, sticky_id
from gateway.services import Services
from serving.router import ROUTE, begin_route

_encode = msgspec.json.Encoder().encode
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _serve(endpoint: Endpoint, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
    limit = services.settings.max_body_bytes

    async def read_request_body() -> bytes:
        try:
            return await request.body()
        except RequestEntityTooLarge as exc:
            raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.") from exc

    read_body: Callable[[], Awaitable[bytes]] = read_request_body

    client = request.client.host if request.client else None
    forced = request.headers.get(DEPLOYMENT_HEADER)
    if forced:  # only an admin may force a deployment; refused inside the pipeline, so it is audited
        read_body = _admin_only(read_body, request, services)
    if forced or services.settings.sticky == "key":
        begin_route(sticky_id(request.headers.get("authorization"), services), forced and forced.strip())
    trace, result = await services.pipeline.handle(endpoint, read_body, request.headers.get("authorization"), client)
    headers = {"x-gateway-request-id": trace.request_id}
    route = ROUTE.get()
    if route is not None and route.deployment:
        headers[DEPLOYMENT_HEADER] = route.deployment
    if trace.verdicts:  # for a stream: the input guards (output verdicts come in the last event)
        headers["x-gateway-guards"] = guarding.header(trace.verdicts)
    if trace.blocked:
        headers["x-gateway-blocked-by"] = trace.blocked["guard"]
    if trace.rate_headers:
        headers.update(trace.rate_headers)
    if isinstance(result, bytes):
        headers["x-gateway-backend-ms"] = f"{trace.backend_s * 1000:.1f}"
        return Response(result, media_type="application/json", headers=headers)
    return Stream(result, media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})


def _admin_only(
    read_body: Callable[[], Awaitable[bytes]], request: Request[Any, Any, Any], services: Services
) -> Callable[[], Awaitable[bytes]]:
    """`read_body` for a request that names a deployment: the pipeline reads the body after it has
    authenticated the key (cached, so this second look is free), and records the refusal."""

    async def checked() -> bytes:
        if not services.settings.open_mode:
            key = await services.keys.authenticate(request.headers.get("authorization"))
            if key.role != "admin":
                raise PermissionDenied(
                    f"only an admin key may choose a deployment with {DEPLOYMENT_HEADER}",
                    param=DEPLOYMENT_HEADER,
                    code="deployment_forbidden",
                )
        return await read_body()

    return checked


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    return await _serve(CHAT, request, services)


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    return await _serve(COMPLETIONS, request, services)


@post("/v1/embeddings", status_code=200)
async def embeddings(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    return await _serve(EMBEDDINGS, request, services)


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    if not services.settings.open_mode:
        await services.keys.authenticate(request.headers.get("authorization"))
    cards = await services.backend.models()
    created = int(services.started_at)
    data = [
        {"id": c.id, "object": "model", "created": created, "owned_by": c.owned_by, "max_model_len": c.max_model_len}
        for c in cards
    ]
    # Model aliases (RAG on a collection) and the embedding model are models too, for clients.
    for alias, (collection, model) in services.settings.aliases.items():
        data.append(
            {
                "id": alias,
                "object": "model",
                "created": created,
                "owned_by": "gateway",
                "root": model,
                "collection": collection,
            }
        )
    if services.embedder is not None:
        data.append(
            {
                "id": services.embedder.name,
                "object": "model",
                "created": created,
                "owned_by": "gateway",
                "kind": "embedding",
                "dimensions": services.embedder.dimension,
            }
        )
    return Response(_encode({"object": "list", "data": data}), media_type="application/json")


@get("/healthz")
async def healthz() -> Response[bytes]:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def _is_admin(request: Request[Any, Any, Any], services: Services) -> bool:
    """Open mode, or a live admin key; a missing or wrong key is simply not admin (probes send none)."""
    if services.settings.open_mode:
        return True
    authorization = request.headers.get("authorization")
    if not authorization:
        return False
    try:
        key = await services.keys.authenticate(authorization)
    except GatewayError:
        return False
    return key.role == "admin"


@get("/readyz")
async def readyz(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    """200 or 503 for probes; the details (policy, backend URLs, collections) only for admins."""
    started = time.perf_counter()
    ready, report = await services.readiness()
    status = 200 if ready else 503
    if not await _is_admin(request, services):
        public = {k: report[k] for k in ("status", "message") if k in report}  # "starting local vLLM: 45 s"
        return Response(_encode(public), status_code=status, media_type="application/json")
    report["checked_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return Response(_encode(report), status_code=status, media_type="application/json")


ROUTES = [chat_completions, completions, embeddings, list_models, healthz, readyz]
