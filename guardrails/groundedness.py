"""Groundedness: is each sentence of the answer supported by the retrieved passages?

Method (justified and measured in guardrails/README.md): weighted lexical support. Each answer
sentence is cut into content tokens (stop words, and words it merely repeats from the user's
question, do not count as claims). A token is supported when the passages contain it (exact,
light stem, or, for partial credit, the same 5-letter prefix). Numbers and dates weigh 3,
names (capitalised words not at the start of a sentence) weigh 2, other words 1: an unsupported
number or name is a strong signal. A sentence's support is its supported weight over its total
weight; the answer's score is its weakest sentence's. Two relation checks (under
`strict_entities`) catch claims whose every word is in the passages: names that one clause puts
together but no passage sentence mentions together (a pronoun sentence counts its subject), and
a denial that no passage sentence makes. Runs in well under a millisecond on CPU.

An optional `llm` or `hybrid` mode asks a judge model (an async callable handed in by the
gateway): `llm` judges every answer, `hybrid` only the sentences the lexical check flags.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from guardrails.base import (
    Guard,
    GuardContext,
    GuardOptions,
    GuardResources,
    GuardSettings,
    Passage,
    Span,
    Verdict,
    register,
)
from guardrails.normalize import simple_fold
from guardrails.sentences import split_sentences

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "but",
        "nor",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "doing",
        "it",
        "its",
        "it's",
        "this",
        "that",
        "these",
        "those",
        "as",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "why",
        "how",
        "than",
        "then",
        "so",
        "such",
        "not",
        "no",
        "yes",
        "also",
        "there",
        "their",
        "theirs",
        "they",
        "them",
        "he",
        "she",
        "his",
        "her",
        "hers",
        "him",
        "i",
        "you",
        "we",
        "our",
        "ours",
        "your",
        "yours",
        "my",
        "me",
        "us",
        "one",
        "into",
        "about",
        "over",
        "after",
        "before",
        "during",
        "while",
        "if",
        "because",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "very",
        "more",
        "most",
        "other",
        "some",
        "any",
        "each",
        "all",
        "both",
        "either",
        "neither",
        "only",
        "own",
        "same",
        "just",
        "too",
        "until",
        "up",
        "down",
        "out",
        "off",
        "again",
        "further",
        "once",
        "here",
        "s",
        "t",
        "don",
        "now",
        "ve",
        "ll",
        "re",
        "d",
        "m",
        "o",
        "y",
        "per",
        "via",
        "upon",
        "among",
        "within",
        "without",
        "whether",
        "though",
        "although",
        "yet",
        "however",
        "therefore",
        "thus",
        "hence",
    ]
)
# Words that frame an answer rather than claim anything ("According to the passage, ...").
META_WORDS = frozenset(
    [
        "according",
        "passage",
        "passages",
        "context",
        "document",
        "documents",
        "source",
        "sources",
        "text",
        "answer",
        "question",
        "based",
        "provided",
        "mentioned",
        "mention",
        "mentions",
        "stated",
        "states",
        "state",
        "say",
        "says",
        "said",
        "information",
        "given",
        "above",
        "following",
        "sure",
        "note",
        "noted",
        "indeed",
        "actually",
        "answer",
        "answered",
        "known",
        "called",
        "named",
    ]
)

_TOKEN = re.compile(r"\d+(?:[.,:/-]\d+)*(?:st|nd|rd|th|s)?|[^\W\d_]+(?:['’][^\W\d_]+)*")
#: Words that turn a claim around: "X is not Y" needs a passage that says so.
NEGATIONS = frozenset(["not", "no", "never", "neither", "nor", "none", "nothing", "nobody", "cannot"])
#: Pronouns that, in encyclopaedic text, mostly stand for the paragraph's subject.
_PRONOUNS = frozenset(["he", "she", "his", "her", "him", "hers", "it", "its", "they", "their", "them"])
#: Two paragraphs glued without a space ("...century.First for Women is ..."), as scraped text often is.
_GLUED = re.compile(r"([a-z0-9)\]\"'])\.([A-Z])")
#: Where a sentence's clauses part: names are only checked for co-occurrence inside one clause.
_CLAUSE = re.compile(
    r"[,;:()\u2013\u2014]|\s-\s|\b(?:who|which|whose|whom|while|whereas|where|when|although|though|but)\b",
    re.IGNORECASE,
)
_SUFFIXES = ("'s", "’s", "ies", "es", "s", "ing", "ed", "ly")


def _stem(w: str) -> str:
    for suffix in _SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def _norm_number(t: str) -> str:
    t = re.sub(r"(?<=\d)(?:st|nd|rd|th|s)$", "", t)
    return t.replace(",", "")


def _folded_tokens(text: str) -> list[str]:
    return [simple_fold(m.group()) for m in _TOKEN.finditer(text)]


def _is_negation(token: str) -> bool:
    return token in NEGATIONS or token.endswith("n't") or token.endswith("n’t")


def _name_runs(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Capitalised word runs and numbers ("Southwest Georgia Regional Airport", "1968"), as
    (raw text, folded tokens); a capitalised stop word opening the text is not a name."""
    runs: list[tuple[str, tuple[str, ...]]] = []
    raw: list[str] = []
    cur: list[str] = []
    for i, m in enumerate(_TOKEN.finditer(text)):
        word = m.group()
        tok = simple_fold(word)
        if (word[0].isupper() or word[0].isdigit()) and not (i == 0 and tok in STOPWORDS):
            raw.append(word)
            cur.append(tok)
            continue
        if cur:
            runs.append((" ".join(raw), tuple(cur)))
            raw, cur = [], []
    if cur:
        runs.append((" ".join(raw), tuple(cur)))
    return runs


def _sentence_sets(text: str) -> list[frozenset[str]]:
    """The tokens of each sentence of a passage; a sentence with a pronoun also holds the tokens of
    the first name of its paragraph and of the sentence before it (the likely subjects), so
    "She won it in 1966" links her name and 1966."""
    out: list[frozenset[str]] = []
    for para in _GLUED.sub("\\1.\n\n\\2", text).split("\n\n"):
        subject: frozenset[str] | None = None
        previous: frozenset[str] = frozenset()
        for start, end in split_sentences(para):
            sentence = para[start:end]
            tokens = set(_folded_tokens(sentence))
            runs = _name_runs(sentence)
            first = frozenset(runs[0][1]) if runs else frozenset()
            if subject is None:
                subject = first
            if tokens & _PRONOUNS:
                tokens |= subject | previous
            previous = first
            out.append(frozenset(tokens))
    return out


@dataclass(frozen=True, slots=True)
class Support:
    """The vocabulary of a set of passages, and which words stand in one sentence together."""

    words: frozenset[str]
    stems: frozenset[str]
    prefixes: frozenset[str]
    numbers: frozenset[str]
    sentences: tuple[frozenset[str], ...] = ()
    tokens: frozenset[str] = frozenset()


def build_support(texts: list[str]) -> Support:
    words: set[str] = set()
    numbers: set[str] = set()
    sentences: list[frozenset[str]] = []
    for text in texts:
        sentences.extend(_sentence_sets(text))
        for m in _TOKEN.finditer(text):
            tok = simple_fold(m.group())
            if tok[0].isdigit():
                n = _norm_number(tok)
                numbers.add(n)
                numbers.update(re.split(r"[.:/-]", n))  # "1844–1846" and "2006-07" parts
            else:
                words.add(tok)
                words.update(re.split(r"['’]", tok))
    return Support(
        frozenset(words),
        frozenset(_stem(w) for w in words),
        frozenset(w[:5] for w in words if len(w) >= 5),
        frozenset(numbers),
        tuple(sentences),
        frozenset().union(*sentences),
    )


def unlinked_names(sentence: str, support: Support) -> list[str]:
    """Pairs of names (or numbers) that one clause of `sentence` puts together but no passage
    sentence mentions together: "Stanford University is located in Chestnut Hill" when the
    passages place Boston College there. Names the passages lack entirely are left to the
    strong-signal check; pairs across clauses ("X, who ..., did Y") are not compared."""
    out: list[str] = []
    for clause in _CLAUSE.split(sentence):
        if not clause or not clause.strip():
            continue
        names: list[tuple[str, frozenset[str]]] = []
        for raw, toks in _name_runs(clause.strip()):
            known = frozenset(t for t in toks if t in support.tokens and t not in STOPWORDS)
            if known:
                names.append((raw, known))
        for i, (raw_a, a) in enumerate(names):
            for raw_b, b in names[i + 1 :]:
                if a & b or any(a <= s and b <= s for s in support.sentences):
                    continue
                out.append(f"{raw_a} + {raw_b}")
    return out


def unsupported_negation(sentence: str, support: Support) -> bool:
    """True when `sentence` denies something ("X was not a suspect") and no passage sentence that
    shares its content words carries a negation: a denial needs a source as much as a claim."""
    tokens = _folded_tokens(sentence)
    if not any(_is_negation(t) for t in tokens):
        return False
    content = {t for t in tokens if t not in STOPWORDS and t not in META_WORDS and not _is_negation(t) and len(t) > 2}
    if not content:
        return False
    return not any(s & content and any(_is_negation(t) for t in s) for s in support.sentences)


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    start: int
    end: int
    score: float
    weight: float
    unsupported: tuple[str, ...]
    strong: tuple[str, ...]  # unsupported numbers and names
    unlinked: tuple[str, ...] = ()  # name pairs no passage sentence puts together
    negation: bool = False  # denies something no passage denies


def score_sentence(text: str, start: int, end: int, support: Support, asked: frozenset[str]) -> SentenceSupport:
    """Weighted share of the sentence's content tokens found in the passages."""
    total = 0.0
    supported = 0.0
    unsupported: list[str] = []
    strong: list[str] = []
    sentence = text[start:end]
    for i, m in enumerate(_TOKEN.finditer(sentence)):
        raw = m.group()
        tok = simple_fold(raw)
        if tok[0].isdigit():
            n = _norm_number(tok)
            weight = 3.0
            total += weight
            parts = [p for p in re.split(r"[.:/-]", n) if p]
            if n in support.numbers or (parts and all(p in support.numbers for p in parts)):
                supported += weight
            else:
                unsupported.append(raw)
                strong.append(raw)
            continue
        base = re.split(r"['’]", tok)[0]
        if base in STOPWORDS or base in META_WORDS or len(base) < 2:
            continue
        stem = _stem(base)
        if base in asked or stem in asked:
            continue  # repeating the question is not a new claim
        is_name = raw[0].isupper() and i > 0
        weight = 2.0 if is_name else 1.0
        total += weight
        if base in support.words or tok in support.words or stem in support.stems:
            supported += weight
        elif len(base) >= 5 and base[:5] in support.prefixes:
            supported += 0.7 * weight
        else:
            unsupported.append(raw)
            if is_name:
                strong.append(raw)
    score = 1.0 if total == 0 else supported / total
    unlinked = tuple(unlinked_names(sentence, support)) if support.sentences else ()
    negation = bool(support.sentences) and unsupported_negation(sentence, support)
    return SentenceSupport(start, end, score, total, tuple(unsupported), tuple(strong), unlinked, negation)


def question_words(prompt: str | None) -> frozenset[str]:
    if not prompt:
        return frozenset()
    out: set[str] = set()
    for m in _TOKEN.finditer(prompt):
        tok = simple_fold(m.group())
        if not tok[0].isdigit():
            out.add(tok)
            out.add(_stem(tok))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class GroundednessResult:
    score: float  # the weakest sentence's support, 1.0 for an answer without claims
    mean: float  # weight-averaged support over the whole answer
    sentences: tuple[SentenceSupport, ...]


def score_groundedness(
    answer: str, passages: list[str], prompt: str | None = None, support: Support | None = None
) -> GroundednessResult:
    """Per-sentence and overall support of `answer` by `passages` (lexical method)."""
    support = support or build_support(passages)
    asked = question_words(prompt)
    sentences = tuple(score_sentence(answer, s, e, support, asked) for s, e in split_sentences(answer))
    weighted = [s for s in sentences if s.weight > 0]
    if not weighted:
        return GroundednessResult(1.0, 1.0, sentences)
    score = min(s.score for s in weighted)
    mean = sum(s.score * s.weight for s in weighted) / sum(s.weight for s in weighted)
    return GroundednessResult(score, mean, sentences)


JUDGE_PROMPT = """You check whether an answer is supported by reference passages.

Passages:
{passages}

{question}Answer to check:
{answer}

Is every factual claim in the answer supported by the passages? Reply with exactly one word:
SUPPORTED or UNSUPPORTED."""


def parse_judgement(reply: str) -> bool | None:
    """True for SUPPORTED, False for UNSUPPORTED, None when the reply says neither."""
    words = re.findall(r"[A-Za-z]+", reply.upper())
    if "UNSUPPORTED" in words or "NOT" in words[:3]:
        return False
    if "SUPPORTED" in words:
        return True
    return None


def _sentence_details(s: SentenceSupport) -> dict[str, Any]:
    out: dict[str, Any] = {"span": [s.start, s.end], "support": round(s.score, 4), "unsupported": list(s.unsupported)}
    if s.unlinked:
        out["unlinked"] = list(s.unlinked)
    if s.negation:
        out["negation"] = True
    return out


class GroundednessOptions(GuardOptions, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The groundedness guard's policy keys."""

    #: lexical (default), llm (judge every answer) or hybrid (judge flagged sentences)
    mode: Literal["lexical", "llm", "hybrid"] = "lexical"
    #: flag a sentence with any unsupported number, date or name, with names that no passage
    #: sentence mentions together, or with a denial no passage makes
    strict_entities: bool = True

    problems: ClassVar[dict[str, str]] = {
        **GuardOptions.problems,
        "mode": "mode must be lexical, llm or hybrid, not {value!r}",
        "strict_entities": "'strict_entities' must be true or false",
    }


@register
class GroundednessGuard(Guard):
    """Flags answer sentences whose content is not supported by the retrieved passages."""

    name: ClassVar[str] = "groundedness"
    stages = frozenset({"output"})
    default_stages = frozenset({"output"})
    default_action = "flag"
    default_message = "Parts of the answer are not supported by the retrieved sources."
    default_thresholds: ClassVar[dict[str, float]] = {"sentence": 0.8}
    options_type = GroundednessOptions
    options: GroundednessOptions
    _CACHE_SIZE = 64
    _INLINE_CHARS = 20_000  # above this much passage text, the check runs in the executor

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        super().__init__(settings, resources)  # a bad mode raises msgspec.ValidationError (a ValueError)
        self.mode = self.options.mode
        self._support_cache = resources.groundedness_support

    def _support(self, passages: tuple[Passage, ...]) -> Support:
        found = self._support_cache.get(passages)
        if found is None:
            found = build_support([p.text for p in passages] + [p.title for p in passages if p.title])
            self._support_cache[passages] = found
            while len(self._support_cache) > self._CACHE_SIZE:
                self._support_cache.popitem(last=False)
        else:
            self._support_cache.move_to_end(passages)
        return found

    def waits(self, ctx: GuardContext) -> bool:
        return bool(ctx.passages)  # without passages there is nothing to check: it answers at once

    def _lexical(self, ctx: GuardContext) -> GroundednessResult:
        return score_groundedness(ctx.text, [], ctx.prompt, self._support(ctx.passages))

    async def check(self, ctx: GuardContext) -> Verdict:
        started = time.perf_counter()
        if not ctx.passages:
            return self.allow(ctx, 1.0, started, skipped="no passages to check against")
        if sum(len(p.text) for p in ctx.passages) > self._INLINE_CHARS:
            result = await self.resources.run_blocking(self._lexical, ctx)
        else:
            result = self._lexical(ctx)
        threshold = self.thresholds["sentence"]
        strict = self.options.strict_entities
        flagged = [
            s
            for s in result.sentences
            if (s.weight > 0 and s.score < threshold) or (strict and (s.strong or s.unlinked or s.negation))
        ]
        details: dict[str, Any] = {
            "method": "lexical",
            "mean": round(result.mean, 4),
            "sentences": [_sentence_details(s) for s in result.sentences],
        }
        score = result.score
        if self.mode != "lexical" and self.resources.judge is not None:
            to_judge = [(0, len(ctx.text))] if self.mode == "llm" else [(s.start, s.end) for s in flagged]
            judged = []
            for s, e in to_judge:
                judged.append(((s, e), await self._ask_judge(ctx, ctx.text[s:e])))
            details["method"] = self.mode
            details["judge"] = [{"span": list(span), "supported": ok} for span, ok in judged]
            if self.mode == "llm":
                ok = judged[0][1]
                if ok is not None:
                    score = 1.0 if ok else 0.0
                    flagged = [] if ok else list(result.sentences)
            else:
                # the judge can clear a sentence the lexical check doubted (paraphrase), not condemn more
                cleared = {span for span, ok in judged if ok}
                flagged = [s for s in flagged if (s.start, s.end) not in cleared]
                if not flagged:
                    score = max(score, threshold)
        if not flagged:
            return self.allow(ctx, score, started, **details)
        spans: tuple[Span, ...] = tuple((s.start, s.end) for s in flagged)
        strong = [t for s in flagged for t in s.strong]
        unlinked = [p for s in flagged for p in s.unlinked]
        reason = f"{len(flagged)} sentence(s) not supported by the passages"
        if strong:
            reason += f" (unsupported: {', '.join(strong[:5])})"
        if unlinked:
            reason += f" (never together in the passages: {'; '.join(unlinked[:3])})"
        if any(s.negation for s in flagged):
            reason += " (a denial the passages do not make)"
        return self.hit(ctx, score, started, reason, spans, **details)

    async def _ask_judge(self, ctx: GuardContext, answer: str) -> bool | None:
        assert self.resources.judge is not None
        passages = "\n\n".join(f"[{i + 1}] {p.text}" for i, p in enumerate(ctx.passages))
        question = f"Question:\n{ctx.prompt}\n\n" if ctx.prompt else ""
        reply = await self.resources.judge(JUDGE_PROMPT.format(passages=passages, question=question, answer=answer))
        return parse_judgement(reply)
