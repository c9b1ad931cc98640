"""Where audit batches go: one small async seam, `write(rows)`, with two implementations.

- `SQLiteSink`: one dedicated thread holding one raw `sqlite3` connection. A batch is one
  `executemany` and one COMMIT: about 0.2 ms, against about 2 ms through SQLAlchemy's async
  layer over aiosqlite, which matters because every request waits for its commit. The INSERT
  is generated from the `audit_records` Table and values pass through SQLAlchemy's own SQLite
  bind processors, so rows read back through SQLAlchemy exactly as if it had written them.
- `EngineSink`: any SQLAlchemy async engine (PostgreSQL through asyncpg).

`is_refusal(exc)` tells the two kinds of failure apart: the database refused these rows (bad
data: retrying cannot help, the rows must be fixed or set aside) or it could not be reached
(down, locked, out of connections: retry, then spool).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from sqlalchemy import Table, exc
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

# SQLSTATE classes that mean "this data", not "this database": 22 data exception, 23 constraint violation.
_REFUSED_SQLSTATE_CLASSES = ("22", "23")
_REFUSED_TYPES: tuple[type[BaseException], ...] = (
    ValueError,  # includes UnicodeError, and asyncpg's client-side DataError ("invalid input for query argument")
    TypeError,  # a value of a type the driver cannot bind
    OverflowError,  # sqlite3: "Python int too large to convert to SQLite INTEGER"
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,  # sqlite3: "Error binding parameter N: type 'dict' is not supported"
    sqlite3.InterfaceError,
    exc.DataError,
    exc.IntegrityError,
)


def is_refusal(error: BaseException) -> bool:
    """True when the database refused the rows themselves; False when it was unreachable or unwell.

    Anything not recognised as a refusal counts as unreachable, so an unknown failure spools rows
    (kept, and retried later) instead of setting them aside."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return sqlstate[:2] in _REFUSED_SQLSTATE_CLASSES
        if isinstance(current, sqlite3.OperationalError):
            return False  # locked, busy, disk I/O, no such table
        if isinstance(current, _REFUSED_TYPES):
            return True
        seen += 1
        # Only explicit links (SQLAlchemy's `orig`, `raise ... from`): an error raised while another
        # was being handled is not caused by it.
        current = getattr(current, "orig", None) or current.__cause__
    return False


class AuditSink(Protocol):
    """Stores a batch of audit rows in one transaction; raises if it could not."""

    async def write(self, rows: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


class EngineSink:
    """A batch is one INSERT ... VALUES executemany in one transaction on the async engine."""

    def __init__(self, engine: AsyncEngine, table: Table) -> None:
        self._engine = engine
        self._insert = table.insert()

    async def write(self, rows: list[dict[str, Any]]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(self._insert, rows)

    async def close(self) -> None:
        return None


class SQLiteSink:
    """A batch is one executemany + COMMIT on a raw sqlite3 connection in a dedicated thread."""

    def __init__(self, path: str, table: Table, *, synchronous: str = "NORMAL", wait_s: float = 2.0) -> None:
        self._path = path
        self._synchronous = synchronous
        self._wait_s = wait_s  # how long a write waits for another connection's lock before it fails
        self._columns = [c.name for c in table.columns if not (c.primary_key and c.autoincrement)]
        placeholders = ", ".join("?" for _ in self._columns)
        self._sql = f"INSERT INTO {table.name} ({', '.join(self._columns)}) VALUES ({placeholders})"
        dialect = SQLiteDialect_pysqlite()
        self._processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type.bind_processor(dialect) for name in self._columns
        ]
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")
        self._connection: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str, table: Table, *, synchronous: str = "NORMAL", wait_s: float = 2.0) -> SQLiteSink:
        database = make_url(url).database
        if not database or database == ":memory:":
            raise ValueError("the SQLite audit sink needs a database file")
        return cls(database, table, synchronous=synchronous, wait_s=wait_s)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(
                self._path, timeout=self._wait_s, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
            connection.execute(f"PRAGMA busy_timeout={int(self._wait_s * 1000)}")
            self._connection = connection
        return self._connection

    def _write(self, rows: list[dict[str, Any]]) -> None:
        processors = list(zip(self._columns, self._processors, strict=True))
        values = [
            tuple(process(row.get(name)) if process else row.get(name) for name, process in processors) for row in rows
        ]
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(self._sql, values)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    async def write(self, rows: list[dict[str, Any]]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)

    async def close(self) -> None:
        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=True)


def sink_for(
    engine: AsyncEngine, table: Table, *, sqlite_synchronous: str = "NORMAL", wait_s: float = 2.0
) -> AuditSink:
    """The fastest sink for the engine's database; a SQLite write waits `wait_s` at most for a lock."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            return SQLiteSink(database, table, synchronous=sqlite_synchronous, wait_s=wait_s)
    return EngineSink(engine, table)
