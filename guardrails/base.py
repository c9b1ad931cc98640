"""The guard interface: what a guard sees (`GuardContext`), what it says (`Verdict`), the abstract
`Guard` with its one method `check`, and the plain registry that maps guard names to classes.

Guards are cheap objects built by the engine from the policy; heavy, shared things (models, the
bounded executor, the LLM judge) live in one `GuardResources` handed to every guard.
"""

from __future__ import annotations

import abc
import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, TypeVar

import msgspec

if TYPE_CHECKING:  # the guard modules import this one
    from guardrails.groundedness import Support
    from guardrails.keywords import KeywordMatcher
    from guardrails.moderation import ClassifierFn
    from guardrails.toxicity import BatchingScorer, ToxicityConfig, ToxicityScorer

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


def option_error(key: str, problem: str) -> msgspec.ValidationError:
    """A problem with option `key`, in msgspec's own form (`PROBLEM - at `$.KEY``), so the policy
    finds its line the same way as for a type error."""
    return msgspec.ValidationError(f"{problem} - at `$.{key}`")


_AT = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def error_path(exc: msgspec.ValidationError) -> tuple[tuple[str, ...], str]:
    """Split a msgspec error into (key path, problem): `... - at `$.terms[1]`` -> (("terms",), ...).

    List indexes are dropped: a TOML array is one key, on one line."""
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any text
    keys = tuple(k for k, _index in _PATH_PART.findall(m.group("path") or ""))
    return keys, m.group("problem")


class GuardOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A guard's own policy keys (besides the common ones every guard takes), typed and validated.

    Each guard subclasses this with its fields. `parse` converts a policy table (a type error
    names the key, as `$.KEY`); `validate` adds the checks a type cannot express (files exist,
    regexes compile) and raises `option_error(key, problem)` for a problem with one key.
    """

    mask: Annotated[str, msgspec.Meta(min_length=1)] = "*"

    #: The problem to report for a value of the wrong type, per key (`{value!r}` is the value).
    problems: ClassVar[Mapping[str, str]] = {"mask": "mask must be a non-empty string"}
    #: Keys holding file paths, resolved against the policy's folder.
    path_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(cls.__struct_fields__)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Self:
        """The typed options for one merged table; raises msgspec.ValidationError naming the key."""
        try:
            return msgspec.convert(dict(raw), cls, strict=True)
        except msgspec.ValidationError as exc:
            keys, _problem = error_path(exc)
            if keys and keys[0] in cls.problems:
                raise option_error(keys[0], cls.problems[keys[0]].format(value=raw.get(keys[0]))) from None
            raise

    @classmethod
    def resolve_paths(cls, raw: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
        """`raw` with the relative paths of `path_keys` made absolute against `base_dir`."""
        out = dict(raw)
        for key in cls.path_keys & out.keys():
            out[key] = [str(base_dir / f) if not Path(f).is_absolute() else f for f in out[key]]
        return out

    @classmethod
    def validate(cls, raw: Mapping[str, Any], base_dir: Path) -> Self:
        """Parse one policy table (a base or override layer) and run the checks beyond types."""
        options = cls.parse(raw)
        options.check(base_dir)
        return options

    def check(self, base_dir: Path) -> None:
        """Checks beyond the types; the default has none."""


#: Texts longer than this (characters) are checked in the shared guard executor rather than on
#: the event loop: about a millisecond of pure-Python work for the keyword or injection guard.
OFFLOAD_CHARS = 2_000


def make_executor(max_workers: int = 2) -> ThreadPoolExecutor:
    """The bounded pool for model inference; build one per process and share it."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="guard")


@dataclass
class GuardResources:
    """Shared, long-lived things guards use: the bounded executor, loaded models, the judge, and
    what the guards built from them once (shared by every key/model combination).

    Built once at start-up by the caller; never per request.
    """

    executor: Executor
    toxicity_scorer: ToxicityScorer | None = None
    judge: JudgeFn | None = None
    #: The policy's [scorers.toxicity] (batch size, wait); None: the scorer's defaults.
    toxicity_config: ToxicityConfig | None = None
    #: The cross-request batcher over `toxicity_scorer` (built by the first toxicity guard).
    toxicity_batcher: BatchingScorer | None = None
    #: Keyword matchers by (terms, term files, allowlist, allowlist files).
    keyword_matchers: dict[tuple[tuple[str, ...], ...], KeywordMatcher] = field(default_factory=dict)
    #: Groundedness: the passages' support index, most recently used last (an LRU).
    groundedness_support: OrderedDict[tuple[Passage, ...], Support] = field(default_factory=OrderedDict)
    #: Moderation: how the guard asks its classifier model (None: the first moderation guard
    #: installs guardrails.moderation.HttpClassifier; tests inject a fake).
    moderation_classifier: ClassifierFn | None = None

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
    #: Whether the guard runs when the policy does not say (False for one that needs a backend).
    default_enabled: ClassVar[bool] = True
    default_action: ClassVar[HitAction] = "block"
    default_passages: ClassVar[bool] = False
    default_message: ClassVar[str] = "The request was blocked by a content policy."
    #: Default thresholds; the policy may override any of these keys (and only these).
    default_thresholds: ClassVar[Mapping[str, float]] = _EMPTY
    #: The guard's own policy keys (besides the common ones), as a typed schema.
    options_type: ClassVar[type[GuardOptions]] = GuardOptions
    #: A guard that runs a model (or asks one over the network) may be run alongside the backend
    #: call instead of before it, on input texts where its hit can only flag (see
    #: `Guardrails.check_input(defer_flags=True)`). Cheap guards stay inline: a task costs more.
    defers_flags: ClassVar[bool] = False
    #: The check runs on the event loop and awaits only to offload a long text (`offload`): it
    #: needs no task of its own beside the other guards (see `Guardrails._run` and `waits`).
    quick: ClassVar[bool] = False

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        self.settings = settings
        self.resources = resources
        self.options = self.options_type.parse(settings.options)
        self.thresholds: dict[str, float] = {**self.default_thresholds, **settings.thresholds}

    @abc.abstractmethod
    async def check(self, ctx: GuardContext) -> Verdict:
        """Check `ctx.text` and say what the policy wants done about it."""

    def waits(self, ctx: GuardContext) -> bool:
        """Whether `check(ctx)` may wait for long (a model pass, a judge, the network): such guards
        run side by side; the others are awaited in turn, without a task each."""
        return not self.quick

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

    def action_for(self, ctx: GuardContext) -> HitAction:
        """What a hit on this text does: the policy's `action` (a guard may decide per stage)."""
        return self.settings.action

    def hit(
        self,
        ctx: GuardContext,
        score: float,
        started: float,
        reason: str,
        spans: tuple[Span, ...] = (),
        *,
        action: HitAction | None = None,
        **details: Any,
    ) -> Verdict:
        """A finding: the policy's action decides what happens (`action`, when the guard decides
        it from the finding itself; default `action_for(ctx)`). Redaction masks `spans`."""
        action = action if action is not None else self.action_for(ctx)
        redacted = None
        if action == "redact":
            redacted = mask_spans(ctx.text, spans, self.options.mask)
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
