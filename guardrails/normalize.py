"""Text normalisation that undoes the usual filter evasions while remembering, for every
character it produces, which characters of the original text it came from.

The pipeline, applied identically to operator terms and to checked text:

0. decoding: HTML character references (`&#108;`, `&#x6c;`, `&lt;`: every entity `html.unescape`
   knows) and percent-escapes (`%6C`, `%C3%A9`: any run that is valid UTF-8) become the
   characters they stand for, once (no recursive decoding);
1. per character: NFKC (full-width, ligatures, math letters), NFKD minus combining marks
   (accents, diacritics), casefold, look-alikes of Latin letters and digits from any script
   (a curated Cyrillic/Greek table, then `guardrails.confusables`: small capitals, IPA and
   Armenian, Cherokee, Lisu, ... letters, generated from Unicode's names and UTS #39);
   invisible characters (zero-width, soft hyphen, bidi controls, variation selectors and other
   non-spacing marks) disappear;
2. words: runs of letters, digits and leet symbols; letters split by separators are joined
   again (`b a d w o r d`, `b.a.d-word`): a separator without whitespace is dropped when a
   neighbouring token is a single character, whitespace only when both neighbours are; never
   across a comma, semicolon or line break (`A, M, E, T, H` is a list, not a word). Words
   linked by a bare dot (`obj.meth`, `evil.com`) form one code identifier: a term must match
   all of it, not a part;
3. leetspeak inside words that contain a letter (`3`->e, `@`->a, `$`->s, `0`->o, `1`->i or l,
   ...); pure numbers stay numbers, and a trailing `!` stays punctuation;
4. the words joined by single spaces (the "word view"), then runs of a repeated character
   collapsed to one (the "collapsed view"), keeping each run's length so a match can insist
   on at least as many repeats as the term itself has (`ass` must not match `as`). The
   "squashed view" drops the spaces too, for terms split across words (`zor blax`).

Every step is one pass over the text (no regex with nested quantifiers, no repeated string
concatenation), so the cost is linear in the text's length.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from guardrails.confusables import CONFUSABLES

# Characters that render as nothing (or as blank filler) but are not category Cf.
_INVISIBLE_EXTRA = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0\u2800")
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Mn", "Me"})

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
#: Sentence ends: a term is never matched across one ("bad! Word" is not "badword").
_SENTENCE_ENDS = frozenset(".!?…。！？")
#: Separators that end a run of spelled-out letters: `A, M, E` is a list, not the word "ame".
_LIST_SEPARATORS = frozenset(",;\n\r\u2028\u2029\u0085、，；")

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


#: An HTML character reference (numeric, or named with its `;`) or a run of percent-escapes.
#: Each alternative is a fixed-shape unit (the `+` repeats a 3-character unit), so a search
#: never rescans: linear in the text.
_ENCODED = re.compile(r"&(?:#[0-9]{1,7};?|#[xX][0-9a-fA-F]{1,6};?|[A-Za-z][A-Za-z0-9]{1,31};)|(?:%[0-9A-Fa-f]{2})+")


@lru_cache(maxsize=1 << 16)
def fold_char(c: str) -> str:
    """One original character -> zero or more normalised characters (no leetspeak yet)."""
    if c in _INVISIBLE_EXTRA or unicodedata.category(c) in _INVISIBLE_CATEGORIES:
        return ""
    s = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", c))
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).casefold()
    return "".join(HOMOGLYPHS.get(ch) or CONFUSABLES.get(ch, ch) for ch in s)


def _decode_escapes(text: str) -> list[tuple[str, int, int]]:
    """(character, original start, original end) for `text` with HTML character references and
    UTF-8 percent-escapes decoded once; other characters map to themselves."""
    units: list[tuple[str, int, int]] = []
    pos = 0
    for m in _ENCODED.finditer(text):
        start, end = m.span()
        units.extend((text[i], i, i + 1) for i in range(pos, start))
        pos = end
        token = m.group()
        if token[0] == "&":
            decoded = html.unescape(token)
            if decoded != token and decoded:
                units.extend((ch, start, end) for ch in decoded)
                continue
        else:
            raw = bytes.fromhex(token.replace("%", ""))
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError:
                decoded = ""
            if decoded:
                at = start
                for ch in decoded:
                    width = 3 * len(ch.encode("utf-8"))
                    units.append((ch, at, at + width))
                    at += width
                continue
        units.extend((text[i], i, i + 1) for i in range(start, end))
    units.extend((text[i], i, i + 1) for i in range(pos, len(text)))
    return units


def fold_units(text: str) -> tuple[list[str], list[int], list[int]]:
    """Decode and fold `text` (steps 0 and 1): the folded characters, and for each the original
    span [start, end) it came from."""
    if text.isascii() and "&" not in text and "%" not in text:
        return list(text.lower()), list(range(len(text))), list(range(1, len(text) + 1))
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    units = _decode_escapes(text) if ("&" in text or "%" in text) else [(c, i, i + 1) for i, c in enumerate(text)]
    for c, s, e in units:
        if c.isascii():
            chars.append(c.lower())
            starts.append(s)
            ends.append(e)
            continue
        for ch in fold_char(c):
            chars.append(ch)
            starts.append(s)
            ends.append(e)
    return chars, starts, ends


def fold_text(text: str) -> tuple[str, list[int], list[int]]:
    """The folded text (decoded, case, NFKC, accents, invisibles, look-alikes; no leetspeak, no
    joining) with, per character, the original span it came from."""
    chars, starts, ends = fold_units(text)
    return "".join(chars), starts, ends


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in LEET_SYMBOLS


@dataclass(slots=True)
class View:
    """A normalised text: `text[i]` came from original characters [index[i], end[i]) (-1 for a
    separator).

    `runs[i]` (collapsed views only) is how many times the character repeated. `start_ok[i]` /
    `end_ok[i]` say whether a match may start / end at position i: at word edges, and inside a
    word only where split letters were joined back together ("a b a d" -> "abad" may match
    "bad"). `piece[i]` (squashed views only) is True where a word other than the first begins.
    """

    text: str
    index: list[int]
    runs: list[int]
    end: list[int]
    start_ok: list[bool]
    end_ok: list[bool]
    piece: list[bool] | None = None

    def original_span(self, start: int, stop: int) -> tuple[int, int] | None:
        """Map view positions [start, stop) to an original (start, end), skipping separators."""
        first = next((i for i in range(start, stop) if self.index[i] >= 0), None)
        last = next((i for i in range(stop - 1, start - 1, -1) if self.index[i] >= 0), None)
        if first is None or last is None:
            return None
        return self.index[first], self.end[last]


# (character, original start, original end, True when a joined-in token starts here)
_Char = tuple[str, int, int, bool]
# how a token is separated from the one before it
_PUNCT, _SPACE, _LIST, _DOT = 0, 1, 2, 3
# the view index of a separator: one a split term may span, or a list / sentence break
_SOFT, _HARD = -1, -2


def _words(text: str) -> tuple[list[list[_Char]], list[int]]:
    """Fold characters and group them into words, re-joining letters split by separators.

    Also returns, per word, how it is linked to the previous one: _DOT (a code identifier,
    `obj.meth`), _LIST (a list or sentence break: no term spans it) or _SPACE (other)."""
    chars, starts, ends = fold_units(text)

    tokens: list[list[tuple[str, int, int]]] = []
    seps: list[int] = []  # per token after the first: _PUNCT, _SPACE, _LIST or _DOT
    ends_sentence: list[bool] = []  # per token after the first: a sentence end comes before it
    current: list[tuple[str, int, int]] = []
    sep_space = sep_list = sep_dot = sep_end = False
    sep_len = 0

    def close(tok: list[tuple[str, int, int]]) -> bool:
        # a trailing "!" is punctuation, not an "i" ("D!" is a single letter)
        popped = False
        while len(tok) > 1 and tok[-1][0] == "!":
            tok.pop()
            popped = True
        tokens.append(tok)
        return popped

    for k, ch in enumerate(chars):
        if _is_word_char(ch):
            if not current and tokens:
                if sep_list:
                    seps.append(_LIST)
                elif sep_space:
                    seps.append(_SPACE)
                elif sep_dot and sep_len == 1 and not text[starts[k]].isupper():
                    seps.append(_DOT)  # "obj.meth"; ".It" after a full stop starts a sentence
                    sep_end = False
                else:
                    seps.append(_PUNCT)
                ends_sentence.append(sep_end)
                sep_space = sep_list = sep_dot = sep_end = False
                sep_len = 0
            current.append((ch, starts[k], ends[k]))
        else:
            if current:
                sep_end = close(current)
                current = []
            if tokens:
                sep_len += 1
                # an apostrophe separates like a space: "hell's" is "hell" + "s", not "hells"
                sep_space = sep_space or ch.isspace() or ch in _APOSTROPHES
                sep_list = sep_list or ch in _LIST_SEPARATORS
                sep_end = sep_end or ch in _SENTENCE_ENDS
                sep_dot = ch == "."
    if current:
        close(current)

    words: list[list[_Char]] = []
    links: list[int] = []
    for k, tok in enumerate(tokens):
        if k:
            sep = seps[k - 1]
            prev_single = len(tokens[k - 1]) == 1
            this_single = len(tok) == 1
            if sep == _LIST:
                join = False
            elif sep == _SPACE:
                join = prev_single and this_single
            else:
                join = prev_single or this_single
            if join:
                words[-1].extend((ch, s, e, n == 0) for n, (ch, s, e) in enumerate(tok))
                continue
            links.append(_DOT if sep == _DOT else _LIST if sep == _LIST or ends_sentence[k - 1] else _SPACE)
        else:
            links.append(_LIST)
        words.append([(ch, s, e, False) for ch, s, e in tok])
    return words, links


def _leet(word: list[_Char], ambiguous: bool) -> list[_Char]:
    """Apply leetspeak to a word that contains a letter; drop symbols from one that does not."""
    # a trailing "!" is punctuation, not an "i"
    while word and word[-1][0] == "!":
        word = word[:-1]
    if not any(ch.isalpha() for ch, _, _, _ in word):
        out = []
        carry = False
        for ch, s, e, soft in word:
            if ch.isalnum():
                out.append((ch, s, e, soft or carry))
                carry = False
            else:
                carry = carry or soft
        return out
    mapped: list[_Char] = []
    for ch, s, e, soft in word:
        if ambiguous and ch in AMBIGUOUS:
            mapped.append((AMBIGUOUS[ch], s, e, soft))
        elif ch in LEET_DIGITS:
            mapped.append((LEET_DIGITS[ch], s, e, soft))
        elif ch in LEET_SYMBOLS:
            mapped.append((LEET_SYMBOLS[ch], s, e, soft))
        else:
            mapped.append((ch, s, e, soft))
    return mapped


def word_views(text: str) -> list[View]:
    """The word view(s) of `text`: one, or two when a `1` could be read as `i` or as `l`.

    The view text starts and ends with a space, and words are separated by exactly one.
    """
    words, links = _words(text)
    variants = [False]
    if any(any(ch == "1" for ch, _, _, _ in w) and any(ch.isalpha() for ch, _, _, _ in w) for w in words):
        variants.append(True)
    views = []
    for ambiguous in variants:
        chars = [" "]
        index = [-1]
        end = [-1]
        start_ok = [False]
        end_ok = [False]
        for k, w in enumerate(words):
            lw = _leet(w, ambiguous)
            if not lw:
                continue
            chained = links[k] == _DOT
            if chained and len(end_ok) > 1:
                # a code identifier ("obj.meth"): no match may end inside it, nor start inside it
                end_ok[-2] = False
            if links[k] == _LIST:
                index[-1] = _HARD
            last = len(lw) - 1
            for n, (ch, s, e, soft) in enumerate(lw):
                chars.append(ch)
                index.append(s)
                end.append(e)
                start_ok.append(soft or (n == 0 and not chained))
                end_ok.append(n == last or lw[n + 1][3])
            chars.append(" ")
            index.append(_SOFT)
            end.append(-1)
            start_ok.append(False)
            end_ok.append(False)
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
    piece: list[bool] | None = [] if view.piece is not None else None
    pieces = view.piece or ()
    rows = zip(view.text, view.index, view.end, view.start_ok, view.end_ok, strict=True)
    for k, (ch, i, e, so, eo) in enumerate(rows):
        if chars and chars[-1] == ch:
            runs[-1] += 1
            end_ok[-1] = eo
            if e >= 0:
                end[-1] = e
                if index[-1] < 0:
                    index[-1] = i
            if piece is not None and pieces[k]:
                piece[-1] = True
            continue
        chars.append(ch)
        index.append(i)
        runs.append(1)
        end.append(e)
        start_ok.append(so)
        end_ok.append(eo)
        if piece is not None:
            piece.append(pieces[k])
    return View("".join(chars), index, runs, end, start_ok, end_ok, piece)


def squash(view: View) -> View:
    """A word view without its separating spaces, marking where each later word begins: for
    terms split across words (`zor blax`, `zorb-lax`). Apply to the word view, then `collapse`."""
    chars: list[str] = []
    index: list[int] = []
    end: list[int] = []
    start_ok: list[bool] = []
    end_ok: list[bool] = []
    piece: list[bool] = []
    new_word = False
    for ch, i, e, so, eo in zip(view.text, view.index, view.end, view.start_ok, view.end_ok, strict=True):
        if i == _SOFT:
            new_word = bool(chars)
            continue
        chars.append(ch)
        index.append(i)
        end.append(e)
        start_ok.append(so)
        end_ok.append(eo)
        piece.append(new_word)
        new_word = False
    return View("".join(chars), index, [1] * len(index), end, start_ok, end_ok, piece)


def normalize_term(term: str) -> tuple[str, tuple[int, ...]]:
    """A term's collapsed form (no surrounding spaces) and its run lengths."""
    view = collapse(word_views(term)[0])
    return view.text[1:-1], tuple(view.runs[1:-1])


def simple_fold(text: str) -> str:
    """Case, NFKC, accents, invisibles and look-alikes only (no decoding, leetspeak or joining)."""
    if text.isascii():
        return text.lower()
    return "".join(c.lower() if c.isascii() else fold_char(c) for c in text)
