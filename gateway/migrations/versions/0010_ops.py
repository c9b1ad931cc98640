"""Operations (issues 9, 11, 18): audit rollups, text search, eval-row marking.

Reserved in the migration chain so that parallel work keeps one linear history; the owner of
this revision fills it in (an empty upgrade is a no-op).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
