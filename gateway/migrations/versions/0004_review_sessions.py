"""Reviewer sessions kept server-side, so sign-out and key revocation end them on every replica.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_review_sessions_key", "review_sessions", ["key_id"])
    op.create_index("ix_review_sessions_expires", "review_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_review_sessions_expires", table_name="review_sessions")
    op.drop_index("ix_review_sessions_key", table_name="review_sessions")
    op.drop_table("review_sessions")
