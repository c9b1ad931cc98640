"""End-user feedback on answers (issue 16): `POST /v1/feedback` and the SQL store behind it.

A chat app sends `{"request_id", "rating": 1 | 0 | -1, "comment"?, "categories"?}` with the
same key that made the request (`x-gateway-request-id`, or `gateway.request_id` in the answer);
a reviewer or admin key may rate any request. Every call adds a row to `feedback`: a key may
change its mind, and per key the newest row is that key's rating (`ratings` computes it).

Answers: 201 with the stored feedback; 400 for a bad body; 401 without a live key; 403 for
another key's request; 404 for a request id the audit log does not hold; 503 when the
database cannot be reached. Each is OpenAI's error body, never a 500.

Cost: one indexed read of the audit row (`request_id` is unique; its created_at is stored with the
feedback, see migration 0012), one count on
`ix_feedback_request_created` and one insert, in one transaction; the key check is cached
(`gateway.auth`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth import OPEN_MODE_KEY, KeyInfo
from gateway.db import audit_records, feedback
from gateway.errors import GatewayError, InvalidRequest, NotFound, PermissionDenied, RequestTooLarge
from gateway.jsontext import loads_stored, scrub
from gateway.services import Services

RATINGS = (-1, 0, 1)
MAX_COMMENT_CHARS = 4_000
MAX_CATEGORIES = 10
MAX_CATEGORY_CHARS = 40
#: Rows one key may add for one request: enough to change its mind, not a way to fill the disk.
MAX_PER_KEY_AND_REQUEST = 50
_MAX_REQUEST_ID = 40  # audit_records.request_id is String(40): a longer id names no record
_FIELDS = frozenset({"request_id", "rating", "comment", "categories"})
_CATEGORY = re.compile(r"\w[\w .-]*")  # letters, digits, _, then also spaces, dots and dashes
_UNAVAILABLE = (SQLAlchemyError, OSError, TimeoutError)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class FeedbackUnavailable(GatewayError):
    """The database cannot be reached: the client may retry."""

    status = 503
    type = "server_error"
    code = "database_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The gateway cannot store feedback right now: its database is unavailable. Retry shortly.",
            headers={"retry-after": "5"},
        )


@dataclass(frozen=True, slots=True)
class FeedbackIn:
    """One validated feedback body."""

    request_id: str
    rating: int
    comment: str | None = None
    categories: tuple[str, ...] = ()


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def parse_feedback(raw: bytes) -> FeedbackIn:
    """Decode and check a request body; raises InvalidRequest (400) naming the field at fault."""
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}", None, "invalid_json") from exc
    if not isinstance(body, dict):
        raise _invalid('the body must be an object like {"request_id": "...", "rating": 1}', None, "invalid_type")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        names = ", ".join(repr(scrub(str(k))[:40]) for k in unknown[:5])
        raise _invalid(
            f"unknown field(s) {names}: send request_id, rating, comment, categories", unknown[0][:40], "unknown_field"
        )
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise _invalid(
            "'request_id' must be the gateway's request id (the x-gateway-request-id header of the answer)",
            "request_id",
            "missing_field" if request_id is None else "invalid_type",
        )
    rating = body.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATINGS:
        shown = scrub(repr(rating))[:40]
        raise _invalid(f"'rating' must be 1 (good), 0 (neutral) or -1 (bad); got {shown}", "rating")
    return FeedbackIn(request_id.strip(), rating, _comment(body.get("comment")), _categories(body.get("categories")))


def _comment(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid("'comment' must be a string", "comment", "invalid_type")
    if len(value) > MAX_COMMENT_CHARS:
        raise _invalid(
            f"'comment' is {len(value):,} characters; the limit is {MAX_COMMENT_CHARS:,}", "comment", "comment_too_long"
        )
    if "\x00" in value:
        raise _invalid("'comment' contains a NUL character", "comment")
    return value.strip() or None


def _categories(value: Any) -> tuple[str, ...]:
    """Lower-cased, stripped, duplicates dropped, order kept."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid('\'categories\' must be a list of short names like ["wrong", "unsafe"]', "categories",
                       "invalid_type")  # fmt: skip
    if len(value) > MAX_CATEGORIES:
        raise _invalid(f"'categories' has {len(value)} entries; at most {MAX_CATEGORIES}", "categories")
    out: list[str] = []
    for item in value:
        name = item.strip().lower() if isinstance(item, str) else None
        if not name or len(name) > MAX_CATEGORY_CHARS or not _CATEGORY.fullmatch(name):
            shown = scrub(repr(item))[:60]
            raise _invalid(
                f"each category must be a name of 1 to {MAX_CATEGORY_CHARS} letters, digits, spaces, '_', '.' "
                f"or '-'; got {shown}",
                "categories",
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored feedback row as the API shows it (`created_at` in Unix seconds, as OpenAI's objects)."""
    categories = loads_stored(row.get("categories_json"))
    return {
        "id": row["id"],
        "object": "feedback",
        "request_id": row["request_id"],
        "key_id": row["key_id"],
        "rating": row["rating"],
        "comment": row.get("comment"),
        "categories": categories if isinstance(categories, list) else [],
        "created_at": int(_utc(row["created_at"]).timestamp()),
    }


class FeedbackStore:
    """Feedback rows over one async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, key: KeyInfo, item: FeedbackIn) -> dict[str, Any]:
        """Store one feedback from `key`; NotFound, PermissionDenied or FeedbackUnavailable otherwise."""
        if len(item.request_id) > _MAX_REQUEST_ID or "\x00" in item.request_id:
            raise NotFound(f"no request {scrub(item.request_id[:60])!r} in the audit log", param="request_id")
        try:
            async with self.engine.begin() as conn:
                owner = (
                    await conn.execute(
                        select(audit_records.c.api_key_id, audit_records.c.created_at).where(
                            audit_records.c.request_id == item.request_id
                        )
                    )
                ).first()
                if owner is None:
                    raise NotFound(f"no request {item.request_id!r} in the audit log", param="request_id")
                if owner.api_key_id != key.id and key.role not in ("reviewer", "admin"):
                    raise PermissionDenied(
                        "this request was made with another API key; rate it with that key (or a reviewer key)",
                        param="request_id",
                        code="not_your_request",
                    )
                count = (
                    await conn.execute(
                        select(func.count())
                        .select_from(feedback)
                        .where(feedback.c.request_id == item.request_id, feedback.c.key_id == key.id)
                    )
                ).scalar_one()
                if count >= MAX_PER_KEY_AND_REQUEST:
                    raise InvalidRequest(
                        f"this key has rated this request {count} times already; the limit is "
                        f"{MAX_PER_KEY_AND_REQUEST}",
                        param="request_id",
                        code="feedback_limit_reached",
                    )
                row: dict[str, Any] = {
                    "request_id": item.request_id,
                    "key_id": key.id,
                    "rating": item.rating,
                    "comment": scrub(item.comment) if item.comment else None,
                    "categories_json": _encode(list(item.categories)).decode() if item.categories else None,
                    "created_at": datetime.now(UTC),
                    # The rated record's key with request_id (migration 0012): the review store's
                    # lookups of rated records then read one monthly partition, not all of them.
                    "record_created_at": owner.created_at,
                }
                result = await conn.execute(feedback.insert().values(**row))
                row["id"] = int(result.inserted_primary_key[0])  # type: ignore[index]
        except _UNAVAILABLE as exc:
            raise FeedbackUnavailable() from exc
        return public(row)

    async def for_request(self, request_id: str) -> list[dict[str, Any]]:
        """Every feedback row of one request, oldest first."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(feedback).where(feedback.c.request_id == request_id).order_by(feedback.c.id)
            )
            return [public(dict(r._mapping)) for r in result]


async def ratings(engine: AsyncEngine, request_ids: Sequence[str]) -> dict[str, float]:
    """The rating of each request that has feedback: the mean, over the keys that rated it, of each
    key's newest rating (so a key that changes its mind counts once, with its last word)."""
    out: dict[str, float] = {}
    for start in range(0, len(request_ids), 500):  # bounded IN lists
        batch = list(request_ids[start : start + 500])
        query = (
            select(feedback.c.request_id, feedback.c.key_id, feedback.c.rating)
            .where(feedback.c.request_id.in_(batch))
            .order_by(feedback.c.id)
        )
        async with engine.connect() as conn:
            rows = list(await conn.execute(query))
        out.update(newest_per_key((r.request_id, r.key_id, r.rating) for r in rows))
    return out


def newest_per_key(rows: Iterable[tuple[str, str, int]]) -> dict[str, float]:
    """Mean per request of each key's last rating; `rows` come oldest first."""
    last: dict[str, dict[str, int]] = {}
    for request_id, key_id, rating in rows:
        last.setdefault(request_id, {})[key_id] = rating
    return {request_id: sum(by_key.values()) / len(by_key) for request_id, by_key in last.items()}


@post("/v1/feedback", status_code=201)
async def post_feedback(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[bytes]:
    """Rate an answer: the request's own key, or a reviewer's or admin's."""
    if services.settings.open_mode:
        key = OPEN_MODE_KEY
    else:
        key = await services.keys.authenticate(request.headers.get("authorization"))
    try:
        raw = await request.body()
    except RequestEntityTooLarge as exc:
        limit = services.settings.max_body_bytes
        raise RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.") from exc
    item = parse_feedback(raw)
    stored = await FeedbackStore(services.engine).add(key, item)
    return Response(_encode(stored), status_code=201, media_type="application/json")


FEEDBACK_ROUTES = [post_feedback]
