"""Rollout (issue 10): deployment and version columns on audit rows, stored config versions.

Every audit row says which deployment and backend model answered, which config, policy and index
versions were live, the gateway's version, and (for a shadow copy) the request it copies.
`config_versions` holds each applied configuration once; `config_events` every time one was
applied (the newest is the live one, which replicas poll).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("deployment", sa.String(64)),
    ("backend_model", sa.String(200)),
    ("shadow_of", sa.String(40)),
    ("config_version", sa.String(64)),
    ("policy_version", sa.String(64)),
    ("index_versions", sa.Text()),
    ("gateway_version", sa.String(32)),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))
    op.create_index("ix_audit_records_shadow_of", "audit_records", ["shadow_of"])
    op.create_table(
        "config_versions",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text()),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("policy_version", sa.String(64)),
    )
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "config_events",
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("host", sa.String(200)),
    )
    op.create_index("ix_config_events_applied", "config_events", ["applied_at"])


def downgrade() -> None:
    op.drop_index("ix_config_events_applied", table_name="config_events")
    op.drop_table("config_events")
    op.drop_table("config_versions")
    op.drop_index("ix_audit_records_shadow_of", table_name="audit_records")
    with op.batch_alter_table("audit_records") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
