"""The reviewer's text filter on SQLite through the FTS5 index of migration 0011: words and word
prefixes, the substring scan for punctuated text, the index kept in step with the audit log
(background catch-up, prune, update), keyset paging, and the way up to 0011 and back."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import review_store
from gateway.audit_sinks import SQLiteSink
from gateway.db import audit_records, create_engine
from gateway.migrate import alembic_config, upgrade
from gateway.retention import prune
from gateway.review_store import (
    FTS_STATE,
    FTS_TABLE,
    FTS_TEXT_SQL,
    FTS_TRIGGERS,
    Filters,
    ReviewStore,
    TextIndexTask,
    fts_query,
    words_match,
)

NOW = datetime.now(UTC)


def record(created: datetime, prompt: str = "hello", answer: str = "an answer", **changes: Any) -> dict[str, Any]:
    return {"request_id": uuid.uuid4().hex, "created_at": created, "finished_at": created,
            "endpoint": "chat.completions", "stream": False, "status": "ok", "http_status": 200,
            "request_json": json.dumps({"messages": [{"role": "user", "content": prompt}]}),
            "response_text": answer, **changes}  # fmt: skip


def path_of(url: str) -> str:
    return url.removeprefix("sqlite:///")


def indexed_to(url: str) -> int:
    with sqlite3.connect(path_of(url)) as connection:
        return int(connection.execute(f"SELECT indexed_to FROM {FTS_STATE}").fetchone()[0])


@pytest.fixture(params=["recent rows", "index"])
async def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A database at the head, its word filters answered from the newest rows (checked in Python)
    or from the FTS5 index (a window of one row: the page is never found there)."""
    if request.param == "index":
        monkeypatch.setattr(review_store, "TEXT_WINDOW_ROWS", 1)
    url = f"sqlite:///{tmp_path / 'fts.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    try:
        yield url, engine
    finally:
        await engine.dispose()


async def add(engine: AsyncEngine, *rows: dict[str, Any]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(audit_records), list(rows))


async def found(engine: AsyncEngine, **params: str) -> set[str]:
    page = await ReviewStore(engine).page(Filters.parse(params), limit=500)
    return {r["request_id"] for r in page["data"]}


async def test_words_are_matched_as_words_and_word_starts_in_the_prompt_or_the_answer(
    db: tuple[str, AsyncEngine],
) -> None:
    _, engine = db
    prompt = record(NOW, prompt="line one\nzebras graze")  # stored as JSON: "line one\\nzebras graze"
    answer = record(NOW, answer="Nobody is an IDIOT here.")
    both = record(NOW, prompt="a zebra", answer="what an idiot")
    other = record(NOW, prompt="nothing", answer="to see, subzebra")
    await add(engine, prompt, answer, both, other)

    assert await found(engine, q="zebra") == {prompt["request_id"], both["request_id"]}  # after a line break too
    assert await found(engine, q="zeb") == {prompt["request_id"], both["request_id"]}  # a word's start
    assert await found(engine, q="ebra") == set()  # not a word's start: the index, not LIKE, answered
    assert await found(engine, q="idiot") == {answer["request_id"], both["request_id"]}  # any case
    assert await found(engine, q="ZEBRA Idiot") == {
        both["request_id"]
    }  # every word: one in the prompt, one in the answer
    assert await found(engine, q="  zebras   graze ") == {prompt["request_id"]}
    assert await found(engine, q="giraffe") == set()
    assert await found(engine, q="NOT") == {other["request_id"]}  # an FTS5 keyword is a word like any other
    assert await found(engine, q="NEAR") == set()
    assert await found(engine, q="zebra", model="other-model") == set()  # with the other filters


async def test_text_with_punctuation_keeps_the_exact_substring_scan(db: tuple[str, AsyncEngine]) -> None:
    _, engine = db
    texts = {"percent": "costs 100% more", "snake": "use snake_case", "dir": "C:\\dir", "idiot": "an IDIOT here."}
    rows = {name: record(NOW, answer=text) for name, text in texts.items()}
    await add(engine, *rows.values())
    ids = {r["request_id"]: name for name, r in rows.items()}

    async def names(q: str) -> set[str]:
        return {ids[i] for i in await found(engine, q=q) if i in ids}

    assert await names("100%") == {"percent"}
    assert await names("snake_case") == {"snake"}
    assert await names("e_c") == {"snake"}  # inside a word: a substring, as before
    assert await names("C:\\") == {"dir"}
    assert await names("idiot here.") == {"idiot"}


async def test_the_substring_filter_keeps_to_the_other_filters_and_the_cursor(db: tuple[str, AsyncEngine]) -> None:
    """The OR of prompt and answer used to escape the AND of the other conditions: an answer holding
    the text was listed whatever the model, and every page repeated it."""
    _, engine = db
    mine = [record(NOW - timedelta(minutes=i), answer="a 100% match", model="m1") for i in range(3)]
    theirs = record(NOW, answer="a 100% match", model="m2")
    await add(engine, *mine, theirs)
    store, seen, before = ReviewStore(engine), [], None
    while True:
        page = await store.page(Filters.parse({"q": "100%", "model": "m1"}), before=before, limit=1)
        seen += [r["request_id"] for r in page["data"]]
        if (before := page["next"]) is None:
            break
        assert len(seen) <= len(mine)
    assert seen == [r["request_id"] for r in mine]


async def test_rows_written_after_the_migration_are_found(db: tuple[str, AsyncEngine]) -> None:
    url, engine = db
    before = indexed_to(url)
    sink = SQLiteSink.from_url(url, audit_records)  # the gateway's own audit writer
    try:
        row = record(NOW, answer="a wombat appeared")
        await sink.write([row])
    finally:
        await sink.close()
    assert indexed_to(url) == before  # the writer does not index: its insert stays cheap
    assert await found(engine, q="wombat") == {row["request_id"]}  # a search catches up first
    assert indexed_to(url) > before


async def test_the_background_task_indexes_new_rows(
    db: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, engine = db
    monkeypatch.setattr(TextIndexTask, "INTERVAL_S", 0.05)
    task = TextIndexTask(engine)
    task.start()
    try:
        await add(engine, record(NOW, answer="numbat"))
        for _ in range(100):
            if indexed_to(url) > 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await task.stop()
    assert indexed_to(url) > 0


async def test_pruned_and_updated_rows_leave_the_index(db: tuple[str, AsyncEngine]) -> None:
    url, engine = db
    old = record(NOW - timedelta(days=200), answer="an old quokka")
    new = record(NOW, answer="a young quokka")
    await add(engine, old, new)
    assert await found(engine, q="quokka") == {old["request_id"], new["request_id"]}

    report = await prune(engine, NOW - timedelta(days=90), pause_s=0)
    assert report.records == 1
    assert await found(engine, q="quokka") == {new["request_id"]}

    async with engine.begin() as conn:
        await conn.execute(
            update(audit_records).where(audit_records.c.request_id == new["request_id"]).values(response_text="a kiwi")
        )
    assert await found(engine, q="quokka") == set()
    assert await found(engine, q="kiwi") == {new["request_id"]}

    # Every row pruned: SQLite hands the newest id out again, and the new row must not inherit
    # the index entries of the old one.
    await prune(engine, NOW + timedelta(days=1), pause_s=0)
    assert indexed_to(url) == 0
    again = record(NOW, answer="a platypus")
    await add(engine, again)
    assert await found(engine, q="kiwi") == set()
    assert await found(engine, q="platypus") == {again["request_id"]}


@pytest.mark.parametrize("window", [5000, 3, 1])
async def test_keyset_pages_with_the_text_filter(
    db: tuple[str, AsyncEngine], window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the newest rows (a common word), from the index's matches (a rare one), or both on one
    walk through the pages: the same rows, newest first, and the same pages."""
    monkeypatch.setattr(review_store, "TEXT_WINDOW_ROWS", window)
    _, engine = db
    rows = [record(NOW - timedelta(hours=i), answer=f"a quokka number {i}") for i in range(5)]
    rows += [record(NOW - timedelta(minutes=30 + i), status="blocked", answer="quokka, blocked") for i in range(2)]
    rows += [record(NOW - timedelta(hours=1), answer="a quokka at the same moment")]  # a tie: id decides
    rows.append(record(NOW, answer="no marsupial"))
    await add(engine, *rows)
    store, seen, before = ReviewStore(engine), [], None
    while True:
        page = await store.page(Filters.parse({"q": "quokka"}), before=before, limit=2)
        seen += [r["request_id"] for r in page["data"]]
        if (before := page["next"]) is None:
            break
    expected = sorted(rows[:8], key=lambda r: (r["created_at"], rows.index(r)), reverse=True)
    assert seen == [r["request_id"] for r in expected]
    assert await found(engine, q="quokka", status="blocked") == {r["request_id"] for r in rows[5:7]}
    assert await ReviewStore(engine).page(Filters.parse({"q": "wombat"})) == {"data": [], "next": None}


async def test_upgrade_indexes_existing_rows_and_downgrade_goes_back_to_like(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    await asyncio.to_thread(upgrade, url, "0010")
    rows = [record(NOW - timedelta(minutes=i), answer=f"zebra {i}") for i in range(3)]
    engine = create_engine(url)
    try:
        await add(engine, *rows)
        assert await found(engine, q="ebra") == {r["request_id"] for r in rows}  # before 0011: LIKE

        await asyncio.to_thread(upgrade, url)
        assert indexed_to(url) == 3  # the existing rows, indexed by the migration
        assert await found(engine, q="zebra") == {r["request_id"] for r in rows}
        assert await found(engine, q="ebra") == set()

        await asyncio.to_thread(command.downgrade, alembic_config(url), "0010")
        with sqlite3.connect(path_of(url)) as connection:
            left = connection.execute("SELECT name FROM sqlite_master WHERE name LIKE 'audit_records_fts%'").fetchall()
        assert left == []
        assert await found(engine, q="ebra") == {r["request_id"] for r in rows}  # LIKE again

        await asyncio.to_thread(upgrade, url)
        assert await found(engine, q="zebra 2") == {rows[2]["request_id"]}
    finally:
        await engine.dispose()


async def test_without_its_triggers_the_index_is_not_used(db: tuple[str, AsyncEngine]) -> None:
    """A later rebuild of audit_records drops the triggers; the index could fall behind deletes."""
    url, engine = db
    row = record(NOW, answer="zebra")
    await add(engine, row)
    assert await found(engine, q="ebra") == set()
    with sqlite3.connect(path_of(url)) as connection:
        connection.execute(f"DROP TRIGGER {FTS_TRIGGERS[0]}")  # on delete
    assert await found(engine, q="ebra") == {row["request_id"]}


def test_the_store_indexes_the_text_the_migration_triggers_forget() -> None:
    """A contentless FTS5 table forgets a row only when given the very text it indexed."""
    path = Path(__file__).parents[2] / "gateway/migrations/versions/0011_sqlite_text_search.py"
    spec = importlib.util.spec_from_file_location("migration_0011", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.indexed_text("audit_records") == FTS_TEXT_SQL
    assert migration.TABLE == FTS_TABLE and migration.STATE == FTS_STATE and migration.TRIGGERS == FTS_TRIGGERS


TRICKY = [
    "snake_case words", "C:\\dir\\zebra", "abc123 x9y", "sub-zebra, zebra's", "ZÉBRA zébra zebra\u0301s",
    "e\u0301bra", "naïve cafe", "日本語 zebra", "tab\tzebra", "x" * 10 + "zebra", "ǅungla", "ﬁne", "İstanbul",
    "100%zebra",
    "emoji\U0001f600zebra", "a\u20ddzebra", "a\u02b0zebra", "a\u2160zebra", "a\u200dzebra", "a\ue000zebra",
    "line\u2028zebra", "Mc\u0903zebra",
]  # fmt: skip
WORDS = ["zebra", "zeb", "ebra", "case", "snake", "dir", "abc", "123", "9y", "x9", "bra", "s", "cafe", "na",
         "fine", "istanbul", "stanbul", "ungla", "n", "t", "u0301s", "emoji", "line"]  # fmt: skip


def test_words_match_answers_as_the_index_does(tmp_path: Path) -> None:
    """The Python check of the newest rows and the FTS5 index agree, texts with punctuation,
    digits, accents, other scripts, JSON escapes and odd Unicode categories included."""
    url = f"sqlite:///{tmp_path / 'agree.db'}"
    upgrade(url)
    rows = [(i + 1, json.dumps({"prompt": text}), text) for i, text in enumerate(TRICKY)]
    with sqlite3.connect(path_of(url)) as connection:
        connection.executemany(
            "INSERT INTO audit_records (id, request_id, created_at, finished_at, endpoint, stream, status, "
            "http_status, request_json, response_text) VALUES (?, hex(randomblob(8)), '2026-01-01', "
            "'2026-01-01', 'chat.completions', 0, 'ok', 200, ?, ?)",
            rows,
        )
        connection.execute(f"INSERT INTO {FTS_TABLE} (rowid, body) SELECT id, {FTS_TEXT_SQL} FROM audit_records")
        disagree = []
        for word in WORDS:
            indexed = {rowid for (rowid,) in connection.execute(
                f"SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?", (fts_query(word),))}  # fmt: skip
            for rowid, request_json, answer in rows:
                if words_match([word], request_json, answer) != (rowid in indexed):
                    disagree.append((word, TRICKY[rowid - 1]))
    assert disagree == []
