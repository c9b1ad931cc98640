"""Feedback rows carry the rated record's created_at, so the reviewer's lookups prune partitions.

Since 0010 `audit_records` is partitioned by month on PostgreSQL, keyed by (id, created_at) and
unique on (request_id, created_at). The review queue and the rating filter find the rated records
by `request_id` alone, so each candidate probed every monthly partition's index (at 500,000 rows
over 13 months, the queue took 618 ms against 145 ms on the plain table). With the record's
created_at beside its request id, the lookup is by (request_id, created_at) and PostgreSQL prunes
to one partition per candidate at run time.

`feedback.record_created_at` is nullable: the existing rows are filled here from the audit log
(one UPDATE ... FROM on PostgreSQL, a correlated subquery on SQLite); a row whose record is gone
(pruned, or never there) keeps NULL, and the review store looks such rows up by request_id as
before. New rows get it from `gateway.feedback`, which reads the record anyway to check its owner.
On SQLite (one table) the column is filled the same way but the lookup keeps `request_id`.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BACKFILL = {
    "postgresql": "UPDATE feedback AS f SET record_created_at = a.created_at FROM audit_records AS a "
    "WHERE a.request_id = f.request_id AND f.record_created_at IS NULL",
    "sqlite": "UPDATE feedback SET record_created_at = (SELECT a.created_at FROM audit_records AS a "
    "WHERE a.request_id = feedback.request_id ORDER BY a.id LIMIT 1) WHERE record_created_at IS NULL",
}


def upgrade() -> None:
    op.add_column("feedback", sa.Column("record_created_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(BACKFILL.get(op.get_bind().dialect.name, BACKFILL["sqlite"]))  # the subquery is standard SQL


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("record_created_at")
