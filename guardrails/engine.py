"""The runner the gateway calls: `Guardrails` applies a `Policy` to plain data (OpenAI-style
message dicts, answer strings, `Passage`s) and returns plain results.

    rails = await Guardrails.load(policy, executor)        # loads models off the event loop
    inp = await rails.check_input(messages, api_key_id=k, model=m)
    kept = await rails.check_passages(passages, api_key_id=k, model=m)
    out = await rails.check_output(answer, passages, api_key_id=k, model=m, prompt=question)
    stream = rails.stream(passages, api_key_id=k, model=m, prompt=question)
    safe = await stream.feed(delta); ...; tail = await stream.finish()  # safe: text to send now

Guards run concurrently per request; model-backed guards batch across requests in the shared,
bounded executor. Every verdict carries its guard's milliseconds.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

from guardrails.base import GUARDS, Guard, GuardContext, GuardResources, JudgeFn, Passage, Span, Verdict, mask_spans
from guardrails.groundedness import GroundednessOptions
from guardrails.holdback import WordWindow, keyword_hold_start, word_window
from guardrails.keywords import KeywordGuard
from guardrails.policy import Policy, RequestPolicy, default_policy
from guardrails.sentences import last_boundary
from guardrails.toxicity import ToxicityGuard, ToxicityScorer, build_scorer

_SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


@dataclass(frozen=True)
class InputResult:
    """Input verdicts; `messages` are copies with redactions applied (the originals untouched)."""

    verdicts: tuple[Verdict, ...]
    messages: list[dict[str, Any]]
    blocked_by: Verdict | None = None
    passages: tuple[Passage, ...] = ()
    dropped_passages: tuple[str, ...] = ()
    #: With `check_input(defer_flags=True)`: the verdicts of the model-backed guards whose input
    #: hits can only flag, still running (they neither block nor rewrite, so the backend call need
    #: not wait for them); the caller awaits it before the audit row. None: nothing deferred.
    deferred: asyncio.Task[list[Verdict]] | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None

    @property
    def message(self) -> str | None:
        """The user-facing message of the guard that blocked, if any."""
        return self.blocked_by.message if self.blocked_by else None


@dataclass(frozen=True)
class PassageResult:
    """Passages after the input guards: blocked ones dropped, redactions applied."""

    verdicts: tuple[Verdict, ...]
    passages: tuple[Passage, ...]
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputResult:
    """Output verdicts and the answer as it may be released (`text`; empty when blocked)."""

    verdicts: tuple[Verdict, ...]
    text: str
    blocked_by: Verdict | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None

    @property
    def message(self) -> str | None:
        return self.blocked_by.message if self.blocked_by else None


@dataclass(frozen=True)
class StreamStep:
    """What one `feed`/`finish` call says: text safe to send now, and whether the stream is blocked."""

    release: str
    blocked: bool = False
    blocked_by: Verdict | None = None
    verdicts: tuple[Verdict, ...] = ()


def _apply_redactions(text: str, verdicts: Iterable[Verdict], masks: Mapping[str, str]) -> str:
    """Mask every redacting verdict's spans. One-character masks keep offsets; longer masks go last."""
    redacting = [v for v in verdicts if v.action == "redact" and v.spans]
    single = [v for v in redacting if len(masks.get(v.guard, "*")) == 1]
    multi = [v for v in redacting if len(masks.get(v.guard, "*")) != 1]
    for v in single:
        text = mask_spans(text, v.spans, masks.get(v.guard, "*"))
    if multi:
        spans: list[Span] = [s for v in multi for s in v.spans]
        text = mask_spans(text, spans, masks.get(multi[0].guard, "[redacted]"))
    return text


def _first_block(verdicts: Iterable[Verdict]) -> Verdict | None:
    return next((v for v in verdicts if v.action == "block"), None)


@dataclass(frozen=True, slots=True)
class InputText:
    """One client-controlled text the backend will read, and where it is in the request.

    `field` names it for verdicts and errors (`messages[2].tool_calls[0].function.arguments`).
    `path` says where a redaction goes back into the message list; None for a text that cannot
    be rewritten in place (JSON arguments, schemas, names): there a redact action blocks."""

    text: str
    role: str
    field: str
    path: tuple[Any, ...] | None = None


#: Content-part types whose text the backend reads (as vLLM does), and the key holding it.
TEXT_PART_KEYS: Mapping[str, str] = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
    "tool_reference": "name",
}
#: Per-message string fields the backend reads: those that may be rewritten, and those that may not.
_REWRITABLE_FIELDS = ("reasoning", "reasoning_content")
_FIXED_FIELDS = ("name", "tool_call_id", "task")


def structured_text(value: Any) -> str:
    """Every string in a JSON value (object keys too), one per line: how a guard reads a schema
    or tool definition. Iterative, so deep nesting costs no recursion."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            for k, v in reversed(list(item.items())):
                stack.append(v)
                stack.append(k)
        elif isinstance(item, list | tuple):
            stack.extend(reversed(item))
    return "\n".join(x for x in out if isinstance(x, str))


def message_texts(messages: Sequence[Mapping[str, Any]], where: str = "messages") -> list[InputText]:
    """Every text of OpenAI-style chat messages that the backend reads, whatever the role:
    content (a string, or text-like content parts), reasoning, name, tool-call names and
    arguments, legacy function calls, tool_call_id, and a developer message's tools."""
    texts: list[InputText] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, Mapping):
            texts.extend(_one_message_texts(i, msg, f"{where}[{i}]"))
    return texts


def _one_message_texts(i: int, msg: Mapping[str, Any], base: str) -> list[InputText]:
    role = str(msg.get("role", "user"))
    texts = _content_texts(i, msg.get("content"), role, base)
    for key in _REWRITABLE_FIELDS:
        if isinstance(value := msg.get(key), str):
            texts.append(InputText(value, role, f"{base}.{key}", (i, key)))
    for key in _FIXED_FIELDS:
        if isinstance(value := msg.get(key), str):
            texts.append(InputText(value, role, f"{base}.{key}"))
    calls = msg.get("tool_calls")
    for j, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, Mapping) else None
        texts.extend(_function_texts(function, role, f"{base}.tool_calls[{j}].function"))
    texts.extend(_function_texts(msg.get("function_call"), role, f"{base}.function_call"))
    if msg.get("tools") is not None:
        texts.append(InputText(structured_text(msg["tools"]), role, f"{base}.tools"))
    return texts


def _content_texts(i: int, content: object, role: str, base: str) -> list[InputText]:
    """A message's content: a string, or the text-like parts of a list (paths for write-back)."""
    if isinstance(content, str):
        return [InputText(content, role, f"{base}.content", (i, "content"))]
    texts: list[InputText] = []
    for j, part in enumerate(content if isinstance(content, list) else ()):
        if isinstance(part, str):
            texts.append(InputText(part, role, f"{base}.content[{j}]", (i, "content", j)))
        elif isinstance(part, Mapping) and (key := TEXT_PART_KEYS.get(str(part.get("type")))):
            value = part.get(key)
            if isinstance(value, str):
                path = (i, "content", j, key) if key != "name" else None
                texts.append(InputText(value, role, f"{base}.content[{j}].{key}", path))
    return texts


def _function_texts(function: object, role: str, base: str) -> list[InputText]:
    """A (tool or legacy) function call's name and arguments, structured arguments as text."""
    if not isinstance(function, Mapping):
        return []
    texts = []
    for key in ("name", "arguments"):
        value = function.get(key)
        if value is not None:
            text = value if isinstance(value, str) else structured_text(value)
            texts.append(InputText(text, role, f"{base}.{key}"))
    return texts


def _write_back(messages: list[dict[str, Any]], path: tuple[Any, ...], text: str) -> None:
    target: Any = messages
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = text


def _locate(verdicts: list[Verdict], item: InputText) -> list[Verdict]:
    """The verdicts on `item`, hits marked with where they were found."""
    if any(v.hit for v in verdicts):
        return [_located(v, item) if v.hit else v for v in verdicts]
    return verdicts


async def _located_all(jobs: Sequence[tuple[InputText, Awaitable[list[Verdict]]]]) -> list[Verdict]:
    """The verdicts of deferred input checks, located like the others (`_locate`)."""
    results = await asyncio.gather(*(job for _, job in jobs))
    return [v for (item, _), vs in zip(jobs, results, strict=True) for v in _locate(vs, item)]


def _located(verdict: Verdict, item: InputText) -> Verdict:
    """A hit, with where it was found; a redaction of a text that cannot be rewritten blocks."""
    fields = _fields(verdict)
    fields["details"] = {**verdict.details, "field": item.field}
    if verdict.action == "redact" and item.path is None:
        fields.update(
            action="block",
            allowed=False,
            redacted_text=None,
            reason=f"{verdict.reason} (in {item.field}, which cannot be redacted in place)",
        )
    return Verdict(**fields)


class Guardrails:
    """Applies a policy's guards to requests and answers. Build once per process."""

    def __init__(self, policy: Policy, resources: GuardResources) -> None:
        self.policy = policy
        self.resources = resources
        self._guards: dict[tuple[str | None, str | None], dict[str, Guard]] = {}
        # build every combination now so term files, regexes and scorers fail at start-up
        self._build(None, None)
        for k in policy.key_overrides:
            self._build(k, None)
            for m in policy.model_overrides:
                self._build(k, m)
        for m in policy.model_overrides:
            self._build(None, m)

    @classmethod
    async def load(
        cls,
        policy: Policy | None,
        executor: Executor,
        judge: JudgeFn | None = None,
        toxicity_scorer: ToxicityScorer | None = None,
    ) -> Guardrails:
        """Load models (in `executor`, off the event loop) and build the guards."""
        policy = policy or default_policy()
        if toxicity_scorer is None and policy.uses_toxicity():
            loop = asyncio.get_running_loop()
            toxicity_scorer = await loop.run_in_executor(executor, build_scorer, policy.toxicity)
        resources = GuardResources(
            executor=executor, judge=judge, toxicity_scorer=toxicity_scorer, toxicity_config=policy.toxicity
        )
        return cls(policy, resources)

    def describe(self) -> dict[str, Any]:
        """What is loaded and enabled: for start-up logs and /readyz."""
        scorer = self.resources.toxicity_scorer
        base = self.policy.for_request()
        return {
            "policy": self.policy.source,
            "guards": {
                name: {"enabled": s.enabled, "action": s.action, "stages": sorted(s.stages), "passages": s.passages}
                for name, s in base.guards.items()
            },
            "toxicity_scorer": scorer.describe() if scorer is not None else None,
            "groundedness": {
                "method": GroundednessOptions.parse(base.guards["groundedness"].options).mode,
                "judge": self.resources.judge is not None,
            },
        }

    def request_policy(self, api_key_id: str | None = None, model: str | None = None) -> RequestPolicy:
        return self.policy.for_request(api_key_id, model)

    def _build(self, api_key_id: str | None, model: str | None) -> dict[str, Guard]:
        rp = self.policy.for_request(api_key_id, model)
        key = (
            api_key_id if api_key_id in self.policy.key_overrides else None,
            model if model in self.policy.model_overrides else None,
        )
        guards = self._guards.get(key)
        if guards is None:
            guards = {name: GUARDS[name](s, self.resources) for name, s in rp.guards.items() if s.enabled}
            self._guards[key] = guards
        return guards

    def _masks(self, guards: Mapping[str, Guard]) -> dict[str, str]:
        return {n: g.options.mask for n, g in guards.items()}

    async def _run(self, guards: Sequence[Guard], ctx: GuardContext) -> list[Verdict]:
        if sum(g.waits(ctx) for g in guards) <= 1:
            # At most one of them waits for long (a model pass, a judge): awaiting them in turn
            # gives the same verdicts as gathering them, without a task per guard (the default
            # policy's 4 guards on input and output made 9 tasks per request; in turn, the guards
            # cost 183 -> 145 us of CPU per request at concurrency 32, in process).
            return [await g.check(ctx) for g in guards]
        return list(await asyncio.gather(*(g.check(ctx) for g in guards)))

    # ---------------------------------------------------------------- input

    def input_guards(self, api_key_id: str | None = None, model: str | None = None, role: str = "user") -> list[str]:
        """Names of the input guards that would check a text of `role` (inert ones left out)."""
        guards = self._build(api_key_id, model)
        return [
            name
            for name, g in guards.items()
            if "input" in g.settings.stages and g.settings.reads(role) and not g.inert
        ]

    async def check_input(
        self,
        messages: Sequence[Mapping[str, Any]],
        passages: Sequence[Passage] = (),
        api_key_id: str | None = None,
        model: str | None = None,
        extra: Sequence[InputText] = (),
        defer_flags: bool = False,
    ) -> InputResult:
        """Run the input guards on every text of `messages` the backend reads (see
        `message_texts`) whose role they cover, on `extra` texts (request fields outside the
        messages; never rewritten), and on `passages`.

        `defer_flags`: the guards that run a model (`Guard.defers_flags`) and whose hit on this
        text can only flag are started but not awaited; `InputResult.deferred` gives their
        verdicts. Their answer changes nothing the backend receives, so the backend call goes
        ahead while they run: with the default policy the trained toxicity scorer's MiniLM pass on
        the user's message (10-20 ms of CPU, far more under load) no longer delays the first token."""
        guards = self._build(api_key_id, model)
        input_guards = [g for g in guards.values() if "input" in g.settings.stages]
        jobs = []
        later = []
        for item in (*message_texts(messages), *extra):
            active = [g for g in input_guards if g.settings.reads(item.role)]
            if active:
                ctx = GuardContext(stage="input", text=item.text, role=item.role, api_key_id=api_key_id, model=model)
                if defer_flags:
                    deferred = [g for g in active if g.defers_flags and g.action_for(ctx) == "flag"]
                    if deferred:
                        active = [g for g in active if g not in deferred]
                        later.append((item, self._run(deferred, ctx)))
                if active:
                    jobs.append((item, self._run(active, ctx)))
        deferred_task = asyncio.ensure_future(_located_all(later)) if later else None
        try:
            results = [await jobs[0][1]] if len(jobs) == 1 else await asyncio.gather(*(j[1] for j in jobs))
        except BaseException:
            if deferred_task is not None:  # nobody will await it: stop it with the request
                deferred_task.cancel()
            raise
        verdicts: list[Verdict] = []
        out_messages: list[dict[str, Any]] | None = None
        masks: dict[str, str] | None = None
        for (item, _), vs in zip(jobs, results, strict=True):
            vs = _locate(vs, item)
            verdicts.extend(vs)
            if item.path is not None and any(v.action == "redact" for v in vs):
                if out_messages is None:
                    out_messages = [copy.deepcopy(dict(m)) for m in messages]
                    masks = self._masks(guards)
                _write_back(out_messages, item.path, _apply_redactions(item.text, vs, masks or {}))
        if out_messages is None:
            out_messages = [dict(m) for m in messages]  # nothing redacted: shallow copies suffice
        blocked = _first_block(verdicts)
        kept: tuple[Passage, ...] = tuple(passages)
        dropped: tuple[str, ...] = ()
        if passages and blocked is None:
            pres = await self.check_passages(passages, api_key_id, model)
            verdicts.extend(pres.verdicts)
            kept, dropped = pres.passages, pres.dropped
        return InputResult(tuple(verdicts), out_messages, blocked, kept, dropped, deferred_task)

    async def check_passages(
        self,
        passages: Sequence[Passage],
        api_key_id: str | None = None,
        model: str | None = None,
    ) -> PassageResult:
        """Input guards with `passages = true` on retrieved passages: a blocking hit drops the
        passage (the request goes on without it), a redaction masks it, a flag only records."""
        guards = self._build(api_key_id, model)
        active = [g for g in guards.values() if g.settings.passages and "passage" in g.stages]
        if not active or not passages:
            return PassageResult((), tuple(passages))
        masks = self._masks(guards)
        results = await asyncio.gather(
            *(
                self._run(active, GuardContext(stage="passage", text=p.text, api_key_id=api_key_id, model=model))
                for p in passages
            )
        )
        verdicts: list[Verdict] = []
        kept: list[Passage] = []
        dropped: list[str] = []
        for p, vs in zip(passages, results, strict=True):
            verdicts.extend(Verdict(**{**_fields(v), "details": {**v.details, "passage_id": p.id}}) for v in vs)
            if _first_block(vs):
                dropped.append(p.id)
            elif any(v.action == "redact" for v in vs):
                kept.append(Passage(p.id, _apply_redactions(p.text, vs, masks), p.title, p.source))
            else:
                kept.append(p)
        return PassageResult(tuple(verdicts), tuple(kept), tuple(dropped))

    # ---------------------------------------------------------------- output

    def _output_guards(self, api_key_id: str | None, model: str | None) -> dict[str, Guard]:
        return {n: g for n, g in self._build(api_key_id, model).items() if "output" in g.settings.stages}

    async def check_output(
        self,
        answer: str,
        passages: Sequence[Passage] = (),
        api_key_id: str | None = None,
        model: str | None = None,
        prompt: str | None = None,
    ) -> OutputResult:
        """Run the output guards on a complete answer."""
        guards = self._output_guards(api_key_id, model)
        ctx = GuardContext(
            stage="output", text=answer, passages=tuple(passages), prompt=prompt, api_key_id=api_key_id, model=model
        )
        verdicts = await self._run(list(guards.values()), ctx)
        blocked = _first_block(verdicts)
        text = "" if blocked else _apply_redactions(answer, verdicts, self._masks(guards))
        return OutputResult(tuple(verdicts), text, blocked)

    def stream(
        self,
        passages: Sequence[Passage] = (),
        api_key_id: str | None = None,
        model: str | None = None,
        prompt: str | None = None,
        flow: bool = True,
    ) -> StreamChecker:
        """A checker for one streamed answer (see `StreamChecker`); without `flow`, text is
        released a whole sentence at a time (for a caller that sends it anyway: optimistic)."""
        return StreamChecker(self, tuple(passages), api_key_id, model, prompt, flow)


def _fields(v: Verdict) -> dict[str, Any]:
    return {f: getattr(v, f) for f in Verdict.__dataclass_fields__}


#: How far a blocking or redacting output guard's verdict on an unfinished sentence can be
#: trusted while streaming: "probe" (exact terms: up to where a term could still begin),
#: "words" (a sentence model: words with `hold_words` checked words after them), "sentence"
#: (only a complete sentence: the whole sentence is held, as for a non-streamed answer).
HoldKind = Literal["probe", "words", "sentence"]


def hold_kind(guard: Guard) -> HoldKind:
    """How a guard that can block or redact lets a stream flow (see `HoldKind`).

    Keywords without regex terms are exact: "probe". Toxicity set to block scores the sentence
    so far: "words". Everything else holds whole sentences: groundedness or moderation set to
    block (they judge claims and context, not words), toxicity set to redact (its span is the
    whole sentence, so no part of it may go out unmasked) and keyword regexes (unbounded)."""
    if isinstance(guard, KeywordGuard):
        return "sentence" if guard.matcher.regexes else "probe"
    if isinstance(guard, ToxicityGuard) and guard.settings.action == "block":
        return "words"
    return "sentence"


@dataclass
class StreamChecker:
    """Checks a streamed answer as it grows; releases only what the blocking guards passed.

    The answer is cut into units: sentences (see `guardrails.sentences`), or, for text without a
    sentence end, at most `max_hold_chars` cut at a space. A complete unit is checked whole by
    every output guard, exactly as before: a blocking verdict ends the stream and nothing more
    of that unit is released; a redacting one masks the rest of the unit before it goes out.
    Guards that only flag never hold text: they check each unit beside the stream and their
    verdicts are collected by the next call (`finish` waits for them).

    With `flow` (the "checked" stream mode), text of the unfinished unit goes out before the
    unit ends, as soon as every guard that can block or redact has passed it (`hold_kind`):
    keywords up to where a listed term could still begin (checked on every delta, evasions
    included); toxicity for words followed by `hold_words` complete words in the scored text
    (the whole unit so far is scored, every `step_words` new words, through the batching
    scorer), so a phrase of up to `hold_words + 1` words that straddles a release point is
    scored whole before any of it is released. Any other blocking guard holds whole units.
    A listed term found in the unfinished unit holds the rest of it until it is complete. A
    toxicity hit on the unfinished sentence holds it too, and it is scored again at every new
    word: short fragments often score high on their own (the trained scorer gives "You are a"
    0.92), and their words go out once a longer prefix, with its look-ahead, scores clean. A
    block or a redaction is always decided on the complete unit, as without flow; of a blocked
    unit only words that passed with their look-ahead were sent.

    `feed(delta)` returns the text safe to send now; once blocked, every call releases nothing.
    `finish()` checks and releases the tail.
    """

    rails: Guardrails
    passages: tuple[Passage, ...]
    api_key_id: str | None
    model: str | None
    prompt: str | None
    flow: bool = True
    #: complete words held after the last released word while toxicity may still block
    hold_words: int = 2
    #: new complete words between two scorings of the unfinished unit (the first comes at once)
    step_words: int = 2
    # Text without any sentence end (code, lists, run-on output) is not held forever: past this
    # many characters, check and release up to the last space.
    max_hold_chars: int = 240
    text: str = ""
    checked: int = 0  # text[:checked] is released (or, once blocked, decided)
    unit_start: int = 0  # where the unfinished unit begins
    released: str = ""
    verdicts: list[Verdict] = field(default_factory=list)
    blocked_by: Verdict | None = None
    finished: bool = False
    _unit_hit: bool = False  # a listed term is in the unfinished unit: hold it to its end
    _stalled: bool = False  # its last scoring found it toxic: score again at the next word
    _cleared: int = 0  # the "words" guards passed text[:_cleared] of the unfinished unit
    _scored_words: int = 0  # complete words of the unit at its last scoring
    _probe_ms: dict[str, float] = field(default_factory=dict)
    _flag_tasks: list[asyncio.Task[list[Verdict]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        guards = self.rails._output_guards(self.api_key_id, self.model)
        self._masks = self.rails._masks(guards)
        self._gating = [g for g in guards.values() if g.settings.action != "flag"]
        self._flagging = [g for g in guards.values() if g.settings.action == "flag"]
        self._kinds = [(g, hold_kind(g)) for g in self._gating if not g.inert]
        self._sentences = any(kind == "sentence" for _, kind in self._kinds)

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None

    async def feed(self, delta: str) -> StreamStep:
        if self.blocked or self.finished:
            return StreamStep("", self.blocked, self.blocked_by)
        self._harvest()
        self.text += delta
        release = ""
        verdicts: tuple[Verdict, ...] = ()
        end = self._unit_end()
        if end:
            step = await self._decide(end)
            if step.blocked:
                return step
            release, verdicts = step.release, step.verdicts
        if self.flow:
            release += await self._flow()
        return StreamStep(release, False, None, verdicts)

    async def finish(self) -> StreamStep:
        """Check and release whatever is left (the last, unterminated sentence)."""
        if self.blocked or self.finished:
            return StreamStep("", self.blocked, self.blocked_by)
        self._harvest()
        step = await self._decide(len(self.text))
        await self._settle()
        self.finished = True
        return step

    def _unit_end(self) -> int:
        """Where the complete units in the text end (0 when the current unit is unfinished)."""
        pending = self.text[self.unit_start :]
        boundary = last_boundary(pending)
        if boundary == 0 and len(pending) > self.max_hold_chars:
            boundary = pending.rfind(" ") + 1
        return self.unit_start + boundary if boundary else 0

    def _context(self, text: str) -> GuardContext:
        return GuardContext(
            stage="output",
            text=text,
            passages=self.passages,
            prompt=self.prompt,
            api_key_id=self.api_key_id,
            model=self.model,
        )

    async def _decide(self, upto: int) -> StreamStep:
        """Check the complete unit text[unit_start:upto] whole and release what is left of it."""
        start, rest = self.unit_start, self.checked
        unit = self.text[start:upto]
        self.unit_start = self._cleared = upto
        self._unit_hit, self._stalled, self._scored_words = False, False, 0
        if not unit.strip():
            return self._release(upto, [])
        ctx = self._context(unit)
        if self._flagging:
            task = asyncio.get_running_loop().create_task(self._flags(ctx, start))
            self._flag_tasks.append(task)
        verdicts = [_shifted(v, start) for v in await self.rails._run(self._gating, ctx)]
        self.verdicts.extend(verdicts)
        blocked = _first_block(verdicts)
        if blocked is not None:
            self.checked = upto
            self.blocked_by = blocked
            await self._settle()
            return StreamStep("", True, blocked, tuple(verdicts))
        # Redact what is still unreleased (a span reaching into released text is cut at it).
        local = [_shifted(v, -rest, limit=upto - rest) for v in verdicts if v.action == "redact"]
        step = self._release(upto, local)
        return StreamStep(step.release, False, None, tuple(verdicts))

    def _release(self, upto: int, redacting: Sequence[Verdict]) -> StreamStep:
        chunk = _apply_redactions(self.text[self.checked : upto], redacting, self._masks)
        self.checked = upto
        self.released += chunk
        return StreamStep(chunk)

    async def _flow(self) -> str:
        """Release what the blocking guards passed of the unfinished unit (see the class doc)."""
        if self._sentences or self._unit_hit:
            return ""
        start = self.unit_start
        unit = self.text[start:]
        limit = len(self.text)
        jobs: list[tuple[Guard, str]] = []  # (guard, text it checks): run only if something may go
        scoring: WordWindow | None = None
        for guard, kind in self._kinds:
            if kind == "probe":
                assert isinstance(guard, KeywordGuard)
                limit = min(limit, start + keyword_hold_start(guard.matcher, unit))
                jobs.append((guard, unit))
                continue
            window = word_window(unit, self.hold_words)
            step = 1 if self._stalled else self.step_words
            due = (
                window.words > self.hold_words
                and start + window.release > self._cleared
                and (self._scored_words == 0 or window.words - self._scored_words >= step)
            )
            if due:
                scoring = window
                jobs.append((guard, unit[: window.scored]))
            limit = min(limit, start + window.release if due else self._cleared)
        if limit <= self.checked:
            return ""
        verdicts = await asyncio.gather(*(guard.check(self._context(text)) for guard, text in jobs))
        for v in verdicts:
            self._probe_ms[v.guard] = self._probe_ms.get(v.guard, 0.0) + v.ms
        hits = {v.guard for v in verdicts if v.hit}
        if scoring is not None:
            self._scored_words = scoring.words
            self._stalled = any(g.name in hits for g, kind in self._kinds if kind == "words")
        if any(g.name in hits for g, kind in self._kinds if kind == "probe"):
            self._unit_hit = True  # decided when the unit is complete
        if hits:
            return ""
        if scoring is not None:
            self._cleared = start + scoring.release
        return self._release(limit, []).release

    async def _flags(self, ctx: GuardContext, offset: int) -> list[Verdict]:
        return [_shifted(v, offset) for v in await self.rails._run(self._flagging, ctx)]

    def _harvest(self) -> None:
        """Collect the verdicts of flag-only checks that are done (raising a guard's error)."""
        pending = []
        for task in self._flag_tasks:
            if task.done():
                self.verdicts.extend(task.result())
            else:
                pending.append(task)
        self._flag_tasks = pending

    async def _settle(self) -> None:
        """Wait for the flag-only checks still running and collect their verdicts."""
        tasks, self._flag_tasks = self._flag_tasks, []
        for verdicts in await asyncio.gather(*tasks):
            self.verdicts.extend(verdicts)

    def summary(self) -> list[Verdict]:
        """One verdict per guard for the whole stream: the most severe, with summed milliseconds
        (the checks of unfinished sentences included). Flag-only checks still running when the
        stream ended early (a client gone) are cancelled and left out."""
        for task in self._flag_tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.verdicts.extend(task.result())
            else:
                task.cancel()
        self._flag_tasks = []
        by_guard: dict[str, Verdict] = {}
        total_ms: dict[str, float] = dict(self._probe_ms)
        for v in self.verdicts:
            total_ms[v.guard] = total_ms.get(v.guard, 0.0) + v.ms
            cur = by_guard.get(v.guard)
            if cur is None or _SEVERITY[v.action] > _SEVERITY[cur.action]:
                by_guard[v.guard] = v
        return [Verdict(**{**_fields(v), "ms": total_ms[g]}) for g, v in by_guard.items()]


def _shifted(v: Verdict, offset: int, limit: int | None = None) -> Verdict:
    """The verdict with its spans moved by `offset` (and clipped to [0, limit) when given)."""
    if not v.spans:
        return v
    spans = [(s + offset, e + offset) for s, e in v.spans]
    if limit is not None:
        spans = [(max(s, 0), min(e, limit)) for s, e in spans if e > 0 and s < limit]
    return Verdict(**{**_fields(v), "spans": tuple(spans)})
