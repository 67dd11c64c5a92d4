"""The config's gateway selectors and port forwards, precomputed to match a first packet's ints.

The same fields, and the same addresses, as the queue rules that sent the
packet here (``firewall.rules.build``): a selector is the gateway's
``[[gateway.traffic]]`` entry (from-zone, protocol, ports, addresses); a
port forward's target S:s is what the client meant when it addressed the
router (an IPv4 client's by the IPv4 forwards, an IPv6 one's by the IPv6 ones). The to-zone, which prerouting cannot match, is the core's (a route
lookup). Pure: built once from the config, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from firewall.config import Config, bucket_count
from firewall.config.model import Gateway, PortForward, Traffic
from firewall.flows import AgEndpoint
from firewall.packet import TCP, UDP
from firewall.processor.spread import worker_endpoints
from gateways.kinds import KINDS

Nets = tuple[tuple[int, int], ...]  # (network, netmask) pairs
PROTO = {"tcp": TCP, "udp": UDP}


def nets(networks: Iterable[Any]) -> Nets:
    return tuple((int(n.network_address), int(n.netmask)) for n in networks)


def inside(addr: int, networks: Nets) -> bool:
    return any(addr & mask == net for net, mask in networks)


# Sources no packet may carry (RFC 1122 3.2.1.3, RFC 5735): "this network",
# loopback, multicast and the reserved class E, which includes broadcast.
MARTIANS = nets(map(ipaddress.IPv4Network, ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3")))


@dataclass(frozen=True, slots=True)
class Selector:
    """A gateway traffic selector, precomputed to match ints."""

    traffic: Traffic
    gateway: Gateway
    ag: AgEndpoint
    ports: tuple[tuple[int, int], ...]
    saddr: Nets  # the IPv4 prefixes of t.saddr
    daddr: Nets
    log_only: bool  # the gateway only logs its flows: the kernel carries them, unbound
    adjacent: int | None  # the kind's adjacent-port step (RTP's RTCP): the processor opens it itself
    saddr6: Nets = ()  # the IPv6 prefixes of t.saddr
    daddr6: Nets = ()

    def matches(self, src: int, dst: int, dport: int, six: bool = False) -> bool:
        # The same fields, and the same addresses, as the queue rule (rules.build._selector):
        # a side with addresses names only its own version's (an IPv4 int is never inside
        # an IPv6 prefix such as ::/0, and the reverse).
        t = self.traffic
        return (
            any(first <= dport <= last for first, last in self.ports)
            and (not t.saddr or inside(src, self.saddr6 if six else self.saddr))
            and (not t.daddr or inside(dst, self.daddr6 if six else self.daddr))
        )


class Policy:
    """Selectors by (from-zone, protocol), port forwards likewise, and the gateways' G:g."""

    def __init__(self, config: Config) -> None:
        self.selectors: dict[tuple[str, int], list[Selector]] = {}
        self.agents: dict[tuple[int, int], AgEndpoint] = {}  # G:g -> the gateway (worker) listening there
        self.workers = worker_endpoints(config)
        for gw in config.gateways:
            for worker in self.workers[gw.name]:
                self.agents[(worker.addr, worker.port)] = worker
            ag = self.workers[gw.name][0]  # a selector names worker 0; ``spread`` picks the worker
            kind = KINDS[gw.kind]
            for t in gw.traffic:
                ports = tuple((r.first, r.last) for r in t.ports)
                sel = Selector(t, gw, ag, ports, nets(n for n in t.saddr if n.version == 4),
                               nets(n for n in t.daddr if n.version == 4),
                               kind.log_only(gw.settings), kind.adjacent_port(gw.settings),
                               nets(n for n in t.saddr if n.version == 6), nets(n for n in t.daddr if n.version == 6))
                self.selectors.setdefault((t.from_zone, PROTO[t.proto]), []).append(sel)
        self._forwards: dict[tuple[str, int], list[tuple[PortForward, Nets]]] = {}
        self._forwards6: dict[tuple[str, int], list[tuple[PortForward, Nets]]] = {}
        for f in config.nat.forward:
            by_zone = self._forwards if f.version == 4 else self._forwards6
            by_zone.setdefault((f.from_zone, PROTO[f.proto]), []).append((f, nets(f.saddr)))
        self._pool = nets([config.processor.pools.firewall_side])
        self._instances = len(config.processor.queues)
        self._client_bits = bucket_count(self._instances) - 1  # the low bits steer_client_src reads

    def client_instance(self, src: int) -> int:
        """The instance whose queue a client's requests go to (``steer_client_src``, firewall.rules.build)."""
        return (src & self._client_bits) % self._instances

    def gateway_leg(self, orig: tuple[int, int, int, int], reply: tuple[int, int, int, int]) -> bool:
        """Whether a connection is a leg of a binding, any instance's: leg A answers from a
        gateway's G:g, leg B goes to the firewall-side pool."""
        return (reply[0], reply[1]) in self.agents or inside(orig[2], self._pool)

    def selector(self, zone: str | None, proto: int, src: int, dst: int, dport: int,
                 six: bool = False) -> Selector | None:
        """The first selector of the ingress zone that names this packet (file order); ``six``:
        an IPv6 packet."""
        for candidate in self.selectors.get((zone, proto), ()):  # type: ignore[arg-type]
            if candidate.matches(src, dst, dport, six):
                return candidate
        return None

    def log_only_selector(self, proto: int, src: int, dst: int, dport: int, six: bool = False) -> Selector | None:
        """The first log-only selector, of any zone, that names this flow (adoption: the zone is not
        known); ``six``: an IPv6 flow, which only a selector that takes IPv6 names."""
        found = (s for (_, p), group in self.selectors.items() if p == proto
                 for s in group if s.log_only and s.matches(src, dst, dport, six)
                 and (not six or s.gateway.takes_ipv6(s.traffic)))
        return next(found, None)

    def forward_target(self, zone: str, proto: int, src: int, dport: int, six: bool = False) -> tuple[int, int] | None:
        """The port forward's S:s for a client that addressed the router, as the DNAT rule has it
        (``six``: an IPv6 client and the IPv6 forwards, DNAT66)."""
        for f, saddr in (self._forwards6 if six else self._forwards).get((zone, proto), ()):
            if f.ports.first <= dport <= f.ports.last and (not saddr or inside(src, saddr)):
                return int(f.to_addr), dport if f.to_port is None else f.to_port
        return None

    def forward_target_any(self, proto: int, src: int, dport: int, six: bool = False) -> tuple[int, int] | None:
        """A port forward's S:s from any zone (adoption: the ingress zone is not known)."""
        for zone, p in self._forwards6 if six else self._forwards:
            if p == proto:
                target = self.forward_target(zone, proto, src, dport, six)
                if target is not None:
                    return target
        return None
