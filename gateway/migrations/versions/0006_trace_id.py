"""The W3C trace id of each audit record, so a reviewer can go from a record to its trace.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(32), nullable=True))
    op.create_index("ix_audit_records_trace_id", "audit_records", ["trace_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_trace_id", table_name="audit_records")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("trace_id")
