"""Eval rows marked in the audit log, end users' feedback on answers, collection access per key.

`audit_records.origin` is NULL for live traffic and "eval" for the rows that eval runs send
through the pipeline, so the review queue, usage, drift and metrics can leave them out (issue 18).
`feedback` holds end-user ratings sent to POST /v1/feedback (issue 16).
`api_keys.collections` (JSON list, NULL: all) limits which collections a key may search and whose
documents it may read; `api_keys.rag_sources` is the key's default for showing sources (issue 17).
`audit_rollups` holds the overview's pre-aggregated buckets (gateway.rollup, issue 9).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("origin", sa.String(16), nullable=True))
    op.create_index("ix_audit_records_origin_created", "audit_records", ["origin", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("collections", sa.Text(), nullable=True))
        batch.add_column(sa.Column("rag_sources", sa.String(16), nullable=True))
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "feedback",
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text()),
        sa.Column("categories_json", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_request_created", "feedback", ["request_id", "created_at"])
    op.create_index("ix_feedback_rating_created", "feedback", ["rating", "created_at"])
    key: list[sa.Column[Any]] = [
        sa.Column("size_s", sa.Integer(), primary_key=True),
        sa.Column("bucket_start", sa.BigInteger(), primary_key=True),
        sa.Column("origin", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("status", sa.String(32), primary_key=True),
        sa.Column("blocked_by", sa.String(64), primary_key=True),
        sa.Column("flagged_by", sa.String(200), primary_key=True),
    ]
    counts = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "latency_n"]
    op.create_table(
        "audit_rollups",
        *key,
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in counts),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("toxicity_n", sa.BigInteger(), nullable=False),
        sa.Column("toxicity_sum", sa.Float(), nullable=False),
        sa.Column("groundedness_n", sa.BigInteger(), nullable=False),
        sa.Column("groundedness_sum", sa.Float(), nullable=False),
        *(sa.Column(f"lat_{i:02d}", sa.BigInteger(), nullable=False) for i in range(18)),
        sa.PrimaryKeyConstraint(*(c.name for c in key), name="pk_audit_rollups"),
    )


def downgrade() -> None:
    op.drop_table("audit_rollups")
    op.drop_index("ix_feedback_rating_created", table_name="feedback")
    op.drop_index("ix_feedback_request_created", table_name="feedback")
    op.drop_table("feedback")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rag_sources")
        batch.drop_column("collections")
    op.drop_index("ix_audit_records_origin_created", table_name="audit_records")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("origin")
