"""The FAISS vector index: its types, their thresholds, and building, searching and saving one.

All indexes score by inner product over unit vectors (= cosine similarity). The type follows
the collection's size unless configured (`IndexConfig.kind`); the thresholds and parameters
below come from benchmarks/bench_retrieval.py (figures in README.md):

* flat  — exact search; below `flat_max` (20k) vectors, where a scan takes a few ms.
* hnsw  — graph search (M=32, efConstruction=80, efSearch=320); from 20k to `ivf_min` (200k).
* ivf   — k-means cells with flat vectors inside (nlist ≈ 2·sqrt(n), nprobe = nlist/4); from
          200k vectors, because an ingest that changes documents rebuilds the index and
          HNSW's build time grows too long there (49 s at 10^5 on 2 cores, 3 s for IVF).

Index objects are plain synchronous compute objects; `CollectionStore` runs them in its
executor. FAISS releases the GIL while it searches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

IndexKind = Literal["flat", "hnsw", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """How to build an index. `kind="auto"` picks by size with the two thresholds."""

    kind: str = "auto"
    flat_max: int = 20_000
    ivf_min: int = 200_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 320
    ivf_nlist: int | None = None  # None: about 2 * sqrt(n), see `ivf_nlist_for`
    ivf_nprobe: int | None = None  # None: a quarter of the lists, see `ivf_nprobe_for`

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")

    def resolve(self, n: int) -> IndexKind:
        """The index type for a collection of `n` vectors."""
        if self.kind == "flat" or (self.kind == "auto" and n < self.flat_max):
            return "flat"
        if self.kind == "ivf" or (self.kind == "auto" and n >= self.ivf_min):
            # k-means needs a few dozen points per cell; tiny collections stay exact
            return "ivf" if n >= 1_000 else "flat"
        return "hnsw"


def ivf_nlist_for(n: int) -> int:
    """About 2·sqrt(n) cells, at least 1 and with at least 39 training points per cell."""
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def ivf_nprobe_for(nlist: int) -> int:
    """A quarter of the lists (at least 32): what the benchmark needed for recall@10 >= 0.95."""
    return max(1, min(nlist, max(32, nlist // 4)))


class FaissIndex:
    """A FAISS index over inner product, with its search-time parameters."""

    def __init__(self, index: Any, kind: str, *, ef_search: int = 64, nprobe: int = 16) -> None:
        self._index = index
        self.kind = kind
        self.ef_search = ef_search
        self.nprobe = nprobe

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self._index.d)

    @classmethod
    def build(cls, vectors: np.ndarray, config: IndexConfig | None = None, dimension: int | None = None) -> FaissIndex:
        """Build an index of the configured (or size-chosen) type over `vectors` (rows = ids)."""
        import faiss

        config = config or IndexConfig()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = int(vectors.shape[0])
        d = int(vectors.shape[1]) if vectors.ndim == 2 and vectors.shape[1] else int(dimension or 0)
        if d <= 0:
            raise ValueError("cannot build an index without knowing the vector dimension")
        kind = config.resolve(n)
        index: Any
        nprobe = config.ivf_nprobe or 16
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = config.hnsw_ef_construction
            index = hnsw
        else:
            quantizer = faiss.IndexFlatIP(d)
            nlist = config.ivf_nlist or ivf_nlist_for(n)
            ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            # train on a sample: k-means cost grows with points, quality barely beyond ~64 per cell
            sample = (
                vectors if n <= nlist * 64 else vectors[np.random.default_rng(0).choice(n, nlist * 64, replace=False)]
            )
            ivf.train(sample)
            nprobe = config.ivf_nprobe or ivf_nprobe_for(nlist)
            index = ivf
        if n:
            index.add(vectors)
        return cls(index, kind, ef_search=config.hnsw_ef_search, nprobe=nprobe)

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (their ids continue from `size`). Flat and HNSW only: IVF cells were
        trained for the old data, so a grown IVF collection is rebuilt instead."""
        if self.kind not in ("flat", "hnsw"):
            raise ValueError(f"cannot add to a {self.kind} index; rebuild it")
        if len(vectors):
            self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.size == 0 or k <= 0:
            shape = (queries.shape[0], max(k, 0))
            return np.zeros(shape, dtype=np.float32), np.full(shape, -1, dtype=np.int64)
        params: Any = None
        # per-call parameters: one shared index serves concurrent searches without mutation
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))  # type: ignore[attr-defined]
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)  # type: ignore[call-arg]
        scores, ids = self._index.search(queries, k, params=params)
        return scores, ids

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, kind: str, *, ef_search: int = 64, nprobe: int = 16) -> FaissIndex:
        import faiss

        return cls(faiss.read_index(str(path)), kind, ef_search=ef_search, nprobe=nprobe)
