"""The lean HTTP client against raw asyncio servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from serving.errors import BackendBadAnswer, BackendUnavailable
from serving.httpclient import BodyTooLarge, ConnectError, DeadlineExceeded, HTTPPool, PoolTimeout, ReadTimeout
from serving.vllm import VLLMBackend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A raw asyncio server whose handler connections are always closed and awaited."""

    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task[None]]) -> None:
        self._server = server
        self._tasks = tasks

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        await self._server.wait_closed()


async def serve(handler: Handler) -> tuple[RawServer, str]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return RawServer(server, tasks), f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


async def test_stale_keep_alive_connection_is_retried_on_a_fresh_one() -> None:
    connections = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request as keep-alive, then closes: as a server whose idle timeout fired.
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(ok(b'{"n": %d}' % connections))
        await writer.drain()
        writer.close()

    server, url = await serve(one_shot)
    pool = HTTPPool(url)
    try:
        for expected in (1, 2, 3):
            resp = await pool.request("POST", "/x", b"{}")
            assert await resp.read() == b'{"n": %d}' % expected
            await asyncio.sleep(0.05)  # let the close arrive (or not) before the next request
        assert connections == 3
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_keep_alive_reuses_one_connection_and_sends_the_body() -> None:
    connections = 0
    seen: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append(request)
            writer.write(ok(request.split(b"\r\n\r\n", 1)[1]))
            await writer.drain()

    server, url = await serve(echo)
    pool = HTTPPool(url + "/base")
    try:
        for i in range(5):
            resp = await pool.request("POST", "/v1/x", b'{"i": %d}' % i, {"authorization": "Bearer k"})
            assert resp.status == 200 and await resp.read() == b'{"i": %d}' % i
        assert connections == 1
        assert seen[0].startswith(b"POST /base/v1/x HTTP/1.1\r\n") and b"authorization: Bearer k" in seen[0]
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_chunked_body_arrives_incrementally() -> None:
    release = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    server, url = await serve(chunked)
    pool = HTTPPool(url)
    try:
        resp = await pool.request("GET", "/s")
        chunks = resp.iter_chunks()
        assert await anext(chunks) == b"first"  # before the rest was even sent
        release.set()
        assert [c async for c in chunks] == [b"second"]
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_read_timeout_and_connect_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns once the client gives up and closes

    server, url = await serve(silent)
    pool = HTTPPool(url, read_timeout=0.2)
    try:
        with pytest.raises(ReadTimeout):
            await pool.request("GET", "/slow")
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    await server.wait_closed()
    closed = HTTPPool(url, connect_timeout=1)
    with pytest.raises(ConnectError):
        await closed.request("GET", "/")


async def test_abandoning_a_stream_closes_the_connection() -> None:
    saw_eof = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ntick\r\n")
        await writer.drain()
        if await reader.read() == b"":  # returns only when the client closes its side
            saw_eof.set()

    server, url = await serve(endless)
    pool = HTTPPool(url)
    try:
        resp = await pool.request("GET", "/stream")
        stream: AsyncIterator[bytes] = resp.iter_chunks()
        assert await anext(stream) == b"tick"
        resp.close()  # the consumer walks away mid-body
        await asyncio.wait_for(saw_eof.wait(), 3)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_body_over_the_cap_raises_and_drops_the_connection() -> None:
    dropped = asyncio.Event()

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        if await reader.read() == b"":  # the client hung up instead of reading the rest
            dropped.set()

    server, url = await serve(big)
    pool = HTTPPool(url)
    try:
        resp = await pool.request("GET", "/big")
        with pytest.raises(BodyTooLarge):
            await resp.read(max_bytes=10_000)
        await asyncio.wait_for(dropped.wait(), 3)
        assert pool._idle == []
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_deadline_stops_a_backend_that_trickles_faster_than_the_idle_timeout() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:  # one byte every 20 ms, for ever
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)

    server, url = await serve(trickle)
    pool = HTTPPool(url, read_timeout=5.0)
    loop = asyncio.get_running_loop()
    try:
        resp = await pool.request("GET", "/slow", deadline=loop.time() + 0.3)
        received = b""
        with pytest.raises(DeadlineExceeded):
            async for chunk in resp.iter_chunks():
                received += chunk
        assert received.startswith(b"x")  # it was answering, just never finishing
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


# --- the SSE parser of the vLLM backend, fed chunk by chunk ------------------------------------


class _ChunkedResponse:
    """Stands in for `Response`: a 200 whose body arrives in the given chunks."""

    status = 200
    headers = ()

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self.closed = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def read(self, max_bytes: int | None = None) -> bytes:
        return b"".join(self._chunks)

    def close(self) -> None:
        self.closed = True


async def parse(chunks: list[bytes], **options: Any) -> list[bytes]:
    """The event payloads `VLLMBackend.stream` yields for a body arriving in these chunks."""
    backend = VLLMBackend("http://backend.invalid", **options)
    response = _ChunkedResponse(chunks)

    async def request(*args: object, **kwargs: object) -> _ChunkedResponse:
        return response

    backend._pool.request = request  # type: ignore[assignment,method-assign]
    events = [payload async for batch in backend.stream("/v1/chat/completions", {}) for payload in batch]
    assert response.closed
    return events


_SSE = b'data: {"a": 1}\n\ndata: {"b": "x\\ny"}\n\n: a comment\n\ndata:{"c": 3}\n\ndata: [DONE]\n\n'
_SSE_EVENTS = [b'{"a": 1}', b'{"b": "x\\ny"}', b'{"c": 3}']


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
@hypothesis.given(cuts=st.lists(st.integers(min_value=1, max_value=len(_SSE) - 1), unique=True, max_size=12))
def test_sse_events_are_the_same_however_the_body_is_chunked(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(_SSE)]
    chunks = [_SSE[a:b] for a, b in itertools.pairwise(bounds)]
    assert asyncio.run(parse(chunks)) == _SSE_EVENTS


async def test_one_huge_event_in_small_chunks_is_parsed_in_linear_time() -> None:
    # 16 MiB in 4 KiB chunks: re-joining and re-scanning the whole buffer on every chunk (the
    # old parser) copies and scans ~32 GiB here and takes minutes; scanning only the new bytes
    # takes a fraction of a second.
    text = b"y" * (16 * 1024 * 1024)
    body = b'data: {"t": "' + text + b'"}\n\ndata: [DONE]\n\n'
    chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    [event] = await parse(chunks, max_answer_bytes=len(body))
    assert len(event) == len(text) + 9


async def test_stream_without_done_or_over_the_cap_is_a_bad_answer() -> None:
    with pytest.raises(BackendBadAnswer) as cut:
        await parse([b'data: {"a": 1}\n\n'])
    assert cut.value.code == "backend_stream_truncated"
    assert await parse([b'data: {"a": 1}\n\ndata: [DONE]']) == [b'{"a": 1}']  # a last event without its blank line
    with pytest.raises(BackendBadAnswer) as big:
        await parse([b"data: " + b"z" * 2000 + b"\n\n", b"data: [DONE]\n\n"], max_answer_bytes=1024)
    assert big.value.code == "backend_answer_too_large"


async def test_connections_are_capped_and_the_rest_wait_for_one() -> None:
    """N+5 concurrent slow requests open at most N connections (counted where the server accepts them)."""
    cap = 4
    accepted = 0
    busy = 0
    most_busy = 0
    release = asyncio.Event()
    all_busy = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted, busy, most_busy
        accepted += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            busy += 1
            most_busy = max(most_busy, busy)
            if busy == cap:
                all_busy.set()
            await release.wait()
            busy -= 1
            writer.write(ok(b"done"))
            await writer.drain()

    server, url = await serve(handler)
    pool = HTTPPool(url, max_connections=cap, connect_timeout=30)

    async def one() -> bytes:
        response = await pool.request("POST", "/slow", b"{}")
        return await response.read()

    tasks = [asyncio.create_task(one()) for _ in range(cap + 5)]
    await all_busy.wait()  # every connection the pool may open is now held by a slow request
    for _ in range(5):
        await asyncio.sleep(0)
    assert pool.open_connections == cap
    release.set()
    assert await asyncio.gather(*tasks) == [b"done"] * (cap + 5)
    assert accepted == cap
    assert pool.open_connections == cap  # kept alive for the next requests
    await pool.close()
    assert pool.open_connections == 0
    server.close()
    await server.wait_closed()


async def test_a_full_pool_waits_at_most_the_connect_timeout() -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await release.wait()
        writer.write(ok(b"late"))
        await writer.drain()

    server, url = await serve(handler)
    pool = HTTPPool(url, max_connections=1, connect_timeout=0.2)
    first = asyncio.create_task(pool.request("POST", "/slow", b"{}"))
    await arrived.wait()
    with pytest.raises(PoolTimeout):
        await pool.request("POST", "/slow", b"{}")
    assert isinstance(PoolTimeout("x"), ConnectError)  # the backend reports it as unavailable
    release.set()
    assert await (await first).read() == b"late"
    assert await (await pool.request("POST", "/slow", b"{}")).read() == b"late"
    assert pool.open_connections == 1
    await pool.close()
    server.close()
    await server.wait_closed()


async def test_backend_reports_a_full_pool_as_unavailable() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(ok(b"{}"))
        await writer.drain()

    server, url = await serve(handler)
    backend = VLLMBackend(url, max_connections=1, connect_timeout=0.2)
    first = asyncio.create_task(backend.complete("/v1/completions", {}))
    await asyncio.sleep(0.05)
    with pytest.raises(BackendUnavailable):
        await backend.complete("/v1/completions", {})
    release.set()
    assert await first == {}
    await backend.aclose()
    server.close()
    await server.wait_closed()
