"""RAG chunk metadata (rag_documents, rag_chunks) and a default collection per API key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database where `retrieval` created these tables itself (create_all) already has them.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "rag_documents" not in existing:
        _create_rag_tables()
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("default_collection", sa.String(64)))


def _create_rag_tables() -> None:
    op.create_table(
        "rag_documents",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("collection", sa.String(64), nullable=False),
        sa.Column("document_id", sa.String(512), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("chunking", sa.String(128), nullable=False),
        sa.Column("embedding_model", sa.String(256), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("collection", "document_id", name="uq_rag_documents_collection_document"),
    )
    op.create_table(
        "rag_chunks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("document_pk", sa.Integer(), sa.ForeignKey("rag_documents.id", ondelete="CASCADE"), nullable=False),
        sa.Column("collection", sa.String(64), nullable=False),
        sa.Column("chunk_id", sa.String(600), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("heading_path", sa.JSON(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("collection", "chunk_id", name="uq_rag_chunks_collection_chunk"),
    )
    op.create_index("ix_rag_chunks_document_pk", "rag_chunks", ["document_pk"])


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("default_collection")
    op.drop_index("ix_rag_chunks_document_pk", table_name="rag_chunks")
    op.drop_table("rag_chunks")
    op.drop_table("rag_documents")
