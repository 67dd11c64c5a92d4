"""The deNAT/reNAT layer: the sans-IO core event by event, then the asyncio layer against a fake processor."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.config import load
from firewall.pools import EndpointPool, SliceBy, Slicing, address_slices
from firewall.signalling import (
    MAX_QUERY_ATTEMPTS,
    VERSION,
    Answer,
    Counters,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Guard,
    NewFlow,
    NotFound,
    OffloadRequest,
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
    make_flow_id,
)
from gateways.layer import EndCause, FlowUnknown, ProcessorInstances, RuleNoAnswer, RuleRefusedError, flow_key
from gateways.layer.core import MAX_RULE_ATTEMPTS, RULE_END_GRACE, LayerCore
from firewall.connect import IP_BIND_ADDRESS_NO_PORT
from gateways.manifest import InstanceSpec, NodeSpec
from gateways.layer.outputs import (
    FlowGone, FlowKnown, FlowNotKnown, LoggedFlowEnded, RuleAnswered, RuleGone, RuleUnanswered, Send,
)
from firewall import manifests
from tests.gateways.fake_processor import CLIENT, KEY, ORIGINAL_DST, SERVER, instances_of, rig
from tests.gateways.loopback import GATEWAY, run, wait_until

T0 = 1_700_000_000.0
QT = 0.5
IP = ipaddress.IPv4Address
ROUTER = IP("172.31.255.1")
AG = Endpoint(IP("172.31.255.2"), 20000)
POOL = ipaddress.IPv4Network("172.31.254.0/28")
QUEUES = (3, 7)  # two instances: F .0-.7 belong to queue 3 (port 7500), .8-.15 to queue 7 (7501)
INSTANCES = instances_of(ROUTER, 7500, QUEUES, POOL)
OTHER_KEY = bytes(range(1, 33))


def fw(host: int, port: int = 1024) -> Endpoint:
    return Endpoint(POOL.network_address + host, port)


def flow(host: int = 9, port: int = 1024, serial: int = 1, queue: int | None = None, **kw: object) -> FlowInfo:
    if queue is None:
        queue = QUEUES[INSTANCES.index_for_firewall_side(fw(host).address)]
    fields: dict[str, object] = dict(
        flow_id=make_flow_id(queue, serial),
        proto=Proto.TCP,
        gateway="relay",
        client=CLIENT,
        original_dst=ORIGINAL_DST,
        server=SERVER,
        firewall_side=fw(host, port),
        ag=AG,
    )
    fields.update(kw)
    return FlowInfo(**fields)  # type: ignore[arg-type]


class Processor:
    """Encodes what a processor instance would send, and decodes what the layer sends it."""

    def __init__(self, sender_id: int = 0xA11CE) -> None:
        self.encoder = Encoder(KEY, Role.PROCESSOR, sender_id=sender_id)
        self.guard = Guard(KEY, Role.PROCESSOR, now=T0 - 1)

    def push(self, f: FlowInfo, now: float = T0, copies: int = 3) -> list[bytes]:
        return self.encoder.encode_copies(NewFlow(f), now, copies)

    def msg(self, message: object, now: float = T0) -> bytes:
        return self.encoder.encode(message, now)  # type: ignore[arg-type]

    def read(self, out: Send, now: float = T0) -> Received:
        result = self.guard.check(out.data, now)
        assert isinstance(result, Received), result
        return result


def core(**kw: object) -> LayerCore:
    options: dict[str, object] = dict(now=T0 - 1, gateway="relay", query_timeout=QT, replay_window=5.0)
    options.update(kw)
    return LayerCore(KEY, INSTANCES, **options)  # type: ignore[arg-type]


def feed(c: LayerCore, datagrams: list[bytes], now: float = T0) -> list[object]:
    out: list[object] = []
    for d in datagrams:
        out += c.receive(d, now)
    return out


def sends(outputs: list[object]) -> list[Send]:
    return [o for o in outputs if isinstance(o, Send)]


# ---- instances ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_owner_of_f_is_the_instance_whose_contiguous_pool_slice_holds_it(n: int) -> None:
    pool = ipaddress.IPv4Network("10.9.0.0/27")
    inst = instances_of(ROUTER, 7500, tuple(range(10, 10 + n)), pool)
    pools = [
        EndpointPool(pool, range(1024, 1026), instance=i, instances=n, slice_by=SliceBy.ADDRESS, slicing=Slicing.CONTIGUOUS)
        for i in range(n)
    ]
    for address in pool:
        owners = [i for i, p in enumerate(pools) if p.owns(int(address), 1024)]
        assert owners == [inst.index_for_firewall_side(address)]
        assert inst.for_firewall_side(address) == Endpoint(ROUTER, 7500 + owners[0])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_owner_of_an_ipv6_f_is_the_instance_whose_ipv6_slice_holds_it(n: int) -> None:
    pool, pool6 = ipaddress.IPv4Network("10.9.0.0/27"), ipaddress.IPv6Network("fd6e:6667:6174:fe::/124")
    slices, slices6 = address_slices(pool, n), address_slices(pool6, n)
    specs = [InstanceSpec(queue=10 + i, port=7500 + i, slices=slices[i], slices6=slices6[i]) for i in range(n)]
    inst = ProcessorInstances(pool, [NodeSpec(name="router", address=ROUTER, instances=tuple(specs))], pool6)
    pools = [EndpointPool(pool6, range(1024, 1026), instance=i, instances=n, slice_by=SliceBy.ADDRESS,
                          slicing=Slicing.CONTIGUOUS) for i in range(n)]
    for address in pool6:
        owners = [i for i, p in enumerate(pools) if p.owns(int(address), 1024)]
        assert owners == [inst.index_for_firewall_side(address)], address


def test_rule_requests_go_to_the_instance_in_the_flow_id() -> None:
    assert INSTANCES.for_flow(flow(host=2, queue=7)) == Endpoint(ROUTER, 7501)
    assert INSTANCES.for_flow(flow(host=2, queue=3)) == Endpoint(ROUTER, 7500)
    # A queue the config does not have: the pool slice of F decides.
    assert INSTANCES.for_flow(flow(host=12, queue=99)) == Endpoint(ROUTER, 7501)


def test_the_example_configs_place_every_gateway_and_instance_on_its_own_port() -> None:
    root = Path(__file__).resolve().parents[2]
    office = load(root / "examples" / "office.toml")
    written = [manifests.manifest_for(office, g) for g in office.gateways]
    assert [m.signalling.listen.endpoint for m in written] == [
        Endpoint(IP("172.31.255.2"), 7500),
        Endpoint(IP("172.31.255.2"), 7501),
    ]
    instances = ProcessorInstances.from_spec(written[0].processor)
    assert [instances.endpoint(i) for i in range(len(instances))] == [
        Endpoint(IP("172.31.255.1"), 7500),
        Endpoint(IP("172.31.255.1"), 7501),
    ]
    assert instances.for_firewall_side(IP("172.31.254.3")).port == 7500
    assert instances.for_firewall_side(IP("172.31.254.20")).port == 7501  # the upper half of its /27
    home = load(root / "examples" / "home.toml")
    (nas_log,) = [manifests.manifest_for(home, g) for g in home.gateways if g.name == "nas-log"]
    assert nas_log.signalling.listen.endpoint == Endpoint(IP("172.31.255.2"), home.signalling.port)


# ---- push ---------------------------------------------------------------------------------------


def test_push_then_lookup_hits_and_copies_are_folded() -> None:
    c, p, f = core(), Processor(), flow()
    assert feed(c, p.push(f)) == []
    assert c.counters["pushes.received"] == 1
    assert c.counters["signalling.duplicate"] == 2
    assert c.lookup(flow_key(f), T0) == [FlowKnown(flow_key(f), f)]
    assert c.counters["lookups.hit"] == 1


def test_a_lookup_waits_for_the_push_and_sends_no_query() -> None:
    c, p, f = core(), Processor(), flow()
    assert c.lookup(flow_key(f), T0) == []
    assert c.next_deadline(T0) == T0 + QT
    assert feed(c, p.push(f), T0 + 0.01) == [FlowKnown(flow_key(f), f)]
    assert c.tick(T0 + 10 * QT) == []
    assert c.counters["lookups.resolved_by_push"] == 1
    assert c.counters["queries.sent"] == 0


def test_a_push_for_another_gateway_is_dropped() -> None:
    c, p = core(), Processor()
    feed(c, p.push(flow(gateway="smtp-in")))
    assert c.flows == 0 and c.counters["pushes.foreign"] == 1


def test_the_same_push_again_is_counted_and_a_newer_flow_replaces_a_held_one() -> None:
    c, p = core(), Processor()
    old = flow(serial=1)
    feed(c, p.push(old))
    feed(c, p.push(old, T0 + 0.1))  # a fresh message with the same binding
    assert c.counters["pushes.repeated"] == 1
    assert c.claim(old)
    new = flow(serial=2)  # F:f went back to the pool and was handed out again
    assert feed(c, p.push(new, T0 + 0.2)) == [FlowGone(old, EndCause.REPLACED)]
    assert c.known(flow_key(new)) == new
    assert not c.claim(old)


# ---- pull ---------------------------------------------------------------------------------------


def test_pull_queries_the_owner_every_query_timeout_with_one_query_id_then_gives_up() -> None:
    c, p = core(), Processor()
    key = flow_key(flow(host=12))  # instance 1
    assert c.lookup(key, T0) == []
    assert c.tick(T0 + QT / 2) == []
    query_ids, seqs = set(), set()
    for attempt in range(1, MAX_QUERY_ATTEMPTS + 1):
        now = T0 + attempt * QT
        (out,) = c.tick(now)
        assert isinstance(out, Send) and out.to == Endpoint(ROUTER, 7501)
        received = p.read(out, now)
        query = received.message
        assert isinstance(query, Query)
        assert (query.proto, query.firewall_side, query.ag) == key
        query_ids.add(query.query_id)
        seqs.add(received.seq)
        assert c.next_deadline(now) == now + QT
    assert len(query_ids) == 1 and len(seqs) == MAX_QUERY_ATTEMPTS
    (gave_up,) = c.tick(T0 + (MAX_QUERY_ATTEMPTS + 1) * QT)
    assert isinstance(gave_up, FlowNotKnown) and gave_up.key == key
    assert c.counters["queries.sent"] == MAX_QUERY_ATTEMPTS
    assert c.counters["flows.unknown"] == 1 and c.counters["lookups.failed.no_answer"] == 1
    assert c.next_deadline(T0 + 10) is None
    assert c.pending == 0


def test_an_answer_resolves_the_lookup_and_a_late_one_is_ignored() -> None:
    c, p, f = core(), Processor(), flow()
    c.lookup(flow_key(f), T0)
    (out,) = c.tick(T0 + QT)
    query = p.read(out, T0 + QT).message
    assert isinstance(query, Query)
    answer = Answer(query.query_id, f)
    assert feed(c, [p.msg(answer, T0 + QT)], T0 + QT) == [FlowKnown(flow_key(f), f)]
    assert c.counters["answers.received"] == 1 and c.counters["lookups.resolved_by_answer"] == 1
    assert feed(c, [p.msg(answer, T0 + QT + 0.1)], T0 + QT + 0.1) == []
    assert c.counters["answers.ignored"] == 1


def test_an_answer_about_another_tuple_is_ignored() -> None:
    c, p, f = core(), Processor(), flow()
    c.lookup(flow_key(f), T0)
    query = p.read(c.tick(T0 + QT)[0], T0 + QT).message  # type: ignore[arg-type]
    assert isinstance(query, Query)
    assert feed(c, [p.msg(Answer(query.query_id, flow(port=2000)), T0 + QT)], T0 + QT) == []
    assert c.counters["answers.mismatched"] == 1 and c.pending == 1


def test_not_found_gives_up_at_once() -> None:
    c, p, f = core(), Processor(), flow()
    c.lookup(flow_key(f), T0)
    query = p.read(c.tick(T0 + QT)[0], T0 + QT).message  # type: ignore[arg-type]
    assert isinstance(query, Query)
    nf = NotFound(query.query_id, query.proto, query.firewall_side, query.ag)
    (out,) = feed(c, [p.msg(nf, T0 + QT)], T0 + QT)
    assert isinstance(out, FlowNotKnown) and "NOT_FOUND" in out.why
    assert c.counters["lookups.failed.not_found"] == 1 and c.counters["flows.unknown"] == 1
    assert c.pending == 0


def test_f_outside_the_pool_is_unknown_at_once() -> None:
    c = core()
    key = (Proto.TCP, Endpoint(IP("10.1.1.1"), 5555), AG)
    (out,) = c.lookup(key, T0)
    assert isinstance(out, FlowNotKnown) and "pool" in out.why
    assert c.counters["lookups.failed.outside_pool"] == 1


def test_a_clock_stepped_back_does_not_strand_a_lookup() -> None:
    c = core()
    c.lookup(flow_key(flow()), T0)
    back = T0 - 3600
    assert c.next_deadline(back) == back + QT
    assert [type(o) for o in c.tick(back)] == [Send]


# ---- refusals -------------------------------------------------------------------------------------


def test_forged_altered_stale_replayed_and_misdirected_datagrams_are_refused_and_counted() -> None:
    c, p, f = core(), Processor(), flow()
    good = p.push(f, copies=1)[0]
    forged = Encoder(OTHER_KEY, Role.PROCESSOR).encode(NewFlow(f), T0)
    altered = good[:-1] + bytes([good[-1] ^ 1])
    stale = p.push(flow(serial=5), T0 - 60, copies=1)[0]
    reflected = Encoder(KEY, Role.GATEWAY).encode(Query(1, Proto.TCP, fw(9), AG), T0)
    oversized = bytes([VERSION]) + b"\x01" * 1999
    old_version = bytes([VERSION - 1]) + good[1:]  # a peer left on the previous layout
    for data in (forged, altered, stale, reflected, b"", oversized, old_version, good, good):
        assert c.receive(data, T0) == []
    refused = {k: v for k, v in c.counters.items() if k.startswith("signalling.refused.")}
    assert refused == {
        "signalling.refused.BAD_MAC": 2,
        "signalling.refused.STALE": 1,
        "signalling.refused.WRONG_DIRECTION": 1,
        "signalling.refused.TOO_SHORT": 1,
        "signalling.refused.MALFORMED": 1,  # a NEW_FLOW header on 2000 bytes
        "signalling.refused.BAD_VERSION": 1,
        "signalling.refused.REPLAY": 1,
    }
    assert c.flows == 1 and c.counters["signalling.accepted"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_refused_without_raising(data: bytes) -> None:
    c = core()
    assert c.receive(data, T0) == []
    assert c.counters["signalling.accepted"] == 0


# ---- FLOW_END, restarts, expiry ---------------------------------------------------------------


def test_flow_end_ends_a_held_flow_and_an_unknown_one_is_counted() -> None:
    c, p, f = core(), Processor(), flow()
    feed(c, p.push(f))
    assert c.claim(f)
    assert feed(c, [p.msg(FlowEnd(f.flow_id, FlowEndReason.RST))]) == [FlowGone(f, EndCause.RST)]
    assert c.flows == 0 and c.counters["flows.ended.RST"] == 1
    feed(c, [p.msg(FlowEnd(f.flow_id, FlowEndReason.FIN), T0 + 0.1)], T0 + 0.1)
    assert c.counters["flows.end_unknown"] == 1


def test_an_unheld_flow_ends_silently() -> None:
    c, p, f = core(), Processor(), flow()
    feed(c, p.push(f))
    assert feed(c, [p.msg(FlowEnd(f.flow_id, FlowEndReason.IDLE))]) == []
    assert c.known(flow_key(f)) is None


def test_a_restarted_instance_takes_its_queues_flows_with_it() -> None:
    c, old, new = core(), Processor(sender_id=1), Processor(sender_id=2)
    before = flow(host=2, serial=1)  # queue 3
    other_queue = flow(host=12, serial=1)  # queue 7
    feed(c, old.push(before) + old.push(other_queue))
    assert c.claim(before)
    after = flow(host=2, port=2000, serial=1)  # queue 3 again, serial 1 again: a new process
    out = feed(c, new.push(after, T0 + 1), T0 + 1)
    assert out == [FlowGone(before, EndCause.RESTARTED)]
    assert c.known(flow_key(after)) == after and c.known(flow_key(other_queue)) == other_queue
    # A late message from the dead process cannot undo that.
    feed(c, [old.msg(FlowEnd(after.flow_id, FlowEndReason.FIN), T0 + 0.5)], T0 + 1)
    assert c.known(flow_key(after)) == after
    assert c.counters["signalling.old_instance"] == 1 and c.counters["instances.restarted"] == 1


def test_unclaimed_flows_expire_and_are_evicted_beyond_the_bound_but_held_ones_stay() -> None:
    c, p = core(unclaimed_ttl=10.0, max_unclaimed=2), Processor()
    a, b, d = flow(port=1), flow(port=2, serial=2), flow(port=3, serial=3)
    feed(c, p.push(a) + p.push(b))
    assert c.claim(a)
    feed(c, p.push(d))
    assert c.flows == 3 and c.counters["flows.evicted"] == 0
    e = flow(port=4, serial=4)
    feed(c, p.push(e))
    assert c.known(flow_key(b)) is None and c.counters["flows.evicted"] == 1
    assert c.tick(T0 + 10.5) == []
    assert c.flows == 1 and c.known(flow_key(a)) == a and c.counters["flows.expired"] == 2
    c.release(a, T0 + 11)
    assert c.next_deadline(T0 + 11) == T0 + 21
    c.tick(T0 + 21)
    assert c.flows == 0


# ---- offload and flows without a binding -----------------------------------------------------------


def test_an_offload_request_is_answered_like_a_rule_and_flow_end_offloaded_ends_the_flow() -> None:
    c, p, f = core(), Processor(), flow(host=12, proto=Proto.UDP)
    feed(c, p.push(f))
    assert c.claim(f)
    request_id, (send,) = c.request_offload(f, T0)
    assert isinstance(send, Send) and send.to == Endpoint(ROUTER, 7501)  # the flow's instance
    assert p.read(send).message == OffloadRequest(request_id, f.flow_id)
    (resent,) = c.tick(T0 + QT)  # silence: the same request id again
    assert p.read(resent, T0 + QT).message == OffloadRequest(request_id, f.flow_id)
    ack = RuleAck(request_id, 78, int((T0 + 30) * 1000))
    assert feed(c, [p.msg(ack)]) == [RuleAnswered(request_id, ack)]
    assert feed(c, [p.msg(FlowEnd(f.flow_id, FlowEndReason.OFFLOADED))]) == [FlowGone(f, EndCause.OFFLOADED)]
    assert c.flows == 0 and c.counters["offload.sent"] == 2
    request_id, _ = c.request_offload(f, T0)
    refused = RuleRefused(request_id, RuleRefusal.UNKNOWN_FLOW)
    assert feed(c, [p.msg(refused, T0 + 0.1)], T0 + 0.1) == [RuleAnswered(request_id, refused)]


def test_a_flow_without_a_binding_is_kept_by_id_and_its_end_carries_the_kernels_counters() -> None:
    c, p = core(max_unclaimed=2), Processor()
    no_fw = Endpoint(IP("0.0.0.0"), 0)
    logged = [flow(serial=n, firewall_side=no_fw) for n in (1, 2, 3)]
    out = feed(c, p.push(logged[0]) + p.push(logged[1]))
    assert out == [] and c.flows == 0  # not in the table: no connection will come from 0.0.0.0:0
    counters = Counters(5, 300, 4, 5000)
    assert feed(c, [p.msg(FlowEnd(logged[0].flow_id, FlowEndReason.FIN, counters))]) == [
        LoggedFlowEnded(logged[0], EndCause.FIN, counters)
    ]
    # Bounded: beyond max_unclaimed the oldest is logged without counters.
    feed(c, p.push(logged[2]))
    assert feed(c, p.push(flow(serial=4, firewall_side=no_fw))) == [LoggedFlowEnded(logged[1], EndCause.IDLE, None)]
    # A new process for the queue: the kernel still carries them, nobody will report their end.
    new = Processor(sender_id=9)
    out = feed(c, new.push(flow(host=9, port=2000, serial=1), T0 + 1), T0 + 1)
    assert [(type(o), o.cause) for o in out] == [(LoggedFlowEnded, EndCause.RESTARTED)] * 2  # type: ignore[attr-defined]


# ---- rules ----------------------------------------------------------------------------------------


def rule_request(c: LayerCore, f: FlowInfo, now: float = T0, **kw: object) -> tuple[int, list[object]]:
    args: dict[str, object] = dict(
        proto=Proto.TCP, src=CLIENT, dst=Endpoint(ORIGINAL_DST.address, 50000), ttl=30, mode=RuleMode.REDIRECT, one_shot=True
    )
    args.update(kw)
    return c.request_rule(f, now=now, **args)  # type: ignore[arg-type]


def test_a_rule_request_goes_to_the_flows_instance_and_its_ack_and_end_come_back() -> None:
    c, p, f = core(), Processor(), flow(host=12)
    request_id, out = rule_request(c, f)
    (send,) = out
    assert isinstance(send, Send) and send.to == Endpoint(ROUTER, 7501)
    request = p.read(send).message
    assert isinstance(request, RuleRequest) and request.request_id == request_id and request.flow_id == f.flow_id
    ack = RuleAck(request_id, 77, int((T0 + 30) * 1000))
    assert feed(c, [p.msg(ack)]) == [RuleAnswered(request_id, ack)]
    assert feed(c, [p.msg(RuleEnd(77, RuleEndReason.USED), T0 + 1)], T0 + 1) == [
        RuleGone(request_id, 77, RuleEndReason.USED)
    ]
    assert c.counters["rules.acked"] == 1 and c.counters["rules.ended.USED"] == 1


def test_a_rule_request_is_resent_with_the_same_id_then_given_up() -> None:
    c, p, f = core(), Processor(), flow()
    request_id, out = rule_request(c, f)
    ids = {p.read(out[0]).message.request_id}  # type: ignore[union-attr,arg-type]
    for attempt in range(1, MAX_RULE_ATTEMPTS):
        now = T0 + attempt * QT
        (resend,) = c.tick(now)
        ids.add(p.read(resend, now).message.request_id)  # type: ignore[union-attr,arg-type]
    assert ids == {request_id}
    assert c.tick(T0 + MAX_RULE_ATTEMPTS * QT) == [RuleUnanswered(request_id)]
    assert c.counters["rules.sent"] == MAX_RULE_ATTEMPTS and c.counters["rules.unanswered"] == 1
    ack = RuleAck(request_id, 1, int((T0 + 30) * 1000))
    assert feed(c, [p.msg(ack, T0 + 2)], T0 + 2) == []  # too late
    assert c.counters["rules.reply_ignored"] == 1


def test_a_refusal_is_reported_with_its_reason_and_an_inexact_request_is_refused_without_asking() -> None:
    c, p, f = core(), Processor(), flow()
    request_id, _ = rule_request(c, f, dst=Endpoint(IP("10.99.0.1"), 21))
    refused = RuleRefused(request_id, RuleRefusal.THIRD_PARTY)
    assert feed(c, [p.msg(refused)]) == [RuleAnswered(request_id, refused)]
    assert c.counters["rules.refused.THIRD_PARTY"] == 1
    request_id, out = rule_request(c, f, dst=Endpoint(ORIGINAL_DST.address, 0))
    assert out == [RuleAnswered(request_id, RuleRefused(request_id, RuleRefusal.NOT_EXACT), local=True)]
    request_id, out = rule_request(c, f, ttl=0)
    assert out == [RuleAnswered(request_id, RuleRefused(request_id, RuleRefusal.BAD_TTL), local=True)]
    assert c.counters["rules.refused_local.NOT_EXACT"] == 1 and c.counters["rules.refused_local.BAD_TTL"] == 1


def test_an_acked_rule_whose_end_is_lost_is_forgotten_after_it_expires() -> None:
    c, p, f = core(), Processor(), flow()
    request_id, _ = rule_request(c, f)
    feed(c, [p.msg(RuleAck(request_id, 5, int((T0 + 30) * 1000)))])
    forget = T0 + 30 + RULE_END_GRACE
    assert c.next_deadline(T0 + 1) == forget
    assert c.tick(forget) == [RuleGone(request_id, 5, RuleEndReason.EXPIRED)]
    assert c.counters["rules.forgotten"] == 1


# ---- the asyncio layer against the fake processor --------------------------------------------------

G = Endpoint(GATEWAY, 20000)


def fw_loop(host: int, port: int = 40000) -> Endpoint:
    return Endpoint(IP("127.0.1.0") + host, port)


def test_push_path_on_loopback() -> None:
    async def main() -> None:
        async with rig(query_timeout=5.0) as (fake, layer):
            f = fake.new_flow(Proto.TCP, fw_loop(5), G)
            got = await layer.lookup(Proto.TCP, f.firewall_side, G)
            assert got == f
            assert layer.counters["pushes.received"] == 1
            await wait_until(lambda: layer.counters.get("signalling.duplicate") == 2, what="the copies")
            assert "queries.sent" not in layer.counters and fake.queries == []

    run(main())


def test_pull_path_when_pushes_are_dropped_asks_the_owning_instance() -> None:
    async def main() -> None:
        async with rig(queues=(0, 1), query_timeout=0.05) as (fake, layer):
            fake.drop_pushes = True
            f = fake.new_flow(Proto.UDP, fw_loop(200), G)  # .200: the upper half, instance 1
            started = time.monotonic()
            assert await layer.lookup(Proto.UDP, f.firewall_side, G) == f
            assert time.monotonic() - started >= 0.05
            assert [(i, q.firewall_side) for i, q in fake.queries] == [(1, f.firewall_side)]
            assert layer.counters["answers.received"] == 1

    run(main())


def test_a_lookup_nobody_answers_raises_flow_unknown_after_the_attempts() -> None:
    async def main() -> None:
        async with rig(query_timeout=0.05) as (fake, layer):
            fake.answer_queries = False
            with pytest.raises(FlowUnknown) as info:
                await layer.lookup(Proto.TCP, fw_loop(7), G)
            assert "no answer to 3 queries" in info.value.why
            assert len(fake.queries) == MAX_QUERY_ATTEMPTS
            assert layer.counters["flows.unknown"] == 1

    run(main())


def test_not_found_on_loopback_raises_at_once() -> None:
    async def main() -> None:
        async with rig(query_timeout=0.05) as (fake, layer):
            with pytest.raises(FlowUnknown, match="NOT_FOUND"):
                await layer.lookup(Proto.TCP, fw_loop(7), G)
            assert len(fake.queries) == 1

    run(main())


def test_forged_and_replayed_signalling_is_refused_on_loopback_and_the_layer_carries_on() -> None:
    async def main() -> None:
        async with rig() as (fake, layer):
            f = fake.new_flow(Proto.TCP, fw_loop(8), G)
            await layer.lookup(Proto.TCP, f.firewall_side, G)
            fake.send_raw(fake.sent[0])  # a captured push, replayed
            fake.send_raw(Encoder(OTHER_KEY, Role.PROCESSOR).encode(NewFlow(f), time.time()))
            fake.send_raw(b"\x00" * 40)
            await wait_until(lambda: layer.counters.get("signalling.refused.TOO_SHORT") == 1, what="the refusals")
            assert layer.counters["signalling.refused.REPLAY"] == 1
            assert layer.counters["signalling.refused.BAD_MAC"] == 1
            g = fake.new_flow(Proto.TCP, fw_loop(9), G)
            assert await layer.lookup(Proto.TCP, g.firewall_side, G) == g

    run(main())


def test_attach_holds_the_flow_and_flow_end_sets_ended() -> None:
    async def main() -> None:
        async with rig() as (fake, layer):
            f = fake.new_flow(Proto.TCP, fw_loop(10), G)
            causes: list[EndCause] = []
            with await layer.attach(Proto.TCP, f.firewall_side, G, on_end=causes.append) as hold:
                assert hold.flow == f and not hold.ended.is_set()
                fake.end_flow(f, FlowEndReason.POLICY)
                await asyncio.wait_for(hold.ended.wait(), 5)
                assert hold.cause is EndCause.POLICY and causes == [EndCause.POLICY]

    run(main())


def test_a_cancelled_lookup_stops_asking() -> None:
    async def main() -> None:
        async with rig(query_timeout=0.05) as (fake, layer):
            fake.answer_queries = False
            task = asyncio.create_task(layer.lookup(Proto.TCP, fw_loop(11), G))
            await wait_until(lambda: len(fake.queries) == 1, what="the first query")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert layer.counters["lookups.abandoned"] == 1 and layer.core.pending == 0

    run(main())


def test_request_rule_ack_refusal_resend_and_silence() -> None:
    async def main() -> None:
        async with rig(query_timeout=0.05) as (fake, layer):
            f = fake.new_flow(Proto.TCP, fw_loop(12), G)
            dst = Endpoint(ORIGINAL_DST.address, 50000)
            ends: list[RuleEndReason] = []
            ack = await layer.request_rule(f, Proto.TCP, CLIENT, dst, 30, RuleMode.REDIRECT, True, on_end=ends.append)
            fake.end_rule(ack.rule_id, RuleEndReason.USED)
            await wait_until(lambda: ends == [RuleEndReason.USED], what="the rule's end")

            fake.rule_policy = lambda request: RuleRefusal.POLICY
            with pytest.raises(RuleRefusedError) as info:
                await layer.request_rule(f, Proto.TCP, CLIENT, dst, 30, RuleMode.ALLOW, False)
            assert info.value.reason is RuleRefusal.POLICY and not info.value.local

            fake.rule_policy = fake.grant
            fake.drop_rule_requests = 1  # the first request is lost; the resend is answered
            before = len(fake.rule_requests)
            await layer.request_rule(f, Proto.TCP, CLIENT, dst, 30, RuleMode.REDIRECT, True)
            resent = [r for _, r in fake.rule_requests[before:]]
            assert len(resent) == 2 and resent[0].request_id == resent[1].request_id

            fake.rule_policy = lambda request: None  # silence
            with pytest.raises(RuleNoAnswer):
                await layer.request_rule(f, Proto.TCP, CLIENT, dst, 30, RuleMode.REDIRECT, True)
            assert layer.counters["rules.unanswered"] == 1

            with pytest.raises(RuleRefusedError) as info:
                await layer.request_rule(f, Proto.TCP, CLIENT, Endpoint(dst.address, 0), 30, RuleMode.REDIRECT, True)
            assert info.value.local and info.value.reason is RuleRefusal.NOT_EXACT

    run(main())


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_leg_b_whose_syn_goes_unanswered_times_out_and_is_closed(event_loop: str) -> None:
    """``connected``'s bound (tcp-relay's ``connect_timeout``): TimeoutError at
    the bound, not before, and the socket closed; the listener's full accept
    queue drops the SYN, as a server that is gone would leave it unanswered."""

    async def main() -> None:
        async with rig() as (_, layer):
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(0)
                with socket.create_connection(listener.getsockname()):  # the accept queue's one place
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.connect_ex(listener.getsockname())
                    started = time.monotonic()
                    with pytest.raises(TimeoutError):
                        await layer.connected(sock, connect_timeout=0.3)
                    assert 0.25 <= time.monotonic() - started < 5
                    assert sock.fileno() == -1

    run(main(), event_loop=event_loop)


def test_leg_b_takes_its_port_at_the_connect() -> None:
    """Leg B is bound to the gateway address with its port left to the
    connect (IP_BIND_ADDRESS_NO_PORT): a bind to port 0 would search the
    ports no socket holds, milliseconds of system time a connect once
    thousands of leg Bs are in TIME_WAIT (docs/benchmarks.md, issue 14,
    ninth pass)."""
    async def main() -> None:
        async with rig() as (fake, layer):
            listener = socket.create_server(("127.0.1.5", 0))
            server = await asyncio.start_server(lambda r, w: w.close(), sock=listener)
            f = fake.new_flow(Proto.TCP, Endpoint(IP("127.0.1.5"), listener.getsockname()[1]), G)
            sock = layer.start_tcp(f)
            try:
                assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
                await layer.connected(sock, connect_timeout=10)
                address, port = sock.getsockname()
                assert address == str(GATEWAY) and port != 0
            finally:
                sock.close()
                server.close()

    run(main())
