"""The stream relay: backend events in, client bytes out, with every promise in one place.

`StreamRelay.run` is the thin async loop; each promise lives in one method:

- hold back only the closing event (`_event`, `_hold`): the event carrying `finish_reason` or
  the usage event may be the last one, so it waits; every other event goes on as it arrives;
- commit the audit row before the last bytes (`_finished`, `_failed`): the held event and
  `[DONE]` are released only after the row is committed;
- end a blocked stream with `content_filter` (`_block`);
- measure time to first token (`_first_token`);
- turn a mid-stream failure into an SSE `error` event (`_failure`, `_failed`);
- audit a disconnect (`_disconnected`).

Output guards over a stream (`StreamGuard`) release only text they have checked, re-chunked
into word-sized events so that a guarded stream flows like an unguarded one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import GatewayError, InternalError, UpstreamError
from gateway.shapes import Shape, event_problem, well_formed_event
from guardrails import Guardrails, Passage, StreamChecker, Verdict
from serving.errors import BackendBadAnswer, BackendTimeout, ServingError

if TYPE_CHECKING:
    from gateway.pipeline import Trace

log = logging.getLogger("gateway")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


@dataclass(frozen=True, slots=True)
class UsageAsk:
    """What the client asked of usage, where the gateway asked the backend for usage on every
    event (so a stream an output guard stops still knows the tokens it cost)."""

    final: bool  # the client wants the closing usage event (stream_options.include_usage)
    continuous: bool  # ... and usage on every event (stream_options.continuous_usage_stats)


def ask_for_usage(body: dict[str, Any]) -> tuple[dict[str, Any], UsageAsk]:
    """The body to send (asking vLLM for usage on every event) and what the client itself asked."""
    options = body.get("stream_options") or {}
    ask = UsageAsk(bool(options.get("include_usage")), bool(options.get("continuous_usage_stats")))
    sent = {**body, "stream_options": {**options, "include_usage": True, "continuous_usage_stats": True}}
    return sent, ask


class StreamRelay:
    """One stream's state, from the first backend event to `[DONE]`."""

    def __init__(
        self,
        trace: Trace,
        guard: StreamGuard | None,
        began: float,
        record: Callable[[Trace], Awaitable[None]],
        record_nowait: Callable[[Trace], None],
        usage: UsageAsk | None = None,
    ) -> None:
        self.trace = trace
        self.shape: Shape = trace.endpoint.shape
        self.guard = guard
        self.began = began  # when the backend call started (backend time)
        self._record = record
        self._record_nowait = record_nowait
        self.texts: dict[int, list[str]] = {}  # the raw answer, for the audit row
        self.finishes: dict[int, str] = {}
        self.out: list[bytes] = []  # what the current batch releases, sent as one write
        self.held: dict[str, Any] | None = None  # the event that may be the last one
        self.held_content = False  # whether it carries answer text (for time to first token)
        self.stopped = False  # an output guard ended the stream (the rest is not wanted)
        self.recorded = False
        # An alias answers as the alias (the backend was asked for the model it stands for).
        self.model = trace.model if trace.backend_model is not None else None
        self.usage = usage  # None: the backend was asked exactly what the client asked
        self.tail: dict[str, Any] | None = None  # the usage event after a blocked stream's last

    async def run(self, upstream: AsyncIterator[list[bytes]], first: list[bytes] | None) -> AsyncIterator[bytes]:
        """The loop: each batch of events becomes at most one write."""
        try:
            batch = first
            while batch is not None:
                for payload in batch:
                    guarded = self._event(payload)
                    if guarded is not None:
                        await guarded
                        if self.stopped:
                            break
                if self.out:
                    yield self._flush()
                batch = None if self.stopped else await anext(upstream, None)
            self._ended()
        except Exception as exc:
            yield await self._failed(self._failure(exc))
            return
        except BaseException:
            self._disconnected()
            raise
        finally:
            # Closing the upstream drops the backend connection, so vLLM aborts (also after a
            # guard block: nothing more of that answer is wanted).
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())
        yield await self._finished()

    def _flush(self) -> bytes:
        out, self.out = self.out, []
        return out[0] if len(out) == 1 else b"".join(out)

    def _event(self, payload: bytes) -> Awaitable[None] | None:
        """One backend event: note it for the audit row, then send it on or hold it. Under output
        guards the rest is a coroutine to await (so an unguarded event costs no coroutine)."""
        event = self._checked(_decode(payload))
        choices = event.get("choices") or []
        content, closing = self._note(choices)
        if self.usage is not None and event.get("usage") is not None and not self._own_usage(event, choices):
            return None  # the closing usage event the gateway asked for and the client did not
        if self.model is not None:
            event["model"] = self.model
            payload = _encode(event)
        if self.guard is not None and choices:
            return self._guarded(event, choices, closing)
        self._send(event, payload, content, closing, choices)
        return None

    async def _guarded(self, event: dict[str, Any], choices: list[dict[str, Any]], closing: bool) -> None:
        """Release only text the output guards passed; hold the unchecked rest (its other fields
        ride along with the next text released: nothing of a chunk is lost)."""
        assert self.guard is not None
        released, blocked = await self.guard.filter(event, self.shape)
        if blocked is not None:
            self._block(event, blocked)
        elif not event["choices"] and not event.get("usage"):
            self.guard.hold_event(event)  # everything in it is held back for now
        else:
            self.guard.merge_event(event)
            for piece in self.guard.rechunk(event, self.shape):  # the released words, one by one
                self._send(piece, _encode(piece), True, False, piece["choices"])
            self._send(event, _encode(event), released, closing, choices)

    def _send(
        self, event: dict[str, Any], payload: bytes, content: bool, closing: bool, choices: list[dict[str, Any]]
    ) -> None:
        """Send the event on, or hold it when it may be the last one."""
        if event.get("usage"):
            self.trace.usage = event["usage"]
            closing = closing or not choices
        self._release_held()
        if closing and self.trace.sources is not None:
            self._cite(event)
        if closing:
            self.held, self.held_content = event, content
        else:
            if content:
                self._first_token()
            self.out.append(sse(payload))

    def _cite(self, event: dict[str, Any]) -> None:
        """A RAG answer's closing chunk carries its sources: annotations, and the footer if asked."""
        sources = self.trace.sources
        assert sources is not None
        for choice in event.get("choices") or ():
            if choice.get("finish_reason"):
                index = int(choice.get("index") or 0)
                delivered = self.guard.released(index) if self.guard is not None else "".join(self.texts.get(index, ()))
                sources.closing_delta(choice, delivered)

    def _own_usage(self, event: dict[str, Any], choices: list[dict[str, Any]]) -> bool:
        """Note usage the gateway asked for; keep in the event only what the client asked for."""
        assert self.usage is not None
        self.trace.usage = event["usage"]
        if not choices:
            return self.usage.final
        if not self.usage.continuous:
            del event["usage"]  # the guard re-encodes every event with choices
        return True

    def _checked(self, event: Any) -> dict[str, Any]:
        """The event, once it is known to be a well-formed event and not an error report."""
        if isinstance(event, dict) and "error" in event:
            raise UpstreamError(_upstream_message(event), code="backend_stream_error")
        if not well_formed_event(self.shape, event):
            raise UpstreamError(
                f"backend {self.trace.backend} sent an invalid event: {event_problem(self.shape, event)}",
                code="backend_invalid_answer",
            )
        checked: dict[str, Any] = event
        return checked

    def _note(self, choices: list[dict[str, Any]]) -> tuple[bool, bool]:
        """Keep the raw text and finish reasons; (whether it has text, whether it may close)."""
        content = closing = False
        for choice in choices:
            index = choice.get("index", 0)
            piece = self.shape.delta_text(choice)
            if piece:
                self.texts.setdefault(index, []).append(piece)
                content = True
            if choice.get("finish_reason"):
                self.finishes[index] = choice["finish_reason"]
                closing = True
        return content, closing

    def _release_held(self) -> None:
        """A later event came, so the held one was not the last: send it."""
        if self.held is not None:
            self.out.append(sse(_encode(self.held)))
            self.held = None
            if self.held_content:
                self._first_token()

    def _first_token(self) -> None:
        if self.trace.ttft_s is None:
            self.trace.ttft_s = time.perf_counter() - self.trace.started

    def _block(self, event: dict[str, Any], blocked: tuple[int, Verdict]) -> None:
        """An output guard stopped the stream: its closing event says content_filter, and why."""
        self._release_held()
        index, verdict = blocked
        trace = self.trace
        trace.status = "blocked"
        trace.blocked = {
            "guard": verdict.guard,
            "stage": "output",
            "reason": verdict.reason,
            "message": verdict.message,
        }
        self.finishes[index] = "content_filter"  # what the client got (the row's finish_reason)
        base = {key: event[key] for key in ("id", "object", "created", "model") if key in event}
        # The policy's message ends the answer (after what was released, in its own paragraph).
        assert self.guard is not None
        message = closing_text(self.guard.released(index), verdict.message or "")
        closing = self.shape.closing_choice(index, "content_filter")
        if message:
            self.shape.set_delta_text(closing, message)
        self.held = base | {"choices": [closing]}
        self.held_content = bool(message)
        if self.usage is not None and self.usage.final and self.trace.usage is not None:
            self.tail = base | {"choices": [], "usage": self.trace.usage}  # the tokens it cost
        self.stopped = True

    def _ended(self) -> None:
        """The backend closed the stream: a complete answer, unless it stopped mid-answer."""
        self.trace.backend_s = time.perf_counter() - self.began
        if not self.stopped and (not self.finishes or not self.finishes.keys() >= self.texts.keys()):
            raise UpstreamError(
                f"backend {self.trace.backend} ended the stream before the answer was finished",
                code="backend_stream_truncated",
            )

    def _failure(self, exc: Exception) -> GatewayError:
        """What a failure during the stream tells the client."""
        self.trace.backend_s = time.perf_counter() - self.began
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, ServingError):
            return mid_stream(exc)
        if isinstance(exc, msgspec.DecodeError | RecursionError | UnicodeDecodeError):
            return UpstreamError(f"backend {self.trace.backend} sent a malformed event", code="backend_stream_error")
        log.error("unexpected error in stream %s", self.trace.request_id, exc_info=exc)
        return InternalError(f"internal gateway error ({type(exc).__name__}); see the gateway log")

    async def _failed(self, error: GatewayError) -> bytes:
        """Mid-stream failure: the status line is long gone, so say it in the stream itself."""
        self.trace.fail(error, "backend_error" if isinstance(error, UpstreamError) else "error")
        await self.trace.settle()  # input flags first, in the row as in a whole answer
        self._summarise()
        self.recorded = True
        await self._record(self.trace)
        self._release_held()
        return self._flush() + sse(_encode(error.body())) + DONE

    def _disconnected(self) -> None:
        """The client went away (cancellation) or the generator was closed: log what we had."""
        if self.recorded:
            return
        self.recorded = True
        self.trace.status = "client_disconnected"
        self.trace.http_status = 499
        self.trace.backend_s = time.perf_counter() - self.began
        self.trace.settled_now()  # input flags already in go before the output's, as in a whole answer
        self._summarise()
        self._record_nowait(self.trace)  # no await: we are being cancelled

    async def _finished(self) -> bytes:
        """The last event (held, or one the gateway writes) with the `gateway` object, then `[DONE]`."""
        trace = self.trace
        await trace.settle()  # input flags that ran beside the backend call: in the last event too
        self._summarise()
        held = self.held
        if held is None:
            held = {
                "id": f"gw-{trace.request_id}",
                "object": self.shape.chunk_object,
                "created": int(trace.created_at.timestamp()),
                "model": trace.model,
                "choices": [],
            }
        last = self.tail or held
        last["gateway"] = trace.gateway_object()
        if self.held_content:
            self._first_token()  # the first text rides in the last event
        self.recorded = True
        await self._record(trace)
        if self.tail is not None:
            return sse(_encode(held)) + sse(_encode(self.tail)) + DONE
        return sse(_encode(held)) + DONE

    def _summarise(self) -> None:
        """The raw answer of every choice, and what the client got of it, for the audit row."""
        trace, guard = self.trace, self.guard
        if guard is not None:
            trace.verdicts.extend(guard.summary())
        joined = {i: "".join(parts) for i, parts in self.texts.items()}
        trace.response_text = joined.get(0, "")
        trace.finish_reason = self.finishes.get(0)
        choices = [
            {"index": i, "text": joined.get(i, ""), "finish_reason": self.finishes.get(i)}
            for i in sorted(set(joined) | set(self.finishes))
        ]
        if guard is not None:
            for choice in choices:
                choice["delivered"] = guard.released(int(choice["index"] or 0))
            if trace.blocked and trace.finish_reason == "content_filter" and choices:
                choices[0]["finish_reason"] = "content_filter"
        trace.response_json = _encode({"choices": choices, "usage": trace.usage}).decode()


class StreamGuard:
    """Output guards over a stream: one checker per choice (`guardrails.StreamChecker`).

    In checked mode a checker releases text as the blocking guards pass it, often several
    words at once; `rechunk` splits such a release back into word-sized events, so the client
    sees a steady stream rather than lumps."""

    def __init__(
        self,
        rails: Guardrails,
        api_key_id: str,
        model: str | None,
        prompt: str | None,
        passages: tuple[Passage, ...],
        optimistic: bool = False,
    ) -> None:
        self._rails = rails
        # Optimistic (policy stream_mode): text goes out as it comes; a failed check ends the stream.
        self._sent: dict[int, str] | None = {} if optimistic else None
        self._passages = passages
        self._api_key_id = api_key_id
        self._model = model
        self._prompt = prompt
        self._checkers: dict[int, StreamChecker] = {}
        self._held: dict[int, dict[str, Any]] = {}  # per choice: the fields of chunks held back
        self._held_event: dict[str, Any] = {}  # top-level fields of events held back whole

    def _checker(self, index: int) -> StreamChecker:
        checker = self._checkers.get(index)
        if checker is None:
            flow = self._sent is None  # optimistic mode sends the text anyway: no early checks
            checker = self._rails.stream(self._passages, self._api_key_id, self._model, self._prompt, flow)
            self._checkers[index] = checker
        return checker

    async def filter(self, event: dict[str, Any], shape: Shape) -> tuple[bool, tuple[int, Verdict] | None]:
        """Rewrite the event's choices to carry only released text; drop choices with nothing to say.

        Returns (whether any text was released, (choice index, blocking verdict) or None).
        """
        if self._sent is not None:
            return await self._watch(event, shape, self._sent)
        kept = []
        released_any = False
        for choice in event["choices"]:
            index = choice.get("index", 0)
            release, blocked = await self._release(self._checker(index), shape.delta_text(choice), choice)
            if blocked is not None:
                return released_any, (index, blocked)
            shape.set_delta_text(choice, release)
            if release or shape.delta_keeps(choice):
                self._carry(index, choice)
                kept.append(choice)
            else:
                self._hold(index, choice)
            released_any = released_any or bool(release)
        event["choices"] = kept
        return released_any, None

    async def _watch(
        self, event: dict[str, Any], shape: Shape, sent: dict[int, str]
    ) -> tuple[bool, tuple[int, Verdict] | None]:
        """Optimistic: the event goes out unchanged while its text is checked; a block ends the stream."""
        sent_any = False
        for choice in event["choices"]:
            index = choice.get("index", 0)
            piece = shape.delta_text(choice)
            _, blocked = await self._release(self._checker(index), piece, choice)
            if blocked is not None:
                return sent_any, (index, blocked)
            if piece:
                sent[index] = sent.get(index, "") + piece
                sent_any = True
        return sent_any, None

    def rechunk(self, event: dict[str, Any], shape: Shape) -> list[dict[str, Any]]:
        """Events for the leading words of each choice's released text, taken out of `event`.

        `event` keeps each choice's last word with all its other fields (logprobs, token ids,
        finish_reason, ...: they belong to the text as a whole and stay in order); the events
        before it carry one word each (with the whitespace before the next) and `event`'s
        scalar top-level fields (id, object, created, model, system_fingerprint, ...). A choice
        whose delta says more than its text (a role, tool calls) is left whole."""
        if self._sent is not None:
            return []  # optimistic: events go out as the backend sent them
        pieces: list[dict[str, Any]] = []
        envelope: dict[str, Any] | None = None
        for choice in event["choices"]:
            text = shape.delta_text(choice)
            if not text or (isinstance(choice.get("delta"), dict) and choice["delta"].keys() - {"content"}):
                continue
            words = _WORD_CHUNK.findall(text)
            if len(words) < 2:
                continue
            if envelope is None:
                envelope = {k: v for k, v in event.items() if _scalar(v)}  # not choices, usage, ...
            index = choice.get("index", 0)
            pieces.extend(envelope | {"choices": [shape.content_choice(index, word)]} for word in words[:-1])
            shape.set_delta_text(choice, words[-1])
        return pieces

    @staticmethod
    async def _release(checker: StreamChecker, piece: str | None, choice: dict[str, Any]) -> tuple[str, Verdict | None]:
        """The text one choice's checker lets through now, or the verdict that blocks it."""
        release = ""
        if piece:
            step = await checker.feed(piece)
            if step.blocked and step.blocked_by is not None:
                return "", step.blocked_by
            release += step.release
        if choice.get("finish_reason"):
            step = await checker.finish()
            if step.blocked and step.blocked_by is not None:
                return "", step.blocked_by
            release += step.release
        return release, None

    def _hold(self, index: int, choice: dict[str, Any]) -> None:
        """A choice whose text is held back: keep its other fields (logprobs, token ids, ...)."""
        extra = {k: v for k, v in choice.items() if k not in _CHOICE_OWN}
        if extra:
            held = self._held.get(index)
            self._held[index] = extra if held is None else merge_fields(held, extra)

    def _carry(self, index: int, choice: dict[str, Any]) -> None:
        """A choice going out: put the held chunks' fields in front of its own."""
        held = self._held.pop(index, None)
        if held is not None:
            own = {k: v for k, v in choice.items() if k not in _CHOICE_OWN}
            choice.update(merge_fields(held, own))

    def hold_event(self, event: dict[str, Any]) -> None:
        """An event held back whole: keep its top-level fields beyond the usual ones."""
        extra = {k: v for k, v in event.items() if k not in _EVENT_OWN}
        if extra:
            self._held_event = merge_fields(self._held_event, extra)

    def merge_event(self, event: dict[str, Any]) -> None:
        """An event going out: the held events' top-level fields go with it."""
        if self._held_event:
            own = {k: v for k, v in event.items() if k not in _EVENT_OWN}
            event.update(merge_fields(self._held_event, own))
            self._held_event = {}

    def summary(self) -> list[Verdict]:
        return [v for checker in self._checkers.values() for v in checker.summary()]

    def released(self, index: int) -> str:
        """The text of a choice the client got."""
        if self._sent is not None:
            return self._sent.get(index, "")
        checker = self._checkers.get(index)
        return checker.released if checker is not None else ""


def closing_text(released: str, message: str) -> str:
    """A blocked answer's last words: close an open code block, then the policy's message."""
    if not message:
        return ""
    fence = "\n```" if released.count("```") % 2 else ""
    gap = "\n\n" if released.strip() else ""
    return fence + gap + message


_CHOICE_OWN = frozenset({"index", "delta", "text", "finish_reason"})  # what the guard rewrites itself
#: One word-sized piece: leading whitespace (only at the start of a release), a word, the
#: whitespace after it. Joined, the pieces are the text again.
_WORD_CHUNK = re.compile(r"\s*\S+\s*|\s+")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


_EVENT_OWN = frozenset({"id", "object", "created", "model", "choices", "usage"})


def merge_fields(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """The fields of two consecutive chunks as one: lists concatenated in order (logprobs
    entries, token ids, offsets), objects merged the same way, otherwise the later value unless
    it is null (`stop_reason` comes with the last chunk)."""
    merged = dict(earlier)
    for key, value in later.items():
        before = merged.get(key)
        if isinstance(before, list) and isinstance(value, list):
            merged[key] = before + value
        elif isinstance(before, dict) and isinstance(value, dict):
            merged[key] = merge_fields(before, value)
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


def mid_stream(exc: ServingError) -> UpstreamError:
    """A backend failure after the stream began, with the code that says what happened."""
    if isinstance(exc, BackendTimeout):
        return UpstreamError(exc.message, status=504, code="backend_timeout")
    if isinstance(exc, BackendBadAnswer):
        return UpstreamError(exc.message, code=exc.code)
    return UpstreamError(exc.message, code="backend_stream_error")


def _upstream_message(event: dict[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "the backend reported an error"))
    return str(error)
