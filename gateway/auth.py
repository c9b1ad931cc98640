"""API keys: created by the CLI, stored as SHA-256 hashes, sent as `Authorization: Bearer KEY`.

Keys are 256-bit random secrets, so a fast hash is safe (no dictionary to guess from) and costs
about a microsecond per request. Verified keys are cached for `cache_ttl_s`, so a revoked key
stops working within that time without a database read on every request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import api_keys
from gateway.errors import AuthenticationFailed, InvalidRequest, PermissionDenied

ROLES = ("client", "reviewer", "admin")
KEY_PREFIX = "sk-gw-"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Who is calling: the key's id (stored in audit records), name and role."""

    id: str
    name: str | None
    role: str
    default_collection: str | None = None

    def require(self, *roles: str) -> None:
        if self.role != "admin" and self.role not in roles:
            raise PermissionDenied(f"this needs a key with role {' or '.join(roles)}; yours is {self.role!r}")


OPEN_MODE_KEY = KeyInfo(id="open", name="open mode", role="admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Creates and verifies keys against the `api_keys` table."""

    def __init__(self, engine: AsyncEngine, *, cache_ttl_s: float = 30.0, cache_max: int = 10_000) -> None:
        self._engine = engine
        self._ttl = cache_ttl_s
        self._cache_max = cache_max
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}

    async def create(
        self, role: str, name: str | None = None, default_collection: str | None = None
    ) -> tuple[KeyInfo, str]:
        """Make a key; returns its info and the secret, which is not stored and is shown once."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", param="role")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(id="key_" + secrets.token_hex(6), name=name, role=role, default_collection=default_collection)
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
        self._cache.clear()
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
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[0] < now:
            info = await self._lookup(digest)
            if len(self._cache) >= self._cache_max:
                self._cache.clear()  # bounded: a flood of wrong keys cannot grow memory
            self._cache[digest] = (now + (self._ttl if info else 2.0), info)
        else:
            info = cached[1]
        if info is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return info

    async def by_id(self, key_id: str) -> KeyInfo | None:
        """A live key by its id (sessions carry the id, not the secret); cached like `authenticate`."""
        now = time.monotonic()
        cached = self._cache.get("id:" + key_id)
        if cached is not None and cached[0] >= now:
            return cached[1]
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.default_collection).where(
                        api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
        info = None if row is None else KeyInfo(row.id, row.name, row.role, row.default_collection)
        if len(self._cache) >= self._cache_max:
            self._cache.clear()
        self._cache["id:" + key_id] = (now + self._ttl, info)
        return info

    async def _lookup(self, digest: str) -> KeyInfo | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.default_collection).where(
                        api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
        if row is None:
            return None
        return KeyInfo(id=row.id, name=row.name, role=row.role, default_collection=row.default_collection)
