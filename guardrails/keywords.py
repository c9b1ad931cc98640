"""Keyword and phrase filter: operator term lists matched by one Aho-Corasick automaton over
an evasion-resistant normalisation of the text (see `guardrails.normalize`).

Term files: one term or phrase per line; `#` starts a comment; blank lines are skipped; a line
`re:PATTERN` is a Python regular expression searched in the folded text (lower case, NFKC,
accents, invisible characters and homoglyphs removed; no leetspeak decoding or re-joining, so
write the regex for that yourself). Regexes are tried one by one: keep them few. Plain-term
matches are whole words only (no Scunthorpe hits); an allowlist of words/phrases suppresses any match that
lies inside one of its matches. Spans always refer to the original text.
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import ahocorasick

from guardrails.base import (
    Guard,
    GuardContext,
    GuardOptions,
    GuardResources,
    GuardSettings,
    Span,
    Verdict,
    option_error,
    register,
)
from guardrails.errors import PolicyError
from guardrails.normalize import View, collapse, fold_text, normalize_term, plain_view_texts, squash, word_views


@dataclass(frozen=True, slots=True)
class Term:
    """One term as the operator wrote it, with where it came from (for error messages)."""

    text: str
    file: str = "<inline>"
    line: int = 0
    regex: bool = False


@dataclass(frozen=True, slots=True)
class KeywordMatch:
    term: str
    start: int
    end: int


def parse_terms(lines: Iterable[str], file: str = "<inline>") -> list[Term]:
    """Parse term-file lines; a bad `re:` line raises PolicyError naming file and line."""
    terms: list[Term] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("re:"):
            pattern = line[3:].strip()
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PolicyError(file, lineno, f"invalid regular expression {pattern!r}: {exc}") from None
            if not pattern:
                raise PolicyError(file, lineno, "empty regular expression after 're:'")
            terms.append(Term(pattern, file, lineno, regex=True))
        else:
            # an inline "  # comment" after a term is a comment too
            text = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if text:
                terms.append(Term(text, file, lineno))
    return terms


def load_term_file(path: str | Path) -> list[Term]:
    """Read one term file (UTF-8); a missing or unreadable file raises PolicyError."""
    p = Path(path)
    try:
        content = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(p), None, f"cannot read term file: {exc}") from None
    return parse_terms(content.splitlines(), str(p))


#: A term split across words (`zor blax`, `zorb-lax`) is caught when it has at least this many
#: characters and at most this many pieces: short terms split in two are too often two real
#: words ("an al").
SPLIT_MIN_CHARS = 5
SPLIT_MAX_PIECES = 3


class _Automaton:
    """Collapsed term patterns (with boundary spaces) -> [(term, run lengths)]."""

    def __init__(self, terms: Sequence[Term]) -> None:
        self.automaton: Any = ahocorasick.Automaton()
        entries: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for term in terms:
            variants = {term.text}
            if " " in term.text.strip():
                variants.add(term.text.replace(" ", ""))  # "bad word" also matches "badword"
            for variant in variants:
                pattern, runs = normalize_term(variant)
                if pattern:
                    entries.setdefault(pattern, []).append((term.text, runs))
        for pattern, values in entries.items():
            self.automaton.add_word(pattern, (len(pattern), values))
        self.size = len(entries)
        # whether any term can be found split across words (the squashed view is then needed)
        self.splittable = any(" " not in p and len(p) >= SPLIT_MIN_CHARS for p in entries)
        if self.size:
            self.automaton.make_automaton()

    def find(self, view: View, split: bool = False) -> list[tuple[str, int, int]]:
        """(term, view start, view stop) for each verified match in a collapsed view.

        With `split`, `view` is a squashed view and only matches across 2..SPLIT_MAX_PIECES
        words count (whole-word matches come from the word view)."""
        if not self.size:
            return []
        found = []
        start_ok, end_ok = view.start_ok, view.end_ok
        for last, (length, values) in self.automaton.iter(view.text):
            start = last - length + 1
            if not (start_ok[start] and end_ok[last]):
                continue  # inside a word: no Scunthorpe hits
            if split:
                if length < SPLIT_MIN_CHARS or view.piece is None:
                    continue
                pieces = 1 + int(view.piece[start + 1 : last + 1].sum())
                if not 2 <= pieces <= SPLIT_MAX_PIECES:
                    continue
            text_runs = view.runs[start : last + 1].tolist()
            for term, runs in values:
                # each character must repeat at least as often as in the term ("ass" != "as")
                if all(t >= r for t, r in zip(text_runs, runs, strict=True)):
                    found.append((term, start, last + 1))
                    break
        return found


class _Spans:
    """Original-text spans, for "is this span inside one of them" in O(log n)."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        ordered = sorted(spans)
        self.starts = [s for s, _ in ordered]
        self.reach: list[int] = []  # the furthest end among the spans that start at or before
        furthest = -1
        for _, e in ordered:
            furthest = max(furthest, e)
            self.reach.append(furthest)

    def covers(self, span: tuple[int, int]) -> bool:
        i = bisect.bisect_right(self.starts, span[0])
        return i > 0 and self.reach[i - 1] >= span[1]


class KeywordMatcher:
    """All of one policy's terms and allowlist in one automaton each, plus the few regexes."""

    def __init__(self, terms: Sequence[Term], allow: Sequence[Term] = ()) -> None:
        self.terms = _Automaton([t for t in terms if not t.regex])
        self.allow = _Automaton([t for t in allow if not t.regex])
        self.regexes = [(t.text, re.compile(t.text)) for t in terms if t.regex]
        self.term_count = len(terms)

    def _may_match(self, text: str) -> bool:
        """False when no listed term can match: for plain text, the automaton finds nothing at
        all in the view texts (built cheaply, without offsets). Most messages end here."""
        views = plain_view_texts(text)
        if views is None or not self.terms.size:
            return views is None
        word, squashed = views
        automaton = self.terms.automaton
        if next(automaton.iter(word), None) is not None:
            return True
        return self.terms.splittable and next(automaton.iter(squashed), None) is not None

    def _regex_matches(self, text: str) -> list[KeywordMatch]:
        """Matches of the operator's `re:` terms in the folded text, in original offsets."""
        out: list[KeywordMatch] = []
        if self.regexes:
            folded, starts, ends = fold_text(text)
            for source, rx in self.regexes:
                for m in rx.finditer(folded):
                    if m.end() > m.start():
                        out.append(KeywordMatch("re:" + source, starts[m.start()], ends[m.end() - 1]))
        return out

    def find(self, text: str) -> list[KeywordMatch]:
        """Every term match in `text`, as spans of the original text, allowlist applied.

        Linear in the text (one pass per view, an Aho-Corasick automaton each), plus whatever
        the operator's `re:` regexes cost."""
        if not self.term_count:
            return []  # nothing listed: no normalisation either
        found: list[tuple[str, tuple[int, int]]] = []
        allowed: list[tuple[int, int]] = []
        if not self._may_match(text) and not self._regex_matches(text):
            return []
        for wview in word_views(text):
            views = [(collapse(wview), False)]
            if self.terms.splittable:
                views.append((collapse(squash(wview)), True))
            for view, split in views:
                for _, s, e in self.allow.find(view, split):
                    if span := view.original_span(s, e):
                        allowed.append(span)
                for term, s, e in self.terms.find(view, split):
                    if span := view.original_span(s, e):
                        found.append((term, span))
        found.extend((m.term, (m.start, m.end)) for m in self._regex_matches(text))
        inside = _Spans(allowed)
        out: list[KeywordMatch] = []
        furthest = -1
        # by start, longest first: a match inside a longer one ("bad word" in "bad word phrase")
        # adds nothing
        for term, (s, e) in sorted(found, key=lambda f: (f[1][0], -f[1][1])):
            if e > furthest and not inside.covers((s, e)):
                out.append(KeywordMatch(term, s, e))
                furthest = e
        return out


class KeywordOptions(GuardOptions, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The keyword guard's policy keys. Term syntax: see the module docstring."""

    #: inline terms (same syntax as a term-file line)
    terms: tuple[str, ...] = ()
    #: term files (paths relative to the policy file)
    term_files: tuple[str, ...] = ()
    #: inline allowlist of words/phrases
    allow: tuple[str, ...] = ()
    #: allowlist files
    allow_files: tuple[str, ...] = ()

    problems: ClassVar[dict[str, str]] = {
        **GuardOptions.problems,
        "terms": "'terms' must be a list of strings",
        "allow": "'allow' must be a list of strings",
        "term_files": "'term_files' must be a list of file paths",
        "allow_files": "'allow_files' must be a list of file paths",
    }
    path_keys: ClassVar[frozenset[str]] = frozenset({"term_files", "allow_files"})

    def check(self, base_dir: Path) -> None:
        """Inline terms parse; term files exist and parse (a bad line names that file and line)."""
        for key in ("terms", "allow"):
            try:
                parse_terms(getattr(self, key))
            except PolicyError as exc:
                raise option_error(key, f"in '{key}': {exc.problem}") from None
        for key in ("term_files", "allow_files"):
            for f in getattr(self, key):
                path = (base_dir / f) if not Path(f).is_absolute() else Path(f)
                if not path.is_file():
                    raise option_error(key, f"term file {f!r} not found (looked for {path})")
                load_term_file(path)  # raises PolicyError naming that file and line

    @property
    def matcher_key(self) -> tuple[tuple[str, ...], ...]:
        """What the matcher is built from (the mask is not)."""
        return (self.terms, self.term_files, self.allow, self.allow_files)

    def build_matcher(self) -> KeywordMatcher:
        terms = parse_terms(self.terms, "<policy: terms>")
        for f in self.term_files:
            terms.extend(load_term_file(f))
        allow = parse_terms(self.allow, "<policy: allow>")
        for f in self.allow_files:
            allow.extend(load_term_file(f))
        return KeywordMatcher(terms, allow)


@register
class KeywordGuard(Guard):
    """Blocks, redacts or flags messages containing operator-listed terms."""

    quick = True  # compiled patterns on the loop; a long text is offloaded
    name: ClassVar[str] = "keywords"
    stages = frozenset({"input", "output", "passage"})
    default_stages = frozenset({"input"})
    default_passages = True
    default_message = "The message contains a term that is not allowed here."
    options_type = KeywordOptions
    options: KeywordOptions

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        super().__init__(settings, resources)
        key = self.options.matcher_key
        matcher = resources.keyword_matchers.get(key)
        if matcher is None:
            matcher = resources.keyword_matchers[key] = self.options.build_matcher()
        self.matcher: KeywordMatcher = matcher

    @property
    def inert(self) -> bool:
        """No terms listed: this guard can never find anything."""
        return not self.matcher.term_count

    async def check(self, ctx: GuardContext) -> Verdict:
        # Well under a millisecond for a message: on the loop. A long text goes to the shared
        # guard executor so the event loop (and /healthz) keeps answering meanwhile.
        started = time.perf_counter()
        found = await self.offload(self.matcher.find, ctx.text)
        if not found:
            return self.allow(ctx, 0.0, started)
        spans: tuple[Span, ...] = tuple((m.start, m.end) for m in found)
        terms = sorted({m.term for m in found})
        return self.hit(ctx, 1.0, started, f"matched {len(found)} listed term(s)", spans, terms=terms, count=len(found))
