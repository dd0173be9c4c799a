"""A TCP relay a test controls: put it between the proxy and Redis to make a network partition (`cut`:
bytes vanish, nothing is refused, so clients wait for their timeouts) or a slow link (`delay_s`)."""

from __future__ import annotations

import asyncio
import threading


class Relay:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, in a thread with its own event loop."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self.port = 0
        # Added before each piece the server sends back: a slow Redis, or a slow link to it.
        self.delay_s = 0.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
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
        self._cut = True

    def restore(self) -> None:
        """Heal the partition. Connections that lost bytes are closed (their protocol state is gone);
        clients open new ones."""
        asyncio.run_coroutine_threadsafe(self._heal(), self._loop).result(5)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_writer.close()
            self._writers.discard(client_writer)
            return
        self._writers.add(server_writer)
        await asyncio.gather(
            self._pipe(client_reader, server_writer, delayed=False),
            self._pipe(server_reader, client_writer, delayed=True),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self._cut:
                    continue
                if delayed and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def _heal(self) -> None:
        # One step of the relay's loop: no connection opened during the cut outlives it.
        self._cut = False
        await self._close_all()

    async def _shut(self) -> None:
        await self._close_all()
        if self._server is not None:
            self._server.close()
