"""A TCP relay the soak puts between the proxies and Redis, to cut the link and heal it on command.

    python -m bench.relay --port P --target-port T --control-port C

It runs in a process of its own (started by `bench/services.py`), so the soak client's busy event loop
never delays a proxy's Redis traffic. The control port takes one line, `cut`, `restore` or `ping`, and
answers `ok` once it is done. A cut is a partition, not a refusal: bytes either way vanish, on open and
new connections alike, so the proxies wait for their timeouts as they would behind a broken network.
`tests/relay.py` runs the same `RelayLoop` in a thread of a test's own process.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Sequence

COMMANDS = ("cut", "restore", "ping")


class RelayLoop:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` on the running event loop."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        # Added before each piece the target sends back: a slow Redis, or a slow link to it.
        self.delay_s = 0.0

    def cut(self) -> None:
        """From now on every byte either way is dropped."""
        self._cut = True

    def restore(self) -> None:
        """Heal: the connections that lost bytes are closed (their protocol state is gone), so the
        clients open new ones; all in one step of the loop, so none opened during the cut survives."""
        self._cut = False
        for writer in list(self._writers):
            writer.close()

    async def accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
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

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One command per line, answered `ok` after it took effect (or `unknown`)."""
        try:
            while line := await reader.readline():
                command = line.decode("ascii", "replace").strip()
                if command == "cut":
                    self.cut()
                elif command == "restore":
                    self.restore()
                writer.write(b"ok\n" if command in COMMANDS else b"unknown\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def send(control_port: int, command: str) -> None:
    """Tell the relay process to `cut` or `restore` (or `ping`), and wait until it has."""
    if command not in COMMANDS:
        raise ValueError(f"unknown relay command {command!r}")
    with socket.create_connection(("127.0.0.1", control_port), timeout=5) as conn:
        conn.sendall(command.encode() + b"\n")
        answer = conn.makefile("rb").readline()
    if answer != b"ok\n":
        raise RuntimeError(f"relay answered {answer!r} to {command}")


def answers(control_port: int) -> bool:
    try:
        send(control_port, "ping")
    except (OSError, RuntimeError):
        return False
    return True


async def _serve(port: int, target_port: int, control_port: int) -> None:
    relay = RelayLoop(target_port)
    forward = await asyncio.start_server(relay.accept, "127.0.0.1", port)
    control = await asyncio.start_server(relay.control, "127.0.0.1", control_port)
    async with forward, control:
        await asyncio.gather(forward.serve_forever(), control.serve_forever())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="where clients connect")
    parser.add_argument("--target-port", type=int, required=True, help="where bytes go (Redis)")
    parser.add_argument("--control-port", type=int, required=True, help="takes cut / restore / ping")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.target_port, args.control_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
