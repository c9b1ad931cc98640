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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.response import Redirect, Stream, Template
from litestar.types import ExceptionHandlersMap

from gateway import eval_runs
from gateway.auth import OPEN_MODE_KEY, KeyInfo
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound, PermissionDenied
from gateway.review_store import CLEARED, LABELS, RATINGS, Filters
from gateway.services import Services
from gateway.sessions import SESSION_TTL_S

SESSION_COOKIE = "gw_session"
LOGIN_CSRF_COOKIE = "gw_login_csrf"
_OPEN_MODE_SESSION = "open-mode"  # what open mode's CSRF token is derived from
_MAX_RUN_ID = 2**63 - 1
_encode = msgspec.json.Encoder().encode
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Reviewer:
    """Who is calling the reviewer UI or API, and the CSRF token the page's forms carry."""

    key: KeyInfo
    csrf: str


async def provide_reviewer(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Reviewer:
    """The `reviewer` dependency of every reviewer route: a Bearer key, or the session cookie
    (whose writes, any method but GET/HEAD/OPTIONS, need the CSRF token); in open mode, the admin
    everybody is. Raises AuthenticationFailed (401; GET pages turn it into a redirect to the
    sign-in page) or PermissionDenied (403)."""
    write = request.method not in _SAFE_METHODS
    authorization = request.headers.get("authorization")
    if services.settings.open_mode:
        csrf = services.sessions.csrf(_OPEN_MODE_SESSION)
        if write and not authorization:
            await _check_csrf(request, csrf)  # a cross-site form cannot know it, nor send that header
        return Reviewer(OPEN_MODE_KEY, csrf)
    if authorization:
        key = await services.keys.authenticate(authorization)
        key.require("reviewer")
        return Reviewer(key, "")
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
    return Reviewer(session_key, csrf)


def _sign_in_first(_: Request[Any, Any, Any], __: AuthenticationFailed) -> Response[Any]:
    # An exception handler's answer skips the app's after-request hook: name the request here.
    return Redirect("/review/login", status_code=303, headers={"x-gateway-request-id": uuid.uuid4().hex})


# Every reviewer route takes the `reviewer` dependency (`dependencies=REVIEWER`). Pages (GET) also
# send a caller who is not signed in to the sign-in page (`exception_handlers=SIGN_IN_FIRST`); the
# JSON API and the form posts answer 401/403 in OpenAI's error form.
REVIEWER: dict[str, Provide] = {"reviewer": Provide(provide_reviewer)}
SIGN_IN_FIRST: ExceptionHandlersMap = {AuthenticationFailed: _sign_in_first}


async def _check_csrf(request: Request[Any, Any, Any], expected: str) -> None:
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        sent = form.get("csrf")
    if not sent or not hmac.compare_digest(str(sent).encode(), expected.encode()):
        raise PermissionDenied("missing or wrong CSRF token", code="csrf_failed")


def _params(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if isinstance(v, str)}


def _context(services: Services, reviewer: Reviewer, **values: Any) -> dict[str, Any]:
    """What every page's template gets: who is signed in, the CSRF token, open mode."""
    return {"key": reviewer.key, "csrf": reviewer.csrf, "open_mode": services.settings.open_mode, **values}


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


@post("/review/logout", include_in_schema=False, status_code=303, dependencies=REVIEWER)
async def logout(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    if services.settings.open_mode:
        return Redirect("/review", status_code=303)
    await services.sessions.revoke(request.cookies.get(SESSION_COOKIE))  # the cookie is dead everywhere
    response = Redirect("/review/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@get("/review", include_in_schema=False, dependencies=REVIEWER, exception_handlers=SIGN_IN_FIRST)
async def list_page(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
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
        context=_context(services, reviewer, rows=page["data"], filters=filters.query_string(), next_link=next_link,
                         elapsed_ms=elapsed_ms, title="Requests", labels=LABELS, ratings=RATINGS),
    )  # fmt: skip


@get("/review/queue", include_in_schema=False, dependencies=REVIEWER, exception_handlers=SIGN_IN_FIRST)
async def queue_page(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    params = _params(request)
    origin = _queue_origin(params)
    page = await services.review.queue(
        sample_rate=services.settings.review_sample_rate, before=params.get("before"), origin=origin
    )
    shown = {"origin": origin} if origin else {}
    next_link = "/review/queue?" + urlencode({**shown, "before": page["next"]}) if page["next"] else None
    return Template(
        "review/list.html",
        context=_context(services, reviewer, rows=page["data"], filters=shown, next_link=next_link, elapsed_ms=None,
                         title="Review queue", queue=True),
    )  # fmt: skip


def _queue_origin(params: dict[str, str]) -> str | None:
    """The queue's one filter, `origin` (live, eval or all), checked as the list checks it."""
    return Filters.parse({"origin": params.get("origin", "")}).origin


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


@get(
    "/review/requests/{request_id:str}",
    include_in_schema=False,
    dependencies=REVIEWER,
    exception_handlers=SIGN_IN_FIRST,
)
async def detail_page(
    request_id: FromPath[str], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    return await _detail(request_id, services, reviewer)


async def _detail(
    request_id: str,
    services: Services,
    reviewer: Reviewer,
    *,
    error: str | None = None,
    note: str | None = None,
    status_code: int = 200,
) -> Response[Any]:
    """The detail page; a label form that failed comes back here with its error and its note."""
    record = await services.review.record(request_id)
    return Template(
        "review/detail.html",
        status_code=status_code,
        context=_context(services, reviewer, r=record, messages=_conversation(record.get("request")),
                         raw_request=_show(record.get("request")), passages=_passage_rows(record.get("passages")),
                         dropped=record["dropped_passages"], guards=_guard_rows(record.get("guards")),
                         labels=LABELS, cleared=CLEARED, label_error=error, note=note or "",
                         feedback=_feedback_rows(record["feedback"]),
                         answer=_highlight(record.get("response_text"), record.get("guards")),
                         title=f"Request {request_id[:8]}"),
    )  # fmt: skip


def _feedback_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feedback for the page: categories as a list of strings whatever the column held."""
    out = []
    for f in rows:
        categories = f.get("categories")
        if isinstance(categories, list):
            shown = [_show(c) for c in categories]
        else:
            shown = [_show(categories)] if categories not in (None, "") else []
        out.append({**f, "categories": shown, "rating": f["rating"] if isinstance(f["rating"], int) else None})
    return out


@post("/review/requests/{request_id:str}/labels", include_in_schema=False, status_code=303, dependencies=REVIEWER)
async def label_form(
    request: Request[Any, Any, Any],
    request_id: FromPath[str],
    services: NamedDependency[Services],
    reviewer: NamedDependency[Reviewer],
) -> Response[Any]:
    form = await request.form()
    label, note = str(form.get("label", "")), str(form.get("note") or "") or None
    try:
        await services.review.add_label(request_id, label, note, reviewer.key.id)
    except InvalidRequest as exc:
        # Back to the page, with what went wrong and the note as typed; nothing is stored.
        return await _detail(request_id, services, reviewer, error=exc.message, note=note, status_code=exc.status)
    return Redirect("/review/requests/" + quote(request_id, safe=""), status_code=303)


@get("/review/export", include_in_schema=False, dependencies=REVIEWER)
async def export_page(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
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


@get("/review/evals", include_in_schema=False, dependencies=REVIEWER, exception_handlers=SIGN_IN_FIRST)
async def evals_page(services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]) -> Response[Any]:
    runs = await eval_runs.list_runs(services.engine, 200)
    for run in runs:
        metrics = run.get("metrics")
        run["numbers"] = (
            {str(k): v for k, v in metrics.items() if _number(v) is not None} if isinstance(metrics, dict) else {}
        )
    return Template("review/evals.html", context=_context(services, reviewer, runs=runs, title="Eval runs"))


@get("/review/evals/{run_id:int}/report", include_in_schema=False, dependencies=REVIEWER)
async def eval_report(
    run_id: FromPath[int], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    run = await eval_runs.get_run(services.engine, run_id) if 0 <= run_id <= _MAX_RUN_ID else None
    report_path = run.get("report_path") if run else None
    reports = services.settings.data_dir / "reports"
    body = await asyncio.to_thread(_read_report, reports, report_path) if isinstance(report_path, str) else None
    if body is None:
        raise NotFound(f"no report for eval run {run_id}")
    return Response(body, media_type="text/html")


def _read_report(reports: Path, report_path: str) -> bytes | None:
    """The report file, only if it resolves (links followed) to a file under the reports folder;
    None for anything else: outside it, missing, unreadable, or a path no file system accepts."""
    if not report_path:
        return None
    try:
        root = reports.resolve()
        path = Path(report_path).resolve()  # a relative path is taken from the working folder, as written
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path.read_bytes()
    except (OSError, ValueError, RuntimeError):  # a NUL in it, a link loop, a file gone meanwhile
        return None


# ------------------------------------------------------------------------------------ JSON API


def _json(data: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(data), status_code=status, media_type="application/json")


@get("/api/review/requests", dependencies=REVIEWER)
async def api_list(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    params = _params(request)
    try:
        limit = int(params.get("limit", "50"))
    except ValueError as exc:
        raise InvalidRequest("limit must be an integer", param="limit") from exc
    return _json(await services.review.page(Filters.parse(params), before=params.get("before"), limit=limit))


@get("/api/review/requests/{request_id:str}", dependencies=REVIEWER)
async def api_detail(
    request_id: FromPath[str], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    return _json(await services.review.record(request_id))


@post("/api/review/requests/{request_id:str}/labels", status_code=201, dependencies=REVIEWER)
async def api_label(
    request: Request[Any, Any, Any],
    request_id: FromPath[str],
    services: NamedDependency[Services],
    reviewer: NamedDependency[Reviewer],
) -> Response[bytes]:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be an object like {"label": "ok", "note": "..."}')
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidRequest("note must be a string", param="note")
    return _json(await services.review.add_label(request_id, str(body.get("label")), note, reviewer.key.id), 201)


@delete("/api/review/requests/{request_id:str}/labels", status_code=200, dependencies=REVIEWER)
async def api_clear_label(
    request_id: FromPath[str], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    """Remove the current label: a `cleared` row, so the history keeps what it was."""
    return _json(await services.review.add_label(request_id, CLEARED, None, reviewer.key.id))


@get("/api/review/queue", dependencies=REVIEWER)
async def api_queue(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    params = _params(request)
    page = await services.review.queue(
        sample_rate=services.settings.review_sample_rate, before=params.get("before"), origin=_queue_origin(params)
    )
    return _json(page)


@get("/api/review/export", dependencies=REVIEWER)
async def api_export(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    return _export(request, services)


@get("/api/review/evals", dependencies=REVIEWER)
async def api_evals(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    return _json({"data": await eval_runs.list_runs(services.engine, 200)})


REVIEW_ROUTES = [
    login_page, login, logout, list_page, queue_page, detail_page, label_form, export_page, evals_page,
    eval_report, api_list, api_detail, api_label, api_clear_label, api_queue, api_export, api_evals,
]  # fmt: skip
__all__ = ["REVIEWER", "REVIEW_ROUTES", "SIGN_IN_FIRST", "Reviewer", "provide_reviewer"]
