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
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
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

    async def aclose(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await asyncio.gather(*(s.backend.aclose() for s in self._slots))
