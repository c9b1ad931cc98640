"""Reading eval runs (`eval_runs`, `eval_items`) for the reviewer UI, next to the tables they read.

`evals` writes these rows (`evals.store`) and reads them back through here, so the dependency
points one way: `evals` -> `gateway`, never the reverse.

A run's `status` is its verdict against its thresholds: `passed`, `failed`, `unchecked` (it had
none), `error` (it could not run) or `running`. Whether it got worse than the previous run is
the separate `regressed` (from the stored comparison), and traffic drift is in its metrics'
`drifted`. Runs stored before thresholds existed said `regressed` as their status (now: status
`unchecked`, regressed true) and `failed` for a run that could not run (now: `error`).
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
    else:  # a sharded traffic run's shards are parts of the merged run, listed only when asked for
        query = query.where(eval_runs.c.kind != "traffic-shard")
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


#: Statuses of a finished run; "regressed" only in rows stored before thresholds existed.
FINISHED = ("passed", "failed", "unchecked", "error", "regressed")


def verdict(status: str, metrics: Any, comparison: Any) -> tuple[str, bool, bool]:
    """(status, regressed, drifted) of a stored run, with the statuses of runs stored before
    thresholds existed read as today's: "regressed" -> unchecked and regressed, and "failed"
    with only an error in its metrics -> error."""
    regressed = isinstance(comparison, dict) and comparison.get("regressed") is True
    drifted = isinstance(metrics, dict) and bool(metrics.get("drifted"))
    if status == "regressed":
        return "unchecked", not drifted or regressed, drifted
    if status == "failed" and isinstance(metrics, dict) and set(metrics) == {"error"}:
        return "error", False, False
    return status, regressed, drifted


def run_dict(row: Any) -> dict[str, Any]:
    """An `eval_runs` row as a dict; stored JSON edited or damaged by hand still loads (as its text).
    `status`, `regressed` and `drifted` as `verdict` reads them; `thresholds`: the checks made."""
    metrics = loads_stored(row["metrics_json"])
    comparison = loads_stored(row["comparison_json"])
    status, regressed, drifted = verdict(row["status"], metrics, comparison)
    return {
        "id": int(row["id"]),
        "kind": row["kind"],
        "name": row["name"],
        "status": status,
        "regressed": regressed,
        "drifted": drifted,
        "thresholds": comparison.get("thresholds", []) if isinstance(comparison, dict) else [],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "metrics": metrics,
        "comparison": comparison,
        "config": loads_stored(row["config_json"]),
        "report_path": row["report_path"],
    }
