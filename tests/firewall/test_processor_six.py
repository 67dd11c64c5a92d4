"""The processor's IPv6 first-packet path (issue 17, firewall/processor/six.py): a tcp-relay flow
bound on the IPv6 maps, family 6 NEW_FLOW, leg B, the end by conntrack's events, and what it refuses."""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrRouting

from firewall.config import loads
from firewall.packet import TCP, UDP
from firewall.processor.core import DROP, PASS, ProcessorCore, Route
from firewall.processor.kernel import Connection
from firewall.rules.bind import DNAT6_MAP, LEGB_DNAT6_MAP, LEGB_SNAT6_MAP, SNAT6_MAP
from firewall.signalling import Counters, Encoder, FlowEnd, FlowEndReason, Guard, NewFlow, Received, Role

KEY = bytes(range(32))
T0, WALL0 = 1000.0, 1_700_000_000.0
MARK, PASSED = 0x00010000, 0x00020000
IF = {2: "wan0", 3: "lan0", 4: "nfg-gw0"}
WAN0, LAN0, BLIND = 2, 3, 4

C6, W6, S6, L6 = "2001:db8:2::10", "2001:db8:2::1", "fd00:1::10", "fd00:1::1"
G6, F6 = "fd6e:6667:6174:ff::2", "fd6e:6667:6174:fe::"

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[processor.timeouts]
confirm = 5
[[gateway]]
name = "relay"
kind = "tcp-relay"
listen_port = 20000
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000
[[gateway]]
name = "logger"
kind = "tcp-relay"
listen_port = 20025
[gateway.settings]
mode = "log-only"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8080
"""


def i6(a: str) -> int:
    return int(ipaddress.IPv6Address(a))


def route(dst: int) -> Route | None:
    a = ipaddress.ip_address(dst)
    if a in ipaddress.IPv6Network("fd00:1::/64"):
        return Route(False, "lan0", i6(L6))
    if str(a) == W6:
        return Route(True, "lo", dst)
    return Route(False, "wan0", None)


class Rig6:
    def __init__(self, config: str = CONFIG, instance: int = 0, routes: Callable[[int], Route | None] = route) -> None:
        self.alive: set[tuple[int, ...]] = set()
        self.core = ProcessorCore(
            loads(config), instance, Encoder(KEY, Role.PROCESSOR), Guard(KEY, Role.PROCESSOR, now=WALL0),
            route=routes, ifname=IF.get, local_addresses=lambda: [ipaddress.IPv4Address("203.0.113.1")],
            local_addresses6=lambda: [ipaddress.IPv6Address(W6), ipaddress.IPv6Address(L6)],
            conntrack=lambda *t: t in self.alive, now=T0, wall=WALL0,
        )
        self.gw = Guard(KEY, Role.GATEWAY, now=WALL0)

    def send(self, pkt: Any, indev: int, now: float = T0) -> tuple[int, tuple, int]:
        return self.core.handle(pkt if isinstance(pkt, bytes) else bytes(pkt), 0, indev, now)

    def messages(self, wall: float = WALL0) -> list[Any]:
        out = []
        for data, _ in self.core.take().datagrams:
            got = self.gw.check(data, wall)
            if isinstance(got, Received):
                out.append(got.message)
        return out


def syn(src: str, sport: int, dst: str, dport: int) -> Any:
    return IPv6(src=src, dst=dst) / ScapyTCP(sport=sport, dport=dport, flags="S")


def test_an_ipv6_tcp_relay_flow_is_bound_both_legs_and_ends_with_conntrack() -> None:
    rig = Rig6()
    verdict, ops, mark = rig.send(syn(C6, 40000, S6, 9000), WAN0)
    assert (verdict, mark) == (PASS, MARK), dict(rig.core.counters)
    key = (i6(C6), 40000, i6(S6), 9000)
    f = (i6(F6), 1024)
    ahead = (i6(G6), *f)  # leg B's pair by (G6, F6, f), in leg A's transaction
    assert ops == ((DNAT6_MAP, "tcp", key, (i6(G6), 20000)), (SNAT6_MAP, "tcp", key, f),
                   (LEGB_DNAT6_MAP, "tcp", ahead, (i6(S6), 9000)), (LEGB_SNAT6_MAP, "tcp", ahead, (i6(C6), 40000)))
    (msg,) = rig.messages()
    assert isinstance(msg, NewFlow) and msg.flow.family == 6
    flow = msg.flow
    assert (str(flow.client.address), flow.client.port) == (C6, 40000)
    assert (str(flow.server.address), str(flow.firewall_side.address), str(flow.ag.address)) == (S6, F6, G6)

    # Leg B: G6:e -> F6:f from the blind track, translated to C:c -> S:s by the elements
    # written ahead (no transaction of its own); past their life, by its exact ones.
    verdict, ops, mark = rig.send(syn(G6, 50000, F6, 1024), BLIND)
    key_b = (i6(G6), 50000, *f)
    assert (verdict, ops, mark) == (PASS, (), MARK)
    late = Rig6()
    late.send(syn(C6, 40000, S6, 9000), WAN0)
    verdict, ops, mark = late.send(syn(G6, 50000, F6, 1024), BLIND, T0 + 9)
    assert (verdict, mark) == (PASS, MARK)
    assert ops == ((DNAT6_MAP, "tcp", key_b, (i6(S6), 9000)), (SNAT6_MAP, "tcp", key_b, (i6(C6), 40000)))
    assert rig.core.stats()["flows_ipv6"] == 1
    (listed,) = rig.core.flows(T0 + 1, 10)
    assert (listed["client"], listed["server"], listed["ag_eport"]) == (f"[{C6}]:40000", f"[{S6}]:9000", 50000)
    assert listed["state"] == ["ipv6", "a_alive"] and listed["flow_id"] == flow.flow_id
    # A second leg B while the first lives: refused.
    rig.alive.add((TCP, *key_b))
    assert rig.send(syn(G6, 50001, F6, 1024), BLIND)[0] == DROP
    assert rig.core.counters["drop.leg_b_busy"] == 1

    # Both legs destroyed: FLOW_END, and F6:f is free again.
    rig.core.conntrack_destroyed(TCP, key, (i6(G6), 20000, *f), T0 + 1)
    assert rig.messages() == [] and rig.core.stats()["flows_ipv6"] == 1
    rig.core.conntrack_destroyed(TCP, key_b, (i6(S6), 9000, i6(C6), 40000), T0 + 1)
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd) and end.flow_id == flow.flow_id
    assert rig.core.stats()["flows_ipv6"] == 0
    assert not rig.core.six.pool.in_use(*f) and rig.core.six.pool.available == rig.core.six.pool.capacity


TUNNEL = """
[zones.wan]
interfaces = ["wan0"]
[[gateway]]
name = "tunnel"
kind = "tunnel"
listen_port = 20443
[[gateway.traffic]]
from = "wan"
to = "router"
proto = "tcp"
ports = 7443
allow = true
[[gateway.traffic]]
from = "wan"
to = "router"
proto = "udp"
ports = 7443
allow = true
"""


def test_an_ipv6_flow_to_the_router_is_bound_into_a_terminating_gateway_with_no_leg_b() -> None:
    """The tunnel kind takes IPv6: a mediator's channel to the router's W6:7443 goes into G6:g, from F6:f."""
    rig = Rig6(TUNNEL)
    for proto, pkt in (("tcp", syn(C6, 40000, W6, 7443)),
                       ("udp", IPv6(src=C6, dst=W6) / ScapyUDP(sport=40001, dport=7443) / b"channel")):
        verdict, ops, mark = rig.send(pkt, WAN0)
        assert (verdict, mark) == (PASS, MARK), dict(rig.core.counters)
        key = (i6(C6), 40000 if proto == "tcp" else 40001, i6(W6), 7443)
        fw = ops[1][3]  # F6:f, from processor.pools.firewall_side6
        assert ipaddress.IPv6Address(fw[0]) in ipaddress.IPv6Network(f"{F6}/124")
        assert ops == ((DNAT6_MAP, proto, key, (i6(G6), 20443)), (SNAT6_MAP, proto, key, fw))
        (msg,) = rig.messages()
        flow = msg.flow
        assert isinstance(msg, NewFlow) and flow.family == 6 and flow.gateway == "tunnel"
        assert str(flow.original_dst) == str(flow.server) == f"[{W6}]:7443"  # the router is the flow's end
        # Leg A's end alone ends it: no leg B comes for a terminating gateway.
        rig.core.conntrack_destroyed(TCP if proto == "tcp" else 17, key, (i6(G6), 20443, *fw), T0 + 1)
        (end,) = rig.messages()
        assert isinstance(end, FlowEnd) and end.flow_id == flow.flow_id
    assert rig.core.stats()["flows_ipv6"] == 0 and rig.core.counters["flows.ipv6.opened"] == 2


def test_a_binding_whose_first_packet_never_reached_conntrack_ends_at_the_check() -> None:
    rig = Rig6()
    rig.send(syn(C6, 40000, S6, 9000), WAN0)
    rig.messages()
    rig.core.tick(T0 + 4, WALL0 + 4)
    assert rig.messages() == []
    rig.core.tick(T0 + 6, WALL0 + 6)
    (end,) = rig.messages(WALL0 + 6)
    assert isinstance(end, FlowEnd) and rig.core.counters["conntrack.never_confirmed"] == 1


def test_what_the_ipv6_path_refuses() -> None:
    rig = Rig6()
    cases = [
        (syn("::1", 40000, S6, 9000), WAN0, "drop.martian"),
        (syn("ff02::1", 40000, S6, 9000), WAN0, "drop.martian"),
        (syn(W6, 40000, S6, 9000), WAN0, "drop.own_address"),
        (IPv6(src=C6, dst=S6) / ScapyTCP(sport=40000, dport=9000, flags="A"), WAN0, "drop.not_new_flow"),
        (syn(G6, 50000, F6, 1024), BLIND, "drop.gateway_without_binding"),
        (IPv6(src=C6, dst=S6) / IPv6ExtHdrRouting(addresses=["2001:db8::5"], segleft=1) / ScapyTCP(dport=9000, flags="S"),
         WAN0, "drop.malformed6.routing_header"),
        (IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(offset=8) / ScapyTCP(dport=9000, flags="S"), WAN0, "drop.malformed6.fragment"),
    ]
    for pkt, indev, why in cases:
        before = rig.core.counters[why]
        assert rig.send(pkt, indev)[0] == DROP, why
        assert rig.core.counters[why] == before + 1, (why, dict(rig.core.counters))
    # Another direction than the selector's: handed back to the kernel, with the passed mark.
    assert rig.send(syn(S6, 40000, C6, 9000), LAN0) == (PASS, (), PASSED)
    assert rig.core.stats()["flows_ipv6"] == 0 and rig.messages() == []


def test_an_address_the_router_gains_is_its_own_once_the_look_up_says_so() -> None:
    """The router's IPv6 addresses come from a cached look-up (the runner's): the same list, the
    same set; a new list (an address added) is taken at the next first packet."""
    rig = Rig6()
    owned = [ipaddress.IPv6Address(W6)]
    rig.core.six._local_addresses = lambda: owned
    assert rig.send(syn("2001:db8:2::77", 40000, S6, 9000), WAN0)[0] == PASS
    owned = [ipaddress.IPv6Address(W6), ipaddress.IPv6Address("2001:db8:2::78")]
    assert rig.send(syn("2001:db8:2::78", 40000, S6, 9000), WAN0)[0] == DROP
    assert rig.core.counters["drop.own_address"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([WAN0, LAN0, BLIND, 99]))
def test_ipv6_bytes_never_raise(data: bytes, indev: int) -> None:
    rig = Rig6()
    head = bytes(IPv6(src=C6, dst=S6, nh=6, plen=len(data)))[:40]
    for payload in (b"\x60" + data, head + data):
        verdict, ops, _ = rig.send(payload, indev)
        assert verdict in (DROP, PASS) and len(ops) in (0, 2)


UDP_CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[processor.timeouts]
confirm = 5
nat_element = 4
[processor.pools]
ports = "40000-40002"
firewall_side6 = "fd6e:6667:6174:fe::/127"
[[gateway]]
name = "dns"
kind = "udp-relay"
listen_port = 20053
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5353
"""


def dgram(src: str, sport: int, dst: str = S6, dport: int = 5353) -> Any:
    return IPv6(src=src, dst=dst) / ScapyUDP(sport=sport, dport=dport) / b"q"


def test_an_ipv6_udp_relay_flow_keeps_its_young_binding_and_ends_with_conntrack() -> None:
    rig = Rig6(UDP_CONFIG)
    verdict, ops, _ = rig.send(dgram(C6, 40000), WAN0)
    key = (i6(C6), 40000, i6(S6), 5353)
    f = (i6(F6), 40000)
    assert verdict == PASS and ops[:2] == ((DNAT6_MAP, "udp", key, (i6(G6), 20053)), (SNAT6_MAP, "udp", key, f))
    assert ops[2] == (LEGB_DNAT6_MAP, "udp", (i6(G6), *f), (i6(S6), 5353))
    (msg,) = rig.messages()
    assert isinstance(msg, NewFlow) and msg.flow.proto == UDP and msg.flow.family == 6
    # The next datagrams before conntrack confirmed the first: the same binding, no new flow;
    # its elements again once those of the first verdict may have timed out (nat_element 4 s).
    assert rig.send(dgram(C6, 40000), WAN0, T0 + 1) == (PASS, (), MARK)
    assert rig.send(dgram(C6, 40000), WAN0, T0 + 2.5)[1] == ops[:2]
    assert rig.messages() == [] and rig.core.counters["passed.ipv6.bound_young"] == 2
    assert rig.core.stats()["flows_ipv6"] == 1
    # Leg B from the gateway's own port e; conntrack's idle end of both legs ends the binding.
    key_b = (i6(G6), 50000, *f)
    verdict, ops_b, _ = rig.send(IPv6(src=G6, dst=F6) / ScapyUDP(sport=50000, dport=40000), BLIND, T0 + 3)  # ahead's gone
    assert verdict == PASS and ops_b == ((DNAT6_MAP, "udp", key_b, (i6(S6), 5353)), (SNAT6_MAP, "udp", key_b, (i6(C6), 40000)))
    rig.core.conntrack_destroyed(UDP, key, (i6(G6), 20053, *f), T0 + 40)
    rig.core.conntrack_destroyed(UDP, key_b, (i6(S6), 5353, i6(C6), 40000), T0 + 40)
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd) and end.reason is FlowEndReason.IDLE
    assert rig.core.stats()["flows_ipv6"] == 0 and rig.core.counters["flows.ended.idle"] == 1


def test_a_flood_of_new_ipv6_udp_sources_stops_at_the_pool_counted() -> None:
    rig = Rig6(UDP_CONFIG)  # 2 addresses x 3 ports: 6 bindings at most
    verdicts = [rig.send(dgram(C6, 1000 + n), WAN0)[0] for n in range(50)]
    assert verdicts.count(PASS) == 6 and verdicts.count(DROP) == 44
    assert rig.core.counters["drop.refused.pool_exhausted"] == 44
    assert rig.core.stats()["flows_ipv6"] == 6
    assert sum(isinstance(m, NewFlow) for m in rig.messages()) == 6
    # A martian source gets nothing: no binding, no signalling.
    assert rig.send(dgram("fe80::1", 1), WAN0)[0] == DROP and rig.core.counters["drop.martian"] == 1
    assert rig.messages() == []


FORWARD6 = CONFIG + """
[[nat.forward]]
name = "relay6"
from = "wan"
proto = "tcp"
port = 9000
to = "[fd00:1::10]:9001"

[[nat.forward]]
name = "relay"
from = "wan"
proto = "tcp"
port = 9000
to = "192.168.1.10:9002"
"""


def test_an_ipv6_port_forward_into_the_gateway_binds_to_its_target() -> None:
    """ext addresses the router's IPv6 address: the server is the IPv6 forward's target (never the IPv4 one's)."""
    rig = Rig6(FORWARD6)
    verdict, ops, _ = rig.send(syn(C6, 40000, W6, 9000), WAN0)
    assert verdict == PASS, dict(rig.core.counters)
    key = (i6(C6), 40000, i6(W6), 9000)
    assert ops[0] == (DNAT6_MAP, "tcp", key, (i6(G6), 20000))
    (msg,) = rig.messages()
    flow = msg.flow
    assert (str(flow.original_dst.address), flow.original_dst.port) == (W6, 9000)
    assert (str(flow.server.address), flow.server.port) == (S6, 9001)
    assert ops[2] == (LEGB_DNAT6_MAP, "tcp", (i6(G6), i6(F6), 1024), (i6(S6), 9001))  # leg B to the target
    assert rig.send(syn(G6, 50000, F6, 1024), BLIND)[0] == PASS
    # Without an IPv6 forward the router's own port is the input chain's (its counted drop).
    bare = Rig6()
    assert bare.send(syn(C6, 40001, W6, 9000), WAN0) == (PASS, (), PASSED)
    assert bare.core.counters["passed.other_zone"] == 1 and bare.messages() == []


def test_a_restarted_processor_adopts_its_ipv6_bindings_from_conntrack() -> None:
    """Bind a flow with both legs, then hand its two connections to a fresh core: the same
    binding (F6:f claimed, leg B's server and port), ended by conntrack like any other."""
    rig = Rig6(FORWARD6)
    rig.send(syn(C6, 40000, W6, 9000), WAN0)
    rig.send(syn(G6, 50000, F6, 1024), BLIND)
    (before,) = rig.core.flows(T0 + 1, 10)
    f = (i6(F6), 1024)
    leg_a = Connection(TCP, (i6(C6), 40000, i6(W6), 9000), (i6(G6), 20000, *f))
    leg_b = Connection(TCP, (i6(G6), 50000, *f), (i6(S6), 9001, i6(C6), 40000))
    other = Connection(TCP, (i6(C6), 40001, i6(S6), 22), (i6(S6), 22, i6(C6), 40001))  # not a leg

    fresh = Rig6(FORWARD6)
    assert fresh.core.adopt6([other, leg_b, leg_a], T0 + 2) == 1
    (after,) = fresh.core.flows(T0 + 3, 10)
    for key in ("proto", "client", "original_dst", "server", "firewall_side", "ag", "ag_eport"):
        assert after[key] == before[key], key
    assert fresh.messages() == []  # the gateway has the flow: no NEW_FLOW
    assert fresh.core.six.pool.in_use(*f)
    # A new flow gets another F6:f; the adopted one ends with its connections.
    assert fresh.send(syn(C6, 40002, W6, 9000), WAN0)[1][1][3] != f
    fresh.messages()
    fresh.core.conntrack_destroyed(TCP, leg_a.orig, leg_a.reply, T0 + 5)
    fresh.core.conntrack_destroyed(TCP, leg_b.orig, leg_b.reply, T0 + 5)
    (end,) = fresh.messages()
    assert isinstance(end, FlowEnd) and end.flow_id == after["flow_id"]
    assert not fresh.core.six.pool.in_use(*f)
    # Without leg B (not started yet), the server is the IPv6 forward's target.
    again = Rig6(FORWARD6)
    assert again.core.adopt6([leg_a], T0 + 2) == 1
    (only_a,) = again.core.flows(T0 + 3, 10)
    assert only_a["server"] == f"[{S6}]:9001" and only_a["ag_eport"] is None


def test_lost_events_are_made_good_by_a_dump_of_the_ipv6_connections() -> None:
    rig = Rig6()
    rig.send(syn(C6, 40000, S6, 9000), WAN0)
    rig.send(syn(G6, 50000, F6, 1024), BLIND)
    rig.messages()
    leg_a = (TCP, i6(C6), 40000, i6(S6), 9000)
    leg_b = (TCP, i6(G6), 50000, i6(F6), 1024)
    rig.core.resync6([Connection(TCP, leg_a[1:], (0, 0, 0, 0)), Connection(TCP, leg_b[1:], (0, 0, 0, 0))])
    assert rig.messages() == [] and rig.core.stats()["flows_ipv6"] == 1
    rig.core.resync6([])  # both gone, their destroy events lost
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd) and rig.core.stats()["flows_ipv6"] == 0


def test_each_instance_binds_ipv6_from_its_own_slice_of_the_pool() -> None:
    """Two queues: instance 1 allocates F6 from the pool's second /125 (the ruleset's steer_pool6
    sends leg B there), and flow ids carry its queue."""
    two = CONFIG + "\n[processor]\nqueues = [0, 1]\n"
    rig = Rig6(two, instance=1)
    verdict, ops, _ = rig.send(syn("2001:db8:2::11", 40000, S6, 9000), WAN0)
    assert verdict == PASS
    f = ops[1][3]
    assert ipaddress.IPv6Address(f[0]) in ipaddress.IPv6Network("fd6e:6667:6174:fe::8/125")
    (msg,) = rig.messages()
    assert msg.flow.flow_id >> 48 == 1  # the queue in the flow id's top 16 bits
    zero = Rig6(two, instance=0)
    assert ipaddress.IPv6Address(zero.send(syn(C6, 40000, S6, 9000), WAN0)[1][1][3][0]) in \
        ipaddress.IPv6Network("fd6e:6667:6174:fe::/125")


def test_an_ipv6_log_only_flow_passes_unbound_and_ends_with_conntracks_counters() -> None:
    """A log-only tcp-relay over IPv6, as over IPv4: the first packet passes unchanged with the
    ``rewritten`` mark, no binding; NEW_FLOW family 6 without F6:f; conntrack's end is FLOW_END
    with the kernel's counters."""
    rig = Rig6()
    key = (i6(C6), 40000, i6(S6), 8080)
    assert rig.send(syn(C6, 40000, S6, 8080), WAN0) == (PASS, (), MARK)
    (msg,) = rig.messages()
    flow = msg.flow
    assert isinstance(msg, NewFlow) and flow.family == 6 and flow.gateway == "logger"
    assert str(flow.firewall_side) == "[::]:0" and str(flow.ag) == f"[{G6}]:20025"
    assert str(flow.server) == f"[{S6}]:8080"
    assert rig.core.stats()["flows_ipv6"] == 0 and rig.core.stats()["logged_flows"] == 1
    # Not a bare SYN, or another direction than the selector's: as for IPv4.
    assert rig.send(IPv6(src=C6, dst=S6) / ScapyTCP(sport=40001, dport=8080, flags="A"), WAN0)[0] == DROP
    assert rig.send(syn(S6, 40002, C6, 8080), LAN0) == (PASS, (), PASSED)
    counters = Counters(3, 300, 2, 4000)
    rig.core.conntrack_destroyed(TCP, key, (i6(S6), 8080, i6(C6), 40000), T0 + 2, counters)
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd) and end.flow_id == flow.flow_id and end.counters == counters
    assert rig.core.stats()["logged_flows"] == 0


MASQ6 = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[nat]
masquerade6 = ["wan"]
[processor.timeouts]
confirm = 5
[processor.pools]
snat_ports = "61000-61001"
[[gateway]]
name = "relay"
kind = "tcp-relay"
listen_port = 20000
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000
"""
LANC, EXTS = S6, C6  # outbound: the lan client, the ext server


def masq_route(dst: int) -> Route | None:
    """wan leaves from the router's W6 (the kernel's source address selection)."""
    got = route(dst)
    return Route(False, "wan0", i6(W6)) if got is not None and got.ifname == "wan0" else got


def test_an_ipv6_flow_into_a_masquerade6_zone_leaves_from_the_routers_w6() -> None:
    """Leg B's source is W6:w of the SNAT pool (IPv4's W:w twin): NEW_FLOW says it, the
    listing shows it, its elements name it, and it goes back to the pool with the binding."""
    rig = Rig6(MASQ6, routes=masq_route)
    verdict, ops, _ = rig.send(syn(LANC, 40000, EXTS, 9000), LAN0)
    assert verdict == PASS, dict(rig.core.counters)
    f, w = (i6(F6), 1024), (i6(W6), 61000)
    assert ops[2:] == ((LEGB_DNAT6_MAP, "tcp", (i6(G6), *f), (i6(EXTS), 9000)), (LEGB_SNAT6_MAP, "tcp", (i6(G6), *f), w))
    (msg,) = rig.messages()
    assert msg.flow.family == 6 and str(msg.flow.snat) == f"[{W6}]:61000"
    (listed,) = rig.core.flows(T0 + 1, 10)
    assert listed["snat"] == f"[{W6}]:61000"
    assert rig.core.stats()["pools"]["snat"][W6]["used"] == 1
    late = Rig6(MASQ6, routes=masq_route)
    late.send(syn(LANC, 40000, EXTS, 9000), LAN0)
    key_b = (i6(G6), 50000, *f)
    assert late.send(syn(G6, 50000, F6, 1024), BLIND, T0 + 9)[1] == (
        (DNAT6_MAP, "tcp", key_b, (i6(EXTS), 9000)), (SNAT6_MAP, "tcp", key_b, w))
    # A second flow, then the pool (2 ports) is spent: counted, nothing bound.
    assert rig.send(syn(LANC, 40001, EXTS, 9000), LAN0)[0] == PASS
    assert rig.send(syn(LANC, 40002, EXTS, 9000), LAN0)[0] == DROP
    assert rig.core.counters["drop.refused.snat_pool_exhausted"] == 1
    assert rig.core.six.pool.available == rig.core.six.pool.capacity - 2  # F6:f given back
    # The first flow ends: W6:w is free again.
    rig.core.conntrack_destroyed(TCP, (i6(LANC), 40000, i6(EXTS), 9000), (i6(G6), 20000, *f), T0 + 2)
    assert rig.core.stats()["pools"]["snat"][W6]["used"] == 1
    assert rig.send(syn(LANC, 40003, EXTS, 9000), LAN0)[0] == PASS
    # No source address on the route: dropped, counted, never leg B from the client's.
    bare = Rig6(MASQ6)
    assert bare.send(syn(LANC, 40000, EXTS, 9000), LAN0)[0] == DROP
    assert bare.core.counters["drop.no_source_address"] == 1 and bare.messages() == []


def test_a_restarted_processor_keeps_the_w6_of_its_masqueraded_ipv6_bindings() -> None:
    rig = Rig6(MASQ6, routes=masq_route)
    rig.send(syn(LANC, 40000, EXTS, 9000), LAN0)
    rig.send(syn(G6, 50000, F6, 1024), BLIND)
    f, w = (i6(F6), 1024), (i6(W6), 61000)
    leg_a = Connection(TCP, (i6(LANC), 40000, i6(EXTS), 9000), (i6(G6), 20000, *f))
    leg_b = Connection(TCP, (i6(G6), 50000, *f), (i6(EXTS), 9000, *w))
    fresh = Rig6(MASQ6, routes=masq_route)
    assert fresh.core.adopt6([leg_b, leg_a], T0 + 2) == 1
    (after,) = fresh.core.flows(T0 + 3, 10)
    assert after["snat"] == f"[{W6}]:61000" and after["server"] == f"[{EXTS}]:9000"
    assert fresh.core.snat_pools.claim(*w) is False  # claimed
    fresh.core.conntrack_destroyed(TCP, leg_a.orig, leg_a.reply, T0 + 5)
    fresh.core.conntrack_destroyed(TCP, leg_b.orig, leg_b.reply, T0 + 5)
    assert isinstance(fresh.messages()[-1], FlowEnd) and fresh.core.stats()["pools"]["snat"][W6]["used"] == 0
    # Leg B not started yet: a new W6:w, as for IPv4.
    again = Rig6(MASQ6, routes=masq_route)
    assert again.core.adopt6([leg_a], T0 + 2) == 1
    (only_a,) = again.core.flows(T0 + 3, 10)
    assert only_a["snat"] == f"[{W6}]:61000" and only_a["ag_eport"] is None


def test_a_restarted_processor_adopts_its_ipv6_log_only_flows() -> None:
    """As IPv4's: a connection of the dump that is no leg and that a log-only selector names is
    tracked again under a new flow id, pushed, and ended with conntrack's counters."""
    logged = Connection(TCP, (i6(C6), 40000, i6(S6), 8080), (i6(S6), 8080, i6(C6), 40000))
    other = Connection(TCP, (i6(C6), 40001, i6(S6), 22), (i6(S6), 22, i6(C6), 40001))
    fresh = Rig6()
    assert fresh.core.adopt6([other, logged], T0) == 0  # no binding
    (msg,) = fresh.messages()
    assert isinstance(msg, NewFlow) and msg.flow.gateway == "logger" and msg.flow.family == 6
    assert fresh.core.counters["flows.adopted_logged"] == 1 and fresh.core.stats()["logged_flows"] == 1
    fresh.core.conntrack_destroyed(TCP, logged.orig, logged.reply, T0 + 1, Counters(1, 60, 1, 60))
    (end,) = fresh.messages()
    assert isinstance(end, FlowEnd) and end.flow_id == msg.flow.flow_id and end.counters.bytes_up == 60


MASQ6_RTP = MASQ6.replace('name = "relay"\nkind = "tcp-relay"', 'name = "media"\nkind = "rtp"').replace(
    'proto = "tcp"\nports = 9000', 'proto = "udp"\nports = "5004-5005"') + '[gateway.settings]\nadjacent = "processor"\n'


def test_the_adjacent_rules_flow_into_a_masquerade6_zone_leaves_from_w6_too() -> None:
    """An outbound RTP flow behind masquerade6: its leg B leaves from W6:w; RTCP beside it, bound by
    the processor's adjacent REDIRECT, gets its own W6:w' (as IPv4's redirected flows do)."""
    rig = Rig6(MASQ6_RTP, routes=masq_route)
    rtp = IPv6(src=LANC, dst=EXTS) / ScapyUDP(sport=40000, dport=5004) / b"\x80\x00\x00\x01"
    assert rig.send(rtp, LAN0)[0] == PASS, dict(rig.core.counters)
    (new,) = rig.messages()
    assert str(new.flow.snat) == f"[{W6}]:61000"
    out = rig.core.take()
    for op in out.kernel_ops:  # the adjacent rule into the kernel
        rig.core.kernel_done(op.token, True, T0)
    rtcp = IPv6(src=LANC, dst=EXTS) / ScapyUDP(sport=40001, dport=5005) / b"\x80\xc8\x00\x01"
    verdict, ops, _ = rig.send(rtcp, LAN0)
    assert verdict == PASS and rig.core.counters["rules.redirected_flows"] == 1, dict(rig.core.counters)
    assert ops[-1][0] == LEGB_SNAT6_MAP and ops[-1][3] == (i6(W6), 61001)
    (new,) = [m for m in rig.messages() if isinstance(m, NewFlow)]
    assert new.flow.original_dst.port == 5005 and str(new.flow.snat) == f"[{W6}]:61001"


def test_a_replaced_ipv6_binding_s_closing_leg_b_goes_before_the_new_one_s_leg_b() -> None:
    """As over IPv4 (test_processor_core): the old leg B's reply tuple is the new leg B's, and
    it goes at the new leg B's verdict (or at once when the packet makes no binding)."""
    rig = Rig6()
    rig.send(syn(C6, 40000, S6, 9000), WAN0)
    rig.send(syn(G6, 50000, F6, 1024), BLIND)  # leg B, from G6:50000
    rig.core.take()
    # Later, the same client port again; the old leg A is gone from conntrack (a SYN ended its
    # TIME-WAIT), its leg B still there.
    rig.alive.add((TCP, i6(G6), 50000, i6(F6), 1024))
    verdict, _, _ = rig.send(syn(C6, 40000, S6, 9000), WAN0, T0 + 10)
    assert verdict == PASS and rig.core.counters["flows.replaced"] == 1
    assert rig.core.take().ct_deletes == []  # the gateway may still be closing the old leg B
    f6b = str(ipaddress.IPv6Address(i6(F6) + 1))  # the new binding's F6:f
    assert rig.send(syn(G6, 50001, f6b, 1024), BLIND, T0 + 10)[0] == PASS  # the new binding's leg B
    assert rig.core.take().ct_deletes == [(TCP, i6(G6), 50000, i6(F6), 1024)]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 1
    # Once more from the port, its leg B seen; this time the new binding never gets a leg B
    # and ends: the one it replaced goes with it.
    rig.alive.add((TCP, i6(G6), 50001, i6(f6b), 1024))
    rig.send(syn(C6, 40000, S6, 9000), WAN0, T0 + 20)
    assert rig.core.take().ct_deletes == []
    (f6c, fc), = [k[1:] for k in rig.core.six._by_fw]  # the third binding's F6:f
    rig.core.conntrack_destroyed(TCP, (i6(C6), 40000, i6(S6), 9000), (i6(G6), 20000, f6c, fc), T0 + 21)
    assert rig.core.take().ct_deletes == [(TCP, i6(G6), 50001, i6(f6b), 1024)]
    assert rig.core.counters["conntrack.closing_leg_b_deleted"] == 2


def test_an_ipv6_leg_b_made_again_after_its_connection_was_destroyed_keeps_the_binding() -> None:
    """As over IPv4 (test_processor_core): leg A's end does not end a binding whose leg B lives again."""
    rig = Rig6()
    rig.send(syn(C6, 40000, S6, 9000), WAN0)
    key = (i6(C6), 40000, i6(S6), 9000)
    key_b = (i6(G6), 50000, i6(F6), 1024)
    reply_b = (i6(S6), 9000, i6(C6), 40000)
    rig.send(syn(G6, 50000, F6, 1024), BLIND)
    rig.core.conntrack_destroyed(TCP, key_b, reply_b, T0 + 1)  # reset before it was established
    assert rig.send(syn(G6, 50000, F6, 1024), BLIND, T0 + 1)[0] == PASS
    rig.alive.add((TCP, *key_b))
    rig.messages()
    rig.core.conntrack_destroyed(TCP, key, (i6(G6), 20000, i6(F6), 1024), T0 + 2)
    assert rig.messages() == [] and rig.core.stats()["flows_ipv6"] == 1
    rig.core.conntrack_destroyed(TCP, key_b, reply_b, T0 + 2)
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd)
