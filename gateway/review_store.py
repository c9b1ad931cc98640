"""Reviewer queries over the audit log: filtered keyset pages, one record, labels, queue, export.

Paging is keyset (created_at, id) on indexed columns, never OFFSET, so page 1,000 costs what
page 1 costs however many records there are. Plain code over the async engine; the HTML pages
and the JSON API both call it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import audit_records, review_labels
from gateway.errors import InvalidRequest, NotFound
from gateway.jsontext import loads_stored, scrub

LABELS = ("ok", "hallucination", "toxic", "false_positive", "bad_retrieval", "other")
_MAX_ROW_ID = 2**63 - 1  # BIGINT; a larger cursor id would overflow the database driver
_MAX_REQUEST_ID = 40  # audit_records.request_id is String(40): a longer id names no record
_JSON_COLUMNS = ("request_json", "response_json", "passages_json", "citations_json", "guards_json")
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
    q: str | None = None  # text in the prompt or the answer

    @classmethod
    def parse(cls, params: dict[str, str]) -> Filters:
        """From query parameters, with a 400 naming the parameter that is wrong."""
        values: dict[str, Any] = {}
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
                elif f.name == "outcome" and raw not in ("blocked", "flagged"):
                    raise ValueError("must be blocked or flagged")
                else:
                    values[f.name] = scrub(raw)
            except (ValueError, OverflowError) as exc:
                raise InvalidRequest(f"bad filter {f.name}={raw!r}: {exc}", param=f.name) from exc
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
        conditions = []
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
            # autoescape: a `%` or `_` in the text is that character, not a wildcard (SQLite and PostgreSQL).
            conditions.append(
                or_(c.request_json.contains(self.q, autoescape=True), c.response_text.contains(self.q, autoescape=True))
            )
        return query.where(and_(*conditions)) if conditions else query


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


class ReviewStore:
    """Queries reviewers need, over one async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def page(self, filters: Filters, *, before: str | None = None, limit: int = 50) -> dict[str, Any]:
        """One page, newest first; `next` is the cursor of the following page (None at the end)."""
        query = filters.apply(select(*_LIST_COLUMNS))
        rows, next_cursor = await self._keyset(query, before, limit)
        if rows:
            labels = await self._labels([r["request_id"] for r in rows])
            for r in rows:
                r["labels"] = labels.get(r["request_id"], [])
        return {"data": rows, "next": next_cursor}

    async def _keyset(
        self, query: Select[Any], before: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first from the cursor on; returns the rows and the next page's cursor (or None)."""
        limit = max(1, min(limit, 500))
        if before:
            moment, ident = decode_cursor(before)
            c = audit_records.c
            query = query.where(or_(c.created_at < moment, and_(c.created_at == moment, c.id < ident)))
        query = query.order_by(audit_records.c.created_at.desc(), audit_records.c.id.desc()).limit(limit + 1)
        async with self.engine.connect() as conn:
            rows = [_plain(r) for r in await conn.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1]) if more and rows else None

    async def _labels(self, request_ids: list[str]) -> dict[str, list[str]]:
        query = select(review_labels.c.request_id, review_labels.c.label).where(
            review_labels.c.request_id.in_(request_ids)
        )
        out: dict[str, list[str]] = {}
        async with self.engine.connect() as conn:
            for request_id, label in await conn.execute(query):
                out.setdefault(request_id, []).append(label)
        return out

    async def record(self, request_id: str) -> dict[str, Any]:
        """One audit record, its JSON columns decoded (whatever they hold: see `loads_stored`), with its labels."""
        if not _could_be_request_id(request_id):
            raise NotFound(f"no request {request_id[:60]!r} in the audit log", param="request_id")
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(audit_records).where(audit_records.c.request_id == request_id))).first()
            if row is None:
                raise NotFound(f"no request {request_id!r} in the audit log", param="request_id")
            labels = await conn.execute(
                select(review_labels).where(review_labels.c.request_id == request_id).order_by(review_labels.c.id)
            )
            label_rows = [_plain(r) for r in labels]
        record = _plain(row)
        for column in _JSON_COLUMNS:
            # A malformed request is stored as it came, and comes back as its text.
            record[column.removesuffix("_json")] = loads_stored(record.pop(column))
        record["labels"] = label_rows
        return record

    async def add_label(self, request_id: str, label: str, note: str | None, reviewer: str) -> dict[str, Any]:
        if label not in LABELS:
            raise InvalidRequest(f"label must be one of {', '.join(LABELS)}; got {label!r}", param="label")
        if note is not None and len(note) > 10_000:
            raise InvalidRequest("the note is longer than 10,000 characters", param="note")
        if note is not None and "\x00" in note:
            raise InvalidRequest("the note contains a NUL character", param="note")
        note = scrub(note) if note is not None else None
        if not _could_be_request_id(request_id):
            raise NotFound(f"no request {request_id[:60]!r} in the audit log", param="request_id")
        async with self.engine.begin() as conn:
            exists = (
                await conn.execute(select(audit_records.c.id).where(audit_records.c.request_id == request_id))
            ).first()
            if exists is None:
                raise NotFound(f"no request {request_id!r} in the audit log", param="request_id")
            row = {"request_id": request_id, "label": label, "note": note or None, "reviewer": reviewer,
                   "created_at": datetime.now(UTC)}  # fmt: skip
            await conn.execute(review_labels.insert().values(**row))
        return row

    async def queue(self, *, sample_rate: float, before: str | None = None, limit: int = 50) -> dict[str, Any]:
        """What needs a look: blocked or flagged, plus a stable random sample of the rest,
        minus what a reviewer has labelled already. The sample is the requests whose random id
        starts below a threshold, so it is the same on every page and every replica."""
        threshold = format(min(255, max(0, round(sample_rate * 256))), "02x")
        c = audit_records.c
        labelled = select(review_labels.c.request_id)
        query = select(*_LIST_COLUMNS).where(
            or_(c.blocked_by.is_not(None), c.flagged_by.is_not(None), c.request_id < threshold),
            c.request_id.not_in(labelled),
        )
        rows, next_cursor = await self._keyset(query, before, limit)
        for r in rows:
            r["labels"] = []
            r["reason"] = "blocked" if r["blocked_by"] else "flagged" if r["flagged_by"] else "sample"
        return {"data": rows, "next": next_cursor}

    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(review_labels))).scalar_one()
        return {"labels": int(total)}

    def export(self, fmt: str, label: str | None = None) -> AsyncIterator[bytes]:
        """Labelled records as JSONL or CSV, streamed in batches (one line per label). The
        arguments are checked here, before the first byte, so a bad one is a 400, not a cut download."""
        if fmt not in ("jsonl", "csv"):
            raise InvalidRequest("format must be jsonl or csv", param="format")
        if label is not None and label not in LABELS:
            raise InvalidRequest(f"label must be one of {', '.join(LABELS)}; got {label[:60]!r}", param="label")
        return self._export(fmt, label)

    async def _export(self, fmt: str, label: str | None) -> AsyncIterator[bytes]:
        columns = ["request_id", "label", "note", "reviewer", "labelled_at", "created_at", "model", "status",
                   "blocked_by", "flagged_by", "groundedness", "toxicity", "prompt", "answer"]  # fmt: skip
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
                    audit_records.c.request_json.label("prompt"),
                    audit_records.c.response_text.label("answer"),
                )
                .join(audit_records, audit_records.c.request_id == review_labels.c.request_id)
                .where(review_labels.c.id > last)
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
