"""`python -m bench.tls`: the simulator over HTTPS, as production reaches api.anthropic.com.

`files-proxy simulate` has no TLS option, so this process makes a CA for the run with `trustme`,
writes it to `--ca-file` (which the proxy trusts through `upstream.ca_file`) and a certificate for
127.0.0.1 beside it, then serves one simulator on two listeners: its API over TLS (what the
proxy and wrk measure) and the same state over plain HTTP for the bench's control calls (seeding
files, dropping the request log), so those reuse the plain simulator's client code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import trustme
import uvicorn
from starlette.types import ASGIApp

from files_api_simulator import create_app
from proxy.server import bind_listener, run_on_server_loop


class _Server(uvicorn.Server):
    """Signals are handled once for both listeners (in `_serve`), so one SIGTERM stops both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="the HTTPS listener (the API)")
    parser.add_argument("--control-port", type=int, required=True, help="the plain-HTTP listener")
    parser.add_argument(
        "--ca-file", type=Path, required=True, help="where the CA's PEM goes (the certificate beside it)"
    )
    args = parser.parse_args(argv)
    cert_file, key_file = _write_certificates(args.ca_file)
    run_on_server_loop(_serve(args.port, args.control_port, cert_file, key_file))


def _write_certificates(ca_file: Path) -> tuple[Path, Path]:
    """The CA's PEM, then the server's chain and key beside it. The bench reads the CA only once the
    control listener answers, so never half written."""
    folder = ca_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = folder / "server-chain.pem", folder / "server-key.pem"
    for index, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(cert_file), append=index > 0)
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


async def _serve(port: int, control_port: int, cert_file: Path, key_file: Path) -> None:
    """One simulator, so files added over the control listener are served over TLS. The listeners
    come from `bind_listener`, as `files-proxy simulate`'s does (TCP_NODELAY on accepted sockets)."""
    app = create_app()
    servers = [
        (_Server(_config(app, cert_file, key_file)), bind_listener("127.0.0.1", port)),
        (_Server(_config(app, None, None)), bind_listener("127.0.0.1", control_port)),
    ]

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    await asyncio.gather(*(server.serve(sockets=[listener]) for server, listener in servers))


def _config(app: ASGIApp, cert_file: Path | None, key_file: Path | None) -> uvicorn.Config:
    """As `files-proxy simulate` serves: no access log, no WebSockets, no `server` header."""
    return uvicorn.Config(
        app,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        log_config=None,
        log_level="warning",
        access_log=False,
        ws="none",
        server_header=False,
    )


if __name__ == "__main__":
    main()
