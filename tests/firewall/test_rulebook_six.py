"""Dynamic rules over IPv6 (firewall/processor/rulebook.py on an IPv6 binding, issue 17): an ftp
session over IPv6 asks for its data connections, and the elements go in the IPv6 table's sets;
the processor sees their use on its IPv6 path. The same checks as IPv4."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import IPv6

from firewall.config import loads
from firewall.flows import AgEndpoint
from firewall.packet import TCP
from firewall.processor.core import DROP, PASS
from firewall.processor.rulebook import KernelOp, KernelRule, RuleBook, Send
from firewall.processor.six import Binding6
from firewall.rules.bind import DNAT6_MAP, LEGB_DNAT6_MAP, SNAT6_MAP
from firewall.signalling import (
    Encoder,
    Endpoint,
    FlowEnd,
    Guard,
    NewFlow,
    Proto,
    Received,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    Role,
)
from tests.firewall.test_processor_six import KEY, BLIND, C6, F6, G6, L6, MARK, PASSED, S6, T0, W6, WAN0, WALL0, Rig6, i6, syn

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[processor]
max_rules_per_flow = 4
[processor.timeouts]
confirm = 5
[[gateway]]
name = "ftp"
kind = "ftp"
listen_port = 20021
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21
[[gateway]]
name = "relay"
kind = "tcp-relay"
listen_port = 20000
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000
"""

THIRD6 = "2001:db8:2::99"


def ep6(addr: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.IPv6Address(addr), port)


class Ftp6(Rig6):
    """Rig6 with an ftp gateway: an inbound control session over IPv6, its rule requests, and
    the kernel operations they make (``kernel`` carries them out)."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.now = T0
        self.kernel_ops: list[KernelOp] = []
        self.done: list[KernelOp] = []
        self.enc = Encoder(KEY, Role.GATEWAY)

    def session(self, sport: int = 41000, dport: int = 21) -> Any:
        verdict, _, _ = self.send(syn(C6, sport, S6, dport), WAN0)
        assert verdict == PASS, dict(self.core.counters)
        (new,) = self.messages()
        self.alive.add((TCP, i6(C6), sport, i6(S6), dport))  # conntrack has leg A: its check keeps it
        return new.flow

    def drain(self) -> list[Any]:
        """The core's outputs since last asked: kernel operations kept, the messages returned."""
        out = self.core.take()
        self.kernel_ops += out.kernel_ops
        wall = WALL0 + self.now - T0
        return [m.message for m in (self.gw.check(d, wall) for d, _ in out.datagrams) if isinstance(m, Received)]

    def ask(self, req: RuleRequest) -> list[Any]:
        self.core.datagram(self.enc.encode(req, WALL0 + self.now - T0), (self.core.gateway_address, 7500), self.now)
        return self.drain()

    def kernel(self) -> list[Any]:
        """Complete every queued kernel operation (``done``); the messages then sent."""
        got = self.drain()
        self.done, self.kernel_ops = self.kernel_ops, []
        for op in self.done:
            self.core.kernel_done(op.token, True, self.now)
        return got + self.drain()


def request(flow_id: int, src: str, sport: int, dst: str, dport: int, *, rid: int = 1,
            mode: RuleMode = RuleMode.ALLOW, ttl: int = 10, replaces: bool = False) -> RuleRequest:
    return RuleRequest(rid, flow_id, Proto.TCP, ep6(src, sport), ep6(dst, dport), ttl, mode, True, replaces)


def test_an_allow_over_ipv6_lives_in_the_ipv6_sets_and_passes_exactly_one_connection() -> None:
    """EPSV over IPv6 in allow mode: the client connects to S6:p; its SYN is seen and passed,
    a second connection dropped, a retransmission passed; the listing names the IPv6 endpoints."""
    rig = Ftp6()
    flow = rig.session()
    assert rig.ask(request(flow.flow_id, C6, 0, S6, 50000)) == []  # no ACK before the kernel has it
    (op,) = rig.kernel_ops
    assert op.add and op.rules == (KernelRule("expect6_0_any", ("tcp", i6(C6), i6(S6), 50000)),
                                   KernelRule("allow6_0_any", ("tcp", i6(C6), i6(S6), 50000)))
    (ack,) = rig.kernel()
    assert isinstance(ack, RuleAck)
    (listed,) = rig.core.rules.listing(T0, WALL0, 10)
    assert (listed["kind"], listed["src"], listed["dst"], listed["to"]) == (
        "allow", f"[{C6}]:*", f"[{S6}]:50000", f"[{S6}]:50000")

    assert rig.send(syn(C6, 45000, S6, 50000), WAN0) == (PASS, (), PASSED)
    assert rig.kernel() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]
    assert rig.send(syn(C6, 45000, S6, 50000), WAN0) == (PASS, (), PASSED)  # its SYN again
    assert rig.send(syn(C6, 45001, S6, 50000), WAN0)[0] == DROP  # another connection
    assert rig.core.counters["drop.rule_used"] == 1 and rig.core.counters["rules.allowed_flows"] == 1
    rig.now += 4
    rig.core.tick(rig.now, WALL0 + 4)  # USED_GRACE: the elements go
    rig.kernel()
    (gone,) = rig.done
    assert not gone.add and gone.rules == op.rules
    assert rig.core.rules.listing(rig.now, WALL0, 10) == []


def test_a_redirect_over_ipv6_binds_its_flow_into_the_asking_gateway() -> None:
    """Inspect mode: the data connection is bound on the IPv6 maps into the ftp gateway's G6:g,
    its NEW_FLOW family 6 with the server it goes to; the rule is used."""
    rig = Ftp6()
    flow = rig.session()
    rig.ask(request(flow.flow_id, C6, 0, S6, 50000, mode=RuleMode.REDIRECT))
    (op,) = rig.kernel_ops
    assert op.rules == (KernelRule("expect6_0_any", ("tcp", i6(C6), i6(S6), 50000)),)
    (ack,) = rig.kernel()
    verdict, ops, mark = rig.send(syn(C6, 45000, S6, 50000), WAN0)
    assert (verdict, mark) == (PASS, MARK)
    key = (i6(C6), 45000, i6(S6), 50000)
    assert ops[0] == (DNAT6_MAP, "tcp", key, (i6(G6), 20021)) and ops[1][:3] == (SNAT6_MAP, "tcp", key)
    legb = ops[2]
    new, end = rig.kernel()
    assert isinstance(new, NewFlow) and new.flow.family == 6 and new.flow.gateway == "ftp"
    assert (str(new.flow.server.address), new.flow.server.port) == (S6, 50000)
    assert end == RuleEnd(ack.rule_id, RuleEndReason.USED)
    # Its leg B from G6 to the firewall side goes to the server: written ahead with leg A's.
    fw = (int(new.flow.firewall_side.address), new.flow.firewall_side.port)
    assert legb == (LEGB_DNAT6_MAP, "tcp", (i6(G6), *fw), (i6(S6), 50000))
    verdict, ops, _ = rig.send(syn(G6, 46000, str(new.flow.firewall_side.address), fw[1]), BLIND)
    assert verdict == PASS and ops == ()


def test_an_originate_over_ipv6_leaves_from_the_address_its_peer_expects() -> None:
    """data_mode passive over IPv6: the gateway's own connection from G6 to the client leaves
    as S6 (what the client addressed), keeping the port; the same tuple from outside is dropped."""
    rig = Ftp6()
    flow = rig.session()
    rig.ask(request(flow.flow_id, S6, 0, C6, 6000, mode=RuleMode.ORIGINATE))
    (op,) = rig.kernel_ops
    assert op.rules == (KernelRule("expect6_0_any", ("tcp", i6(G6), i6(C6), 6000)),)
    (ack,) = rig.kernel()
    assert isinstance(ack, RuleAck)
    assert rig.send(syn(G6, 50000, C6, 6000), WAN0)[0] == DROP  # not from the gateway: G6 is not outside
    verdict, ops, mark = rig.send(syn(G6, 50000, C6, 6000), BLIND)
    key = (i6(G6), 50000, i6(C6), 6000)
    assert (verdict, mark) == (PASS, MARK)
    assert ops == ((DNAT6_MAP, "tcp", key, (i6(C6), 6000)), (SNAT6_MAP, "tcp", key, (i6(S6), 50000)))
    assert rig.kernel() == [RuleEnd(ack.rule_id, RuleEndReason.USED)]


def test_ipv6_requests_are_refused_as_ipv4_ones() -> None:
    rig = Ftp6()
    flow = rig.session()
    rig.send(syn(C6, 42000, S6, 9000), WAN0)
    (new,) = rig.messages()
    relay = new.flow
    cases = [
        (request(flow.flow_id, C6, 0, THIRD6, 50000, rid=1), RuleRefusal.THIRD_PARTY),  # EPRT for a third host
        (request(flow.flow_id, THIRD6, 0, S6, 50000, rid=2), RuleRefusal.THIRD_PARTY),  # from another host
        # The router's own IPv6 address stands in for nobody here (routed IPv6, no forward).
        (request(flow.flow_id, C6, 0, W6, 50000, rid=3), RuleRefusal.THIRD_PARTY),
        (RuleRequest(4, flow.flow_id, Proto.TCP, Endpoint(ipaddress.IPv4Address("203.0.113.10"), 0),
                     Endpoint(ipaddress.IPv4Address("192.168.1.10"), 50000), 10, RuleMode.ALLOW, True),
         RuleRefusal.THIRD_PARTY),  # the other family's addresses name nobody of the flow
        (request(flow.flow_id, C6, 0, S6, 50000, rid=5, ttl=0), RuleRefusal.BAD_TTL),
        (request(flow.flow_id, C6, 0, S6, 0, rid=6), RuleRefusal.NOT_EXACT),
        (request(relay.flow_id, C6, 0, S6, 50000, rid=7), RuleRefusal.POLICY),  # a relay asks for nothing
        (request(flow.flow_id, S6, 1, C6, 6000, rid=8, mode=RuleMode.ORIGINATE), RuleRefusal.NOT_EXACT),
        (request(flow.flow_id, L6, 0, C6, 6000, rid=9, mode=RuleMode.ORIGINATE), RuleRefusal.THIRD_PARTY),
    ]
    for req, reason in cases:
        got = rig.ask(req)
        assert got == [RuleRefused(req.request_id, reason)], (reason, got)
    assert rig.kernel_ops == []
    for n in range(4):
        assert rig.ask(request(flow.flow_id, C6, 0, S6, 50000 + n, rid=100 + n)) == []
    got = rig.ask(request(flow.flow_id, C6, 0, S6, 51000, rid=200))
    assert got == [RuleRefused(200, RuleRefusal.LIMIT)]


def test_ipv6_rules_end_with_their_flow_their_ttl_and_a_newer_request() -> None:
    rig = Ftp6()
    flow = rig.session()
    rig.ask(request(flow.flow_id, C6, 0, S6, 50000, rid=1))
    (first,) = rig.kernel()
    superseded = rig.ask(request(flow.flow_id, C6, 0, S6, 50001, rid=2, replaces=True))
    assert superseded == [RuleEnd(first.rule_id, RuleEndReason.SUPERSEDED)]
    (second,) = rig.kernel()
    assert isinstance(second, RuleAck)
    rig.ask(request(flow.flow_id, S6, 0, C6, 6000, rid=3, ttl=2))
    (third,) = rig.kernel()
    rig.now += 3
    rig.core.tick(rig.now, WALL0 + 3)
    assert rig.kernel() == [RuleEnd(third.rule_id, RuleEndReason.EXPIRED)]
    # The control connection ends (both conntrack events for leg A; no leg B): its rule ends.
    key = (i6(C6), 41000, i6(S6), 21)
    fw = (int(flow.firewall_side.address), flow.firewall_side.port)
    rig.core.conntrack_destroyed(TCP, key, (i6(G6), 20021, *fw), rig.now)
    got = rig.kernel()
    assert FlowEnd(flow.flow_id, got[0].reason) == got[0]
    assert got[1:] == [RuleEnd(second.rule_id, RuleEndReason.FLOW_ENDED)]
    assert len(rig.core.rules) == 0 and rig.core.rules.expect == {}
    assert all(not op.add for op in rig.done)


def test_an_ipv6_allow_to_the_routers_stand_in_is_translated_in_the_ipv6_table() -> None:
    """The rulebook alone, given a binding whose client addressed the router's W6 for the server S6
    (an IPv6 port forward into the gateway): the ALLOW is a dnat6 element W6:p -> S6:p and an
    allow_dnat6 element for the translated tuple, one unit."""
    config = loads(CONFIG)
    ag = AgEndpoint("ftp", int(ipaddress.IPv4Address("172.31.255.2")), 20021)
    fid = (0 << 48) | 7
    b = Binding6(fid, TCP, (i6(C6), 41000), (i6(W6), 21), (i6(S6), 21), (i6(F6), 1024), ag, T0, g6=i6(G6))
    book = RuleBook(config, 0, 0, counters=Counter(), gateway_peers={"ftp": ("172.31.255.2", 7500)},
                    binding={fid: b}.get, local_addresses=lambda: (),
                    local_addresses6=lambda: [ipaddress.IPv6Address(W6)])
    enc, guard = Encoder(KEY, Role.GATEWAY), Guard(KEY, Role.PROCESSOR, now=WALL0)
    req = request(fid, C6, 0, W6, 50000)
    got = guard.check(enc.encode(req, WALL0), WALL0)
    (op,) = book.request(got, req, ("172.31.255.2", 7500), T0, WALL0)
    assert op.rules == (
        KernelRule("expect6_0_any", ("tcp", i6(C6), i6(W6), 50000)),
        KernelRule("dnat6_0_any", ("tcp", i6(C6), i6(W6), 50000), (i6(S6), 50000)),
        KernelRule("allow_dnat6_0_any", ("tcp", i6(C6), i6(S6), 50000)),
    )
    (send,) = book.kernel_done(op.token, True, T0)
    assert isinstance(send, Send) and isinstance(send.msg, RuleAck)
    assert book.counters["rules.translated"] == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([WAN0, BLIND]))
def test_ipv6_bytes_never_raise_while_rules_wait(data: bytes, indev: int) -> None:
    """With an ALLOW, a REDIRECT and an ORIGINATE waiting, any IPv6 bytes get a verdict."""
    rig = Ftp6()
    flow = rig.session()
    for rid, (mode, src, dst) in enumerate(((RuleMode.ALLOW, C6, S6), (RuleMode.REDIRECT, S6, C6),
                                            (RuleMode.ORIGINATE, S6, C6)), 1):
        rig.ask(request(flow.flow_id, src, 0, dst, 50000 + rid, rid=rid, mode=mode))
    rig.kernel()
    assert len(rig.core.rules) == 3
    head = bytes(IPv6(src=C6, dst=S6, nh=6, plen=len(data)))[:40]
    for payload in (b"\x60" + data, head + data, bytes(syn(C6, 40000, S6, 50001)) + data):
        verdict, ops, _ = rig.send(payload, indev)
        assert verdict in (DROP, PASS) and len(ops) in (0, 2)


def test_an_ipv6_allow_to_the_masquerade6_w6_is_translated_to_the_client() -> None:
    """Outbound active FTP behind masquerade6 (IPv4's W:w twin): the binding's leg B leaves from
    W6:w, so the server connects to W6:p, which stands for the client: a dnat6 element W6:p -> C:p
    and the accept for the translated tuple; the router's W6 asked by the client is a third party."""
    config = loads(CONFIG)
    ag = AgEndpoint("ftp", int(ipaddress.IPv4Address("172.31.255.2")), 20021)
    fid = (0 << 48) | 7
    lan, ext = S6, C6  # the lan client, the ext server
    b = Binding6(fid, TCP, (i6(lan), 41000), (i6(ext), 21), (i6(ext), 21), (i6(F6), 1024), ag, T0, g6=i6(G6),
                 seen_as=(i6(W6), 61000))
    assert b.snat and b.visible_client == (i6(W6), 61000) and str(b.info().snat) == f"[{W6}]:61000"
    book = RuleBook(config, 0, 0, counters=Counter(), gateway_peers={"ftp": ("172.31.255.2", 7500)},
                    binding={fid: b}.get, local_addresses=lambda: (),
                    local_addresses6=lambda: [ipaddress.IPv6Address(W6)])
    enc, guard = Encoder(KEY, Role.GATEWAY), Guard(KEY, Role.PROCESSOR, now=WALL0)

    def ask(req: RuleRequest) -> Any:
        return book.request(guard.check(enc.encode(req, WALL0), WALL0), req, ("172.31.255.2", 7500), T0, WALL0)

    (op,) = ask(request(fid, ext, 20, W6, 50000))
    assert op.rules == (
        KernelRule("expect6_0", ("tcp", i6(ext), 20, i6(W6), 50000)),
        KernelRule("dnat6_0", ("tcp", i6(ext), 20, i6(W6), 50000), (i6(lan), 50000)),
        KernelRule("allow_dnat6_0", ("tcp", i6(ext), 20, i6(lan), 50000)),
    )
    # W6 stands for the client toward the server only.
    (refused,) = ask(request(fid, lan, 0, W6, 50001, rid=2))
    assert isinstance(refused, Send) and refused.msg == RuleRefused(2, RuleRefusal.THIRD_PARTY)
    # An ORIGINATE to the server leaves from W6, what the server knows the client as.
    (orig,) = ask(request(fid, W6, 0, ext, 20, rid=3, mode=RuleMode.ORIGINATE))
    assert not isinstance(orig, Send)
