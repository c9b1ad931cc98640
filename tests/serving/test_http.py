"""The lean HTTP client against raw asyncio servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from serving.httpclient import ConnectError, HTTPPool, ReadTimeout

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
