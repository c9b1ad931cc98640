"""Rate limits, concurrency limits and token quotas, per API key and per model.

One seam, `Limiter`: `acquire(key, model, prompt_tokens) -> Admission` before the backend is
called, `release(admission, actual_tokens)` when the request ends (in a `finally`, so a client
that disconnects or a backend that fails gives its slot back). Two implementations behave the
same (one contract test suite runs over both):

  InProcessLimiter  counters in this process: the single-machine default
  RedisLimiter      counters in Redis, every check in one Lua script (one round trip, atomic,
                    so N replicas enforce one limit exactly); fail-open or fail-closed when
                    Redis cannot be reached

Algorithms. Requests and tokens per minute use GCRA (the generic cell rate algorithm): one
stored "theoretical arrival time" per limit, exact, with no window-boundary double burst; from
idle a burst of the whole per-minute limit passes, then the limit refills evenly. Concurrency
is a set of leases (one entry per request in flight, dropped on release, expiring after
`lease_s` so a crashed replica cannot leak slots). Day and month quotas are counters keyed by
the UTC calendar day and month, so they reset at the boundary. Tokens are reserved from an
estimate of the prompt at admission and corrected to what the backend reported at release.

When neither the key nor the model has a limit, `acquire` returns `UNLIMITED` without touching
any state (no Redis round trip).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.errors import LimitsUnavailable, RateLimited

if TYPE_CHECKING:
    from gateway.auth import KeyInfo

log = logging.getLogger("gateway.limits")

PERIOD_MS = 60_000.0  # rpm and tpm are per minute
_EPS = 1.0  # ms of slack in GCRA comparisons: sums of 60000/7 in floats may exceed 60000 by a hair
FAIL_MODES = ("open", "closed")


# -- limit definitions -----------------------------------------------------------------------


def parse_limit(name: str, value: Any) -> int | None:
    """A limit from the CLI or a file: a whole number >= 0; 0 (or None) means no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be a whole number of 0 or more (0: no limit), not {value!r}")
    try:
        number = int(value) if not isinstance(value, str) else int(value.strip())
    except ValueError:
        raise ValueError(f"{name} must be a whole number of 0 or more (0: no limit), not {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be a whole number of 0 or more (0: no limit), not {value!r}")
    return number or None


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """One API key's limits; None means no limit. Stored in the `api_keys` table."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @classmethod
    def parse(cls, **values: Any) -> KeyLimits:
        """Validated limits; raises ValueError naming the bad value."""
        return cls(**{name: parse_limit(name, value) for name, value in values.items()})

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def columns(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        parts = [f"{f.name.replace('_', '-')}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)]
        return " ".join(parts) or "no limits"


LIMIT_COLUMNS = tuple(f.name for f in fields(KeyLimits))


def key_limits_from_row(row: Any) -> KeyLimits | None:
    """KeyLimits from a row holding the limit columns; None when the key has none."""
    limits = KeyLimits(**{name: getattr(row, name, None) or None for name in LIMIT_COLUMNS})
    return limits if limits.active else None


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Limits protecting one backend model: requests in flight (with a bounded queue) and per minute."""

    max_in_flight: int | None = None
    rpm: int | None = None
    queue_timeout: float = 10.0  # seconds a request waits for an in-flight slot before 429
    max_queue: int = 100  # requests waiting per model and replica; more are refused at once


def parse_model_limits(entries: Iterable[str]) -> dict[str, ModelLimits]:
    """`MODEL:FIELD=VALUE` entries (settings `model_limits`) -> {model: ModelLimits}; ValueError on bad input."""
    collected: dict[str, dict[str, Any]] = {}
    names = {f.name for f in fields(ModelLimits)}
    for entry in entries:
        model, sep, assignment = entry.rpartition(":")
        name, eq, raw = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not eq or not model.strip():
            raise ValueError(f"model limit {entry!r} must look like MODEL:FIELD=VALUE (e.g. my-model:rpm=600)")
        if name not in names:
            raise ValueError(f"model limit {entry!r}: unknown field {name!r}; choose from {', '.join(sorted(names))}")
        if name == "queue_timeout":
            try:
                value: Any = float(raw)
            except ValueError:
                raise ValueError(f"model limit {entry!r}: queue_timeout must be seconds, not {raw!r}") from None
            if not 0 <= value <= 3600:
                raise ValueError(f"model limit {entry!r}: queue_timeout {raw!r} is outside 0-3600 seconds")
        else:
            try:
                value = parse_limit(name, raw)
            except ValueError as exc:
                raise ValueError(f"model limit {entry!r}: {exc}") from None
            if name == "max_queue":
                value = value or 0
        collected.setdefault(model.strip(), {})[name] = value
    return {model: ModelLimits(**values) for model, values in collected.items()}


def model_limit_entries(table: Mapping[str, Any]) -> tuple[str, ...]:
    """A TOML table `{model: {field: value}}` -> `MODEL:FIELD=VALUE` entries."""
    entries = []
    for model, values in table.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"model_limits.{model} must be a table of limits, not {values!r}")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"model_limits.{model}.{name} must be a number, not {value!r}")
            entries.append(f"{model}:{name}={value}")
    return tuple(entries)


# -- admissions ------------------------------------------------------------------------------


class _Check:
    """One limit evaluated at admission. kind: g (GCRA per minute), c (concurrency lease),
    q (quota counter), m (model in-flight lease; full means "wait", not "refuse").

    A plain slotted class: one is built per limit per request, and this is the cheapest to build."""

    __slots__ = ("aux", "cost", "key", "kind", "limit", "what")

    def __init__(self, kind: str, key: str, limit: int, cost: int = 1, aux: float = 0.0, what: str = "") -> None:
        self.kind = kind
        self.key = key
        self.limit = limit
        self.cost = cost
        self.aux = aux  # quotas: ms until the counter's period ends
        self.what = what  # rpm, tpm, max_concurrent, tokens_per_day, tokens_per_month, model_rpm, model_in_flight

    def __repr__(self) -> str:
        return f"_Check({self.kind!r}, {self.key!r}, {self.limit}, {self.cost}, {self.aux}, {self.what!r})"


@dataclass(slots=True, eq=False)
class Admission:
    """A request let through; hand it back to `release` when the request ends."""

    id: str
    reserved: int = 0  # tokens reserved for tpm and the quotas
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the answer
    undo: tuple[_Check, ...] = ()  # what release gives back or corrects
    model: str | None = None  # holds an in-process model slot
    degraded: bool = False  # fail-open: Redis was down, nothing was checked
    released: bool = False

    @property
    def holds_slot(self) -> bool:
        """Whether it holds a concurrency or in-flight slot (which the next request may be waiting for)."""
        return self.model is not None or any(c.kind in ("c", "m") for c in self.undo)


UNLIMITED = Admission(id="unlimited", released=True)  # shared; releasing it does nothing


def estimate_tokens(body_bytes: int) -> int:
    """A cheap, generous prompt estimate: about four bytes of request JSON per token."""
    return body_bytes // 4 + 1


def tokens_used(admission: Admission, usage: Mapping[str, Any] | None, answer: str | None, reached: bool) -> int:
    """What a finished request cost: the backend's usage, else an estimate, else nothing."""
    if usage:
        total = usage.get("total_tokens")
        if isinstance(total, int) and total >= 0:
            return total
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return prompt + completion
    if not reached:
        return 0  # refused before the backend: the reservation is given back
    return admission.reserved + (len(answer) // 4 if answer else 0)


def _duration(ms: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s."""
    if ms < 1000:
        return f"{max(0, math.ceil(ms))}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


def _model_checks(model: str, caps: Any) -> list[_Check]:
    """The checks a model's own caps add (requests per minute; the in-flight slot, already held)."""
    checks = []
    if caps.rpm:
        checks.append(_Check("g", f"m:{model}:rpm", caps.rpm, what="model_rpm"))
    if caps.max_in_flight:
        checks.append(_Check("m", f"m:{model}:flight", caps.max_in_flight, what="model_in_flight"))
    return checks


def _headers(checks: list[_Check], states: list[tuple[int, float]]) -> dict[str, str]:
    """x-ratelimit-* from the key's rpm (else the model's) and the key's tpm."""
    headers: dict[str, str] = {}
    picked: dict[str, tuple[_Check, tuple[int, float]]] = {}
    for check, state in zip(checks, states, strict=True):
        if check.what in ("rpm", "tpm") or (check.what == "model_rpm" and "rpm" not in picked):
            picked["rpm" if check.what == "model_rpm" else check.what] = (check, state)
    for what, suffix in (("rpm", "requests"), ("tpm", "tokens")):
        if what in picked:
            check, (remaining, reset_ms) = picked[what]
            headers[f"x-ratelimit-limit-{suffix}"] = str(check.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{suffix}"] = _duration(reset_ms)
    return headers


_MESSAGES = {
    "rpm": "Rate limit reached for requests on key {key}: limit {limit} requests per minute.",
    "tpm": "Rate limit reached for tokens on key {key}: limit {limit} tokens per minute, requested {cost}.",
    "max_concurrent": "Too many concurrent requests on key {key}: limit {limit} in flight.",
    "tokens_per_day": "You exceeded the daily token quota of key {key} ({limit} tokens per day, UTC).",
    "tokens_per_month": "You exceeded the monthly token quota of key {key} ({limit} tokens per month, UTC).",
    "model_rpm": "Rate limit reached for requests to model {model}: limit {limit} requests per minute.",
    "model_in_flight": "Model {model} is at its limit of {limit} requests in flight; {detail}.",
}


def _refusal(
    check: _Check, retry_ms: float, headers: dict[str, str], key_id: str, model: str | None, detail: str = ""
) -> RateLimited:
    quota = check.what.startswith("tokens_per")
    message = _MESSAGES[check.what].format(key=key_id, model=model, limit=check.limit, cost=check.cost, detail=detail)
    if check.kind == "g" and check.cost > check.limit:
        message += " This request alone is larger than the limit."
        retry_ms = PERIOD_MS
    retry_s = max(1, math.ceil(retry_ms / 1000))
    return RateLimited(
        message + f" Retry after {retry_s} s.",
        type="tokens" if check.what in ("tpm", "tokens_per_day", "tokens_per_month") else "requests",
        code="insufficient_quota" if quota else "rate_limit_exceeded",
        headers={**headers, "retry-after": str(retry_s), "retry-after-ms": str(max(0, math.ceil(retry_ms)))},
    )


def _worst(failures: list[tuple[float, _Check]]) -> tuple[float, _Check]:
    """The refusal to report: a spent quota first (retrying sooner is pointless), else the longest wait."""
    quotas = [f for f in failures if f[1].kind == "q"]
    return max(quotas or failures, key=lambda f: f[0])


# -- the seam --------------------------------------------------------------------------------

Clock = Callable[[], float]  # seconds since the epoch (time.time); tests inject their own


class Limiter(ABC):
    """Admits or refuses requests against key and model limits."""

    kind = "none"

    def __init__(
        self,
        models: Mapping[str, ModelLimits] | None = None,
        *,
        clock: Clock = time.time,
        lease_s: float = 900.0,
    ) -> None:
        self.models = dict(models or {})
        self.clock = clock
        self.lease_ms = lease_s * 1000
        self.refused = 0
        self._pending: set[asyncio.Future[None]] = set()
        self._periods: tuple[int, tuple[str, float, str, float]] | None = None
        self._ids = itertools.count()
        self._instance = secrets.token_hex(4)  # admission ids are unique across replicas

    def _new_id(self) -> str:
        return f"{self._instance}{next(self._ids):x}"

    async def start(self) -> None:
        """Connect and announce (a no-op in process)."""
        return None

    async def aclose(self) -> None:
        """Release connections."""
        return None

    def describe(self) -> dict[str, Any]:
        """For /readyz: which implementation and how it is doing."""
        return {"backend": self.kind, "ok": True, "refused": self.refused, "models": sorted(self.models)}

    def _plan(self, key: KeyInfo, model: str | None, tokens: int, now_ms: float) -> tuple[list[_Check], int]:
        """The checks one request must pass, and the tokens it reserves."""
        checks: list[_Check] = []
        reserved = 0
        limits = key.limits
        if limits is not None:
            prefix = f"k:{key.id}:"
            if limits.rpm:
                checks.append(_Check("g", prefix + "rpm", limits.rpm, what="rpm"))
            if limits.tpm or limits.tokens_per_day or limits.tokens_per_month:
                reserved = max(1, tokens)
            if limits.tpm:
                checks.append(_Check("g", prefix + "tpm", limits.tpm, reserved, what="tpm"))
            if limits.max_concurrent:
                checks.append(_Check("c", prefix + "conc", limits.max_concurrent, what="max_concurrent"))
            if limits.tokens_per_day or limits.tokens_per_month:
                day, day_end, month, month_end = self._period(now_ms)
                if limits.tokens_per_day:
                    checks.append(
                        _Check("q", f"{prefix}day:{day}", limits.tokens_per_day, reserved, day_end - now_ms,
                               "tokens_per_day")
                    )  # fmt: skip
                if limits.tokens_per_month:
                    checks.append(
                        _Check("q", f"{prefix}mon:{month}", limits.tokens_per_month, reserved, month_end - now_ms,
                               "tokens_per_month")
                    )  # fmt: skip
        caps = self.models.get(model) if model is not None else None
        if caps is not None:
            checks.extend(_model_checks(str(model), caps))
        return checks, reserved

    def _period(self, now_ms: float) -> tuple[str, float, str, float]:
        """(day tag, day end ms, month tag, month end ms) in UTC, computed once a day."""
        day_number = int(now_ms // 86_400_000)
        cached = self._periods
        if cached is None or cached[0] != day_number:
            moment = datetime.fromtimestamp(day_number * 86_400, UTC)
            following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
            cached = self._periods = (
                day_number,
                (moment.strftime("%Y%m%d"), (day_number + 1) * 86_400_000.0, moment.strftime("%Y%m"),
                 following.timestamp() * 1000),
            )  # fmt: skip
        return cached[1]

    async def acquire(self, key: KeyInfo, model: str | None, prompt_tokens: int) -> Admission:
        """Admit the request or raise RateLimited (429) / LimitsUnavailable (503)."""
        if key.limits is None and (model is None or model not in self.models):
            return UNLIMITED
        now_ms = self.clock() * 1000
        checks, reserved = self._plan(key, model, prompt_tokens, now_ms)
        if not checks:
            return UNLIMITED
        try:
            return await self._acquire(key.id, model, checks, reserved, now_ms)
        except RateLimited:
            self.refused += 1
            raise

    @abstractmethod
    async def _acquire(
        self, key_id: str, model: str | None, checks: list[_Check], reserved: int, now_ms: float
    ) -> Admission: ...

    async def release(self, admission: Admission, actual_tokens: int) -> None:
        """Give back concurrency and model slots; correct the token reservation to `actual_tokens`."""
        if admission.released:
            return
        admission.released = True
        await self._release(admission, actual_tokens - admission.reserved, self.clock() * 1000)

    @abstractmethod
    async def _release(self, admission: Admission, token_delta: int, now_ms: float) -> None: ...

    def release_soon(self, admission: Admission, actual_tokens: int) -> None:
        """`release` without waiting for it: the answer need not wait for a Redis round trip."""
        if admission.released:
            return
        task = asyncio.ensure_future(self.release(admission, actual_tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        """End of a request: wait for the release only when it gives back a slot, so that a client's
        next request finds it free; a token correction alone goes in the background."""
        if admission.holds_slot:
            await asyncio.shield(self.release(admission, actual_tokens))
        else:
            self.release_soon(admission, actual_tokens)

    async def drain(self) -> None:
        """Wait for releases still on their way (tests; shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _gcra(tat: float | None, now: float, limit: int, cost: int) -> tuple[bool, float, float, int, float]:
    """(allowed, new stored time, ms until retry, remaining, ms until reset) for one GCRA limit."""
    interval = PERIOD_MS / limit
    base = now if tat is None or tat < now else tat
    new = base + cost * interval
    ahead = new - now
    if ahead > PERIOD_MS + _EPS:
        return False, base, ahead - PERIOD_MS, math.floor((PERIOD_MS + _EPS - (base - now)) / interval), base - now
    return True, new, 0.0, math.floor((PERIOD_MS + _EPS - ahead) / interval), ahead


class _ModelSlots:
    """In-flight slots of one model in this process, with a bounded FIFO queue."""

    __slots__ = ("in_flight", "waiters")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.in_flight -= 1


class InProcessLimiter(Limiter):
    """Limits kept in this process's memory: exact for one replica, and nearly free."""

    kind = "in-process"

    def __init__(self, models: Mapping[str, ModelLimits] | None = None, **kwargs: Any) -> None:
        super().__init__(models, **kwargs)
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._counters: dict[str, tuple[float, int]] = {}  # key -> (expires at ms, tokens)
        self._slots: dict[str, _ModelSlots] = {}
        self._swept = 0.0

    async def _acquire(
        self, key_id: str, model: str | None, checks: list[_Check], reserved: int, now_ms: float
    ) -> Admission:
        flight = next((c for c in checks if c.kind == "m"), None)
        if flight is not None:
            assert model is not None
            await self._take_slot(key_id, model, flight)
        try:
            admission = self._check(key_id, model, checks, reserved, now_ms)
        except BaseException:
            if flight is not None:
                self._slots[flight.key].release()
            raise
        if flight is not None:
            admission.model = flight.key
        return admission

    async def _take_slot(self, key_id: str, model: str, check: _Check) -> None:
        slots = self._slots.get(check.key)
        if slots is None:
            slots = self._slots[check.key] = _ModelSlots()
        if slots.in_flight < check.limit and not slots.waiters:
            slots.in_flight += 1
            return
        caps = self.models[model]
        if len(slots.waiters) >= caps.max_queue or caps.queue_timeout <= 0:
            raise _refusal(check, 1000, {}, key_id, model, f"the queue of {caps.max_queue} is full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slots.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), caps.queue_timeout)
        except TimeoutError:
            if waiter.done():
                slots.release()  # handed a slot just as the wait ran out: pass it on
            else:
                waiter.cancel()
            raise _refusal(check, 1000, {}, key_id, model, f"waited {caps.queue_timeout:g} s") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                slots.release()
            else:
                waiter.cancel()
            raise

    def _check(self, key_id: str, model: str | None, checks: list[_Check], reserved: int, now_ms: float) -> Admission:
        # No await between reading and writing: the event loop makes this atomic.
        if now_ms - self._swept > 60_000:
            self._sweep(now_ms)
        states: list[tuple[int, float]] = []
        updates: list[tuple[_Check, Any]] = []
        failures: list[tuple[float, _Check]] = []
        for check in checks:
            state, retry, new = self._probe(check, now_ms)
            states.append(state)
            if retry is not None:
                failures.append((retry, check))
            elif check.kind != "m":  # the model slot is already held
                updates.append((check, new))
        headers = _headers(checks, states)
        if failures:
            retry, check = _worst(failures)
            raise _refusal(check, retry, headers, key_id, model)
        admission = Admission(id=self._new_id(), reserved=reserved, headers=headers)
        admission.undo = tuple(check for check, new in updates if self._commit(check, new, admission.id, now_ms))
        return admission

    def _probe(self, check: _Check, now_ms: float) -> tuple[tuple[int, float], float | None, Any]:
        """(remaining and reset for the headers, retry-after ms when refused else None, new GCRA time)."""
        if check.kind == "g":
            allowed, new, retry, remaining, reset = _gcra(self._tat.get(check.key), now_ms, check.limit, check.cost)
            return (remaining, reset), None if allowed else retry, new
        if check.kind == "c":
            leases = self._leases.setdefault(check.key, {})
            for member in [m for m, until in leases.items() if until <= now_ms]:
                del leases[member]
            return (check.limit - len(leases) - 1, 0.0), 1000.0 if len(leases) >= check.limit else None, None
        if check.kind == "q":
            used = self._used(check.key, now_ms)
            over = used + check.cost > check.limit
            return (check.limit - used - check.cost, check.aux), check.aux if over else None, None
        return (0, 0.0), None, None  # the model slot, already held

    def _commit(self, check: _Check, new: Any, admission_id: str, now_ms: float) -> bool:
        """Apply an admitted check; True when releasing the admission must undo it."""
        if check.kind == "g":
            self._tat[check.key] = new
            return check.what == "tpm"
        if check.kind == "c":
            self._leases[check.key][admission_id] = now_ms + self.lease_ms
            return True
        self._counters[check.key] = (now_ms + check.aux, self._used(check.key, now_ms) + check.cost)
        return True

    def _used(self, key: str, now_ms: float) -> int:
        expires, used = self._counters.get(key, (0.0, 0))
        return used if expires > now_ms else 0

    async def _release(self, admission: Admission, token_delta: int, now_ms: float) -> None:
        self.release_now(admission, token_delta, now_ms)

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        self.release_soon(admission, actual_tokens)

    def release_soon(self, admission: Admission, actual_tokens: int) -> None:
        if not admission.released:  # no I/O here: release at once
            admission.released = True
            self.release_now(admission, actual_tokens - admission.reserved, self.clock() * 1000)

    def release_now(self, admission: Admission, token_delta: int, now_ms: float) -> None:
        for check in admission.undo:
            if check.kind == "g" and token_delta:
                tat = self._tat.get(check.key)
                if token_delta > 0:
                    self._tat[check.key] = max(tat or now_ms, now_ms) + token_delta * PERIOD_MS / check.limit
                elif tat is not None:
                    self._tat[check.key] = tat + token_delta * PERIOD_MS / check.limit
            elif check.kind == "c":
                self._leases.get(check.key, {}).pop(admission.id, None)
            elif check.kind == "q" and token_delta:
                expires, used = self._counters.get(check.key, (0.0, 0))
                if expires > now_ms:
                    self._counters[check.key] = (expires, max(0, used + token_delta))
                # else: the period is over; the new one starts clean
        if admission.model is not None:
            self._slots[admission.model].release()

    def _sweep(self, now_ms: float) -> None:
        """Forget state that no longer limits anything, so memory stays bounded."""
        self._swept = now_ms
        self._tat = {k: v for k, v in self._tat.items() if v > now_ms}
        self._counters = {k: v for k, v in self._counters.items() if v[0] > now_ms}
        self._leases = {k: v for k, v in self._leases.items() if v}


async def release_after(
    stream: AsyncIterator[bytes], limiter: Limiter, admission: Admission, used: Callable[[], int]
) -> AsyncIterator[bytes]:
    """Relay a stream, then release its admission (also when the client leaves or the backend fails)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await limiter.finish(admission, used())


def build_limiter(
    redis_url: str | None,
    models: Mapping[str, ModelLimits],
    *,
    fail: str = "open",
    clock: Clock = time.time,
    prefix: str = "gw:lim:",
) -> Limiter:
    """The limiter the settings ask for: Redis-backed when a URL is given, else in process."""
    if redis_url:
        from gateway.limits_redis import RedisLimiter

        return RedisLimiter(redis_url, models, fail=fail, clock=clock, prefix=prefix)
    return InProcessLimiter(models, clock=clock)


__all__ = [
    "UNLIMITED",
    "Admission",
    "InProcessLimiter",
    "KeyLimits",
    "Limiter",
    "LimitsUnavailable",
    "ModelLimits",
    "RateLimited",
    "build_limiter",
    "estimate_tokens",
    "parse_limit",
    "parse_model_limits",
    "release_after",
    "tokens_used",
]
