"""The usage page at `/ui/`: sign in with a key, then a team's usage and files, or every team's.

A team's proxy key shows that team only; the admin key (`[admin] key_sha256`) shows every team and
each team's page. Sign-in and sign-out are POST forms and the session cookie is `SameSite=Strict`
and `HttpOnly`; a POST whose `Origin` names another site is refused besides. Sign-out records the
session id in the store (until the session would have expired), so a copied cookie stops working
on every replica. Failed sign-ins are limited per client address (`LoginThrottle`).

The session secret is derived from the tenants' Anthropic keys, which teams never hold, so every
replica with the same config accepts the same cookies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from proxy.auth import Authenticator, check_admin
from proxy.config import Settings, Tenant
from proxy.edge import ControlRoute
from proxy.errors import AuthenticationError, ProxyError
from proxy.handler import FilesHandler
from proxy.store import CacheUnavailableError, Store
from proxy.ui_pages import (
    CONTENT_SECURITY_POLICY,
    AdminView,
    FileRow,
    FilesPage,
    StorageRow,
    TeamView,
    admin_page,
    error_page,
    login_page,
    team_page,
)
from proxy.ui_session import ADMIN, TEAM, LoginThrottle, Session, SessionSigner
from proxy.usage import UsageCounter, UsageRow, read_usage_by_day
from proxy.writes import Put

logger = logging.getLogger(__name__)

# The sign-in form has one short field; a body longer than this is no sign-in.
_MAX_FORM_BYTES = 4096
COOKIE = "fp_ui_session"
# Storage per team: the current rows, one per tenant (files and bytes held now).
StorageSource = Callable[[], Awaitable[Sequence[StorageRow]]]
# Each day of a range is one store read; retention keeps 400 days.
_MAX_RANGE_DAYS = 400
_FILES_PER_PAGE = 20
_PAGE_CURSOR = re.compile(r"[A-Za-z0-9_=-]{1,512}")
_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    # Not no-referrer: that would make browsers send `Origin: null` on the page's own POST forms.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
_WRONG_KEY = "That key was not accepted. Check it and try again."


@dataclass(frozen=True, slots=True)
class _Viewer:
    session: Session

    @property
    def team(self) -> str | None:
        """The team this viewer may see; None for the admin, who sees every team."""
        return self.session.team if self.session.role == TEAM else None

    @property
    def label(self) -> str:
        return "admin" if self.team is None else f"team {self.team}"


class UsagePage:
    def __init__(
        self,
        settings: Callable[[], Settings],
        store: Store,
        usage: UsageCounter,
        handler: FilesHandler,
        *,
        storage: StorageSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`settings` returns the current settings (they change on reload); `storage`, when given,
        returns each team's storage (owner records, `ownership.py`), shown against its quotas."""
        self._settings = settings
        self._store = store
        self._usage = usage
        self._handler = handler
        self._storage = storage
        self._clock = clock
        self._signer = SessionSigner(session_secret(settings()), clock)
        self._throttle = LoginThrottle()

    def routes(self) -> list[ControlRoute]:
        return [
            ControlRoute("/ui", {"GET": self._to_page}),
            ControlRoute("/ui/", {"GET": self._page}),
            ControlRoute("/ui/login", {"GET": self._login_form, "POST": self._login}),
            ControlRoute("/ui/logout", {"POST": self._logout}),
        ]

    async def _to_page(self, request: Request) -> Response:
        return RedirectResponse("/ui/", 303)

    async def _login_form(self, request: Request) -> Response:
        return _html(login_page())

    async def _login(self, request: Request) -> Response:
        if not _same_origin(request):
            return _html(error_page("Sign-in must come from this page.", None), 403)
        client = request.client.host if request.client else "unknown"
        wait = self._throttle.retry_after(client)
        if wait:
            message = f"Too many failed sign-ins from your address. Try again in {wait} seconds."
            return _html(login_page(message), 429, {"retry-after": str(wait)})
        key = await _form_key(request)
        signed = None if key is None else self._identify(key)
        if signed is None:
            self._throttle.failed(client)
            logger.info("usage page: sign-in refused for %s", client)
            return _html(login_page(_WRONG_KEY), 401)
        role, team, key_hash = signed
        ui = self._settings().ui
        response = RedirectResponse("/ui/", 303)
        response.set_cookie(
            COOKIE,
            self._signer.issue(role, team, key_hash, ui.session_ttl_s),
            max_age=ui.session_ttl_s,
            path="/ui",
            secure=ui.secure_cookies,
            httponly=True,
            samesite="strict",
        )
        logger.info("usage page: %s signed in from %s", "admin" if team is None else f"team {team}", client)
        return response

    def _identify(self, key: str) -> tuple[str, str | None, str] | None:
        """(role, team, sha256 of the key) for the admin key or a team's proxy key; None otherwise."""
        settings = self._settings()
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        try:
            check_admin(Headers({"x-api-key": key}), settings.admin.key_sha256)
            return ADMIN, None, key_hash
        except AuthenticationError:
            pass
        try:
            caller = Authenticator(settings.tenants).authenticate((key,), ())
        except AuthenticationError:
            return None
        return TEAM, caller.tenant.name, key_hash

    async def _logout(self, request: Request) -> Response:
        if not _same_origin(request):
            return _html(error_page("Sign-out must come from this page.", None), 403)
        try:
            viewer = await self._viewer(request)
            if viewer is not None:
                ttl_s = max(1, viewer.session.expires_at - int(self._clock()))
                await self._store.write([Put(_revoked_key(viewer.session.session_id), b"1", ttl_s)])
        except CacheUnavailableError:
            logger.warning("usage page: a sign-out could not be recorded (store unavailable)")
        response = RedirectResponse("/ui/login", 303)
        secure = self._settings().ui.secure_cookies
        response.delete_cookie(COOKIE, path="/ui", secure=secure, httponly=True, samesite="strict")
        return response

    async def _viewer(self, request: Request) -> _Viewer | None:
        """Who this request's cookie signed in, if the session is intact, unexpired, made with a key
        still configured, and not signed out."""
        session = self._signer.open(request.cookies.get(COOKIE, ""))
        if session is None:
            return None
        settings = self._settings()
        if session.role == ADMIN:
            hashes: frozenset[str] = frozenset(filter(None, [settings.admin.key_sha256]))
        else:
            tenant = _tenant(settings, session.team)
            hashes = tenant.client_key_hashes if tenant is not None else frozenset()
        if not self._signer.made_with_one_of(session, hashes):
            return None
        (revoked,) = await self._store.mget([_revoked_key(session.session_id)])
        return None if revoked is not None else _Viewer(session)

    async def _page(self, request: Request) -> Response:
        try:
            viewer = await self._viewer(request)
            if viewer is None:
                return RedirectResponse("/ui/login", 303)
            return await self._view(viewer, request.query_params)
        except CacheUnavailableError:
            return _html(error_page("The usage store is unavailable; try again shortly.", None), 503)

    async def _view(self, viewer: _Viewer, params: QueryParams) -> Response:
        today = datetime.fromtimestamp(self._clock(), UTC).date()
        since, until, message = _date_range(params, today)
        asked = params.get("team")
        team = viewer.team or asked
        if viewer.team is not None and asked not in (None, viewer.team):
            # Another team's page looks exactly like one that does not exist.
            return _html(error_page("No such team.", viewer.label), 404)
        await self._usage.flush()
        by_day = await read_usage_by_day(self._store, since, until)
        storage = None if self._storage is None else {row.tenant: row for row in await self._storage()}
        settings = self._settings()
        if team is None:
            everyone = AdminView(
                since, until, _all_teams_by_day(by_day), _team_totals(settings, by_day), storage
            )
            return _html(admin_page(everyone, viewer.label, message))
        tenant = _tenant(settings, team)
        days = {day: _counts_of(rows, team) for day, rows in by_day.items()}
        if tenant is None and not any(days.values()):
            return _html(error_page("No such team.", viewer.label), 404)
        files = None if tenant is None else await self._files(tenant, params.get("page"))
        held = None if storage is None else storage.get(team)  # no row, no figures: never made up
        view = TeamView(team, since, until, days, files, held, admin=viewer.team is None)
        return _html(team_page(view, viewer.label, message))

    async def _files(self, tenant: Tenant, cursor: str | None) -> FilesPage:
        """One page of the team's files, through the proxy's cache."""
        query: dict[str, str] = {"limit": str(_FILES_PER_PAGE)}
        if cursor is not None and _PAGE_CURSOR.fullmatch(cursor):
            query["page"] = cursor
        try:
            entry = await self._handler.list_files(tenant, urlencode(query).encode())
        except ProxyError as exc:
            error = f"The files could not be listed: {exc.message}"
            return FilesPage(first_page="page" not in query, error=error)
        if entry.status != 200:
            return FilesPage(error=f"The files could not be listed: Anthropic answered {entry.status}.")
        try:
            body: dict[str, Any] = json.loads(entry.body)
            rows = tuple(_file_row(item) for item in body["data"])
            next_page = body.get("next_page")
        except (ValueError, KeyError, TypeError, AttributeError):
            return FilesPage(error="The files could not be listed: the answer was not a file list.")
        cursor_next = next_page if isinstance(next_page, str) and _PAGE_CURSOR.fullmatch(next_page) else None
        return FilesPage(rows, cursor_next, first_page="page" not in query)


def session_secret(settings: Settings) -> bytes:
    """The session key: an HMAC of the tenants' Anthropic keys, the same on every replica; a random
    one for this process when the settings hold no keys (read without secrets)."""
    keys = sorted(tenant.api_key for tenant in settings.tenants if tenant.api_key)
    if not keys:
        return secrets.token_bytes(32)
    return hmac.new("\0".join(keys).encode(), b"files-proxy usage page sessions", hashlib.sha256).digest()


def _html(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status, headers={**_HEADERS, **(headers or {})})


def _same_origin(request: Request) -> bool:
    """A browser names the page a POST comes from; refuse another site's (and `null`). Clients that
    send no Origin are no browser, so no cross-site forgery."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _revoked_key(session_id: str) -> str:
    return f"fp:ui:revoked:{{{session_id}}}"


def _tenant(settings: Settings, name: str | None) -> Tenant | None:
    return next((tenant for tenant in settings.tenants if tenant.name == name), None)


def _date_range(params: QueryParams, today: date) -> tuple[date, date, str | None]:
    """The range asked for (default: this month so far), or the default and why it was refused."""
    default = (today.replace(day=1), today)
    try:
        since = date.fromisoformat(params.get("since") or default[0].isoformat())
        until = date.fromisoformat(params.get("until") or default[1].isoformat())
    except ValueError:
        return *default, "Dates are written YYYY-MM-DD; showing this month instead."
    if since > until:
        return *default, "The range ends before it starts; showing this month instead."
    if until - since >= timedelta(days=_MAX_RANGE_DAYS):
        return *default, f"A range is at most {_MAX_RANGE_DAYS} days; showing this month instead."
    return since, until, None


def _add(totals: dict[str, int], counts: Mapping[str, int]) -> None:
    for counter, value in counts.items():
        totals[counter] = totals.get(counter, 0) + value


def _counts_of(rows: Sequence[UsageRow], team: str) -> dict[str, int]:
    """A team's counts (over every workspace it was recorded under)."""
    totals: dict[str, int] = {}
    for row in rows:
        if row.tenant == team:
            _add(totals, row.counts)
    return totals


def _all_teams_by_day(by_day: Mapping[date, list[UsageRow]]) -> dict[date, dict[str, int]]:
    days: dict[date, dict[str, int]] = {day: {} for day in by_day}
    for day, rows in by_day.items():
        for row in rows:
            _add(days[day], row.counts)
    return days


def _team_totals(settings: Settings, by_day: Mapping[date, list[UsageRow]]) -> dict[str, dict[str, int]]:
    """Totals over the range per team: configured teams first (with or without usage), in config
    order, then teams seen only in the counters (removed from the config since)."""
    teams: dict[str, dict[str, int]] = {tenant.name: {} for tenant in settings.tenants}
    seen = sorted({row.tenant for rows in by_day.values() for row in rows} - teams.keys())
    teams |= {name: {} for name in seen}
    for rows in by_day.values():
        for row in rows:
            _add(teams[row.tenant], row.counts)
    return teams


def _file_row(item: Mapping[str, Any]) -> FileRow:
    size = item.get("size_bytes")
    return FileRow(
        name=str(item["filename"]),
        size_bytes=size if isinstance(size, int) and not isinstance(size, bool) else None,
        created_at=_text(item.get("created_at")),
        expires_at=_text(item.get("expires_at")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


async def _form_key(request: Request) -> str | None:
    """The `key` field of the sign-in form (URL-encoded, as the page's form sends it); None for any
    other body. Read with a bound and parsed here: the proxy carries no multipart parser."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=4, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    keys = [value for name, value in fields if name == "key"]
    # Keys are printable ASCII (auth.py); anything else is no key, refused like a wrong one.
    return keys[0] if len(keys) == 1 and keys[0].isascii() else None
