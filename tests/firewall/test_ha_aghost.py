"""The gateways on their own host (docs/ha.md, "The AG host"): each node's half of the pool, its
address on the link, the manifest's nodes, the gateway layer's routing to the node that owns a flow,
which processes each side starts, and the takeover of the peer's bindings by a new master."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from firewall import config, gwlink, manifests, supervisor
from firewall.cli import main
from firewall.rules import build, nft
from firewall.processor.core import ProcessorCore
from firewall.processor.kernel import Connection
from firewall.signalling import (
    Counters, Encoder, Endpoint, FlowEnd, FlowEndReason, FlowInfo, Guard, NewFlow, Proto, Role, RuleAck, RuleEnd,
    RuleEndReason, RuleMode, first_serial, flow_id_node, flow_id_queue, make_flow_id,
)
from gateways.layer import ProcessorInstances, flow_key
from gateways.layer.core import LayerCore
from gateways.layer.outputs import EndCause, FlowGone, RuleAnswered, RuleGone
from tests.firewall.test_ha import BASE

IP = ipaddress.IPv4Address
KEY = bytes(32)
T0 = 1_700_000_000.0

AG = BASE.replace('wan = "203.0.113.2" }}', 'wan = "203.0.113.2", gateway_link = "172.31.253.2" }}').replace(
    'wan = "203.0.113.3" }}', 'wan = "203.0.113.3", gateway_link = "172.31.253.3" }}') + """
[ha.virtual.gateway_link]
address = "172.31.253.1/24"
vrid = 53
[gateway_link]
mode = "host"
router_if = "ag0"
gateway_address = "172.31.253.10/24"
[processor]
queues = [3, 7]
[[gateway]]
name = "relay"
kind = "tcp-relay"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8081
"""


def load(tmp: Path, text: str = AG) -> config.Config:
    return config.loads(text.format(tmp=tmp))


def problems(tmp: Path, old: str, new: str) -> list[str]:
    text = AG.replace(old, new, 1)
    assert text != AG
    with pytest.raises(config.ConfigError) as info:
        load(tmp, text)
    return [f"{p.path}: {p.reason}" for p in info.value.problems]


def test_each_node_owns_half_of_the_pool_and_its_own_address_on_the_link(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    r1, r2 = cfg.for_node("r1"), cfg.for_node("r2")
    assert (cfg.own_pool, r1.own_pool, r2.own_pool) == tuple(
        ipaddress.IPv4Network(n) for n in ("172.31.254.0/28", "172.31.254.0/29", "172.31.254.8/29"))
    assert (r1.node_index, r2.node_index) == (0, 1)
    assert r1.gateway_link.router_address == ipaddress.IPv4Interface("172.31.253.2/24")
    assert r2.gateway_link.router_address == ipaddress.IPv4Interface("172.31.253.3/24")
    # The order is by name, whatever the file's: both nodes agree.
    swapped = AG.replace("[ha.nodes.r1]", "[ha.nodes.rx]").replace("[ha.nodes.r2]", "[ha.nodes.r1]").replace("[ha.nodes.rx]", "[ha.nodes.r2]")
    assert load(tmp_path, swapped).for_node("r1").own_pool == r1.own_pool
    # No gateway takes IPv6 over the AG host's link.
    assert not any(g.takes_ipv6(t) for g in cfg.gateways for t in g.traffic)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('[ha.virtual.gateway_link]\naddress = "172.31.253.1/24"\nvrid = 53\n', "",
     "ha.virtual: gateway_link.mode = \"host\" with [ha] needs [ha.virtual.gateway_link]"),
    ('gateway_address = "172.31.253.10/24"', 'gateway_address = "10.1.1.10/24"',
     "gateway_link.gateway_address: 10.1.1.10 is not in ha.virtual.gateway_link's 172.31.253.0/24"),
    ("queues = [3, 7]", "queues = [3, 7]\n[processor.pools]\nfirewall_side = \"172.31.254.0/31\"",
     "processor.pools.firewall_side: with [ha] each node owns half of the pool: it needs at least 4 addresses"),
])
def test_each_mistake_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    found = problems(tmp_path, old, new)
    assert any(expected in p for p in found), found


def test_without_ha_the_router_address_is_on_the_ag_hosts_subnet(tmp_path: Path) -> None:
    text = AG[AG.index("[gateway_link]"):].replace('router_if = "ag0"', 'router_if = "ag0"\nrouter_address = "10.1.1.1/24"')
    text = '[zones.lan]\ninterfaces = ["lan0"]\n[zones.wan]\ninterfaces = ["wan0"]\n' + text
    with pytest.raises(config.ConfigError, match="must be in the same subnet as router_address"):
        config.loads(text)
    ok = config.loads(text.replace("10.1.1.1/24", "172.31.253.1/24"))
    assert ok.own_pool == ok.processor.pools.firewall_side and ok.node_index == 0


def test_the_manifest_lists_both_nodes_with_their_slices(tmp_path: Path) -> None:
    m = manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0])
    assert m.version == 3 and m.netns is None and m.listen.address == IP("172.31.253.10")
    assert m.processor.pool == ipaddress.IPv4Network("172.31.254.0/28")
    assert [(n.name, n.address) for n in m.processor.nodes] == [("r1", IP("172.31.253.2")), ("r2", IP("172.31.253.3"))]
    slices = [[str(s) for i in n.instances for s in i.slices] for n in m.processor.nodes]
    assert slices == [["172.31.254.0/30", "172.31.254.4/30"], ["172.31.254.8/30", "172.31.254.12/30"]]
    assert [[(i.queue, i.port) for i in n.instances] for n in m.processor.nodes] == [[(3, 7500), (7, 7501)]] * 2


def flow(f: str, queue: int, node: int, fport: int = 1024) -> FlowInfo:
    return FlowInfo(
        flow_id=make_flow_id(queue, first_serial(node)), proto=Proto.TCP, gateway="relay",
        client=Endpoint(IP("203.0.113.10"), 40000), original_dst=Endpoint(IP("203.0.113.1"), 8081),
        server=Endpoint(IP("192.168.1.10"), 80), firewall_side=Endpoint(IP(f), fport),
        ag=Endpoint(IP("172.31.253.10"), 20000))


def test_the_layer_asks_the_node_that_owns_f_and_sends_rules_to_the_node_in_the_flow_id(tmp_path: Path) -> None:
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    assert len(inst) == 4
    assert inst.for_firewall_side(IP("172.31.254.5")) == Endpoint(IP("172.31.253.2"), 7501)
    assert inst.for_firewall_side(IP("172.31.254.9")) == Endpoint(IP("172.31.253.3"), 7500)
    assert inst.for_flow(flow("172.31.254.13", 7, 1)) == Endpoint(IP("172.31.253.3"), 7501)
    assert inst.for_flow(flow("172.31.254.1", 3, 0)) == Endpoint(IP("172.31.253.2"), 7500)


def test_flow_ids_of_the_two_nodes_never_collide() -> None:
    a, b = make_flow_id(3, first_serial(0)), make_flow_id(3, first_serial(1))
    assert a != b and (flow_id_queue(a), flow_id_node(a)) == (3, 0) and (flow_id_queue(b), flow_id_node(b)) == (3, 1)


def test_two_nodes_on_the_same_queue_are_two_instances_to_the_layer(tmp_path: Path) -> None:
    """Pushes of r1's and r2's queue 3 come from two senders: neither is taken for a restart of the
    other (which would end the other's flows)."""
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    c = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    r1, r2 = Encoder(KEY, Role.PROCESSOR, sender_id=1), Encoder(KEY, Role.PROCESSOR, sender_id=2)
    f1, f2 = flow("172.31.254.1", 3, 0), flow("172.31.254.9", 3, 1)
    for enc, f in ((r1, f1), (r2, f2)):
        for d in enc.encode_copies(NewFlow(f), T0, 1):
            c.receive(d, T0)
    assert c.claim(f1) and c.claim(f2)
    assert c.known(flow_key(f1)) == f1 and c.known(flow_key(f2)) == f2
    assert c.counters["instances.restarted"] == 0
    c.receive(r2.encode(FlowEnd(f2.flow_id, FlowEndReason.FIN), T0 + 0.1), T0 + 0.1)
    assert c.known(flow_key(f1)) == f1 and c.known(flow_key(f2)) is None


def test_the_steering_takes_the_nodes_half_and_drops_the_peers(tmp_path: Path) -> None:
    text = nft.render(build(load(tmp_path).for_node("r2")))
    assert 'iifname "ag0" ip daddr 172.31.254.8/29 counter jump steer_pool' in text, text
    assert 'iifname "ag0" ip daddr 172.31.254.0/28 counter drop' in text
    assert 'iifname "ag0" ip daddr 172.31.253.3 udp dport { 7500-7501 } counter accept' in text or \
        'iifname "ag0" ip daddr 172.31.253.3 udp dport 7500-7501 counter accept' in text, text
    whole = nft.render(build(load(tmp_path)))
    assert "172.31.254.0/28 counter jump steer_pool" in whole and "172.31.254.0/28 counter drop" not in whole


def test_a_router_starts_no_gateway_and_the_ag_host_starts_them_outside_any_namespace(tmp_path: Path, monkeypatch) -> None:
    cfg = load(tmp_path)
    monkeypatch.setattr(supervisor, "local_node", lambda c: "r2")
    router = supervisor.children_for(cfg, "x.toml")
    assert [c.name for c in router] == ["conntrackd", "keepalived", "processor-3", "processor-7"]
    assert router[2].argv[-2:] == ["--node", "r2"]
    host = supervisor.children_for(cfg, "x.toml", supervisor.GATEWAYS)
    assert [c.name for c in host] == ["gateway-relay"] and host[0].argv[:3] != ["ip", "netns", "exec"]
    assert "gateways" in host[0].argv


def test_rules_shows_a_nodes_ruleset_and_gateways_refuses_a_namespace_link(tmp_path: Path) -> None:
    path = tmp_path / "nfgate.toml"
    path.write_text(AG.format(tmp=tmp_path))
    out = CliRunner().invoke(main, ["rules", "-c", str(path), "--node", "r1"])
    assert out.exit_code == 0 and "172.31.254.0/29 counter jump steer_pool" in out.output, out.output
    out = CliRunner().invoke(main, ["rules", "-c", str(path), "--node", "r3"])
    assert out.exit_code == 2 and "--node r3: [ha] has nodes r1, r2" in out.output
    # This host is neither node: the review shows the pair's whole pool.
    out = CliRunner().invoke(main, ["rules", "-c", str(path)])
    assert out.exit_code == 0 and "172.31.254.0/28 counter jump steer_pool" in out.output, out.output
    path.write_text(AG.format(tmp=tmp_path).replace('mode = "host"\n', "").replace('gateway_address = "172.31.253.10/24"', ""))
    out = CliRunner().invoke(main, ["gateways", "-c", str(path)])
    assert out.exit_code == 2 and 'gateway_link.mode is "namespace"' in out.output, out.output


@pytest.mark.parametrize("key, host, warned", [
    ("monotonic", "1", True), ("monotonic", "2", False), ("random", "1", False), ("random", "2", True)])
def test_the_ag_host_is_warned_when_its_tcp_timestamps_differ_from_the_key_and_never_changed(
        tmp_path: Path, monkeypatch, key: str, host: str, warned: bool) -> None:
    link = load(tmp_path).gateway_link.model_copy(update={"tcp_timestamps": key})
    calls = []

    def sysctl(netns, name, value=None):
        calls.append((netns, name, value))
        return host

    monkeypatch.setattr(gwlink.namespaces, "sysctl", sysctl)
    warning = gwlink.host_timestamps_warning(link)
    assert calls == [(None, "net.ipv4.tcp_timestamps", None)]  # read, never written
    if warned:
        want = gwlink.TCP_TIMESTAMPS[key]
        assert warning is not None and f"net.ipv4.tcp_timestamps is {host} on this host" in warning
        assert f"sysctl -w net.ipv4.tcp_timestamps={want}" in warning
    else:
        assert warning is None


def test_check_names_the_ag_host_and_each_nodes_half(tmp_path: Path) -> None:
    path = tmp_path / "nfgate.toml"
    path.write_text(AG.format(tmp=tmp_path))
    out = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert out.exit_code == 0, out.output
    assert "gateways on their own host 172.31.253.10 over ag0 (nfgate gateways there)" in out.output
    assert "firewall-side pool by node: r1 172.31.254.0/29, r2 172.31.254.8/29" in out.output
    assert "(the gateways' own host takes IPv4 only)" in out.output


# ---- takeover: the master adopts the peer's bindings and the gateways move their flows to it ------------

C, V, S, AGH = "203.0.113.10", "203.0.113.1", "192.168.1.10", "172.31.253.10"


def ints(t: tuple[str, int, str, int]) -> tuple[int, int, int, int]:
    return int(IP(t[0])), t[1], int(IP(t[2])), t[3]


def carried(f: str, sport: int = 40000, eport: int = 51000) -> list[Connection]:
    """Both legs of a relayed flow bound at F:1024 (leg A answered by the relay's G:g, leg B from G:e)."""
    return [Connection(6, ints((C, sport, V, 8081)), ints((AGH, 20000, f, 1024)), Counters(0, 0)),
            Connection(6, ints((AGH, eport, f, 1024)), ints((S, 80, C, sport)), Counters(0, 0))]


def node_core(tmp: Path, node: str, alive: set[tuple[int, ...]] | None = None) -> ProcessorCore:
    """Node ``node``'s instance 0; ``alive``: conntrack's original tuples (proto first)."""
    cfg = load(tmp).for_node(node)
    return ProcessorCore(cfg, 0, Encoder(KEY, Role.PROCESSOR, sender_id=7), Guard(KEY, Role.PROCESSOR, now=T0 - 1),
                         route=lambda dst: None, ifname=lambda i: None, local_addresses=lambda: [],
                         conntrack=lambda *t: alive is None or t in alive, now=100.0, wall=T0)


def test_a_new_master_takes_over_the_peers_bindings_and_the_gateway_moves_its_flows(tmp_path: Path) -> None:
    """docs/ha.md, "Takeover": r2 (master now) adopts r1's relayed flow from the copied conntrack
    entries and pushes it under r2's flow id; the gateway, which knew it from r1, keeps the
    connection's claim and sends its rule requests to r2 under the new id. r2 ends it without a
    FLOW_END when it steps back, and takes it over again (its F:f claimed once more) later."""
    legs = carried("172.31.254.1")  # r1's half, r1's queue 3 slice: r2's instance 0 takes it over
    alive = {(6, *c.orig) for c in legs}
    r2 = node_core(tmp_path, "r2", alive)
    assert r2.adopt(legs, 100.0) == 0  # a start adopts its own half only
    assert r2.adopt(legs, 100.0, takeover=True) == 1
    pools = r2.stats()["pools"]
    assert r2.counters["flows.taken_over"] == 1 and pools["firewall_side"]["used"] == 0
    assert pools["firewall_side_peer"]["used"] == 1
    pushes = r2.take().datagrams  # signalling.copies of one NEW_FLOW, to the relay on the AG host
    assert pushes and {to[0] for _, to in pushes} == {AGH}
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    layer = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    old = flow("172.31.254.1", 3, 0)
    for d in Encoder(KEY, Role.PROCESSOR, sender_id=1).encode_copies(NewFlow(old), T0, 1):
        layer.receive(d, T0)
    assert layer.claim(old)
    for push, _ in pushes:
        layer.receive(push, T0 + 0.1)
    moved = layer.known(flow_key(old))
    assert moved is not None and layer.counters["flows.moved"] == 1
    assert flow_id_node(moved.flow_id) == 1 and replace(moved, flow_id=old.flow_id) == old
    layer.release(old, T0 + 0.2)
    assert layer.claim(old)  # the connection holds it under its first id still
    _, out = layer.request_rule(old, Proto.TCP, Endpoint(IP(C), 0), Endpoint(IP(S), 2000), 30, RuleMode.ALLOW, True, T0 + 0.3)
    (send,) = out
    assert send.to == Endpoint(IP("172.31.253.3"), 7500)
    got = Guard(KEY, Role.PROCESSOR, now=T0 - 1).check(send.data, T0 + 0.3)
    assert got.message.flow_id == moved.flow_id
    # conntrackd replaces an entry with the peer's copy (destroyed, then created again): nothing ends.
    r2.conntrack_destroyed(6, legs[0].orig, legs[0].reply, 100.5)
    r2.tick(100.8, T0 + 0.8)
    assert len(r2.table) == 1  # not looked up again yet
    r2.tick(101.1, T0 + 1.1)
    assert len(r2.table) == 1 and r2.counters["conntrack.destroy_recreated"] == 1 and r2.take().datagrams == []
    # r2 steps back: its table is flushed, the binding goes without a FLOW_END, and its F:f back.
    r2.standby = True
    alive.clear()
    r2.conntrack_destroyed(6, legs[0].orig, legs[0].reply, 101.2)
    r2.conntrack_destroyed(6, legs[1].orig, legs[1].reply, 101.2)
    r2.tick(101.8, T0 + 1.8)
    assert r2.take().datagrams == [] and len(r2.table) == 0 and r2.stats()["pools"]["firewall_side_peer"]["used"] == 0
    assert r2.counters["signalling.held.flow_end_standby"] == 1
    # Master again later: the same F:f is taken over again (the pool let it go once).
    r2.standby = False
    assert r2.adopt(legs, 102.0, takeover=True) == 1 and len(r2.take().datagrams) == len(pushes)


def test_a_takeover_keeps_what_the_node_never_let_go_of_and_pushes_it_again(tmp_path: Path) -> None:
    """r1 took its own flow, kept its binding (in fault, its table was not flushed), and takes over
    again: the binding stays under its flow id, and the push under it moves the gateway's flow back."""
    r1 = node_core(tmp_path, "r1")
    legs = carried("172.31.254.1")
    assert r1.adopt(legs, 100.0) == 1  # its own half, at start
    fid = next(iter(r1.flows(100.0, 10)))["flow_id"]
    r1.take()
    assert r1.adopt(legs, 101.0, takeover=True) == 0 and r1.counters["conntrack.adopt_conflict"] == 0
    push = r1.take().datagrams[0][0]
    got = Guard(KEY, Role.GATEWAY, now=T0 - 1).check(push, T0)
    assert got.message.flow.flow_id == fid and len(r1.table) == 1


def test_a_node_that_lets_go_of_its_own_flow_and_takes_it_over_again_keeps_its_flow_id(tmp_path: Path) -> None:
    """r1 bound a flow (never moved), stepped back (its table flushed: the binding goes, without a
    FLOW_END) and is master again before r2 pushed the flow: it takes it over under the flow id it
    had, so the gateway sees the same flow again; under a new id it would take it for a new flow on
    the tuple and close the connection (seen in the lab with r2's processor stopped). What it let go
    of and did not find again is forgotten at the takeover."""
    legs = carried("172.31.254.1")
    alive = {(6, *c.orig) for c in legs}
    r1 = node_core(tmp_path, "r1", alive)
    assert r1.adopt(legs, 100.0) == 1  # its own half, at start
    fid = next(iter(r1.flows(100.0, 10)))["flow_id"]
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    layer = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    first = replace(flow("172.31.254.1", 3, 0), flow_id=fid)
    for d in Encoder(KEY, Role.PROCESSOR, sender_id=7).encode_copies(NewFlow(first), T0, 1):
        layer.receive(d, T0)
    assert layer.claim(first)
    r1.take()
    r1.standby = True
    alive.clear()
    for leg in legs:
        r1.conntrack_destroyed(6, leg.orig, leg.reply, 101.0)
    r1.tick(101.6, T0 + 1.6)
    assert len(r1.table) == 0 and r1.take().datagrams == [] and r1.counters["signalling.held.flow_end_standby"] == 1
    r1.standby = False
    alive.update((6, *c.orig) for c in legs)  # the resync brought the entries back
    assert r1.adopt(legs, 102.0, takeover=True) == 1
    pushes = r1.take().datagrams
    for push, _ in pushes:
        assert Guard(KEY, Role.GATEWAY, now=T0 - 1).check(push, T0 + 2).message.flow.flow_id == fid
        layer.receive(push, T0 + 2)
    assert "flows.replaced" not in layer.counters and layer.known(flow_key(first)) == first
    # Let go of again, and not found at the next takeover (it ended at the peer): forgotten.
    r1.standby = True
    alive.clear()
    for leg in legs:
        r1.conntrack_destroyed(6, leg.orig, leg.reply, 103.0)
    r1.tick(103.6, T0 + 3.6)
    r1.standby = False
    assert r1.adopt([], 104.0, takeover=True) == 0 and r1._let_go == {}


def test_a_node_that_takes_a_moved_flow_over_again_under_a_new_id_moves_it_and_closes_nothing(tmp_path: Path) -> None:
    """r2 took r1's flow over; r1 took it back, let go of it when it stepped back (its table flushed)
    and takes it over again under a new id of its own, with r2 never pushing in between (a flap, or
    r1's keepalived killed right after the failback): the gateway moves the flow, it does not close
    it (a replacement would open a new leg B that clashes with the live one)."""
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    layer = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    r1, r2 = Encoder(KEY, Role.PROCESSOR, sender_id=1), Encoder(KEY, Role.PROCESSOR, sender_id=2)
    first = flow("172.31.254.1", 3, 0)
    at_r2 = replace(first, flow_id=make_flow_id(3, first_serial(1) + 5))
    back = replace(first, flow_id=make_flow_id(3, first_serial(0) + 7))
    again = replace(first, flow_id=make_flow_id(3, first_serial(0) + 8))
    layer.receive(r1.encode(NewFlow(first), T0), T0)
    assert layer.claim(first)
    for t, enc, f in ((0.1, r2, at_r2), (0.2, r1, back), (0.3, r1, again)):
        assert layer.receive(enc.encode(NewFlow(f), T0 + t), T0 + t) == [], f
    assert layer.counters["flows.moved"] == 3 and "flows.replaced" not in layer.counters
    assert layer.counters["flows.moved.same_node"] == 1  # r1 → r1 again
    out = layer.receive(r1.encode(FlowEnd(again.flow_id, FlowEndReason.FIN), T0 + 0.4), T0 + 0.4)
    assert out == [FlowGone(again, EndCause.FIN, (first.flow_id, at_r2.flow_id, back.flow_id))]


def test_a_moved_flow_ends_for_the_connection_that_holds_it_under_its_first_id(tmp_path: Path) -> None:
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    layer = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    r1, r2 = Encoder(KEY, Role.PROCESSOR, sender_id=1), Encoder(KEY, Role.PROCESSOR, sender_id=2)
    old = flow("172.31.254.1", 3, 0)
    new = replace(old, flow_id=make_flow_id(3, first_serial(1) + 5))
    layer.receive(r1.encode(NewFlow(old), T0), T0)
    assert layer.claim(old)
    # A pending rule request follows the flow: its resend goes to r2, under the new id.
    request_id, (first,) = layer.request_rule(old, Proto.TCP, Endpoint(IP(C), 0), Endpoint(IP(S), 2000), 30,
                                              RuleMode.ALLOW, True, T0 + 0.1)
    assert first.to == Endpoint(IP("172.31.253.2"), 7500)
    assert layer.receive(r2.encode(NewFlow(new), T0 + 0.2), T0 + 0.2) == []  # moved: nothing closes
    (again,) = layer.tick(T0 + 0.7)
    assert again.to == Endpoint(IP("172.31.253.3"), 7500) and layer.counters["rules.moved"] == 1
    assert Guard(KEY, Role.PROCESSOR, now=T0 - 1).check(again.data, T0 + 0.7).message.flow_id == new.flow_id
    # r1's late FLOW_END (its old id) ends nothing; r2's does, for the holder of the old id.
    assert layer.receive(r1.encode(FlowEnd(old.flow_id, FlowEndReason.FIN), T0 + 0.8), T0 + 0.8) == []
    out = layer.receive(r2.encode(FlowEnd(new.flow_id, FlowEndReason.FIN), T0 + 0.9), T0 + 0.9)
    assert out == [FlowGone(new, EndCause.FIN, (old.flow_id,))]
    # Within one node, a new flow id for the tuple is a new binding: the old one is replaced (closed).
    a = replace(old, flow_id=make_flow_id(3, first_serial(0) + 9))
    b = replace(old, flow_id=make_flow_id(3, first_serial(0) + 10))
    layer.receive(r1.encode(NewFlow(a), T0 + 1.0), T0 + 1.0)
    assert layer.claim(a)
    assert layer.receive(r1.encode(NewFlow(b), T0 + 1.1), T0 + 1.1) == [FlowGone(a, EndCause.REPLACED)]


def test_the_rules_the_node_left_granted_end_when_the_flow_moves(tmp_path: Path) -> None:
    """The failed node sends no RULE_END: an rtp gateway waiting for one to ask its adjacent rule
    again would wait out the rule's ttl and grace. The move ends them at once."""
    inst = ProcessorInstances.from_spec(manifests.manifest_for(load(tmp_path), load(tmp_path).gateways[0]).processor)
    layer = LayerCore(KEY, inst, now=T0 - 1, gateway="relay", query_timeout=0.5, replay_window=5.0)
    r1, r2 = Encoder(KEY, Role.PROCESSOR, sender_id=1), Encoder(KEY, Role.PROCESSOR, sender_id=2)
    old = flow("172.31.254.1", 3, 0)
    new = replace(old, flow_id=make_flow_id(3, first_serial(1) + 5))
    layer.receive(r1.encode(NewFlow(old), T0), T0)
    assert layer.claim(old)
    request_id, _ = layer.request_rule(old, Proto.UDP, Endpoint(IP(C), 40001), Endpoint(IP(V), 5005), 30,
                                       RuleMode.REDIRECT, True, T0 + 0.1)
    (answered,) = layer.receive(r1.encode(RuleAck(request_id, 77, int((T0 + 30) * 1000)), T0 + 0.2), T0 + 0.2)
    assert isinstance(answered, RuleAnswered)
    out = layer.receive(r2.encode(NewFlow(new), T0 + 1.0), T0 + 1.0)
    assert out == [RuleGone(request_id, 77, RuleEndReason.EXPIRED)] and layer.counters["rules.left_behind"] == 1
    # Its late RULE_END (r1 came back) is unknown now, and nothing is forgotten twice.
    assert layer.receive(r1.encode(RuleEnd(77, RuleEndReason.EXPIRED), T0 + 1.1), T0 + 1.1) == []
    assert layer.tick(T0 + 40) == [] and layer.counters["rules.forgotten"] == 0
