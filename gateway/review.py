"""The reviewer web UI (server-rendered pages under /review) and its JSON API (/api/review).

Sign-in is with a `reviewer` or `admin` API key, which buys an HMAC-signed session cookie
(HttpOnly, SameSite=Lax, 8 hours) backed by a server-side row, so sign-out and key revocation
end it (`gateway.sessions`). Every write carries a CSRF token derived from the session (a
hidden form field, or the `x-csrf-token` header for API calls made with the cookie); API calls
with `Authorization: Bearer` need no token, since a browser never sends that header by itself.
The login form is protected by a double-submit cookie. In open mode there are no keys: every
caller is admin, pages open without sign-in under a banner, and browser writes still carry a
CSRF token.

Pages render whatever an audit row holds: a stored request is whatever a client sent (not JSON,
JSON of the wrong shape, lone surrogates), so the templates get display-ready values built here.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Stream, Template

from evals import store as eval_store
from gateway.auth import OPEN_MODE_KEY, KeyInfo
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound, PermissionDenied
from gateway.review_store import LABELS, Filters
from gateway.services import Services
from gateway.sessions import SESSION_TTL_S

SESSION_COOKIE = "gw_session"
LOGIN_CSRF_COOKIE = "gw_login_csrf"
_OPEN_MODE_SESSION = "open-mode"  # what open mode's CSRF token is derived from
_MAX_RUN_ID = 2**63 - 1
_encode = msgspec.json.Encoder().encode


async def _reviewer(request: Request[Any, Any, Any], services: Services, *, write: bool) -> tuple[KeyInfo, str]:
    """Who is calling, and the CSRF token for the page's forms: a Bearer key, or the session
    cookie (whose writes need the CSRF token); in open mode, the admin everybody is."""
    authorization = request.headers.get("authorization")
    if services.settings.open_mode:
        csrf = services.sessions.csrf(_OPEN_MODE_SESSION)
        if write and not authorization:
            await _check_csrf(request, csrf)  # a cross-site form cannot know it, nor send that header
        return OPEN_MODE_KEY, csrf
    if authorization:
        key = await services.keys.authenticate(authorization)
        key.require("reviewer")
        return key, ""
    token = request.cookies.get(SESSION_COOKIE)
    session_key = await services.sessions.check(token)
    if session_key is None or token is None:
        raise AuthenticationFailed(
            "sign in at /review/login (sessions end at sign-out, after 8 hours, or when their key is revoked), "
            "or send 'Authorization: Bearer YOUR_KEY'"
        )
    session_key.require("reviewer")
    csrf = services.sessions.csrf(token)
    if write:
        await _check_csrf(request, csrf)
    return session_key, csrf


async def _check_csrf(request: Request[Any, Any, Any], expected: str) -> None:
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        sent = form.get("csrf")
    if not sent or not hmac.compare_digest(str(sent).encode(), expected.encode()):
        raise PermissionDenied("missing or wrong CSRF token", code="csrf_failed")


def _params(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if isinstance(v, str)}


def _context(services: Services, key: KeyInfo, csrf: str, **values: Any) -> dict[str, Any]:
    """What every page's template gets: who is signed in, the CSRF token, open mode."""
    return {"key": key, "csrf": csrf, "open_mode": services.settings.open_mode, **values}


# ------------------------------------------------------------------------------------ pages


@get("/review/login", include_in_schema=False)
async def login_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    if services.settings.open_mode or await services.sessions.check(request.cookies.get(SESSION_COOKIE)):
        return Redirect("/review", status_code=303)
    csrf = secrets.token_urlsafe(24)
    response = Template("review/login.html", context={"csrf": csrf, "error": request.query_params.get("error")})
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/review/login")
    return response


@post("/review/login", include_in_schema=False, status_code=303)
async def login(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    if services.settings.open_mode:
        return Redirect("/review", status_code=303)  # there are no keys to sign in with
    form = await request.form()
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not cookie or not hmac.compare_digest(cookie, str(form.get("csrf", ""))):
        return Redirect("/review/login?" + urlencode({"error": "The form expired; try again."}), status_code=303)
    try:
        key = await services.keys.authenticate(f"Bearer {form.get('key', '')}")
        key.require("reviewer")
    except GatewayError as exc:
        return Redirect("/review/login?" + urlencode({"error": exc.message}), status_code=303)
    response = Redirect("/review", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        await services.sessions.issue(key.id),
        httponly=True,
        samesite="lax",
        max_age=SESSION_TTL_S,
        path="/",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/review/login")
    return response


@post("/review/logout", include_in_schema=False, status_code=303)
async def logout(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    await _reviewer(request, services, write=True)
    if services.settings.open_mode:
        return Redirect("/review", status_code=303)
    await services.sessions.revoke(request.cookies.get(SESSION_COOKIE))  # the cookie is dead everywhere
    response = Redirect("/review/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _page_or_login(request: Request[Any, Any, Any], services: Services) -> tuple[KeyInfo, str] | Response[Any]:
    try:
        key, csrf = await _reviewer(request, services, write=False)
    except AuthenticationFailed:
        return Redirect("/review/login", status_code=303)
    return key, csrf


@get("/review", include_in_schema=False)
async def list_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    who = await _page_or_login(request, services)
    if isinstance(who, Response):
        return who
    key, csrf = who
    params = _params(request)
    filters = Filters.parse(params)
    started = time.perf_counter()
    page = await services.review.page(filters, before=params.get("before"))
    elapsed_ms = (time.perf_counter() - started) * 1000
    next_link = None
    if page["next"]:
        next_link = "/review?" + urlencode({**filters.query_string(), "before": page["next"]})
    return Template(
        "review/list.html",
        context=_context(services, key, csrf, rows=page["data"], filters=filters.query_string(), next_link=next_link,
                         elapsed_ms=elapsed_ms, title="Requests"),
    )  # fmt: skip


@get("/review/queue", include_in_schema=False)
async def queue_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    who = await _page_or_login(request, services)
    if isinstance(who, Response):
        return who
    key, csrf = who
    params = _params(request)
    page = await services.review.queue(sample_rate=services.settings.review_sample_rate, before=params.get("before"))
    next_link = "/review/queue?" + urlencode({"before": page["next"]}) if page["next"] else None
    return Template(
        "review/list.html",
        context=_context(services, key, csrf, rows=page["data"], filters={}, next_link=next_link, elapsed_ms=None,
                         title="Review queue", queue=True),
    )  # fmt: skip


def _show(value: Any) -> str:
    """Any decoded JSON value as text for a page: strings as they are, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return _encode(value).decode()
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _records(value: Any) -> list[dict[str, Any]]:
    """The objects of a stored JSON list; anything else in it is shown as its JSON text."""
    if not isinstance(value, list):
        return []
    return [v if isinstance(v, dict) else {"text": _show(v)} for v in value]


def _conversation(body: Any) -> list[dict[str, str]] | None:
    """A stored request's messages (or prompt) as role and text; None when it has neither in a
    usable shape, and the page shows the body as it was stored."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        return [
            {"role": _show(m.get("role")), "text": _show(m.get("content"))}
            if isinstance(m, dict)
            else {"role": "(not an object)", "text": _show(m)}
            for m in body["messages"]
        ]
    if "prompt" in body and "messages" not in body:
        return [{"role": "prompt", "text": _show(body["prompt"])}]
    return None


def _passage_rows(value: Any) -> list[dict[str, Any]]:
    return [
        {"rank": _show(p.get("rank")), "score": _number(p.get("score")), "title": _show(p.get("title")),
         "document": _show(p.get("document")), "text": _show(p.get("text"))}
        for p in _records(value)
    ]  # fmt: skip


def _guard_rows(value: Any) -> list[dict[str, Any]]:
    return [
        {"guard": _show(g.get("guard")), "stage": _show(g.get("stage")), "action": _show(g.get("action")),
         "score": _number(g.get("score")), "reason": _show(g.get("reason")), "ms": _show(g.get("ms"))}
        for g in _records(value)
    ]  # fmt: skip


def _spans(guards: Any, length: int) -> list[tuple[int, int]]:
    """The unsupported-sentence spans of the output groundedness verdicts that fit the answer."""
    out = []
    for g in _records(guards):
        if g.get("guard") != "groundedness" or g.get("stage") != "output" or not isinstance(g.get("spans"), list):
            continue
        for span in g["spans"]:
            whole = isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
            if whole and 0 <= span[0] < span[1] <= length:
                out.append((span[0], span[1]))
    return sorted(out)


def _highlight(answer: str | None, guards: Any) -> list[tuple[str, bool]]:
    """The answer cut into (text, unsupported?) pieces from the groundedness verdicts' spans."""
    if not answer:
        return []
    spans = _spans(guards, len(answer))
    pieces: list[tuple[str, bool]] = []
    at = 0
    for start, end in spans:
        if start < at:
            continue
        if start > at:
            pieces.append((answer[at:start], False))
        pieces.append((answer[start:end], True))
        at = end
    if at < len(answer):
        pieces.append((answer[at:], False))
    return pieces


@get("/review/requests/{request_id:str}", include_in_schema=False)
async def detail_page(
    request: Request[Any, Any, Any], request_id: FromPath[str], services: NamedDependency[Services]
) -> Response[Any]:
    who = await _page_or_login(request, services)
    if isinstance(who, Response):
        return who
    key, csrf = who
    record = await services.review.record(request_id)
    return Template(
        "review/detail.html",
        context=_context(services, key, csrf, r=record, messages=_conversation(record.get("request")),
                         raw_request=_show(record.get("request")), passages=_passage_rows(record.get("passages")),
                         guards=_guard_rows(record.get("guards")), labels=LABELS,
                         answer=_highlight(record.get("response_text"), record.get("guards")),
                         title=f"Request {request_id[:8]}"),
    )  # fmt: skip


@post("/review/requests/{request_id:str}/labels", include_in_schema=False, status_code=303)
async def label_form(
    request: Request[Any, Any, Any], request_id: FromPath[str], services: NamedDependency[Services]
) -> Response[Any]:
    key, _ = await _reviewer(request, services, write=True)
    form = await request.form()
    await services.review.add_label(request_id, str(form.get("label", "")), str(form.get("note") or "") or None, key.id)
    return Redirect("/review/requests/" + quote(request_id, safe=""), status_code=303)


@get("/review/export", include_in_schema=False)
async def export_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    await _reviewer(request, services, write=False)
    return _export(request, services)


def _export(request: Request[Any, Any, Any], services: Services) -> Response[Any]:
    fmt = request.query_params.get("format", "jsonl")
    label = request.query_params.get("label") or None
    if fmt not in ("jsonl", "csv"):
        raise InvalidRequest("format must be jsonl or csv", param="format")
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return Stream(
        services.review.export(fmt, label),
        media_type=media,
        headers={"content-disposition": f'attachment; filename="labels.{fmt}"'},
    )


@get("/review/evals", include_in_schema=False)
async def evals_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    who = await _page_or_login(request, services)
    if isinstance(who, Response):
        return who
    key, csrf = who
    runs = await eval_store.list_runs(services.engine, 200)
    for run in runs:
        metrics = run.get("metrics")
        run["numbers"] = (
            {str(k): v for k, v in metrics.items() if _number(v) is not None} if isinstance(metrics, dict) else {}
        )
    return Template("review/evals.html", context=_context(services, key, csrf, runs=runs, title="Eval runs"))


@get("/review/evals/{run_id:int}/report", include_in_schema=False)
async def eval_report(
    request: Request[Any, Any, Any], run_id: FromPath[int], services: NamedDependency[Services]
) -> Response[Any]:
    await _reviewer(request, services, write=False)
    run = await eval_store.get_run(services.engine, run_id) if 0 <= run_id <= _MAX_RUN_ID else None
    report_path = run.get("report_path") if run else None
    try:
        path = Path(report_path) if isinstance(report_path, str) and report_path else None
        body = (
            await asyncio.to_thread(path.read_bytes)
            if path is not None and await asyncio.to_thread(path.is_file)
            else None
        )
    except (OSError, ValueError):  # unreadable, or a path no file system accepts (a NUL in it)
        body = None
    if body is None:
        raise NotFound(f"no report for eval run {run_id}")
    return Response(body, media_type="text/html")


# ------------------------------------------------------------------------------------ JSON API


def _json(data: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(data), status_code=status, media_type="application/json")


@get("/api/review/requests")
async def api_list(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    await _reviewer(request, services, write=False)
    params = _params(request)
    try:
        limit = int(params.get("limit", "50"))
    except ValueError as exc:
        raise InvalidRequest("limit must be an integer", param="limit") from exc
    return _json(await services.review.page(Filters.parse(params), before=params.get("before"), limit=limit))


@get("/api/review/requests/{request_id:str}")
async def api_detail(
    request: Request[Any, Any, Any], request_id: FromPath[str], services: NamedDependency[Services]
) -> Response[bytes]:
    await _reviewer(request, services, write=False)
    return _json(await services.review.record(request_id))


@post("/api/review/requests/{request_id:str}/labels", status_code=201)
async def api_label(
    request: Request[Any, Any, Any], request_id: FromPath[str], services: NamedDependency[Services]
) -> Response[bytes]:
    key, _ = await _reviewer(request, services, write=True)
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be an object like {"label": "ok", "note": "..."}')
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidRequest("note must be a string", param="note")
    return _json(await services.review.add_label(request_id, str(body.get("label")), note, key.id), 201)


@get("/api/review/queue")
async def api_queue(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    await _reviewer(request, services, write=False)
    page = await services.review.queue(
        sample_rate=services.settings.review_sample_rate, before=request.query_params.get("before")
    )
    return _json(page)


@get("/api/review/export")
async def api_export(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    await _reviewer(request, services, write=False)
    return _export(request, services)


@get("/api/review/evals")
async def api_evals(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    await _reviewer(request, services, write=False)
    return _json({"data": await eval_store.list_runs(services.engine, 200)})


REVIEW_ROUTES = [
    login_page, login, logout, list_page, queue_page, detail_page, label_form, export_page, evals_page,
    eval_report, api_list, api_detail, api_label, api_queue, api_export, api_evals,
]  # fmt: skip
__all__ = ["REVIEW_ROUTES"]
