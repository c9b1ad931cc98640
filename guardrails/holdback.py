"""How much of a growing answer a stream must still hold back for one guard.

The streaming checker (`guardrails.engine.StreamChecker`) releases text before its sentence ends
once the guards that can block or redact have passed it. What "passed" may mean depends on the
guard:

- keywords (`keyword_hold_start`): a listed term is exact, so text is safe to release up to where
  a term could still begin and be completed by the next characters; that is found in the same
  evasion-resistant views the matcher searches (so `b l u e` and `blue-` are held while a term
  `bluebird` exists), without a fixed window;
- a sentence model (toxicity): a word is released only after the sentence so far was scored with
  `hold` complete words after it (`word_window`), so a phrase of up to `hold + 1` words that
  straddles a release point is scored whole before any of it goes out.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, NamedTuple

from guardrails.keywords import KeywordMatcher
from guardrails.normalize import collapse, plain_view_texts, squash, word_views

_WORD = re.compile(r"\S+")
_LONGEST: weakref.WeakKeyDictionary[KeywordMatcher, int] = weakref.WeakKeyDictionary()


class WordWindow(NamedTuple):
    """What a sentence model may release of an unfinished sentence (offsets into it)."""

    release: int  # text[:release] has at least `hold` complete words after it in the scored text
    words: int  # complete words (followed by whitespace)
    scored: int  # the end of the last complete word: text[:scored] is what gets scored


def word_window(text: str, hold: int) -> WordWindow:
    """The release point in `text` for a guard that must see `hold` complete words after
    every released word: the unfinished last word and the `hold` complete words before it are
    held (`release` is where the first held word starts; `len(text)` when none is held)."""
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    complete = [s for s in spans if s[1] < len(text)]
    held = len(spans) - len(complete) + min(hold, len(complete))
    release = spans[len(spans) - held][0] if held else len(text)
    return WordWindow(release, len(complete), complete[-1][1] if complete else 0)


def _longest(matcher: KeywordMatcher) -> int:
    """The longest normalised term pattern (characters), computed once per matcher."""
    longest = _LONGEST.get(matcher)
    if longest is None:
        automaton = matcher.terms.automaton
        longest = max((len(k) for k in automaton), default=0) if matcher.terms.size else 0
        _LONGEST[matcher] = longest
    return longest


def _open_prefix(automaton: Any, view_text: str, longest: int, starts: Any = None) -> int | None:
    """The first position in the last `longest` characters of a view text from which the rest
    is the beginning of a term pattern (None when there is none). `starts[i]` says whether a
    match may start at i; without it, any position after a space may (the plain word view)."""
    end = len(view_text)
    for p in range(max(1, end - longest), end):
        if starts is None:
            if view_text[p - 1] != " " or view_text[p] == " ":
                continue
        elif not starts[p]:
            continue
        rest = view_text[p:]
        if automaton.longest_prefix(rest) == len(rest):
            return p
    return None


def keyword_hold_start(matcher: KeywordMatcher, text: str) -> int:
    """Where in `text` a listed term could still begin and be completed by more text
    (`len(text)` when nowhere): the text before it cannot become part of a match.

    A term that is already complete is not held here (the guard's own check finds it). The
    allowlist is not consulted (holding a little more is always safe). Regex terms are not
    covered: a caller must hold whole sentences for a matcher with regexes."""
    longest = _longest(matcher)
    if not longest or not text.strip():
        return len(text)
    automaton = matcher.terms.automaton
    plain = plain_view_texts(text)
    if plain is not None:
        # The cheap check: plain text whose tail cannot start a term needs no offsets.
        word, squashed = plain
        if _open_prefix(automaton, word.rstrip(" "), longest) is None and not (
            matcher.terms.splittable and _open_prefix(automaton, squashed.rstrip(" "), longest, _anywhere()) is not None
        ):
            return len(text)
    earliest = len(text)
    for wview in word_views(text):
        views = [collapse(wview)]
        if matcher.terms.splittable:
            views.append(collapse(squash(wview)))
        for view in views:
            trimmed = view.text.rstrip(" ")
            p = _open_prefix(automaton, trimmed, longest, view.start_ok)
            if p is not None and (span := view.original_span(p, len(trimmed))) is not None:
                earliest = min(earliest, span[0])
    return earliest


class _Anywhere:
    """`starts` for the squashed plain view, where word starts are not marked: any position."""

    def __getitem__(self, index: int) -> bool:
        return True


def _anywhere() -> _Anywhere:
    return _Anywhere()
