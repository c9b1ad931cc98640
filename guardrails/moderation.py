"""Moderation: a safety classifier model (Llama Guard 3 style) served by vLLM, as a guard.

The guard builds Llama Guard's prompt with the policy's categories (S1..S14 of Llama Guard 3
unless the policy lists its own), asks the classifier on its own backend (URL and model name
from the policy, with a timeout) and parses the answer: `safe`, or `unsafe` and a line of
category codes (`unsafe\\nS1,S10`). Every answer gets a clear verdict: a malformed answer, a
timeout, a refused connection or a 5xx is an error, and the policy's `fail` decides what an error
means (`open`: allow, with the error in the verdict's details; `closed`: a hit, so the guard's
action applies). The verdict's details carry the category codes and names, so they reach the
audit row and the response's `gateway.guards` like any other guard's findings.

The classifier is reached through `GuardResources.moderation_classifier`, an async callable
`(ModerationRequest) -> str` (the model's raw text answer). Tests or an embedding application
may inject one; otherwise the first moderation guard installs `HttpClassifier`, which posts to
the backend's OpenAI-compatible `/v1/completions` (the prompt as built here, so custom
categories work) or `/v1/chat/completions` (`api = "chat"`: the served model's own chat
template, with its own categories). No `gateway` or `serving` import: plain httpx.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from guardrails.base import (
    Guard,
    GuardContext,
    GuardOptions,
    GuardResources,
    GuardSettings,
    Verdict,
    option_error,
    register,
)
from guardrails.errors import ScorerUnavailable

#: Llama Guard 3's categories, as its own chat template names them (MLCommons hazard taxonomy).
LLAMA_GUARD_3_CATEGORIES: Mapping[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex Crimes",
    "S4": "Child Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
_CODE = re.compile(r"^[A-Z]{1,3}\d{1,3}$")

# Llama Guard 3's prompt (Meta's model card and chat template), with the categories filled in.
_PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
    "policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)

Turn = tuple[Literal["User", "Agent"], str]


def category_lines(categories: Mapping[str, str]) -> str:
    """`S1: Violent Crimes.` one per line; a description may follow the name on further lines."""
    lines = []
    for code, text in categories.items():
        name, _, rest = text.strip().partition("\n")
        name = name.strip()
        lines.append(f"{code}: {name if name.endswith('.') else name + '.'}")
        if rest.strip():
            lines.append(rest.strip())
    return "\n".join(lines)


def build_prompt(conversation: list[Turn], categories: Mapping[str, str]) -> str:
    """Llama Guard 3's prompt asking about the last turn of `conversation` (User or Agent)."""
    role = conversation[-1][0]
    turns = "\n\n".join(f"{who}: {text}" for who, text in conversation)
    return _PROMPT.format(role=role, categories=category_lines(categories), conversation=turns)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a classifier answer says: `safe` is None when the answer is not a verdict."""

    safe: bool | None
    codes: tuple[str, ...] = ()  # known category codes, in the answer's order
    unknown: tuple[str, ...] = ()  # codes the policy does not list (kept, for the audit row)
    problem: str | None = None  # why the answer is not usable (safe is None)


_VERDICT = re.compile(r"^\W*(unsafe|safe)\b(.*)$", re.IGNORECASE | re.DOTALL)
_CODE_IN_ANSWER = re.compile(r"\b([A-Za-z]{1,3})\s?(\d{1,3})\b")


def parse_answer(answer: str | None, categories: Mapping[str, str]) -> Assessment:
    """Parse a Llama Guard answer: `safe`, or `unsafe` then codes (`S1,S10`, any case or spacing).

    Never raises. The first word decides; `unsafe` without codes is still unsafe (codes listed
    that the policy does not know are kept apart in `unknown`). Empty text, or text whose first
    word is neither verdict (a refusal, garbage), is not a verdict: `safe` is None."""
    if not isinstance(answer, str):
        return Assessment(None, problem="no answer text")
    text = answer.strip()
    if not text:
        return Assessment(None, problem="empty answer")
    m = _VERDICT.match(text)
    if m is None:
        return Assessment(None, problem=f"not a safety verdict: {text[:80]!r}")
    if m.group(1).lower() == "safe":
        return Assessment(True)
    known: list[str] = []
    unknown: list[str] = []
    upper = {c.upper(): c for c in categories}
    for letters, digits in _CODE_IN_ANSWER.findall(m.group(2)):
        code = f"{letters.upper()}{int(digits)}"
        target = known if code in upper else unknown
        code = upper.get(code, code)
        if code not in target:
            target.append(code)
    return Assessment(False, tuple(known), tuple(unknown))


@dataclass(frozen=True, slots=True)
class ModerationRequest:
    """One call to the classifier: `prompt` for the completions API, `messages` for chat."""

    url: str
    model: str
    api: Literal["completions", "chat"]
    timeout_s: float
    prompt: str = ""
    messages: tuple[Mapping[str, str], ...] = ()
    max_tokens: int = 20


#: The seam: ask the classifier, get its raw text answer. Raise on any transport problem.
ClassifierFn = Callable[[ModerationRequest], Awaitable[str]]


class ModerationError(Exception):
    """The classifier could not be asked or answered unusably (the guard turns it into a verdict)."""


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class HttpClassifier:
    """Calls an OpenAI-compatible server (vLLM) with httpx; one client per event loop.

    Each call asks the server to close the connection after answering (`Connection: close`):
    a classifier call costs tens of milliseconds of model time, far more than a loopback or LAN
    handshake, and nothing is left open when the gateway's loop ends without closing this."""

    def __init__(self) -> None:
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> Any:
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(headers={"connection": "close"}, trust_env=False)
            self._loop = loop
        return self._client

    async def __call__(self, req: ModerationRequest) -> str:
        import httpx

        body: dict[str, Any] = {"model": req.model, "max_tokens": req.max_tokens, "temperature": 0}
        if req.api == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [dict(m) for m in req.messages]
        else:
            path = "/v1/completions"
            body["prompt"] = req.prompt
        try:
            async with asyncio.timeout(req.timeout_s):
                resp = await self._http().post(_base_url(req.url) + path, json=body, timeout=req.timeout_s)
        except TimeoutError:
            raise ModerationError(f"no answer within {req.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ModerationError(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code >= 400:
            raise ModerationError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            choice = resp.json()["choices"][0]
            text = choice["message"]["content"] if req.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ModerationError(f"not an OpenAI {req.api} answer: {resp.text[:200]!r}") from None
        if not isinstance(text, str):
            raise ModerationError(f"the answer's text is {type(text).__name__}, not a string")
        return text

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class ModerationOptions(GuardOptions, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The moderation guard's policy keys."""

    #: the classifier's OpenAI-compatible server, e.g. "http://llama-guard:8000" (required when enabled)
    url: str | None = None
    #: the served model name (vLLM's --served-model-name)
    model: str = "meta-llama/Llama-Guard-3-8B"
    #: "completions": send the Llama Guard prompt built here (custom categories work);
    #: "chat": send the conversation and let the server apply the model's chat template
    api: Literal["completions", "chat"] = "completions"
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    #: what an error (timeout, 5xx, malformed answer) means: "open" allows, "closed" is a hit
    fail: Literal["open", "closed"] = "open"
    #: code -> name (a description may follow on further lines); default: Llama Guard 3's S1..S14
    categories: dict[str, str] | None = None
    #: codes left out of the prompt (and not counted if the model names them anyway)
    exclude_categories: list[str] = msgspec.field(default_factory=list)
    #: longer texts are checked in pieces of at most this many characters
    max_chars: Annotated[int, msgspec.Meta(ge=200)] = 12_000
    #: answers kept for texts seen before (system prompts repeat); 0 turns the cache off
    cache_size: Annotated[int, msgspec.Meta(ge=0)] = 1024

    problems: ClassVar[dict[str, str]] = {
        **GuardOptions.problems,
        "url": "url must be a string such as 'http://llama-guard:8000'",
        "model": "model must be the served model's name",
        "api": "api must be completions or chat, not {value!r}",
        "timeout_s": "timeout_s must be a number of seconds above 0 (at most 600), not {value!r}",
        "fail": "fail must be open or closed, not {value!r}",
        "categories": 'categories must be a table of code = "name" (e.g. S1 = "Violent Crimes")',
        "exclude_categories": "exclude_categories must be a list of category codes",
        "max_chars": "max_chars must be an integer of at least 200, not {value!r}",
        "cache_size": "cache_size must be a non-negative integer, not {value!r}",
    }

    def check(self, base_dir: Any) -> None:
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise option_error("url", f"url must start with http:// or https://, not {self.url!r}")
        if self.categories is not None:
            bad = [c for c in self.categories if not _CODE.match(c)]
            if bad:
                raise option_error("categories", f"category codes look like S1 or O12, not {bad}")
            if not self.categories:
                raise option_error("categories", "categories must list at least one category")
        known = self.categories if self.categories is not None else LLAMA_GUARD_3_CATEGORIES
        unknown = [c for c in self.exclude_categories if c not in known]
        if unknown:
            raise option_error("exclude_categories", f"unknown category code(s) {unknown}")
        if len(set(self.exclude_categories)) >= len(known):
            raise option_error("exclude_categories", "every category is excluded: nothing would be checked")

    def effective_categories(self) -> dict[str, str]:
        base = self.categories if self.categories is not None else LLAMA_GUARD_3_CATEGORIES
        return {c: n for c, n in base.items() if c not in self.exclude_categories}


@register
class ModerationGuard(Guard):
    """Asks a Llama Guard style classifier whether a message or an answer is unsafe."""

    name: ClassVar[str] = "moderation"
    stages = frozenset({"input", "output"})
    default_stages = frozenset({"input", "output"})
    default_enabled = False  # it needs a classifier backend: on only when the policy says so
    default_message = "The content was blocked by the moderation policy."
    options_type = ModerationOptions
    options: ModerationOptions
    defers_flags = True  # a model pass (or a classifier call): input flags need not delay the backend

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        super().__init__(settings, resources)
        if not self.options.url:
            raise ScorerUnavailable(
                "the moderation guard is enabled but has no url: set [guards.moderation] url to the "
                "classifier's server (e.g. a vLLM serving meta-llama/Llama-Guard-3-8B)"
            )
        self.url: str = self.options.url
        self.categories = self.options.effective_categories()
        if resources.moderation_classifier is None:
            resources.moderation_classifier = HttpClassifier()
        self.classifier: ClassifierFn = resources.moderation_classifier
        self._cache: OrderedDict[str, Assessment] = OrderedDict()

    def _conversation(self, ctx: GuardContext, text: str) -> list[Turn]:
        if ctx.stage == "output":
            turns: list[Turn] = [("User", ctx.prompt)] if ctx.prompt else []
            return [*turns, ("Agent", text)]
        return [("Agent" if ctx.role == "assistant" else "User", text)]

    def _request(self, conversation: list[Turn]) -> ModerationRequest:
        o = self.options
        if o.api == "chat":
            messages = tuple(
                {"role": "user" if who == "User" else "assistant", "content": t} for who, t in conversation
            )
            if messages[0]["role"] == "assistant":  # chat templates expect the user to speak first
                messages = ({"role": "user", "content": ""}, *messages)
            return ModerationRequest(self.url, o.model, "chat", o.timeout_s, messages=messages)
        return ModerationRequest(
            self.url, o.model, "completions", o.timeout_s, prompt=build_prompt(conversation, self.categories)
        )

    async def _assess(self, conversation: list[Turn]) -> tuple[Assessment, bool, str]:
        """(assessment, from the cache?, raw answer); errors become an Assessment with a problem."""
        req = self._request(conversation)
        key = hashlib.blake2b(repr((req.model, req.api, req.prompt, req.messages)).encode(), digest_size=16).hexdigest()
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found, True, ""
        try:
            raw = await self.classifier(req)
        except ModerationError as exc:
            return Assessment(None, problem=str(exc)), False, ""
        except Exception as exc:  # an injected classifier's own failure: still a clear verdict
            return Assessment(None, problem=f"{type(exc).__name__}: {exc}"), False, ""
        assessment = parse_answer(raw, self.categories)
        excluded = [c for c in assessment.unknown if c in self.options.exclude_categories]
        if excluded:  # codes the policy switched off do not count
            rest = tuple(c for c in assessment.unknown if c not in excluded)
            assessment = Assessment(not (assessment.codes or rest), assessment.codes, rest)
        if assessment.safe is not None and self.options.cache_size:
            self._cache[key] = assessment
            while len(self._cache) > self.options.cache_size:
                self._cache.popitem(last=False)
        return assessment, False, raw

    async def check(self, ctx: GuardContext) -> Verdict:
        started = time.perf_counter()
        text = ctx.text
        if not text.strip():
            return self.allow(ctx, 0.0, started, model=self.options.model, skipped="empty text")
        step = self.options.max_chars
        pieces = [(i, min(i + step, len(text))) for i in range(0, len(text), step)]
        results = await asyncio.gather(*(self._assess(self._conversation(ctx, text[s:e])) for s, e in pieces))
        codes: list[str] = []
        unknown: list[str] = []
        problems: list[str] = []
        spans: list[tuple[int, int]] = []
        raw_answers: list[str] = []
        cached = all(c for _, c, _ in results)
        for (s, e), (a, _cached, raw) in zip(pieces, results, strict=True):
            raw_answers.append(raw[:200])
            if a.safe is None:
                problems.append(a.problem or "no verdict")
            elif not a.safe:
                spans.append((s, e))
                codes += [c for c in a.codes if c not in codes]
                unknown += [c for c in a.unknown if c not in unknown]
        details: dict[str, Any] = {"model": self.options.model, "cached": cached}
        if spans:
            named = [f"{c} {self.categories[c]}" for c in codes]
            details.update(
                categories=codes,
                category_names=[self.categories[c] for c in codes],
                unknown_categories=unknown,
                answer=raw_answers[0] if len(raw_answers) == 1 else raw_answers,
            )
            reason = "unsafe: " + (", ".join(named + unknown) if named or unknown else "no category given")
            if problems:
                details["errors"] = problems
            return self.hit(ctx, 1.0, started, reason, tuple(spans), **details)
        if problems:
            details.update(error=problems[0] if len(problems) == 1 else problems, fail=self.options.fail)
            if self.options.fail == "closed":
                reason = f"moderation unavailable, failing closed: {problems[0]}"
                return self.hit(ctx, 1.0, started, reason, ((0, len(text)),), **details)
            return self.allow(ctx, 0.0, started, **details)
        return self.allow(ctx, 0.0, started, categories=[], **details)
