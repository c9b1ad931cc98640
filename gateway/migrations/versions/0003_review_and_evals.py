"""Reviewer labels, eval runs and eval items.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "review_labels",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("note", sa.Text()),
        sa.Column("reviewer", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_labels_request", "review_labels", ["request_id", "created_at"])
    op.create_index("ix_review_labels_label_created", "review_labels", ["label", "created_at"])
    op.create_table(
        "eval_runs",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics_json", sa.Text()),
        sa.Column("comparison_json", sa.Text()),
        sa.Column("report_path", sa.Text()),
        sa.Column("config_json", sa.Text()),
    )
    op.create_index("ix_eval_runs_kind_name_started", "eval_runs", ["kind", "name", "started_at"])
    op.create_table(
        "eval_items",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", _BigId, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(40)),
        sa.Column("input_json", sa.Text(), nullable=False),
        sa.Column("output_text", sa.Text()),
        sa.Column("scores_json", sa.Text()),
        sa.Column("passed", sa.Boolean()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_eval_items_run", "eval_items", ["run_id", "position"])
    # Reviewers filter on these; 0001 indexed status/model/key already.
    op.create_index("ix_audit_records_blocked_created", "audit_records", ["blocked_by", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_blocked_created", table_name="audit_records")
    op.drop_index("ix_eval_items_run", table_name="eval_items")
    op.drop_table("eval_items")
    op.drop_index("ix_eval_runs_kind_name_started", table_name="eval_runs")
    op.drop_table("eval_runs")
    op.drop_index("ix_review_labels_label_created", table_name="review_labels")
    op.drop_index("ix_review_labels_request", table_name="review_labels")
    op.drop_table("review_labels")
