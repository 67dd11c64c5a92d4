"""RULE_REQUEST mode ORIGINATE (docs/signalling.md): the gateway opens a connection itself.

FTP's ``data_mode = "passive"`` (docs/ftp.md): for an active client and a
passive-only server the gateway connects to both, each connection leaving
the router as the party its peer expects. The processor core in isolation,
with the rig of ``test_processor_core``.
"""

from __future__ import annotations

from firewall.processor.rulebook import KernelRule
from firewall.signalling import RuleAck, RuleEnd, RuleEndReason, RuleMode, RuleRefusal, RuleRefused
from tests.firewall.test_processor_core import (
    BLIND, C, G, S, W, WAN0, Leg, Rig, ftp_session, ip, open_inbound, request, tcp,
)

ORIGINATE = RuleMode.ORIGINATE


def test_an_originate_rule_takes_the_gateways_connection_and_makes_it_leave_as_the_party_expected() -> None:
    rig = Rig()
    ftp = ftp_session(rig)  # C -> W:21, really S:21, through the port forward
    # The client's PORT C:40000: the gateway's connection reaches C from W (S', what C addressed).
    to_client = request(rig, ftp.flow_id, W, 0, C, 40000, mode=ORIGINATE, rid=1)
    # The server's passive port S:50000: the gateway's connection reaches S from C, the client S knows.
    to_server = request(rig, ftp.flow_id, C, 0, S, 50000, mode=ORIGINATE, rid=2)
    assert rig.ask(to_client) == [] and rig.ask(to_server) == []
    ops = rig.kernel()
    assert [op.rules for op in ops] == [(KernelRule("expect_0_any", ("tcp", ip(G), ip(C), 40000)),),
                                        (KernelRule("expect_0_any", ("tcp", ip(G), ip(S), 50000)),)]
    ack1, ack2 = rig.messages()
    assert isinstance(ack1, RuleAck) and isinstance(ack2, RuleAck)

    # The gateway's SYNs on the blind track: no DNAT, SNAT to the stand-in, the gateway's port kept.
    assert rig.bound(tcp(G, 45000, C, 40000, "S"), BLIND) == Leg("tcp", (G, 45000, C, 40000), (C, 40000), (W, 45000))
    assert rig.bound(tcp(G, 45001, S, 50000, "S"), BLIND) == Leg("tcp", (G, 45001, S, 50000), (S, 50000), (C, 45001))
    assert rig.messages() == [RuleEnd(ack1.rule_id, RuleEndReason.USED), RuleEnd(ack2.rule_id, RuleEndReason.USED)]
    assert rig.core.counters["rules.originated_flows"] == 2
    removals = rig.kernel()
    assert [op.add for op in removals] == [False, False] and len(rig.core.rules) == 0
    # One-shot: another connection of the gateway's to the client is nobody's binding.
    rig.dropped(tcp(G, 45002, C, 40000, "S"), BLIND, "drop.gateway_without_binding")


def test_an_originate_rule_names_only_the_bindings_two_stand_ins() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    relay, _ = open_inbound(rig, sport=42000)
    cases = [
        (request(rig, ftp.flow_id, W, 1024, C, 40000, mode=ORIGINATE, rid=1), RuleRefusal.NOT_EXACT),  # its port is G's
        (request(rig, ftp.flow_id, C, 0, W, 40000, mode=ORIGINATE, rid=2), RuleRefusal.THIRD_PARTY),  # to the router
        (request(rig, ftp.flow_id, S, 0, C, 40000, mode=ORIGINATE, rid=3), RuleRefusal.THIRD_PARTY),  # S is hidden from C
        (request(rig, ftp.flow_id, W, 0, S, 50000, mode=ORIGINATE, rid=4), RuleRefusal.THIRD_PARTY),  # S knows C, not W
        (request(rig, ftp.flow_id, W, 0, "198.51.100.99", 40000, mode=ORIGINATE, rid=5), RuleRefusal.THIRD_PARTY),
        (request(rig, relay.flow_id, W, 0, C, 40000, mode=ORIGINATE, rid=6), RuleRefusal.POLICY),  # a relay opens nothing
    ]
    for req, reason in cases:
        assert rig.ask(req) == [RuleRefused(req.request_id, reason)], reason
    assert rig.out.kernel_ops == []


def test_an_originate_rules_flow_from_outside_is_not_the_gateways() -> None:
    """The expectation names G as the source: the same tuple from a zone is never bound by it."""
    rig = Rig()
    ftp = ftp_session(rig)
    assert rig.ask(request(rig, ftp.flow_id, W, 0, C, 40000, mode=ORIGINATE)) == []
    rig.kernel()
    rig.messages()
    rig.dropped(tcp(G, 45000, C, 40000, "S"), WAN0, "drop.originate_not_from_gateway")
    assert len(rig.core.rules) == 1  # still waiting for the gateway's own connection


def test_an_unused_originate_rule_expires() -> None:
    rig = Rig()
    ftp = ftp_session(rig)
    assert rig.ask(request(rig, ftp.flow_id, W, 0, C, 40000, mode=ORIGINATE, ttl=5)) == []
    rig.kernel()
    (ack,) = rig.messages()
    rig.tick(6)
    assert rig.messages() == [RuleEnd(ack.rule_id, RuleEndReason.EXPIRED)]
    assert len(rig.core.rules) == 0
