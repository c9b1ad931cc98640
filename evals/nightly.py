"""`gateway eval run` and `gateway eval traffic`: the nightly evaluation.

    gateway eval run --dataset FILE.jsonl [--backend URL] [--tolerance 0.05] [--json]
    gateway eval traffic --since 24h [--backend URL] [--json]

Both store an eval run with its items, compare it with the previous run of the same kind and
name, write DATA_DIR/reports/<kind>-<id>.html and .json, and exit with
0 passed, 1 failed (could not run), 3 a metric regressed beyond the tolerance, 4 drift (traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evals import dataset as ds
from evals import metrics, promexport, report, store, traffic
from gateway.services import Services
from gateway.settings import Settings

EXIT_PASSED, EXIT_FAILED, EXIT_REGRESSED, EXIT_DRIFT = 0, 1, 3, 4
log = logging.getLogger("gateway.eval")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        metavar="URL",
        help="OpenAI-compatible backend; repeatable (default: the backend setting)",
    )
    parser.add_argument("--policy", type=Path, default=None, help="guardrails policy (default: the policy setting)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="absolute drop of a rate that counts as a regression (default 0.05)",
    )
    parser.add_argument(
        "--latency-margin",
        type=float,
        default=0.5,
        help="relative growth of p50/p95 latency that counts as a regression (default 0.5)",
    )
    parser.add_argument("--name", default=None, help="run name compared across runs (default: from the input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress messages or bar on stderr")
    parser.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    promexport.add_arguments(parser)


async def _failed(engine: Any, run_id: int, kind: str, name: str, exc: BaseException) -> dict[str, Any]:
    """Mark the run failed and say why; interruptions (Ctrl-C, cancellation) still propagate."""
    await store.finish_run(engine, run_id, status="failed", metrics={"error": str(exc)})
    if not isinstance(exc, Exception):
        raise exc
    log.exception("%s eval %s failed", kind, run_id)
    return {
        "run_id": run_id,
        "kind": kind,
        "name": name,
        "status": "failed",
        "exit_code": EXIT_FAILED,
        "error": f"{type(exc).__name__}: {exc}",
    }


def configure_run_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `gateway eval run`."""
    parser.add_argument("--dataset", type=Path, required=True, metavar="FILE.jsonl", help="the eval set")
    parser.add_argument("--model", default=None, help="model for lines that name none (default: the first listed)")
    parser.add_argument("--collection", default=None, help="RAG collection for lines that name none (default: none)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-score", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=4, help="items in flight at once (default 4)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_tokens for items that set none (default: the eval_max_tokens setting, 256)",
    )
    parser.add_argument(
        "--similarity-threshold",
        type=float,
        default=0.7,
        help="answer-reference cosine similarity that counts as correct (default 0.7)",
    )
    _common(parser)


def configure_traffic_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `gateway eval traffic`."""
    parser.add_argument("--since", default="24h", help="window length: 90m, 24h, 7d (default 24h)")
    parser.add_argument("--limit", type=int, default=5000, help="most rows re-scored per window (default 5000)")
    parser.add_argument(
        "--labels-since",
        default="30d",
        help="reviewer labels created within this long feed back into guard checks (default 30d)",
    )
    _common(parser)


def run_dataset(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway eval run`: `args` holds its own options; `--backend` and `--policy`
    are settings, already in `settings` (gateway.cli builds it)."""
    return _main(args, settings, _dataset)


def run_traffic(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway eval traffic`."""
    return _main(args, settings, _traffic)


def _progress(args: argparse.Namespace, message: str) -> None:
    """A line on stderr about what the run is doing, unless --no-progress."""
    if not getattr(args, "no_progress", False):
        print(f"gateway eval: {message}", file=sys.stderr, flush=True)


def _main(args: argparse.Namespace, settings: Settings, job: Any) -> int:
    try:
        if getattr(args, "max_tokens", None) is not None and args.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if not settings.backend:
            raise ValueError("no backend: pass --backend URL, set GATEWAY_BACKEND, or set backend in the config file")
        if getattr(args, "since", None) is not None:
            traffic.parse_window(args.since)
            traffic.parse_window(args.labels_since)
        if getattr(args, "dataset", None) is not None:
            items = ds.load_dataset(args.dataset)
            args.items = items
    except ValueError as exc:
        print(f"gateway eval: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = asyncio.run(_with_services(settings, args, job))
    promexport.export(summary, args)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return int(summary["exit_code"])


async def _with_services(settings: Settings, args: argparse.Namespace, job: Any) -> dict[str, Any]:
    _progress(args, f"starting: database, guard models{', embedding model' if settings.rag else ''}")
    services = Services(settings)
    await services.start()
    try:
        result: dict[str, Any] = await job(services, args)
        return result
    finally:
        await services.stop()


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"run {summary.get('run_id')} ({summary['kind']} {summary['name']}): {summary['status']}")
    for key, value in (summary.get("metrics") or {}).items():
        print(f"  {key:<24} {report._fmt(value)}")
    for r in (summary.get("comparison") or {}).get("regressions", []):
        print(f"  REGRESSED {r['metric']}: {r['previous']} -> {r['current']} ({r['rule']})")
    for name in (summary.get("metrics") or {}).get("drifted", []) or []:
        print(f"  DRIFT {name}")
    if summary.get("report"):
        print(f"report: {summary['report']}")


# ------------------------------------------------------------------ dataset runs


async def _dataset(services: Services, args: argparse.Namespace) -> dict[str, Any]:
    items: list[ds.EvalItem] = args.items
    name = args.name or Path(args.dataset).name
    max_tokens = args.max_tokens or services.settings.eval_max_tokens
    config = {
        "dataset": str(args.dataset),
        "items": len(items),
        "model": args.model,
        "collection": args.collection,
        "backend": list(services.settings.backend),
        "tolerance": args.tolerance,
        "latency_margin": args.latency_margin,
        "similarity_threshold": args.similarity_threshold,
        "max_tokens": max_tokens,
        "policy": str(services.settings.policy) if services.settings.policy else None,
    }
    options = ds.RunOptions(
        model=args.model,
        collection=args.collection,
        top_k=args.top_k,
        min_score=args.min_score,
        concurrency=args.concurrency,
        similarity_threshold=args.similarity_threshold,
        progress=not args.no_progress,
        max_tokens=max_tokens,
    )
    _progress(
        args,
        f"{len(items)} items against {', '.join(services.settings.backend)} "
        f"(max_tokens {max_tokens} unless an item sets its own, {args.concurrency} at a time)",
    )
    return await evaluate_dataset(
        services,
        items,
        name=name,
        config=config,
        options=options,
        tolerance=args.tolerance,
        latency_margin=args.latency_margin,
    )


async def evaluate_dataset(
    services: Services,
    items: Sequence[ds.EvalItem],
    *,
    name: str,
    options: ds.RunOptions,
    config: dict[str, Any] | None = None,
    tolerance: float = 0.05,
    latency_margin: float = 0.5,
) -> dict[str, Any]:
    """Run, store, compare and report one eval set; returns the JSON summary (with `exit_code`)."""
    engine = services.engine
    run_id = await store.create_run(engine, "dataset", name, config or {})
    try:
        results = await ds.run_items(services, items, options)
        # Audit rows are committed before answers are released; flushing again is harmless.
        summary_metrics = ds.summarise(results)
        await store.add_items(engine, run_id, results)
        previous = await store.previous_run(engine, "dataset", name, run_id)
        comparison = metrics.compare(
            summary_metrics,
            previous["metrics"] if previous else None,
            tolerance=tolerance,
            latency_margin=latency_margin,
        )
        comparison["previous_run"] = previous["id"] if previous else None
        status = "regressed" if comparison["regressed"] else "passed"
        trend = await store.history(engine, "dataset", name)
        html_path, json_path = _paths(services, "dataset", run_id)
        await store.finish_run(
            engine, run_id, status=status, metrics=summary_metrics, comparison=comparison, report_path=str(html_path)
        )
        summary = {
            "run_id": run_id,
            "kind": "dataset",
            "name": name,
            "status": status,
            "exit_code": EXIT_REGRESSED if comparison["regressed"] else EXIT_PASSED,
            "metrics": summary_metrics,
            "comparison": comparison,
            "report": str(html_path),
            "summary": str(json_path),
            "failed_items": [r["position"] for r in results if not r["passed"]],
        }
        trend = [*trend, {"id": run_id, "metrics": summary_metrics}] if all(t["id"] != run_id for t in trend) else trend
        report.write(
            html_path.parent,
            html_path.stem,
            _dataset_html(name, status, summary_metrics, comparison, results, trend),
            summary,
        )
        return summary
    except BaseException as exc:
        return await _failed(engine, run_id, "dataset", name, exc)


def _paths(services: Services, kind: str, run_id: int) -> tuple[Path, Path]:
    stem = f"{kind}-{run_id}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    directory = services.settings.data_dir / "reports"
    return directory / f"{stem}.html", directory / f"{stem}.json"


def _trend_plots(trend: Sequence[dict[str, Any]], rates: Sequence[str], latencies: Sequence[str]) -> str:
    labels = [f"#{t['id']}" for t in trend]
    rate_series = {k: [(t["metrics"] or {}).get(k) for t in trend] for k in rates}
    latency_series = {k: [(t["metrics"] or {}).get(k) for t in trend] for k in latencies}
    return (
        '<div class="plots">'
        + report.lines_svg(rate_series, "rates across runs", labels)
        + (report.lines_svg(latency_series, "latency across runs (ms)", labels) if latencies else "")
        + "</div>"
    )


def _dataset_html(
    name: str,
    status: str,
    summary: dict[str, Any],
    comparison: dict[str, Any],
    results: Sequence[dict[str, Any]],
    trend: Sequence[dict[str, Any]],
) -> str:
    scores = [r["scores"] for r in results]
    latencies = [float(r["latency_ms"]) for r in results if "error" not in r]
    plots = (
        '<div class="plots">'
        + report.bars_svg({k: summary.get(k) for k in metrics.RATE_METRICS}, "rates of this run")
        + report.histogram_svg(
            [s["similarity"] for s in scores if "similarity" in s], "answer-reference similarity", low=-1.0, high=1.0
        )
        + report.histogram_svg(
            [s["groundedness"] for s in scores if "groundedness" in s], "groundedness score", low=0.0, high=1.0
        )
        + report.histogram_svg([s["toxicity"] for s in scores if "toxicity" in s], "toxicity score", low=0.0, high=1.0)
        + report.histogram_svg(latencies, "latency (ms)")
        + "</div>"
    )
    rows = [
        {
            "#": r["position"],
            "question": r["input"]["question"],
            "expect": r["input"].get("expect"),
            "outcome": r["scores"].get("outcome"),
            "answer": (r.get("output_text") or "")[:300],
            "correct": r["scores"].get("correct"),
            "similarity": r["scores"].get("similarity"),
            "recall": r["scores"].get("retrieval_recall"),
            "latency_ms": r.get("latency_ms"),
            "passed": r.get("passed"),
            "error": r.get("error"),
            "request_id": r.get("request_id"),
        }
        for r in results
    ]
    columns = [
        "#",
        "question",
        "expect",
        "outcome",
        "answer",
        "correct",
        "similarity",
        "recall",
        "latency_ms",
        "passed",
        "error",
        "request_id",
    ]
    return report.page(
        f"Eval run: {name}",
        status,
        [
            ("Metrics", report.metrics_table(summary, comparison)),
            ("Plots", plots),
            (
                "Trends",
                _trend_plots(
                    trend,
                    ("pass_rate", "correctness", "retrieval_recall", "guard_accuracy"),
                    ("latency_p50_ms", "latency_p95_ms"),
                ),
            ),
            ("Items", report.table(rows, columns)),
        ],
    )


# ------------------------------------------------------------------ traffic runs


async def _traffic(services: Services, args: argparse.Namespace) -> dict[str, Any]:
    return await evaluate_traffic(
        services,
        since=args.since,
        limit=args.limit,
        labels_since=args.labels_since,
        name=args.name,
        tolerance=args.tolerance,
        latency_margin=args.latency_margin,
        progress=not args.no_progress,
    )


async def evaluate_traffic(
    services: Services,
    *,
    since: str = "24h",
    limit: int = 5000,
    labels_since: str = "30d",
    name: str | None = None,
    now: datetime | None = None,
    tolerance: float = 0.05,
    latency_margin: float = 0.5,
    progress: bool = False,
) -> dict[str, Any]:
    """Re-score two windows of traffic, measure drift and label feedback, store, compare and report.
    A row the guards cannot re-score is left out and counted (`rescore_errors`), never fatal."""
    assert services.rails is not None, "call services.start() first"
    engine = services.engine
    window = traffic.parse_window(since)
    now = now or datetime.now(UTC)
    name = name or f"last {since}"
    config = {
        "since": since,
        "window": [str(now - window), str(now)],
        "previous": [str(now - 2 * window), str(now - window)],
        "limit": limit,
        "labels_since": labels_since,
        "tolerance": tolerance,
    }
    run_id = await store.create_run(engine, "traffic", name, config)
    try:
        current_rows = await traffic.load_rows(engine, now - window, now, limit)
        previous_rows = await traffic.load_rows(engine, now - 2 * window, now - window, limit)
        labelled_rows = await traffic.load_labelled(engine, now - traffic.parse_window(labels_since), limit)
        rails = services.rails
        total = len(current_rows) + len(previous_rows) + len(labelled_rows)
        with traffic.progress_bar(total, enabled=progress) as bar:
            current_or_none = await traffic.rescore_all(rails, current_rows, bar=bar)
            previous_or_none = await traffic.rescore_all(rails, previous_rows, bar=bar)
            labelled_or_none = await traffic.rescore_all(rails, [row for row, _ in labelled_rows], bar=bar)
        failed = sum(r is None for r in (*current_or_none, *previous_or_none, *labelled_or_none))
        current = [r for r in current_or_none if r is not None]
        previous = [r for r in previous_or_none if r is not None]
        labelled = [(r, label) for r, (_, label) in zip(labelled_or_none, labelled_rows, strict=True) if r is not None]
        drift = await traffic.drift_report(previous, current, services.embedder)
        feedback = traffic.label_feedback(labelled, traffic.current_thresholds(rails))
        summary_metrics = traffic.summarise(current, previous, drift, feedback, len(labelled))
        summary_metrics["rescore_errors"] = failed
        items = [
            {
                "position": i,
                "request_id": r.row["request_id"],
                "input": {"query": r.query, "model": r.row["model"]},
                "output_text": r.row.get("response_text"),
                "scores": {
                    **r.scores,
                    "outcome": r.outcome.label,
                    "logged_outcome": r.logged.label,
                    "retrieval_top": max(r.retrieval_scores) if r.retrieval_scores else None,
                },
                "passed": not r.changed,
            }
            for i, r in enumerate(current)
        ]
        await store.add_items(engine, run_id, items)
        previous_run = await store.previous_run(engine, "traffic", name, run_id)
        comparison = metrics.compare(
            summary_metrics,
            previous_run["metrics"] if previous_run else None,
            tolerance=tolerance,
            latency_margin=latency_margin,
            directions=traffic.directions(summary_metrics),
        )
        comparison["previous_run"] = previous_run["id"] if previous_run else None
        drifted = summary_metrics["drifted"]
        regressed = comparison["regressed"] or bool(drifted)
        status = "regressed" if regressed else "passed"
        exit_code = EXIT_REGRESSED if comparison["regressed"] else EXIT_DRIFT if drifted else EXIT_PASSED
        html_path, json_path = _paths(services, "traffic", run_id)
        full_metrics = {**summary_metrics, "drift": drift, "labels": feedback}
        await store.finish_run(
            engine, run_id, status=status, metrics=full_metrics, comparison=comparison, report_path=str(html_path)
        )
        summary = {
            "run_id": run_id,
            "kind": "traffic",
            "name": name,
            "status": status,
            "exit_code": exit_code,
            "metrics": summary_metrics,
            "drift": drift,
            "labels": feedback,
            "comparison": comparison,
            "report": str(html_path),
            "summary": str(json_path),
        }
        trend = await store.history(engine, "traffic", name)
        report.write(
            html_path.parent,
            html_path.stem,
            _traffic_html(name, status, summary_metrics, comparison, drift, feedback, current, previous, trend),
            summary,
        )
        return summary
    except BaseException as exc:
        return await _failed(engine, run_id, "traffic", name, exc)


def _traffic_html(
    name: str,
    status: str,
    summary: dict[str, Any],
    comparison: dict[str, Any],
    drift: dict[str, Any],
    feedback: dict[str, Any],
    current: Sequence[traffic.Rescored],
    previous: Sequence[traffic.Rescored],
    trend: Sequence[dict[str, Any]],
) -> str:
    drift_rows = [{"signal": f"guard score: {g}", **d} for g, d in drift["guard_scores"].items()]
    drift_rows += [{"signal": k, **drift[k]} for k in ("retrieval_top_score", "query_embeddings")]
    plots = []
    for guard in sorted({g for r in (*current, *previous) for g in r.scores}):
        for label, rows in (("previous", previous), ("current", current)):
            plots.append(
                report.histogram_svg(
                    [r.scores[guard] for r in rows if guard in r.scores],
                    f"{guard} score, {label} window",
                    low=0.0,
                    high=1.0,
                )
            )
    for label, rows in (("previous", previous), ("current", current)):
        plots.append(
            report.histogram_svg(
                [max(r.retrieval_scores) for r in rows if r.retrieval_scores],
                f"top retrieval score, {label} window",
                low=0.0,
                high=1.0,
            )
        )
    label_rows = [{"guard": g, **{k: v for k, v in f.items() if k != "guard"}} for g, f in feedback.items()]
    changed = [
        {"request_id": r.row["request_id"], "logged": r.logged.label, "now": r.outcome.label, "query": r.query[:200]}
        for r in current
        if r.changed
    ][:200]
    statement = (
        f"<p>PSI with bins at the previous window's deciles: &lt; {metrics.PSI_WATCH} stable, "
        f"{metrics.PSI_WATCH}–{metrics.PSI_DRIFT} watch, ≥ {metrics.PSI_DRIFT} drift. Two-sample "
        f"Kolmogorov–Smirnov D and p are shown beside it (significant at p &lt; {metrics.KS_ALPHA}). "
        f"Fewer than {metrics.MIN_SAMPLES} values in a window: insufficient data.</p>"
    )
    return report.page(
        f"Traffic eval: {name}",
        status,
        [
            ("Metrics", report.metrics_table({k: v for k, v in summary.items()}, comparison)),
            (
                "Drift",
                statement
                + report.table(
                    drift_rows,
                    [
                        "signal",
                        "status",
                        "psi",
                        "ks",
                        "ks_p",
                        "n_reference",
                        "n_current",
                        "mean_reference",
                        "mean_current",
                        "centroid_cosine_distance",
                    ],
                ),
            ),
            ("Score distributions", '<div class="plots">' + "".join(plots) + "</div>"),
            (
                "Guards against reviewer labels",
                report.table(
                    label_rows,
                    [
                        "guard",
                        "labelled",
                        "positives",
                        "hits",
                        "precision",
                        "recall",
                        "f1",
                        "current_threshold",
                        "best_threshold",
                        "note",
                    ],
                ),
            ),
            ("Trends", _trend_plots(trend, ("block_rate", "flag_rate", "toxicity_rate", "groundedness_mean"), ())),
            (
                "Requests whose outcome changed under the current guards",
                report.table(changed, ["request_id", "logged", "now", "query"]),
            ),
        ],
    )
