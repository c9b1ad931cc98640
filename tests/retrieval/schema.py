"""The one place tests/retrieval create the rag_ tables directly (faster than Alembic's upgrade).

The package never creates tables: the gateway's migrations own the schema. `create_rag_tables`
has the shape of `Ingestor.open`'s `ensure_schema` hook (a URL in, called in a worker thread).
"""

from __future__ import annotations

import asyncio

from retrieval.db import metadata
from retrieval.engine import create_engine


async def create_rag_tables_async(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


def create_rag_tables(url: str) -> None:
    """Create the rag_ tables the code defines, where missing (idempotent)."""
    asyncio.run(create_rag_tables_async(url))
