"""Benchmark: plain requests/s with `gateway serve --workers N`, against direct calls in the same run.

The fake backend at zero delay; non-streamed chat requests at concurrency 32 (aiohttp keep-alive
connections, so the kernel spreads connections, not requests, over the workers); the SQLite audit
log on, an API key checked, metrics on. For guards off (benchmarks/guards-off.toml) and the
default guards, each of: direct to the backend, gateway --workers 1, gateway --workers 2 (the
direct figure is taken again right before each gateway figure, so both see the same machine).
After each gateway run: audit rows stored vs requests answered, rows spooled (a worker that waited
longer than `audit_db_wait` for another's SQLite write lock), and each worker's share of answers.

    .venv/bin/python benchmarks/bench_workers.py [--requests 3000] [--workers 1,2] [--json FILE]

On a 2-core machine the load generator and the backend share the CPU with the gateway, so the
ratio to direct, not the absolute requests/s, is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import CHAT, GATEWAY, GUARDS_OFF, ROOT, cpu_seconds, drive, free_port, run, start_fake, wait_http

CONCURRENCY = 32
STAGE = "gateway_request_stage_duration_seconds"


class Gateway:
    """`gateway serve` as a process; its log goes to DATA_DIR/serve.log (read when it fails to start)."""

    def __init__(self, command: list[str], url: str, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
        try:
            wait_http(url + "/readyz", timeout=300)  # N workers load their guard models on 2 busy cores
        except RuntimeError:
            self.process.kill()
            raise RuntimeError(log.read_text()[-3000:]) from None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)

    def cpu_seconds(self) -> float:
        """CPU time of the parent and its workers so far (multiprocessing's resource tracker included)."""
        return cpu_seconds(self.process.pid)  # bench_gateway's sums the whole process tree


def start_gateway(backend: str, data_dir: Path, workers: int, policy: Path | None) -> tuple[Gateway, str, str]:
    env = {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        # As bench_gateway.py: these requests use no retrieval, so the fast fake embedder and no sample corpus.
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
        "GATEWAY_METRICS": "open",
    }
    created = subprocess.run(
        [*GATEWAY, "keys", "create", "--role", "client"], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = created.stdout.strip().splitlines()[0]
    port = free_port()
    command = [*GATEWAY, "serve", "--backend", backend, "--port", str(port), "--workers", str(workers)]
    command += ["--policy", str(policy)] if policy else []
    url = f"http://127.0.0.1:{port}"
    return Gateway(command, url, env, data_dir / "serve.log"), url, key


async def shares(url: str, key: str, requests: int = 400) -> dict[str, int]:
    """Which worker answers, over CONCURRENCY keep-alive connections (as `drive` opens them); an
    answer other than 200 is counted as "STATUS: BODY"."""
    counts: Counter[str] = Counter()
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

        async def one() -> None:
            async with session.post(url, json=CHAT, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    counts[f"{resp.status}: {body[:120].decode(errors='replace')}"] += 1
                    return
                counts[resp.headers.get("x-gateway-worker", "single process").split(".")[0]] += 1

        for _ in range(requests // CONCURRENCY):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    return dict(counts)


def _ok(counts: dict[str, int]) -> int:
    return sum(n for answer, n in counts.items() if ":" not in answer)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with `labels` among theirs) on /metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for found, value in re.findall(rf"^{name}((?:{{[^}}]*}})?) (\S+)$", text, flags=re.MULTILINE):
        if all(w in found for w in wanted):
            total += float(value)
    return total


def audit_count(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "gateway.db") as conn:
        return int(conn.execute("SELECT count(*) FROM audit_records").fetchone()[0])


def measure(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    rows = []
    endpoint = "/v1/chat/completions"
    fake, fake_url = start_fake()
    try:
        run(drive(fake_url + endpoint, CHAT, concurrency=4, requests=200, key=None, stream=False))
        for guards, policy in [(g, GUARDS_OFF if g == "off" else None) for g in args.guards]:
            for workers in args.workers:
                data_dir = base / f"{guards}-{workers}"
                gw, gw_url, key = start_gateway(fake_url, data_dir, workers, policy)
                try:
                    # Warm up every worker (connections, the first SQLite commit, guard models).
                    warm = run(shares(gw_url + endpoint, key))
                    n = args.requests
                    direct = run(drive(fake_url + endpoint, CHAT, concurrency=CONCURRENCY, requests=n, key=None,
                                       stream=False))  # fmt: skip
                    cpu_before, fake_before = gw.cpu_seconds(), cpu_seconds(fake.pid)
                    client_before = time.process_time()
                    through = run(drive(gw_url + endpoint, CHAT, concurrency=CONCURRENCY, requests=n, key=key,
                                        stream=False))  # fmt: skip
                    per_request = 1000 / max(through["requests"], 1)
                    cpu_ms = (gw.cpu_seconds() - cpu_before) * per_request
                    client_ms = (time.process_time() - client_before) * per_request
                    fake_ms = (cpu_seconds(fake.pid) - fake_before) * per_request
                    split = run(shares(gw_url + endpoint, key))
                    time.sleep(1.5)  # each worker writes its metrics every second
                    answered = metric(gw_url, "gateway_requests_total")
                    spooled = metric(gw_url, "gateway_audit_rows_spooled_total")
                    commit_s = metric(gw_url, STAGE + "_sum", stage="audit_commit")
                    commits = metric(gw_url, STAGE + "_count", stage="audit_commit")
                finally:
                    gw.stop()
                stored = audit_count(data_dir)  # after the drain: every queued row is committed
                rows.append({
                    "guards": guards,
                    "workers": workers,
                    "direct_rps": round(direct["rps"], 1),
                    "gateway_rps": round(through["rps"], 1),
                    "ratio": round(through["rps"] / direct["rps"], 3),
                    "gateway_p50_ms": round(through["p50_ms"], 1),
                    "gateway_p99_ms": round(through["p99_ms"], 1),
                    "errors": through["errors"],
                    "warmup": warm,
                    "client_ok": through["requests"] + _ok(warm) + _ok(split),
                    "gateway_cpu_ms_per_request": round(cpu_ms, 2),  # all its processes together
                    # The machine's share: CPU seconds per second of the gateway, the load generator and the backend.
                    "cores_busy": round((cpu_ms + client_ms + fake_ms) / 1000 * through["rps"], 2),
                    "client_cpu_ms_per_request": round(client_ms, 2),
                    "backend_cpu_ms_per_request": round(fake_ms, 2),
                    "answered": int(answered),
                    "audit_rows": stored,
                    "spooled": int(spooled),
                    "audit_commit_ms": round(commit_s / max(commits, 1) * 1000, 2),  # mean wait per request
                    "answers_per_worker": split,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        fake.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (comma-separated)")
    parser.add_argument("--guards", default="off,default", help="guard settings to compare: off, default")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.guards = args.guards.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        rows = measure(args, Path(tmp))
    print(f"\nplain non-stream requests/s at concurrency {CONCURRENCY}, zero-delay fake, audit log on "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    columns = ("guards", "workers", "direct", "gateway", "ratio", "p50 ms", "p99 ms", "errors", "cpu ms",
               "audited", "spooled", "commit ms")  # fmt: skip
    widths = (8, 7, 8, 8, 6, 7, 7, 6, 6, 11, 7, 9)
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)), " answers per worker")
    for r in rows:
        audited = f"{r['audit_rows']}/{r['answered']}"
        values = (r["guards"], r["workers"], r["direct_rps"], r["gateway_rps"], r["ratio"], r["gateway_p50_ms"],
                  r["gateway_p99_ms"], r["errors"], r["gateway_cpu_ms_per_request"], audited, r["spooled"],
                  r["audit_commit_ms"])  # fmt: skip
        print(" ".join(f"{v!s:>{w}}" for v, w in zip(values, widths, strict=True)), "", r["answers_per_worker"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
