"""Prometheus metrics: per-request figures taken from the finished `Trace`, live gauges read at scrape time.

One `GatewayMetrics` per app (its own `CollectorRegistry`, no module-level state). The pipeline
calls `observe(trace)` once per request, from `Pipeline.record`, where its outcome is known;
nothing inside the pipeline's stages touches a metric. Queue depths, backend health, index
sizes and limiter refusals are read from the live objects by a custom collector when Prometheus
scrapes, so they cost nothing per request.

Label values never come straight from a client: a model the gateway does not serve is counted as
"other", a backend it does not know as "other"; guard names and stages come from the code.

Requests of eval runs (`trace.origin == "eval"`) are not live traffic: they are counted only in
`gateway_eval_requests_total` (by outcome), never in the request, stage, token or guard figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from gateway.metrics_share import MetricsShare
    from gateway.services import Services

log = logging.getLogger("gateway.metrics")

#: Pipeline stages, in order; `total` is the whole request as the client saw it.
STAGES = (
    "auth",
    "input_guards",
    "embed",
    "search",
    "passage_guards",
    "backend_ttft",
    "backend_total",
    "output_guards",
    "audit_commit",
    "total",
)
OUTCOMES = ("ok", "blocked", "rate_limited", "error", "client_disconnected")
#: Seconds: 50 us to 10 min, so sub-millisecond steps (auth from cache, keyword guards) resolve.
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORED_GUARDS = frozenset({"toxicity", "groundedness"})
OTHER = "other"
_MODEL_REFRESH_S = 5.0


def outcome(status: str) -> str:
    """The request's outcome label from the Trace's status (bounded: five values)."""
    return status if status in OUTCOMES else "error"


def status_class(http_status: int) -> str:
    return f"{http_status // 100}xx" if 100 <= http_status < 600 else "other"


class TraceLike(Protocol):
    """What `observe` reads of a `gateway.pipeline.Trace` (kept structural so tests can fake one)."""

    endpoint: Any
    model: str | None
    backend: str | None
    status: str
    http_status: int
    stream: bool
    started: float
    usage: dict[str, Any] | None
    backend_s: float
    ttft_s: float | None
    verdicts: list[Any]
    retrieval: dict[str, Any] | None


def stage_seconds(trace: TraceLike, now: float) -> dict[str, float]:
    """Stage -> seconds for one request: the Trace's own `stages` when it keeps them, else what it has."""
    stages: dict[str, float] | None = getattr(trace, "stages", None)
    out = dict(stages) if stages else {}
    if not stages:
        if trace.backend is not None or trace.backend_s:
            out["backend_total"] = trace.backend_s
        if trace.ttft_s is not None:
            out["backend_ttft"] = trace.ttft_s
        retrieval = trace.retrieval or {}
        if "embed_ms" in retrieval:
            out["embed"] = float(retrieval["embed_ms"]) / 1000
            out["search"] = float(retrieval.get("search_ms") or 0.0) / 1000
        guarded: dict[str, float] = {}
        for verdict in trace.verdicts:
            stage = {"input": "input_guards", "output": "output_guards"}.get(verdict.stage, "passage_guards")
            guarded[stage] = guarded.get(stage, 0.0) + verdict.ms / 1000
        out.update(guarded)
    for stage, attribute in (("auth", "auth_s"), ("audit_commit", "audit_s")):
        seconds = getattr(trace, attribute, None)
        if seconds is not None:
            out[stage] = seconds
    out["total"] = now - trace.started
    return out


class _Hist:
    """One histogram series: per-bucket counts (the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # empty: a counter


REQUESTS = _Family(
    "gateway_requests",
    "Requests served, by endpoint, model, backend, HTTP status class and outcome.",
    ("endpoint", "model", "backend", "status_class", "outcome"),
)
STAGE_SECONDS = _Family(
    "gateway_request_stage_duration_seconds",
    "Time spent in each step of the pipeline (stage=total: the whole request as the client saw it).",
    ("endpoint", "stage"),
    STAGE_BUCKETS,
)
TOKENS = _Family(
    "gateway_tokens", "Tokens by model and direction (in: prompt, out: completion).", ("model", "direction")
)
TOKENS_PER_S = _Family(
    "gateway_stream_tokens_per_second",
    "Completion tokens per second of backend time, per streamed answer.",
    ("model",),
    TOKENS_PER_S_BUCKETS,
)
VERDICTS = _Family(
    "gateway_guard_verdicts", "Guard verdicts by guard, stage and action (allow, flag, redact, block).",
    ("guard", "stage", "action"),
)  # fmt: skip
SCORES = _Family("gateway_guard_score", "Scores of the scoring guards (toxicity, groundedness), 0-1.", ("guard",),
                 SCORE_BUCKETS)  # fmt: skip
EVAL_REQUESTS = _Family(
    "gateway_eval_requests",
    "Requests sent by eval runs through this process's pipeline, by outcome (left out of every other figure).",
    ("outcome",),
)


class GatewayMetrics:
    """The gateway's metrics in one registry; `observe(trace)` per request, `render()` per scrape.

    Per-request figures are plain dicts of numbers, turned into Prometheus families by a custom
    collector at scrape time: prometheus-client's own Counter and Histogram take a lock and
    validate on every call (about 2.5 us each, some 40 us per request here), and the event loop
    is the only writer. A scrape from the side port's thread may see one request half counted;
    a histogram's count is derived from its buckets, so it is always consistent with them.
    """

    def __init__(
        self,
        *,
        served_models: Callable[[], Iterable[str]] = tuple,
        known_backends: Callable[[], Iterable[str]] = tuple,
        live: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._served_models = served_models
        self._known_backends = known_backends
        self._models: frozenset[str] = frozenset()
        self._backends: frozenset[str] = frozenset()
        self._models_at = -_MODEL_REFRESH_S
        self.requests: dict[tuple[str, ...], float] = {}
        self.stages: dict[tuple[str, str], _Hist] = {}
        self.tokens: dict[tuple[str, str], float] = {}
        self.tokens_per_s: dict[tuple[str], _Hist] = {}
        self.verdicts: dict[tuple[str, str, str], float] = {}
        self.scores: dict[tuple[str], _Hist] = {}
        self.eval_requests: dict[tuple[str], float] = {}
        self.share: MetricsShare | None = None  # `--workers N`: /metrics sums every worker's figures
        self.registry.register(_RequestCollector(self))
        if live is not None:
            self.registry.register(_LiveCollector(live))

    # -- labels ---------------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        self._models_at = now
        try:
            self._models = frozenset(self._served_models())
            self._backends = frozenset(self._known_backends())
        except Exception:  # a scrape-side helper must never fail a request
            log.exception("metrics: reading the served models failed")

    def model_label(self, model: str | None, now: float) -> str:
        if model is None:
            return "none"
        if model in self._models:
            return model
        if now - self._models_at > _MODEL_REFRESH_S:  # a model loaded since: look again, at most every 5 s
            self._refresh(now)
            if model in self._models:
                return model
        return OTHER

    def backend_label(self, backend: str | None) -> str:
        if backend is None:
            return "none"
        return backend if backend in self._backends else OTHER

    # -- per request ----------------------------------------------------------------------------

    def observe(self, trace: TraceLike) -> None:
        """Count one finished request. Never raises: metrics must not fail a request."""
        try:
            self._observe(trace)
        except Exception:
            log.exception("metrics: observing a request failed")

    def _observe(self, trace: TraceLike) -> None:
        if getattr(trace, "origin", None) == "eval":  # an eval run's request is not live traffic
            key1 = (outcome(trace.status),)
            self.eval_requests[key1] = self.eval_requests.get(key1, 0) + 1
            return
        now = time.perf_counter()
        endpoint = trace.endpoint.name
        model = self.model_label(trace.model, now)
        key = (endpoint, model, self.backend_label(trace.backend), status_class(trace.http_status),
               outcome(trace.status))  # fmt: skip
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        stages = self.stages
        for stage, seconds in stage_seconds(trace, now).items():
            hist = stages.get((endpoint, stage))
            if hist is None:
                hist = stages[(endpoint, stage)] = _Hist(len(STAGE_BUCKETS))
            hist.counts[bisect_left(STAGE_BUCKETS, seconds)] += 1
            hist.sum += seconds
        usage = trace.usage
        if usage:
            tokens = self.tokens
            prompt = usage.get("prompt_tokens")
            if type(prompt) is int and prompt > 0:
                tokens[(model, "in")] = tokens.get((model, "in"), 0) + prompt
            completion = usage.get("completion_tokens")
            if type(completion) is int and completion > 0:
                tokens[(model, "out")] = tokens.get((model, "out"), 0) + completion
                if trace.stream and trace.backend_s > 0:
                    tps = self.tokens_per_s.get((model,))
                    if tps is None:
                        tps = self.tokens_per_s[(model,)] = _Hist(len(TOKENS_PER_S_BUCKETS))
                    rate = completion / trace.backend_s
                    tps.counts[bisect_left(TOKENS_PER_S_BUCKETS, rate)] += 1
                    tps.sum += rate
        verdicts = self.verdicts
        for verdict in trace.verdicts:
            vkey = (verdict.guard, verdict.stage, verdict.action)
            verdicts[vkey] = verdicts.get(vkey, 0) + 1
            if verdict.guard in SCORED_GUARDS:
                score = self.scores.get((verdict.guard,))
                if score is None:
                    score = self.scores[(verdict.guard,)] = _Hist(len(SCORE_BUCKETS))
                score.counts[bisect_left(SCORE_BUCKETS, verdict.score)] += 1
                score.sum += verdict.score

    # -- per scrape -----------------------------------------------------------------------------

    def render(self) -> bytes:
        if self.share is not None:
            return self.share.render()
        return generate_latest(self.registry)


class _RequestCollector:
    """The per-request figures of one `GatewayMetrics`, as Prometheus families."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _counter(REQUESTS, m.requests)
        yield _histogram(STAGE_SECONDS, m.stages)
        yield _counter(TOKENS, m.tokens)
        yield _histogram(TOKENS_PER_S, m.tokens_per_s)
        yield _counter(VERDICTS, m.verdicts)
        yield _histogram(SCORES, m.scores)
        yield _counter(EVAL_REQUESTS, m.eval_requests)


def _counter(family: _Family, values: dict[Any, float]) -> Metric:
    metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
    for labels, value in list(values.items()):
        metric.add_metric(labels, value)
    return metric


def _histogram(family: _Family, values: dict[Any, _Hist]) -> Metric:
    metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
    bounds = [*(repr(float(b)) for b in family.buckets), "+Inf"]
    for labels, hist in list(values.items()):
        cumulative, running = [], 0
        for bound, count in zip(bounds, list(hist.counts), strict=True):
            running += count
            cumulative.append((bound, running))
        metric.add_metric(labels, cumulative, hist.sum)
    return metric


class _LiveCollector:
    """Gauges read from the live objects at scrape time (zero cost per request)."""

    def __init__(self, live: Callable[[], Iterable[Metric]]) -> None:
        self._live = live

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._live()
        except Exception:
            log.exception("metrics: reading live gauges failed")


def retrieval_cache_metrics(store: Any) -> Iterator[Metric]:
    """Hits and misses of the query-embedding and result caches (hit rate = hits / (hits + misses))."""
    for cache_name, cache in (("query_embedding", store.query_cache), ("result", store.result_cache)):
        yield CounterMetricFamily(f"gateway_retrieval_{cache_name}_cache_hits", "Cache hits.", value=cache.hits)
        yield CounterMetricFamily(f"gateway_retrieval_{cache_name}_cache_misses", "Cache misses.", value=cache.misses)
        yield GaugeMetricFamily(f"gateway_retrieval_{cache_name}_cache_entries", "Entries kept.", value=len(cache))


def live_metrics(services: Services) -> Iterator[Metric]:
    """Audit writer, backends, retrieval indexes and limiter, as they are now."""
    from serving.router import DeploymentRouter, Router

    audit = services.audit
    yield GaugeMetricFamily("gateway_audit_queue_rows", "Audit rows waiting for the writer.", value=audit.pending)
    yield CounterMetricFamily(
        "gateway_audit_rows_committed", "Audit rows committed to the database.", value=audit.committed
    )
    yield CounterMetricFamily(
        "gateway_audit_rows_spooled", "Audit rows written to the spool file (database unreachable).",
        value=audit.spooled,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "gateway_audit_spool_bytes", "Size of the audit spool waiting for replay.", value=spool_bytes(services)
    )
    up = GaugeMetricFamily("gateway_backend_up", "1: healthy and not cooling down.", labels=["backend"])
    in_flight = GaugeMetricFamily("gateway_backend_in_flight", "Requests in flight per backend.", labels=["backend"])
    if isinstance(services.backend, Router | DeploymentRouter):
        for name, ok, busy, _models in services.backend.status():
            up.add_metric([name], 1.0 if ok else 0.0)
            in_flight.add_metric([name], busy)
    yield up
    yield in_flight
    chunks = GaugeMetricFamily("gateway_retrieval_index_chunks", "Chunks in the loaded index.", labels=["collection"])
    version = GaugeMetricFamily(
        "gateway_retrieval_index_info", "The loaded index version per collection (value 1).",
        labels=["collection", "version"],
    )  # fmt: skip
    if services.store is not None:
        for collection, (name, size) in services.store.loaded().items():
            chunks.add_metric([collection], size)
            version.add_metric([collection, name], 1.0)
    yield chunks
    yield version
    if services.store is not None:
        yield from retrieval_cache_metrics(services.store)
    batcher = services.rails.resources.toxicity_batcher if services.rails is not None else None
    if batcher is not None:  # the toxicity guard's score cache (guardrails.toxicity.BatchingScorer)
        yield CounterMetricFamily(
            "gateway_toxicity_cache_hits", "Texts scored from the cache.", value=batcher.cache_hits
        )
        yield CounterMetricFamily(
            "gateway_toxicity_cache_misses", "Texts the toxicity scorer ran on.", value=batcher.cache_misses
        )
    if services.evals is not None:
        yield from services.evals.collect()
    yield CounterMetricFamily(
        "gateway_rate_limit_rejections", "Requests refused by rate limits or quotas.", value=services.limiter.refused
    )
    yield from services.rollout.collect()  # shadow copies sent and dropped, config version, reloads


def spool_bytes(services: Services) -> int:
    """This replica's audit spool (each replica spools to a file of its own)."""
    return services.audit.spool_bytes()


def served_models(services: Services) -> list[str]:
    """Model names the gateway serves: the backends' models, the aliases and the embedding model."""
    from gateway.pipeline import EMBEDDING_MODEL_ALIAS
    from serving.router import DeploymentRouter, Router

    names = list(services.settings.aliases)
    if isinstance(services.backend, Router | DeploymentRouter):
        names += [m for *_, models in services.backend.status() for m in models]
    if isinstance(services.backend, DeploymentRouter):
        names += services.backend.client_models()
    if services.embedder is not None:
        names += [services.embedder.name, EMBEDDING_MODEL_ALIAS]
    return names


def known_backends(services: Services) -> list[str]:
    from serving.router import DeploymentRouter, Router

    names = [services.backend.name]
    if isinstance(services.backend, Router | DeploymentRouter):
        names += [name for name, *_ in services.backend.status()]
    if services.embedder is not None:
        names.append("gateway:" + services.embedder.name)
    return names


def build_metrics(services: Services) -> GatewayMetrics:
    return GatewayMetrics(
        served_models=lambda: served_models(services),
        known_backends=lambda: known_backends(services),
        live=lambda: live_metrics(services),
    )


class MetricsServer:
    """`/metrics` on a port of its own (settings `metrics_port`): prometheus-client's small HTTP server
    in one daemon thread, open to anyone who can reach the port (keep it on a private network)."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class EvalGauges:
    """The latest finished nightly run of each kind (dataset, traffic), read from SQL in the background
    every `every_s` seconds (never during a request or a scrape), shown as gauges."""

    KINDS = ("dataset", "traffic")
    STATUSES = ("passed", "failed", "unchecked", "error")

    def __init__(self) -> None:
        # kind -> (finished, status, regressed or drifted, metrics)
        self.latest: dict[str, tuple[float, str, bool, dict[str, float]]] = {}

    async def refresh(self, engine: AsyncEngine) -> None:
        from sqlalchemy import desc, select

        from gateway.db import eval_runs
        from gateway.eval_runs import FINISHED, verdict
        from gateway.jsontext import loads_stored

        latest = {}
        async with engine.connect() as conn:
            for kind in self.KINDS:
                c = eval_runs.c
                query = (
                    select(c.finished_at, c.status, c.metrics_json, c.comparison_json)
                    .where(c.kind == kind, c.status.in_(FINISHED))
                    .order_by(desc(c.id))
                    .limit(1)
                )
                row = (await conn.execute(query)).first()
                if row is None or row.finished_at is None:
                    continue
                finished = row.finished_at if row.finished_at.tzinfo else row.finished_at.replace(tzinfo=UTC)
                metrics, comparison = loads_stored(row.metrics_json), loads_stored(row.comparison_json)
                status, regressed, drifted = verdict(str(row.status), metrics, comparison)
                latest[kind] = (finished.timestamp(), status, regressed or drifted, _numbers(row.metrics_json))
        self.latest = latest

    async def run(self, engine: AsyncEngine, every_s: float = 60.0) -> None:
        while True:
            try:
                await self.refresh(engine)
            except Exception as exc:  # the database may be down: keep the last figures
                log.warning("metrics: reading the latest eval runs failed: %s", exc)
            await asyncio.sleep(every_s)

    def collect(self) -> Iterator[Metric]:
        when = GaugeMetricFamily(
            "gateway_eval_last_run_timestamp_seconds", "When the latest nightly run of this kind finished.",
            labels=["kind"],
        )  # fmt: skip
        status_gauge = GaugeMetricFamily(
            "gateway_eval_last_run_status",
            "1 for the latest nightly run's status: passed, failed (below its thresholds), unchecked (no "
            "thresholds) or error (could not run).",
            labels=["kind", "status"],
        )
        regressed = GaugeMetricFamily(
            "gateway_eval_last_run_regressed",
            "1 when the latest nightly run got worse than the previous one, or drifted, else 0.",
            labels=["kind"],
        )  # fmt: skip
        failed = GaugeMetricFamily(
            "gateway_eval_last_run_failed", "1 when the latest nightly run missed its thresholds.", labels=["kind"]
        )
        error = GaugeMetricFamily(
            "gateway_eval_last_run_error", "1 when the latest nightly run could not run.", labels=["kind"]
        )
        values = GaugeMetricFamily(
            "gateway_eval_metric", "The latest nightly run's numeric results.", labels=["kind", "metric"]
        )
        for kind, (finished, status, worse, numbers) in list(self.latest.items()):
            when.add_metric([kind], finished)
            for name in self.STATUSES:
                status_gauge.add_metric([kind, name], 1.0 if status == name else 0.0)
            regressed.add_metric([kind], 1.0 if worse else 0.0)
            failed.add_metric([kind], 1.0 if status == "failed" else 0.0)
            error.add_metric([kind], 1.0 if status == "error" else 0.0)
            for name, value in numbers.items():
                values.add_metric([kind, name], value)
        yield from (when, status_gauge, regressed, failed, error, values)


def _numbers(text: str | None) -> dict[str, float]:
    """The top-level numbers of a run's metrics JSON (names come from the eval code, not from clients)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k)[:64]: float(v)
        for k, v in list(data.items())[:200]
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
