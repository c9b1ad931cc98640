"""One contract, run over every index type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.index import FaissIndex, IndexConfig, ivf_nlist_for
from tests.retrieval.conftest import clustered_vectors

KINDS = ["flat", "hnsw", "ivf"]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered_vectors(4000, dim=64)


@pytest.fixture(scope="module", params=KINDS)
def built(request: pytest.FixtureRequest, vectors: np.ndarray) -> FaissIndex:
    return FaissIndex.build(vectors, IndexConfig(kind=request.param))


def test_builds_the_requested_kind(built: FaissIndex, vectors: np.ndarray, request: pytest.FixtureRequest) -> None:
    assert built.kind == request.node.callspec.params["built"]
    assert built.size == len(vectors)
    assert built.dimension == vectors.shape[1]


def test_a_stored_vector_finds_itself_first(built: FaissIndex, vectors: np.ndarray) -> None:
    rows = np.arange(0, len(vectors), 97)
    scores, ids = built.search(vectors[rows], 5)
    assert scores.shape == ids.shape == (len(rows), 5)
    assert (ids[:, 0] == rows).mean() >= 0.98
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_recall_at_10_against_exact_search(built: FaissIndex, vectors: np.ndarray) -> None:
    queries = clustered_vectors(200, dim=64, seed=1)
    exact = FaissIndex.build(vectors, IndexConfig(kind="flat"))
    _, truth = exact.search(queries, 10)
    _, got = built.search(queries, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.95


def test_scores_are_cosine_similarities(built: FaissIndex, vectors: np.ndarray) -> None:
    query = vectors[7:8]
    scores, ids = built.search(query, 3)
    expected = vectors[ids[0]] @ query[0]
    assert np.allclose(scores[0], expected, atol=1e-4)


def test_save_and_load_round_trip(built: FaissIndex, vectors: np.ndarray, tmp_path: Path) -> None:
    built.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", built.kind, ef_search=built.ef_search, nprobe=built.nprobe)
    assert loaded.size == built.size
    queries = vectors[:20]
    assert np.array_equal(loaded.search(queries, 5)[1], built.search(queries, 5)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_asking_for_more_than_stored(kind: str) -> None:
    small = clustered_vectors(3, dim=16)
    index = FaissIndex.build(small, IndexConfig(kind=kind))
    _scores, ids = index.search(small[:1], 10)
    assert sorted(i for i in ids[0] if i >= 0) == [0, 1, 2]
    assert list(ids[0][3:]) == [-1] * 7


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_returns_nothing(kind: str) -> None:
    index = FaissIndex.build(np.zeros((0, 16), dtype=np.float32), IndexConfig(kind=kind), dimension=16)
    _scores, ids = index.search(np.ones((1, 16), dtype=np.float32), 4)
    assert index.size == 0
    assert (ids == -1).all()


def test_auto_picks_by_size() -> None:
    config = IndexConfig(flat_max=1000, ivf_min=50_000)
    assert config.resolve(999) == "flat"
    assert config.resolve(1000) == "hnsw"
    assert config.resolve(50_000) == "ivf"
    defaults = IndexConfig()
    assert [defaults.resolve(n) for n in (19_999, 20_000, 199_999, 200_000)] == ["flat", "hnsw", "hnsw", "ivf"]
    assert IndexConfig(kind="hnsw").resolve(10) == "hnsw"
    assert IndexConfig(kind="ivf").resolve(10) == "flat"  # too few points to train k-means
    with pytest.raises(ValueError, match="index kind"):
        IndexConfig(kind="annoy")
    assert ivf_nlist_for(100_000) == 632
    assert ivf_nlist_for(1_000) == 25
