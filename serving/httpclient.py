"""A lean HTTP/1.1 client for one upstream host: pooled keep-alive connections on asyncio
protocols, responses parsed by httptools (the parser uvicorn uses).

Why not aiohttp or httpx: the gateway makes one upstream call per request, and their generality
costs about 0.3 ms of CPU per call here, a large share of the gateway's whole budget. This
client does only what an OpenAI-compatible backend needs: POST/GET with a body, Content-Length
or chunked responses, incremental body delivery for streams, timeouts, and closing the
connection when the caller abandons a response (which is how vLLM learns to abort).

Two limits protect the caller from a backend that misbehaves: an idle timeout (no byte for that
long) and an optional deadline for the whole exchange (a backend that trickles one byte a second
never trips the idle timeout); `Response.read` also takes a size cap, so a huge answer is cut off
instead of being buffered whole.

Connections per origin are capped (`max_connections`, idle and busy together): a request that
finds every connection busy waits for one, at most the connect timeout, then fails as a
`PoolTimeout` (a `ConnectError`), so a burst of requests cannot open a socket each on the backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

import httptools


class HTTPError(Exception):
    """Transport-level failure: could not connect, connection lost, malformed response."""


class ConnectError(HTTPError):
    """The connection could not be opened."""


class PoolTimeout(ConnectError):
    """Every connection of the pool stayed busy for the whole connect timeout."""


class ReadTimeout(HTTPError):
    """No byte arrived within the read timeout."""


class DeadlineExceeded(ReadTimeout):
    """The response did not finish before the request's deadline."""


class BodyTooLarge(HTTPError):
    """The response body is larger than the caller's limit (the connection is dropped)."""


class _Connection(asyncio.Protocol):
    """One TCP connection; one response in flight at a time."""

    def __init__(self, pool: HTTPPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False
        self.counted = True  # holds one of the pool's connection slots until it closes
        self._parser: httptools.HttpResponseParser | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._fail(HTTPError("unexpected data from the backend"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and not self.complete:
            self._fail(HTTPError(f"connection lost{': ' + str(exc) if exc else ''}"))
        self._pool._forget(self)
        self._pool._free_slot(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # helpers
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def _wait(self, idle_timeout: float | None, deadline: float | None = None) -> None:
        if self._error is not None:
            raise self._error
        delay = idle_timeout or None
        error: HTTPError = ReadTimeout("no data from the backend within the read timeout")
        if deadline is not None:
            left = deadline - self._loop.time()
            if left <= 0:
                raise DeadlineExceeded("the backend did not finish within the total time limit")
            if delay is None or left < delay:
                delay = left
                error = DeadlineExceeded("the backend did not finish within the total time limit")
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(delay, self._timeout, waiter, error) if delay else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _timeout(self, waiter: asyncio.Future[None], error: HTTPError) -> None:
        if not waiter.done():
            waiter.set_exception(error)

    def begin(self, request: bytes) -> None:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._chunks.clear()
        self._error = None
        self.status = 0
        self.headers = []
        self.headers_done = self.complete = self.keep_alive = False
        self.transport.write(request)

    async def read_headers(self, idle_timeout: float | None, deadline: float | None = None) -> None:
        while not self.headers_done:
            await self._wait(idle_timeout, deadline)

    async def iter_body(self, idle_timeout: float | None, deadline: float | None = None) -> AsyncGenerator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                if deadline is not None and self._loop.time() >= deadline:
                    # A backend that never pauses long enough to reach `_wait` still ends here.
                    raise DeadlineExceeded("the backend did not finish within the total time limit")
                # Everything that arrived since the last look goes out as one piece, so a burst
                # of small events is parsed, checked and forwarded in one go.
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                yield data
                continue
            if self.complete:
                return
            await self._wait(idle_timeout, deadline)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._pool._free_slot(self)


class Response:
    """A response whose body is read (or streamed) once; `close()` returns or drops the connection."""

    def __init__(
        self, pool: HTTPPool, connection: _Connection, idle_timeout: float | None, deadline: float | None = None
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._timeout = idle_timeout
        self._deadline = deadline
        self.status = connection.status
        self.headers = connection.headers
        self._done = False

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The whole body; over `max_bytes` the connection is dropped and `BodyTooLarge` raised."""
        parts: list[bytes] = []
        size = 0
        chunks = self.iter_chunks()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BodyTooLarge(f"the response body is larger than {max_bytes} bytes")
                parts.append(chunk)
        finally:
            await chunks.aclose()  # on an early exit this drops the connection
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncGenerator[bytes]:
        try:
            async for chunk in self._connection.iter_body(self._timeout, self._deadline):
                yield chunk
        except BaseException:
            self.close()
            raise
        self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._connection)

    def close(self) -> None:
        """Done with this response. Unread body (an abandoned stream): drop the connection."""
        if self._done:
            return
        self._done = True
        if not self._connection.complete:
            self._connection.abort()
        self._pool._release(self._connection)


class HTTPPool:
    """Keep-alive connections to one `http://host:port` origin."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 300.0,
        max_idle: int = 256,
        max_connections: int = 100,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a backend URL must be http:// or https://, not {base_url!r}")
        self.host = parts.hostname
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self._ssl else 80)
        self.prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode()
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._max_idle = min(max_idle, max_connections)
        self._idle: list[_Connection] = []
        self.max_connections = max_connections
        self.open_connections = 0  # open or opening: at most max_connections
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _request_bytes(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode(), b"host: " + self._host_header]
        if body is not None:
            lines.append(b"content-type: application/json")
            lines.append(b"content-length: " + str(len(body)).encode())
        if headers:
            lines.extend(f"{k}: {v}".encode() for k, v in headers.items())
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    async def _acquire(self, deadline: float | None) -> tuple[_Connection, bool]:
        """An idle connection (reused: True) or a new one within the cap; while all are busy, waits
        at most the connect timeout (or until the request's deadline, if sooner)."""
        wait_until: float | None = None
        while True:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection, True
            if self.open_connections < self.max_connections:
                self.open_connections += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self.open_connections -= 1
                    self._wake_one()
                    raise
            loop = asyncio.get_running_loop()
            if wait_until is None:
                wait_until = loop.time() + self._connect_timeout
                if deadline is not None:
                    wait_until = min(wait_until, deadline)
            await self._wait_for_slot(loop, wait_until)

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, wait_until: float) -> None:
        left = wait_until - loop.time()
        if left <= 0:
            raise PoolTimeout(
                f"all {self.max_connections} connections to {self.host}:{self.port} stayed busy "
                f"for the connect timeout of {self._connect_timeout:g} s"
            )
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        handle = loop.call_later(left, _settle, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, then cancelled: pass the slot on
            raise
        finally:
            handle.cancel()
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._slot_waiters.remove(waiter)

    def _wake_one(self) -> None:
        """A slot or an idle connection is free: the longest waiter (if any) tries again."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _free_slot(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            self.open_connections -= 1
            self._wake_one()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self._ssl),
                self._connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc or type(exc).__name__}") from exc
        return protocol

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        idle_timeout: float | None = -1.0,
        deadline: float | None = None,
    ) -> Response:
        """Send a request and wait for the status line and headers.

        `deadline` (the event loop's clock) bounds the whole exchange, headers and body."""
        read_timeout = self.read_timeout if idle_timeout == -1.0 else idle_timeout
        raw = self._request_bytes(method, path, body, headers)
        while True:
            connection, reused = await self._acquire(deadline)
            connection.used = True
            connection.begin(raw)
            try:
                await connection.read_headers(read_timeout, deadline)
            except HTTPError:
                connection.abort()
                if reused and not connection.headers_done:
                    continue  # the server closed an idle keep-alive connection under us: retry on a fresh one
                raise
            except BaseException:
                connection.abort()
                raise
            return Response(self, connection, read_timeout, deadline)

    def _release(self, connection: _Connection) -> None:
        if connection.closed or not connection.complete or not connection.keep_alive:
            connection.abort()
            return
        if len(self._idle) < self._max_idle:
            self._idle.append(connection)
            self._wake_one()
        else:
            connection.abort()

    def _forget(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    async def close(self) -> None:
        for connection in list(self._idle):
            connection.abort()
        self._idle.clear()


def _settle(waiter: asyncio.Future[None]) -> None:
    """The wait for a connection slot ran out: wake the waiter to look once more, then give up."""
    if not waiter.done():
        waiter.set_result(None)
