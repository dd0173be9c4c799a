"""The framework's ceiling: a bare Starlette app answering the Files routes with fixed bytes.

It returns the very metadata and list-page bytes the simulator returned for the bench's files, and
runs on the server `files-proxy serve` uses (`proxy.server.run_servers`: one uvicorn worker on uvloop,
the bounded httptools protocol, no access log, no server header, a TCP_NODELAY listener), so the
proxy's hit path is compared with doing nothing but the framework and the server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import ServerConfig
from proxy.server import bind_listener, run_on_server_loop, run_servers


def create_app(metadata: bytes, listing: bytes) -> Starlette:
    async def file_metadata(request: Request) -> Response:
        return Response(metadata, media_type="application/json")

    async def file_list(request: Request) -> Response:
        return Response(listing, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/v1/files", file_list),
            Route("/v1/files/{file_id}", file_metadata),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bodies", type=Path, required=True, help='JSON: {"metadata": str, "list": str}')
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text())
    app = create_app(bodies["metadata"].encode(), bodies["list"].encode())
    # The proxy's own server and settings, so the difference measured is the proxy's code.
    listener = bind_listener("127.0.0.1", args.port)
    run_on_server_loop(run_servers([(app, listener)], "warning", ServerConfig()))


if __name__ == "__main__":
    main()
