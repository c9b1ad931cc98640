"""Benchmark: requests/s with 1, 2 and 3 gateway replicas on one PostgreSQL and one Redis (issue 11).

Every replica is a separate `gateway serve` process with the audit log in PostgreSQL, limits in
Redis (a per-key limit high enough never to refuse), API keys checked, guards off or the default
policy, in front of one zero-delay fake backend. The load generator (aiohttp) keeps
`--concurrency` requests in flight in total, spread evenly over the replicas, as a load balancer
would. Direct calls to the fake backend, in the same run, are the baseline.

On a machine with few cores the replicas, the backend, PostgreSQL, Redis and the load generator
share them, so the curve flattens early: the figures say how far it goes here, not what more
machines would give.

    .venv/bin/python benchmarks/bench_replicas.py [--requests 1500] [--concurrency 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gateway import CHAT, GATEWAY, GUARDS_OFF, ROOT, Proc, drive, free_port, start_fake

PG = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _env(database: str, data_dir: Path, prefix: str) -> dict[str, str]:
    return {
        "GATEWAY_DATABASE": f"{PG}/{database}",
        "GATEWAY_REDIS": REDIS,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_RAG": "false",
    }


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*GATEWAY, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return done.stdout


async def _spread(urls: list[str], key: str, concurrency: int, requests: int) -> dict[str, Any]:
    """`concurrency` in flight over all replicas together, `requests` in all."""
    share = max(1, concurrency // len(urls))
    runs = await asyncio.gather(*(
        drive(url + "/v1/chat/completions", CHAT, concurrency=share, requests=requests // len(urls), key=key,
              stream=False)
        for url in urls
    ))  # fmt: skip
    done = sum(r["requests"] for r in runs)
    seconds = max(r["seconds"] for r in runs)
    return {
        "requests": done,
        "errors": sum(r["errors"] for r in runs),
        "rps": done / seconds,
        "p50_ms": sorted(r["p50_ms"] for r in runs)[len(runs) // 2],
    }


def measure(args: argparse.Namespace, policy: Path | None) -> list[dict[str, Any]]:
    fake, fake_url = start_fake()
    database = f"bench_replicas_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg(f'CREATE DATABASE "{database}"'))
    base = Path(os.environ.get("TMPDIR", "/tmp")) / database
    env = _env(database, base / "admin", f"bench:{database}:")
    rows: list[dict[str, Any]] = []
    try:
        _cli(env, "db", "upgrade")
        key = _cli(env, "keys", "create", "--role", "client", "--rpm", "100000000").strip().splitlines()[0]
        direct = asyncio.run(drive(fake_url + "/v1/chat/completions", CHAT, concurrency=args.concurrency,
                                   requests=args.requests, key=None, stream=False))  # fmt: skip
        rows.append({"replicas": 0, "label": "direct", "rps": direct["rps"], "p50_ms": direct["p50_ms"], "errors": 0})
        replicas: list[Proc] = []
        urls: list[str] = []
        try:
            for n in range(1, args.max_replicas + 1):
                port = free_port()
                extra = ["--workers", "1", *(["--policy", str(policy)] if policy else [])]
                replica_env = {**env, "GATEWAY_DATA_DIR": str(base / f"replica{n}")}
                replicas.append(Proc([*GATEWAY, "serve", "--backend", fake_url, "--port", str(port), *extra],
                                     f"http://127.0.0.1:{port}/readyz", replica_env))  # fmt: skip
                urls.append(f"http://127.0.0.1:{port}")
                asyncio.run(_spread(urls, key, args.concurrency, min(200, args.requests)))  # warm-up
                result = asyncio.run(_spread(urls, key, args.concurrency, args.requests))
                rows.append({"replicas": n, "label": f"{n} replica{'s' if n > 1 else ''}", **result})
        finally:
            for replica in replicas:
                replica.stop()
    finally:
        fake.stop()
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--guards", choices=["off", "default", "both"], default="off")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"cores": os.cpu_count()}
    for guards in ("off", "default") if args.guards == "both" else (args.guards,):
        rows = measure(args, GUARDS_OFF if guards == "off" else None)
        results[f"guards_{guards}"] = rows
        direct = rows[0]["rps"]
        print(f"\n## Replicas on PostgreSQL + Redis, guards {guards}, concurrency {args.concurrency} in total, "
              f"{os.cpu_count()} cores")  # fmt: skip
        print("| | requests/s | share of direct | p50 ms | errors |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['label']} | {row['rps']:.0f} | {row['rps'] / direct:.2f} | {row['p50_ms']:.1f} | "
                  f"{row['errors']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
