"""The one place that talks to Anthropic: one shared aiohttp session, header filtering both ways, each
team's share of upstream connections, and the translation of aiohttp's failures into proxy errors
(httpx's `map_httpcore_exceptions` idea).

Requests and responses stream: the proxy passes bodies through in chunks and never retries, so a
POST reaches the upstream at most once (aiohttp itself resends only an idempotent request whose
kept-alive connection turned out closed, never a POST). aiohttp is used through its public API,
set up to do what a proxy must not leave to a client library: no default headers, no cookie jar, no
redirects, no decompression of a streamed body, and no environment read by aiohttp (`config.py`
resolves the egress proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import ConfigError, EgressProxy, Tenant, UpstreamConfig
from proxy.errors import InvalidRequestError, UpstreamTimeoutError, UpstreamUnavailableError
from proxy.fairness import FairShare, Load
from proxy.headers import Headers, from_upstream, whole_body
from proxy.reply import Reply

logger = logging.getLogger(__name__)

# Headers aiohttp would add on its own; a proxy forwards the client's or none.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# aiohttp's default 64 KiB buffer makes a download cost one trip through its reader per 64 KiB;
# 256 KiB quarters that, and bounds a connection's buffered body (twice this) all the same.
_READ_BUFSIZE = 256 * 1024


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The process's one TLS context: OpenSSL's default trust store, which honours SSL_CERT_FILE and
    SSL_CERT_DIR, plus `upstream.ca_file` for a private CA. Built once, so no connection loads a
    trust store again."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"upstream.ca_file: cannot load {ca_file} as PEM certificates") from exc
    return context


@contextlib.contextmanager
def _body_errors_translated() -> Iterator[None]:
    """aiohttp failures while a response body is read, as the proxy's own errors."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamTimeoutError("The Anthropic API stopped sending the response body.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailableError("The Anthropic API connection broke during the response.") from exc


class UpstreamReply:
    """An upstream response whose body has not been read yet. Always `aclose()` it."""

    def __init__(self, response: aiohttp.ClientResponse, release_share: Callable[[], None]) -> None:
        self._response = response
        self._release_share = release_share
        self.status_code = response.status
        # latin-1 both ways keeps every byte a header value may carry (obs-text included).
        self.headers = from_upstream(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in response.raw_headers
        )

    @property
    def request_id(self) -> str | None:
        return self._response.headers.get("request-id")

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded when sent with `stream=True`, so Content-Length and
        Content-Encoding stay true."""
        with _body_errors_translated():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def read_whole(self, limit: int) -> Reply:
        """The whole answer, its body decoded, then the connection handed back; a body larger than
        `limit` is an upstream fault (a small JSON answer was expected)."""
        body = bytearray()
        try:
            with _body_errors_translated():
                async for chunk in self._response.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamUnavailableError("The Anthropic API sent an unexpectedly large answer.")
        finally:
            await self.aclose()
        return Reply(self.status_code, tuple(whole_body(self.headers)), bytes(body))

    async def aclose(self) -> None:
        """Hand the connection back when the body was read whole, else close it; free the team's share."""
        self._response.release()
        self._release_share()


class _OutgoingBody:
    """The client's body as aiohttp sends it. aiohttp wraps whatever the body raises into its own
    connection error, so the client's failure (408, 413, a disconnect) is kept here to be raised as
    itself; and while aiohttp writes a chunk, `deadline` is due within the write timeout."""

    def __init__(self, chunks: AsyncIterator[bytes], write_timeout_s: float) -> None:
        self._chunks = chunks
        self._write_timeout_s = write_timeout_s
        self.error: Exception | None = None
        self.deadline: asyncio.Timeout | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.error = exc
                raise
            if self.deadline is not None:
                self.deadline.reschedule(loop.time() + self._write_timeout_s)
            yield chunk
            if self.deadline is not None:
                self.deadline.reschedule(None)


class _Share:
    """One team's upstream requests in flight: at most `window` at once (its `max_upstream_connections`,
    or fewer while `FairShare` holds it to its share of the CPU). Waiters are served in order, each
    handed its slot by the request that frees it or by a wider window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.window = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        """A slot at once, if one is free and nobody waits for one."""
        if self.in_flight < self.window and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot: the next one freed, in turn."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot it will not use
            elif waiter in self._waiters:  # a hand-over may have skipped it already
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._hand_over()

    def resize(self, window: int) -> None:
        self.window = window
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.in_flight < self.window:
            waiter = self._waiters.popleft()
            if not waiter.done():  # cancelled, its task not yet run: it takes no slot
                self.in_flight += 1
                waiter.set_result(None)


class UpstreamClient:
    """Sends Files requests to the configured base URL over one pooled connection set.

    Each team may hold at most its share of upstream requests at once, so a team that opens many
    downloads and never reads them leaves the other teams' requests room in the pool.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        # Each team's CPU is charged here by the edge; it narrows the team's share while the proxy is busy.
        self.fair_share = FairShare()
        self._tls = tls_context(config.ca_file)
        egress = config.egress_proxy()
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        if egress is not None:
            self._proxy, self._proxy_headers = _proxy_settings(egress)
        base = URL(config.origin)
        self._scheme, self._host, self._port = base.scheme, base.raw_host or "", base.explicit_port
        self._base_path = base.raw_path.rstrip("/")
        # `connect` bounds the wait for a pooled connection and the opening of a new one together.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.pool_timeout_s + config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        self._default_share = max(1, config.max_connections // 2)
        self._shares: dict[str, _Share] = {}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the session on the running loop (aiohttp binds it there)."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._config.max_connections, limit_per_host=0, ssl=self._tls
            ),
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
            auto_decompress=False,
            read_bufsize=_READ_BUFSIZE,
            requote_redirect_url=False,
            trust_env=False,
        )

    async def send(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None = None,
        *,
        tenant: Tenant,
        stream: bool = False,
    ) -> UpstreamReply:
        """Send once and return as soon as the response headers arrive. `stream`: the body goes to the
        client as it arrives, undecoded; otherwise it is read whole, decoded."""
        assert self._session is not None, "UpstreamClient.open() was not awaited"
        url = URL.build(
            scheme=self._scheme,
            host=self._host,
            port=self._port,
            path=self._base_path + path,
            query_string=_forwardable(query.decode("latin-1"), "The query string"),
            encoded=True,
        )
        outgoing = CIMultiDict((name, _forwardable(value, f"Header {name}")) for name, value in headers)
        sent = None if body is None else _OutgoingBody(body, self._config.write_timeout_s)
        release_share = await self._take_share(tenant)
        try:
            response = await self._request(method, url, outgoing, sent, stream)
        except BaseException:
            release_share()
            raise
        return UpstreamReply(response, release_share)

    async def _request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: _OutgoingBody | None,
        stream: bool,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        try:
            async with asyncio.timeout(None) as deadline:
                if body is not None:
                    body.deadline = deadline
                try:
                    return await self._session.request(
                        method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        auto_decompress=not stream,
                        proxy=self._proxy,
                        proxy_headers=self._proxy_headers,
                    )
                finally:
                    if body is not None:
                        body.deadline = None
        except TimeoutError as exc:
            if deadline.expired():
                raise UpstreamTimeoutError("The Anthropic API stopped reading the request body.") from exc
            raise UpstreamTimeoutError("The Anthropic API did not answer in time.") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            logger.error(
                "upstream TLS certificate failed verification for host %s: %s",
                exc.host,
                getattr(exc.certificate_error, "verify_message", type(exc.certificate_error).__name__),
            )
            raise UpstreamUnavailableError("The Anthropic API could not be reached.") from exc
        except aiohttp.ClientHttpProxyError as exc:
            logger.warning("egress proxy refused the tunnel to the upstream: status %s", exc.status)
            raise UpstreamUnavailableError("The Anthropic API could not be reached.") from exc
        except aiohttp.ClientError as exc:
            if body is not None and body.error is not None:
                raise body.error from None  # the client's own failure (408, 413, gone), not upstream's
            logger.warning("upstream unreachable: %s", type(exc).__name__)
            raise UpstreamUnavailableError("The Anthropic API could not be reached.") from exc

    async def _take_share(self, tenant: Tenant) -> Callable[[], None]:
        """Wait up to `pool_timeout_s` for one of the team's slots; returns its release (idempotent)."""
        limit = tenant.max_upstream_connections or self._default_share
        share = self._shares.get(tenant.name)
        if share is None or share.limit != limit:  # new, or its limit changed on reload
            share = self._shares[tenant.name] = _Share(limit)
            share.resize(self.fair_share.window(tenant.name, limit))
        if not share.try_take():
            try:
                async with asyncio.timeout(self._config.pool_timeout_s):
                    await share.take()
            except TimeoutError:
                raise UpstreamTimeoutError(
                    "This team's upstream connections are all busy; try again shortly."
                ) from None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                share.release()

        return release

    async def hold_to_fair_shares(self) -> None:
        """Until cancelled: each tick, give each team the window `FairShare` allows it."""

        def loads() -> dict[str, Load]:
            return {team: Load(share.in_flight, share.limit) for team, share in self._shares.items()}

        def applied() -> None:
            for team, share in self._shares.items():
                share.resize(self.fair_share.window(team, share.limit))

        await self.fair_share.run(loads, applied)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _forwardable(value: str, what: str) -> str:
    """A value as aiohttp must get it to send its bytes unchanged. The server decoded them as latin-1;
    aiohttp encodes as UTF-8, so they go as the UTF-8 text they are, and bytes that are not UTF-8
    cannot be sent as received: refused rather than changed."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            f"{what} carries bytes that are not UTF-8; it cannot be forwarded."
        ) from None


def _proxy_settings(egress: EgressProxy) -> tuple[URL, dict[str, str] | None]:
    if egress.credentials is None:
        return URL(egress.url), None
    user, _, password = egress.credentials.partition(":")
    return URL(egress.url), {"Proxy-Authorization": aiohttp.encode_basic_auth(user, password)}
