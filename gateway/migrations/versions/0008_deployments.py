"""Rollout (issue 10): deployment and version columns on audit rows, stored config versions.

Reserved in the migration chain so that parallel work keeps one linear history; the owner of
this revision fills it in (an empty upgrade is a no-op).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
