"""`gateway eval run` and `gateway eval traffic`: the nightly evaluation.

    gateway eval run --dataset FILE.jsonl [--backend URL] [--min-pass-rate 0.8] [--threshold METRIC=VALUE]
    gateway eval traffic --since 24h [--threshold METRIC=VALUE] [--backend URL] [--json]

Both store an eval run with its items, judge it against its thresholds (`evals.thresholds`),
compare it with the previous run of the same kind and name, and write
DATA_DIR/reports/<kind>-<id>.html and .json.

A run's `status` is its verdict against its thresholds: `passed`, `failed`, or `unchecked` when it
has none (an eval set with none at all gets the default pass_rate >= 0.8, so only a traffic run
without `--threshold` is unchecked); `error` when it could not run. Whether it got worse than the
previous run is the separate `regressed`, and a traffic run's drifted signals are `drifted`.
Exit codes, the first that applies: 2 could not run, 1 failed, 3 regressed, 4 drift (traffic), 0.

`eval traffic` needs no backend: it re-scores the audit log with the guards. Only a policy whose
groundedness method asks a model (`llm`, `hybrid`) needs one, and says so.

A traffic run can be split over processes (a Kubernetes indexed Job):

    gateway eval traffic --until 2026-11-29T00:00:00Z --shard I/N     # N of these, at once
    gateway eval traffic --until 2026-11-29T00:00:00Z --merge [N] [--wait SECONDS]

Shard I re-scores the rows of every set (both windows, the labelled and the rated requests) whose
request id hashes to I, and stores them as items of a `traffic-shard` run named by the run key
(NAME@UNTIL, or `--run-key`): per row its set and position, the query, the label or ratings, and
every score the figures are computed from. The merge waits on the database until the N shards have
stored, refuses shards of another N, window, traffic or guards, rebuilds the rows in their order and
computes the run as one process would (the query embeddings for drift are computed here, from the
stored query texts). Re-scoring one row at a time (`--concurrency 1`, the default) keeps the
figures exact: above 1 the toxicity model batches rows as they meet and scores move in their last
bits.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from evals import dataset as ds
from evals import metrics, promexport, report, store, traffic
from evals.thresholds import DEFAULT_DATASET_THRESHOLDS, Threshold, ThresholdError, combine, parse_flag, verdict
from gateway.db import create_engine
from gateway.services import Services
from gateway.settings import Settings
from serving.backend import Backend, ModelCard
from serving.errors import BackendUnavailable

EXIT_PASSED, EXIT_FAILED, EXIT_ERROR, EXIT_REGRESSED, EXIT_DRIFT = 0, 1, 2, 3, 4
log = logging.getLogger("gateway.eval")
NO_BACKEND = "no backend: pass --backend URL, set GATEWAY_BACKEND, or set backend in the config file"


def exit_code(status: str, regressed: bool, drifted: bool = False) -> int:
    """The first that applies: error 2, failed 1, regressed 3, drift 4, else 0."""
    if status == "error":
        return EXIT_ERROR
    if status == "failed":
        return EXIT_FAILED
    if regressed:
        return EXIT_REGRESSED
    return EXIT_DRIFT if drifted else EXIT_PASSED


class CannotRun(Exception):
    """The run cannot start as configured; the message says what to give it."""


class NoBackend(Backend):
    """Stands in for the backend where a command needs none (re-scoring logged traffic): every call
    that would reach a model says that none is configured."""

    name = "none"

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise BackendUnavailable(NO_BACKEND)

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        raise BackendUnavailable(NO_BACKEND)
        yield []  # pragma: no cover - makes this an async generator, as the interface wants

    async def models(self) -> list[ModelCard]:
        return []

    async def health(self) -> bool:
        return False


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
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="what the run must reach to pass: METRIC=VALUE (the metric's good side), METRIC>=VALUE or "
        "METRIC<=VALUE; repeatable; replaces the eval set's own threshold on the same metric and side",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress messages or bar on stderr")
    parser.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    promexport.add_arguments(parser)


async def _errored(engine: Any, run_id: int, kind: str, name: str, exc: BaseException) -> dict[str, Any]:
    """Mark the run as one that could not run (status "error") and say why; interruptions (Ctrl-C,
    cancellation) still propagate."""
    await store.finish_run(engine, run_id, status="error", metrics={"error": str(exc)})
    if not isinstance(exc, Exception):
        raise exc
    log.exception("%s eval %s could not run", kind, run_id)
    return {
        "run_id": run_id,
        "kind": kind,
        "name": name,
        "status": "error",
        "regressed": False,
        "exit_code": EXIT_ERROR,
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
    parser.add_argument(
        "--min-pass-rate",
        type=float,
        default=None,
        metavar="RATE",
        help="the run fails below this pass rate; the same as --threshold pass_rate>=RATE (an eval set with no "
        "thresholds in its header and none given here gets pass_rate >= 0.8)",
    )
    _common(parser)


def configure_traffic_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `gateway eval traffic`."""
    parser.add_argument("--since", default="24h", help="window length: 90m, 24h, 7d (default 24h)")
    parser.add_argument("--limit", type=int, default=5000, help="most rows re-scored per window (default 5000)")
    parser.add_argument(
        "--labels-since",
        default="30d",
        help="reviewer labels and user ratings given within this long feed back into guard checks (default 30d)",
    )
    parser.add_argument(
        "--include-eval", action="store_true", help="re-score eval runs' own requests too (default: live traffic only)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="rows re-scored at once (default 1). Above 1 the toxicity model batches rows together as they "
        "happen to meet, and a score then moves in its last bits with its batch: PSI at tied decile edges can "
        "change, so runs (and a sharded run against an unsharded one) are exactly reproducible only at 1",
    )
    parser.add_argument(
        "--until",
        default=None,
        metavar="TIME",
        help="the window's end: an ISO 8601 time (UTC unless it names a zone) or `today` (00:00 UTC); "
        "default now; the shards of a run and its merge need the same one",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="re-score only shard I of N (0 <= I < N) of every row set and store it for --merge; exits 0 once "
        "stored (a Kubernetes indexed Job: --shard $(JOB_COMPLETION_INDEX)/N)",
    )
    parser.add_argument(
        "--merge",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="N",
        help="make one run of the shards stored under this run key (all N of them: N as they say, or as "
        "given): figures, verdict, comparison and report as one process would; exit 2 if a shard is missing",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --merge: wait up to this long for missing shards (default 0: check once)",
    )
    parser.add_argument(
        "--run-key",
        default=None,
        help="what the shards and the merge of one run share "
        "(default: NAME@UNTIL, e.g. 'last 24h@2026-11-29T00:00:00Z')",
    )
    _common(parser)


def run_dataset(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway eval run`: `args` holds its own options; `--backend` and `--policy`
    are settings, already in `settings` (gateway.cli builds it)."""
    return _main(args, settings, _dataset, needs_backend=True)


def run_traffic(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway eval traffic`: no backend needed (see the module's docstring)."""
    return _main(args, settings, _traffic, needs_backend=False, before=_shards_stored)


async def _shards_stored(settings: Settings, args: argparse.Namespace) -> None:
    """With --merge: wait for (or check) the shards on a bare database connection, before the guard
    and embedding models load, so that a missing shard is a quick exit 2 and a waiting merge holds
    no models. Where the database cannot answer yet, the run itself says why."""
    if args.merge is None:
        return
    name = args.name or f"last {args.since}"
    key = args.run_key or traffic_run_key(name, args.until)
    scope = _traffic_config(args.since, args.until, args.limit, args.labels_since, args.include_eval)
    engine = create_engine(settings.database_url)
    try:
        await wait_for_shards(engine, key, args.merge or None, scope, args.wait, not args.no_progress)
    except SQLAlchemyError:
        return
    finally:
        await engine.dispose()


def _progress(args: argparse.Namespace, message: str) -> None:
    """A line on stderr about what the run is doing, unless --no-progress."""
    if not getattr(args, "no_progress", False):
        print(f"gateway eval: {message}", file=sys.stderr, flush=True)


def _flags(args: argparse.Namespace) -> list[Threshold]:
    """The thresholds given as flags (`--threshold`, `--min-pass-rate`), in order."""
    flags = [parse_flag(text) for text in getattr(args, "threshold", None) or []]
    rate = getattr(args, "min_pass_rate", None)
    if rate is not None:
        if not 0.0 <= rate <= 1.0:
            raise ThresholdError(f"--min-pass-rate {rate}: a rate between 0 and 1")
        flags.append(Threshold("pass_rate", ">=", float(rate), "flag"))
    return flags


def _quiet_model_loading() -> None:
    """`--no-progress` means no bars on stderr at all: Hugging Face libraries draw their own while a
    model loads (transformers' "Loading weights"), unless told not to."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    for module, function in (("huggingface_hub.utils", "disable_progress_bars"),
                             ("transformers.utils.logging", "disable_progress_bar")):  # fmt: skip
        if module.split(".")[0] in sys.modules:  # imported already: tell it directly
            getattr(importlib.import_module(module), function)()


def _main(args: argparse.Namespace, settings: Settings, job: Any, *, needs_backend: bool, before: Any = None) -> int:
    if getattr(args, "no_progress", False):
        _quiet_model_loading()
    try:
        if getattr(args, "max_tokens", None) is not None and args.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        flags = _flags(args)
        if needs_backend and not settings.backend and not settings.deployments:
            raise ValueError(NO_BACKEND)
        if getattr(args, "since", None) is not None:
            traffic.parse_window(args.since)
            traffic.parse_window(args.labels_since)
            _traffic_flags(args)
        if getattr(args, "dataset", None) is not None:
            eval_set = ds.load_eval_set(args.dataset)
            args.items = eval_set.items
            args.thresholds = combine(eval_set.thresholds, flags, DEFAULT_DATASET_THRESHOLDS)
        else:
            args.thresholds = combine((), flags)
    except ValueError as exc:
        print(f"gateway eval: {exc}", file=sys.stderr)
        return EXIT_ERROR
    # An eval command never serves /metrics: a metrics_port shared with the gateway's config would clash.
    settings = replace(settings, metrics_port=0)
    try:
        if before is not None:
            asyncio.run(before(settings, args))
        summary = asyncio.run(_with_services(settings, args, job))
    except CannotRun as exc:
        print(f"gateway eval: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if summary.get("kind") != SHARD_KIND:  # a shard is no run with figures to export
        promexport.export(summary, args)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return int(summary["exit_code"])


async def _with_services(settings: Settings, args: argparse.Namespace, job: Any) -> dict[str, Any]:
    configured = bool(settings.backend or settings.deployments)
    _progress(
        args,
        f"starting: database, guard models{', embedding model' if settings.rag else ''}"
        + ("" if configured else " (no backend: re-scoring needs none)"),
    )
    services = Services(settings, backend=None if configured else NoBackend())
    await services.start()
    try:
        if not configured:
            assert services.rails is not None
            method = services.rails.describe()["groundedness"]["method"]
            if method != "lexical":
                raise CannotRun(f"the policy's groundedness method {method!r} asks a backend model; {NO_BACKEND}")
        result: dict[str, Any] = await job(services, args)
        return result
    finally:
        await services.stop()


def _traffic_flags(args: argparse.Namespace) -> None:
    """Check and convert `--until`, `--shard`, `--merge`, `--wait`, `--run-key` (ValueError: exit 2)."""
    args.until = parse_until(args.until) if args.until is not None else None
    args.shard = parse_shard(args.shard) if args.shard is not None else None
    if args.shard is not None and args.merge is not None:
        raise ValueError("--shard and --merge are separate steps: the shards first, then one --merge")
    if args.merge is not None and args.merge < 0:
        raise ValueError(f"--merge {args.merge}: the number of shards, at least 1")
    if args.wait < 0 or (args.wait and args.merge is None):
        raise ValueError("--wait SECONDS (>= 0) goes with --merge")
    if (args.shard is not None or args.merge is not None) and args.until is None:
        raise ValueError("--shard and --merge need --until TIME: all shards and the merge must cover one window")
    if args.run_key is not None and not 0 < len(args.run_key) <= 200:
        raise ValueError("--run-key: 1 to 200 characters")


def _print_summary(summary: dict[str, Any]) -> None:
    if summary.get("kind") == SHARD_KIND and summary.get("status") == "stored":
        stored = summary["stored"]
        sets = ", ".join(f"{name} {n}" for name, n in stored["sets"].items())
        print(
            f"shard {summary['shard']} of run {summary['name']!r}: stored {stored['items']} re-scored items "
            f"({sets}; {stored['rescore_errors']} could not be re-scored) as eval run {summary['run_id']} "
            f"in {stored['seconds']} s"
        )
        return
    print(f"run {summary.get('run_id')} ({summary['kind']} {summary['name']}): {summary['status']}")
    if summary.get("verdict"):
        print(f"  {summary['verdict']}")
    if summary.get("error"):
        print(f"  {summary['error']}")
    for key, value in (summary.get("metrics") or {}).items():
        print(f"  {key:<24} {report._fmt(value)}")
    previous = (summary.get("comparison") or {}).get("previous_run")
    if "regressed" in summary and summary.get("status") != "error":
        against = f"against run {previous}" if previous is not None else "no previous run to compare with"
        print(f"  regressed: {'yes' if summary['regressed'] else 'no'} ({against})")
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
    thresholds: list[Threshold] = args.thresholds
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
        thresholds=thresholds,
    )


def _thresholds_config(thresholds: Sequence[Threshold]) -> list[dict[str, Any]]:
    return [{"metric": t.metric, "op": t.op, "value": t.value, "source": t.source} for t in thresholds]


async def evaluate_dataset(
    services: Services,
    items: Sequence[ds.EvalItem],
    *,
    name: str,
    options: ds.RunOptions,
    config: dict[str, Any] | None = None,
    tolerance: float = 0.05,
    latency_margin: float = 0.5,
    thresholds: Sequence[Threshold] | None = None,
) -> dict[str, Any]:
    """Run, judge, store, compare and report one eval set; returns the JSON summary (with
    `exit_code`). `thresholds` None: the default (pass_rate >= 0.8)."""
    engine = services.engine
    rules = list(DEFAULT_DATASET_THRESHOLDS if thresholds is None else thresholds)
    config = {**(config or {}), "thresholds": _thresholds_config(rules)}
    run_id = await store.create_run(engine, "dataset", name, config)
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
        judged = verdict(rules, summary_metrics)
        comparison["thresholds"] = judged.checks
        status, regressed = judged.status, bool(comparison["regressed"])
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
            "verdict": judged.reason,
            "regressed": regressed,
            "thresholds": judged.checks,
            "exit_code": exit_code(status, regressed),
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
            _dataset_html(name, summary, comparison, results, trend),
            summary,
        )
        return summary
    except BaseException as exc:
        return await _errored(engine, run_id, "dataset", name, exc)


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


def _verdict_section(summary: dict[str, Any]) -> tuple[str, str]:
    checks = summary.get("thresholds") or []
    table = (
        report.table(
            [{**c, "result": "met" if c["ok"] else "NOT MET"} for c in checks],
            ["metric", "op", "value", "actual", "result", "source", "note"],
        )
        if checks
        else "<p>No thresholds: this run's status says nothing about its quality.</p>"
    )
    return "Verdict", f"<p>{report.escape(str(summary.get('verdict') or ''))}</p>{table}"


def _dataset_html(
    name: str,
    run: dict[str, Any],
    comparison: dict[str, Any],
    results: Sequence[dict[str, Any]],
    trend: Sequence[dict[str, Any]],
) -> str:
    summary: dict[str, Any] = run["metrics"]
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
        run["status"],
        [
            _verdict_section(run),
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
        regressed=run["regressed"],
    )


# ------------------------------------------------------------------ traffic runs


async def _traffic(services: Services, args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = {
        "since": args.since,
        "limit": args.limit,
        "labels_since": args.labels_since,
        "name": args.name,
        "now": args.until,
        "progress": not args.no_progress,
        "include_eval": args.include_eval,
        "concurrency": args.concurrency,
    }
    if args.shard is not None:
        index, shards = args.shard
        return await rescore_traffic_shard(services, shard=index, shards=shards, run_key=args.run_key, **common)
    rules = {"tolerance": args.tolerance, "latency_margin": args.latency_margin, "thresholds": args.thresholds}
    if args.merge is not None:
        return await merge_traffic(
            services, shards=args.merge or None, wait=args.wait, run_key=args.run_key, **common, **rules
        )
    return await evaluate_traffic(services, **common, **rules)


#: `eval_runs.kind` of a shard's stored items; its `name` is the run key that its shards share.
SHARD_KIND = "traffic-shard"
#: The row sets a traffic run re-scores: the two windows, the reviewer-labelled and the user-rated requests.
SETS = ("current", "previous", "labelled", "rated")


def parse_until(text: str) -> datetime:
    """`--until`: an ISO 8601 time (UTC unless it names a zone), or `today` (00:00 UTC of the
    current day, so that pods started minutes apart agree on it)."""
    if text.strip().lower() == "today":
        return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--until {text!r}: an ISO 8601 time such as 2026-11-29T00:00:00Z, or today") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N), 0 <= I < N."""
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not slash or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I/N with 0 <= I < N, e.g. --shard 0/3")
    return i, n


def guards_fingerprint(services: Services) -> str:
    """What decides a re-score: the guards, their actions and thresholds, the toxicity model (its
    weights' hash). Shards of one run, and the merge, must have loaded the same."""
    assert services.rails is not None
    seen = {"guards": services.rails.describe(), "thresholds": traffic.current_thresholds(services.rails)}
    return hashlib.sha256(store.dumps(seen).encode()).hexdigest()


def traffic_run_key(name: str, until: datetime) -> str:
    """What the shards of one run and its merge share: the run name and the window's end."""
    return f"{name}@{until.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _traffic_config(since: str, now: datetime, limit: int, labels_since: str, include_eval: bool) -> dict[str, Any]:
    window = traffic.parse_window(since)
    return {
        "since": since,
        "window": [str(now - window), str(now)],
        "previous": [str(now - 2 * window), str(now - window)],
        "limit": limit,
        "labels_since": labels_since,
        "include_eval": include_eval,
    }


async def _load_sets(
    engine: Any, scope: dict[str, Any], now: datetime, shard: int = 0, shards: int = 1
) -> tuple[dict[str, list[tuple[int, dict[str, Any], Any]]], dict[str, str]]:
    """Every row set of the run, each in its order: (position in the whole set, row, extra), where
    extra is the reviewer label (labelled), the ratings (rated) or None; only this shard's share
    (a hash of the request id) unless `shards` is 1. Also a digest of each whole set, which the
    shards of one run must agree on (they saw the same traffic)."""
    window = traffic.parse_window(scope["since"])
    labels_start = now - traffic.parse_window(scope["labels_since"])
    limit, include_eval = scope["limit"], scope["include_eval"]
    labels = await traffic.labels_since(engine, labels_start, limit, now)
    ratings = await traffic.ratings_by_request(engine, labels_start, limit, include_eval=include_eval, until=now)
    extras: dict[str, dict[str, Any]] = {
        "current": dict.fromkeys(await traffic.window_ids(engine, now - window, now, limit, include_eval=include_eval)),
        "previous": dict.fromkeys(
            await traffic.window_ids(engine, now - 2 * window, now - window, limit, include_eval=include_eval)
        ),
        "labelled": dict(labels),
        "rated": dict(ratings),
    }
    spans = {"current": (now - window, now), "previous": (now - 2 * window, now - window)}
    sets: dict[str, list[tuple[int, dict[str, Any], Any]]] = {}
    digests: dict[str, str] = {}
    for name in SETS:
        whole = extras[name]
        digest = hashlib.sha256()
        for request_id, extra in whole.items():
            kept = extra if name != "rated" else [traffic.rating_json(r) for r in extra]
            digest.update(store.dumps([request_id, kept]).encode("utf-8", "surrogatepass") + b"\n")
        digests[name] = digest.hexdigest()
        mine = [(pos, i) for pos, i in enumerate(whole) if shards == 1 or traffic.shard_of(i, shards) == shard]
        created = spans.get(name)
        fetched = await traffic.rows_by_id(engine, [i for _, i in mine], created=created, **_origin(scope))
        rows = {r["request_id"]: r for r in fetched}
        sets[name] = [(pos, rows[i], whole[i]) for pos, i in mine if i in rows]
    return sets, digests


def _origin(scope: dict[str, Any]) -> dict[str, bool]:
    return {"include_eval": bool(scope["include_eval"])}


async def _rescore_sets(
    services: Services, sets: dict[str, list[tuple[int, dict[str, Any], Any]]], progress: bool, concurrency: int
) -> dict[str, list[tuple[int, traffic.Rescored | None, Any]]]:
    assert services.rails is not None
    out: dict[str, list[tuple[int, traffic.Rescored | None, Any]]] = {}
    with traffic.progress_bar(sum(len(s) for s in sets.values()), enabled=progress) as bar:
        for name in SETS:
            rows = [row for _, row, _ in sets[name]]
            rescored = await traffic.rescore_all(services.rails, rows, concurrency=concurrency, bar=bar)
            out[name] = [(pos, r, extra) for (pos, _, extra), r in zip(sets[name], rescored, strict=True)]
    return out


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
    thresholds: Sequence[Threshold] = (),
    include_eval: bool = False,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Re-score two windows of traffic, measure drift, check the guards against reviewer labels and
    user ratings, judge against `thresholds` (none: status "unchecked"), store, compare and report.
    A row the guards cannot re-score is left out and counted (`rescore_errors`), never fatal."""
    assert services.rails is not None, "call services.start() first"
    now = now or datetime.now(UTC)
    name = name or f"last {since}"
    scope = _traffic_config(since, now, limit, labels_since, include_eval)
    config = {**scope, "tolerance": tolerance, "thresholds": _thresholds_config(thresholds)}
    run_id = await store.create_run(services.engine, "traffic", name, config)
    try:
        sets, _ = await _load_sets(services.engine, scope, now)
        rescored = await _rescore_sets(services, sets, progress, concurrency)
        return await _conclude_traffic(
            services, run_id, name, scope, now, rescored,
            tolerance=tolerance, latency_margin=latency_margin, thresholds=thresholds,
        )  # fmt: skip
    except BaseException as exc:
        return await _errored(services.engine, run_id, "traffic", name, exc)


async def rescore_traffic_shard(
    services: Services,
    *,
    shard: int,
    shards: int,
    now: datetime | None,
    since: str = "24h",
    limit: int = 5000,
    labels_since: str = "30d",
    name: str | None = None,
    run_key: str | None = None,
    progress: bool = False,
    include_eval: bool = False,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Shard `shard` of `shards`: re-score this shard's share of every row set of the run and store
    it as items of a `traffic-shard` run named by the run key, for `merge_traffic`. Nothing is
    judged here; the summary says what was stored (exit code 0, or 2 when it could not run)."""
    if now is None:
        raise CannotRun("--shard needs --until: every shard and the merge must cover the same window")
    name = name or f"last {since}"
    key = run_key or traffic_run_key(name, now)
    scope = _traffic_config(since, now, limit, labels_since, include_eval)
    started = time.perf_counter()
    config: dict[str, Any] = {
        "run_key": key,
        "run_name": name,
        "shard": shard,
        "shards": shards,
        "scope": scope,
        "guards": guards_fingerprint(services),
    }
    run_id = await store.create_run(services.engine, SHARD_KIND, key, config)
    try:
        sets, digests = await _load_sets(services.engine, scope, now, shard, shards)
        rescored = await _rescore_sets(services, sets, progress, concurrency)
        items: list[dict[str, Any]] = []
        for set_name in SETS:
            for (pos, row, extra), (_, r, _) in zip(sets[set_name], rescored[set_name], strict=True):
                request_id = row["request_id"]
                item: dict[str, Any] = {"position": len(items), "input": {"set": set_name, "pos": pos}}
                if set_name == "labelled":
                    item["input"]["label"] = extra
                elif set_name == "rated":
                    item["input"]["ratings"] = [traffic.rating_json(x) for x in extra]
                if r is None:
                    item |= {"request_id": request_id, "error": "could not re-score"}
                else:
                    item["input"] |= {"query": r.query, "model": r.row.get("model")}
                    item |= {"request_id": request_id, "scores": traffic.rescored_scores(r), "passed": not r.changed}
                    if set_name == "current":  # the merged run's items show the answer
                        item["output_text"] = r.row.get("response_text")
                items.append(item)
        await store.add_items(services.engine, run_id, items)
        counts = {s: len(rescored[s]) for s in SETS}
        failed = sum(1 for s in SETS for _, r, _ in rescored[s] if r is None)
        stored = {"items": len(items), "sets": counts, "rescore_errors": failed,
                  "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
        await store.finish_run(
            services.engine, run_id, status="stored", metrics=stored, comparison={"digests": digests}
        )
    except BaseException as exc:
        return await _errored(services.engine, run_id, SHARD_KIND, key, exc)
    return {
        "run_id": run_id,
        "kind": SHARD_KIND,
        "name": key,
        "status": "stored",
        "shard": f"{shard}/{shards}",
        "stored": stored,
        "exit_code": EXIT_PASSED,
    }


async def _shards_ready(
    engine: Any, key: str, shards: int | None, scope: dict[str, Any]
) -> tuple[list[dict[str, Any]], str | None]:
    """The newest stored run of each shard of `key`, or what is missing; raises CannotRun where the
    stored shards cannot make one run (different N, a different window or options, other traffic)."""
    stored = [r for r in await store.runs_named(engine, SHARD_KIND, key) if r["status"] == "stored"]
    counts = sorted({int(r["config"]["shards"]) for r in stored})
    if len(counts) > 1 or (shards is not None and counts and counts != [shards]):
        said = f"; --merge {shards}" if shards is not None else ""
        raise CannotRun(
            f"run {key}: shards of different N were stored ({', '.join(f'N={n}' for n in counts)}{said}); "
            "they cannot merge: rerun every shard with one N, or under a new --run-key"
        )
    total = shards or (counts[0] if counts else None)
    newest = {int(r["config"]["shard"]): r for r in stored}  # oldest first: a retried shard's newest wins
    for r in newest.values():
        if r["config"]["scope"] != scope:
            raise CannotRun(
                f"run {key}: shard {r['config']['shard']}/{total} covered {r['config']['scope']}, the merge "
                f"{scope}: give the merge the same --since, --until, --limit, --labels-since and --include-eval"
            )
    if total is None:
        return [], f"run {key}: no shard stored yet"
    missing = [i for i in range(total) if i not in newest]
    if missing:
        return [], f"run {key}: shard(s) {', '.join(f'{i}/{total}' for i in missing)} not stored yet"
    runs = [newest[i] for i in range(total)]
    return runs, None


async def wait_for_shards(
    engine: Any, key: str, shards: int | None, scope: dict[str, Any], wait: float, progress: bool
) -> list[dict[str, Any]]:
    """The stored run of every shard of `key`, once all are stored, waiting up to `wait` seconds;
    CannotRun (exit 2) for one still missing then, or for shards that cannot make one run."""
    deadline = time.monotonic() + wait
    while True:
        runs, missing = await _shards_ready(engine, key, shards, scope)
        if missing is None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            hint = " (--wait SECONDS waits for them)" if wait <= 0 else f" after waiting {wait:g} s"
            raise CannotRun(missing + hint)
        _progress_message(progress, f"{missing}; waiting")
        await asyncio.sleep(min(5.0, left))
    digests = [r["comparison"].get("digests") for r in runs]
    if any(d != digests[0] for d in digests):
        raise CannotRun(f"run {key}: the shards saw different traffic in the same window (rows or labels changed "
                        "between them); rerun every shard")  # fmt: skip
    return runs


async def merge_traffic(
    services: Services,
    *,
    shards: int | None,
    now: datetime | None,
    wait: float = 0.0,
    since: str = "24h",
    limit: int = 5000,
    labels_since: str = "30d",
    name: str | None = None,
    run_key: str | None = None,
    tolerance: float = 0.05,
    latency_margin: float = 0.5,
    progress: bool = False,
    thresholds: Sequence[Threshold] = (),
    include_eval: bool = False,
    concurrency: int = 1,
) -> dict[str, Any]:
    """One traffic run from the items its shards stored: waits up to `wait` seconds for every shard
    (CannotRun, exit 2, if one is still missing), then computes, stores, judges, compares and reports
    exactly as `evaluate_traffic` in one process would."""
    assert services.rails is not None, "call services.start() first"
    if now is None:
        raise CannotRun("--merge needs --until: the window end its shards were given")
    name = name or f"last {since}"
    key = run_key or traffic_run_key(name, now)
    scope = _traffic_config(since, now, limit, labels_since, include_eval)
    engine = services.engine
    runs = await wait_for_shards(engine, key, shards, scope, wait, progress)
    mine = guards_fingerprint(services)
    if any(r["config"].get("guards") != mine for r in runs):
        raise CannotRun(
            f"run {key}: the shards re-scored with other guards than this merge loads (a guard model or the "
            "policy changed between them): rerun every shard"
        )
    rescored: dict[str, list[tuple[int, traffic.Rescored | None, Any]]] = {s: [] for s in SETS}
    for item in await store.run_items(engine, [r["id"] for r in runs]):
        given, stored = item["input"], item["scores"]
        set_name, request_id = given["set"], str(item["request_id"])
        extra: Any = None
        if set_name == "labelled":
            extra = given["label"]
        elif set_name == "rated":
            extra = [traffic.rating_from(request_id, x) for x in given["ratings"]]
        r = None
        if item["error"] is None:
            r = traffic.rescored_from(request_id, given["query"], given["model"], item["output_text"], stored)
        rescored[set_name].append((int(given["pos"]), r, extra))
    for set_name in SETS:
        rescored[set_name].sort(key=lambda entry: entry[0])
    config = {**scope, "tolerance": tolerance, "thresholds": _thresholds_config(thresholds),
              "run_key": key, "shards": len(runs), "shard_runs": [r["id"] for r in runs]}  # fmt: skip
    run_id = await store.create_run(engine, "traffic", name, config)
    try:
        return await _conclude_traffic(
            services, run_id, name, scope, now, rescored,
            tolerance=tolerance, latency_margin=latency_margin, thresholds=thresholds,
        )  # fmt: skip
    except BaseException as exc:
        return await _errored(engine, run_id, "traffic", name, exc)


def _progress_message(enabled: bool, message: str) -> None:
    if enabled:
        print(f"gateway eval: {message}", file=sys.stderr, flush=True)


async def _conclude_traffic(
    services: Services,
    run_id: int,
    name: str,
    scope: dict[str, Any],
    now: datetime,
    rescored: dict[str, list[tuple[int, traffic.Rescored | None, Any]]],
    *,
    tolerance: float,
    latency_margin: float,
    thresholds: Sequence[Threshold],
) -> dict[str, Any]:
    """Everything after re-scoring, the same for one process and for a merge of shards: drift, the
    guards against labels and ratings, the verdict, the stored items, the comparison and the report."""
    assert services.rails is not None
    engine = services.engine
    window = traffic.parse_window(scope["since"])
    ratings_now = await traffic.load_ratings(engine, now - window, now, **_origin(scope))
    ratings_before = await traffic.load_ratings(engine, now - 2 * window, now - window, **_origin(scope))
    failed = sum(1 for s in SETS for _, r, _ in rescored[s] if r is None)
    current = [r for _, r, _ in rescored["current"] if r is not None]
    previous = [r for _, r, _ in rescored["previous"] if r is not None]
    labelled = [(r, str(label)) for _, r, label in rescored["labelled"] if r is not None]
    rated = [(r, list(votes)) for _, r, votes in rescored["rated"] if r is not None]
    rails = services.rails
    drift = await traffic.drift_report(previous, current, services.embedder)
    drift["ratings"] = metrics.categorical_drift(
        traffic.rating_counts(ratings_before), traffic.rating_counts(ratings_now)
    )
    guard_thresholds = traffic.current_thresholds(rails)
    feedback = traffic.label_feedback(labelled, guard_thresholds)
    by_ratings = traffic.rating_feedback(rated, guard_thresholds)
    mix, mix_before = traffic.rating_mix(ratings_now), traffic.rating_mix(ratings_before)
    summary_metrics = traffic.summarise(current, previous, drift, feedback, len(labelled), mix, by_ratings)
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
    drifted = list(summary_metrics["drifted"])
    judged = verdict(thresholds, summary_metrics)
    comparison["thresholds"] = judged.checks
    status, regressed = judged.status, bool(comparison["regressed"])
    html_path, json_path = _paths(services, "traffic", run_id)
    ratings = {"mix": mix, "mix_previous": mix_before, "drift": drift["ratings"], "guards": by_ratings}
    full_metrics = {**summary_metrics, "drift": drift, "labels": feedback, "rating_feedback": ratings}
    await store.finish_run(
        engine, run_id, status=status, metrics=full_metrics, comparison=comparison, report_path=str(html_path)
    )
    summary = {
        "run_id": run_id,
        "kind": "traffic",
        "name": name,
        "status": status,
        "verdict": judged.reason,
        "regressed": regressed,
        "drifted": drifted,
        "thresholds": judged.checks,
        "exit_code": exit_code(status, regressed, bool(drifted)),
        "metrics": summary_metrics,
        "drift": drift,
        "labels": feedback,
        "rating_feedback": ratings,
        "comparison": comparison,
        "report": str(html_path),
        "summary": str(json_path),
    }
    trend = await store.history(engine, "traffic", name)
    report.write(
        html_path.parent,
        html_path.stem,
        _traffic_html(name, summary, comparison, current, previous, trend),
        summary,
    )
    return summary


def _ratings_section(ratings: dict[str, Any]) -> str:
    mix, before, drift = ratings["mix"], ratings["mix_previous"], ratings["drift"]
    rows = [
        {"window": label, **{k: m.get(k) for k in ("ratings", "rated_requests", "rating_positive_rate",
                                                    "rating_neutral_rate", "rating_negative_rate", "rating_mean",
                                                    "negative_categories")}}
        for label, m in (("previous", before), ("current", mix))
    ]  # fmt: skip
    statement = (
        "<p>Per request and key the newest rating counts. Drift of the mix: PSI over the three shares "
        f"({drift.get('status')}, PSI {report._fmt(drift.get('psi'))}, "
        f"chi-square p {report._fmt(drift.get('chi2_p'))}; "
        f"fewer than {metrics.MIN_SAMPLES} ratings in a window: insufficient data).</p>"
    )
    guard_rows = [{"guard": g, **{k: v for k, v in f.items() if k != "guard"}} for g, f in ratings["guards"].items()]
    guards = report.table(
        guard_rows,
        ["guard", "positive_categories", "labelled", "positives", "hits", "precision", "recall", "f1",
         "left_out_no_reason", "current_threshold", "best_threshold"],
    )  # fmt: skip
    mapping = (
        "<p>A request is a positive for the toxicity guard (on the answer) and for the output guards as a whole "
        "when a user's newest rating is -1 naming unsafe or toxic; for groundedness when it is -1 naming wrong or "
        "hallucination. Other ratings are negatives; a -1 that names no category is left out.</p>"
    )
    return statement + report.table(rows, list(rows[0])) + mapping + guards


def _traffic_html(
    name: str,
    run: dict[str, Any],
    comparison: dict[str, Any],
    current: Sequence[traffic.Rescored],
    previous: Sequence[traffic.Rescored],
    trend: Sequence[dict[str, Any]],
) -> str:
    summary: dict[str, Any] = run["metrics"]
    drift: dict[str, Any] = run["drift"]
    feedback: dict[str, Any] = run["labels"]
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
        run["status"],
        [
            _verdict_section(run),
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
            ("User ratings", _ratings_section(run["rating_feedback"])),
            (
                "Trends",
                _trend_plots(
                    trend, ("block_rate", "flag_rate", "toxicity_rate", "groundedness_mean", "rating_negative_rate"), ()
                ),
            ),
            (
                "Requests whose outcome changed under the current guards",
                report.table(changed, ["request_id", "logged", "now", "query"]),
            ),
        ],
        regressed=run["regressed"],
        drifted=run["drifted"],
    )
