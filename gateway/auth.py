"""API keys: created by the CLI, stored as SHA-256 hashes, sent as `Authorization: Bearer KEY`.

Keys are 256-bit random secrets, so a fast hash is safe (no dictionary to guess from) and costs
about a microsecond per request. Verified keys are cached for `cache_ttl_s`, so a revoked key
stops working within that time without a database read on every request.

When the database cannot be reached, a key seen before is judged by its last known state (a
revocation made meanwhile applies once the database answers again), and a key never seen is
answered 503 `database_unavailable`, in OpenAI's error format. After a failed lookup the store
waits `retry_s` before asking the database again, so an outage does not cost every request a
connection attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import api_keys
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, PermissionDenied
from gateway.limits import LIMIT_COLUMNS, KeyLimits, key_limits_from_row

log = logging.getLogger("gateway.auth")
# What a key lookup raises when the database is down, refusing connections or unreachable.
_UNAVAILABLE = (SQLAlchemyError, OSError, TimeoutError)

ROLES = ("client", "reviewer", "admin")
KEY_PREFIX = "sk-gw-"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Who is calling: the key's id (stored in audit records), name and role."""

    id: str
    name: str | None
    role: str
    default_collection: str | None = None
    limits: KeyLimits | None = None  # rate limits and quotas (gateway.limits); None: unlimited
    collections: frozenset[str] | None = None  # the collections it may search and read; None: all
    rag_sources: str | None = None  # its default for showing sources ("annotations", "footer"); None: the setting

    def may_use(self, collection: str) -> bool:
        """Whether this key may search `collection` and read its documents (admins: every one)."""
        return self.collections is None or self.role == "admin" or collection in self.collections

    def require(self, *roles: str) -> None:
        if self.role != "admin" and self.role not in roles:
            raise PermissionDenied(f"this needs a key with role {' or '.join(roles)}; yours is {self.role!r}")


OPEN_MODE_KEY = KeyInfo(id="open", name="open mode", role="admin")


class KeyDatabaseUnavailable(GatewayError):
    """The key database cannot be reached and this key was never seen: the client may retry."""

    status = 503
    type = "server_error"
    code = "database_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The gateway cannot check this API key right now: its database is unavailable. Retry shortly.",
            headers={"retry-after": "5"},
        )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Creates and verifies keys against the `api_keys` table."""

    def __init__(
        self, engine: AsyncEngine, *, cache_ttl_s: float = 30.0, cache_max: int = 10_000, retry_s: float = 1.0
    ) -> None:
        self._engine = engine
        self.cache_ttl_s = cache_ttl_s
        self._cache_max = cache_max
        self.retry_s = retry_s
        # digest (or "id:" + key id) -> (fresh until, info); an entry past its time is the last known state
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}
        self._down_until = 0.0  # no database lookups before this time (monotonic), after one failed

    async def create(
        self,
        role: str,
        name: str | None = None,
        default_collection: str | None = None,
        limits: KeyLimits | None = None,
        collections: frozenset[str] | None = None,
        rag_sources: str | None = None,
    ) -> tuple[KeyInfo, str]:
        """Make a key; returns its info and the secret, which is not stored and is shown once."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", param="role")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        limits = limits if limits is not None and limits.active else None
        info = KeyInfo("key_" + secrets.token_hex(6), name, role, default_collection, limits, collections, rag_sources)
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=info.id,
                    name=name,
                    role=role,
                    key_hash=hash_key(secret),
                    prefix=secret[: len(KEY_PREFIX) + 4],
                    created_at=datetime.now(UTC),
                    default_collection=default_collection,
                    collections=_encode_collections(collections),
                    rag_sources=rag_sources,
                    **(limits or KeyLimits()).columns(),
                )
            )
        return info, secret

    async def revoke(self, key_id: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        # This process forgets the key at once (others within their cache time); other keys keep their state.
        self._cache = {k: v for k, v in self._cache.items() if v[1] is None or v[1].id != key_id}
        return bool(result.rowcount)

    async def update_access(self, key_id: str, collections: frozenset[str] | None, rag_sources: str | None) -> bool:
        """Set which collections a key may use (None: all) and its default for showing sources."""
        values = {"collections": _encode_collections(collections), "rag_sources": rag_sources}
        async with self._engine.begin() as conn:
            result = await conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**values))
        self._cache = {k: v for k, v in self._cache.items() if v[1] is None or v[1].id != key_id}
        return bool(result.rowcount)

    async def update_limits(self, key_id: str, limits: KeyLimits) -> bool:
        """Set a key's limits (None fields: no limit); every replica applies them within its cache TTL."""
        async with self._engine.begin() as conn:
            result = await conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**limits.columns()))
        self._cache = {k: v for k, v in self._cache.items() if v[1] is None or v[1].id != key_id}
        return bool(result.rowcount)

    async def count(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(api_keys))).scalar_one())

    async def list(self) -> list[dict[str, object]]:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(
                    api_keys.c.id,
                    api_keys.c.name,
                    api_keys.c.role,
                    api_keys.c.prefix,
                    api_keys.c.created_at,
                    api_keys.c.revoked_at,
                    api_keys.c.collections,
                    api_keys.c.rag_sources,
                    *(api_keys.c[name] for name in LIMIT_COLUMNS),
                ).order_by(api_keys.c.created_at)
            )
            return [dict(row._mapping) for row in result]

    async def authenticate(self, authorization: str | None) -> KeyInfo:
        """Check an Authorization header; raise AuthenticationFailed (401) when it is not a live key."""
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY' (create one with `gateway keys create`)."
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer YOUR_KEY'.")
        digest = hash_key(key)
        info = await self._cached(digest, lambda: self._lookup(digest))
        if info is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return info

    async def by_id(self, key_id: str) -> KeyInfo | None:
        """A live key by its id (sessions carry the id, not the secret); cached like `authenticate`."""
        return await self._cached("id:" + key_id, lambda: self._lookup_id(key_id))

    async def _cached(self, cache_key: str, lookup: Callable[[], Awaitable[KeyInfo | None]]) -> KeyInfo | None:
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] >= now:
            return cached[1]
        if now < self._down_until:
            return self._last_known(cached)
        try:
            info = await lookup()
        except _UNAVAILABLE as exc:
            if not self._down_until:
                log.error("key database unavailable, serving keys from their last known state: %s", exc)
            self._down_until = now + self.retry_s
            return self._last_known(cached)
        if self._down_until:
            log.warning("key database reachable again")
            self._down_until = 0.0
        if len(self._cache) >= self._cache_max:
            self._evict(now)
        # A wrong key is remembered briefly: a flood of them cannot make each one a database read.
        self._cache[cache_key] = (now + (self.cache_ttl_s if info else min(2.0, self.cache_ttl_s)), info)
        return info

    @staticmethod
    def _last_known(cached: tuple[float, KeyInfo | None] | None) -> KeyInfo | None:
        if cached is None:
            raise KeyDatabaseUnavailable()
        return cached[1]

    def _evict(self, now: float) -> None:
        """Bounded memory: drop wrong keys and stale entries first, the live keys' state only if that is not enough."""
        self._cache = {k: v for k, v in self._cache.items() if v[1] is not None and v[0] >= now}
        if len(self._cache) >= self._cache_max:
            self._cache.clear()

    async def _lookup_id(self, key_id: str) -> KeyInfo | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(*KEY_COLUMNS).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)))
            ).first()
        return None if row is None else key_info(row)

    async def _lookup(self, digest: str) -> KeyInfo | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(*KEY_COLUMNS).where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
                )
            ).first()
        if row is None:
            return None
        return key_info(row)


KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.role,
    api_keys.c.default_collection,
    api_keys.c.collections,
    api_keys.c.rag_sources,
    *(api_keys.c[name] for name in LIMIT_COLUMNS),
)


def _encode_collections(collections: frozenset[str] | None) -> str | None:
    return None if collections is None else json.dumps(sorted(collections))


def decode_collections(text: str | None) -> frozenset[str] | None:
    """The `collections` column: a JSON list of names, or NULL for every collection."""
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        return frozenset()  # unreadable: no collection rather than all of them
    return frozenset(str(n) for n in names) if isinstance(names, list) else frozenset()


def key_info(row: Any) -> KeyInfo:
    """A KeyInfo from a row of KEY_COLUMNS (key lookups and reviewer sessions alike)."""
    return KeyInfo(
        row.id,
        row.name,
        row.role,
        row.default_collection,
        key_limits_from_row(row),
        decode_collections(row.collections),
        row.rag_sources,
    )
