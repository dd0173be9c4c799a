"""A miss's floor: a lean stand-in proxy doing only what every miss must, and nothing else.

Issue 13 sets the proxy's miss CPU against such a stand-in (0.55 ms where it measured 0.49-0.51 ms).
For `GET /v1/files/{file_id}` it checks the client's key against its SHA-256 in constant time,
looks the file up in Redis, fetches it upstream with aiohttp (the proxy's client), stores the answer
in Redis and writes one JSON log line; it runs on the proxy's own server and settings, like
`bench/bare.py`. So the miss rows can read the proxy's CPU as a ratio measured in the same run,
which stays true on a slower or faster machine where an absolute figure does not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import ServerConfig
from proxy.server import bind_listener, run_on_server_loop, run_servers

_FORWARDED = ("anthropic-version", "anthropic-beta")
_TTL_S = 300


def create_app(upstream_url: str, redis_url: str, key_sha256: str, upstream_key: str) -> Starlette:
    expected = bytes.fromhex(key_sha256)
    log = logging.getLogger("bench.lean")

    async def file_metadata(request: Request) -> Response:
        key = request.headers.get("x-api-key", "").encode()
        if not hmac.compare_digest(hashlib.sha256(key).digest(), expected):
            return Response(b'{"type":"error"}', status_code=401, media_type="application/json")
        store, session = request.state.redis, request.state.session
        started = time.time()
        cache_key = f"lean:{request.url.path}"
        await store.get(cache_key)
        headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
        async with session.get(
            upstream_url + request.url.path, headers={**headers, "x-api-key": upstream_key}
        ) as reply:
            body, status = await reply.read(), reply.status
        await store.set(cache_key, body, ex=_TTL_S)
        log.info(json.dumps({"ts": started, "path": request.url.path, "status": status}))
        return Response(body, status_code=status, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        store = redis.Redis.from_url(redis_url)
        session = aiohttp.ClientSession(auto_decompress=False)
        yield {"redis": store, "session": session}  # each request's `request.state`
        await session.close()
        await store.aclose()

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/v1/files/{file_id}", file_metadata)], lifespan=lifespan
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key-sha256", required=True, help="the client key's SHA-256, hex")
    parser.add_argument("--upstream-key-env", required=True, help="the variable holding the upstream key")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    app = create_app(args.upstream, args.redis, args.key_sha256, os.environ[args.upstream_key_env])
    listener = bind_listener("127.0.0.1", args.port)
    run_on_server_loop(run_servers([(app, listener)], "warning", ServerConfig()))


if __name__ == "__main__":
    main()
