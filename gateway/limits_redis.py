"""The Redis-backed limiter: counters shared by every gateway replica, one round trip per check.

All of a request's checks (key rpm, tpm reservation, concurrency, day and month quotas, model
rpm and in-flight) run in one Lua script (EVALSHA): Redis runs a script atomically, so two
replicas can never both take the last slot. The script first evaluates every check without
writing, and writes only when all pass, so a refused request costs nothing against the others.

Redis unreachable: `fail="open"` serves the request unchecked (counted, and logged at most
every 10 s); `fail="closed"` answers 503 `limits_unavailable`. After a failure the limiter
skips Redis for one second instead of paying a timeout on every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import LimitsUnavailable
from gateway.limits import (
    FAIL_MODES,
    Admission,
    Clock,
    Limiter,
    ModelLimits,
    _Check,
    _headers,
    _refusal,
    _worst,
)
from gateway.resp import PipelinedRedis, sha1

log = logging.getLogger("gateway.limits")

# Give back what one admission holds: a GCRA token correction (g), a lease (c, m), a quota correction (q).
_RELEASE_FN = """
local function release_op(key, kind, limit, delta, member, now)
  if kind == 'g' then
    if delta ~= 0 then
      local interval = 60000 / limit
      local tat = tonumber(redis.call('GET', key))
      if delta > 0 then
        if tat == nil or tat < now then tat = now end
        tat = tat + delta * interval
      elseif tat ~= nil then
        tat = tat + delta * interval
      end
      if tat ~= nil then
        if tat > now then
          redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil(tat - now) + 1000)
        else
          redis.call('DEL', key)
        end
      end
    end
  elseif kind == 'c' or kind == 'm' then
    redis.call('ZREM', key, member)
  elseif delta ~= 0 and redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end
local function release_all(packed, first_key, now)
  local i = first_key
  for kind, limit, delta, member in string.gmatch(packed, '(%a):([^:;]+):([^:;]+):([^:;]+)') do
    release_op(KEYS[i], kind, tonumber(limit), tonumber(delta), member, now)
    i = i + 1
  end
end
"""

# KEYS: one per check, then one per queued release operation. ARGV: now_ms, member, lease_ms, the
# checks packed as "kind:limit:cost:aux;..." (one string: far cheaper for the client to send than 4
# arguments each), and the releases this replica queued since its last call ("kind:limit:delta:member;...").
# The releases apply first, so a request's own earlier slot is free for its next one.
# Returns one string "status;ok,remaining,reset_ms,retry_ms;..." with status 1 admitted (state
# written), 0 refused, 2 only the model's in-flight slots are full (the caller may wait).
ACQUIRE = (
    _RELEASE_FN
    + """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local lease = tonumber(ARGV[3])
local specs = {}
for kind, limit, cost, aux in string.gmatch(ARGV[4], '(%a):([^:;]+):([^:;]+):([^:;]+)') do
  specs[#specs + 1] = {kind, tonumber(limit), tonumber(cost), tonumber(aux)}
end
local n = #specs
release_all(ARGV[5], n + 1, now)
local out = {}
local writes = {}
local refused, queued = false, false
for i = 1, n do
  local kind, limit, cost, aux = specs[i][1], specs[i][2], specs[i][3], specs[i][4]
  local key = KEYS[i]
  local ok, remaining, reset, retry = 1, 0, 0, 0
  if kind == 'g' then
    local interval = 60000 / limit
    local tat = tonumber(redis.call('GET', key))
    if tat == nil or tat < now then tat = now end
    local new = tat + cost * interval
    local ahead = new - now
    if ahead > 60001 then  -- 1 ms of slack for float sums, as in process
      ok = 0
      retry = ahead - 60000
      remaining = math.floor((60001 - (tat - now)) / interval)
      reset = tat - now
    else
      remaining = math.floor((60001 - ahead) / interval)
      reset = ahead
      writes[i] = new
    end
  elseif kind == 'c' or kind == 'm' then
    local count = redis.call('ZCARD', key)
    if count >= limit then  -- full: drop expired leases (a crashed replica's) before refusing
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      count = redis.call('ZCARD', key)
    end
    remaining = limit - count - 1
    if count >= limit then ok = 0; retry = 1000 else writes[i] = true end
  else
    local used = tonumber(redis.call('GET', key) or '0')
    remaining = limit - used - cost
    reset = aux
    if used + cost > limit then ok = 0; retry = aux else writes[i] = true end
  end
  if ok == 0 then
    if kind == 'm' then queued = true else refused = true end
  end
  out[i] = string.format('%d,%d,%d,%d', ok, remaining, math.ceil(reset), math.ceil(retry))
end
if refused then return '0;' .. table.concat(out, ';') end
if queued then return '2;' .. table.concat(out, ';') end
for i = 1, n do
  local kind, cost, aux = specs[i][1], specs[i][3], specs[i][4]
  if kind == 'g' then
    redis.call('SET', KEYS[i], string.format('%.17g', writes[i]), 'PX', math.ceil(writes[i] - now) + 1000)
  elseif kind == 'c' or kind == 'm' then
    redis.call('ZADD', KEYS[i], now + lease, member)
    redis.call('PEXPIRE', KEYS[i], math.ceil(lease) + 1000)
  else
    if redis.call('INCRBY', KEYS[i], cost) == cost then  -- new counter: it lasts a day past its period
      redis.call('PEXPIRE', KEYS[i], math.ceil(aux) + 86400000)
    end
  end
end
return '1;' .. table.concat(out, ';')
"""
)


# Releases queued by this replica, sent on their own (when no check came along to carry them).
# KEYS: one per operation. ARGV: now_ms, "kind:limit:delta:member;...".
RELEASE = (
    _RELEASE_FN
    + """
release_all(ARGV[2], 1, tonumber(ARGV[1]))
return 1
"""
)


class RedisLimiter(Limiter):
    """Limits shared by all replicas through one Redis server."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        models: Mapping[str, ModelLimits] | None = None,
        *,
        fail: str = "open",
        clock: Clock = time.time,
        prefix: str = "gw:lim:",
        timeout_s: float = 1.0,
        lease_s: float = 900.0,
        poll_s: float = 0.025,
        retry_after_failure_s: float = 1.0,
        max_connections: int = 16,
        flush_s: float = 0.005,
        client: str = "pipelined",
    ) -> None:
        if fail not in FAIL_MODES:
            raise ValueError(f"limits fail mode must be 'open' or 'closed', not {fail!r}")
        super().__init__(models, clock=clock, lease_s=lease_s)
        self.url = url
        self.fail = fail
        self.prefix = prefix
        self.poll_s = poll_s
        self._pause_s = retry_after_failure_s
        # A burst of requests queues here for one of `max_connections` connections instead of opening
        # hundreds (a semaphore costs far less per call than redis-py's BlockingConnectionPool).
        self._gate = asyncio.Semaphore(max_connections)
        # No socket_timeout: redis-py would wrap every send in asyncio.wait_for (a task per call);
        # one asyncio.timeout around each script call bounds it instead, for a fraction of the cost.
        self._timeout = timeout_s
        self._redis = Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # no client-side retries: a down Redis costs one short timeout
            health_check_interval=0,
        )
        # The hot path: EVALSHA on one pipelined raw-RESP connection shared by concurrent requests
        # (`client="redis-py"` keeps redis-py's script objects, for the benchmark's comparison).
        if client not in ("pipelined", "redis-py"):
            raise ValueError(f"client must be 'pipelined' or 'redis-py', not {client!r}")
        self.client = client
        self._pipe = PipelinedRedis(url, connect_timeout_s=timeout_s)
        self._acquire_sha, self._release_sha = sha1(ACQUIRE), sha1(RELEASE)
        self._acquire_script = self._redis.register_script(ACQUIRE)
        self._release_script = self._redis.register_script(RELEASE)
        self._down_until = 0.0
        self._logged_at = -math.inf
        self._waiting: dict[str, int] = {}
        self.flush_s = flush_s
        self._release_keys: list[str] = []
        self._release_ops: list[str] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self.failures = 0  # Redis calls that failed
        self.unchecked = 0  # requests served without a check (fail-open)
        self.last_error: str | None = None

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self._timeout * 3):
                await self._redis.ping()
                await self._redis.script_load(ACQUIRE)
                await self._redis.script_load(RELEASE)
            state = "reachable"
        except (RedisError, TimeoutError) as exc:
            self._failed(exc)
            state = f"NOT reachable ({exc})"
        log.warning(
            "limits: counters in Redis at %s (%s); when Redis is unreachable the gateway fails %s%s",
            self._safe_url(),
            state,
            self.fail,
            " (serves unchecked requests)" if self.fail == "open" else " (answers 503 limits_unavailable)",
        )

    async def aclose(self) -> None:
        await self.drain()
        await self._pipe.aclose()
        await self._redis.aclose()

    async def _eval(self, acquire: bool, keys: list[str], args: list[str]) -> Any:
        """One script call, bounded by the timeout. A timed-out connection is dropped (its reply may
        never come, and later replies must not be matched to the wrong caller)."""
        try:
            async with asyncio.timeout(self._timeout):
                if self.client == "redis-py":
                    async with self._gate:
                        script = self._acquire_script if acquire else self._release_script
                        return await script(keys=keys, args=args)
                if acquire:
                    return await self._pipe.evalsha(self._acquire_sha, ACQUIRE, keys, args)
                return await self._pipe.evalsha(self._release_sha, RELEASE, keys, args)
        except TimeoutError:
            self._pipe.reset()
            raise

    def describe(self) -> dict[str, Any]:
        ok = time.monotonic() >= self._down_until
        return {
            "backend": self.kind,
            "url": self._safe_url(),
            "ok": ok,
            "fail_mode": self.fail,
            "failures": self.failures,
            "unchecked": self.unchecked,
            "refused": self.refused,
            "last_error": self.last_error,
            "models": sorted(self.models),
        }

    def _safe_url(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._down_until = time.monotonic() + self._pause_s
        if time.monotonic() - self._logged_at >= 10:
            self._logged_at = time.monotonic()
            log.error("limits: Redis at %s failed (%s); failing %s", self._safe_url(), self.last_error, self.fail)

    def _unavailable(self, exc: Exception | None) -> Admission:
        if exc is not None:
            self._failed(exc)
        if self.fail == "closed":
            raise LimitsUnavailable(
                "Rate limits cannot be checked right now (the limit store is unreachable); try again shortly.",
                headers={"retry-after": "1"},
            )
        self.unchecked += 1
        return Admission(id="unchecked", degraded=True, released=True)

    async def _acquire(
        self, key_id: str, model: str | None, checks: list[_Check], reserved: int, now_ms: float
    ) -> Admission:
        if time.monotonic() < self._down_until:
            return self._unavailable(None)
        member = self._new_id()
        keys = [self.prefix + c.key for c in checks]
        packed = ";".join(f"{c.kind}:{c.limit}:{c.cost}:{c.aux:.0f}" for c in checks)
        release_keys, release_ops = self._take_releases()
        args: list[str] = [f"{now_ms:.3f}", member, f"{self.lease_ms:.0f}", packed, ";".join(release_ops)]
        keys += release_keys
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        try:
            while True:
                try:
                    result = await self._eval(True, keys, args)
                except (RedisError, TimeoutError) as exc:
                    return self._unavailable(exc)
                status_text, *parts = result.split(b";")
                states = []
                failures = []
                for check, part in zip(checks, parts, strict=True):
                    ok, remaining, reset, retry = part.split(b",")
                    states.append((int(remaining), float(reset)))
                    if ok == b"0" and check.kind != "m":
                        failures.append((float(retry), check))
                headers = _headers(checks, states)
                status = int(status_text)
                if status == 1:
                    undo = tuple(c for c in checks if c.kind != "g" or c.what == "tpm")
                    return Admission(id=member, reserved=reserved, headers=headers, undo=undo)
                if status == 0:
                    retry, check = _worst(failures)
                    raise _refusal(check, retry, headers, key_id, model)
                # Only the model's in-flight slots are full: wait in this replica's bounded queue.
                assert model is not None
                flight = next(c for c in checks if c.kind == "m")
                caps = self.models[model]
                if deadline is None:
                    if self._waiting.get(model, 0) >= caps.max_queue or caps.queue_timeout <= 0:
                        raise _refusal(flight, 1000, headers, key_id, model, f"the queue of {caps.max_queue} is full")
                    self._waiting[model] = self._waiting.get(model, 0) + 1
                    deadline = loop.time() + caps.queue_timeout
                if loop.time() >= deadline:
                    raise _refusal(flight, 1000, headers, key_id, model, f"waited {caps.queue_timeout:g} s")
                await asyncio.sleep(min(self.poll_s, max(0.0, deadline - loop.time())))
                args[0] = f"{self.clock() * 1000:.3f}"
                del keys[len(checks) :]  # the releases went with the first try
                args[4] = ""
        finally:
            if deadline is not None and model is not None:
                self._waiting[model] -= 1

    # Releases are queued and ride on this replica's next check (one round trip per request in
    # steady state); a timer sends what is left after `flush_s` when no check comes along.

    async def _release(self, admission: Admission, token_delta: int, now_ms: float) -> None:
        self._queue(admission, token_delta)

    def release_soon(self, admission: Admission, actual_tokens: int) -> None:
        if not admission.released:
            admission.released = True
            self._queue(admission, actual_tokens - admission.reserved)

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        self.release_soon(admission, actual_tokens)

    def _queue(self, admission: Admission, token_delta: int) -> None:
        if admission.degraded or not admission.undo:
            return
        for check in admission.undo:
            self._release_keys.append(self.prefix + check.key)
            self._release_ops.append(f"{check.kind}:{check.limit}:{token_delta}:{admission.id}")
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_soon)

    def _take_releases(self) -> tuple[list[str], list[str]]:
        keys, ops = self._release_keys, self._release_ops
        if keys:
            self._release_keys, self._release_ops = [], []
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        return keys, ops

    def _flush_soon(self) -> None:
        self._flush_timer = None
        task = asyncio.ensure_future(self.flush())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Send the queued releases now."""
        keys, ops = self._take_releases()
        if not keys:
            return
        try:
            await self._eval(False, keys, [f"{self.clock() * 1000:.3f}", ";".join(ops)])
        except (RedisError, TimeoutError) as exc:
            # Leases expire on their own; a lost token correction only errs by those requests' tokens.
            self._failed(exc)

    async def drain(self) -> None:
        await self.flush()
        await super().drain()
