"""`gateway db maintain`: the monthly partitions of the PostgreSQL audit table (migration 0010).

Three steps, each idempotent, each in short transactions of its own:

1. **Drain the default partition.** A row whose month has no partition yet (a far-future clock,
   a spool replayed after its month was dropped, maintenance that did not run) lands in
   `audit_records_default`. For each such month: the rows move to a temporary table, a partition
   for the month (or the part of it no partition covers) is attached, and the rows go back
   through the parent into it; one transaction that holds the default partition's writers off.
2. **Create partitions ahead**: this month and `months_ahead` more, so live writes never reach
   the default partition. A new partition is a `CREATE TABLE ... (LIKE audit_records)` and an
   `ATTACH PARTITION`, which takes only a SHARE UPDATE EXCLUSIVE lock on the parent: reads and
   the audit writer's inserts go on meanwhile.
3. **Retention** (`retention_days`): every partition that ends before the cutoff is DETACHed,
   optionally written to `ARCHIVE/<partition>.jsonl` (records with their labels, like `gateway db
   prune --archive`), its labels deleted, and the table DROPped: the cost of a drop does not grow
   with its rows, where `gateway db prune` deletes row by row. The overview's rollups of the
   dropped range go first (`gateway.rollup.prune_rollups`), as `gateway db prune` does.
   A detach that was not followed by its drop (an interrupted run) is finished by the next run;
   an archive file is written under a temporary name and renamed, so it is never written twice.

Replicas or cron jobs running this at the same time take turns on an advisory lock; every DDL
waits at most `LOCK_TIMEOUT` for its lock (a long reviewer query holding the table makes the step
fail with a clear message instead of stalling the audit writes queued behind it). Months are UTC.
SQLite has no partitions: `db prune` is its retention tool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.db import audit_records
from gateway.periodic import PeriodicTask
from gateway.rollup import prune_rollups

log = logging.getLogger("gateway")
TABLE = audit_records.name
DEFAULT = f"{TABLE}_default"
MONTHS_AHEAD = 3  # the migration creates as many
LOCK_TIMEOUT = "10s"
MAINTAIN_LOCK_KEY = 0x6757_5041_5254  # pg_advisory_xact_lock key: "gWPART"
_ARCHIVE_BATCH = 5000
_BOUND = re.compile(r"FOR VALUES FROM \((.+)\) TO \((.+)\)")
_OWN_TABLE = re.compile(rf"^{TABLE}_(p\d{{4}}_\d{{2}}(_\d{{2}})?|legacy)$")  # names this module and 0010 give
_COLUMNS = ", ".join(c.name for c in audit_records.columns)


class PartitionError(Exception):
    """Maintenance cannot go on; the message says why in one line."""


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime | None  # None: MINVALUE (or the default partition)
    end: datetime | None  # None: MAXVALUE (or the default partition)
    default: bool = False

    def covers(self, start: datetime, end: datetime) -> bool:
        """Whether this partition overlaps [start, end)."""
        if self.default:
            return False
        return (self.start is None or self.start < end) and (self.end is None or start < self.end)


@dataclass
class MaintainReport:
    created: list[str] = field(default_factory=list)  # partitions created ahead or for drained rows
    moved: int = 0  # rows moved out of the default partition
    dropped: list[str] = field(default_factory=list)
    dropped_rows: int = 0  # known when archived; otherwise the planner's estimate
    labels: int = 0  # review labels deleted with the dropped records
    rollups: int = 0  # overview rollup rows dropped
    archived: list[Path] = field(default_factory=list)


def month_start(moment: datetime, add: int = 0) -> datetime:
    """The first instant (UTC) of `moment`'s month, moved `add` months."""
    moment = moment.astimezone(UTC)
    index = moment.year * 12 + moment.month - 1 + add
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _literal(moment: datetime) -> str:
    return "'" + moment.astimezone(UTC).isoformat(sep=" ") + "'"


def _bound(value: str) -> datetime | None:
    value = value.strip()
    if value in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(value.strip("'")).astimezone(UTC)


async def _begin_turn(conn: AsyncConnection) -> None:
    """Serialise maintenance runs, in UTC, with a bounded wait for every lock."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MAINTAIN_LOCK_KEY})
    await conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
    await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))


async def is_partitioned(conn: AsyncConnection) -> bool:
    found = await conn.execute(text("SELECT relkind::text FROM pg_class WHERE oid = to_regclass(:t)"), {"t": TABLE})
    return found.scalar() == "p"


async def partitions(conn: AsyncConnection) -> list[Partition]:
    """The audit table's partitions with their bounds (the default one last)."""
    await conn.execute(text("SET LOCAL TimeZone = 'UTC'"))  # bounds are printed in the session's zone
    rows = await conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": TABLE},
    )
    found: list[Partition] = []
    for name, bound in rows:
        if bound == "DEFAULT":
            found.append(Partition(name, None, None, default=True))
            continue
        match = _BOUND.fullmatch(bound)
        if match is None:
            raise PartitionError(f"partition {name} has a bound this tool does not read: {bound}")
        found.append(Partition(name, _bound(match.group(1)), _bound(match.group(2))))
    return sorted(found, key=lambda p: (p.default, p.start or datetime.min.replace(tzinfo=UTC)))


def gaps(start: datetime, end: datetime, existing: list[Partition]) -> list[tuple[datetime, datetime]]:
    """The parts of [start, end) no partition covers."""
    out: list[tuple[datetime, datetime]] = []
    cursor = start
    for p in sorted((p for p in existing if p.covers(start, end)), key=lambda p: p.start or start):
        if p.start is not None and p.start > cursor:
            out.append((cursor, p.start))
        cursor = max(cursor, p.end) if p.end is not None else end
    if cursor < end:
        out.append((cursor, end))
    return out


def partition_name(start: datetime, end: datetime) -> str:
    """`audit_records_pYYYY_MM` for a whole month, with `_DD` for a part of one."""
    if start == month_start(start) and end == month_start(start, 1):
        return f"{TABLE}_p{start:%Y_%m}"
    return f"{TABLE}_p{start:%Y_%m_%d}"


async def _attach_new(conn: AsyncConnection, start: datetime, end: datetime) -> str:
    """Create and attach an empty partition for [start, end) (the parent's indexes come with it)."""
    name = partition_name(start, end)
    await conn.execute(text(f"CREATE TABLE {name} (LIKE {TABLE})"))
    await conn.execute(
        text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})")
    )
    return name


async def create_ahead(engine: AsyncEngine, months_ahead: int = MONTHS_AHEAD, now: datetime | None = None) -> list[str]:
    """Partitions for this month and `months_ahead` more wherever none exists; returns the new ones.
    Cheap when they exist (one catalogue read), so a gateway may call it daily."""
    now = now or datetime.now(UTC)
    created: list[str] = []
    for add in range(months_ahead + 1):
        start, end = month_start(now, add), month_start(now, add + 1)
        async with engine.begin() as conn:
            await _begin_turn(conn)
            for lo, hi in gaps(start, end, await partitions(conn)):
                if await _default_has_rows(conn, lo, hi):
                    continue  # drain_default makes this one, with its rows
                created.append(await _attach_new(conn, lo, hi))
    return created


async def _exists(conn: AsyncConnection, name: str) -> bool:
    return bool((await conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": name})).scalar())


async def _default_has_rows(conn: AsyncConnection, start: datetime, end: datetime) -> bool:
    if not await _exists(conn, DEFAULT):
        return False
    query = text(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE created_at >= :lo AND created_at < :hi)")
    return bool((await conn.execute(query, {"lo": start, "hi": end})).scalar())


async def drain_default(engine: AsyncEngine) -> tuple[int, list[str]]:
    """Move the default partition's rows into partitions of their months; returns (rows, new partitions)."""
    moved, created = 0, list[str]()
    async with engine.connect() as conn:
        if not await _exists(conn, DEFAULT):
            return moved, created
        found = await conn.execute(text(f"SELECT DISTINCT date_trunc('month', created_at, 'UTC') FROM {DEFAULT}"))
        months = [m.astimezone(UTC) for m in found.scalars()]
    for month in sorted(months):
        async with engine.begin() as conn:
            await _begin_turn(conn)
            # Writers of the default partition wait (this transaction only); the rest go on.
            await conn.execute(text(f"LOCK TABLE {DEFAULT} IN EXCLUSIVE MODE"))
            for lo, hi in gaps(month, month_start(month, 1), await partitions(conn)):
                await conn.execute(
                    text(
                        "CREATE TEMPORARY TABLE audit_move ON COMMIT DROP AS WITH gone AS ("
                        f"DELETE FROM {DEFAULT} WHERE created_at >= :lo AND created_at < :hi RETURNING {_COLUMNS}"
                        ") SELECT * FROM gone"
                    ),
                    {"lo": lo, "hi": hi},
                )
                created.append(await _attach_new(conn, lo, hi))
                result = await conn.execute(text(f"INSERT INTO {TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM audit_move"))
                moved += result.rowcount or 0
                await conn.execute(text("DROP TABLE audit_move"))
    return moved, created


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


async def _archive(conn: AsyncConnection, name: str, directory: Path) -> tuple[Path, int]:
    """Write a detached partition's records, each with its labels, to DIRECTORY/<name>.jsonl (the
    file appears whole, under its name, once complete; an existing one is kept, not rewritten)."""
    path = directory / f"{name}.jsonl"
    if path.exists():
        return path, 0
    partial = directory / f".{name}.jsonl.partial"
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(partial.write_bytes, b"")
    last, count = -1, 0
    while True:
        rows = [
            dict(r._mapping)
            for r in await conn.execute(
                text(f"SELECT * FROM {name} WHERE id > :last ORDER BY id LIMIT {_ARCHIVE_BATCH}"), {"last": last}
            )
        ]
        if not rows:
            break
        labels: dict[str, list[dict[str, Any]]] = {}
        found = await conn.execute(
            text("SELECT * FROM review_labels WHERE request_id = ANY(:ids) ORDER BY created_at, id"),
            {"ids": [r["request_id"] for r in rows]},
        )
        for label in found:
            labels.setdefault(label.request_id, []).append(_jsonable(dict(label._mapping)))
        lines = b"".join(
            msgspec.json.encode({**_jsonable(r), "labels": labels.get(r["request_id"], [])}) + b"\n" for r in rows
        )
        await asyncio.to_thread(_append, partial, lines)
        last, count = rows[-1]["id"], count + len(rows)
    await asyncio.to_thread(os.replace, partial, path)
    return path, count


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


async def _detached_leftovers(conn: AsyncConnection) -> list[str]:
    """Tables this module detached and did not get to drop (an interrupted run)."""
    rows = await conn.execute(
        text("SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition AND relname LIKE :prefix"),
        {"prefix": f"{TABLE}\\_%"},
    )
    return sorted(name for name in rows.scalars() if _OWN_TABLE.match(name))


async def drop_older(engine: AsyncEngine, cutoff: datetime, archive: Path | None, report: MaintainReport) -> None:
    """Detach, archive if asked, and drop every partition that ends at or before `cutoff`."""
    async with engine.connect() as conn:
        old = [p for p in await partitions(conn) if not p.default and p.end is not None and p.end <= cutoff]
        leftovers = await _detached_leftovers(conn)
    for p in old:
        assert p.end is not None
        async with engine.begin() as conn:
            await _begin_turn(conn)
            report.rollups += await prune_rollups(conn, p.end)
            await conn.execute(text(f"ALTER TABLE {TABLE} DETACH PARTITION {p.name}"))
        leftovers.append(p.name)
    for name in leftovers:
        async with engine.begin() as conn:
            await _begin_turn(conn)
            if archive is not None:
                path, count = await _archive(conn, name, archive)
                report.archived.append(path)
                report.dropped_rows += count
            else:
                estimate = await conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"),
                                              {"t": name})  # fmt: skip
                report.dropped_rows += max(0, int(estimate.scalar() or 0))
            labelled = f"SELECT 1 FROM {name} a WHERE a.request_id = l.request_id"
            deleted = await conn.execute(text(f"DELETE FROM review_labels l WHERE EXISTS ({labelled})"))
            report.labels += deleted.rowcount or 0
            await conn.execute(text(f"DROP TABLE {name}"))
        report.dropped.append(name)


async def maintain(
    engine: AsyncEngine,
    *,
    months_ahead: int = MONTHS_AHEAD,
    retention_days: float | None = None,
    archive: Path | None = None,
    now: datetime | None = None,
) -> MaintainReport:
    """Drain the default partition, create partitions ahead, then drop those past the retention."""
    now = now or datetime.now(UTC)
    report = MaintainReport()
    async with engine.connect() as conn:
        if not await is_partitioned(conn):
            raise PartitionError(f"{TABLE} is not a partitioned table: run `gateway db upgrade` first")
    report.moved, report.created = await drain_default(engine)
    report.created += await create_ahead(engine, months_ahead, now)
    if retention_days is not None:
        await drop_older(engine, now - timedelta(days=retention_days), archive, report)
    return report


class PartitionsAheadTask(PeriodicTask):
    """What `gateway serve` does of step 2 by itself: on a partitioned PostgreSQL audit table, the
    partitions ahead are checked at start and then daily (one catalogue read when they exist), so
    live writes keep off the default partition even where no one schedules `gateway db maintain`.
    Retention stays an operator's choice (`db maintain --retention-days`). Nothing on SQLite."""

    NAME = "audit-partitions-ahead"
    INTERVAL_S = 24 * 3600.0
    DIALECTS = frozenset({"postgresql"})
    FAILED = "tomorrow again; `gateway db maintain` does it too"  # a maintenance run holding the lock

    async def run_once(self) -> bool:
        async with self.engine.connect() as conn:
            if not await is_partitioned(conn):
                return False
        created = await create_ahead(self.engine)
        if created:
            log.info("audit partitions created ahead: %s", ", ".join(created))
        return True
