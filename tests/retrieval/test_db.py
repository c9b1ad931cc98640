from __future__ import annotations

import uuid

import pytest
from sqlalchemy import inspect, text

from retrieval.db import MetadataRepository, metadata
from retrieval.documents import Chunk
from retrieval.embedders import HashingEmbedder
from retrieval.engine import async_url, create_engine, normalise_database_url
from retrieval.errors import SchemaMissing
from retrieval.ingest import Ingestor
from tests.retrieval.conftest import make_doc
from tests.retrieval.schema import create_rag_tables_async


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///data/gateway.db", "sqlite+aiosqlite:///data/gateway.db"),
        ("sqlite+aiosqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
        ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:***@h:5432/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_urls_are_normalised_to_async_drivers(given: str, expected: str) -> None:
    assert str(normalise_database_url(given)) == expected


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL") as caught:
        normalise_database_url("mysql://u:secret@h/db")
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match="cannot parse database URL"):
        async_url("postgresql://u@h:notaport/db")


def test_async_url_keeps_the_password_for_the_driver() -> None:
    assert async_url("postgres://u:p%40ss@h/db") == "postgresql+asyncpg://u:p%40ss@h/db"


async def test_sqlite_connections_get_the_shared_pragmas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(f"sqlite:///{tmp_path / 'deep' / 'p.db'}", sqlite_synchronous="full")
    try:
        async with engine.connect() as conn:
            got = {
                name: (await conn.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
    finally:
        await engine.dispose()
    assert got == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000, "foreign_keys": 1}
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        create_engine("sqlite:///x.db", sqlite_synchronous="SOMETIMES")


def test_the_gateway_uses_this_one_factory() -> None:
    import gateway.db
    import retrieval.engine

    assert gateway.db.create_engine is retrieval.engine.create_engine
    assert gateway.db.async_url is retrieval.engine.async_url


async def test_ingestor_refuses_a_database_without_the_schema(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SchemaMissing, match="gateway db upgrade") as caught:
        await Ingestor.open(tmp_path, None, HashingEmbedder(64))
    assert caught.value.tables == ["rag_chunks", "rag_documents"]


async def test_ingestor_brings_the_schema_up_through_alembic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A batch ingest against a fresh database: the hook is the same upgrade `gateway db upgrade` runs."""
    from gateway.migrate import upgrade

    async with await Ingestor.open(tmp_path, None, HashingEmbedder(64), ensure_schema=upgrade) as ingestor:
        report = await ingestor.ingest_documents("kb", [make_doc("a", "alpha text")])
        async with ingestor.repository.engine.connect() as conn:
            revision = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert report.ingested == 1 and revision


def test_tables_are_prefixed() -> None:
    assert sorted(metadata.tables) == ["rag_chunks", "rag_collection_versions", "rag_documents"]


def _chunks(doc_id: str, texts: list[str]) -> list[Chunk]:
    return [Chunk(doc_id, f"{doc_id}#{i}", i, t, doc_id, "src", ("H",), len(t.split())) for i, t in enumerate(texts)]


async def _exercise(url: str, collection: str) -> None:
    engine = create_engine(url)
    try:
        await create_rag_tables_async(url)
        await create_rag_tables_async(url)  # idempotent
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert {"rag_documents", "rag_chunks"} <= set(names)
        repo = MetadataRepository(engine)
        a, b = make_doc("a", "alpha text"), make_doc("b", "beta text")
        await repo.replace_documents(
            collection,
            [(a, _chunks("a", ["one", "two"])), (b, _chunks("b", ["three"]))],
            chunking="v1:test",
            embedding_model="fake",
        )
        rows = await repo.documents(collection)
        assert set(rows) == {"a", "b"} and rows["a"].content_hash == a.content_hash
        assert rows["a"].chunk_count == 2
        assert await repo.chunk_count(collection) == 3
        # replacing a document replaces its chunks
        a2 = make_doc("a", "alpha text, changed")
        await repo.replace_documents(
            collection, [(a2, _chunks("a", ["only"]))], chunking="v1:test", embedding_model="fake"
        )
        assert [c["text"] for c in await repo.chunks(collection, "a")] == ["only"]
        assert (await repo.documents(collection, ["a"]))["a"].content_hash == a2.content_hash
        assert await repo.delete_documents(collection, ["a", "missing"]) == 1
        assert set(await repo.documents(collection)) == {"b"}
        assert await repo.chunk_count(collection) == 1
        await repo.delete_documents(collection, ["b"])
    finally:
        await engine.dispose()


async def test_metadata_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    await _exercise(f"sqlite:///{tmp_path / 'nested' / 'meta.db'}", "kb")


@pytest.mark.postgres
async def test_metadata_on_postgres() -> None:
    import asyncpg

    user = None
    for candidate in ("root", "postgres"):
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=5432, user=candidate, database="test")
        except (OSError, asyncpg.PostgresError):
            continue
        await conn.close()
        user = candidate
        break
    if user is None:
        pytest.fail("PostgreSQL at 127.0.0.1:5432 (database 'test') is not reachable")
    # a unique collection name keeps concurrent runs on the shared database apart
    await _exercise(f"postgresql://{user}@127.0.0.1:5432/test", f"test-{uuid.uuid4().hex[:8]}")
