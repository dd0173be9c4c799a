"""TLS as production has it: the simulator over HTTPS with a CA made for the test, trusted through
`upstream.ca_file` or through `SSL_CERT_FILE`; a certificate that does not verify is a 502 and a log
line naming the host."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trustme

from files_api_simulator import Simulator
from proxy.config import ConfigError, UpstreamConfig
from proxy.upstream import UpstreamClient
from tests.constants import ALPHA, SDK_GA_HEADERS
from tests.support import Served, served_proxy, team_settings
from tests.upstream_support import ServedTLS, write_ca


def _proxy(upstream_url: str, **upstream: Any) -> Served:
    return served_proxy(team_settings(upstream_url, upstream={"read_timeout_s": 5, **upstream}))


def _round_trip(proxy_url: str, simulator: Simulator) -> None:
    """Upload, list, metadata and download through the proxy with the SDK."""
    file_id = simulator.add_file(ALPHA.upstream_key, filename="made.bin", size_bytes=300_000)
    with anthropic.Anthropic(base_url=proxy_url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        uploaded = client.files.upload(file=("tls.txt", b"over tls", "text/plain"))
        assert {uploaded.id, file_id} <= {f.id for f in client.files.list()}
        assert client.files.retrieve_metadata(file_id).filename == "made.bin"
        assert client.files.download(file_id).read() == b"".join(simulator.content_of(file_id))


def test_a_private_ca_in_ca_file_is_trusted(
    tls_upstream: ServedTLS, simulator: Simulator, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = write_ca(ca, tmp_path / "private-ca.pem")
    with _proxy(tls_upstream.url, ca_file=str(ca_file)) as proxy:
        _round_trip(proxy.url, simulator)


def test_ssl_cert_file_is_honoured_by_the_default_context(
    tls_upstream: ServedTLS,
    simulator: Simulator,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenSSL reads SSL_CERT_FILE when the context loads its default paths, which is when the
    proxy's one context is built: at start, after the variable is set here."""
    monkeypatch.setenv("SSL_CERT_FILE", str(write_ca(ca, tmp_path / "bundle.pem")))
    with _proxy(tls_upstream.url) as proxy:
        _round_trip(proxy.url, simulator)


def test_a_certificate_that_does_not_verify_is_502_and_logged_with_its_host(
    tls_upstream: ServedTLS, simulator: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    with (
        caplog.at_level(logging.ERROR, logger="proxy.upstream"),
        _proxy(tls_upstream.url, ca_file=str(other_ca)) as proxy,
    ):
        response = httpx.get(f"{proxy.url}/v1/files", headers=SDK_GA_HEADERS)

    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "127.0.0.1" not in response.text
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.upstream"]
    assert "certificate failed verification for host 127.0.0.1" in line
    assert ALPHA.upstream_key not in line
    assert simulator.received == []


def test_without_the_ca_the_system_store_refuses_the_test_certificate(
    tls_upstream: ServedTLS, simulator: Simulator
) -> None:
    with _proxy(tls_upstream.url) as proxy:
        response = httpx.get(f"{proxy.url}/v1/files", headers=SDK_GA_HEADERS)
    assert response.status_code == 502
    assert simulator.received == []


def test_an_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        with pytest.raises(ConfigError, match="upstream.ca_file"):
            UpstreamClient(UpstreamConfig(ca_file=str(path)))
