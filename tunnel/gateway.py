"""The control server as nfgate's ``tunnel`` gateway: one port, routed by original destination.

"In nfgate the tunnel is one more gateway service" (DESIGN.md). Under
``nfgate run`` the processor double-NATs every packet of the gateway's
``[[gateway.traffic]]`` (``to = "router"``: the service port, TCP and UDP,
and the publishable public ports) into the gateway's single port G:g, from a
firewall-side endpoint F:f unique per flow (DESIGN.md invariant 2). The
server cannot tell a mediator's channel from a technician's connection by
the port it arrives on, so ``GatewayFrontend`` asks the deNAT/reNAT layer
for each flow's original destination (``attach``: the seed's out-of-band
signalling) and routes it:

- original port = ``service_port``, TCP: TLS, then a mediator channel;
- original port = ``service_port``, UDP: a UDP channel datagram;
- a published TCP or UDP port: that publication;
- anything else: reset (TCP) or dropped and counted (UDP).

Replies leave G:g towards F:f, where the processor restores the original
addresses (the seed's "swap"). A flow that the processor ends (FLOW_END) is
aborted here too.

The kind takes IPv6 (``Kind.ipv6``, issue 17): the processor binds an IPv6
flow to the router the same way, into G6:g (the manifest's ``listen6``, the
blind track's IPv6 address, same port) from an IPv6 F6:f, so the frontend
listens on both, and answers a UDP flow from the socket of its family.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firewall.signalling import Endpoint
from firewall.signalling import Proto as SignallingProto
from gateways.layer import EventLog as LayerLog
from gateways.layer import FlowUnknown, GatewayLayer
from gateways.layer.endpoint import endpoint_of
from gateways.manifest import Manifest
from gateways.tcp_server import Acceptor, listen_socket
from tunnel.aio import grow_udp_buffer, reset, udp_socket
from tunnel.frames import IPAddress, Proto
from tunnel.server import ChannelProtocol
from tunnel.wire import endpoint_text

if TYPE_CHECKING:
    from tunnel.publish import Publication
    from tunnel.server import TunnelServer

# Datagrams of one new flow held while its original destination is looked up
# (bounded by the layer's query timeout); more are dropped and counted.
MAX_QUEUED_DATAGRAMS = 32
# Live UDP flows this gateway routes at once (channels and publication
# clients); each costs a small record until the processor ends the flow.
MAX_UDP_ROUTES = 65536
LISTEN_BACKLOG = 1024  # many mediators reconnect at once after the NAT in front of them reboots


def steered(gateway: Manifest, proto: str, port: int) -> bool:
    """Does a ``[[gateway.traffic]]`` selector of ``gateway`` (``to = "router"``)
    bring ``proto`` ``port`` to it?"""
    return any(
        t.terminates and t.proto == proto and any(r.first <= port <= r.last for r in t.ports)
        for t in gateway.traffic
    )


def unsteered(gateway: Manifest, proto: str, first: int, last: int) -> list[str]:
    """The parts of ``first``-``last`` that no selector brings for ``proto``, as ranges."""
    covered = sorted(
        (max(r.first, first), min(r.last, last))
        for t in gateway.traffic if t.terminates and t.proto == proto
        for r in t.ports if r.first <= last and r.last >= first
    )
    gaps, at = [], first
    for lo, hi in covered:
        if lo > at:
            gaps.append(f"{at}" if lo - 1 == at else f"{at}-{lo - 1}")
        at = max(at, hi + 1)
    if at <= last:
        gaps.append(f"{at}" if at == last else f"{at}-{last}")
    return gaps


class _Held(asyncio.Protocol):
    """Delegates to ``inner``; releases the layer's hold when the connection ends."""

    def __init__(self, inner: Any, hold: Any) -> None:
        self.inner = inner
        self.hold = hold

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.hold.release()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _HeldBuffered(_Held, asyncio.BufferedProtocol):
    """``_Held`` for a buffered ``inner`` (the TLS channel: ``ChannelProtocol``)."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.inner.get_buffer(sizehint)  # type: ignore[attr-defined,no-any-return]

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)  # type: ignore[attr-defined]


class _UdpRoute:
    __slots__ = ("kind", "publication", "hold", "queue")

    def __init__(self) -> None:
        self.kind = "lookup"  # lookup, channel, publication, drop
        self.publication: Publication | None = None
        self.hold: Any = None
        self.queue: deque[bytes] = deque()


class _UdpIntake(asyncio.DatagramProtocol):
    def __init__(self, frontend: GatewayFrontend) -> None:
        self.frontend = frontend

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.frontend.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.frontend.counters["udp_errors"] += 1


class GatewayFrontend:
    """Routes the gateway port's flows to the channel or to a publication."""

    def __init__(
        self, gateway: Manifest, key: bytes, layer_factory: Callable[[], Any] | None = None
    ) -> None:
        self.gateway = gateway
        self.key = key
        self.layer_factory = layer_factory or self._make_layer
        self.layer: Any = None
        self.server: TunnelServer | None = None
        self.counters: Counter[str] = Counter()
        self.tcp: list[Acceptor] = []
        self.udp: dict[int, asyncio.DatagramTransport] = {}  # by IP version
        self.routes: dict[tuple[str, int], _UdpRoute] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def _make_layer(self) -> GatewayLayer:
        return GatewayLayer.from_manifest(self.gateway, self.key, LayerLog(self.gateway.name))

    @property
    def address(self) -> IPAddress:
        return self.gateway.listen.address

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """G, and G6 when the processor brings this gateway IPv6 flows."""
        six = self.gateway.listen6
        return (self.address,) if six is None else (self.address, six)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, server: TunnelServer) -> None:
        self.server = server
        loop = asyncio.get_running_loop()
        self.layer = self.layer_factory()
        await self.layer.start()
        port = self.gateway.listen.port
        for address in self.addresses:
            # Accepted by hand, not by create_server: not one byte may be read
            # before the flow is routed, so a TLS ClientHello reaches TLS whole.
            # The Acceptor pauses, with one log line, when out of descriptors.
            listener = listen_socket(Endpoint(address, port), LISTEN_BACKLOG)
            self.tcp.append(Acceptor(listener, lambda sock: self.spawn(self.route_tcp(sock)), server.log, self.counters))
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpIntake(self), sock=udp_socket(address, port))
            grow_udp_buffer(udp, server.config.udp_buffer)
            self.udp[address.version] = udp

    async def bind(self, publication: Publication) -> None:
        """Nothing to bind: the processor brings the port's traffic here, if
        a [[gateway.traffic]] selector names it."""
        spec = publication.spec
        if not steered(self.gateway, spec.proto.name.lower(), spec.public_port):
            raise OSError(
                errno.EADDRNOTAVAIL,
                f"{spec.proto.name.lower()} port {spec.public_port} is not in any [[gateway.traffic]]"
                f" of {self.gateway.name}",
            )

    def send_datagram(self, data: bytes, address: IPAddress, port: int) -> None:
        udp = self.udp.get(address.version)
        if udp is not None:
            udp.sendto(data, (str(address), port))

    def describe(self) -> dict[str, Any]:
        """For ``tunnel list`` and the ``ready`` line: where the steered flows
        arrive, and what was refused or dropped on the way in."""
        service = self.server.config.service_port if self.server is not None else None
        return {
            # The service port on whichever router address a selector steers here.
            "service": f"*:{service}",
            "gateway": self.gateway.name,
            "listen": ", ".join(endpoint_text(a, self.gateway.listen.port) for a in self.addresses),
            "udp_routes": len(self.routes),
            "counters": dict(sorted(self.counters.items())),
        }

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for acceptor in self.tcp:
            acceptor.close()
        self.tcp.clear()
        for udp in self.udp.values():
            udp.close()
        self.udp.clear()
        for route in self.routes.values():
            if route.hold is not None:
                route.hold.release()
        self.routes.clear()
        if self.layer is not None:
            await self.layer.close()

    # -- TCP ---------------------------------------------------------------------------------

    async def route_tcp(self, sock: socket.socket) -> None:
        server = self.server
        assert server is not None
        loop = asyncio.get_running_loop()
        try:
            fw, ag = endpoint_of(sock.getpeername()), endpoint_of(sock.getsockname())
        except OSError:
            fw = ag = None
        if fw is None or ag is None:
            sock.close()  # reset before we looked at it
            return
        box: dict[str, Any] = {}

        def ended(cause: Any) -> None:  # the processor ended the flow
            transport = box.get("transport")
            if transport is not None:
                reset(transport)
            else:
                sock.close()

        try:
            hold = await self.layer.attach(SignallingProto.TCP, fw, ag, on_end=ended)
        except FlowUnknown as err:
            self.counters["tcp_unknown_flow"] += 1
            server.log.warn("unknown_flow", via=str(fw), reason=err.why)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        port = hold.flow.original_dst.port
        publication = server.publications.get((Proto.TCP, port))
        if port == server.config.service_port:
            inner: asyncio.BaseProtocol = ChannelProtocol(server, peer=str(hold.flow.client))
            ssl_args: dict[str, Any] = {
                "ssl": server.tls_context, "ssl_handshake_timeout": server.config.handshake_timeout,
            }
        elif publication is not None:
            origin = (hold.flow.client.address, hold.flow.client.port)
            inner, ssl_args = publication.tcp_protocol(origin), {}
        else:
            self.counters["tcp_not_routed"] += 1
            hold.release()
            sock.close()
            return
        try:
            held = _HeldBuffered if isinstance(inner, asyncio.BufferedProtocol) else _Held
            box["transport"], _ = await loop.connect_accepted_socket(lambda: held(inner, hold), sock, **ssl_args)
        except (OSError, TimeoutError) as err:
            # A failed TLS handshake: the mediator (or a scanner) never got in.
            self.counters["tls_failed"] += 1
            server.log.warn("tls_failed", peer=str(hold.flow.client), reason=str(err) or type(err).__name__)
            hold.release()
            sock.close()

    # -- UDP ---------------------------------------------------------------------------------

    def datagram(self, data: bytes, addr: Any) -> None:
        key = (str(addr[0]), int(addr[1]))
        route = self.routes.get(key)
        if route is None:
            if len(self.routes) >= MAX_UDP_ROUTES:
                self.counters["udp_dropped_routes_full"] += 1
                return
            route = self.routes[key] = _UdpRoute()
            self.spawn(self._lookup(key, route))
        self._deliver(key, route, data)

    def _deliver(self, key: tuple[str, int], route: _UdpRoute, data: bytes) -> None:
        server = self.server
        assert server is not None
        if route.kind == "lookup":
            if len(route.queue) < MAX_QUEUED_DATAGRAMS:
                route.queue.append(data)
            else:
                self.counters["udp_dropped_queue_full"] += 1
        elif route.kind == "channel":
            server.service_datagram(data, (ipaddress.ip_address(key[0]), key[1]))
        elif route.kind == "publication" and route.publication is not None:
            udp = self.udp.get(4 if ":" not in key[0] else 6)
            pub = route.publication
            client = route.hold.flow.client
            pub.datagram(data, (ipaddress.ip_address(key[0]), key[1]),
                         lambda payload: udp.sendto(payload, key) if udp is not None else None,
                         origin=(client.address, client.port))
        else:
            self.counters["udp_dropped_not_routed"] += 1

    async def _lookup(self, key: tuple[str, int], route: _UdpRoute) -> None:
        server = self.server
        assert server is not None
        fw = Endpoint(ipaddress.ip_address(key[0]), key[1])
        g = self.address if fw.address.version == 4 else self.gateway.listen6
        if g is None:  # an IPv6 datagram with no IPv6 listener: cannot happen, counted if it does
            self.counters["udp_unknown_flow"] += 1
            self.routes.pop(key, None)
            return
        ag = Endpoint(g, self.gateway.listen.port)
        try:
            hold = await self.layer.attach(SignallingProto.UDP, fw, ag, on_end=lambda cause: self._ended(key, route))
        except FlowUnknown:
            self.counters["udp_unknown_flow"] += 1
            if self.routes.get(key) is route:
                del self.routes[key]  # its next datagram asks again
            return
        route.hold = hold
        port = hold.flow.original_dst.port
        if port == server.config.service_port:
            route.kind = "channel"
        elif (Proto.UDP, port) in server.publications:
            route.kind, route.publication = "publication", server.publications[(Proto.UDP, port)]
        else:
            route.kind = "drop"
        queued, route.queue = route.queue, deque()
        for data in queued:
            self._deliver(key, route, data)

    def _ended(self, key: tuple[str, int], route: _UdpRoute) -> None:
        if self.routes.get(key) is route:
            del self.routes[key]
        if route.hold is not None:
            route.hold.release()

