"""httpx's transport on a connection pool that never promises one idle connection to two requests,
and reads response bodies in larger pieces.

httpcore's pool assigns a queued request the first idle connection, but the connection stays idle
until that request starts on it, a scheduling step later; meanwhile the next request is assigned the
same connection. One of the two then finds it busy, is queued again, and can lose the same race over
and over (encode/httpcore#822). Under 8 concurrent misses some requests looped for 0.4 to 1 s
before reaching upstream. Here a connection assigned to a request that has not started on it yet is
not available to another one, so the second request takes another idle connection or opens one.
"""

from __future__ import annotations

import httpcore
import httpx

# httpcore reads 64 KiB at a time; a download then costs a trip through h11, httpcore and httpx per
# 64 KiB. Four times that halves the proxy's user CPU per byte (a 500 MB download: 0.41 s to 0.20 s).
_READ_BYTES = 256 * 1024


class _PromisableConnection(httpcore.AsyncHTTPConnection):
    promised = False

    def is_available(self) -> bool:
        return not self.promised and super().is_available()

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response = await super().handle_async_request(request)
        # The HTTP/1.1 connection exists now (it is made by the first request); its body reads follow.
        if isinstance(self._connection, httpcore.AsyncHTTP11Connection):
            self._connection.READ_NUM_BYTES = _READ_BYTES
        return response


class _FairConnectionPool(httpcore.AsyncConnectionPool):
    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        # httpcore's own construction for a pool without a proxy (the upstream client has none).
        return _PromisableConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=self._http1,
            http2=self._http2,
            retries=self._retries,
            local_address=self._local_address,
            uds=self._uds,
            network_backend=self._network_backend,
            socket_options=self._socket_options,
        )

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        assigned = {id(request.connection) for request in self._requests if request.connection is not None}
        for connection in self._connections:
            if isinstance(connection, _PromisableConnection):
                connection.promised = id(connection) in assigned
        return super()._assign_requests_to_connections()


def fair_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An `httpx.AsyncHTTPTransport` with these limits whose pool is the fair one above."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = _FairConnectionPool(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )
    return transport
