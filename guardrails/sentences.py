"""Sentence boundaries, shared by the output guards and the streaming checker.

A sentence ends at `.`, `!`, `?` or `…` (plus any closing quotes/brackets) followed by
whitespace, or at a line break. A boundary is only known once the whitespace after it has
arrived, so while streaming "3." waiting for "14" is never split. Common abbreviations
("e.g.", "Dr.", "U.S.") and single initials ("J. Smith") do not end a sentence.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset(
    [
        "e.g",
        "i.e",
        "etc",
        "vs",
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "no",
        "fig",
        "al",
        "approx",
        "dept",
        "est",
        "inc",
        "ltd",
        "co",
        "corp",
        "u.s",
        "u.k",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "mt",
        "ft",
        "ca",
        "cf",
        "resp",
    ]
)
_BOUNDARY = re.compile(r"(?:[.!?…]+[\"'”’)\]]*(?=\s))|\n")


def sentence_ends(text: str) -> list[int]:
    """Offsets just past each complete sentence's final punctuation (or line break)."""
    ends: list[int] = []
    for m in _BOUNDARY.finditer(text):
        if m.group() != "\n" and m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
            word = re.search(r"([\w.]+)$", text[: m.start()])
            if word:
                w = word.group(1).lower()
                if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                    continue
        ends.append(m.end())
    return ends


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each non-blank sentence, whitespace trimmed; the unfinished tail included."""
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*sentence_ends(text), len(text)]:
        s, e = start, end
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            spans.append((s, e))
        start = end
    return spans


def last_boundary(text: str) -> int:
    """Offset after the last complete sentence in `text` (0 when none is complete yet)."""
    ends = sentence_ends(text)
    return ends[-1] if ends else 0
