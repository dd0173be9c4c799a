"""Test helpers for the upstream path as production takes it: the simulator over TLS with a CA made
for the test, and a real CONNECT proxy (tinyproxy) between the proxy and it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import trustme
from starlette.types import ASGIApp

from tests.support import Served, free_port


class ServedTLS(Served):
    """`Served` over TLS, with a certificate for 127.0.0.1 and localhost issued by `ca`."""

    def __init__(self, app: ASGIApp, ca: trustme.CA, folder: Path) -> None:
        super().__init__(app)
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert_file, key_file = folder / "server-chain.pem", folder / "server-key.pem"
        for index, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(str(cert_file), append=index > 0)
        cert.private_key_pem.write_to_path(str(key_file))
        # Read when the server loads its config, as it starts.
        self.server.config.ssl_certfile, self.server.config.ssl_keyfile = str(cert_file), str(key_file)
        self.url = f"https://127.0.0.1:{self.port}"


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as a PEM file, for `upstream.ca_file` or `SSL_CERT_FILE`."""
    ca.cert_pem.write_to_path(str(path))
    return path


class TinyProxy:
    """A real HTTP CONNECT proxy on a free port (Debian's tinyproxy), optionally with Basic auth; its
    log tells which tunnels were asked for."""

    def __init__(self, folder: Path, credentials: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = folder / "tinyproxy.log"
        self._config = folder / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self._log}"',
            "LogLevel Connect",
            "MaxClients 200",
            "Allow 127.0.0.1",
        ]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        self._config.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TinyProxy:
        binary = shutil.which("tinyproxy")
        if binary is None:
            raise RuntimeError("tinyproxy is not installed: run scripts/ensure-tinyproxy")
        self._process = subprocess.Popen(
            [binary, "-d", "-c", str(self._config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("tinyproxy did not start") from None
                time.sleep(0.02)

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def requests(self) -> list[str]:
        """The request lines tinyproxy received, e.g. `CONNECT 127.0.0.1:4430 HTTP/1.1`."""
        if not self._log.exists():
            return []
        marker = "): "
        return [
            line.split(marker, 1)[1]
            for line in self._log.read_text(errors="replace").splitlines()
            if "Request (file descriptor" in line
        ]
