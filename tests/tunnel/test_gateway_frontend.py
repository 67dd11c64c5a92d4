"""The ``tunnel`` gateway kind: one port, flows routed by their original destination.

The deNAT/reNAT layer is replaced by a fake that knows, for each
firewall-side source port, which original destination port the flow had;
everything else (TLS, the mediator, the relays) is real, on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from firewall import manifests
from firewall.config import ConfigError, loads
from firewall.errors import UsageError
from firewall.signalling import Endpoint
from gateways.manifest import Manifest
from tests.tunnel.loopback import TOKEN, WAIT, echo_server, udp_echo, until, write_files
from tunnel import tls
from tunnel.config import MediatorConfig, load_mediators
from tunnel.events import EventLog
from tunnel.frames import Proto
from tunnel.gateway import GatewayFrontend, steered, unsteered
from tunnel.mediator import Mediator
from tunnel.policy import Op, Rule
from tunnel.server import OperatorError, TunnelServer
from tunnel.service import (
    check_steering, gateway_files_dir, gateway_server_config, run_gateway, state_dir, warn_unsteered,
)
from tests.tunnel.loopback import FAST_RECONNECT

CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[gateway_link]
router_address = "127.0.0.1/30"
gateway_address = "127.0.0.2/30"
port_base = {port}

[[gateway]]
name = "tun"
kind = "tunnel"

[gateway.settings]
service_port = 7443
publish_first = 8000
publish_last = 9999
request_timeout = 3

[[gateway.traffic]]
from = "wan"
to = "router"
proto = "tcp"
ports = [7443, "8000-8099"]
allow = true

[[gateway.traffic]]
from = "wan"
to = "router"
proto = "udp"
ports = [7443, "9000-9099"]
allow = true
"""


class FakeLayer:
    """Original destination port by firewall-side source port; the rest is the service port."""

    def __init__(self) -> None:
        self.routes: dict[int, int] = {}
        self.released = 0
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def attach(self, proto: Any, fw: Any, ag: Any, on_end: Any = None) -> Any:
        port = self.routes.get(fw.port, 7443)
        client = Endpoint(ipaddress.IPv4Address("203.0.113.9"), fw.port)
        flow = SimpleNamespace(client=client, original_dst=SimpleNamespace(port=port))
        layer = self

        class Hold:
            def __init__(self) -> None:
                self.flow = flow

            def release(self) -> None:
                layer.released += 1

        return Hold()


def manifest_of(text: str, path: Path | None = None) -> Manifest:
    """The manifest nfgate run would give the config's first gateway."""
    config = loads(text, path)
    return manifests.manifest_for(config, config.gateways[0])


def _gateway_port() -> int:
    """Free for TCP and UDP on G (127.0.0.2) and G6 (::1)."""
    for _ in range(100):
        tcp = socket.socket()
        tcp.bind(("127.0.0.2", 0))
        port = tcp.getsockname()[1]
        others = [socket.socket(type=socket.SOCK_DGRAM), socket.socket(socket.AF_INET6),
                  socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)]
        try:
            for sock, host in zip(others, ("127.0.0.2", "::1", "::1")):
                sock.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in (tcp, *others):
                sock.close()
    raise RuntimeError("no free port")


def _bound_socket(kind: int, six: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, kind)
    sock.bind(("::1" if six else "127.0.0.1", 0))
    return sock


def test_flows_are_routed_by_their_original_destination(tmp_path: Path) -> None:
    listen = _gateway_port()
    gateway = manifest_of(CONFIG.format(port=listen))
    assert gateway.listen.port == listen
    # The kind takes IPv6: the manifest names G6 (the blind track's, absent
    # here), where the gateway listens too; ::1 stands in for it.
    assert gateway.listen6 == ipaddress.ip_address("fd6e:6667:6174:ff::2")
    gateway = gateway.model_copy(update={"listen6": ipaddress.ip_address("::1")})
    pin = write_files(tmp_path)
    server_config = dataclasses.replace(
        gateway_server_config(gateway), cert=tmp_path / "server.crt", key=tmp_path / "server.key",
        mediators_file=tmp_path / "mediators.toml", control_socket=tmp_path / "c.sock", state_file=None,
    )
    layer = FakeLayer()

    async def main() -> None:
        frontend = GatewayFrontend(gateway, b"k" * 32, layer_factory=lambda: layer)
        server = TunnelServer(server_config, load_mediators(server_config.mediators_file, server_config), frontend,
                              EventLog("server"))
        await server.start()
        stop = asyncio.Event()
        mediator = Mediator(MediatorConfig(
            identity="m1", token=TOKEN.encode(), server="127.0.0.2", pin=tls.parse_pin(pin), service_port=listen,
            interfaces=(ipaddress.ip_interface("127.0.0.1/8"),), reconnect=FAST_RECONNECT,
            allow=(Rule(ipaddress.ip_network("127.0.0.0/8"), ops=frozenset({Op.CONNECT, Op.SEND})),),
        ), EventLog("mediator"))
        task = asyncio.get_running_loop().create_task(mediator.run(stop))
        loop = asyncio.get_running_loop()
        try:
            session = await server.wait_session("m1", WAIT)
            assert session is not None and session.peer.startswith("203.0.113.9:")  # the flow's real client
            _, target = await echo_server()
            echo, udp_target = await udp_echo()
            from tunnel.publish import PublishSpec

            local = ipaddress.ip_address("127.0.0.1")
            await server.publish(PublishSpec("m1", Proto.TCP, 8080, local, target))
            await server.publish(PublishSpec("m1", Proto.UDP, 9000, local, udp_target))
            with pytest.raises(OperatorError, match=r"not in any \[\[gateway.traffic\]\]"):
                await server.publish(PublishSpec("m1", Proto.TCP, 8200, local, target))

            client = _bound_socket(socket.SOCK_STREAM)
            layer.routes[client.getsockname()[1]] = 8080
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.2", listen))
            await loop.sock_sendall(client, b"through the gateway")
            assert await asyncio.wait_for(loop.sock_recv(client, 100), WAIT) == b"through the gateway"
            client.close()

            datagrams = _bound_socket(socket.SOCK_DGRAM)
            layer.routes[datagrams.getsockname()[1]] = 9000
            datagrams.setblocking(False)
            datagrams.connect(("127.0.0.2", listen))
            datagrams.send(b"udp through the gateway")
            assert await asyncio.wait_for(loop.sock_recv(datagrams, 100), WAIT) == b"udp through the gateway"
            assert server.records["m1"].counters["udp_via_channel_out"] == 1
            datagrams.close()

            # The same over IPv6, into G6:g: a public client and a UDP client.
            client6 = _bound_socket(socket.SOCK_STREAM, six=True)
            layer.routes[client6.getsockname()[1]] = 8080
            client6.setblocking(False)
            await loop.sock_connect(client6, ("::1", listen))
            await loop.sock_sendall(client6, b"over six")
            assert await asyncio.wait_for(loop.sock_recv(client6, 100), WAIT) == b"over six"
            client6.close()
            datagrams6 = _bound_socket(socket.SOCK_DGRAM, six=True)
            layer.routes[datagrams6.getsockname()[1]] = 9000
            datagrams6.setblocking(False)
            datagrams6.connect(("::1", listen))
            datagrams6.send(b"udp over six")
            assert await asyncio.wait_for(loop.sock_recv(datagrams6, 100), WAIT) == b"udp over six"
            datagrams6.close()
            assert frontend.describe()["listen"] == f"127.0.0.2:{listen}, [::1]:{listen}"

            stray = _bound_socket(socket.SOCK_STREAM)
            layer.routes[stray.getsockname()[1]] = 8081  # steered, but not published
            stray.setblocking(False)
            await loop.sock_connect(stray, ("127.0.0.2", listen))
            with pytest.raises(ConnectionError):
                while await asyncio.wait_for(loop.sock_recv(stray, 100), WAIT):
                    pass
                raise ConnectionResetError("closed")
            stray.close()
            await until(lambda: frontend.counters["tcp_not_routed"] == 1, what="the stray to be counted")
            assert len(echo.received) == 2
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)
            await server.close()
        assert layer.closed

    asyncio.run(asyncio.wait_for(main(), 60))


def test_run_gateway_reports_missing_files_in_one_line(tmp_path: Path) -> None:
    gateway = manifest_of(CONFIG.format(port=20000))
    with pytest.raises(UsageError, match=r"mediators file /etc/nfgate/tunnel/tun/mediators.toml: no such file|"
                                         r"mediators file .*: "):
        run_gateway(gateway)


def test_publish_range_must_not_run_backwards() -> None:
    gateway = manifest_of(CONFIG.format(port=20000).replace("publish_first = 8000", "publish_first = 9999")
                          .replace("publish_last = 9999", "publish_last = 8000"))
    with pytest.raises(UsageError, match="publish_first 9999 is above publish_last 8000"):
        gateway_server_config(gateway)


def test_files_live_next_to_the_config_and_state_follows_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = CONFIG.format(port=20000)
    gateway = manifest_of(text, tmp_path / "nfgate.toml")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    server = gateway_server_config(gateway)
    assert (server.cert, server.key, server.mediators_file) == (
        tmp_path / "tunnel/tun/server.crt", tmp_path / "tunnel/tun/server.key", tmp_path / "tunnel/tun/mediators.toml",
    )
    assert server.state_file == Path("/var/lib/nfgate/tunnel-tun.json")
    # The default config, /etc/nfgate/nfgate.toml, keeps the documented place.
    assert gateway_files_dir(manifest_of(text)) == Path("/etc/nfgate/tunnel/tun")
    assert gateway_files_dir(manifest_of(text, Path("/etc/nfgate/nfgate.toml"))) == Path("/etc/nfgate/tunnel/tun")
    # systemd's StateDirectory= (the first of several; a relative one is ignored).
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:/var/lib/other")
    assert gateway_server_config(gateway).state_file == tmp_path / "state/tunnel-tun.json"
    monkeypatch.setenv("STATE_DIRECTORY", "relative")
    assert state_dir() == Path("/var/lib/nfgate")


def test_service_port_must_be_steered_both_ways_and_to_the_router() -> None:
    gateway = manifest_of(CONFIG.format(port=20000))
    check_steering(gateway, 7443)  # the test config steers it: tcp and udp
    assert steered(gateway, "tcp", 7443) and steered(gateway, "udp", 7443)
    assert not steered(gateway, "tcp", 7444)
    with pytest.raises(UsageError, match=r"service_port 7444 \(tcp and udp\) is in no \[\[gateway.traffic\]\] of tun"):
        check_steering(gateway, 7444)
    # `nfgate check` already refuses the same mistakes when the config loads.
    with pytest.raises(ConfigError, match=r"no tcp selector brings settings.service_port 7443"):
        loads(CONFIG.format(port=20000).replace('ports = [7443, "8000-8099"]', 'ports = ["8000-8099"]'))
    with pytest.raises(ConfigError, match=r"gateway\[0\].traffic\[1\].to .*: a tunnel gateway terminates its flows"):
        loads(CONFIG.format(port=20000).replace('to = "router"\nproto = "udp"', 'to = "lan"\nproto = "udp"'))


def test_unsteered_publishable_ports_are_named() -> None:
    gateway = manifest_of(CONFIG.format(port=20000))  # tcp 8000-8099, udp 9000-9099 of 8000-9999
    assert unsteered(gateway, "tcp", 8000, 8099) == []
    assert unsteered(gateway, "tcp", 8000, 9999) == ["8100-9999"]
    assert unsteered(gateway, "udp", 8000, 9999) == ["8000-8999", "9100-9999"]
    assert unsteered(gateway, "udp", 8999, 9100) == ["8999", "9100"]
    events: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warn(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

    warn_unsteered(gateway, gateway_server_config(gateway), {}, Log())  # type: ignore[arg-type]
    assert [(f["proto"], f["publishable"], f["unsteered"]) for _, f in events] == [
        ("tcp", "8000-9999", "8100-9999"), ("udp", "8000-9999", "8000-8999,9100-9999"),
    ]


def test_the_rules_queue_only_packets_for_the_router_itself() -> None:
    """A terminating gateway's selector queues what is addressed to one of
    the router's own addresses (prerouting sees that, not the to-zone), and
    only first packets: routed traffic on the same ports, and every later
    packet, stay in the kernel."""
    from firewall.rules import build, iptables, nft
    from firewall.rules.model import DstLocal, Port, Queue

    rs = build(loads(CONFIG.format(port=20000)))
    mangle = rs.chain("mangle_prerouting")
    steered_rules = [r for r in mangle.rules if "gateway tun" in r.comment]
    # The kind takes IPv6 (issue 17): each selector queues IPv6 to the router's own addresses too.
    assert [r.comment for r in steered_rules] == [
        f"gateway[0].traffic[{i}] gateway tun (tunnel): {six}request to the router, admitted by the selector (allow = true)"
        for i in (0, 1) for six in ("", "IPv6 ")
    ]
    for rule in steered_rules:
        assert DstLocal() in rule.matches and isinstance(rule.statements[0], Queue)
        assert [m.direction for m in rule.matches if isinstance(m, Port)] == ["dst"]
    assert "fib daddr type local counter queue num 0" in nft.render(rs)
    assert "ct status confirmed counter return" in nft.render(rs)
    assert "-m addrtype --dst-type LOCAL -m comment --comment \"gateway[0].traffic[0]" in iptables.render(rs, 4)
    assert "-m addrtype --dst-type LOCAL -m comment --comment \"gateway[0].traffic[0]" in iptables.render(rs, 6)
