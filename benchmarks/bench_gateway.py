"""Benchmark: the gateway's own cost, against direct calls to the same backend in the same run.

Starts the fake backend and the gateway (SQLite audit log on, API key checked) as separate
processes, then drives both with an aiohttp load generator at several concurrencies:

  1. zero-delay fake: added latency p50/p99 at concurrency 1, and the gateway's CPU time per
     request (its process CPU seconds / requests), non-streaming and a 100-chunk stream;
  2. realistic fake (50 ms, and 20 tokens/s when streaming): requests/s through the gateway
     as a share of direct, at concurrency 1, 8, 32, 128;
  3. throughput: plain requests/s at concurrency 32 and 128 against the zero-delay fake, direct
     and through the gateway with guards off and with the default policy, each request distinct;
  4. real CPU vLLM (--vllm URL, or skipped): tokens/s through the gateway vs direct, and time
     to first token added;
  5. limits (benchmarks/bench_limits.py): the limit check in process and with Redis at
     concurrency 1 and 32, on the limiter and end to end, against limits off in the same run;
  6. RAG (benchmarks/bench_rag.py): retrieval requests/s with the real MiniLM at concurrency
     1, 8, 32, before and after query batching and caching, in the same run.

Prints tables; `--json FILE` also writes the figures. Figures are ratios within one run, so
they hold on a busy machine better than absolute timings do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = [sys.executable, "-m", "gateway.cli"]
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "How fast is the gateway?"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and of every process below it (a gateway's workers are its children)."""
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent, CPU seconds)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree, grown = {pid}, True
    while grown:
        below = {child for child, (parent, _) in stats.items() if parent in tree}
        grown = not below <= tree
        tree |= below
    return sum(stats.get(member, (0, 0.0))[1] for member in tree)


def wait_http(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Proc:
    def __init__(self, args: list[str], health: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_http(health)
        except RuntimeError:
            self.process.kill()
            raise RuntimeError(self.process.stderr.read().decode() if self.process.stderr else "") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_fake(delay_ms: float = 0, tokens_per_s: float = 0, answer_tokens: int = 16) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        [
            *GATEWAY,
            "backend",
            "fake",
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--tokens-per-s",
            str(tokens_per_s),
            "--answer-tokens",
            str(answer_tokens),
            "--keep-requests",
            "0",
        ],
        f"http://127.0.0.1:{port}/health",
    )
    return proc, f"http://127.0.0.1:{port}"


GUARDS_OFF = Path(__file__).with_name("guards-off.toml")


def start_gateway(
    backend: str, data_dir: Path, policy: Path | None = GUARDS_OFF, workers: int = 1
) -> tuple[Proc, str, str]:
    # These requests use no retrieval: skip loading MiniLM and ingesting the sample corpus at each start.
    env = {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
        # The toxicity scorer's ONNX export, made once for every run (the default gateway's cache).
        "GATEWAY_ONNX_CACHE": str(ROOT / "data" / "onnx"),
    }
    out = subprocess.run(
        [*GATEWAY, "keys", "create", "--role", "client"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[0]
    port = free_port()
    extra = (["--policy", str(policy)] if policy else []) + ["--workers", str(workers)]
    proc = Proc(
        [*GATEWAY, "serve", "--backend", backend, "--port", str(port), *extra], f"http://127.0.0.1:{port}/readyz", env
    )
    return proc, f"http://127.0.0.1:{port}", key


async def drive(
    url: str,
    body: dict[str, Any],
    *,
    concurrency: int,
    requests: int,
    key: str | None,
    stream: bool,
    distinct: bool = False,
) -> dict[str, Any]:
    """Send `requests` requests with `concurrency` in flight; latency, TTFT and tokens per request.
    `distinct`: each request's last message gets its own number, so no cache (the toxicity guard's
    scores, the fake's answers) serves one request from another's work."""
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    payload = json.dumps({**body, "stream": stream}).encode()

    def numbered(i: int) -> bytes:
        messages = [*body["messages"][:-1], {**body["messages"][-1]}]
        messages[-1]["content"] = f"{messages[-1]['content']} (request {i})"
        return json.dumps({**body, "messages": messages, "stream": stream}).encode()

    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    todo = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            nonlocal tokens, errors
            for i in todo:
                start = time.perf_counter()
                data = numbered(i) if distinct else payload
                async with session.post(url, data=data, headers=headers) as resp:
                    if resp.status != 200:
                        errors += 1
                        await resp.read()
                        continue
                    if stream:
                        first = None
                        async for line in resp.content:
                            if (line.startswith(b"data: {") and b'"content":"' in line) or b'"text":"' in line:
                                if first is None:
                                    first = time.perf_counter() - start
                                tokens += 1
                        if first is not None:
                            ttfts.append(first)
                    else:
                        data = await resp.json(content_type=None)
                        tokens += (data.get("usage") or {}).get("completion_tokens", 0)
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "ttft_p50_ms": percentile(sorted(ttfts), 50) * 1000 if ttfts else None,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def zero_delay(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    variants = [(False, 16, "off"), (True, 100, "off"), (False, 16, "default"), (True, 100, "default")]
    for stream, answer_tokens, guards in variants:
        fake, fake_url = start_fake(answer_tokens=answer_tokens)
        policy = GUARDS_OFF if guards == "off" else None
        gw, gw_url, key = start_gateway(fake_url, data_dir / f"zero-{stream}-{guards}", policy)
        try:
            label = f"{'stream (100 chunks)' if stream else 'non-stream'}, guards {guards}"
            endpoint = "/v1/chat/completions"
            # Warm up both paths (connections, caches, the first SQLite commit).
            run(drive(fake_url + endpoint, CHAT, concurrency=4, requests=200, key=None, stream=stream))
            run(drive(gw_url + endpoint, CHAT, concurrency=4, requests=200, key=key, stream=stream))
            n = args.requests
            direct = run(drive(fake_url + endpoint, CHAT, concurrency=1, requests=n, key=None, stream=stream))
            cpu0 = cpu_seconds(gw.pid)
            through = run(drive(gw_url + endpoint, CHAT, concurrency=1, requests=n, key=key, stream=stream))
            cpu1 = cpu_seconds(gw.pid)
            # CPU per request under load too (concurrency 32), where batching helps.
            cpu2 = cpu_seconds(gw.pid)
            loaded = run(drive(gw_url + endpoint, CHAT, concurrency=32, requests=n * 2, key=key, stream=stream))
            cpu3 = cpu_seconds(gw.pid)
            results[label] = {
                "direct_p50_ms": direct["p50_ms"],
                "gateway_p50_ms": through["p50_ms"],
                "added_p50_ms": through["p50_ms"] - direct["p50_ms"],
                "direct_p99_ms": direct["p99_ms"],
                "gateway_p99_ms": through["p99_ms"],
                "added_p99_ms": through["p99_ms"] - direct["p99_ms"],
                "cpu_ms_per_request_c1": (cpu1 - cpu0) / through["requests"] * 1000,
                "cpu_ms_per_request_c32": (cpu3 - cpu2) / loaded["requests"] * 1000,
                "gateway_rps_c32": loaded["rps"],
                "errors": through["errors"] + loaded["errors"],
            }
        finally:
            gw.stop()
            fake.stop()
    return results


def realistic(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        fake, fake_url = start_fake(delay_ms=50, tokens_per_s=20 if stream else 0, answer_tokens=20 if stream else 16)
        gw, gw_url, key = start_gateway(fake_url, data_dir / f"real-{stream}")
        try:
            for concurrency in args.concurrency:
                # Enough requests for a few seconds of load at each level.
                n = max(concurrency * (3 if stream else 12), 40 if not stream else concurrency * 2)
                direct = run(
                    drive(
                        fake_url + "/v1/chat/completions",
                        CHAT,
                        concurrency=concurrency,
                        requests=n,
                        key=None,
                        stream=stream,
                    )
                )
                through = run(
                    drive(
                        gw_url + "/v1/chat/completions",
                        CHAT,
                        concurrency=concurrency,
                        requests=n,
                        key=key,
                        stream=stream,
                    )
                )
                rows.append(
                    {
                        "stream": stream,
                        "concurrency": concurrency,
                        "direct_rps": direct["rps"],
                        "gateway_rps": through["rps"],
                        "ratio": through["rps"] / direct["rps"],
                        "errors": through["errors"],
                    }
                )
        finally:
            gw.stop()
            fake.stop()
    return rows


def throughput(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    """Plain chat requests/s against the zero-delay fake, direct and through the gateway with guards
    off and with the default policy (SQLite audit log on), at concurrency 32 and 128; every request
    distinct (see `drive`), so the default policy scores every message and answer anew. The same
    load also goes through `benchmarks/floor_proxy.py`, the least a Python proxy can do per request.

    Each measurement also records the CPU per request of the load generator (this process), the
    fake and the gateway (its worker processes included), and from them a `ceiling`: the share of
    direct the machine allows. Through a proxy each request costs the load generator and the fake
    what it costs them direct (direct's figures) plus the gateway's CPU, and the cores are shared,
    so at most CORES / (generator + fake + gateway) requests per second; one gateway process runs
    its Python on about one core (the GIL), so also at most WORKERS / gateway. Direct itself is
    mostly limited by the load generator's one core. With the generator at ~0.1 ms and the fake at
    ~0.05 ms per request, 70 % of direct needs a gateway under ~0.13 ms per request, guards
    included; the ceiling says how far a result is from what the machine allows, not only from
    the target.
    """
    fake, fake_url = start_fake()
    gateways = {"guards off": (GUARDS_OFF, 1), "default guards": (None, 1), "default guards, 2 workers": (None, 2)}
    started: dict[str, tuple[Proc, str, str | None]] = {
        name: start_gateway(fake_url, data_dir / f"tp-{i}", policy, workers)
        for i, (name, (policy, workers)) in enumerate(gateways.items())
    }
    processes = {name: workers for name, (_, workers) in gateways.items()} | {"floor proxy": 1}
    port = free_port()
    floor = [sys.executable, str(ROOT / "benchmarks" / "floor_proxy.py"), "--port", str(port), "--backend", fake_url]
    started["floor proxy"] = (Proc(floor, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}", None)
    cores = len(os.sched_getaffinity(0))

    def measured(url: str, key: str | None, n: int, concurrency: int, gateway_pid: int | None) -> dict[str, Any]:
        pids = [fake.pid] + ([gateway_pid] if gateway_pid else [])
        before = [time.process_time()] + [cpu_seconds(pid) for pid in pids]
        out: dict[str, Any] = run(drive(url + "/v1/chat/completions", CHAT, key=key, requests=n,
                                        concurrency=concurrency, stream=False, distinct=True))  # fmt: skip
        after = [time.process_time()] + [cpu_seconds(pid) for pid in pids]
        per = [(b - a) / max(out["requests"], 1) * 1000 for a, b in zip(before, after, strict=True)]
        out["cpu_ms"] = dict(zip(["load generator", "fake", "gateway"], per, strict=False))
        return out

    rows = []
    try:
        for concurrency in (32, 128):
            n = max(args.requests // 2, concurrency * 4)
            run(drive(fake_url + "/v1/chat/completions", CHAT, key=None, requests=concurrency * 4,
                      concurrency=concurrency, stream=False))  # warm-up, as each proxy gets  # fmt: skip
            direct = measured(fake_url, None, n, concurrency, None)
            row: dict[str, Any] = {"concurrency": concurrency, "requests": n, "direct_rps": direct["rps"],
                                   "direct_cpu_ms": direct["cpu_ms"]}  # fmt: skip
            for name, (proc, url, key) in started.items():
                run(drive(url + "/v1/chat/completions", CHAT, key=key, requests=concurrency, concurrency=concurrency,
                          stream=False))  # warm-up  # fmt: skip
                through = measured(url, key, n, concurrency, proc.pid)
                cpu = through["cpu_ms"]
                rest = direct["cpu_ms"]["load generator"] + direct["cpu_ms"]["fake"]
                gateway_ms = max(cpu["gateway"], 1e-3)
                ceiling = min(direct["rps"], cores * 1000 / (rest + gateway_ms), processes[name] * 1000 / gateway_ms)
                row[name] = {"rps": through["rps"], "ratio": through["rps"] / direct["rps"],
                             "p99_ms": through["p99_ms"], "errors": through["errors"], "cpu_ms": cpu,
                             "ceiling": ceiling / direct["rps"]}  # fmt: skip
            rows.append(row)
    finally:
        for proc, _, _ in started.values():
            proc.stop()
        fake.stop()
    return rows


def real_vllm(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    gw, gw_url, key = start_gateway(args.vllm, data_dir / "vllm")
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 64,
        "ignore_eos": True,
        "temperature": 0,
    }
    out: dict[str, Any] = {}
    try:
        run(drive(args.vllm + "/v1/chat/completions", body, concurrency=2, requests=4, key=None, stream=True))
        for concurrency in (1, 8):
            n = 6 if concurrency == 1 else 16
            direct = run(
                drive(
                    args.vllm + "/v1/chat/completions", body, concurrency=concurrency, requests=n, key=None, stream=True
                )
            )
            through = run(
                drive(gw_url + "/v1/chat/completions", body, concurrency=concurrency, requests=n, key=key, stream=True)
            )
            out[f"c{concurrency}"] = {
                "direct_tokens_per_s": direct["tokens_per_s"],
                "gateway_tokens_per_s": through["tokens_per_s"],
                "ratio": through["tokens_per_s"] / direct["tokens_per_s"],
                "direct_ttft_p50_ms": direct["ttft_p50_ms"],
                "gateway_ttft_p50_ms": through["ttft_p50_ms"],
                "added_ttft_p50_ms": through["ttft_p50_ms"] - direct["ttft_p50_ms"],
            }
    finally:
        gw.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per zero-delay measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--vllm", default=None, help="URL of a running vLLM serving smollm2-135m-instruct")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["zero", "realistic", "throughput", "vllm", "limits", "rag"]
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    report: dict[str, Any] = {}
    try:
        if "zero" not in args.skip:
            report["zero_delay"] = zero = zero_delay(args, data_dir)
            print("\n## Zero-delay fake backend (audit log on, SQLite; guards off, then the default policy)")
            print("| mode | direct p50 | gateway p50 | added p50 | added p99 | gateway CPU/request (c=1) | (c=32) |")
            print("|---|---|---|---|---|---|---|")
            for mode, r in zero.items():
                print(
                    f"| {mode} | {r['direct_p50_ms']:.2f} ms | {r['gateway_p50_ms']:.2f} ms | "
                    f"**{r['added_p50_ms']:.2f} ms** | **{r['added_p99_ms']:.2f} ms** | "
                    f"{r['cpu_ms_per_request_c1']:.2f} ms | {r['cpu_ms_per_request_c32']:.2f} ms |"
                )
        if "realistic" not in args.skip:
            report["realistic"] = rows = realistic(args, data_dir)
            print("\n## Fake backend with 50 ms delay (streams: 20 tokens at 20 tokens/s)")
            print("| mode | concurrency | direct req/s | gateway req/s | gateway / direct |")
            print("|---|---|---|---|---|")
            for r in rows:
                print(
                    f"| {'stream' if r['stream'] else 'non-stream'} | {r['concurrency']} | {r['direct_rps']:.1f} | "
                    f"{r['gateway_rps']:.1f} | **{r['ratio'] * 100:.1f}%** |"
                )
        if "throughput" not in args.skip:
            report["throughput"] = tp = throughput(args, data_dir)
            print("\n## Plain requests/s, zero-delay fake, distinct requests (audit log on, SQLite)")
            names = [name for name in tp[0] if isinstance(tp[0][name], dict) and "rps" in tp[0][name]]
            print(
                "| concurrency | direct req/s | " + " | ".join(f"{n} req/s | / direct | ceiling" for n in names) + " |"
            )
            print("|---|---|" + "---|---|---|" * len(names))
            for r in tp:
                cells = [
                    f"{r[n]['rps']:.0f} | **{r[n]['ratio'] * 100:.0f}%** | {r[n]['ceiling'] * 100:.0f}%" for n in names
                ]
                print(f"| {r['concurrency']} | {r['direct_rps']:.0f} | " + " | ".join(cells) + " |")
            print("\nCPU ms per request (load generator / fake / gateway); ceiling = the share of direct the machine")
            print("allows: min(direct, CORES / (generator + fake, direct's figures, + gateway), WORKERS / gateway)")
            for r in tp:
                d = r["direct_cpu_ms"]
                parts = [f"direct {d['load generator']:.3f} / {d['fake']:.3f}"]
                for name in names:
                    c = r[name]["cpu_ms"]
                    parts.append(f"{name} {c['load generator']:.3f} / {c['fake']:.3f} / {c['gateway']:.3f}")
                print(f"- c={r['concurrency']}: " + "; ".join(parts))
        if args.vllm and "vllm" not in args.skip:
            report["vllm"] = v = real_vllm(args, data_dir)
            print("\n## Real CPU vLLM (SmolLM2-135M-Instruct), streams of 64 tokens")
            print("| concurrency | direct tok/s | gateway tok/s | ratio | direct TTFT p50 | gateway TTFT p50 | added |")
            print("|---|---|---|---|---|---|---|")
            for c, r in v.items():
                print(
                    f"| {c[1:]} | {r['direct_tokens_per_s']:.1f} | {r['gateway_tokens_per_s']:.1f} | "
                    f"**{r['ratio'] * 100:.1f}%** | {r['direct_ttft_p50_ms']:.1f} ms | "
                    f"{r['gateway_ttft_p50_ms']:.1f} ms"
                    f" | **{r['added_ttft_p50_ms']:.1f} ms** |"
                )
        if "limits" not in args.skip:
            # What the limit check adds, in process and with Redis (benchmarks/bench_limits.py).
            sys.path.insert(0, str(ROOT))
            from benchmarks.bench_limits import report as limits_report
            from benchmarks.bench_limits import run_all as limits_run

            report["limits"] = figures = limits_run(args.requests, data_dir)
            limits_report(figures)
        if "rag" not in args.skip:
            # RAG retrieval with the real MiniLM, before/after batching and caches (benchmarks/bench_rag.py).
            sys.path.insert(0, str(ROOT))
            from benchmarks.bench_rag import report as rag_report
            from benchmarks.bench_rag import run_all as rag_run

            rag_dir = data_dir / "rag"
            rag_dir.mkdir()
            report["rag"] = rag_rows = rag_run(256, [1, 8, 32], rag_dir)
            rag_report(rag_rows)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
