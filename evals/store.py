"""Eval runs and their items in SQL (`eval_runs`, `eval_items`): write a run, find the previous
one to compare with, and list runs for the reviewer UI."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import desc, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import eval_items, eval_runs
from gateway.jsontext import loads_stored

_encode = msgspec.json.Encoder().encode


def dumps(value: Any) -> str:
    return _encode(value).decode()


def _loads(text: str | None) -> Any:
    """Stored JSON as written by this module; a row edited or damaged by hand still loads (as its text)."""
    return loads_stored(text)


async def create_run(engine: AsyncEngine, kind: str, name: str, config: dict[str, Any]) -> int:
    """Insert a run in status "running"; returns its id."""
    async with engine.begin() as conn:
        result = await conn.execute(
            insert(eval_runs).values(
                kind=kind, name=name, started_at=datetime.now(UTC), status="running", config_json=dumps(config)
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


async def add_items(engine: AsyncEngine, run_id: int, items: Sequence[dict[str, Any]]) -> None:
    """Store per-item results: dicts with position, input, and optionally request_id, output_text,
    scores, passed, latency_ms, error."""
    if not items:
        return
    rows = [
        {
            "run_id": run_id,
            "position": item["position"],
            "request_id": item.get("request_id"),
            "input_json": dumps(item["input"]),
            "output_text": item.get("output_text"),
            "scores_json": dumps(item.get("scores") or {}),
            "passed": item.get("passed"),
            "latency_ms": item.get("latency_ms"),
            "error": item.get("error"),
        }
        for item in items
    ]
    async with engine.begin() as conn:
        for start in range(0, len(rows), 500):
            await conn.execute(insert(eval_items), rows[start : start + 500])


async def finish_run(
    engine: AsyncEngine,
    run_id: int,
    *,
    status: str,
    metrics: dict[str, Any] | None = None,
    comparison: dict[str, Any] | None = None,
    report_path: str | None = None,
) -> None:
    values: dict[str, Any] = {"status": status, "finished_at": datetime.now(UTC)}
    if metrics is not None:
        values["metrics_json"] = dumps(metrics)
    if comparison is not None:
        values["comparison_json"] = dumps(comparison)
    if report_path is not None:
        values["report_path"] = report_path
    async with engine.begin() as conn:
        await conn.execute(update(eval_runs).where(eval_runs.c.id == run_id).values(**values))


async def previous_run(engine: AsyncEngine, kind: str, name: str, before_id: int) -> dict[str, Any] | None:
    """The latest finished run (passed or regressed) of the same kind and name before `before_id`."""
    query = (
        select(eval_runs)
        .where(eval_runs.c.kind == kind, eval_runs.c.name == name, eval_runs.c.id < before_id)
        .where(eval_runs.c.status.in_(("passed", "regressed")))
        .order_by(desc(eval_runs.c.id))
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    return _run_dict(row._mapping) if row is not None else None


async def history(engine: AsyncEngine, kind: str, name: str, limit: int = 30) -> list[dict[str, Any]]:
    """Finished runs of one kind and name, oldest first (for trend plots)."""
    query = (
        select(eval_runs)
        .where(eval_runs.c.kind == kind, eval_runs.c.name == name, eval_runs.c.status.in_(("passed", "regressed")))
        .order_by(desc(eval_runs.c.id))
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).fetchall()
    return [_run_dict(r._mapping) for r in reversed(rows)]


async def list_runs(engine: AsyncEngine, limit: int = 50, *, kind: str | None = None) -> list[dict[str, Any]]:
    """The newest runs first: id, kind, name, status, times, metrics, comparison, report_path, items."""
    counts = select(eval_items.c.run_id, func.count().label("n_items")).group_by(eval_items.c.run_id).subquery()
    query = (
        select(eval_runs, func.coalesce(counts.c.n_items, 0).label("n_items"))
        .select_from(eval_runs.outerjoin(counts, counts.c.run_id == eval_runs.c.id))
        .order_by(desc(eval_runs.c.id))
        .limit(limit)
    )
    if kind is not None:
        query = query.where(eval_runs.c.kind == kind)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).fetchall()
    return [_run_dict(r._mapping) | {"items": int(r._mapping["n_items"])} for r in rows]


async def get_run(engine: AsyncEngine, run_id: int, *, with_items: bool = False) -> dict[str, Any] | None:
    """One run (None if unknown), optionally with its items in position order."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(eval_runs).where(eval_runs.c.id == run_id))).first()
        if row is None:
            return None
        run = _run_dict(row._mapping)
        if with_items:
            items = await conn.execute(
                select(eval_items).where(eval_items.c.run_id == run_id).order_by(eval_items.c.position)
            )
            run["items"] = [
                {
                    "position": r.position,
                    "request_id": r.request_id,
                    "input": _loads(r.input_json),
                    "output_text": r.output_text,
                    "scores": _loads(r.scores_json),
                    "passed": r.passed,
                    "latency_ms": r.latency_ms,
                    "error": r.error,
                }
                for r in items
            ]
    return run


def _run_dict(row: Any) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "kind": row["kind"],
        "name": row["name"],
        "status": row["status"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "metrics": _loads(row["metrics_json"]),
        "comparison": _loads(row["comparison_json"]),
        "config": _loads(row["config_json"]),
        "report_path": row["report_path"],
    }
