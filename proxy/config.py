"""Settings: the TOML file validated once, tenant secrets resolved once, all frozen.

This is the only module that reads the environment or a secret file. Every problem becomes one
`ConfigError` line naming the key, tenant or variable, so `serve` can fail fast and say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

_SHA256_HEX = r"^[0-9a-fA-F]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# A variable name, so that a key pasted here by mistake is refused without being echoed.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """The HTTP proxy that upstream connections go through (CONNECT tunnels for https upstreams)."""

    url: str
    # `user:password` for Proxy-Authorization; never shown, never logged.
    credentials: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """The URL fit to print: the user name kept, the password masked."""
        if self.credentials is None:
            return self.url
        user = self.credentials.partition(":")[0]
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc}"))


class UpstreamConfig(_Section):
    base_url: HttpUrl = HttpUrl("https://api.anthropic.com")
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    write_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    pool_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 100
    # Accepted so that existing files load; aiohttp keeps idle connections (up to max_connections)
    # for 15 s and has no separate count of them.
    max_keepalive_connections: Annotated[int, Field(ge=0)] = 20
    # TOML has no null: an empty string leaves a key unset.
    # A PEM bundle trusted besides the system store, for a private CA (a TLS-inspecting egress).
    ca_file: str = ""
    # `http://host:port`, no credentials: those come from proxy_auth_env or proxy_auth_file only.
    proxy_url: str = ""
    proxy_auth_env: Annotated[str, Field(pattern=f"^$|{_ENV_NAME}")] = ""
    proxy_auth_file: str = ""
    # Take the proxy from HTTPS_PROXY / HTTP_PROXY and NO_PROXY (when proxy_url is not set).
    trust_env: bool = False

    @property
    def origin(self) -> str:
        """The base URL without a trailing slash, for joining with request paths."""
        return str(self.base_url).rstrip("/")

    @model_validator(mode="after")
    def _check_proxy(self) -> UpstreamConfig:
        # Checked on the whole section, so that pydantic's message never echoes a URL with a password.
        if self.proxy_url:
            _plain_proxy_url(self.proxy_url, "proxy_url")
        if self.proxy_auth_env and self.proxy_auth_file:
            raise ValueError("set at most one of proxy_auth_env or proxy_auth_file")
        if self.proxy_auth_file and not Path(self.proxy_auth_file).is_absolute():
            raise ValueError("proxy_auth_file must be an absolute path")
        if (self.proxy_auth_env or self.proxy_auth_file) and not (self.proxy_url or self.trust_env):
            raise ValueError("proxy_auth_env and proxy_auth_file need proxy_url or trust_env")
        return self

    def egress_proxy(self, environ: Mapping[str, str] = os.environ) -> EgressProxy | None:
        """The proxy for upstream connections with its credentials read; None: connect directly."""
        if self.proxy_url:
            url, credentials = _plain_proxy_url(self.proxy_url, "proxy_url")
        elif self.trust_env:
            found = _proxy_from_environment(self.base_url, environ)
            if found is None:
                return None
            url, credentials = found
        else:
            return None
        return EgressProxy(url, self._proxy_credentials(environ) or credentials)

    def proxy_shown(self, environ: Mapping[str, str] = os.environ) -> str:
        """The egress proxy as `check-config` prints it, password masked."""
        egress = self.egress_proxy(environ)
        return "none (direct)" if egress is None else egress.shown

    def _proxy_credentials(self, environ: Mapping[str, str]) -> str | None:
        if self.proxy_auth_env:
            credentials = environ.get(self.proxy_auth_env, "").strip()
            where = f"environment variable {self.proxy_auth_env}"
        elif self.proxy_auth_file:
            try:
                credentials = Path(self.proxy_auth_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"upstream.proxy_auth_file: cannot read {self.proxy_auth_file}") from exc
            where = f"proxy_auth_file {self.proxy_auth_file}"
        else:
            return None
        if ":" not in credentials:
            raise ConfigError(f"upstream: {where} must hold user:password")
        return credentials


def _plain_proxy_url(url: str, where: str) -> tuple[str, str | None]:
    """`http://host:port` and the `user:password` it carries; the message never shows the URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{where}: expected http://host:port")
    if parts.username is not None and where == "proxy_url":
        raise ValueError(
            "proxy_url: credentials are never read from the config file;"
            " use proxy_auth_env or proxy_auth_file"
        )
    host = parts.netloc.rpartition("@")[2]
    credentials = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return f"http://{host}", credentials


def _proxy_from_environment(base_url: HttpUrl, environ: Mapping[str, str]) -> tuple[str, str | None] | None:
    """The proxy that HTTPS_PROXY (HTTP_PROXY for an http base URL) names, unless NO_PROXY exempts
    the upstream host; lower-case names first, as curl reads them."""
    scheme = base_url.scheme
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY")
    name = next((name for name in names if environ.get(name, "").strip()), None)
    if name is None:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if _exempt(base_url.host or "", base_url.port, no_proxy):
        return None
    try:
        return _plain_proxy_url(environ[name].strip(), name)
    except ValueError as exc:
        raise ConfigError(f"upstream.trust_env: {exc}") from None


def _exempt(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY names the host: `*`, the host or a parent domain (with or without a leading
    dot), optionally with `:port`, or an address block such as `10.0.0.0/8`."""
    host = host.strip("[]").lower()
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if entry == "*":
            return True
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            continue
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.lstrip("*").lstrip(".")
        if name and (host == name or host.endswith(f".{name}")):
            return True
    return False


class CacheConfig(_Section):
    url: str = "memory://"
    metadata_ttl_s: Annotated[int, Field(ge=0)] = 86400
    list_ttl_s: Annotated[int, Field(ge=0)] = 10
    stale_if_error_s: Annotated[int, Field(ge=0)] = 300
    negative_ttl_s: Annotated[int, Field(ge=0)] = 5
    collapse_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # How long a hit may be answered from this process's memory: the bound on how late an upload or
    # delete through another replica is seen here once it is in the store. 0 turns the copy off.
    local_ttl_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # The store time one request's cache calls may spend together (a hit: one call, a miss: two).
    timeout_s: Annotated[float, Field(gt=0)] = 1.0
    max_connections: Annotated[int, Field(ge=1)] = 50
    # A file (on the pod's volume) where invalidations held while the store is away are kept, so a
    # restart before it returns loses none; "": held in memory only.
    journal_path: str = ""
    # The embedded store's cap: past it, cache entries go least recently used first (as Redis with
    # maxmemory and volatile-lru); usage counters are never evicted.
    memory_max_bytes: Annotated[int, Field(ge=1)] = 268_435_456
    # List pages one scope keeps at most (the oldest stored go first), so that one team's distinct
    # queries cannot push the other teams' entries out.
    max_list_pages_per_scope: Annotated[int, Field(ge=1)] = 1000


class LimitsConfig(_Section):
    max_upload_bytes: Annotated[int, Field(ge=1)] = 500_000_000
    # Longest wait for the next piece of an upload's body; then 408 and the upstream request is cut.
    client_body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Longest wait for a downloading client to take the next piece; then the download is cut and its
    # upstream connection released.
    client_send_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class _TenantFile(_Section):
    name: Annotated[str, Field(pattern=_NAME)]
    workspace: Annotated[str, Field(pattern=_NAME)]
    api_key_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    api_key_file: Path | None = None
    client_key_sha256: Annotated[list[Annotated[str, Field(pattern=_SHA256_HEX)]], Field(min_length=1)]
    rate_limit_per_minute: Annotated[int, Field(ge=1)] | None = None
    rate_limit_burst: Annotated[int, Field(ge=1)] | None = None
    max_upstream_connections: Annotated[int, Field(ge=1)] | None = None
    # "own": only the files this team uploaded; "all": the whole workspace. Default: "own" when
    # another tenant uses the same Anthropic key, else "all".
    files: Literal["own", "all"] | None = None
    storage_quota_bytes: Annotated[int, Field(ge=0)] | None = None
    max_files: Annotated[int, Field(ge=0)] | None = None

    @field_validator("client_key_sha256")
    @classmethod
    def _lowercase(cls, hashes: list[str]) -> list[str]:
        return [h.lower() for h in hashes]


class ServerConfig(_Section):
    # On SIGTERM the proxy stops accepting, lets requests in flight finish for up to this long
    # (an upload in progress completes), then exits.
    shutdown_grace_s: Annotated[int, Field(ge=0)] = 30
    # Bounds before any key is checked (nginx's large_client_header_buffers and client_header_timeout):
    # a larger header section gets 431, a slower one is closed.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Idle keep-alive connections are closed after this; above the usual 60 s of load balancers, so
    # that they, not the proxy, close first.
    keep_alive_s: Annotated[float, Field(gt=0)] = 75.0
    # Connections served at once; more are refused (503) without touching those being served.
    max_connections: Annotated[int, Field(ge=1)] = 4096


class AdminConfig(_Section):
    # sha256 of the admin key for /admin/*; without it the admin endpoints always answer 401.
    key_sha256: Annotated[str, Field(pattern=_SHA256_HEX)] | None = None

    @field_validator("key_sha256")
    @classmethod
    def _lowercase(cls, key_hash: str | None) -> str | None:
        return None if key_hash is None else key_hash.lower()  # compared with hexdigest(), lower case


class UsageConfig(_Section):
    # Usage counters are added up in process and written to the store this often (one round trip).
    flush_interval_s: Annotated[float, Field(gt=0)] = 2.0
    # Days of counters kept (today included); older days are deleted. Counters have no TTL, so no
    # Redis eviction policy but allkeys-* can take them.
    retention_days: Annotated[int, Field(ge=1)] = 400


class UiConfig(_Section):
    # The usage page's session cookie: sent only over HTTPS when true (set it when TLS ends in front
    # of the proxy), and valid this long after sign-in.
    secure_cookies: bool = False
    session_ttl_s: Annotated[int, Field(ge=60, le=30 * 86400)] = 28800


class OwnershipConfig(_Section):
    # Reconciliation with the upstream listing (files deleted directly or expired); 0: never.
    reconcile_interval_s: Annotated[int, Field(ge=0)] = 3600
    # Upstream list pages one `own` list request may read to find a page holding the team's files.
    max_list_pages: Annotated[int, Field(ge=1, le=100)] = 10
    # How long a quota reservation outlives a replica that crashed during the upload.
    reservation_ttl_s: Annotated[int, Field(ge=60)] = 3600
    # How often storage per team is read for the metrics gauges.
    storage_refresh_s: Annotated[float, Field(gt=0)] = 15.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests a tenant may make: `per_minute` on average, up to `burst` at once."""

    per_minute: int
    burst: int


@dataclass(frozen=True, slots=True)
class Tenant:
    """A team: who may present which proxy keys, and the Anthropic key used on its behalf."""

    name: str
    workspace: str
    client_key_hashes: frozenset[str]
    api_key: str = field(repr=False)
    rate_limit: RateLimit | None = None
    # Upstream requests this team may have open at once; None: half of `upstream.max_connections`.
    max_upstream_connections: int | None = None
    # "own" or "all"; None: "own" when another tenant shares the Anthropic key (see ownership.py).
    files: Literal["own", "all"] | None = None
    storage_quota_bytes: int | None = None
    max_files: int | None = None
    # Cache entries are scoped by the upstream key's hash, never by the key itself.
    cache_scope: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_scope", hashlib.sha256(self.api_key.encode()).hexdigest()[:32])


def _section(default: _Section, *, reloaded: bool) -> Any:
    """A config file section and its defaults; `reloaded`: whether a reload applies it at once (the
    others take effect at the next restart)."""
    return field(default=default, metadata={"reloaded": reloaded})


@dataclass(frozen=True, slots=True)
class Settings:
    """The config: its tenants and its sections. The one list of sections: the file's schema, its
    loading and what a reload applies are all derived from these fields."""

    tenants: tuple[Tenant, ...]
    upstream: UpstreamConfig = _section(UpstreamConfig(), reloaded=False)
    cache: CacheConfig = _section(CacheConfig(), reloaded=False)
    limits: LimitsConfig = _section(LimitsConfig(), reloaded=True)
    server: ServerConfig = _section(ServerConfig(), reloaded=False)
    admin: AdminConfig = _section(AdminConfig(), reloaded=True)
    usage: UsageConfig = _section(UsageConfig(), reloaded=False)
    ui: UiConfig = _section(UiConfig(), reloaded=True)
    ownership: OwnershipConfig = _section(OwnershipConfig(), reloaded=True)


_SECTIONS = tuple(item for item in fields(Settings) if item.name != "tenants")
_SECTION_FIELDS: dict[str, Any] = {
    item.name: (get_type_hints(Settings)[item.name], item.default) for item in _SECTIONS
}


class _Tenants(_Section):
    tenants: Annotated[list[_TenantFile], Field(min_length=1)]


# The file's schema: the tenants as written, and every section of Settings with its defaults.
_ConfigFile = create_model("_ConfigFile", __base__=_Tenants, **_SECTION_FIELDS)


def sections_needing_restart(running: Settings, loaded: Settings) -> list[str]:
    """The sections that changed but that a reload does not apply."""
    return [
        item.name
        for item in _SECTIONS
        if not item.metadata["reloaded"] and getattr(running, item.name) != getattr(loaded, item.name)
    ]


def hash_key(key: str) -> str:
    """The sha256 hex of a proxy key, as written in `client_key_sha256`."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_settings(
    path: Path, environ: Mapping[str, str] = os.environ, *, with_secrets: bool = True
) -> Settings:
    """Read, validate and resolve a config file; raise ConfigError with one line on any problem.

    `with_secrets=False` leaves every tenant's Anthropic key empty, for tools that only read usage.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        parsed = _ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
    try:
        tenants = tuple(_resolve_tenant(t, path.parent, environ, with_secrets) for t in parsed.tenants)
        _check_unique(tenants)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return Settings(tenants, **{item.name: getattr(parsed, item.name) for item in _SECTIONS})


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        if where.endswith(".api_key"):
            return f"{where}: keys are never read from the config file; use api_key_env or api_key_file"
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] == _SHA256_HEX:
        # Most likely the key itself, pasted where its hash belongs: say how to make the hash, never echo it.
        return f"{where}: expected a sha256 hex digest (64 characters); make one with `files-proxy hash-key`"
    value: Any = error.get("input")
    # A value is echoed to help fix it, unless it may be a secret pasted into the wrong place.
    secretish = any(part in ("client_key_sha256", "api_key_env", "api_key_file") for part in error["loc"])
    shown = "" if secretish or isinstance(value, dict | list) else f" (got {value!r})"
    return f"{where}: {error['msg']}{shown}"


def _resolve_tenant(
    tenant: _TenantFile, base: Path, environ: Mapping[str, str], with_secrets: bool
) -> Tenant:
    if (tenant.api_key_env is None) == (tenant.api_key_file is None):
        raise ConfigError(f"tenant {tenant.name!r}: set exactly one of api_key_env or api_key_file")
    if not with_secrets:
        api_key = ""
    elif tenant.api_key_env is not None:
        api_key = environ.get(tenant.api_key_env, "").strip()
        if not api_key:
            raise ConfigError(
                f"tenant {tenant.name!r}: environment variable {tenant.api_key_env} is not set"
                " (for a first try without any Anthropic key, run `files-proxy demo`)"
            )
    else:
        assert tenant.api_key_file is not None
        key_path = base / tenant.api_key_file
        try:
            api_key = key_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"tenant {tenant.name!r}: cannot read api_key_file {key_path}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"tenant {tenant.name!r}: api_key_file {key_path} is not UTF-8 text") from exc
        if not api_key:
            raise ConfigError(f"tenant {tenant.name!r}: api_key_file {key_path} is empty")
    if tenant.rate_limit_burst is not None and tenant.rate_limit_per_minute is None:
        raise ConfigError(f"tenant {tenant.name!r}: rate_limit_burst needs rate_limit_per_minute")
    rate_limit = None
    if tenant.rate_limit_per_minute is not None:
        burst = tenant.rate_limit_burst or max(1, tenant.rate_limit_per_minute // 6)
        rate_limit = RateLimit(per_minute=tenant.rate_limit_per_minute, burst=burst)
    return Tenant(
        name=tenant.name,
        workspace=tenant.workspace,
        client_key_hashes=frozenset(tenant.client_key_sha256),
        api_key=api_key,
        rate_limit=rate_limit,
        max_upstream_connections=tenant.max_upstream_connections,
        files=tenant.files,
        storage_quota_bytes=tenant.storage_quota_bytes,
        max_files=tenant.max_files,
    )


def _check_unique(tenants: tuple[Tenant, ...]) -> None:
    names: set[str] = set()
    hashes: dict[str, str] = {}
    for tenant in tenants:
        if tenant.name in names:
            raise ConfigError(f"tenant {tenant.name!r}: name used twice")
        names.add(tenant.name)
        for key_hash in tenant.client_key_hashes:
            if key_hash in hashes:
                raise ConfigError(
                    f"tenant {tenant.name!r}: client_key_sha256 {key_hash[:12]}... already belongs to"
                    f" tenant {hashes[key_hash]!r}"
                )
            hashes[key_hash] = tenant.name
