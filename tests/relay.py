"""A TCP relay a test controls: put it between the proxy and Redis to make a network partition (`cut`:
bytes vanish, nothing is refused, so clients wait for their timeouts) or a slow link (`delay_s`). The
relay is the soak's (`bench/relay.py`), run in a thread of the test's process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from bench.relay import RelayLoop


class Relay:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, in a thread with its own event loop."""

    def __init__(self, target_port: int) -> None:
        self._relay = RelayLoop(target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def delay_s(self) -> float:
        return self._relay.delay_s

    @delay_s.setter
    def delay_s(self, seconds: float) -> None:
        self._relay.delay_s = seconds

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay.accept, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self) -> None:
        """Partition: from now on every byte either way is dropped, on open and new connections alike."""
        self._on_loop(self._relay.cut)

    def restore(self) -> None:
        """Heal the partition; connections that lost bytes are closed, clients open new ones."""
        self._on_loop(self._relay.restore)

    def _on_loop(self, step: Callable[[], None]) -> None:
        """Run `step` on the relay's loop and return once it ran."""

        async def run() -> None:
            step()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
        self._relay.restore()
