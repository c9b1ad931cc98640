"""Reviewer sessions: HMAC-signed, expiring tokens, and CSRF tokens derived from them."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

SESSION_TTL_S = 8 * 3600


class Sessions:
    """Signed, expiring session tokens (`key_id.expiry.signature`) and CSRF tokens derived from them."""

    def __init__(self, secret: bytes, ttl_s: int = SESSION_TTL_S) -> None:
        self._secret = secret
        self._ttl_s = ttl_s

    @classmethod
    def for_data_dir(cls, data_dir: Path, configured: str | None = None) -> Sessions:
        """The secret from settings, else one kept in DATA_DIR (created once, mode 0600), so
        sessions survive restarts and replicas sharing DATA_DIR share them."""
        if configured:
            return cls(configured.encode())
        path = data_dir / "session-secret"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        return cls(path.read_text().strip().encode())

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, key_id: str) -> str:
        payload = f"{key_id}.{int(time.time()) + self._ttl_s}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str | None) -> str | None:
        """The key id of a valid, unexpired token; None otherwise."""
        if not token or token.count(".") != 2:
            return None
        key_id, expiry, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{key_id}.{expiry}")):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        return key_id

    def csrf(self, token: str) -> str:
        return self._sign("csrf:" + token)[:40]
