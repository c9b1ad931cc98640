"""Routing over several backends: pick by model, least in-flight first, fail over on connect errors.

A request fails over to the next backend only when the chosen one could not be reached at all
(nothing was generated, so retrying is safe). A backend that failed that way sits out a short
cool-down before it is tried again. The model map comes from each backend's `/v1/models`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.backend import Backend, ModelCard
from serving.errors import BackendUnavailable, NoBackendForModel, ServingError


class _Slot:
    __slots__ = ("backend", "down_until", "in_flight", "models")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.in_flight = 0
        self.down_until = 0.0
        self.models: list[ModelCard] = []


class Router(Backend):
    """Spreads requests over backends; itself a `Backend`, so the gateway sees one seam."""

    def __init__(self, backends: list[Backend], *, cooldown_s: float = 2.0, refresh_s: float = 30.0) -> None:
        if not backends:
            raise ValueError("the router needs at least one backend")
        self._slots = [_Slot(b) for b in backends]
        self._cooldown_s = cooldown_s
        self._refresh_s = refresh_s
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self.name = ",".join(b.name for b in backends)

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._slots]

    async def refresh(self) -> None:
        """Reload every backend's model list; a backend that cannot answer keeps its old list."""
        async with self._refresh_lock:
            results = await asyncio.gather(*(s.backend.models() for s in self._slots), return_exceptions=True)
            for slot, result in zip(self._slots, results, strict=True):
                if isinstance(result, list):
                    slot.models = result
            self._refreshed_at = time.monotonic()

    def _candidates(self, model: object) -> list[_Slot]:
        now = time.monotonic()
        known = any(s.models for s in self._slots)
        if known and isinstance(model, str):
            slots = [s for s in self._slots if any(m.id == model for m in s.models)]
        else:
            # Without a model map, let the backends judge the model name themselves.
            slots = list(self._slots)
        # Healthy before cooling down, then fewest requests in flight.
        return sorted(slots, key=lambda s: (s.down_until > now, s.in_flight))

    async def _slots_for(self, model: object) -> list[_Slot]:
        slots = self._candidates(model)
        if not slots and time.monotonic() - self._refreshed_at > 1.0:
            await self.refresh()  # a model may have been loaded since the last look
            slots = self._candidates(model)
        if not slots:
            raise NoBackendForModel(str(model))
        return slots

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: ServingError | None = None
        for slot in await self._slots_for(body.get("model")):
            slot.in_flight += 1
            try:
                return await slot.backend.complete(path, body)
            except BackendUnavailable as exc:
                slot.down_until = time.monotonic() + self._cooldown_s
                last = exc
            finally:
                slot.in_flight -= 1
        assert last is not None
        raise last

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        last: ServingError | None = None
        for slot in await self._slots_for(body.get("model")):
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
        results = await asyncio.gather(*(s.backend.health() for s in self._slots))
        return any(results)

    async def health_by_backend(self) -> dict[str, bool]:
        results = await asyncio.gather(*(s.backend.health() for s in self._slots))
        return {s.backend.name: ok for s, ok in zip(self._slots, results, strict=True)}

    async def aclose(self) -> None:
        await asyncio.gather(*(s.backend.aclose() for s in self._slots))
