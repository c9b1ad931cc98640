"""Eval runs and their items in SQL (`eval_runs`, `eval_items`): write a run and find the previous
one to compare with. Reading runs back (`list_runs`, `get_run`) lives in `gateway.eval_runs`, next
to the tables, so that the reviewer UI does not import `evals`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import desc, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import eval_items, eval_runs
from gateway.eval_runs import get_run, list_runs, run_dict

#: Runs with figures to compare with: everything that finished but could not run ("error"), and the
#: "regressed" of runs stored before thresholds existed.
_COMPARABLE = ("passed", "failed", "unchecked", "regressed")

__all__ = [
    "add_items",
    "create_run",
    "dumps",
    "finish_run",
    "get_run",
    "history",
    "list_runs",
    "previous_run",
    "run_items",
    "runs_named",
]

_encode = msgspec.json.Encoder().encode


def dumps(value: Any) -> str:
    return _encode(value).decode()


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


def _comparable(run: dict[str, Any]) -> bool:
    """A run with figures: its verdict is not "error" (a run stored before thresholds that could not
    run said "failed", with only the error in its metrics)."""
    return run["status"] != "error" and isinstance(run["metrics"], dict)


async def previous_run(engine: AsyncEngine, kind: str, name: str, before_id: int) -> dict[str, Any] | None:
    """The latest run of the same kind and name before `before_id` that finished with figures,
    whatever its verdict (passed, failed or unchecked): regressions are run to run."""
    query = (
        select(eval_runs)
        .where(eval_runs.c.kind == kind, eval_runs.c.name == name, eval_runs.c.id < before_id)
        .where(eval_runs.c.status.in_(_COMPARABLE))
        .order_by(desc(eval_runs.c.id))
        .limit(20)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).fetchall()
    return next((run for run in (run_dict(r._mapping) for r in rows) if _comparable(run)), None)


async def history(engine: AsyncEngine, kind: str, name: str, limit: int = 30) -> list[dict[str, Any]]:
    """Runs of one kind and name that finished with figures, oldest first (for trend plots)."""
    query = (
        select(eval_runs)
        .where(eval_runs.c.kind == kind, eval_runs.c.name == name, eval_runs.c.status.in_(_COMPARABLE))
        .order_by(desc(eval_runs.c.id))
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).fetchall()
    return [run for run in (run_dict(r._mapping) for r in reversed(rows)) if _comparable(run)]


async def runs_named(engine: AsyncEngine, kind: str, name: str) -> list[dict[str, Any]]:
    """Every run of one kind and name, oldest first: id, status, config, metrics, comparison (decoded)."""
    query = (
        select(
            eval_runs.c.id,
            eval_runs.c.status,
            eval_runs.c.config_json,
            eval_runs.c.metrics_json,
            eval_runs.c.comparison_json,
        )
        .where(eval_runs.c.kind == kind, eval_runs.c.name == name)
        .order_by(eval_runs.c.id)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).fetchall()
    return [
        {
            "id": int(r.id),
            "status": r.status,
            "config": _decode(r.config_json),
            "metrics": _decode(r.metrics_json),
            "comparison": _decode(r.comparison_json) or {},
        }
        for r in rows
    ]


async def run_items(engine: AsyncEngine, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The items of the runs `run_ids`, decoded: run_id, position, request_id, input, output_text,
    scores, passed, error; by run and position."""
    out: list[dict[str, Any]] = []
    async with engine.connect() as conn:
        for run_id in run_ids:
            query = select(eval_items).where(eval_items.c.run_id == run_id).order_by(eval_items.c.position)
            for r in await conn.execute(query):
                out.append(
                    {
                        "run_id": int(r.run_id),
                        "position": int(r.position),
                        "request_id": r.request_id,
                        "input": _decode(r.input_json),
                        "output_text": r.output_text,
                        "scores": _decode(r.scores_json),
                        "passed": r.passed,
                        "error": r.error,
                    }
                )
    return out


def _decode(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)
