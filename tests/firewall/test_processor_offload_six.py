"""Offload and the processor's adjacent-port rule over IPv6 (issue 17), with crafted packets: an
rtp gateway's IPv6 flow handed to the kernel by an exact one-shot ALLOW in the IPv6 table's
sets (with the DNAT where the router's IPv6 address stands in for the server), and RTCP's port
beside an IPv6 RTP flow opened for exactly the flow's two endpoints."""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import UDP as ScapyUDP
from scapy.layers.inet6 import IPv6

from firewall.packet import UDP
from firewall.processor.core import DROP, PASS
from firewall.processor.kernel import Connection
from firewall.processor.rulebook import KernelRule
from firewall.rules.bind import DNAT6_MAP, SNAT6_MAP
from firewall.signalling import (
    Counters, Encoder, FlowEnd, FlowEndReason, NewFlow, OffloadRequest, Received, Role, RuleAck, RuleEnd,
    RuleEndReason,
)
from tests.firewall.test_processor_six import BLIND, C6, F6, G6, KEY, MARK, S6, T0, W6, WAN0, WALL0, Rig6, i6

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[processor.timeouts]
confirm = 5
[[nat.forward]]
from = "wan"
proto = "udp"
port = 6004
to = "[fd00:1::10]:5004"
[[gateway]]
name = "media"
kind = "rtp"
listen_port = 20025
[gateway.settings]
adjacent = "processor"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = "5004-5005"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 6004
"""
MEDIA = 7500  # the media gateway's signalling port
C2 = "2001:db8:2::11"


def dgram(src: str, sport: int, dst: str, dport: int) -> Any:
    return IPv6(src=src, dst=dst) / ScapyUDP(sport=sport, dport=dport) / b"\x80\x00\x00\x01"


class Media6(Rig6):
    """Rig6 with the rtp gateway: its flows, its OFFLOAD_REQUEST, the kernel's completions."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.now = T0
        self.enc = Encoder(KEY, Role.GATEWAY)
        self.kernel_ops: list[Any] = []
        self.unbind: list[Any] = []
        self.ct_deletes: list[Any] = []

    def drain(self) -> list[Any]:
        out = self.core.take()
        self.kernel_ops += out.kernel_ops
        self.unbind += out.unbind
        self.ct_deletes += out.ct_deletes
        wall = WALL0 + self.now - T0
        return [m.message for m in (self.gw.check(d, wall) for d, _ in out.datagrams) if isinstance(m, Received)]

    def kernel(self) -> list[Any]:
        got = self.drain()
        done, self.kernel_ops = self.kernel_ops, []
        for op in done:
            self.core.kernel_done(op.token, True, self.now)
        self.done = done
        return got + self.drain()

    def flow(self, sport: int = 40000, dst: str = S6, dport: int = 5004) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
        """C6:sport -> dst:dport bound into the gateway, leg B from G6:51000; both in conntrack."""
        verdict, _, mark = self.send(dgram(C6, sport, dst, dport), WAN0, self.now)
        assert (verdict, mark) == (PASS, MARK), dict(self.core.counters)
        new = [m for m in self.drain() if isinstance(m, NewFlow)]
        flow = new[0].flow
        assert flow.family == 6
        fw = (int(flow.firewall_side.address), flow.firewall_side.port)
        assert self.send(dgram(G6, 51000, F6, fw[1]), BLIND, self.now)[0] == PASS
        leg_a, leg_b = (i6(C6), sport, i6(dst), dport), (i6(G6), 51000, *fw)
        self.alive |= {(UDP, *leg_a), (UDP, *leg_b)}
        return flow, leg_a, leg_b

    def offload(self, flow_id: int, rid: int = 1) -> list[Any]:
        data = self.enc.encode(OffloadRequest(rid, flow_id), WALL0 + self.now - T0)
        self.core.datagram(data, (self.core.gateway_address, MEDIA), self.now)
        return self.drain()


def test_an_ipv6_rtp_flow_is_offloaded_by_an_exact_allow_in_the_ipv6_sets() -> None:
    rig = Media6()
    flow, leg_a, leg_b = rig.flow()
    rig.kernel()  # the adjacent rule (below)
    assert rig.offload(flow.flow_id) == []  # nothing before the kernel has the ALLOW
    (op,) = rig.kernel_ops
    assert op.add and op.rules == (
        KernelRule("expect6_0", ("udp", i6(C6), 40000, i6(S6), 5004)),
        KernelRule("allow6_0", ("udp", i6(C6), 40000, i6(S6), 5004)),
    )
    ack, end = rig.kernel()
    assert isinstance(ack, RuleAck) and end == FlowEnd(flow.flow_id, FlowEndReason.OFFLOADED)
    # Leg A's elements (still in the kernel) and leg B's go; leg A's connection goes, leg B's is held.
    fw = leg_b[2:]
    assert rig.unbind == [
        (DNAT6_MAP, "udp", leg_a, (i6(G6), 20025)), (SNAT6_MAP, "udp", leg_a, fw),
        (DNAT6_MAP, "udp", leg_b, (i6(S6), 5004)), (SNAT6_MAP, "udp", leg_b, (i6(C6), 40000)),
    ]
    assert rig.ct_deletes == [(UDP, *leg_a)]
    assert rig.core.stats()["flows_ipv6"] == 0 and not rig.core.six.pool.in_use(*fw)
    assert rig.core.counters["flows.offloaded"] == 1 and rig.core.counters["flows.ended.offloaded"] == 1
    # The processor's adjacent rule the flow owned lives on, owned by no flow.
    assert rig.core.counters["rules.kept_through_offload"] == 1 and len(rig.core.rules) == 2
    rig.alive.clear()
    rig.ct_deletes.clear()

    # The next datagram is new to conntrack: passed unchanged, with the rewritten mark, after
    # leg B's held connection is deleted; the gateway learns of the kernel's connection, family 6.
    assert rig.send(dgram(C6, 40000, S6, 5004), WAN0, rig.now) == (PASS, (), MARK)
    assert rig.ct_deletes == []
    used, kernel = rig.drain()
    assert rig.ct_deletes == [(UDP, *leg_b)]
    assert used == RuleEnd(ack.rule_id, RuleEndReason.USED)
    assert isinstance(kernel, NewFlow) and kernel.flow.family == 6
    k = kernel.flow
    assert (str(k.client), str(k.server), str(k.firewall_side), str(k.ag)) == (
        f"[{C6}]:40000", f"[{S6}]:5004", "[::]:0", f"[{G6}]:20025")
    # An IPv4 resync (lost events) does not end it; conntrack's end does, with its counters.
    rig.core.resync([], rig.now)
    assert rig.drain() == []
    counters = Counters(500, 86_000, 0, 0)
    rig.core.conntrack_destroyed(UDP, leg_a, (i6(S6), 5004, i6(C6), 40000), rig.now, counters)
    assert rig.drain() == [FlowEnd(k.flow_id, FlowEndReason.IDLE, counters)]
    # Another source port of the client is a new flow into the gateway (the latch refuses it there).
    verdict, _, mark = rig.send(dgram(C6, 40002, S6, 5004), WAN0, rig.now)
    assert (verdict, mark) == (PASS, MARK) and rig.core.stats()["flows_ipv6"] == 1


def test_an_ipv6_offload_through_a_port_forward_translates_in_the_ipv6_table() -> None:
    """The client addressed the router's W6:6004, the forward's target S6:5004: the ALLOW is a
    dnat6 element to it and an allow_dnat6 element for the translated tuple."""
    rig = Media6()
    flow, leg_a, _ = rig.flow(dst=W6, dport=6004)
    assert (str(flow.server.address), flow.server.port) == (S6, 5004)
    rig.kernel()
    rig.offload(flow.flow_id)
    (op,) = rig.kernel_ops
    assert op.rules == (
        KernelRule("expect6_0", ("udp", i6(C6), 40000, i6(W6), 6004)),
        KernelRule("dnat6_0", ("udp", i6(C6), 40000, i6(W6), 6004), (i6(S6), 5004)),
        KernelRule("allow_dnat6_0", ("udp", i6(C6), 40000, i6(S6), 5004)),
    )


def test_an_unused_ipv6_offload_expires_with_its_held_leg_b() -> None:
    rig = Media6()
    flow, _, leg_b = rig.flow()
    rig.kernel()
    rig.offload(flow.flow_id)
    rig.kernel()
    rig.ct_deletes.clear()
    rig.now += 31  # OFFLOAD_TTL
    rig.core.tick(rig.now, WALL0 + 31)
    rig.drain()
    assert rig.ct_deletes == [(UDP, *leg_b)]
    # The rule's gone: the client's next datagram is a new flow into the gateway.
    rig.alive.clear()
    assert rig.send(dgram(C6, 40000, S6, 5004), WAN0, rig.now)[2] == MARK
    assert rig.core.stats()["flows_ipv6"] == 1


def test_the_processors_adjacent_rule_over_ipv6_opens_rtcp_for_the_flows_endpoints_only() -> None:
    rig = Media6()
    flow, _, _ = rig.flow()
    (op,) = rig.kernel_ops
    # RTCP's port beside RTP's, from any port of the client, to the same server: IPv6 sets.
    assert op.rules == (KernelRule("expect6_0_any", ("udp", i6(C6), i6(S6), 5005)),)
    assert rig.core.counters["rules.adjacent"] == 1
    rig.kernel()
    listed = rig.core.rules.listing(rig.now, WALL0, 10)
    assert [(r["kind"], r["src"], r["dst"], r["to"]) for r in listed] == [
        ("adjacent", f"[{C6}]:*", f"[{S6}]:5005", f"[{S6}]:5005")]
    # RTCP from the client: bound into the same gateway (a REDIRECT), the one-shot rule used.
    verdict, ops, mark = rig.send(dgram(C6, 40001, S6, 5005), WAN0, rig.now)
    assert (verdict, mark) == (PASS, MARK) and ops[0][0] == DNAT6_MAP
    (rtcp,) = [m for m in rig.drain() if isinstance(m, NewFlow)]
    assert rtcp.flow.gateway == "media" and rtcp.flow.original_dst.port == 5005
    assert rig.core.counters["rules.redirected_flows"] == 1 and len(rig.core.rules) == 0
    # Another host on the RTCP port is the selector's, no rule's; RTCP first gets RTP's port below.
    rig.send(dgram(C2, 40001, S6, 5005), WAN0, rig.now)
    rig.drain()
    assert rig.core.counters["rules.redirected_flows"] == 1
    (op,) = [o for o in rig.kernel_ops if o.add][-1:]
    assert op.rules == (KernelRule("expect6_0_any", ("udp", i6(C2), i6(S6), 5004)),)


def test_the_adjacent_rule_ends_with_its_ipv6_flow() -> None:
    rig = Media6()
    flow, leg_a, leg_b = rig.flow()
    rig.kernel()
    fw = leg_b[2:]
    rig.core.conntrack_destroyed(UDP, leg_a, (i6(G6), 20025, *fw), rig.now)
    rig.core.conntrack_destroyed(UDP, leg_b, (i6(S6), 5004, i6(C6), 40000), rig.now)
    rig.drain()
    assert len(rig.core.rules) == 0 and rig.core.counters["rules.ended.flow_ended"] == 1
    assert [o.add for o in rig.kernel_ops] == [False]
    # Its RTCP now is a selector's flow like any other, no longer the rule's.
    assert rig.send(dgram(C6, 40001, S6, 5005), WAN0, rig.now)[0] in (PASS, DROP)
    assert rig.core.counters["rules.redirected_flows"] == 0


def test_an_ipv6_resync_ends_an_offloaded_ipv6_connection_it_lacks() -> None:
    """The IPv6 dump (resync6) ends an offloaded IPv6 flow's connection that it lacks."""
    rig = Media6()
    flow, leg_a, _ = rig.flow()
    rig.kernel()
    rig.offload(flow.flow_id)
    rig.kernel()
    rig.alive.clear()
    rig.send(dgram(C6, 40000, S6, 5004), WAN0, rig.now)
    (kernel,) = [m for m in rig.drain() if isinstance(m, NewFlow)]
    rig.core.resync6([Connection(UDP, leg_a, (i6(S6), 5004, i6(C6), 40000))])
    assert rig.drain() == []
    rig.core.resync6([])
    assert rig.drain() == [FlowEnd(kernel.flow.flow_id, FlowEndReason.IDLE)]
