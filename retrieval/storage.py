"""On-disk layout of a collection, written atomically.

    DATA_DIR/indexes/NAME/
        CURRENT            the name of the live version folder (replaced with os.replace)
        .lock              held (flock) by the one writer at a time
        v-<ns>-<hex>/      a complete version: manifest.json, index.faiss, vectors.npy, chunks.json
        .tmp-<hex>/        a version being written; renamed to v-... once complete

A writer builds a whole version in a temporary folder, fsyncs it, renames it into place and
then replaces CURRENT. A reader reads CURRENT, then that folder: it sees the old version or the
new one, never a mix. The previous version is kept so that a reader that read CURRENT just
before a swap can still load it; older ones are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexCorrupt, InvalidCollectionName, UnknownCollection
from retrieval.index import FaissIndex, IndexConfig

FORMAT_VERSION = 1
POINTER = "CURRENT"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RECORD_FIELDS = (
    "chunk_id",
    "document_id",
    "position",
    "title",
    "source",
    "text",
    "heading_path",
    "content_hash",
    "token_count",
)


def validate_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidCollectionName(str(name))
    return name


def indexes_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "indexes"


def collection_dir(data_dir: Path, name: str) -> Path:
    return indexes_dir(data_dir) / validate_collection_name(name)


def list_collections(data_dir: Path) -> list[str]:
    root = indexes_dir(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / POINTER).is_file() and _NAME.fullmatch(p.name))


@dataclass(frozen=True)
class ChunkRecords:
    """Row-aligned chunk metadata: row i describes vector id i of the index."""

    chunk_id: list[str] = field(default_factory=list)
    document_id: list[str] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    title: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    heading_path: list[list[str]] = field(default_factory=list)
    content_hash: list[str] = field(default_factory=list)
    token_count: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chunk_id)

    def to_json(self) -> dict[str, list[Any]]:
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChunkRecords:
        columns = {name: list(data[name]) for name in _RECORD_FIELDS}
        lengths = {len(col) for col in columns.values()}
        if len(lengths) > 1:
            raise IndexCorrupt("chunk metadata columns have different lengths")
        return cls(**columns)

    def select(self, rows: Sequence[int]) -> ChunkRecords:
        return ChunkRecords(**{name: [getattr(self, name)[i] for i in rows] for name in _RECORD_FIELDS})

    def extend(self, other: ChunkRecords) -> ChunkRecords:
        return ChunkRecords(**{name: getattr(self, name) + getattr(other, name) for name in _RECORD_FIELDS})


@dataclass
class Snapshot:
    """One loaded version of a collection."""

    collection: str
    version: str
    manifest: dict[str, Any]
    index: FaissIndex
    records: ChunkRecords
    vectors: np.ndarray | None = None

    @property
    def embedding_model(self) -> str:
        return str(self.manifest["embedding_model"])

    @property
    def documents(self) -> dict[str, str]:
        """document id -> content hash, for the documents in this version."""
        return dict(self.manifest.get("documents", {}))


def read_pointer(coll_dir: Path) -> str | None:
    try:
        version = (coll_dir / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    return version or None


def pointer_signature(coll_dir: Path) -> tuple[int, int, int] | None:
    """A cheap stat of CURRENT that changes whenever a writer swaps it."""
    try:
        st = os.stat(coll_dir / POINTER)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_snapshot(
    data_dir: Path, collection: str, *, with_vectors: bool = False, version: str | None = None
) -> Snapshot:
    """Load the live version (or `version`). Raises UnknownCollection / IndexCorrupt."""
    coll_dir = collection_dir(data_dir, collection)
    for attempt in range(3):
        current = version or read_pointer(coll_dir)
        if current is None:
            raise UnknownCollection(collection)
        folder = coll_dir / current
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            records = ChunkRecords.from_json(json.loads((folder / "chunks.json").read_text()))
            params = manifest.get("index_params", {})
            index = FaissIndex.load(
                folder / "index.faiss",
                manifest["index_type"],
                ef_search=int(params.get("ef_search", 64)),
                nprobe=int(params.get("nprobe", 16)),
            )
            vectors = np.load(folder / "vectors.npy") if with_vectors else None
        except FileNotFoundError:
            # a writer removed this version between our reading CURRENT and the folder; retry
            if version is not None or attempt == 2:
                raise IndexCorrupt(f"collection {collection!r}: version {current} is incomplete") from None
            time.sleep(0.01)
            continue
        except (KeyError, ValueError, RuntimeError) as exc:  # bad JSON, bad FAISS file
            raise IndexCorrupt(f"collection {collection!r}: version {current} is unreadable: {exc}") from exc
        if index.size != len(records):
            raise IndexCorrupt(f"collection {collection!r}: {index.size} vectors but {len(records)} chunks")
        return Snapshot(collection, current, manifest, index, records, vectors)
    raise AssertionError("unreachable")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_snapshot(
    data_dir: Path,
    collection: str,
    *,
    records: ChunkRecords,
    vectors: np.ndarray,
    embedding_model: str,
    dimension: int,
    documents: Mapping[str, str],
    config: IndexConfig | None = None,
    chunking: str = "",
    keep_versions: int = 2,
    base: FaissIndex | None = None,
) -> str:
    """Build the index and publish a new version atomically; returns its name.

    `base`, when given, is an index over the first `base.size` rows of `vectors` (the live
    version, when this ingest only added documents). If it is a flat or HNSW index of the type
    the new size calls for, the new rows are added to it instead of rebuilding it: seconds
    instead of most of a minute for HNSW at 10^5. `base` is modified. The caller must hold the
    collection's `WriterLock`.
    """
    config = config or IndexConfig()
    coll_dir = collection_dir(data_dir, collection)
    coll_dir.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dimension)
    if vectors.shape[0] != len(records):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(records)} chunks")
    kind = config.resolve(len(records))
    if (
        base is not None
        and base.kind == kind
        and kind in ("flat", "hnsw")
        and base.size <= len(records)
        and base.dimension == dimension
    ):
        base.add(vectors[base.size :])
        base.ef_search = config.hnsw_ef_search
        index, how = base, "extended"
    else:
        index, how = FaissIndex.build(vectors, config, dimension=dimension), "built"
    version = f"v-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    manifest = {
        "format": FORMAT_VERSION,
        "collection": collection,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedding_model": embedding_model,
        "dimension": dimension,
        "index_type": index.kind,
        "index_build": how,
        "index_params": {
            "ef_search": index.ef_search,
            "nprobe": index.nprobe,
            "hnsw_m": config.hnsw_m,
            "hnsw_ef_construction": config.hnsw_ef_construction,
        },
        "chunking": chunking,
        "count": len(records),
        "documents": dict(documents),
    }
    tmp = coll_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        index.save(tmp / "index.faiss")
        with open(tmp / "vectors.npy", "wb") as fh:
            np.save(fh, vectors)
            fh.flush()
            os.fsync(fh.fileno())
        _write_file(tmp / "chunks.json", json.dumps(records.to_json(), ensure_ascii=False).encode())
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False).encode())
        with open(tmp / "index.faiss", "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, coll_dir / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_pointer(coll_dir, version)
    _collect_garbage(coll_dir, keep_versions)
    return version


def write_pointer(coll_dir: Path, version: str) -> None:
    """Point CURRENT at `version` atomically (a reader sees the old name or the new one)."""
    pointer_tmp = coll_dir / f".{POINTER}.{uuid.uuid4().hex}"
    _write_file(pointer_tmp, version.encode())
    os.replace(pointer_tmp, coll_dir / POINTER)
    _fsync_dir(coll_dir)


def _collect_garbage(coll_dir: Path, keep_versions: int) -> None:
    versions = sorted(p for p in coll_dir.iterdir() if p.is_dir() and p.name.startswith("v-"))
    current = read_pointer(coll_dir)
    keep = {p.name for p in versions[-keep_versions:]} | {current}
    for path in coll_dir.iterdir():
        if path.is_dir() and (path.name.startswith(".tmp-") or (path.name.startswith("v-") and path.name not in keep)):
            shutil.rmtree(path, ignore_errors=True)


class WriterLock:
    """Serialises writers of one collection across processes: an flock on NAME/.lock.

    `acquire` blocks, so async code calls it through `asyncio.to_thread`.
    """

    def __init__(self, data_dir: Path, collection: str) -> None:
        self.path = collection_dir(data_dir, collection) / ".lock"
        self._fh: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: one writer at a time is up to the operator
            self._fh = fh
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self._fh = fh

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the file drops the flock

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
