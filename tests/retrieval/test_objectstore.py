"""Collections on object storage: an S3-compatible server (moto, in server mode) started here.

Replicas (a CollectionStore over a local cache, kept current by an IndexSync) share one SQLite
database and one bucket; ingest runs as a separate batch job with its own empty cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.importorskip("boto3")
if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("moto_server is not installed (pip install 'moto[server]')", allow_module_level=True)

from retrieval import CollectionStore
from retrieval.cli import IngestTarget, run_ingest
from retrieval.db import MetadataRepository
from retrieval.engine import async_url, create_engine
from retrieval.errors import IndexCorrupt, StorageUnreachable, UnknownCollection
from retrieval.ingest import Ingestor
from retrieval.objectstore import COMPLETE, IndexSync, ObjectStorage, install_version
from tests.helpers import PG_ADMIN, throwaway_postgres

from .conftest import make_doc
from .s3server import _free_port, s3_endpoint_fixture, s3_root_fixture  # noqa: F401 - fixtures
from .schema import create_rag_tables

# botocore still calls datetime.utcnow() on some paths; only that warning is let through
pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")


@pytest.fixture
def shared_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    create_rag_tables(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def replica_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The database the replicas and the ingest job share: SQLite, and PostgreSQL where it runs."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        create_rag_tables(url)
        yield url
        return
    with throwaway_postgres("rag_sync") as name:
        url = f"{PG_ADMIN}/{name}"
        create_rag_tables(url)
        yield url


async def _ingest(tmp: Path, db: str, root: str, endpoint: str, embedder, docs) -> str:  # type: ignore[no-untyped-def]
    """One batch job: its own empty cache folder, as on a machine that runs no gateway."""
    ingestor = await Ingestor.open(
        tmp / f"job-{uuid.uuid4().hex[:6]}", db, embedder, index_storage=root, endpoint_url=endpoint
    )
    async with ingestor:
        report = await ingestor.ingest_documents("handbook", docs)
    assert report.version is not None
    return report.version


class _Replica:
    def __init__(self, cache: Path, db: str, root: str, endpoint: str, embedder, poll: float) -> None:  # type: ignore[no-untyped-def]
        self.cache, self.db, self.root, self.endpoint = cache, db, root, endpoint
        self.embedder, self.poll = embedder, poll

    async def __aenter__(self) -> CollectionStore:
        self.sync = await IndexSync.open(
            self.cache, self.root, self.db, endpoint_url=self.endpoint, poll_interval_s=self.poll
        )
        await self.sync.start()
        self.store = CollectionStore(self.cache, self.embedder, check_interval_s=0.05)
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        await self.store.aclose()
        await self.sync.aclose()


@contextlib.asynccontextmanager
async def _two_replicas(tmp_path, db, root, endpoint, embedder) -> AsyncIterator[list[CollectionStore]]:  # type: ignore[no-untyped-def]
    """Two replicas polling every 0.2 s (entered in the test's own event loop, where they must poll)."""
    one = _Replica(tmp_path / "replica-a", db, root, endpoint, embedder, poll=0.2)
    two = _Replica(tmp_path / "replica-b", db, root, endpoint, embedder, poll=0.2)
    async with one as a, two as b:
        yield [a, b]


async def _wait_for_version(store: CollectionStore, version: str, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        try:
            if (await store.search_detailed("handbook", "anything", top_k=1)).version == version:
                return time.monotonic() - started
        except UnknownCollection:  # not there yet: before the first fetch
            pass
        await asyncio.sleep(0.02)
    raise AssertionError(f"version {version} not served within {within_s} s")


async def test_every_replica_serves_a_new_version_within_the_poll_interval(  # type: ignore[no-untyped-def]
    tmp_path, replica_db, s3_root, s3_endpoint, embedder
) -> None:
    async with _two_replicas(tmp_path, replica_db, s3_root, s3_endpoint, embedder) as replicas:
        first = await _ingest(
            tmp_path, replica_db, s3_root, s3_endpoint, embedder, [make_doc("a.md", "The warranty lasts two years.")]
        )
        for store in replicas:
            await _wait_for_version(store, first, within_s=3)

        # a second batch job, again with an empty cache: it starts from the live version in the bucket
        second = await _ingest(
            tmp_path, replica_db, s3_root, s3_endpoint, embedder, [make_doc("b.md", "Refunds take ten days.")]
        )
        assert second != first
        waited = [await _wait_for_version(store, second, within_s=3) for store in replicas]
        assert max(waited) < 1.0  # poll every 0.2 s + download + the store's 0.05 s check
        for store in replicas:
            hits = await store.search("handbook", "Refunds take ten days.", top_k=2)
            assert {h.document_id for h in hits} == {"a.md", "b.md"}  # incremental: a.md kept from the first version
            assert hits[0].document_id == "b.md"


async def test_a_version_without_its_complete_file_is_never_picked_up(  # type: ignore[no-untyped-def]
    tmp_path, shared_db, s3_root, s3_endpoint, embedder
) -> None:
    async with _two_replicas(tmp_path, shared_db, s3_root, s3_endpoint, embedder) as replicas:
        good = await _ingest(tmp_path, shared_db, s3_root, s3_endpoint, embedder, [make_doc("a.md", "Old text.")])
        for store in replicas:
            await _wait_for_version(store, good, within_s=3)
        # a writer that died after its data files but before COMPLETE.json, yet named it live
        remote = ObjectStorage(s3_root, s3_endpoint)
        partial = "v-99999999999999999999-deadbeef"
        for name in ("index.faiss", "vectors.npy", "chunks.json", "manifest.json"):
            remote.client.copy_object(
                Bucket=remote.bucket,
                Key=remote._key("handbook", partial, name),
                CopySource={"Bucket": remote.bucket, "Key": remote._key("handbook", good, name)},
            )
        engine = create_engine(async_url(shared_db))
        try:
            assert await MetadataRepository(engine).publish_version("handbook", partial, "s3://x/", replaces=good)
        finally:
            await engine.dispose()
        await asyncio.sleep(1.0)  # five polls
        for store in replicas:
            assert (await store.search_detailed("handbook", "Old text.")).version == good
        cache = tmp_path / "replica-c"
        with pytest.raises(IndexCorrupt, match="incomplete"):
            install_version(remote, cache, "handbook", partial)
        assert not (cache / "indexes" / "handbook" / "CURRENT").exists()
        assert not any((cache / "indexes" / "handbook").iterdir())  # no partial folder left behind


async def test_a_file_that_does_not_match_its_hash_is_refused(  # type: ignore[no-untyped-def]
    tmp_path, shared_db, s3_root, s3_endpoint, embedder
) -> None:
    version = await _ingest(tmp_path, shared_db, s3_root, s3_endpoint, embedder, [make_doc("a.md", "Some text.")])
    remote = ObjectStorage(s3_root, s3_endpoint)
    remote.client.put_object(Bucket=remote.bucket, Key=remote._key("handbook", version, "chunks.json"), Body=b"{}")
    with pytest.raises(IndexCorrupt, match=r"chunks\.json does not match"):
        install_version(remote, tmp_path / "cache", "handbook", version)
    assert not (tmp_path / "cache" / "indexes" / "handbook" / version).exists()


async def test_publishing_is_a_compare_and_set(shared_db) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(async_url(shared_db))
    repo = MetadataRepository(engine)
    try:
        assert await repo.publish_version("c", "v-1", "s3://b/c/v-1/", replaces=None)
        assert not await repo.publish_version("c", "v-2", "s3://b/c/v-2/", replaces=None)  # someone was first
        assert await repo.publish_version("c", "v-2", "s3://b/c/v-2/", replaces="v-1")
        assert not await repo.publish_version("c", "v-3", "s3://b/c/v-3/", replaces="v-1")  # stale base
        assert await repo.current_versions() == {"c": ("v-2", "s3://b/c/v-2/")}
    finally:
        await engine.dispose()


async def test_an_unreachable_storage_root_is_one_clear_error(tmp_path, shared_db, embedder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(StorageUnreachable, match=r"index storage s3://nowhere/idx \(endpoint http://127"):
        await Ingestor.open(tmp_path, shared_db, embedder, index_storage="s3://nowhere/idx", endpoint_url=dead)
    sync = await IndexSync.open(tmp_path, "s3://nowhere/idx", shared_db, endpoint_url=dead)
    try:
        with pytest.raises(StorageUnreachable) as caught:
            await sync.start()
        assert "\n" not in str(caught.value)
    finally:
        await sync.aclose()


def test_the_ingest_command_writes_to_object_storage(tmp_path, shared_db, s3_root, s3_endpoint, capsys) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Warranty\n\nThe warranty lasts two years.\n")
    args = argparse.Namespace(
        paths=[str(docs)],
        collection="handbook",
        delete=False,
        chunk_tokens=160,
        overlap_tokens=32,
        index_type="auto",
        embedding_model="hashing",
        json=True,
        no_progress=True,
    )
    target = IngestTarget(tmp_path / "job", shared_db, "hashing", index_storage=s3_root, s3_endpoint_url=s3_endpoint)
    assert run_ingest(args, target) == 0
    version = json.loads(capsys.readouterr().out)["version"]
    remote = ObjectStorage(s3_root, s3_endpoint)
    listed = remote.client.list_objects_v2(Bucket=remote.bucket, Prefix=remote._key("handbook", version, ""))
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {
        "index.faiss",
        "vectors.npy",
        "chunks.json",
        "manifest.json",
        COMPLETE,
    }

    dead = IngestTarget(tmp_path / "job2", shared_db, "hashing", index_storage="s3://gone/x",
                        s3_endpoint_url=f"http://127.0.0.1:{_free_port()}")  # fmt: skip
    assert run_ingest(args, dead) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gateway ingest: index storage s3://gone/x") and "\n" not in err


def test_gateway_ingest_runs_as_a_batch_job_against_object_storage(  # type: ignore[no-untyped-def]
    tmp_path, s3_root, s3_endpoint, monkeypatch, capsys
) -> None:
    """`gateway ingest` on a machine with no gateway: a database URL, a bucket, an empty data dir."""
    from gateway.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Warranty\n\nThe warranty lasts two years.\n")
    monkeypatch.setenv("GATEWAY_S3_ENDPOINT_URL", s3_endpoint)
    database = f"sqlite:///{tmp_path / 'fresh.db'}"  # never touched by a gateway: the command migrates it
    argv = ["ingest", str(docs), "--collection", "handbook", "--embedding-model", "hashing", "--json"]
    argv += ["--no-progress", "--index-storage", s3_root, "--data-dir", str(tmp_path / "job"), "--database", database]
    assert main(argv) == 0
    version = json.loads(capsys.readouterr().out)["version"]
    engine_url = async_url(database)

    async def live() -> dict[str, tuple[str, str]]:
        engine = create_engine(engine_url)
        try:
            return await MetadataRepository(engine).current_versions()
        finally:
            await engine.dispose()

    remote = ObjectStorage(s3_root, s3_endpoint)
    assert asyncio.run(live()) == {"handbook": (version, remote.version_uri("handbook", version))}


def test_serve_with_an_unreachable_bucket_is_one_line_and_exit_1(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    dead = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(root), "GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_LOG_LEVEL": "warning"}
    env |= {"GATEWAY_INDEX_STORAGE": "s3://nowhere/idx", "GATEWAY_S3_ENDPOINT_URL": dead, "GATEWAY_METRICS": "off"}
    env |= {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", "http://127.0.0.1:9"]
    command += ["--port", str(_free_port())]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.decode().strip().splitlines()
    assert line.startswith(f"gateway: index storage s3://nowhere/idx (endpoint {dead}) is unreachable: ")
