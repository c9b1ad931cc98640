"""Deployments in the settings file (`[[deployments]]`): parsed, checked, and turned into a router.

A deployment is a client-facing model name served by some backends under the backends' own
model name, with a weight (its share of that model's traffic) or a `shadow` share (copies of
requests that are never answered from). Every problem is a `ValueError` naming the deployment and
the key, so the settings loader can say which file and entry is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from serving.backend import Backend
from serving.router import Deployment, DeploymentRouter, Router

_KEYS = {"name", "model", "backend", "backends", "backend_model", "weight", "shadow"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STICKY_CHOICES = ("none", "key", "user")


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def _number(entry: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} must be a number, not {value!r}")
    return float(value)


def _backends(entry: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if ("backend" in entry) == ("backends" in entry):
        raise ValueError(f"{where}: give exactly one of 'backend' (a URL) or 'backends' (a list of URLs)")
    raw = entry["backends"] if "backends" in entry else [entry["backend"]]
    if not isinstance(raw, list | tuple) or not raw:
        raise ValueError(f"{where}: 'backends' must be a non-empty list of URLs")
    urls = []
    for url in raw:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}: backend URL {url!r} must start with http:// or https://")
        urls.append(url.rstrip("/"))
    return tuple(urls)


def parse_deployment(entry: object, position: int) -> Deployment:
    """One `[[deployments]]` table; `position` (from 1) names it in messages until its name is known."""
    where = f"deployment #{position}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a table, not {entry!r}")
    unknown = sorted(set(entry) - _KEYS)
    name = _text(entry, "name", where)
    where = f"deployment {name!r}"
    if not _NAME.match(name):
        raise ValueError(f"{where}: names are letters, digits, '.', '_' and '-' (at most 64)")
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(_KEYS))})")
    shadow = _number(entry, "shadow", where, 0.0)
    weight = _number(entry, "weight", where, 0.0 if shadow else 1.0)
    if not 0.0 <= shadow <= 1.0:
        raise ValueError(f"{where}: 'shadow' is the share of requests copied to it, 0-1, not {shadow}")
    if weight < 0:
        raise ValueError(f"{where}: 'weight' must not be negative")
    if shadow and weight:
        raise ValueError(f"{where}: a shadow deployment never answers, so it takes no 'weight'")
    model = _text(entry, "model", where)
    return Deployment(
        name=name,
        model=model,
        backend_model=_text(entry, "backend_model", where) if "backend_model" in entry else model,
        backends=_backends(entry, where),
        weight=weight,
        shadow=shadow,
    )


def parse_deployments(value: object) -> tuple[Deployment, ...]:
    """`[[deployments]]` from a file (a list of tables) or the environment (the same as JSON)."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value.encode()) if value.strip() else []
        except msgspec.DecodeError as exc:
            raise ValueError(f"expected a JSON list of deployment tables: {exc}") from None
    if isinstance(value, Deployment):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of [[deployments]] tables")
    deployments = tuple(d if isinstance(d, Deployment) else parse_deployment(d, i) for i, d in enumerate(value, 1))
    check_deployments(deployments)
    return deployments


def check_deployments(deployments: Iterable[Deployment]) -> None:
    """Names unique; every model has a deployment with a weight (a model of shadows only answers nobody)."""
    seen: set[str] = set()
    answering: dict[str, bool] = {}
    for d in deployments:
        if d.name in seen:
            raise ValueError(f"deployment name {d.name!r} is used twice")
        seen.add(d.name)
        answering[d.model] = answering.get(d.model, False) or d.weight > 0
    idle = [m for m, ok in answering.items() if not ok]
    if idle:
        raise ValueError(f"model(s) {', '.join(map(repr, idle))} have only shadow deployments: give one a weight")


def deployment_table(deployments: Iterable[Deployment]) -> list[dict[str, Any]]:
    """Deployments as plain tables (for stored config versions and `/readyz`)."""
    out = []
    for d in deployments:
        table: dict[str, Any] = {
            "name": d.name,
            "model": d.model,
            "backend_model": d.backend_model,
            "backends": list(d.backends),
        }
        if d.shadow:
            table["shadow"] = d.shadow
        else:
            table["weight"] = d.weight
        out.append(table)
    return out


class BackendPool:
    """One client (and connection pool) per backend URL, kept across reloads: a reload that keeps a
    URL keeps its connections, so nothing in flight is cut."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._clients: dict[str, Backend] = {}

    def get(self, url: str) -> Backend:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = self._make(url)
        return client

    def router(self, urls: Iterable[str]) -> Router:
        return Router([self.get(url) for url in urls])

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def build_router(
    deployments: tuple[Deployment, ...], pool: BackendPool, fallback_urls: tuple[str, ...], sticky: str = "none"
) -> DeploymentRouter:
    """A deployment router over `pool`'s clients; models no deployment names go to `fallback_urls`."""
    routers: dict[tuple[str, ...], Router] = {}
    entries: list[tuple[Deployment, Backend]] = []
    for d in deployments:
        router = routers.get(d.backends)
        if router is None:
            router = routers[d.backends] = pool.router(d.backends)
        entries.append((d, router))
    fallback = pool.router(fallback_urls) if fallback_urls else None
    routed = DeploymentRouter(entries, fallback)
    routed.sticky = sticky
    return routed
