"""Ingestion: load files, chunk, embed, publish a new index version, record it in SQL.

Re-ingesting is incremental. A document whose content hash, chunking settings and embedding
model match both SQL and the live index is left alone (no chunking, no embedding). A changed
one has its chunks replaced; `delete_documents` removes documents from the index and SQL.

Order of writes: the new index version is published first, SQL second. If the process dies
in between, SQL still holds the old hashes, so the next ingest sees those documents as changed
and writes them again: the two stores converge instead of drifting apart silently.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import storage
from retrieval.chunking import Chunker, ChunkingOptions
from retrieval.db import MetadataRepository, missing_tables, rag_collection_versions
from retrieval.documents import Chunk, Document, Skipped
from retrieval.embedders import Embedder
from retrieval.engine import async_url, create_engine, default_database_url, normalise_database_url
from retrieval.errors import ConcurrentPublish, EmbeddingMismatch, SchemaMissing, UnknownCollection
from retrieval.index import FaissIndex, IndexConfig
from retrieval.loaders import iter_files
from retrieval.objectstore import ObjectStorage, install_version, is_object_storage

EMBED_BATCH = 256
VERSIONS_TABLE = rag_collection_versions.name

SchemaHook = Callable[[str], None]
"""Brings a database's schema up to date, given its URL; called in a worker thread
(`gateway.migrate.upgrade` is one: Alembic runs its own event loop)."""


@dataclass
class IngestReport:
    """What an ingest or delete did; `summary()` is what the CLI prints."""

    collection: str
    files_seen: int = 0
    documents_seen: int = 0
    ingested: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0
    total_chunks: int = 0
    index_type: str | None = None
    version: str | None = None
    seconds: float = 0.0
    embed_seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "files_seen": self.files_seen,
            "documents_seen": self.documents_seen,
            "ingested": self.ingested,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "chunks": self.chunks,
            "total_chunks": self.total_chunks,
            "index_type": self.index_type,
            "version": self.version,
            "seconds": round(self.seconds, 3),
            "chunks_per_s": round(self.chunks_per_s, 1),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }

    def summary(self) -> str:
        lines = [
            f"collection {self.collection!r}: {self.files_seen} files seen, {self.documents_seen} documents, "
            f"{self.ingested} ingested, {self.unchanged} unchanged, {self.deleted} deleted, "
            f"{len(self.skipped)} skipped",
            f"{self.chunks} chunks embedded in {self.seconds:.1f} s ({self.chunks_per_s:.1f} chunks/s); "
            f"collection now holds {self.total_chunks} chunks"
            + (f" in a {self.index_type} index (version {self.version})" if self.version else ""),
        ]
        if self.version:
            lines.append(
                "live now: every gateway reading this index folder answers from this version from its next search on"
            )
        lines.extend(f"  skipped {s.path}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


def _progress(total: int | None, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False)


class Ingestor:
    """Ingests documents into collections under `data_dir`, with metadata in SQL.

    Open with `await Ingestor.open(data_dir, database_url, embedder)` and `await aclose()`.
    """

    def __init__(
        self,
        data_dir: Path,
        repository: MetadataRepository,
        embedder: Embedder,
        *,
        chunking: ChunkingOptions | None = None,
        index_config: IndexConfig | None = None,
        progress: bool = False,
        owns_engine: bool = False,
        remote: ObjectStorage | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.repository = repository
        self.embedder = embedder
        self.chunker = Chunker(embedder.tokenizer, chunking, max_tokens=embedder.max_tokens)
        self.index_config = index_config or IndexConfig()
        self.progress = progress
        self._owns_engine = owns_engine
        # object storage: data_dir is then a local cache and staging area, the database says what is live
        self.remote = remote
        self._live: dict[str, str | None] = {}
        self._record_versions = True

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        database_url: str | None,
        embedder: Embedder,
        *,
        ensure_schema: SchemaHook | None = None,
        index_storage: str | None = None,
        endpoint_url: str | None = None,
        **kwargs: Any,
    ) -> Ingestor:
        """Connect to the database (None: SQLite at DATA_DIR/gateway.db), which must hold the rag_ tables.

        The schema belongs to the gateway's Alembic migrations, which this package cannot import:
        a caller that may meet an old or empty database passes `ensure_schema` (the gateway CLI
        runs the upgrade itself first). A database still without the tables raises SchemaMissing.

        `index_storage` "s3://bucket/prefix" publishes versions there (`endpoint_url`: an
        S3-compatible server; None: boto3's AWS settings) and keeps `data_dir` as a local cache;
        an unreachable bucket raises StorageUnreachable. None or a path: `data_dir` itself.
        """
        url = async_url(database_url or default_database_url(data_dir))
        if is_object_storage(index_storage):
            assert index_storage is not None
            remote = ObjectStorage(index_storage, endpoint_url)
            await asyncio.to_thread(remote.check)
            kwargs["remote"] = remote
        if ensure_schema is not None:
            await asyncio.to_thread(ensure_schema, url)
        engine = create_engine(url)
        try:
            missing = await missing_tables(engine)
        except BaseException:
            await engine.dispose()
            raise
        # local storage works on a database from before the versions table (it is then not filled in)
        optional = set() if "remote" in kwargs else {VERSIONS_TABLE}
        if set(missing) - optional:
            await engine.dispose()
            raise SchemaMissing(str(normalise_database_url(url)), [t for t in missing if t not in optional])
        ingestor = cls(data_dir, MetadataRepository(engine), embedder, owns_engine=True, **kwargs)
        ingestor._record_versions = VERSIONS_TABLE not in missing
        return ingestor

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.repository.engine.dispose()

    async def __aenter__(self) -> Ingestor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- ingest ------------------------------------------------------------------------------

    async def ingest_paths(self, collection: str, paths: Iterable[Path]) -> IngestReport:
        """Ingest every supported file under `paths`; bad files are reported, never fatal."""
        storage.validate_collection_name(collection)
        started = time.perf_counter()
        report = IngestReport(collection)
        documents = await asyncio.to_thread(self._load, list(paths), report)
        await self._ingest(collection, documents, report)
        report.seconds = time.perf_counter() - started
        return report

    async def ingest_documents(self, collection: str, documents: Sequence[Document]) -> IngestReport:
        """Ingest already-loaded documents (ids must be unique)."""
        storage.validate_collection_name(collection)
        started = time.perf_counter()
        report = IngestReport(collection)
        await self._ingest(collection, _unique(documents, report), report)
        report.seconds = time.perf_counter() - started
        return report

    def _load(self, paths: list[Path], report: IngestReport) -> list[Document]:
        documents: list[Document] = []
        bar = _progress(None, "loading", "file", self.progress)
        for loaded in iter_files(paths):
            if loaded.path.is_file():
                report.files_seen += 1
            report.skipped.extend(loaded.skipped)
            documents.extend(loaded.documents)
            bar.update(1)
        bar.close()
        return _unique(documents, report)

    async def _ingest(self, collection: str, documents: list[Document], report: IngestReport) -> None:
        report.documents_seen = len(documents)
        lock = storage.WriterLock(self.data_dir, collection)
        await asyncio.to_thread(lock.acquire)
        try:
            await self._fetch_live(collection)
            snapshot = await self._live_snapshot(collection)
            in_index = snapshot.documents if snapshot else {}
            in_sql = await self.repository.documents(collection, [d.id for d in documents])
            fingerprint = self.chunker.fingerprint
            changed: list[Document] = []
            for document in documents:
                row = in_sql.get(document.id)
                digest = document.content_hash
                if (
                    row is not None
                    and row.content_hash == digest
                    and row.chunking == fingerprint
                    and row.embedding_model == self.embedder.name
                    and in_index.get(document.id) == digest
                ):
                    report.unchanged += 1
                else:
                    changed.append(document)
            if not changed:  # nothing to do: no new version, no SQL writes
                if snapshot is not None:
                    report.total_chunks = snapshot.index.size
                    report.index_type, report.version = snapshot.index.kind, snapshot.version
                return

            chunked = await asyncio.to_thread(self._chunk_all, changed)
            chunks = [chunk for _, doc_chunks in chunked for chunk in doc_chunks]
            embed_started = time.perf_counter()
            vectors = await self._embed([c.embedding_text for c in chunks])
            report.embed_seconds = time.perf_counter() - embed_started

            replaced = {d.id for d in changed}
            records, old_vectors, document_hashes = _without(snapshot, replaced, self.embedder.dimension)
            # only additions: the live index covers the kept rows as they are and can be extended
            base = snapshot.index if snapshot is not None and not replaced & set(snapshot.records.document_id) else None
            records = records.extend(_records(chunks))
            all_vectors = np.concatenate([old_vectors, vectors]) if len(old_vectors) else vectors
            document_hashes.update({d.id: d.content_hash for d in changed})
            await self._publish(collection, records, all_vectors, document_hashes, report, base=base)
            await self.repository.replace_documents(
                collection, chunked, chunking=fingerprint, embedding_model=self.embedder.name
            )
            report.ingested = len(changed)
            report.chunks = len(chunks)
        finally:
            lock.release()

    def _chunk_all(self, documents: list[Document]) -> list[tuple[Document, list[Chunk]]]:
        bar = _progress(len(documents), "chunking", "doc", self.progress)
        out = []
        for document in documents:
            out.append((document, self.chunker.chunk(document)))
            bar.update(1)
        bar.close()
        return out

    async def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embedder.dimension), dtype=np.float32)
        bar = _progress(len(texts), "embedding", "chunk", self.progress)
        parts = []
        for start in range(0, len(texts), EMBED_BATCH):
            batch = texts[start : start + EMBED_BATCH]
            parts.append(await self.embedder.embed(batch))
            bar.update(len(batch))
        bar.close()
        return np.concatenate(parts)

    async def _fetch_live(self, collection: str) -> None:
        """Object storage: install the version the database names live into the local cache."""
        if self.remote is None:
            return
        live = (await self.repository.current_versions()).get(collection)
        self._live[collection] = live[0] if live else None
        if live is not None:
            await asyncio.to_thread(install_version, self.remote, self.data_dir, collection, live[0])

    async def _live_snapshot(self, collection: str) -> storage.Snapshot | None:
        if self.remote is not None and self._live.get(collection) is None:
            return None  # the database names no live version: a local leftover does not count
        try:
            snapshot = await asyncio.to_thread(storage.load_snapshot, self.data_dir, collection, with_vectors=True)
        except UnknownCollection:
            return None
        if snapshot.embedding_model != self.embedder.name:
            raise EmbeddingMismatch(collection, snapshot.embedding_model, self.embedder.name)
        return snapshot

    async def _publish(
        self,
        collection: str,
        records: storage.ChunkRecords,
        vectors: np.ndarray,
        documents: dict[str, str],
        report: IngestReport,
        base: FaissIndex | None = None,
    ) -> None:
        if self.progress:
            print(f"building the index of {len(records)} chunks ...", file=sys.stderr)
        version = await asyncio.to_thread(
            storage.write_snapshot,
            self.data_dir,
            collection,
            records=records,
            vectors=vectors,
            embedding_model=self.embedder.name,
            dimension=self.embedder.dimension,
            documents=documents,
            config=self.index_config,
            chunking=self.chunker.fingerprint,
            base=base,
        )
        folder = storage.collection_dir(self.data_dir, collection) / version
        if self.remote is None:
            if self._record_versions:
                await self.repository.publish_version(collection, version, str(folder), replaces=None, force=True)
        else:
            uri = await asyncio.to_thread(self.remote.upload_version, folder, collection, version)
            replaces = self._live.get(collection)
            if not await self.repository.publish_version(collection, version, uri, replaces=replaces):
                raise ConcurrentPublish(collection)
            self._live[collection] = version
        report.version = version
        report.total_chunks = len(records)
        report.index_type = self.index_config.resolve(len(records))

    # -- delete ------------------------------------------------------------------------------

    async def drop_collection(self, collection: str) -> int:
        """Remove a whole collection: its index folder and its SQL rows. Returns documents removed."""
        lock = storage.WriterLock(self.data_dir, collection)
        await asyncio.to_thread(lock.acquire)
        try:
            ids = list(await self.repository.documents(collection))
            if self._record_versions:
                await self.repository.drop_version(collection)
            await asyncio.to_thread(_drop_files_sync, self.data_dir, collection)
            return await self.repository.delete_documents(collection, ids)
        finally:
            lock.release()

    async def delete_documents(self, collection: str, document_ids: Iterable[str]) -> IngestReport:
        """Remove documents (by id, or every id under a folder prefix 'dir/') from the collection."""
        started = time.perf_counter()
        report = IngestReport(collection)
        lock = storage.WriterLock(self.data_dir, collection)
        await asyncio.to_thread(lock.acquire)
        try:
            await self._fetch_live(collection)
            snapshot = await self._live_snapshot(collection)
            if snapshot is None:
                raise UnknownCollection(collection)
            known = set(snapshot.documents) | set(await self.repository.documents(collection))
            targets: set[str] = set()
            for wanted in document_ids:
                prefix = wanted.rstrip("/") + "/"
                matches = {wanted} & known or {k for k in known if k.startswith(prefix)}
                if not matches:
                    report.skipped.append(Skipped(wanted, "not in collection"))
                targets |= matches
            report.documents_seen = len(targets)
            if targets:
                records, vectors, document_hashes = _without(snapshot, targets, self.embedder.dimension)
                await self._publish(collection, records, vectors, document_hashes, report)
                await self.repository.delete_documents(collection, sorted(targets))
                report.deleted = len(targets)
            else:
                report.total_chunks = snapshot.index.size
        finally:
            lock.release()
        report.seconds = time.perf_counter() - started
        return report


def _drop_files_sync(data_dir: Path, collection: str) -> None:
    import shutil

    coll_dir = storage.collection_dir(data_dir, collection)
    # CURRENT first: from then on readers see an unknown collection, never a half-removed one
    (coll_dir / storage.POINTER).unlink(missing_ok=True)
    for path in coll_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _unique(documents: Iterable[Document], report: IngestReport) -> list[Document]:
    seen: dict[str, Document] = {}
    for document in documents:
        if document.id in seen:
            report.skipped.append(Skipped(document.source, f"duplicate document id {document.id!r}"))
        else:
            seen[document.id] = document
    return list(seen.values())


def _records(chunks: Sequence[Chunk]) -> storage.ChunkRecords:
    return storage.ChunkRecords(
        chunk_id=[c.chunk_id for c in chunks],
        document_id=[c.document_id for c in chunks],
        position=[c.position for c in chunks],
        title=[c.title for c in chunks],
        source=[c.source for c in chunks],
        text=[c.text for c in chunks],
        heading_path=[list(c.heading_path) for c in chunks],
        content_hash=[c.content_hash for c in chunks],
        token_count=[c.token_count for c in chunks],
    )


def _without(
    snapshot: storage.Snapshot | None, document_ids: set[str], dimension: int
) -> tuple[storage.ChunkRecords, np.ndarray, dict[str, str]]:
    """The live version's rows, vectors and document hashes minus `document_ids`."""
    if snapshot is None:
        return storage.ChunkRecords(), np.zeros((0, dimension), dtype=np.float32), {}
    keep = [i for i, doc in enumerate(snapshot.records.document_id) if doc not in document_ids]
    assert snapshot.vectors is not None
    hashes = {k: v for k, v in snapshot.documents.items() if k not in document_ids}
    return snapshot.records.select(keep), snapshot.vectors[keep], hashes
