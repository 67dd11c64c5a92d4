"""The relay driver on loopback against hostile and well-behaved peers, spliced, copied and inspected.

Each test joins a client and a server through ``Relay`` on 127.0.0.1: the
client's connection is leg A, the server's is leg B. ``MODES``: ``splice``
(no inspector: copied until a read fills ``driver.SPLICE_AFTER``, then
os.splice through a pipe), ``copy`` (no pipe could be had) and ``inspect``
(an inspector that passes everything: recv, hook, send).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateways.relay import Limits, Relay, RelayCore, Side, Verdict
from gateways.relay import driver
from tests.gateways.loopback import run, wait_until

MB = 1 << 20
MODES = ["splice", "copy", "inspect"]
NAMES = {Side.A: "client", Side.B: "server"}


async def pair(near_buffers: tuple[int, int] = (0, 0), far_buffers: tuple[int, int] = (0, 0)
               ) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback, both non-blocking: (the connecting end, the accepted end).
    ``*_buffers``: (SO_RCVBUF, SO_SNDBUF) set before the handshake, 0 for the kernel's."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        _buffers(listener, far_buffers)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        near = socket.socket()
        _buffers(near, near_buffers)
        near.setblocking(False)
        await loop.sock_connect(near, listener.getsockname())
        far, _ = await loop.sock_accept(listener)
    far.setblocking(False)
    return near, far


def _buffers(sock: socket.socket, sizes: tuple[int, int]) -> None:
    for option, size in zip((socket.SO_RCVBUF, socket.SO_SNDBUF), sizes):
        if size:
            sock.setsockopt(socket.SOL_SOCKET, option, size)


@dataclass
class Rig:
    client: socket.socket
    server: socket.socket
    core: RelayCore
    relay: Relay
    task: asyncio.Task[Any]


@contextlib.asynccontextmanager
async def rig(mode: str, limits: Limits = Limits(), **core_kw: Any) -> AsyncIterator[Rig]:
    client, a = await pair()
    b, server = await pair()
    if mode == "inspect":
        core_kw.setdefault("inspectors", {side: (lambda chunk: Verdict.PASS) for side in Side})
    core = RelayCore(limits, asyncio.get_running_loop().time(), names=NAMES, **core_kw)
    relay = Relay(core, a, b, splice=mode == "splice")
    assert relay.spliced == {Side.A: mode == "splice", Side.B: mode == "splice"}
    task = asyncio.create_task(relay.run())
    try:
        yield Rig(client, server, core, relay, task)
    finally:
        await stop(task, client, server)


async def stop(task: asyncio.Task[Any], *socks: socket.socket) -> None:
    """Cancel a relay's task (its legs are reset and closed), then close the peers' sockets."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for sock in socks:
        sock.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, MB):
        out += chunk
    return bytes(out)


async def send_all(sock: socket.socket, data: bytes, *, eof: bool = True) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if eof:
        sock.shutdown(socket.SHUT_WR)


def set_reset_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def expect_reset(sock: socket.socket) -> None:
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(read_all(sock), 10)


# ---- data and half-close ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_5_mb_each_way_arrive_intact_with_exact_counts(mode: str) -> None:
    up, down = os.urandom(5 * MB), os.urandom(5 * MB + 1)

    async def main() -> None:
        async with rig(mode) as r:
            _, _, got_up, got_down = await asyncio.gather(
                send_all(r.client, up), send_all(r.server, down), read_all(r.server), read_all(r.client)
            )
            assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
            done = await asyncio.wait_for(r.task, 10)
            assert done.reason == "done"
            assert (r.core.received(Side.A), r.core.received(Side.B)) == (len(up), len(down))
            assert r.relay.piped == {Side.A: mode == "splice", Side.B: mode == "splice"}  # bulk took the pipes

    run(main())


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_spliced_direction_is_copied_until_bulk_then_spliced_in_order(event_loop: str) -> None:
    """A request and its answer go without a pipe; the first read that fills
    SPLICE_AFTER opens the pipe of its direction alone, and the bytes read
    before, at and after the switch arrive intact and in order."""
    bulk = os.urandom(3 * MB)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig("splice") as r:
            await send_all(r.client, b"GET /big", eof=False)
            assert await asyncio.wait_for(loop.sock_recv(r.server, 100), 10) == b"GET /big"
            await send_all(r.server, b"200 OK, here it comes\n", eof=False)
            assert await asyncio.wait_for(loop.sock_recv(r.client, 100), 10) == b"200 OK, here it comes\n"
            assert r.relay.piped == {Side.A: False, Side.B: False}  # no pipe for a few bytes
            _, got = await asyncio.gather(send_all(r.server, bulk), read_all(r.client))
            assert hashlib.sha256(got).digest() == hashlib.sha256(bulk).digest()
            assert r.relay.piped == {Side.A: False, Side.B: True}
            r.client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(read_all(r.server), 10) == b""
            assert (await asyncio.wait_for(r.task, 10)).reason == "done"
            assert r.core.received(Side.B) == len(bulk) + 22

    run(main(), event_loop=event_loop)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_the_switch_to_splice_with_copied_bytes_unsent_keeps_their_order(event_loop: str) -> None:
    """The read that opens the pipe cannot all be sent (the server reads
    nothing, its buffers are small): the relay holds that copied chunk alone,
    with the pipe open and empty, and the copied bytes go out before any
    spliced after them."""
    block = bytes(range(256)) * 4096  # 1 MiB, a pattern: the reader checks every byte cheaply
    total = 4 * MB

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, a = await pair()
        b, server = await pair(near_buffers=(0, 4096), far_buffers=(4096, 0))
        core = RelayCore(Limits(), loop.time(), names=NAMES)
        relay = Relay(core, a, b)
        client.send(block)  # queued at leg A before the relay's first read: that read fills
        task = asyncio.create_task(relay.run())
        try:
            leg_b = relay._legs[Side.B]
            await wait_until(lambda: relay.piped[Side.A] and bool(leg_b.unsent) and not core.wants_read(Side.A),
                             10, "the switch with copied bytes unsent")
            assert leg_b.spliced == 0 and 0 < core.buffered <= driver.SPLICE_AFTER
            sending = asyncio.create_task(send_all(client, block[len(block) // 2:] + block * 3
                                                   + block[: len(block) // 2]))
            received = 0
            while chunk := await asyncio.wait_for(loop.sock_recv(server, MB), 20):
                assert chunk == (block * 2)[received % len(block):][: len(chunk)]
                received += len(chunk)
            await asyncio.wait_for(sending, 20)
            assert received == len(block) + 4 * MB == total + MB
            server.shutdown(socket.SHUT_WR)
            assert (await asyncio.wait_for(task, 10)).reason == "done"
        finally:
            await stop(task, client, server)

    run(main(), timeout=60, event_loop=event_loop)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_each_way_keeps_the_other_direction_open(mode: str, first: str) -> None:
    async def main() -> None:
        async with rig(mode) as r:
            quiet, talker = (r.client, r.server) if first == "client" else (r.server, r.client)
            await send_all(quiet, b"that is all from me")
            assert await asyncio.wait_for(read_all(talker), 10) == b"that is all from me"
            await send_all(talker, b"but I still have this", eof=False)
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(quiet, 100), 10) == b"but I still have this"
            talker.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(read_all(quiet), 10) == b""
            assert (await asyncio.wait_for(r.task, 10)).reason == "done"

    run(main())


# ---- hostile peers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_resets_right_after_its_request_resets_the_server(mode: str) -> None:
    async def main() -> None:
        async with rig(mode) as r:
            r.client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            set_reset_on_close(r.client)
            r.client.close()
            await expect_reset(r.server)  # whether or not the request got through first
            assert (await asyncio.wait_for(r.task, 10)).reason == "client_reset"

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_a_server_reset_mid_response_reaches_the_client(mode: str) -> None:
    async def main() -> None:
        async with rig(mode) as r:
            await send_all(r.client, b"GET")
            r.server.send(b"HTTP/1.1 200 OK\r\n")
            set_reset_on_close(r.server)
            r.server.close()
            await expect_reset(r.client)
            assert (await asyncio.wait_for(r.task, 10)).reason == "server_reset"

    run(main())


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", ["small", "bulk"])
def test_a_server_answer_and_reset_queued_before_the_first_read_both_reach_the_client(
        mode: str, event_loop: str, size: str) -> None:
    # The answer and the RST are both at leg B when the relay first looks:
    # uvloop wakes a reader once for a socket in error, so a relay that read
    # once per wake-up passed the answer and never saw the reset. In bulk,
    # a spliced direction opens its pipe on the way (the first read fills
    # SPLICE_AFTER) and the rest and the RST come through it.
    answer = b"answer" if size == "small" else os.urandom(3 * driver.SPLICE_AFTER + 1)
    roomy = (4 * MB, 0)  # every byte of the answer fits in the receivers' windows

    async def main() -> None:
        client, a = await pair(near_buffers=roomy)
        b, server = await pair(near_buffers=roomy)
        await asyncio.get_running_loop().sock_sendall(server, answer)
        await wait_until(lambda: _unsent(server) == 0, what="the answer at leg B")
        set_reset_on_close(server)
        server.close()
        await wait_until(lambda: _closed(b), what="the RST at leg B")
        inspectors = {side: (lambda chunk: Verdict.PASS) for side in Side} if mode == "inspect" else None
        core = RelayCore(Limits(), asyncio.get_running_loop().time(), names=NAMES, inspectors=inspectors)
        relay = Relay(core, a, b, splice=mode == "splice")
        task = asyncio.create_task(relay.run())
        try:
            loop = asyncio.get_running_loop()
            got = b""
            while len(got) < len(answer):
                got += await asyncio.wait_for(loop.sock_recv(client, MB), 10)
            assert got == answer
            await expect_reset(client)
            assert relay.piped[Side.B] == (mode == "splice" and size == "bulk")
            assert (await asyncio.wait_for(task, 10)).reason == "server_reset"
        finally:
            await stop(task, client)

    run(main(), event_loop=event_loop)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("mode", MODES)
def test_a_server_reset_behind_data_the_client_is_not_reading_yet_still_reaches_it(mode: str, event_loop: str) -> None:
    # The reset is seen only once the client has taken the bytes before it;
    # the relay holds one chunk, so the rest sits at leg B with the RST.
    async def main() -> None:
        async with rig(mode) as r:
            await send_all(r.client, b"GET")
            chunk = os.urandom(MB)

            def fill() -> bool:  # the server sends until every buffer between is full
                with contextlib.suppress(BlockingIOError):
                    while True:
                        r.server.send(chunk)
                return r.core.buffered > 0

            await wait_until(fill, what="bytes held for the client")
            set_reset_on_close(r.server)
            r.server.close()
            await expect_reset(r.client)  # the bytes the relay holds when it sees the RST are not sent
            assert (await asyncio.wait_for(r.task, 10)).reason == "server_reset"

    run(main(), event_loop=event_loop)


def _unsent(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue, sent or not, not yet acknowledged (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def _closed(sock: socket.socket) -> bool:
    """Whether ``sock``'s connection is over (TCP_INFO's state is TCP_CLOSE), its error still pending."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7


@pytest.mark.parametrize("mode", MODES)
def test_a_reader_that_stops_reading_stops_the_sender_and_the_relay_holds_one_chunk(mode: str) -> None:
    """The server reads nothing: the client's sends block, the relay holds at most one
    pipeful (or one read) of it, and once the server reads again every byte arrives."""
    total = 256 * MB  # far more than every buffer on the way together
    block = bytes(range(256)) * 4096  # 1 MiB, a pattern: the reader checks every byte cheaply

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig(mode) as r:
            sent = 0

            async def sender() -> None:
                nonlocal sent
                while sent < total:
                    await loop.sock_sendall(r.client, block)
                    sent += len(block)
                r.client.shutdown(socket.SHUT_WR)

            sending = asyncio.create_task(sender())
            # Backpressure reached: the relay has bytes for the server it cannot write,
            # so it stops reading the client, whose own buffers then fill.
            await wait_until(lambda: r.core.buffered > 0 and not r.core.wants_read(Side.A), 20, "the relay to stall")
            for _ in range(200):  # let the client fill its own buffers (bounded: 200 loop turns)
                await asyncio.sleep(0)
            blocked_at, held = sent, r.core.buffered
            for _ in range(200):  # nothing moves while the server does not read
                await asyncio.sleep(0)
            assert (sent, r.core.buffered) == (blocked_at, held) and not sending.done()
            capacity = driver.pipe_size() if mode == "splice" else driver.CHUNK
            assert 0 < held <= capacity
            assert r.relay.piped[Side.A] == (mode == "splice")
            assert blocked_at < 64 * MB, "the client could send without limit"

            received = 0
            while chunk := await asyncio.wait_for(loop.sock_recv(r.server, MB), 20):
                assert chunk == (block * 2)[received % len(block):][: len(chunk)]
                received += len(chunk)
            await asyncio.wait_for(sending, 20)
            assert received == total == r.core.received(Side.A)

    run(main(), timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_idle_closes_both_with_fin(mode: str) -> None:
    async def main() -> None:
        async with rig(mode, Limits(idle_timeout=0.3)) as r:
            await send_all(r.client, b"x", eof=False)
            assert await asyncio.get_running_loop().sock_recv(r.server, 10) == b"x"
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(read_all(r.client), 10) == b""
            assert await asyncio.wait_for(read_all(r.server), 10) == b""
            done = await asyncio.wait_for(r.task, 10)
            assert (done.reason, done.detail) == ("idle", "0.3s without data")
            assert asyncio.get_running_loop().time() - started >= 0.2

    run(main())


def test_idle_with_reset_on_idle_resets_both() -> None:
    async def main() -> None:
        async with rig("splice", Limits(idle_timeout=0.2, reset_on_idle=True)) as r:
            await expect_reset(r.client)
            await expect_reset(r.server)
            assert (await asyncio.wait_for(r.task, 10)).reason == "idle"

    run(main())


def test_an_inspector_that_says_close_resets_both_and_passes_nothing_after() -> None:
    def scan(chunk: bytes) -> Verdict:
        return Verdict.CLOSE if b"EICAR" in chunk else Verdict.PASS

    async def main() -> None:
        async with rig("inspect", inspectors={Side.B: scan}) as r:
            r.server.send(b"clean")
            assert await asyncio.get_running_loop().sock_recv(r.client, 10) == b"clean"
            r.server.send(b"EICAR")
            await expect_reset(r.client)
            assert (await asyncio.wait_for(r.task, 10)).reason == "hook"

    run(main())


def test_cancelling_the_relay_resets_both_legs() -> None:
    async def main() -> None:
        async with rig("splice") as r:
            await send_all(r.client, b"x", eof=False)  # it runs: the byte went through
            assert await asyncio.get_running_loop().sock_recv(r.server, 10) == b"x"
            r.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await r.task
            assert r.core.outcome is not None and r.core.outcome.reason == "shutdown"
            await expect_reset(r.client)
            await expect_reset(r.server)

    run(main())


# ---- when the kernel says no -----------------------------------------------------------------------


def test_a_pipe_the_kernel_will_not_grow_keeps_its_default_size(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.fcntl

    def refuse_growth(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "past pipe-user-pages-soft")
        return real(fd, cmd, arg)

    monkeypatch.setattr(driver.fcntl, "fcntl", refuse_growth)
    payload = os.urandom(3 * MB)

    async def main() -> None:
        async with rig("splice") as r:
            _, got = await asyncio.gather(send_all(r.client, payload), read_all(r.server))
            assert got == payload
            assert r.relay.piped[Side.A] and r.relay._legs[Side.A].capacity == 65536

    run(main())


def test_without_a_pipe_the_direction_is_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pipe(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(driver.os, "pipe2", no_pipe)
    payload = os.urandom(MB)

    async def main() -> None:
        client, a = await pair()
        b, server = await pair()
        core = RelayCore(Limits(), 0.0, names=NAMES)
        relay = Relay(core, a, b)
        assert relay.spliced == {Side.A: True, Side.B: True}  # the pipe is asked for only with bulk
        task = asyncio.create_task(relay.run())
        _, got = await asyncio.gather(send_all(client, payload), read_all(server))
        server.shutdown(socket.SHUT_WR)
        assert got == payload and (await asyncio.wait_for(task, 10)).reason == "done"
        assert relay.spliced == {Side.A: False, Side.B: True} and relay.piped == {Side.A: False, Side.B: False}
        client.close()
        server.close()

    run(main())
