"""Files have owners: which tenant uploaded each file, storage per tenant, and quotas.

Durable keys, one set per Anthropic key (S is the tenant's `cache_scope`, a hash of that key), all
without TTL (Redis under `volatile-lru` never evicts them) and under one hash tag, so one Lua script
updates them together, atomically, also on a Redis Cluster:

    fp:{S}:own       hash: file_id -> "tenant|size_bytes|expires_at (epoch s, 0: none)|recorded (ms)"
    fp:{S}:storage   hash: "tenant|files", "tenant|bytes" -> live totals of the records above
    fp:{S}:expiry    sorted set: file_id by expires_at; a file stops counting once it is due
    fp:{S}:resv      hash: reservation id -> "tenant|bytes|deadline (ms)": uploads under way
    fp:own:scopes    hash: S -> "1", so tools without the Anthropic keys can find every S

A tenant with `files = "own"` sees only files whose record names it; one with "all" sees the whole
workspace, unowned files included. Without the store, an `own` tenant is refused (503) unless every
owner its answer needs is remembered in this process (see `Ownership.owners`): the proxy never
guesses who owns a file.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from proxy import ownership_lua as lua
from proxy.config import OwnershipConfig, Settings, Tenant
from proxy.errors import NotFoundError, ProxyError
from proxy.reply import Reply
from proxy.routes import Operation
from proxy.store import CacheUnavailableError, Store
from proxy.writes import HashSet

logger = logging.getLogger(__name__)

SCOPES_KEY = "fp:own:scopes"
_MAX_HELD_RECORDS = 100_000
_MAX_REMEMBERED = 100_000


class OwnershipUnavailableError(ProxyError):
    """Who owns a file cannot be read or written now (the store is away): refuse, never guess."""

    status_code = 503
    error_type = "api_error"


class QuotaExceededError(ProxyError):
    status_code = 403
    error_type = "permission_error"


@dataclass(frozen=True, slots=True)
class Keys:
    """The durable ownership keys of one Anthropic key's scope."""

    scope: str

    @property
    def own(self) -> str:
        return f"fp:{{{self.scope}}}:own"

    @property
    def storage(self) -> str:
        return f"fp:{{{self.scope}}}:storage"

    @property
    def expiry(self) -> str:
        return f"fp:{{{self.scope}}}:expiry"

    @property
    def reservations(self) -> str:
        return f"fp:{{{self.scope}}}:resv"

    @property
    def records(self) -> list[str]:
        return [self.own, self.storage, self.expiry]


@dataclass(frozen=True, slots=True)
class TeamStorage:
    """What one tenant holds: the `storage` rows of usage, metrics and the usage page."""

    workspace: str
    tenant: str
    files: int
    bytes: int
    quota_bytes: int | None
    max_files: int | None


@dataclass(frozen=True, slots=True)
class _Record:
    scope: str
    file_id: str
    tenant: str
    size: int
    expires_at: int


def sees_all(tenant: Tenant, tenants: Sequence[Tenant]) -> bool:
    """Whether a tenant sees the whole workspace: `files = "all"`, or by default when no other
    configured tenant uses the same Anthropic key."""
    if tenant.files is not None:
        return tenant.files == "all"
    return not any(other.cache_scope == tenant.cache_scope and other.name != tenant.name for other in tenants)


def shared_keys(tenants: Sequence[Tenant]) -> list[list[str]]:
    """The names of the tenants that share an Anthropic key, one list per shared key."""
    groups: dict[str, list[str]] = {}
    for tenant in tenants:
        groups.setdefault(tenant.cache_scope, []).append(tenant.name)
    return [names for names in groups.values() if len(names) > 1]


def owner_of(record: bytes | None) -> str | None:
    return None if record is None else record.decode().split("|", 1)[0]


def file_fields(body: bytes) -> tuple[str, int, int] | None:
    """id, size_bytes and expires_at (epoch s, 0: none) of a file object; None if it is not one."""
    try:
        data: Any = json.loads(body)
        file_id, size = data["id"], data["size_bytes"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(file_id, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return file_id, size, expires_epoch(data.get("expires_at"))


def expires_epoch(value: object) -> int:
    """An RFC 3339 `expires_at` as epoch seconds; 0 when absent or unreadable."""
    if not isinstance(value, str):
        return 0
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


class Ownership:
    """Owner records, storage totals and quota reservations in the store, per tenant."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._reserve = store.script(lua.RESERVE)
        self._settle = store.script(lua.SETTLE)
        self._forget = store.script(lua.FORGET)
        self._release = store.script(lua.RELEASE)
        # Records of uploads that succeeded while the store was away, written when it returns.
        self._held: deque[_Record] = deque(maxlen=_MAX_HELD_RECORDS)
        self._registered: set[str] = set()
        # (scope, file id) -> (owner, until when "unowned" may be believed); see `owners`.
        self._memo: OrderedDict[tuple[str, str], tuple[str | None, float]] = OrderedDict()
        self.snapshot: list[TeamStorage] = []
        self._shared: list[str] = []
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take the tenants' modes and quotas (at start and on reload); log who shares a key."""
        self.settings = settings
        self.config: OwnershipConfig = settings.ownership
        self._all = {t.name for t in settings.tenants if sees_all(t, settings.tenants)}
        shared = [
            ", ".join(f"{name}={'all' if name in self._all else 'own'}" for name in names)
            for names in shared_keys(settings.tenants)
        ]
        if shared != self._shared:  # names only: never a key
            for modes in shared:
                logger.info("tenants sharing one Anthropic key (files: %s)", modes)
        self._shared = shared

    def filters(self, tenant: Tenant) -> bool:
        """Whether this tenant's answers are filtered to the files it owns."""
        return tenant.name not in self._all

    async def admit(self, tenant: Tenant, operation: Operation, file_id: str | None) -> None:
        """Refuse metadata, download and delete of a file an `own` tenant does not own, exactly as
        a missing file is refused, before anything goes upstream."""
        if file_id is None or tenant.name in self._all or operation is Operation.LIST:
            return
        owners = await self.owners(tenant, [file_id])
        if owners.get(file_id) != tenant.name:
            raise NotFoundError(f"File not found: {file_id}")

    async def owned_among(self, tenant: Tenant, file_ids: Sequence[str]) -> set[str]:
        """The ids among these that this tenant owns; 503 while the store is away."""
        owners = await self.owners(tenant, file_ids)
        return {file_id for file_id, owner in owners.items() if owner == tenant.name}

    async def owners(self, tenant: Tenant, file_ids: Sequence[str]) -> dict[str, str | None]:
        """Each file's owner (None: unowned) in the tenant's scope; 503 while the store is away.

        Owners are remembered in process: a record never changes owner (adopt only fills a missing
        one), so a remembered owner is a fact; "unowned" is remembered for `cache.local_ttl_s` only
        (an upload or adoption through another replica is seen that late at most)."""
        scope, now = tenant.cache_scope, time.monotonic()
        owners: dict[str, str | None] = {}
        unknown: list[str] = []
        for file_id in file_ids:
            remembered = self._memo.get((scope, file_id))
            if remembered is not None and (remembered[0] is not None or remembered[1] > now):
                owners[file_id] = remembered[0]
            else:
                unknown.append(file_id)
        if not unknown:
            return owners
        try:
            await self._write_held()
            records = await self._store.hmget(Keys(scope).own, unknown)
        except CacheUnavailableError:
            raise _unavailable() from None
        until = now + self.settings.cache.local_ttl_s
        for file_id, record in zip(unknown, records, strict=True):
            owner = owners[file_id] = owner_of(record)
            self._remember((scope, file_id), (owner, until))
        return owners

    def _remember(self, key: tuple[str, str], value: tuple[str | None, float]) -> None:
        """Bounded: file ids come from clients too, so the oldest go first past `_MAX_REMEMBERED`."""
        if len(self._memo) >= _MAX_REMEMBERED:
            self._memo.popitem(last=False)
        self._memo[key] = value

    def upload(self, tenant: Tenant, content_length: str | None) -> Upload:
        """The ownership side of one upload: reserve, bound the body, settle (`async with`)."""
        return Upload(self, tenant, content_length)

    async def forget(self, tenant: Tenant, file_id: str | None) -> None:
        """After a delete through the proxy: the file no longer counts for its owner. Best effort for
        an `all` tenant while the store is away (reconciliation drops the record later)."""
        if file_id is None:
            return
        self._memo.pop((tenant.cache_scope, file_id), None)
        try:
            await self._forget(Keys(tenant.cache_scope).records, [0, file_id])
        except CacheUnavailableError:
            logger.warning("a deleted file's owner record could not be dropped now; reconcile drops it")

    async def storage(self) -> list[TeamStorage]:
        """Each configured tenant's files and bytes (due expiries applied first), in config order."""
        await self._write_held()
        tenants = self.settings.tenants
        scopes = {t.cache_scope for t in tenants if t.api_key}
        totals = await read_totals(self._store, scopes)
        return storage_rows(tenants, totals)

    async def refresh(self) -> None:
        """Update the snapshot the metrics gauges read (a scrape does no store work)."""
        try:
            self.snapshot = await self.storage()
        except CacheUnavailableError:
            logger.debug("storage figures not refreshed: store unavailable")

    async def record(self, record: _Record, reservation: str) -> None:
        """Write an upload's owner; while the store is away, hold it (bounded) until it returns."""
        try:
            await self._write_held()
            await self._write_record(record, reservation)
        except CacheUnavailableError:
            if len(self._held) == _MAX_HELD_RECORDS:
                logger.error("over %d owner records held for the store; oldest dropped", _MAX_HELD_RECORDS)
            self._held.append(record)
            logger.warning("an upload's owner record is held until the store returns")

    async def reserve(self, tenant: Tenant, adds: int | None) -> tuple[str, int]:
        """Reserve `adds` bytes (None: unknown, so what the quota leaves) and one file for an upload
        under way; (reservation id, bytes reserved). QuotaExceededError when that passes a quota,
        OwnershipUnavailableError without the store."""
        reservation = secrets.token_hex(8)
        quota = -1 if tenant.storage_quota_bytes is None else tenant.storage_quota_bytes
        max_files = -1 if tenant.max_files is None else tenant.max_files
        keys = Keys(tenant.cache_scope)
        size = -1 if adds is None else adds
        ttl_ms = self.config.reservation_ttl_s * 1000
        args: list[int | str] = [tenant.name, size, quota, max_files, reservation, ttl_ms]
        try:
            admitted, files, used, reserved = await self._reserve([*keys.records, keys.reservations], args)
        except CacheUnavailableError:
            raise _unavailable() from None
        if not admitted:
            raise QuotaExceededError(_quota_message(tenant, int(files), int(used), adds))
        return reservation, int(reserved)

    async def release(self, tenant: Tenant, reservation: str) -> None:
        try:
            await self._release([Keys(tenant.cache_scope).reservations], [reservation])
        except CacheUnavailableError:
            logger.info("a quota reservation could not be released now; it expires by itself")

    async def _write_record(self, record: _Record, reservation: str) -> None:
        keys = Keys(record.scope)
        args: list[int | str] = [reservation, record.file_id, record.tenant, record.size, record.expires_at]
        await self._settle([*keys.records, keys.reservations], args)
        if record.scope not in self._registered:
            await self._store.write([HashSet(SCOPES_KEY, record.scope, b"1")])
            self._registered.add(record.scope)

    async def _write_held(self) -> None:
        """Write the records held while the store was away. The batch is taken out first, so that
        concurrent requests do not write it twice; what is not written goes back in front."""
        if not self._held:
            return
        batch, self._held = list(self._held), deque(maxlen=_MAX_HELD_RECORDS)
        for at, record in enumerate(batch):
            try:
                await self._write_record(record, "")
            except CacheUnavailableError:
                self._held.extendleft(reversed(batch[at:]))
                raise
        logger.info("wrote %d owner records held while the store was away", len(batch))


class Upload:
    """One upload's reservation (tenants with a quota, and `own` tenants: refused without the store),
    its body bounded by the quota left, and its owner record once the answer is 200."""

    def __init__(self, ownership: Ownership, tenant: Tenant, content_length: str | None) -> None:
        self._ownership = ownership
        self._tenant = tenant
        self._declared = int(content_length) if content_length and content_length.isdigit() else None
        self._reservation = ""
        self._limit: int | None = None

    async def __aenter__(self) -> Upload:
        tenant = self._tenant
        quota = tenant.storage_quota_bytes
        if quota is None and tenant.max_files is None and not self._ownership.filters(tenant):
            return self
        self._reservation, reserved = await self._ownership.reserve(tenant, self._declared)
        if self._declared is None and quota is not None:
            self._limit = reserved  # unknown size: what the quota left, and the body is cut past it
        return self

    def bounded(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return body if self._limit is None else _cut(body, self._limit, self._tenant)

    async def settle(self, answer: Reply) -> None:
        """Record the owner of a file the upstream created; otherwise free the reservation."""
        fields = file_fields(answer.body) if answer.status == 200 else None
        if fields is None:
            await self._release()
            return
        file_id, size, expires_at = fields
        record = _Record(self._tenant.cache_scope, file_id, self._tenant.name, size, expires_at)
        reservation, self._reservation = self._reservation, ""
        await self._ownership.record(record, reservation)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._release()

    async def _release(self) -> None:
        if self._reservation:
            reservation, self._reservation = self._reservation, ""
            await self._ownership.release(self._tenant, reservation)


async def _cut(body: AsyncIterator[bytes], limit: int, tenant: Tenant) -> AsyncIterator[bytes]:
    """The body, cut (like one over `max_upload_bytes`) once it passes the quota left."""
    received = 0
    async for chunk in body:
        received += len(chunk)
        if received > limit:
            raise QuotaExceededError(
                f"Upload refused: team {tenant.name} has {limit} bytes of its storage quota"
                f" ({tenant.storage_quota_bytes} bytes) left, and this upload is larger."
            )
        yield chunk


async def read_totals(store: Store, scopes: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Files and bytes per tenant name over these scopes (and every scope recorded in the store)."""
    every = set(scopes) | {scope.decode() for scope in await store.hgetall(SCOPES_KEY)}
    read = store.script(lua.READ)
    totals: dict[str, tuple[int, int]] = {}
    for scope in sorted(every):
        flat, _ = await read(Keys(scope).records, [])
        for name, value in zip(flat[::2], flat[1::2], strict=True):
            tenant, _, counter = name.decode().rpartition("|")
            files, held = totals.get(tenant, (0, 0))
            amount = int(value)
            totals[tenant] = (files + amount, held) if counter == "files" else (files, held + amount)
    return totals


def storage_rows(tenants: Sequence[Tenant], totals: dict[str, tuple[int, int]]) -> list[TeamStorage]:
    return [
        TeamStorage(t.workspace, t.name, *totals.get(t.name, (0, 0)), t.storage_quota_bytes, t.max_files)
        for t in tenants
    ]


def _quota_message(tenant: Tenant, files: int, used: int, adds: int | None) -> str:
    if tenant.max_files is not None and files + 1 > tenant.max_files:
        return (
            f"Upload refused: team {tenant.name} may hold at most {tenant.max_files} files"
            f" (max_files) and holds {files}; this upload adds 1."
        )
    return (
        f"Upload refused: team {tenant.name}'s storage quota is {tenant.storage_quota_bytes} bytes;"
        f" {used} bytes are used and this upload adds {'an unknown number of' if adds is None else adds}"
        " bytes."
    )


def _unavailable() -> OwnershipUnavailableError:
    return OwnershipUnavailableError(
        "File ownership cannot be checked right now (the proxy's store is unavailable); try again shortly.",
        headers={"retry-after": "5"},
    )
