"""Responses: a cached or read-whole answer, and the one that streams an upstream body.

Starlette skips background tasks when the client disconnects, so the upstream response is closed
in a `finally` around the whole send instead: on completion, on disconnect, on upstream failure, and
when the client reads nothing for `limits.client_send_timeout_s` (the server's `send` waits while
the connection's write buffer is full, so a client that stops reading stops the stream there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from proxy.errors import UpstreamError
from proxy.reply import Reply
from proxy.upstream import UpstreamReply

logger = logging.getLogger(__name__)


def whole_response(reply: Reply) -> Response:
    """A whole answer, from upstream or the cache (the edge adds `Cache-Status` and `Age`)."""
    response = Response(reply.body, status_code=reply.status)
    response.raw_headers += _encoded(reply.headers)
    return response


def _encoded(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class _ClientStalledError(Exception):
    """The client took nothing of the body for the send timeout."""


class UpstreamStreamResponse(StreamingResponse):
    def __init__(self, reply: UpstreamReply, send_timeout_s: float) -> None:
        super().__init__(reply.iter_body(), status_code=reply.status_code)
        self.raw_headers = _encoded(reply.headers)
        self._reply = reply
        self._send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout_s = self._send_timeout_s

        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    await send(message)
            except TimeoutError:
                raise _ClientStalledError from None
            # Once the client is gone the server's send returns at once, and aiohttp hands out what it
            # has buffered without waiting: without this the loop would pull tens of MB more from
            # upstream before Starlette's disconnect listener gets a turn to stop it.
            await asyncio.sleep(0)

        try:
            await super().__call__(scope, receive, bounded_send)
        except _ClientStalledError:
            # Returning unfinished makes the server close the connection, as below.
            logger.info("client read nothing for %g s; download cut, upstream closed", timeout_s)
        except ClientDisconnect:
            logger.info("client disconnected during the response; upstream closed")
        except UpstreamError as exc:
            # Headers are already sent: returning unfinished makes the server drop the connection,
            # which is how a client learns that a streamed body was cut short.
            logger.warning("upstream failed mid-response: %s", exc.message)
        finally:
            await self._reply.aclose()
