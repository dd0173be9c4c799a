"""Authentication policy: which header sets name exactly one known proxy key, and of which tenant."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from proxy.auth import Authenticator, Caller
from proxy.config import Tenant, hash_key
from proxy.errors import AuthenticationError
from tests.constants import SDK_VERSION

ALPHA_KEY = "fp-test-alpha-3e9b1c"
BRAVO_KEY = "fp-test-bravo-77d0a2"
BRAVO_LONG_KEY = "b" * 512

ALPHA = Tenant(
    name="alpha",
    workspace="alpha-prod",
    client_key_hashes=frozenset({hash_key(ALPHA_KEY)}),
    api_key="sk-ant-test-alpha",
)
BRAVO = Tenant(
    name="bravo",
    workspace="bravo-prod",
    client_key_hashes=frozenset({hash_key(BRAVO_KEY), hash_key(BRAVO_LONG_KEY)}),
    api_key="sk-ant-test-bravo",
)
TENANTS = {"alpha": ALPHA, "bravo": BRAVO}


def key_values(*pairs: tuple[str, str | bytes]) -> tuple[list[str], list[str]]:
    """The `x-api-key` and `Authorization` values of headers as the server hands them over: a raw
    list, so a name may repeat."""
    headers = Headers(
        raw=[
            (name.encode("latin-1"), value if isinstance(value, bytes) else value.encode("latin-1"))
            for name, value in pairs
        ]
    )
    return headers.getlist("x-api-key"), headers.getlist("authorization")


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator([ALPHA, BRAVO])


@pytest.mark.parametrize(
    ("pairs", "tenant", "key_headers"),
    [
        pytest.param([("x-api-key", ALPHA_KEY)], "alpha", {"x-api-key"}, id="x-api-key-alpha"),
        pytest.param([("x-api-key", BRAVO_KEY)], "bravo", {"x-api-key"}, id="x-api-key-bravo"),
        pytest.param(
            [("x-api-key", BRAVO_LONG_KEY)], "bravo", {"x-api-key"}, id="second-key-of-tenant-512-chars"
        ),
        pytest.param(
            [("authorization", f"Bearer {ALPHA_KEY}")], "alpha", {"authorization"}, id="bearer-alpha"
        ),
        pytest.param(
            [("authorization", f"bearer {BRAVO_KEY}")], "bravo", {"authorization"}, id="bearer-lower-case"
        ),
        pytest.param(
            [("authorization", f"BEARER {ALPHA_KEY}")], "alpha", {"authorization"}, id="bearer-upper-case"
        ),
        pytest.param(
            [("authorization", f"Bearer   {ALPHA_KEY}  ")],
            "alpha",
            {"authorization"},
            id="bearer-extra-spaces",
        ),
        pytest.param(
            [("x-api-key", ALPHA_KEY), ("authorization", f"Bearer {ALPHA_KEY}")],
            "alpha",
            {"x-api-key", "authorization"},
            id="both-headers-same-key",
        ),
        pytest.param(
            [("x-api-key", BRAVO_KEY), ("x-api-key", BRAVO_KEY)],
            "bravo",
            {"x-api-key"},
            id="x-api-key-twice-same-key",
        ),
        pytest.param([("x-api-key", f"  {ALPHA_KEY} ")], "alpha", {"x-api-key"}, id="surrounding-whitespace"),
        pytest.param(
            [
                ("content-type", "application/json"),
                ("x-api-key", ALPHA_KEY),
                ("anthropic-version", SDK_VERSION),
            ],
            "alpha",
            {"x-api-key"},
            id="among-other-headers",
        ),
    ],
)
def test_accepted(
    authenticator: Authenticator, pairs: list[tuple[str, str]], tenant: str, key_headers: set[str]
) -> None:
    caller = authenticator.authenticate(*key_values(*pairs))

    assert caller == Caller(tenant=TENANTS[tenant], key_headers=frozenset(key_headers))
    assert caller.tenant is TENANTS[tenant]


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        pytest.param([], "Missing API key", id="missing"),
        pytest.param([("content-type", "application/json")], "Missing API key", id="only-other-headers"),
        pytest.param([("x-api-key", "")], "Malformed", id="empty-x-api-key"),
        pytest.param([("x-api-key", "   ")], "Malformed", id="blank-x-api-key"),
        pytest.param([("authorization", "Bearer ")], "Malformed", id="bearer-empty-token"),
        pytest.param([("authorization", "Bearer")], "Malformed", id="bearer-without-token"),
        pytest.param([("authorization", "")], "Bearer scheme", id="empty-authorization"),
        pytest.param([("authorization", "Basic abc")], "Bearer scheme", id="basic-scheme"),
        pytest.param([("authorization", ALPHA_KEY)], "Bearer scheme", id="authorization-without-scheme"),
        pytest.param(
            [("x-api-key", ALPHA_KEY), ("authorization", "Basic abc")],
            "Bearer scheme",
            id="valid-x-api-key-with-basic-authorization",
        ),
        pytest.param(
            [("x-api-key", ALPHA_KEY), ("authorization", f"Bearer {BRAVO_KEY}")],
            "Two different API keys",
            id="x-api-key-and-bearer-differ",
        ),
        pytest.param(
            [("x-api-key", ALPHA_KEY), ("x-api-key", BRAVO_KEY)],
            "Two different API keys",
            id="x-api-key-twice-different",
        ),
        pytest.param(
            [("authorization", f"Bearer {ALPHA_KEY}"), ("authorization", f"Bearer {BRAVO_KEY}")],
            "Two different API keys",
            id="bearer-twice-different",
        ),
        pytest.param(
            [("x-api-key", ALPHA_KEY), ("x-api-key", "")],
            "Two different API keys",
            id="x-api-key-and-empty-x-api-key",
        ),
        pytest.param([("x-api-key", "fp-test-unknown-000000")], "Invalid API key", id="unknown-key"),
        pytest.param([("x-api-key", ALPHA_KEY.upper())], "Invalid API key", id="key-in-wrong-case"),
        pytest.param([("x-api-key", ALPHA_KEY[:-1])], "Invalid API key", id="truncated-key"),
        pytest.param([("x-api-key", "c" * 512)], "Invalid API key", id="unknown-512-chars"),
        pytest.param([("x-api-key", "fp-test alpha")], "Malformed", id="inner-space"),
        pytest.param([("authorization", "Bearer fp-test alpha")], "Malformed", id="bearer-inner-space"),
        pytest.param([("x-api-key", "fp-test-\xe9")], "Malformed", id="non-ascii-latin-1"),
        pytest.param([("x-api-key", "fp-test-é".encode())], "Malformed", id="non-ascii-utf-8"),
        pytest.param([("x-api-key", "fp-test\x01alpha")], "Malformed", id="control-char"),
        pytest.param([("x-api-key", "fp-test\talpha")], "Malformed", id="tab"),
        pytest.param([("x-api-key", "fp-test\x7falpha")], "Malformed", id="delete-char"),
        pytest.param([("x-api-key", "b" * 513)], "Malformed", id="513-chars"),
        pytest.param([("x-api-key", ALPHA_KEY * 100)], "Malformed", id="very-long"),
    ],
)
def test_rejected(authenticator: Authenticator, pairs: list[tuple[str, str | bytes]], reason: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        authenticator.authenticate(*key_values(*pairs))

    error = caught.value
    assert error.status_code == 401
    assert error.error_type == "authentication_error"
    assert reason in error.message
    presented = [value.decode("latin-1") if isinstance(value, bytes) else value for _, value in pairs]
    for secret in [ALPHA_KEY, BRAVO_KEY, *presented]:
        token = secret.strip().removeprefix("Bearer").strip()
        if len(token) > 3:
            assert token not in error.message
            assert token not in str(error)


def test_no_tenants_accepts_nobody() -> None:
    with pytest.raises(AuthenticationError):
        Authenticator([]).authenticate(*key_values(("x-api-key", ALPHA_KEY)))
