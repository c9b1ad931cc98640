"""Reviewer hardening: every page and export renders any stored row; sessions end at sign-out
and with their key, on every replica; open mode goes straight in; bad URLs are 400/404, never
500; text search treats `%` and `_` as text."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import insert, text

from gateway.cli import main as gateway_main
from gateway.db import audit_records, create_engine, eval_runs, review_labels
from gateway.errors import InvalidRequest
from gateway.migrate import upgrade
from gateway.review_store import Filters, ReviewStore
from gateway.sessions import Sessions
from gateway.settings import Settings, SettingsError, load_settings
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import PG_ADMIN, GatewayServer, create_key, serving, throwaway_postgres

DEEP = "[" * 5000 + "]" * 5000

# Every column a client or a damaged database can fill oddly; each dict changes a plain row.
ODD_ROWS: dict[str, dict[str, Any]] = {
    "nulls": {"api_key_id": None, "model": None, "backend": None, "request_json": None, "response_text": None,
              "response_json": None, "finish_reason": None, "prompt_tokens": None, "total_ms": None,
              "passages_json": None, "citations_json": None, "guards_json": None, "groundedness": None,
              "toxicity": None, "error_code": None, "error_message": None},
    "empty strings": {"request_json": "", "response_text": "", "passages_json": "", "guards_json": "",
                      "citations_json": "", "response_json": "", "model": "", "flagged_by": ""},
    "not json": {"request_json": "{not json", "guards_json": "[{", "passages_json": "nope", "citations_json": "}",
                 "response_json": "'"},
    "scalars": {"request_json": "5", "guards_json": "5", "passages_json": '"text"', "citations_json": "true",
                "response_json": "null"},
    "messages object": {"request_json": '{"model": "m", "messages": {"a": 1}}'},
    "messages number": {"request_json": '{"model": "m", "messages": 5}'},
    "messages numbers": {"request_json": '{"model": "m", "messages": [1, 2]}'},
    "message fields": {"request_json": '{"messages": [{"role": 5, "content": {"x": [1]}}, {"content": null},'
                                       ' "hi", null]}'},
    "content parts": {"request_json": '{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},'
                                      ' 7]}]}'},
    "prompt list": {"request_json": '{"prompt": ["a", 1, null]}'},
    "lone surrogates": {"request_json": '{"model": "m\\ud800", "messages": [{"role": "user",'
                                        ' "content": "x\\ud800y \\udfff"}]}',
                        "guards_json": '[{"guard": "\\ud800", "reason": "\\udc00", "score": 0.5}]',
                        "passages_json": '[{"text": "p\\ud800", "score": 0.5, "rank": 1}]'},
    "too deep": {"request_json": '{"messages": ' + DEEP + "}", "guards_json": DEEP, "passages_json": DEEP},
    "deeper than shown": {"request_json": "[" * 100 + "]" * 100},
    "unclosed": {"request_json": "[" * 100_000},
    "nan and infinity": {"guards_json": '[{"guard": "toxicity", "stage": "output", "score": NaN, "ms": Infinity}]',
                         "passages_json": '[{"score": -Infinity, "rank": NaN}]'},
    "guard shapes": {"response_text": "abcdef. ghi.",
                     "guards_json": '[5, "x", null, {"guard": "groundedness", "stage": "output",'
                                    ' "spans": [["a", 2], [1], 5, [0, 999], [true, 3], [4, 2], [0, 3], {"s": 1}]},'
                                    ' {"guard": "groundedness", "stage": "output", "spans": "0-3"},'
                                    ' {"score": "high", "ms": {"a": 1}, "action": [1]}]'},
    "passage shapes": {"passages_json": '[5, {"score": "x", "rank": [1]}, {"score": 1e308, "text": {"t": 1}},'
                                        ' null, []]'},
    "citations shapes": {"citations_json": '[{"document": 5}, "x"]'},
    "odd request id": {"request_id": "odd id with %2F?#&é" + "x" * 20},  # never made by the gateway
    "text in number columns": {},  # filled by raw SQL below: SQLite keeps what it is given
    "odd status": {"status": "whatever", "http_status": 0, "endpoint": "", "flagged_by": "a,b,%,_"},
}  # fmt: skip


def _row(name: str, i: int, now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": f"odd-{i:02d}-{uuid.uuid4().hex[:8]}",
        "created_at": now - timedelta(seconds=i),
        "finished_at": now - timedelta(seconds=i),
        "api_key_id": "key_client",
        "endpoint": "chat.completions",
        "model": "fake-model",
        "stream": False,
        "status": "rejected",
        "http_status": 400,
        "request_json": '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}',
        "response_text": "an answer",
        "flagged_by": "groundedness",
    }
    row.update(ODD_ROWS[name])
    return row


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _insert(url: str, table: Any, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for row in rows:  # one by one: the rows fill different columns
                await conn.execute(insert(table).values(**row))
    finally:
        await engine.dispose()


async def _sql(url: str, statement: str, **params: Any) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement), params)
    finally:
        await engine.dispose()


def _sign_in(base_url: str, key: str) -> httpx.Client:
    b = httpx.Client(base_url=base_url, follow_redirects=True)
    page = b.get("/review/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text[:300]
    signed_in = b.post("/review/login", data={"key": key, "csrf": csrf.group(1)})
    assert signed_in.url.path == "/review", signed_in.text[:300]
    return b


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1)


@pytest.fixture
def review_settings(tmp_path: Path, fake_backend: FakeBackendThread) -> Settings:
    return make_settings(tmp_path, fake_backend.url, review_sample_rate=1.0)


# ------------------------------------------------------------------ every page renders any row


def test_every_page_and_export_renders_any_stored_row(review_settings: Settings) -> None:
    now = datetime.now(UTC)
    rows = [_row(name, i, now) for i, name in enumerate(ODD_ROWS)]
    names = {r["request_id"]: name for r, name in zip(rows, ODD_ROWS, strict=True)}

    def names_of(row: dict[str, Any]) -> str:
        return names[row["request_id"]]

    _run(_insert(review_settings.database_url, audit_records, rows))
    damaged = next(r["request_id"] for r in rows if names_of(r) == "text in number columns")
    _run(_sql(review_settings.database_url, "UPDATE audit_records SET groundedness = 'high', toxicity = 'x',"
              " total_ms = 'slow', prompt_tokens = 'many' WHERE request_id = :rid", rid=damaged))  # fmt: skip
    _run(_insert(review_settings.database_url, review_labels,
                 [{"request_id": r["request_id"], "label": "other", "note": "n", "reviewer": "key_rev",
                   "created_at": now} for r in rows]))  # fmt: skip
    runs = [
        {"kind": "dataset", "name": "running", "started_at": now, "status": "running"},
        {"kind": "dataset", "name": "bad json", "started_at": now, "status": "passed", "metrics_json": "{nope",
         "comparison_json": "[", "config_json": "5", "report_path": "/no/such/file.html"},
        {"kind": "traffic", "name": "list", "started_at": now, "status": "regressed", "metrics_json": "[1, 2]"},
        {"kind": "traffic", "name": "odd", "started_at": now, "status": "odd",
         "metrics_json": '{"a": "x", "b": NaN, "c": true, "d": {"e": 1}, "f": 0.5, "\\ud800": 1}',
         "report_path": "bad\x00path"},
    ]  # fmt: skip
    _run(_insert(review_settings.database_url, eval_runs, runs))
    _, key = create_key(review_settings, "reviewer", "rita")
    with serving(review_settings) as (gw, _client):
        api = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"})
        b = _sign_in(gw.url, key)
        with api, closing(b):
            listed = b.get("/review")
            assert listed.status_code == 200
            for r in rows:
                assert r["request_id"][:12] in listed.text
            api_list = api.get("/api/review/requests", params={"limit": "100"})
            assert api_list.status_code == 200 and len(api_list.json()["data"]) == len(rows)
            queue = b.get("/review/queue")
            assert queue.status_code == 200 and api.get("/api/review/queue").status_code == 200
            for request_id, name in names.items():
                path = quote(request_id, safe="")
                page = b.get(f"/review/requests/{path}")
                assert page.status_code == 200, (name, page.text[:500])
                detail = api.get(f"/api/review/requests/{path}")
                assert detail.status_code == 200, (name, detail.text[:500])
                assert detail.json()["request_id"] == request_id
            for fmt in ("jsonl", "csv"):
                for client in (b, api):
                    prefix = "/review" if client is b else "/api/review"
                    exported = client.get(f"{prefix}/export", params={"format": fmt})
                    assert exported.status_code == 200, exported.text[:300]
                    if fmt == "jsonl":
                        lines = [json.loads(line) for line in exported.text.splitlines()]
                    else:
                        lines = list(csv.DictReader(io.StringIO(exported.text)))
                    assert sorted(line["request_id"] for line in lines) == sorted(names)
            evals = b.get("/review/evals")
            assert evals.status_code == 200 and "f=0.5" in evals.text
            assert api.get("/api/review/evals").status_code == 200
            for run in api.get("/api/review/evals").json()["data"]:
                assert b.get(f"/review/evals/{run['id']}/report").status_code == 404

            # What the decoded rows look like: lone surrogates as U+FFFD, text that is not JSON as text.
            by_name = {name: rid for rid, name in names.items()}
            odd = api.get(f"/api/review/requests/{quote(by_name['lone surrogates'], safe='')}").json()
            assert odd["request"]["messages"][0]["content"] == "x\ufffdy \ufffd"
            assert odd["guards"][0]["guard"] == "\ufffd"
            assert api.get(f"/api/review/requests/{by_name['not json']}").json()["request"] == "{not json"
            shown = b.get(f"/review/requests/{by_name['guard shapes']}").text
            assert '<mark class="unsupported"' in shown and ">abc</mark>" in shown  # the one span that fits


def test_requests_with_wrong_shapes_sent_through_the_api_open_in_the_review(review_settings: Settings) -> None:
    """The issue's cases, end to end: what a client sends is audited, then its page opens."""
    _, key = create_key(review_settings, "reviewer")
    bodies = [
        b'{"model": "fake-model", "messages": {"a": 1}}',
        b'{"model": "fake-model", "messages": 5}',
        b'{"model": "fake-model", "messages": [1, 2]}',
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stop": "\\udfff"}',
    ]
    with serving(review_settings) as (gw, client):
        for body in bodies:
            sent = httpx.post(
                gw.url + "/v1/chat/completions",
                content=body,
                headers={"authorization": f"Bearer {client.api_key}", "content-type": "application/json"},
            )
            assert sent.status_code < 500, sent.text
        api = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"})
        b = _sign_in(gw.url, key)
        with api, closing(b):
            rows = api.get("/api/review/requests").json()["data"]
            assert len(rows) == len(bodies)
            for r in rows:
                assert b.get(f"/review/requests/{r['request_id']}").status_code == 200
                assert api.get(f"/api/review/requests/{r['request_id']}").status_code == 200
                assert (
                    api.post(f"/api/review/requests/{r['request_id']}/labels", json={"label": "ok"}).status_code == 201
                )
            assert b.get("/review").status_code == 200 and b.get("/review/queue").status_code == 200
            for fmt in ("jsonl", "csv"):
                assert b.get("/review/export", params={"format": fmt}).status_code == 200


# ------------------------------------------------------------------ bad URLs


def test_bad_cursors_run_ids_and_export_labels_are_client_errors(review_settings: Settings) -> None:
    _, key = create_key(review_settings, "reviewer")
    with serving(review_settings) as (gw, client):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        api = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"})
        b = _sign_in(gw.url, key)
        with api, closing(b):
            for cursor in ("2026-01-01T00:00:00|" + "9" * 40, "2026-01-01T00:00:00|-1", "9999-12-31T23:59:59-12:00|5",
                           "x|1", "|", "2026-01-01|" + "9" * 5000, "0001-01-01T00:00:00+05:00|1"):  # fmt: skip
                for client_, path in ((api, "/api/review/requests"), (api, "/api/review/queue"), (b, "/review"),
                                      (b, "/review/queue")):  # fmt: skip
                    answer = client_.get(path, params={"before": cursor})
                    assert answer.status_code == 400, (path, cursor, answer.text[:300])
                    assert answer.json()["error"]["param"] == "before"
            for params in ({"since": "0001-01-01T00:00:00+05:00"}, {"groundedness_below": "nan"},
                           {"toxicity_above": "inf"}, {"model": "a\x00b"}, {"q": "x" * 2000},
                           {"limit": "9" * 5000}):  # fmt: skip
                answer = api.get("/api/review/requests", params=params)
                assert answer.status_code == 400, (params, answer.text[:300])
            # A naive cursor time means UTC, as the `next` values are.
            naive = api.get("/api/review/requests", params={"before": "2999-01-01T00:00:00|1"})
            assert naive.status_code == 200 and len(naive.json()["data"]) == 1
            for run_id in ("9" * 40, "-1", "18446744073709551616"):
                assert b.get(f"/review/evals/{run_id}/report").status_code in (400, 404)
            assert b.get("/review/requests/" + "x" * 5000).status_code == 404
            assert api.get("/api/review/requests/a%00b").status_code == 404
            assert api.post("/api/review/requests/a%00b/labels", json={"label": "ok"}).status_code == 404
            for client_, path in ((api, "/api/review/export"), (b, "/review/export")):
                bad = client_.get(path, params={"format": "csv", "label": "nonsense"})
                assert bad.status_code == 400 and bad.json()["error"]["param"] == "label"
                assert "label must be one of ok, hallucination" in bad.json()["error"]["message"]


def test_eval_reports_are_served_only_from_the_reports_folder(review_settings: Settings, tmp_path: Path) -> None:
    reports = review_settings.data_dir / "reports"
    reports.mkdir(parents=True)
    (reports / "dataset-1.html").write_text("<p>the report</p>")
    outside = tmp_path / "secret.html"
    outside.write_text("<p>not a report</p>")
    (reports / "link.html").symlink_to(outside)
    now = datetime.now(UTC)
    paths = {
        "inside": str(reports / "dataset-1.html"),
        "absolute outside": "/etc/passwd",
        "climbs out": str(reports / ".." / "secret.html"),
        "link out": str(reports / "link.html"),
        "the folder": str(reports),
    }
    runs = [{"kind": "dataset", "name": name, "started_at": now, "status": "passed", "report_path": path}
            for name, path in paths.items()]  # fmt: skip
    _run(_insert(review_settings.database_url, eval_runs, runs))
    _, key = create_key(review_settings, "reviewer")
    with serving(review_settings) as (gw, _client):
        api = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"})
        with api:
            ids = {run["name"]: run["id"] for run in api.get("/api/review/evals").json()["data"]}
            served = api.get(f"/review/evals/{ids['inside']}/report")
            assert served.status_code == 200 and served.text == "<p>the report</p>"
            for name in paths.keys() - {"inside"}:
                refused = api.get(f"/review/evals/{ids[name]}/report")
                assert refused.status_code == 404, name
                assert refused.json()["error"]["code"] == "not_found" and "root:" not in refused.text


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with throwaway_postgres("gw_review") as name:
        url = f"{PG_ADMIN}/{name}"
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'review.db'}"
        upgrade(url)
        return url
    return str(request.getfixturevalue("pg_url"))


async def test_text_search_treats_like_wildcards_as_text(database_url: str) -> None:
    now = datetime.now(UTC)
    marker = uuid.uuid4().hex[:8]
    texts = {"percent": f"{marker} costs 100% more", "underscore": f"{marker} snake_case", "plain": f"{marker} plain",
             "backslash": f"{marker} C:\\dir", "slash": f"{marker} a/b"}  # fmt: skip
    rows = [
        {"request_id": f"{marker}-{name}", "created_at": now, "finished_at": now, "endpoint": "chat.completions",
         "stream": False, "status": "ok", "http_status": 200, "request_json": json.dumps({"prompt": text}),
         "response_text": text, "flagged_by": f"{name},x_y" if name == "plain" else None}
        for name, text in texts.items()
    ]  # fmt: skip
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(audit_records), rows)
        store = ReviewStore(engine)

        async def found(**params: str) -> set[str]:
            page = await store.page(Filters.parse(params), limit=500)
            return {
                r["request_id"].removeprefix(f"{marker}-") for r in page["data"] if r["request_id"].startswith(marker)
            }

        assert await found(q="%") == {"percent"}
        assert await found(q="_") == {"underscore"}
        assert await found(q="0% m") == {"percent"}
        assert await found(q="\\") == {"backslash"}
        assert await found(q="/") == {"slash"}
        assert await found(q=marker) == set(texts)
        # Guard names match whole entries of flagged_by, wildcards included.
        assert await found(guard="plain") == {"plain"} and await found(guard="x_y") == {"plain"}
        assert await found(guard="_") == set() and await found(guard="%") == set() and await found(guard="pla") == set()
        with pytest.raises(InvalidRequest):
            Filters.parse({"q": "a\x00b"})
        # A far-away cursor is a 400, not a driver overflow.
        with pytest.raises(InvalidRequest):
            await store.page(Filters(), before="2026-01-01T00:00:00|" + "9" * 30)
    finally:
        await engine.dispose()


# ------------------------------------------------------------------ sessions


def test_sign_out_ends_the_session_server_side(review_settings: Settings) -> None:
    _, key = create_key(review_settings, "reviewer")
    with GatewayServer(review_settings) as gw:
        b = _sign_in(gw.url, key)
        with closing(b):
            cookie = b.cookies["gw_session"]
            csrf = _csrf(b.get("/review").text)
            assert b.post("/review/logout", data={"csrf": csrf}).url.path == "/review/login"
        # Someone who kept a copy of the cookie (it would have lasted 8 hours) is refused.
        with httpx.Client(base_url=gw.url, cookies={"gw_session": cookie}) as stolen:
            assert stolen.get("/api/review/requests").status_code == 401
            page = stolen.get("/review", follow_redirects=False)
            assert page.status_code == 303 and page.headers["location"] == "/review/login"
            assert stolen.get("/review/login", follow_redirects=False).status_code == 200


def test_revoking_the_key_ends_its_sessions(review_settings: Settings) -> None:
    key_id, key = create_key(review_settings, "reviewer")
    with GatewayServer(review_settings) as gw:
        b = _sign_in(gw.url, key)
        with closing(b):
            assert b.get("/api/review/requests").status_code == 200
            assert gateway_main(["keys", "revoke", key_id, "--data-dir", str(review_settings.data_dir)]) == 0
            gw.services.sessions.forget_cached()  # what the 5 s cache time passing does
            assert b.get("/api/review/requests").status_code == 401
            assert b.get("/review").url.path == "/review/login"


def test_replicas_share_sessions_and_their_revocation(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    """Two gateways on one database with one configured secret: a session from one works on the
    other, and signing out on one ends it on both."""
    secret = "s" * 32
    first = make_settings(tmp_path / "a", fake_backend.url, session_secret=secret)
    second = make_settings(
        tmp_path / "b", fake_backend.url, session_secret=secret, database=f"sqlite:///{tmp_path / 'a' / 'gateway.db'}"
    )
    _, key = create_key(first, "reviewer")
    with GatewayServer(first) as a, GatewayServer(second) as b:
        browser = _sign_in(a.url, key)
        with closing(browser):
            cookie = browser.cookies["gw_session"]
            with httpx.Client(base_url=b.url, cookies={"gw_session": cookie}) as on_b:
                assert on_b.get("/api/review/requests").status_code == 200
                csrf = _csrf(browser.get("/review").text)
                browser.post("/review/logout", data={"csrf": csrf})
                b.services.sessions.forget_cached()  # the other replica's 5 s cache time passing
                assert on_b.get("/api/review/requests").status_code == 401
    assert not (tmp_path / "a" / "session-secret").exists()  # the configured secret was used


async def test_session_tokens_are_signed_and_checked_against_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    try:
        from gateway.auth import KeyStore

        info, _ = await KeyStore(engine).create("reviewer", "rita")
        sessions = Sessions(b"k" * 32, engine)
        token = await sessions.issue(info.id)
        assert (await sessions.check(token)) == info
        session_id, key_id, expiry, signature = token.split(".")
        later = int(expiry) + 60
        for forged in (f"{session_id}.key_other.{expiry}.{signature}", f"{session_id}.{key_id}.{later}.{signature}",
                       token + "x", "", "a.b.c", None):  # fmt: skip
            assert await sessions.check(forged) is None
        other_secret = Sessions(b"j" * 32, engine)
        assert await other_secret.check(token) is None
        assert await sessions.revoke(token) and await sessions.check(token) is None
        again = await sessions.issue(info.id)
        assert await sessions.revoke_key(info.id) == 1 and await sessions.check(again) is None
        expired = Sessions(b"k" * 32, engine, ttl_s=-1)
        assert await expired.check(await expired.issue(info.id)) is None
        with pytest.raises(ValueError, match="at least 16"):
            Sessions(b"short", engine)
    finally:
        await engine.dispose()


def test_session_secret_comes_from_settings_or_data_dir(tmp_path: Path) -> None:
    assert load_settings({}, environ={"GATEWAY_SESSION_SECRET": "x" * 20}).session_secret == "x" * 20
    with pytest.raises(SettingsError, match="session_secret must be at least 16"):
        load_settings({}, environ={"GATEWAY_SESSION_SECRET": "short"})
    engine = create_engine(f"sqlite:///{tmp_path / 's.db'}")
    first = Sessions.for_data_dir(tmp_path / "data", None, engine)
    second = Sessions.for_data_dir(tmp_path / "data", None, engine)
    secret_file = tmp_path / "data" / "session-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert first.csrf("t") == second.csrf("t")  # the same secret, read back
    assert [p.name for p in secret_file.parent.iterdir()] == ["session-secret"]  # no temporary left behind
    configured = Sessions.for_data_dir(tmp_path / "data", "c" * 20, engine)
    assert configured.csrf("t") != first.csrf("t")
    _run(engine.dispose())


# ------------------------------------------------------------------ open mode


def test_open_mode_goes_straight_in_with_a_banner(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    settings = make_settings(tmp_path, fake_backend.url, open_mode=True)
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, follow_redirects=True) as b:
        b.post(
            gw.url + "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        page = b.get("/review")
        assert page.url.path == "/review" and page.status_code == 200
        assert "Open mode" in page.text and 'name="key"' not in page.text and "Sign out" not in page.text
        assert b.get("/review/login").url.path == "/review"
        assert b.get("/review/queue").status_code == 200 and b.get("/review/evals").status_code == 200
        rid = b.get("/api/review/requests").json()["data"][0]["request_id"]
        detail = b.get(f"/review/requests/{rid}")
        assert detail.status_code == 200 and "Open mode" in detail.text
        # Browser writes still carry the page's CSRF token; API calls with a header need none.
        assert b.post(f"/review/requests/{rid}/labels", data={"label": "ok"}).status_code == 403
        saved = b.post(f"/review/requests/{rid}/labels", data={"label": "toxic", "csrf": _csrf(detail.text)})
        assert saved.status_code == 200 and "toxic" in saved.text
        with_header = b.post(
            f"/api/review/requests/{rid}/labels", json={"label": "ok"}, headers={"authorization": "Bearer anything"}
        )
        assert with_header.status_code == 201 and with_header.json()["reviewer"] == "open"
