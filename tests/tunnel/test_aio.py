"""Socket helpers of tunnel/aio.py that the relay tests do not reach on their own."""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import sys
from ipaddress import ip_address

import pytest
import uvloop

from tunnel.aio import BindError, SourceRoutes, client_socket, connect_socket, route_source
from tunnel.errors import ErrorCode

LOCALHOST = ip_address("127.0.0.1")
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def _nonblocking() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_connect_socket_connects_or_raises_what_the_kernel_said(loop: str) -> None:
    async def main() -> None:
        accepted: list[int] = []
        server = await asyncio.start_server(lambda r, w: accepted.append(1) or w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with _nonblocking() as sock:
            await asyncio.wait_for(connect_socket(sock, LOCALHOST, port), 10)
            assert sock.getpeername() == ("127.0.0.1", port)
        server.close()
        await server.wait_closed()
        with _nonblocking() as sock:  # nothing listens there any more
            with pytest.raises(OSError) as raised:
                await asyncio.wait_for(connect_socket(sock, LOCALHOST, port), 10)
        assert raised.value.errno == errno.ECONNREFUSED and raised.value.strerror == "Connection refused"

    LOOPS[loop](main())


THREADS = r"""
import asyncio, os, socket, sys, uvloop
from ipaddress import ip_address
from tunnel.aio import BindError, SourceRoutes, client_socket, connect_socket, route_source
from tunnel.errors import ErrorCode

async def main():
    listening = socket.create_server(("127.0.0.1", 0))  # not by name: that may start them too
    before = len(os.listdir("/proc/self/task"))
    server = await asyncio.start_server(lambda r, w: w.close(), sock=listening)
    port = listening.getsockname()[1]
    for _ in range(3):
        with socket.socket() as sock:
            sock.setblocking(False)
            if sys.argv[1] == "ours":
                await connect_socket(sock, ip_address("127.0.0.1"), port)
            else:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    print(len(os.listdir("/proc/self/task")) - before)

uvloop.run(main())
"""


def test_connect_socket_on_uvloop_needs_no_resolver_thread() -> None:
    """uvloop's own ``sock_connect`` starts its resolver's threads for a
    numeric address (the reason for ``connect_socket``); ours starts none."""
    def new_threads(way: str) -> int:
        done = subprocess.run([sys.executable, "-c", THREADS, way], capture_output=True, text=True, timeout=60, check=True)
        return int(done.stdout)

    assert new_threads("uvloop") > 0  # the cost, seen: else this test proves nothing
    assert new_threads("ours") == 0


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_connect_that_times_out_leaves_no_watcher_on_its_descriptor(loop: str) -> None:
    """A target that answers no SYN (a listener whose accept queue is full):
    the connect is cancelled at its time-out, and its socket closed. The
    next socket, likely on the same descriptor, connects and carries bytes:
    nothing of the first is left in the loop."""
    async def main() -> None:
        silent = socket.create_server(("127.0.0.1", 0), backlog=0)
        filler = socket.create_connection(silent.getsockname(), timeout=10)
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(3):
                sock = _nonblocking()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(connect_socket(sock, LOCALHOST, silent.getsockname()[1]), 0.2)
                sock.close()
                sock = _nonblocking()
                await asyncio.wait_for(connect_socket(sock, LOCALHOST, port), 10)
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                writer.close()
        finally:
            server.close()
            filler.close()
            silent.close()

    LOOPS[loop](main())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_a_client_socket_takes_its_port_at_the_connect(address: str) -> None:
    """Bound to the address the server named, but its port chosen by the
    connect, for the 4-tuple (IP_BIND_ADDRESS_NO_PORT): a bind to port 0
    alone would take a port at once, from those no socket holds, a search
    that costs milliseconds once thousands are in TIME_WAIT."""
    local = ip_address(address)

    async def main() -> None:
        family = socket.AF_INET6 if local.version == 6 else socket.AF_INET
        listening = socket.create_server((address, 0), family=family)
        server = await asyncio.start_server(lambda r, w: w.close(), sock=listening)
        with client_socket(local) as sock:
            assert sock.getsockname()[:2] == (address, 0)  # bound, no port yet
            await asyncio.wait_for(connect_socket(sock, local, listening.getsockname()[1]), 10)
            assert sock.getsockname()[0] == address and sock.getsockname()[1] != 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        server.close()

    uvloop.run(main())


def test_a_client_socket_on_an_address_the_host_lacks_is_refused_with_its_code() -> None:
    with pytest.raises(BindError) as raised:
        client_socket(ip_address("192.0.2.123"))
    assert raised.value.code is ErrorCode.NO_SUCH_ADDRESS


def test_source_routes_bind_only_where_the_routes_give_another_address() -> None:
    routes = SourceRoutes()
    assert route_source(LOCALHOST) == LOCALHOST
    assert not routes.must_bind(LOCALHOST, LOCALHOST)  # the routes give 127.0.0.1 anyway
    assert routes.must_bind(ip_address("127.0.0.2"), LOCALHOST)  # they give 127.0.0.1, not .2
    assert route_source(ip_address("::1")) == ip_address("::1")
