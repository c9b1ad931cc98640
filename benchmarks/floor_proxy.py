"""The least a Python HTTP proxy can do per request: a floor for the gateway's throughput figures.

An asyncio server on uvloop whose requests httptools parses; each request's body goes to the
backend through the gateway's own keep-alive client (`serving.httpclient.HTTPPool`) and the
backend's answer comes back as it is. No JSON is read, no key checked, nothing logged, no guard
run: what is left is the HTTP work that any gateway in Python does twice per request (serve the
client, call the backend). `benchmarks/bench_gateway.py` drives it beside the gateway, so the
share of direct that this proxy reaches on a machine is the most any Python gateway in the same
place could reach there.

    .venv/bin/python benchmarks/floor_proxy.py --port 8100 --backend http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import cast

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.httpclient import HTTPError, HTTPPool


class ProxyProtocol(asyncio.Protocol):
    """One client connection: requests in order, each forwarded once it is whole."""

    def __init__(self, pool: HTTPPool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.queue.put_nowait((f"{method} {self.url.decode()}", b"".join(self.body)))
        self.url, self.body = b"", []

    async def serve(self) -> None:
        while True:
            line, body = await self.queue.get()
            method, path = line.split(" ", 1)
            try:
                response = await self.pool.request(method, path, body or None)
                payload = await response.read()
                status = response.status
            except HTTPError as exc:
                payload, status = str(exc).encode(), 502
            head = f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
            if self.transport is not None:
                self.transport.write(head.encode() + payload)


async def main(port: int, backend: str) -> None:
    pool = HTTPPool(backend, max_connections=256)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ProxyProtocol(pool), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.backend))
