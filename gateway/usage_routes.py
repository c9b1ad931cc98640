"""The usage table for admins: `/review/usage` (a page in the reviewer UI) and `/api/usage` (JSON).

The same figures as `gateway usage`, from the audit log; reviewer sign-in, admin role only.
`?origin=live` (default: eval runs' rows left out), `eval` or `all`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.response import Template

from gateway.errors import InvalidRequest
from gateway.review import REVIEWER, SIGN_IN_FIRST, Reviewer, _context
from gateway.services import Services
from gateway.usage import COLUMNS, GROUPINGS, ORIGINS, UsageRow, parse_since, usage

_encode = msgspec.json.Encoder().encode


async def _figures(request: Request[Any, Any, Any], services: Services) -> tuple[str, str, str, list[UsageRow]]:
    since_text = request.query_params.get("since") or "24h"
    by = request.query_params.get("by") or "key"
    origin = request.query_params.get("origin") or "live"
    if by not in GROUPINGS:
        raise InvalidRequest(f"by {by!r}: choose one of {', '.join(GROUPINGS)}", param="by")
    if origin not in ORIGINS:
        raise InvalidRequest(f"origin {origin!r}: choose one of {', '.join(ORIGINS)}", param="origin")
    try:
        since = parse_since(since_text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from exc
    return since_text, by, origin, await usage(services.engine, since, by, origin=origin)


@get("/review/usage", include_in_schema=False, dependencies=REVIEWER, exception_handlers=SIGN_IN_FIRST)
async def usage_page(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[Any]:
    reviewer.key.require("admin")
    since, by, origin, rows = await _figures(request, services)
    return Template(
        "review/usage.html",
        context=_context(services, reviewer, rows=rows, since=since, by=by, groupings=GROUPINGS, columns=COLUMNS,
                         origin=origin, title="Usage"),
    )  # fmt: skip


@get("/api/usage", dependencies=REVIEWER)
async def api_usage(
    request: Request[Any, Any, Any], services: NamedDependency[Services], reviewer: NamedDependency[Reviewer]
) -> Response[bytes]:
    reviewer.key.require("admin")
    since, by, origin, rows = await _figures(request, services)
    body = {"since": since, "by": by, "origin": origin, "rows": [row.public() for row in rows]}
    return Response(_encode(body), media_type="application/json")


USAGE_ROUTES = [usage_page, api_usage]
