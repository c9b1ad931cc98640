"""Split documents into chunks measured in the embedding model's tokens.

The scheme (see README.md for why these defaults):

* A chunk never spans a heading: the blocks under one heading path form a section, and each
  section is chunked on its own. Every chunk keeps its heading path.
* Inside a section, whole paragraphs are packed greedily up to `chunk_tokens`. A paragraph
  longer than that is split at sentence ends, then at line breaks, then at word boundaries.
* Consecutive chunks of a section share up to `overlap_tokens` of text: the next chunk starts
  with the tail of the previous one (cut at a word boundary), so a fact that straddles a
  boundary is whole in at least one chunk.
* What is embedded is a short prefix (title > headings, at most 32 tokens) plus the chunk's
  text; `chunk_tokens` bounds the text itself, which is what goes into the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from retrieval.documents import Block, Chunk, Document

DEFAULT_CHUNK_TOKENS = 160
DEFAULT_OVERLAP_TOKENS = 32
PREFIX_TOKENS = 32
MIN_CHUNK_TOKENS = 16


class TokenCounter(Protocol):
    """The part of a tokenizer the chunker needs."""

    name: str

    def count(self, text: str) -> int:
        """Number of tokens in `text`, without special tokens."""
        ...

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each token of `text`."""
        ...


class WordPieceCounter:
    """Counts tokens with a Hugging Face `tokenizer.json` (e.g. the bundled MiniLM's)."""

    def __init__(self, tokenizer_json: str | Path, name: str = "wordpiece") -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.name = name

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [tuple(o) for o in self._tokenizer.encode(text, add_special_tokens=False).offsets]  # type: ignore[misc]


class WhitespaceCounter:
    """One token per run of non-space characters; pairs with the fake hashing embedder."""

    name = "whitespace"
    _TOKEN = re.compile(r"\S+")

    def count(self, text: str) -> int:
        return len(self._TOKEN.findall(text))

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._TOKEN.finditer(text)]


@dataclass(frozen=True)
class ChunkingOptions:
    """Chunk size and overlap in tokens of the embedding model's tokenizer."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS

    def __post_init__(self) -> None:
        if self.chunk_tokens < MIN_CHUNK_TOKENS:
            raise ValueError(f"chunk_tokens must be at least {MIN_CHUNK_TOKENS}, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens <= self.chunk_tokens // 2:
            raise ValueError(
                f"overlap_tokens must be between 0 and half of chunk_tokens ({self.chunk_tokens // 2}), "
                f"got {self.overlap_tokens}"
            )

    def fingerprint(self, tokenizer: str) -> str:
        """Changes whenever re-chunking would give different chunks."""
        return f"v1:{tokenizer}:{self.chunk_tokens}:{self.overlap_tokens}"


_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+(?=\S)")


@dataclass(frozen=True)
class _Piece:
    text: str
    tokens: int
    joiner: str  # what goes between this piece and the one before it in the same chunk


class Chunker:
    """Splits a `Document` into `Chunk`s; see the module docstring for the rules."""

    def __init__(
        self, counter: TokenCounter, options: ChunkingOptions | None = None, max_tokens: int | None = None
    ) -> None:
        self.counter = counter
        self.options = options or ChunkingOptions()
        if max_tokens is not None and self.options.chunk_tokens + PREFIX_TOKENS > max_tokens:
            raise ValueError(
                f"chunk_tokens={self.options.chunk_tokens} plus a {PREFIX_TOKENS}-token heading prefix "
                f"exceeds the embedding model's limit of {max_tokens} tokens; "
                f"use at most {max_tokens - PREFIX_TOKENS}"
            )

    @property
    def fingerprint(self) -> str:
        return self.options.fingerprint(self.counter.name)

    def chunk(self, document: Document) -> list[Chunk]:
        chunks: list[Chunk] = []
        for heading_path, blocks in _sections(document.blocks):
            prefix = self._prefix(document.title, heading_path)
            for text in self._chunk_section(blocks):
                position = len(chunks)
                chunks.append(
                    Chunk(
                        document_id=document.id,
                        chunk_id=f"{document.id}#{position}",
                        position=position,
                        text=text,
                        title=document.title,
                        source=document.source,
                        heading_path=heading_path,
                        token_count=self.counter.count(text),
                        embedding_prefix=prefix,
                    )
                )
        return chunks

    # -- internals ---------------------------------------------------------------------------

    def _prefix(self, title: str, heading_path: tuple[str, ...]) -> str:
        parts = [title, *(h for h in heading_path if h != title)]
        prefix = " > ".join(p for p in parts if p)
        spans = self.counter.spans(prefix)
        if len(spans) > PREFIX_TOKENS:
            prefix = prefix[: spans[PREFIX_TOKENS - 1][1]]
        return prefix

    def _chunk_section(self, blocks: Sequence[Block]) -> list[str]:
        budget = self.options.chunk_tokens
        pieces: list[_Piece] = []
        for block in blocks:
            for i, piece in enumerate(self._split(block.text, budget)):
                pieces.append(_Piece(piece, self.counter.count(piece), "\n\n" if i == 0 else " "))
        return self._merge(pieces, budget)

    def _split(self, text: str, budget: int) -> list[str]:
        """Split one paragraph into pieces of at most `budget` tokens, at the coarsest boundary."""
        if self.counter.count(text) <= budget:
            return [text]
        for pattern in (_SENTENCE_END, re.compile(r"\n+")):
            parts = [p for p in pattern.split(text) if p.strip()]
            if len(parts) > 1:
                out: list[str] = []
                for part in parts:
                    out.extend(self._split(part.strip(), budget))
                return out
        return self._token_windows(text, budget)

    def _token_windows(self, text: str, budget: int) -> list[str]:
        """Cut text with no sentence or line boundary into windows at word boundaries."""
        spans = self.counter.spans(text)
        out: list[str] = []
        start_token = 0
        while start_token < len(spans):
            end_token = min(start_token + budget, len(spans))
            if end_token < len(spans):
                # back off to a token that starts a word, so no word is cut in two
                cut = end_token
                while cut > start_token + 1 and not _starts_word(text, spans[cut][0]):
                    cut -= 1
                end_token = cut if cut > start_token + 1 else end_token
            start_char = spans[start_token][0]
            end_char = spans[end_token - 1][1]
            piece = text[start_char:end_char].strip()
            if piece:
                out.append(piece)
            start_token = end_token
        return out

    def _merge(self, pieces: list[_Piece], budget: int) -> list[str]:
        chunks: list[str] = []
        current: list[_Piece] = []
        used = 0
        for piece in pieces:
            if current and used + piece.tokens > budget:
                text = _join(current)
                chunks.append(text)
                current, used = [], 0
                room = min(self.options.overlap_tokens, budget - piece.tokens)
                if room >= 4:
                    tail = self._tail(text, room)
                    if tail:
                        current, used = [_Piece(tail, self.counter.count(tail), "")], self.counter.count(tail)
            current.append(piece)
            used += piece.tokens
        if current:
            chunks.append(_join(current))
        return chunks

    def _tail(self, text: str, tokens: int) -> str:
        """The last `tokens` tokens of `text`, starting at a word boundary."""
        spans = self.counter.spans(text)
        if len(spans) <= tokens:
            return text
        start = spans[len(spans) - tokens][0]
        while start < len(text) and not _starts_word(text, start):
            start += 1
        return text[start:].strip()


def _starts_word(text: str, index: int) -> bool:
    return index == 0 or index >= len(text) or text[index - 1].isspace()


def _join(pieces: list[_Piece]) -> str:
    out = pieces[0].text
    for piece in pieces[1:]:
        out += (piece.joiner or " ") + piece.text
    return out


def _sections(blocks: Sequence[Block]) -> list[tuple[tuple[str, ...], list[Block]]]:
    sections: list[tuple[tuple[str, ...], list[Block]]] = []
    for block in blocks:
        if sections and sections[-1][0] == block.heading_path:
            sections[-1][1].append(block)
        else:
            sections.append((block.heading_path, [block]))
    return sections
