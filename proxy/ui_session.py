"""The usage page's sign-in: a signed session cookie, and a brake on repeated wrong keys.

A cookie is `<payload>.<mac>`, both base64url: the payload is JSON with who signed in (admin, or a
team's name), when the session ends, a random session id (so a sign-out can revoke it) and a
fingerprint of the key hash it was made from; the mac is HMAC-SHA256 over the payload. The key is
never in it. The fingerprint is an HMAC of the key's sha256, so a cookie does not even carry the
configured digest; a session is honoured only while that key hash is still configured, so a key
rotated away by a reload ends every session made with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ADMIN = "admin"
TEAM = "team"
# A cookie this app issues is about 200 bytes; anything far longer is not worth verifying.
_MAX_COOKIE = 1024


@dataclass(frozen=True, slots=True)
class Session:
    """A verified, unexpired cookie's content."""

    role: str  # ADMIN or TEAM
    team: str | None
    expires_at: int
    session_id: str
    fingerprint: str


class SessionSigner:
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def fingerprint(self, key_hash: str) -> str:
        """Names a configured key hash without revealing it."""
        return _b64(hmac.new(self._secret, b"key:" + key_hash.encode(), hashlib.sha256).digest()[:16])

    def issue(self, role: str, team: str | None, key_hash: str, ttl_s: int) -> str:
        """A cookie value for a session made with the key whose sha256 is `key_hash`."""
        payload = {
            "role": role,
            "team": team,
            "exp": int(self._clock()) + ttl_s,
            "sid": secrets.token_urlsafe(16),
            "fp": self.fingerprint(key_hash),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}"

    def open(self, cookie: str) -> Session | None:
        """The session in a cookie, or None when it is malformed, tampered with or expired."""
        body, dot, mac = cookie.partition(".")
        if len(cookie) > _MAX_COOKIE or not dot or not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session = Session(
                role=payload["role"],
                team=payload["team"],
                expires_at=payload["exp"],
                session_id=payload["sid"],
                fingerprint=payload["fp"],
            )
        except (ValueError, binascii.Error, KeyError, TypeError):
            return None
        if session.role not in (ADMIN, TEAM) or not isinstance(session.expires_at, int):
            return None
        return session if self._clock() < session.expires_at else None

    def made_with_one_of(self, session: Session, key_hashes: Iterable[str]) -> bool:
        """Whether the session was made with one of these (currently configured) key hashes."""
        found = False
        for key_hash in key_hashes:
            found |= hmac.compare_digest(self.fingerprint(key_hash), session.fingerprint)
        return found

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())


class LoginThrottle:
    """At most `limit` failed sign-ins per client address per `window_s`; then refuse until the window
    ends. The table holds at most `max_clients` addresses (the least recently failing go first), so
    its memory is fixed whatever the number of clients."""

    def __init__(
        self,
        limit: int = 5,
        window_s: float = 60.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window_s = window_s
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # client -> (window start, n)

    def retry_after(self, client: str) -> int:
        """Seconds this client must wait before trying again; 0 when it may try now."""
        started, count = self._failures.get(client, (0.0, 0))
        remaining = started + self._window_s - self._clock()
        return math.ceil(remaining) if count >= self._limit and remaining > 0 else 0

    def failed(self, client: str) -> None:
        now = self._clock()
        started, count = self._failures.pop(client, (now, 0))
        if now - started >= self._window_s:
            started, count = now, 0
        self._failures[client] = (started, count + 1)
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
