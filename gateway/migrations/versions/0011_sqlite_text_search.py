"""SQLite: a full-text index (FTS5) for the reviewer's text filter, kept in step by triggers.

PostgreSQL has its GIN index over a tsvector since 0010; this is the same for the default database,
so a filter of plain words stops scanning every row with LIKE. Nothing changes on PostgreSQL.

`audit_records_fts` is a contentless FTS5 table (`content=''`): it holds the index only, not a
second copy of the text, and its rowid is the audit row's id. What it indexes is what PostgreSQL's
index expression reads: the stored request and the answer, the first 100,000 characters of each,
with the JSON escapes `\\n`, `\\r`, `\\t` of the request turned into spaces, so the word after a line
break is a word (`gateway.review_store` relies on both indexing the same text). The tokenizer folds
case and keeps diacritics (PostgreSQL's `simple` configuration does the same); `detail=none` keeps
no positions, as the filter asks for words and word prefixes, never phrases.

The audit writer's hot path is left alone: a trigger indexing each row in the writer's transaction
cost 0.35 to 0.42 ms a row (benchmarks/bench_sqlite_fts.py, 2 shared cores), over the 0.05 ms a
request that a new layer may cost; indexed afterwards in batches, a row costs 0.04 ms of a
background thread. So new rows are indexed in the background,
in batches keyed by rowid (`gateway.review_store.index_text`, run every few seconds by the
gateway and before each search): `audit_records_fts_state.indexed_to` is the highest id indexed,
every row up to it is in the index. Only the rarer writes go through triggers, for rows already
indexed: a delete (`gateway db prune`) removes the row from the index (a contentless table forgets
a row only when told the text it indexed, which the trigger recomputes from the old row with the
same expression) and lowers `indexed_to` if the newest rows went, since SQLite then hands their ids
out again; an update of the two columns re-indexes the row. There is no trigger on insert, not
even one that only checks the id: it cost the writer 0.07 ms a row (measured, batches of 50), so a
row inserted with an explicit id at or below `indexed_to` (never by the gateway, whose ids only
grow) stays out of the index.

The existing rows are indexed here, in the migration's one transaction (see the benchmark for the
time per million rows; the audit writer waits, then spools and replays, meanwhile).

A later migration that rebuilds audit_records (a batch ALTER on SQLite copies the table and drops
the old one) drops these triggers with it and must create them again (`TRIGGER_SQL` here); the
review store checks that they exist and falls back to LIKE if they do not.

A SQLite built without FTS5 gets no table; the review store then keeps the LIKE scan.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLE = "audit_records_fts"
STATE = "audit_records_fts_state"
TRIGGERS = ("audit_records_fts_delete", "audit_records_fts_update")
_INDEXED_TO = f"(SELECT indexed_to FROM {STATE})"
_NEWEST = "(SELECT coalesce(max(id), 0) FROM audit_records)"


def indexed_text(row: str) -> str:
    """The indexed text of `row` (`new`, `old`, or the table's name): PostgreSQL's expression in SQLite."""
    request = f"substr(coalesce({row}.request_json, ''), 1, 100000)"
    for escape in ("n", "r", "t"):
        request = f"replace({request}, '\\{escape}', ' ')"  # SQLite's '\n' is a backslash and an n
    return f"{request} || ' ' || substr(coalesce({row}.response_text, ''), 1, 100000)"


def _forget(row: str) -> str:
    return f"INSERT INTO {TABLE} ({TABLE}, rowid, body) VALUES ('delete', {row}.id, {indexed_text(row)});"


def _index(row: str) -> str:
    return f"INSERT INTO {TABLE} (rowid, body) VALUES ({row}.id, {indexed_text(row)});"


TRIGGER_SQL = {
    TRIGGERS[0]: f"AFTER DELETE ON audit_records WHEN old.id <= {_INDEXED_TO} BEGIN {_forget('old')} "
    f"UPDATE {STATE} SET indexed_to = {_NEWEST} WHERE indexed_to > {_NEWEST}; END",
    TRIGGERS[1]: f"AFTER UPDATE OF request_json, response_text ON audit_records WHEN old.id <= {_INDEXED_TO} "
    f"BEGIN {_forget('old')} {_index('new')} END",
}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    if not bind.exec_driver_sql("SELECT sqlite_compileoption_used('ENABLE_FTS5')").scalar():
        return  # no FTS5 in this SQLite: the text filter keeps its LIKE scan
    op.execute(
        f"CREATE VIRTUAL TABLE {TABLE} USING fts5(body, content='', columnsize=0, detail=none, "
        "tokenize='unicode61 remove_diacritics 0')"
    )
    op.execute(f"CREATE TABLE {STATE} (id INTEGER PRIMARY KEY CHECK (id = 1), indexed_to INTEGER NOT NULL)")
    op.execute(f"INSERT INTO {TABLE} (rowid, body) SELECT id, {indexed_text('audit_records')} FROM audit_records")
    op.execute(f"INSERT INTO {STATE} (id, indexed_to) VALUES (1, {_NEWEST})")
    for name, body in TRIGGER_SQL.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
    op.execute(f"DROP TABLE IF EXISTS {STATE}")
