"""Alembic environment: runs the gateway's migrations over its async engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from gateway.db import create_engine, metadata
from gateway.migrate import MIGRATION_LOCK_KEY
from retrieval.db import metadata as retrieval_metadata

config = context.config
target_metadata = [metadata, retrieval_metadata]


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together on a fresh database would each create the same tables; the
        # first to take this lock migrates, the others wait and then find the schema at its head.
        # Session-level: held across the migration's own transaction, released on the way out.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()
        try:
            _migrate(connection)
        finally:
            connection.rollback()  # an aborted transaction would refuse the unlock
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
        return
    _migrate(connection)


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # foreign keys off: SQLite's batch ALTER drops and re-creates tables, which would cascade
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
