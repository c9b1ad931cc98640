"""Usage from the audit log: requests, tokens, blocked, rate-limited, errors and latency, grouped by key, model or day.

Served by `gateway usage` and by the reviewer UI's usage page (admins). One pass over the
audit rows of the window (streamed, so memory holds only each group's latencies); the
`created_at` index bounds the scan. Percentiles are exact (nearest rank), over `total_ms`.

Live traffic only by default: the rows of eval runs (`origin = 'eval'`, migration 0009) are
left out unless `origin="eval"` (only them) or `"all"` is asked for. `origin_clause` is that
filter, shared by the overview, the metrics and the nightly traffic re-scoring.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import api_keys, audit_records

GROUPINGS = ("key", "model", "day")
ORIGINS = ("live", "eval", "all")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ERRORS = {"backend_error", "error", "limits_unavailable"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30m`, `24h`, `7d`, `2w`, or an ISO date/time (UTC unless it says otherwise) -> the window's start."""
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: use a duration like 30m, 24h, 7d, 2w or a date like 2026-11-01") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def origin_clause(origin: str = "live") -> ColumnElement[bool] | None:
    """The WHERE condition for audit rows of `origin`: "live" (NULL, or anything but "eval"), "eval",
    or None for "all". Written through coalesce() so that no plan turns to the origin index: the
    created_at (and id) plans that bound every windowed scan stay as they are."""
    if origin not in ORIGINS:
        raise ValueError(f"origin {origin!r}: choose one of {', '.join(ORIGINS)}")
    if origin == "all":
        return None
    stored = func.coalesce(audit_records.c.origin, "")
    return stored == "eval" if origin == "eval" else stored != "eval"


@dataclass(slots=True)
class UsageRow:
    """One group's figures."""

    group: str
    name: str | None = None  # the key's name, when grouped by key
    requests: int = 0
    ok: int = 0
    blocked: int = 0
    rate_limited: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    _latencies: list[float] = field(default_factory=list, repr=False)

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        del out["_latencies"]
        return out


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)


async def usage(
    engine: AsyncEngine, since: datetime, by: str = "key", until: datetime | None = None, *, origin: str = "live"
) -> list[UsageRow]:
    """Figures per group for requests created in [since, until), busiest group first; live traffic
    only unless `origin` is "eval" or "all"."""
    if by not in GROUPINGS:
        raise ValueError(f"--by {by!r}: choose one of {', '.join(GROUPINGS)}")
    r = audit_records.c
    query = select(
        r.created_at, r.api_key_id, r.model, r.status, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.total_ms
    ).where(r.created_at >= since)
    if until is not None:
        query = query.where(r.created_at < until)
    kept = origin_clause(origin)
    if kept is not None:
        query = query.where(kept)
    groups: dict[str, UsageRow] = {}
    async with engine.connect() as conn:
        result = await conn.stream(query.execution_options(yield_per=5000))
        async for row in result:
            if by == "key":
                name = row.api_key_id or "(none)"
            elif by == "model":
                name = row.model or "(none)"
            else:
                created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
                name = created.astimezone(UTC).strftime("%Y-%m-%d")
            group = groups.get(name)
            if group is None:
                group = groups[name] = UsageRow(name)
            group.requests += 1
            status = row.status
            if status == "ok":
                group.ok += 1
            elif status == "blocked":
                group.blocked += 1
            elif status == "rate_limited":
                group.rate_limited += 1
            elif status in _ERRORS:
                group.errors += 1
            group.prompt_tokens += row.prompt_tokens or 0
            group.completion_tokens += row.completion_tokens or 0
            group.tokens += row.total_tokens or 0
            if row.total_ms is not None:
                group._latencies.append(row.total_ms)
        if by == "key" and groups:
            names = await conn.execute(select(api_keys.c.id, api_keys.c.name).where(api_keys.c.id.in_(list(groups))))
            for key_id, key_name in names:
                groups[key_id].name = key_name
    for group in groups.values():
        group._latencies.sort()
        group.p50_ms = _percentile(group._latencies, 0.50)
        group.p95_ms = _percentile(group._latencies, 0.95)
        group._latencies = []
    order = (lambda g: g.group) if by == "day" else (lambda g: (-g.requests, g.group))
    return sorted(groups.values(), key=order)


COLUMNS = ("requests", "ok", "blocked", "rate_limited", "errors", "tokens", "p50_ms", "p95_ms")


def format_table(rows: list[UsageRow], by: str) -> str:
    """A plain-text table, one line per group and a total line."""
    header = [by, *COLUMNS]
    lines = [[row.group + (f" ({row.name})" if row.name else ""), *(_cell(getattr(row, c)) for c in COLUMNS)]
             for row in rows]  # fmt: skip
    if rows:
        totals = [sum(getattr(r, c) for r in rows) for c in COLUMNS[:6]]
        lines.append(["total", *(str(t) for t in totals), "", ""])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    render = []
    for line in [header, *lines]:
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs]
        render.append("  ".join(cells).rstrip())
    return "\n".join(render) if rows else "no requests in this window"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
