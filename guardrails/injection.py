"""Prompt-injection and jailbreak heuristics with their own score.

Each rule is a regular expression over the folded text (lower case, NFKC, no accents,
invisible characters or homoglyphs) with a weight: the chance, as judged by hand, that a
message matching it is an attack. Weights of the rules that fire combine as a noisy-or,
`score = 1 - prod(1 - w)`, so two weak signals together can cross the threshold that one alone
does not. Encoded payloads (base64, hex, rot13, URL-escapes) are decoded and scanned with the
same rules; an instruction to decode-and-obey is a signal of its own.

Rules look for instructions aimed at the assistant (verb + what it should drop or reveal),
not for topic words, so "ignore the noise in this data" or "what is a system prompt?" pass.
An instruction rule does not count where its match is negated ("never ignore previous
instructions", "do not reveal your system prompt": what system prompts say), reported ("if a
user asks you to ignore your instructions, refuse") or aimed at a third party ("ignore previous
instructions from your doctor").

Linear in the text: the folded text has whitespace runs collapsed, every quantifier in a rule
is bounded (`{0,4}`, not `*`; a test checks), so a match attempt looks at a bounded window;
payload finders are single character-class runs; exemptions look at bounded windows.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from re import _constants as _c  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any, ClassVar

import ahocorasick

from guardrails.base import Guard, GuardContext, Span, Verdict, register
from guardrails.normalize import fold_text

_W = r"(?:\W{1,16}\w{1,40}){0,%d}?\W{1,16}"  # up to N words in between (bounded: see module doc)


def _gap(n: int) -> str:
    return _W % n


_OVERRIDE_VERB = r"\b(?:ignore|disregard|forget|override|overrule|bypass|skip|drop|abandon|ditch|neglect)\b"
_PRIOR = (
    r"(?:previous|prior|above|earlier|preceding|former|foregoing|original|initial|all|any|every|your|"
    r"the system'?s?|system|developer|existing)"
)
_RULE_NOUN = (
    r"(?:instructions?|directives?|guidelines?|rules|prompts?|directions|commands?|constraints|"
    r"restrictions|polic(?:y|ies)|programming|guardrails?|context|orders|training|conditioning)"
)
_SAFETY = r"(?:safety|content|ethical|ethics|moral|security|usage|openai|anthropic)"
_SAFETY_NOUN = (
    r"(?:guidelines?|filters?|restrictions?|rules|polic(?:y|ies)|protocols?|stuff|things|"
    r"measures|limits|limitations|constraints|settings|features|training|guardrails?)"
)
_REVEAL_VERB = (
    r"\b(?:reveal|print|show|repeat|output|display|dump|leak|disclose|recite|list|expose|"
    r"echo|spell out|write out|copy|paste|tell me|give me|share|send|return|provide)\b"
)
_QUALIFIER = (
    r"(?:your|hidden|secret|initial|original|system|developer|internal|confidential|above|"
    r"previous|preceding|pre-prompt|starting)"
)
_SECRET_OBJ = (
    r"(?:(?:the|full|complete|exact|entire|all|of|whole)\s{1,4}){0,4}"
    + _QUALIFIER
    + r"\s{1,4}(?:(?:"
    + _QUALIFIER
    + r"|full|complete|exact|entire)\s{1,4}){0,4}"
    r"(?:prompt|instructions?|message|rules|directives|guidelines|configuration)"
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One weighted regex. `anchors`: strings of which every match contains one (derived from the
    regex), so the regex only needs to run near them; `width`: the longest possible match."""

    name: str
    weight: float
    pattern: re.Pattern[str]
    anchors: tuple[str, ...] | None = None
    width: int = 0


_Seq = list[tuple[Any, Any]]


def _required(items: _Seq) -> set[str] | None:
    """A set of strings one of which every match of the parsed sequence `items` contains, or
    None. Only literal characters are used; any other node (classes, assertions) is skipped."""
    candidates: list[set[str]] = []
    run: list[str] = []
    for op, av in items:
        if op is _c.LITERAL:
            run.append(chr(av))
            continue
        if run:
            candidates.append({"".join(run)})
            run = []
        found: set[str] | None = None
        if op is _c.SUBPATTERN:
            found = _required(list(av[3]))
        elif op is _c.BRANCH:
            branches = [_required(list(b)) for b in av[1]]
            found = None if any(b is None for b in branches) else set().union(*branches)  # type: ignore[arg-type]
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and av[0] >= 1:
            found = _required(list(av[2]))
        if found:
            candidates.append(found)
    if run:
        candidates.append({"".join(run)})
    if not candidates:
        return None
    # the rarest: longest shortest string, then fewest strings
    return max(candidates, key=lambda c: (min(map(len, c)), -len(c)))


def _r(name: str, weight: float, pattern: str) -> Rule:
    # the text is folded (lower case) before matching: no IGNORECASE needed
    parsed = _parser.parse(pattern, re.DOTALL)
    low, high = parsed.getwidth()
    anchors = _required(list(parsed)) if low > 0 and high < _c.MAXREPEAT else None
    return Rule(name, weight, re.compile(pattern, re.DOTALL), tuple(sorted(anchors)) if anchors else None, high)


RULES: tuple[Rule, ...] = (
    # --- instruction override
    _r("override_previous", 0.9, _OVERRIDE_VERB + _gap(3) + _PRIOR + _gap(3) + _RULE_NOUN + r"\b"),
    _r(
        "override_instructions",
        0.6,
        _OVERRIDE_VERB + _gap(3) + r"(?:instructions?|directives?|guidelines|system prompt|programming)\b",
    ),
    _r(
        "drop_safety",
        0.75,
        r"\b(?:ignore|disregard|forget|bypass|override|disable|turn off|switch off|"
        r"remove|without|no|free of|unbound by|not bound by)\b" + _gap(3) + _SAFETY + r"\s{1,4}" + _SAFETY_NOUN,
    ),
    _r(
        "stop_following",
        0.7,
        r"\b(?:stop|quit|cease|no longer|don'?t|do not|never)\s{1,4}(?:following|obeying|"
        r"follow|obey|listening to|adhering to|abiding by)\s{1,4}(?:any of\s{1,4})?"
        r"(?:your|those|these|the above|the previous|the system'?s?)\s{1,4}(?:\w{1,40}\s{1,4})?" + _RULE_NOUN + r"\b",
    ),
    _r("new_instructions", 0.6, r"\b(?:new|updated|real|actual|true)\s{1,4}(?:system\s{1,4})?instructions?\s{0,4}:"),
    _r("from_now_on", 0.35, r"\bfrom now on\b" + _gap(4) + r"\b(?:you|respond|answer|act|reply|ignore)\b"),
    # --- system prompt / secret extraction
    _r("reveal_prompt", 0.85, _REVEAL_VERB + _gap(4) + _SECRET_OBJ + r"\b"),
    _r(
        "text_above",
        0.6,
        _REVEAL_VERB + _gap(4) + r"(?:written|said|stated|everything|anything)\s{1,4}"
        r"(?:above|before) (?:this|my) (?:line|message|text|prompt)\b",
    ),
    _r(
        "prompt_verbatim",
        0.7,
        r"\b(?:prompt|instructions?|message)\b"
        + _gap(4)
        + r"(?:verbatim|word for word|word-for-word|exactly as (?:written|given))",
    ),
    _r(
        "what_were_you_told",
        0.6,
        r"\bwhat (?:were|are) (?:your|the) (?:initial|original|hidden|secret|system) "
        r"(?:instructions|prompt|rules)\b",
    ),
    _r(
        "reveal_secret",
        0.8,
        _REVEAL_VERB + _gap(4) + r"(?:api[\s_-]?keys?|passwords?|secrets?|credentials?|"
        r"access tokens?|private keys?)\b(?:" + _gap(5) + r"(?:your|context|system|memory|environment you|"
        r"instructions|conversation|you (?:have|know|were given)))",
    ),
    _r(
        "reveal_secret_bare",
        0.35,
        _REVEAL_VERB + _gap(3) + r"(?:the\s{1,4}|all\s{1,4}|any\s{1,4})?(?:secrets?|credentials?|"
        r"passwords?)\b",
    ),
    _r(
        "secret_from_context",
        0.6,
        r"\b(?:api[\s_-]?keys?|passwords?|secrets?|credentials?)\b"
        + _gap(4)
        + r"(?:from|in) your (?:context|memory|system|prompt|instructions|configuration)",
    ),
    # --- role-play overrides
    _r(
        "dan",
        0.85,
        r"\b(?:you are|you're|act as|become|pretend to be|roleplay as)\s{1,4}(?:now\s{1,4})?(?:a\s{1,4})?dan\b|"
        r"\bdan\b" + _gap(3) + r"(?:can do anything|do anything now)",
    ),
    _r(
        "unrestricted_persona",
        0.8,
        r"\b(?:you are|you're|act as|pretend|imagine|roleplay|behave|answer|respond|"
        r"reply|as if)\b" + _gap(6) + r"(?:no|without|zero|free of|free from)\s{1,4}(?:any\s{1,4})?"
        r"(?:restrictions|limits|limitations|filters?|rules|guidelines|censorship|morals|ethics|boundaries)",
    ),
    _r(
        "unrestricted_adjective",
        0.75,
        r"\b(?:you are|you're|act as|pretend to be|become)\s{1,4}(?:now\s{1,4})?(?:an?\s{1,4})?"
        r"(?:unrestricted|unfiltered|uncensored|jailbroken|evil|amoral|unethical|unaligned)\b",
    ),
    _r(
        "developer_mode",
        0.7,
        r"\b(?:enable|enter|activate|switch to|switch into|turn on|unlock|simulate|"
        r"you are in|you're in|now in)\b" + _gap(2) + r"(?:developer|god|debug|sudo|admin|jailbreak|dan)\s{1,4}mode\b",
    ),
    _r("you_are_now", 0.3, r"\byou are now\b"),
    # --- delimiter / fake role markup
    _r(
        "fake_role_tag",
        0.45,
        r"</?\s{0,4}(?:system|assistant|user|developer|im_start|im_end|s)\s{0,4}>|<\|im_(?:start|end)\|>|"
        r"\[/?inst\]|^\s{0,4}#{2,8}\s{0,4}(?:system|instruction)|\bbegin (?:system|new) prompt\b",
    ),
    # --- indirect injection (in documents, e-mails, web pages)
    _r(
        "hidden_comment_instruction",
        0.6,
        r"<!--[^>]{0,200}?\b(?:important|instruction|assistant|ai|model|llm|ignore|"
        r"when (?:summari[sz]ing|answering|reading))\b",
    ),
    _r(
        "when_summarizing",
        0.5,
        r"\bwhen (?:you )?(?:summari[sz]e|summari[sz]ing|answering|reading|processing)\b"
        + _gap(4)
        + r"\b(?:end|start|begin|include|add|append|say|respond|reply|insert|mention)\b",
    ),
    _r(
        "addressed_to_ai",
        0.5,
        r"(?:^|[.!?:>\n]\s{0,4})(?:note to (?:the )?|attention,?\s{0,4}|dear\s{1,4})?"
        r"(?:ai|assistant|language model|llm|chatbot|model)s?\s{0,4}[,:]\s{0,4}(?:you\s{1,4})?"
        r"(?:must|should|please)?\s{0,4}"
        r"(?:ignore|disregard|forget|approve|execute|run|send|forward|delete)\b",
    ),
    _r("approve_without", 0.4, r"\b(?:approve|merge|accept|grant|authori[sz]e)\s{1,4}(?:this|the|my)\b"),
    # --- tool / agency misuse
    _r(
        "tool_without_approval",
        0.75,
        r"\b(?:call|invoke|use|run|execute|trigger)\b"
        + _gap(3)
        + r"(?:tool|function|api|plugin|action)\b"
        + _gap(4)
        + r"(?:without|skipping|bypassing)\s{1,4}(?:any\s{1,4}|the\s{1,4}|user\s{1,4})?"
        + r"(?:approval|confirmation|asking|consent|review|permission)",
    ),
    _r(
        "sql_injection",
        0.75,
        r";\s{0,4}(?:drop|delete|truncate|alter|insert|update)\s{1,4}(?:table|from|into|database)\b|"
        r"\bor\s{1,4}'?1'?\s{0,4}=\s{0,4}'?1\b|;\s{0,4}--",
    ),
    # A backtick counts as command substitution only glued to a value (`name=`rm -rf /``); after
    # a space or at the start it opens a Markdown code span: "what does `rm -rf` do?" asks about it.
    _r(
        "shell_injection",
        0.7,
        r"(?:;|&&|\|\|?|(?<=[\w=:'\"/])`|\$\()\s{0,4}(?:rm\s{1,4}-rf|curl\s|wget\s|nc\s|bash\s|sh\s|chmod\s)",
    ),
    # --- encoded payloads
    _r(
        "decode_and_obey",
        0.6,
        r"\b(?:decode|decipher|decrypt|translate|convert|apply|reverse|unscramble|rot13|base64)\b"
        + _gap(8)
        + r"\b(?:(?:follow|comply|obey|execute|act on|carry out)(?:\s{1,4}with)?\s{0,4}(?::|\bit\b|\bthem\b|"
        r"\bthat\b|\bthe (?:decoded|result|resulting|hidden|instructions?|text|message))|do (?:what|as) it says)",
    ),
)

#: Instruction rules, and which exemptions apply to them (see the module docstring).
_NEGATABLE = frozenset(
    {
        "override_previous",
        "override_instructions",
        "drop_safety",
        "reveal_prompt",
        "text_above",
        "reveal_secret",
        "reveal_secret_bare",
        "developer_mode",
        "tool_without_approval",
        "decode_and_obey",
    }
)
_REPORTABLE = _NEGATABLE | {"stop_following", "unrestricted_adjective", "unrestricted_persona", "dan"}
_THIRD_PARTY_TARGET = frozenset({"override_previous", "override_instructions", "stop_following"})

_ADVERB = r"(?:ever|really|just|simply|blindly|completely|fully|entirely|actually|try to|attempt to)"
#: "never ignore", "do not reveal", "you must not disclose", "shouldn't ever share"
_NEGATED = re.compile(r"(?:\bnever|\bnot|n't|\bno longer)\s(?:" + _ADVERB + r"\s)?$")
#: "if a user asks you to ...", "when someone tells you to ..."
_REPORTED = re.compile(
    r"\b(?:if|when|whenever|should)\s(?:the\s|a\s|any\s|some\s)?(?:users?|someone|anyone|somebody|people|they|"
    r"he|she|customers?|clients?|visitors?|a message|the text|a document|input)\s(?:\w{1,20}\s){0,2}"
    r"(?:asks?|tells?|says?|tries|try|attempts?|wants?|requests?|instructs?|orders?|demands?)\s"
    r"(?:\w{1,20}\s){0,3}$"
)
#: "... instructions from your doctor", "... the rules of the game"
_THIRD_PARTY = re.compile(
    r"\s(?:from|of|by|given by|issued by)\s(?:your|my|his|her|their|our|the|a|an)\s"
    r"(?!system\b|developers?\b|creators?\b|admins?\b|administrators?\b|operators?\b|programmers?\b|openai\b|"
    r"anthropic\b|model\b|ai\b|assistant\b|owners?\b|makers?\b|trainers?\b|company\b|prompt\b)\w{1,30}"
)


def _exempt(rule: str, text: str, start: int, end: int) -> bool:
    """Whether a match of an instruction rule is not an instruction to the assistant."""
    before = text[max(0, start - 80) : start]
    if rule in _NEGATABLE and _NEGATED.search(before[-40:]):
        return True
    if rule in _REPORTABLE and _REPORTED.search(before):
        return True
    return rule in _THIRD_PARTY_TARGET and _THIRD_PARTY.match(text, end, end + 60) is not None


# Payload finders: single character-class runs (each character is looked at once), then
# checked in Python.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}=*")
_HEX_RUN = re.compile(r"\b[0-9a-fA-F]{2}(?:[\s:]?[0-9a-fA-F]{2})+")
_URL_ESCAPES = re.compile(r"(?:%[0-9a-fA-F]{2})+")
_HEX_SEPARATORS = re.compile(r"[\s:]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or sum(c.isprintable() or c.isspace() for c in text) < 0.9 * len(text):
        return None
    return text


def decoded_payloads(text: str) -> list[tuple[str, str, Span]]:
    """(encoding, decoded text, span in `text`) for each decodable payload; rot13 of the whole."""
    found: list[tuple[str, str, Span]] = []
    for m in _BASE64_RUN.finditer(text):
        decoded = _base64_payload(text, m)
        if decoded:
            found.append(("base64", decoded, m.span()))
    for m in _HEX_RUN.finditer(text):
        decoded = _hex_payload(text, m)
        if decoded:
            found.append(("hex", decoded, m.span()))
    for m in _URL_ESCAPES.finditer(text):
        if len(m.group()) >= 18:  # six escapes or more
            found.append(("url", urllib.parse.unquote(m.group()), m.span()))
    found.append(("rot13", codecs.decode(text, "rot_13"), (0, len(text))))
    return found


def _base64_payload(text: str, m: re.Match[str]) -> str | None:
    chunk = m.group()
    start = m.start()
    if (start and (text[start - 1].isalnum() or text[start - 1] in "+/")) or chunk.count("=") > 2:
        return None  # part of a longer token, or not base64 padding
    body = chunk.rstrip("=")
    if body.isalpha() and (body.islower() or body.isupper()):
        return None  # a long plain word, not base64
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _hex_payload(text: str, m: re.Match[str]) -> str | None:
    start, end = m.span()
    if (start and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum()):
        return None  # inside a word
    digits = _HEX_SEPARATORS.sub("", m.group())
    if len(digits) < 24:
        return None
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return None
    return _printable(raw)


def _noisy_or(weights: list[float]) -> float:
    p = 1.0
    for w in weights:
        p *= 1.0 - w
    return 1.0 - p


@dataclass(frozen=True, slots=True)
class InjectionFinding:
    score: float
    rules: tuple[str, ...]
    spans: tuple[Span, ...]


def _anchor_automaton() -> Any:
    automaton = ahocorasick.Automaton()
    owners: dict[str, list[int]] = {}
    for k, rule in enumerate(RULES):
        for anchor in rule.anchors or ():
            owners.setdefault(anchor, []).append(k)
    for anchor, rules in owners.items():
        automaton.add_word(anchor, (len(anchor), tuple(rules)))
    automaton.make_automaton()
    return automaton


_ANCHORS = _anchor_automaton()


def _anchor_positions(folded: str) -> list[list[int]]:
    """Per rule, the sorted start positions of its anchors in `folded` (one automaton pass)."""
    positions: list[list[int]] = [[] for _ in RULES]
    for last, (length, rules) in _ANCHORS.iter(folded):
        for k in rules:
            positions[k].append(last - length + 1)
    for p in positions:
        p.sort()
    return positions


def _finditer(rule: Rule, text: str, anchors: list[int]) -> Iterator[re.Match[str]]:
    """`rule.pattern.finditer(text)`, exactly, but searching only windows around the anchors.

    A match contains an anchor at some `a` and is at most `width` long, so it starts in
    [a - width, a]; a match attempt there reads at most up to a + width + 1 (a `\b` after the
    match), so searching text[lo:a + width + 2] gives the very same matches starting up to `a`.
    """
    if rule.anchors is None:
        yield from rule.pattern.finditer(text)
        return
    width, size, pos, i = rule.width, len(text), 0, 0
    while i < len(anchors):
        first = last = anchors[i]
        i += 1
        while i < len(anchors) and anchors[i] - width <= last + width + 2:
            last = anchors[i]
            i += 1
        lo, hi = max(pos, first - width), min(size, last + width + 2)
        while lo <= last:
            m = rule.pattern.search(text, lo, hi)
            if m is None or m.start() > last:
                break
            yield m
            pos = lo = m.end()


def _scan(folded: str) -> dict[str, tuple[float, Span]]:
    hits: dict[str, tuple[float, Span]] = {}
    anchors = _anchor_positions(folded)
    for k, rule in enumerate(RULES):
        exemptible = rule.name in _REPORTABLE or rule.name in _THIRD_PARTY_TARGET
        for m in _finditer(rule, folded, anchors[k]):
            if not exemptible or not _exempt(rule.name, folded, m.start(), m.end()):
                hits[rule.name] = (rule.weight, m.span())
                break
    return hits


def _fold(text: str) -> tuple[str, list[int], list[int]]:
    """The folded text (see `guardrails.normalize.fold_text`) with whitespace runs collapsed to
    one character, and per character the original span it came from."""
    folded, starts, ends = fold_text(text)
    if _WHITESPACE_RUN.search(folded) is None:
        return folded, starts, ends
    keep = [i for i, c in enumerate(folded) if not (c.isspace() and i and folded[i - 1].isspace())]
    return "".join(folded[i] for i in keep), [starts[i] for i in keep], [ends[i] for i in keep]


def score_injection(text: str) -> InjectionFinding:
    """Score `text` for prompt-injection; spans refer to `text`."""
    folded, starts, ends = _fold(text)
    hits = _scan(folded)
    spans: list[Span] = [(starts[s], ends[e - 1]) for _, (s, e) in hits.values() if e > s]
    names = list(hits)
    weights = [w for w, _ in hits.values()]
    for encoding, decoded, span in decoded_payloads(text):
        inner = _scan(_fold(decoded)[0])
        # an encoded payload that itself carries an instruction is at least as bad as plain text
        for name, (weight, _) in inner.items():
            if encoding == "rot13" and name in hits:
                continue
            key = f"{encoding}:{name}"
            if key not in names:
                names.append(key)
                weights.append(weight)
                spans.append(span)
    if names and not spans:
        spans = [(0, len(text))]
    return InjectionFinding(_noisy_or(weights), tuple(names), tuple(sorted(set(spans))))


@register
class InjectionGuard(Guard):
    """Scores messages (and retrieved passages) for prompt-injection and jailbreak attempts."""

    quick = True  # compiled patterns on the loop; a long text is offloaded
    name: ClassVar[str] = "injection"
    stages = frozenset({"input", "passage"})
    default_stages = frozenset({"input"})
    default_passages = True
    default_message = "The message looks like an attempt to override the assistant's instructions."
    default_thresholds: ClassVar[dict[str, float]] = {"score": 0.5}

    async def check(self, ctx: GuardContext) -> Verdict:
        # A few dozen compiled regexes over one message: well under a millisecond, on the loop;
        # a long text goes to the shared guard executor so the loop keeps answering.
        started = time.perf_counter()
        finding = await self.offload(score_injection, ctx.text)
        threshold = self.thresholds["score"]
        if finding.score < threshold:
            return self.allow(ctx, finding.score, started, rules=list(finding.rules))
        return self.hit(
            ctx,
            finding.score,
            started,
            f"prompt injection suspected ({', '.join(finding.rules)})",
            finding.spans,
            rules=list(finding.rules),
            threshold=threshold,
        )
