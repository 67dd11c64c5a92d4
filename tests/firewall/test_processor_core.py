"""firewall.processor.core: playbooks of first packets, conntrack events and messages through the pure processor.

Datapath v2: only the first packet of each connection is queued (after
conntrack, ``ct state new``). Each test states the packets in (as the wire
carries them, built with scapy), the conntrack the fake kernel has, and what
comes out: the verdict and mark, the binding-table NAT elements that come
with the verdict (shown as ``Leg``s: original tuple -> DNAT, SNAT), and what
the core's ``take`` hands the runner: the signalling the gateways receive
and the kernel rule operations. Routes,
interface names, the router's addresses and conntrack look-ups are plain
functions of a fake router:

    ext 203.0.113.10 --- wan0 203.0.113.1 [router] lan0 192.168.1.1 --- lan 192.168.1.10
                                          |  dmz0 10.0.0.1 --- 10.0.0.0/24
                                          nfg-gw0 172.31.255.1 --- gateways 172.31.255.2

The firewall-side pool is 172.31.254.0/28 x 1024-65535 and hands out
172.31.254.0:1024, 172.31.254.1:1024, ... in that order; the SNAT pool W x
61000-65535 hands out 61000 first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.packet import Raw

from firewall.config import ConfigError, loads
from firewall.config.model import Processor
from firewall.control import ControlError, ask
from firewall.packet import TCP as TCP_PROTO
from firewall.packet import UDP as UDP_PROTO
from firewall.processor.core import DROP, PASS, Outputs, ProcessorCore, Route
from firewall.processor.kernel import Connection
from firewall.processor.rulebook import KernelOp, KernelRule
from firewall.processor.runner import COMMANDS, CONTROL_MAX_REQUEST, FLOWS_LIMIT_MAX
from firewall.rules.bind import DNAT_MAP, LEGB_DNAT_MAP, LEGB_SNAT_MAP, SNAT_MAP
from firewall.signalling import (
    Answer,
    Counters,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    Guard,
    NewFlow,
    NotFound,
    Proto,
    Query,
    Received,
    Role,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
)
from tests.firewall.test_control import selector_server

MAX_RULES_PER_FLOW = Processor().max_rules_per_flow

KEY = bytes(range(32))
T0 = 1000.0  # monotonic
WALL0 = 1_700_000_000.0
MASK = 0x00FF0000
MARK = 0x00010000  # rewritten: a bound first packet
PASSED = 0x00020000
QOS = 0x00000007  # a bit outside nfgate's mask: must survive every verdict

C = "203.0.113.10"  # ext client
W = "203.0.113.1"  # router wan
S = "192.168.1.10"  # lan server
L = "192.168.1.1"  # router lan
G = "172.31.255.2"  # gateways
R = "172.31.255.1"  # router, blind track
F0 = ("172.31.254.0", 1024)  # the firewall-side pool's first endpoint
F1 = ("172.31.254.1", 1024)  # and its second
IF = {2: "wan0", 3: "lan0", 4: "nfg-gw0", 5: "dmz0", 1: "lo"}
WAN0, LAN0, BLIND, DMZ0 = 2, 3, 4, 5
PEER = {"relay": (G, 7500), "ftp": (G, 7501), "rtp": (G, 7502)}  # each gateway's signalling port

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[zones.dmz]
interfaces = ["dmz0"]

[nat]
masquerade = ["wan"]
[[nat.forward]]
from = "wan"
proto = "tcp"
port = 8443
to = "192.168.1.10:443"
[[nat.forward]]
from = "wan"
proto = "tcp"
port = 21
to = "192.168.1.10"

[processor.timeouts]
confirm = 5
nat_element = 10
{pools}

[[gateway]]
name = "relay"
kind = "tcp-relay"
listen_port = 20000
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000

[[gateway]]
name = "ftp"
kind = "ftp"
listen_port = 20021
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[[gateway]]
name = "rtp"
kind = "rtp"
listen_port = 20040
[gateway.settings]
adjacent = "processor"  # RTCP's port opened by the processor itself
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "udp"
ports = "10000-10100"
"""


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def ep(addr: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.IPv4Address(addr), port)


def pair(e: Endpoint) -> tuple[str, int]:
    return str(e.address), e.port


def ints(t: tuple[str, int, str, int]) -> tuple[int, int, int, int]:
    return ip(t[0]), t[1], ip(t[2]), t[3]


def route(dst: int) -> Route | None:
    if dst > 0xFFFFFFFF:
        return None  # an IPv6 destination (the IPv6 path's own tests route those: test_processor_six.py)
    a = ipaddress.IPv4Address(dst)
    if str(a) in (W, L, R, "10.0.0.1"):
        return Route(True, "lo", dst)
    if a in ipaddress.IPv4Network("192.168.1.0/24"):
        return Route(False, "lan0", ip(L))
    if a in ipaddress.IPv4Network("10.0.0.0/24"):
        return Route(False, "dmz0", ip("10.0.0.1"))
    if a in ipaddress.IPv4Network("172.31.254.0/23"):
        return Route(False, "nfg-gw0", ip(R))
    return Route(False, "wan0", ip(W))


class Leg(NamedTuple):
    """A pair of binding-table elements: the connection's original tuple, its DNAT and its SNAT."""

    proto: str
    key: tuple[str, int, str, int]
    dnat: tuple[str, int]
    snat: tuple[str, int]


def legs(ops: list[Any]) -> list[Leg]:
    """A verdict's NAT elements read back: each leg is a DNAT_MAP element then a SNAT_MAP one, same key."""
    assert len(ops) % 2 == 0, ops
    s = lambda a: str(ipaddress.IPv4Address(a))  # noqa: E731
    out = []
    for (m1, p1, k1, v1), (m2, p2, k2, v2) in zip(ops[::2], ops[1::2]):
        assert (m1, m2) == (DNAT_MAP, SNAT_MAP) and p1 == p2 and k1 == k2, ops
        out.append(Leg(p1, (s(k1[0]), k1[1], s(k1[2]), k1[3]), (s(v1[0]), v1[1]), (s(v2[0]), v2[1])))
    return out


class Rig:
    """A core with a fake router and a fake conntrack around it, and the gateway layer's end of signalling."""

    def __init__(self, pools: str = "", push: bool = True, extra: str = "", config: str = CONFIG) -> None:
        self.config = loads(config.replace("{pools}", pools) + extra)
        self.alive: set[tuple[int, ...]] = set()  # (proto, src, sport, dst, dport): conntrack's original tuples
        self.closing: set[tuple[int, ...]] = set()  # those of them past ESTABLISHED (TCP)
        self.lookups: list[tuple[int, ...]] = []
        self.local = [W, L, R, "10.0.0.1"]
        self.core = ProcessorCore(
            self.config, 0, Encoder(KEY, Role.PROCESSOR), Guard(KEY, Role.PROCESSOR, now=WALL0),
            route=route, ifname=IF.get,
            local_addresses=lambda: [ipaddress.IPv4Address(a) for a in self.local],
            conntrack=self.conntrack, closing=lambda *t: t in self.closing, now=T0, wall=WALL0, push=push,
        )
        self.gw_guard = Guard(KEY, Role.GATEWAY, now=WALL0)
        self.gw_encoder = Encoder(KEY, Role.GATEWAY)
        self.now = T0
        self.nat_ops: list[Any] = []  # the elements of the verdicts so far, until ``ops`` reads them
        # Leg B's elements written ahead with leg A's: (proto, G, F, f) -> (S:s, C:c or W:w)
        self.ahead: dict[tuple[int, ...], tuple[tuple[int, int], tuple[int, int]]] = {}
        self._out = Outputs()

    @property
    def out(self) -> Outputs:
        """What the core asked for since the rig's lists were last cleared (the runner's part)."""
        got = self.core.take()
        for name in ("kernel_ops", "unbind", "ct_deletes", "datagrams"):
            getattr(self._out, name).extend(getattr(got, name))
        return self._out

    # ---- the fake kernel ----------------------------------------------------------------

    def conntrack(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool:
        self.lookups.append((proto, src, sport, dst, dport))
        return (proto, src, sport, dst, dport) in self.alive

    def confirm(self, leg: Leg) -> None:
        """Conntrack now has this leg's connection."""
        self.alive.add((PROTO[leg.proto], *ints(leg.key)))

    def forget(self, leg: Leg) -> None:
        self.alive.discard((PROTO[leg.proto], *ints(leg.key)))

    def destroyed(self, proto: str, orig: tuple[str, int, str, int], reply: tuple[str, int, str, int],
                  counters: Counters = Counters()) -> None:
        """A ctnetlink destroy event for a connection with nfgate's mark."""
        self.alive.discard((PROTO[proto], *ints(orig)))
        self.core.conntrack_destroyed(PROTO[proto], ints(orig), ints(reply), self.now, counters)

    # ---- packets ------------------------------------------------------------------------

    def send(self, pkt: Any, indev: int, mark: int = QOS) -> tuple[int, Any, int]:
        verdict = self.core.handle(bytes(pkt), mark, indev, self.now)
        self.nat_ops += verdict[1]
        return verdict

    def ops(self) -> list[Leg]:
        """The exact legs of the verdicts since last asked; leg B's elements written ahead go to ``ahead``."""
        exact = [op for op in self.nat_ops if op[0] in (DNAT_MAP, SNAT_MAP)]
        early = [op for op in self.nat_ops if op[0] not in (DNAT_MAP, SNAT_MAP)]
        for (m1, p1, k1, v1), (m2, p2, k2, v2) in zip(early[::2], early[1::2]):
            assert (m1, m2) == (LEGB_DNAT_MAP, LEGB_SNAT_MAP) and p1 == p2 and k1 == k2, early
            self.ahead[(PROTO[p1], *k1)] = (v1, v2)
        out = legs(exact)
        self.nat_ops.clear()
        return out

    def bound(self, pkt: Any, indev: int, mark: int = QOS) -> Leg:
        """A first packet the processor bound: PASS with the ``rewritten`` mark, and one leg's NAT."""
        verdict, elements, out_mark = self.send(pkt, indev, mark)
        assert verdict == PASS and len(elements) in (0, 2, 4), dict(self.core.counters)
        assert out_mark == (mark & ~MASK & 0xFFFFFFFF) | MARK
        found = self.ops()
        if not elements:
            # Leg B with no transaction: the kernel finds the elements written with leg A.
            assert indev == BLIND
            i = pkt[IP]
            dnat, snat = self.ahead[(i.proto, ip(i.src), ip(i.dst), i.dport)]
            s = lambda a: str(ipaddress.IPv4Address(a))  # noqa: E731
            found = [Leg(PROTO_NAME[i.proto], (i.src, i.sport, i.dst, i.dport), (s(dnat[0]), dnat[1]), (s(snat[0]), snat[1]))]
        (leg,) = found
        return leg

    def dropped(self, pkt: Any, indev: int, why: str) -> None:
        """A packet dropped for ``why``: its mark untouched, no NAT, no signalling."""
        before = self.core.counters[why]
        assert self.send(pkt, indev) == (DROP, (), QOS), dict(self.core.counters)
        assert self.core.counters[why] == before + 1, dict(self.core.counters)
        assert self.nat_ops == [] and self.out.datagrams == []

    # ---- signalling ---------------------------------------------------------------------

    def received(self) -> list[tuple[Any, tuple[str, int]]]:
        """What the gateway layer got since last asked (duplicates folded by its Guard)."""
        out = []
        for data, peer in self.out.datagrams:
            got = self.gw_guard.check(data, self.now - T0 + WALL0)
            if isinstance(got, Received):
                out.append((got.message, peer))
        self.out.datagrams.clear()
        return out

    def messages(self) -> list[Any]:
        return [m for m, _ in self.received()]

    def ask(self, msg: Any, source: tuple[str, int] = (G, 7500)) -> list[Any]:
        """``msg`` from a gateway's signalling port (the relay's unless ``source`` says); the replies."""
        self.core.datagram(self.gw_encoder.encode(msg, self.now - T0 + WALL0), source, self.now)
        return self.messages()

    def kernel(self, ok: bool = True) -> list[KernelOp]:
        """Complete every queued kernel operation; return them."""
        ops = list(self.out.kernel_ops)
        self.out.kernel_ops.clear()
        for op in ops:
            self.core.kernel_done(op.token, ok, self.now)
        return ops

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.core.tick(self.now, self.now - T0 + WALL0)


PROTO = {"tcp": TCP_PROTO, "udp": UDP_PROTO}
PROTO_NAME = {v: k for k, v in PROTO.items()}


def tcp(src: str, sport: int, dst: str, dport: int, flags: str = "S", data: bytes = b"") -> Any:
    pkt = IP(src=src, dst=dst) / ScapyTCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000)
    return pkt / Raw(data) if data else pkt


def udp(src: str, sport: int, dst: str, dport: int, data: bytes = b"x") -> Any:
    return IP(src=src, dst=dst) / ScapyUDP(sport=sport, dport=dport) / Raw(data)


def open_inbound(rig: Rig, sport: int = 40000, port: int = 8443) -> tuple[Any, Leg]:
    """C's SYN to the router's port: leg A into the gateway, pushed first. (flow info, leg A)"""
    leg = rig.bound(tcp(C, sport, W, port, "S"), WAN0)
    pushes = rig.received()
    assert len(pushes) == 1 and isinstance(pushes[0][0], NewFlow)
    flow = pushes[0][0].flow
    # To the signalling port of the gateway the flow belongs to: 7500 + its index.
    assert pushes[0][1] == PEER[flow.gateway]
    assert leg == Leg("tcp", (C, sport, W, port), pair(flow.ag), pair(flow.firewall_side))
    return flow, leg


def leg_b(rig: Rig, flow: Any, eport: int) -> Leg:
    """The gateway's SYN from G:eport to the flow's F:f on the blind track: leg B."""
    F, f = pair(flow.firewall_side)
    return rig.bound(tcp(G, eport, F, f, "S"), BLIND)


def reply_a(flow: Any) -> tuple[str, int, str, int]:
    """Leg A's reply tuple in conntrack: G:g -> F:f."""
    return (*pair(flow.ag), *pair(flow.firewall_side))


# ---- the two legs ---------------------------------------------------------------------


def test_port_forward_flow_through_both_legs() -> None:
    rig = Rig()
    flow, a = open_inbound(rig)
    assert rig.core.counters["signalling.copies"] == 3  # signalling.copies, back to back
    assert (flow.gateway, flow.ag) == ("relay", ep(G, 20000))
    assert str(flow.client) == f"{C}:40000"
    assert str(flow.original_dst) == f"{W}:8443"
    assert str(flow.server) == f"{S}:443"  # the port forward's target, done by the binding
    assert flow.snat is None
    # Leg A: C:40000 -> W:8443 becomes F:f -> G:20000, F:f the pool's first endpoint.
    assert a == Leg("tcp", (C, 40000, W, 8443), (G, 20000), F0)

    # Leg B: the gateway swaps to F:f from its own port e; the server sees the real client.
    b = leg_b(rig, flow, 51000)
    assert b == Leg("tcp", (G, 51000, *F0), (S, 443), (C, 40000))
    # A retransmission of leg B's SYN (no reply yet: conntrack still calls it new) gets the same elements.
    assert leg_b(rig, flow, 51000) == b
    assert rig.received() == []  # one push per flow
    assert len(rig.core.table) == 1 and rig.core.stats()["counters"]["verdict.bound"] == 3


def test_leg_bs_elements_go_in_with_leg_as_and_its_verdict_needs_no_transaction() -> None:
    """Leg A's verdict carries leg B's pair too, keyed by (G, F, f); leg B's first packet then
    comes with no element while those live (nat_element - 2 s: 8 s here), and with its exact
    pair after that, or for a binding adopted after a restart (nothing was written ahead)."""
    rig = Rig()
    verdict, elements, _ = rig.send(tcp(C, 40000, W, 8443, "S"), WAN0)
    g, f0 = ip(G), (ip(F0[0]), F0[1])
    assert elements[2:] == ((LEGB_DNAT_MAP, "tcp", (g, *f0), (ip(S), 443)), (LEGB_SNAT_MAP, "tcp", (g, *f0), (ip(C), 40000)))
    (push,) = rig.messages()
    assert rig.send(tcp(G, 51000, *F0, "S"), BLIND)[1] == ()  # in time: no transaction
    rig.nat_ops.clear()
    late, a = open_inbound(rig, sport=40001)
    rig.confirm(a)  # alive in conntrack: its confirmation check keeps it
    rig.tick(8)
    verdict, elements, _ = rig.send(tcp(G, 51001, *pair(late.firewall_side), "S"), BLIND)
    assert verdict == PASS and legs(list(elements)) == [Leg("tcp", (G, 51001, *pair(late.firewall_side)), (S, 443), (C, 40001))]

    restarted = Rig()
    conn = [Connection(6, ints((C, 40000, W, 8443)), ints((G, 20000, *F0)))]
    assert restarted.core.adopt(conn, restarted.now) == 1
    verdict, elements, _ = restarted.send(tcp(G, 51000, *F0, "S"), BLIND)
    assert legs(list(elements)) == [Leg("tcp", (G, 51000, *F0), (S, 443), (C, 40000))]


def test_a_flow_the_router_terminates_gets_no_leg_b_elements() -> None:
    rig = Rig(extra=TERMINATING)
    verdict, elements, _ = rig.send(tcp(C, 40000, W, 7000, "S"), WAN0)
    assert verdict == PASS and [op[0] for op in elements] == [DNAT_MAP, SNAT_MAP]


TERMINATING = """
[[gateway]]
name = "term"
kind = "tcp-relay"
listen_port = 20070
[[gateway.traffic]]
from = "wan"
to = "router"
proto = "tcp"
ports = 7000
"""


def test_the_mark_keeps_the_bits_outside_nfgates_mask() -> None:
    rig = Rig()
    verdict, _, mark = rig.send(tcp(C, 40000, W, 8443), WAN0, mark=0x12FF0007)
    assert (verdict, mark) == (PASS, 0x12010007)
    verdict, _, mark = rig.send(tcp(C, 40000, W, 22), WAN0, mark=0x12FF0007)  # not a selector
    assert (verdict, mark) == (PASS, 0x12020007)
    verdict, _, mark = rig.send(tcp(C, 40001, W, 8443, "A"), WAN0, mark=0x12FF0007)
    assert (verdict, mark) == (DROP, 0x12FF0007)  # a drop leaves the mark alone


def test_outbound_flow_is_snatted_by_the_binding() -> None:
    rig = Rig()
    a = rig.bound(tcp(S, 5555, C, 9000, "S"), LAN0)
    ((msg, peer),) = rig.received()
    flow = msg.flow
    assert peer == PEER["relay"]
    assert (str(flow.client), str(flow.server), str(flow.original_dst)) == (f"{S}:5555", f"{C}:9000", f"{C}:9000")
    # The route to C leaves through masquerade: leg B gets W and the SNAT pool's first port.
    assert flow.snat == ep(W, 61000)
    assert a == Leg("tcp", (S, 5555, C, 9000), (G, 20000), F0)
    b = leg_b(rig, flow, 52000)
    assert b == Leg("tcp", (G, 52000, *F0), (C, 9000), (W, 61000))
    assert rig.core.stats()["pools"]["snat"] == {W: {"used": 1, "capacity": 4536, "exhausted": 0}}


def test_not_a_selector_and_wrong_zone_pass_to_the_kernel() -> None:
    rig = Rig()
    # lan -> dmz:3333 is no selector.
    assert rig.send(tcp(S, 8443, "10.0.0.5", 3333, "SA"), LAN0) == (PASS, (), QOS | PASSED)
    # lan -> dmz:9000: the selector is lan -> wan, so it passes whatever its flags.
    for flags in ("S", "A", "FA"):
        assert rig.send(tcp(S, 6000, "10.0.0.5", 9000, flags), LAN0) == (PASS, (), QOS | PASSED)
    # Port 9000 is a selector from lan, not from wan.
    assert rig.send(tcp(C, 7000, W, 9000, "S"), WAN0)[0] == PASS
    c = rig.core.counters
    assert (c["passed.not_a_selector"], c["passed.other_zone"], c["verdict.pass"]) == (2, 3, 5)
    assert len(rig.core.table) == 0 and rig.received() == [] and rig.nat_ops == []


def test_non_first_packets_and_gateway_packets_without_a_binding_are_dropped() -> None:
    rig = Rig()
    # A selector's packet that is not a bare SYN cannot open a flow.
    for flags in ("A", "PA", "SA", "R", "SF"):
        rig.dropped(tcp(S, 5555, C, 9000, flags), LAN0, "drop.not_new_flow")
    # From the blind track, to an F:f nobody holds.
    rig.dropped(tcp(G, 51000, "172.31.254.3", 2000, "S"), BLIND, "drop.gateway_without_binding")
    flow, _ = open_inbound(rig)
    F, f = pair(flow.firewall_side)
    # G:g -> F:f is leg A's reply, which conntrack carries: never a new connection.
    rig.dropped(tcp(G, 20000, F, f, "S"), BLIND, "drop.gateway_without_binding")
    rig.dropped(tcp(G, 20000, F, f, "SA"), BLIND, "drop.gateway_without_binding")
    # Another host on the blind track, and another F:f.
    rig.dropped(tcp("172.31.255.3", 51000, F, f, "S"), BLIND, "drop.gateway_without_binding")
    rig.dropped(tcp(G, 51000, F, f + 1, "S"), BLIND, "drop.gateway_without_binding")
    # Leg B must start with a bare SYN.
    rig.dropped(tcp(G, 51000, F, f, "A"), BLIND, "drop.not_new_flow")
    assert rig.core.table.by_firewall_side(TCP_PROTO, ip(F), f).ag_eport is None
    assert rig.core.counters["drop.gateway_without_binding"] == 5 and rig.core.counters["verdict.drop"] == 11


# ---- impossible sources -----------------------------------------------------------------


MARTIANS = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.255.255.254", "224.0.0.251", "239.255.255.250",
            "240.0.0.1", "255.255.255.255"]


def test_martian_sources_are_dropped_before_anything_else() -> None:
    rig = Rig()
    for src in MARTIANS:
        rig.dropped(tcp(src, 40000, W, 8443, "S"), WAN0, "drop.martian")  # a selector's SYN
        rig.dropped(udp(src, 4000, C, 10050), LAN0, "drop.martian")  # a UDP selector
        rig.dropped(tcp(src, 40000, W, 22, "S"), WAN0, "drop.martian")  # no selector: not even passed
        rig.dropped(tcp(src, 40000, W, 8443, "A"), WAN0, "drop.martian")  # and before "not new"
    assert rig.core.counters["drop.martian"] == 4 * len(MARTIANS)
    assert len(rig.core.table) == 0 and len(rig.core.fw_pool) == 0 and rig.core.counters["flows.opened"] == 0
    # Just outside those ranges: ordinary clients, bound.
    for n, src in enumerate(["1.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.255"]):
        assert rig.bound(tcp(src, 40000, W, 8443, "S"), WAN0).key == (src, 40000, W, 8443)
    assert len(rig.messages()) == 4


def test_the_routers_own_addresses_are_not_a_source_from_outside() -> None:
    rig = Rig()
    for src in (W, L, R, "10.0.0.1"):
        rig.dropped(tcp(src, 40000, W, 8443, "S"), WAN0, "drop.own_address")
        rig.dropped(tcp(src, 5555, C, 9000, "S"), LAN0, "drop.own_address")
    assert len(rig.core.table) == 0 and rig.core.counters["flows.opened"] == 0
    # The address list is read at most every 10 seconds.
    rig.local.append("203.0.113.77")
    rig.now += 9
    rig.bound(tcp("203.0.113.77", 40000, W, 8443, "S"), WAN0)
    rig.messages()
    rig.now += 1
    rig.dropped(tcp("203.0.113.77", 40001, W, 8443, "S"), WAN0, "drop.own_address")


# ---- malformed input -------------------------------------------------------------------


GARBAGE = {
    "too_short": b"\x45\x00\x00",
    "not_ipv4": bytes(IP(version=5, src=C, dst=W) / ScapyTCP(dport=8443)),
    "bad_ihl": bytes.fromhex("42000028") + bytes(36),
    "bad_total_length": bytes(IP(len=12, src=C, dst=W) / ScapyTCP(dport=8443)),
    "truncated": bytes(IP(len=200, src=C, dst=W) / ScapyTCP(dport=8443))[:30],  # cut inside its TCP header
    "fragment": bytes(IP(frag=10, src=C, dst=W) / Raw(b"x" * 24)),
    "unsupported_protocol": bytes(IP(proto=47, src=C, dst=W) / Raw(b"x" * 24)),
    "l4_truncated": bytes(IP(src=C, dst=W, proto=6) / Raw(b"x" * 10)),
    "bad_tcp_offset": bytes(IP(src=C, dst=W) / ScapyTCP(dport=8443, dataofs=15, flags="S")),
    "bad_udp_length": bytes(IP(src=S, dst=C) / ScapyUDP(dport=10000, len=4) / Raw(b"x" * 8)),
}


def test_garbage_is_dropped_and_counted_by_reason() -> None:
    rig = Rig()
    for reason, payload in GARBAGE.items():
        verdict, out, mark = rig.core.handle(payload, QOS, WAN0, T0)
        assert (verdict, out, mark) == (DROP, (), QOS), reason
        assert rig.core.counters[f"drop.malformed.{reason}"] == 1, reason
    assert rig.core.counters["verdict.drop"] == len(GARBAGE)
    first_fragment = bytes(IP(flags="MF", src=C, dst=W) / ScapyTCP(dport=8443, flags="S"))
    assert rig.core.handle(first_fragment, 0, WAN0, T0)[0] == DROP
    assert rig.core.counters["drop.fragment"] == 1
    assert not rig.core.take() and len(rig.core.table) == 0


def test_a_first_packet_above_the_copy_range_is_bound_from_its_headers() -> None:
    """netfilterqueue hands over at most 4016 bytes of a packet: a 65507-byte
    datagram's first 4016 bytes get the verdict its whole would (issue 14 F)."""
    rig = Rig()
    big = bytes(udp(S, 4000, C, 10050, b"x" * 65507))
    verdict, elements, _ = rig.core.handle(big[:4016], QOS, LAN0, T0)
    assert verdict == PASS and elements, dict(rig.core.counters)
    assert not any(k.startswith("drop.") for k in rig.core.counters)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([WAN0, LAN0, BLIND, 99]))
def test_handle_never_raises(data: bytes, indev: int) -> None:
    rig = Rig()
    verdict, elements, _ = rig.core.handle(data, 0, indev, T0)
    assert verdict in (DROP, PASS)
    legs([op for op in elements if op[0] in (DNAT_MAP, SNAT_MAP)])  # whole legs only
    assert len(elements) in ((2, 4) if verdict == PASS and rig.core.bound else (0,))


# ---- one leg B at a time ----------------------------------------------------------------


def test_a_second_leg_b_waits_until_conntrack_has_lost_the_first() -> None:
    rig = Rig()
    flow, _ = open_inbound(rig)
    first = leg_b(rig, flow, 51000)
    rig.confirm(first)  # conntrack has G:51000 -> F:f
    rig.lookups.clear()
    rig.dropped(tcp(G, 51001, *F0, "S"), BLIND, "drop.leg_b_busy")
    assert rig.lookups == [(TCP_PROTO, ip(G), 51000, ip(F0[0]), F0[1])]
    b = rig.core.table.by_firewall_side(TCP_PROTO, ip(F0[0]), F0[1])
    assert b.ag_eport == 51000
    # The first leg B is gone without an event reaching us (its SYN was never answered): the new one takes over.
    rig.forget(first)
    assert leg_b(rig, flow, 51001) == Leg("tcp", (G, 51001, *F0), (S, 443), (C, 40000))
    assert b.ag_eport == 51001
    # The old leg B's destroy event is then not this binding's.
    rig.destroyed("tcp", (G, 51000, *F0), (S, 443, C, 40000))
    assert rig.core.counters["conntrack.destroy_unknown"] == 1 and b in rig.core.table
    # Once the current leg B's destroy is seen, another may start without a look-up.
    rig.destroyed("tcp", (G, 51001, *F0), (S, 443, C, 40000))
    rig.lookups.clear()
    assert leg_b(rig, flow, 51002).key == (G, 51002, *F0)
    assert rig.lookups == [] and rig.messages() == []


def test_no_new_leg_b_once_leg_a_is_gone() -> None:
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.confirm(a)
    b = leg_b(rig, flow, 51000)
    rig.confirm(b)
    rig.destroyed("tcp", a.key, reply_a(flow))  # the client has gone; leg B lives on
    assert rig.messages() == [] and len(rig.core.table) == 1
    rig.dropped(tcp(G, 51001, *F0, "S"), BLIND, "drop.flow_ended")
    assert leg_b(rig, flow, 51000) == b  # its own SYN again is still leg B's
    rig.destroyed("tcp", b.key, (S, 443, C, 40000))
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN)]


# ---- a new connection on a bound client tuple -------------------------------------------


def test_a_leg_b_made_again_after_its_connection_was_destroyed_keeps_the_binding() -> None:
    """The server's TIME-WAIT answered leg B's SYN with an ACK, the gateway reset it (conntrack
    destroyed the leg) and sent its SYN again from the same G:e: the leg lives again, so leg A's
    end does not end the binding (it ended it, and the live leg B then blocked the client's
    next connection on its port)."""
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.confirm(a)
    b = leg_b(rig, flow, 51000)
    rig.destroyed("tcp", b.key, (S, 443, C, 40000))  # reset before it was established
    assert leg_b(rig, flow, 51000) == b
    rig.confirm(b)
    rig.destroyed("tcp", a.key, reply_a(flow))
    assert rig.messages() == [] and len(rig.core.table) == 1  # leg B lives: no end yet
    rig.destroyed("tcp", b.key, (S, 443, C, 40000))
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN)]


def both_legs(rig: Rig) -> tuple[Any, Leg, Leg]:
    """An inbound flow with both legs in conntrack, and nothing asked of the kernel yet: (flow, leg A, leg B)."""
    flow, a = open_inbound(rig)
    rig.confirm(a)
    b = leg_b(rig, flow, 51000)
    rig.confirm(b)
    rig.out.ct_deletes.clear()
    return flow, a, b


def test_a_second_leg_b_while_the_first_is_closing_takes_its_place() -> None:
    """Conntrack reopens leg A in CLOSE after an RST, NAT and all, so the client's next
    connection from the same port reaches the gateway on the same binding; the old leg B,
    closing, goes before the new one's verdict. A live one still refuses it."""
    rig = Rig()
    flow, a, b = both_legs(rig)
    rig.dropped(tcp(G, 51001, *pair(flow.firewall_side), "S"), BLIND, "drop.leg_b_busy")  # established: refused
    rig.closing.add((6, *ints(b.key)))
    leg_b(rig, flow, 51002)
    assert rig.out.ct_deletes == [(6, *ints(b.key))]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 1


def test_a_replaced_binding_s_closing_leg_b_goes_before_the_new_one_s_leg_b() -> None:
    """The old leg B may sit in TIME-WAIT for conntrack's 120 s; its reply tuple, S:s -> C:c, is
    the new leg B's, and conntrack refused the new one (insert_failed) until it timed out: the
    client's connection was accepted by the gateway and then hung. It goes at the new leg B's
    verdict, not the new leg A's: a client that connects again at once may come before the
    gateway has passed the old connection's last FIN on to the server, which must find its leg."""
    rig = Rig()
    old, a, b = both_legs(rig)
    rig.forget(a)  # a SYN ended leg A's TIME-WAIT; leg B's lives on
    rig.bound(tcp(C, 40000, W, 8443, "S"), WAN0)  # the same client port again
    assert rig.out.ct_deletes == []  # the gateway may still be closing the old leg B
    end, push = rig.messages()
    assert end == FlowEnd(old.flow_id, FlowEndReason.FIN)
    leg_b(rig, push.flow, 51001)
    assert rig.out.ct_deletes == [(6, *ints(b.key))]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 1 and rig.core.counters["flows.replaced"] == 1
    rig.out.ct_deletes.clear()
    leg_b(rig, push.flow, 51001)  # its SYN again: nothing more to delete
    assert rig.out.ct_deletes == []


def test_a_replacing_binding_that_ends_before_its_leg_b_takes_the_old_leg_b_with_it() -> None:
    """The new connection's leg B never came (the client gave up): the old leg B goes with the
    new binding's end, so that the client's next connection from the port does not meet it."""
    rig = Rig()
    old, a, b = both_legs(rig)
    rig.forget(a)
    a2 = rig.bound(tcp(C, 40000, W, 8443, "S"), WAN0)
    rig.messages()
    rig.confirm(a2)
    assert rig.out.ct_deletes == []
    rig.destroyed("tcp", (C, 40000, W, 8443), (G, 20000, *F1))  # its leg A ends; no leg B ever
    assert rig.out.ct_deletes == [(6, *ints(b.key))]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 1


def test_a_replacement_that_makes_no_binding_deletes_the_old_leg_b_at_once() -> None:
    """A packet that replaces the binding but gets none of its own (not a first packet here):
    nothing will take the old leg B later, and a connection the kernel carries on that tuple
    would clash with it as a new leg B would."""
    rig = Rig()
    old, a, b = both_legs(rig)
    rig.forget(a)
    assert rig.send(tcp(C, 40000, W, 8443, "A"), WAN0)[0] == DROP
    assert rig.core.counters["drop.not_new_flow"] == 1
    assert rig.messages() == [FlowEnd(old.flow_id, FlowEndReason.FIN)]
    assert rig.out.ct_deletes == [(6, *ints(b.key))]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 1


def test_a_new_first_packet_on_a_bound_tuple_replaces_the_binding() -> None:
    """RFC 9293 3.10.7.4: a client may reuse its port; the old connection is gone from conntrack."""
    rig = Rig()
    old, a = open_inbound(rig)
    assert a.snat == F0
    rig.confirm(a)
    rig.tick(6)  # its confirmation check found it in conntrack
    rig.forget(a)  # and now it is gone (a SYN ended its TIME-WAIT)
    a2 = rig.bound(tcp(C, 40000, W, 8443, "S"), WAN0)  # the same client port again
    end, push = rig.messages()
    assert end == FlowEnd(old.flow_id, FlowEndReason.FIN)  # the old one's end goes first
    new = push.flow
    assert new.flow_id != old.flow_id and pair(new.firewall_side) == F1
    assert a2 == Leg("tcp", (C, 40000, W, 8443), (G, 20000), F1)
    assert rig.core.counters["flows.replaced"] == 1 and rig.core.counters["flows.ended.fin"] == 1
    assert len(rig.core.table) == 1 and len(rig.core.fw_pool) == 1
    # The old connection's destroy event names the old F:f: not the new binding's end.
    rig.destroyed("tcp", (C, 40000, W, 8443), (G, 20000, *F0))
    assert rig.core.counters["conntrack.destroy_unknown"] == 1
    assert len(rig.core.table) == 1 and rig.messages() == []
    # Its own destroy event ends it.
    rig.destroyed("tcp", (C, 40000, W, 8443), (G, 20000, *F1))
    assert rig.messages() == [FlowEnd(new.flow_id, FlowEndReason.FIN)]


def test_a_udp_flow_replaced_ends_idle() -> None:
    rig = Rig()
    a = rig.bound(udp(S, 4000, C, 10050), LAN0)
    (first,) = rig.messages()
    rig.confirm(a)
    rig.tick(6)
    rig.forget(a)  # conntrack's UDP timeout ended it
    rig.bound(udp(S, 4000, C, 10050), LAN0)
    end, push = rig.messages()
    assert end == FlowEnd(first.flow.flow_id, FlowEndReason.IDLE) and isinstance(push, NewFlow)
    assert rig.core.stats()["pools"]["snat"][W]["used"] == 1  # the old W:w went back


def test_a_datagram_queued_behind_a_young_bindings_first_keeps_its_binding() -> None:
    """Conntrack confirms a connection when its first packet leaves the router; a datagram
    that comes before that (queued in the same batch, or before the verdict) is a connection
    of its own to conntrack, queued too, and merged into the first at confirmation. It is
    the young binding's, not a new flow that replaces it (at 300 RTP streams, 700 were)."""
    rig = Rig()
    rig.bound(udp(S, 4000, C, 10050), LAN0)
    (first,) = rig.messages()
    for _ in range(3):  # not in conntrack yet, and no conntrack look-up asked
        verdict, elements, mark = rig.send(udp(S, 4000, C, 10050), LAN0)
        assert (verdict, elements, mark) == (PASS, (), QOS | MARK)
    assert rig.messages() == [] and rig.lookups == []
    counters = rig.core.stats()["counters"]
    assert counters["passed.bound_young"] == 3 and "flows.replaced" not in counters
    assert rig.core.stats()["flows"] == 1


def test_a_retransmitted_first_packet_keeps_its_binding() -> None:
    """Conntrack calls every packet of a connection ``new`` until it has seen a reply, so the
    steering rules queue a retransmitted SYN too. The kernel has already NATed that connection
    to F0 (NAT runs once per connection): the binding must stay as it is."""
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.confirm(a)  # the first SYN made it into conntrack
    verdict, _, mark = rig.send(tcp(C, 40000, W, 8443, "S"), WAN0)
    assert (verdict, mark) == (PASS, QOS | MARK)
    assert rig.messages() == []  # no FLOW_END, no second NEW_FLOW
    assert rig.core.table.by_firewall_side(TCP_PROTO, ip(F0[0]), F0[1]) is not None


# ---- lifetime: conntrack's destroy events ------------------------------------------------


def test_leg_a_alone_ends_the_binding_when_leg_b_never_started() -> None:
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.confirm(a)
    rig.destroyed("tcp", a.key, reply_a(flow))
    assert rig.received() == [(FlowEnd(flow.flow_id, FlowEndReason.FIN), PEER["relay"])]
    assert len(rig.core.table) == 0 and len(rig.core.fw_pool) == 0
    assert rig.core.counters["flows.ended.fin"] == 1
    assert rig.core.binding(flow.flow_id) is None


@pytest.mark.parametrize("first", ["a", "b"])
def test_the_binding_ends_with_the_last_of_its_two_legs(first: str) -> None:
    rig = Rig()
    flow, a = open_inbound(rig, port=21)  # the ftp gateway: its FLOW_END goes to 7501
    b = leg_b(rig, flow, 51000)
    rig.confirm(a)
    rig.confirm(b)
    events = {"a": ("tcp", a.key, reply_a(flow)), "b": ("tcp", b.key, (S, 21, C, 40000))}
    rig.destroyed(*events[first])
    assert rig.received() == [] and len(rig.core.table) == 1
    rig.destroyed(*events["b" if first == "a" else "a"])
    assert rig.received() == [(FlowEnd(flow.flow_id, FlowEndReason.FIN), PEER["ftp"])]
    assert len(rig.core.table) == 0 and len(rig.core.fw_pool) == 0


def test_leg_a_gone_and_leg_b_never_confirmed_ends_the_binding() -> None:
    """Leg B's first packet was dropped after the verdict: no event will ever come for it."""
    rig = Rig()
    flow, a = open_inbound(rig)
    b = leg_b(rig, flow, 51000)
    rig.confirm(a)  # leg B is not in conntrack
    rig.lookups.clear()
    rig.destroyed("tcp", a.key, reply_a(flow))
    assert rig.lookups == [(TCP_PROTO, *ints(b.key))]
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN)]


def test_a_snatted_udp_flow_gives_both_pools_back_and_ends_idle() -> None:
    rig = Rig()
    a = rig.bound(udp(S, 4000, C, 10050), LAN0)
    (push,) = rig.messages()
    flow = push.flow
    (adjacent,) = rig.kernel()  # the processor's own expectation for RTCP on 10051
    assert flow.snat == ep(W, 61000)
    b = rig.bound(udp(G, 39000, *pair(flow.firewall_side)), BLIND)
    assert b == Leg("udp", (G, 39000, *F0), (C, 10050), (W, 61000))
    rig.confirm(a)
    rig.confirm(b)
    rig.destroyed("udp", b.key, (C, 10050, W, 61000))
    rig.destroyed("udp", a.key, (G, 20040, *F0))
    assert rig.received() == [(FlowEnd(flow.flow_id, FlowEndReason.IDLE), PEER["rtp"])]
    assert len(rig.core.fw_pool) == 0 and rig.core.stats()["pools"]["snat"][W]["used"] == 0
    assert rig.core.counters["flows.ended.idle"] == 1
    # Its expectation goes with it (the processor's own: no RULE_END to send).
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == adjacent.rules and len(rig.core.rules) == 0


def test_destroy_events_that_name_no_binding_are_counted() -> None:
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.destroyed("tcp", (C, 1, S, 80), (S, 80, C, 1))  # some other connection with our mark
    rig.destroyed("udp", a.key, reply_a(flow))  # the right tuple, the wrong protocol
    rig.destroyed("tcp", a.key, (G, 20021, *F0))  # another gateway's reply tuple
    rig.destroyed("tcp", (G, 51000, *F0), (S, 443, C, 40000))  # a leg B that never was
    assert rig.core.counters["conntrack.destroy_unknown"] == 4
    assert len(rig.core.table) == 1 and rig.messages() == []


# ---- lifetime: the confirmation check -----------------------------------------------------


def test_a_binding_conntrack_never_confirmed_ends_at_its_check() -> None:
    rig = Rig()
    lost, _ = open_inbound(rig, sport=40000)  # its SYN is dropped after the verdict: not in conntrack
    kept, a = open_inbound(rig, sport=40001)
    rig.confirm(a)
    rig.tick(1)
    proven, _ = open_inbound(rig, sport=40002)  # opened at T0+1; leg B proves leg A
    leg_b(rig, proven, 51000)
    rig.lookups.clear()
    rig.tick(3)  # T0+4
    assert rig.core.counters["conntrack.checks"] == 0 and rig.lookups == []
    rig.tick(1)  # T0+5: confirm seconds after the first two opened
    assert rig.lookups == [(TCP_PROTO, ip(C), 40000, ip(W), 8443), (TCP_PROTO, ip(C), 40001, ip(W), 8443)]
    assert rig.received() == [(FlowEnd(lost.flow_id, FlowEndReason.FIN), PEER["relay"])]
    c = rig.core.counters
    assert (c["conntrack.checks"], c["conntrack.never_confirmed"]) == (2, 1)
    assert len(rig.core.table) == 2 and len(rig.core.fw_pool) == 2
    # Confirmed ones are not checked again; their end comes as a destroy event.
    rig.tick(100)
    assert c["conntrack.checks"] == 2 and rig.messages() == []
    (rec_kept,) = [r for r in rig.core.flows(rig.now, 10) if r["flow_id"] == kept.flow_id]
    assert rec_kept["state"] == ["a_alive"]
    rig.destroyed("tcp", a.key, reply_a(kept))
    assert rig.messages() == [FlowEnd(kept.flow_id, FlowEndReason.FIN)]


# ---- restarts: adopt and resync -----------------------------------------------------------


def conn(proto: str, orig: tuple[str, int, str, int], reply: tuple[str, int, str, int], packets: int = 0,
         count: int = 0) -> Connection:
    return Connection(PROTO[proto], ints(orig), ints(reply), Counters(packets, count))


def test_adopt_rebuilds_bindings_and_claims_their_endpoints() -> None:
    rig = Rig()  # a processor starting while the kernel carries a flow of its predecessor
    carried = [
        conn("tcp", (C, 40000, W, 8443), (G, 20000, *F0)),  # leg A: answered by G:g to F0
        conn("tcp", (G, 51000, *F0), (S, 443, C, 40000)),  # leg B: G:e to F0
        conn("tcp", (C, 1, S, 80), (S, 80, C, 1)),  # not a gateway's
        conn("tcp", (C, 2, W, 8443), (G, 20000, "172.31.254.200", 1024)),  # not this instance's pool
    ]
    assert rig.core.adopt(carried, rig.now) == 1
    assert rig.core.counters["flows.adopted"] == 1
    assert rig.received() == [] and rig.core.counters["flows.opened"] == 0  # nothing to push: the gateway knows it
    assert rig.core.stats()["pools"]["firewall_side"]["used"] == 1
    (rec,) = rig.core.flows(rig.now, 10)
    assert (rec["client"], rec["original_dst"], rec["server"], rec["firewall_side"]) == (
        f"{C}:40000", f"{W}:8443", f"{S}:443", "172.31.254.0:1024")
    assert rec["gateway"] == "relay" and rec["ag_eport"] == 51000 and rec["state"] == ["a_alive"]
    assert rec["snat"] is None and rec["flow_id"] > 0
    # A new flow never gets the adopted F:f.
    _, a = open_inbound(rig, sport=40001)
    assert a.snat == F1
    # The gateway's pull finds the adopted flow.
    (answer,) = rig.ask(Query(7, Proto.TCP, ep(*F0), ep(G, 20000)))
    assert isinstance(answer, Answer) and str(answer.flow.client) == f"{C}:40000" and str(answer.flow.server) == f"{S}:443"
    # It is confirmed (no check) and ends with its legs' destroy events.
    rig.alive.add((TCP_PROTO, *ints((G, 51000, *F0))))
    rig.tick(10)
    assert rig.core.counters["conntrack.checks"] == 1  # only the new flow's
    rig.messages()
    rig.destroyed("tcp", (C, 40000, W, 8443), (G, 20000, *F0))
    assert rig.messages() == []
    rig.destroyed("tcp", (G, 51000, *F0), (S, 443, C, 40000))
    assert rig.messages() == [FlowEnd(rec["flow_id"], FlowEndReason.FIN)]
    assert rig.core.stats()["pools"]["firewall_side"]["used"] == 0


def test_adopt_without_leg_b_finds_the_port_forward_target() -> None:
    rig = Rig()
    assert rig.core.adopt([conn("tcp", (C, 40000, W, 8443), (G, 20000, *F0))], rig.now) == 1
    (rec,) = rig.core.flows(rig.now, 10)
    assert rec["server"] == f"{S}:443" and rec["ag_eport"] is None
    # Leg B after the restart: to the forward's target, as the client.
    flow = rig.core.binding(rec["flow_id"]).info(rec["flow_id"])
    assert leg_b(rig, flow, 51000) == Leg("tcp", (G, 51000, *F0), (S, 443), (C, 40000))
    # Adopting the same connection again (a second start) conflicts and changes nothing.
    assert rig.core.adopt([conn("tcp", (C, 40000, W, 8443), (G, 20000, *F0))], rig.now) == 0
    assert rig.core.counters["conntrack.adopt_conflict"] == 1 and len(rig.core.table) == 1


def test_adopt_a_snatted_flow() -> None:
    rig = Rig()
    carried = [
        conn("tcp", (S, 5555, C, 9000), (G, 20000, *F0)),
        conn("tcp", (G, 52000, *F0), (C, 9000, W, 61000)),  # leg B left as W:61000
    ]
    assert rig.core.adopt(carried, rig.now) == 1
    (rec,) = rig.core.flows(rig.now, 10)
    assert rec["snat"] == f"{W}:61000" and rec["state"] == ["a_alive", "snat"]
    rig.bound(tcp(S, 5556, C, 9000, "S"), LAN0)
    (push,) = rig.messages()
    assert push.flow.snat == ep(W, 61001)  # never the adopted W:w


def test_adopt_without_leg_b_of_a_masqueraded_flow_still_snats_leg_b() -> None:
    rig = Rig()
    assert rig.core.adopt([conn("tcp", (S, 5555, C, 9000), (G, 20000, *F0))], rig.now) == 1
    (rec,) = rig.core.flows(rig.now, 10)
    flow = rig.core.binding(rec["flow_id"]).info(rec["flow_id"])
    b = leg_b(rig, flow, 52000)
    assert b.dnat == (C, 9000) and b.snat[0] == W  # what a binding made before the restart gives leg B


def test_resync_ends_the_bindings_whose_connections_are_gone() -> None:
    rig = Rig()
    kept, ka = open_inbound(rig, sport=40000)
    kb = leg_b(rig, kept, 51000)
    gone, ga = open_inbound(rig, sport=40001)
    leg_b(rig, gone, 51001)  # its legs are both gone from conntrack, their events lost
    fresh, fa = open_inbound(rig, sport=40002)  # not yet confirmed: its check will say
    half, ha = open_inbound(rig, sport=40003)
    hb = leg_b(rig, half, 51003)
    for leg in (ka, kb, ha, hb):
        rig.confirm(leg)
    rig.destroyed("tcp", ha.key, reply_a(half))  # leg A's end was seen, then leg B's event was lost
    rig.forget(hb)
    assert rig.messages() == []
    dump = [conn("tcp", ka.key, reply_a(kept)), conn("tcp", kb.key, (S, 443, C, 40000))]
    rig.core.resync(dump, rig.now)
    assert sorted(m.flow_id for m in rig.messages()) == sorted([gone.flow_id, half.flow_id])
    assert rig.core.counters["conntrack.resyncs"] == 1
    assert sorted(r["flow_id"] for r in rig.core.flows(rig.now, 10)) == sorted([kept.flow_id, fresh.flow_id])
    assert len(rig.core.fw_pool) == 2


# ---- pools ---------------------------------------------------------------------------------


def test_pool_exhaustion_drops_and_counts() -> None:
    rig = Rig('[processor.pools]\nfirewall_side = "172.31.254.0/32"\nports = "40000-40001"\n')
    for sport in (1, 2):
        rig.bound(tcp(C, 30000 + sport, W, 8443, "S"), WAN0)
    rig.received()
    rig.dropped(tcp(C, 30003, W, 8443, "S"), WAN0, "drop.refused.fw_pool_exhausted")
    stats = rig.core.stats()["pools"]["firewall_side"]
    assert stats == {"used": 2, "capacity": 2, "exhausted": 1}

    snat = Rig('[processor.pools]\nsnat_ports = "64000-64000"\n')
    a = snat.bound(tcp(S, 1, C, 9000, "S"), LAN0)
    (first,) = snat.messages()
    assert first.flow.snat == ep(W, 64000)
    snat.dropped(tcp(S, 2, C, 9000, "S"), LAN0, "drop.refused.snat_pool_exhausted")
    assert len(snat.core.fw_pool) == 1  # the F:f of the refused flow went back
    # When the first flow ends, its W:w serves the next.
    snat.confirm(a)
    snat.destroyed("tcp", a.key, reply_a(first.flow))
    snat.messages()
    snat.bound(tcp(S, 3, C, 9000, "S"), LAN0)
    (third,) = snat.messages()
    assert third.flow.snat == ep(W, 64000)


# ---- signalling -----------------------------------------------------------------------


def test_query_answers_what_the_table_holds() -> None:
    rig = Rig(push=False)
    a = rig.bound(tcp(C, 40000, W, 8443, "S"), WAN0)
    assert rig.received() == [] and rig.core.counters["signalling.push_skipped"] == 1
    F, f = ipaddress.IPv4Address(a.snat[0]), a.snat[1]
    gw = ep(G, 20000)
    (answer,) = rig.ask(Query(7, Proto.TCP, Endpoint(F, f), gw))
    assert isinstance(answer, Answer) and answer.query_id == 7
    assert str(answer.flow.client) == f"{C}:40000" and str(answer.flow.server) == f"{S}:443"
    (missing,) = rig.ask(Query(8, Proto.TCP, Endpoint(F, f + 1), gw))
    assert missing == NotFound(8, Proto.TCP, Endpoint(F, f + 1), gw)
    (wrong_ag,) = rig.ask(Query(9, Proto.TCP, Endpoint(F, f), Endpoint(gw.address, 20021)))
    assert isinstance(wrong_ag, NotFound)
    assert (rig.core.counters["queries.answered"], rig.core.counters["queries.not_found"]) == (1, 2)


def test_forged_replayed_and_misdirected_signalling_is_refused() -> None:
    rig = Rig()
    query = Query(1, Proto.TCP, ep("172.31.254.1", 1024), ep(G, 20000))
    data = rig.gw_encoder.encode(query, WALL0)
    rig.core.datagram(data, (G, 7500), T0)
    rig.core.datagram(data, (G, 7500), T0)  # the same bytes again
    rig.core.datagram(Encoder(bytes(32), Role.GATEWAY).encode(query, WALL0), (G, 7500), T0)
    rig.core.datagram(rig.gw_encoder.encode(query, WALL0), ("203.0.113.10", 7500), T0)
    rig.core.datagram(Encoder(KEY, Role.PROCESSOR).encode(FlowEnd(1, FlowEndReason.FIN), WALL0), (G, 7500), T0)
    rig.core.datagram(rig.gw_encoder.encode(query, WALL0 - 60), (G, 7500), T0)
    rig.core.datagram(b"\x09" * 70, (G, 7500), T0)
    c = rig.core.counters
    assert c["queries.not_found"] == 1  # only the first was answered
    assert [c[f"signalling.refused.{r}"] for r in ("replay", "bad_mac", "wrong_source", "wrong_direction", "stale")] == [1] * 5
    assert c["signalling.refused.bad_version"] == 1
    assert len(rig.messages()) == 1


# ---- a gateway of several workers (firewall/processor/spread.py) ----------------------


def test_new_flows_go_round_robin_to_the_live_workers_each_told_on_its_own_port() -> None:
    """workers = 3: worker i on G:(20000 + i), signalling on 7500 + i. Each new flow's binding and
    NEW_FLOW go to one worker, round robin; the supervisor's live set narrows it at once (none
    live: all); a binding's FLOW_END goes to its own worker, whatever the live set."""
    rig = Rig(config=CONFIG.replace("listen_port = 20000\n", "listen_port = 20000\nworkers = 3\n"))

    def new(sport: int) -> tuple[Leg, int]:
        a = rig.bound(tcp(C, sport, W, 8443, "S"), WAN0)
        ((msg, peer),) = rig.received()
        assert isinstance(msg, NewFlow) and msg.flow.ag.port == a.dnat[1] and peer[0] == G
        return a, peer[1]

    got = [new(40000 + n) for n in range(4)]
    assert [(a.dnat[1], port) for a, port in got] == [(20000, 7500), (20001, 7501), (20002, 7502), (20000, 7500)]
    assert rig.core.spread.set_live({"relay": [2, 0]}) == {"relay": [0, 2]}
    assert [new(40010 + n)[0].dnat[1] for n in range(3)] == [20000, 20002, 20000]
    assert rig.core.spread.set_live({"relay": []}) == {"relay": [0, 1, 2]}  # none live: spread over all
    with pytest.raises(ValueError, match="has workers 0..2"):
        rig.core.spread.set_live({"relay": [3]})
    with pytest.raises(ValueError, match="'ftp' is not a gateway of several workers"):
        rig.core.spread.set_live({"ftp": [0]})
    a, _ = got[1]  # on worker 1
    rig.confirm(a)
    rig.core.spread.set_live({"relay": [0]})
    rig.destroyed("tcp", a.key, (*a.dnat, *a.snat))
    ((end, peer),) = rig.received()
    assert isinstance(end, FlowEnd) and peer == (G, 7501)
    # The other gateways' signalling ports come after the relay's three workers.
    assert rig.core.gateway_peers["ftp"] == (G, 7503)


# ---- dynamic rules --------------------------------------------------------------------


def ftp_session(rig: Rig) -> Any:
    flow, a = open_inbound(rig, sport=41000, port=21)
    assert flow.gateway == "ftp" and str(flow.server) == f"{S}:21"
    rig.confirm(a)  # the control connection is in conntrack: its check keeps it
    return flow


def request(rig: Rig, flow_id: int, src: str, sport: int, dst: str, dport: int, *, rid: int = 1,
            mode: RuleMode = RuleMode.REDIRECT, ttl: int = 30, one_shot: bool = True,
            replaces: bool = False) -> RuleRequest:
    return RuleRequest(rid, flow_id, Proto.TCP, ep(src, sport), ep(dst, dport), ttl, mode, one_shot, replaces)


def test_redirect_rule_is_acked_when_installed_and_takes_its_flow() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    # PASV through the port forward: the client will connect to W:50000, really S:50000.
    req = request(rig, ftp.flow_id, C, 0, W, 50000)
    assert rig.ask(req) == []  # no ACK before the kernel has the rule
    (op,) = rig.out.kernel_ops
    assert op.add and len(op.rules) == 1  # the expected flow's first packet only: conntrack carries its replies
    (rule,) = op.rules
    assert rule == KernelRule("expect_0_any", ("tcp", ip(C), ip(W), 50000))  # any source port
    assert rig.ask(req) == []  # a retry while it installs: nothing new, nothing twice
    rig.kernel()
    (ack,) = rig.messages()
    assert isinstance(ack, RuleAck) and ack.request_id == 1
    assert ack.expires_ms == round((WALL0 + 30) * 1000)
    assert rig.ask(req) == [ack]  # a repeat gets the same answer, not a second rule
    assert rig.core.counters["rules.repeated"] == 2 and len(rig.core.rules) == 1

    # The data connection arrives: a new binding into the ftp gateway, to the real server.
    a = rig.bound(tcp(C, 45000, W, 50000, "S"), WAN0)
    new, end = rig.messages()
    assert isinstance(new, NewFlow) and new.flow.gateway == "ftp"
    assert (str(new.flow.client), str(new.flow.original_dst), str(new.flow.server)) == (
        f"{C}:45000", f"{W}:50000", f"{S}:50000")
    assert end == RuleEnd(ack.rule_id, RuleEndReason.USED)
    assert a == Leg("tcp", (C, 45000, W, 50000), (G, 20021), F1)
    # Its leg B goes to the real server.
    assert leg_b(rig, new.flow, 46000) == Leg("tcp", (G, 46000, *F1), (S, 50000), (C, 45000))
    (remove_expectation,) = rig.kernel()  # the kernel carries the flow: no rules of its own
    assert not remove_expectation.add and remove_expectation.rules == op.rules
    # One-shot: a second connection is not the gateway's any more.
    assert rig.send(tcp(C, 45001, W, 50000, "S"), WAN0) == (PASS, (), QOS | PASSED)
    assert rig.nat_ops == []
    # Its end is conntrack's.
    rig.destroyed("tcp", a.key, (G, 20021, *F1))
    assert rig.messages() == [FlowEnd(new.flow.flow_id, FlowEndReason.FIN)]
    assert rig.kernel() == []


def test_rule_requests_refused_in_the_documented_order() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    relay, _ = open_inbound(rig, sport=42000)
    cases = [
        (request(rig, ftp.flow_id, "0.0.0.0", 0, W, 50000, rid=1), RuleRefusal.NOT_EXACT),
        (request(rig, ftp.flow_id, C, 0, W, 0, rid=2), RuleRefusal.NOT_EXACT),
        (request(rig, ftp.flow_id, C, 0, W, 50000, rid=3, ttl=0), RuleRefusal.BAD_TTL),
        (request(rig, ftp.flow_id + 1000, C, 0, W, 50000, rid=4), RuleRefusal.UNKNOWN_FLOW),
        (request(rig, ftp.flow_id, C, 0, "198.51.100.99", 50000, rid=5), RuleRefusal.THIRD_PARTY),  # FTP bounce
        (request(rig, ftp.flow_id, "198.51.100.99", 0, S, 50000, rid=6), RuleRefusal.THIRD_PARTY),
        (request(rig, relay.flow_id, C, 0, W, 50000, rid=7), RuleRefusal.POLICY),  # a relay asks for nothing
    ]
    for req, reason in cases:
        assert rig.ask(req) == [RuleRefused(req.request_id, reason)], reason
    assert rig.out.kernel_ops == []
    for n in range(MAX_RULES_PER_FLOW):
        assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000 + n, rid=100 + n)) == []
    assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 51000, rid=200)) == [RuleRefused(200, RuleRefusal.LIMIT)]
    # The kernel refusing a rule is a LIMIT too, and leaves nothing behind.
    rig.kernel(ok=False)
    refusals = rig.messages()
    assert refusals == [RuleRefused(100 + n, RuleRefusal.LIMIT) for n in range(MAX_RULES_PER_FLOW)]
    assert len(rig.core.rules) == 0 and rig.core.rules.expect == {}


def test_a_request_for_an_ended_flow_is_unknown() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    rig.destroyed("tcp", (C, 41000, W, 21), (G, 20021, *F0))
    assert rig.messages() == [FlowEnd(ftp.flow_id, FlowEndReason.FIN)]
    req = request(rig, ftp.flow_id, C, 0, W, 50000)
    assert rig.ask(req) == [RuleRefused(1, RuleRefusal.UNKNOWN_FLOW)]


def test_tcp_allow_passes_its_first_syn_and_exactly_one_connection() -> None:
    """Inbound active mode: the server connects to the client, which the kernel carries as it is.
    The SYNs of the expected flow come to the processor (only those), which lets one connection through."""
    rig = Rig()
    ftp = ftp_session(rig)
    rig.ask(request(rig, ftp.flow_id, S, 0, C, 6000, mode=RuleMode.ALLOW))
    (op,) = rig.kernel()
    watch, accept = op.rules
    assert watch == KernelRule("expect_0_any", ("tcp", ip(S), ip(C), 6000))  # its first packet comes here
    assert accept == KernelRule("allow_0_any", ("tcp", ip(S), ip(C), 6000))
    (ack,) = rig.messages()
    rig.tick(1)
    assert rig.out.kernel_ops == []  # no counter to poll: the SYN says when it is used
    # The first SYN passes unchanged (conntrack and the accept take it); the rule is used up.
    assert rig.send(tcp(S, 20, C, 6000, "S"), LAN0) == (PASS, (), QOS | PASSED)
    assert rig.nat_ops == []  # no binding: the kernel carries it
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    assert len(rig.core.rules) == 0 and rig.core.counters["rules.allowed_flows"] == 1
    # Its retransmission passes too; any other connection's SYN is dropped while the rules remain.
    assert rig.send(tcp(S, 20, C, 6000, "S"), LAN0)[0] == PASS
    rig.dropped(tcp(S, 21, C, 6000, "S"), LAN0, "drop.rule_used")
    assert rig.out.kernel_ops == []
    rig.tick(3)  # USED_GRACE: then the unit goes, all of it
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules
    assert rig.core.rules.spent == {}
    # With the rules gone, nothing of the rule is left in the processor either.
    assert rig.send(tcp(S, 22, C, 6000, "S"), LAN0) == (PASS, (), QOS | PASSED)
    assert rig.core.counters["passed.not_a_selector"] == 1


def test_a_used_allow_leaves_the_kernel_with_its_flow_before_its_grace() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000, mode=RuleMode.ALLOW))
    (op,) = rig.kernel()
    (ack,) = rig.messages()
    assert rig.send(tcp(C, 45000, W, 50000, "S"), WAN0)[0] == PASS
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    # The control connection ends within USED_GRACE.
    rig.destroyed("tcp", (C, 41000, W, 21), (G, 20021, *F0))
    assert rig.messages() == [FlowEnd(ftp.flow_id, FlowEndReason.FIN)]
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules and rig.core.rules.spent == {}
    rig.tick(3)
    assert rig.kernel() == []  # removed once


def test_udp_allow_passes_its_first_datagram_and_exactly_one_flow() -> None:
    """A UDP ALLOW's first datagram comes to the processor like a TCP SYN: one flow, exactly."""
    rig = Rig()
    rig.bound(udp(S, 4000, C, 10050), LAN0)  # an RTP flow, lan to ext
    (rtp,) = rig.messages()
    rig.kernel()  # the processor's own adjacent-port expectation
    # A UDP kind that may ask for ALLOW (rtp asks for REDIRECT only: gateways/rtp/settings.py).
    kind = rig.core.rules._kind["rtp"]
    rig.core.rules._kind["rtp"] = dataclasses.replace(kind, rule_modes=kind.rule_modes | {RuleMode.ALLOW})
    rig.ask(RuleRequest(1, rtp.flow.flow_id, Proto.UDP, ep(C, 7000), ep(S, 7001), 30, RuleMode.ALLOW, True))
    (op,) = rig.kernel()
    assert op.rules == (KernelRule("expect_0", ("udp", ip(C), 7000, ip(S), 7001)),
                        KernelRule("allow_0", ("udp", ip(C), 7000, ip(S), 7001)))
    (ack,) = rig.messages()
    rig.tick(1)
    assert rig.out.kernel_ops == []  # nothing to poll
    assert rig.send(udp(C, 7000, S, 7001), WAN0) == (PASS, (), QOS | PASSED)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    rig.tick(3)
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules


def test_rules_die_with_their_flow_and_at_their_ttl() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    rig.ask(request(rig, ftp.flow_id, C, 0, W, 50001, rid=2, ttl=60))
    rig.ask(request(rig, ftp.flow_id, C, 0, W, 50002, rid=3, ttl=2))
    rig.kernel()
    acks = rig.messages()
    rig.tick(2)
    assert rig.messages() == [RuleEnd(acks[1].rule_id, RuleEndReason.EXPIRED)]
    rig.tick(10)  # the control connection is confirmed: its check keeps it
    assert rig.messages() == []
    rig.destroyed("tcp", (C, 41000, W, 21), (G, 20021, *F0))
    assert rig.messages() == [FlowEnd(ftp.flow_id, FlowEndReason.FIN), RuleEnd(acks[0].rule_id, RuleEndReason.FLOW_ENDED)]
    assert len(rig.core.rules) == 0


def test_a_replacing_request_ends_the_flows_earlier_rules() -> None:
    """RULE_REQUEST flagged replaces (FTP's second PASV): the flow's earlier rules end (RULE_END
    SUPERSEDED) and leave the kernel; at the per-flow limit it still gets in, since they go."""
    rig = Rig()
    ftp = ftp_session(rig)
    for n in range(MAX_RULES_PER_FLOW):
        rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000 + n, rid=1 + n, mode=RuleMode.ALLOW))
    rig.kernel()
    acks = rig.messages()
    assert len(acks) == MAX_RULES_PER_FLOW and len(rig.core.rules) == MAX_RULES_PER_FLOW
    assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 51000, rid=99, mode=RuleMode.ALLOW)) == [
        RuleRefused(99, RuleRefusal.LIMIT)]
    assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 51000, rid=100, mode=RuleMode.ALLOW, replaces=True)) == [
        RuleEnd(a.rule_id, RuleEndReason.SUPERSEDED) for a in acks]
    removals = [op for op in rig.out.kernel_ops if not op.add]
    assert len(removals) == MAX_RULES_PER_FLOW
    rig.kernel()
    (ack,) = rig.messages()
    assert isinstance(ack, RuleAck) and ack.request_id == 100
    assert len(rig.core.rules) == 1 and rig.core.counters["rules.ended.superseded"] == MAX_RULES_PER_FLOW
    # The superseded ports are closed: their SYN finds no rule; the latest one's passes.
    assert rig.send(tcp(C, 45000, W, 50000, "S"), WAN0)[0] == PASS and rig.core.counters["passed.allowed"] == 0
    assert rig.send(tcp(C, 45001, W, 51000, "S"), WAN0)[0] == PASS and rig.core.counters["passed.allowed"] == 1


def test_rules_die_with_a_flow_conntrack_never_confirmed() -> None:
    rig = Rig()
    flow, a = open_inbound(rig, sport=41000, port=21)
    rig.ask(request(rig, flow.flow_id, C, 0, W, 50001, ttl=60))
    rig.kernel()
    (ack,) = rig.messages()
    rig.tick(5)
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN), RuleEnd(ack.rule_id, RuleEndReason.FLOW_ENDED)]
    assert rig.core.counters["conntrack.never_confirmed"] == 1


def allow_unit(rig: Rig, req: RuleRequest) -> tuple[KernelOp, RuleAck]:
    """Ask for a translated ALLOW; return its one kernel operation and the ACK that follows it."""
    assert rig.ask(req) == []  # no ACK before the kernel has both rules
    (op,) = rig.out.kernel_ops
    rig.kernel()
    (ack,) = rig.messages()
    assert isinstance(ack, RuleAck) and rig.core.counters["rules.translated"] == 1
    return op, ack


def test_allow_to_the_port_forward_address_is_a_dnat_and_an_accept_in_one_unit() -> None:
    """Inbound PASV in allow mode: the client was told W:p; the kernel carries C -> W:p to S:p."""
    rig = Rig()
    ftp = ftp_session(rig)
    op, ack = allow_unit(rig, request(rig, ftp.flow_id, C, 0, W, 50000, mode=RuleMode.ALLOW))
    watch, dnat, accept = op.rules
    assert op.add and watch == KernelRule("expect_0_any", ("tcp", ip(C), ip(W), 50000))
    assert dnat == KernelRule("dnat_0_any", ("tcp", ip(C), ip(W), 50000), (ip(S), 50000))  # the port is kept
    # The accept is for the translated tuple only, and only once it was translated (its set asks ct status dnat).
    assert accept == KernelRule("allow_dnat_0_any", ("tcp", ip(C), ip(S), 50000))
    # One-shot: the first SYN passes to the kernel (which translates it), untouched; a second
    # connection's is dropped; after USED_GRACE the DNAT goes with the accept, in one removal.
    assert rig.send(tcp(C, 45000, W, 50000, "S"), WAN0) == (PASS, (), QOS | PASSED)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    rig.dropped(tcp(C, 45001, W, 50000, "S"), WAN0, "drop.rule_used")
    assert rig.out.kernel_ops == [] and len(rig.core.rules) == 0
    rig.tick(3)
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == (watch, dnat, accept)
    assert rig.core.counters["rules.allowed_flows"] == 1 and rig.core.rules.spent == {}


def test_allow_to_the_snat_address_is_translated_to_the_client() -> None:
    """Outbound PORT in allow mode: NEW_FLOW says W:w; the server connects to W:p, which is C:p."""
    rig = Rig()
    a = rig.bound(tcp(S, 41000, C, 21, "S"), LAN0)  # lan client S to the ext ftp server C
    rig.confirm(a)
    (push,) = rig.messages()
    flow = push.flow
    assert flow.gateway == "ftp" and flow.client == ep(S, 41000)
    assert flow.snat == ep(W, 61000)
    op, ack = allow_unit(rig, request(rig, flow.flow_id, C, 0, W, 50001, mode=RuleMode.ALLOW, ttl=5))
    _, dnat, accept = op.rules
    assert dnat == KernelRule("dnat_0_any", ("tcp", ip(C), ip(W), 50001), (ip(S), 50001))
    assert accept == KernelRule("allow_dnat_0_any", ("tcp", ip(C), ip(S), 50001))
    # Unused, it ends at its TTL, both rules together.
    rig.now += 5  # past its TTL, before the tick retires it: its SYNs no longer pass
    rig.dropped(tcp(C, 20, W, 50001, "S"), WAN0, "drop.rule_expired")
    rig.tick(0)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.EXPIRED)]
    removals = [o for o in rig.kernel() if not o.add]
    assert [o.rules for o in removals] == [op.rules]


def test_allow_to_a_router_address_that_stands_for_no_party_is_refused() -> None:
    rig = Rig()
    ftp = ftp_session(rig)  # inbound, port-forwarded: W stands for the server, and only toward the client
    rig.bound(tcp(S, 41000, C, 21, "S"), LAN0)
    outbound = rig.messages()[0].flow  # SNATed: W stands for the client, and only toward the server
    cases = [
        request(rig, ftp.flow_id, S, 0, W, 6000, rid=1, mode=RuleMode.ALLOW),  # the server to W: no SNAT here
        request(rig, outbound.flow_id, C, 0, L, 6000, rid=2, mode=RuleMode.ALLOW),  # another router address
        request(rig, outbound.flow_id, C, 0, "10.0.0.1", 6000, rid=3, mode=RuleMode.ALLOW),  # and another
    ]
    for req in cases:
        assert rig.ask(req) == [RuleRefused(req.request_id, RuleRefusal.THIRD_PARTY)]
    assert rig.out.kernel_ops == [] and len(rig.core.rules) == 0
    # The same address asked the right way round is granted; REDIRECT keeps its own mapping.
    assert rig.ask(request(rig, outbound.flow_id, C, 0, W, 6000, rid=4, mode=RuleMode.ALLOW)) == []
    assert rig.ask(request(rig, outbound.flow_id, C, 0, W, 6001, rid=5)) == []
    allow, redirect = rig.out.kernel_ops
    assert [r.name for r in allow.rules] == ["expect_0_any", "dnat_0_any", "allow_dnat_0_any"]
    assert [r.name for r in redirect.rules] == ["expect_0_any"]
    # The redirected flow, when it comes, goes to the client the router's address stands for.
    rig.kernel()
    rig.messages()
    data = rig.bound(tcp(C, 45000, W, 6001, "S"), WAN0)
    new, _ = rig.messages()
    assert str(new.flow.server) == f"{S}:6001" and data.dnat == (G, 20021)


def test_adjacent_port_is_expected_by_the_processor_itself() -> None:
    rig = Rig()
    rig.bound(udp(S, 4000, C, 10050), LAN0)  # RTP from lan to ext port 10050
    (rtp,) = rig.messages()
    (op,) = rig.kernel()
    assert rig.core.counters["rules.adjacent"] == 1 and rig.messages() == []  # no ACK: nobody asked
    assert op.rules == (KernelRule("expect_0_any", ("udp", ip(S), ip(C), 10051)),)  # the first packet only
    # RTCP from the next source port to the next destination port: the same gateway.
    a = rig.bound(udp(S, 4001, C, 10051), LAN0)
    (rtcp,) = rig.messages()
    assert rtcp.flow.gateway == rtp.flow.gateway == "rtp"
    assert a == Leg("udp", (S, 4001, C, 10051), (G, 20040), F1)
    assert str(rtcp.flow.server) == f"{C}:10051" and rtcp.flow.snat == ep(W, 61001)
    assert rig.core.counters["rules.ended.used"] == 1


# ---- reports ----------------------------------------------------------------------------


def test_flow_listing_and_stats_are_plain_json() -> None:
    rig = Rig()
    flow, _ = open_inbound(rig)
    rig.tick(3)
    (rec,) = rig.core.flows(rig.now, 10)
    assert rec["client"] == f"{C}:40000" and rec["server"] == f"{S}:443" and rec["original_dst"] == f"{W}:8443"
    assert rec["firewall_side"] == "172.31.254.0:1024" and rec["ag"] == f"{G}:20000"
    assert rec["gateway"] == "relay" and rec["flow_id"] == flow.flow_id and rec["age"] == 3.0
    assert rec["proto"] == "tcp" and rec["state"] == [] and rec["queue"] == 0
    assert rec["created"] == WALL0
    assert "leg_a_packets" not in rec  # no accounting asked for
    stats = rig.core.stats()
    assert stats["flows"] == 1 and stats["flows_per_gateway"] == {"relay": 1}
    assert stats["counters"]["queued"] == 1 and stats["counters"]["verdict.bound"] == 1
    assert stats["pools"]["firewall_side"] == {"used": 1, "capacity": 16 * 64512, "exhausted": 0}
    json.dumps(rec), json.dumps(stats)
    assert rig.core.flows(rig.now, 0) == []


def test_flow_listing_adds_each_legs_accounting() -> None:
    rig = Rig()
    both, a = open_inbound(rig, sport=40000)
    b = leg_b(rig, both, 51000)
    only_a, a2 = open_inbound(rig, sport=40001)
    acct = {
        (TCP_PROTO, *ints(a.key)): (10, 1000),
        (TCP_PROTO, *ints(b.key)): (5, 500),
        (TCP_PROTO, ip(C), 1, ip(S), 80): (99, 9999),  # not a leg of ours
    }
    recs = {r["flow_id"]: r for r in rig.core.flows(rig.now, 10, acct)}
    rb, ra = recs[both.flow_id], recs[only_a.flow_id]
    assert (rb["leg_a_packets"], rb["leg_a_bytes"], rb["leg_b_packets"], rb["leg_b_bytes"]) == (10, 1000, 5, 500)
    assert (ra["leg_a_packets"], ra["leg_a_bytes"]) == (0, 0)  # not in the dump (yet)
    assert "leg_b_packets" not in ra and "leg_b_bytes" not in ra  # no leg B
    json.dumps(list(recs.values()))


# ---- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("gone", ["tcp_idle", "tcp_closing", "tcp_handshake", "udp_idle"])
def test_per_packet_timeouts_are_no_longer_settings(gone: str) -> None:
    text = CONFIG.replace("{pools}", "").replace("confirm = 5", f"confirm = 5\n{gone} = 100")
    with pytest.raises(ConfigError, match=f"{gone}.*no longer a setting"):
        loads(text)


# ---- the runner's queue callback ----------------------------------------------------------


class FakePacket:
    """What netfilterqueue hands the callback; records the verdict in a shared event log."""

    def __init__(self, payload: bytes, log: list[Any], indev: int = WAN0, mark: int = QOS) -> None:
        self.payload, self.log, self.indev, self.mark = payload, log, indev, mark

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.log.append(("mark", mark))

    def accept(self) -> None:
        self.log.append(("accept", self.payload))

    def drop(self) -> None:
        self.log.append(("drop", self.payload))


class FakeNat:
    def __init__(self, log: list[Any], result: Any = None) -> None:
        self.log, self.result = log, result
        self.counters: Counter[str] = Counter({"clash_removed": 2})

    def write(self, ops: list[Any]) -> list[bool]:
        self.log.append(("nat", legs([op for op in ops if op[0] in (DNAT_MAP, SNAT_MAP)])))
        if isinstance(self.result, Exception):
            raise self.result
        return [True] * len(ops) if self.result is None else self.result


class FakeSock:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def sendto(self, data: bytes, peer: tuple[str, int]) -> None:
        self.log.append(("sent", peer))


def runner_for(rig: Rig, log: list[Any], nat_result: Any = None) -> Any:
    from firewall.processor.runner import Runner

    runner = Runner(rig.config, 0)
    runner._sel.close()  # the loop's selector: not used here
    runner.core = rig.core
    runner._handle = rig.core.handle
    runner._now = T0
    runner._pending = []
    runner.nat = FakeNat(log, nat_result)
    runner.sig = FakeSock(log)
    return runner


def test_runner_writes_the_batchs_nat_and_push_before_the_verdicts() -> None:
    rig = Rig()
    log: list[Any] = []
    runner = runner_for(rig, log)
    syn = bytes(tcp(C, 40000, W, 8443, "S"))
    ack = bytes(tcp(C, 40001, W, 8443, "A"))
    runner._on_packet(FakePacket(syn, log))
    runner._on_packet(FakePacket(ack, log))
    assert log == []  # nothing before the batch is settled
    runner._settle()
    assert log == [
        ("nat", [Leg("tcp", (C, 40000, W, 8443), (G, 20000), F0)]),
        *[("sent", PEER["relay"])] * 3,  # the NEW_FLOW push, its copies
        ("mark", QOS | MARK), ("accept", syn),
        ("drop", ack),
    ]
    assert not rig.core.take() and runner._pending == []


@pytest.mark.parametrize("result", [[False, True, True, True], OSError("netlink")])
def test_runner_drops_a_bound_packet_whose_nat_was_not_written(result: Any) -> None:
    rig = Rig()
    log: list[Any] = []
    runner = runner_for(rig, log, result)
    syn = bytes(tcp(C, 40000, W, 8443, "S"))
    other = bytes(tcp(C, 40000, W, 22, "S"))  # not a selector: passed, no NAT needed
    runner._on_packet(FakePacket(syn, log))
    runner._on_packet(FakePacket(other, log))
    runner._settle()
    assert ("drop", syn) in log and ("accept", other) in log and ("accept", syn) not in log
    assert rig.core.counters["drop.nat_write_failed"] == 1
    assert rig.core.counters["nat.write_error"] == (1 if isinstance(result, Exception) else 0)
    assert not rig.core.take()


def test_runner_callback_never_raises() -> None:
    """Whatever goes wrong inside the queue callback, the packet is dropped and counted,
    and writes no NAT element."""
    rig = Rig()
    log: list[Any] = []
    runner = runner_for(rig, log)

    def broken(payload: bytes, mark: int, indev: int, now: float) -> Any:
        raise ZeroDivisionError

    runner._handle = broken
    good = bytes(tcp(C, 40000, W, 8443, "S"))
    runner._on_packet(FakePacket(b"broken", log))
    assert runner._pending[-1][1:] == (DROP, 0, ()) and rig.core.counters["drop.internal"] == 1
    runner._handle = rig.core.handle
    runner._on_packet(FakePacket(good, log))
    runner._settle()
    assert log[0] == ("nat", [Leg("tcp", (C, 40000, W, 8443), (G, 20000), F0)])
    assert ("drop", b"broken") in log and ("accept", good) in log


def test_runner_one_failing_verdict_does_not_lose_the_others() -> None:
    rig = Rig()
    log: list[Any] = []
    runner = runner_for(rig, log)

    class Unlucky(FakePacket):
        def accept(self) -> None:
            raise OSError("gone")

    first = bytes(tcp(C, 40000, W, 22, "S"))
    second = bytes(tcp(C, 40001, W, 22, "S"))
    runner._on_packet(Unlucky(first, log))
    runner._on_packet(FakePacket(second, log))
    runner._settle()
    assert ("accept", second) in log and rig.core.counters["verdict.error"] == 1


class NoConntrack:
    def ours(self, family: int = socket.AF_INET) -> list[Connection]:
        return []


class ListedAtOnce:
    """``kernel.Lister``'s contract, its dump done at once on the asker's thread
    (tests/firewall/test_processor_kernel.py holds the threaded one to it)."""

    def __init__(self, ct: NoConntrack) -> None:
        self.ct = ct

    def ask(self, family: int, then: Any) -> None:
        then(list(self.ct.ours(family)), None)


def test_runner_answers_stats_and_flows_on_its_control_socket(tmp_path: Path) -> None:
    rig = Rig()
    log: list[Any] = []
    runner = runner_for(rig, log)

    runner.ct = NoConntrack()
    runner.lister = ListedAtOnce(runner.ct)  # type: ignore[assignment]
    runner._on_packet(FakePacket(bytes(tcp(C, 40000, W, 8443, "S")), log))
    runner._settle()
    path = tmp_path / "processor-0.sock"
    with selector_server(path, COMMANDS, runner, request_max=CONTROL_MAX_REQUEST) as server:
        runner.control = server
        stats = ask(path, {"cmd": "stats"})
        assert (stats["instance"], stats["push"], stats["flows"]) == (0, True, 1)
        assert stats["counters"]["control.requests"] == 1 and stats["counters"]["verdict.bound"] == 1
        assert stats["counters"]["nat.clash_removed"] == 2  # the writer's own counters, named apart
        (flow,) = ask(path, {"cmd": "flows"})
        assert (flow["client"], flow["original_dst"], flow["proto"]) == (f"{C}:40000", f"{W}:8443", "tcp")
        assert ask(path, {"cmd": "flows", "limit": 0}) == []
        for limit in (-1, FLOWS_LIMIT_MAX + 1, True, "5"):
            with pytest.raises(ControlError, match=f"limit must be an integer 0..{FLOWS_LIMIT_MAX}"):
                ask(path, {"cmd": "flows", "limit": limit})
        assert ask(path, {"cmd": "rules"}) == []  # no dynamic rule yet (the core's tests list them)
        with pytest.raises(ControlError, match="unknown command 'nope' \\(one of stats, flows, rules, workers\\)"):
            ask(path, {"cmd": "nope"})
        # This config's gateways have one worker each: there is nothing to say about them.
        with pytest.raises(ControlError, match="'ftp' is not a gateway of several workers"):
            ask(path, {"cmd": "workers", "live": {"ftp": [0]}})
        with pytest.raises(ControlError, match="live must map gateway names"):
            ask(path, {"cmd": "workers", "live": {"ftp": "0"}})


def test_instance_must_name_a_queue() -> None:
    config = loads(CONFIG.replace("{pools}", ""))
    with pytest.raises(ValueError, match="processor.queues has 1 entries"):
        ProcessorCore(config, 1, Encoder(KEY, Role.PROCESSOR), Guard(KEY, Role.PROCESSOR, now=WALL0),
                      route=route, ifname=IF.get, local_addresses=list, conntrack=lambda *t: False,
                      now=T0, wall=WALL0)


def test_a_standby_node_ends_its_bindings_without_telling_the_gateway() -> None:
    """docs/ha.md, "The AG host": as a node steps back its table is flushed; the peer carries
    those flows on, so their gateway on the AG host must not be told they ended."""
    rig = Rig()
    flow, a = open_inbound(rig)
    rig.confirm(a)
    rig.core.standby = True
    rig.destroyed("tcp", a.key, reply_a(flow))
    assert rig.received() == [] and rig.core.counters["signalling.held.flow_end_standby"] == 1
    assert len(rig.core.table) == 0 and len(rig.core.fw_pool) == 0  # released here all the same
