"""The usage page's session cookie (tampered, expired, made with a key since rotated away) and the
brake on repeated failed sign-ins."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.config import hash_key
from proxy.ui_session import ADMIN, TEAM, LoginThrottle, SessionSigner
from tests.constants import ALPHA
from tests.support import FakeClock

SECRET = b"s" * 32
TTL_S = 28800
ALPHA_HASH = hash_key(ALPHA.proxy_key)


def test_a_cookie_opens_to_who_signed_in_and_holds_no_key() -> None:
    signer = SessionSigner(SECRET)
    cookie = signer.issue(TEAM, "alpha", ALPHA_HASH, TTL_S)

    session = signer.open(cookie)
    assert session is not None
    assert (session.role, session.team) == (TEAM, "alpha")
    assert signer.made_with_one_of(session, {ALPHA_HASH})
    assert ALPHA.proxy_key not in cookie and ALPHA_HASH not in cookie
    assert ALPHA_HASH not in base64.urlsafe_b64decode(cookie.split(".")[0] + "==").decode()


def test_two_sign_ins_are_two_sessions() -> None:
    signer = SessionSigner(SECRET)
    first = signer.open(signer.issue(ADMIN, None, ALPHA_HASH, TTL_S))
    second = signer.open(signer.issue(ADMIN, None, ALPHA_HASH, TTL_S))
    assert first is not None and second is not None
    assert first.session_id != second.session_id


def _forged(cookie: str, **changes: object) -> str:
    """The cookie's payload changed as asked, its mac kept."""
    body, mac = cookie.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{forged}.{mac}"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda c: _forged(c, team="bravo"), id="other-team"),
        pytest.param(lambda c: _forged(c, role=ADMIN, team=None), id="made-admin"),
        pytest.param(lambda c: _forged(c, exp=2**40), id="longer-life"),
        pytest.param(lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"), id="mac-changed"),
        pytest.param(lambda c: c.split(".")[0], id="mac-removed"),
        pytest.param(lambda c: c + "." + c, id="doubled"),
        pytest.param(lambda c: "", id="empty"),
        pytest.param(lambda c: "x" * 5000, id="huge"),
        pytest.param(lambda c: "!!!." + c.split(".")[1], id="garbage-payload"),
    ],
)
def test_a_tampered_cookie_opens_to_nothing(tamper: object) -> None:
    signer = SessionSigner(SECRET)
    cookie = signer.issue(TEAM, "alpha", ALPHA_HASH, TTL_S)
    assert signer.open(tamper(cookie)) is None  # type: ignore[operator]


def test_a_cookie_signed_with_another_secret_opens_to_nothing() -> None:
    cookie = SessionSigner(b"t" * 32).issue(TEAM, "alpha", ALPHA_HASH, TTL_S)
    assert SessionSigner(SECRET).open(cookie) is None


def test_a_cookie_expires_after_its_ttl() -> None:
    clock = FakeClock()
    signer = SessionSigner(SECRET, clock)
    cookie = signer.issue(TEAM, "alpha", ALPHA_HASH, TTL_S)

    clock.advance(TTL_S - 5)
    assert signer.open(cookie) is not None
    clock.advance(10)
    assert signer.open(cookie) is None


def test_a_session_made_with_a_key_rotated_away_is_not_honoured() -> None:
    signer = SessionSigner(SECRET)
    session = signer.open(signer.issue(TEAM, "alpha", ALPHA_HASH, TTL_S))
    assert session is not None
    other_hash = hash_key("fp-the-new-key")

    assert signer.made_with_one_of(session, {ALPHA_HASH, other_hash})  # both configured: rotation under way
    assert not signer.made_with_one_of(session, {other_hash})  # the old hash removed and reloaded
    assert not signer.made_with_one_of(session, set())


def test_failed_sign_ins_past_the_limit_wait_for_the_window_to_end() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(limit=3, window_s=60, clock=clock)
    for _ in range(2):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")

    assert throttle.retry_after("10.0.0.1") == 60
    assert throttle.retry_after("10.0.0.2") == 0  # per client
    clock.advance(45)
    assert throttle.retry_after("10.0.0.1") == 15
    clock.advance(15)
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")  # a new window starts
    assert throttle.retry_after("10.0.0.1") == 0


def test_the_failure_table_holds_a_fixed_number_of_clients() -> None:
    throttle = LoginThrottle(limit=1, window_s=60, max_clients=3)
    for n in range(10):
        throttle.failed(f"10.0.0.{n}")

    waiting = [n for n in range(10) if throttle.retry_after(f"10.0.0.{n}")]
    assert waiting == [7, 8, 9]  # the least recently failing were forgotten
