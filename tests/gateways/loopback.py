"""Loopback stand-ins for the blind track, for gateway tests that need no netns.

On loopback nothing rewrites packets, so a test plays the kernel's part at
both ends of the gateway: the "client" is a socket bound to the
firewall-side endpoint F:f (what the processor would have rewritten the
client's packets to), and the "server" listens on that same F:f, because
leg B connects to F:f and the processor would have restored it to S:s.
Both sockets set SO_REUSEPORT, which lets a connected socket and a listener
(or two UDP sockets, one connected) share F:f: the kernel still delivers by
the full 4-tuple first, so the gateway's replies on leg A reach the client
and leg B's packets reach the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from firewall.signalling import Endpoint

GATEWAY = ipaddress.IPv4Address("127.0.0.2")  # gateway_link.gateway_address
ROUTER = ipaddress.IPv4Address("127.0.0.3")  # gateway_link.router_address
POOL = ipaddress.IPv4Network("127.0.1.0/24")  # processor.pools.firewall_side

T = TypeVar("T")

_fw_hosts = itertools.cycle(range(1, 255))


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0, event_loop: str = "asyncio") -> T:
    """Run a test coroutine with a hard bound, so no test can hang the suite; on
    ``event_loop`` as ``python -m gateways`` runs a kind on it (``run_on``)."""
    from gateways.__main__ import run_on

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return run_on(event_loop, bounded())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` every few milliseconds, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def fw_address(index: int | None = None, *, pool: ipaddress.IPv4Network = POOL) -> ipaddress.IPv4Address:
    """An address in the firewall-side pool; ``index`` picks one, else the next in turn."""
    host = next(_fw_hosts) if index is None else index
    return pool.network_address + host


def fw_socket(kind: int, address: ipaddress.IPv4Address | None = None) -> tuple[socket.socket, Endpoint]:
    """A non-blocking socket bound to a fresh F:f (SO_REUSEPORT, so the "server" can share it)."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((str(address if address is not None else fw_address()), 0))
    sock.setblocking(False)
    host, port = sock.getsockname()
    return sock, Endpoint(ipaddress.IPv4Address(host), port)


async def tcp_connect_from(sock: socket.socket, to: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect the bound socket ``sock`` to ``to`` and wrap it in streams."""
    await asyncio.get_running_loop().sock_connect(sock, (str(to.address), to.port))
    return await asyncio.open_connection(sock=sock)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def tcp_server_at(at: Endpoint, handler: Handler) -> asyncio.AbstractServer:
    """The restored server: a listener on F:f, sharing the port with the client socket."""
    return await asyncio.start_server(handler, str(at.address), at.port, reuse_port=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back; what a well-behaved server does."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def set_reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make closing ``writer`` send RST, the way a crashing peer would."""
    import struct

    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class DatagramQueue(asyncio.DatagramProtocol):
    """A datagram endpoint whose datagrams (with their source) land in an asyncio.Queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))

    async def get(self, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), timeout)


class UdpEcho(asyncio.DatagramProtocol):
    """The restored UDP server on F:f: answers each datagram with ``<source port>|<data>``."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources.append(addr)
        assert self.transport is not None
        self.transport.sendto(f"{addr[1]}|".encode() + data, addr)


async def udp_client_at(sock: socket.socket, to: Endpoint) -> DatagramQueue:
    """The client side of a UDP flow: ``sock`` (bound to F:f) connected to G:g."""
    sock.connect((str(to.address), to.port))
    _, proto = await asyncio.get_running_loop().create_datagram_endpoint(DatagramQueue, sock=sock)
    return proto


async def udp_server_at(at: Endpoint) -> tuple[asyncio.DatagramTransport, UdpEcho]:
    """The restored UDP server, sharing F:f with the (connected) client socket."""
    return await asyncio.get_running_loop().create_datagram_endpoint(
        UdpEcho, local_addr=(str(at.address), at.port), reuse_port=True
    )
