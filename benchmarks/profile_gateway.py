"""Where the gateway's time goes: py-spy profiles of `gateway serve` under load, summarised.

Each scenario starts the zero-delay fake backend and one `gateway serve` process (SQLite audit log
on, open mode) under `py-spy record` (raw collapsed stacks, 250 samples/s, idle threads left out),
drives it with aiohttp from this process, stops it, and writes:

- `OUT/<scenario>.collapsed`: py-spy's collapsed stacks (flamegraph.pl or speedscope.app read it),
- `OUT/<scenario>.txt`: the summary printed here: requests/s, the gateway's CPU per request, and the
  share of samples by thread, by leaf function (self time) and by the project functions and
  libraries that contain them (inclusive time).

Scenarios:
- `plain-default`: plain chat completions (a distinct prompt each), the default policy (input and
  output toxicity with the trained scorer on the bundled MiniLM), concurrency 32;
- `plain-off`: the same with `benchmarks/guards-off.toml`, the gateway itself;
- `rag`: chat completions with `rag: {"collection": "sample"}` and a distinct question each, guards
  off, concurrency 8: query embedding, FAISS search, the cited prompt.

    .venv/bin/python benchmarks/profile_gateway.py [--scenarios rag plain-default plain-off] \
        [--requests 1500] [--out benchmarks/profiles]

py-spy samples from outside the process (no instrumentation), so the figures under it are close
to the unprofiled ones; the requests/s it prints are still under the profiler, not benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import GATEWAY, GUARDS_OFF, cpu_seconds, free_port, start_fake  # noqa: E402
from benchmarks.bench_rag import TOPICS, drive_gateway, wait_ready  # noqa: E402

PROJECT_FRAME = re.compile(r"\((?:.*/)?(?:gateway|retrieval|guardrails)/[^/]+\.py:")
PY_SPY = Path(sys.executable).with_name("py-spy")
SCENARIOS = {
    # name: (policy, rag, concurrency)
    "plain-default": (None, False, 32),
    "plain-off": (GUARDS_OFF, False, 32),
    "rag": (GUARDS_OFF, True, 8),
}
#: Frames that name where time goes, matched on the file path of a frame (first match wins).
AREAS = [
    ("onnxruntime (MiniLM forward pass)", "onnxruntime/"),
    ("tokenizers", "tokenizers/"),
    ("faiss", "faiss/"),
    ("sklearn / profanity-check", "sklearn/"),
    ("retrieval/ (embedding, FAISS, prompt)", "retrieval/"),
    ("guardrails/ (guards)", "guardrails/"),
    ("gateway/audit*.py (audit log)", "gateway/audit"),
    ("gateway/httpserver.py (HTTP)", "gateway/httpserver.py"),
    ("numpy", "numpy/"),
    ("sqlite3", "sqlite3/"),
    ("litestar", "litestar/"),
    ("asyncio event loop", "asyncio/"),
]


def prompts(n: int, rag: bool) -> list[str]:
    if rag:
        return [f"question {i}: how does the {TOPICS[i % len(TOPICS)]} work, case {i}?" for i in range(n)]
    return [f"Message {i}: please summarise the notes about {TOPICS[i % len(TOPICS)]} for me." for i in range(n)]


def parse(collapsed: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: `frame;frame;... COUNT` per line, root first."""
    stacks = []
    for line in collapsed.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int = 25) -> list[str]:
    total = sum(count for _, count in stacks) or 1
    threads: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    project: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        threads[frames[0] if frames[0].startswith(("thread", "process")) else "(main)"] += count
        leaves[frames[-1]] += count
        for name, marker in AREAS:  # the innermost frame in a named area decides
            if any(marker in frame for frame in frames):
                areas[name] += count
                break
        else:
            areas["other"] += count
        seen = set()
        for frame in frames:  # inclusive time of the project's own functions
            if PROJECT_FRAME.search(frame) and frame not in seen:
                seen.add(frame)
                project[frame] += count

    def pct(count: int) -> str:
        return f"{100 * count / total:5.1f} %"

    lines = [f"samples: {total}", "", "## by thread"]
    lines += [f"{pct(c)}  {name}" for name, c in threads.most_common(8)]
    lines += ["", "## by area (a sample counts once, for the first area in this list that its stack enters)"]
    lines += [f"{pct(c)}  {name}" for name, c in areas.most_common()]
    lines += ["", f"## leaf functions (self time), top {top}"]
    lines += [f"{pct(c)}  {name}" for name, c in leaves.most_common(top)]
    lines += ["", f"## project functions (inclusive time), top {top}"]
    lines += [f"{pct(c)}  {name}" for name, c in project.most_common(top)]
    return lines


def run(scenario: str, requests: int, out: Path) -> list[str]:
    policy, rag, concurrency = SCENARIOS[scenario]
    fake, fake_url = start_fake()
    collapsed = out / f"{scenario}.collapsed"
    with tempfile.TemporaryDirectory(prefix="gw-profile-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = [*GATEWAY, "serve", "--workers", "1", "--backend", fake_url, "--port", str(port)]
        if policy is not None:
            args += ["--policy", str(policy)]
        env = {
            **os.environ,
            "GATEWAY_DATA_DIR": tmp,
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_OPEN": "true",
            "GATEWAY_SAMPLE_CORPUS": "true" if rag else "false",
        }
        gateway = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spy: subprocess.Popen[bytes] | None = None
        try:
            wait_ready(url)
            texts = prompts(requests + 16, rag)
            asyncio.run(drive_gateway(url, texts[:16], 4, rag))  # warm-up: start-up and first calls stay out
            # Attached only now, so the profile is the load alone (not imports, model loads, exports).
            spy = subprocess.Popen(
                [str(PY_SPY), "record", "--format", "raw", "--rate", "250", "--output", str(collapsed),
                 "--threads", "--nonblocking", "--pid", str(gateway.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            cpu = cpu_seconds(gateway.pid)
            rps, errors = asyncio.run(drive_gateway(url, texts[16:], concurrency, rag))
            cpu_ms = (cpu_seconds(gateway.pid) - cpu) * 1000 / requests
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
        finally:
            for proc in (spy, gateway):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            fake.stop()
    load = os.getloadavg()
    head = [
        f"# {scenario}: {requests} requests at concurrency {concurrency}, "
        f"{'RAG on the sample collection' if rag else 'plain chat'}, policy {policy.name if policy else 'default'}",
        f"under py-spy: {rps:.1f} requests/s, {errors} errors, gateway CPU {cpu_ms:.2f} ms per request; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    lines = head + summarise(parse(collapsed))
    (out / f"{scenario}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "profiles")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios:
        print("\n".join(run(scenario, args.requests, args.out)), flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
