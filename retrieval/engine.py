"""The project's one SQL engine factory: URL rules and connection settings, SQLite or PostgreSQL.

The gateway (audit log, keys, reviews) and retrieval (the `rag_` catalogue) open the same
database, so they open it the same way. It lives here because dependencies point one way:
`gateway.db` re-exports `async_url` and `create_engine`; retrieval never imports the gateway.

* URLs: `sqlite:///`, `sqlite+aiosqlite:///`, `postgresql://`, `postgres://`, `postgresql+<any>://`
  are normalised to the async drivers (aiosqlite, asyncpg); anything else is a ValueError.
* SQLite: WAL (readers never wait for the writer), `synchronous` as chosen (NORMAL by default:
  durable at each checkpoint, not each commit), a 30 s busy timeout, foreign keys on (so
  `rag_chunks` rows follow their document); the database's folder is created.
* PostgreSQL: a pool of `pool_size` connections plus as many overflow, checked before use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
SQLITE_BUSY_TIMEOUT_S = 30


def default_database_url(data_dir: Path) -> str:
    """SQLite at DATA_DIR/gateway.db: the database when none is configured."""
    return f"sqlite+aiosqlite:///{Path(data_dir) / 'gateway.db'}"


def normalise_database_url(url: str | URL) -> URL:
    """Use the async drivers: sqlite -> sqlite+aiosqlite, postgres(ql) -> postgresql+asyncpg."""
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = make_url(url)
        except Exception as exc:  # SQLAlchemy raises ArgumentError, and ValueError for bad ports
            raise ValueError(f"cannot parse database URL {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in {"postgresql", "postgres"}:
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r} ({backend}): "
        "use sqlite:///PATH or postgresql://..."
    )


def async_url(url: str | URL) -> str:
    """`normalise_database_url` as a string, password included (for engines and Alembic)."""
    return normalise_database_url(url).render_as_string(hide_password=False)


def create_engine(
    url: str | URL,
    *,
    sqlite_synchronous: str = "NORMAL",
    pool_size: int = 10,
    sqlite_foreign_keys: bool = True,
) -> AsyncEngine:
    """An async engine for `url` (normalised), with the settings in the module docstring.

    `sqlite_foreign_keys=False` is for schema migrations: SQLite's batch ALTER copies and drops
    tables, and with foreign keys on, dropping a parent table would cascade into its children.
    """
    normalised = normalise_database_url(url)
    if normalised.get_backend_name() != "sqlite":
        return create_async_engine(normalised, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    synchronous = sqlite_synchronous.upper()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(
            f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, got {sqlite_synchronous!r}"
        )
    database = normalised.database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(normalised, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    pragmas = (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}",
        f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}",
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(pragma)
        cursor.close()

    return engine
