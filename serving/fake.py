"""A deterministic OpenAI-compatible fake backend: a real HTTP server, for tests, demos and benchmarks.

It answers `/v1/chat/completions` and `/v1/completions` (streaming too, with
`stream_options.include_usage`), `/v1/models` and `/health` like vLLM does, after a
configurable delay and at a configurable token rate, with an answer that depends only on the
prompt. A request may steer it through an extension field that the gateway passes through
untouched, `"fake": {"status": 400, "message": "...", "delay_ms": 10, "answer": "text"}`.
`GET /fake/requests` returns the bodies it received; `GET /fake/stats` counts finished and
aborted streams, so tests can see that the gateway cancelled an upstream request.

Misbehaviour on request, for tests of what the gateway does with a broken backend (all in the
same `fake` field):

- `"body": VALUE`: answer 200 with VALUE as the JSON body, whatever it is (an array, bad choices).
- `"raw": "TEXT"`: answer 200 with exactly these bytes (UTF-8) as the body (invalid JSON).
- `"events": [VALUE or "TEXT", ...]`: a stream of exactly these events (TEXT is sent verbatim
  after `data: `), then `[DONE]` unless `"done": false`.
- `"pad_bytes": N`: the answer's text carries N more bytes, in one event when streamed.
- `"cut_after": K`: a stream ends cleanly after K events, with no finish_reason and no `[DONE]`.
- `"trickle_ms": MS` (with `"trickle_after": K`): after K events (or, not streaming, at once)
  the rest of the answer goes out one byte every MS milliseconds.

A safety classifier, for the moderation guard: requests for a model in `guard_models` are
answered like Llama Guard, from `guard_script`: the first trigger (lowercase text) found in the
last message of the conversation (the last `User:`/`Agent:` turn of a Llama Guard prompt, or the
last chat message) gives the answer, a string such as `"unsafe\nS1"` or a steer object as above
(`{"status": 503}`, `{"delay_ms": 5000}`, `{"raw": "..."}`); no trigger: `safe`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_WORDS = [
    "the",
    "gateway",
    "answers",
    "every",
    "request",
    "quickly",
    "and",
    "logs",
    "each",
    "reply",
    "so",
    "reviewers",
    "can",
    "audit",
    "what",
    "the",
    "model",
    "said",
    "about",
    "passages",
    "citations",
    "guards",
    "latency",
    "tokens",
    "and",
    "streams",
]


@dataclass
class FakeConfig:
    """How the fake behaves; every request may override delay, status and answer."""

    models: tuple[str, ...] = ("fake-model",)
    delay_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0: stream as fast as possible
    answer_tokens: int = 16
    keep_requests: int = 256
    #: Models answered like a Llama Guard safety classifier, from `guard_script`.
    guard_models: tuple[str, ...] = ()
    #: trigger (lowercase text in the last message) -> answer text or steer object; else "safe".
    guard_script: dict[str, Any] = field(default_factory=dict)


def _answer(prompt: str, n_tokens: int, choice: int) -> list[str]:
    """Deterministic tokens: words from a small vocabulary, a sentence every 8 words."""
    seed = int.from_bytes(hashlib.blake2b(f"{choice}:{prompt}".encode(), digest_size=8).digest(), "big")
    tokens = [_WORDS[(seed >> (i % 48) ^ i * 7) % len(_WORDS)] for i in range(n_tokens)]
    for i in range(len(tokens)):
        if i % 8 == 0:
            tokens[i] = tokens[i].capitalize()
        if i % 8 == 7 or i == len(tokens) - 1:
            tokens[i] += "."
    return [t if i == len(tokens) - 1 else t + " " for i, t in enumerate(tokens)]


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts: list[str] = []
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
            elif content:
                parts.append(str(content))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


_TURN = re.compile(r"(?:^|\n\n)(?:User|Agent): ")


def _last_turn(body: dict[str, Any]) -> str:
    """The message a Llama Guard request asks about: the last turn of its conversation."""
    if isinstance(body.get("messages"), list) and body["messages"]:
        last = body["messages"][-1]
        return _prompt_text({"messages": [last]}) if isinstance(last, dict) else ""
    prompt = _prompt_text(body)
    start, end = prompt.find("<BEGIN CONVERSATION>"), prompt.find("<END CONVERSATION>")
    if start < 0 or end < start:
        return prompt
    return _TURN.split(prompt[start + len("<BEGIN CONVERSATION>") : end].strip())[-1]


def _guard_steer(script: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    text = _last_turn(body).lower()
    for trigger, answer in script.items():
        if trigger.lower() in text:
            return dict(answer) if isinstance(answer, dict) else {"answer": str(answer)}
    return {"answer": "safe"}


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


class FakeBackend:
    """The aiohttp application and its counters."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.config.keep_requests)
        self.traceparents: deque[str | None] = deque(maxlen=self.config.keep_requests)  # W3C header per request
        self.stats = {"requests": 0, "completed": 0, "aborted": 0}
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/v1/models", self._models),
                web.post("/v1/chat/completions", self._chat),
                web.post("/v1/completions", self._completions),
                web.get("/fake/requests", self._requests),
                web.get("/fake/stats", self._stats),
                web.get("/fake/traceparents", self._traceparents),
                web.post("/fake/reset", self._reset),
            ]
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake", "root": m, "max_model_len": 4096}
            for m in (*self.config.models, *self.config.guard_models)
        ]
        return web.Response(body=_encode({"object": "list", "data": data}), content_type="application/json")

    async def _requests(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(list(self.requests)), content_type="application/json")

    async def _traceparents(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(list(self.traceparents)), content_type="application/json")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(self.stats), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.traceparents.clear()
        self.stats.update(requests=0, completed=0, aborted=0)
        return web.Response(body=b"{}", content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = _decode(await request.read())
        except msgspec.DecodeError:
            return _error(400, "invalid JSON body")
        self.stats["requests"] += 1
        if self.config.keep_requests:
            self.requests.append(body)
            self.traceparents.append(request.headers.get("traceparent"))
        steer = body.get("fake") if isinstance(body.get("fake"), dict) else {}
        model = body.get("model")
        if model in self.config.guard_models:
            steer = {**_guard_steer(self.config.guard_script, body), **steer}
        elif model not in self.config.models:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if "status" in steer:
            return _error(int(steer["status"]), str(steer.get("message", "fake error")))
        if "body" in steer or "raw" in steer or "events" in steer:
            return await self._verbatim(request, body, steer)
        delay = float(steer.get("delay_ms", self.config.delay_ms)) / 1000.0
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        n_tokens = self.config.answer_tokens if max_tokens is None else min(int(max_tokens), self.config.answer_tokens)
        finish = "length" if max_tokens is not None and int(max_tokens) < self.config.answer_tokens else "stop"
        prompt = _prompt_text(body)
        prompt_tokens = max(1, len(prompt.split()))
        n = int(body.get("n") or 1)
        if isinstance(steer.get("answer"), str):
            words = steer["answer"].split(" ")
            answers = [[w + " " for w in words[:-1]] + [words[-1]] for _ in range(n)]
            finish = "stop"
        else:
            answers = [_answer(prompt, n_tokens, i) for i in range(n)]
        if steer.get("pad_bytes"):
            answers = [[*a[:-1], a[-1] + " " + "x" * int(steer["pad_bytes"])] for a in answers]
        completion_tokens = sum(len(a) for a in answers)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake{next(self._ids)}"
        created = int(time.time())
        if delay:
            await asyncio.sleep(delay)
        if not body.get("stream"):
            if chat:
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "".join(a), "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i, a in enumerate(answers)
                ]
                obj = "chat.completion"
            else:
                choices = [
                    {"index": i, "text": "".join(a), "logprobs": None, "finish_reason": finish}
                    for i, a in enumerate(answers)
                ]
                obj = "text_completion"
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}
            if steer.get("trickle_ms"):
                pause = float(steer["trickle_ms"])
                return await self._trickle(request, [_encode(payload)], 0, pause, "application/json")
            self.stats["completed"] += 1
            return web.Response(body=_encode(payload), content_type="application/json")
        return await self._stream(request, body, chat, rid, created, model, answers, finish, usage, steer)

    async def _verbatim(self, request: web.Request, body: dict[str, Any], steer: dict[str, Any]) -> web.StreamResponse:
        """Answer exactly what the request asked for (see the module docstring)."""
        self.stats["completed"] += 1
        if "raw" in steer:
            return web.Response(body=str(steer["raw"]).encode(), content_type="application/json")
        if "body" in steer:
            return web.Response(body=_encode(steer["body"]), content_type="application/json")
        events = [e.encode() if isinstance(e, str) else _encode(e) for e in steer["events"]]
        if steer.get("done", True):
            events.append(b"[DONE]")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: " + event + b"\n\n")
        await resp.write_eof()
        return resp

    async def _trickle(
        self, request: web.Request, parts: list[bytes], after: int, pause_ms: float, content_type: str
    ) -> web.StreamResponse:
        """Send `after` parts at once, then the rest one byte every `pause_ms`, until done or abandoned."""
        resp = web.StreamResponse(headers={"content-type": content_type})
        await resp.prepare(request)
        try:
            for part in parts[:after]:
                await resp.write(part)
            for byte in b"".join(parts[after:]):
                await asyncio.sleep(pause_ms / 1000.0)
                await resp.write(bytes((byte,)))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats["aborted"] += 1
            raise
        self.stats["completed"] += 1
        return resp

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        rid: str,
        created: int,
        model: str,
        answers: list[list[str]],
        finish: str,
        usage: dict[str, int],
        steer: dict[str, Any],
    ) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        if steer.get("trickle_ms") or steer.get("cut_after") is not None:
            events = self._events(body, chat, rid, created, model, answers, finish, usage)
            if steer.get("cut_after") is not None:
                events = events[: int(steer["cut_after"])]  # no finish_reason, no [DONE]
            after = int(steer.get("trickle_after", 0))
            return await self._trickle(request, events, after, float(steer.get("trickle_ms", 0)), "text/event-stream")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))  # as vLLM: usage on every event
        pause = 1.0 / self.config.tokens_per_s if self.config.tokens_per_s > 0 else 0.0
        sent = [0]  # completion tokens so far

        def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if continuous and choices:
                sent[0] += sum(1 for c in choices if (c.get("delta") or {}).get("content") or c.get("text"))
                done = {"completion_tokens": sent[0], "total_tokens": usage["prompt_tokens"] + sent[0]}
                payload["usage"] = {"prompt_tokens": usage["prompt_tokens"], **done}
            if extra:
                payload.update(extra)
            return b"data: " + _encode(payload) + b"\n\n"

        try:
            if chat:
                await resp.write(
                    event(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            for i in range(len(answers))
                        ]
                    )
                )
            longest = max((len(a) for a in answers), default=0)
            for step in range(longest):
                if pause and step:
                    await asyncio.sleep(pause)
                for i, tokens in enumerate(answers):
                    if step >= len(tokens):
                        continue
                    last = step == len(tokens) - 1
                    if chat:
                        choice = {
                            "index": i,
                            "delta": {"content": tokens[step]},
                            "logprobs": None,
                            "finish_reason": finish if last else None,
                        }
                    else:
                        choice = {
                            "index": i,
                            "text": tokens[step],
                            "logprobs": None,
                            "finish_reason": finish if last else None,
                        }
                    await resp.write(event([choice]))
            if include_usage:
                await resp.write(event([], {"usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats["aborted"] += 1
            raise
        self.stats["completed"] += 1
        return resp

    @staticmethod
    def _events(
        body: dict[str, Any],
        chat: bool,
        rid: str,
        created: int,
        model: str,
        answers: list[list[str]],
        finish: str,
        usage: dict[str, int],
    ) -> list[bytes]:
        """The whole stream as a list of SSE events, one token per event (for the misbehaving modes)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        out = []
        for i, tokens in enumerate(answers):
            for step, token in enumerate(tokens):
                last = step == len(tokens) - 1
                piece: dict[str, Any] = {"delta": {"content": token}} if chat else {"text": token}
                choice = {"index": i, **piece, "logprobs": None, "finish_reason": finish if last else None}
                payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
                out.append(b"data: " + _encode(payload) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            out.append(b"data: " + _encode(payload) + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out


async def start_fake(
    config: FakeConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int, FakeBackend]:
    """Start the fake on the running loop; returns the runner (to clean up), the bound port and the app."""
    fake = FakeBackend(config)
    runner = web.AppRunner(fake.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, bound, fake


class FakeBackendThread:
    """Runs the fake on its own loop in a daemon thread: `with FakeBackendThread() as fake: fake.url`."""

    def __init__(self, config: FakeConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or FakeConfig()
        self._host, self._port = host, port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.app: FakeBackend | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="fake-backend", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._runner, self.port, self.app = loop.run_until_complete(start_fake(self.config, self._host, self._port))
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __enter__(self) -> FakeBackendThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake backend did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def serve_fake(config: FakeConfig, host: str, port: int) -> None:
    """Run the fake in the foreground until interrupted (the `gateway backend fake` command)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    fake = FakeBackend(config)
    print(f"fake backend listening on http://{host}:{port} (models: {', '.join(config.models)})", flush=True)
    web.run_app(fake.app, host=host, port=port, access_log=None, print=None, backlog=4096)
