"""Benchmark: the stream relay's own CPU cost, before and after the relay rewrite, in one run.

Drives the relay in process (no HTTP, no backend) over a scripted 100-event chat stream with the
closing and usage events, unguarded, and reports the CPU time per stream and per event of:

  - `before`: `Pipeline._relay` as of the commit before the rewrite (read with `git show`);
  - `after`: `gateway.relay.StreamRelay` (this tree);
  - `after, alias`: the same with the alias renaming every event's `model` (re-encoded).

Both record into a no-op audit writer. Rounds alternate between the two so machine noise hits
both alike.

With `--live N`, also the streaming feel (issue 15) against the fake backend at 30 tokens/s (60
tokens an answer, one word per event), direct and through `gateway serve` processes (SQLite
audit log on) with guards off, the default guards (`stream_mode = "checked"`) and the default
guards with `stream_mode = "optimistic"`: time to the first content token (median, p90, and
added over guards off), content events per token, and the longest gap between content events.
With `--before DIR` (a checkout of an earlier commit: `git worktree add DIR REV`), the same
rows for that code in the same run, from the same virtualenv.

Usage: `.venv/bin/python benchmarks/bench_streams.py [--rounds 7] [--streams 400] [--live N [--before DIR]]
[--only-live] [--scorer KIND] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.pipeline import CHAT, Trace  # noqa: E402
from gateway.relay import StreamRelay  # noqa: E402

BEFORE = "3010ee1"  # the last commit with Pipeline._relay
EVENTS = 100


def _events() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake-model"}
    out = [
        msgspec.json.encode(
            {**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
        )
        for i in range(EVENTS - 1)
    ]
    out.append(msgspec.json.encode({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 5, "completion_tokens": EVENTS, "total_tokens": EVENTS + 5}
    out.append(msgspec.json.encode({**base, "choices": [], "usage": usage}))
    return out


class _Audit:
    async def submit(self, row: dict[str, Any]) -> None:
        return None


async def _upstream(batches: list[list[bytes]]) -> AsyncIterator[list[bytes]]:
    for batch in batches:
        yield batch


def _load_before() -> Any:
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:gateway/pipeline.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "pipeline_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pipeline_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_before"] = module
    spec.loader.exec_module(module)
    return module


async def _drain(stream: AsyncIterator[bytes]) -> int:
    n = 0
    async for chunk in stream:
        n += len(chunk)
    return n


def _runner_before(module: Any) -> Callable[[list[bytes]], AsyncIterator[bytes]]:
    pipeline = module.Pipeline(backend=None, audit=_Audit(), keys=None)

    def run(events: list[bytes]) -> AsyncIterator[bytes]:
        trace = module.Trace(module.CHAT, "127.0.0.1", model="fake-model", stream=True, backend="bench")
        batches = [[e] for e in events]
        return pipeline._relay(trace, _upstream(batches[1:]), batches[0], time.perf_counter(), None)  # type: ignore[no-any-return]

    return run


def _runner_after(alias: bool) -> Callable[[list[bytes]], AsyncIterator[bytes]]:
    audit = _Audit()

    async def record(trace: Trace) -> None:
        await audit.submit(trace.row())

    def run(events: list[bytes]) -> AsyncIterator[bytes]:
        trace = Trace(CHAT, "127.0.0.1", model="fast" if alias else "fake-model", stream=True, backend="bench")
        if alias:
            trace.backend_model = "fake-model"
        batches = [[e] for e in events]
        relay = StreamRelay(trace, None, time.perf_counter(), record, lambda t: None)
        return relay.run(_upstream(batches[1:]), batches[0])

    return run


async def _measure(run: Callable[[list[bytes]], AsyncIterator[bytes]], events: list[bytes], streams: int) -> float:
    """CPU seconds per stream."""
    began = time.process_time()
    for _ in range(streams):
        await _drain(run(events))
    return (time.process_time() - began) / streams


def _feel(url: str, key: str | None, n: int) -> dict[str, float]:
    """Over n streams: median and 90th percentile ms to the first content token, content events
    per token (tokens: the words of the answer, one per backend event), and the longest gap
    between two content events (a stall the client sees)."""
    import httpx

    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Tell me about streams."}], "stream": True}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    ttfts, ratios, gaps = [], [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            began, seen, text = time.perf_counter(), [], ""
            with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = msgspec.json.decode(line[6:])
                    piece = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])
                    if piece:
                        seen.append(time.perf_counter())
                        text += piece
            assert seen, "no content arrived"
            ttfts.append((seen[0] - began) * 1000)
            ratios.append(len(seen) / len(text.split()))
            gaps.append(max((b - a for a, b in itertools.pairwise(seen)), default=0.0) * 1000)
    ttfts.sort()
    return {
        "ttft_ms": statistics.median(ttfts),
        "ttft_p90_ms": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "events_per_token": statistics.median(ratios),
        "max_gap_ms": statistics.median(gaps),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(tree: Path, data_dir: Path, backend: str, policy: Path | None) -> tuple[subprocess.Popen[bytes], str, str]:
    """`gateway serve` run from the checkout `tree` (its own code, this virtualenv): (process, url, key)."""
    import httpx

    env = {
        **os.environ,
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_EMBEDDING_MODEL": "hashing",
        "GATEWAY_SAMPLE_CORPUS": "false",
        "GATEWAY_LOG_LEVEL": "warning",
        "PYTHONPATH": str(tree),
    }
    cli = [sys.executable, "-m", "gateway.cli"]
    subprocess.run([*cli, "db", "upgrade"], cwd=tree, env=env, check=True, capture_output=True)
    made = subprocess.run(
        [*cli, "keys", "create", "--role", "client"], cwd=tree, env=env, check=True, capture_output=True
    )
    key = made.stdout.decode().strip().splitlines()[0]
    port = _free_port()
    args = [
        *cli,
        "serve",
        "--workers",
        "1",
        "--backend",
        backend,
        "--port",
        str(port),
        *(["--policy", str(policy)] if policy else []),
    ]
    proc = subprocess.Popen(args, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((proc.stderr.read() if proc.stderr else b"").decode())
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the gateway from {tree} did not become ready")


def live(n: int, before: Path | None, scorer: str | None = None) -> list[dict[str, Any]]:
    from serving.fake import FakeBackendThread, FakeConfig

    tmp = Path(tempfile.mkdtemp())
    scorers = f'[scorers.toxicity]\nscorer = "{scorer}"\n' if scorer else ""
    checked = tmp / "checked.toml"
    checked.write_text("version = 1\n" + scorers)
    optimistic = tmp / "optimistic.toml"
    optimistic.write_text('version = 1\n[defaults]\nstream_mode = "optimistic"\n' + scorers)
    policies = {
        "guards off": ROOT / "benchmarks" / "guards-off.toml",
        "default guards, checked": checked,
        "default guards, optimistic": optimistic,
    }
    trees = {"after": ROOT, **({"before": before} if before else {})}
    rows: list[dict[str, Any]] = []
    with FakeBackendThread(FakeConfig(models=("fake-model",), tokens_per_s=30, answer_tokens=60)) as fake:
        rows.append({"tree": "", "name": "direct", **_feel(fake.url, None, n)})
        for tree_name, tree in trees.items():
            for name, policy in policies.items():
                data_dir = tmp / f"{tree_name}-{name.replace(' ', '_').replace(',', '')}"
                proc, url, key = _serve(tree, data_dir, fake.url, policy)
                try:
                    _feel(url, key, 1)  # warm up
                    rows.append({"tree": tree_name, "name": name, **_feel(url, key, n)})
                finally:
                    proc.terminate()
                    proc.wait(90)  # graceful: it drains and flushes first (slow on a loaded machine)
    off = {r["tree"]: r["ttft_ms"] for r in rows if r["name"] == "guards off"}
    which = f"toxicity scorer {scorer}" if scorer else "the default toxicity scorer"
    print(f"\nstreaming feel, fake backend at 30 tokens/s, 60 tokens, {which} (median of {n} streams)")
    print(
        f"  {'':36s} {'first token':>11s} {'p90':>7s} {'vs guards off':>13s} {'events/token':>12s} {'longest gap':>11s}"
    )
    for r in rows:
        added = f"{r['ttft_ms'] - off[r['tree']]:+9.1f} ms" if r["tree"] else ""
        label = f"{r['tree']}: {r['name']}" if r["tree"] else r["name"]
        print(
            f"  {label:36s} {r['ttft_ms']:8.1f} ms {r['ttft_p90_ms']:7.1f} {added:>13s} "
            f"{r['events_per_token']:12.2f} {r['max_gap_ms']:8.1f} ms"
        )
    return rows


async def main(rounds: int, streams: int) -> None:
    events = _events()
    runners = {
        "before (Pipeline._relay)": _runner_before(_load_before()),
        "after (StreamRelay)": _runner_after(alias=False),
        "after, alias renamed": _runner_after(alias=True),
    }
    for run in runners.values():  # warm up, and check they agree on the bytes
        await _drain(run(events))
    figures: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            figures[name].append(await _measure(run, events, streams))
    print(f"relay CPU per {EVENTS}-event unguarded stream (median of {rounds} rounds x {streams} streams)")
    base = statistics.median(figures["before (Pipeline._relay)"])
    for name, values in figures.items():
        per_stream = statistics.median(values)
        print(
            f"  {name:28s} {per_stream * 1e3:7.3f} ms/stream  {per_stream / EVENTS * 1e6:6.2f} us/event"
            f"  ({(per_stream - base) * 1e3:+.3f} ms vs before)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--live", type=int, default=0, help="also the streaming feel, over this many streams each")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="with --live: a checkout of an earlier commit (git worktree add DIR REV) measured in the same run",
    )
    parser.add_argument("--only-live", action="store_true", help="skip the relay CPU rounds")
    parser.add_argument(
        "--scorer", default=None, help="with --live: the policy's [scorers.toxicity] scorer (default: the default)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the live rows here")
    args = parser.parse_args()
    if not args.only_live:
        asyncio.run(main(args.rounds, args.streams))
    if args.live:
        rows = live(args.live, args.before, args.scorer)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
