"""firewall.flows: playbooks of bindings through the table the processor keeps.

The kernel carries every packet of a gateway flow (datapath v2); the table
only has to say, for a connection's first packet, which NAT its leg gets
(``Binding.leg_a`` / ``leg_b``: original tuple, DNAT target, SNAT source), find
the binding again by any of its keys, schedule each binding's one
confirmation check, and give its pool entries back when it goes. Each test
states what goes in (``open``, ``learn_ag_port``, times) and what comes out
(the legs' tuples, lookups, ``due``, the pools).
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.config.model import Timeouts
from firewall.flows import (
    AgEndpoint,
    Binding,
    FlowState,
    FlowTable,
    Refusal,
    flow_key,
    fw_key,
)
from firewall.packet import TCP, UDP
from firewall.pools import EndpointPool, SliceBy


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


C = ip("192.168.1.10")  # client
S = ip("203.0.113.25")  # server
W = ip("198.51.100.1")  # the router's wan address (masquerade, port forwards)
G = ip("172.31.255.2")  # the AG's address on the blind track
POOL = ipaddress.IPv4Network("172.31.254.0/28")
SMTP = AgEndpoint("smtp", G, 20025)
DNS = AgEndpoint("dns", G, 20053)
T0 = 1000.0
TIMEOUTS = Timeouts(confirm=5, nat_element=10)


def make_table(ports: range = range(1024, 65536), snat_ports: range = range(61000, 61100)) -> FlowTable:
    fw = EndpointPool(POOL, ports)
    snat = EndpointPool([ipaddress.IPv4Address(W)], snat_ports, slice_by=SliceBy.PORT)
    return FlowTable(TIMEOUTS, fw, snat, now=T0)


def opened(table: FlowTable, *args: object, **kwargs: object) -> Binding:
    b = table.open(*args, **kwargs)  # type: ignore[arg-type]
    assert isinstance(b, Binding), b
    return b


# ---- the legs a binding gives the kernel ------------------------------------------


def test_masqueraded_flow_legs_and_keys() -> None:
    table = make_table()
    b = opened(table, TCP, C, 40000, S, 25, SMTP, T0, snat=True)
    F, f = b.firewall_side
    w_addr, w = b.visible_client
    assert ipaddress.IPv4Address(F) in POOL and 1024 <= f <= 65535
    assert w_addr == W and 61000 <= w < 61100 and b.snat
    assert (b.proto, b.client, b.original_dst, b.server) == (TCP, (C, 40000), (S, 25), (S, 25))
    assert b.gateway is SMTP and b.ag_eport is None and b.state == FlowState.SNAT
    assert not b.ended

    # Leg A: C:40000 -> S:25 becomes F:f -> G:g.
    assert b.leg_a() == ((C, 40000, S, 25), (G, SMTP.port), (F, f))
    # No leg B before the AG connects to F:f.
    with pytest.raises(ValueError, match="no leg B yet"):
        b.leg_b()
    # Leg B: the AG's G:47001 -> F:f becomes W:w -> S:25 (the swap, through masquerade).
    table.learn_ag_port(b, 47001)
    assert b.ag_eport == 47001
    assert b.leg_b() == ((G, 47001, F, f), (S, 25), (W, w))

    # Every key finds this binding: leg A's original tuple, leg B's reply tuple, F:f.
    assert table.by_key(flow_key(TCP, C, 40000, S, 25)) is b
    assert table.by_key(flow_key(TCP, S, 25, W, w)) is b
    assert table.by_key(fw_key(TCP, F, f)) is b
    assert table.by_client(TCP, C, 40000, S, 25) is b
    assert table.by_client(TCP, S, 25, W, w) is None  # a server key is not a client tuple
    assert table.by_client(UDP, C, 40000, S, 25) is None
    assert table.by_firewall_side(TCP, F, f) is b
    assert table.by_firewall_side(UDP, F, f) is None
    assert table.count("smtp") == 1 and len(table) == 1 and b in table


def test_without_masquerade_the_server_sees_the_real_client() -> None:
    table = make_table()
    b = opened(table, TCP, C, 40000, S, 25, SMTP, T0)
    F, f = b.firewall_side
    assert not b.snat and b.visible_client == (C, 40000)
    table.learn_ag_port(b, 33333)
    assert b.leg_b() == ((G, 33333, F, f), (S, 25), (C, 40000))
    assert table.by_key(flow_key(TCP, S, 25, C, 40000)) is b
    assert len(table._snat_pool) == 0  # type: ignore[arg-type]


def test_port_forward_legs_go_to_the_real_server() -> None:
    table = make_table()
    client = ip("203.0.113.99")
    inside = ip("192.168.1.25")
    b = opened(table, TCP, client, 51000, W, 2525, SMTP, T0, server=(inside, 25))
    F, f = b.firewall_side
    assert b.leg_a() == ((client, 51000, W, 2525), (G, SMTP.port), (F, f))
    table.learn_ag_port(b, 40500)
    assert b.leg_b() == ((G, 40500, F, f), (inside, 25), (client, 51000))
    rec = b.record()
    assert rec["client"] == (ipaddress.IPv4Address(client), 51000)
    assert rec["original_dst"] == (ipaddress.IPv4Address(W), 2525)
    assert rec["server"] == (ipaddress.IPv4Address(inside), 25)
    assert rec["firewall_side"] == (ipaddress.IPv4Address(F), f)
    assert rec["ag"] == (ipaddress.IPv4Address(G), SMTP.port)
    assert rec["snat"] is None and rec["gateway"] == "smtp" and rec["ag_eport"] == 40500
    assert rec["proto"] == TCP and rec["created"] == int(T0)
    assert rec["state"] == FlowState.A_ALIVE  # leg B's arrival confirmed leg A


def test_udp_binding_legs() -> None:
    table = make_table()
    dns = ip("9.9.9.9")
    b = opened(table, UDP, C, 5353, dns, 53, DNS, T0, snat=True)
    F, f = b.firewall_side
    _, w = b.visible_client
    assert b.proto == UDP and b.leg_a() == ((C, 5353, dns, 53), (G, DNS.port), (F, f))
    table.learn_ag_port(b, 39000)
    assert b.leg_b() == ((G, 39000, F, f), (dns, 53), (W, w))
    assert table.by_firewall_side(UDP, F, f) is b and table.by_firewall_side(TCP, F, f) is None


def test_keys_of_the_two_kinds_never_collide() -> None:
    assert flow_key(TCP, 0, 0, 0, 0) >= 2**96 > 2**56 > fw_key(255, 0xFFFFFFFF, 0xFFFF)
    assert flow_key(TCP, C, 1, S, 2) != flow_key(TCP, S, 2, C, 1)
    assert flow_key(TCP, C, 1, S, 2) != flow_key(UDP, C, 1, S, 2)
    assert fw_key(TCP, G, 1) != fw_key(UDP, G, 1)


# ---- lifetime: which legs are gone ----------------------------------------------------


def test_ended_needs_leg_a_gone_and_leg_b_gone_or_never_started() -> None:
    table = make_table()
    b = opened(table, TCP, C, 40001, S, 25, SMTP, T0)
    b.state |= FlowState.A_GONE
    assert b.ended  # leg B never started
    c = opened(table, TCP, C, 40002, S, 25, SMTP, T0)
    table.learn_ag_port(c, 41000)
    c.state |= FlowState.B_GONE
    assert not c.ended  # leg A is still there
    c.state |= FlowState.A_GONE
    assert c.ended


def test_a_new_leg_b_starts_with_no_destroy_seen() -> None:
    table = make_table()
    b = opened(table, TCP, C, 40003, S, 25, SMTP, T0)
    table.learn_ag_port(b, 41000)
    b.state |= FlowState.B_GONE
    table.learn_ag_port(b, 41001)  # the AG retries leg B from a new port
    assert b.ag_eport == 41001 and not b.state & FlowState.B_GONE and b.state & FlowState.A_ALIVE
    assert b.leg_b()[0] == (G, 41001, *b.firewall_side)


# ---- the confirmation check -----------------------------------------------------------


def test_a_binding_is_due_for_its_check_confirm_seconds_after_it_opened() -> None:
    table = make_table()
    b = opened(table, TCP, C, 40010, S, 25, SMTP, T0)
    assert b.created == b.check_at - 5 == int(T0)
    for second in range(5):
        assert table.due(T0 + second) == []
    assert table.due(T0 + 5) == [b]
    assert table.due(T0 + 6) == [] and b in table  # due once; the caller decides
    table.confirmed(b)
    assert b.state & FlowState.A_ALIVE
    assert table.due(T0 + 100) == []


def test_confirmed_or_leg_b_takes_a_binding_out_of_the_wheel() -> None:
    table = make_table()
    a = opened(table, TCP, C, 40011, S, 25, SMTP, T0)
    b = opened(table, TCP, C, 40012, S, 25, SMTP, T0)
    c = opened(table, TCP, C, 40013, S, 25, SMTP, T0 + 0.5)  # the same whole second
    table.confirmed(a)
    table.learn_ag_port(b, 45000)  # leg B proves leg A
    assert table.due(T0 + 5) == [c]


def test_removed_bindings_are_never_due() -> None:
    table = make_table()
    a = opened(table, TCP, C, 40015, S, 25, SMTP, T0)
    b = opened(table, TCP, C, 40016, S, 25, SMTP, T0)
    assert table.remove(a)
    assert table.due(T0 + 5) == [b]


def test_due_after_a_long_pause_and_a_clock_that_steps_back() -> None:
    table = make_table()
    a = opened(table, UDP, C, 1, S, 53, DNS, T0)
    b = opened(table, TCP, C, 2, S, 25, SMTP, T0 + 3)
    c = opened(table, TCP, C, 3, S, 25, SMTP, T0 - 500)  # an older clock reading never moves time back
    assert c.created == int(T0) + 3
    assert sorted(table.due(T0 + 10_000_000), key=id) == sorted([a, b, c], key=id)
    assert table.due(T0) == []
    # A binding opened now, with the clock far ahead, is checked 5 s after that.
    d = opened(table, TCP, C, 4, S, 25, SMTP, T0 + 10_000_000)
    assert table.due(T0 + 10_000_004) == [] and table.due(T0 + 10_000_005) == [d]


def test_due_looks_only_at_buckets_that_are_due() -> None:
    fw = EndpointPool(POOL, range(1024, 65536))
    table = FlowTable(TIMEOUTS, fw, now=T0)
    # The clock never goes back, so open them in order: 1667 at T0, 1667 at T0+1, 1666 at T0+2.
    made = [opened(table, UDP, C + i, 5000, S, 53, DNS, T0 + second) for second in range(3) for i in range(second, 5000, 3)]
    assert sorted(table._wheel) == [int(T0) + 5, int(T0) + 6, int(T0) + 7]  # one bucket per second, not per binding
    for second in range(5):
        assert table.due(T0 + second) == []
    assert len(table.due(T0 + 5)) == 1667
    assert len(table.due(T0 + 7)) == 3333
    assert table._wheel == {} and len(table) == len(made)


@pytest.mark.parametrize("confirm", [0, -3])
def test_a_confirm_timeout_below_one_second_is_refused(confirm: float) -> None:
    fw = EndpointPool(POOL, range(2000, 2010))
    with pytest.raises(ValueError, match="at least 1 second"):
        FlowTable(Timeouts.model_construct(confirm=confirm), fw, now=T0)  # past the config's bounds


def test_a_fractional_confirm_timeout_rounds_up() -> None:
    fw = EndpointPool(POOL, range(2000, 2010))
    table = FlowTable(Timeouts(confirm=2.5), fw, now=T0)
    b = opened(table, TCP, C, 1, S, 25, SMTP, T0)
    assert table.due(T0 + 2) == [] and table.due(T0 + 3) == [b]


# ---- refusals -------------------------------------------------------------------------


def test_refusals_leave_the_pools_as_they_were() -> None:
    table = make_table(ports=range(2000, 2001), snat_ports=range(61000, 61001))  # 16 F:f, 1 W:w
    opened(table, TCP, C, 1, S, 25, SMTP, T0, snat=True)
    assert table.open(TCP, C, 1, S, 25, SMTP, T0) is Refusal.EXISTS
    assert table.open(TCP, C, 2, S, 25, SMTP, T0, snat=True) is Refusal.SNAT_POOL_EXHAUSTED
    assert len(table._fw_pool) == 1
    for port in range(2, 17):
        opened(table, TCP, C, port, S, 25, SMTP, T0)
    assert table.open(TCP, C, 99, S, 25, SMTP, T0) is Refusal.FW_POOL_EXHAUSTED
    assert len(table) == 16


def test_two_forwards_onto_one_server_tuple_conflict() -> None:
    table = make_table()
    inside = ip("192.168.1.25")
    opened(table, TCP, C, 7000, W, 2525, SMTP, T0, server=(inside, 25))
    assert table.open(TCP, C, 7000, W, 2526, SMTP, T0, server=(inside, 25)) is Refusal.CONFLICT
    assert len(table._fw_pool) == 1 and len(table) == 1
    # With SNAT the server-side tuples differ, so both can exist.
    opened(table, TCP, C, 7000, W, 2526, SMTP, T0, server=(inside, 25), snat=True)
    assert len(table._snat_pool) == 1  # type: ignore[arg-type]


def test_a_client_tuple_that_is_another_flows_server_tuple_conflicts() -> None:
    table = make_table()
    opened(table, TCP, C, 7001, S, 25, SMTP, T0)
    # S:25 -> C:7001 is what the first flow's server sends: it cannot open a flow.
    assert table.open(TCP, S, 25, C, 7001, SMTP, T0) is Refusal.CONFLICT
    assert len(table._fw_pool) == 1


def test_a_refused_snat_conflict_gives_both_endpoints_back() -> None:
    table = make_table()
    # A flow S:25 -> W:61000 holds the key that the next SNATed flow to S:25 would get as its
    # server key (W:61000 is the SNAT pool's first endpoint): refused after both allocations.
    opened(table, TCP, S, 25, W, 61000, SMTP, T0)
    assert table.open(TCP, C, 7002, S, 25, SMTP, T0, snat=True) is Refusal.CONFLICT
    assert len(table) == 1 and len(table._fw_pool) == 1 and len(table._snat_pool) == 0  # type: ignore[arg-type]
    assert table.by_client(TCP, C, 7002, S, 25) is None


def test_snat_needs_a_snat_pool() -> None:
    fw = EndpointPool(POOL, range(2000, 2010))
    table = FlowTable(TIMEOUTS, fw, now=T0)
    with pytest.raises(ValueError):
        table.open(TCP, C, 1, S, 25, SMTP, T0, snat=True)


def test_remove_is_idempotent_and_create_refuses_taken_keys() -> None:
    table = make_table()
    b = opened(table, TCP, C, 1, S, 25, SMTP, T0, snat=True)
    F, f = b.firewall_side
    clone = Binding(b.client_key, flow_key(TCP, S, 25, C, 9), fw_key(TCP, 1, 1), SMTP, 0, 0)
    assert not table.create(clone)
    assert table.remove(b) and not table.remove(b)
    assert len(table) == 0 and table.per_gateway() == {}
    assert not table._fw_pool.in_use(F, f) and len(table._snat_pool) == 0  # type: ignore[arg-type]
    assert table.by_firewall_side(TCP, F, f) is None and table.by_client(TCP, C, 1, S, 25) is None
    with pytest.raises(ValueError, match="already in a flow table"):
        other = opened(table, TCP, C, 2, S, 25, SMTP, T0)
        table.create(other)


# ---- after a restart: claim -------------------------------------------------------------


def adopted(proto: int, client: tuple[int, int], dst: tuple[int, int], server: tuple[int, int],
            seen_as: tuple[int, int], fw: tuple[int, int], gw: AgEndpoint, eport: int | None) -> Binding:
    """A binding as the processor rebuilds it from conntrack."""
    state = FlowState.A_ALIVE | (FlowState.SNAT if seen_as != client else 0)
    return Binding(flow_key(proto, *client, *dst), flow_key(proto, *server, *seen_as), fw_key(proto, *fw),
                   gw, int(T0), int(T0), eport, int(state))


def test_claim_takes_pool_entries_so_new_flows_never_get_them() -> None:
    table = make_table(ports=range(2000, 2002), snat_ports=range(61000, 61002))  # 32 F:f, 2 W:w
    F0 = int(POOL.network_address)
    b = adopted(TCP, (C, 40000), (S, 25), (S, 25), (W, 61000), (F0, 2000), SMTP, 47000)
    table._snat_pool.claim(W, 61000)  # type: ignore[union-attr]  # the caller's part (core.adopt)
    assert table.claim(b)
    assert table._fw_pool.in_use(F0, 2000) and table._snat_pool.in_use(W, 61000)  # type: ignore[union-attr]
    assert table.by_client(TCP, C, 40000, S, 25) is b and table.by_firewall_side(TCP, F0, 2000) is b
    assert table.due(T0 + 1000) == []  # alive in conntrack: nothing to check
    # Every other endpoint, and never the claimed ones.
    made = [opened(table, TCP, C, p, S, 25, SMTP, T0) for p in range(1, 32)]
    assert (F0, 2000) not in {m.firewall_side for m in made}
    assert table.open(TCP, C, 99, S, 25, SMTP, T0) is Refusal.FW_POOL_EXHAUSTED
    assert table.remove(made[0])
    assert opened(table, TCP, C, 100, S, 25, SMTP, T0, snat=True).visible_client == (W, 61001)
    # Removing the claimed binding gives its entries back like any other.
    assert table.remove(b) and not table._fw_pool.in_use(F0, 2000)
    assert not table._snat_pool.in_use(W, 61000)  # type: ignore[union-attr]


def test_claim_refuses_what_is_taken_or_not_ours() -> None:
    table = make_table()
    b = opened(table, TCP, C, 1, S, 25, SMTP, T0)
    F, f = b.firewall_side
    # Its F:f is in use.
    assert not table.claim(adopted(TCP, (C, 2), (S, 25), (S, 25), (C, 2), (F, f), SMTP, None))
    # An F:f outside the pool (another instance's slice).
    assert not table.claim(adopted(TCP, (C, 3), (S, 25), (S, 25), (C, 3), (ip("172.31.254.200"), 3000), SMTP, None))
    F0 = int(POOL.network_address) + 5
    # Its keys are taken: the client tuple has a binding.
    assert not table.claim(adopted(TCP, (C, 1), (S, 25), (S, 25), (C, 1), (F0, 3001), SMTP, None))
    assert not table._fw_pool.in_use(F0, 3000) and not table._fw_pool.in_use(F0, 3001)
    assert len(table) == 1 and len(table._fw_pool) == 1 and len(table._snat_pool) == 0  # type: ignore[arg-type]


# ---- counts -------------------------------------------------------------------------------


def test_bindings_per_gateway_and_iteration() -> None:
    table = make_table()
    made = [opened(table, TCP, C, p, S, 25, SMTP, T0) for p in range(3)]
    made += [opened(table, UDP, C, p, S, 53, DNS, T0) for p in range(2)]
    assert table.per_gateway() == {"smtp": 3, "dns": 2}
    assert sorted(map(id, table)) == sorted(map(id, made))
    assert all(b in table for b in made)
    table.remove(made[3])
    table.remove(made[4])
    assert table.per_gateway() == {"smtp": 3} and table.count("dns") == 0


# ---- many flows at once ------------------------------------------------------------------


def test_200_concurrent_flows_have_unique_legs() -> None:
    table = make_table()
    rng = random.Random(4)
    clients = [ip(f"192.168.1.{i}") for i in range(10, 30)]
    servers = [ip(f"203.0.113.{i}") for i in range(1, 6)]
    flows = []
    for i in range(200):
        proto = TCP if i % 3 else UDP
        c, cp, s = clients[i % 20], 30000 + i, servers[i % 5]
        gw = SMTP if proto == TCP else DNS
        b = opened(table, proto, c, cp, s, 25, gw, T0, snat=i % 2 == 0)
        table.learn_ag_port(b, 50000 + i)
        flows.append((b, proto, c, cp, s, gw))
    assert len({b.firewall_side for b, *_ in flows}) == 200
    assert table.count("smtp") + table.count("dns") == 200
    # What the AG sees (leg A's translation) and what the servers see (leg B's) are unique.
    assert len({(b.proto, *b.leg_a()[2], *b.leg_a()[1]) for b, *_ in flows}) == 200
    assert len({(b.proto, *b.leg_b()[2], *b.leg_b()[1]) for b, *_ in flows}) == 200
    rng.shuffle(flows)
    for b, proto, c, cp, s, gw in flows:
        F, f = b.firewall_side
        assert table.by_client(proto, c, cp, s, 25) is b
        assert table.by_firewall_side(proto, F, f) is b
        assert b.leg_a() == ((c, cp, s, 25), (G, gw.port), (F, f))
        assert b.leg_b() == ((G, b.ag_eport, F, f), (s, 25), b.visible_client)
    for b, *_ in flows:
        assert table.remove(b)
    assert len(table) == 0 and len(table._fw_pool) == 0 and len(table._snat_pool) == 0  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "open_snat", "leg_b", "confirm", "remove", "tick"]), st.integers(0, 40)),
                max_size=80))
def test_random_bindings_keep_table_and_pools_in_step(ops: list[tuple[str, int]]) -> None:
    table = make_table(ports=range(3000, 3004), snat_ports=range(61000, 61010))
    now = T0
    for op, n in ops:
        hit = table.by_client(TCP if n % 2 else UDP, C, 1000 + n, S, 25)
        if op.startswith("open"):
            got = table.open(TCP if n % 2 else UDP, C, 1000 + n, S, 25, SMTP, now, snat=op == "open_snat")
            assert isinstance(got, (Binding, Refusal))
        elif hit is None:
            pass
        elif op == "leg_b":
            table.learn_ag_port(hit, 40000 + n)
        elif op == "confirm":
            table.confirmed(hit)
        elif op == "remove":
            assert table.remove(hit)
        else:
            now += n
            for b in table.due(now):
                assert b in table and not b.state & FlowState.A_ALIVE and b.ag_eport is None
                table.remove(b)
        live = list(table)
        assert len(live) == len(table) == len(table._fw_pool)
        assert sum(b.snat for b in live) == len(table._snat_pool)  # type: ignore[arg-type]
        for b in live:
            assert table.by_key(b.client_key) is b and table.by_key(b.server_key) is b and table.by_key(b.fw) is b
    for b in list(table):
        table.remove(b)
    assert len(table) == len(table._fw_pool) == len(table._snat_pool) == 0  # type: ignore[arg-type]
