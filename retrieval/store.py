"""`CollectionStore`: search the collections on disk, picking up new versions without a restart.

Every search stats the collection's CURRENT pointer (one `os.stat`, a few microseconds; at most
every `check_interval_s` when that is set above 0). When it changed, the new version loads once
and is swapped in with one assignment. With `fresh` (the default) the requests that see the
change wait for that load, so once an ingest has swapped CURRENT on the shared folder, every
replica's next search uses the new version: an ingest's completion means "served from now on".
Without `fresh`, the load happens in the background while requests keep using the old version.
A version that fails to load is logged, the old one stays in service, and the load is tried again
after `retry_s` (not on every request). With object storage, a replica sees a new version when
its `IndexSync` has copied it (its poll interval), then as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval import storage
from retrieval.batching import LruCache, normalise_query
from retrieval.documents import Hit
from retrieval.embedders import Embedder
from retrieval.errors import EmbeddingMismatch, InvalidCollectionName, RetrievalError, UnknownCollection

if TYPE_CHECKING:
    from retrieval.objectstore import IndexSync

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    """Hits plus where the time went (for the audit log and the benchmark)."""

    hits: list[Hit]
    version: str
    embed_ms: float
    search_ms: float


@dataclass
class _State:
    snapshot: storage.Snapshot
    signature: tuple[int, int, int] | None
    checked_at: float
    pending: asyncio.Task[None] | None = None
    retry_at: float = 0.0  # after a failed load: no new attempt before this time (monotonic)


@dataclass
class CollectionStore:
    """Searches `DATA_DIR/indexes/*` with one embedder; safe to share across requests.

    `executor` runs FAISS searches and index loads (bounded, shared); the embedder has its
    own. Build it once at start-up and `await aclose()` at shutdown.

    With object storage, `data_dir` is the replica's local cache and `sync` (started) the
    `IndexSync` that keeps it at the live versions; `aclose()` stops it too.
    """

    data_dir: Path
    embedder: Embedder
    check_interval_s: float = 0.0  # 0: stat CURRENT on every search
    fresh: bool = True  # requests that see a new version wait for it (False: it loads in the background)
    retry_s: float = 5.0  # a version that failed to load is tried again after this long
    executor: Executor | None = None
    sync: IndexSync | None = None
    _states: dict[str, _State] = field(default_factory=dict, init=False, repr=False)
    _first_loads: dict[str, asyncio.Task[storage.Snapshot]] = field(default_factory=dict, init=False, repr=False)
    _own_executor: bool = field(default=False, init=False, repr=False)
    cache_size: int = 4096  # query embeddings and result lists kept (0: no caching)
    query_cache: LruCache[tuple[str, str], np.ndarray] = field(init=False, repr=False)
    result_cache: LruCache[tuple[str, str, str, int, float], tuple[Hit, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.query_cache = LruCache(self.cache_size)
        self.result_cache = LruCache(self.cache_size)
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="faiss")
            self._own_executor = True

    # -- public API --------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """Names of the collections that have an index on disk."""
        return storage.list_collections(self.data_dir)

    def loaded(self) -> dict[str, tuple[str, int]]:
        """collection -> (version, chunks) of the versions loaded in memory now (no disk access)."""
        return {name: (state.snapshot.version, state.snapshot.index.size) for name, state in list(self._states.items())}

    async def search(self, collection: str, query_text: str, top_k: int = 4, min_score: float = 0.0) -> list[Hit]:
        """The `top_k` best chunks scoring at least `min_score` (cosine), best first."""
        return (await self.search_detailed(collection, query_text, top_k, min_score)).hits

    async def search_detailed(
        self, collection: str, query_text: str, top_k: int = 4, min_score: float = 0.0
    ) -> SearchOutcome:
        snapshot = await self._snapshot(collection)
        self._check_model(snapshot)
        query = normalise_query(query_text)
        # The version is part of the key: a new version of the collection is never served old hits.
        key = (collection, snapshot.version, query, top_k, min_score)
        cached = self.result_cache.get(key)
        if cached is not None:
            return SearchOutcome(list(cached), snapshot.version, 0.0, 0.0)
        started = time.perf_counter()
        vector = await self._query_vector(query)
        embedded = time.perf_counter()
        hits = await self._search_snapshot(snapshot, vector, top_k, min_score)
        done = time.perf_counter()
        self.result_cache.put(key, tuple(hits))
        return SearchOutcome(hits, snapshot.version, (embedded - started) * 1e3, (done - embedded) * 1e3)

    async def _query_vector(self, query: str) -> np.ndarray:
        key = (self.embedder.name, query)
        vector = self.query_cache.get(key)
        if vector is None:
            vector = await self.embedder.embed([query])
            vector.setflags(write=False)  # shared by later hits
            self.query_cache.put(key, vector)
        return vector

    def cache_stats(self) -> dict[str, float]:
        """For /metrics: hit rates and sizes of the query-embedding and result caches."""
        return {
            "query_embedding_hit_rate": self.query_cache.hit_rate(),
            "query_embedding_entries": len(self.query_cache),
            "result_hit_rate": self.result_cache.hit_rate(),
            "result_entries": len(self.result_cache),
        }

    async def info(self, collection: str) -> dict[str, Any]:
        """Version, size, index type and embedding model of the live version."""
        snapshot = await self._snapshot(collection)
        manifest = snapshot.manifest
        return {
            "collection": collection,
            "version": snapshot.version,
            "chunks": snapshot.index.size,
            "documents": len(manifest.get("documents", {})),
            "index_type": snapshot.index.kind,
            "embedding_model": snapshot.embedding_model,
            "created_at": manifest.get("created_at"),
        }

    async def document(self, collection: str, document_id: str) -> list[dict[str, Any]]:
        """The chunks of one document in the live version, in reading order (empty: no such
        document). Raises UnknownCollection. The scan runs on the executor, off the event loop."""
        snapshot = await self._snapshot(collection)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _document_chunks, snapshot.records, document_id)

    async def refresh(self, collection: str) -> str:
        """Load the live version now (waiting for it); returns its name."""
        snapshot = await self._load(collection)
        self._states[collection] = _State(snapshot, storage.pointer_signature(self._dir(collection)), time.monotonic())
        return snapshot.version

    async def aclose(self) -> None:
        for state in self._states.values():
            if state.pending is not None:
                state.pending.cancel()
        if self.sync is not None:
            await self.sync.aclose()
        if self._own_executor and self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------

    def _dir(self, collection: str) -> Path:
        try:
            return storage.collection_dir(self.data_dir, collection)
        except InvalidCollectionName:
            raise UnknownCollection(collection) from None

    def _check_model(self, snapshot: storage.Snapshot) -> None:
        if snapshot.embedding_model != self.embedder.name or snapshot.index.dimension != self.embedder.dimension:
            raise EmbeddingMismatch(snapshot.collection, snapshot.embedding_model, self.embedder.name)

    async def _load(self, collection: str) -> storage.Snapshot:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, storage.load_snapshot, self.data_dir, collection)

    async def _snapshot(self, collection: str) -> storage.Snapshot:
        coll_dir = self._dir(collection)
        state = self._states.get(collection)
        now = time.monotonic()
        if state is not None and now - state.checked_at < self.check_interval_s:
            return state.snapshot
        signature = storage.pointer_signature(coll_dir)
        if signature is None:
            self._states.pop(collection, None)
            raise UnknownCollection(collection)
        if state is not None:
            state.checked_at = now
            if signature != state.signature and now >= state.retry_at:
                pending = state.pending
                if pending is None:
                    pending = state.pending = asyncio.create_task(self._swap(collection, state, signature))
                if self.fresh:
                    await asyncio.shield(pending)  # this request is served by the new version
            return state.snapshot
        # first use: every concurrent caller waits for the same load
        task = self._first_loads.get(collection)
        if task is None:
            task = asyncio.create_task(self._load(collection))
            self._first_loads[collection] = task
        try:
            snapshot = await asyncio.shield(task)
        finally:
            if task.done():
                self._first_loads.pop(collection, None)
        if collection not in self._states:
            self._states[collection] = _State(snapshot, signature, time.monotonic())
        return self._states[collection].snapshot

    async def _swap(self, collection: str, state: _State, signature: tuple[int, int, int]) -> None:
        try:
            version = storage.read_pointer(self._dir(collection))
            if version == state.snapshot.version:
                state.signature = signature
                return
            snapshot = await self._load(collection)
        except (RetrievalError, OSError) as exc:
            # keep serving the version we have; try again after retry_s
            state.retry_at = time.monotonic() + self.retry_s
            logger.warning(
                "collection %r: new version not loaded, keeping %s (next try in %.0f s): %s",
                collection,
                state.snapshot.version,
                self.retry_s,
                exc,
            )
            return
        finally:
            state.pending = None
        state.snapshot = snapshot  # the swap: one assignment, seen by the next request
        state.signature = signature
        logger.info("collection %r: now serving %s (%d chunks)", collection, snapshot.version, snapshot.index.size)

    async def _search_snapshot(
        self, snapshot: storage.Snapshot, vector: np.ndarray, top_k: int, min_score: float
    ) -> list[Hit]:
        if top_k <= 0 or snapshot.index.size == 0:
            return []
        loop = asyncio.get_running_loop()
        k = min(top_k, snapshot.index.size)
        scores, ids = await loop.run_in_executor(self.executor, snapshot.index.search, vector, k)
        records = snapshot.records
        hits: list[Hit] = []
        for score, row in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
            if row < 0 or score < min_score:
                continue
            hits.append(
                Hit(
                    collection=snapshot.collection,
                    document_id=records.document_id[row],
                    chunk_id=records.chunk_id[row],
                    title=records.title[row],
                    source=records.source[row],
                    text=records.text[row],
                    score=float(score),
                    rank=len(hits) + 1,
                )
            )
        return hits


def _document_chunks(records: storage.ChunkRecords, document_id: str) -> list[dict[str, Any]]:
    rows = sorted((i for i, d in enumerate(records.document_id) if d == document_id), key=records.position.__getitem__)
    return [
        {
            "chunk_id": records.chunk_id[i],
            "position": records.position[i],
            "title": records.title[i],
            "source": records.source[i],
            "heading_path": list(records.heading_path[i]),
            "text": records.text[i],
        }
        for i in rows
    ]
