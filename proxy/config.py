"""Settings: the TOML file validated once, tenant secrets resolved once, all frozen.

This is the only module that reads the environment or a secret file. Every problem becomes one
`ConfigError` line naming the key, tenant or variable, so `serve` can fail fast and say why.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

_SHA256_HEX = r"^[0-9a-fA-F]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# A variable name, so that a key pasted here by mistake is refused without being echoed.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Section):
    base_url: HttpUrl = HttpUrl("https://api.anthropic.com")
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    write_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    pool_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 100
    max_keepalive_connections: Annotated[int, Field(ge=0)] = 20

    @property
    def origin(self) -> str:
        """The base URL without a trailing slash, for joining with request paths."""
        return str(self.base_url).rstrip("/")


class CacheConfig(_Section):
    url: str = "memory://"
    metadata_ttl_s: Annotated[int, Field(ge=0)] = 86400
    list_ttl_s: Annotated[int, Field(ge=0)] = 10
    stale_if_error_s: Annotated[int, Field(ge=0)] = 300
    negative_ttl_s: Annotated[int, Field(ge=0)] = 5
    collapse_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # How long a hit may be answered from this process's memory: the bound on how late an upload or
    # delete through another replica is seen here. 0 turns the in-process copy off.
    local_ttl_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    timeout_s: Annotated[float, Field(gt=0)] = 1.0
    max_connections: Annotated[int, Field(ge=1)] = 50


class LimitsConfig(_Section):
    max_upload_bytes: Annotated[int, Field(ge=1)] = 500_000_000
    # Longest wait for the next piece of an upload's body; then 408 and the upstream request is cut.
    client_body_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class _TenantFile(_Section):
    name: Annotated[str, Field(pattern=_NAME)]
    workspace: Annotated[str, Field(pattern=_NAME)]
    api_key_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    api_key_file: Path | None = None
    client_key_sha256: Annotated[list[Annotated[str, Field(pattern=_SHA256_HEX)]], Field(min_length=1)]
    rate_limit_per_minute: Annotated[int, Field(ge=1)] | None = None
    rate_limit_burst: Annotated[int, Field(ge=1)] | None = None

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


class UsageConfig(_Section):
    # Usage counters are added up in process and written to the store this often (one round trip).
    flush_interval_s: Annotated[float, Field(gt=0)] = 2.0


class _ConfigFile(_Section):
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    usage: UsageConfig = UsageConfig()
    tenants: Annotated[list[_TenantFile], Field(min_length=1)]


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
    # Cache entries are scoped by the upstream key's hash, never by the key itself.
    cache_scope: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_scope", hashlib.sha256(self.api_key.encode()).hexdigest()[:32])


@dataclass(frozen=True, slots=True)
class Settings:
    tenants: tuple[Tenant, ...]
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    usage: UsageConfig = UsageConfig()


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
    return Settings(
        tenants=tenants,
        upstream=parsed.upstream,
        cache=parsed.cache,
        limits=parsed.limits,
        server=parsed.server,
        admin=parsed.admin,
        usage=parsed.usage,
    )


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        if where.endswith(".api_key"):
            return f"{where}: keys are never read from the config file; use api_key_env or api_key_file"
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
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
