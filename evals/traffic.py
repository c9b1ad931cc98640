"""Re-score logged traffic with the current guards, measure drift against the previous window,
and check the guards against reviewer labels.

A window `--since 24h` is [now - 24h, now); the previous window is the 24 hours before it.
Drift is measured per signal with PSI (bins: the previous window's deciles) and the two-sample
Kolmogorov-Smirnov test; see `evals.metrics.drift` for the thresholds.

Logged rows hold whatever clients sent, rejected requests included: bodies that are not JSON,
of the wrong shape, or with lone surrogates (`"\ud800"`). They are read with
`gateway.jsontext.loads_stored` and reduced to the messages the guards can read; a row that
still fails to re-score is logged and left out, so no client can stop the nightly run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from evals import metrics
from gateway import guarding
from gateway.db import audit_records, review_labels
from gateway.jsontext import loads_stored, scrub
from guardrails import Guardrails, Passage, Verdict
from retrieval import Embedder

log = logging.getLogger("gateway.eval")
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_COLUMNS = (
    audit_records.c.request_id,
    audit_records.c.created_at,
    audit_records.c.api_key_id,
    audit_records.c.model,
    audit_records.c.endpoint,
    audit_records.c.status,
    audit_records.c.request_json,
    audit_records.c.response_text,
    audit_records.c.passages_json,
    audit_records.c.blocked_by,
    audit_records.c.flagged_by,
)


def parse_window(text: str) -> timedelta:
    """`90m`, `24h`, `7d`, `2w`, `30s` -> a timedelta."""
    match = _WINDOW.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"invalid window {text!r}: use a number and a unit, e.g. 90m, 24h, 7d")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


async def load_rows(engine: AsyncEngine, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
    """Chat and completion audit rows created in [start, end), newest first, at most `limit`."""
    query = (
        select(*_COLUMNS)
        .where(audit_records.c.created_at >= start, audit_records.c.created_at < end)
        .where(audit_records.c.endpoint.in_(("chat.completions", "completions")))
        .order_by(audit_records.c.created_at.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(query)]


async def load_labelled(engine: AsyncEngine, since: datetime, limit: int) -> list[tuple[dict[str, Any], str]]:
    """Audit rows with a reviewer label created since `since`: (row, the request's latest label)."""
    query = (
        select(review_labels.c.request_id, review_labels.c.label)
        .where(review_labels.c.created_at >= since)
        .order_by(review_labels.c.created_at, review_labels.c.id)
    )
    async with engine.connect() as conn:
        latest = {r.request_id: r.label for r in await conn.execute(query)}
        ids = list(latest)[-limit:]
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            result = await conn.execute(select(*_COLUMNS).where(audit_records.c.request_id.in_(chunk)))
            rows.extend(dict(r._mapping) for r in result)
    return [(row, latest[row["request_id"]]) for row in rows]


# ------------------------------------------------------------------ re-scoring


@dataclass
class Rescored:
    """One audit row as the current guards see it."""

    row: dict[str, Any]
    query: str
    scores: dict[str, float]  # per guard: max score (min for groundedness)
    hits: dict[str, bool]  # per guard: whether it found something (any action but allow)
    outcome: metrics.Outcome
    logged: metrics.Outcome
    retrieval_scores: list[float]

    @property
    def changed(self) -> bool:
        return self.outcome.label != self.logged.label


def _content(content: Any) -> str | list[dict[str, str]] | None:
    """Message content in a shape the guards read: a string, or text parts; None if neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            {"type": "text", "text": p["text"]}
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return parts or None
    return None


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The logged request's messages (or prompt) as the guards read them; [] when it has none."""
    body = loads_stored(row.get("request_json"))
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("messages"), list):
        out = []
        for m in body["messages"]:
            content = _content(m.get("content")) if isinstance(m, dict) else None
            if content is not None:
                role = m.get("role")
                out.append({"role": role if isinstance(role, str) else "user", "content": content})
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(p for p in prompt if isinstance(p, str))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return []


def _passages(row: dict[str, Any]) -> list[dict[str, Any]]:
    records = loads_stored(row.get("passages_json"))
    return [p for p in records if isinstance(p, dict)] if isinstance(records, list) else []


def _optional_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _score(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


async def rescore(rails: Guardrails, row: dict[str, Any]) -> Rescored:
    """Input guards on the logged prompt; output guards on the logged answer against the logged passages."""
    messages = _messages(row)
    records = _passages(row)
    prompt = guarding.last_user_text(messages) or ""
    key, model = row.get("api_key_id"), row.get("model")
    answer = row.get("response_text")
    answer = scrub(answer) if isinstance(answer, str) else None
    verdicts: list[Verdict] = []
    blocked_input = False
    if messages:
        result = await rails.check_input(messages, (), key, model)
        verdicts.extend(result.verdicts)
        blocked_input = result.blocked_by is not None
    if answer and not blocked_input:
        passages = [
            Passage(id=str(p.get("chunk_id", i)), text=p["text"] if isinstance(p.get("text"), str) else "",
                    title=_optional_text(p.get("title")), source=_optional_text(p.get("source")))
            for i, p in enumerate(records)
        ]  # fmt: skip
        output = await rails.check_output(answer, passages, key, model, prompt or None)
        verdicts.extend(output.verdicts)
    scores: dict[str, float] = {}
    hits: dict[str, bool] = {}
    for v in verdicts:
        worse = min if v.guard == "groundedness" else max
        scores[v.guard] = worse(scores.get(v.guard, float(v.score)), float(v.score))
        hits[v.guard] = hits.get(v.guard, False) or v.hit
    block = next((v.guard for v in verdicts if v.action == "block"), None)
    flagged = frozenset(v.guard for v in verdicts if v.action in ("flag", "redact"))
    logged_flags = frozenset(f for f in (row.get("flagged_by") or "").split(",") if f)
    return Rescored(
        row=row,
        query=prompt,
        scores=scores,
        hits=hits,
        outcome=metrics.Outcome(block, flagged),
        logged=metrics.Outcome(row.get("blocked_by"), logged_flags),
        retrieval_scores=[s for s in (_score(p.get("score")) for p in records) if s is not None],
    )


@contextmanager
def progress_bar(total: int, *, enabled: bool) -> Iterator[tqdm]:
    """A progress bar on stderr for re-scoring (disabled: a silent one)."""
    bar = tqdm(total=total, desc="rescore", unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


async def rescore_all(
    rails: Guardrails,
    rows: Sequence[dict[str, Any]],
    concurrency: int = 8,
    bar: tqdm | None = None,
) -> list[Rescored | None]:
    """Every row re-scored, in order; None for a row that could not be (logged with its request id)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(row: dict[str, Any]) -> Rescored | None:
        async with limit:
            try:
                return await rescore(rails, row)
            except Exception:
                log.exception("could not re-score request %s; left out of this run", row.get("request_id"))
                return None
            finally:
                if bar is not None:
                    bar.update(1)

    return list(await asyncio.gather(*(one(r) for r in rows)))


# ------------------------------------------------------------------ drift


async def drift_report(
    previous: Sequence[Rescored], current: Sequence[Rescored], embedder: Embedder | None
) -> dict[str, Any]:
    """Drift of guard scores, query embeddings and top retrieval scores, current vs previous window."""
    guards = sorted({g for r in (*previous, *current) for g in r.scores})
    report: dict[str, Any] = {
        "guard_scores": {
            g: metrics.drift(
                [r.scores[g] for r in previous if g in r.scores], [r.scores[g] for r in current if g in r.scores]
            )
            for g in guards
        },
        "retrieval_top_score": metrics.drift(
            [max(r.retrieval_scores) for r in previous if r.retrieval_scores],
            [max(r.retrieval_scores) for r in current if r.retrieval_scores],
        ),
    }
    report["query_embeddings"] = await _embedding_drift(
        [r.query for r in previous if r.query], [r.query for r in current if r.query], embedder
    )
    return report


async def _embedding_drift(previous: list[str], current: list[str], embedder: Embedder | None) -> dict[str, Any]:
    """Each query's cosine similarity to the previous window's mean embedding, compared as a 1-D
    distribution (PSI, KS); plus the cosine distance between the two windows' mean embeddings."""
    if embedder is None:
        return {"status": "unavailable", "note": "retrieval is off (rag = false): no embedding model"}
    if not previous or not current:
        return metrics.drift([], [])
    vectors = await embedder.embed([*previous, *current])
    before, after = vectors[: len(previous)], vectors[len(previous) :]
    centroid_before, centroid_after = before.mean(axis=0), after.mean(axis=0)
    unit = centroid_before / (np.linalg.norm(centroid_before) or 1.0)
    distance = 1.0 - float(
        np.dot(centroid_before, centroid_after)
        / ((np.linalg.norm(centroid_before) * np.linalg.norm(centroid_after)) or 1.0)
    )
    result = metrics.drift((before @ unit).tolist(), (after @ unit).tolist())
    return result | {"centroid_cosine_distance": round(distance, 4), "statistic": "similarity to previous centroid"}


def drifted(report: dict[str, Any]) -> list[str]:
    """Names of the signals whose status is "drift"."""
    names = [f"guard_scores.{g}" for g, d in report["guard_scores"].items() if d.get("status") == "drift"]
    names += [k for k in ("retrieval_top_score", "query_embeddings") if report[k].get("status") == "drift"]
    return names


# ------------------------------------------------------------------ labels


def label_feedback(
    labelled: Sequence[tuple[Rescored, str]], thresholds: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Per guard: precision, recall and the best threshold against reviewer labels."""
    guards = sorted({g for r, _ in labelled for g in r.scores} | set(metrics.POSITIVE_LABELS))
    out: dict[str, dict[str, Any]] = {}
    for guard in guards:
        items = [
            metrics.LabelledScore(r.row["request_id"], label, r.hits.get(guard, False), r.scores.get(guard))
            for r, label in labelled
            if guard in r.scores or guard in metrics.POSITIVE_LABELS
        ]
        if items:
            out[guard] = metrics.label_feedback(guard, items, thresholds.get(guard))
            out[guard]["current_threshold"] = thresholds.get(guard)
    return out


def current_thresholds(rails: Guardrails) -> dict[str, float | None]:
    """The main threshold of each guard under the default policy (the one its score is compared to)."""
    policy = rails.request_policy()
    out: dict[str, float | None] = {}
    for name, settings in policy.guards.items():
        values = dict(settings.thresholds)
        main = {"groundedness": "sentence", "injection": "score"}.get(name)
        if main and main in values:
            out[name] = float(values[main])
        elif name == "toxicity" and values:
            out[name] = float(min(values.values()))  # the verdict's score is the worst category
        else:
            out[name] = None
    return out


def summarise(
    current: Sequence[Rescored],
    previous: Sequence[Rescored],
    drift: dict[str, Any],
    labels: dict[str, dict[str, Any]],
    labelled: int,
) -> dict[str, Any]:
    """Run-level metrics of a traffic run."""
    answered = [r for r in current if "toxicity" in r.scores]
    out: dict[str, Any] = {
        "requests": len(current),
        "requests_previous": len(previous),
        "block_rate": metrics.rate(r.outcome.blocked_by is not None for r in current),
        "flag_rate": metrics.rate(bool(r.outcome.flagged) for r in current),
        "toxicity_rate": metrics.rate(r.hits.get("toxicity", False) for r in answered) if answered else None,
        "groundedness_mean": metrics.mean(r.scores.get("groundedness") for r in current),
        "changed_outcomes": sum(r.changed for r in current),
        "changed_rate": metrics.rate(r.changed for r in current),
        "drifted": drifted(drift),
        "labelled": labelled,
    }
    for guard, feedback in labels.items():
        for key in ("precision", "recall"):
            if feedback.get(key) is not None:
                out[f"{guard}_{key}"] = round(float(feedback[key]), 4)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def directions(summary: dict[str, Any]) -> dict[str, int]:
    """Which traffic metrics take part in the run-to-run comparison, and their good direction."""
    out = {"toxicity_rate": -1, "groundedness_mean": 1}
    out.update({k: 1 for k in summary if k.endswith(("_precision", "_recall"))})
    return out
