"""The HTTP front end: uvicorn, with the bounds a shared service needs before any key is checked.

uvicorn's httptools protocol has no bound on a request's header section, in size or in time: one
client could stream a 96 MB header or keep a connection alive with a byte every few seconds. Here
the protocol gets what hardened front ends have (nginx's `large_client_header_buffers` and
`client_header_timeout`, hyper's `max_buf_size` and `header_read_timeout`), through the parser's own
callbacks:

- a header section larger than `server.max_header_bytes` gets 431, and no more of it is read;
- a request target longer than any Files route's can be gets 414 before it is parsed;
- a header section not complete within `server.header_timeout_s` of its first byte (of the
  connection's opening, for a new connection) is closed;
- an idle keep-alive connection is closed after `server.keep_alive_s` (uvicorn's own timer);
- past `server.max_connections` connections, a new one gets 503 and is closed at once;
- a connection costs little until its first byte: uvicorn's protocol is made only then (`_Unused`).

And an answer's head and body leave in one send (`OneSendPerTurn`), not the two uvicorn makes.

Each answer is in Anthropic's envelope. WebSockets are off: an upgrade request is an ordinary
request, so it meets authentication like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from functools import partial
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.config import ConfigError, ServerConfig
from proxy.errors import new_request_id

logger = logging.getLogger(__name__)

# File descriptors kept free beside client connections: upstream and store pools, config, logs.
_RESERVED_FDS = 256
# The longest request target worth parsing: a Files path and a query string of 8 KiB (the most the
# handler takes), with room to spare. Parsing a 48 KB one took the loop 0.4 ms; nginx answers a
# request line larger than its buffers with 414 in the same way.
MAX_TARGET_BYTES = 16 * 1024
_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class ListenError(Exception):
    """The address cannot be listened on (in use, not this host's, a privileged port); one line."""


class OneSendPerTurn(asyncio.Transport):
    """A client connection's transport whose writes within one turn of the event loop leave in one
    send. uvicorn writes a response's head and its body apart, and uvloop sends each at once: two
    system calls, and on loopback two TCP segments, for every small answer (nginx sends an answer's
    head with its body for the same reason: `postpone_output`)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self._send)
        self._held.append(bytes(data))

    def _send(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.writelines(held)

    def close(self) -> None:
        self._send()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()


class _Unused(asyncio.Protocol):
    """A connection before its first byte: counted for the cap, closed if it stays silent for the
    header timeout, and nothing else. uvicorn's protocol (its parser and state) is made when the
    first byte comes, as nginx gives a connection its request buffers only then: connections opened
    and never used (pools, balancers that connect ahead, or thousands from one client) cost the loop
    little, which the requests being served would otherwise wait for."""

    def __init__(
        self, serving: Callable[[float], asyncio.Protocol], connections: set[Any], bounds: ServerConfig
    ) -> None:
        self._serving = serving  # the protocol that takes over, given when its first head is due
        self._connections = connections
        self._bounds = bounds
        self._transport: asyncio.Transport | None = None
        self._silence: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._transport = transport
        self._connections.add(self)  # counted for the cap, and closed at shutdown, from now
        if len(self._connections) > self._bounds.max_connections:
            _refuse(transport, 503, "overloaded_error", "The proxy is serving its maximum of connections.")
            return
        self._silence = asyncio.get_running_loop().call_later(self._bounds.header_timeout_s, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._silence is None or self._transport.is_closing():
            return
        self._silence.cancel()
        self._connections.discard(self)
        protocol = self._serving(self._silence.when())  # its first head is due when silence would end
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silence is not None:
            self._silence.cancel()
        self._connections.discard(self)

    def shutdown(self) -> None:
        """What uvicorn asks of every connection it counts when it shuts down."""
        if self._transport is not None:
            self._transport.close()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the header section bounded in bytes and in time."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        bounds: ServerConfig,
        first_head_due: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._bounds = bounds
        self._first_head_due = first_head_due  # loop time: the header timeout counts from the opening
        self._bounded_transport: asyncio.Transport | None = None
        # Bytes of the current header section still allowed; None while a request's body is read.
        self._head_room: int | None = bounds.max_header_bytes
        self._target_bytes = 0  # of the current request's target, as the parser hands it over
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Our own answers (431, 414, 408) go through the same transport as uvicorn's, so they leave
        # after an answer it still holds, never before it.
        self._bounded_transport = OneSendPerTurn(transport)
        super().connection_made(self._bounded_transport)
        self._head_timer = asyncio.get_running_loop().call_at(self._first_head_due, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser no more of a header section than the bound allows."""
        while data and self._head_room is not None:
            if self._head_timer is None:
                self._start_head_timer()  # the first byte of a request on a kept-alive connection
            piece, data = data[: self._head_room], data[self._head_room :]
            self._head_room -= len(piece)
            super().data_received(piece)
            if self._closing():
                return
            if self._head_room == 0:
                limit = self._bounds.max_header_bytes
                self._refuse(431, "invalid_request_error", f"Request headers are larger than {limit} bytes.")
                return
        if data:
            super().data_received(data)

    def on_url(self, url: bytes) -> None:
        self._target_bytes += len(url)
        super().on_url(url)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._head_room = None
        target_bytes, self._target_bytes = self._target_bytes, 0
        if target_bytes > MAX_TARGET_BYTES:
            message = f"Request target longer than {MAX_TARGET_BYTES} bytes."
            self._refuse(414, "invalid_request_error", message)
        if self._closing():
            return  # refused: the rest of what the parser has is never a request
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._closing():
            return
        super().on_message_complete()
        self._head_room = self._bounds.max_header_bytes  # what follows is the next request's head

    def _start_head_timer(self) -> None:
        self._head_timer = asyncio.get_running_loop().call_later(
            self._bounds.header_timeout_s, self._head_timed_out
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_room == self._bounds.max_header_bytes:  # not a byte of a request: just close
            if self._bounded_transport is not None:
                self._bounded_transport.close()
            return
        timeout = self._bounds.header_timeout_s
        self._refuse(408, "timeout_error", f"Request headers not received within {timeout:g} seconds.")

    def _closing(self) -> bool:
        return self._bounded_transport is None or self._bounded_transport.is_closing()

    def _refuse(self, status: int, error_type: str, message: str) -> None:
        self._stop_head_timer()
        self._head_room = None
        if not self._closing():
            assert self._bounded_transport is not None
            _refuse(self._bounded_transport, status, error_type, message)


def _refuse(transport: asyncio.Transport, status: int, error_type: str, message: str) -> None:
    """Answer in Anthropic's envelope before any request reached the app, and close."""
    request_id = new_request_id()
    body = json.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nrequest-id: {request_id}\r\nconnection: close\r\n\r\n"
    )
    transport.write(head.encode() + body)
    transport.close()


def _connection(
    config: uvicorn.Config,
    server_state: ServerState,
    app_state: dict[str, Any],
    _loop: asyncio.AbstractEventLoop | None = None,
    *,
    bounds: ServerConfig,
) -> _Unused:
    """What uvicorn makes for each accepted connection (its `http` protocol factory)."""

    def serving(first_head_due: float) -> BoundedHttpToolsProtocol:
        return BoundedHttpToolsProtocol(
            config, server_state, app_state, _loop, bounds=bounds, first_head_due=first_head_due
        )

    return _Unused(serving, server_state.connections, bounds)


def allowed_connections(wanted: int) -> int:
    """Raise the open-files soft limit to the hard limit; the connections that then fit beside the
    proxy's own files (a warning, and fewer, when `wanted` does not)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY or wanted + _RESERVED_FDS <= soft:
        return wanted
    fitting = soft - _RESERVED_FDS
    if fitting < 1:
        raise ConfigError(f"the open-files limit is {soft}: too low to serve (ulimit -n)")
    logger.warning(
        "server.max_connections is %d but the open-files limit is %d: serving at most %d connections",
        wanted,
        soft,
        fitting,
    )
    return fitting


class _UpgradeWarningFilter(logging.Filter):
    """WebSockets are off on purpose, so an upgrade request is answered as an ordinary request; uvicorn
    would log two warnings for each (one advising to install a WebSocket library), which any client
    could use to fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Unsupported upgrade request", "No supported WebSocket"))


_UPGRADE_WARNINGS = _UpgradeWarningFilter()


def server_config(app: Any, log_level: str, bounds: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for `app`: the bounded protocol, no WebSockets, our access log instead of
    uvicorn's, no `server` header."""
    logging.getLogger("uvicorn.error").addFilter(_UPGRADE_WARNINGS)  # once: a logger keeps a filter once
    return uvicorn.Config(
        app,
        http=partial(_connection, bounds=bounds),  # type: ignore[arg-type]
        ws="none",
        log_config=None,
        # uvicorn's info lines (startup, "Uvicorn running on") come from a logger named `uvicorn.error`
        # and read as errors; the CLI says where it listens itself, so they show at debug only.
        log_level="warning" if log_level == "info" else log_level,
        server_header=False,
        # The client address is the TCP peer's: no X-Forwarded-For is trusted (nor its middleware run).
        proxy_headers=False,
        access_log=False,
        timeout_keep_alive=bounds.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=bounds.shutdown_grace_s,
    )


class _Server(uvicorn.Server):
    """Leaves signals to `run_servers`, so several servers in one process stop on one Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_on_server_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on the event loop `uvicorn.run` would pick: uvloop when it is installed (it is, with
    uvicorn[standard]). Plain `asyncio.run` would quietly serve on the slower stdlib loop."""
    loop_factory = uvicorn.Config(app=run_servers, log_config=None).get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def run_servers(
    apps: Sequence[tuple[Any, socket.socket]],
    log_level: str,
    bounds: ServerConfig,
    *,
    on_hangup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM: stop accepting, let requests in flight finish for up to
    `bounds.shutdown_grace_s`, then return. SIGHUP runs `on_hangup` (a config reload) and keeps serving."""
    # Our access log replaces uvicorn's; neither it nor httpx writes a line per request to stderr.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bounds = bounds.model_copy(update={"max_connections": allowed_connections(bounds.max_connections)})

    servers = [(_Server(server_config(app, log_level, bounds)), listener) for app, listener in apps]

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True

    reloads: set[asyncio.Task[None]] = set()

    async def reload(hangup: Callable[[], Awaitable[None]]) -> None:
        try:
            await hangup()
        except ConfigError as exc:
            logger.error("config reload rejected, the running config stays: %s", exc)

    def hang_up() -> None:
        if on_hangup is not None:
            task = asyncio.create_task(reload(on_hangup))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, hang_up)
    # What exists now (modules, config, apps) lives as long as the process, so the collector need not
    # walk it again: a full collection of it stalled the loop, and every request, for 50-100 ms.
    gc.freeze()
    await asyncio.gather(*(server.serve(sockets=[listener]) for server, listener in servers))


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 works and the real address can be printed first.

    TCP_NODELAY is set here because accepted connections inherit it: on a socket handed to the
    server, nothing else sets it, and Nagle's algorithm with delayed ACKs then holds every
    response on a kept-alive connection for ~40 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def listener_url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
