"""The gateways on their own host (docs/ha.md, "The AG host"): each node's half of the pool, its
address on the link, the manifest's nodes, the gateway layer's routing to the node that owns a flow,
and which processes each side starts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner

from firewall import config, manifests, supervisor
from firewall.cli import main
from firewall.rules import build, nft
from firewall.signalling import (
    Encoder, Endpoint, FlowEnd, FlowEndReason, FlowInfo, NewFlow, Proto, Role, first_serial, flow_id_node, flow_id_queue,
    make_flow_id,
)
from gateways.layer import ProcessorInstances, flow_key
from gateways.layer.core import LayerCore
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


def test_check_names_the_ag_host_and_each_nodes_half(tmp_path: Path) -> None:
    path = tmp_path / "nfgate.toml"
    path.write_text(AG.format(tmp=tmp_path))
    out = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert out.exit_code == 0, out.output
    assert "gateways on their own host 172.31.253.10 over ag0 (nfgate gateways there)" in out.output
    assert "firewall-side pool by node: r1 172.31.254.0/29, r2 172.31.254.8/29" in out.output
    assert "(the gateways' own host takes IPv4 only)" in out.output
