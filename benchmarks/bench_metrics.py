"""Benchmark: what metrics (and traces) cost per request.

1. In process: `GatewayMetrics.observe` and `RequestTracer.observe` (batch processor, in-memory
   exporter) on a realistic finished Trace (four verdicts, usage, a stream), p50 and p99.
2. End to end: two gateways on the same zero-delay fake backend, one with `metrics = "off"` and
   one with metrics on (the default, "admin"), driven in alternating rounds at concurrency 1 (so
   drift in machine load hits both alike); latency p50 and gateway CPU per request, median of
   the rounds. The difference is the figure; on a busy 2-core machine it is within the noise.

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 6] [--requests 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gateway import CHAT, cpu_seconds, drive, run, start_fake, start_gateway


def _trace() -> Any:
    from gateway.pipeline import CHAT as CHAT_ENDPOINT
    from gateway.pipeline import Trace
    from guardrails import Verdict

    trace = Trace(CHAT_ENDPOINT, "127.0.0.1")
    trace.model, trace.backend, trace.stream = "fake-model", "http://127.0.0.1:8200", True
    trace.usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    trace.backend_s, trace.ttft_s = 0.01, 0.002
    trace.verdicts = [
        Verdict("keywords", True, 0.0, "allow", ms=0.1),
        Verdict("injection", True, 0.0, "allow", ms=0.2),
        Verdict("toxicity", True, 0.01, "allow", ms=0.5, stage="output"),
        Verdict("groundedness", True, 0.9, "allow", ms=0.3, stage="output"),
    ]
    trace.created_at = datetime.now(UTC)
    return trace


def _time(fn: Any, n: int = 20_000) -> dict[str, float]:
    for _ in range(500):
        fn()
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    samples.sort()
    return {"p50_us": samples[n // 2] * 1e6, "p99_us": samples[int(n * 0.99)] * 1e6}


def in_process() -> dict[str, Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.metrics import GatewayMetrics
    from gateway.tracing import CURRENT, RequestTracer, begin

    trace = _trace()
    metrics = GatewayMetrics(served_models=lambda: ["fake-model"], known_backends=lambda: [trace.backend])
    out = {"metrics_observe": _time(lambda: metrics.observe(trace))}
    exporter = InMemorySpanExporter()
    tracer = RequestTracer(processor=BatchSpanProcessor(exporter, max_queue_size=1 << 16))
    context, _ = begin(None, None, True)
    token = CURRENT.set(context)
    try:
        out["tracer_observe"] = _time(lambda: tracer.observe(trace), n=5_000)
    finally:
        CURRENT.reset(token)
        tracer.close()
    return out


def end_to_end(rounds: int, requests: int, data_dir: Path) -> dict[str, Any]:
    fake, fake_url = start_fake()
    gateways = {}
    try:
        for mode in ("off", "admin"):
            os.environ["GATEWAY_METRICS"] = mode
            gateways[mode] = start_gateway(fake_url, data_dir / f"metrics-{mode}", policy=None)  # default guards
        os.environ.pop("GATEWAY_METRICS", None)
        url = "/v1/chat/completions"
        for _, gw_url, key in gateways.values():  # warm up
            run(drive(gw_url + url, CHAT, concurrency=4, requests=200, key=key, stream=False))
        figures: dict[str, dict[str, list[float]]] = {m: {"p50_ms": [], "cpu_ms": []} for m in gateways}
        for _ in range(rounds):
            for mode, (proc, gw_url, key) in gateways.items():
                cpu0 = cpu_seconds(proc.pid)
                got = run(drive(gw_url + url, CHAT, concurrency=1, requests=requests, key=key, stream=False))
                cpu1 = cpu_seconds(proc.pid)
                assert got["errors"] == 0
                figures[mode]["p50_ms"].append(got["p50_ms"])
                figures[mode]["cpu_ms"].append((cpu1 - cpu0) / got["requests"] * 1000)
        result = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in figures.items()}
        result["metrics_cost"] = {
            "p50_ms": result["admin"]["p50_ms"] - result["off"]["p50_ms"],
            "cpu_ms_per_request": result["admin"]["cpu_ms"] - result["off"]["cpu_ms"],
        }
        result["rounds"] = {m: f for m, f in figures.items()}
        return result
    finally:
        for proc, _, _ in gateways.values():
            proc.stop()
        fake.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--skip-http", action="store_true", help="only the in-process figures")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"in_process": in_process()}
    for name, figure in results["in_process"].items():
        print(f"{name:18s} p50 {figure['p50_us']:7.1f} us   p99 {figure['p99_us']:7.1f} us")
    if not args.skip_http:
        with tempfile.TemporaryDirectory() as tmp:
            results["end_to_end"] = e2e = end_to_end(args.rounds, args.requests, Path(tmp))
        for mode in ("off", "admin"):
            print(
                f"metrics {mode:5s}: p50 {e2e[mode]['p50_ms']:.3f} ms, gateway CPU {e2e[mode]['cpu_ms']:.3f} ms/request"
            )
        cost = e2e["metrics_cost"]
        p50_us, cpu_us = cost["p50_ms"] * 1000, cost["cpu_ms_per_request"] * 1000
        print(f"metrics cost: p50 {p50_us:+.0f} us, CPU {cpu_us:+.0f} us/request")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
