"""PostgreSQL: `audit_records` partitioned by month of `created_at`, and a text-search index.

SQLite is left as it is (no partitioning there; `gateway db prune` is its retention tool).

How existing rows are kept: the old table is renamed `audit_records_legacy`, a partitioned
`audit_records` is created with the same columns (`LIKE`, so defaults and NOT NULLs match and the
id sequence carries on), and the old table is ATTACHed as one partition covering everything before
the first month boundary after both now and its newest row. The bound is proven first by a
`CHECK (created_at < bound)` added NOT VALID and then validated (one sequential read, no rewrite),
so the ATTACH itself does not scan again. No row is copied: copying a billion rows in batches
would take hours, double the disk for a while and race the live writer; attaching is one read.
What does cost time on a big table is building the parent's new indexes on the old partition
(the (id, created_at) and (request_id, created_at) keys and the text-search index); the plain
indexes it already has are adopted as they are. All of it is one transaction, so the gateway's
audit writer waits (and spools, then replays) meanwhile, and a failure leaves the table as it was.
An empty old table is simply dropped.

Then one partition per month, from the first one after the legacy bound (or this month) for
`MONTHS_AHEAD` months ahead, named `audit_records_pYYYY_MM`, and a DEFAULT partition, so an
insert never fails for want of a partition (`gateway db maintain` moves such rows out later).

Keys: a partitioned table's unique constraints must contain the partition key, so the primary key
is (id, created_at) and `request_id` is unique per (request_id, created_at). The ids still come
from one sequence, so `id` stays unique; and a replayed or retried audit row carries its original
`created_at`, so the duplicate is still refused (and recognised as stored, gateway.audit). Nothing
else relies on the keys: labels and feedback refer to records by `request_id`, without a foreign key.

Text search: a GIN index over `to_tsvector('simple', ...)` of the stored request and the answer
(their first 100,000 characters each: a tsvector holds at most 1 MB, and an index expression
that fails would refuse the row). JSON escapes `\\n`, `\\r`, `\\t` in the stored request become
spaces first, so the word after a line break is a word. `gateway.review_store` repeats this
expression exactly (`TEXT_SEARCH_SQL`), or PostgreSQL would not use the index.

Downgrade copies the rows back into one plain table (slow on a big table; it is the way back).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLE = "audit_records"
LEGACY = "audit_records_legacy"
DEFAULT = "audit_records_default"
MONTHS_AHEAD = 3  # partitions created ahead of the current month (gateway.partitions does the same)
TEXT_SEARCH_INDEX = "ix_audit_records_text_search"
TEXT_SEARCH_SQL = (
    "to_tsvector('simple'::regconfig, "
    r"coalesce(regexp_replace(left(request_json, 100000), '\\[nrt]', ' ', 'g'), '') || ' ' || "
    "coalesce(left(response_text, 100000), ''))"
)
# The plain indexes of db.py's audit_records (name: columns); the same on the partitioned parent.
_INDEXES = {
    "ix_audit_records_created_at": "created_at",
    "ix_audit_records_status_created": "status, created_at",
    "ix_audit_records_model_created": "model, created_at",
    "ix_audit_records_key_created": "api_key_id, created_at",
    "ix_audit_records_blocked_created": "blocked_by, created_at",
    "ix_audit_records_trace_id": "trace_id",
    "ix_audit_records_shadow_of": "shadow_of",
    "ix_audit_records_origin_created": "origin, created_at",
}


def _month(moment: datetime, add: int = 0) -> datetime:
    """The start (UTC) of the month of `moment`, moved `add` months."""
    index = moment.year * 12 + moment.month - 1 + add
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _literal(moment: datetime) -> str:
    return f"'{moment.strftime('%Y-%m-%d %H:%M:%S')}+00'"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    run = op.execute
    now = datetime.now(UTC)
    newest = bind.execute(sa.text(f"SELECT max(created_at) FROM {TABLE}")).scalar()
    run(f"ALTER TABLE {TABLE} RENAME TO {LEGACY}")
    # The old keys go (a partition cannot keep a primary key of its own); its plain indexes are
    # renamed out of the way and adopted by the parent's indexes of the same definition.
    run(f"ALTER TABLE {LEGACY} DROP CONSTRAINT pk_audit_records, DROP CONSTRAINT uq_audit_records_request_id")
    for name in _INDEXES:
        run(f"ALTER INDEX IF EXISTS {name} RENAME TO {LEGACY}_{name.removeprefix('ix_audit_records_')}")
    run(f"CREATE TABLE {TABLE} (LIKE {LEGACY} INCLUDING DEFAULTS) PARTITION BY RANGE (created_at)")
    run(f"ALTER SEQUENCE audit_records_id_seq OWNED BY {TABLE}.id")  # dropping a partition keeps it
    run(f"ALTER TABLE {LEGACY} ALTER COLUMN id DROP DEFAULT")
    if newest is None:
        run(f"DROP TABLE {LEGACY}")
        first = _month(now)
    else:
        first = _month(max(now, newest), 1)
        bound = _literal(first)
        run(f"ALTER TABLE {LEGACY} ADD CONSTRAINT {LEGACY}_bound CHECK (created_at < {bound}) NOT VALID")
        run(f"ALTER TABLE {LEGACY} VALIDATE CONSTRAINT {LEGACY}_bound")
        run(f"ALTER TABLE {TABLE} ATTACH PARTITION {LEGACY} FOR VALUES FROM (MINVALUE) TO ({bound})")
        run(f"ALTER TABLE {LEGACY} DROP CONSTRAINT {LEGACY}_bound")
    for add in range(MONTHS_AHEAD + 1):
        start, end = _month(first, add), _month(first, add + 1)
        run(
            f"CREATE TABLE {TABLE}_p{start:%Y_%m} PARTITION OF {TABLE} "
            f"FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})"
        )
    run(f"CREATE TABLE {DEFAULT} PARTITION OF {TABLE} DEFAULT")
    run(f"ALTER TABLE {TABLE} ADD CONSTRAINT pk_audit_records PRIMARY KEY (id, created_at)")
    run(f"ALTER TABLE {TABLE} ADD CONSTRAINT uq_audit_records_request_id UNIQUE (request_id, created_at)")
    for name, columns in _INDEXES.items():
        run(f"CREATE INDEX {name} ON {TABLE} ({columns})")
    run(f"CREATE INDEX {TEXT_SEARCH_INDEX} ON {TABLE} USING gin (({TEXT_SEARCH_SQL}))")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    run = op.execute
    plain = "audit_records_plain"
    run(f"CREATE TABLE {plain} (LIKE {TABLE} INCLUDING DEFAULTS)")
    run(f"INSERT INTO {plain} SELECT * FROM {TABLE}")
    run(f"ALTER SEQUENCE audit_records_id_seq OWNED BY {plain}.id")
    run(f"DROP TABLE {TABLE}")  # and every partition
    run(f"ALTER TABLE {plain} RENAME TO {TABLE}")
    run(f"ALTER TABLE {TABLE} ADD CONSTRAINT pk_audit_records PRIMARY KEY (id)")
    run(f"ALTER TABLE {TABLE} ADD CONSTRAINT uq_audit_records_request_id UNIQUE (request_id)")
    for name, columns in _INDEXES.items():
        run(f"CREATE INDEX {name} ON {TABLE} ({columns})")
