"""Containment (issue 14 A): whatever one relayed connection does, the channel stays.

Public clients send a request and then reset (SO_LINGER 0) at every step of
a relay: before the tunnel side exists, right after the request, after the
first byte of the answer, and after the target's FIN. The target answers
each request with a block of bytes and half-closes, so the server's
EVENT_FIN (and its write_eof on the client's socket) meets a client that
has reset. The mediator's session must be the same one throughout, and a
normal fetch must still work afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.tunnel.loopback import WAIT, echo_server, free_port, loopback, until

ANSWER = os.urandom(200_000)
STEPS = ("at_once", "after_request", "after_first_byte", "after_fin")
ROUNDS = 25  # per step: enough to hit every interleaving the loop allows, in about a second

# Both loops: the tunnel runs on uvloop by default (tunnel/config.py), whose stream
# transports have their own close and shutdown paths (a relay that closed a transport
# with its write_eof's shutdown still pending crashed uvloop 0.23 with a double free:
# docs/benchmarks.md, eleventh pass); asyncio's is the other choice.
LOOPS = pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])


def run_on(loop_name: str, coro: Any) -> None:
    if loop_name == "uvloop":
        uvloop.run(asyncio.wait_for(coro, 60))
    else:
        asyncio.run(asyncio.wait_for(coro, 60))


async def answer_then_fin() -> tuple[asyncio.AbstractServer, int]:
    """A target that answers each request with ANSWER, then half-closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1 << 16)
            writer.write(ANSWER)
            writer.write_eof()
            await writer.drain()
            await reader.read()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def request_then_reset(port: int, step: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if step != "at_once":
            await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
        if step == "after_first_byte":
            await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT)
        elif step == "after_fin":
            while await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), WAIT):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def fetch(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = bytearray()
    while data := await asyncio.wait_for(reader.read(1 << 20), WAIT):
        got += data
    writer.close()
    return bytes(got)


@LOOPS
def test_clients_that_reset_at_every_step_never_end_the_channel(tmp_path: Path, loop_name: str) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator()
            session = await lb.session()
            _, target = await answer_then_fin()
            _, echo = await echo_server()
            public, checked = free_port(), free_port()
            for port, to in ((public, target), (checked, echo)):
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=port, address="127.0.0.1", port=to)
            for _ in range(ROUNDS):
                await asyncio.gather(*(request_then_reset(public, step) for step in STEPS))
            payload = os.urandom(100_000)
            assert hashlib.sha256(await fetch(checked, payload)).digest() == hashlib.sha256(payload).digest()
            assert lb.server.records["m1"].session is session and not session.closed
            assert lb.server.records["m1"].connects == 1
            # Every relay ended and gave its port back, on both ends (version 4:
            # released by the FINs or the RSTs alone, without CLOSE).
            await until(lambda: not session.core.ports, what="every relay's port to close")
            mediator = lb.mediators[0][0]
            assert session.core.version == 5
            await until(lambda: not mediator.session.core.ports, what="the mediator's ports to close")
            await until(lambda: not mediator.session.ports, what="the mediator's sockets to close")

    run_on(loop_name, main())


@LOOPS
def test_a_target_that_speaks_first_and_closes_reaches_the_client(tmp_path: Path, loop_name: str) -> None:
    """OPEN_CONNECT: the target's banner and FIN can come in the same read as
    the OPENED; the port already has its owner then, so nothing is dropped."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner\r\n")
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator()
            await lb.session()
            server = await asyncio.start_server(banner, "127.0.0.1", 0)
            public = free_port()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1",
                         port=server.sockets[0].getsockname()[1])
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", public)
                assert await asyncio.wait_for(reader.read(), WAIT) == b"220 banner\r\n"
                writer.close()

    run_on(loop_name, main())
