"""The processor core's offload (OFFLOAD_REQUEST) and log-only flows, with crafted packets.

The rig of test_processor_core.py, with two more gateways: a udp-relay
``dns`` behind a port forward that changes the port (the router's udp 5353
to lan:53), and a log-only tcp-relay ``logger`` (the router's tcp 8080 to
lan:80, and lan's outbound tcp 9001).
"""

from __future__ import annotations

import dataclasses

from typing import Any

import pytest

from firewall.processor.core import DROP, PASS
from firewall.processor.kernel import Connection
from firewall.processor.rulebook import KernelRule
from firewall.rules.bind import DNAT_MAP, SNAT_MAP
from firewall.signalling import (
    Counters,
    FlowEnd,
    FlowEndReason,
    NewFlow,
    OffloadRequest,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleRefusal,
    RuleRefused,
)
from tests.firewall.test_processor_core import (
    BLIND, C, G, LAN0, MARK, MASK, QOS, S, W, WAN0, Leg, Rig, ftp_session, ip, ints, open_inbound, pair,
    request, tcp, udp,
)

EXTRA = """
[[nat.forward]]
from = "wan"
proto = "udp"
port = 5353
to = "192.168.1.10:53"
[[nat.forward]]
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"

[[gateway]]
name = "dns"
kind = "udp-relay"
listen_port = 20053
[gateway.settings]
offload_after = 3
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5353

[[gateway]]
name = "logger"
kind = "tcp-relay"
listen_port = 20080
[gateway.settings]
mode = "log-only"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8080
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9001
"""
DNS = (G, 7503)  # the signalling ports of the gateways, by index
LOGGER = (G, 7504)
FTP = (G, 7501)
C2 = "203.0.113.11"


def udp_flow(rig: Rig, sport: int = 5000) -> tuple[Any, Leg, Leg]:
    """C:sport -> W:5353 into the dns gateway, and the gateway's leg B: both in conntrack."""
    leg_a = rig.bound(udp(C, sport, W, 5353), WAN0)
    ((push, peer),) = rig.received()
    assert isinstance(push, NewFlow) and peer == DNS
    flow = push.flow
    F, f = pair(flow.firewall_side)
    leg_b = rig.bound(udp(G, 51000, F, f), BLIND)
    assert leg_b.dnat == (S, 53)
    rig.confirm(leg_a)
    rig.confirm(leg_b)
    return flow, leg_a, leg_b


def test_an_offloaded_udp_flow_leaves_the_gateway_for_an_exact_allow() -> None:
    rig = Rig(extra=EXTRA)
    flow, leg_a, leg_b = udp_flow(rig)
    assert rig.ask(OffloadRequest(1, flow.flow_id), DNS) == []  # nothing before the kernel has the ALLOW
    (op,) = rig.out.kernel_ops
    # The client's own tuple, exactly (its source port too), as it addressed the router; the
    # DNAT to the port forward's S:s, and the accept for that translated tuple only.
    assert op.add and op.rules == (
        KernelRule("expect_0", ("udp", ip(C), 5000, ip(W), 5353)),
        KernelRule("dnat_0", ("udp", ip(C), 5000, ip(W), 5353), (ip(S), 53)),
        KernelRule("allow_dnat_0", ("udp", ip(C), 5000, ip(S), 53)),
    )
    assert rig.core.flows(rig.now, 10) != [] and rig.out.ct_deletes == []  # the binding still carries it
    rig.kernel()
    ack, end = rig.messages()
    assert isinstance(ack, RuleAck) and ack.request_id == 1
    assert end == FlowEnd(flow.flow_id, FlowEndReason.OFFLOADED)
    # Leg A's NAT elements and connection go, in that order (the runner), and so does the binding.
    # Leg B's elements went in ahead, by (G, F, f): left to their timeout (only the processor's
    # mark for a leg B of a binding of F:f uses them); it wrote none of its own.
    name = "udp"
    assert rig.out.unbind == [
        (DNAT_MAP, name, ints(leg_a.key), (ip(leg_a.dnat[0]), leg_a.dnat[1])),
        (SNAT_MAP, name, ints(leg_a.key), (ip(leg_a.snat[0]), leg_a.snat[1])),
    ]
    # Leg B's connection stays until the flow's next datagram takes the ALLOW: what the
    # gateway still relays before FLOW_END reaches it gets to the server.
    assert rig.out.ct_deletes == [(17, *ints(leg_a.key))]
    rig.out.unbind.clear()
    rig.out.ct_deletes.clear()
    stats = rig.core.stats()
    assert stats["flows"] == 0 and stats["pools"]["firewall_side"]["used"] == 0
    assert stats["counters"]["flows.offloaded"] == 1
    rig.alive.clear()

    # The next datagram is new to conntrack: its ALLOW passes it unchanged, once, with the
    # rewritten mark (the connection is nfgate's: its destroy event comes), after leg B's
    # connection is deleted (the two share a reply tuple).
    assert rig.send(udp(C, 5000, W, 5353), WAN0) == (PASS, (), (QOS & ~MASK) | MARK)
    assert rig.nat_ops == [] and rig.out.ct_deletes == [(17, *ints(leg_b.key))]
    (used, peer), (kernel, peer2) = rig.received()
    assert used == RuleEnd(ack.rule_id, RuleEndReason.USED) and peer == DNS
    # The gateway learns of the kernel's connection as of a log-only flow's: NEW_FLOW without F:f ...
    assert isinstance(kernel, NewFlow) and peer2 == DNS
    k = kernel.flow
    assert (str(k.client), str(k.original_dst), str(k.server), str(k.firewall_side)) == (
        f"{C}:5000", f"{W}:5353", f"{S}:53", "0.0.0.0:0")
    assert k.flow_id != flow.flow_id and rig.core.stats()["logged_flows"] == 1
    # ... and of its end, when conntrack's UDP timeout destroys it, with its counters.
    counters = Counters(500, 86_000, 0, 0)
    rig.destroyed("udp", (C, 5000, W, 5353), (S, 53, C, 5000), counters)
    assert rig.messages() == [FlowEnd(k.flow_id, FlowEndReason.IDLE, counters)]
    # Another source port of the client is not this flow: bound into the gateway as a new one,
    # and so is another client on the same port.
    rig.bound(udp(C, 5001, W, 5353), WAN0)
    rig.bound(udp(C2, 5000, W, 5353), WAN0)
    assert [type(m) for m in rig.messages()] == [NewFlow, NewFlow]
    assert rig.core.stats()["counters"].get("drop.rule_used", 0) == 0
    # Nor does the gateway's leg B reach the server any more.
    F, f = pair(flow.firewall_side)
    rig.dropped(udp(G, 51000, F, f), BLIND, "drop.gateway_without_binding")


def test_an_offload_deletes_only_the_elements_still_in_the_kernel() -> None:
    """A leg B that came after the elements written ahead had timed out wrote its own;
    elements past their timeout are gone from the kernel (a delete of one would fail the
    transaction and send every element through one each)."""
    rig = Rig(extra=EXTRA)
    leg_a = rig.bound(udp(C, 5000, W, 5353), WAN0)
    ((push, _),) = rig.received()
    F, f = pair(push.flow.firewall_side)
    rig.now += 9  # past nat_element - 2: leg B writes its own exact elements
    leg_b = rig.bound(udp(G, 51000, F, f), BLIND)
    assert len(rig.nat_ops) in (0, 2)
    rig.confirm(leg_a)
    rig.confirm(leg_b)
    rig.now += 3  # leg A's are gone from the kernel now
    assert rig.ask(OffloadRequest(1, push.flow.flow_id), DNS) == []
    rig.kernel()
    assert rig.out.unbind == [
        (DNAT_MAP, "udp", ints(leg_b.key), (ip(leg_b.dnat[0]), leg_b.dnat[1])),
        (SNAT_MAP, "udp", ints(leg_b.key), (ip(leg_b.snat[0]), leg_b.snat[1])),
    ]
    assert rig.out.ct_deletes == [(17, *ints(leg_a.key))]


def test_an_offload_unused_deletes_the_held_leg_b_and_keeps_the_flows_rules() -> None:
    """The ALLOW's TTL runs out before the client sends again: leg B's held connection goes
    with it. A rule the offloaded flow owned (RTP's adjacent rule for RTCP, here the core's
    own) lives on to its own use or TTL, owned by no flow."""
    rig = Rig(extra=EXTRA)
    flow, leg_a, leg_b = udp_flow(rig)
    b = rig.core.binding(flow.flow_id)
    rig.core._carry(rig.core.rules.adjacent(flow.flow_id, b, 1, rig.now, rig.now, 60))
    (adj,) = rig.kernel()
    assert adj.add and len(rig.core.rules) == 1
    assert rig.ask(OffloadRequest(1, flow.flow_id), DNS) == []
    rig.kernel()
    assert [type(m) for m in rig.messages()] == [RuleAck, FlowEnd]
    assert rig.out.ct_deletes == [(17, *ints(leg_a.key))] and rig.out.kernel_ops == []  # the adjacent rule stays
    rig.out.ct_deletes.clear()
    assert len(rig.core.rules) == 2 and rig.core.counters["rules.kept_through_offload"] == 1
    rig.tick(31)  # OFFLOAD_TTL: the offload's ALLOW expires, and leg B goes with it
    assert rig.out.ct_deletes == [(17, *ints(leg_b.key))]
    assert len(rig.core.rules) == 1
    rig.tick(30)  # the adjacent rule's own TTL
    assert len(rig.core.rules) == 0


def test_an_offloads_allow_wins_over_an_older_redirect_naming_its_flow() -> None:
    """RTCP came first and asked for RTP's port (a REDIRECT, any source port), RTP came by its
    selector, both were offloaded, and the REDIRECT outlived its owner: RTP's next datagram is
    the offload's, not a new flow into the gateway (the netns ffmpeg test lost 6 datagrams so)."""
    rig = Rig(extra=EXTRA)
    owner, _, _ = udp_flow(rig, sport=5001)
    flow, _, _ = udp_flow(rig)
    # The owner's REDIRECT for C, any port, -> W:5353: the offloaded flow's tuple too.
    rig.core._carry(rig.core.rules.adjacent(owner.flow_id, rig.core.binding(owner.flow_id), 0, rig.now, rig.now, 60))
    rig.kernel()
    assert rig.ask(OffloadRequest(1, flow.flow_id), DNS) == []
    rig.kernel()
    rig.messages()
    rig.alive.clear()
    assert rig.send(udp(C, 5000, W, 5353), WAN0) == (PASS, (), (QOS & ~MASK) | MARK)
    assert rig.nat_ops == [] and rig.core.counters["passed.offloaded"] == 1
    assert rig.core.stats()["flows"] == 1  # the owner's binding only: no new one


def test_the_rules_view_lists_requests_adjacent_rules_and_offloads() -> None:
    """``nfgate flows --rules`` (the control socket's ``rules``): every dynamic rule with its
    kind, tuple, target, owner and expiry; an offload's with the leg B it holds; a used
    one-shot ALLOW while its elements wait out their grace."""
    rig = Rig(extra=EXTRA)
    ftp = ftp_session(rig)
    rig.messages()
    rig.ask(request(rig, ftp.flow_id, C, 0, W, 50000))  # PASV through the port forward
    flow, leg_a, leg_b = udp_flow(rig)
    rig.core._carry(rig.core.rules.adjacent(flow.flow_id, rig.core.binding(flow.flow_id), 1, rig.now, rig.now, 60))
    rig.kernel()
    rig.messages()
    assert rig.ask(OffloadRequest(2, flow.flow_id), DNS) == []
    listed = {r["kind"]: r for r in rig.core.rules.listing(rig.now, 1_700_000_000.0, 10)}
    assert set(listed) == {"redirect", "adjacent", "offload"}
    assert {k: (r["src"], r["dst"], r["to"], r["gateway"], r["state"]) for k, r in listed.items()} == {
        "redirect": (f"{C}:*", f"{W}:50000", f"{S}:50000", "ftp", "live"),
        "adjacent": (f"{C}:*", f"{W}:5354", f"{S}:54", "dns", "live"),
        "offload": (f"{C}:5000", f"{W}:5353", f"{S}:53", "dns", "installing"),
    }
    assert listed["redirect"]["flow_id"] == ftp.flow_id and listed["adjacent"]["flow_id"] == flow.flow_id
    assert listed["redirect"]["expires_in"] == 30.0 and listed["redirect"]["expires"] == 1_700_000_030.0
    rig.kernel()
    rig.messages()
    listed = {r["kind"]: r for r in rig.core.rules.listing(rig.now, 0.0, 10)}
    # The offload done: its ALLOW holds leg B; the adjacent rule lives on, owned by no flow.
    assert listed["offload"]["state"] == "live" and listed["offload"]["holds_leg_b"] is True
    assert listed["offload"]["flow_id"] is None and listed["adjacent"]["flow_id"] is None
    rig.send(udp(C, 5000, W, 5353), WAN0)  # the ALLOW used: its elements wait out their grace
    kinds = [(r["kind"], r["src"], r["state"]) for r in rig.core.rules.listing(rig.now, 0.0, 10)]
    assert sorted(kinds) == [("adjacent", f"{C}:*", "live"), ("redirect", f"{C}:*", "live"),
                             ("used", f"{C}:5000", "used")]
    assert len(rig.core.rules.listing(rig.now, 0.0, 2)) == 2


def test_offload_requests_refused_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(extra=EXTRA)
    flow, _, _ = udp_flow(rig)
    relay, _ = open_inbound(rig, sport=40000, port=8443)  # a tcp-relay's TCP flow

    def refused(req: OffloadRequest, source: tuple[str, int], reason: RuleRefusal) -> None:
        assert rig.ask(req, source) == [RuleRefused(req.request_id, reason)]
        assert rig.out.kernel_ops == [] and rig.out.ct_deletes == [] and rig.core.stats()["flows"] == 2

    refused(OffloadRequest(1, flow.flow_id + 1000), DNS, RuleRefusal.UNKNOWN_FLOW)
    refused(OffloadRequest(2, flow.flow_id), FTP, RuleRefusal.OTHER_GATEWAY)  # the ftp gateway asks for dns's flow
    refused(OffloadRequest(3, relay.flow_id), (G, 7500), RuleRefusal.NOT_UDP)
    # A kind that may not offload (its declaration says so: gateways/kind.py).
    monkeypatch.setitem(rig.core.rules._kind, "dns", dataclasses.replace(rig.core.rules._kind["dns"], offload=False))
    refused(OffloadRequest(4, flow.flow_id), DNS, RuleRefusal.POLICY)
    monkeypatch.undo()
    counters = rig.core.stats()["counters"]
    assert counters["offload.refused.unknown_flow"] == counters["offload.refused.other_gateway"] == 1
    assert counters["offload.refused.not_udp"] == counters["offload.refused.policy"] == 1

    # A replayed datagram is refused by the Guard, answered nothing.
    data = rig.gw_encoder.encode(OffloadRequest(5, flow.flow_id), rig.now - 1000.0 + 1_700_000_000.0)
    rig.core.datagram(data, DNS, rig.now)
    rig.core.datagram(data, DNS, rig.now)
    assert rig.core.counters["signalling.refused.replay"] == 1
    rig.kernel()
    assert [type(m) for m in rig.messages()] == [RuleAck, FlowEnd]
    # The same request id again gets the first reply; a new one finds no flow to offload.
    (again,) = rig.ask(OffloadRequest(5, flow.flow_id), DNS)
    assert isinstance(again, RuleAck) and rig.out.kernel_ops == []
    assert rig.ask(OffloadRequest(6, flow.flow_id), DNS) == [RuleRefused(6, RuleRefusal.UNKNOWN_FLOW)]
    # While one offload's rule goes in, a second request for the flow is refused.
    other, _, _ = udp_flow(rig, sport=5002)
    assert rig.ask(OffloadRequest(7, other.flow_id), DNS) == []
    assert rig.ask(OffloadRequest(8, other.flow_id), DNS) == [RuleRefused(8, RuleRefusal.UNKNOWN_FLOW)]


def test_an_offload_whose_flow_ended_meanwhile_is_refused() -> None:
    rig = Rig(extra=EXTRA)
    flow, leg_a, leg_b = udp_flow(rig)
    assert rig.ask(OffloadRequest(1, flow.flow_id), DNS) == []
    rig.destroyed("udp", leg_a.key, (leg_a.dnat[0], leg_a.dnat[1], *leg_a.snat))
    rig.destroyed("udp", leg_b.key, (S, 53, *leg_b.snat))
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.IDLE)]
    (op,) = rig.kernel()
    assert rig.messages() == [RuleRefused(1, RuleRefusal.UNKNOWN_FLOW)]
    (removal,) = rig.kernel()
    assert not removal.add and removal.rules == op.rules and rig.out.ct_deletes == []


def test_log_only_flows_pass_unbound_and_end_with_conntracks_counters() -> None:
    rig = Rig(extra=EXTRA)
    syn = tcp(C, 40000, W, 8080, "S")
    # Accepted with the rewritten mark (the forward chain admits it, conntrack marks it as
    # nfgate's), unchanged: no NAT element, no pool entry.
    assert rig.send(syn, WAN0) == (PASS, (), (QOS & ~MASK) | MARK)
    assert rig.nat_ops == []
    ((push, peer),) = rig.received()
    assert peer == LOGGER and isinstance(push, NewFlow)
    flow = push.flow
    assert (str(flow.client), str(flow.original_dst), str(flow.server)) == (f"{C}:40000", f"{W}:8080", f"{S}:80")
    assert str(flow.firewall_side) == "0.0.0.0:0" and flow.snat is None
    stats = rig.core.stats()
    assert stats["flows"] == 0 and stats["logged_flows"] == 1 and stats["pools"]["firewall_side"]["used"] == 0
    # Outbound too; a mid-stream packet is still no new flow.
    assert rig.send(tcp(S, 41000, C, 9001, "S"), LAN0)[0] == PASS
    (outbound,) = rig.messages()
    rig.dropped(tcp(C, 40001, W, 8080, "A"), WAN0, "drop.not_new_flow")

    # The confirmation checks: the inbound one is in conntrack; the outbound one never made
    # it there (the kernel dropped its SYN after the verdict), so no event will end it: the check does.
    rig.alive.add((6, *ints((C, 40000, W, 8080))))
    rig.tick(10)
    assert rig.messages() == [FlowEnd(outbound.flow.flow_id, FlowEndReason.FIN)]
    counters = Counters(10, 600, 20, 1_050_000)
    rig.destroyed("tcp", (C, 40000, W, 8080), (S, 80, C, 40000), counters)
    assert rig.messages() == [FlowEnd(flow.flow_id, FlowEndReason.FIN, counters)]
    assert rig.core.stats()["logged_flows"] == 0 and not rig.core.watching


def test_a_log_only_flow_replaced_on_its_tuple_ends_first() -> None:
    rig = Rig(extra=EXTRA)
    syn = tcp(C, 40000, W, 8080, "S")
    rig.send(syn, WAN0)
    (first,) = rig.messages()
    rig.send(syn, WAN0)  # a SYN that ended the old connection's TIME-WAIT
    end, second = rig.messages()
    assert end == FlowEnd(first.flow.flow_id, FlowEndReason.FIN) and second.flow.flow_id != first.flow.flow_id
    assert rig.send(tcp(C, 40000, W, 8080, "S"), WAN0)[0] != DROP


def test_log_only_flows_are_adopted_after_a_restart_listed_and_ended_with_counters() -> None:
    """A new processor finds the log-only connections in conntrack's dump (nfgate's mark):
    those a log-only selector names are tracked again, pushed under new flow ids, listed by
    ``nfgate flows``; anything else with the mark that is no binding's leg is left alone."""
    rig = Rig(extra=EXTRA)
    inbound = Connection(6, ints((C, 40000, W, 8080)), ints((S, 80, C, 40000)))
    outbound = Connection(6, ints((S, 41000, C, 9001)), ints((C, 9001, W, 41000)))
    not_selected = Connection(6, ints((C, 40001, W, 8081)), ints((S, 81, C, 40001)))
    assert rig.core.adopt([inbound, outbound, not_selected], rig.now) == 0  # no binding among them
    pushes = rig.received()
    assert [peer for _, peer in pushes] == [LOGGER, LOGGER] and all(isinstance(m, NewFlow) for m, _ in pushes)
    first, second = (m.flow for m, _ in pushes)
    assert (str(first.client), str(first.original_dst), str(first.server)) == (f"{C}:40000", f"{W}:8080", f"{S}:80")
    assert (str(second.client), str(second.server)) == (f"{S}:41000", f"{C}:9001")
    assert str(first.firewall_side) == "0.0.0.0:0" and first.flow_id != second.flow_id
    stats = rig.core.stats()
    assert stats["logged_flows"] == 2 and stats["counters"]["flows.adopted_logged"] == 2 and rig.core.watching
    acct = {(6, *ints((C, 40000, W, 8080))): (30, 40_000)}
    listed = rig.core.flows(rig.now, 10, acct)
    assert [(r["flow_id"], r["state"], r["gateway"], r["firewall_side"]) for r in listed] == [
        (first.flow_id, ["logged", "adopted"], "logger", None), (second.flow_id, ["logged", "adopted"], "logger", None)]
    assert (listed[0]["client"], listed[0]["server"], listed[0]["leg_a_bytes"], listed[1]["leg_a_packets"]) == (
        f"{C}:40000", f"{S}:80", 40_000, 0)
    assert len(rig.core.flows(rig.now, 1)) == 1
    # Confirmed already (conntrack had it): no check ends it; its destroy event does, with the counters.
    rig.tick(30)
    assert rig.messages() == []
    counters = Counters(10, 600, 20, 1_050_000)
    rig.destroyed("tcp", (C, 40000, W, 8080), (S, 80, C, 40000), counters)
    assert rig.messages() == [FlowEnd(first.flow_id, FlowEndReason.FIN, counters)]


def test_log_only_flows_of_another_instance_are_not_adopted() -> None:
    """With two queues, the client's low address bit steers it (steer_client_src): instance 0
    takes only even clients' connections back."""
    rig = Rig(pools="[processor]\nqueues = [0, 1]", extra=EXTRA)
    odd = Connection(6, ints(("203.0.113.11", 40000, W, 8080)), ints((S, 80, "203.0.113.11", 40000)))
    even = Connection(6, ints(("203.0.113.10", 40000, W, 8080)), ints((S, 80, "203.0.113.10", 40000)))
    rig.core.adopt([odd, even], rig.now)
    ((push, _),) = rig.received()
    assert str(push.flow.client) == "203.0.113.10:40000" and rig.core.stats()["logged_flows"] == 1
