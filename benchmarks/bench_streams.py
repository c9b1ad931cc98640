"""Benchmark: the stream relay's own CPU cost, before and after the relay rewrite, in one run.

Drives the relay in process (no HTTP, no backend) over a scripted 100-event chat stream with the
closing and usage events, unguarded, and reports the CPU time per stream and per event of:

  - `before`: `Pipeline._relay` as of the commit before the rewrite (read with `git show`);
  - `after`: `gateway.relay.StreamRelay` (this tree);
  - `after, alias`: the same with the alias renaming every event's `model` (re-encoded).

Both record into a no-op audit writer. Rounds alternate between the two so machine noise hits
both alike.

With `--live`, also the streaming feel (issue 15) against the fake backend at 30 tokens/s (60
tokens an answer), direct and through a gateway (SQLite audit log on) with guards off, the
default guards (`stream_mode = "checked"`) and the default guards with
`stream_mode = "optimistic"`: time to the first content token, and content events per token.

Usage: `.venv/bin/python benchmarks/bench_streams.py [--rounds 7] [--streams 400] [--live N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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


def _feel(url: str, key: str | None, n: int) -> tuple[float, float]:
    """(median ms to the first content token, content events per token) over n streams."""
    import httpx

    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Tell me about streams."}], "stream": True}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    ttfts, ratios = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            began, first, events, text = time.perf_counter(), None, 0, ""
            with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = msgspec.json.decode(line[6:])
                    piece = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])
                    if piece:
                        first = first or time.perf_counter()
                        events += 1
                        text += piece
            assert first is not None
            ttfts.append((first - began) * 1000)
            ratios.append(events / len(text.split()))
    return statistics.median(ttfts), statistics.median(ratios)


def live(n: int) -> None:
    from gateway.settings import Settings
    from serving.fake import FakeBackendThread, FakeConfig
    from tests.helpers import GatewayServer, create_key, prepare_database

    tmp = Path(tempfile.mkdtemp())
    optimistic = tmp / "optimistic.toml"
    optimistic.write_text('version = 1\n[defaults]\nstream_mode = "optimistic"\n')
    policies = {
        "guards off": ROOT / "benchmarks" / "guards-off.toml",
        "default guards, checked": None,
        "default guards, optimistic": optimistic,
    }
    with FakeBackendThread(FakeConfig(models=("fake-model",), tokens_per_s=30, answer_tokens=60)) as fake:
        rows = [("direct", *_feel(fake.url, None, n))]
        for name, policy in policies.items():
            settings = Settings(
                data_dir=tmp / name.replace(" ", "_").replace(",", ""),
                backend=(fake.url,),
                embedding_model="hashing",
                sample_corpus=False,
                policy=policy,
            )
            prepare_database(settings)
            _, key = create_key(settings, "client", "bench")
            with GatewayServer(settings) as server:
                _feel(server.url, key, 1)  # warm up
                rows.append((name, *_feel(server.url, key, n)))
    base = rows[1][1]
    print(f"streaming feel, fake backend at 30 tokens/s, 60 tokens (median of {n} streams)")
    for name, ttft, ratio in rows:
        added = f"{ttft - base:+7.1f} ms vs guards off" if name != "direct" else ""
        print(f"  {name:28s} first token {ttft:7.1f} ms {added:24s} content events per token {ratio:4.2f}")


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
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.streams))
    if args.live:
        live(args.live)
