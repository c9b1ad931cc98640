"""Re-score logged traffic with the current guards, measure drift against the previous window,
and check the guards against reviewer labels and end users' ratings.

A window `--since 24h` is [now - 24h, now); the previous window is the 24 hours before it.
Drift is measured per signal with PSI (bins: the previous window's deciles) and the two-sample
Kolmogorov-Smirnov test; see `evals.metrics.drift` for the thresholds.

Live traffic only: the rows of eval runs (`origin = 'eval'`) are left out of the windows, the
labelled and the rated rows unless `include_eval` is set.

Ratings (`feedback`, POST /v1/feedback): per request and key the newest rating counts. The rating
mix of a window is over the ratings given in it; its drift against the previous window is PSI over
the three shares with a chi-square test. Against the guards, a request is a positive for the
toxicity guard (on the answer) and for the output guards as a whole when some key's newest rating
is -1 naming "unsafe" or "toxic"; for groundedness when it is -1 naming "wrong" or "hallucination".
Any other rating is a negative, except a -1 that names no category (the user's reason is unknown:
the request is left out of that comparison). Only requests whose answer the guard checked count.

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
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from evals import metrics
from gateway import guarding
from gateway.db import audit_records, feedback, review_labels
from gateway.jsontext import loads_stored, scrub
from gateway.usage import origin_clause
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


def _origin(include_eval: bool) -> list[Any]:
    kept = origin_clause("all" if include_eval else "live")
    return [] if kept is None else [kept]


async def load_rows(
    engine: AsyncEngine, start: datetime, end: datetime, limit: int, *, include_eval: bool = False
) -> list[dict[str, Any]]:
    """Chat and completion audit rows created in [start, end), newest first, at most `limit`;
    live traffic only unless `include_eval`."""
    query = (
        select(*_COLUMNS)
        .where(audit_records.c.created_at >= start, audit_records.c.created_at < end)
        .where(audit_records.c.endpoint.in_(("chat.completions", "completions")), *_origin(include_eval))
        .order_by(audit_records.c.created_at.desc(), audit_records.c.request_id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(query)]


async def window_ids(
    engine: AsyncEngine, start: datetime, end: datetime, limit: int, *, include_eval: bool = False
) -> list[str]:
    """The request ids of `load_rows(start, end, limit)`, in its order (newest first): what every
    shard of a run lists in full before it takes its share."""
    query = (
        select(audit_records.c.request_id)
        .where(audit_records.c.created_at >= start, audit_records.c.created_at < end)
        .where(audit_records.c.endpoint.in_(("chat.completions", "completions")), *_origin(include_eval))
        .order_by(audit_records.c.created_at.desc(), audit_records.c.request_id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [r.request_id for r in await conn.execute(query)]


async def rows_by_id(
    engine: AsyncEngine,
    ids: Sequence[str],
    *,
    include_eval: bool = False,
    created: tuple[datetime, datetime] | None = None,
) -> list[dict[str, Any]]:
    """The audit rows of `ids`, in the order of `ids`; ids without a (kept) row are left out.
    `created`: the [start, end) they were created in, where known (lets PostgreSQL read only the
    partitions of that time)."""
    async with engine.connect() as conn:
        return await _rows_by_id(conn, ids, include_eval, created)


async def _rows_by_id(
    conn: Any, ids: Sequence[str], include_eval: bool, created: tuple[datetime, datetime] | None = None
) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    when = (
        [] if created is None else [audit_records.c.created_at >= created[0], audit_records.c.created_at < created[1]]
    )
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        query = select(*_COLUMNS).where(audit_records.c.request_id.in_(chunk), *when, *_origin(include_eval))
        found.update((r.request_id, dict(r._mapping)) for r in await conn.execute(query))
    return [found[i] for i in ids if i in found]


async def labels_since(
    engine: AsyncEngine, since: datetime, limit: int, until: datetime | None = None
) -> dict[str, str]:
    """Per request its latest reviewer label given in [since, until), the `limit` most recently
    labelled requests, oldest first."""
    query = (
        select(review_labels.c.request_id, review_labels.c.label)
        .where(review_labels.c.created_at >= since)
        .order_by(review_labels.c.created_at, review_labels.c.id)
    )
    if until is not None:
        query = query.where(review_labels.c.created_at < until)
    async with engine.connect() as conn:
        latest = {r.request_id: r.label for r in await conn.execute(query)}
    return {i: latest[i] for i in list(latest)[-limit:]}


async def load_labelled(
    engine: AsyncEngine, since: datetime, limit: int, *, include_eval: bool = False, until: datetime | None = None
) -> list[tuple[dict[str, Any], str]]:
    """Audit rows with a reviewer label given in [since, until): (row, the request's latest label)."""
    latest = await labels_since(engine, since, limit, until)
    rows = await rows_by_id(engine, list(latest), include_eval=include_eval)
    return [(row, latest[row["request_id"]]) for row in rows]


def shard_of(request_id: str, shards: int) -> int:
    """Which of `shards` shards re-scores this request: a hash of its id, the same in every process."""
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) % shards


# ------------------------------------------------------------------ ratings

RATING_NAMES = {1: "positive", 0: "neutral", -1: "negative"}
UNSAFE_CATEGORIES = frozenset({"unsafe", "toxic"})
WRONG_CATEGORIES = frozenset({"wrong", "hallucination"})
#: Which rating categories (on a -1) say the guard should have fired on the answer.
RATING_POSITIVES: dict[str, frozenset[str]] = {
    "toxicity": UNSAFE_CATEGORIES,
    "groundedness": WRONG_CATEGORIES,
    "output_guards": UNSAFE_CATEGORIES,  # any guard on the answer (block, flag or redact)
}


@dataclass(frozen=True, slots=True)
class Rating:
    """One key's newest rating of one request."""

    request_id: str
    key_id: str
    rating: int
    categories: frozenset[str]


def _categories(text: Any) -> frozenset[str]:
    value = loads_stored(text) if isinstance(text, str) else None
    if not isinstance(value, list):
        return frozenset()
    return frozenset(c.strip().lower() for c in value if isinstance(c, str) and c.strip())


async def _newest_ratings(
    engine: AsyncEngine, start: datetime, end: datetime | None, include_eval: bool
) -> list[Rating]:
    """Per (request, key) the newest rating given in [start, end), ratings of eval requests left out
    unless `include_eval` (a rating whose request was pruned from the audit log counts as live)."""
    f = feedback.c
    query = (
        select(f.request_id, f.key_id, f.rating, f.categories_json)
        .select_from(feedback.outerjoin(audit_records, audit_records.c.request_id == f.request_id))
        .where(f.created_at >= start, *_origin(include_eval))
        .order_by(f.created_at, f.id)
    )
    if end is not None:
        query = query.where(f.created_at < end)
    newest: dict[tuple[str, str], Rating] = {}
    async with engine.connect() as conn:
        for r in await conn.execute(query):
            if r.rating in RATING_NAMES:  # the API takes only 1, 0, -1; anything else was written by hand
                newest[(r.request_id, r.key_id)] = Rating(
                    r.request_id, r.key_id, int(r.rating), _categories(r.categories_json)
                )
    return list(newest.values())


async def load_ratings(
    engine: AsyncEngine, start: datetime, end: datetime, *, include_eval: bool = False
) -> list[Rating]:
    """The ratings given in [start, end): per request and key the newest one."""
    return await _newest_ratings(engine, start, end, include_eval)


async def ratings_by_request(
    engine: AsyncEngine, since: datetime, limit: int, *, include_eval: bool = False, until: datetime | None = None
) -> dict[str, list[Rating]]:
    """Per rated request (the `limit` most recently rated, given in [since, until)) its ratings:
    per key the newest one."""
    by_request: dict[str, list[Rating]] = {}
    for rating in await _newest_ratings(engine, since, until, include_eval):
        by_request.setdefault(rating.request_id, []).append(rating)
    return {i: by_request[i] for i in list(by_request)[-limit:]}


async def load_rated(
    engine: AsyncEngine, since: datetime, limit: int, *, include_eval: bool = False, until: datetime | None = None
) -> list[tuple[dict[str, Any], list[Rating]]]:
    """Audit rows rated in [since, until): (row, per key its newest rating), at most `limit` requests
    (the most recently rated)."""
    by_request = await ratings_by_request(engine, since, limit, include_eval=include_eval, until=until)
    rows = await rows_by_id(engine, list(by_request), include_eval=include_eval)
    return [(row, by_request[row["request_id"]]) for row in rows]


def rating_counts(ratings: Sequence[Rating]) -> dict[str, int]:
    counts = {name: 0 for name in RATING_NAMES.values()}
    for r in ratings:
        counts[RATING_NAMES[r.rating]] += 1
    return counts


def rating_mix(ratings: Sequence[Rating]) -> dict[str, Any]:
    """How many ratings, of how many requests, and the share of each rating; categories of the -1s."""
    counts = rating_counts(ratings)
    n = len(ratings)
    categories: dict[str, int] = {}
    for r in ratings:
        if r.rating < 0:
            for c in r.categories:
                categories[c] = categories.get(c, 0) + 1
    return {
        "ratings": n,
        "rated_requests": len({r.request_id for r in ratings}),
        "rating_positive_rate": counts["positive"] / n if n else None,
        "rating_neutral_rate": counts["neutral"] / n if n else None,
        "rating_negative_rate": counts["negative"] / n if n else None,
        "rating_mean": sum(r.rating for r in ratings) / n if n else None,
        "negative_categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def rating_truth(ratings: Sequence[Rating], positives: frozenset[str]) -> bool | None:
    """True: some key's newest rating is -1 naming a category in `positives`; None: every rating is a
    -1 without categories (no reason given); False otherwise."""
    if any(r.rating < 0 and r.categories & positives for r in ratings):
        return True
    if all(r.rating < 0 and not r.categories for r in ratings):
        return None
    return False


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
    output_scores: dict[str, float] = field(default_factory=dict)  # the same, output-stage verdicts that checked
    output_hits: dict[str, bool] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.outcome.label != self.logged.label


def rescored_scores(r: Rescored) -> dict[str, Any]:
    """Everything of `r` that the run's figures are computed from, as JSON (a shard stores it so that
    the merge recomputes them exactly as one process would; JSON numbers keep every float bit)."""
    return {
        "scores": r.scores,
        "hits": r.hits,
        "output_scores": r.output_scores,
        "output_hits": r.output_hits,
        "outcome": [r.outcome.blocked_by, sorted(r.outcome.flagged)],
        "logged": [r.logged.blocked_by, sorted(r.logged.flagged)],
        "retrieval_scores": r.retrieval_scores,
    }


def rescored_from(request_id: str, query: str, model: Any, response_text: Any, stored: dict[str, Any]) -> Rescored:
    """A `Rescored` back from `rescored_scores`: its row keeps only what the figures and the report read."""
    outcome, logged = stored["outcome"], stored["logged"]
    return Rescored(
        row={"request_id": request_id, "model": model, "response_text": response_text},
        query=query,
        scores={k: float(v) for k, v in stored["scores"].items()},
        hits={k: bool(v) for k, v in stored["hits"].items()},
        outcome=metrics.Outcome(outcome[0], frozenset(outcome[1])),
        logged=metrics.Outcome(logged[0], frozenset(logged[1])),
        retrieval_scores=[float(v) for v in stored["retrieval_scores"]],
        output_scores={k: float(v) for k, v in stored["output_scores"].items()},
        output_hits={k: bool(v) for k, v in stored["output_hits"].items()},
    )


def rating_json(rating: Rating) -> list[Any]:
    return [rating.key_id, rating.rating, sorted(rating.categories)]


def rating_from(request_id: str, stored: Sequence[Any]) -> Rating:
    return Rating(request_id, str(stored[0]), int(stored[1]), frozenset(stored[2]))


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
    output_scores: dict[str, float] = {}
    output_hits: dict[str, bool] = {}
    for v in verdicts:
        worse = min if v.guard == "groundedness" else max
        scores[v.guard] = worse(scores.get(v.guard, float(v.score)), float(v.score))
        hits[v.guard] = hits.get(v.guard, False) or v.hit
        if v.stage == "output" and "skipped" not in v.details:  # "skipped": it had nothing to check against
            output_scores[v.guard] = worse(output_scores.get(v.guard, float(v.score)), float(v.score))
            output_hits[v.guard] = output_hits.get(v.guard, False) or v.hit
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
        output_scores=output_scores,
        output_hits=output_hits,
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
    names += [
        k
        for k in ("retrieval_top_score", "query_embeddings", "ratings")
        if (report.get(k) or {}).get("status") == "drift"
    ]
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


def rating_feedback(
    rated: Sequence[tuple[Rescored, Sequence[Rating]]], thresholds: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Per guard (`RATING_POSITIVES`): precision, recall and the best threshold against user ratings,
    over the rated requests whose answer the guard checked and whose ratings say yes or no."""
    out: dict[str, dict[str, Any]] = {}
    for guard, positives in RATING_POSITIVES.items():
        items: list[metrics.LabelledScore] = []
        unknown = 0
        for r, ratings in rated:
            if guard == "output_guards":
                if not r.output_scores:
                    continue
                hit, score = any(r.output_hits.values()), None
            elif guard in r.output_scores:
                hit, score = r.output_hits.get(guard, False), r.output_scores[guard]
            else:
                continue
            truth = rating_truth(ratings, positives)
            if truth is None:
                unknown += 1
                continue
            items.append(metrics.LabelledScore(r.row["request_id"], "positive" if truth else "negative", hit, score))
        if not items and not unknown:
            continue
        result = metrics.label_feedback(guard, items, thresholds.get(guard), positives=frozenset({"positive"}))
        result["labelled"] = len(items)
        result["left_out_no_reason"] = unknown
        result["current_threshold"] = thresholds.get(guard)
        result["positive_categories"] = sorted(positives)
        out[guard] = result
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
    mix: dict[str, Any] | None = None,
    ratings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run-level metrics of a traffic run: rates, drifted signals, guards against reviewer labels
    (`GUARD_precision`) and user ratings (`ratings_GUARD_precision`), and the rating mix."""
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
    for guard, found in labels.items():
        for key in ("precision", "recall"):
            if found.get(key) is not None:
                out[f"{guard}_{key}"] = round(float(found[key]), 4)
    for name, value in (mix or {}).items():
        if name != "negative_categories":
            out[name] = value
    for guard, found in (ratings or {}).items():
        for key in ("precision", "recall"):
            if found.get(key) is not None:
                out[f"ratings_{guard}_{key}"] = round(float(found[key]), 4)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def directions(summary: dict[str, Any]) -> dict[str, int]:
    """Which traffic metrics take part in the run-to-run comparison, and their good direction."""
    out = {"toxicity_rate": -1, "groundedness_mean": 1, "rating_positive_rate": 1, "rating_negative_rate": -1}
    out.update({k: 1 for k in summary if k.endswith(("_precision", "_recall"))})
    return out
