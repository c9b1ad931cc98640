"""The gateway's own HTTP client (serving/httpclient.py) against aiohttp and httpx, one process.

Starts the fake backend (`gateway backend fake`, zero delay) as a separate process, then drives
the same requests through each client from this process: chat completions read whole, and
streamed ones read chunk by chunk to `[DONE]`, one at a time ("sequential") and with
`--concurrency` in flight ("concurrent"). Each client sends the same pre-encoded JSON body and
reads raw bytes (no JSON or SSE parsing: that work is the same whatever the client).

Printed per (mode, kind, client): per-call wall time p50/p99, and CPU time per call of this
process (time.process_time delta / calls; the fake's CPU is in its own process), with ratios
against the lean client. The clients take turns in `--rounds` rounds, in a rotating order,
so a change in the machine's load during the run touches each of them alike.

    .venv/bin/python benchmarks/bench_httpclient.py [--requests 2000] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.httpclient import HTTPPool  # noqa: E402 - after the path fix, for a run from anywhere

PATH = "/v1/chat/completions"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "How fast is the gateway's HTTP client?"}]}
BODIES = {
    "chat": json.dumps(CHAT).encode(),
    "stream": json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode(),
}
AUTH = {"authorization": "Bearer bench"}  # the lean client sets content-type itself for a body
HEADERS = {"content-type": "application/json", **AUTH}
CLIENTS = ("lean", "aiohttp", "httpx")
WARMUP = 50

Call = Callable[[str], Awaitable[int]]  # kind -> bytes received


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake(answer_tokens: int) -> tuple[subprocess.Popen[bytes], str]:
    """The fake backend in its own process, as bench_gateway.py starts it; waits for /health."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.cli", "backend", "fake", "--port", str(port)]
    args += ["--delay-ms", "0", "--tokens-per-s", "0", "--answer-tokens", str(answer_tokens), "--keep-requests", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the fake backend did not start: " + (proc.stderr.read().decode() if proc.stderr else ""))


def _check(status: int, tail: bytes, kind: str) -> None:
    if status != 200 or (kind == "stream" and b"[DONE]" not in tail):
        raise RuntimeError(f"bad answer from the fake: HTTP {status}, ends {tail[-40:]!r}")


class Clients:
    """One long-lived client of each kind, the way the gateway holds its backend client."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self.lean = HTTPPool(url)
        self.aiohttp = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(100, concurrency)))
        limits = httpx.Limits(max_connections=max(100, concurrency), max_keepalive_connections=max(100, concurrency))
        self.httpx = httpx.AsyncClient(base_url=url, limits=limits, timeout=60)

    def call(self, client: str) -> Call:
        return {"lean": self._lean, "aiohttp": self._aiohttp, "httpx": self._httpx}[client]

    async def _lean(self, kind: str) -> int:
        resp = await self.lean.request("POST", PATH, BODIES[kind], AUTH)
        if kind == "chat":
            body = await resp.read()
            _check(resp.status, body, kind)
            return len(body)
        size, tail = 0, b""
        async for chunk in resp.iter_chunks():
            size += len(chunk)
            tail = (tail + chunk)[-32:]
        _check(resp.status, tail, kind)
        return size

    async def _aiohttp(self, kind: str) -> int:
        async with self.aiohttp.post(self.url + PATH, data=BODIES[kind], headers=HEADERS) as resp:
            if kind == "chat":
                body = await resp.read()
                _check(resp.status, body, kind)
                return len(body)
            size, tail = 0, b""
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                tail = (tail + chunk)[-32:]
            _check(resp.status, tail, kind)
            return size

    async def _httpx(self, kind: str) -> int:
        if kind == "chat":
            resp = await self.httpx.post(PATH, content=BODIES[kind], headers=HEADERS)
            _check(resp.status_code, resp.content, kind)
            return len(resp.content)
        async with self.httpx.stream("POST", PATH, content=BODIES[kind], headers=HEADERS) as resp:
            size, tail = 0, b""
            async for chunk in resp.aiter_raw():
                size += len(chunk)
                tail = (tail + chunk)[-32:]
            _check(resp.status_code, tail, kind)
            return size

    async def aclose(self) -> None:
        await self.lean.close()
        await self.aiohttp.close()
        await self.httpx.aclose()


@dataclass
class Result:
    mode: str
    kind: str
    client: str
    latencies: list[float] = field(default_factory=list)  # seconds per call
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def calls(self) -> int:
        return len(self.latencies)

    def row(self) -> dict[str, Any]:
        ms = sorted(x * 1e3 for x in self.latencies)
        return {
            "mode": self.mode,
            "kind": self.kind,
            "client": self.client,
            "calls": self.calls,
            "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            "cpu_ms_per_call": round(self.cpu_s / self.calls * 1e3, 4),
            "calls_per_s": round(self.calls / self.wall_s, 1),
        }


async def drive(call: Call, kind: str, requests: int, concurrency: int, out: Result | None) -> None:
    """`requests` calls with `concurrency` in flight; timings go to `out` (None: a warm-up)."""
    remaining = requests
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call(kind)
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    if concurrency == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if out is not None:
        out.cpu_s += time.process_time() - cpu
        out.wall_s += time.perf_counter() - wall
        out.latencies.extend(latencies)


async def bench(url: str, requests: int, concurrency: int, rounds: int) -> list[Result]:
    clients = Clients(url, concurrency)
    results: list[Result] = []
    try:
        for mode, inflight in (("sequential", 1), ("concurrent", concurrency)):
            for kind in ("chat", "stream"):
                by_client = {c: Result(mode, kind, c) for c in CLIENTS}
                for c in CLIENTS:
                    await drive(clients.call(c), kind, WARMUP, inflight, None)
                per_round = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
                for r, n in enumerate(per_round):
                    order = CLIENTS[r % len(CLIENTS) :] + CLIENTS[: r % len(CLIENTS)]
                    for c in order:
                        await drive(clients.call(c), kind, n, inflight, by_client[c])
                results.extend(by_client.values())
                lean = by_client["lean"].row()
                print(
                    f"{mode} {kind}: "
                    + ", ".join(
                        f"{c} {by_client[c].row()['cpu_ms_per_call']:.3f} ms CPU/call "
                        f"({by_client[c].row()['cpu_ms_per_call'] / lean['cpu_ms_per_call']:.2f}x)"
                        for c in CLIENTS
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await clients.aclose()
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lean = {(r["mode"], r["kind"]): r for r in rows if r["client"] == "lean"}
    head = (
        "| mode | kind | client | calls | p50 ms | p99 ms | CPU ms/call | CPU vs lean | p50 vs lean | calls/s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        base = lean[(r["mode"], r["kind"])]
        lines.append(
            f"| {r['mode']} | {r['kind']} | {r['client']} | {r['calls']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['cpu_ms_per_call']:.3f} | {r['cpu_ms_per_call'] / base['cpu_ms_per_call']:.2f}x "
            f"| {r['p50_ms'] / base['p50_ms']:.2f}x | {r['calls_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured calls per client and case")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in the concurrent mode")
    parser.add_argument("--rounds", type=int, default=4, help="turns each client takes, in rotating order")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens in each fake answer")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (the gateway's: uvloop)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.requests < args.rounds or args.concurrency < 1:
        parser.error("--requests must be at least --rounds, and --concurrency at least 1")
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    fake, url = start_fake(args.answer_tokens)
    load_before = os.getloadavg()[0]
    try:
        results = asyncio.run(bench(url, args.requests, args.concurrency, args.rounds))
    finally:
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
    rows = [r.row() for r in results]
    env = {
        "python": platform.python_version(),
        "loop": args.loop,
        "aiohttp": version("aiohttp"),
        "httpx": version("httpx"),
        "httptools": version("httptools"),
        "cpus": os.cpu_count(),
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "answer_tokens": args.answer_tokens,
        "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps({"env": env, "rows": rows}, indent=2))
    else:
        print(json.dumps(env))
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
