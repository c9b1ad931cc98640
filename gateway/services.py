"""The long-lived parts of one gateway process, opened in the app's lifespan and injected into routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit import AuditWriter, ReplicaSpool
from gateway.audit_sinks import sink_for
from gateway.auth import KeyStore
from gateway.citations import CitationConfig
from gateway.db import audit_records, create_engine
from gateway.deployments import BackendPool, build_router
from gateway.limits import build_limiter, parse_model_limits
from gateway.metrics import EvalGauges, GatewayMetrics, MetricsServer, build_metrics
from gateway.migrate import upgrade
from gateway.partitions import PartitionsAheadTask
from gateway.pipeline import Pipeline, Trace
from gateway.review_store import ReviewStore, TextIndexTask
from gateway.rollout import Rollout
from gateway.rollup import RollupTask
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.tracing import RequestTracer
from guardrails import (
    Guardrails,
    Policy,
    ToxicityScorer,
    build_scorer,
    default_policy,
    load_policy,
    make_executor,
    wants_sentence_encoder,
)
from retrieval import (
    CollectionStore,
    Embedder,
    IndexSync,
    create_embedder_async,
    ensure_sample_collection,
    is_object_storage,
)
from retrieval.db import MetadataRepository
from retrieval.embedders import bundled_minilm_encoder
from retrieval.objectstore import ObjectStorage
from serving.backend import Backend
from serving.router import DeploymentRouter, Router
from serving.vllm import VLLMBackend

log = logging.getLogger("gateway")


class Services:
    """Database engine, audit writer, key store, backend router and the pipeline over them."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        # One client per backend URL, shared by every router a config reload builds (gateway.rollout).
        pool = None if backend is not None else BackendPool(
            lambda url: VLLMBackend(
                url,
                connect_timeout=settings.backend_connect_timeout,
                read_timeout=settings.backend_timeout,
                total_timeout=settings.backend_total_timeout,
                max_answer_bytes=settings.max_answer_bytes,
                max_connections=settings.backend_max_connections,
            )
        )  # fmt: skip
        if backend is None:
            assert pool is not None
            if not settings.backend and not settings.deployments:
                raise ValueError("no backend configured: pass --backend URL (or use `gateway serve`, which starts one)")
            if settings.deployments:
                backend = build_router(settings.deployments, pool, settings.backend, settings.sticky)
            else:
                backend = pool.router(settings.backend)
        self.backend = backend
        self.engine: AsyncEngine = create_engine(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.audit = AuditWriter(
            self.engine,
            # Replicas may share DATA_DIR: each spools to its own file and takes over those of the dead.
            replica_spool=ReplicaSpool(settings.data_dir / "spool", legacy=[settings.data_dir / "audit-spool.jsonl"]),
            batch_max=settings.audit_batch_max,
            db_wait_s=settings.audit_db_wait,
            sink=sink_for(
                self.engine,
                audit_records,
                sqlite_synchronous=settings.sqlite_synchronous,
                wait_s=settings.audit_db_wait,
            ),
        )
        self.keys = KeyStore(self.engine)
        self.rollout = Rollout(self, pool, custom_backend=pool is None)  # config versions, reload, shadows
        self.review = ReviewStore(self.engine)
        self.sessions = Sessions.for_data_dir(settings.data_dir, settings.session_secret, self.engine)
        # An invalid policy stops start-up here, with the file, line and problem in the message.
        self.policy = load_policy(settings.policy) if settings.policy else default_policy()
        self.executor = make_executor(settings.guard_workers)
        self.rails: Guardrails | None = None
        self.embedder: Embedder | None = None
        self._scorer_embedder: Embedder | None = None  # the toxicity scorer's MiniLM when retrieval runs another
        self.store: CollectionStore | None = None
        # Key limits come with each key; model limits from the settings; counters in Redis when given.
        self.limiter = build_limiter(
            settings.redis,
            parse_model_limits(settings.model_limits),
            fail=settings.limits_fail,
            prefix=settings.redis_prefix,
        )
        # Built in start(), once the guardrails and the collection store it is handed exist.
        self.pipeline: Pipeline
        # Told once per request, from Pipeline.record: metrics, traces.
        self.observers: list[Callable[[Trace], None]] = []
        self.started_at = time.time()
        # `gateway serve` with the local vLLM: what it is doing until vLLM answers (None: ready).
        self.startup: Callable[[], str | None] | None = None
        # `gateway serve` starts listening first: while `start()` runs in the background, /healthz
        # answers, /readyz says what is loading, and other routes answer 503 `starting`.
        self.loading_since: float | None = None
        self.start_error: BaseException | None = None
        self.on_started: Callable[[], None] | None = None  # the "ready" line waits for this
        self.on_start_failed: Callable[[], None] | None = None  # `gateway serve` stops (exit 1)
        # Metrics: one registry per app, fed once per request from Pipeline.record.
        self.metrics: GatewayMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.evals: EvalGauges | None = None  # the latest nightly runs, refreshed in the background
        self._evals_task: asyncio.Task[None] | None = None
        # The overview's rollups: closed buckets aggregated in the background, every minute.
        self.rollups = RollupTask(self.engine)
        self.partitions_ahead = PartitionsAheadTask(self.engine)  # PostgreSQL: next months' partitions
        self.text_index = TextIndexTask(self.engine)  # SQLite: new audit rows into the full-text index
        if settings.metrics != "off" or settings.metrics_port:
            self.evals = EvalGauges()
            self.metrics = build_metrics(self)
            self.observers.append(self.metrics.observe)
        # Traces: off unless an OTLP endpoint is set.
        self.tracer: RequestTracer | None = None
        if settings.otlp_endpoint:
            self.use_tracer(RequestTracer(settings.otlp_endpoint))

    def use_tracer(self, tracer: RequestTracer) -> None:
        """Record one trace per request with `tracer` (tests pass one with an in-memory exporter)."""
        self.tracer = tracer
        self.observers.append(tracer.observe)  # the pipeline shares this list

    async def start(self) -> None:
        if self.settings.migrate_on_start:  # off: a migration Job owns the schema
            # Alembic runs its own event loop, so it gets a thread of its own.
            await asyncio.to_thread(upgrade, self.settings.database_url)
        await self.audit.start()
        self.rollups.start()
        self.partitions_ahead.start()
        self.text_index.start()
        if self.metrics is not None and self.settings.metrics_port:
            self.metrics_server = MetricsServer(self.metrics, self.settings.host, self.settings.metrics_port)
        if self.evals is not None:
            self._evals_task = asyncio.create_task(self.evals.run(self.engine), name="eval-gauges")
        await self.limiter.start()
        # A server's log gets lines, not Hugging Face's "Loading weights" bars (imports: off the loop).
        await asyncio.to_thread(_no_progress_bars)
        if self.settings.rag:
            # The embedder loads before the guards: the trained toxicity scorer shares its MiniLM.
            await self._load_embedder()
        # Models load off the loop; the judge serves groundedness modes "llm" and "hybrid".
        self.rails = await self.load_guardrails(self.policy)
        described = self.rails.describe()
        enabled = [name for name, g in described["guards"].items() if g["enabled"]]
        scorer = described["toxicity_scorer"] or {}
        log.info(
            "guardrails: policy %s; enabled: %s; toxicity scorer: %s%s",
            described["policy"],
            ", ".join(enabled) or "none",
            scorer.get("scorer", "none"),
            f" ({scorer['note']})" if scorer.get("note") else "",
        )
        if self.settings.rag:
            await self._start_retrieval()
        self.pipeline = self._build_pipeline()
        if isinstance(self.backend, Router | DeploymentRouter):
            await self.backend.refresh()
            self.backend.start()  # health watch: a backend that comes up later is seen within 1-2 s
        await self.rollout.start()  # stores this config version, follows the live one, SIGHUP reloads
        if self.settings.open_mode:
            log.warning("OPEN MODE: no API key is checked; every caller is treated as admin. Local use only.")

    def _build_pipeline(self) -> Pipeline:
        """The request pipeline over the parts opened so far (guardrails, store: None when off)."""
        pipeline = Pipeline(
            self.backend,
            self.audit,
            self.keys,
            rails=self.rails,
            store=self.store,
            aliases=self.settings.aliases,
            rag_top_k=self.settings.rag_top_k,
            rag_min_score=self.settings.rag_min_score,
            open_mode=self.settings.open_mode,
            max_n=self.settings.max_n,
            limiter=self.limiter,
            citation=CitationConfig(
                self.settings.rag_sources, self.settings.alias_sources, self.settings.citation_base_urls
            ),
        )
        pipeline.observers = self.observers  # one list: a tracer added later is told too
        pipeline.rollout = self.rollout
        return pipeline

    async def _judge(self, prompt: str) -> str:
        """Ask the backend's first model (greedy, short) to judge an answer's support."""
        models = await self.backend.models()
        if not models:
            raise RuntimeError("no backend model is available to judge groundedness")
        answer = await self.backend.complete(
            "/v1/chat/completions",
            {"model": models[0].id, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
             "max_tokens": 64},
        )  # fmt: skip
        return str(answer["choices"][0]["message"]["content"] or "")

    async def _load_embedder(self) -> None:
        """The embedding model, in the executor (an ONNX export, the first time, too: seconds)."""
        started = time.perf_counter()
        self.embedder = await create_embedder_async(
            self.settings.embedding_model,
            executor=self.executor,
            runtime=self.settings.embedding_runtime,
            cache_dir=self.settings.onnx_cache_dir,
        )
        log.info(
            "retrieval: embedding model %s runs on %s (%s); loaded in %.1f s",
            self.embedder.name,
            self.embedder.runtime,
            self.embedder.runtime_note or "",
            time.perf_counter() - started,
        )

    async def load_guardrails(self, policy: Policy) -> Guardrails:
        """Guardrails for `policy`, models loaded off the loop (at start-up and for a new policy)."""
        scorer = await self._shared_toxicity_scorer(policy)
        return await Guardrails.load(policy, self.executor, judge=self._judge, toxicity_scorer=scorer)

    async def _shared_toxicity_scorer(self, policy: Policy) -> ToxicityScorer | None:
        """The policy's trained toxicity scorer over the bundled MiniLM: retrieval's embedder when it
        runs that model (loaded once for both), else one of the scorer's own on the same runtime and
        export cache (loaded once, kept for reloads). None for a scorer that needs no encoder
        (Guardrails.load builds it)."""
        if not policy.uses_toxicity():
            return None
        embed = bundled_minilm_encoder(self.embedder)
        if embed is None and wants_sentence_encoder(policy.toxicity):
            # Retrieval runs another model (or none): the scorer gets the bundled MiniLM of its own,
            # on the same runtime and export cache, so ONNX spares it PyTorch's import and load.
            if self._scorer_embedder is None:
                self._scorer_embedder = await create_embedder_async(
                    None,
                    executor=self.executor,
                    runtime=self.settings.embedding_runtime,
                    cache_dir=self.settings.onnx_cache_dir,
                )
            embed = bundled_minilm_encoder(self._scorer_embedder)
        if embed is None:
            return None
        loop = asyncio.get_running_loop()
        scorer = await loop.run_in_executor(self.executor, functools.partial(build_scorer, policy.toxicity, embed))
        if self.embedder is not None and scorer.describe().get("scorer") == "trained":
            log.info(
                "guardrails: the trained toxicity scorer shares the embedder's %s on %s (the model is loaded once)",
                self.embedder.name,
                self.embedder.runtime,
            )
        return scorer

    async def _start_retrieval(self) -> None:
        started = time.perf_counter()
        if self.embedder is None:
            await self._load_embedder()
        assert self.embedder is not None
        remote = self.settings.index_storage if is_object_storage(self.settings.index_storage) else None
        sync = None
        if remote is not None:  # the data dir is this replica's cache of the versions the database names live
            endpoint = self.settings.s3_endpoint_url
            sync = IndexSync(self.settings.data_dir, ObjectStorage(remote, endpoint), MetadataRepository(self.engine))
            await sync.start()  # StorageUnreachable (one line, naming the URL) if the bucket does not answer
        if self.settings.sample_corpus:
            report = await ensure_sample_collection(
                self.settings.index_root,
                self.settings.database_url,
                self.embedder,
                index_storage=remote,
                endpoint_url=self.settings.s3_endpoint_url,
            )
            if report is not None and report.ingested:
                log.info("ingested the sample corpus as collection 'sample' (%s chunks)", report.chunks)
        self.store = CollectionStore(self.settings.index_root, self.embedder, executor=self.executor, sync=sync)
        log.info(
            "retrieval: embedding model %s; collections: %s; aliases: %s (%.1f s)",
            self.embedder.name,
            ", ".join(self.store.list_collections()) or "none",
            ", ".join(f"{a} -> {c}:{m}" for a, (c, m) in self.settings.aliases.items()) or "none",
            time.perf_counter() - started,
        )

    async def start_in_background(self) -> None:
        """`start()` for a server that already listens: failures are logged and reported, not raised."""
        self.loading_since = time.monotonic()
        try:
            await self.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.start_error = exc
            log.error("start-up failed: %s", exc)
            if self.on_start_failed is not None:
                self.on_start_failed()
            return
        self.loading_since = None
        if self.on_started is not None:
            self.on_started()

    def loading(self) -> str | None:
        """While start-up runs in the background: what it is doing, for /readyz and 503 answers."""
        since = self.loading_since
        if since is None:
            return None
        parts = "guard models, the embedding model and the index" if self.settings.rag else "guard models"
        return f"loading {parts}: {time.monotonic() - since:.0f} s"

    async def stop(self) -> None:
        await self.rollout.stop()  # shadow copies in flight get a few seconds, before the audit writer stops
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)  # flushes the spans still queued
        if self._evals_task is not None:
            self._evals_task.cancel()
            await asyncio.gather(self._evals_task, return_exceptions=True)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
        await self.rollups.stop()
        await self.partitions_ahead.stop()
        await self.text_index.stop()
        await self.audit.stop()
        await self.limiter.aclose()
        if self.store is not None:
            await self.store.aclose()
        await self.backend.aclose()
        await self.engine.dispose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What `/readyz` reports: backend and database reachability and the models served."""
        starting = [m for m in (self.startup() if self.startup is not None else None, self.loading()) if m]
        if starting:
            return False, {"status": "starting", "message": "; ".join(starting)}
        database_ok = True
        database_error = None
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means "not ready"; say which
            database_ok, database_error = False, str(exc)
        if isinstance(self.backend, Router | DeploymentRouter):
            backends = await self.backend.health_by_backend()
        else:
            backends = {self.backend.name: await self.backend.health()}
        models: list[str] = []
        if any(backends.values()):
            try:
                models = [m.id for m in await self.backend.models()]
            except Exception as exc:
                log.warning("listing models failed: %s", exc)
        ready = database_ok and any(backends.values()) and bool(models)
        return ready, {
            "status": "ready" if ready else "not_ready",
            "database": {"ok": database_ok, "error": database_error},
            "backends": [{"url": url, "healthy": ok} for url, ok in backends.items()],
            "models": models,
            "audit": {"pending": self.audit.pending, "committed": self.audit.committed, "spooled": self.audit.spooled},
            "open_mode": self.settings.open_mode,
            "rollout": self.rollout.describe(),
            "limits": self.limiter.describe(),
            "guardrails": self.rails.describe() if self.rails else None,
            "retrieval": {
                "embedding_model": self.embedder.name,
                "embedding_runtime": {"runtime": self.embedder.runtime, "note": self.embedder.runtime_note},
                "collections": self.store.list_collections(),
                "aliases": {a: {"collection": c, "model": m} for a, (c, m) in self.settings.aliases.items()},
            }
            if self.embedder is not None and self.store is not None
            else None,
        }


def _no_progress_bars() -> None:
    for module, function in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # not installed: it draws no bars
            getattr(importlib.import_module(module), function)()
