"""firewall.flows: playbooks of flows through both legs of the double NAT.

Each test states the packets in (as the wire carries them) and what comes out
of the same loop the processor runs: parse, match, rewrite to the binding's
target, note the packet. The rewritten bytes are checked with scapy.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.packet import Raw

from firewall.config.model import Timeouts
from firewall.flows import (
    AgEndpoint,
    Binding,
    Direction,
    FlowState,
    FlowTable,
    Refusal,
    flow_key,
    fw_key,
)
from firewall.packet import TCP, UDP, Packet, parse, rewrite
from firewall.pools import EndpointPool, SliceBy


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


C = ip("192.168.1.10")  # client
S = ip("203.0.113.25")  # server
W = ip("198.51.100.1")  # the router's wan address (masquerade, port forwards)
G = ip("172.31.255.2")  # the AG's address on the blind track
SMTP = AgEndpoint("smtp", G, 20025)
DNS = AgEndpoint("dns", G, 20053)
T0 = 1000.0
TIMEOUTS = Timeouts(tcp_idle=100, tcp_closing=10, tcp_handshake=5, udp_idle=30)

C2A, A2C, A2S, S2A = Direction


@dataclass
class Out:
    direction: Direction
    binding: Binding
    tuple: tuple[int, int, int, int]  # src, sport, dst, dport as rewritten


def make_table(ports: range = range(1024, 65536), snat_ports: range = range(61000, 61100)) -> FlowTable:
    fw = EndpointPool(ipaddress.IPv4Network("172.31.254.0/28"), ports)
    snat = EndpointPool([ipaddress.IPv4Address(W)], snat_ports, slice_by=SliceBy.PORT)
    return FlowTable(TIMEOUTS, fw, snat, now=T0)


def send(
    table: FlowTable,
    src: int,
    sport: int,
    dst: int,
    dport: int,
    now: float,
    *,
    flags: str = "A",
    proto: int = TCP,
    from_ag: bool = False,
    data: bytes = b"",
) -> Out | None:
    """One packet through the processor's loop; None when no binding takes it."""
    l4 = ScapyTCP(sport=sport, dport=dport, flags=flags) if proto == TCP else ScapyUDP(sport=sport, dport=dport)
    buf = bytearray(bytes(IP(src=str(ipaddress.IPv4Address(src)), dst=str(ipaddress.IPv4Address(dst))) / l4 / Raw(data)))
    p = parse(buf)
    assert isinstance(p, Packet)
    hit = table.match_gateway(p) if from_ag else table.match_outside(p)
    if hit is None:
        return None
    b, d = hit
    rewrite(buf, p.l4, p.proto, *b.target(d))
    table.seen(b, d, p.flags, now)
    got = IP(bytes(buf))
    ip_sum, l4_sum = got[IP].chksum, got[IP].payload.chksum
    del got[IP].chksum
    del got[IP].payload.chksum
    fresh = IP(bytes(got))
    assert (ip_sum, l4_sum) == (fresh[IP].chksum, fresh[IP].payload.chksum)
    q = parse(buf)
    assert isinstance(q, Packet)
    return Out(d, b, (q.src, q.sport, q.dst, q.dport))


def expect(out: Out | None, direction: Direction, binding: Binding, tup: tuple[int, int, int, int]) -> None:
    assert out is not None
    assert (out.direction, out.binding, out.tuple) == (direction, binding, tup)


# ---- a TCP flow through both legs ---------------------------------------------------


def test_tcp_through_both_legs_with_masquerade_then_fin_expiry() -> None:
    table = make_table()
    t = T0
    assert send(table, C, 40000, S, 25, t, flags="S") is None  # no binding yet: the processor opens one
    b = table.open(TCP, C, 40000, S, 25, SMTP, t, snat=True)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    w_addr, w = b.visible_client
    assert w_addr == W and b.snat
    g = SMTP.port

    # Leg A: the client's SYN goes into the AG from F:f; the AG's answer is restored.
    expect(send(table, C, 40000, S, 25, t, flags="S"), C2A, b, (F, f, G, g))
    expect(send(table, G, g, F, f, t, flags="SA", from_ag=True), A2C, b, (S, 25, C, 40000))
    expect(send(table, C, 40000, S, 25, t, flags="A"), C2A, b, (F, f, G, g))
    assert b.established

    # Leg B: the AG connects to F:f from an ephemeral port (the swap); the
    # server sees W:w (masquerade), its replies go back to G:e.
    e = 47001
    expect(send(table, G, e, F, f, t + 1, flags="S", from_ag=True), A2S, b, (W, w, S, 25))
    assert b.ag_eport == e
    expect(send(table, S, 25, W, w, t + 1, flags="SA"), S2A, b, (F, f, G, e))
    expect(send(table, G, e, F, f, t + 1, flags="A", from_ag=True), A2S, b, (W, w, S, 25))
    expect(send(table, S, 25, W, w, t + 2, flags="PA", data=b"220 mx\r\n"), S2A, b, (F, f, G, e))
    expect(send(table, G, g, F, f, t + 2, flags="PA", data=b"220 mx\r\n", from_ag=True), A2C, b, (S, 25, C, 40000))

    # Every direction's key finds this binding.
    assert table.by_key(flow_key(TCP, C, 40000, S, 25)) is b
    assert table.by_key(flow_key(TCP, S, 25, W, w)) is b
    assert table.by_key(fw_key(TCP, F, f)) is b
    assert table.count("smtp") == 1 and len(table) == 1

    # Close both legs: FIN each way on each leg.
    send(table, C, 40000, S, 25, t + 3, flags="FA")
    send(table, G, g, F, f, t + 3, flags="FA", from_ag=True)
    assert not b.closing  # leg B still open
    send(table, G, e, F, f, t + 4, flags="FA", from_ag=True)
    expect(send(table, S, 25, W, w, t + 4, flags="FA"), S2A, b, (F, f, G, e))
    assert b.closing
    assert FlowState(b.state) & FlowState.FIN_FROM_SERVER

    assert table.expire(t + 4 + TIMEOUTS.tcp_closing - 1) == []
    assert table.expire(t + 4 + TIMEOUTS.tcp_closing) == [b]
    assert len(table) == 0 and table.count("smtp") == 0 and table.per_gateway() == {}
    assert not table._fw_pool.in_use(F, f)
    assert not table._snat_pool.in_use(W, w)  # type: ignore[union-attr]
    assert table.by_key(fw_key(TCP, F, f)) is None
    assert send(table, S, 25, W, w, t + 20, flags="A") is None


def test_without_masquerade_the_server_sees_the_real_client() -> None:
    table = make_table()
    b = table.open(TCP, C, 40000, S, 25, SMTP, T0)
    assert isinstance(b, Binding) and not b.snat
    F, f = b.firewall_side
    send(table, C, 40000, S, 25, T0, flags="S")
    expect(send(table, G, 33333, F, f, T0, flags="S", from_ag=True), A2S, b, (C, 40000, S, 25))
    expect(send(table, S, 25, C, 40000, T0, flags="SA"), S2A, b, (F, f, G, 33333))
    assert table.by_key(flow_key(TCP, S, 25, C, 40000)) is b


def test_port_forward_restores_the_address_the_client_used() -> None:
    table = make_table()
    client = ip("203.0.113.99")
    inside = ip("192.168.1.25")
    b = table.open(TCP, client, 51000, W, 2525, SMTP, T0, server=(inside, 25))
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    expect(send(table, client, 51000, W, 2525, T0, flags="S"), C2A, b, (F, f, G, SMTP.port))
    expect(send(table, G, SMTP.port, F, f, T0, flags="SA", from_ag=True), A2C, b, (W, 2525, client, 51000))
    expect(send(table, G, 40500, F, f, T0, flags="S", from_ag=True), A2S, b, (client, 51000, inside, 25))
    expect(send(table, inside, 25, client, 51000, T0, flags="SA"), S2A, b, (F, f, G, 40500))
    rec = b.record()
    assert rec["original_dst"] == (ipaddress.IPv4Address(W), 2525)
    assert rec["server"] == (ipaddress.IPv4Address(inside), 25)
    assert rec["snat"] is None and rec["gateway"] == "smtp" and rec["ag_eport"] == 40500


# ---- TCP expiry ---------------------------------------------------------------------


def test_rst_from_the_ag_before_leg_b_closes_the_flow() -> None:
    table = make_table()
    b = table.open(TCP, C, 40001, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    send(table, C, 40001, S, 25, T0, flags="S")
    send(table, G, SMTP.port, F, f, T0, flags="R", from_ag=True)
    assert b.closing
    assert table.expire(T0 + TIMEOUTS.tcp_closing - 1) == []
    assert table.expire(T0 + TIMEOUTS.tcp_closing) == [b]
    assert len(table._fw_pool) == 0


def test_rst_on_leg_a_waits_for_leg_b_to_end() -> None:
    table = make_table()
    b = table.open(TCP, C, 40002, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    send(table, C, 40002, S, 25, T0, flags="S")
    send(table, G, 41000, F, f, T0, flags="S", from_ag=True)
    send(table, C, 40002, S, 25, T0, flags="R")
    assert not b.closing
    send(table, S, 25, C, 40002, T0 + 1, flags="R")
    assert b.closing
    assert table.expire(T0 + 1 + TIMEOUTS.tcp_closing) == [b]


def test_an_unanswered_syn_expires_after_the_handshake_timeout() -> None:
    table = make_table()
    b = table.open(TCP, C, 40003, S, 25, SMTP, T0)
    send(table, C, 40003, S, 25, T0, flags="S")
    assert table.expire(T0 + TIMEOUTS.tcp_handshake - 1) == []
    assert table.expire(T0 + TIMEOUTS.tcp_handshake) == [b]


def test_an_established_flow_lives_while_packets_flow() -> None:
    table = make_table()
    b = table.open(TCP, C, 40004, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    send(table, C, 40004, S, 25, T0, flags="S")
    send(table, G, SMTP.port, F, f, T0, flags="SA", from_ag=True)
    send(table, C, 40004, S, 25, T0, flags="A")
    assert table.expire(T0 + 50) == []  # past the handshake timeout, not idle
    send(table, C, 40004, S, 25, T0 + 50, flags="PA", data=b"EHLO x\r\n")
    assert table.expire(T0 + 50 + TIMEOUTS.tcp_idle - 1) == []
    assert table.expire(T0 + 50 + TIMEOUTS.tcp_idle) == [b]


def test_a_new_syn_on_a_closing_tuple_gets_a_fresh_binding() -> None:
    table = make_table()
    old = table.open(TCP, C, 40005, S, 25, SMTP, T0)
    assert isinstance(old, Binding)
    F, f = old.firewall_side
    send(table, C, 40005, S, 25, T0, flags="S")
    send(table, G, SMTP.port, F, f, T0, flags="R", from_ag=True)
    assert old.closing
    assert send(table, C, 40005, S, 25, T0 + 1, flags="S") is None
    assert table.recycled == 1 and old not in table and len(table) == 0
    new = table.open(TCP, C, 40005, S, 25, SMTP, T0 + 1)
    assert isinstance(new, Binding) and new.firewall_side != (F, f)
    expect(send(table, C, 40005, S, 25, T0 + 1, flags="S"), C2A, new, (*new.firewall_side, G, SMTP.port))


def test_a_retransmitted_syn_on_a_live_flow_is_forwarded() -> None:
    table = make_table()
    b = table.open(TCP, C, 40006, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    send(table, C, 40006, S, 25, T0, flags="S")
    expect(send(table, C, 40006, S, 25, T0 + 1, flags="S"), C2A, b, (*b.firewall_side, G, SMTP.port))


# ---- what the gateway side may and may not send -------------------------------------


def test_gateway_packets_that_fit_no_binding_are_refused() -> None:
    table = make_table()
    b = table.open(TCP, C, 40007, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    assert send(table, G + 1, SMTP.port, F, f, T0, flags="SA", from_ag=True) is None  # not the AG
    assert send(table, G, SMTP.port, F, f + 1, T0, flags="SA", from_ag=True) is None  # no such F:f
    assert send(table, G, 45000, F, f, T0, flags="A", from_ag=True) is None  # leg B must start with SYN
    assert b.ag_eport is None
    assert send(table, S, 25, C, 40007, T0, flags="SA") is None  # no leg B yet: nothing to answer
    send(table, G, 45000, F, f, T0, flags="S", from_ag=True)
    assert send(table, G, 45001, F, f, T0, flags="S", from_ag=True) is None  # leg B is taken
    with pytest.raises(ValueError):
        Binding(0, 1, 2, SMTP, 0, 0).target(S2A)


def test_the_ag_may_retry_leg_b_from_a_new_port_once_it_failed() -> None:
    table = make_table()
    b = table.open(TCP, C, 40008, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    send(table, G, 45000, F, f, T0, flags="S", from_ag=True)
    send(table, S, 25, C, 40008, T0, flags="RA")  # the server refused
    expect(send(table, G, 45002, F, f, T0 + 1, flags="S", from_ag=True), A2S, b, (C, 40008, S, 25))
    assert b.ag_eport == 45002 and not b.state & FlowState.RST_B
    assert send(table, G, 45000, F, f, T0 + 1, flags="A", from_ag=True) is None


# ---- UDP ----------------------------------------------------------------------------


def test_udp_through_both_legs_then_idle_expiry() -> None:
    table = make_table()
    dns = ip("9.9.9.9")
    b = table.open(UDP, C, 5353, dns, 53, DNS, T0, snat=True)
    assert isinstance(b, Binding)
    F, f = b.firewall_side
    _, w = b.visible_client
    expect(send(table, C, 5353, dns, 53, T0, proto=UDP, data=b"q"), C2A, b, (F, f, G, DNS.port))
    expect(send(table, G, 39000, F, f, T0, proto=UDP, data=b"q", from_ag=True), A2S, b, (W, w, dns, 53))
    expect(send(table, dns, 53, W, w, T0 + 1, proto=UDP, data=b"a"), S2A, b, (F, f, G, 39000))
    expect(send(table, G, DNS.port, F, f, T0 + 1, proto=UDP, data=b"a", from_ag=True), A2C, b, (dns, 53, C, 5353))
    assert send(table, G, 39001, F, f, T0 + 1, proto=UDP, from_ag=True) is None
    assert table.expire(T0 + 19) == []
    send(table, C, 5353, dns, 53, T0 + 20, proto=UDP)
    assert table.expire(T0 + 1 + TIMEOUTS.udp_idle) == []  # the packet at +20 restarted the timer
    assert table.expire(T0 + 20 + TIMEOUTS.udp_idle - 1) == []
    assert table.expire(T0 + 20 + TIMEOUTS.udp_idle) == [b]
    assert len(table._fw_pool) == 0 and len(table._snat_pool) == 0  # type: ignore[arg-type]


# ---- refusals -----------------------------------------------------------------------


def test_refusals_leave_the_pools_as_they_were() -> None:
    table = make_table(ports=range(2000, 2001), snat_ports=range(61000, 61001))  # 16 F:f, 1 W:w
    assert isinstance(table.open(TCP, C, 1, S, 25, SMTP, T0, snat=True), Binding)
    assert table.open(TCP, C, 1, S, 25, SMTP, T0) is Refusal.EXISTS
    assert table.open(TCP, C, 2, S, 25, SMTP, T0, snat=True) is Refusal.SNAT_POOL_EXHAUSTED
    assert len(table._fw_pool) == 1
    for port in range(2, 17):
        assert isinstance(table.open(TCP, C, port, S, 25, SMTP, T0), Binding)
    assert table.open(TCP, C, 99, S, 25, SMTP, T0) is Refusal.FW_POOL_EXHAUSTED
    assert len(table) == 16


def test_two_forwards_onto_one_server_tuple_conflict() -> None:
    table = make_table()
    inside = ip("192.168.1.25")
    a = table.open(TCP, C, 7000, W, 2525, SMTP, T0, server=(inside, 25))
    assert isinstance(a, Binding)
    assert table.open(TCP, C, 7000, W, 2526, SMTP, T0, server=(inside, 25)) is Refusal.CONFLICT
    assert len(table._fw_pool) == 1 and len(table) == 1
    # With SNAT the server-side tuples differ, so both can exist.
    assert isinstance(table.open(TCP, C, 7000, W, 2526, SMTP, T0, server=(inside, 25), snat=True), Binding)


def test_a_client_tuple_that_is_another_flows_server_tuple_conflicts() -> None:
    table = make_table()
    assert isinstance(table.open(TCP, C, 7001, S, 25, SMTP, T0), Binding)
    # S:25 -> C:7001 is what the first flow's server sends: it cannot open a flow.
    assert table.open(TCP, S, 25, C, 7001, SMTP, T0) is Refusal.CONFLICT
    assert len(table._fw_pool) == 1


def test_a_packet_noted_after_its_binding_was_removed_changes_nothing() -> None:
    table = make_table()
    b = table.open(TCP, C, 7002, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    table.remove(b)
    table.seen(b, C2A, 0x04, T0 + 1)  # an RST: would enter closing
    assert len(table) == 0 and table.expire(T0 + 10_000) == []


def test_snat_needs_a_snat_pool() -> None:
    fw = EndpointPool(ipaddress.IPv4Network("172.31.254.0/28"), range(2000, 2010))
    table = FlowTable(TIMEOUTS, fw, now=T0)
    with pytest.raises(ValueError):
        table.open(TCP, C, 1, S, 25, SMTP, T0, snat=True)


def test_remove_is_idempotent_and_create_refuses_taken_keys() -> None:
    table = make_table()
    b = table.open(TCP, C, 1, S, 25, SMTP, T0)
    assert isinstance(b, Binding)
    clone = Binding(b.client_key, flow_key(TCP, S, 25, C, 9), fw_key(TCP, 1, 1), SMTP, 0, 0)
    assert not table.create(clone)
    assert table.remove(b) and not table.remove(b)
    assert len(table) == 0


# ---- many flows at once -------------------------------------------------------------


def test_200_concurrent_flows_map_correctly() -> None:
    table = make_table()
    rng = random.Random(4)
    clients = [ip(f"192.168.1.{i}") for i in range(10, 30)]
    servers = [ip(f"203.0.113.{i}") for i in range(1, 6)]
    flows = []
    for i in range(200):
        proto = TCP if i % 3 else UDP
        c, cp, s = clients[i % 20], 30000 + i, servers[i % 5]
        gw = SMTP if proto == TCP else DNS
        b = table.open(proto, c, cp, s, 25, gw, T0, snat=i % 2 == 0)
        assert isinstance(b, Binding)
        flows.append([b, proto, c, cp, s, 0])
    assert len({b.firewall_side for b, *_ in flows}) == 200
    assert table.count("smtp") + table.count("dns") == 200

    def step(flow: list) -> None:
        b, proto, c, cp, s, n = flow
        F, f = b.firewall_side
        v, vp = b.visible_client
        g = b.gateway.port
        e = 50000 + flows.index(flow)
        flag = "S" if n < 2 else "A"
        if n % 4 == 0:
            expect(send(table, c, cp, s, 25, T0, flags=flag, proto=proto), C2A, b, (F, f, G, g))
        elif n % 4 == 1:
            expect(send(table, G, e, F, f, T0, flags=flag, proto=proto, from_ag=True), A2S, b, (v, vp, s, 25))
        elif n % 4 == 2:
            expect(send(table, s, 25, v, vp, T0, flags="A", proto=proto), S2A, b, (F, f, G, e))
        else:
            expect(send(table, G, g, F, f, T0, flags="A", proto=proto, from_ag=True), A2C, b, (s, 25, c, cp))
        flow[5] = n + 1

    pending = [fl for fl in flows for _ in range(8)]
    rng.shuffle(pending)
    # Keep each flow's own order (a leg B reply cannot precede leg B's first packet).
    for fl in pending:
        step(fl)
    assert all(fl[5] == 8 for fl in flows)
    gone = table.expire(T0 + 10_000)
    assert len(gone) == 200 and len(table) == 0
    assert len(table._fw_pool) == 0 and len(table._snat_pool) == 0  # type: ignore[arg-type]


# ---- the wheel ----------------------------------------------------------------------


class CountingTable(FlowTable):
    checks = 0

    def _timeout(self, b: Binding) -> int:
        self.checks += 1
        return super()._timeout(b)


def test_expire_looks_only_at_bindings_that_are_due() -> None:
    fw = EndpointPool(ipaddress.IPv4Network("172.31.254.0/28"), range(1024, 65536))
    table = CountingTable(TIMEOUTS, fw, now=T0)
    for i in range(5000):
        assert isinstance(table.open(UDP, C + i, 5000, S, 53, DNS, T0), Binding)
    table.checks = 0
    for second in range(1, TIMEOUTS.udp_idle):
        assert table.expire(T0 + second) == []
    assert table.checks == 0
    assert len(table.expire(T0 + TIMEOUTS.udp_idle)) == 5000
    assert table.checks == 5000


def test_expire_after_a_long_pause_and_a_clock_that_steps_back() -> None:
    table = make_table()
    a = table.open(UDP, C, 1, S, 53, DNS, T0)
    b = table.open(TCP, C, 2, S, 25, SMTP, T0)
    assert isinstance(a, Binding) and isinstance(b, Binding)
    table.seen(a, C2A, 0, T0 - 500)  # an older clock reading never moves time back
    assert a.last_seen == int(T0)
    assert sorted(table.expire(T0 + 10_000_000), key=id) == sorted([a, b], key=id)
    assert table.expire(T0) == []


def test_bindings_per_gateway_and_iteration() -> None:
    table = make_table()
    made = [table.open(TCP, C, p, S, 25, SMTP, T0) for p in range(3)]
    made += [table.open(UDP, C, p, S, 53, DNS, T0) for p in range(2)]
    assert table.per_gateway() == {"smtp": 3, "dns": 2}
    assert sorted(map(id, table)) == sorted(map(id, made))
    assert all(b in table for b in made)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "open_snat", "fin", "tick"]), st.integers(0, 40)), max_size=80))
def test_random_traffic_keeps_table_and_pools_in_step(ops: list[tuple[str, int]]) -> None:
    table = make_table(ports=range(3000, 3004), snat_ports=range(61000, 61010))
    now = T0
    for op, n in ops:
        if op.startswith("open"):
            table.open(TCP if n % 2 else UDP, C, 1000 + n, S, 25, SMTP, now, snat=op == "open_snat")
        elif op == "fin":
            hit = table.by_key(flow_key(TCP, C, 1000 + n, S, 25))
            if hit is not None:
                table.seen(hit, C2A, 0x05, now)  # FIN+RST from the client
                table.seen(hit, A2C, 0x01, now)
        else:
            now += n
            table.expire(now)
        live = list(table)
        assert len(live) == len(table) == len(table._fw_pool)
        assert sum(b.snat for b in live) == len(table._snat_pool)  # type: ignore[arg-type]
        for b in live:
            assert table.by_key(b.client_key) is b and table.by_key(b.server_key) is b and table.by_key(b.fw) is b
    table.expire(now + 10_000)
    assert len(table) == len(table._fw_pool) == len(table._snat_pool) == 0  # type: ignore[arg-type]
