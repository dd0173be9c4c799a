"""httpx's transport on httpcore's connection pool with two of its bugs fixed, and larger body reads.

httpcore 1.0 assigns requests to connections in `_assign_requests_to_connections`; this pool
replaces that one method (httpcore is pinned below 1.1 for it):

- An idle connection assigned to a request stays idle until the request starts on it, a scheduling
  step later; meanwhile httpcore gives the same connection to the next request. One of the two then
  finds it busy, is queued again, and can lose the same race over and over (encode/httpcore#822).
  Under 8 concurrent misses some requests looped for 0.4 to 1 s before reaching upstream. Here a
  connection promised to a request is given to no other.
- Surplus keep-alive connections are counted among the idle ones. httpcore compares the number of
  *all* connections with `max_keepalive_connections`, so once more requests than that are in flight,
  every connection that goes idle is closed and the next request opens a new one.
"""

from __future__ import annotations

import httpcore
import httpx

# httpcore reads 64 KiB at a time; a download then costs a trip through h11, httpcore and httpx per
# 64 KiB. Four times that halves the proxy's user CPU per byte (a 500 MB download: 0.41 s to 0.20 s).
_READ_BYTES = 256 * 1024


class _LargeReadConnection(httpcore.AsyncHTTPConnection):
    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response = await super().handle_async_request(request)
        # The HTTP/1.1 connection exists now (it is made by the first request); its body reads follow.
        if isinstance(self._connection, httpcore.AsyncHTTP11Connection):
            self._connection.READ_NUM_BYTES = _READ_BYTES
        return response


class _FairConnectionPool(httpcore.AsyncConnectionPool):
    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        # httpcore's own construction for a pool without a proxy (the upstream client has none).
        return _LargeReadConnection(
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
        """Drop closed, expired and surplus idle connections, then give each queued request an
        available connection nobody was promised, a new one, or one made room for."""
        promised = {id(request.connection) for request in self._requests if request.connection is not None}
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle = 0
        for connection in self._connections:
            if connection.is_closed():
                continue
            if connection.has_expired():
                closing.append(connection)
                continue
            if connection.is_idle() and id(connection) not in promised:
                idle += 1
                if idle > self._max_keepalive_connections:
                    closing.append(connection)
                    continue
            kept.append(connection)
        self._connections = kept

        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            free = [c for c in kept if id(c) not in promised]
            chosen = next((c for c in free if c.can_handle_request(origin) and c.is_available()), None)
            if chosen is None:
                if len(kept) >= self._max_connections:
                    spare = next((c for c in free if c.is_idle()), None)
                    if spare is None:
                        continue  # stays queued until a connection is released
                    kept.remove(spare)
                    closing.append(spare)
                chosen = self.create_connection(origin)
                kept.append(chosen)
            pool_request.assign_to_connection(chosen)
            promised.add(id(chosen))
        return closing


def fair_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An `httpx.AsyncHTTPTransport` with these limits whose pool is the fixed one above."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = _FairConnectionPool(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )
    return transport
