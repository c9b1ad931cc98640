"""The SQL catalogue of the collections: the `rag_` tables and their repository (SQLAlchemy Core).

The index folder carries what a search needs; SQL is the catalogue: which documents a
collection holds with which content hash, and their chunks, for operators and reports.
The gateway's Alembic migrations own the schema (`target_metadata = [gateway_metadata,
retrieval.db.metadata]`); this module never creates tables. Engines come from
`retrieval.engine`, the project's one engine factory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
    func,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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

# The live version of each collection, for replicas that read the index files from shared
# storage (object storage): they poll this table and fetch a version when it changes.
rag_collection_versions = Table(
    "rag_collection_versions",
    metadata,
    Column("collection", String(64), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("storage_uri", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


async def missing_tables(engine: AsyncEngine) -> list[str]:
    """The `rag_` tables the database lacks (empty when its schema is up to date for retrieval)."""
    async with engine.connect() as conn:
        present = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    return sorted(set(metadata.tables) - present)


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

    async def current_versions(self) -> dict[str, tuple[str, str]]:
        """collection -> (live version, storage URI of the folder that holds it)."""
        table = rag_collection_versions
        query = select(table.c.collection, table.c.version, table.c.storage_uri)
        async with self.engine.connect() as conn:
            return {row[0]: (row[1], row[2]) for row in await conn.execute(query)}

    async def publish_version(
        self, collection: str, version: str, storage_uri: str, *, replaces: str | None, force: bool = False
    ) -> bool:
        """Make `version` the live one, if the live one is still `replaces` (None: no row yet).

        A compare-and-set: False means another writer published in between (nothing changed).
        `force` records it whatever the row held (local storage, where a file lock serialises writers).
        """
        table = rag_collection_versions
        values = {"version": version, "storage_uri": storage_uri, "created_at": _now()}
        async with self.engine.begin() as conn:
            if force:
                result = await conn.execute(table.update().where(table.c.collection == collection).values(**values))
                if not result.rowcount:
                    await conn.execute(table.insert().values(collection=collection, **values))
                return True
            if replaces is None:
                exists = await conn.execute(select(table.c.version).where(table.c.collection == collection))
                if exists.first() is not None:
                    return False
                await conn.execute(table.insert().values(collection=collection, **values))
                return True
            result = await conn.execute(
                table.update().where(table.c.collection == collection, table.c.version == replaces).values(**values)
            )
            return (result.rowcount or 0) == 1

    async def drop_version(self, collection: str) -> None:
        async with self.engine.begin() as conn:
            table = rag_collection_versions
            await conn.execute(delete(table).where(table.c.collection == collection))

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
