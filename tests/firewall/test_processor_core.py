"""firewall.processor.core: playbooks of packets and messages through the pure processor.

Each test states the packets in (as the wire carries them, built with scapy)
and the verdict, bytes, mark and signalling out. Routes, interface names and
the router's addresses are plain functions of a fake router:

    ext 203.0.113.10 --- wan0 203.0.113.1 [router] lan0 192.168.1.1 --- lan 192.168.1.10
                                          |  dmz0 10.0.0.1 --- 10.0.0.0/24
                                          nfg-gw0 172.31.255.1 --- gateways 172.31.255.2
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.packet import Raw

from firewall.config import loads
from firewall.processor.core import DROP, PASS, REPEAT, ProcessorCore, Route
from firewall.processor.dynamic import _ipt_specs
from firewall.config.model import Processor
from firewall.processor.rulebook import KernelOp

MAX_RULES_PER_FLOW = Processor().max_rules_per_flow
from firewall.rules import nft
from firewall.rules.model import Proto as ProtoMatch
from firewall.rules.model import Queue
from firewall.signalling import (
    Answer,
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

KEY = bytes(range(32))
T0 = 1000.0  # monotonic
WALL0 = 1_700_000_000.0
MARK = 0x00010000
QOS = 0x00000007  # a bit outside nfgate's mask: must survive every verdict

C = "203.0.113.10"  # ext client
W = "203.0.113.1"  # router wan
S = "192.168.1.10"  # lan server
L = "192.168.1.1"  # router lan
G = "172.31.255.2"  # gateways
R = "172.31.255.1"  # router, blind track
IF = {2: "wan0", 3: "lan0", 4: "nfg-gw0", 5: "dmz0", 1: "lo"}
WAN0, LAN0, BLIND, DMZ0 = 2, 3, 4, 5

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
tcp_idle = 100
tcp_closing = 5
tcp_handshake = 10
udp_idle = 20
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
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "udp"
ports = "10000-10100"
"""


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def route(dst: int) -> Route | None:
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


class Rig:
    """A core with a fake router around it, and the gateway layer's end of signalling."""

    def __init__(self, pools: str = "", push: bool = True) -> None:
        self.config = loads(CONFIG.replace("{pools}", pools))
        self.core = ProcessorCore(
            self.config, 0, Encoder(KEY, Role.PROCESSOR), Guard(KEY, Role.PROCESSOR, now=WALL0),
            route=route, ifname=IF.get,
            local_addresses=lambda: [ipaddress.IPv4Address(a) for a in (W, L, R, "10.0.0.1")],
            now=T0, wall=WALL0, push=push,
        )
        self.gw_guard = Guard(KEY, Role.GATEWAY, now=WALL0)
        self.gw_encoder = Encoder(KEY, Role.GATEWAY)
        self.now = T0

    def send(self, pkt: Any, indev: int, mark: int = QOS) -> tuple[int, Any, int]:
        verdict, payload, out_mark = self.core.handle(bytes(pkt), mark, indev, self.now)
        return verdict, (IP(payload) if payload is not None else None), out_mark

    def rewritten(self, pkt: Any, indev: int) -> Any:
        verdict, out, mark = self.send(pkt, indev)
        assert verdict == REPEAT, self.core.counters
        assert mark == QOS | MARK
        assert_checksums(out)
        return out

    def received(self) -> list[tuple[Any, tuple[str, int]]]:
        """What the gateway layer got since last asked (duplicates folded by its Guard)."""
        out = []
        for data, peer in self.core.outbox:
            got = self.gw_guard.check(data, self.now - T0 + WALL0)
            if isinstance(got, Received):
                out.append((got.message, peer))
        self.core.outbox.clear()
        return out

    def messages(self) -> list[Any]:
        return [m for m, _ in self.received()]

    def ask(self, msg: Any) -> list[Any]:
        self.core.datagram(self.gw_encoder.encode(msg, self.now - T0 + WALL0), (G, 7500), self.now)
        return self.messages()

    def kernel(self, ok: bool = True, counts: dict[str, int] | None = None) -> list[KernelOp]:
        """Complete every queued kernel operation; return them."""
        ops = list(self.core.rules.kernel_ops)
        self.core.rules.kernel_ops.clear()
        for op in ops:
            self.core.kernel_done(op.token, ok, self.now, counts)
        return ops

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.core.tick(self.now, self.now - T0 + WALL0)


def assert_checksums(pkt: Any) -> None:
    fresh = IP(bytes(pkt))
    l4 = fresh.payload
    sent_ip, sent_l4 = fresh.chksum, l4.chksum
    del fresh.chksum
    del l4.chksum
    again = IP(bytes(fresh))
    assert again.chksum == sent_ip
    assert again.payload.chksum == sent_l4


def tcp(src: str, sport: int, dst: str, dport: int, flags: str = "A", data: bytes = b"") -> Any:
    pkt = IP(src=src, dst=dst) / ScapyTCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000)
    return pkt / Raw(data) if data else pkt


def udp(src: str, sport: int, dst: str, dport: int, data: bytes = b"x") -> Any:
    return IP(src=src, dst=dst) / ScapyUDP(sport=sport, dport=dport) / Raw(data)


def ends(pkt: Any) -> tuple[str, int, str, int]:
    return pkt.src, pkt.payload.sport, pkt.dst, pkt.payload.dport


def open_inbound(rig: Rig, sport: int = 40000, port: int = 8443) -> tuple[Any, Any]:
    """C SYN to the router's port: rewritten into the gateway, pushed first. (push, F:f)"""
    out = rig.rewritten(tcp(C, sport, W, port, "S"), WAN0)
    pushes = rig.received()
    assert len(pushes) == 1 and isinstance(pushes[0][0], NewFlow)
    flow = pushes[0][0].flow
    # To the signalling port of the gateway the flow belongs to: 7500 + its index.
    assert pushes[0][1] == (G, {"relay": 7500, "ftp": 7501}[flow.gateway])
    assert ends(out) == (str(flow.firewall_side.address), flow.firewall_side.port, G, flow.ag.port)
    return flow, out


# ---- the two legs ---------------------------------------------------------------------


def test_port_forward_flow_through_both_legs() -> None:
    rig = Rig()
    flow, syn = open_inbound(rig)
    assert rig.core.counters["signalling.copies"] == 3  # signalling.copies, back to back
    assert (flow.gateway, flow.ag) == ("relay", Endpoint(ipaddress.IPv4Address(G), 20000))
    assert str(flow.client) == f"{C}:40000"
    assert str(flow.original_dst) == f"{W}:8443"
    assert str(flow.server) == f"{S}:443"  # the port forward's target, done by the processor
    F, f = str(flow.firewall_side.address), flow.firewall_side.port
    assert ipaddress.IPv4Address(F) in ipaddress.IPv4Network("172.31.254.0/28")
    assert syn.payload.flags == "S"

    # Leg A: the gateway's SYN-ACK, restored: the client sees the router's address.
    out = rig.rewritten(tcp(G, 20000, F, f, "SA"), BLIND)
    assert ends(out) == (W, 8443, C, 40000)
    # The client's ACK and data: into the gateway.
    out = rig.rewritten(tcp(C, 40000, W, 8443, "A", b"hello"), WAN0)
    assert ends(out) == (F, f, G, 20000) and bytes(out.payload.payload) == b"hello"

    # Leg B: the gateway swaps to F:f from its own port e; the server sees the real client.
    out = rig.rewritten(tcp(G, 51000, F, f, "S"), BLIND)
    assert ends(out) == (C, 40000, S, 443)
    out = rig.rewritten(tcp(S, 443, C, 40000, "SA"), LAN0)
    assert ends(out) == (F, f, G, 51000)
    out = rig.rewritten(tcp(G, 51000, F, f, "A", b"data"), BLIND)
    assert ends(out) == (C, 40000, S, 443)
    assert rig.received() == []  # one push per flow, not per packet
    assert len(rig.core.table) == 1


def test_outbound_flow_is_snatted_by_the_processor() -> None:
    rig = Rig()
    out = rig.rewritten(tcp(S, 5555, C, 9000, "S"), LAN0)
    (msg, _), = rig.received()
    flow = msg.flow
    assert (str(flow.client), str(flow.server), str(flow.original_dst)) == (f"{S}:5555", f"{C}:9000", f"{C}:9000")
    F, f = str(flow.firewall_side.address), flow.firewall_side.port
    assert ends(out) == (F, f, G, 20000)
    out = rig.rewritten(tcp(G, 20000, F, f, "SA"), BLIND)
    assert ends(out) == (C, 9000, S, 5555)
    # Leg B leaves through masquerade: the router's address, a port of the SNAT pool.
    out = rig.rewritten(tcp(G, 52000, F, f, "S"), BLIND)
    src, w, dst, dport = ends(out)
    assert (src, dst, dport) == (W, C, 9000) and 61000 <= w <= 65535
    out = rig.rewritten(tcp(C, 9000, W, w, "SA"), WAN0)
    assert ends(out) == (F, f, G, 52000)
    assert rig.core.stats()["pools"]["snat"] == {W: {"used": 1, "capacity": 4536, "exhausted": 0}}


def test_not_a_selector_and_wrong_zone_pass_to_the_kernel() -> None:
    rig = Rig()
    # A reply-rule match for a flow the kernel owns (dmz -> lan:8443 replies from lan).
    verdict, out, mark = rig.send(tcp(S, 8443, "10.0.0.5", 3333, "SA"), LAN0)
    assert (verdict, out, mark) == (PASS, None, QOS | 0x00020000)
    # lan -> dmz:9000: the selector is lan -> wan, so every packet of it passes.
    for flags in ("S", "A", "FA"):
        assert rig.send(tcp(S, 6000, "10.0.0.5", 9000, flags), LAN0)[0] == PASS
    # Port 9000 is a selector from lan, not from wan.
    assert rig.send(tcp(C, 7000, W, 9000, "S"), WAN0)[0] == PASS
    c = rig.core.counters
    assert (c["passed.not_a_selector"], c["passed.other_zone"], c["verdict.pass"]) == (2, 3, 5)
    assert len(rig.core.table) == 0 and rig.received() == []


def test_mid_stream_without_binding_is_dropped_and_counted() -> None:
    rig = Rig()
    for flags in ("A", "PA", "SA", "R", "SF"):
        assert rig.send(tcp(S, 5555, C, 9000, flags), LAN0)[0] == DROP
    assert rig.core.counters["drop.not_new_flow"] == 5
    # And from the blind track, to an F:f nobody holds.
    assert rig.send(tcp(G, 20000, "172.31.254.3", 2000, "SA"), BLIND)[0] == DROP
    assert rig.core.counters["drop.gateway_without_binding"] == 1


GARBAGE = {
    "too_short": b"\x45\x00\x00",
    "not_ipv4": bytes(IP(version=6, src=C, dst=W) / ScapyTCP(dport=8443)),
    "bad_ihl": bytes.fromhex("42000028") + bytes(36),
    "bad_total_length": bytes(IP(len=12, src=C, dst=W) / ScapyTCP(dport=8443)),
    "truncated": bytes(IP(len=200, src=C, dst=W) / ScapyTCP(dport=8443)),
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
        assert (verdict, out, mark) == (DROP, None, QOS), reason
        assert rig.core.counters[f"drop.malformed.{reason}"] == 1, reason
    assert rig.core.counters["verdict.drop"] == len(GARBAGE)
    first_fragment = bytes(IP(flags="MF", src=C, dst=W) / ScapyTCP(dport=8443, flags="S"))
    assert rig.core.handle(first_fragment, 0, WAN0, T0)[0] == DROP
    assert rig.core.counters["drop.fragment"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([WAN0, LAN0, BLIND, 99]))
def test_handle_never_raises(data: bytes, indev: int) -> None:
    rig = Rig()
    verdict, _, _ = rig.core.handle(data, 0, indev, T0)
    assert verdict in (DROP, PASS, REPEAT)


# ---- pools and expiry -----------------------------------------------------------------


def test_pool_exhaustion_drops_and_counts() -> None:
    rig = Rig('[processor.pools]\nfirewall_side = "172.31.254.0/32"\nports = "40000-40001"\n')
    for sport in (1, 2):
        rig.rewritten(tcp(C, 30000 + sport, W, 8443, "S"), WAN0)
    assert rig.send(tcp(C, 30003, W, 8443, "S"), WAN0)[0] == DROP
    assert rig.core.counters["drop.refused.fw_pool_exhausted"] == 1
    stats = rig.core.stats()["pools"]["firewall_side"]
    assert stats == {"used": 2, "capacity": 2, "exhausted": 1}

    snat = Rig('[processor.pools]\nsnat_ports = "64000-64000"\n')
    snat.rewritten(tcp(S, 1, C, 9000, "S"), LAN0)
    assert snat.send(tcp(S, 2, C, 9000, "S"), LAN0)[0] == DROP
    assert snat.core.counters["drop.refused.snat_pool_exhausted"] == 1
    assert len(snat.core.fw_pool) == 1  # the F:f of the refused flow went back


def test_expiry_releases_pool_entries_and_signals_flow_end() -> None:
    rig = Rig()
    flow, _ = open_inbound(rig)
    rig.rewritten(udp(S, 4000, C, 10000), LAN0)  # an RTP flow, SNATed
    rig.messages()
    rig.kernel()  # (its adjacent-port expectation)
    assert len(rig.core.fw_pool) == 2 and rig.core.stats()["pools"]["snat"][W]["used"] == 1
    rig.tick(9)
    assert len(rig.core.table) == 2 and rig.messages() == []
    rig.tick(2)  # tcp_handshake 10 s: the half-open TCP flow goes
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.IDLE)]
    rig.tick(10)  # udp_idle 20 s
    (end,) = rig.messages()
    assert isinstance(end, FlowEnd) and end.reason is FlowEndReason.IDLE
    assert len(rig.core.table) == 0 and len(rig.core.fw_pool) == 0
    assert sum(s["used"] for s in rig.core.snat_pools.stats().values()) == 0
    assert rig.core.counters["flows.ended.idle"] == 2

    # FIN both ways on both legs: FLOW_END FIN after tcp_closing.
    flow, _ = open_inbound(rig, sport=40001)
    F, f = str(flow.firewall_side.address), flow.firewall_side.port
    rig.rewritten(tcp(G, 20000, F, f, "SA"), BLIND)
    rig.rewritten(tcp(C, 40001, W, 8443, "A"), WAN0)
    rig.rewritten(tcp(G, 50001, F, f, "S"), BLIND)
    rig.rewritten(tcp(S, 443, C, 40001, "SA"), LAN0)
    for pkt, dev in ((tcp(C, 40001, W, 8443, "FA"), WAN0), (tcp(G, 20000, F, f, "FA"), BLIND),
                     (tcp(G, 50001, F, f, "FA"), BLIND), (tcp(S, 443, C, 40001, "FA"), LAN0)):
        rig.rewritten(pkt, dev)
    rig.tick(6)
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN)]
    assert len(rig.core.fw_pool) == 0


def test_new_syn_on_a_closing_flow_replaces_it() -> None:
    """RFC 9293 3.10.7.4: a client may reuse its port while the old connection closes."""
    rig = Rig()
    old, _ = open_inbound(rig)
    F, f = str(old.firewall_side.address), old.firewall_side.port
    rig.rewritten(tcp(C, 40000, W, 8443, "R"), WAN0)  # leg A reset; leg B never started: closing
    rig.rewritten(tcp(C, 40000, W, 8443, "S"), WAN0)  # the same client port again
    end, push = rig.messages()
    assert end == FlowEnd(old.flow_id, FlowEndReason.FIN)  # the old one's end goes first
    new = push.flow
    assert new.flow_id != old.flow_id and (str(new.firewall_side.address), new.firewall_side.port) != (F, f)
    assert rig.core.counters["flows.ended.fin"] == 1 and len(rig.core.table) == 1


# ---- signalling -----------------------------------------------------------------------


def test_query_answers_what_the_table_holds() -> None:
    rig = Rig(push=False)
    out = rig.rewritten(tcp(C, 40000, W, 8443, "S"), WAN0)
    assert rig.received() == [] and rig.core.counters["signalling.push_skipped"] == 1
    F, f = ipaddress.IPv4Address(out.src), out.payload.sport
    gw = Endpoint(ipaddress.IPv4Address(G), 20000)
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
    query = Query(1, Proto.TCP, Endpoint(ipaddress.IPv4Address("172.31.254.1"), 1024),
                  Endpoint(ipaddress.IPv4Address(G), 20000))
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


# ---- dynamic rules --------------------------------------------------------------------


def ftp_session(rig: Rig) -> Any:
    flow, _ = open_inbound(rig, sport=41000, port=21)
    assert flow.gateway == "ftp" and str(flow.server) == f"{S}:21"
    return flow


def request(rig: Rig, flow_id: int, src: str, sport: int, dst: str, dport: int, *, rid: int = 1,
            mode: RuleMode = RuleMode.REDIRECT, ttl: int = 30, one_shot: bool = True) -> RuleRequest:
    return RuleRequest(rid, flow_id, Proto.TCP, Endpoint(ipaddress.IPv4Address(src), sport),
                       Endpoint(ipaddress.IPv4Address(dst), dport), ttl, mode, one_shot)


def test_redirect_rule_is_acked_when_installed_and_takes_its_flow() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    # PASV through the port forward: the client will connect to W:50000, really S:50000.
    req = request(rig, ftp.flow_id, C, 0, W, 50000)
    assert rig.ask(req) == []  # no ACK before the kernel has the rule
    (op,) = rig.core.rules.kernel_ops
    assert op.add and len(op.rules) == 2
    lines = [spec for r in op.rules for spec in _ipt_specs(r)[1]]
    tag0, tag1 = op.rules[0].tag, op.rules[1].tag
    assert lines == [
        f'NFGATE-DYN-REDIRECT -p tcp -s {C} -d {W} --dport 50000 -m comment --comment "{tag0}" -j NFQUEUE --queue-num 0',
        f'NFGATE-DYN-REDIRECT -p tcp -s {S} --sport 50000 -d {C} -m comment --comment "{tag1}" -j NFQUEUE --queue-num 0',
    ]
    assert nft.render_rule(op.rules[0].rule) == (
        f'meta nfproto ipv4 ip saddr {C} ip daddr {W} tcp dport 50000 counter queue num 0 comment "{tag0}"'
    )
    assert rig.ask(req) == []  # a retry while it installs: nothing new, nothing twice
    rig.kernel()
    (ack,) = rig.messages()
    assert isinstance(ack, RuleAck) and ack.request_id == 1
    assert ack.expires_ms == round((WALL0 + 30) * 1000)
    assert rig.ask(req) == [ack]  # a repeat gets the same answer, not a second rule
    assert rig.core.counters["rules.repeated"] == 2 and len(rig.core.rules) == 1

    # The data connection arrives: a new binding into the ftp gateway, to the real server.
    out = rig.rewritten(tcp(C, 45000, W, 50000, "S"), WAN0)
    new, end = rig.messages()
    assert isinstance(new, NewFlow) and new.flow.gateway == "ftp"
    assert (str(new.flow.client), str(new.flow.original_dst), str(new.flow.server)) == (
        f"{C}:45000", f"{W}:50000", f"{S}:50000")
    assert end == RuleEnd(ack.rule_id, RuleEndReason.USED)
    assert ends(out)[2:] == (G, 20021)
    add_own, remove_expectation = rig.kernel()
    assert add_own.add and not remove_expectation.add
    assert remove_expectation.rules == op.rules  # after the flow's own rules are in
    own = [spec for r in add_own.rules for spec in _ipt_specs(r)[1]]
    assert own[0].startswith(f"NFGATE-DYN-REDIRECT -p tcp -s {C} --sport 45000 -d {W} --dport 50000 ")
    assert own[1].startswith(f"NFGATE-DYN-REDIRECT -p tcp -s {S} --sport 50000 -d {C} --dport 45000 ")
    # One-shot: a second connection is not the gateway's any more.
    assert rig.send(tcp(C, 45001, W, 50000, "S"), WAN0)[0] == PASS
    # The flow's own rules go when it ends.
    rig.tick(11)
    assert {type(m) for m in rig.messages()} == {FlowEnd}
    removals = rig.kernel()
    assert any(o.rules == add_own.rules and not o.add for o in removals)


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
    assert rig.core.rules.kernel_ops == []
    for n in range(MAX_RULES_PER_FLOW):
        assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000 + n, rid=100 + n)) == []
    assert rig.ask(request(rig, ftp.flow_id, C, 0, W, 51000, rid=200)) == [RuleRefused(200, RuleRefusal.LIMIT)]
    # The kernel refusing a rule is a LIMIT too, and leaves nothing behind.
    rig.kernel(ok=False)
    refusals = rig.messages()
    assert refusals == [RuleRefused(100 + n, RuleRefusal.LIMIT) for n in range(MAX_RULES_PER_FLOW)]
    assert len(rig.core.rules) == 0 and rig.core.rules.expect == {}


def test_tcp_allow_passes_its_first_syn_and_exactly_one_connection() -> None:
    """Inbound active mode: the server connects to the client, which the kernel carries as it is.
    The SYNs of the expected flow come to the processor (only those), which lets one connection through."""
    rig = Rig()
    ftp = ftp_session(rig)
    rig.ask(request(rig, ftp.flow_id, S, 0, C, 6000, mode=RuleMode.ALLOW))
    (op,) = rig.kernel()
    watch, accept = op.rules
    assert _ipt_specs(watch) == ("raw", [
        f'NFGATE-DYN-REDIRECT -p tcp -s {S} -d {C} --dport 6000 --syn -m comment --comment "{watch.tag}" '
        f'-j NFQUEUE --queue-num 0'])
    assert nft.render_rule(watch.rule) == (
        f'meta nfproto ipv4 ip saddr {S} ip daddr {C} tcp dport 6000 tcp flags & (fin | syn | rst | ack) == syn counter '
        f'queue num 0 comment "{watch.tag}"')
    assert _ipt_specs(accept) == ("filter", [
        f'NFGATE-DYN-ALLOW -p tcp -s {S} -d {C} --dport 6000 -m conntrack --ctstate NEW '
        f'-m comment --comment "{accept.tag}" -j ACCEPT'])
    (ack,) = rig.messages()
    rig.tick(1)
    assert rig.core.rules.kernel_ops == []  # no counter to poll: the SYN says when it is used
    # The first SYN passes unchanged (conntrack and the accept take it); the rule is used up.
    assert rig.send(tcp(S, 20, C, 6000, "S"), LAN0) == (PASS, None, QOS | 0x00020000)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    assert len(rig.core.rules) == 0 and rig.core.counters["rules.allowed_flows"] == 1
    # Its retransmission passes too; any other connection's SYN is dropped while the rules remain.
    assert rig.send(tcp(S, 20, C, 6000, "S"), LAN0)[0] == PASS
    assert rig.send(tcp(S, 21, C, 6000, "S"), LAN0)[0] == DROP
    assert rig.core.counters["drop.rule_used"] == 1
    assert rig.core.rules.kernel_ops == []
    rig.tick(3)  # USED_GRACE: then the unit goes, all of it
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules
    assert rig.core.rules.spent == {}
    # With the rules gone, nothing of the rule is left in the processor either.
    assert rig.send(tcp(S, 22, C, 6000, "S"), LAN0) == (PASS, None, QOS | 0x00020000)
    assert rig.core.counters["passed.not_a_selector"] == 1


def test_a_used_allow_leaves_the_kernel_with_its_flow_before_its_grace() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000, mode=RuleMode.ALLOW))
    (op,) = rig.kernel()
    rig.messages()
    assert rig.send(tcp(C, 45000, W, 50000, "S"), WAN0)[0] == PASS
    rig.core.rules.flow_ended(ftp.flow_id)  # the control connection ends within USED_GRACE
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules and rig.core.rules.spent == {}
    rig.tick(3)
    assert [o for o in rig.kernel() if not o.poll] == []  # removed once


def test_udp_allow_rule_ends_when_its_counter_moves() -> None:
    """A UDP flow has no SYN to watch: its ALLOW's use is its packet counter, polled each tick."""
    rig = Rig()
    rig.rewritten(udp(S, 4000, C, 10050), LAN0)  # an RTP flow, lan to ext
    (rtp,) = rig.messages()
    rig.kernel()  # the processor's own adjacent-port expectation
    rig.ask(RuleRequest(1, rtp.flow.flow_id, Proto.UDP, Endpoint(ipaddress.IPv4Address(C), 7000),
                        Endpoint(ipaddress.IPv4Address(S), 7001), 30, RuleMode.ALLOW, True))
    (op,) = rig.kernel()
    (rule,) = op.rules
    tag = rule.tag
    assert rule.rule.matches[0] == ProtoMatch("udp") and rule.chain == "dyn_allow"  # no SYN to watch
    (ack,) = rig.messages()
    rig.tick(1)
    (poll,) = rig.core.rules.kernel_ops
    assert poll.poll
    rig.kernel(counts={tag: 0})
    assert rig.messages() == [] and len(rig.core.rules) == 2
    rig.tick(1)
    rig.kernel(counts={tag: 1})
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
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
    rig.tick(10)  # the ftp control connection's handshake never finished
    assert rig.messages() == [FlowEnd(ftp.flow_id, FlowEndReason.IDLE), RuleEnd(acks[0].rule_id, RuleEndReason.FLOW_ENDED)]
    assert len(rig.core.rules) == 0


def allow_unit(rig: Rig, req: RuleRequest) -> tuple[KernelOp, RuleAck]:
    """Ask for a translated ALLOW; return its one kernel operation and the ACK that follows it."""
    assert rig.ask(req) == []  # no ACK before the kernel has both rules
    (op,) = rig.core.rules.kernel_ops
    rig.kernel()
    (ack,) = rig.messages()
    assert isinstance(ack, RuleAck) and rig.core.counters["rules.translated"] == 1
    return op, ack


def test_allow_to_the_port_forward_address_is_a_dnat_and_an_accept_in_one_unit() -> None:
    """Inbound PASV in allow mode: the client was told W:p; the kernel carries C -> W:p to S:p."""
    rig = Rig()
    ftp = ftp_session(rig)
    op, ack = allow_unit(rig, request(rig, ftp.flow_id, C, 0, W, 50000, mode=RuleMode.ALLOW))
    assert op.add and [r.chain for r in op.rules] == ["dyn_redirect", "dyn_dnat", "dyn_allow"]  # raw, nat, filter
    watch, dnat, accept = op.rules
    assert _ipt_specs(watch)[1][0].startswith(f"NFGATE-DYN-REDIRECT -p tcp -s {C} -d {W} --dport 50000 --syn ")
    assert _ipt_specs(dnat) == ("nat", [
        f'NFGATE-DYN-DNAT -p tcp -s {C} -d {W} --dport 50000 -m comment --comment "{dnat.tag}" '
        f'-j DNAT --to-destination {S}:50000'])
    # The accept is for the translated tuple only, and only once it was translated.
    assert _ipt_specs(accept) == ("filter", [
        f'NFGATE-DYN-ALLOW -p tcp -s {C} -d {S} --dport 50000 -m conntrack --ctstate NEW '
        f'-m conntrack --ctstate DNAT -m comment --comment "{accept.tag}" -j ACCEPT'])
    assert nft.render_rule(dnat.rule) == (
        f'meta nfproto ipv4 ip saddr {C} ip daddr {W} tcp dport 50000 counter dnat ip to {S}:50000 comment "{dnat.tag}"')
    assert nft.render_rule(accept.rule) == (
        f'meta nfproto ipv4 ip saddr {C} ip daddr {S} tcp dport 50000 ct state new ct status dnat counter accept '
        f'comment "{accept.tag}"')
    # One-shot: the first SYN passes to the kernel (which translates it), untouched; a second
    # connection's is dropped; after USED_GRACE the DNAT goes with the accept, in one removal.
    assert rig.send(tcp(C, 45000, W, 50000, "S"), WAN0) == (PASS, None, QOS | 0x00020000)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    assert rig.send(tcp(C, 45001, W, 50000, "S"), WAN0)[0] == DROP
    assert rig.core.rules.kernel_ops == [] and len(rig.core.rules) == 0
    rig.tick(3)
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == (watch, dnat, accept)
    assert rig.core.counters["rules.allowed_flows"] == 1 and rig.core.rules.spent == {}


def test_allow_to_the_snat_address_is_translated_to_the_client() -> None:
    """Outbound PORT in allow mode: NEW_FLOW says W:w; the server connects to W:p, which is C:p."""
    rig = Rig()
    rig.rewritten(tcp(S, 41000, C, 21, "S"), LAN0)  # lan client S to the ext ftp server C
    (push,) = rig.messages()
    flow = push.flow
    assert flow.gateway == "ftp" and flow.client == Endpoint(ipaddress.IPv4Address(S), 41000)
    assert flow.snat is not None and str(flow.snat.address) == W and flow.snat.port >= 61000
    op, ack = allow_unit(rig, request(rig, flow.flow_id, C, 0, W, 50001, mode=RuleMode.ALLOW, ttl=5))
    _, dnat, accept = op.rules
    assert _ipt_specs(dnat)[1][0].endswith(f"-j DNAT --to-destination {S}:50001")
    assert _ipt_specs(accept)[1][0].startswith(f"NFGATE-DYN-ALLOW -p tcp -s {C} -d {S} --dport 50001 ")
    # Unused, it ends at its TTL, both rules together.
    rig.now += 5  # past its TTL, before the tick retires it: its SYNs no longer pass
    assert rig.send(tcp(C, 20, W, 50001, "S"), WAN0)[0] == DROP
    assert rig.core.counters["drop.rule_expired"] == 1
    rig.tick(0)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.EXPIRED)]
    removals = [o for o in rig.kernel() if not o.add and not o.poll]
    assert [o.rules for o in removals] == [op.rules]


def test_allow_to_a_router_address_that_stands_for_no_party_is_refused() -> None:
    rig = Rig()
    ftp = ftp_session(rig)  # inbound, port-forwarded: W stands for the server, and only toward the client
    rig.rewritten(tcp(S, 41000, C, 21, "S"), LAN0)
    outbound = rig.messages()[0].flow  # SNATed: W stands for the client, and only toward the server
    cases = [
        request(rig, ftp.flow_id, S, 0, W, 6000, rid=1, mode=RuleMode.ALLOW),  # the server to W: no SNAT here
        request(rig, outbound.flow_id, C, 0, L, 6000, rid=2, mode=RuleMode.ALLOW),  # another router address
        request(rig, outbound.flow_id, C, 0, "10.0.0.1", 6000, rid=3, mode=RuleMode.ALLOW),  # and another
    ]
    for req in cases:
        assert rig.ask(req) == [RuleRefused(req.request_id, RuleRefusal.THIRD_PARTY)]
    assert rig.core.rules.kernel_ops == [] and len(rig.core.rules) == 0
    # The same address asked the right way round is granted; REDIRECT keeps its own mapping.
    assert rig.ask(request(rig, outbound.flow_id, C, 0, W, 6000, rid=4, mode=RuleMode.ALLOW)) == []
    assert rig.ask(request(rig, outbound.flow_id, C, 0, W, 6001, rid=5)) == []
    allow, redirect = rig.core.rules.kernel_ops
    assert [r.chain for r in allow.rules] == ["dyn_redirect", "dyn_dnat", "dyn_allow"]
    assert [r.chain for r in redirect.rules] == ["dyn_redirect", "dyn_redirect"]


def test_adjacent_port_is_expected_by_the_processor_itself() -> None:
    rig = Rig()
    rig.rewritten(udp(S, 4000, C, 10050), LAN0)  # RTP from lan to ext port 10050
    (rtp,) = rig.messages()
    (op,) = rig.kernel()
    assert rig.core.counters["rules.adjacent"] == 1 and rig.messages() == []  # no ACK: nobody asked
    specs = [s for r in op.rules for s in _ipt_specs(r)[1]]
    assert specs[0].startswith(f"NFGATE-DYN-REDIRECT -p udp -s {S} -d {C} --dport 10051 ")
    # Replies to the RTCP flow come back to the router's address, in the SNAT range.
    assert specs[1].startswith(f"NFGATE-DYN-REDIRECT -p udp -s {C} --sport 10051 -d {W} --dport 61000:65535 ")
    assert isinstance(op.rules[0].rule.statements[0], Queue)
    # RTCP from the next source port to the next destination port: the same gateway.
    out = rig.rewritten(udp(S, 4001, C, 10051), LAN0)
    (rtcp,) = rig.messages()
    assert rtcp.flow.gateway == rtp.flow.gateway == "rtp" and ends(out)[2:] == (G, 20040)
    assert str(rtcp.flow.server) == f"{C}:10051"
    assert rig.core.counters["rules.ended.used"] == 1


def test_flow_listing_and_stats_are_plain_json() -> None:
    import json

    rig = Rig()
    flow, _ = open_inbound(rig)
    rig.tick(3)
    (rec,) = rig.core.flows(rig.now, 10)
    assert rec["client"] == f"{C}:40000" and rec["server"] == f"{S}:443" and rec["original_dst"] == f"{W}:8443"
    assert rec["gateway"] == "relay" and rec["flow_id"] == flow.flow_id and rec["age"] == 3.0
    assert rec["proto"] == "tcp" and rec["state"] == []
    stats = rig.core.stats()
    assert stats["flows"] == 1 and stats["flows_per_gateway"] == {"relay": 1}
    assert stats["counters"]["queued"] == 1 and stats["counters"]["verdict.repeat"] == 1
    json.dumps(rec), json.dumps(stats)


def test_runner_callback_never_raises() -> None:
    """Whatever goes wrong inside the queue callback, the packet is dropped and counted."""
    from firewall.processor.runner import Runner

    class FakePacket:
        indev = WAN0
        verdicts: list[str] = []

        def get_payload(self) -> bytes:
            return bytes(tcp(C, 1, W, 8443, "S"))

        def get_mark(self) -> int:
            return 0

        def drop(self) -> None:
            self.verdicts.append("drop")

    rig = Rig()
    runner = Runner(rig.config, 0)
    runner.core = rig.core
    runner._handle = lambda *a: 1 / 0  # type: ignore[assignment]
    runner._now = T0
    pkt = FakePacket()
    runner._on_packet(pkt)  # type: ignore[arg-type]
    assert pkt.verdicts == ["drop"] and rig.core.counters["drop.internal"] == 1


def test_instance_must_name_a_queue() -> None:
    config = loads(CONFIG.replace("{pools}", ""))
    with pytest.raises(ValueError, match="processor.queues has 1 entries"):
        ProcessorCore(config, 1, Encoder(KEY, Role.PROCESSOR), Guard(KEY, Role.PROCESSOR, now=WALL0),
                      route=route, ifname=IF.get, local_addresses=list, now=T0, wall=WALL0)
