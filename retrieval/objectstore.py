"""Index versions on object storage (`s3://bucket/prefix`), cached on local disk by each replica.

    s3://bucket/prefix/NAME/v-<ns>-<hex>/   index.faiss, vectors.npy, chunks.json, manifest.json,
                                             then COMPLETE.json (sizes and SHA-256 of the others)

A version is immutable once uploaded. `COMPLETE.json` is uploaded last, so a version whose
upload was cut short has none and is never fetched. Which version is live is not a file in the
bucket but a row of `rag_collection_versions` in the SQL database (compare-and-set on publish).

A replica keeps the local layout of `retrieval.storage` (DATA_DIR/indexes/NAME/v-.../ and
CURRENT) as its cache: `IndexSync` polls the table every `poll_interval_s`, downloads a new
version once into a temporary folder, verifies every file against COMPLETE.json, renames it
into place and swaps CURRENT, which `CollectionStore` already watches (0.25 s). boto3 takes the
endpoint and credentials from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, ...) unless `endpoint_url` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval import storage
from retrieval.db import MetadataRepository
from retrieval.errors import IndexCorrupt, StorageUnreachable

logger = logging.getLogger(__name__)

SCHEME = "s3://"
COMPLETE = "COMPLETE.json"
VERSION_FILES = ("index.faiss", "vectors.npy", "chunks.json", "manifest.json")
_CHUNK = 1 << 20


def is_object_storage(root: str | os.PathLike[str] | None) -> bool:
    return isinstance(root, str) and root.startswith(SCHEME)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ObjectStorage:
    """One `s3://bucket/prefix` root; blocking calls (run them in a thread)."""

    uri: str
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not is_object_storage(self.uri):
            raise ValueError(f"not an object storage URL: {self.uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = self.uri[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {self.uri!r} (expected s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3  # optional dependency: only object storage needs it
                from botocore.config import Config
            except ImportError:
                raise StorageUnreachable(self.uri, "boto3 is not installed (pip install boto3)") from None

            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _key(self, collection: str, version: str, name: str) -> str:
        return f"{self.prefix}{storage.validate_collection_name(collection)}/{version}/{name}"

    def version_uri(self, collection: str, version: str) -> str:
        return f"{SCHEME}{self.bucket}/{self._key(collection, version, '')}"

    def check(self) -> None:
        """Raise StorageUnreachable (naming the URL) unless the bucket answers."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except StorageUnreachable:
            raise
        except Exception as exc:  # botocore's errors have no common base worth naming here
            where = f"{self.uri} (endpoint {self.endpoint_url})" if self.endpoint_url else self.uri
            raise StorageUnreachable(where, _one_line(exc)) from exc

    def upload_version(self, folder: Path, collection: str, version: str) -> str:
        """Upload a complete local version folder; COMPLETE.json last. Returns the version's URI."""
        files: dict[str, dict[str, Any]] = {}
        for name in VERSION_FILES:
            path = folder / name
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            self.client.upload_file(str(path), self.bucket, self._key(collection, version, name))
        complete = json.dumps({"collection": collection, "version": version, "files": files}, indent=1).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(collection, version, COMPLETE), Body=complete)
        return self.version_uri(collection, version)

    def download_version(self, collection: str, version: str, data_dir: Path) -> Path:
        """Fetch a version into DATA_DIR/indexes/NAME/<version>/ unless it is there; verified, atomic."""
        coll_dir = storage.collection_dir(data_dir, collection)
        target = coll_dir / version
        if (target / "manifest.json").is_file():
            return target
        coll_dir.mkdir(parents=True, exist_ok=True)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(collection, version, COMPLETE))["Body"]
            complete = json.loads(body.read())
            files = complete["files"]
        except Exception as exc:
            raise IndexCorrupt(
                f"collection {collection!r}: version {version} is incomplete in {self.uri}: {_one_line(exc)}"
            ) from exc
        tmp = coll_dir / f".fetch-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in VERSION_FILES:
                expected = files.get(name)
                if expected is None:
                    raise IndexCorrupt(f"collection {collection!r}: version {version} lists no {name}")
                path = tmp / name
                self.client.download_file(self.bucket, self._key(collection, version, name), str(path))
                if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                    raise IndexCorrupt(f"collection {collection!r}: version {version}: {name} does not match its hash")
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "manifest.json").is_file():  # not another process's identical copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def install_version(remote: ObjectStorage, data_dir: Path, collection: str, version: str, keep: int = 2) -> bool:
    """Make `version` the live local copy (download, verify, swap CURRENT); False if it already was."""
    coll_dir = storage.collection_dir(data_dir, collection)
    if storage.read_pointer(coll_dir) == version and (coll_dir / version).is_dir():
        return False
    remote.download_version(collection, version, data_dir)
    storage.write_pointer(coll_dir, version)
    versions = sorted(p for p in coll_dir.iterdir() if p.is_dir() and p.name.startswith("v-"))
    for path in versions[:-keep]:
        if path.name != version:
            shutil.rmtree(path, ignore_errors=True)
    return True


class IndexSync:
    """Keeps a replica's local cache at the versions the database names live.

    `await start()` checks the bucket (StorageUnreachable), installs the live versions, then
    polls every `poll_interval_s` in a background task (off the request path). `aclose()` stops it.
    """

    def __init__(
        self,
        data_dir: Path,
        remote: ObjectStorage,
        repository: MetadataRepository,
        *,
        poll_interval_s: float = 5.0,
        owns_engine: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.remote = remote
        self.repository = repository
        self.poll_interval_s = poll_interval_s
        self._owns_engine = owns_engine
        self._task: asyncio.Task[None] | None = None
        self._failed: dict[tuple[str, str], str] = {}

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        storage_root: str,
        database_url: str,
        *,
        endpoint_url: str | None = None,
        poll_interval_s: float = 5.0,
    ) -> IndexSync:
        from retrieval.engine import async_url, create_engine

        engine = create_engine(async_url(database_url))
        return cls(
            data_dir,
            ObjectStorage(storage_root, endpoint_url),
            MetadataRepository(engine),
            poll_interval_s=poll_interval_s,
            owns_engine=True,
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.remote.check)
        await self.sync_once()
        self._task = asyncio.create_task(self._poll(), name="index-sync")

    async def sync_once(self) -> list[str]:
        """Install every live version not yet installed; returns the collections that changed."""
        changed: list[str] = []
        for collection, (version, _uri) in (await self.repository.current_versions()).items():
            try:
                if await asyncio.to_thread(install_version, self.remote, self.data_dir, collection, version):
                    changed.append(collection)
                    logger.info("collection %r: fetched %s from %s", collection, version, self.remote.uri)
                self._failed.pop((collection, version), None)
            except Exception as exc:  # keep the version we have; the next poll tries again
                reason = _one_line(exc)
                if self._failed.get((collection, version)) != reason:  # log once per version and reason
                    logger.warning("collection %r: version %s not fetched: %s", collection, version, reason)
                self._failed[(collection, version)] = reason
        return changed

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.sync_once()
            except Exception as exc:  # the database is down: try again at the next poll
                logger.warning("index sync: cannot read live versions: %s", _one_line(exc))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_engine:
            await self.repository.engine.dispose()
