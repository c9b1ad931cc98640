"""Chunk metadata in SQL (SQLAlchemy 2 Core, async drivers).

`metadata` holds the package's own tables (prefixed `rag_`) so the gateway's Alembic setup
can include it next to its own: `target_metadata = [gateway_metadata, retrieval.db.metadata]`.
The index folder carries what a search needs; SQL is the catalogue: which documents a
collection holds with which content hash, and their chunks, for operators and reports.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from retrieval.documents import Chunk, Document

metadata = MetaData()

rag_documents = Table(
    "rag_documents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("collection", String(64), nullable=False),
    Column("document_id", String(512), nullable=False),
    Column("title", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("format", String(16), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("chunking", String(128), nullable=False),
    Column("embedding_model", String(256), nullable=False),
    Column("chunk_count", Integer, nullable=False),
    Column("meta", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("collection", "document_id", name="uq_rag_documents_collection_document"),
)

rag_chunks = Table(
    "rag_chunks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("document_pk", Integer, ForeignKey("rag_documents.id", ondelete="CASCADE"), nullable=False),
    Column("collection", String(64), nullable=False),
    Column("chunk_id", String(600), nullable=False),
    Column("position", Integer, nullable=False),
    Column("heading_path", JSON, nullable=False),
    Column("text", Text, nullable=False),
    Column("token_count", Integer, nullable=False),
    Column("content_hash", String(64), nullable=False),
    UniqueConstraint("collection", "chunk_id", name="uq_rag_chunks_collection_chunk"),
    Index("ix_rag_chunks_document_pk", "document_pk"),
)


def default_database_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir) / 'gateway.db'}"


def normalise_database_url(url: str | URL) -> URL:
    """Use the async drivers: sqlite -> sqlite+aiosqlite, postgres(ql) -> postgresql+asyncpg."""
    parsed = make_url(str(url).replace("postgres://", "postgresql://", 1)) if isinstance(url, str) else url
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///PATH or postgresql://..."
    )


def create_engine(url: str | URL) -> AsyncEngine:
    """An async engine for `url` (normalised); SQLite gets foreign keys and a busy timeout."""
    normalised = normalise_database_url(url)
    if normalised.get_backend_name() == "sqlite":
        database = normalised.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(normalised, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(normalised, pool_pre_ping=True)


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


@dataclass(frozen=True)
class DocumentRow:
    collection: str
    document_id: str
    title: str
    source: str
    content_hash: str
    chunking: str
    embedding_model: str
    chunk_count: int
    updated_at: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MetadataRepository:
    """Reads and writes the rag_ tables; every write method runs in one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def documents(self, collection: str, document_ids: Iterable[str] | None = None) -> dict[str, DocumentRow]:
        query = select(rag_documents).where(rag_documents.c.collection == collection)
        ids = None if document_ids is None else list(document_ids)
        out: dict[str, DocumentRow] = {}
        async with self.engine.connect() as conn:
            # chunk the IN list: SQLite allows at most 32,766 parameters per statement
            batches = [None] if ids is None else [ids[i : i + 500] for i in range(0, len(ids), 500)]
            for batch in batches:
                q = query if batch is None else query.where(rag_documents.c.document_id.in_(batch))
                for row in (await conn.execute(q)).mappings():
                    out[row["document_id"]] = DocumentRow(
                        row["collection"],
                        row["document_id"],
                        row["title"],
                        row["source"],
                        row["content_hash"],
                        row["chunking"],
                        row["embedding_model"],
                        row["chunk_count"],
                        row["updated_at"],
                    )
        return out

    async def chunk_count(self, collection: str) -> int:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(func.count()).select_from(rag_chunks).where(rag_chunks.c.collection == collection)
            )
            return int(result.scalar_one())

    async def chunks(self, collection: str, document_id: str) -> list[dict[str, Any]]:
        query = (
            select(rag_chunks)
            .join(rag_documents, rag_chunks.c.document_pk == rag_documents.c.id)
            .where(rag_documents.c.collection == collection, rag_documents.c.document_id == document_id)
            .order_by(rag_chunks.c.position)
        )
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]

    async def replace_documents(
        self, collection: str, items: Sequence[tuple[Document, Sequence[Chunk]]], *, chunking: str, embedding_model: str
    ) -> None:
        """Insert or replace each document and all of its chunks."""
        if not items:
            return
        now = _now()
        async with self.engine.begin() as conn:
            await self._delete(conn, collection, [doc.id for doc, _ in items])
            for document, chunks in items:
                result = await conn.execute(
                    rag_documents.insert().values(
                        collection=collection,
                        document_id=document.id,
                        title=document.title,
                        source=document.source,
                        format=document.format,
                        content_hash=document.content_hash,
                        chunking=chunking,
                        embedding_model=embedding_model,
                        chunk_count=len(chunks),
                        meta=dict(document.metadata),
                        created_at=now,
                        updated_at=now,
                    )
                )
                assert result.inserted_primary_key is not None
                pk = result.inserted_primary_key[0]
                if chunks:
                    await conn.execute(
                        rag_chunks.insert(),
                        [
                            {
                                "document_pk": pk,
                                "collection": collection,
                                "chunk_id": c.chunk_id,
                                "position": c.position,
                                "heading_path": list(c.heading_path),
                                "text": c.text,
                                "token_count": c.token_count,
                                "content_hash": c.content_hash,
                            }
                            for c in chunks
                        ],
                    )

    async def delete_documents(self, collection: str, document_ids: Sequence[str]) -> int:
        """Delete the documents and their chunks; returns how many documents were deleted."""
        async with self.engine.begin() as conn:
            return await self._delete(conn, collection, document_ids)

    @staticmethod
    async def _delete(conn: AsyncConnection, collection: str, document_ids: Sequence[str]) -> int:
        deleted = 0
        ids = list(document_ids)
        for i in range(0, len(ids), 500):
            batch = ids[i : i + 500]
            pks = select(rag_documents.c.id).where(
                rag_documents.c.collection == collection, rag_documents.c.document_id.in_(batch)
            )
            # chunks first: not every SQLite connection has foreign keys (and so cascades) on
            await conn.execute(delete(rag_chunks).where(rag_chunks.c.document_pk.in_(pks)))
            result = await conn.execute(
                delete(rag_documents).where(
                    rag_documents.c.collection == collection, rag_documents.c.document_id.in_(batch)
                )
            )
            deleted += result.rowcount or 0
        return deleted
