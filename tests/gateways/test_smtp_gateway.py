"""The smtp gateway on loopback, against a fake processor and a scripted server: the adapter carries out the core."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from typing import Any, AsyncIterator

import pytest

from firewall.signalling import Endpoint, Proto
from gateways.layer import EventLog
from gateways.smtp.core import MAX_ANSWERS_PER_TURN, MAX_BACKLOG
from gateways.smtp.gateway import SmtpGateway, client_group
from gateways.smtp.settings import SmtpSettings
from tests.gateways.fake_processor import rig
from tests.gateways.process import events
from tests.gateways.loopback import GATEWAY, fw_socket, run, tcp_connect_from, tcp_server_at, wait_until

A = ipaddress.IPv4Address


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request: pytest.FixtureRequest) -> str:
    """Every test on both loops the smtp kind can run on (its ``event_loop`` setting)."""
    return request.param


C = Endpoint(A("203.0.113.10"), 40000)
W = Endpoint(A("203.0.113.1"), 25)
S = Endpoint(A("192.168.1.10"), 25)


class MiniMta:
    """A scripted SMTP server: records what it got; one message per DATA."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.messages: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mini ESMTP\r\n")
            while line := await reader.readline():
                self.received += line
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-mini\r\n250-PIPELINING\r\n250 SIZE 100000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    body = bytearray()
                    while (ln := await reader.readline()) not in (b".\r\n", b""):
                        body += ln
                    self.messages.append(bytes(body))
                    writer.write(b"250 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def world(settings: SmtpSettings) -> AsyncIterator[tuple[Any, SmtpGateway]]:
    async with rig(gateway="smtp", query_timeout=0.5) as (fake, layer):
        gw = SmtpGateway(layer, listen=Endpoint(GATEWAY, 0), settings=settings, log=EventLog("smtp"))
        await gw.start()
        try:
            yield fake, gw
        finally:
            await gw.close(grace=1.0)


async def connect(fake: Any, gw: SmtpGateway, mta: MiniMta) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    sock, fw = fw_socket(socket.SOCK_STREAM)
    server = await tcp_server_at(fw, mta)
    fake.new_flow(Proto.TCP, fw, gw.listen, gateway="smtp", client=C, original_dst=W, server=S)
    reader, writer = await tcp_connect_from(sock, gw.listen)
    return reader, writer, server


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line[3:4] != b"-":
            return line


def test_a_message_passes_with_the_original_tuple_logged(log, loop_name: str) -> None:
    async def main() -> None:
        async with world(SmtpSettings(recipient_domains=("example.com",))) as (fake, gw):
            mta = MiniMta()
            reader, writer, server = await connect(fake, gw, mta)
            assert (await reply(reader)).startswith(b"220")
            writer.write(b"EHLO c\r\n")
            assert (await reply(reader)) == b"250 SIZE 100000\r\n"
            writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [await reply(reader) for _ in range(3)] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]
            writer.write(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
            assert [await reply(reader) for _ in range(2)] == [b"250 queued\r\n", b"221 bye\r\n"]
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert mta.messages == [b"Subject: x\r\n\r\n..dot\r\n"]
            await wait_until(lambda: gw.active == 0, what="the session to end")
            assert gw.counters["message.accepted"] == 1 and gw.counters["sessions.closed.quit"] == 1
            writer.close()
            server.close()

    run(main(), event_loop=loop_name)
    opened, = events(log, "open")
    assert (opened["client"], opened["original_dst"], opened["server"]) == (str(C), str(W), str(S))


def test_the_idle_timeout_says_421_and_closes(log, loop_name: str) -> None:
    async def main() -> None:
        async with world(SmtpSettings(idle_timeout=1)) as (fake, gw):
            reader, writer, server = await connect(fake, gw, MiniMta())
            assert (await reply(reader)).startswith(b"220")
            assert await asyncio.wait_for(reader.read(), 5) == b"421 4.4.2 Idle timeout; closing\r\n"
            assert gw.counters["closed.idle_timeout"] == 1
            closed, = events(log, "closed.idle_timeout")
            assert closed["client"] == str(C)
            writer.close()
            server.close()

    run(main(), event_loop=loop_name)


def test_sessions_past_the_per_client_limit_get_421(loop_name: str) -> None:
    async def main() -> None:
        async with world(SmtpSettings(max_sessions_per_client=1)) as (fake, gw):
            mta = MiniMta()
            r1, w1, s1 = await connect(fake, gw, mta)
            assert (await reply(r1)).startswith(b"220")
            r2, w2, s2 = await connect(fake, gw, mta)
            assert await asyncio.wait_for(r2.read(), 5) == b"421 4.7.0 Too many sessions from your address; try again later\r\n"
            assert gw.counters["refused.max_sessions_per_client"] == 1
            for w in (w1, w2):
                w.close()
            for s in (s1, s2):
                s.close()

    run(main(), event_loop=loop_name)


def test_a_client_that_never_reads_its_answers_is_held_to_a_bound(loop_name: str) -> None:
    """6000 pipelined VRFYs (48 KB; 450 KB of answers) into a 4 KiB window,
    never read: the core answers them a turn at a time, every turn as the
    last one's answers are written (on loopback the kernel takes them all),
    the gateway holds no more than a turn beyond its write buffer, and the
    idle timeout ends the session. (The netns tests show the write buffer
    full and the reading stopped, with a server that floods.)"""
    async def main() -> None:
        settings = SmtpSettings(idle_timeout=1, buffer_high_water=16384)
        async with world(settings) as (fake, gw):
            sock, fw = fw_socket(socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            server = await tcp_server_at(fw, MiniMta())
            fake.new_flow(Proto.TCP, fw, gw.listen, gateway="smtp", client=C, original_dst=W, server=S)
            await asyncio.get_running_loop().sock_connect(sock, (str(gw.listen.address), gw.listen.port))
            assert (await asyncio.get_running_loop().sock_recv(sock, 512)).startswith(b"220")
            sock.send(b"EHLO c\r\n" + b"VRFY bob\r\n" * 6000)
            held = [0]
            async def watch() -> bool:
                held.append(gw.buffered)
                return gw.counters["sessions.closed.idle_timeout"] == 1
            deadline = asyncio.get_running_loop().time() + 15
            while not await watch():
                assert asyncio.get_running_loop().time() < deadline, held
                await asyncio.sleep(0.01)
            # buffer_high_water unsent, a turn of answers and the unread commands at most.
            assert 0 < max(held) <= settings.buffer_high_water + MAX_ANSWERS_PER_TURN * 100 + MAX_BACKLOG, max(held)
            assert gw.counters["refused.vrfy"] == 6000
            sock.close()
            server.close()

    run(main(), event_loop=loop_name)


def test_a_server_that_cannot_be_reached_gets_the_client_421_and_one_close_line(log, loop_name: str) -> None:
    async def main() -> None:
        async with world(SmtpSettings()) as (fake, gw):
            sock, fw = fw_socket(socket.SOCK_STREAM)  # nothing listens on F:f: leg B is refused
            fake.new_flow(Proto.TCP, fw, gw.listen, gateway="smtp", client=C, original_dst=W, server=S)
            reader, writer = await tcp_connect_from(sock, gw.listen)
            assert await asyncio.wait_for(reader.read(), 5) == b"421 4.4.1 The mail server cannot be reached; try again later\r\n"
            await wait_until(lambda: gw.active == 0, what="the session to end")
            writer.close()

    run(main(), event_loop=loop_name)
    closed, = events(log, "close")
    assert closed["reason"] == "connect_failed" and "Connection refused" in closed["detail"] and closed["client"] == str(C)


def test_ipv6_clients_count_for_the_per_client_limit_by_their_prefix() -> None:
    v6 = ipaddress.IPv6Address
    same = [client_group(v6(a), 64) for a in ("2001:db8:2::10", "2001:db8:2::11", "2001:db8:2:0:ffff::1")]
    assert len(set(same)) == 1 and str(same[0]) == "2001:db8:2::/64"
    assert client_group(v6("2001:db8:2:1::10"), 64) != same[0]
    assert client_group(v6("2001:db8:2::10"), 128) != client_group(v6("2001:db8:2::11"), 128)
    assert client_group(v6("2001:db8:2:1::10"), 48) == client_group(v6("2001:db8:2::10"), 48)
    assert client_group(A("203.0.113.10"), 64) == A("203.0.113.10")  # IPv4: the address itself
    assert SmtpSettings().client_prefix6 == 64


def test_a_server_that_greets_and_resets_at_once_ends_the_session(loop_name: str) -> None:
    """The greeting and the RST both wait at leg B before the gateway's first read. The
    relay driver, which read once per wake-up, hung in that case on uvloop (a socket in
    error wakes its reader once: gateways/relay/driver.py); the smtp gateway's reader,
    which also reads once a wake-up, is woken again here on both loops."""
    async def greet_and_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mini ESMTP\r\n")  # sent at once (an empty buffer), and the RST behind it
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        async with world(SmtpSettings(idle_timeout=30)) as (fake, gw):
            sock, fw = fw_socket(socket.SOCK_STREAM)
            server = await tcp_server_at(fw, greet_and_reset)
            fake.new_flow(Proto.TCP, fw, gw.listen, gateway="smtp", client=C, original_dst=W, server=S)
            reader, writer = await tcp_connect_from(sock, gw.listen)
            await wait_until(lambda: gw.active == 0, timeout=5, what="the session to end with the server's reset")
            writer.close()
            server.close()

    run(main(), event_loop=loop_name)
