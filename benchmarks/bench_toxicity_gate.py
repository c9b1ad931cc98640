"""Plain chat requests/s through the gateway with the default policy, the toxicity gate on and off,
against direct calls and guards off, in one run.

    .venv/bin/python benchmarks/bench_toxicity_gate.py [--requests 600] [--concurrency 32]

The zero-delay fake backend and three `gateway serve` processes (SQLite audit log on, hashing
embedder, the toxicity scorer on ONNX as bench_gateway.py starts them): guards off
(`benchmarks/guards-off.toml`), the default policy (gate on), and the default policy with
`[scorers.toxicity] gate = false`. Every request is distinct (`drive(distinct=True)`), so the
toxicity guard scores each user message and answer anew. Prints requests/s, the share of direct
(issue 15 asks 70 % for plain requests with default guards) and the gateway's CPU per request.
What the gate saves depends on the text: the fake backend's prompt and answer are short and
plain; bench_trained_toxicity.py measures the share of the benign chat set's sentences it skips.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import CHAT, GUARDS_OFF, cpu_seconds, drive, run, start_fake, start_gateway  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        gate_off = Path(tmp) / "gate-off.toml"
        gate_off.write_text("version = 1\n\n[scorers.toxicity]\ngate = false\n", encoding="utf-8")
        fake, fake_url = start_fake()
        policies: dict[str, Path | None] = {"guards off": GUARDS_OFF, "default, gate on": None,
                                            "default, gate off": gate_off}  # fmt: skip
        started = {
            name: start_gateway(fake_url, Path(tmp) / f"g{i}", p) for i, (name, p) in enumerate(policies.items())
        }
        try:
            print(f"load average before: {os.getloadavg()}")
            n, c = args.requests, args.concurrency
            direct = run(drive(fake_url + "/v1/chat/completions", CHAT, key=None, requests=n, concurrency=c,
                               stream=False, distinct=True))  # fmt: skip
            print(f"direct: {direct['rps']:.0f} requests/s ({n} requests, concurrency {c})")
            for name, (proc, url, key) in started.items():
                run(drive(url + "/v1/chat/completions", CHAT, key=key, requests=c, concurrency=c, stream=False))
                cpu0 = cpu_seconds(proc.pid)
                got = run(drive(url + "/v1/chat/completions", CHAT, key=key, requests=n, concurrency=c,
                                stream=False, distinct=True))  # fmt: skip
                cpu = (cpu_seconds(proc.pid) - cpu0) * 1000 / n
                print(f"{name:<18} {got['rps']:7.1f} requests/s = {got['rps'] / direct['rps']:6.1%} of direct; "
                      f"gateway CPU {cpu:.2f} ms per request; p99 {got['p99_ms']:.0f} ms; "
                      f"errors {got['errors']}")  # fmt: skip
            print(f"load average after:  {os.getloadavg()}")
        finally:
            for proc, _, _ in started.values():
                proc.stop()
            fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
