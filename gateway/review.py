"""The reviewer web UI (server-rendered pages under /review) and its JSON API (/api/review).

Sign-in is with a `reviewer` or `admin` API key, which buys an HMAC-signed session cookie
(HttpOnly, SameSite=Lax, 8 hours). Every write carries a CSRF token derived from the session
(a hidden form field, or the `x-csrf-token` header for API calls made with the cookie); API
calls with `Authorization: Bearer` need no token, since a browser never sends that header by
itself. The login form is protected by a double-submit cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Stream, Template

from evals import store as eval_store
from gateway.auth import KeyInfo
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound, PermissionDenied
from gateway.review_store import LABELS, Filters
from gateway.services import Services
from gateway.sessions import SESSION_TTL_S

SESSION_COOKIE = "gw_session"
LOGIN_CSRF_COOKIE = "gw_login_csrf"
_encode = msgspec.json.Encoder().encode


async def _reviewer(request: Request[Any, Any, Any], services: Services, *, write: bool) -> tuple[KeyInfo, str | None]:
    """Who is calling: a Bearer key, or the session cookie (whose writes need the CSRF token)."""
    authorization = request.headers.get("authorization")
    if authorization:
        key = await services.keys.authenticate(authorization)
        key.require("reviewer")
        return key, None
    token = request.cookies.get(SESSION_COOKIE)
    key_id = services.sessions.verify(token)
    if key_id is None or token is None:
        raise AuthenticationFailed("sign in at /review/login, or send 'Authorization: Bearer YOUR_KEY'")
    session_key = await services.keys.by_id(key_id)
    if session_key is None:
        raise AuthenticationFailed("this session's key was revoked; sign in again")
    session_key.require("reviewer")
    if write:
        sent = request.headers.get("x-csrf-token")
        if sent is None:
            form = await request.form()
            sent = form.get("csrf")
        if not sent or not hmac.compare_digest(str(sent), services.sessions.csrf(token)):
            raise PermissionDenied("missing or wrong CSRF token", code="csrf_failed")
    return session_key, services.sessions.csrf(token)


def _params(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if isinstance(v, str)}


# ------------------------------------------------------------------------------------ pages


@get("/review/login", include_in_schema=False)
async def login_page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    if services.sessions.verify(request.cookies.get(SESSION_COOKIE)):
        return Redirect("/review", status_code=303)
    csrf = secrets.token_urlsafe(24)
    response = Template("review/login.html", context={"csrf": csrf, "error": request.query_params.get("error")})
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/review/login")
    return response


@post("/review/login", include_in_schema=False, status_code=303)
async def login(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
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
        services.sessions.issue(key.id),
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
    response = Redirect("/review/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _page_or_login(request: Request[Any, Any, Any], services: Services) -> tuple[KeyInfo, str] | Response[Any]:
    try:
        key, csrf = await _reviewer(request, services, write=False)
    except AuthenticationFailed:
        return Redirect("/review/login", status_code=303)
    return key, csrf or ""


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
        context={"key": key, "csrf": csrf, "rows": page["data"], "filters": filters.query_string(),
                 "next_link": next_link, "elapsed_ms": elapsed_ms, "title": "Requests"},
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
        context={"key": key, "csrf": csrf, "rows": page["data"], "filters": {}, "next_link": next_link,
                 "elapsed_ms": None, "title": "Review queue", "queue": True},
    )  # fmt: skip


def _highlight(answer: str | None, guards: list[dict[str, Any]] | None) -> list[tuple[str, bool]]:
    """The answer cut into (text, unsupported?) pieces from the groundedness verdicts' spans."""
    if not answer:
        return []
    spans = sorted(
        (int(s), int(e))
        for g in guards or []
        if g.get("guard") == "groundedness" and g.get("stage") == "output"
        for s, e in g.get("spans") or []
        if 0 <= int(s) < int(e) <= len(answer)
    )
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
    messages = record["request"].get("messages") if isinstance(record.get("request"), dict) else None
    return Template(
        "review/detail.html",
        context={"key": key, "csrf": csrf, "r": record, "messages": messages, "labels": LABELS,
                 "answer": _highlight(record.get("response_text"), record.get("guards")),
                 "title": f"Request {request_id[:8]}"},
    )  # fmt: skip


@post("/review/requests/{request_id:str}/labels", include_in_schema=False, status_code=303)
async def label_form(
    request: Request[Any, Any, Any], request_id: FromPath[str], services: NamedDependency[Services]
) -> Response[Any]:
    key, _ = await _reviewer(request, services, write=True)
    form = await request.form()
    await services.review.add_label(request_id, str(form.get("label", "")), str(form.get("note") or "") or None, key.id)
    return Redirect(f"/review/requests/{request_id}", status_code=303)


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
    return Template(
        "review/evals.html",
        context={
            "key": key,
            "csrf": csrf,
            "runs": await eval_store.list_runs(services.engine, 200),
            "title": "Eval runs",
        },
    )


@get("/review/evals/{run_id:int}/report", include_in_schema=False)
async def eval_report(
    request: Request[Any, Any, Any], run_id: FromPath[int], services: NamedDependency[Services]
) -> Response[Any]:
    await _reviewer(request, services, write=False)
    run = await eval_store.get_run(services.engine, run_id)
    path = Path(run["report_path"]) if run and run.get("report_path") else None
    if path is None or not await asyncio.to_thread(path.is_file):
        raise NotFound(f"no report for eval run {run_id}")
    return Response(await asyncio.to_thread(path.read_bytes), media_type="text/html")


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
