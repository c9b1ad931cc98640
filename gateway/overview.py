"""The reviewer overview (`/review/overview`, `/api/review/overview`): requests, block and flag rates per
guard, and latency percentiles over the last hours or days, as server-rendered SVG charts.

Closed buckets come from `audit_rollups` (gateway.rollup computes them in the background, once,
on whichever replica gets there first), so a first load over 30 days of a million records reads a
few thousand rows; only the open bucket and the window's partial first bucket are aggregated from
raw rows (a small range of the created_at index). Where no rollups exist yet, raw rows are read.
Latency percentiles come from a histogram of fixed bins (LATENCY_BINS_MS), interpolated inside the
bin as Prometheus does: the same figures from rollups as from raw rows, and within the bin of the
exact percentile, so off by at most that bin's width (e.g. 100-200 ms: up to 100 ms).
Live traffic only by default: eval runs' rows (`origin = 'eval'`) are left out unless
`?origin=eval` or `?origin=all` asks for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.response import Template
from markupsafe import Markup
from sqlalchemy import BigInteger, Integer, case, cast, extract, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import ROLLUP_LATENCY_BOUNDS_MS, ROLLUP_LATENCY_COLUMNS, audit_records, audit_rollups, eval_runs
from gateway.errors import InvalidRequest
from gateway.review import REVIEWER, SIGN_IN_FIRST, Reviewer, _context
from gateway.rollup import COARSE_S, FINE_S, computed_range
from gateway.services import Services
from gateway.usage import ORIGINS, origin_clause, parse_since

_encode = msgspec.json.Encoder().encode
WINDOWS = ("1h", "6h", "24h", "7d", "30d")
#: Bucket sizes (seconds) to choose from: the smallest that keeps a chart under MAX_BUCKETS points.
_BUCKET_SIZES = (60, 300, 900, 1800, 3600, 7200, 21600, 43200, 86400, 7 * 86400)
MAX_BUCKETS = 120
#: Upper bounds (ms) of the latency bins (the rollups' histogram columns); the last bin is open.
LATENCY_BINS_MS = ROLLUP_LATENCY_BOUNDS_MS
_ERRORS = ("backend_error", "error", "limits_unavailable")
PERCENTILES = (50, 95, 99)


@dataclass(slots=True)
class Bucket:
    start: datetime
    requests: int = 0
    blocked: int = 0
    flagged: int = 0
    errors: int = 0
    rate_limited: int = 0
    latency_bins: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BINS_MS) + 1))
    blocked_by: dict[str, int] = field(default_factory=dict)
    flagged_by: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float | None:
        return histogram_quantile(q, self.latency_bins)


@dataclass(slots=True)
class Overview:
    since: datetime
    until: datetime
    bucket_s: int
    buckets: list[Bucket]
    guards: list[dict[str, Any]]  # per guard: blocked, flagged, their rates over the window
    origin: str = "live"
    #: The window's buckets before this moment came from the rollups (None: every figure from raw rows).
    rollups_through: datetime | None = None
    #: The nightly `eval traffic` runs that finished in the window: (start, PSI per signal), oldest first.
    drift: list[tuple[datetime, dict[str, float | None]]] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, Any]:
        n = sum(b.requests for b in self.buckets)
        bins = [sum(col) for col in zip(*(b.latency_bins for b in self.buckets), strict=True)] if self.buckets else []
        out: dict[str, Any] = {
            "requests": n,
            "blocked": sum(b.blocked for b in self.buckets),
            "flagged": sum(b.flagged for b in self.buckets),
            "errors": sum(b.errors for b in self.buckets),
            "rate_limited": sum(b.rate_limited for b in self.buckets),
        }
        for key in ("blocked", "flagged", "errors"):
            out[f"{key}_rate"] = out[key] / n if n else None
        for q in PERCENTILES:
            out[f"p{q}_ms"] = histogram_quantile(q / 100, bins) if bins else None
        return out

    def public(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "bucket_s": self.bucket_s,
            "origin": self.origin,
            "rollups_through": self.rollups_through.isoformat() if self.rollups_through else None,
            "drift": [{"run_started": at.isoformat(), "psi": psi} for at, psi in self.drift],
            "totals": self.totals,
            "guards": self.guards,
            "buckets": [
                {
                    "start": b.start.isoformat(),
                    "requests": b.requests,
                    "blocked": b.blocked,
                    "flagged": b.flagged,
                    "errors": b.errors,
                    "rate_limited": b.rate_limited,
                    **{f"p{q}_ms": b.percentile(q / 100) for q in PERCENTILES},
                    "blocked_by": b.blocked_by,
                    "flagged_by": b.flagged_by,
                }
                for b in self.buckets
            ],
        }


def histogram_quantile(q: float, bins: list[int]) -> float | None:
    """The q-quantile (0-1) of counts in LATENCY_BINS_MS bins, linear inside the bin; None when empty."""
    total = sum(bins)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(bins):
        if count and seen + count >= rank:
            if i == len(LATENCY_BINS_MS):  # the open bin: its lower bound is all we know
                return float(LATENCY_BINS_MS[-1])
            lower = LATENCY_BINS_MS[i - 1] if i else 0.0
            upper = LATENCY_BINS_MS[i]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return float(LATENCY_BINS_MS[-1])


def bucket_size(span_s: float) -> int:
    for size in _BUCKET_SIZES:
        if span_s / size <= MAX_BUCKETS:
            return size
    return _BUCKET_SIZES[-1]


def _time_key(dialect: str, bucket_s: int) -> ColumnElement[Any]:
    """What raw rows are grouped by in SQL: on SQLite the stored UTC text cut to the minute (or the
    hour, for buckets of an hour or more), which costs far less per row than parsing it; elsewhere
    the bucket number itself. Bucket sizes are whole minutes (hours), so both give the same buckets."""
    column = audit_records.c.created_at
    if dialect == "sqlite":
        return func.substr(column, 1, 13 if bucket_s >= 3600 else 16)
    size = literal_column(str(int(bucket_s)), Integer)  # inline, so SELECT and GROUP BY are the same expression
    return cast(func.floor(extract("epoch", column) / size), Integer)


def _bucket_of(key: Any, bucket_s: int) -> int:
    if isinstance(key, str):  # SQLite: "YYYY-MM-DD HH:MM" or "YYYY-MM-DD HH"
        moment = datetime.strptime(key, "%Y-%m-%d %H:%M" if len(key) > 13 else "%Y-%m-%d %H").replace(tzinfo=UTC)
        return int(moment.timestamp()) // bucket_s
    return int(key)


def _latency_bin() -> ColumnElement[Any]:
    total = audit_records.c.total_ms
    return case(
        (total.is_(None), -1),
        *((total <= bound, i) for i, bound in enumerate(LATENCY_BINS_MS)),
        else_=len(LATENCY_BINS_MS),
    )


#: A raw range up to this long is read through the created_at index; a longer one by primary key.
_SMALL_RANGE_S = 6 * 3600


async def _scan(
    conn: Any, bucket_s: int, lo: datetime, hi: datetime, dialect: str, *, small: bool, origin: str = "live"
) -> list[Any]:
    """Grouped raw rows (key, bin, status, blocked_by, flagged_by, n) of records with lo <= created_at < hi.

    A small range is read through the created_at index. A large one is scanned by primary key from
    its first row on (ids grow with time, roughly: a row is written when its request ends), so the
    table is read in order instead of through the index row by row."""
    c = audit_records.c
    key = _time_key(dialect, bucket_s).label("key")
    latency_bin = _latency_bin().label("bin")
    if small:
        bounds = [c.created_at >= lo, c.created_at < hi]
    else:
        # `id + 0`: for a plain min(id) SQLite walks the table from id 1; this way it reads the index range.
        first_id = (await conn.execute(select(func.min(c.id + 0)).where(c.created_at >= lo))).scalar()
        if first_id is None:
            return []
        # The time bounds through coalesce(): no index for them, so the scan runs by id, in table order.
        at = func.coalesce(c.created_at, c.created_at)
        bounds = [c.id >= first_id, at >= lo, at < hi]
    kept = origin_clause(origin)
    if kept is not None:
        bounds.append(kept)
    query = (
        select(key, latency_bin, c.status, c.blocked_by, c.flagged_by, func.count().label("n"))
        .where(*bounds)
        .group_by(key, latency_bin, c.status, c.blocked_by, c.flagged_by)
    )
    return list((await conn.execute(query)).all())


async def _read_rollups(conn: Any, size: int, lo: int, hi: int, bucket_s: int, origin: str) -> list[Any]:
    """Rollups of buckets [lo, hi) (epoch s), summed in SQL per chart bucket (its index), status and
    guard outcome: (index, status, blocked_by, flagged_by, n, *latency bins), a few hundred rows."""
    r = audit_rollups.c
    bounds = [r.size_s == size, r.bucket_start >= lo, r.bucket_start < hi, r.requests > 0]
    if origin != "all":
        bounds.append(r.origin == "eval" if origin == "eval" else r.origin != "eval")
    index = r.bucket_start // literal_column(str(int(bucket_s)), BigInteger)
    query = (
        select(index, r.status, r.blocked_by, r.flagged_by, func.sum(r.requests),
               *(func.sum(getattr(r, name)) for name in ROLLUP_LATENCY_COLUMNS))
        .where(*bounds)
        .group_by(index, r.status, r.blocked_by, r.flagged_by)
    )  # fmt: skip
    return list((await conn.execute(query)).all())


def rollup_size_for(bucket_s: int) -> int | None:
    """The rollup bucket size a chart of `bucket_s` buckets is summed from (None: read raw rows)."""
    return next((size for size in (COARSE_S, FINE_S) if bucket_s % size == 0), None)


def _at(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _count(b: Bucket, status: str, blocked_by: str | None, flagged_by: str | None, n: int) -> None:
    b.requests += n
    if status == "blocked":
        b.blocked += n
    elif status == "rate_limited":
        b.rate_limited += n
    elif status in _ERRORS:
        b.errors += n
    if blocked_by:
        b.blocked_by[blocked_by] = b.blocked_by.get(blocked_by, 0) + n
    if flagged_by:
        b.flagged += n
        for guard in flagged_by.split(","):  # "toxicity,groundedness": one count each
            if guard.strip():
                b.flagged_by[guard.strip()] = b.flagged_by.get(guard.strip(), 0) + n


async def overview(
    engine: AsyncEngine,
    since: datetime,
    until: datetime | None = None,
    *,
    origin: str = "live",
    rollups: bool = True,
) -> Overview:
    """Figures per time bucket between `since` and `until` (now); live traffic only unless `origin`
    is "eval" or "all".

    Whole buckets the rollup task has computed (gateway.rollup) are read from `audit_rollups`, a few
    thousand rows for 30 days; the rest (the window's partial first bucket, the open bucket, and
    anything not rolled up yet) from the raw rows, grouped in SQL by (time key, latency bin, status,
    blocked_by, flagged_by). `rollups=False` reads every raw row (the benchmark's "before")."""
    if origin not in ORIGINS:
        raise ValueError(f"origin {origin!r}: choose one of {', '.join(ORIGINS)}")
    until = until or datetime.now(UTC)
    bucket_s = bucket_size(max((until - since).total_seconds(), 1.0))
    first = int(since.timestamp()) // bucket_s
    last = int(until.timestamp()) // bucket_s
    buckets = {i: Bucket(_at(i * bucket_s)) for i in range(first, last + 1)}

    def bucket(index: int) -> Bucket:
        b = buckets.get(index)
        if b is None:
            b = buckets[index] = Bucket(_at(index * bucket_s))
        return b

    end = until + timedelta(microseconds=1)
    raw_ranges = [(since, end)]
    through: datetime | None = None
    dialect = engine.dialect.name
    async with engine.connect() as conn:
        size = rollup_size_for(bucket_s) if rollups else None
        done = await computed_range(conn, size) if size else None
        if size and done:
            lo = max(-(-int(since.timestamp()) // size) * size, done[0])
            hi = min(int(end.timestamp()) // size * size, done[1])
            if lo < hi:
                raw_ranges = [(since, _at(lo)), (_at(hi), end)]
                through = _at(hi)
                for index, status, blocked_by, flagged_by, n, *bins in await _read_rollups(
                    conn, size, lo, hi, bucket_s, origin
                ):
                    b = bucket(int(index))
                    _count(b, status, blocked_by, flagged_by, int(n))
                    b.latency_bins = [int(x) + y for x, y in zip(bins, b.latency_bins, strict=True)]
        indexes: dict[Any, int] = {}
        for lo_at, hi_at in raw_ranges:
            if lo_at >= hi_at:
                continue
            small = (hi_at - lo_at).total_seconds() <= _SMALL_RANGE_S
            for row in await _scan(conn, bucket_s, lo_at, hi_at, dialect, small=small, origin=origin):
                index = indexes.get(row.key)
                if index is None:
                    index = indexes[row.key] = _bucket_of(row.key, bucket_s)
                b = bucket(index)
                n = int(row.n)
                _count(b, row.status, row.blocked_by, row.flagged_by, n)
                if row.bin >= 0:
                    b.latency_bins[int(row.bin)] += n
        drift = await drift_runs(conn, since, until)
    ordered = [buckets[k] for k in sorted(buckets)]
    total = sum(b.requests for b in ordered)
    names = sorted({g for b in ordered for g in (*b.blocked_by, *b.flagged_by)})
    guards = []
    for name in names:
        blocked = sum(b.blocked_by.get(name, 0) for b in ordered)
        flagged = sum(b.flagged_by.get(name, 0) for b in ordered)
        guards.append({
            "guard": name, "blocked": blocked, "flagged": flagged,
            "block_rate": blocked / total if total else None, "flag_rate": flagged / total if total else None,
        })  # fmt: skip
    return Overview(since, until, bucket_s, ordered, guards, origin, through, drift)


#: A traffic run's drift report (evals.traffic.drift_report, stored in its metrics): signal -> where its PSI is.
DRIFT_SIGNALS: dict[str, tuple[str, ...]] = {
    "toxicity": ("guard_scores", "toxicity", "psi"),
    "groundedness": ("guard_scores", "groundedness", "psi"),
    "retrieval score": ("retrieval_top_score", "psi"),
    "query embeddings": ("query_embeddings", "psi"),
    "ratings": ("ratings", "psi"),
}


async def drift_runs(conn: Any, since: datetime, until: datetime) -> list[tuple[datetime, dict[str, float | None]]]:
    """PSI per signal of the traffic runs that finished in the window (at most 500, oldest first)."""
    query = (
        select(eval_runs.c.started_at, eval_runs.c.metrics_json)
        .where(
            eval_runs.c.kind == "traffic",
            eval_runs.c.started_at >= since,
            eval_runs.c.started_at <= until,
            eval_runs.c.metrics_json.is_not(None),
        )
        .order_by(eval_runs.c.started_at.desc())
        .limit(500)
    )
    out = []
    for started, text in reversed((await conn.execute(query)).all()):
        try:
            report = msgspec.json.decode(text).get("drift") or {}
        except (msgspec.DecodeError, AttributeError):
            continue  # a run stored by another version, or not JSON: no point on the chart
        psi: dict[str, float | None] = {}
        for name, path in DRIFT_SIGNALS.items():
            value: Any = report
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            psi[name] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        when = started if started.tzinfo else started.replace(tzinfo=UTC)
        out.append((when, psi))
    return out


# ----------------------------------------------------------------------------------- charts

_COLOURS = ("#1f6feb", "#d1242f", "#bf8700", "#1a7f37", "#8250df", "#0a7f8f", "#cf222e", "#57606a")


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:.3g}%"
    if unit == "ms":
        return f"{value / 1000:.3g} s" if value >= 1000 else f"{value:.3g} ms"
    return f"{value:.4g}"


def line_chart(
    title: str, starts: list[datetime], series: dict[str, list[float | None]], unit: str = "", width: int = 760
) -> Markup:
    """One SVG chart: a line per series over the buckets; gaps where a value is None."""
    height, left, right, top, bottom = 220, 64, 12, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if v is not None]
    peak = max(values, default=0.0)
    ceiling = _nice_ceiling(peak) if peak > 0 else 1.0
    n = max(len(starts), 1)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / ceiling

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" class="chart">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600">{escape(title)}</text>',
    ]
    for k in range(5):  # y grid and labels
        v = ceiling * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e6eb"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#6b7480">'
            f"{escape(_fmt(v, unit))}</text>"
        )
    step = max(1, math.ceil(n / 6))
    span = (starts[-1] - starts[0]).total_seconds() if len(starts) > 1 else 0
    for i in range(0, len(starts), step):  # x labels
        label = starts[i].strftime("%H:%M" if span <= 2 * 86400 else "%m-%d %H:%M")
        parts.append(
            f'<text x="{x(i):.1f}" y="{height - 12}" font-size="11" text-anchor="middle" fill="#6b7480">{label}</text>'
        )
    legend_x = left + 200
    for (name, vs), colour in zip(series.items(), _COLOURS * 4, strict=False):
        segments: list[list[str]] = [[]]
        for i, value in enumerate(vs):
            if value is None:
                segments.append([])
            else:
                segments[-1].append(f"{x(i):.1f},{y(value):.1f}")
        for points in segments:
            if len(points) == 1:
                cx, cy = points[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            elif points:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{" ".join(points)}"/>'
                )
        parts.append(f'<rect x="{legend_x}" y="7" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="16" font-size="11">{escape(name)}</text>')
        legend_x += 24 + 7 * len(name)
    parts.append("</svg>")
    return Markup("".join(parts))


def _nice_ceiling(value: float) -> float:
    magnitude = 10.0 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if value <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def charts(data: Overview) -> list[Markup]:
    starts = [b.start for b in data.buckets]

    def rate(part: int, b: Bucket) -> float | None:
        return part / b.requests if b.requests else None

    guard_names = [g["guard"] for g in data.guards]
    return [
        line_chart(
            "Requests per bucket",
            starts,
            {
                "all": [float(b.requests) for b in data.buckets],
                "blocked": [float(b.blocked) for b in data.buckets],
                "errors": [float(b.errors) for b in data.buckets],
                "rate limited": [float(b.rate_limited) for b in data.buckets],
            },
        ),
        line_chart(
            "Block rate per guard",
            starts,
            {g: [rate(b.blocked_by.get(g, 0), b) for b in data.buckets] for g in guard_names} or {"none": []},
            "%",
        ),
        line_chart(
            "Flag rate per guard",
            starts,
            {g: [rate(b.flagged_by.get(g, 0), b) for b in data.buckets] for g in guard_names} or {"none": []},
            "%",
        ),
        line_chart(
            "Latency (total, per request)",
            starts,
            {f"p{q}": [b.percentile(q / 100) for b in data.buckets] for q in PERCENTILES},
            "ms",
        ),
        drift_chart(data.drift),
    ]


def drift_chart(runs: list[tuple[datetime, dict[str, float | None]]]) -> Markup:
    """PSI per signal, one point per nightly traffic run (0.2 and above is drift, 0.1 is watch)."""
    title = "Drift (PSI against the previous window, per nightly traffic run; drift at 0.2)"
    if not runs:
        return line_chart(title + ": no traffic run in this window", [], {"none": []})
    series = {
        name: [psi[name] for _, psi in runs] for name in DRIFT_SIGNALS if any(psi[name] is not None for _, psi in runs)
    }
    return line_chart(title, [at for at, _ in runs], series or {"none": [None] * len(runs)})


# ----------------------------------------------------------------------------------- routes


async def _figures(request: Request[Any, Any, Any], services: Services) -> tuple[str, Overview]:
    window = request.query_params.get("window") or "24h"
    try:
        since = parse_since(window)
    except ValueError as exc:
        raise InvalidRequest(str(exc).replace("--since", "window"), param="window") from exc
    if since >= datetime.now(UTC) - timedelta(seconds=1):
        raise InvalidRequest(f"window {window!r} is empty", param="window")
    origin = request.query_params.get("origin") or "live"
    if origin not in ORIGINS:
        raise InvalidRequest(f"origin {origin!r}: choose one of {', '.join(ORIGINS)}", param="origin")
    return window, await overview(services.engine, since, origin=origin)


@get("/review/overview", include_in_schema=False, dependencies=REVIEWER, exception_handlers=SIGN_IN_FIRST)
async def overview_page(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    window, data = await _figures(request, services)
    return Template(
        "review/overview.html",
        context=_context(services, reviewer, title="Overview", window=window, windows=WINDOWS, data=data,
                         totals=data.totals, charts=charts(data)),
    )  # fmt: skip


@get("/api/review/overview", dependencies=REVIEWER)
async def api_overview(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    window, data = await _figures(request, services)
    return Response(_encode({"window": window, **data.public()}), media_type="application/json")


OVERVIEW_ROUTES = [overview_page, api_overview]
