"""Admin routes of the rollout: reload the config files, see the live config and its history."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency

from gateway.errors import InvalidRequest
from gateway.rollout import ConfigInvalid
from gateway.services import Services

_encode = msgspec.json.Encoder().encode


async def _require_admin(request: Request[Any, Any, Any], services: Services) -> None:
    if services.settings.open_mode:
        return
    key = await services.keys.authenticate(request.headers.get("authorization"))
    key.require("admin")


@post("/admin/reload", status_code=200)
async def admin_reload(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    """Re-read the settings and policy files and apply them; 400 with the reason when they are invalid
    (the running config stays)."""
    await _require_admin(request, services)
    try:
        result = await services.rollout.reload()
    except ConfigInvalid as exc:
        raise InvalidRequest(
            f"config not applied, {services.rollout.version} stays: {exc}", code="invalid_config"
        ) from exc
    return Response(_encode({"status": "applied", **result}), media_type="application/json")


@get("/admin/config")
async def admin_config(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    """The live config (deployments, versions, shadow counters) and the last 20 applications."""
    await _require_admin(request, services)
    history = await services.rollout.store.history(20)
    for row in history:
        row["applied_at"] = row["applied_at"].isoformat()
    body = {**services.rollout.describe(), "history": history}
    return Response(_encode(body), media_type="application/json")


ROLLOUT_ROUTES = [admin_reload, admin_config]
