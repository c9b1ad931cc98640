"""Feedback rows carry their record's created_at (migration 0012), so on PostgreSQL the reviewer's
lookups of rated records go by the partitioned table's key, (request_id, created_at). Checked on
SQLite and PostgreSQL: the store writes it, the migration fills it for older rows, and the rating
filters and the review queue give the same rows, in the same order, as the lookup by request_id
alone, rows without it (NULL) included."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import ColumnElement, and_, exists, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth import KeyInfo
from gateway.db import audit_records, create_engine, feedback
from gateway.feedback import FeedbackIn, FeedbackStore
from gateway.migrate import alembic_config, upgrade
from gateway.partitions import create_ahead, month_start
from gateway.review_store import RATINGS, Filters, ReviewStore, _current_rating_sum
from tests.helpers import PG_ADMIN, insert_rows, throwaway_postgres

NOW = datetime.now(UTC).replace(microsecond=123456)
REVIEWER = KeyInfo(id="key_r", name="rita", role="reviewer")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    with throwaway_postgres("gw_fb_key") as name:
        yield f"{PG_ADMIN}/{name}"


def record(name: str, days_ago: float, **changes: Any) -> dict[str, Any]:
    """An audit row; every one with the same keys, as an insert of many takes the first row's columns."""
    created = NOW - timedelta(days=days_ago)
    return {"request_id": f"{name}-{uuid.uuid4().hex[:12]}", "created_at": created, "finished_at": created,
            "endpoint": "chat.completions", "model": "m", "stream": False, "status": "ok", "http_status": 200,
            "api_key_id": "key_c", "request_json": json.dumps({"messages": [{"role": "user", "content": name}]}),
            "response_text": f"answer {name}", "blocked_by": None, "flagged_by": None,
            **changes}  # fmt: skip


def utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive (they were stored as UTC)."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


async def with_partitions(url: str) -> AsyncEngine:
    """An engine at head; on PostgreSQL the monthly partitions of the last four months and the next."""
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    if engine.dialect.name == "postgresql":
        await create_ahead(engine, 5, month_start(NOW, -4))
    return engine


async def stored_keys(engine: AsyncEngine) -> list[tuple[str, datetime | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(feedback.c.request_id, feedback.c.record_created_at).order_by(feedback.c.id))
        return [(r.request_id, utc(r.record_created_at)) for r in rows]


def test_feedback_stores_the_rated_records_created_at(url: str) -> None:
    async def go() -> None:
        engine = await with_partitions(url)
        try:
            old, new = record("old", 70), record("new", 1)
            await insert_rows(url, audit_records, [old, new])
            store = FeedbackStore(engine)
            await store.add(REVIEWER, FeedbackIn(old["request_id"], -1))
            await store.add(REVIEWER, FeedbackIn(new["request_id"], 1, "fine"))
            assert await stored_keys(engine) == [
                (old["request_id"], old["created_at"]),
                (new["request_id"], new["created_at"]),
            ]
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_the_migration_fills_record_created_at_from_the_audit_log(url: str) -> None:
    a, b = record("a", 40), record("b", 2)
    rows = [(a, "key_1", -1), (b, "key_1", 1), (b, "key_2", -1), ({"request_id": "gone-from-the-log"}, "key_1", -1)]

    async def before() -> None:
        await asyncio.to_thread(upgrade, url, "0011")
        await insert_rows(url, audit_records, [a, b])
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:  # the columns of 0011's feedback table only
                for r, key, rating in rows:
                    await conn.execute(
                        feedback.insert().values(request_id=r["request_id"], key_id=key, rating=rating, created_at=NOW)
                    )
        finally:
            await engine.dispose()

    async def after() -> list[tuple[str, datetime | None]]:
        engine = create_engine(url)
        try:
            return await stored_keys(engine)
        finally:
            await engine.dispose()

    asyncio.run(before())
    upgrade(url)
    expected = [(r["request_id"], r.get("created_at")) for r, _, _ in rows]
    assert asyncio.run(after()) == expected
    assert expected[-1][1] is None and expected[0][1] is not None  # the last one has no record to match

    # And down again (the column goes) and up (filled again).
    command.downgrade(alembic_config(url), "0011")

    async def columns() -> set[str]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("feedback")})
                return set(names)
        finally:
            await engine.dispose()

    assert "record_created_at" not in asyncio.run(columns())
    upgrade(url)
    assert asyncio.run(after()) == expected


def by_request_id(rating: str) -> ColumnElement[bool]:
    """The rating filter as it was before 0012: candidates by request_id alone, then the exact sum."""
    if rating == "unrated":
        return ~exists().where(feedback.c.request_id == audit_records.c.request_id)
    total = _current_rating_sum()
    sign = {"negative": [feedback.c.rating < 0], "positive": [feedback.c.rating > 0], "neutral": []}[rating]
    exact = {"negative": total < 0, "positive": total > 0, "neutral": total == 0}[rating]
    return and_(audit_records.c.request_id.in_(select(feedback.c.request_id).where(*sign)), exact)


def test_rating_filters_and_queue_give_the_rows_the_lookup_by_request_id_gave(url: str) -> None:
    """Records over four months; feedback through the store (with record_created_at) and rows
    without it (NULL, as a row the backfill could not match), alone or mixed with keyed ones."""
    recs = {
        "neg_keyed": record("neg_keyed", 100),  # -1 through the store
        "neg_null": record("neg_null", 75, flagged_by="toxicity"),  # -1 without record_created_at
        "changed_mind": record("changed_mind", 50),  # -1 then +1 from the same key: positive
        "mixed_neutral": record("mixed_neutral", 33),  # +1 keyed, -1 NULL from another key: neutral
        "mixed_negative": record("mixed_negative", 20, blocked_by="toxicity", status="blocked"),  # -1 keyed, -1 NULL
        "pos_null": record("pos_null", 9),  # +1 without record_created_at
        "blocked": record("blocked", 5, blocked_by="toxicity", status="blocked"),  # unrated
        "flagged": record("flagged", 2, flagged_by="groundedness"),  # neutral 0, keyed
        "plain": record("plain", 1),  # unrated
    }
    ids = {name: r["request_id"] for name, r in recs.items()}
    name_of = {v: k for k, v in ids.items()}

    async def go() -> None:
        engine = await with_partitions(url)
        try:
            await insert_rows(url, audit_records, list(recs.values()))
            store = FeedbackStore(engine)
            for name, key, score in [("neg_keyed", "key_r", -1), ("changed_mind", "key_r", -1),
                                      ("changed_mind", "key_r", 1), ("mixed_neutral", "key_r", 1),
                                      ("mixed_negative", "key_r", -1), ("flagged", "key_r", 0)]:  # fmt: skip
                await store.add(KeyInfo(id=key, name=None, role="reviewer"), FeedbackIn(ids[name], score))
            later = datetime.now(UTC) + timedelta(seconds=5)
            await insert_rows(url, feedback, [
                {"request_id": ids[name], "key_id": key, "rating": score, "created_at": later,
                 "record_created_at": None}
                for name, key, score in [("neg_null", "key_x", -1), ("mixed_neutral", "key_x", -1),
                                          ("mixed_negative", "key_x", -1), ("pos_null", "key_x", 1)]
            ])  # fmt: skip
            keys = await stored_keys(engine)
            assert sum(at is None for _, at in keys) == 4 and sum(at is not None for _, at in keys) == 6

            reviews = ReviewStore(engine)
            expected = {
                "negative": ["mixed_negative", "neg_null", "neg_keyed"],
                "neutral": ["flagged", "mixed_neutral"],
                "positive": ["pos_null", "changed_mind"],
                "unrated": ["plain", "blocked"],
            }
            assert set(expected) == set(RATINGS)
            for rating, names in expected.items():
                page = await reviews.page(Filters(rating=rating), limit=100)
                assert [name_of[r["request_id"]] for r in page["data"]] == names, rating
                old = (
                    select(audit_records.c.request_id)
                    .where(by_request_id(rating))
                    .order_by(audit_records.c.created_at.desc(), audit_records.c.id.desc())
                )
                async with engine.connect() as conn:
                    assert [name_of[x] for x in (await conn.execute(old)).scalars()] == names, rating
                # Pages of two follow the cursor to the same rows.
                seen, cursor = [], None
                while True:
                    part = await reviews.page(Filters(rating=rating), before=cursor, limit=2)
                    seen += [name_of[r["request_id"]] for r in part["data"]]
                    if not (cursor := part["next"]):
                        break
                assert seen == names, rating

            queue = await reviews.queue(sample_rate=0.0, limit=100)
            assert [(name_of[r["request_id"]], r["reason"]) for r in queue["data"]] == [
                ("mixed_negative", "rated negative"), ("neg_null", "rated negative"), ("neg_keyed", "rated negative"),
                ("flagged", "flagged"), ("blocked", "blocked"),
            ]  # fmt: skip
            seen, cursor = [], None
            while True:
                part = await reviews.queue(sample_rate=0.0, before=cursor, limit=1)
                seen += [name_of[r["request_id"]] for r in part["data"]]
                if not (cursor := part["next"]):
                    break
            assert seen == [name_of[r["request_id"]] for r in queue["data"]]
        finally:
            await engine.dispose()

    asyncio.run(go())
