"""The tunnel over IPv6, on ::1 beside 127.0.0.1 in one loop (issue 17).

A dual-stack server (``listen`` and ``public_address`` with one address of
each family), a mediator that reaches it over IPv6, IPv6 private targets,
public clients of both families; and the refusals: an IPv6 target the
mediator has no address for, a CONNECT across families.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest

from firewall.config import ConfigError
from firewall.control import ControlError
from tests.tunnel.loopback import WAIT, loopback, until
from tunnel.policy import Op, Rule

V4, V6 = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
BOTH = (V4, V6)
IFACES = (ipaddress.ip_interface("127.0.0.1/8"), ipaddress.ip_interface("::1/128"))
ALLOW = tuple(Rule(ipaddress.ip_network(n), ops=frozenset({Op.CONNECT, Op.SEND})) for n in ("127.0.0.0/8", "::1/128"))


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def free_port_both() -> int:
    """A port free for TCP and UDP on 127.0.0.1 and on ::1."""
    for _ in range(100):
        socks = []
        try:
            first = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            socks.append(first)
            first.bind(("::1", 0))
            port = first.getsockname()[1]
            for family, kind, host in ((socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
                                       (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                                       (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")):
                sock = socket.socket(family, kind)
                socks.append(sock)
                sock.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port")


async def tcp_echo6() -> tuple[asyncio.AbstractServer, int, list[str]]:
    """An echo on [::1]; the list collects each client's address as it saw it."""
    peers: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "::1", 0)
    return server, server.sockets[0].getsockname()[1], peers


async def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    return got


def test_dual_stack_server_mediator_over_ipv6_and_ipv6_targets(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path, service_port=free_port_both(), listen=BOTH, public_address=BOTH) as lb:
            lb.start_mediator(server="::1", interfaces=IFACES, allow=ALLOW)
            session = await lb.session()
            assert session.peer.startswith("[::1]:"), session.peer  # the channel came over IPv6
            listing = await lb.ask(cmd="list")
            port = lb.config.service_port
            assert listing["service"] == f"127.0.0.1:{port}, [::1]:{port}"

            # TCP: an IPv6 target, public clients of both families.
            server, target, peers = await tcp_echo6()
            public = free_port_both()
            result = await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="::1", port=target)
            assert result["to"] == f"[::1]:{target}"
            assert await roundtrip("::1", public, b"over six") == b"over six"
            assert await roundtrip("127.0.0.1", public, b"over four") == b"over four"
            # The mediator reached it from its IPv6 address (and keeps a warm connection ahead: warm.py).
            assert len(peers) >= 2 and set(peers) == {"::1"}, peers
            server.close()

            # UDP: an IPv6 target on a redirect, answered over the IPv6 UDP channel.
            loop = asyncio.get_running_loop()
            echo = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            echo.bind(("::1", 0))
            echo.setblocking(False)
            udp_public = free_port_both()
            await lb.ask(cmd="publish", mediator="m1", proto="udp", public=udp_public, address="::1",
                         port=echo.getsockname()[1])
            client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            client.setblocking(False)
            client.connect(("::1", udp_public))
            try:
                for i in range(5):
                    client.send(b"dgram %d" % i)
                    data, source = await asyncio.wait_for(loop.sock_recvfrom(echo, 2048), WAIT)
                    assert data == b"dgram %d" % i and source[0] == "::1"
                    echo.sendto(data, source)
                    assert await asyncio.wait_for(loop.sock_recv(client, 2048), WAIT) == data
            finally:
                client.close()
                echo.close()
            counters = lb.server.records["m1"].counters
            assert counters["udp_via_channel_in"] == 5 and counters["udp_via_frames_in"] == 0
            listing = await lb.ask(cmd="list")
            m1 = next(m for m in listing["mediators"] if m["identity"] == "m1")
            channels = [p["channel"] for p in m1["session"]["ports"] if "channel" in p]
            assert channels and all(c.startswith("[::1]:") for c in channels), channels
            assert m1["session"]["interfaces"] == ["127.0.0.1/8", "::1/128"]

    run(main())


def test_ipv6_refusals_are_clean(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path, listen=BOTH, service_port=free_port_both()) as lb:
            # Reached over IPv4, announcing IPv4 only; its allow-list would take ::1.
            lb.start_mediator(allow=ALLOW)
            await lb.session()
            with pytest.raises(ControlError, match=r"announced no IPv6 address \(it announced 127.0.0.1/8\)") as err:
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=free_port_both(), address="::1", port=80)
            assert err.value.code == "NO_SUCH_ADDRESS"
            assert not lb.server.publications
            # An IPv4-mapped address is the IPv4 host: published as such.
            mapped = await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=free_port_both(),
                                  address="::ffff:127.0.0.1", port=80)
            assert mapped["to"] == "127.0.0.1:80"
            # A raw CONNECT from an IPv4 port to an IPv6 host: BAD_REQUEST, the port stays.
            opened = await lb.ask(cmd="open", mediator="m1", proto="tcp", address="127.0.0.1", port=0)
            with pytest.raises(ControlError, match="cannot connect from IPv4 address 127.0.0.1 to IPv6") as err:
                await lb.ask(cmd="connect", mediator="m1", port_id=opened["port_id"], address="::1", port=80)
            assert err.value.code == "BAD_REQUEST"
            await lb.ask(cmd="close", mediator="m1", port_id=opened["port_id"])

    run(main())


def test_an_ipv6_target_outside_the_allow_list_is_refused_with_the_mediators_reason(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path, listen=BOTH, service_port=free_port_both()) as lb:
            only_v4 = (Rule(ipaddress.ip_network("127.0.0.0/8"), ops=frozenset({Op.CONNECT, Op.SEND})),)
            lb.start_mediator(server="::1", interfaces=IFACES, allow=only_v4)
            await lb.session()
            for proto, op in (("tcp", "connect TCP"), ("udp", "send UDP")):
                with pytest.raises(ControlError, match=rf"refused by the mediator: NOT_ALLOWED: {op} \[::1\]:80 is"):
                    await lb.ask(cmd="publish", mediator="m1", proto=proto, public=free_port_both(), address="::1", port=80)
            assert not lb.server.publications
            await until(lambda: lb.mediators[0][0].counters["refused"] == 2, what="two refused lines")

    run(main())


def test_listen_takes_one_address_of_each_family(tmp_path: Path) -> None:
    from tunnel.config import ServerConfig, load_server

    assert ServerConfig(listen=V6).listen == (V6,)
    with pytest.raises(ValueError, match="at most one IPv4 address"):
        ServerConfig(listen=(V4, ipaddress.ip_address("127.0.0.2")))
    path = tmp_path / "s.toml"
    path.write_text('[server]\nlisten = ["0.0.0.0", "::"]\npublic_address = "::"\n')
    cfg = load_server(path)
    assert cfg.listen == (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))
    assert cfg.public_address == (ipaddress.ip_address("::"),)
    path.write_text('[server]\nlisten = ["::1", "::2"]\npublic_address = []\n')
    with pytest.raises(ConfigError) as err:
        load_server(path)
    assert "server.listen (line 2): at most one IPv6 address, got ::1, ::2" in str(err.value)
    assert "server.public_address (line 3): give at least one address" in str(err.value)
