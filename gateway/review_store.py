"""Reviewer queries over the audit log: filtered keyset pages, one record, labels, queue, export.

Paging is keyset (created_at, id) on indexed columns, never OFFSET, so page 1,000 costs what
page 1 costs however many records there are. A page costs a fixed number of queries whatever
its length: the page itself, then the labels and the ratings of all its rows at once. Plain
code over the async engine; the HTML pages and the JSON API both call it. The text filter reads a
full-text index where there is one: PostgreSQL's GIN index (migration 0010), SQLite's FTS5 table
(migration 0011), which `TextIndexTask` fills in the background, off the audit writer's path.

Labels are append-only: a change is a new row, a removal is a row labelled `cleared`, and a
request's current label is its newest row (None once cleared). End-user ratings (`feedback`)
count per key: a key's newest rating of a request is that key's rating, and a request's score
is the mean of those. Eval runs' rows (`origin = 'eval'`) stay out of lists and the queue unless
asked for.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import math
import re
import sqlite3
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    and_,
    exists,
    false,
    func,
    literal_column,
    or_,
    select,
    table,
    text,
    true,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import Join

from gateway import usage
from gateway.db import audit_records, feedback, review_labels
from gateway.errors import InvalidRequest, NotFound
from gateway.jsontext import loads_stored, scrub
from gateway.periodic import PeriodicTask
from retrieval.engine import SQLITE_BUSY_TIMEOUT_S

log = logging.getLogger(__name__)

LABELS = ("ok", "hallucination", "toxic", "false_positive", "bad_retrieval", "other")
CLEARED = "cleared"  # the label row that removes a request's label (the history stays)
RATINGS = ("negative", "neutral", "positive", "unrated")  # the sign of a request's mean rating, or none
ORIGINS = usage.ORIGINS  # live (the default: all but eval runs' rows), eval, all
EXCERPT_CHARS = 120
_MAX_ROW_ID = 2**63 - 1  # BIGINT; a larger cursor id would overflow the database driver
_MAX_REQUEST_ID = 40  # audit_records.request_id is String(40): a longer id names no record
_JSON_COLUMNS = ("request_json", "response_json", "passages_json", "citations_json", "guards_json")
_COMMENTS_SHOWN = 3  # latest comments per request on the list
_LIST_COLUMNS = [
    audit_records.c.id,
    audit_records.c.request_id,
    audit_records.c.created_at,
    audit_records.c.api_key_id,
    audit_records.c.endpoint,
    audit_records.c.model,
    audit_records.c.stream,
    audit_records.c.status,
    audit_records.c.http_status,
    audit_records.c.blocked_by,
    audit_records.c.flagged_by,
    audit_records.c.groundedness,
    audit_records.c.toxicity,
    audit_records.c.total_ms,
    audit_records.c.total_tokens,
    audit_records.c.origin,
    # For the excerpts (the request is parsed for its last user turn; only the answer's start is read)
    # and for "were passages used", which decides whether a groundedness score means anything.
    audit_records.c.request_json,
    func.substr(audit_records.c.response_text, 1, 4 * EXCERPT_CHARS).label("answer_start"),
    and_(audit_records.c.passages_json.is_not(None), audit_records.c.passages_json.not_in(["", "[]"])).label(
        "passages_used"
    ),
]


@dataclass(frozen=True)
class Filters:
    """What a reviewer narrows the list by; every field optional."""

    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    api_key: str | None = None
    status: str | None = None
    guard: str | None = None  # blocked or flagged by this guard
    outcome: str | None = None  # "blocked" | "flagged"
    groundedness_below: float | None = None
    toxicity_above: float | None = None
    q: str | None = None  # text in the prompt or the answer (TextMatch: words, or a substring when punctuated)
    rating: str | None = None  # one of RATINGS
    label: str | None = None  # the current label: one of LABELS, or "none" for unlabelled
    origin: str | None = None  # one of ORIGINS; None is "live"

    @classmethod
    def parse(cls, params: dict[str, str]) -> Filters:
        """From query parameters, with a 400 naming the parameter that is wrong."""
        values: dict[str, Any] = {}
        choices = {"outcome": ("blocked", "flagged"), "rating": RATINGS, "label": (*LABELS, "none"), "origin": ORIGINS}
        for f in fields(cls):
            raw = params.get(f.name)
            if raw is None or raw == "":
                continue
            try:
                if "\x00" in raw or len(raw) > 1000:
                    raise ValueError("must be under 1,000 characters, without NUL")
                if f.name in ("since", "until"):
                    values[f.name] = _utc(datetime.fromisoformat(raw))
                elif f.name in ("groundedness_below", "toxicity_above"):
                    values[f.name] = float(raw)
                    if not math.isfinite(values[f.name]):
                        raise ValueError("must be a finite number")
                elif f.name in choices:
                    if raw not in choices[f.name]:
                        raise ValueError("must be one of " + ", ".join(choices[f.name]))
                    values[f.name] = raw
                else:
                    values[f.name] = scrub(raw)
            except (ValueError, OverflowError) as exc:
                raise InvalidRequest(f"bad filter {f.name}={raw[:100]!r}: {exc}", param=f.name) from exc
        if values.get("origin") == "live":
            del values["origin"]  # the default, spelled out
        return cls(**values)

    def query_string(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return out

    def apply(self, query: Select[Any]) -> Select[Any]:
        c = audit_records.c
        conditions = [origin_condition(self.origin)]
        if self.since:
            conditions.append(c.created_at >= self.since)
        if self.until:
            conditions.append(c.created_at < self.until)
        if self.model:
            conditions.append(c.model == self.model)
        if self.api_key:
            conditions.append(c.api_key_id == self.api_key)
        if self.status:
            conditions.append(c.status == self.status)
        if self.outcome == "blocked":
            conditions.append(c.blocked_by.is_not(None))
        elif self.outcome == "flagged":
            conditions.append(c.flagged_by.is_not(None))
        if self.guard:
            # flagged_by is a comma-separated list: match whole names, with LIKE wildcards escaped.
            g = self.guard
            conditions.append(
                or_(
                    c.blocked_by == g,
                    c.flagged_by == g,
                    c.flagged_by.startswith(g + ",", autoescape=True),
                    c.flagged_by.endswith("," + g, autoescape=True),
                    c.flagged_by.contains("," + g + ",", autoescape=True),
                )
            )
        if self.groundedness_below is not None:
            conditions.append(c.groundedness < self.groundedness_below)
        if self.toxicity_above is not None:
            conditions.append(c.toxicity > self.toxicity_above)
        if self.q:
            conditions.append(TextMatch(self.q))
        if self.rating:
            conditions.append(rating_condition(self.rating))
        if self.label == "none":
            conditions.append(~label_condition(None))
        elif self.label:
            conditions.append(label_condition(self.label))
        return query.where(and_(*conditions))


# The expression of migration 0010's GIN index (ix_audit_records_text_search), verbatim but for
# the table name: PostgreSQL uses an expression index only for the same expression.
TEXT_SEARCH_SQL = (
    "to_tsvector('simple'::regconfig, "
    r"coalesce(regexp_replace(left(audit_records.request_json, 100000), '\\[nrt]', ' ', 'g'), '') || ' ' || "
    "coalesce(left(audit_records.response_text, 100000), ''))"
)
TEXT_PROBE_CAP = 20_000  # matches read from the GIN index before a word counts as common
TEXT_WINDOW_ROWS = 5000  # SQLite: newest rows scanned for a page of a word before its index is read
# A probe's plan: the GIN index as a bitmap, never a walk of a b-tree or the table; memory for an
# exact bitmap, so no row's tsvector is recomputed to recheck a lossy page.
# And a plan for these values: after five runs PostgreSQL may switch to a generic plan, which
# knows neither the word nor the ids (see `page`).
_BITMAP_ONLY = (("enable_seqscan", "off"), ("enable_indexscan", "off"), ("enable_indexonlyscan", "off"),
                ("work_mem", "'64MB'"), ("plan_cache_mode", "force_custom_plan"))  # fmt: skip


# Migration 0011's FTS5 table over the same text on SQLite (contentless: its rowid is the audit
# row's id), and the triggers that keep it in step; without all of them the filter keeps LIKE.
FTS_TABLE = "audit_records_fts"
FTS_STATE = "audit_records_fts_state"  # indexed_to: every row with an id up to it is in the index
FTS_TRIGGERS = ("audit_records_fts_delete", "audit_records_fts_update")
# What the FTS table indexes of a row: TEXT_SEARCH_SQL's text, in SQLite (migration 0011 repeats it
# in its triggers, which must forget exactly the text that was indexed).
FTS_TEXT_SQL = (
    r"replace(replace(replace(substr(coalesce(audit_records.request_json, ''), 1, 100000), '\n', ' '), "
    r"'\r', ' '), '\t', ' ') || ' ' || substr(coalesce(audit_records.response_text, ''), 1, 100000)"
)
FTS_BATCH = 2000  # rows indexed per transaction: the audit writer waits at most this long for its lock
_WORDS = re.compile(r"[A-Za-z0-9]+(?:\s+[A-Za-z0-9]+)*")


def word_query(q: str) -> str | None:
    """The tsquery of a text filter made of plain words: each word, or a word it begins, all of
    them (`zebra idiot` -> `zebra:* & idiot:*`); None for text with anything else in it."""
    if not _WORDS.fullmatch(q.strip()):
        return None
    return " & ".join(f"{word.lower()}:*" for word in q.split())


def fts_query(q: str) -> str | None:
    """The FTS5 query of the same filter (`zebra idiot` -> `"zebra"* AND "idiot"*`: quoted, so a
    word such as NOT or NEAR is a word); None for text with anything else in it."""
    if not _WORDS.fullmatch(q.strip()):
        return None
    return " AND ".join(f'"{word.lower()}"*' for word in q.split())


def fts_matches(words: str) -> Select[Any]:
    """The ids of the audit rows whose text matches the FTS5 query `words` (SQLite, migration 0011)."""
    return (
        select(literal_column("rowid"))
        .select_from(table(FTS_TABLE))
        .where(literal_column(FTS_TABLE).op("MATCH")(words))
    )


class TextMatch(ColumnElement[bool]):
    """The reviewer's text filter `q`: the prompt or the answer holds the text.

    A filter of plain words is a full-text match: every word, or a word it begins, in the prompt
    or the answer (`zebra` finds "zebras" but not "subzebra"), so it stays fast at millions of rows.
    PostgreSQL reads its GIN index (migration 0010). On SQLite `ReviewStore.page` does it (its FTS5
    table, migration 0011, and `words_match`); this element is SQLite's substring scan, for
    punctuated text and for a database without the index. A filter with punctuation or other
    characters (`100%`, `snake_case`, `C:\\`) is the exact substring match (LIKE, `%` and `_`
    escaped) on both, a scan of the rows in the other filters' range."""

    type = Boolean()
    inherit_cache = False  # compiled per dialect, with the text inlined as a bound parameter

    def __init__(self, q: str) -> None:
        self.q = q


def _substring(q: str) -> ColumnElement[bool]:
    c = audit_records.c
    # autoescape: a `%` or `_` in the text is that character, not a wildcard (SQLite and PostgreSQL).
    return or_(c.request_json.contains(q, autoescape=True), c.response_text.contains(q, autoescape=True))


@compiles(TextMatch)
def _compile_substring(element: TextMatch, compiler: SQLCompiler, **kw: Any) -> str:
    # In parentheses: the OR inside must not join the other filters' AND (the page's cursor included).
    return f"({compiler.process(_substring(element.q), **kw)})"


@compiles(TextMatch, "postgresql")
def _compile_words(element: TextMatch, compiler: SQLCompiler, **kw: Any) -> str:
    words = word_query(element.q)
    if words is None:
        return f"({compiler.process(_substring(element.q), **kw)})"
    match = literal_column(TEXT_SEARCH_SQL).op("@@")(func.to_tsquery(literal_column("'simple'"), words))
    return compiler.process(match, **kw)


def _token_char(char: str) -> bool:
    """A character FTS5's unicode61 tokenizer keeps in a token: letters, numbers, private-use
    characters and, as it keeps diacritics, combining marks (Mn); any other separates tokens."""
    category = unicodedata.category(char)
    return category[0] in "LN" or category in ("Co", "Mn")


def words_match(words: list[str], request_json: str | None, response_text: str | None) -> bool:
    """Whether the text the FTS5 index holds of a row (`FTS_TEXT_SQL`) has every word of `words`
    (plain ASCII words, see `fts_query`) at the start of a token, in any case: the index's answer,
    worked out in Python, for rows the page reads anyway. The index differs on a few characters
    only: the non-ASCII ones it folds into ASCII letters (the Kelvin sign, the long s), which LIKE
    does not pass either, and characters newer than SQLite's Unicode tables."""
    request = (request_json or "")[:100_000]
    for escape in ("\\n", "\\r", "\\t"):
        request = request.replace(escape, " ")
    indexed = request + " " + (response_text or "")[:100_000]
    for word in words:
        starts = (m.start() for m in re.finditer(re.escape(word), indexed, re.IGNORECASE | re.ASCII))
        if not any(at == 0 or not _token_char(indexed[at - 1]) for at in starts):
            return False
    return True


class _CrossJoin(Join):
    """SQLite's CROSS JOIN: an inner join whose left side is always the outer loop, which is how
    SQLite is told to start from the full-text matches (it never reorders a CROSS JOIN)."""

    inherit_cache = True


@compiles(_CrossJoin)
def _compile_cross_join(element: _CrossJoin, compiler: SQLCompiler, **kw: Any) -> str:
    kw["asfrom"] = True
    left = compiler.process(element.left, **kw)
    right = compiler.process(element.right, **kw)
    on = element.onclause
    assert on is not None  # always given (`_sqlite_text_query`)
    return f"{left} CROSS JOIN {right} ON {compiler.process(on, **kw)}"


def origin_condition(origin: str | None) -> ColumnElement[bool]:
    """Live traffic only (the default: every row but eval runs' ones), eval runs' rows only, or
    everything: the same reading of `origin` as usage, drift and the nightly traffic eval."""
    if origin == "eval":
        return audit_records.c.origin == "eval"  # the same rows; the (origin, created_at) index finds them
    clause = usage.origin_clause(origin or "live")
    return true() if clause is None else clause


def _current_feedback() -> Select[Any]:
    """Each key's newest feedback row per request (newest: created_at, then id)."""
    f, newer = feedback, feedback.alias("newer")
    return select(f.c.request_id, f.c.key_id, f.c.rating, f.c.comment, f.c.created_at).where(
        ~exists().where(
            newer.c.request_id == f.c.request_id,
            newer.c.key_id == f.c.key_id,
            or_(newer.c.created_at > f.c.created_at, and_(newer.c.created_at == f.c.created_at, newer.c.id > f.c.id)),
        )
    )


def _current_rating_sum() -> Any:
    """The sum of each key's newest rating of the audit row's request (correlated: a few probes of
    the feedback index per row). It has the sign of the mean rating and stays an integer."""
    rated, newer = feedback.alias("rated"), feedback.alias("newer")
    return (
        select(func.sum(rated.c.rating))
        .where(
            rated.c.request_id == audit_records.c.request_id,
            ~exists().where(
                newer.c.request_id == rated.c.request_id,
                newer.c.key_id == rated.c.key_id,
                or_(
                    newer.c.created_at > rated.c.created_at,
                    and_(newer.c.created_at == rated.c.created_at, newer.c.id > rated.c.id),
                ),
            ),
        )
        .scalar_subquery()
    )


class RatedRecord(ColumnElement[bool]):
    """The audit row is a record that some feedback row rates: any row, or one with a negative
    (`sign` -1) or positive (`sign` 1) rating, looked up by request_id on both databases.

    Since migration 0012 a feedback row also holds the rated record's created_at
    (`record_created_at`), so a lookup by the partition key (request_id, created_at) is possible.
    It was tried on PostgreSQL and not kept: the planner then drives the page from every
    candidate (one single-partition probe each, then a sort), which is fast while candidates are
    few (the queue at 500,000 records: 65 ms against 274-374 ms) and slow when they are many
    (10^7 records with 33,000 negatively rated: rating=negative 5.4 s and the queue 14 s, against
    209 and 220 ms by request_id, where PostgreSQL walks the time index newest first and stops at
    a page). A plan that walks the candidates in record_created_at order would do both; until then
    the column is kept, filled, and unused by these filters."""

    type = Boolean()
    inherit_cache = False  # compiled per dialect
    _is_implicitly_boolean = True  # a condition as it stands: SQLite gets no `= 1` after the IN

    def __init__(self, sign: int | None) -> None:
        self.sign = sign

    def rated(self, f: Any) -> list[ColumnElement[bool]]:
        """The feedback rows (of `f`, feedback or an alias) that make a record a candidate."""
        if self.sign is None:
            return []
        return [f.c.rating < 0 if self.sign < 0 else f.c.rating > 0]


@compiles(RatedRecord)
def _compile_rated_by_request_id(element: RatedRecord, compiler: SQLCompiler, **kw: Any) -> str:
    candidates = select(feedback.c.request_id).where(*element.rated(feedback))
    return compiler.process(audit_records.c.request_id.in_(candidates), **kw)


def rating_condition(rating: str) -> ColumnElement[bool]:
    """The audit rows whose mean current rating is below, at or above zero, or that nobody rated.

    A negative mean needs at least one -1 row (a positive one a +1 row): that set, read from the
    (rating, created_at) index, narrows the rows before the exact per-key sum is taken for them,
    so a page costs what its candidates cost, not the whole feedback table; the candidates are
    looked up by their records' keys (`RatedRecord`)."""
    if rating == "unrated":
        return ~exists().where(feedback.c.request_id == audit_records.c.request_id)
    total = _current_rating_sum()
    if rating == "negative":
        candidates, exact = RatedRecord(-1), total < 0
    elif rating == "positive":
        candidates, exact = RatedRecord(1), total > 0
    else:
        candidates, exact = RatedRecord(None), total == 0
    return and_(candidates, exact)


def _newest_label(r: Any) -> ColumnElement[bool]:
    """`r` (review_labels or an alias) is its request's newest label row (created_at, then id)."""
    newer = review_labels.alias("newer")
    return ~exists().where(
        newer.c.request_id == r.c.request_id,
        or_(newer.c.created_at > r.c.created_at, and_(newer.c.created_at == r.c.created_at, newer.c.id > r.c.id)),
    )


def label_condition(label: str | None) -> ColumnElement[bool]:
    """The audit rows whose current label is `label`; any label for None (not a removal).
    Correlated, so the database can probe the label index for each row a page looks at."""
    r = review_labels.alias("label_now")
    if label is None:
        return exists().where(r.c.request_id == audit_records.c.request_id, r.c.label != CLEARED, _newest_label(r))
    # One label is a small set of requests: read it from the (label, created_at) index first.
    candidates = select(review_labels.c.request_id).where(review_labels.c.label == label)
    current = exists().where(r.c.request_id == audit_records.c.request_id, r.c.label == label, _newest_label(r))
    return and_(audit_records.c.request_id.in_(candidates), current)


def encode_cursor(row: dict[str, Any]) -> str:
    return f"{row['created_at'].isoformat()}|{row['id']}"


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (created_at, id) a page starts below; 400 for anything a page link never carries."""
    try:
        if len(cursor) > 100:
            raise ValueError("too long")
        moment, _, ident = cursor.rpartition("|")
        parsed, row_id = _utc(datetime.fromisoformat(moment)), int(ident)
        if not 0 <= row_id <= _MAX_ROW_ID:
            raise ValueError("id out of range")
        return parsed, row_id
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"bad cursor {cursor[:100]!r}: pass the `next` value of a page", param="before") from exc


def _utc(moment: datetime) -> datetime:
    """An aware UTC datetime (naive means UTC): SQLite compares the stored UTC text as written."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _could_be_request_id(request_id: str) -> bool:
    return 0 < len(request_id) <= _MAX_REQUEST_ID and "\x00" not in request_id


def _plain(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for key, value in out.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            out[key] = value.replace(tzinfo=UTC)  # SQLite keeps no zone; the gateway writes UTC
    return out


def excerpt(text: str | None, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line (runs of whitespace as one space), cut at `limit` characters with an ellipsis."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "\u2026"


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None


def last_user_message(request: Any) -> str | None:
    """The last user turn of a decoded stored request: a chat request's last `user` message, a
    completion's prompt (its last string when a list); None when the body holds neither in a
    usable shape."""
    if not isinstance(request, dict):
        return None
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _content_text(message.get("content"))
        return None
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        strings = [p for p in prompt if isinstance(p, str)]
        return strings[-1] if strings else None
    return prompt if isinstance(prompt, str) else None


def _prompt_excerpt(request_json: Any) -> str:
    """The list's prompt excerpt: the last user turn, or the start of a body that is not a request."""
    body = loads_stored(request_json) if isinstance(request_json, str | bytes) else None
    if isinstance(body, str):
        return excerpt(body)  # stored as it came: not JSON
    return excerpt(last_user_message(body))


def rating_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Counts, mean and the latest comments of current (per-key newest) feedback rows; None for none."""
    if not rows:
        return None
    ratings = [r["rating"] for r in rows if isinstance(r["rating"], int)]
    comments = sorted((r for r in rows if r.get("comment")), key=lambda r: r["created_at"], reverse=True)
    return {
        "score": round(sum(ratings) / len(ratings), 3) if ratings else None,
        "positive": sum(1 for x in ratings if x > 0),
        "neutral": sum(1 for x in ratings if x == 0),
        "negative": sum(1 for x in ratings if x < 0),
        "count": len(rows),
        "comments": [
            {"comment": scrub(r["comment"]), "created_at": r["created_at"]} for r in comments[:_COMMENTS_SHOWN]
        ],
    }


def _is_current(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The newest (created_at, id) row per key of `rows`."""
    newest: dict[Any, dict[str, Any]] = {}
    for r in rows:
        held = newest.get(r["key_id"])
        if held is None or (r["created_at"], r["id"]) > (held["created_at"], held["id"]):
            newest[r["key_id"]] = r
    return newest


def _dropped_passages(guards: Any) -> list[dict[str, Any]]:
    """The passages a passage guard blocked (dropped before the prompt), from the stored verdicts:
    one entry per passage id, with the guards that blocked it."""
    dropped: dict[str, dict[str, Any]] = {}
    for g in guards if isinstance(guards, list) else []:
        if not isinstance(g, dict) or g.get("stage") != "passage" or g.get("action") != "block":
            continue
        details = g.get("details")
        passage_id = details.get("passage_id") if isinstance(details, dict) else None
        if not isinstance(passage_id, str):
            continue
        entry = dropped.setdefault(passage_id, {"passage_id": passage_id, "guards": [], "reasons": [], "text": None})
        entry["guards"].append(str(g.get("guard")))
        if isinstance(g.get("reason"), str) and g["reason"]:
            entry["reasons"].append(g["reason"])
    return list(dropped.values())


def has_text_index(connection: sqlite3.Connection) -> bool:
    """Whether the SQLite database has migration 0011's full-text index, whole: this SQLite has
    FTS5, and the table, its state and its triggers are there (a later rebuild of audit_records
    would drop the triggers, and rows deleted then would stay in the index)."""
    names = (FTS_TABLE, FTS_STATE, *FTS_TRIGGERS)
    found = connection.execute(
        f"SELECT count(*) FROM sqlite_master WHERE name IN ({', '.join('?' for _ in names)})", names
    ).fetchone()[0]
    return bool(connection.execute("SELECT sqlite_compileoption_used('ENABLE_FTS5')").fetchone()[0]) and (
        found == len(names)
    )


def _index_pending(path: str, batch: int) -> bool:
    """Index the rows written since the last catch-up, `batch` rows per transaction; False when the
    database has no usable index. Each transaction takes the write lock first (BEGIN IMMEDIATE),
    so two processes never index a row twice, and the audit writer gets the lock in between."""
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        if not has_text_index(connection):
            return False
        while True:
            # Read first, without the write lock: an idle gateway's catch-up takes no lock at all.
            (done,) = connection.execute(f"SELECT indexed_to FROM {FTS_STATE}").fetchone()
            (newest,) = connection.execute("SELECT coalesce(max(id), 0) FROM audit_records").fetchone()
            if newest <= done:
                return True
            connection.execute("BEGIN IMMEDIATE")
            try:
                (done,) = connection.execute(f"SELECT indexed_to FROM {FTS_STATE}").fetchone()
                (upto,) = connection.execute(
                    "SELECT max(id) FROM (SELECT id FROM audit_records WHERE id > ? ORDER BY id LIMIT ?)", (done, batch)
                ).fetchone()
                if upto is not None:
                    connection.execute(
                        f"INSERT INTO {FTS_TABLE} (rowid, body) SELECT id, {FTS_TEXT_SQL} FROM audit_records "
                        "WHERE id > ? AND id <= ?",
                        (done, upto),
                    )
                    connection.execute(f"UPDATE {FTS_STATE} SET indexed_to = ?", (upto,))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            if upto is None:
                return True
    finally:
        connection.close()


async def index_text(engine: AsyncEngine, batch: int = FTS_BATCH) -> bool:
    """Bring SQLite's full-text index up to the newest audit row (in a thread: a raw sqlite3
    connection, as the audit writer's). False where there is no usable index: not SQLite, a
    database in memory, no FTS5, or before migration 0011; the text filter then scans with LIKE."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return False
    return await asyncio.to_thread(_index_pending, path, batch)


class TextIndexTask(PeriodicTask):
    """What `gateway serve` does to keep SQLite's full-text index close behind the audit log: the
    rows written since the last run are indexed every INTERVAL_S seconds, off the request path (an
    FTS5 insert in the audit writer's transaction would cost each request about 0.4 ms). A search
    catches up the rest itself. Nothing on PostgreSQL, whose GIN index is kept by the insert."""

    NAME = "audit-text-index"
    INTERVAL_S = 2.0
    DIALECTS = frozenset({"sqlite"})
    FAILED = "a search catches up too"  # the database locked past its timeout, the disk full

    async def run_once(self) -> bool:
        return await index_text(self.engine)  # False: no index here (no FTS5, before 0011)


class ReviewStore:
    """Queries reviewers need, over one async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def page(self, filters: Filters, *, before: str | None = None, limit: int = 50) -> dict[str, Any]:
        """One page, newest first; `next` is the cursor of the following page (None at the end)."""
        query, few = filters.apply(select(*_LIST_COLUMNS)), None
        if filters.q and self.engine.dialect.name == "postgresql" and word_query(filters.q):
            few = await self._few_text_hits(filters, before, limit)
        elif filters.q and self.engine.dialect.name == "sqlite" and fts_query(filters.q):
            query = await self._sqlite_text_query(filters, before, limit)
        async with self.engine.connect() as conn:
            if few is not None:
                # A generic plan of "these ids" may walk the time index instead (1 s at 500,000 rows).
                await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
                query = few
            rows, next_cursor = await self._keyset(conn, query, before, limit)
            await self._annotate(conn, rows)
        return {"data": rows, "next": next_cursor}

    async def _sqlite_text_query(self, filters: Filters, before: str | None, limit: int) -> Select[Any]:
        """The page query of a filter of words on SQLite, once the rows written since the last
        catch-up are in the full-text index; without a usable index (`has_text_index`), LIKE.

        SQLite's planner, like PostgreSQL's, cannot tell a rare word from a common one, and FTS5
        reads a word prefix's matches whole before the first one (about 0.7 s for a word in most of
        a million rows). So the newest TEXT_WINDOW_ROWS rows from the cursor on are read first,
        those holding each word as a substring (LIKE) checked in Python (`words_match`): a common
        word fills the page there, at the cost of a short LIKE scan, and the page is exact, being
        the newest matches of every row from the window's start on. Otherwise the words are rare,
        and the page comes from the index's matches (a CROSS JOIN: SQLite starts from them)."""
        rest, words = replace(filters, q=None), (filters.q or "").split()
        if not await index_text(self.engine):
            return filters.apply(select(*_LIST_COLUMNS))
        limit = max(1, min(limit, 500))
        found = await self._recent_text_hits(rest, words, before, limit)
        if found is not None:
            return rest.apply(select(*_LIST_COLUMNS)).where(audit_records.c.id.in_(found))
        matches = fts_matches(fts_query(filters.q or "") or "").subquery("fts_match")
        joined = _CrossJoin(matches, audit_records, audit_records.c.id == matches.c.rowid)
        return rest.apply(select(*_LIST_COLUMNS).select_from(joined))

    async def _recent_text_hits(
        self, rest: Filters, words: list[str], before: str | None, limit: int
    ) -> list[int] | None:
        """The ids of the page (at most limit + 1, newest first) when the newest TEXT_WINDOW_ROWS
        rows from the cursor on hold them, or all rows do; None when they may lie further back."""
        c = audit_records.c
        keyset: list[ColumnElement[bool]] = []
        if before:
            moment, ident = decode_cursor(before)
            # Spelt as a range on created_at: with the plain OR, SQLite read and sorted the whole window.
            keyset += [c.created_at <= moment, or_(c.created_at < moment, c.id < ident)]
        newest_first = (c.created_at.desc(), c.id.desc())
        found: list[int] = []
        async with self.engine.connect() as conn:
            # The window: every row from the cursor down to the created_at of the N-th newest one.
            edge = select(c.created_at).where(*keyset).order_by(*newest_first).offset(TEXT_WINDOW_ROWS - 1).limit(1)
            start = (await conn.execute(edge)).scalar()
            window = [*keyset, c.created_at >= start] if start is not None else keyset
            substrings = [or_(c.request_json.contains(w, autoescape=True), c.response_text.contains(w, autoescape=True))
                          for w in words]  # fmt: skip
            candidates = rest.apply(select(c.id, c.request_json, c.response_text)).where(*window, *substrings)
            result = await conn.stream(candidates.order_by(*newest_first))
            async for row in result:
                if words_match(words, row.request_json, row.response_text):
                    found.append(row.id)
                    if len(found) > limit:
                        break
            await result.close()
        if len(found) > limit or start is None:
            return found
        return None

    async def _few_text_hits(self, filters: Filters, before: str | None, limit: int) -> Select[Any] | None:
        """PostgreSQL's planner cannot tell a rare word from a common one, and for a newest-first
        page it walks the time index, recomputing each row's tsvector, until it has a page: minutes
        for a word that a few rows hold. So the matches are first read from the GIN index alone
        (bitmap scans only), at most TEXT_PROBE_CAP of them: when that is all of them, the page is
        the newest of those rows (the query returned); when there are more, the word is common,
        the walk finds a page soon, and None leaves the query to the planner."""
        c = audit_records.c
        probe = filters.apply(select(c.created_at, c.id))
        if before:
            moment, ident = decode_cursor(before)
            probe = probe.where(or_(c.created_at < moment, and_(c.created_at == moment, c.id < ident)))
        async with self.engine.begin() as conn:
            for setting, value in _BITMAP_ONLY:
                await conn.execute(text(f"SET LOCAL {setting} = {value}"))
            hits = (await conn.execute(probe.limit(TEXT_PROBE_CAP + 1))).all()
        if len(hits) > TEXT_PROBE_CAP:
            return None
        newest = sorted(hits, reverse=True)[: max(1, min(limit, 500)) + 1]
        if not newest:
            return filters.apply(select(*_LIST_COLUMNS)).where(false())
        rest = replace(filters, q=None)  # the text is matched: the page query need not recompute it
        return rest.apply(select(*_LIST_COLUMNS)).where(
            c.id.in_([h.id for h in newest]), c.created_at.between(newest[-1].created_at, newest[0].created_at)
        )

    async def _keyset(
        self, conn: AsyncConnection, query: Select[Any], before: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first from the cursor on; returns the rows and the next page's cursor (or None)."""
        limit = max(1, min(limit, 500))
        if before:
            moment, ident = decode_cursor(before)
            c = audit_records.c
            query = query.where(or_(c.created_at < moment, and_(c.created_at == moment, c.id < ident)))
        query = query.order_by(audit_records.c.created_at.desc(), audit_records.c.id.desc()).limit(limit + 1)
        rows = [_plain(r) for r in await conn.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1]) if more and rows else None

    async def _annotate(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        """Excerpts, labels and ratings of a page's rows: two queries for the whole page."""
        if not rows:
            return
        ids = [r["request_id"] for r in rows]
        history: dict[str, list[str]] = {}
        labels = (
            select(review_labels.c.request_id, review_labels.c.label)
            .where(review_labels.c.request_id.in_(ids))
            .order_by(review_labels.c.created_at, review_labels.c.id)
        )
        for request_id, label in await conn.execute(labels):
            history.setdefault(request_id, []).append(label)
        current: dict[str, list[dict[str, Any]]] = {}
        for row in await conn.execute(_current_feedback().where(feedback.c.request_id.in_(ids))):
            current.setdefault(row.request_id, []).append(_plain(row))
        for r in rows:
            r["prompt_excerpt"] = _prompt_excerpt(r.pop("request_json"))
            answer = r.pop("answer_start")
            r["answer_excerpt"] = excerpt(scrub(answer) if isinstance(answer, str) else None)
            r["passages_used"] = bool(r["passages_used"])
            r["labels"] = history.get(r["request_id"], [])
            newest = r["labels"][-1] if r["labels"] else None
            r["label"] = None if newest == CLEARED else newest
            r["rating"] = rating_summary(current.get(r["request_id"], []))

    async def record(self, request_id: str) -> dict[str, Any]:
        """One audit record, its JSON columns decoded (whatever they hold: see `loads_stored`), with
        its label history and current label, its feedback and rating, and the passages dropped."""
        if not _could_be_request_id(request_id):
            raise NotFound(f"no request {request_id[:60]!r} in the audit log", param="request_id")
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(audit_records).where(audit_records.c.request_id == request_id))).first()
            if row is None:
                raise NotFound(f"no request {request_id!r} in the audit log", param="request_id")
            labels = await conn.execute(
                select(review_labels)
                .where(review_labels.c.request_id == request_id)
                .order_by(review_labels.c.created_at, review_labels.c.id)
            )
            label_rows = [_plain(r) for r in labels]
            notes = await conn.execute(
                select(feedback)
                .where(feedback.c.request_id == request_id)
                .order_by(feedback.c.created_at.desc(), feedback.c.id.desc())
            )
            feedback_rows = [_plain(r) for r in notes]
            record = _plain(row)
            for column in _JSON_COLUMNS:
                # A malformed request is stored as it came, and comes back as its text.
                record[column.removesuffix("_json")] = loads_stored(record.pop(column))
            record["dropped_passages"] = await self._dropped_texts(conn, record)
        record["labels"] = label_rows
        record["label"] = label_rows[-1]["label"] if label_rows and label_rows[-1]["label"] != CLEARED else None
        current = _is_current(feedback_rows)
        for f in feedback_rows:
            f["categories"] = loads_stored(f.pop("categories_json"))
            f["current"] = current.get(f["key_id"]) is f
        record["feedback"] = feedback_rows
        record["rating"] = rating_summary(list(current.values()))
        return record

    async def _dropped_texts(self, conn: AsyncConnection, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The dropped passages with their text as the collection's catalogue holds it now (the
        audit row keeps only the passages the model saw). The collections are the ones the request
        searched (`index_versions`); a chunk re-ingested or deleted since has another text or none."""
        dropped = _dropped_passages(record.get("guards"))
        searched = loads_stored(record.get("index_versions"))
        if not dropped or not isinstance(searched, dict) or not searched:
            return dropped
        from retrieval.db import rag_chunks  # the gateway's migrations create the rag_ tables too

        query = select(rag_chunks.c.chunk_id, rag_chunks.c.text).where(
            rag_chunks.c.collection.in_([str(k) for k in searched]),
            rag_chunks.c.chunk_id.in_([d["passage_id"] for d in dropped]),
        )
        texts = {chunk_id: text for chunk_id, text in await conn.execute(query)}
        for d in dropped:
            d["text"] = scrub(texts[d["passage_id"]]) if d["passage_id"] in texts else None
        return dropped

    async def add_label(self, request_id: str, label: str, note: str | None, reviewer: str) -> dict[str, Any]:
        """Append a label row; `cleared` removes the current label (400 when there is none)."""
        if label not in (*LABELS, CLEARED):
            if label == "":
                raise InvalidRequest(f"choose a label: one of {', '.join(LABELS)}", param="label")
            raise InvalidRequest(
                f"label must be one of {', '.join(LABELS)}, or {CLEARED} to remove it; got {label[:60]!r}",
                param="label",
            )
        if note is not None and len(note) > 10_000:
            raise InvalidRequest("the note is longer than 10,000 characters", param="note")
        if note is not None and "\x00" in note:
            raise InvalidRequest("the note contains a NUL character", param="note")
        note = scrub(note) if note is not None else None
        if not _could_be_request_id(request_id):
            raise NotFound(f"no request {request_id[:60]!r} in the audit log", param="request_id")
        async with self.engine.begin() as conn:
            exists_ = (
                await conn.execute(select(audit_records.c.id).where(audit_records.c.request_id == request_id))
            ).first()
            if exists_ is None:
                raise NotFound(f"no request {request_id!r} in the audit log", param="request_id")
            if label == CLEARED:
                newest = (
                    await conn.execute(
                        select(review_labels.c.label)
                        .where(review_labels.c.request_id == request_id)
                        .order_by(review_labels.c.created_at.desc(), review_labels.c.id.desc())
                        .limit(1)
                    )
                ).scalar()
                if newest is None or newest == CLEARED:
                    raise InvalidRequest(f"request {request_id!r} has no label to remove", param="label")
            row = {"request_id": request_id, "label": label, "note": note or None, "reviewer": reviewer,
                   "created_at": datetime.now(UTC)}  # fmt: skip
            await conn.execute(review_labels.insert().values(**row))
        return row

    async def queue(
        self, *, sample_rate: float, before: str | None = None, limit: int = 50, origin: str | None = None
    ) -> dict[str, Any]:
        """What needs a look: negatively rated, blocked or flagged, plus a stable random sample of
        the rest, minus what has a current label; live traffic only unless `origin` says otherwise.
        Negatively rated records come first (newest first), then the others (newest first); the
        cursor says which part a page continues ("n|..." or "r|..."). The sample is the requests
        whose random id starts below a threshold, so it is the same on every page and every replica."""
        if origin is not None and origin not in ORIGINS:
            raise InvalidRequest(f"origin must be one of {', '.join(ORIGINS)}", param="origin")
        threshold = format(min(255, max(0, round(sample_rate * 256))), "02x")
        c = audit_records.c
        negative = rating_condition("negative")
        base = select(*_LIST_COLUMNS).where(origin_condition(origin), ~label_condition(None))
        needs_look = or_(c.blocked_by.is_not(None), c.flagged_by.is_not(None), c.request_id < threshold)
        part, cursor = "n", before
        if before is not None and before[:2] in ("n|", "r|"):
            part, cursor = before[0], before[2:] or None
        elif before:
            part = "r"  # a plain cursor (older pages): the rest
        limit = max(1, min(limit, 500))
        rows: list[dict[str, Any]] = []
        next_cursor: str | None = None
        async with self.engine.connect() as conn:
            if part == "n":
                rows, after = await self._keyset(conn, base.where(negative), cursor, limit)
                for r in rows:
                    r["reason"] = "rated negative"
                if after:
                    next_cursor = "n|" + after
                cursor = None
            if next_cursor is None:
                room = limit - len(rows)
                rest, after = await self._keyset(conn, base.where(needs_look, ~negative), cursor, room or 1)
                if room == 0:
                    next_cursor = "r|" if rest else None
                else:
                    for r in rest:
                        r["reason"] = "blocked" if r["blocked_by"] else "flagged" if r["flagged_by"] else "sample"
                    rows += rest
                    next_cursor = "r|" + after if after else None
            await self._annotate(conn, rows)
        return {"data": rows, "next": next_cursor}

    async def counts(self) -> dict[str, int]:
        """How many requests have a current label."""
        async with self.engine.connect() as conn:
            current = select(review_labels.c.id).where(review_labels.c.label != CLEARED, _newest_label(review_labels))
            total = (await conn.execute(select(func.count()).select_from(current.subquery()))).scalar_one()
        return {"labels": int(total)}

    def export(self, fmt: str, label: str | None = None) -> AsyncIterator[bytes]:
        """Labelled records as JSONL or CSV, streamed in batches: one line per request with a
        current label, `prompt` its last user message and `request_json` the request as sent.
        The arguments are checked here, before the first byte, so a bad one is a 400, not a cut
        download."""
        if fmt not in ("jsonl", "csv"):
            raise InvalidRequest("format must be jsonl or csv", param="format")
        if label is not None and label not in LABELS:
            raise InvalidRequest(f"label must be one of {', '.join(LABELS)}; got {label[:60]!r}", param="label")
        return self._export(fmt, label)

    async def _export(self, fmt: str, label: str | None) -> AsyncIterator[bytes]:
        columns = ["request_id", "label", "note", "reviewer", "labelled_at", "created_at", "model", "status",
                   "blocked_by", "flagged_by", "groundedness", "toxicity", "prompt", "answer",
                   "request_json"]  # fmt: skip
        if fmt == "csv":
            buffer = io.StringIO()
            csv.writer(buffer).writerow(columns)
            yield buffer.getvalue().encode()
        last = 0
        while True:
            query = (
                select(
                    review_labels.c.id,
                    review_labels.c.request_id,
                    review_labels.c.label,
                    review_labels.c.note,
                    review_labels.c.reviewer,
                    review_labels.c.created_at.label("labelled_at"),
                    audit_records.c.created_at,
                    audit_records.c.model,
                    audit_records.c.status,
                    audit_records.c.blocked_by,
                    audit_records.c.flagged_by,
                    audit_records.c.groundedness,
                    audit_records.c.toxicity,
                    audit_records.c.request_json,
                    audit_records.c.response_text.label("answer"),
                )
                .join(audit_records, audit_records.c.request_id == review_labels.c.request_id)
                .where(review_labels.c.id > last, review_labels.c.label != CLEARED, _newest_label(review_labels))
                .order_by(review_labels.c.id)
                .limit(1000)
            )
            if label:
                query = query.where(review_labels.c.label == label)
            async with self.engine.connect() as conn:
                rows = [_plain(r) for r in await conn.execute(query)]
            if not rows:
                return
            last = rows[-1]["id"]
            for r in rows:
                request = r["request_json"]
                r["prompt"] = last_user_message(loads_stored(request) if isinstance(request, str) else None)
            if fmt == "jsonl":
                yield b"".join(msgspec.json.encode({k: _jsonable(r[k]) for k in columns}) + b"\n" for r in rows)
            else:
                buffer = io.StringIO()
                writer = csv.writer(buffer)
                for r in rows:
                    writer.writerow(["" if r[k] is None else _jsonable(r[k]) for k in columns])
                yield buffer.getvalue().encode("utf-8", "replace")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return scrub(value) if isinstance(value, str) else value
