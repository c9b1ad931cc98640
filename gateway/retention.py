"""Retention: `gateway db prune --older-than DAYS` deletes old audit records in small batches.

Each batch is one short transaction (select a batch of ids, optionally append those rows and
their labels to a JSONL archive with fsync, delete them), with a pause between batches, so the
audit writer's group commits keep going while a prune runs. An interrupted prune loses
nothing: a batch is archived before it is deleted, and rerunning continues where it stopped.
The overview's rollups of buckets before the cutoff are dropped first (gateway.rollup), so the
overview reads what is left of those records raw and never counts a pruned one.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import audit_records, review_labels
from gateway.rollup import prune_rollups


@dataclass
class PruneReport:
    cutoff: datetime
    records: int = 0
    labels: int = 0
    rollups: int = 0  # audit_rollups rows dropped
    batches: int = 0
    archive: Path | None = None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


async def prune(
    engine: AsyncEngine,
    cutoff: datetime,
    *,
    batch: int = 2000,
    archive: Path | None = None,
    pause_s: float = 0.05,
    dry_run: bool = False,
) -> PruneReport:
    """Delete (or with `dry_run`, count) audit records created before `cutoff`, with their labels."""
    report = PruneReport(cutoff=cutoff, archive=archive)
    if dry_run:
        old = select(audit_records.c.request_id).where(audit_records.c.created_at < cutoff)
        async with engine.connect() as conn:
            report.records = (await conn.execute(select(func.count()).select_from(old.subquery()))).scalar_one()
            report.labels = (
                await conn.execute(
                    select(func.count()).select_from(review_labels).where(review_labels.c.request_id.in_(old))
                )
            ).scalar_one()
        return report
    async with engine.begin() as conn:
        report.rollups = await prune_rollups(conn, cutoff)
    while True:
        async with engine.begin() as conn:
            rows = [
                dict(r._mapping)
                for r in await conn.execute(
                    select(audit_records)
                    .where(audit_records.c.created_at < cutoff)
                    .order_by(audit_records.c.id)
                    .limit(batch)
                )
            ]
            if not rows:
                return report
            ids = [r["id"] for r in rows]
            request_ids = [r["request_id"] for r in rows]
            labels = [
                dict(r._mapping)
                for r in await conn.execute(select(review_labels).where(review_labels.c.request_id.in_(request_ids)))
            ]
            if archive is not None:
                by_request: dict[str, list[dict[str, Any]]] = {}
                for label in labels:
                    by_request.setdefault(label["request_id"], []).append(_jsonable(label))
                lines = b"".join(
                    msgspec.json.encode({**_jsonable(r), "labels": by_request.get(r["request_id"], [])}) + b"\n"
                    for r in rows
                )
                await asyncio.to_thread(_append, archive, lines)
            await conn.execute(delete(review_labels).where(review_labels.c.request_id.in_(request_ids)))
            await conn.execute(delete(audit_records).where(audit_records.c.id.in_(ids)))
        report.records += len(rows)
        report.labels += len(labels)
        report.batches += 1
        await asyncio.sleep(pause_s)  # let live writes in between batches


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
