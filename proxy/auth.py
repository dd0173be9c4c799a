"""Who is calling: the proxy key from `x-api-key` or `Authorization: Bearer`, matched to a tenant.

Only sha256 digests of proxy keys are held. A presented key is hashed and the digest looked up, so
the secret itself is never compared: lookup timing can at most tell an attacker something about
the digest of a key they chose, which gives nothing towards a configured key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers

from proxy.config import Tenant
from proxy.errors import AuthenticationError

_MAX_KEY_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request's tenant, and the header forms its key came in (kept upstream)."""

    tenant: Tenant
    key_headers: frozenset[str]


class Authenticator:
    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants_by_hash = {key_hash: t for t in tenants for key_hash in t.client_key_hashes}

    def authenticate(self, api_keys: Sequence[str], authorizations: Sequence[str]) -> Caller:
        """The caller for these `x-api-key` and `Authorization` values; AuthenticationError when
        missing, malformed or unknown."""
        key, forms = presented_key(api_keys, authorizations)
        tenant = self._tenants_by_hash.get(hashlib.sha256(key.encode()).hexdigest())
        if tenant is None:
            raise AuthenticationError("Invalid API key for this proxy.")
        return Caller(tenant=tenant, key_headers=forms)


def check_admin(headers: Headers, key_sha256: str | None) -> None:
    """Admit the admin key only; with none configured, nobody is admitted."""
    key, _ = presented_key(headers.getlist("x-api-key"), headers.getlist("authorization"))
    digest = hashlib.sha256(key.encode()).hexdigest()
    if key_sha256 is None or not hmac.compare_digest(digest, key_sha256):
        raise AuthenticationError("Invalid admin key.")


def presented_key(api_keys: Sequence[str], authorizations: Sequence[str]) -> tuple[str, frozenset[str]]:
    """The one key a request presents (in its `x-api-key` and `Authorization` values) and the header
    forms it came in; AuthenticationError if unusable."""
    presented: set[str] = set()
    forms: set[str] = set()
    for value in api_keys:
        presented.add(value.strip())
        forms.add("x-api-key")
    for value in authorizations:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError(
                "Authorization must use the Bearer scheme: `Authorization: Bearer <key>`."
            )
        presented.add(token.strip())
        forms.add("authorization")
    if not presented:
        raise AuthenticationError(
            "Missing API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`."
        )
    if len(presented) > 1:
        raise AuthenticationError("Two different API keys were sent; send exactly one.")
    key = presented.pop()
    if not key or len(key) > _MAX_KEY_LENGTH or not key.isascii() or not key.isprintable() or " " in key:
        raise AuthenticationError("Malformed API key.")
    return key, frozenset(forms)
