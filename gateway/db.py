"""The gateway's SQL schema: audit records, API keys, reviews and evals, SQLite or PostgreSQL.

Text columns hold JSON encoded by msgspec (faster than the JSON type's json.dumps, and the
same on both databases). Columns that reviewers filter on (status, model, key, guard
outcomes, scores) are plain indexed columns so paging stays fast at millions of rows.
Engines come from the project's one factory, `retrieval.engine` (re-exported here), so the
gateway and retrieval open the shared database with the same URL rules and SQLite pragmas.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from retrieval.engine import async_url as async_url
from retrieval.engine import create_engine as create_engine

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite only autoincrements INTEGER PRIMARY KEY

# On PostgreSQL, migration 0010 partitions this table by month of `created_at` (gateway.partitions,
# `gateway db maintain`): there the primary key is (id, created_at), `request_id` is unique per
# (request_id, created_at), and a GIN index serves the reviewer's text filter. This Table stays the
# logical definition, and SQLite's schema.
audit_records = Table(
    "audit_records",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("api_key_id", String(40)),
    Column("endpoint", String(40), nullable=False),
    Column("model", String(200)),
    Column("backend", String(300)),
    Column("stream", Boolean, nullable=False, default=False),
    Column("status", String(32), nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("request_json", Text),
    Column("response_text", Text),
    Column("response_json", Text),
    Column("finish_reason", String(32)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("gateway_ms", Float),
    Column("backend_ms", Float),
    Column("ttft_ms", Float),
    Column("total_ms", Float),
    Column("client_ip", String(64)),
    # Filled by the guardrails and retrieval stages.
    Column("passages_json", Text),
    Column("citations_json", Text),
    Column("guards_json", Text),
    Column("blocked_by", String(64)),
    Column("flagged_by", String(200)),
    Column("groundedness", Float),
    Column("toxicity", Float),
    Column("trace_id", String(32)),  # W3C trace id: from the record to its trace
    # Rollout (migration 0008): which deployment and versions produced the answer.
    Column("deployment", String(64)),
    Column("backend_model", String(200)),
    Column("shadow_of", String(40)),  # a shadow copy's row: the request id of the primary it copies
    Column("config_version", String(64)),
    Column("policy_version", String(64)),
    Column("index_versions", Text),  # JSON {collection: version} of the indexes the request searched
    Column("gateway_version", String(32)),
    # Migration 0009: where the request came from. NULL is live traffic; "eval" marks the rows of
    # eval runs, which the review queue, usage, drift and metrics leave out by default.
    Column("origin", String(16)),
    Index("ix_audit_records_created_at", "created_at"),
    Index("ix_audit_records_status_created", "status", "created_at"),
    Index("ix_audit_records_model_created", "model", "created_at"),
    Index("ix_audit_records_key_created", "api_key_id", "created_at"),
    Index("ix_audit_records_blocked_created", "blocked_by", "created_at"),
    Index("ix_audit_records_trace_id", "trace_id"),
    Index("ix_audit_records_shadow_of", "shadow_of"),
    Index("ix_audit_records_origin_created", "origin", "created_at"),
)

# Applied configurations (gateway.rollout): each distinct config once, and every time one was applied.
config_versions = Table(
    "config_versions",
    metadata,
    Column("version", String(64), primary_key=True),  # hash of the config (deployments, aliases, policy)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("source", Text),  # the file it was read from
    Column("config_json", Text, nullable=False),
    Column("policy_version", String(64)),
)

config_events = Table(
    "config_events",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("version", String(64), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),  # start | reload | rollback
    Column("host", String(200)),
    Index("ix_config_events_applied", "applied_at"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200)),
    Column("role", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("default_collection", String(64)),  # RAG collection used when a request names none
    # Migration 0009: the collections this key may search and read (JSON list; NULL: all of them),
    # and how its RAG answers show their sources by default ("annotations" or "footer"; NULL: the setting).
    Column("collections", Text),
    Column("rag_sources", String(16)),
    # Limits (gateway.limits); NULL means no limit. Read with the key, so a change applies within its cache TTL.
    Column("rpm", Integer),
    Column("tpm", BigInteger),
    Column("max_concurrent", Integer),
    Column("tokens_per_day", BigInteger),
    Column("tokens_per_month", BigInteger),
)


review_labels = Table(
    "review_labels",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=False),
    Column("label", String(32), nullable=False),  # ok, hallucination, toxic, false_positive, bad_retrieval, other
    Column("note", Text),
    Column("reviewer", String(40), nullable=False),  # the reviewer's API key id
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_review_labels_request", "request_id", "created_at"),
    Index("ix_review_labels_label_created", "label", "created_at"),
)

# End-user ratings of answers (issue 16, migration 0009): several per request; per key the newest
# one is that key's rating. `key_id` is the key that sent the feedback (the request's own key, or a
# reviewer's or admin's).
feedback = Table(
    "feedback",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("rating", Integer, nullable=False),  # 1 good, 0 neutral, -1 bad
    Column("comment", Text),
    Column("categories_json", Text),  # JSON list of short category names ("wrong", "unsafe", ...)
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The rated audit record's created_at (migration 0012): with request_id, the key of that record
    # on the partitioned table, so a lookup reads one monthly partition, not all of them. NULL for
    # rows the migration's backfill found no record for; the review store falls back to request_id.
    Column("record_created_at", DateTime(timezone=True)),
    Index("ix_feedback_request_created", "request_id", "created_at"),
    Index("ix_feedback_rating_created", "rating", "created_at"),
)

review_sessions = Table(
    "review_sessions",
    metadata,
    Column("id", String(64), primary_key=True),  # SHA-256 of the session's random id (the cookie holds the id)
    Column("key_id", String(40), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),  # set by sign-out
    Index("ix_review_sessions_key", "key_id"),
    Index("ix_review_sessions_expires", "expires_at"),
)

eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # dataset | traffic
    Column("name", String(200), nullable=False),  # dataset file name, or the traffic window
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("status", String(16), nullable=False),  # running | passed | regressed | failed
    Column("metrics_json", Text),
    Column("comparison_json", Text),  # against the previous run of the same kind and name
    Column("report_path", Text),
    Column("config_json", Text),
    Index("ix_eval_runs_kind_name_started", "kind", "name", "started_at"),
)

eval_items = Table(
    "eval_items",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("request_id", String(40)),  # the audit record of this item, when it went through the pipeline
    Column("input_json", Text, nullable=False),
    Column("output_text", Text),
    Column("scores_json", Text),
    Column("passed", Boolean),
    Column("latency_ms", Float),
    Column("error", Text),
    Index("ix_eval_items_run", "run_id", "position"),
)

#: Upper bounds (ms) of the latency histogram kept per rollup bucket (`lat_00` ... `lat_17`, the
#: last one open): the overview's percentiles are read from these counts.
ROLLUP_LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000,
                            120_000, 300_000)  # fmt: skip
ROLLUP_LATENCY_COLUMNS = tuple(f"lat_{i:02d}" for i in range(len(ROLLUP_LATENCY_BOUNDS_MS) + 1))

# Pre-aggregated audit figures (gateway.rollup): one row per time bucket (5 minutes or an hour) and
# origin, model, status and guard outcome, so the overview reads thousands of rows, not millions.
# NULLs are stored as '' (a primary key column cannot be NULL). A computed bucket without any
# record still has one row (status '', zero counts), so "computed" and "empty" are told apart.
audit_rollups = Table(
    "audit_rollups",
    metadata,
    Column("size_s", Integer, primary_key=True),  # 300 or 3600
    Column("bucket_start", BigInteger, primary_key=True),  # epoch seconds, a multiple of size_s
    Column("origin", String(16), primary_key=True),  # '' live traffic, 'eval'
    Column("model", String(200), primary_key=True),
    Column("status", String(32), primary_key=True),
    Column("blocked_by", String(64), primary_key=True),
    Column("flagged_by", String(200), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("latency_n", BigInteger, nullable=False),  # records with a total_ms
    Column("latency_sum_ms", Float, nullable=False),
    Column("toxicity_n", BigInteger, nullable=False),
    Column("toxicity_sum", Float, nullable=False),
    Column("groundedness_n", BigInteger, nullable=False),
    Column("groundedness_sum", Float, nullable=False),
    *(Column(name, BigInteger, nullable=False) for name in ROLLUP_LATENCY_COLUMNS),
)
