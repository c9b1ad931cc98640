"""The `gateway` command: serve, run a backend, manage keys and the database, ingest, evaluate.

Every command receives one `Settings` object, built once here with the precedence defaults <
config file (`--config` / `GATEWAY_CONFIG`) < `GATEWAY_*` environment < flags: a flag whose
`dest` is a `Settings` field name overrides that setting; the command's other flags stay in its
`argparse.Namespace`. `parse(argv)` does all of it without running anything (tests use it).
Commands that live in other packages (ingest, eval) are loaded inside `parse`, never at import:
this module is the composition root, and `gateway` never imports `evals` at module level.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.limits_cli import (
    add_limit_flags,
    cmd_keys_update,
    cmd_usage,
    configure_usage_parser,
    limits_from_args,
    limits_text,
)
from gateway.settings import SETTING_NAMES, Settings, SettingsError, load_settings, open_engine

if TYPE_CHECKING:
    from gateway.httpserver import ReadyLine
    from gateway.services import Services
    from serving.local import LocalStart

log = logging.getLogger("gateway")

Command = Callable[[argparse.Namespace, Settings], int]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where models, indexes and reports live (default ./data)"
    )
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default sqlite:///DATA_DIR/gateway.db)")
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The one `Settings` of a command: its flags named like a setting (None: not given) over
    `environ` (default: the process environment) over the config file over the defaults."""
    overrides = {name: value for name, value in vars(args).items() if name in SETTING_NAMES}
    return load_settings(overrides, environ=environ)


@dataclass(frozen=True, slots=True)
class Invocation:
    """A parsed command line: the command, its own options, and the settings it runs with."""

    command: Command
    args: argparse.Namespace
    settings: Settings

    def run(self) -> int:
        return int(self.command(self.args, self.settings) or 0)


def _run_async(coro: Any) -> Any:
    return asyncio.run(coro)


class StartupError(Exception):
    """`gateway serve` cannot start for a reason the operator can act on; said in one line, exit 1."""


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.app import create_app
    from gateway.httpserver import DrainingServer, ReadyLine, server_config
    from gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.policy:
        from guardrails import load_policy

        load_policy(settings.policy)  # fail now, not after the minutes a local vLLM takes to start
    _prepare_database(settings)
    _check_index_storage(settings)
    if settings.open_mode:
        print(
            "=" * 72 + "\nWARNING: OPEN MODE - no API keys are checked, every caller is admin.\n"
            "Use it on a trusted machine only.\n" + "=" * 72,
            file=sys.stderr,
            flush=True,
        )
    else:
        _bootstrap_admin_key(settings)
    if settings.workers == 0:
        from gateway.workers import auto_workers

        settings = settings.replace(workers=auto_workers())
    if settings.workers > 1:
        from gateway.workers import limits_need_one_worker, serve_workers

        reason = limits_need_one_worker(settings)
        if reason is None:
            return serve_workers(settings)
        log.warning("running 1 worker, not %d: %s and no --redis; limits are exact across workers only "
                    "with Redis (pass --redis URL)", settings.workers, reason)  # fmt: skip
        settings = settings.replace(workers=1)

    # From here on a local vLLM may run as our child: SIGTERM and SIGINT unwind (SystemExit instead
    # of a silent death, even where SIGINT was inherited as ignored), so the `finally` below stops
    # the child on every way out. The exit code: 0 after SIGTERM once every request in flight was
    # answered (a drain, what Kubernetes asks for); 128+N for a signal that cut something short.
    server: DrainingServer | None = None
    starting: LocalStart | None = None
    services: Services | None = None

    def exit_on_signal(signum: int, _frame: object) -> None:
        if starting is not None and starting.error is not None:
            raise SystemExit(1)  # the local vLLM failed: LocalStart asked us to stop
        if services is not None and services.start_error is not None:
            raise SystemExit(1)  # loading the models failed (logged): the start-up asked us to stop
        drained = server is not None and server.drained
        raise SystemExit(0 if signum == signal.SIGTERM and drained else 128 + signum)

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, exit_on_signal)
    try:
        ready = ReadyLine(settings, {"listening"})
        if not settings.backend and not settings.deployments:  # deployments name their own backends
            settings, starting = _start_local(settings, ready)
        app = create_app(settings, start_in_background=True)  # listen first, then load the models
        services = app.state.services
        if starting is not None:
            services.startup = starting.status  # /readyz: 503 "starting local vLLM: 45 s"
        ready.waiting.add("models")
        services.on_started = lambda: ready.done("models")
        services.on_start_failed = lambda: os.kill(os.getpid(), signal.SIGTERM)
        log.info(
            "gateway listening on http://%s:%s (backends: %s; database: %s)",
            settings.host,
            settings.port,
            ", ".join(settings.backend) or "per deployment",
            _safe_url(settings.database_url),
        )
        # uvicorn handles SIGTERM and SIGINT while it serves: it stops accepting, lets requests and
        # streams in flight finish (up to shutdown_grace), runs the lifespan's shutdown (the audit
        # queue is committed there), then raises the signal again, which lands in `exit_on_signal`.
        server = DrainingServer(server_config(app, settings))
        server.on_started = lambda: ready.done("listening")
        server.run()
        if (starting is not None and starting.error is not None) or services.start_error is not None:
            return 1
        if not server.started:
            print("gateway: start-up failed (the reason is logged above)", file=sys.stderr, flush=True)
            return 1
    finally:
        if starting is not None:
            # A second Ctrl-C or SIGTERM must not cut the clean-up short (vLLM holds ~1 GB and a port).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            starting.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _start_local(settings: Settings, ready: ReadyLine) -> tuple[Settings, LocalStart]:
    """Start the bundled model's CPU vLLM in the background (the port listens meanwhile); the
    settings then name it as the backend. If it fails, the gateway stops with exit code 1."""
    from serving.local import LocalStart, LocalVLLM

    local = LocalVLLM(
        settings.data_dir,
        port=settings.local_vllm_port,
        vllm_python=settings.vllm_python,
        vllm_args=settings.vllm_args,
    )
    log_path = settings.data_dir / "vllm.log"
    log.info("no --backend given: starting the local CPU vLLM on %s (1-3 minutes; log: %s)", local.url, log_path)
    ready.waiting.add("local vLLM")

    def failed_or_ready() -> None:
        ready.done("local vLLM")

    starting = LocalStart(local, log_path, on_ready=failed_or_ready)
    starting.on_failure = lambda: os.kill(os.getpid(), signal.SIGTERM)
    starting.begin()
    settings = settings.replace(backend=(local.url,))
    return with_default_alias(settings, local.model_name), starting


def with_default_alias(settings: Settings, model_name: str) -> Settings:
    """The embedded default answers grounded questions out of the box (`MODEL-rag` on the sample
    corpus); `--alias` and the file's aliases add to it, and one of the same name replaces it."""
    if not (settings.rag and settings.sample_corpus):
        return settings
    return settings.replace(alias=(f"{model_name}-rag=sample:{model_name}", *settings.alias))


def _prepare_database(settings: Settings) -> None:
    """Reach the database and bring its schema to the newest revision (unless a migration Job owns
    that: then only check it is there). An unreachable database is a `StartupError`, not a trace."""
    from gateway.migrate import is_current, upgrade

    where = _safe_url(settings.database_url)

    async def ping() -> None:
        from sqlalchemy import text

        async with open_engine(settings) as engine, engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        _run_async(asyncio.wait_for(ping(), timeout=30))
    except Exception as exc:  # any driver or network error: what it says, in one line
        raise StartupError(f"cannot reach the database at {where}: {_one_line(exc)}") from exc
    if settings.migrate_on_start:
        upgrade(settings.database_url)
    elif not is_current(settings.database_url):
        raise StartupError(
            f"the database at {where} is not at the newest schema revision and migrate_on_start is off: "
            "run `gateway db upgrade` (the migration Job) first"
        )


def _one_line(exc: BaseException) -> str:
    """A driver error's own message (not SQLAlchemy's SQL and parameters), on one line."""
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return " ".join(text.split("\n", 1)[0].split())[:300]


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _check_index_storage(settings: Settings) -> None:
    """An index storage root that cannot be used is a `StartupError` naming it, not a trace."""
    if not settings.rag or settings.index_storage is None:
        return
    from retrieval import RetrievalError, is_object_storage
    from retrieval.objectstore import ObjectStorage

    if is_object_storage(settings.index_storage):
        try:
            ObjectStorage(settings.index_storage, settings.s3_endpoint_url).check()
        except RetrievalError as exc:
            raise StartupError(str(exc)) from exc
    elif not settings.index_root.is_dir():
        raise StartupError(f"index storage {settings.index_storage} is not a folder (is the shared volume mounted?)")


def _bootstrap_admin_key(settings: Settings) -> None:
    """On a database with no keys at all, make one admin key so a new user can start."""
    from gateway.auth import KeyStore

    async def go() -> str | None:
        async with open_engine(settings) as engine:
            store = KeyStore(engine)
            if await store.count():
                return None
            _, secret = await store.create("admin", "bootstrap")
            return secret

    secret = _run_async(go())
    if secret:
        print(
            f"no API keys existed: created an admin key (shown once, keep it):\n  {secret}\n"
            "create more with `gateway keys create --role client`",
            flush=True,
        )


def cmd_backend_local(args: argparse.Namespace, settings: Settings) -> int:
    from serving.local import LocalVLLM

    local = LocalVLLM(
        settings.data_dir, port=settings.local_vllm_port, vllm_python=settings.vllm_python, vllm_args=settings.vllm_args
    )
    if args.prepare_only:
        print(local.prepare())
        return 0
    return local.run_foreground()


def cmd_backend_fake(args: argparse.Namespace, settings: Settings) -> int:
    from serving.fake import FakeConfig, serve_fake

    config = FakeConfig(
        models=tuple(args.model or ["fake-model"]),
        delay_ms=args.delay_ms,
        tokens_per_s=args.tokens_per_s,
        answer_tokens=args.answer_tokens,
        keep_requests=args.keep_requests,
    )
    serve_fake(config, args.fake_host, args.fake_port)
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import KeyStore
    from gateway.migrate import upgrade

    upgrade(settings.database_url)

    async def go() -> tuple[Any, str]:
        async with open_engine(settings) as engine:
            return await KeyStore(engine).create(
                args.role,
                args.name,
                args.collection,
                limits_from_args(args),
                collections=_collections_arg(args.collections),
                rag_sources=args.sources,
            )

    info, secret = _run_async(go())
    print(secret)
    print(
        f"created key {info.id} (role {info.role}{', name ' + info.name if info.name else ''}; "
        f"{info.limits.describe() if info.limits else 'no limits'}); "
        "the secret above is not stored and will not be shown again",
        file=sys.stderr,
    )
    return 0


def _collections_arg(value: str | None) -> frozenset[str] | None:
    """`--collections a,b` (None or "all": every collection)."""
    if value is None or value.strip() == "all":
        return None
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def cmd_keys_access(args: argparse.Namespace, settings: Settings) -> int:
    """Set which collections a key may use and its default for showing sources."""
    from gateway.auth import KeyStore
    from gateway.migrate import upgrade

    upgrade(settings.database_url)
    sources = None if args.sources == "default" else args.sources

    async def go() -> bool:
        async with open_engine(settings) as engine:
            return await KeyStore(engine).update_access(args.key_id, _collections_arg(args.collections), sources)

    if not _run_async(go()):
        print(f"gateway: no key with id {args.key_id!r} (see `gateway keys list`)", file=sys.stderr)
        return 1
    print(f"updated {args.key_id}: collections {args.collections}, sources {args.sources} "
          "(every replica applies it within 30 s)")  # fmt: skip
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import KeyStore
    from gateway.migrate import upgrade

    upgrade(settings.database_url)

    async def go() -> list[dict[str, Any]]:
        async with open_engine(settings) as engine:
            return await KeyStore(engine).list()

    for row in _run_async(go()):
        state = "revoked" if row["revoked_at"] else "active"
        print(f"{row['id']}\t{row['role']}\t{state}\t{row['prefix']}...\t{row['name'] or ''}\t{limits_text(row)}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import KeyStore

    async def go() -> bool:
        async with open_engine(settings) as engine:
            return await KeyStore(engine).revoke(args.key_id)

    if _run_async(go()):
        print(f"revoked {args.key_id}")
        return 0
    print(f"no active key {args.key_id}", file=sys.stderr)
    return 1


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.migrate import upgrade

    upgrade(settings.database_url)
    print(f"database at {_safe_url(settings.database_url)} is at the newest revision")
    return 0


# Subcommands that live in other packages: (prog, module, configure function, command function).
# Their parsers are built only when called, so `gateway serve` does not import model code; each
# command function takes (args, settings).
_DELEGATED = {
    "ingest": ("gateway ingest", "gateway.cli", "_configure_ingest", "cmd_ingest"),
    "eval guards": ("gateway eval guards", "evals.guards", "configure_parser", "run"),
    "eval retrieval": ("gateway eval retrieval", "evals.retrieval", "configure_parser", "run"),
    "eval run": ("gateway eval run", "evals.nightly", "configure_run_parser", "run_dataset"),
    "eval traffic": ("gateway eval traffic", "evals.nightly", "configure_traffic_parser", "run_traffic"),
    "eval compare": ("gateway eval compare", "evals.compare", "configure_parser", "run"),
    "export dataset": ("gateway export dataset", "evals.export", "configure_parser", "run"),
    "guards train-toxicity": ("gateway guards train-toxicity", "evals.train_toxicity", "configure_parser", "run"),
    "guards fetch": ("gateway guards fetch", "evals.train_toxicity", "configure_fetch_parser", "run_fetch"),
}


def _configure_ingest(parser: argparse.ArgumentParser) -> None:
    from retrieval.cli import configure_ingest_parser

    configure_ingest_parser(parser)  # its --embedding-model is the `embedding_model` setting


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.migrate import upgrade
    from retrieval.cli import IngestTarget, run_ingest

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)  # the schema (RAG tables included) comes from the migrations
    target = IngestTarget(
        settings.index_root,  # with s3:// storage, a local cache: a batch job needs no gateway's data
        settings.database_url,
        settings.embedding_model,
        settings.index_storage,
        settings.s3_endpoint_url,
        settings.embedding_runtime,
        settings.onnx_cache_dir,  # the export cache `gateway serve` uses: exported once for both
    )
    return run_ingest(args, target)


def _delegated(name: str, argv: list[str]) -> tuple[Command, argparse.Namespace]:
    """Build the parser of a command that lives in another package, parse its arguments."""
    prog, module_name, configure_name, run_name = _DELEGATED[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog)
    _common(parser)
    getattr(module, configure_name)(parser)
    command: Command = getattr(module, run_name)
    return command, parser.parse_args(argv)


def cmd_db_rollup(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.migrate import upgrade
    from gateway.rollup import rebuild
    from gateway.usage import parse_since

    try:
        since = parse_since(args.rebuild)
    except ValueError as exc:
        print(f"gateway: --rebuild: {exc}", file=sys.stderr)
        return 2
    upgrade(settings.database_url)

    async def go() -> Any:
        async with open_engine(settings) as engine:
            return await rebuild(engine, since)

    report = _run_async(go())
    print(f"rollups recomputed from {since.isoformat(timespec='seconds')}: {report.rows} rows "
          f"in {report.seconds:.1f} s")  # fmt: skip
    return 0


def cmd_db_prune(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime, timedelta

    from gateway.migrate import upgrade
    from gateway.retention import prune

    if args.older_than < 0:
        print("gateway: --older-than must be zero or more days", file=sys.stderr)
        return 2
    upgrade(settings.database_url)
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than)

    async def go() -> Any:
        async with open_engine(settings) as engine:
            return await prune(engine, cutoff, batch=args.batch, archive=args.archive, dry_run=args.dry_run)

    report = _run_async(go())
    verb = "would delete" if args.dry_run else "deleted"
    where = f", archived to {args.archive}" if args.archive and not args.dry_run else ""
    print(f"{verb} {report.records} audit records and {report.labels} labels older than "
          f"{cutoff.isoformat(timespec='seconds')} in {report.batches} batches{where}")  # fmt: skip
    return 0


def cmd_db_maintain(args: argparse.Namespace, settings: Settings) -> int:
    """PostgreSQL: partitions ahead, the default partition drained, old partitions dropped."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.migrate import upgrade
    from gateway.partitions import PartitionError, maintain
    from retrieval.engine import normalise_database_url

    if args.months_ahead < 0 or (args.retention_days is not None and args.retention_days < 0):
        print("gateway: db maintain: --months-ahead and --retention-days must be zero or more", file=sys.stderr)
        return 2
    if args.archive is not None and args.retention_days is None:
        print("gateway: db maintain: --archive needs --retention-days", file=sys.stderr)
        return 2
    if normalise_database_url(settings.database_url).get_backend_name() != "postgresql":
        print("gateway db maintain: nothing to do on SQLite (the audit table is not partitioned there); "
              "`gateway db prune --older-than DAYS` is its retention tool")  # fmt: skip
        return 0

    async def go() -> Any:
        async with open_engine(settings) as engine:
            return await maintain(
                engine, months_ahead=args.months_ahead, retention_days=args.retention_days, archive=args.archive
            )

    try:
        upgrade(settings.database_url)
        report = _run_async(go())
    except (PartitionError, SQLAlchemyError, OSError) as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:500]
        print(f"gateway: db maintain: {reason}", file=sys.stderr)
        return 1
    print(f"partitions created: {', '.join(report.created) or 'none'}; rows moved out of the default "
          f"partition: {report.moved}")  # fmt: skip
    if args.retention_days is not None:
        where = f", archived to {', '.join(map(str, report.archived))}" if report.archived else ""
        print(f"partitions dropped: {', '.join(report.dropped) or 'none'} (~{report.dropped_rows} records, "
              f"{report.labels} labels, {report.rollups} rollup rows){where}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="A guarded, OpenAI-compatible LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Flags whose dest is a Settings field (host, port, backend, ...) override that setting.
    serve = commands.add_parser("serve", help="run the gateway (starts a local vLLM when no --backend is given)")
    _common(serve)
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    serve.add_argument(
        "--backend", action="append", metavar="URL", help="a vLLM (or OpenAI-compatible) server; repeatable"
    )
    serve.add_argument("--policy", type=Path, default=None, help="guardrails policy file (TOML)")
    serve.add_argument(
        "--alias", action="append", metavar="NAME=COLLECTION:MODEL", help="a model name that means RAG; repeatable"
    )
    serve.add_argument(
        "--open",
        dest="open_mode",
        action="store_true",
        default=None,
        help="no API keys (local use only; announced loudly)",
    )
    serve.add_argument("--redis", default=None, metavar="URL", help="Redis for limit counters shared by replicas")
    serve.add_argument(
        "--workers",
        default=None,
        metavar="N",
        help="processes serving the port: N or auto (default: one per core, up to 4)",
    )
    serve.add_argument("--limits-fail", choices=["open", "closed"], default=None, help="when Redis is unreachable")
    serve.add_argument("--metrics", choices=["admin", "open", "off"], default=None, help="/metrics on the main port")
    serve.add_argument("--metrics-port", type=int, default=None, help="also serve /metrics, open, on this port")
    serve.add_argument("--log-format", choices=["text", "json"], default=None, help="log lines (default text)")
    serve.add_argument("--otlp-endpoint", default=None, metavar="URL", help="OTLP/HTTP collector for traces")
    serve.set_defaults(func=cmd_serve)

    backend = commands.add_parser("backend", help="run an LLM backend").add_subparsers(
        dest="backend_command", required=True
    )
    local = backend.add_parser("local", help="prepare the bundled SmolLM2 model and run the CPU vLLM in the foreground")
    _common(local)
    local.add_argument("--port", dest="local_vllm_port", type=int, default=None, help="listen port (default 8100)")
    local.add_argument("--prepare-only", action="store_true", help="only prepare the model folder")
    local.set_defaults(func=cmd_backend_local)
    fake = backend.add_parser("fake", help="a deterministic OpenAI-compatible fake backend (real HTTP server)")
    _common(fake)
    fake.add_argument("--host", dest="fake_host", default="127.0.0.1")
    fake.add_argument("--port", dest="fake_port", type=int, default=8200)
    fake.add_argument("--model", action="append", help="model name to serve (repeatable; default fake-model)")
    fake.add_argument("--delay-ms", type=float, default=0.0, help="delay before the answer / first token")
    fake.add_argument("--tokens-per-s", type=float, default=0.0, help="streaming pace (0: as fast as possible)")
    fake.add_argument("--answer-tokens", type=int, default=16, help="tokens per answer")
    fake.add_argument("--keep-requests", type=int, default=256, help="request bodies kept for /fake/requests")
    fake.set_defaults(func=cmd_backend_fake)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    _common(create)
    create.add_argument("--role", required=True, choices=["client", "reviewer", "admin"])
    create.add_argument("--name", default=None)
    create.add_argument("--collection", default=None, help="RAG collection for this key's requests by default")
    create.add_argument(
        "--collections", default=None, help="collections this key may search and read, comma-separated (default: all)"
    )
    create.add_argument(
        "--sources", choices=["annotations", "footer"], default=None,
        help="how this key's RAG answers show sources by default (default: the rag_sources setting)",
    )  # fmt: skip
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    _common(listing)
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    _common(revoke)
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)
    add_limit_flags(create)
    update = keys.add_parser("update", help="change a key's limits (0: no limit)")
    _common(update)
    update.add_argument("key_id")
    add_limit_flags(update)
    update.set_defaults(func=cmd_keys_update)
    access = keys.add_parser("access", help="set which collections a key may use, and how it shows sources")
    _common(access)
    access.add_argument("key_id")
    access.add_argument("--collections", required=True, help="comma-separated names, or 'all'")
    access.add_argument("--sources", choices=["annotations", "footer", "default"], default="default")
    access.set_defaults(func=cmd_keys_access)
    usage = commands.add_parser("usage", help="requests, tokens, blocks, limits and latency from the audit log")
    _common(usage)
    configure_usage_parser(usage)
    usage.set_defaults(func=cmd_usage)

    db = commands.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the schema migrations")
    _common(up)
    up.set_defaults(func=cmd_db_upgrade)
    prune = db.add_parser("prune", help="delete (or archive) audit records older than N days, in batches")
    _common(prune)
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    prune.add_argument("--archive", type=Path, default=None, help="append the records (and labels) here as JSONL first")
    prune.add_argument("--batch", type=int, default=2000, help="records per transaction")
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune.set_defaults(func=cmd_db_prune)
    rollup = db.add_parser("rollup", help="recompute the overview's rollups from the audit records")
    _common(rollup)
    rollup.add_argument(
        "--rebuild", required=True, metavar="SINCE",
        help="recompute every bucket from this point on: a duration (7d, 12h) or an ISO date; after records "
        "arrived more than an hour late (an audit spool replayed after an outage)",
    )  # fmt: skip
    rollup.set_defaults(func=cmd_db_rollup)
    maintain = db.add_parser(
        "maintain", help="PostgreSQL: create monthly audit partitions ahead, drop those past the retention"
    )
    _common(maintain)
    maintain.add_argument("--months-ahead", type=int, default=3, help="partitions to have beyond this month")
    maintain.add_argument("--retention-days", type=float, default=None, metavar="DAYS",
                          help="drop whole partitions that end more than DAYS ago")  # fmt: skip
    maintain.add_argument("--archive", type=Path, default=None, metavar="DIR",
                          help="write each dropped partition to DIR/<partition>.jsonl first")  # fmt: skip
    maintain.set_defaults(func=cmd_db_maintain)

    from gateway.rollout_cli import configure_parser as configure_rollout

    configure_rollout(commands, _common)

    ingest = commands.add_parser("ingest", help="ingest documents into a RAG collection", add_help=False)
    ingest.set_defaults(delegated="ingest")
    evals = commands.add_parser("eval", help="offline evaluation").add_subparsers(dest="eval_command", required=True)
    for target, text in (
        ("guards", "score the guards on labelled data"),
        ("retrieval", "recall@k and MRR"),
        ("run", "run an eval set through the pipeline, store, compare, report"),
        ("traffic", "re-score logged traffic and report drift"),
        ("compare", "compare deployments (primary and shadow) on logged traffic; exit 3 if the candidate is worse"),
    ):
        sub = evals.add_parser(target, help=text, add_help=False)
        sub.set_defaults(delegated=f"eval {target}")
    export = commands.add_parser("export", help="export data").add_subparsers(dest="export_command", required=True)
    export.add_parser(
        "dataset", help="labelled traffic as fine-tuning (openai-chat) or eval-set JSONL", add_help=False
    ).set_defaults(delegated="export dataset")
    guards = commands.add_parser("guards", help="guard models").add_subparsers(dest="guards_command", required=True)
    for target, text in (
        ("train-toxicity", "train the offline toxicity classifier on the sentence encoder"),
        ("fetch", "download a guard model's published checkpoint (needs internet): fetch detoxify --to DIR"),
    ):
        guards.add_parser(target, help=text, add_help=False).set_defaults(delegated=f"guards {target}")
    return parser


def parse(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse a command line and build its settings (from `environ`, default the process's).
    Usage errors exit 2 (argparse); a bad setting raises SettingsError."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command: Command
    if getattr(args, "delegated", None):
        command, args = _delegated(args.delegated, rest)  # parsed by the command's own parser
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        command = args.func
    return Invocation(command, args, settings_from_args(args, environ))


def main(argv: list[str] | None = None) -> int:
    try:
        return parse(argv).run()
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from guardrails import PolicyError
        from serving.errors import ServingError

        if isinstance(exc, PolicyError):
            print(f"gateway: invalid policy: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ServingError):
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
