"""Text normalisation that undoes the usual filter evasions while remembering, for every
character it produces, which character of the original text it came from.

The pipeline, applied identically to operator terms and to checked text:

1. per character: NFKC (full-width, ligatures, math letters), NFKD minus combining marks
   (accents, diacritics), casefold, homoglyphs (Cyrillic/Greek look-alikes -> Latin); invisible
   characters (zero-width, soft hyphen, bidi controls, ...) disappear;
2. words: runs of letters, digits and leet symbols; letters split by separators are joined
   again (`b a d w o r d`, `b.a.d-word`): a separator without whitespace is dropped when a
   neighbouring token is a single character, whitespace only when both neighbours are;
3. leetspeak inside words that contain a letter (`3`->e, `@`->a, `$`->s, `0`->o, `1`->i or l,
   ...); pure numbers stay numbers, and a trailing `!` stays punctuation;
4. the words joined by single spaces (the "word view"), then runs of a repeated character
   collapsed to one (the "collapsed view"), keeping each run's length so a match can insist
   on at least as many repeats as the term itself has (`ass` must not match `as`).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Characters that render as nothing (or as blank filler) but are not category Cf.
_INVISIBLE_EXTRA = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0\u2800")

HOMOGLYPHS: dict[str, str] = {
    # Cyrillic
    "а": "a",
    "б": "b",
    "в": "b",
    "г": "r",
    "е": "e",
    "ё": "e",
    "к": "k",
    "м": "m",
    "н": "h",
    "о": "o",
    "п": "n",
    "р": "p",
    "с": "c",
    "т": "t",
    "у": "y",
    "х": "x",
    "ш": "w",
    "щ": "w",
    "ъ": "b",
    "ь": "b",
    "ѕ": "s",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "ԁ": "d",
    "һ": "h",
    "ԛ": "q",
    "ԝ": "w",
    "ѵ": "v",
    "ӏ": "l",
    "ɡ": "g",
    "ү": "y",
    "ґ": "r",
    "є": "e",
    "ѡ": "w",
    # Greek
    "α": "a",
    "β": "b",
    "γ": "y",
    "ε": "e",
    "ζ": "z",
    "η": "n",
    "ι": "i",
    "κ": "k",
    "μ": "u",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "σ": "o",
    "ς": "c",
    "τ": "t",
    "υ": "u",
    "χ": "x",
    "ω": "w",
    "ϲ": "c",
    "ϳ": "j",
    # Latin look-alikes that NFKD does not decompose
    "ı": "i",
    "ł": "l",
    "ø": "o",
    "đ": "d",
    "ħ": "h",
    "ŧ": "t",
    "ɑ": "a",
    "ƅ": "b",
    "ɩ": "i",
    "æ": "ae",
    "œ": "oe",
    "þ": "p",
}

_APOSTROPHES = frozenset("'’ʼ‘`´")

LEET_DIGITS: dict[str, str] = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "9": "g",
}
LEET_SYMBOLS: dict[str, str] = {"@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e", "£": "l"}
#: `1` reads as `i` or `l`; checked text with a `1` in a word is matched both ways.
AMBIGUOUS = {"1": "l"}


@lru_cache(maxsize=1 << 16)
def fold_char(c: str) -> str:
    """One original character -> zero or more normalised characters (no leetspeak yet)."""
    if c in _INVISIBLE_EXTRA or unicodedata.category(c) == "Cf":
        return ""
    s = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", c))
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).casefold()
    return "".join(HOMOGLYPHS.get(ch, ch) for ch in s)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in LEET_SYMBOLS


@dataclass(slots=True)
class View:
    """A normalised text: `text[i]` came from original index `index[i]` (-1 for a separator).

    `runs[i]` (collapsed views only) is how many times the character repeated; `end[i]` is the
    original index one past the run's last character. `start_ok[i]` / `end_ok[i]` say whether
    a match may start / end at position i: at word edges, and inside a word only where
    split letters were joined back together ("a b a d" -> "abad" may match "bad").
    """

    text: str
    index: list[int]
    runs: list[int]
    end: list[int]
    start_ok: list[bool]
    end_ok: list[bool]

    def original_span(self, start: int, stop: int) -> tuple[int, int] | None:
        """Map view positions [start, stop) to an original (start, end), skipping separators."""
        first = next((i for i in range(start, stop) if self.index[i] >= 0), None)
        last = next((i for i in range(stop - 1, start - 1, -1) if self.index[i] >= 0), None)
        if first is None or last is None:
            return None
        return self.index[first], self.end[last]


# (character, original index, True when a joined-in token starts here)
_Char = tuple[str, int, bool]


def _words(text: str) -> list[list[_Char]]:
    """Fold characters and group them into words, re-joining letters split by separators."""
    folded: list[tuple[str, int]] = []
    for i, c in enumerate(text):
        if c.isascii():
            folded.append((c.lower() if c.isalpha() else c, i))
            continue
        for ch in fold_char(c):
            folded.append((ch, i))

    # raw tokens with the separator that precedes each one
    tokens: list[list[tuple[str, int]]] = []
    seps_with_space: list[bool] = []
    current: list[tuple[str, int]] = []
    sep_space = False

    def close(tok: list[tuple[str, int]]) -> None:
        # a trailing "!" is punctuation, not an "i" ("D!" is a single letter)
        while len(tok) > 1 and tok[-1][0] == "!":
            tok.pop()
        tokens.append(tok)

    for ch, i in folded:
        if _is_word_char(ch):
            if not current:
                seps_with_space.append(sep_space)
                sep_space = False
            current.append((ch, i))
        else:
            if current:
                close(current)
                current = []
            if ch.isspace() or ch in _APOSTROPHES:
                # an apostrophe separates like a space: "hell's" is "hell" + "s", not "hells"
                sep_space = True
    if current:
        close(current)

    words: list[list[_Char]] = []
    for k, tok in enumerate(tokens):
        if words:
            prev_single = len(tokens[k - 1]) == 1
            this_single = len(tok) == 1
            join = (prev_single and this_single) if seps_with_space[k] else (prev_single or this_single)
            if join:
                words[-1].extend((ch, i, n == 0) for n, (ch, i) in enumerate(tok))
                continue
        words.append([(ch, i, False) for ch, i in tok])
    return words


def _leet(word: list[_Char], ambiguous: bool) -> list[_Char]:
    """Apply leetspeak to a word that contains a letter; drop symbols from one that does not."""
    # a trailing "!" is punctuation, not an "i"
    while word and word[-1][0] == "!":
        word = word[:-1]
    if not any(ch.isalpha() for ch, _, _ in word):
        out = []
        carry = False
        for ch, i, soft in word:
            if ch.isalnum():
                out.append((ch, i, soft or carry))
                carry = False
            else:
                carry = carry or soft
        return out
    mapped: list[_Char] = []
    for ch, i, soft in word:
        if ambiguous and ch in AMBIGUOUS:
            mapped.append((AMBIGUOUS[ch], i, soft))
        elif ch in LEET_DIGITS:
            mapped.append((LEET_DIGITS[ch], i, soft))
        elif ch in LEET_SYMBOLS:
            mapped.append((LEET_SYMBOLS[ch], i, soft))
        else:
            mapped.append((ch, i, soft))
    return mapped


def word_views(text: str) -> list[View]:
    """The word view(s) of `text`: one, or two when a `1` could be read as `i` or as `l`.

    The view text starts and ends with a space, and words are separated by exactly one.
    """
    words = _words(text)
    variants = [False]
    if any(any(ch == "1" for ch, _, _ in w) and any(ch.isalpha() for ch, _, _ in w) for w in words):
        variants.append(True)
    views = []
    for ambiguous in variants:
        chars = [" "]
        index = [-1]
        start_ok = [False]
        end_ok = [False]
        for w in words:
            lw = _leet(w, ambiguous)
            if not lw:
                continue
            for n, (ch, i, soft) in enumerate(lw):
                chars.append(ch)
                index.append(i)
                start_ok.append(n == 0 or soft)
                end_ok.append(n == len(lw) - 1 or lw[n + 1][2])
            chars.append(" ")
            index.append(-1)
            start_ok.append(False)
            end_ok.append(False)
        end = [i + 1 if i >= 0 else -1 for i in index]
        views.append(View("".join(chars), index, [1] * len(index), end, start_ok, end_ok))
    return views


def collapse(view: View) -> View:
    """Collapse runs of one repeated character; keep each run's length and original extent."""
    chars: list[str] = []
    index: list[int] = []
    runs: list[int] = []
    end: list[int] = []
    start_ok: list[bool] = []
    end_ok: list[bool] = []
    for ch, i, e, so, eo in zip(view.text, view.index, view.end, view.start_ok, view.end_ok, strict=True):
        if chars and chars[-1] == ch:
            runs[-1] += 1
            end_ok[-1] = eo
            if e >= 0:
                end[-1] = e
                if index[-1] < 0:
                    index[-1] = i
            continue
        chars.append(ch)
        index.append(i)
        runs.append(1)
        end.append(e)
        start_ok.append(so)
        end_ok.append(eo)
    return View("".join(chars), index, runs, end, start_ok, end_ok)


def normalize_term(term: str) -> tuple[str, tuple[int, ...]]:
    """A term's collapsed form (no surrounding spaces) and its run lengths."""
    view = collapse(word_views(term)[0])
    return view.text[1:-1], tuple(view.runs[1:-1])


def simple_fold(text: str) -> str:
    """Case, NFKC, accents, invisibles and homoglyphs only (no leetspeak, no joining)."""
    return "".join(c.lower() if c.isascii() else fold_char(c) for c in text)
