"""Plain data types shared by loaders, the chunker, ingestion and search."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Block:
    """One paragraph (or list item, code block, table cell) under its heading path."""

    text: str
    heading_path: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Document:
    """A loaded document: an id unique within its collection, display data and its paragraphs."""

    id: str
    title: str
    source: str
    blocks: tuple[Block, ...]
    format: str = "text"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The document's text, paragraphs separated by blank lines (headings left out)."""
        return "\n\n".join(block.text for block in self.blocks)

    @property
    def content_hash(self) -> str:
        """SHA-256 over everything that ends up in the chunks: title, headings and text."""
        digest = hashlib.sha256()
        digest.update(self.title.encode())
        for block in self.blocks:
            digest.update(b"\x1e")
            digest.update("\x1f".join(block.heading_path).encode())
            digest.update(b"\x1d")
            digest.update(block.text.encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed, with what a citation needs."""

    document_id: str
    chunk_id: str
    position: int
    text: str
    title: str
    source: str
    heading_path: tuple[str, ...]
    token_count: int
    embedding_prefix: str = ""

    @property
    def embedding_text(self) -> str:
        """What is embedded: a short title/heading prefix, then the passage text."""
        return f"{self.embedding_prefix}\n{self.text}" if self.embedding_prefix else self.text

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.embedding_text.encode()).hexdigest()


@dataclass(frozen=True)
class Skipped:
    """A file (or a line of a .jsonl file) that ingest left out, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Hit:
    """One search result. `rank` starts at 1 and matches the [n] marker in the prompt."""

    collection: str
    document_id: str
    chunk_id: str
    title: str
    source: str
    text: str
    score: float
    rank: int
