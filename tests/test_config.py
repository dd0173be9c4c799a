"""Config loading: a valid file resolves into frozen settings; every problem is one ConfigError line."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel

from proxy.config import (
    CacheConfig,
    ConfigError,
    LimitsConfig,
    Settings,
    Tenant,
    UpstreamConfig,
    UsageConfig,
    hash_key,
    load_settings,
    sections_needing_restart,
)
from tests.constants import ALPHA

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

KEY_ALPHA = "sk-ant-test-alpha-5f1c"
KEY_BRAVO = "sk-ant-test-bravo-90ad"
HASH_ALPHA = hash_key("fp-test-alpha")
HASH_BRAVO = hash_key("fp-test-bravo")
HASH_BRAVO_NEXT = hash_key("fp-test-bravo-next")
ENVIRON = {"KEY_ALPHA": KEY_ALPHA, "KEY_BLANK": "   "}

FULL_CONFIG = f"""
[upstream]
base_url = "https://upstream.example.test/"
connect_timeout_s = 1.5
read_timeout_s = 30.0
write_timeout_s = 31.0
pool_timeout_s = 2.0
max_connections = 7
max_keepalive_connections = 3

[cache]
url = "redis://cache.example.test:6379/2"
metadata_ttl_s = 600
list_ttl_s = 3
stale_if_error_s = 60
negative_ttl_s = 2

[limits]
max_upload_bytes = 1000
client_body_timeout_s = 2.5

[[tenants]]
name = "alpha"
workspace = "alpha-prod"
api_key_env = "KEY_ALPHA"
client_key_sha256 = ["{HASH_ALPHA.upper()}"]

[[tenants]]
name = "bravo"
workspace = "bravo-prod"
api_key_file = "secrets/bravo.key"
client_key_sha256 = ["{HASH_BRAVO}", "{HASH_BRAVO_NEXT.upper()}"]
"""


def tenant(
    name: str = "alpha",
    *,
    key: str = 'api_key_env = "KEY_ALPHA"',
    hashes: str = f'["{HASH_ALPHA}"]',
    extra: str = "",
) -> str:
    """One [[tenants]] block; `key` is the line (or lines) that say where the Anthropic key comes from."""
    return f'[[tenants]]\nname = "{name}"\nworkspace = "{name}-prod"\n{key}\nclient_key_sha256 = {hashes}\n{extra}\n'


def write_config(folder: Path, content: str | bytes) -> Path:
    """The config at `folder/proxy.toml`, with the secret files the error table refers to beside it."""
    secrets = folder / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "bravo.key").write_text(KEY_BRAVO + "\n", encoding="utf-8")
    (secrets / "empty.key").write_text(" \n", encoding="utf-8")
    (secrets / "binary.key").write_bytes(b"\xff\xfe\x00sk-ant")
    path = folder / "proxy.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_full_config_loads_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    path = write_config(folder, FULL_CONFIG)
    # The secret path is relative to the config's folder, not to the working directory.
    monkeypatch.chdir(tmp_path)

    settings = load_settings(path, environ=ENVIRON)

    assert settings.upstream.origin == "https://upstream.example.test"
    assert settings.upstream.connect_timeout_s == 1.5
    assert settings.upstream.read_timeout_s == 30.0
    assert settings.upstream.write_timeout_s == 31.0
    assert settings.upstream.pool_timeout_s == 2.0
    assert settings.upstream.max_connections == 7
    assert settings.upstream.max_keepalive_connections == 3
    assert settings.cache.url == "redis://cache.example.test:6379/2"
    assert settings.cache.metadata_ttl_s == 600
    assert settings.cache.list_ttl_s == 3
    assert settings.cache.stale_if_error_s == 60
    assert settings.cache.negative_ttl_s == 2
    assert settings.limits.max_upload_bytes == 1000
    assert settings.limits.client_body_timeout_s == 2.5
    assert settings.tenants == (
        Tenant(
            name="alpha",
            workspace="alpha-prod",
            client_key_hashes=frozenset({HASH_ALPHA}),
            api_key=KEY_ALPHA,
        ),
        Tenant(
            name="bravo",
            workspace="bravo-prod",
            client_key_hashes=frozenset({HASH_BRAVO, HASH_BRAVO_NEXT}),
            api_key=KEY_BRAVO,
        ),
    )


def test_relative_config_path_resolves_secret_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "conf", FULL_CONFIG)
    monkeypatch.chdir(tmp_path)

    settings = load_settings(Path("conf/proxy.toml"), environ=ENVIRON)

    assert settings.tenants[1].api_key == KEY_BRAVO


def test_absolute_api_key_file(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "alpha.key"
    secret.parent.mkdir()
    secret.write_text(f"  {KEY_ALPHA}\n\n", encoding="utf-8")
    path = write_config(tmp_path / "conf", tenant(key=f'api_key_file = "{secret}"'))

    settings = load_settings(path, environ={})

    assert settings.tenants[0].api_key == KEY_ALPHA


def test_omitted_sections_take_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, tenant())

    settings = load_settings(path, environ=ENVIRON)

    assert settings.upstream == UpstreamConfig()
    assert settings.cache == CacheConfig()
    assert settings.limits == LimitsConfig()
    assert settings.upstream.origin == "https://api.anthropic.com"
    assert settings.cache.url == "memory://"
    assert settings.cache.list_ttl_s == 10
    assert settings.limits.max_upload_bytes == 500_000_000


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tenant()), environ=ENVIRON)

    with pytest.raises(AttributeError):
        settings.tenants[0].api_key = "sk-ant-other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        settings.cache.list_ttl_s = 99  # type: ignore[misc]


def test_example_config_loads_as_shipped_with_what_it_names(tmp_path: Path) -> None:
    """The example, copied as it is, with the variable and the key file its comments name."""
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "anthropic-key-research").write_text(KEY_BRAVO + "\n", encoding="utf-8")

    settings = load_settings(path, environ={"ANTHROPIC_KEY_SEARCH": KEY_ALPHA})

    assert [(t.name, t.workspace, t.api_key) for t in settings.tenants] == [
        ("search", "search-prod", KEY_ALPHA),
        ("research", "research", KEY_BRAVO),
    ]
    assert all(len(t.client_key_hashes) == 1 for t in settings.tenants)


def test_example_config_without_its_secrets_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")

    with pytest.raises(ConfigError, match="ANTHROPIC_KEY_SEARCH is not set"):
        load_settings(path, environ={})
    with pytest.raises(ConfigError, match="secrets/anthropic-key-research"):
        load_settings(path, environ={"ANTHROPIC_KEY_SEARCH": KEY_ALPHA})


@pytest.mark.parametrize(
    ("section", "model"),
    [
        pytest.param("upstream", UpstreamConfig, id="upstream"),
        pytest.param("cache", CacheConfig, id="cache"),
        pytest.param("limits", LimitsConfig, id="limits"),
    ],
)
def test_example_lists_every_key_with_its_default(section: str, model: type[BaseModel]) -> None:
    # The example's header promises "Every key is listed here with its default".
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))[section]

    assert sorted(raw) == sorted(model.model_fields)
    assert model.model_validate(raw) == model()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            'colour = "blue"\n' + tenant(),
            ["proxy.toml: colour: unknown key"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            '[cache]\nurl = "memory://"\nlist_ttl = 5\n' + tenant(),
            ["cache.list_ttl: unknown key"],
            id="unknown-cache-key",
        ),
        pytest.param(
            '[upstream]\nbase_url = "https://api.anthropic.com"\ntimeout = 5\n' + tenant(),
            ["upstream.timeout: unknown key"],
            id="unknown-upstream-key",
        ),
        pytest.param(
            "[limits]\nmax_upload = 5\n" + tenant(),
            ["limits.max_upload: unknown key"],
            id="unknown-limits-key",
        ),
        pytest.param(
            tenant(extra='colour = "blue"'),
            ["tenants[0].colour: unknown key"],
            id="unknown-tenant-key",
        ),
        pytest.param(
            tenant() + tenant("bravo", hashes=f'["{HASH_BRAVO}"]', extra="colour = 1"),
            ["tenants[1].colour: unknown key"],
            id="unknown-key-in-second-tenant",
        ),
        pytest.param(
            tenant(extra='api_key = "sk-ant-written-in-the-file"'),
            ["tenants[0].api_key", "keys are never read from the config file"],
            id="api-key-in-tenant",
        ),
        pytest.param(
            "[cache]\nlist_ttl_s = -1\n" + tenant(),
            ["cache.list_ttl_s", "-1"],
            id="negative-list-ttl",
        ),
        pytest.param(
            '[cache]\nmetadata_ttl_s = "a day"\n' + tenant(),
            ["cache.metadata_ttl_s", "'a day'"],
            id="ttl-not-a-number",
        ),
        pytest.param(
            "[upstream]\nconnect_timeout_s = 0\n" + tenant(),
            ["upstream.connect_timeout_s"],
            id="zero-connect-timeout",
        ),
        pytest.param(
            '[upstream]\nbase_url = "not a url"\n' + tenant(),
            ["upstream.base_url", "'not a url'"],
            id="base-url-not-a-url",
        ),
        pytest.param(
            '[upstream]\nbase_url = "ftp://files.example.test"\n' + tenant(),
            ["upstream.base_url"],
            id="base-url-not-http",
        ),
        pytest.param(
            "[limits]\nmax_upload_bytes = 0\n" + tenant(),
            ["limits.max_upload_bytes"],
            id="zero-upload-limit",
        ),
        pytest.param(
            "[limits]\nclient_body_timeout_s = 0\n" + tenant(),
            ["limits.client_body_timeout_s"],
            id="zero-client-body-timeout",
        ),
        pytest.param(
            tenant(hashes=f'["{HASH_ALPHA[:-1]}"]'),
            ["tenants[0].client_key_sha256[0]"],
            id="hash-63-hex",
        ),
        pytest.param(
            tenant(hashes=f'["{HASH_ALPHA}", "{HASH_ALPHA[:-1]}g"]'),
            ["tenants[0].client_key_sha256[1]"],
            id="hash-not-hex",
        ),
        pytest.param(
            tenant(hashes="[]"),
            ["tenants[0].client_key_sha256"],
            id="no-hashes",
        ),
        pytest.param(
            tenant(hashes=f'"{HASH_ALPHA}"'),
            ["tenants[0].client_key_sha256"],
            id="hashes-not-a-list",
        ),
        pytest.param(
            tenant("has space"),
            ["tenants[0].name", "'has space'"],
            id="bad-tenant-name",
        ),
        pytest.param(
            '[[tenants]]\nname = "alpha"\napi_key_env = "KEY_ALPHA"\nclient_key_sha256 = []\n',
            ["tenants[0].workspace", "required key is missing"],
            id="tenant-without-workspace",
        ),
        pytest.param(
            '[cache]\nurl = "memory://"\n',
            ["tenants: required key is missing"],
            id="missing-tenants",
        ),
        pytest.param(
            "tenants = []\n",
            ["tenants"],
            id="empty-tenants",
        ),
        pytest.param(
            tenant(key='api_key_env = "KEY_ALPHA"\napi_key_file = "secrets/bravo.key"'),
            ["'alpha'", "api_key_env", "api_key_file"],
            id="both-key-sources",
        ),
        pytest.param(
            tenant(key=""),
            ["'alpha'", "api_key_env", "api_key_file"],
            id="neither-key-source",
        ),
        pytest.param(
            tenant(key='api_key_env = "KEY_NOT_SET_ANYWHERE"'),
            ["'alpha'", "KEY_NOT_SET_ANYWHERE", "files-proxy demo"],
            id="env-variable-missing",
        ),
        pytest.param(
            tenant(key='api_key_env = "KEY_BLANK"'),
            ["'alpha'", "KEY_BLANK", "files-proxy demo"],
            id="env-variable-blank",
        ),
        pytest.param(
            tenant(key='api_key_file = "secrets/empty.key"'),
            ["'alpha'", "api_key_file", "empty.key", "empty"],
            id="key-file-empty",
        ),
        pytest.param(
            tenant(key='api_key_file = "secrets/missing.key"'),
            ["'alpha'", "api_key_file", "missing.key"],
            id="key-file-missing",
        ),
        pytest.param(
            tenant(key='api_key_file = "secrets"'),
            ["'alpha'", "api_key_file", "secrets"],
            id="key-file-is-a-directory",
        ),
        pytest.param(
            tenant(key='api_key_file = "secrets/binary.key"'),
            ["'alpha'", "api_key_file", "binary.key"],
            id="key-file-not-utf8",
        ),
        pytest.param(
            tenant() + tenant(hashes=f'["{HASH_BRAVO}"]'),
            ["'alpha'", "name used twice"],
            id="duplicate-tenant-name",
        ),
        pytest.param(
            tenant() + tenant("bravo", hashes=f'["{HASH_ALPHA.upper()}"]'),
            ["'bravo'", "'alpha'", "client_key_sha256", HASH_ALPHA[:12]],
            id="hash-in-two-tenants",
        ),
        pytest.param(
            tenant() + "[cache\n",
            ["not valid TOML"],
            id="invalid-toml",
        ),
        pytest.param(
            tenant() + "[cache]\nurl = 'memory://'\n[cache]\nlist_ttl_s = 1\n",
            ["not valid TOML"],
            id="toml-table-twice",
        ),
        pytest.param(
            b'[cache]\nurl = "memory://\xff"\n',
            ["proxy.toml"],
            id="config-not-utf8",
        ),
    ],
)
def test_invalid_config_is_one_line_naming_the_problem(
    tmp_path: Path, content: str | bytes, expected: list[str]
) -> None:
    path = write_config(tmp_path, content)

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=ENVIRON)

    message = str(caught.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message
    assert KEY_ALPHA not in message
    assert KEY_BRAVO not in message


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("absent.toml", id="missing-file"),
        pytest.param("", id="directory"),
    ],
)
def test_unreadable_config_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=ENVIRON)

    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "cannot read" in message


def test_tenant_repr_hides_the_api_key(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, FULL_CONFIG), environ=ENVIRON)

    for shown in (repr(settings), str(settings), *map(repr, settings.tenants)):
        assert KEY_ALPHA not in shown
        assert KEY_BRAVO not in shown
    assert "alpha" in repr(settings.tenants[0])


def test_cache_scope_is_derived_from_the_key_without_revealing_it() -> None:
    def make(api_key: str) -> Tenant:
        return Tenant(name="t", workspace="w", client_key_hashes=frozenset({HASH_ALPHA}), api_key=api_key)

    alpha, alpha_again, bravo = make(KEY_ALPHA), make(KEY_ALPHA), make(KEY_BRAVO)

    assert alpha.cache_scope == alpha_again.cache_scope
    assert alpha.cache_scope != bravo.cache_scope
    for scoped in (alpha, bravo):
        assert scoped.api_key not in scoped.cache_scope
        assert scoped.cache_scope not in scoped.api_key


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_hashes_are_matched_whatever_their_case(tmp_path: Path) -> None:
    """Digests are compared with `hexdigest()`, which is lower case: an upper-case hash still admits."""
    admin_hash = hashlib.sha256(b"fp-admin").hexdigest()
    text = f'[admin]\nkey_sha256 = "{admin_hash.upper()}"\n\n' + tenant()
    settings = load_settings(write_config(tmp_path, text), environ=ENVIRON)

    assert settings.admin.key_sha256 == admin_hash


def test_a_reload_applies_limits_admin_ui_and_ownership_and_names_every_other_changed_section() -> None:
    """The sections are listed once (`Settings`); whether a reload applies each comes from there too."""
    running = Settings(tenants=(ALPHA.tenant(),))
    changed = replace(
        running,
        cache=CacheConfig(list_ttl_s=5),
        usage=UsageConfig(retention_days=30),
        limits=LimitsConfig(max_upload_bytes=10),
    )
    assert sections_needing_restart(running, changed) == ["cache", "usage"]
    assert sections_needing_restart(running, running) == []
