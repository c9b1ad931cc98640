"""The limiter's pipelined RESP client (gateway/resp.py) against the real Redis, and its parser."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.resp import PipelinedRedis, _Protocol, encode, sha1
from tests.gateway.test_limits import REDIS_URL, needs_redis


def test_encode() -> None:
    assert encode("SET", b"k", "v\r\n") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"


def test_replies_split_across_reads_go_to_their_callers_in_order() -> None:
    async def run() -> None:
        protocol = _Protocol()
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in range(5)]
        protocol.waiters.extend(waiters)
        stream = b"$5\r\nhello\r\n:42\r\n+OK\r\n$-1\r\n-ERR boom\r\n"
        for i in range(0, len(stream), 3):  # three bytes at a time
            protocol.data_received(stream[i : i + 3])
        assert [w.result() for w in waiters[:4]] == [b"hello", 42, b"OK", None]
        with pytest.raises(ResponseError, match="boom"):
            waiters[4].result()
        assert not protocol.waiters and not protocol.buffer

    asyncio.run(run())


@needs_redis
async def test_concurrent_calls_pipeline_on_one_connection_and_get_their_own_replies() -> None:
    client = PipelinedRedis(REDIS_URL)
    prefix = f"test:{uuid.uuid4().hex}:"
    try:
        keys = [f"{prefix}{i}" for i in range(200)]
        assert await asyncio.gather(*(client.call("INCRBY", k, str(i)) for i, k in enumerate(keys))) == list(range(200))
        assert await asyncio.gather(*(client.call("GET", k) for k in keys)) == [str(i).encode() for i in range(200)]
        with pytest.raises(ResponseError):
            await client.call("INCRBY", keys[0], "not-a-number")
        assert await client.call("GET", keys[1]) == b"1"  # the connection is still in step after an error
    finally:
        await client.call("DEL", *keys)
        await client.aclose()


@needs_redis
async def test_evalsha_falls_back_to_eval_for_an_unknown_script() -> None:
    client = PipelinedRedis(REDIS_URL)
    script = f"return ARGV[1] .. '{uuid.uuid4().hex}'"  # a script Redis has never seen
    try:
        with pytest.raises(ResponseError, match="NOSCRIPT"):
            await client.call("EVALSHA", sha1(script), "0", "x")
        reply = await client.evalsha(sha1(script), script, [], ["x"])
        assert isinstance(reply, bytes) and reply.startswith(b"x")
        assert await client.call("EVALSHA", sha1(script), "0", "y") == reply.replace(b"x", b"y", 1)  # cached now
    finally:
        await client.aclose()


async def test_unreachable_redis_raises_a_redis_connection_error_and_reconnects_later() -> None:
    client = PipelinedRedis("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    with pytest.raises(RedisConnectionError):
        await client.call("PING")
    with pytest.raises(RedisConnectionError):  # tried again, not stuck on the first failure
        await client.call("PING")
    await client.aclose()


@needs_redis
def test_works_on_uvloop() -> None:
    """The gateway serves on uvloop, whose transports are no asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def go() -> object:
        client = PipelinedRedis(REDIS_URL)
        try:
            return await client.call("PING")
        finally:
            await client.aclose()

    assert uvloop.run(go()) == b"PONG"
