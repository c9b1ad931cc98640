"""`gateway eval compare --model chat --since 24h`: compare a model's deployments on logged traffic.

Reads the audit rows of one client model in a window, primary rows and shadow copies alike
(`deployment`, `shadow_of`), and reports per deployment: requests, backend latency p50/p95, error
rate, guard block and flag rates, mean groundedness; and, for each shadow, its answer's agreement
with the primary answer of the same request (token F1, and the share of identical answers).

The candidate (by default the shadow with the most copies, else the primary with the least traffic)
is judged against the baseline (the primary with the most traffic) with tolerances given as flags;
the verdict is one line, the report a self-contained HTML page like the nightly run's, and the
run is stored with the eval runs (kind `compare`). Exit codes: 0 within tolerances, 3 worse beyond
them, 4 not enough data to judge, 1 nothing to compare, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

from evals import report, store
from evals.metrics import percentile
from evals.traffic import parse_window
from gateway.db import audit_records
from gateway.settings import Settings, open_engine
from gateway.usage import origin_clause

_ERRORS = ("backend_error", "error")
_LIVE = cast("ColumnElement[bool]", origin_clause("live"))  # "live" is never None (only "all" is)
_WORD = re.compile(r"\w+", re.UNICODE)
_COLUMNS = (
    audit_records.c.request_id,
    audit_records.c.created_at,
    audit_records.c.deployment,
    audit_records.c.backend_model,
    audit_records.c.shadow_of,
    audit_records.c.status,
    audit_records.c.backend_ms,
    audit_records.c.blocked_by,
    audit_records.c.flagged_by,
    audit_records.c.groundedness,
    audit_records.c.response_text,
    audit_records.c.config_version,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the client-facing model name whose deployments to compare")
    parser.add_argument("--since", default="24h", help="window: 90m, 24h, 7d (default 24h)")
    parser.add_argument("--baseline", default=None, help="baseline deployment (default: the primary with most traffic)")
    parser.add_argument("--candidate", default=None, help="candidate deployment (default: the busiest shadow)")
    parser.add_argument("--limit", type=int, default=50000, help="most rows read (newest first; default 50000)")
    parser.add_argument("--max-latency-increase", type=float, default=0.20,
                        help="p95 backend latency may grow by this share (default 0.20: +20%%)")  # fmt: skip
    parser.add_argument("--max-error-increase", type=float, default=0.02, help="absolute (default 0.02)")
    parser.add_argument("--max-block-increase", type=float, default=0.02, help="absolute (default 0.02)")
    parser.add_argument("--max-groundedness-drop", type=float, default=0.05, help="absolute (default 0.05)")
    parser.add_argument("--min-agreement", type=float, default=0.0,
                        help="least mean token F1 with the primary's answers (default 0: not judged)")  # fmt: skip
    parser.add_argument("--min-requests", type=int, default=20,
                        help="fewest candidate rows for a verdict (default 20; fewer: exit 4)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry with the other eval commands")


def tokens(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def agreement(a: str | None, b: str | None) -> float:
    """Token-overlap F1 between two answers: 1.0 for the same words, 0.0 for none in common."""
    ta, tb = Counter(tokens(a)), Counter(tokens(b))
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if not common:
        return 0.0
    precision, recall = common / sum(tb.values()), common / sum(ta.values())
    return 2 * precision * recall / (precision + recall)


async def load(engine: AsyncEngine, model: str, since: datetime, limit: int) -> list[dict[str, Any]]:
    query = (
        select(*_COLUMNS)
        .where(audit_records.c.model == model, audit_records.c.created_at >= since)
        .where(audit_records.c.deployment.is_not(None))
        .where(_LIVE)  # eval runs' rows are no traffic
        .order_by(audit_records.c.created_at.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(query)]


def _rate(rows: Sequence[dict[str, Any]], test: Any) -> float | None:
    return sum(1 for r in rows if test(r)) / len(rows) if rows else None


def deployment_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    latencies = [float(r["backend_ms"]) for r in rows if r["backend_ms"] is not None and r["status"] not in _ERRORS]
    grounded = [float(r["groundedness"]) for r in rows if r["groundedness"] is not None]
    return {
        "requests": len(rows),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "error_rate": _rate(rows, lambda r: r["status"] in _ERRORS),
        "block_rate": _rate(rows, lambda r: r["blocked_by"] is not None),
        "flag_rate": _rate(rows, lambda r: r["flagged_by"] is not None),
        "groundedness_mean": sum(grounded) / len(grounded) if grounded else None,
        "groundedness_n": len(grounded),
    }


def pairs(rows: Sequence[dict[str, Any]], shadow: str) -> list[dict[str, Any]]:
    """(primary, shadow copy) answers of the same requests, each with its agreement."""
    primaries = {r["request_id"]: r for r in rows if r["shadow_of"] is None}
    out = []
    for copy in rows:
        if copy["deployment"] != shadow or copy["shadow_of"] is None or copy["status"] in _ERRORS:
            continue
        primary = primaries.get(copy["shadow_of"])
        if primary is None or primary["status"] in _ERRORS:
            continue
        a, b = primary["response_text"], copy["response_text"]
        out.append({
            "request_id": primary["request_id"],
            "primary": primary["deployment"],
            "agreement": agreement(a, b),
            "identical": " ".join(tokens(a)) == " ".join(tokens(b)),
            "primary_text": (a or "")[:300],
            "shadow_text": (b or "")[:300],
        })  # fmt: skip
    return out


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Metrics per deployment, the baseline and candidate, their agreement and the verdict."""
    by: dict[str, list[dict[str, Any]]] = {}
    roles: dict[str, str] = {}
    for r in rows:
        by.setdefault(r["deployment"], []).append(r)
        if r["shadow_of"] is None:
            roles[r["deployment"]] = "primary"
        else:
            roles.setdefault(r["deployment"], "shadow")
    deployments = {name: {"role": roles[name], **deployment_metrics(rs)} for name, rs in by.items()}
    primaries = sorted((n for n in by if roles[n] == "primary"), key=lambda n: -len(by[n]))
    shadows = sorted((n for n in by if roles[n] == "shadow"), key=lambda n: -len(by[n]))
    baseline = args.baseline or (primaries[0] if primaries else None)
    candidate = args.candidate or (
        shadows[0] if shadows else next((n for n in reversed(primaries) if n != baseline), None)
    )
    summary: dict[str, Any] = {
        "model": args.model,
        "since": args.since,
        "deployments": deployments,
        "baseline": baseline,
        "candidate": candidate,
    }
    if candidate is not None and candidate in by and roles[candidate] == "shadow":
        matched = pairs(rows, candidate)
        summary["agreement"] = {
            "pairs": len(matched),
            "mean": sum(p["agreement"] for p in matched) / len(matched) if matched else None,
            "identical_rate": sum(p["identical"] for p in matched) / len(matched) if matched else None,
        }
        summary["disagreements"] = sorted(matched, key=lambda p: p["agreement"])[:10]
        summary["agreement_values"] = [p["agreement"] for p in matched]
    summary.update(verdict(summary, args))
    return summary


def _worse(base: dict[str, Any], cand: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    b95, c95 = base["latency_p95_ms"], cand["latency_p95_ms"]
    if b95 and c95 is not None and c95 > b95 * (1 + args.max_latency_increase):
        problems.append(
            f"p95 latency {c95:.1f} ms vs {b95:.1f} ms (+{c95 / b95 - 1:.0%}, max +{args.max_latency_increase:.0%})"
        )
    for metric, limit in (("error_rate", args.max_error_increase), ("block_rate", args.max_block_increase)):
        b, c = base[metric] or 0.0, cand[metric] or 0.0
        if c - b > limit:
            problems.append(f"{metric.replace('_', ' ')} {c:.3f} vs {b:.3f} (max +{limit:g})")
    bg, cg = base["groundedness_mean"], cand["groundedness_mean"]
    if bg is not None and cg is not None and bg - cg > args.max_groundedness_drop:
        problems.append(f"groundedness {cg:.3f} vs {bg:.3f} (max -{args.max_groundedness_drop:g})")
    return problems


def verdict(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    deployments = summary["deployments"]
    base_name, cand_name = summary["baseline"], summary["candidate"]
    if base_name not in deployments or cand_name not in deployments or base_name == cand_name:
        return {"status": "nothing", "exit_code": 1, "problems": [],
                "verdict": f"nothing to compare for model {args.model!r}: deployments seen "
                           f"{', '.join(sorted(deployments)) or 'none'} "
                           f"(baseline {base_name}, candidate {cand_name})"}  # fmt: skip
    base, cand = deployments[base_name], deployments[cand_name]
    if cand["requests"] < args.min_requests or base["requests"] < args.min_requests:
        return {"status": "inconclusive", "exit_code": 4, "problems": [],
                "verdict": f"inconclusive: {cand_name} has {cand['requests']} and {base_name} {base['requests']} "
                           f"rows, fewer than --min-requests {args.min_requests}"}  # fmt: skip
    problems = _worse(base, cand, args)
    agreed = (summary.get("agreement") or {}).get("mean")
    if args.min_agreement > 0 and agreed is not None and agreed < args.min_agreement:
        problems.append(f"agreement with the primary {agreed:.3f} (min {args.min_agreement:g})")
    if problems:
        return {"status": "regressed", "exit_code": 3, "problems": problems,
                "verdict": f"candidate {cand_name} is WORSE than {base_name}: " + "; ".join(problems)}  # fmt: skip
    return {"status": "passed", "exit_code": 0, "problems": [],
            "verdict": f"candidate {cand_name} is within tolerances of {base_name} "
                       f"({cand['requests']} vs {base['requests']} requests)"}  # fmt: skip


_TABLE_COLUMNS = ("deployment", "role", "requests", "latency_p50_ms", "latency_p95_ms", "error_rate", "block_rate",
                  "flag_rate", "groundedness_mean")  # fmt: skip


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"deployment": name, **m} for name, m in summary["deployments"].items()]


def render(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The HTML report, in the nightly report's style (inline CSS and SVG, nothing fetched)."""
    latency = "".join(
        report.histogram_svg(
            [float(r["backend_ms"]) for r in rows if r["deployment"] == name and r["backend_ms"] is not None],
            f"backend latency (ms): {name}",
        )
        for name in summary["deployments"]
    )
    rates = "".join(
        report.bars_svg({name: m[metric] for name, m in summary["deployments"].items()}, metric.replace("_", " "))
        for metric in ("error_rate", "block_rate", "flag_rate", "groundedness_mean")
    )
    problems = "".join(f"<li class=bad>{report._e(p)}</li>" for p in summary["problems"])
    sections = [
        ("Verdict", f"<p>{report._e(summary['verdict'])}</p><ul>{problems}</ul>"
                    f"<p>baseline <code>{report._e(summary['baseline'])}</code>, candidate "
                    f"<code>{report._e(summary['candidate'])}</code>, window {report._e(summary['since'])}</p>"),
        ("Deployments", report.table(_rows(summary), _TABLE_COLUMNS)),
        ("Latency", f'<div class="plots">{latency}</div>'),
        ("Rates", f'<div class="plots">{rates}</div>'),
    ]  # fmt: skip
    if "agreement" in summary:
        agreement_plot = report.histogram_svg(
            summary["agreement_values"], "agreement with the primary (token F1)", 10, 0.0, 1.0
        )
        sections.append((
            "Agreement between primary and shadow on the same requests",
            report.table([summary["agreement"]], ("pairs", "mean", "identical_rate"))
            + f'<div class="plots">{agreement_plot}</div>'
            + "<p>Least agreeing pairs:</p>"
            + report.table(summary["disagreements"],
                           ("request_id", "primary", "agreement", "primary_text", "shadow_text")),
        ))  # fmt: skip
    title = f"Deployment comparison: {summary['model']}"
    return report.page(title, summary["status"], sections)


async def _compare(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from gateway.migrate import upgrade

    await asyncio.to_thread(upgrade, settings.database_url)
    since = datetime.now(UTC) - parse_window(args.since)
    async with open_engine(settings) as engine:
        rows = await load(engine, args.model, since, args.limit)
        summary = summarise(rows, args)
        run_id = await store.create_run(engine, "compare", args.model, {"since": args.since, "model": args.model})
        stem = f"compare-{run_id}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        public = {k: v for k, v in summary.items() if k != "agreement_values"}
        html_path, json_path = report.write(settings.data_dir / "reports", stem, render(summary, rows), public)
        status = summary["status"] if summary["status"] in ("passed", "regressed") else "failed"
        await store.finish_run(engine, run_id, status=status, metrics=public["deployments"],
                               comparison={"verdict": summary["verdict"], "problems": summary["problems"]},
                               report_path=str(html_path))  # fmt: skip
    public.update(report=str(html_path), summary_json=str(json_path), run_id=run_id)
    return public


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway eval compare`."""
    try:
        parse_window(args.since)
    except ValueError as exc:
        print(f"gateway eval compare: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(_compare(args, settings))
    columns = _TABLE_COLUMNS
    print("  ".join(f"{c:>16}" for c in columns))
    for row in _rows(summary):
        print("  ".join(f"{report._fmt(row.get(c)):>16}" for c in columns))
    if "agreement" in summary:
        a = summary["agreement"]
        print(f"agreement of {summary['candidate']} with the primary: {report._fmt(a['mean'])} mean token F1, "
              f"{report._fmt(a['identical_rate'])} identical, over {a['pairs']} requests")  # fmt: skip
    print(f"report: {summary['report']}")
    print(f"verdict: {summary['verdict']}")
    if args.json:
        print(json.dumps(summary, default=str))
    return int(summary["exit_code"])
