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
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

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


# --- arrays -------------------------------------------------------------------------------------
# Every step below works on whole numpy arrays (one entry per character), so the cost is a few
# passes of C code over the text: a 900 KB prompt takes a fraction of a second, not seconds of
# per-character Python. Python-level work happens once per *distinct* non-ASCII character and
# once per escape sequence (cached), never per character.

_I64 = np.int64


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(_I64)


def _string(cps: np.ndarray) -> str:
    return cps.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


def _ascii_table(pred: Callable[[str], bool]) -> np.ndarray:
    return np.array([pred(chr(c)) for c in range(128)], dtype=bool)


def _prop(cps: np.ndarray, table: np.ndarray, pred: Callable[[str], bool]) -> np.ndarray:
    """`pred` of every character: a table lookup for ASCII, one call per distinct other one."""
    wide = cps >= 128
    out = table[np.where(wide, 0, cps)]
    if wide.any():
        distinct, inverse = np.unique(cps[wide], return_inverse=True)
        out[wide] = np.array([pred(chr(c)) for c in distinct.tolist()], dtype=bool)[inverse]
    return out


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in LEET_SYMBOLS


def _isspace_or_apostrophe(ch: str) -> bool:
    return ch.isspace() or ch in _APOSTROPHES


_WORD = _ascii_table(_is_word_char)
_ALNUM = _ascii_table(str.isalnum)
_ALPHA = _ascii_table(str.isalpha)
_UPPER = _ascii_table(str.isupper)
_SPACE_LIKE = _ascii_table(_isspace_or_apostrophe)
_LIST_SEP = _ascii_table(_LIST_SEPARATORS.__contains__)
_SENT_END = _ascii_table(_SENTENCE_ENDS.__contains__)
_LOWER = np.array([ord(chr(c).lower()) for c in range(128)], dtype=_I64)
_BANG, _DOT_CP, _ONE, _SPACE_CP = ord("!"), ord("."), ord("1"), ord(" ")


def _leet_table(ambiguous: bool) -> dict[int, int]:
    table = {ord(k): ord(v) for k, v in {**LEET_DIGITS, **LEET_SYMBOLS}.items()}
    if ambiguous:
        table.update({ord(k): ord(v) for k, v in AMBIGUOUS.items()})
    return table


def _leet_lut(ambiguous: bool) -> np.ndarray:
    table = _leet_table(ambiguous)
    lut = np.arange(max(table) + 1, dtype=_I64)
    for src, dst in table.items():
        lut[src] = dst
    return lut


_LEET_LUT = {amb: _leet_lut(amb) for amb in (False, True)}


def _any_between(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether `flags[lo[i]:hi[i]]` has a True, for every i."""
    total = np.concatenate(([0], np.cumsum(flags, dtype=_I64)))
    above: np.ndarray = total[hi] > total[lo]
    return above


def _trailing_run(flags: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Length of the run of True in `flags` that ends at each position in `last`."""
    positions = np.arange(len(flags), dtype=_I64)
    last_false = np.maximum.accumulate(np.where(flags, -1, positions))
    run: np.ndarray = last - last_false[last]
    return run


# --- step 0: escapes ----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _decode_token_cached(token: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    return _decode_token(token)


def _decode_token(token: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """One `_ENCODED` match -> (characters, start and end of each relative to the match)."""
    size = len(token)
    if token[0] == "&":
        decoded = html.unescape(token)
        if decoded != token and decoded:
            return decoded, (0,) * len(decoded), (size,) * len(decoded)
    else:
        try:
            decoded = bytes.fromhex(token.replace("%", "")).decode("utf-8")
        except UnicodeDecodeError:
            decoded = ""
        if decoded:
            if decoded.isascii():
                return decoded, tuple(range(0, size, 3)), tuple(range(3, size + 1, 3))
            starts, ends, at = [], [], 0
            for ch in decoded:
                starts.append(at)
                at += 3 * len(ch.encode("utf-8"))
                ends.append(at)
            return decoded, tuple(starts), tuple(ends)
    return token, tuple(range(size)), tuple(range(1, size + 1))


def _decode_escapes(text: str) -> tuple[str, np.ndarray, np.ndarray]:
    """`text` with HTML character references and UTF-8 percent-escapes decoded once, and for
    each character the original span [start, end) it came from."""
    pieces: list[str] = []
    origins: list[int] = []
    lengths: list[int] = []
    rel_start: list[int] = []
    rel_end: list[int] = []
    pos = 0

    def plain(start: int, end: int) -> None:
        pieces.append(text[start:end])
        origins.append(start)
        lengths.append(end - start)
        rel_start.extend(range(end - start))
        rel_end.extend(range(1, end - start + 1))

    for m in _ENCODED.finditer(text):
        start, end = m.span()
        if start > pos:
            plain(pos, start)
        token = m.group()
        decoded, starts, ends = _decode_token_cached(token) if len(token) <= 64 else _decode_token(token)
        pieces.append(decoded)
        origins.append(start)
        lengths.append(len(decoded))
        rel_start.extend(starts)
        rel_end.extend(ends)
        pos = end
    if pos < len(text):
        plain(pos, len(text))
    base = np.repeat(np.array(origins, dtype=_I64), np.array(lengths, dtype=_I64))
    return "".join(pieces), base + np.array(rel_start, dtype=_I64), base + np.array(rel_end, dtype=_I64)


# --- step 1: folding ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Folded:
    """A decoded, folded text as arrays: `cps[i]` came from original characters
    [starts[i], ends[i]); `source` is the original text's code points."""

    cps: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    source: np.ndarray

    @property
    def text(self) -> str:
        return _string(self.cps)


def fold_array(text: str) -> Folded:
    """Decode and fold `text` (steps 0 and 1) into arrays."""
    source = _codepoints(text)
    if "&" in text or "%" in text:
        decoded, starts, ends = _decode_escapes(text)
        cps = _codepoints(decoded)
    else:
        cps = source
        starts = np.arange(len(text), dtype=_I64)
        ends = starts + 1
    wide = cps >= 128
    if not wide.any():
        return Folded(_LOWER[cps], starts, ends, source)
    distinct, inverse = np.unique(cps[wide], return_inverse=True)
    folded = [fold_char(chr(c)) for c in distinct.tolist()]
    sizes = np.array([len(f) for f in folded], dtype=_I64)
    if (sizes == 1).all():
        out = _LOWER[np.where(wide, 0, cps)]
        out[wide] = np.array([ord(f) for f in folded], dtype=_I64)[inverse]
        return Folded(out, starts, ends, source)
    # some characters fold to nothing (invisibles) or to several ("æ" -> "ae"): expand
    pool = np.concatenate((_LOWER, _codepoints("".join(folded))))
    offsets = 128 + np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(_I64)
    first = np.where(wide, 0, cps)
    first[wide] = offsets[inverse]
    count = np.ones(len(cps), dtype=_I64)
    count[wide] = sizes[inverse]
    source_of = np.repeat(np.arange(len(cps), dtype=_I64), count)
    begin = np.concatenate(([0], np.cumsum(count)[:-1])).astype(_I64)
    within = np.arange(len(source_of), dtype=_I64) - begin[source_of]
    return Folded(pool[first[source_of] + within], starts[source_of], ends[source_of], source)


def fold_units(text: str) -> tuple[list[str], list[int], list[int]]:
    """Decode and fold `text` (steps 0 and 1): the folded characters, and for each the original
    span [start, end) it came from."""
    f = fold_array(text)
    return list(f.text), f.starts.tolist(), f.ends.tolist()


def fold_text(text: str) -> tuple[str, list[int], list[int]]:
    """The folded text (decoded, case, NFKC, accents, invisibles, look-alikes; no leetspeak, no
    joining) with, per character, the original span it came from."""
    f = fold_array(text)
    return f.text, f.starts.tolist(), f.ends.tolist()


@dataclass(slots=True)
class View:
    """A normalised text: `text[i]` came from original characters [index[i], end[i]) (-1 for a
    separator), as numpy arrays.

    `runs[i]` (collapsed views only) is how many times the character repeated. `start_ok[i]` /
    `end_ok[i]` say whether a match may start / end at position i: at word edges, and inside a
    word only where split letters were joined back together ("a b a d" -> "abad" may match
    "bad"). `piece[i]` (squashed views only) is True where a word other than the first begins.
    """

    text: str
    index: np.ndarray
    runs: np.ndarray
    end: np.ndarray
    start_ok: np.ndarray
    end_ok: np.ndarray
    piece: np.ndarray | None = None
    cps: np.ndarray | None = None

    def original_span(self, start: int, stop: int) -> tuple[int, int] | None:
        """Map view positions [start, stop) to an original (start, end), skipping separators."""
        real = np.flatnonzero(self.index[start:stop] >= 0)
        if not len(real):
            return None
        return int(self.index[start + real[0]]), int(self.end[start + real[-1]])


# how a token is separated from the one before it
_PUNCT, _SPACE, _LIST, _DOT = 0, 1, 2, 3
# the view index of a separator: one a split term may span, or a list / sentence break
_SOFT, _HARD = -1, -2


@dataclass(slots=True)
class _Words:
    """Folded characters grouped into words (step 2): the characters in order, the word each
    belongs to, whether a joined-in token starts there, and per word its link to the previous."""

    cps: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    soft: np.ndarray
    word: np.ndarray
    word_start: np.ndarray
    word_end: np.ndarray
    links: np.ndarray


def _empty_words() -> _Words:
    e = np.zeros(0, dtype=_I64)
    return _Words(e, e, e, np.zeros(0, dtype=bool), e, e, e, e)


def _words(text: str) -> _Words:
    """Fold characters and group them into words, re-joining letters split by separators.

    A word's link says how it follows the previous one: _DOT (a code identifier, `obj.meth`),
    _LIST (a list or sentence break: no term spans it) or _SPACE (other)."""
    f = fold_array(text)
    cps = f.cps
    n = len(cps)
    is_word = _prop(cps, _WORD, _is_word_char)
    edge = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    tok_start = np.flatnonzero(edge == 1).astype(_I64)
    tok_stop = np.flatnonzero(edge == -1).astype(_I64)  # exclusive; the gap after starts here
    if not len(tok_start):
        return _empty_words()
    # a trailing "!" is punctuation, not an "i" ("D!" is a single letter): drop it
    bang = cps == _BANG
    size = tok_stop - tok_start
    popped = np.minimum(_trailing_run(bang, tok_stop - 1), size - 1)
    size -= popped
    single = size == 1

    gap_lo, gap_hi = tok_stop[:-1], tok_start[1:]
    sep_list = _any_between(_prop(cps, _LIST_SEP, _LIST_SEPARATORS.__contains__), gap_lo, gap_hi)
    sep_space = _any_between(_prop(cps, _SPACE_LIKE, _isspace_or_apostrophe), gap_lo, gap_hi)
    sep_end = _any_between(_prop(cps, _SENT_END, _SENTENCE_ENDS.__contains__), gap_lo, gap_hi) | (popped[:-1] > 0)
    lone_dot = (gap_hi - gap_lo == 1) & (cps[np.minimum(gap_lo, n - 1)] == _DOT_CP)
    # ".It" after a full stop starts a sentence; "obj.meth" is one identifier
    next_upper = _prop(f.source[f.starts[gap_hi]], _UPPER, str.isupper)
    kind = np.full(len(gap_lo), _PUNCT, dtype=_I64)
    kind[lone_dot & ~next_upper] = _DOT
    kind[sep_space] = _SPACE
    kind[sep_list] = _LIST
    ends_sentence = sep_end & (kind != _DOT)
    join = np.where(
        kind == _LIST,
        False,
        np.where(kind == _SPACE, single[:-1] & single[1:], single[:-1] | single[1:]),
    )
    link = np.where(kind == _DOT, _DOT, np.where((kind == _LIST) | ends_sentence, _LIST, _SPACE))
    new_word = np.concatenate(([True], ~join))
    links = np.concatenate(([_LIST], link))[new_word]
    word_of_token = np.cumsum(new_word) - 1

    # the characters of the (popped) tokens, in order
    token = np.repeat(np.arange(len(tok_start), dtype=_I64), size)
    token_first = np.concatenate(([0], np.cumsum(size)[:-1])).astype(_I64)
    positions = (tok_start - token_first)[token] + np.arange(len(token), dtype=_I64)
    soft = np.zeros(len(positions), dtype=bool)
    soft[token_first] = ~new_word
    word = word_of_token[token]
    word_first = token_first[new_word]
    word_end = np.concatenate((word_first[1:], [len(positions)])).astype(_I64)
    return _Words(cps[positions], f.starts[positions], f.ends[positions], soft, word, word_first, word_end, links)


@dataclass(slots=True)
class _Leet:
    """The characters that survive step 3, and the words they make (empty words are gone)."""

    cps_plain: np.ndarray  # with `1` read as `i`
    cps_ambiguous: np.ndarray | None  # with `1` read as `l`, when some word has both
    starts: np.ndarray
    ends: np.ndarray
    soft: np.ndarray
    word: np.ndarray  # rank of the (non-empty) word
    links: np.ndarray  # per non-empty word


def _leet(w: _Words) -> _Leet:
    """Apply leetspeak to words that contain a letter; drop symbols from those that do not."""
    m = len(w.cps)
    alpha = _prop(w.cps, _ALPHA, str.isalpha)
    has_alpha = _any_between(alpha, w.word_start, w.word_end)
    # a trailing "!" is punctuation, not an "i"
    strip = np.minimum(_trailing_run(w.cps == _BANG, w.word_end - 1), w.word_end - w.word_start)
    mark = np.bincount(w.word_end - strip, minlength=m + 1) - np.bincount(w.word_end, minlength=m + 1)
    keep = np.cumsum(mark[:m]) <= 0
    char_alpha_word = has_alpha[w.word]
    keep &= char_alpha_word | _prop(w.cps, _ALNUM, str.isalnum)
    # in a word without letters, a dropped symbol's "joined here" mark passes to the next kept one
    soft = w.soft.copy()
    dropped_soft = ~keep & w.soft & ~char_alpha_word
    if dropped_soft.any():
        kept = np.flatnonzero(keep)
        total = np.concatenate(([0], np.cumsum(w.soft, dtype=_I64)))
        prev = np.concatenate(([-1], kept[:-1]))
        same_word = np.concatenate(([False], w.word[kept[1:]] == w.word[kept[:-1]]))
        lo = np.where(same_word, prev + 1, w.word_start[w.word[kept]])
        soft[kept] = total[kept + 1] > total[lo]
    kept = np.flatnonzero(keep)
    cps = w.cps[kept]
    in_alpha = char_alpha_word[kept]
    ambiguous = bool((in_alpha & (cps == _ONE)).any())
    variants = []
    mapped = in_alpha & (cps < len(_LEET_LUT[False]))
    for amb in (False, True) if ambiguous else (False,):
        variants.append(np.where(mapped, _LEET_LUT[amb][np.where(mapped, cps, 0)], cps))
    word = w.word[kept]
    present = np.unique(word)
    rank = np.searchsorted(present, word)
    return _Leet(
        variants[0],
        variants[1] if ambiguous else None,
        w.starts[kept],
        w.ends[kept],
        soft[kept],
        rank,
        w.links[present],
    )


def word_views(text: str) -> list[View]:
    """The word view(s) of `text`: one, or two when a `1` could be read as `i` or as `l`.

    The view text starts and ends with a space, and words are separated by exactly one.
    """
    lt = _leet(_words(text))
    m = len(lt.word)
    words = len(lt.links)
    size = m + words + 1
    pos = 1 + np.arange(m, dtype=_I64) + lt.word  # each earlier word adds its trailing space
    index = np.full(size, _SOFT, dtype=_I64)
    end = np.full(size, -1, dtype=_I64)
    start_ok = np.zeros(size, dtype=bool)
    end_ok = np.zeros(size, dtype=bool)
    index[pos] = lt.starts
    end[pos] = lt.ends
    if m:
        first = np.concatenate(([True], lt.word[1:] != lt.word[:-1]))
        last = np.concatenate((lt.word[1:] != lt.word[:-1], [True]))
        chained = lt.links == _DOT
        start_ok[pos] = lt.soft | (first & ~chained[lt.word])
        end_ok[pos] = last | np.concatenate((lt.soft[1:], [False]))
        first_pos = pos[first]
        # a code identifier ("obj.meth"): no match may end inside it, nor start inside it
        chained_later = np.flatnonzero(chained[1:]) + 1
        end_ok[first_pos[chained_later] - 2] = False
        # a list or sentence break before a word: no term spans it
        index[first_pos[lt.links == _LIST] - 1] = _HARD
    views = []
    for cps in (lt.cps_plain, lt.cps_ambiguous):
        if cps is None:
            continue
        chars = np.full(size, _SPACE_CP, dtype=_I64)
        chars[pos] = cps
        views.append(View(_string(chars), index, np.ones(size, dtype=_I64), end, start_ok, end_ok, None, chars))
    return views


def collapse(view: View) -> View:
    """Collapse runs of one repeated character; keep each run's length and original extent."""
    cps = view.cps if view.cps is not None else _codepoints(view.text)
    if not len(cps):
        return view
    head = np.flatnonzero(np.concatenate(([True], cps[1:] != cps[:-1])))
    tail = np.concatenate((head[1:] - 1, [len(cps) - 1]))
    piece = None if view.piece is None else np.maximum.reduceat(view.piece, head)
    out = cps[head]
    return View(
        _string(out),
        view.index[head],
        tail - head + 1,
        view.end[tail],
        view.start_ok[head],
        view.end_ok[tail],
        piece,
        out,
    )


def squash(view: View) -> View:
    """A word view without its separating spaces, marking where each later word begins: for
    terms split across words (`zor blax`, `zorb-lax`). Apply to the word view, then `collapse`."""
    cps = view.cps if view.cps is not None else _codepoints(view.text)
    keep = view.index != _SOFT
    after_soft = np.concatenate(([False], view.index[:-1] == _SOFT))
    after_soft[:2] = False
    out = cps[keep]
    return View(
        _string(out),
        view.index[keep],
        np.ones(len(out), dtype=_I64),
        view.end[keep],
        view.start_ok[keep],
        view.end_ok[keep],
        after_soft[keep],
        out,
    )


# --- a shortcut for plain text -------------------------------------------------------------------

#: Anything that needs the full pipeline: escapes, digits and leet symbols (leetspeak), `!`.
_NOT_PLAIN = re.compile(r"[^\x00-\x7f]|[0-9@$!|+&%]")
_GAP = r"[^a-z,;\n\r]"  # a separator that is not a list break
_GAP_NO_SPACE = r"[^a-z\s,;'`]"  # ... and not whitespace or an apostrophe (letters joined by punctuation)
#: Where letters split by separators would be joined again (see `_words`).
_JOINS = re.compile(
    rf"(?<![a-z])[a-z]{_GAP}+[a-z](?![a-z])|(?<![a-z])[a-z]{_GAP_NO_SPACE}+[a-z]|[a-z]{_GAP_NO_SPACE}+[a-z](?![a-z])"
)
_LETTERS = re.compile(r"([A-Za-z]+)")
_RUNS = re.compile(r"(.)\1+", re.DOTALL)


def _hard_gap(gap: str, next_first: str) -> bool:
    """Whether the gap before a word is a list or sentence break (a space that stays in the
    squashed view), for plain text: see `_words`."""
    if any(c in _LIST_SEPARATORS for c in gap):
        return True
    if gap == "." and not next_first.isupper():
        return False  # a code identifier, "obj.meth"
    return any(c in _SENTENCE_ENDS for c in gap)


def plain_view_texts(text: str) -> tuple[str, str] | None:
    """For plain ASCII text (no escapes, digits, leet symbols, letters to re-join): the texts of
    the collapsed word view and the collapsed squashed view, exactly as `word_views`, `squash`
    and `collapse` make them, in a few regex passes; None for any other text.

    A caller that finds no term in these texts needs nothing else (no offsets, no arrays)."""
    if _NOT_PLAIN.search(text) or _JOINS.search(text.lower()):
        return None
    parts = _LETTERS.split(text)
    words = parts[1::2]
    if not words:
        return " ", ""
    squashed = [" ", words[0]]
    for gap, word in zip(parts[2:-1:2], words[1:], strict=True):
        if _hard_gap(gap, word[0]):
            squashed.append(" ")
        squashed.append(word)
    word_text = (" " + " ".join(words) + " ").lower()
    return _RUNS.sub(r"\1", word_text), _RUNS.sub(r"\1", "".join(squashed).lower())


def normalize_term(term: str) -> tuple[str, tuple[int, ...]]:
    """A term's collapsed form (no surrounding spaces) and its run lengths."""
    view = collapse(word_views(term)[0])
    return view.text[1:-1], tuple(view.runs[1:-1])


def simple_fold(text: str) -> str:
    """Case, NFKC, accents, invisibles and look-alikes only (no decoding, leetspeak or joining)."""
    if text.isascii():
        return text.lower()
    return "".join(c.lower() if c.isascii() else fold_char(c) for c in text)
