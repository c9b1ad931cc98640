"""`gateway db upgrade`: bring the database schema to the newest Alembic revision.

On PostgreSQL the upgrade holds an advisory lock (`MIGRATION_LOCK_KEY`), so replicas that start
together on one database migrate it one after the other instead of racing; SQLite needs none
(its writer lock serialises them, and it is not shared between machines).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from gateway.db import async_url, create_engine

MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_lock key of the schema upgrade: a constant, so every gateway process takes the same lock.
MIGRATION_LOCK_KEY = 0x6757_4D49_4752  # "gWMIGR"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply every pending migration (idempotent; safe to run at each start)."""
    command.upgrade(alembic_config(database_url), revision)


def is_current(database_url: str) -> bool:
    """Whether the database is at the newest revision (no migration pending). Runs its own event loop."""
    heads = set(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())

    async def current() -> set[str]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_heads()))
        finally:
            await engine.dispose()

    return asyncio.run(current()) == heads
