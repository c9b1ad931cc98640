"""Routing over several backends: pick by model, least in-flight first, fail over on connect errors.

A request fails over to the next backend only when the chosen one could not be reached at all
(nothing was generated, so retrying is safe), or when it answered that it does not serve the
model while the router did not know its model list. A backend that failed to connect sits out a
short cool-down before it is tried again. The model map comes from each backend's `/v1/models`.

Health is watched in the background (`start`): a backend that is down is probed again every
1-2 s (backing off), a healthy one every `check_s`; when a backend turns healthy its model list
is reloaded at once, so `/readyz` and `/v1/models` follow a backend that comes up within seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from serving.backend import Backend, ModelCard
from serving.errors import BackendHTTPError, BackendUnavailable, NoBackendForModel, ServingError

log = logging.getLogger("serving.router")


class _Slot:
    __slots__ = ("backend", "down_until", "failures", "healthy", "in_flight", "models", "next_check")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.in_flight = 0
        self.down_until = 0.0
        self.models: list[ModelCard] = []
        self.healthy: bool | None = None  # None: not probed yet
        self.failures = 0  # consecutive failed health probes
        self.next_check = 0.0

    def serves(self, model: object) -> bool:
        return any(m.id == model for m in self.models)


class Router(Backend):
    """Spreads requests over backends; itself a `Backend`, so the gateway sees one seam."""

    def __init__(
        self,
        backends: list[Backend],
        *,
        cooldown_s: float = 2.0,
        refresh_s: float = 30.0,
        check_s: float = 10.0,
        recheck_s: tuple[float, float] = (1.0, 2.0),
    ) -> None:
        if not backends:
            raise ValueError("the router needs at least one backend")
        self._slots = [_Slot(b) for b in backends]
        self._cooldown_s = cooldown_s
        self._refresh_s = refresh_s
        self._check_s = check_s
        self._recheck_first, self._recheck_max = recheck_s
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self.name = ",".join(b.name for b in backends)

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._slots]

    def status(self) -> list[tuple[str, bool, int, tuple[str, ...]]]:
        """(name, up, requests in flight, models) per backend, from what the router knows now (no probe)."""
        now = time.monotonic()
        return [
            (s.backend.name, s.healthy is not False and s.down_until <= now, s.in_flight, tuple(m.id for m in s.models))
            for s in self._slots
        ]

    async def refresh(self) -> None:
        """Reload every backend's model list; a backend that cannot answer keeps its old list."""
        async with self._refresh_lock:
            await self._refresh_slots(self._slots)
            self._refreshed_at = time.monotonic()

    @staticmethod
    async def _refresh_slots(slots: Iterable[_Slot]) -> None:
        slots = list(slots)
        results = await asyncio.gather(*(s.backend.models() for s in slots), return_exceptions=True)
        for slot, result in zip(slots, results, strict=True):
            if isinstance(result, list):
                slot.models = result

    def start(self) -> None:
        """Start watching backend health in the background (call from a running event loop)."""
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch(), name="backend-health")

    async def _watch(self) -> None:
        while True:
            due = [s for s in self._slots if s.next_check <= time.monotonic()]
            if due:
                try:
                    await self.check(due)
                except Exception:  # a probe must never end the watcher
                    log.exception("backend health check failed")
            wake = min(s.next_check for s in self._slots)
            await asyncio.sleep(max(0.05, wake - time.monotonic()))

    async def check(self, slots: Iterable[_Slot] | None = None) -> dict[str, bool]:
        """Probe backends now (all by default); reload the model list of any that turned healthy."""
        slots = list(self._slots if slots is None else slots)
        results = await asyncio.gather(*(s.backend.health() for s in slots), return_exceptions=True)
        now = time.monotonic()
        turned: list[_Slot] = []
        for slot, result in zip(slots, results, strict=True):
            ok = result is True
            if ok:
                if slot.healthy is not True or not slot.models:
                    turned.append(slot)
                if slot.healthy is False:
                    log.warning("backend %s is healthy again", slot.backend.name)
                slot.failures = 0
                slot.next_check = now + self._check_s
            else:
                if slot.healthy is not False:
                    log.warning("backend %s is unhealthy; probing it every %.0f-%.0f s",
                                slot.backend.name, self._recheck_first, self._recheck_max)  # fmt: skip
                slot.failures += 1
                slot.next_check = now + min(self._recheck_first * 2 ** (slot.failures - 1), self._recheck_max)
            slot.healthy = ok
        if turned:
            await self._refresh_slots(turned)
        return {s.backend.name: bool(s.healthy) for s in slots}

    def _candidates(self, model: object) -> list[_Slot]:
        now = time.monotonic()
        known = any(s.models for s in self._slots)
        # Without a model map, let the backends judge the model name themselves.
        slots = [s for s in self._slots if s.serves(model)] if known and isinstance(model, str) else list(self._slots)
        # Healthy before cooling down or failing its probe, then fewest requests in flight.
        return sorted(slots, key=lambda s: (s.down_until > now or s.healthy is False, s.in_flight))

    async def _slots_for(self, model: object) -> list[_Slot]:
        slots = self._candidates(model)
        if not slots and time.monotonic() - self._refreshed_at > 1.0:
            await self.refresh()  # a model may have been loaded since the last look
            slots = self._candidates(model)
        if not slots:
            raise NoBackendForModel(str(model))
        return slots

    @staticmethod
    def _model_miss(exc: BackendHTTPError, slot: _Slot, model: object) -> bool:
        """A 404 from a backend whose model list did not name the model: "not served here", not an error."""
        return exc.status == 404 and isinstance(model, str) and not slot.serves(model)

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        last: ServingError | None = None
        for slot in await self._slots_for(model):
            slot.in_flight += 1
            try:
                return await slot.backend.complete(path, body)
            except BackendUnavailable as exc:
                slot.down_until = time.monotonic() + self._cooldown_s
                last = exc
            except BackendHTTPError as exc:
                if not self._model_miss(exc, slot, model):
                    raise
                last = last or NoBackendForModel(str(model))
            finally:
                slot.in_flight -= 1
        assert last is not None
        raise last

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        model = body.get("model")
        last: ServingError | None = None
        for slot in await self._slots_for(model):
            slot.in_flight += 1
            started = False
            try:
                async for batch in slot.backend.stream(path, body):
                    started = True
                    yield batch
                return
            except BackendUnavailable as exc:
                if started:
                    raise
                slot.down_until = time.monotonic() + self._cooldown_s
                last = exc
            except BackendHTTPError as exc:
                if started or not self._model_miss(exc, slot, model):
                    raise
                last = last or NoBackendForModel(str(model))
            finally:
                slot.in_flight -= 1
        assert last is not None
        raise last

    async def models(self) -> list[ModelCard]:
        if time.monotonic() - self._refreshed_at > self._refresh_s:
            await self.refresh()
        seen: dict[str, ModelCard] = {}
        for slot in self._slots:
            for card in slot.models:
                seen.setdefault(card.id, card)
        return list(seen.values())

    async def health(self) -> bool:
        return any((await self.check()).values())

    async def health_by_backend(self) -> dict[str, bool]:
        """Probe every backend now (what `/readyz` shows); a backend that came up gets its models loaded."""
        return await self.check()

    async def stop_watching(self) -> None:
        """Stop the background health watch (the connections stay open)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None

    async def aclose(self) -> None:
        await self.stop_watching()
        await asyncio.gather(*(s.backend.aclose() for s in self._slots))


# ---------------------------------------------------------------------------------------------
# Deployments: a client-facing model name served by weighted deployments (canary, A/B), each a
# `Router` over its own backends, plus shadow deployments that get copies and never answer.


@dataclass(frozen=True, slots=True)
class Deployment:
    """One deployment of a client-facing model (plain data; built from the settings file)."""

    name: str
    model: str  # the name clients ask for
    backend_model: str  # the name the backends serve it under
    backends: tuple[str, ...]
    weight: float = 0.0  # relative share of the model's traffic; 0 for a shadow
    shadow: float = 0.0  # share of requests copied to it (0-1); its answer is never returned


@dataclass(slots=True)
class RouteContext:
    """What one request asks of the deployment router, and what the router chose (filled in by it).

    Lives in the `ROUTE` context variable for the request's task: the HTTP layer and the pipeline
    set `sticky` and `forced`; the router sets the rest, so the audit row and the response can say
    which deployment answered."""

    sticky: str | None = None  # a stable id (API key, `user`): one id always gets one variant
    forced: str | None = None  # a deployment name an admin forced with `x-gateway-deployment`
    deployment: str | None = None
    backend_model: str | None = None
    backend: str | None = None
    shadows: tuple[str, ...] = ()  # shadow deployments chosen for this request (copies, never answers)
    used: bool = False


ROUTE: ContextVar[RouteContext | None] = ContextVar("deployment_route", default=None)


def begin_route(sticky: str | None = None, forced: str | None = None) -> RouteContext:
    """A fresh route context for the request running now (replaces any earlier one in this task)."""
    context = RouteContext(sticky=sticky, forced=forced)
    ROUTE.set(context)
    return context


def _current_route() -> RouteContext:
    context = ROUTE.get()
    if context is None or context.used:  # none set, or left over from an earlier request in this task
        context = begin_route(None if context is None else context.sticky)
    context.used = True
    return context


def stable_fraction(*parts: str) -> float:
    """A number in [0, 1) that depends only on `parts`: the same user lands on the same variant."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class UnknownDeployment(NoBackendForModel):
    """A forced deployment that does not serve the requested model."""

    def __init__(self, model: str, name: str, known: list[str]) -> None:
        super().__init__(model)
        self.message = (
            f"deployment {name!r} does not serve model `{model}` (its deployments: {', '.join(known) or 'none'})"
        )
        self.deployment = name


class _Model:
    """The deployments of one client-facing model, with cumulative weights for a weighted pick."""

    __slots__ = ("by_name", "cumulative", "primaries", "shadows", "total")

    def __init__(self, entries: list[tuple[Deployment, Backend]]) -> None:
        self.primaries = sorted((e for e in entries if e[0].weight > 0), key=lambda e: -e[0].weight)
        self.shadows = [e for e in entries if e[0].shadow > 0]
        self.by_name = {d.name: (d, b) for d, b in entries}
        self.total = sum(d.weight for d, _ in self.primaries)
        running = 0.0
        cumulative = []
        for d, _ in self.primaries:
            running += d.weight / self.total
            cumulative.append(running)
        self.cumulative = cumulative

    def order(self, u: float) -> list[tuple[Deployment, Backend]]:
        """The primaries for a draw `u` in [0, 1): the one it lands on, then the rest by weight (failover)."""
        index = min(bisect.bisect_right(self.cumulative, u), len(self.primaries) - 1)
        if index == 0:
            return self.primaries
        return [self.primaries[index], *self.primaries[:index], *self.primaries[index + 1 :]]


class DeploymentRouter(Backend):
    """Routes a client model to one of its weighted deployments; copies requests to shadows.

    Each deployment is a `Backend` (a `Router` over its backends), so failover happens inside a
    deployment first; when a whole deployment cannot be reached (or does not serve its backend
    model) the request goes to the model's next deployment. Models that no deployment names go to
    `fallback` (the plain `backend` list), as without deployments. The body the backend sees names
    the deployment's `backend_model`; the client's own body is never changed.

    Shadows: `shadow_targets(context)` names the copies chosen for a request; the gateway sends them
    (`on_shadow`), so the router never waits for them.
    """

    def __init__(
        self,
        deployments: list[tuple[Deployment, Backend]],
        fallback: Backend | None = None,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        grouped: dict[str, list[tuple[Deployment, Backend]]] = {}
        for deployment, backend in deployments:
            grouped.setdefault(deployment.model, []).append((deployment, backend))
        self._models = {model: _Model(entries) for model, entries in grouped.items()}
        self.deployments = [d for d, _ in deployments]
        self._backends = [b for _, b in deployments]
        self.fallback = fallback
        self._rng = rng
        self.sticky = "none"  # "user": a request's `user` field picks its variant; "key": the context's id

    @property
    def name(self) -> str:  # type: ignore[override]
        """The backends that answered the request running now (what its audit row names)."""
        context = ROUTE.get()
        return context.backend if context is not None and context.backend else "deployments"

    # -- choosing ---------------------------------------------------------------------------

    def client_models(self) -> list[str]:
        return list(self._models)

    def plan(
        self, model: object, context: RouteContext, user: object = None
    ) -> list[tuple[Deployment, Backend]] | None:
        """The deployments to try for `model`, in order (None: no deployment names it). Also picks
        the request's shadows into `context.shadows`."""
        entry = self._models.get(model) if isinstance(model, str) else None
        if entry is None:
            return None
        if context.forced is not None:  # an admin's test request: that deployment, no failover, no copies
            chosen = entry.by_name.get(context.forced)
            if chosen is None:
                raise UnknownDeployment(str(model), context.forced, list(entry.by_name))
            return [chosen]
        if entry.shadows:
            draw = self._rng
            context.shadows = tuple(d.name for d, _ in entry.shadows if draw() < d.shadow)
        if not entry.primaries:
            raise NoBackendForModel(str(model))
        sticky = context.sticky
        if sticky is None and self.sticky == "user" and isinstance(user, str):
            sticky = user
        u = stable_fraction(str(model), sticky) if sticky is not None else self._rng()
        return entry.order(u)

    def shadow_targets(self, model: str, context: RouteContext) -> list[tuple[Deployment, Backend]]:
        """The shadow deployments (and their backends) chosen for this request."""
        entry = self._models.get(model)
        if entry is None or not context.shadows:
            return []
        return [entry.by_name[name] for name in context.shadows if name in entry.by_name]

    @staticmethod
    def _body_for(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": deployment.backend_model}

    @staticmethod
    def _chose(context: RouteContext, deployment: Deployment, backend: Backend) -> None:
        context.deployment = deployment.name
        context.backend_model = deployment.backend_model
        context.backend = backend.name

    # -- the Backend seam -------------------------------------------------------------------

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        context = _current_route()
        plan = self.plan(body.get("model"), context, body.get("user"))
        if plan is None:
            return await self._fallback(body).complete(path, body)
        last: ServingError | None = None
        for deployment, backend in plan:
            self._chose(context, deployment, backend)
            try:
                return await backend.complete(path, self._body_for(deployment, body))
            except (BackendUnavailable, NoBackendForModel) as exc:  # the whole deployment is down
                last = exc
        assert last is not None
        raise last

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        context = _current_route()
        plan = self.plan(body.get("model"), context, body.get("user"))
        if plan is None:
            async for batch in self._fallback(body).stream(path, body):
                yield batch
            return
        last: ServingError | None = None
        for deployment, backend in plan:
            self._chose(context, deployment, backend)
            started = False
            try:
                async for batch in backend.stream(path, self._body_for(deployment, body)):
                    started = True
                    yield batch
                return
            except (BackendUnavailable, NoBackendForModel) as exc:
                if started:
                    raise
                last = exc
        assert last is not None
        raise last

    def _fallback(self, body: dict[str, Any]) -> Backend:
        if self.fallback is None:
            raise NoBackendForModel(str(body.get("model")))
        return self.fallback

    async def models(self) -> list[ModelCard]:
        cards = {}
        for model, entry in self._models.items():
            length = None
            for deployment, backend in entry.primaries:
                with contextlib.suppress(ServingError):
                    for card in await backend.models():
                        if card.id == deployment.backend_model and card.max_model_len:
                            length = card.max_model_len if length is None else min(length, card.max_model_len)
            cards[model] = ModelCard(model, "gateway", length)
        if self.fallback is not None:
            with contextlib.suppress(ServingError):
                for card in await self.fallback.models():
                    cards.setdefault(card.id, card)
        return list(cards.values())

    # -- health, start and stop (what `Router` offers, over every deployment) ---------------

    def _routers(self) -> list[Backend]:
        seen: dict[int, Backend] = {}
        for backend in [*self._backends, *([self.fallback] if self.fallback is not None else [])]:
            seen.setdefault(id(backend), backend)
        return list(seen.values())

    @property
    def backends(self) -> list[Backend]:
        out: dict[str, Backend] = {}
        for router in self._routers():
            for backend in router.backends if isinstance(router, Router) else [router]:
                out.setdefault(backend.name, backend)
        return list(out.values())

    def status(self) -> list[tuple[str, bool, int, tuple[str, ...]]]:
        merged: dict[str, tuple[str, bool, int, tuple[str, ...]]] = {}
        for router in self._routers():
            if isinstance(router, Router):
                for name, up, busy, models in router.status():
                    old = merged.get(name)
                    if old is None:
                        merged[name] = (name, up, busy, models)
                    else:
                        merged[name] = (name, old[1] and up, old[2] + busy, tuple(dict.fromkeys(old[3] + models)))
        return list(merged.values())

    async def refresh(self) -> None:
        await asyncio.gather(*(r.refresh() for r in self._routers() if isinstance(r, Router)))

    def start(self) -> None:
        for router in self._routers():
            if isinstance(router, Router):
                router.start()

    async def stop_watching(self) -> None:
        """Stop the health watchers but keep the connections (a reload hands the backends on)."""
        for router in self._routers():
            if isinstance(router, Router):
                await router.stop_watching()

    async def health(self) -> bool:
        return any((await self.health_by_backend()).values())

    async def health_by_backend(self) -> dict[str, bool]:
        results: dict[str, bool] = {}
        for router in self._routers():
            if isinstance(router, Router):
                for name, ok in (await router.health_by_backend()).items():
                    results[name] = results.get(name, False) or ok
            else:
                results[router.name] = await router.health()
        return results

    async def aclose(self) -> None:
        await asyncio.gather(*(r.aclose() for r in self._routers()))
