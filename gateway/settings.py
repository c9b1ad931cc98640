"""Settings: one typed object, built once from defaults, a TOML file, `GATEWAY_*` variables and flags.

Precedence, lowest first: defaults, the config file (`--config` / `GATEWAY_CONFIG`), the
environment (`GATEWAY_<NAME>`), command-line flags. Everything is validated here, at start-up,
with a message that names the offending source and value.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.citations import SOURCES_MODES

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from serving.router import Deployment

ENV_PREFIX = "GATEWAY_"


class SettingsError(Exception):
    """A setting is missing, malformed or out of range."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to start; tests build it directly."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: tuple[str, ...] = ()  # empty: start the local CPU vLLM with the bundled model
    database: str | None = None  # empty: SQLite at DATA_DIR/gateway.db
    data_dir: Path = Path("data")
    config: Path | None = None
    open_mode: bool = False  # no API keys needed; loud warning at start-up
    max_body_bytes: int = 1024 * 1024
    backend_connect_timeout: float = 5.0
    backend_timeout: float = 300.0  # seconds without a byte from the backend
    backend_total_timeout: float = 600.0  # seconds for a whole backend answer, streamed or not
    max_answer_bytes: int = 16 * 1024 * 1024  # largest backend answer (JSON body, or a stream's bytes)
    backend_max_connections: int = 100  # open connections per backend; more requests wait (connect timeout)
    max_n: int = 16  # most choices (`n`, `best_of`) one request may ask for
    local_vllm_port: int = 8100
    vllm_python: str | None = None
    vllm_args: tuple[str, ...] = ()  # more flags for the local vLLM ("--max-num-seqs 64"); they win over ours
    audit_batch_max: int = 512
    audit_db_wait: float = 2.0  # seconds an audit write waits for a locked or unreachable database, then spools
    policy: Path | None = None  # guardrails policy (TOML); none: every guard on with its defaults
    rag: bool = True  # load the embedding model and serve retrieval and /v1/embeddings
    embedding_model: str | None = None  # none: the bundled all-MiniLM-L6-v2; "hashing": the fake
    embedding_runtime: str = "auto"  # "onnx" (checked export, made at first load), "torch", or "auto": onnx, else torch
    onnx_cache: Path | None = None  # where ONNX exports of the MiniLM are kept (made once); none: DATA_DIR/onnx
    index_storage: str | None = None  # RAG index files: a folder (shared volume) or s3://BUCKET/PREFIX; none: DATA_DIR
    s3_endpoint_url: str | None = None  # an S3-compatible server for s3:// index storage; none: boto3's AWS_* settings
    sample_corpus: bool = True  # ingest the shipped sample corpus as collection "sample" if absent
    rag_top_k: int = 4
    rag_min_score: float = 0.3  # cosine similarity below which a passage is not used
    alias: tuple[str, ...] = ()  # "NAME=COLLECTION:MODEL[;sources=footer]": model NAME is RAG on COLLECTION with MODEL
    rag_sources: str = "annotations"  # how answers show sources: OpenAI annotations, or also a "footer" in the text
    citation_base_url: tuple[str, ...] = ()  # "COLLECTION=URL": link citations to the site the documents live on
    session_secret: str | None = None  # signs reviewer sessions; none: a random one kept in DATA_DIR
    review_sample_rate: float = 0.02  # share of unflagged requests that also enter the review queue
    eval_max_tokens: int = 256  # `max_tokens` of eval items that set none (a small model may not stop by itself)
    guard_workers: int = 2  # threads for model work (toxicity, embeddings), shared by all requests
    sqlite_synchronous: str = "NORMAL"  # NORMAL survives a process crash; FULL also a power cut
    log_level: str = "info"
    redis: str | None = None  # redis://HOST:PORT/DB: limit counters shared by replicas; none: in process
    limits_fail: str = "open"  # Redis unreachable: "open" serves unchecked, "closed" answers 503
    redis_prefix: str = "gw:lim:"  # key prefix in Redis, so several gateways can share one server
    model_limits: tuple[str, ...] = ()  # "MODEL:FIELD=VALUE" (a [model_limits.MODEL] table in the file)
    metrics: str = "admin"  # /metrics on the main port: "admin" (admin key), "open" (anyone) or "off"
    metrics_port: int = 0  # above 0: /metrics also served, open, on HOST:METRICS_PORT by a second small server
    log_format: str = "text"  # "json": one JSON object per line, with the request id of the request it is about
    otlp_endpoint: str | None = None  # OTLP/HTTP collector (http://HOST:4318): one trace per request; none: off
    shutdown_grace: float = 30.0  # seconds SIGTERM waits for requests and streams in flight, then cuts them
    # `gateway serve` processes sharing the port (gateway.workers): 0 ("auto"): one per usable core,
    # at most 4 (gateway.workers.auto_workers); 1: the server runs in-process
    workers: int = 0
    migrate_on_start: bool = True  # `gateway serve` upgrades the schema (false: a migration Job owns it)
    deployments: tuple[Deployment, ...] = ()  # [[deployments]]: weighted and shadow deployments per client model
    sticky: str = "none"  # A/B by stable hash: "key" (API key), "user" (the request's `user` field) or "none"
    shadow_max_in_flight: int = 16  # shadow copies in flight per replica; more are dropped and counted
    config_poll: float = 5.0  # seconds between looks at the live config version in the database (rollback)

    @property
    def onnx_cache_dir(self) -> Path:
        """Where the ONNX exports of the embedding model live (shared by serve, ingest and the toxicity scorer)."""
        return self.onnx_cache if self.onnx_cache is not None else self.data_dir / "onnx"

    @property
    def index_root(self) -> Path:
        """The local folder whose indexes/ holds the collections (with s3:// storage: the replica's cache)."""
        if self.index_storage is None or self.index_storage.startswith("s3://"):
            return self.data_dir
        return Path(self.index_storage)

    @property
    def database_url(self) -> str:
        """The async SQLAlchemy URL of the audit database."""
        from gateway.db import async_url

        return async_url(self.database or f"sqlite:///{self.data_dir / 'gateway.db'}")

    @property
    def aliases(self) -> dict[str, tuple[str, str]]:
        """Model aliases: name -> (collection, backend model)."""
        out = {}
        for entry in self.alias:
            name, collection, model, _ = parse_alias(entry)
            out[name] = (collection, model)
        return out

    @property
    def alias_sources(self) -> dict[str, str]:
        """Aliases with their own default for showing sources (`NAME=COLLECTION:MODEL;sources=footer`)."""
        out = {}
        for entry in self.alias:
            name, _, _, options = parse_alias(entry)
            if "sources" in options:
                out[name] = options["sources"]
        return out

    @property
    def citation_base_urls(self) -> dict[str, str]:
        """collection -> the base URL its documents' relative paths are joined to."""
        return {c.strip(): url.strip() for c, _, url in (e.partition("=") for e in self.citation_base_url)}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def parse_alias(entry: str) -> tuple[str, str, str, dict[str, str]]:
    """`NAME=COLLECTION:MODEL[;key=value...]` -> (name, collection, model, options), stripped."""
    name, _, target = entry.partition("=")
    target, _, rest = target.partition(";")
    collection, _, model = target.partition(":")
    options = {}
    for option in filter(None, (o.strip() for o in rest.split(";"))):
        key, _, value = option.partition("=")
        options[key.strip()] = value.strip()
    return name.strip(), collection.strip(), model.strip(), options


SETTING_NAMES = frozenset(f.name for f in fields(Settings))  # a CLI flag with one of these dests overrides it


def _coerce(name: str, value: Any, annotation: str, source: str) -> Any:
    """Turn a raw value from a file, the environment or a flag into the field's type."""
    try:
        if annotation == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if name == "workers" and str(value).strip().lower() == "auto":
            return 0
        if annotation == "int":
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if annotation == "float":
            return float(value)
        if annotation == "Path":
            return Path(str(value)).expanduser()
        if annotation == "Path | None":
            return Path(str(value)).expanduser() if value not in (None, "") else None
        if name == "deployments":
            from gateway.deployments import parse_deployments

            return parse_deployments(value)
        if name == "model_limits" and isinstance(value, dict):
            from gateway.limits import model_limit_entries

            return model_limit_entries(value)
        if name == "vllm_args" and isinstance(value, str):
            return tuple(shlex.split(value))  # flags keep their values: "--max-num-seqs 64"
        if annotation == "tuple[str, ...]":
            items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
            return tuple(str(v).strip() for v in items if str(v).strip())
        if annotation in {"str", "str | None"}:
            if isinstance(value, dict | list):
                raise ValueError(f"expected a string, got {value!r}")
            return None if annotation == "str | None" and value in (None, "") else str(value)
    except ValueError as exc:
        raise SettingsError(f"{source}: invalid value for {name!r}: {exc}") from exc
    raise SettingsError(f"{source}: unsupported setting type {annotation} for {name!r}")  # pragma: no cover


def _validate(settings: Settings) -> Settings:
    def bad(message: str) -> SettingsError:
        return SettingsError(f"invalid settings: {message}")

    if not 0 <= settings.port <= 65535:
        raise bad(f"port {settings.port} is outside 0-65535")
    for entry in settings.alias:
        name, collection, model, options = parse_alias(entry)
        if not (name and collection and model):
            raise bad(f"alias {entry!r} must look like NAME=COLLECTION:MODEL")
        if set(options) - {"sources"} or options.get("sources", "annotations") not in SOURCES_MODES:
            raise bad(f"alias {entry!r}: options after ';' are sources=annotations or sources=footer")
    if settings.rag_sources not in SOURCES_MODES:
        raise bad(f"rag_sources {settings.rag_sources!r} must be one of {', '.join(SOURCES_MODES)}")
    for entry in settings.citation_base_url:
        collection, _, url = entry.partition("=")
        if not collection.strip() or not url.strip().startswith(("http://", "https://")):
            raise bad(f"citation_base_url {entry!r} must look like COLLECTION=https://HOST/PATH")
    if not 0.0 <= settings.review_sample_rate <= 1.0:
        raise bad(f"review_sample_rate {settings.review_sample_rate} is outside 0-1")
    if settings.session_secret is not None and len(settings.session_secret) < 16:
        raise bad("session_secret must be at least 16 characters (unset: a random one is kept in DATA_DIR)")
    if settings.eval_max_tokens < 1:
        raise bad("eval_max_tokens must be at least 1")
    if not 1 <= settings.rag_top_k <= 50:
        raise bad(f"rag_top_k {settings.rag_top_k} is outside 1-50")
    if settings.guard_workers < 1:
        raise bad("guard_workers must be at least 1")
    if settings.embedding_runtime not in ("auto", "onnx", "torch"):
        raise bad(f"embedding_runtime must be 'auto', 'onnx' or 'torch', not {settings.embedding_runtime!r}")
    if settings.max_body_bytes < 1024:
        raise bad(f"max_body_bytes {settings.max_body_bytes} is below 1024")
    if settings.workers < 0:
        raise bad(f"workers must be 'auto' (0) or at least 1, not {settings.workers}")
    if settings.shutdown_grace < 0:
        raise bad("shutdown_grace must be zero or more seconds")
    if settings.audit_db_wait <= 0:
        raise bad("audit_db_wait must be positive")
    if settings.backend_timeout <= 0 or settings.backend_connect_timeout <= 0 or settings.backend_total_timeout <= 0:
        raise bad("backend timeouts must be positive")
    if settings.backend_max_connections < 1:
        raise bad(f"backend_max_connections {settings.backend_max_connections} is below 1")
    if settings.max_answer_bytes < 1024:
        raise bad(f"max_answer_bytes {settings.max_answer_bytes} is below 1024")
    if settings.max_n < 1:
        raise bad("max_n must be at least 1")
    if settings.sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise bad(f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {settings.sqlite_synchronous!r}")
    if settings.metrics not in ("admin", "open", "off"):
        raise bad(f"metrics must be 'admin', 'open' or 'off', not {settings.metrics!r}")
    if not 0 <= settings.metrics_port <= 65535:
        raise bad(f"metrics_port {settings.metrics_port} is outside 0-65535")
    if settings.log_format not in ("text", "json"):
        raise bad(f"log_format must be 'text' or 'json', not {settings.log_format!r}")
    if settings.index_storage is not None and "://" in settings.index_storage:
        bucket = settings.index_storage.removeprefix("s3://").partition("/")[0]
        if not settings.index_storage.startswith("s3://") or not bucket:
            raise bad(f"index_storage {settings.index_storage!r} must be a folder or s3://BUCKET/PREFIX")
    if settings.otlp_endpoint is not None and not settings.otlp_endpoint.startswith(("http://", "https://")):
        raise bad(f"otlp_endpoint {settings.otlp_endpoint!r} must start with http:// or https://")
    if settings.sticky not in ("none", "key", "user"):
        raise bad(f"sticky must be 'none', 'key' or 'user', not {settings.sticky!r}")
    if settings.shadow_max_in_flight < 1:
        raise bad("shadow_max_in_flight must be at least 1")
    if not 0 < settings.config_poll <= 30:
        raise bad(f"config_poll {settings.config_poll} must be above 0 and at most 30 seconds")
    if settings.limits_fail not in ("open", "closed"):
        raise bad(f"limits_fail must be 'open' or 'closed', not {settings.limits_fail!r}")
    if settings.redis is not None and not settings.redis.startswith(("redis://", "rediss://", "unix://")):
        raise bad(f"redis URL {settings.redis!r} must start with redis://, rediss:// or unix://")
    from gateway.limits import parse_model_limits

    try:
        parse_model_limits(settings.model_limits)
    except ValueError as exc:
        raise bad(str(exc)) from exc
    for url in settings.backend:
        if not url.startswith(("http://", "https://")):
            raise bad(f"backend URL {url!r} must start with http:// or https://")
    if settings.database is not None:
        from gateway.db import async_url

        try:
            async_url(settings.database)
        except ValueError as exc:
            raise bad(str(exc)) from exc
    return settings.replace(sqlite_synchronous=settings.sqlite_synchronous.upper())


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings. `overrides` are command-line values (None means unset)."""
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    kinds = {f.name: str(f.type) for f in fields(Settings)}
    values: dict[str, Any] = {}

    config_path = overrides.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        path = Path(str(config_path)).expanduser()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SettingsError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        section = raw.get("gateway", raw)
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in kinds or name == "config":
                if isinstance(value, dict):
                    continue  # other tables (policy, retrieval, ...) belong to other parts
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, kinds[name], f"config file {path}")
        values["config"] = path

    for name, kind in kinds.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _coerce(name, environ[env_name], kind, f"environment variable {env_name}")
    if ENV_PREFIX + "OPEN" in environ:
        values["open_mode"] = _coerce(
            "open_mode", environ[ENV_PREFIX + "OPEN"], "bool", "environment variable GATEWAY_OPEN"
        )

    for name, value in overrides.items():
        if name not in kinds:
            raise SettingsError(f"unknown setting {name!r}")
        coerced = _coerce(name, value, kinds[name], f"option --{name.replace('_', '-')}")
        # `--alias` adds to the file's aliases (one of the same name wins); other flags replace.
        values[name] = (*values.get("alias", ()), *coerced) if name == "alias" else coerced
    return _validate(Settings(**values))


@asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The audit database's engine for one command: `async with open_engine(settings) as engine:`;
    disposed on the way out, however the block ends."""
    from gateway.db import create_engine

    engine = create_engine(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        yield engine
    finally:
        await engine.dispose()
