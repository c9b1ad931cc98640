"""Per-key limits on api_keys: requests and tokens per minute, concurrency, daily and monthly token quotas.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("rpm", sa.Integer),
    ("tpm", sa.BigInteger),
    ("max_concurrent", sa.Integer),
    ("tokens_per_day", sa.BigInteger),
    ("tokens_per_month", sa.BigInteger),
)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
