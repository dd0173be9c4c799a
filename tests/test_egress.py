"""Egress proxies: a real CONNECT proxy (tinyproxy) between the proxy and the simulator over TLS,
chosen by `upstream.proxy_url` or by HTTPS_PROXY with `trust_env`, bypassed for NO_PROXY hosts;
its credentials never come from the config file and never appear in a log or in `check-config`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trustme
from pydantic import HttpUrl

from files_api_simulator import Simulator
from proxy.cli import main
from proxy.config import ConfigError, EgressProxy, UpstreamConfig, load_settings
from tests.constants import ALPHA, SDK_GA_HEADERS
from tests.support import Served, config_toml, served_proxy, team_environment, team_settings
from tests.upstream_support import ServedTLS, TinyProxy, write_ca

PROXY_USER, PROXY_PASSWORD = "egress", "s3cret-proxy-pass"


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path, credentials=(PROXY_USER, PROXY_PASSWORD)) as proxy:
        yield proxy


@pytest.fixture
def open_tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    """A proxy without authentication, as HTTPS_PROXY usually names."""
    folder = tmp_path / "open"
    folder.mkdir()
    with TinyProxy(folder) as proxy:
        yield proxy


def _proxy(upstream_url: str, ca_file: Path, **upstream: Any) -> Served:
    upstream = {"read_timeout_s": 5, "ca_file": str(ca_file), **upstream}
    return served_proxy(team_settings(upstream_url, upstream=upstream))


def _use(proxy_url: str, simulator: Simulator) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="far.bin", size_bytes=100_000)
    with anthropic.Anthropic(base_url=proxy_url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        uploaded = client.files.upload(file=("far.txt", b"through the tunnel", "text/plain"))
        assert uploaded.id in {f.id for f in client.files.list()}
        assert client.files.download(file_id).read() == b"".join(simulator.content_of(file_id))


def test_proxy_url_with_credentials_from_the_environment_tunnels_every_request(
    tls_upstream: ServedTLS,
    simulator: Simulator,
    ca: trustme.CA,
    tinyproxy: TinyProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("EGRESS_AUTH", f"{PROXY_USER}:{PROXY_PASSWORD}")
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    with (
        caplog.at_level(logging.DEBUG),
        _proxy(tls_upstream.url, ca_file, proxy_url=tinyproxy.url, proxy_auth_env="EGRESS_AUTH") as proxy,
    ):
        _use(proxy.url, simulator)

    assert tinyproxy.requests()
    assert set(tinyproxy.requests()) == {f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"}
    assert len(simulator.received) == 3
    assert PROXY_PASSWORD not in caplog.text


def test_credentials_from_a_file_work_and_wrong_ones_are_a_502_naming_no_secret(
    tls_upstream: ServedTLS,
    simulator: Simulator,
    ca: trustme.CA,
    tinyproxy: TinyProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(f"{PROXY_USER}:{PROXY_PASSWORD}\n")
    bad.write_text(f"{PROXY_USER}:wrong-{PROXY_PASSWORD}\n")
    with _proxy(tls_upstream.url, ca_file, proxy_url=tinyproxy.url, proxy_auth_file=str(good)) as proxy:
        _use(proxy.url, simulator)
    with (
        caplog.at_level(logging.DEBUG),
        _proxy(tls_upstream.url, ca_file, proxy_url=tinyproxy.url, proxy_auth_file=str(bad)) as proxy,
    ):
        response = httpx.get(f"{proxy.url}/v1/files", headers=SDK_GA_HEADERS)

    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "egress proxy refused the tunnel to the upstream: status 40" in caplog.text  # tinyproxy: 401
    assert PROXY_PASSWORD not in caplog.text


def test_https_proxy_is_used_with_trust_env_and_no_proxy_bypasses_it(
    tls_upstream: ServedTLS,
    simulator: Simulator,
    ca: trustme.CA,
    open_tinyproxy: TinyProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    monkeypatch.setenv("HTTPS_PROXY", open_tinyproxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)

    with _proxy(tls_upstream.url, ca_file) as proxy:  # trust_env is off by default
        _use(proxy.url, simulator)
    assert open_tinyproxy.requests() == []

    with _proxy(tls_upstream.url, ca_file, trust_env=True) as proxy:
        _use(proxy.url, simulator)
    tunnels = open_tinyproxy.requests()
    assert tunnels and set(tunnels) == {f"CONNECT 127.0.0.1:{tls_upstream.port} HTTP/1.1"}

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    with _proxy(tls_upstream.url, ca_file, trust_env=True) as proxy:
        _use(proxy.url, simulator)
    assert open_tinyproxy.requests() == tunnels
    assert len(simulator.received) == 9


BASE = HttpUrl("https://api.anthropic.com")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, None, id="nothing-set"),
        pytest.param({"HTTPS_PROXY": "http://p:3128"}, "http://p:3128", id="upper-case"),
        pytest.param({"https_proxy": "p:3128"}, "http://p:3128", id="lower-case-no-scheme"),
        pytest.param({"HTTP_PROXY": "http://p:3128"}, None, id="http-proxy-not-for-https"),
        pytest.param({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, None, id="no-proxy-star"),
        pytest.param(
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.com, .anthropic.com"},
            None,
            id="parent-domain",
        ),
        pytest.param({"HTTPS_PROXY": "http://p:3128", "no_proxy": "anthropic.com:443"}, None, id="with-port"),
        pytest.param(
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "anthropic.com:8443"},
            "http://p:3128",
            id="other-port",
        ),
        pytest.param(
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "notanthropic.com"},
            "http://p:3128",
            id="not-a-suffix",
        ),
    ],
)
def test_trust_env_reads_https_proxy_and_no_proxy(environ: dict[str, str], expected: str | None) -> None:
    egress = UpstreamConfig(base_url=BASE, trust_env=True).egress_proxy(environ)
    assert (egress.url if egress else None) == expected


def test_no_proxy_takes_address_blocks() -> None:
    config = UpstreamConfig(base_url=HttpUrl("https://10.1.2.3"), trust_env=True)
    assert config.egress_proxy({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}) is None
    assert config.egress_proxy({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "192.168.0.0/16"}) is not None


def test_credentials_in_https_proxy_are_used_and_masked() -> None:
    egress = UpstreamConfig(base_url=BASE, trust_env=True).egress_proxy(
        {"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@p:3128"}
    )
    assert egress == EgressProxy("http://p:3128", f"{PROXY_USER}:{PROXY_PASSWORD}")
    assert egress.shown == f"http://{PROXY_USER}:***@p:3128"
    assert PROXY_PASSWORD not in repr(egress)


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        pytest.param(
            f'proxy_url = "http://{PROXY_USER}:{PROXY_PASSWORD}@p:3128"',
            "credentials are never read from the config file",
            id="userinfo",
        ),
        pytest.param('proxy_url = "https://p:3128"', "expected http://host:port", id="https-proxy"),
        pytest.param('proxy_url = "http://p:3128/path"', "expected http://host:port", id="path"),
        pytest.param('proxy_auth_env = "X"', "need proxy_url or trust_env", id="auth-without-proxy"),
        pytest.param(
            'proxy_url = "http://p:1"\nproxy_auth_file = "relative"', "absolute path", id="relative-file"
        ),
        pytest.param(
            'proxy_url = "http://p:1"\nproxy_auth_env = "X"\nproxy_auth_file = "/x"', "at most one", id="both"
        ),
    ],
)
def test_proxy_settings_are_checked_without_echoing_a_secret(
    tmp_path: Path, upstream: str, message: str
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        config_toml("https://api.anthropic.com").replace("[upstream]\n", f"[upstream]\n{upstream}\n")
    )
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings(path, team_environment())
    assert PROXY_PASSWORD not in str(raised.value)


def test_missing_proxy_credentials_are_a_config_error_naming_the_variable_only() -> None:
    config = UpstreamConfig(proxy_url="http://p:1", proxy_auth_env="EGRESS_AUTH")
    with pytest.raises(ConfigError, match="environment variable EGRESS_AUTH must hold user:password"):
        config.egress_proxy({})
    with pytest.raises(ConfigError) as raised:
        config.egress_proxy({"EGRESS_AUTH": PROXY_PASSWORD})
    assert PROXY_PASSWORD not in str(raised.value)


def test_check_config_shows_the_proxy_with_its_password_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**team_environment(), "EGRESS_AUTH": f"{PROXY_USER}:{PROXY_PASSWORD}"}.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "proxy.toml"
    sections = 'proxy_url = "http://egress.internal:3128"\nproxy_auth_env = "EGRESS_AUTH"\n'
    path.write_text(
        config_toml("https://api.anthropic.com").replace("[upstream]\n", f"[upstream]\n{sections}")
    )

    assert main(["check-config", "--config", str(path)]) == 0

    printed = capsys.readouterr().out
    assert f"proxy:    http://{PROXY_USER}:***@egress.internal:3128" in printed
    assert PROXY_PASSWORD not in printed
