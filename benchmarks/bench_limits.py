"""Benchmark: what the limit check adds, in process and with Redis, at concurrency 1 and 32.

Two measurements, each against the same thing with limits off in the same run:

  1. the check itself: `acquire` + `release` of a key with all five limits (rpm, tpm,
     concurrency, day and month quota) straight on the limiter, timed per call; for Redis also
     the EVALSHA calls per request, read from Redis's own command counters;
  2. end to end: one gateway in process and one with `--redis`, each serving a key without
     limits and a key with all five; requests alternate between the two keys in rounds, and
     the added latency is p50(limited) - p50(unlimited).

Run alone (`python benchmarks/bench_limits.py`) or as the `limits` section of bench_gateway.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import (  # noqa: E402
    CHAT,
    GATEWAY,
    GUARDS_OFF,
    Proc,
    cpu_seconds,
    drive,
    free_port,
    percentile,
    start_fake,
)
from gateway.limits import InProcessLimiter, KeyLimits, Limiter  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
BIG = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "tokens_per_day": 10**15, "tokens_per_month": 10**15}


class _Key:
    def __init__(self, key_id: str, limits: KeyLimits | None) -> None:
        self.id = key_id
        self.limits = limits


async def _time_checks(limiter: Limiter, key: _Key, concurrency: int, total: int) -> dict[str, float]:
    """Per-request times (ms) with `concurrency` requests in flight: the check (acquire) and acquire + release."""
    checks: list[float] = []
    both: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            began = time.perf_counter()
            admission = await limiter.acquire(key, "bench-model", 40)  # type: ignore[arg-type]
            checked = time.perf_counter()
            await limiter.release(admission, 60)
            checks.append(checked - began)
            both.append(time.perf_counter() - began)

    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    checks.sort()
    both.sort()
    return {
        "p50_ms": percentile(checks, 50) * 1000,
        "p99_ms": percentile(checks, 99) * 1000,
        "with_release_p50_ms": percentile(both, 50) * 1000,
    }


async def _evalsha_calls() -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        await client.aclose()


def _floor(pings: list[float]) -> dict[str, float]:
    pings = sorted(pings)
    return {"off_p50_ms": 0.0, "on_p50_ms": percentile(pings, 50) * 1000, "on_p99_ms": percentile(pings, 99) * 1000,
            "added_p50_ms": 0.0, "with_release_p50_ms": 0.0, "evalsha_per_request": 0.0}  # fmt: skip


async def micro(requests: int) -> dict[str, Any]:
    from gateway.limits_redis import RedisLimiter

    out: dict[str, Any] = {}
    prefix = f"bench:{uuid.uuid4().hex}:"
    limited, unlimited = _Key("bench-limited", KeyLimits(**BIG)), _Key("bench-free", None)
    in_process = InProcessLimiter()
    redis = RedisLimiter(REDIS_URL, prefix=prefix)
    before = RedisLimiter(REDIS_URL, prefix=prefix, client="redis-py")  # the client before the raw RESP one
    try:
        await redis.start()
        await before.start()
        pings = []
        for _ in range(requests):  # the floor: one bare round trip to this Redis from this client
            began = time.perf_counter()
            await redis._redis.ping()
            pings.append(time.perf_counter() - began)
        out["redis PING (floor, redis-py)"] = _floor(pings)
        pings = []
        for _ in range(requests):  # the same through the pipelined client
            began = time.perf_counter()
            await redis._pipe.call("PING")
            pings.append(time.perf_counter() - began)
        out["redis PING (floor, pipelined)"] = _floor(pings)
        cases = (("in-process", in_process, requests * 5), ("redis-py client (before)", before, requests),
                 ("redis", redis, requests))  # fmt: skip
        for name, limiter, n in cases:
            await _time_checks(limiter, limited, 8, 400)  # warm up (connections, script cache)
            for concurrency in (1, 32):
                off = await _time_checks(limiter, unlimited, concurrency, n)
                calls = await _evalsha_calls() if name != "in-process" else 0
                on = await _time_checks(limiter, limited, concurrency, n)
                await limiter.drain()
                calls = (await _evalsha_calls() - calls) if name != "in-process" else 0
                out[f"{name} c={concurrency}"] = {
                    "off_p50_ms": off["p50_ms"],
                    "on_p50_ms": on["p50_ms"],
                    "on_p99_ms": on["p99_ms"],
                    "with_release_p50_ms": on["with_release_p50_ms"],
                    "added_p50_ms": on["p50_ms"] - off["p50_ms"],
                    "evalsha_per_request": calls / n,
                }
    finally:
        await redis.aclose()
        await before.aclose()
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return out


def _start(backend: str, data_dir: Path, redis_prefix: str | None) -> tuple[Proc, str, str, str]:
    """A gateway (guards off) with one key without limits and one with all five."""
    env = {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
    }
    if redis_prefix:
        env |= {"GATEWAY_REDIS": REDIS_URL, "GATEWAY_REDIS_PREFIX": redis_prefix}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in BIG.items()]
    keys = []
    for extra in ([], flags):
        made = subprocess.run([*GATEWAY, "keys", "create", "--role", "client", *extra], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, check=True)  # fmt: skip
        keys.append(made.stdout.strip().splitlines()[0])
    port = free_port()
    proc = Proc(
        [*GATEWAY, "serve", "--workers", "1", "--backend", backend, "--port", str(port), "--policy", str(GUARDS_OFF)],
        f"http://127.0.0.1:{port}/readyz",
        env,
    )
    return proc, f"http://127.0.0.1:{port}", keys[0], keys[1]


def end_to_end(requests: int, data_dir: Path, rounds: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fake, fake_url = start_fake()
    prefix = f"bench:{uuid.uuid4().hex}:"
    try:
        for name, redis_prefix in (("in-process", None), ("redis", prefix)):
            gw, url, free, limited = _start(fake_url, data_dir / name, redis_prefix)
            endpoint = url + "/v1/chat/completions"
            try:
                for key in (free, limited):
                    asyncio.run(drive(endpoint, CHAT, concurrency=8, requests=300, key=key, stream=False))
                for concurrency in (1, 32):
                    p50 = {"off": [], "on": []}  # type: dict[str, list[float]]
                    cpu = {"off": 0.0, "on": 0.0}
                    done = {"off": 0, "on": 0}
                    errors = 0
                    for _ in range(rounds):  # alternate, so drift on a busy machine hits both alike
                        for label, key in (("off", free), ("on", limited)):
                            n = max(requests // rounds, concurrency * 4)
                            before = cpu_seconds(gw.pid)
                            r = asyncio.run(drive(endpoint, CHAT, concurrency=concurrency, requests=n, key=key,
                                                  stream=False))  # fmt: skip
                            cpu[label] += cpu_seconds(gw.pid) - before
                            done[label] += r["requests"]
                            p50[label].append(r["p50_ms"])
                            errors += r["errors"]
                    off, on = sorted(p50["off"])[rounds // 2], sorted(p50["on"])[rounds // 2]
                    cpu_off, cpu_on = (cpu[k] / max(1, done[k]) * 1000 for k in ("off", "on"))
                    out[f"{name} c={concurrency}"] = {"off_p50_ms": off, "on_p50_ms": on, "added_p50_ms": on - off,
                                                      "cpu_off_ms": cpu_off, "cpu_on_ms": cpu_on,
                                                      "added_cpu_ms": cpu_on - cpu_off, "errors": errors}  # fmt: skip
            finally:
                gw.stop()
    finally:
        fake.stop()
        if shutil.which("redis-cli"):
            subprocess.run(["redis-cli", "--scan", "--pattern", prefix + "*"], capture_output=True)
    return out


def report(figures: dict[str, Any]) -> None:
    print("\n## Limit check on the limiter: a key with all five limits vs a key without (acquire; then + release)")
    print("| limiter | off p50 | check p50 | added p50 | check p99 | check + release p50 | EVALSHA per request |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in figures["micro"].items():
        print(f"| {mode} | {r['off_p50_ms']:.4f} ms | {r['on_p50_ms']:.4f} ms | **{r['added_p50_ms']:.4f} ms** | "
              f"{r['on_p99_ms']:.4f} ms | {r['with_release_p50_ms']:.4f} ms | "
              f"{r['evalsha_per_request']:.2f} |")  # fmt: skip
    if "end_to_end" in figures:
        print("\n## End to end through the gateway (zero-delay fake, guards off): limited key vs unlimited key")
        print(
            "| limiter | unlimited p50 | limited p50 | added p50 | CPU/request unlimited | limited | added | errors |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for mode, r in figures["end_to_end"].items():
            print(f"| {mode} | {r['off_p50_ms']:.3f} ms | {r['on_p50_ms']:.3f} ms | **{r['added_p50_ms']:.3f} ms** | "
                  f"{r['cpu_off_ms']:.3f} ms | {r['cpu_on_ms']:.3f} ms | **{r['added_cpu_ms']:.3f} ms** | "
                  f"{r['errors']} |")  # fmt: skip


def run_all(requests: int, data_dir: Path, end_to_end_too: bool = True) -> dict[str, Any]:
    figures: dict[str, Any] = {"micro": asyncio.run(micro(requests))}
    if end_to_end_too:
        figures["end_to_end"] = end_to_end(requests, data_dir)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--micro-only", action="store_true", help="skip the end-to-end part")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-limits-"))
    try:
        figures = run_all(args.requests, data_dir, not args.micro_only)
        report(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
