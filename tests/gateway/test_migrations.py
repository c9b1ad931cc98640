"""The Alembic migrations build exactly the schema the code's Table definitions describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from gateway.db import metadata
from gateway.migrate import upgrade
from gateway.review_store import FTS_TABLE
from retrieval.db import metadata as retrieval_metadata


def test_migrations_match_the_table_definitions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            # SQLite's full-text index (migration 0011) is a virtual table and its shadow tables, which
            # no Table describes; they are checked in test_review_fts.
            context = MigrationContext.configure(
                conn, opts={"include_name": lambda name, kind, _: kind != "table" or not name.startswith(FTS_TABLE)}
            )
            differences = compare_metadata(context, [metadata, retrieval_metadata])
    finally:
        engine.dispose()
    assert differences == []


def test_review_sessions_migration_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from gateway.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "0003")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert "review_sessions" not in inspect(conn).get_table_names()
        upgrade(url)
        with engine.connect() as conn:
            assert "review_sessions" in inspect(conn).get_table_names()
    finally:
        engine.dispose()
