"""Shared fixtures: a fast fake embedder by default, the real MiniLM once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval.documents import Block, Document
from retrieval.embedders import HashingEmbedder, SentenceTransformerEmbedder


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(dimension=512)


@pytest.fixture(scope="session")
def minilm() -> Iterator[SentenceTransformerEmbedder]:
    model = SentenceTransformerEmbedder.load_sync()
    yield model
    model._executor.shutdown(wait=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'meta.db'}"


def make_doc(doc_id: str, *paragraphs: str, title: str | None = None) -> Document:
    return Document(doc_id, title or doc_id, f"test://{doc_id}", tuple(Block(p) for p in paragraphs))


def clustered_vectors(n: int, dim: int = 64, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around fixed random centres (closer to real embeddings than uniform noise).

    The centres depend only on `dim` and `clusters`; `seed` draws different points around them,
    so vectors drawn with another seed are queries from the same distribution.
    """
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)
