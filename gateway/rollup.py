"""Rollups of the audit log for the overview: closed time buckets aggregated once, in the background.

`audit_rollups` holds one row per bucket (5 minutes and an hour), origin, model, status, blocked_by
and flagged_by: counts, token sums, score sums and a latency histogram in the overview's bins. A pass
(`roll_up`) recomputes whole buckets from the raw rows: for each bucket range, in one transaction,
delete its rollups and insert them again from one GROUP BY (hours from the 5-minute rows). So a pass
is idempotent, and replicas may run it at the same time: on PostgreSQL they take turns on an
advisory lock. On SQLite the GROUP BY is read first and the write transaction only swaps the rows,
so the audit writer (the other writer) waits for a few milliseconds at most.

Which buckets: from the newest computed one, LATE_S back (rows committed late, e.g. a long stream
whose `created_at` is its start, are counted by the next pass), up to the last closed bucket; on
an empty table from the oldest record on (a backfill, a day per transaction). Every computed bucket
has at least one row, so the computed range is [min(bucket_start), max(bucket_start) + size) and
the overview reads raw rows outside it. Rows older than LATE_S that arrive afterwards (an audit
spool replayed after a long outage) are counted after `rebuild(engine, since)`.

The request path pays nothing: audit writes are unchanged (no trigger), and a pass runs in
`RollupTask`, a background task of the gateway, every INTERVAL_S (`PassReport.longest_write_ms`:
how long a pass held a write transaction).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    and_,
    case,
    cast,
    delete,
    extract,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import ROLLUP_LATENCY_BOUNDS_MS, ROLLUP_LATENCY_COLUMNS, audit_records, audit_rollups
from gateway.periodic import PeriodicTask

log = logging.getLogger(__name__)

FINE_S = 300  # 5-minute buckets, for windows of up to a few days
COARSE_S = 3600  # hourly buckets, for everything longer
SIZES = (FINE_S, COARSE_S)
LATE_S = 3600  # each pass recomputes the last hour of buckets
INTERVAL_S = 60.0
FINE_KEEP_S = 7 * 86400  # 5-minute rollups are kept a week (windows up to 2.5 days read them)
_CHUNK_S = 86400  # a backfill commits a day at a time
_ANALYZE_AFTER = 10_000  # rows written by one pass
_LOCK_KEY = 0x6F766572  # PostgreSQL advisory lock: one pass at a time across replicas
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "latency_n", "latency_sum_ms",
         "toxicity_n", "toxicity_sum", "groundedness_n", "groundedness_sum", *ROLLUP_LATENCY_COLUMNS)  # fmt: skip
_KEYS = ("origin", "model", "status", "blocked_by", "flagged_by")


@dataclass(slots=True)
class PassReport:
    fine: tuple[int, int] | None = None  # the 5-minute range [lo, hi) recomputed (epoch s)
    coarse: tuple[int, int] | None = None
    rows: int = 0
    seconds: float = 0.0
    longest_write_ms: float = 0.0  # the longest transaction that wrote rollups


def _epoch_bucket(dialect: str, size: int) -> ColumnElement[Any]:
    """The bucket start (epoch s) of each record, in SQL."""
    column = audit_records.c.created_at
    if dialect == "sqlite":  # stored as UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'
        seconds = cast(func.strftime("%s", column), Integer)
    else:
        seconds = cast(func.floor(extract("epoch", column)), BigInteger)
    return (seconds // _inline(size)) * _inline(size)


def _inline(value: int) -> ColumnElement[Any]:
    """An integer written into the SQL (asyncpg cannot type a bare parameter in a SELECT list)."""
    return literal_column(str(int(value)), BigInteger)


def _latency_sums() -> list[ColumnElement[Any]]:
    total = audit_records.c.total_ms
    out: list[ColumnElement[Any]] = []
    lower: float | None = None
    for name, upper in zip(ROLLUP_LATENCY_COLUMNS, (*ROLLUP_LATENCY_BOUNDS_MS, None), strict=True):
        conditions: list[ColumnElement[bool]] = [total.is_not(None)]
        if lower is not None:
            conditions.append(total > lower)
        if upper is not None:
            conditions.append(total <= upper)
        out.append(func.sum(case((and_(*conditions), 1), else_=0)).label(name))
        lower = upper
    return out


def _count(column: Any) -> ColumnElement[Any]:
    return func.sum(case((column.is_not(None), 1), else_=0))


def _moment(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _fine_query(dialect: str, lo: int, hi: int) -> Select[Any]:
    """The 5-minute rollup rows of buckets [lo, hi), from the raw rows."""
    c = audit_records.c
    start = _epoch_bucket(dialect, FINE_S).label("bucket_start")
    keys = [
        func.coalesce(c.origin, "").label("origin"),
        func.coalesce(c.model, "").label("model"),
        c.status.label("status"),
        func.coalesce(c.blocked_by, "").label("blocked_by"),
        func.coalesce(c.flagged_by, "").label("flagged_by"),
    ]
    return (
        select(
            _inline(FINE_S).label("size_s"),
            start,
            *keys,
            func.count().label("requests"),
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
            _count(c.total_ms).label("latency_n"),
            func.coalesce(func.sum(c.total_ms), 0.0).label("latency_sum_ms"),
            _count(c.toxicity).label("toxicity_n"),
            func.coalesce(func.sum(c.toxicity), 0.0).label("toxicity_sum"),
            _count(c.groundedness).label("groundedness_n"),
            func.coalesce(func.sum(c.groundedness), 0.0).label("groundedness_sum"),
            *_latency_sums(),
        )
        .where(c.created_at >= _moment(lo), c.created_at < _moment(hi))
        .group_by(start, *keys)
    )


def _coarse_query(lo: int, hi: int) -> Select[Any]:
    """The hourly rollup rows of buckets [lo, hi), from the 5-minute rollups."""
    r = audit_rollups.c
    start = ((r.bucket_start // _inline(COARSE_S)) * _inline(COARSE_S)).label("bucket_start")
    keys = [getattr(r, k) for k in _KEYS]
    return (
        select(_inline(COARSE_S).label("size_s"), start, *keys,
               *(func.sum(getattr(r, name)).label(name) for name in _SUMS))
        .where(r.size_s == FINE_S, r.bucket_start >= lo, r.bucket_start < hi, r.requests > 0)
        .group_by(start, *keys)
    )  # fmt: skip


async def _recompute(engine: AsyncEngine, size: int, lo: int, hi: int, query: Select[Any], report: PassReport) -> None:
    """Replace the rollups of buckets [lo, hi) by `query`'s rows, in one transaction.

    PostgreSQL: delete and INSERT ... SELECT under an advisory lock (one replica at a time; the
    audit writer's inserts never wait on it). SQLite has one writer at a time, and the audit
    writer is another: the rows are read first, and the write lock is held only to swap them."""
    r = audit_rollups.c
    stale = delete(audit_rollups).where(r.size_s == size, r.bucket_start >= lo, r.bucket_start < hi)
    if engine.dialect.name == "postgresql":
        began = time.perf_counter()
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            await conn.execute(stale)
            columns = ["size_s", "bucket_start", *_KEYS, *_SUMS]
            written = (await conn.execute(insert(audit_rollups).from_select(columns, query))).rowcount or 0
            written += await _mark_empty(conn, size, lo, hi)
    else:
        async with engine.connect() as conn:
            rows = [dict(row._mapping) for row in await conn.execute(query)]
        began = time.perf_counter()
        async with engine.begin() as conn:
            await conn.execute(stale)
            if rows:
                await conn.execute(insert(audit_rollups), rows)
            written = len(rows) + await _mark_empty(conn, size, lo, hi)
    report.rows += written
    report.longest_write_ms = max(report.longest_write_ms, (time.perf_counter() - began) * 1000)


async def _mark_empty(conn: AsyncConnection, size: int, lo: int, hi: int) -> int:
    r = audit_rollups.c
    present = {
        int(v)
        for v in (
            await conn.execute(
                select(r.bucket_start).where(r.size_s == size, r.bucket_start >= lo, r.bucket_start < hi).distinct()
            )
        ).scalars()
    }
    empty = [
        {"size_s": size, "bucket_start": s, **dict.fromkeys(_KEYS, ""), **dict.fromkeys(_SUMS, 0)}
        for s in range(lo, hi, size)
        if s not in present
    ]
    if empty:
        await conn.execute(insert(audit_rollups), empty)
    return len(empty)


async def computed_range(conn: AsyncConnection, size: int) -> tuple[int, int] | None:
    """[first, end) of the buckets of `size` computed so far (epoch s), or None."""
    r = audit_rollups.c
    row = (await conn.execute(select(func.min(r.bucket_start), func.max(r.bucket_start)).where(r.size_s == size))).one()
    return None if row[0] is None else (int(row[0]), int(row[1]) + size)


async def roll_up(engine: AsyncEngine, now: float | None = None, *, since: float | None = None) -> PassReport:
    """One pass: recompute the closed buckets from the newest computed one (less LATE_S) or from
    `since`, or from the oldest record when nothing is computed; then drop old 5-minute rows."""
    began = time.perf_counter()
    now = time.time() if now is None else now
    report = PassReport()
    closed = int(now) // FINE_S * FINE_S  # the open 5-minute bucket starts here
    async with engine.connect() as conn:
        done = await computed_range(conn, FINE_S)
        if since is not None:
            lo = int(since) // FINE_S * FINE_S
        elif done is not None:
            lo = max(done[0], done[1] - LATE_S)
        else:
            oldest = (await conn.execute(select(func.min(audit_records.c.created_at)))).scalar()
            if oldest is None:
                report.seconds = time.perf_counter() - began
                return report
            if oldest.tzinfo is None:  # SQLite hands back naive UTC
                oldest = oldest.replace(tzinfo=UTC)
            lo = int(oldest.timestamp()) // FINE_S * FINE_S
    if lo >= closed:
        report.seconds = time.perf_counter() - began
        return report
    dialect = engine.dialect.name
    for chunk in range(lo, closed, _CHUNK_S):
        end = min(chunk + _CHUNK_S, closed)
        await _recompute(engine, FINE_S, chunk, end, _fine_query(dialect, chunk, end), report)
    report.fine = (lo, closed)
    coarse_lo, coarse_hi = lo // COARSE_S * COARSE_S, closed // COARSE_S * COARSE_S
    if coarse_lo < coarse_hi:
        for chunk in range(coarse_lo, coarse_hi, _CHUNK_S):
            end = min(chunk + _CHUNK_S, coarse_hi)
            await _recompute(engine, COARSE_S, chunk, end, _coarse_query(chunk, end), report)
        report.coarse = (coarse_lo, coarse_hi)
    async with engine.begin() as conn:
        r = audit_rollups.c
        await conn.execute(delete(audit_rollups).where(r.size_s == FINE_S, r.bucket_start < closed - FINE_KEEP_S))
        if report.rows > _ANALYZE_AFTER and conn.dialect.name == "postgresql":
            await conn.execute(text("ANALYZE audit_rollups"))  # a backfill: plans from statistics at once
    report.seconds = time.perf_counter() - began
    return report


async def rebuild(engine: AsyncEngine, since: datetime) -> PassReport:
    """Recompute every bucket from `since` on (after rows arrived more than LATE_S late)."""
    return await roll_up(engine, since=since.timestamp())


async def prune_rollups(conn: AsyncConnection, cutoff: datetime) -> int:
    """Drop the rollups of buckets that start before `cutoff` (retention): the overview reads the
    raw rows left in the bucket that straddles the cutoff, so no pruned record is counted."""
    r = audit_rollups.c
    result = await conn.execute(delete(audit_rollups).where(r.bucket_start < int(cutoff.timestamp()) + 1))
    return result.rowcount or 0


class RollupTask(PeriodicTask):
    """Runs `roll_up` every INTERVAL_S in the background (a failed pass is logged and retried)."""

    NAME = "audit-rollups"
    INTERVAL_S = INTERVAL_S
    FAILED = "the next pass catches up"  # the database may be away for a while

    def __init__(self, engine: AsyncEngine, interval_s: float | None = None) -> None:
        super().__init__(engine, interval_s)
        self.last: PassReport | None = None

    async def run_once(self) -> bool:
        self.last = await roll_up(self.engine)
        if self.last.seconds > 5:
            log.info("audit rollups: %d rows in %.1f s", self.last.rows, self.last.seconds)
        return True
