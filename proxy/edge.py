"""The edge: where every request enters and its answer leaves.

It makes the request's `Exchange`, picks its endpoint (a control route, or else the Files handler),
renders every error in Anthropic's envelope (the one place errors become answers), adds `request-id`,
and `Cache-Status` and `Age` from the exchange's typed cache outcome, counts the bytes really
received and sent (streamed bodies included), charges the loop time of the request's steps to its
team (`fairness.py`), and hands the finished exchange to the sinks: the access log, metrics and usage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Router
from starlette.types import Message, Receive, Scope, Send

from proxy.errors import ProxyError, error_response, new_request_id
from proxy.exchange import Exchange
from proxy.fairness import timed

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
FilesEndpoint = Callable[[Exchange, Request], Awaitable[Response]]
Sink = Callable[[Exchange], None]
# A client-chosen header value, bounded so a huge one cannot bloat every log line.
_MAX_CLIENT_VALUE = 200


@dataclass(frozen=True, slots=True)
class ControlRoute:
    """A path of the proxy's own (health, metrics, admin, usage page) and its endpoint per method.
    `recorded`: whether its requests get an access line (not the probes and scrapes)."""

    path: str
    methods: Mapping[str, Endpoint]
    recorded: bool = True


class Edge:
    def __init__(
        self,
        files: FilesEndpoint,
        control: Sequence[ControlRoute],
        lifespan: Router,
        sinks: Sequence[Sink],
        *,
        on_start: Callable[[], None],
        on_end: Callable[[], None],
        charge: Callable[[str, float], None],
    ) -> None:
        self._files = files
        self._control = {route.path: route for route in control}
        self._lifespan = lifespan
        self._sinks = sinks
        self._on_start = on_start
        self._on_end = on_end
        self._charge = charge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan.lifespan(scope, receive, send)
            return
        route = self._control.get(scope["path"])
        endpoint = None if route is None else route.methods.get(scope["method"])
        if route is not None and endpoint is not None and not route.recorded:
            await (await endpoint(Request(scope, receive)))(scope, receive, send)
            return
        await self._exchange(scope, receive, send, endpoint)

    async def _exchange(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint | None) -> None:
        headers = dict(scope["headers"])
        exchange = Exchange(
            new_request_id(),
            scope["method"],
            started_at=time.time(),
            started=time.perf_counter(),
            client_request_id=_client_value(headers.get(b"x-request-id")),
            user_agent=_client_value(headers.get(b"user-agent")),
        )

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.bytes_in += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self._tagged(exchange, message)}
            elif message["type"] == "http.response.body":
                exchange.bytes_out += len(message.get("body", b""))
            await send(message)

        def charged(seconds: float) -> None:
            if exchange.tenant is not None:
                self._charge(exchange.tenant.name, seconds)

        self._on_start()
        try:
            request = Request(scope, counting_receive)
            try:
                answering = self._files(exchange, request) if endpoint is None else endpoint(request)
                response = await timed(answering, charged)
            except Exception as exc:
                response = _rendered(exc, exchange)
            await timed(response(scope, counting_receive, tagging_send), charged)
        finally:
            self._on_end()
            exchange.duration_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
            for sink in self._sinks:
                sink(exchange)

    @staticmethod
    def _tagged(exchange: Exchange, start: Message) -> list[tuple[bytes, bytes]]:
        """The answer's headers with `request-id` (ours, unless the answer has one), and what the cache
        outcome says; the status and the answer's own request id noted in the exchange."""
        exchange.status = start["status"]
        headers = list(start.get("headers", []))
        for name, value in headers:
            if name == b"request-id":
                exchange.upstream_request_id = value.decode("latin-1")
        if exchange.upstream_request_id is None:
            headers.append((b"request-id", exchange.request_id.encode()))
        elif exchange.upstream_request_id == exchange.request_id:
            exchange.upstream_request_id = None
        outcome = exchange.cache
        if outcome is not None:
            headers.append((b"cache-status", outcome.cache_status().encode()))
            if outcome.age is not None:
                headers.append((b"age", str(outcome.age).encode()))
        return headers


def _rendered(exc: Exception, exchange: Exchange) -> Response:
    """An error as the client gets it: in Anthropic's envelope, never a traceback."""
    if isinstance(exc, ProxyError):
        response = error_response(exc.status_code, exc.error_type, exc.message, exchange.request_id)
        response.headers.update(exc.headers)
        return response
    if isinstance(exc, ClientDisconnect):
        # The client left mid-request; the upstream request was already abandoned with it.
        logger.info("client disconnected during the request")
        return Response(status_code=499)
    logger.exception("unexpected error while answering %s", exchange.method)
    return error_response(500, "api_error", "Internal error in files-proxy.", exchange.request_id)


def _client_value(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("latin-1")[:_MAX_CLIENT_VALUE]
