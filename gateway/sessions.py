"""Reviewer sessions: HMAC-signed, expiring cookies backed by a `review_sessions` row, and CSRF
tokens derived from them.

The cookie is `SESSION_ID.KEY_ID.EXPIRY.SIGNATURE`. The signature rejects a forged or tampered
cookie without a database read; the row (keyed by the SHA-256 of the session id) is what makes
a session revocable on every replica that shares the database: sign-out sets `revoked_at`, and
a revoked API key ends its sessions because the check joins `api_keys`. A verified session is
cached in-process for `SESSION_CACHE_S` seconds, so a revocation made on another replica takes
effect there within that time (on the replica that signs out, at once).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth import KEY_COLUMNS, KeyInfo, key_info
from gateway.db import api_keys, review_sessions

SESSION_TTL_S = 8 * 3600
SESSION_CACHE_S = 5.0
MIN_SECRET_CHARS = 16


class Sessions:
    """Issues, checks and revokes reviewer sessions; derives CSRF tokens from them."""

    def __init__(
        self,
        secret: bytes,
        engine: AsyncEngine,
        *,
        ttl_s: int = SESSION_TTL_S,
        cache_ttl_s: float = SESSION_CACHE_S,
        cache_max: int = 10_000,
    ) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the session secret must be at least {MIN_SECRET_CHARS} characters long")
        self._secret = secret
        self._engine = engine
        self._ttl_s = ttl_s
        self.cache_ttl_s = cache_ttl_s
        self._cache_max = cache_max
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}

    @classmethod
    def for_data_dir(cls, data_dir: Path, configured: str | None, engine: AsyncEngine) -> Sessions:
        """The secret from settings (`session_secret`), else one kept in DATA_DIR/session-secret
        (created once, mode 0600). Replicas must share the secret: set `session_secret`, or share
        DATA_DIR."""
        if configured:
            return cls(configured.encode(), engine)
        return cls(_data_dir_secret(data_dir).encode(), engine)

    # ------------------------------------------------------------------ tokens

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def _parse(self, token: str | None) -> tuple[str, str] | None:
        """(session id, key id) of a well-signed, unexpired token; None otherwise."""
        if not token or len(token) > 512 or token.count(".") != 3:
            return None
        session_id, key_id, expiry, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{session_id}.{key_id}.{expiry}")):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        return session_id, key_id

    def csrf(self, token: str) -> str:
        return self._sign("csrf:" + token)[:40]

    # ------------------------------------------------------------------ the database

    async def issue(self, key_id: str) -> str:
        """A new session for a verified key: its row is stored, the signed cookie value returned."""
        session_id = secrets.token_urlsafe(24)
        now = datetime.now(UTC)
        expiry = int(now.timestamp()) + self._ttl_s
        async with self._engine.begin() as conn:
            # Sign-ins are rare: a good moment to forget sessions that ended a day ago.
            await conn.execute(delete(review_sessions).where(review_sessions.c.expires_at < now - timedelta(days=1)))
            await conn.execute(
                review_sessions.insert().values(
                    id=_digest(session_id),
                    key_id=key_id,
                    created_at=now,
                    expires_at=datetime.fromtimestamp(expiry, UTC),
                )
            )
        payload = f"{session_id}.{key_id}.{expiry}"
        return f"{payload}.{self._sign(payload)}"

    async def check(self, token: str | None) -> KeyInfo | None:
        """The live key behind a valid session; None when the cookie is forged or expired, the
        session was signed out, or its key was revoked."""
        parsed = self._parse(token)
        if parsed is None:
            return None
        digest = _digest(parsed[0])
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] >= now:
            return cached[1]
        query = (
            select(*KEY_COLUMNS)
            .select_from(review_sessions.join(api_keys, api_keys.c.id == review_sessions.c.key_id))
            .where(
                review_sessions.c.id == digest,
                review_sessions.c.revoked_at.is_(None),
                review_sessions.c.expires_at > datetime.now(UTC),
                api_keys.c.revoked_at.is_(None),
            )
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        info = None if row is None else key_info(row)  # the same KeyInfo a Bearer key gets
        if len(self._cache) >= self._cache_max:
            self._cache.clear()  # bounded: many sessions cannot grow memory
        self._cache[digest] = (now + self.cache_ttl_s, info)
        return info

    async def revoke(self, token: str | None) -> bool:
        """Sign a session out (on every replica: here at once, elsewhere within the cache time)."""
        parsed = self._parse(token)
        if parsed is None:
            return False
        digest = _digest(parsed[0])
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(review_sessions)
                .where(review_sessions.c.id == digest, review_sessions.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        self._cache[digest] = (time.monotonic() + self.cache_ttl_s, None)
        return bool(result.rowcount)

    async def revoke_key(self, key_id: str) -> int:
        """End every session of one key; returns how many were live."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(review_sessions)
                .where(review_sessions.c.key_id == key_id, review_sessions.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        self._cache.clear()
        return int(result.rowcount)

    def forget_cached(self) -> None:
        """Drop the in-process cache (what `cache_ttl_s` passing does)."""
        self._cache.clear()


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _data_dir_secret(data_dir: Path) -> str:
    """Read DATA_DIR/session-secret, creating it atomically the first time: written to a private
    temporary file and linked into place, so replicas starting together agree on one secret and
    none reads a half-written file."""
    path = data_dir / "session-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = data_dir / f".session-secret.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won the race: use its secret
        finally:
            temporary.unlink()
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{path} holds no usable session secret: delete it (a new one is made) or set session_secret")
    return secret
