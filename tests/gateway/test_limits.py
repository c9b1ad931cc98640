"""One contract suite over both limiters (in process, and Redis at 127.0.0.1:6379), with an injected clock.

Redis tests use a unique key prefix each and delete only their own keys; they skip when the
server is not reachable.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from gateway.errors import LimitsUnavailable, RateLimited
from gateway.limits import (
    UNLIMITED,
    InProcessLimiter,
    KeyLimits,
    Limiter,
    ModelLimits,
    parse_limit,
    parse_model_limits,
    tokens_used,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
START = datetime(2026, 11, 28, 23, 59, 0, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Key:
    id: str
    limits: KeyLimits | None = None


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_available(), reason="no Redis server at 127.0.0.1:6379")


async def _drop_prefix(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


MakeLimiter = Callable[..., Limiter]


@pytest_asyncio.fixture(params=["in-process", pytest.param("redis", marks=needs_redis)], loop_scope="function")
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    """A factory of limiters of one kind; Redis ones share one fresh prefix (two of them = two replicas)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    made: list[Limiter] = []

    def factory(models: dict[str, ModelLimits] | None = None, clock: Clock | None = None, **kwargs: object) -> Limiter:
        clock = clock or Clock()
        limiter: Limiter
        if request.param == "redis":
            from gateway.limits_redis import RedisLimiter

            limiter = RedisLimiter(REDIS_URL, models, clock=clock, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        else:
            limiter = InProcessLimiter(models, clock=clock, **kwargs)  # type: ignore[arg-type]
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        await limiter.aclose()
    if request.param == "redis":
        await _drop_prefix(prefix)


async def refused(limiter: Limiter, key: Key, model: str | None = None, tokens: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire(key, model, tokens)  # type: ignore[arg-type]
    return caught.value


async def test_no_limits_costs_nothing(make: MakeLimiter) -> None:
    limiter = make({"limited-model": ModelLimits(rpm=1)})
    for _ in range(100):
        assert await limiter.acquire(Key("k"), "other-model", 10) is UNLIMITED  # type: ignore[arg-type]
        assert await limiter.acquire(Key("k", KeyLimits()), None, 10) is UNLIMITED  # type: ignore[arg-type]


async def test_requests_per_minute(make: MakeLimiter) -> None:
    clock = Clock()
    limiter = make(clock=clock)
    key = Key("app", KeyLimits(rpm=5))
    for expected_remaining in (4, 3, 2, 1, 0):
        admission = await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
        assert admission.headers["x-ratelimit-limit-requests"] == "5"
        assert admission.headers["x-ratelimit-remaining-requests"] == str(expected_remaining)
    error = await refused(limiter, key)
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers["retry-after"] == "12"  # one request refills every 60/5 s
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(11.9)
    await refused(limiter, key)
    clock.advance(0.1)
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
    await refused(limiter, key)
    # Another key has its own budget.
    await limiter.acquire(Key("other", KeyLimits(rpm=5)), "m", 1)  # type: ignore[arg-type]


async def test_limit_that_does_not_divide_a_minute(make: MakeLimiter) -> None:
    limiter = make()
    key = Key("app", KeyLimits(rpm=7))
    for _ in range(7):
        await limiter.acquire(key, None, 1)  # type: ignore[arg-type]
    await refused(limiter, key)


async def test_tokens_per_minute_reserve_then_correct(make: MakeLimiter) -> None:
    clock = Clock()
    limiter = make(clock=clock)
    key = Key("app", KeyLimits(tpm=1000))
    first = await limiter.acquire(key, "m", 400)  # type: ignore[arg-type]
    assert first.headers["x-ratelimit-remaining-tokens"] == "600"
    second = await limiter.acquire(key, "m", 400)  # type: ignore[arg-type]
    error = await refused(limiter, key, tokens=400)
    assert (error.type, error.code) == ("tokens", "rate_limit_exceeded")
    # The first answer was short: 100 tokens in all, so 300 go back.
    await limiter.release(first, 100)
    third = await limiter.acquire(key, "m", 400)  # type: ignore[arg-type]
    assert third.headers["x-ratelimit-remaining-tokens"] == "100"
    # The second was long: 900 tokens, 500 more than reserved, so the next minute starts in debt.
    await limiter.release(second, 900)
    error = await refused(limiter, key, tokens=1)
    assert error.headers["retry-after"] == "25"  # 1400 tokens + 1 in a 1000-per-minute window: 401 over
    clock.advance(60)
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]


async def test_request_larger_than_the_token_limit(make: MakeLimiter) -> None:
    limiter = make()
    error = await refused(limiter, Key("app", KeyLimits(tpm=100)), tokens=101)
    assert "larger than the limit" in error.message
    assert error.headers["retry-after"] == "60"


async def test_concurrency_released(make: MakeLimiter) -> None:
    limiter = make()
    key = Key("app", KeyLimits(max_concurrent=2))
    a = await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
    error = await refused(limiter, key)
    assert "concurrent" in error.message and error.headers["retry-after"] == "1"
    await limiter.release(a, 1)
    await limiter.release(a, 1)  # a second release gives nothing back twice
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
    await refused(limiter, key)


async def test_concurrency_lease_expires(make: MakeLimiter) -> None:
    clock = Clock()
    limiter = make(clock=clock, lease_s=60)
    key = Key("app", KeyLimits(max_concurrent=1))
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]  # never released: its replica died
    await refused(limiter, key)
    clock.advance(61)
    await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]


async def test_refused_request_spends_nothing(make: MakeLimiter) -> None:
    limiter = make()
    key = Key("app", KeyLimits(rpm=3, max_concurrent=1))
    held = await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
    for _ in range(5):
        await refused(limiter, key)  # refused on concurrency: the rpm budget stays untouched
    await limiter.release(held, 1)
    for _ in range(2):
        await limiter.release(await limiter.acquire(key, "m", 1), 1)  # type: ignore[arg-type]
    error = await refused(limiter, key)
    assert "per minute" in error.message


async def test_daily_quota_resets_at_midnight_utc(make: MakeLimiter) -> None:
    clock = Clock()  # 23:59:00 UTC
    limiter = make(clock=clock)
    key = Key("app", KeyLimits(tokens_per_day=100))
    admission = await limiter.acquire(key, "m", 50)  # type: ignore[arg-type]
    await limiter.release(admission, 90)
    error = await refused(limiter, key, tokens=20)
    assert (error.status, error.type, error.code) == (429, "tokens", "insufficient_quota")
    assert error.headers["retry-after"] == "60"  # until 00:00 UTC
    await limiter.acquire(key, "m", 10)  # type: ignore[arg-type]  # exactly what is left
    clock.advance(59)
    await refused(limiter, key, tokens=1)
    clock.advance(1)  # 00:00:00: a new day
    await limiter.acquire(key, "m", 100)  # type: ignore[arg-type]


async def test_monthly_quota(make: MakeLimiter) -> None:
    clock = Clock(datetime(2026, 12, 31, 12, 0, tzinfo=UTC).timestamp())
    limiter = make(clock=clock)
    key = Key("app", KeyLimits(tokens_per_month=100, tokens_per_day=1000))
    await limiter.acquire(key, "m", 100)  # type: ignore[arg-type]
    error = await refused(limiter, key, tokens=1)
    assert error.code == "insufficient_quota" and "month" in error.message
    assert error.headers["retry-after"] == str(12 * 3600)
    clock.advance(12 * 3600)  # 2027-01-01
    await limiter.acquire(key, "m", 100)  # type: ignore[arg-type]


async def test_model_requests_per_minute(make: MakeLimiter) -> None:
    limiter = make({"small": ModelLimits(rpm=2)})
    a, b = Key("a"), Key("b", KeyLimits(rpm=100))
    await limiter.acquire(a, "small", 1)  # type: ignore[arg-type]
    second = await limiter.acquire(b, "small", 1)  # type: ignore[arg-type]
    assert second.headers["x-ratelimit-limit-requests"] == "100"  # the key's own limit is the one shown
    error = await refused(limiter, a, "small")
    assert "model small" in error.message
    assert await limiter.acquire(a, "big", 1) is UNLIMITED  # type: ignore[arg-type]


async def test_model_in_flight_queue(make: MakeLimiter) -> None:
    limiter = make({"small": ModelLimits(max_in_flight=1, queue_timeout=30, max_queue=1)})
    key = Key("a")
    first = await limiter.acquire(key, "small", 1)  # type: ignore[arg-type]
    waiting = asyncio.create_task(limiter.acquire(key, "small", 1))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert not waiting.done()
    error = await refused(limiter, key, "small")  # the queue (1) is full
    assert "queue" in error.message
    await limiter.release(first, 1)
    second = await asyncio.wait_for(waiting, 10)
    await limiter.release(second, 1)
    await limiter.release(await limiter.acquire(key, "small", 1), 1)  # type: ignore[arg-type]


async def test_model_queue_timeout(make: MakeLimiter) -> None:
    limiter = make({"small": ModelLimits(max_in_flight=1, queue_timeout=0.05)})
    await limiter.acquire(Key("a"), "small", 1)  # type: ignore[arg-type]
    error = await refused(limiter, Key("b"), "small")
    assert "in flight" in error.message and "waited" in error.message


async def test_model_slot_given_back_when_the_key_is_refused(make: MakeLimiter) -> None:
    limiter = make({"small": ModelLimits(max_in_flight=1, queue_timeout=0)})
    key = Key("a", KeyLimits(rpm=1))
    await limiter.release(await limiter.acquire(key, "small", 1), 1)  # type: ignore[arg-type]
    await refused(limiter, key, "small")  # over rpm: must not keep the model's only slot
    await limiter.acquire(Key("b"), "small", 1)  # type: ignore[arg-type]


async def test_concurrent_burst_admits_exactly_the_limit(make: MakeLimiter) -> None:
    # Two limiters: for Redis, two replicas sharing one server.
    first = make()
    replicas = [first, first if isinstance(first, InProcessLimiter) else make()]
    key = Key("burst", KeyLimits(rpm=37, max_concurrent=1000))

    async def one(i: int) -> bool:
        try:
            await replicas[i % 2].acquire(key, "m", 1)  # type: ignore[arg-type]
            return True
        except RateLimited:
            return False

    admitted = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(admitted) == 37


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, "-5", 1.5, "abc", True, "2.5"])
def test_bad_limits_are_rejected_naming_the_value(value: object) -> None:
    with pytest.raises(ValueError, match=repr(value).replace("(", r"\(").replace(".", r"\.")):
        parse_limit("rpm", value)


def test_zero_means_no_limit() -> None:
    assert parse_limit("rpm", 0) is None and parse_limit("rpm", "0") is None
    assert parse_limit("rpm", "600") == 600 and parse_limit("rpm", 600.0) == 600
    assert KeyLimits.parse(rpm=0, tpm=None).active is False


def test_model_limit_entries() -> None:
    table = parse_model_limits(["org/model:v1:max_in_flight=4", "org/model:v1:queue_timeout=2.5", "x:rpm=60"])
    assert table["org/model:v1"] == ModelLimits(max_in_flight=4, queue_timeout=2.5)
    assert table["x"].rpm == 60
    for bad, named in (("x:rpm=-3", "-3"), ("x:speed=3", "speed"), ("x", "MODEL:FIELD=VALUE"), ("x:rpm=1.5", "1.5")):
        with pytest.raises(ValueError, match=named):
            parse_model_limits([bad])


def test_tokens_used() -> None:
    from gateway.limits import Admission

    admission = Admission(id="a", reserved=40)
    assert tokens_used(admission, {"total_tokens": 77}, "text", True) == 77
    assert tokens_used(admission, {"prompt_tokens": 7, "completion_tokens": 3}, None, True) == 10
    assert tokens_used(admission, None, "x" * 40, True) == 50  # the reservation plus ~4 characters a token
    assert tokens_used(admission, None, None, False) == 0  # never reached the backend


# -- Redis going away --------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the real Redis that the test can cut, as if Redis died mid-run."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@needs_redis
@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_redis_killed_mid_run(fail: str) -> None:
    from gateway.limits_redis import RedisLimiter

    proxy = Proxy()
    port = await proxy.start()
    prefix = f"test:{uuid.uuid4().hex}:"
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", fail=fail, prefix=prefix, timeout_s=0.5)
    key = Key("app", KeyLimits(rpm=2, max_concurrent=5))
    try:
        await limiter.start()
        admission = await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
        assert not admission.degraded and limiter.describe()["ok"]
        await proxy.kill()
        if fail == "open":
            for _ in range(5):  # served unchecked, over the rpm of 2
                assert (await limiter.acquire(key, "m", 1)).degraded  # type: ignore[arg-type]
            assert limiter.describe()["unchecked"] == 5
        else:
            with pytest.raises(LimitsUnavailable) as caught:
                await limiter.acquire(key, "m", 1)  # type: ignore[arg-type]
            assert (caught.value.status, caught.value.code) == (503, "limits_unavailable")
        await limiter.release(admission, 1)  # must not raise either
        report = limiter.describe()
        assert report["ok"] is False and report["failures"] >= 1 and report["fail_mode"] == fail
        # Unlimited requests never touch Redis, so they pass in both modes.
        assert await limiter.acquire(Key("free"), "m", 1) is UNLIMITED  # type: ignore[arg-type]
    finally:
        await limiter.aclose()
        await _drop_prefix(prefix)


@needs_redis
async def test_redis_not_there_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.limits_redis import RedisLimiter

    limiter = RedisLimiter("redis://127.0.0.1:1/0", fail="closed")
    try:
        await limiter.start()
        assert "NOT reachable" in caplog.text and "fails closed" in caplog.text
        with pytest.raises(LimitsUnavailable):
            await limiter.acquire(Key("app", KeyLimits(rpm=1)), "m", 1)  # type: ignore[arg-type]
    finally:
        await limiter.aclose()


async def test_release_reaches_other_replicas(make: MakeLimiter) -> None:
    first = make()
    other = first if isinstance(first, InProcessLimiter) else make()
    key = Key("app", KeyLimits(max_concurrent=1))
    admission = await first.acquire(key, "m", 1)  # type: ignore[arg-type]
    await refused(other, key)
    await first.finish(admission, 1)  # a Redis replica queues it for its next check, or sends it within flush_s
    await first.drain()
    await other.acquire(key, "m", 1)  # type: ignore[arg-type]


async def test_queued_release_is_sent_without_another_check(make: MakeLimiter) -> None:
    first = make()
    other = first if isinstance(first, InProcessLimiter) else make()
    key = Key("app", KeyLimits(max_concurrent=1))
    await first.finish(await first.acquire(key, "m", 1), 1)  # type: ignore[arg-type]
    for _ in range(200):  # the flush timer sends it; no drain, no further check on `first`
        try:
            await other.acquire(key, "m", 1)  # type: ignore[arg-type]
            return
        except RateLimited:
            await asyncio.sleep(0.01)
    pytest.fail("the release never reached the other replica")
