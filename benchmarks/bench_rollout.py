"""Benchmark: what deployments and shadow traffic cost, against the same gateway without them, in one run.

1. Routing, in process: `DeploymentRouter.complete` over an instant in-memory backend against
   calling that backend directly (weighted pick, sticky hash, route context, body copy), and
   `plan()` alone; per request, over many calls.
2. End to end at concurrency 32 (fake backends with a delay, SQLite audit log on, key checked):
   the same gateway (a) with `--backend` and no deployments, (b) with one weighted deployment,
   (c) with that deployment plus a shadow taking a copy of 100 % of requests (its own fake). The
   three run in alternating rounds so that machine noise falls on all of them alike; the primary's
   p50 and p99 are compared, and the shadow's copies are counted at its backend.

Targets (issue 10): routing <= 0.05 ms per request; the primary's p50 with a 100 % shadow within 5 %
of no shadow. `--json FILE` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import GATEWAY, GUARDS_OFF, Proc, cpu_seconds, drive, free_port, start_fake  # noqa: E402

from serving.backend import Backend, ModelCard  # noqa: E402
from serving.router import Deployment, DeploymentRouter, begin_route  # noqa: E402

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "How much does routing cost?"}]}
PLAIN = {**CHAT, "model": "fake-model"}


class Instant(Backend):
    """A backend that answers at once, so only the router's own work is timed."""

    name = "instant"
    answer: ClassVar[dict[str, Any]] = {
        "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]
    }

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.answer

    async def stream(self, path: str, body: dict[str, Any]):  # type: ignore[no-untyped-def]
        yield [b"{}"]

    async def models(self) -> list[ModelCard]:
        return [ModelCard("m", "x")]

    async def health(self) -> bool:
        return True


async def _time_calls(call: Any, n: int) -> float:
    """Seconds per call, best of 5 rounds of n (the minimum is the least disturbed by other work)."""
    rounds = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(n):
            await call()
        rounds.append((time.perf_counter() - began) / n)
    return min(rounds)


def routing(n: int) -> dict[str, float]:
    backend = Instant()
    deployments = [
        (Deployment("blue", "chat", "m", ("http://a",), weight=90), backend),
        (Deployment("green", "chat", "m", ("http://b",), weight=10), backend),
        (Deployment("candidate", "chat", "m2", ("http://c",), shadow=0.25), backend),
    ]
    router = DeploymentRouter(deployments)
    body = dict(CHAT)

    async def direct() -> None:
        await backend.complete("/v1/chat/completions", body)

    async def routed() -> None:
        begin_route()
        await router.complete("/v1/chat/completions", body)

    async def routed_sticky() -> None:
        begin_route(sticky="key_0123abcd")
        await router.complete("/v1/chat/completions", body)

    async def go() -> dict[str, float]:
        base = await _time_calls(direct, n)
        plain = await _time_calls(routed, n)
        sticky = await _time_calls(routed_sticky, n)
        return {
            "direct_us": base * 1e6,
            "routed_us": plain * 1e6,
            "routed_sticky_us": sticky * 1e6,
            "routing_cost_ms": (plain - base) * 1000,
            "routing_cost_sticky_ms": (sticky - base) * 1000,
        }

    return asyncio.run(go())


def start(data_dir: Path, config: str | None, backend: str | None) -> tuple[Proc, str, str]:
    import os
    import subprocess

    env = {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
    }
    out = subprocess.run([*GATEWAY, "keys", "create", "--role", "client"], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    key = out.stdout.strip().splitlines()[0]
    port = free_port()
    extra = ["--backend", backend] if backend else []
    if config:
        path = data_dir / "gateway.toml"
        path.write_text(config, encoding="utf-8")
        extra += ["--config", str(path)]
    args = [*GATEWAY, "serve", "--workers", "1", "--port", str(port), "--policy", str(GUARDS_OFF), *extra]
    return Proc(args, f"http://127.0.0.1:{port}/readyz", env), f"http://127.0.0.1:{port}", key


def deployment_config(primary: str, shadow: str | None) -> str:
    text = "shadow_max_in_flight = 64\n" if shadow else ""
    text += f"""
[[deployments]]
name = "blue"
model = "chat"
backend = "{primary}"
backend_model = "fake-model"
weight = 100
"""
    if shadow:
        text += f"""
[[deployments]]
name = "candidate"
model = "chat"
backend = "{shadow}"
backend_model = "fake-model"
shadow = 1.0
"""
    return text


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    procs: list[Proc] = []
    try:
        fake, fake_url = start_fake(delay_ms=args.delay_ms)
        shadow_fake, shadow_url = start_fake(delay_ms=args.delay_ms)
        procs += [fake, shadow_fake]
        gateways = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, config, backend in (
                ("no deployments", None, fake_url),
                ("one deployment", deployment_config(fake_url, None), None),
                ("deployment + 100% shadow", deployment_config(fake_url, shadow_url), None),
            ):
                data_dir = Path(tmp) / name.replace(" ", "_").replace("%", "")
                data_dir.mkdir()
                proc, url, key = start(data_dir, config, backend)
                procs.append(proc)
                gateways[name] = (url, key, PLAIN if backend else CHAT, proc.pid)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in gateways}
            for _ in range(args.rounds):
                for name, (url, key, body, pid) in gateways.items():
                    cpu = cpu_seconds(pid)
                    result = asyncio.run(drive(url + "/v1/chat/completions", body, concurrency=32,
                                               requests=args.requests, key=key, stream=False))  # fmt: skip
                    time.sleep(0.3)  # shadow copies still in flight finish (their CPU counts too)
                    result["cpu_ms"] = (cpu_seconds(pid) - cpu) * 1000 / max(1, result["requests"])
                    results[name].append(result)
            copies = httpx.get(shadow_url + "/fake/stats").json()["requests"]
    finally:
        for proc in procs:
            proc.stop()
    out: dict[str, Any] = {"copies_at_shadow": copies, "modes": {}}
    for name, runs in results.items():
        out["modes"][name] = {
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "rps": statistics.median(r["rps"] for r in runs),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="in-process routing calls per round")
    parser.add_argument("--requests", type=int, default=640, help="requests per mode per round, end to end")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three modes")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="fake backends' delay")
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    micro = routing(args.calls)
    print("## Routing, in process (best of 5 rounds)")
    print("| call | µs per request | added by routing |")
    print("|---|---|---|")
    print(f"| backend called directly | {micro['direct_us']:.2f} | |")
    print(
        f"| through DeploymentRouter (weighted pick) | {micro['routed_us']:.2f} | "
        f"**{micro['routing_cost_ms']:.4f} ms** |"
    )
    print(f"| same, sticky by key | {micro['routed_sticky_us']:.2f} | **{micro['routing_cost_sticky_ms']:.4f} ms** |")
    figures: dict[str, Any] = {"routing": micro}
    if not args.micro_only:
        e2e = end_to_end(args)
        figures["end_to_end"] = e2e
        base = e2e["modes"]["no deployments"]["p50_ms"]
        print(f"\n## End to end, concurrency 32, fake backends with {args.delay_ms:g} ms delay "
              f"(median of {args.rounds} alternating rounds of {args.requests} requests)")  # fmt: skip
        print("| gateway | p50 | p99 | req/s | gateway CPU/request | errors | p50 vs no deployments |")
        print("|---|---|---|---|---|---|---|")
        for name, m in e2e["modes"].items():
            print(f"| {name} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms | {m['rps']:.0f} | "
                  f"{m['cpu_ms']:.3f} ms | {m['errors']} | {(m['p50_ms'] / base - 1) * 100:+.1f}% |")  # fmt: skip
        print(
            f"copies counted at the shadow backend: {e2e['copies_at_shadow']} "
            f"(requests through the shadowed gateway: {e2e['modes']['deployment + 100% shadow']['requests']})"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
