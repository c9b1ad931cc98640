from __future__ import annotations

import uuid

import pytest
from sqlalchemy import inspect

from retrieval.db import MetadataRepository, create_engine, create_tables, metadata, normalise_database_url
from retrieval.documents import Chunk
from tests.retrieval.conftest import make_doc


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
    with pytest.raises(ValueError, match="unsupported database URL"):
        normalise_database_url("mysql://u@h/db")


def test_tables_are_prefixed() -> None:
    assert sorted(metadata.tables) == ["rag_chunks", "rag_documents"]


def _chunks(doc_id: str, texts: list[str]) -> list[Chunk]:
    return [Chunk(doc_id, f"{doc_id}#{i}", i, t, doc_id, "src", ("H",), len(t.split())) for i, t in enumerate(texts)]


async def _exercise(url: str, collection: str) -> None:
    engine = create_engine(url)
    try:
        await create_tables(engine)
        await create_tables(engine)  # idempotent
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
