"""Feedback (issue 16): end-user ratings of logged requests.

Reserved in the migration chain so that parallel work keeps one linear history; the owner of
this revision fills it in (an empty upgrade is a no-op).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
