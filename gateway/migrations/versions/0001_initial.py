"""Audit records and API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(40)),
        sa.Column("endpoint", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("backend", sa.String(300)),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("request_json", sa.Text()),
        sa.Column("response_text", sa.Text()),
        sa.Column("response_json", sa.Text()),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("total_tokens", sa.Integer()),
        sa.Column("gateway_ms", sa.Float()),
        sa.Column("backend_ms", sa.Float()),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("total_ms", sa.Float()),
        sa.Column("client_ip", sa.String(64)),
        sa.Column("passages_json", sa.Text()),
        sa.Column("citations_json", sa.Text()),
        sa.Column("guards_json", sa.Text()),
        sa.Column("blocked_by", sa.String(64)),
        sa.Column("flagged_by", sa.String(200)),
        sa.Column("groundedness", sa.Float()),
        sa.Column("toxicity", sa.Float()),
        sa.PrimaryKeyConstraint("id", name="pk_audit_records"),
        sa.UniqueConstraint("request_id", name="uq_audit_records_request_id"),
    )
    op.create_index("ix_audit_records_created_at", "audit_records", ["created_at"])
    op.create_index("ix_audit_records_status_created", "audit_records", ["status", "created_at"])
    op.create_index("ix_audit_records_model_created", "audit_records", ["model", "created_at"])
    op.create_index("ix_audit_records_key_created", "audit_records", ["api_key_id", "created_at"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_audit_records_key_created", table_name="audit_records")
    op.drop_index("ix_audit_records_model_created", table_name="audit_records")
    op.drop_index("ix_audit_records_status_created", table_name="audit_records")
    op.drop_index("ix_audit_records_created_at", table_name="audit_records")
    op.drop_table("audit_records")
