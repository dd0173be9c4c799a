"""The one place that talks to Anthropic: one shared httpx transport, header filtering both ways, and
the translation of httpx failures into proxy errors (httpx's own `map_httpcore_exceptions` idea).

Requests and responses stream: the proxy passes bodies through in chunks and never retries, so a
POST reaches the upstream at most once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamTimeoutError, UpstreamUnavailableError
from proxy.upstream_pool import fair_transport

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy's own server or by httpx; never copied across.
_BODY_FRAMING = frozenset({"content-length", "content-encoding"})
_NOT_FORWARDED_RESPONSE = frozenset({"date", "server"})


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers (RFC 9110 section 7.6.1), including every header named in Connection."""
    pairs = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower() for name, value in pairs if name == "connection" for token in value.split(",")
    }
    return [(name, value) for name, value in pairs if name not in HOP_BY_HOP and name not in named]


@contextlib.contextmanager
def _body_errors_translated() -> Iterator[None]:
    """httpx failures while a response body is read, as the proxy's own errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeoutError("The Anthropic API stopped sending the response body.") from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailableError("The Anthropic API connection broke during the response.") from exc


class UpstreamReply:
    """An upstream response whose body has not been read yet. Always `aclose()` it."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        # latin-1 both ways keeps every byte: httpx's own decoding may guess UTF-8, which the
        # latin-1 encoding on the way out cannot always give back.
        raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]
        self.headers = [
            (name, value) for name, value in end_to_end(raw) if name not in _NOT_FORWARDED_RESPONSE
        ]

    @property
    def request_id(self) -> str | None:
        request_id: str | None = self._response.headers.get("request-id")
        return request_id

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded, so Content-Length and Content-Encoding stay true."""
        with _body_errors_translated():
            async for chunk in self._response.aiter_raw():
                yield chunk

    async def read(self, limit: int) -> bytes:
        """The whole decoded body of a small JSON answer; larger than `limit` is an upstream fault."""
        body = bytearray()
        with _body_errors_translated():
            async for chunk in self._response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise UpstreamUnavailableError("The Anthropic API sent an unexpectedly large answer.")
        return bytes(body)

    @property
    def decoded_headers(self) -> list[tuple[str, str]]:
        """The headers that still hold once the body was read decoded and is sent whole."""
        return [(name, value) for name, value in self.headers if name not in _BODY_FRAMING]

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamClient:
    """Sends Files requests to the configured base URL over one pooled connection set.

    Requests go straight to an httpx transport, not through an `httpx.AsyncClient`: the client's
    layers (auth, redirects, default headers, a cookie jar) are all things a proxy must not do, and
    cost about a tenth of a miss. Without a jar, no cookie one tenant's answer sets can ride along on
    another tenant's request.
    """

    def __init__(self, config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport or fair_transport(
            httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive_connections,
            )
        )
        timeout = httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.write_timeout_s,
            pool=config.pool_timeout_s,
        )
        self._extensions = {"timeout": timeout.as_dict()}
        self._origin = config.origin

    async def send(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None = None,
    ) -> UpstreamReply:
        """Send once and return as soon as the response headers arrive."""
        # With a body, the client's Content-Length is kept so the upstream gets a plain body, not a
        # chunked one; httpx then sends exactly that many bytes or fails.
        not_forwarded = {"host"} if body is not None else {"host", "content-length"}
        request = httpx.Request(
            method,
            httpx.URL(self._origin + path, query=query),
            # As bytes: httpx encodes str values as ASCII, and a client's header may carry any byte
            # HTTP allows (obs-text); the server decoded it as latin-1, so this gives back its bytes.
            headers=[
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in headers
                if name not in not_forwarded
            ],
            content=body,
            extensions=self._extensions,
        )
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError("The Anthropic API did not answer in time.") from exc
        except httpx.HTTPError as exc:
            logger.warning("upstream unreachable: %s", type(exc).__name__)
            raise UpstreamUnavailableError("The Anthropic API could not be reached.") from exc
        return UpstreamReply(response)

    async def aclose(self) -> None:
        await self._transport.aclose()
