"""The guard interface: what a guard sees (`GuardContext`), what it says (`Verdict`), the abstract
`Guard` with its one method `check`, and the plain registry that maps guard names to classes.

Guards are cheap objects built by the engine from the policy; heavy, shared things (models, the
bounded executor, the LLM judge) live in one `GuardResources` handed to every guard.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

Stage = Literal["input", "output", "passage"]
Action = Literal["allow", "block", "redact", "flag"]
HitAction = Literal["block", "redact", "flag"]
Span = tuple[int, int]

STAGES: tuple[Stage, ...] = ("input", "output", "passage")
HIT_ACTIONS: tuple[HitAction, ...] = ("block", "redact", "flag")

T = TypeVar("T")

#: An async callable that asks a model a question and returns its text answer. The gateway
#: passes one that calls the backend; tests pass a fake.
JudgeFn = Callable[[str], Awaitable[str]]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved passage, as plain data (no dependency on the retrieval package)."""

    id: str
    text: str
    title: str | None = None
    source: str | None = None


@dataclass(frozen=True, slots=True)
class GuardContext:
    """Everything a guard may look at for one check.

    `text` is what is being checked: a message (stage "input"), the answer or the part of it
    streamed so far (stage "output"), or one retrieved passage (stage "passage"). `prompt` is
    the user's question, when known: groundedness does not count words the answer merely
    repeats from it as claims.
    """

    stage: Stage
    text: str
    role: str | None = None
    passages: tuple[Passage, ...] = ()
    prompt: str | None = None
    api_key_id: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """One guard's finding on one text. `allowed` is False only when `action` is "block".

    `spans` are (start, end) character offsets into the text that was checked, as the caller
    gave it (not a normalised copy). `redacted_text` is set when `action` is "redact".
    """

    guard: str
    allowed: bool
    score: float
    action: Action
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    spans: tuple[Span, ...] = ()
    ms: float = 0.0
    stage: Stage = "input"
    redacted_text: str | None = None
    message: str | None = None

    @property
    def hit(self) -> bool:
        """True when the guard found something (whatever the policy then does with it)."""
        return self.action != "allow"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, for the audit log and the response's `gateway.guards`."""
        return {
            "guard": self.guard,
            "stage": self.stage,
            "allowed": self.allowed,
            "action": self.action,
            "score": round(float(self.score), 4),
            "reason": self.reason,
            "message": self.message,
            "details": dict(self.details),
            "spans": [list(s) for s in self.spans],
            "ms": round(self.ms, 3),
        }


@dataclass(frozen=True)
class GuardSettings:
    """The effective policy for one guard (after per-key / per-model overrides)."""

    enabled: bool = True
    action: HitAction = "block"
    message: str = "The request was blocked by a content policy."
    thresholds: Mapping[str, float] = field(default_factory=dict)
    #: Which texts an input guard reads, by message role (plus "request" for texts outside the
    #: messages: tool definitions, response_format schemas, ...). None: all of them.
    roles: frozenset[str] | None = None
    stages: frozenset[Stage] = frozenset({"input"})
    passages: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def reads(self, role: str) -> bool:
        """Whether an input guard with these settings checks texts of `role`."""
        return self.roles is None or role in self.roles


#: Texts longer than this (characters) are checked in the shared guard executor rather than on
#: the event loop: about a millisecond of pure-Python work for the keyword or injection guard.
OFFLOAD_CHARS = 2_000


def make_executor(max_workers: int = 2) -> ThreadPoolExecutor:
    """The bounded pool for model inference; build one per process and share it."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="guard")


@dataclass
class GuardResources:
    """Shared, long-lived things guards use: the bounded executor, loaded models, the judge.

    Built once at start-up by the caller; never per request.
    """

    executor: Executor
    toxicity_scorer: Any = None  # guardrails.toxicity.ToxicityScorer | None (lazy import)
    judge: JudgeFn | None = None
    cache: dict[Any, Any] = field(default_factory=dict)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy `fn(*args)` in the shared executor; the event loop only awaits."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)


class Guard(abc.ABC):
    """One guard: `check(ctx) -> Verdict`. Subclasses set `name` and the stages they support."""

    name: ClassVar[str]
    #: Stages the guard can run on ("passage" is switched on by the policy's `passages` flag).
    stages: ClassVar[frozenset[Stage]]
    #: Defaults the policy starts from for this guard.
    default_stages: ClassVar[frozenset[Stage]] = frozenset({"input"})
    default_action: ClassVar[HitAction] = "block"
    default_passages: ClassVar[bool] = False
    default_message: ClassVar[str] = "The request was blocked by a content policy."
    #: Default thresholds; the policy may override any of these keys (and only these).
    default_thresholds: ClassVar[Mapping[str, float]] = _EMPTY
    #: Option keys the policy may set for this guard, with a short description each.
    option_keys: ClassVar[Mapping[str, str]] = _EMPTY

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        self.settings = settings
        self.resources = resources
        self.thresholds: dict[str, float] = {**self.default_thresholds, **settings.thresholds}

    @abc.abstractmethod
    async def check(self, ctx: GuardContext) -> Verdict:
        """Check `ctx.text` and say what the policy wants done about it."""

    @property
    def inert(self) -> bool:
        """True when this guard, as configured, can never find anything (e.g. no terms listed)."""
        return False

    # Helpers shared by every guard -----------------------------------------------------------

    async def offload(self, fn: Callable[[str], T], text: str) -> T:
        """`fn(text)`: inline for a short text, in the shared executor for a long one (a thread
        hop costs more than checking a message, but a long text must not stall the loop)."""
        if len(text) <= OFFLOAD_CHARS:
            return fn(text)
        return await self.resources.run_blocking(fn, text)

    def allow(self, ctx: GuardContext, score: float, started: float, **details: Any) -> Verdict:
        return Verdict(
            guard=self.name,
            allowed=True,
            score=score,
            action="allow",
            stage=ctx.stage,
            details=details,
            ms=(time.perf_counter() - started) * 1000.0,
        )

    def hit(
        self,
        ctx: GuardContext,
        score: float,
        started: float,
        reason: str,
        spans: tuple[Span, ...] = (),
        **details: Any,
    ) -> Verdict:
        """A finding: the policy's action decides what happens. Redaction masks `spans`."""
        action = self.settings.action
        redacted = None
        if action == "redact":
            redacted = mask_spans(ctx.text, spans, self.settings.options.get("mask", "*"))
        return Verdict(
            guard=self.name,
            allowed=action != "block",
            score=score,
            action=action,
            reason=reason,
            details=details,
            spans=spans,
            stage=ctx.stage,
            redacted_text=redacted,
            message=self.settings.message,
            ms=(time.perf_counter() - started) * 1000.0,
        )


def mask_spans(text: str, spans: tuple[Span, ...] | list[Span], mask: str = "*") -> str:
    """Replace every non-space character inside `spans` with `mask` (one character per char).

    With a multi-character mask (e.g. "[redacted]"), each span is replaced by the mask once.
    """
    if not spans:
        return text
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out: list[str] = []
    pos = 0
    for start, end in merged:
        out.append(text[pos:start])
        if len(mask) == 1:
            out.append("".join(c if c.isspace() else mask for c in text[start:end]))
        else:
            out.append(mask)
        pos = end
    out.append(text[pos:])
    return "".join(out)


#: The registry: guard name -> class. Filled by `register` as the guard modules are imported.
GUARDS: dict[str, type[Guard]] = {}

G = TypeVar("G", bound=type[Guard])


def register(cls: G) -> G:
    """Class decorator: add a guard class to `GUARDS` under its `name`."""
    if cls.name in GUARDS and GUARDS[cls.name] is not cls:
        raise ValueError(f"two guards named {cls.name!r}")
    GUARDS[cls.name] = cls
    return cls
