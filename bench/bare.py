"""The framework's ceiling: a bare Starlette app answering the Files routes with fixed bytes; and
the server's floor: the same answers from a plain ASGI callable, with no framework at all.

Both return the very metadata and list-page bytes the simulator returned for the bench's files, and
run on the server `files-proxy serve` uses (`proxy.server.run_servers`: one uvicorn worker on uvloop,
the bounded httptools protocol, no access log, no server header, a TCP_NODELAY listener), so the
proxy's hit path is compared with doing nothing but the framework and the server, and what the
framework and the proxy each add to a request is read over what the server alone costs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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


def create_server_alone(metadata: bytes, listing: bytes) -> ASGIApp:
    """The same answers as `create_app`, chosen by path with no framework: the server's own cost."""
    bodies = {"/healthz": b'{"status":"ok"}', "/v1/files": listing}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = bodies.get(scope["path"], metadata)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bodies", type=Path, required=True, help='JSON: {"metadata": str, "list": str}')
    parser.add_argument("--no-framework", action="store_true", help="the server alone, without Starlette")
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text())
    make = create_server_alone if args.no_framework else create_app
    app = make(bodies["metadata"].encode(), bodies["list"].encode())
    # The proxy's own server and settings, so the difference measured is the proxy's code.
    listener = bind_listener("127.0.0.1", args.port)
    run_on_server_loop(run_servers([(app, listener)], "warning", ServerConfig()))


if __name__ == "__main__":
    main()
