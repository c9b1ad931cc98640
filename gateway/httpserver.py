"""The HTTP server: uvicorn, configured for the gateway, with a graceful drain and OpenAI-format errors.

Bytes that do not parse as HTTP never reach the app: uvicorn answers them itself with a
plain-text 400. This protocol answers them like every other error of the gateway, as JSON
`{"error": {...}}` with an `x-gateway-request-id`, and still closes the connection.

On SIGTERM uvicorn stops accepting, closes idle keep-alive connections, waits up to
`shutdown_grace` seconds for requests and streams in flight, then runs the app's lifespan
shutdown (which commits the audit queue). `DrainingServer` records whether that wait ended
because everything finished, so `gateway serve` can exit 0 only after a complete drain.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from litestar import Litestar

    from gateway.settings import Settings

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("gateway")


def malformed_http_response(message: str, request_id: str) -> bytes:
    """A complete HTTP/1.1 400 response with OpenAI's error body; the connection closes after it."""
    body = _encode({"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": "invalid_http"}})  # fmt: skip
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-gateway-request-id: {request_id}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the malformed-request answer in OpenAI's format."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(malformed_http_response(msg, uuid.uuid4().hex))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server; `drained` tells whether its shutdown saw every connection finish in time."""

    drained = False
    on_started: Callable[[], None] | None = None  # called once the port listens (after the lifespan start)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def _wait_tasks_to_complete(self) -> None:
        # uvicorn runs this under `timeout_graceful_shutdown`: when the grace runs out it is
        # cancelled, so `drained` stays False (and a forced exit, a second Ctrl-C, is no drain).
        await super()._wait_tasks_to_complete()
        self.drained = not self.force_exit


class ReadyLine:
    """Logs one line with the URLs (API, reviewer UI) once every part in `waiting` said it is done."""

    def __init__(self, settings: Settings, waiting: set[str]) -> None:
        base = f"http://{settings.host}:{settings.port}"
        self.line = f"gateway ready: API {base}/v1 (OpenAI-compatible), reviewer UI {base}/review"
        self.waiting = set(waiting)
        self._lock = threading.Lock()

    def done(self, part: str) -> None:
        with self._lock:
            was_waiting = bool(self.waiting)
            self.waiting.discard(part)
            if was_waiting and not self.waiting:
                log.info(self.line)


def server_config(app: Litestar, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for `gateway serve`."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=GatewayHttpToolsProtocol,
        access_log=False,
        log_level="warning",
        # One log format: uvicorn's own lines go through the root handler too (gateway.logs), not its own.
        log_config=None,
        backlog=4096,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),  # uvicorn takes whole seconds
        proxy_headers=False,  # no proxy in front by default; saves a middleware per request
        server_header=False,
        date_header=False,
    )
