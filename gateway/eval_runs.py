"""Reading eval runs (`eval_runs`, `eval_items`) for the reviewer UI, next to the tables they read.

`evals` writes these rows (`evals.store`) and reads them back through here, so the dependency
points one way: `evals` -> `gateway`, never the reverse.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import eval_items, eval_runs
from gateway.jsontext import loads_stored


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
    return [run_dict(r._mapping) | {"items": int(r._mapping["n_items"])} for r in rows]


async def get_run(engine: AsyncEngine, run_id: int, *, with_items: bool = False) -> dict[str, Any] | None:
    """One run (None if unknown), optionally with its items in position order."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(eval_runs).where(eval_runs.c.id == run_id))).first()
        if row is None:
            return None
        run = run_dict(row._mapping)
        if with_items:
            items = await conn.execute(
                select(eval_items).where(eval_items.c.run_id == run_id).order_by(eval_items.c.position)
            )
            run["items"] = [
                {
                    "position": r.position,
                    "request_id": r.request_id,
                    "input": loads_stored(r.input_json),
                    "output_text": r.output_text,
                    "scores": loads_stored(r.scores_json),
                    "passed": r.passed,
                    "latency_ms": r.latency_ms,
                    "error": r.error,
                }
                for r in items
            ]
    return run


def run_dict(row: Any) -> dict[str, Any]:
    """An `eval_runs` row as a dict; stored JSON edited or damaged by hand still loads (as its text)."""
    return {
        "id": int(row["id"]),
        "kind": row["kind"],
        "name": row["name"],
        "status": row["status"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "metrics": loads_stored(row["metrics_json"]),
        "comparison": loads_stored(row["comparison_json"]),
        "config": loads_stored(row["config_json"]),
        "report_path": row["report_path"],
    }
