"""What every TCP gateway shares: listening on G:g, one task per connection,
a bug in one connection never taking the gateway down, and a bounded close.

A subclass implements ``_serve(reader, writer)`` for one accepted connection
(leg A from the firewall-side endpoint F:f) and sets ``read_limit``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter

from firewall.signalling import Endpoint
from gateways.layer import EventLog, GatewayLayer

# How long a closing leg may take to flush what is buffered for it before it
# is dropped; a peer that stopped reading must not keep a slot forever.
CLOSE_FLUSH_TIMEOUT = 5.0

_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: what a TCP peer sees when a connection is refused or aborted."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class TcpGateway(abc.ABC):
    """An asyncio server on G:g in front of a ``GatewayLayer``."""

    read_limit = 65536  # the StreamReader buffer of each accepted connection

    def __init__(self, layer: GatewayLayer, *, listen: Endpoint, log: EventLog) -> None:
        self.layer = layer
        self.listen = listen
        self.log = log
        self.counters: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on G:g. OSError if the address is not here."""
        self._server = await asyncio.start_server(
            self._on_connection,
            str(self.listen.address),
            self.listen.port,
            limit=self.read_limit,
            backlog=socket.SOMAXCONN,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.listen = Endpoint(self.listen.address, port)

    async def close(self, grace: float) -> None:
        """Stop accepting; let live connections finish for up to ``grace`` seconds, then reset them."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_FLUSH_TIMEOUT)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except Exception as exc:  # a bug in one connection must not take the gateway down
            self.counters["errors.internal"] += 1
            self.log.emit("error", logging.ERROR, error=repr(exc))
            reset(writer)
        finally:
            self._tasks.discard(task)

    @abc.abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one accepted connection: each gateway kind its own protocol."""
