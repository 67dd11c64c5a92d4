"""Topology files: the shipped ones load, and every mistake is reported with its key path."""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Address, IPv4Interface, ip_address, ip_interface, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.errors import UsageError
from firewall.lab.topology import (
    REPO,
    Topology,
    TopologyError,
    list_topologies,
    load_topology,
    parse_topology,
    resolve,
    topologies_dir,
)


def basic_doc() -> dict:
    return json.loads((REPO / "vagrant" / "topologies" / "basic.json").read_text())


def problems_of(doc: object) -> list[str]:
    with pytest.raises(TopologyError) as info:
        parse_topology(doc, default_name="t")
    return info.value.problems


def test_shipped_topologies_are_listed_and_load():
    names = list_topologies()
    assert {"basic", "dual", "nat-tunnel"} <= set(names)
    for name in names:
        topo = load_topology(name)
        assert isinstance(topo, Topology)
        assert topo.name == name
        assert topo.router in topo.host_names


def test_basic_has_the_documented_shape():
    topo = load_topology("basic")
    assert topo.host_names == ("ext", "router", "lan")
    assert topo.router == "router"
    assert topo.config == "examples/lab/basic.toml"  # what the Vagrant router applies, as scripts/demo does
    assert topo.host("router").forwarding is True
    assert topo.host("ext").forwarding is False
    assert topo.address("ext") == IPv4Interface("203.0.113.10/24")
    assert topo.address("router", "wan0") == IPv4Interface("203.0.113.1/24")
    assert topo.address("router", "lan0") == IPv4Interface("192.168.1.1/24")
    assert topo.address("lan", "eth0").ip == IPv4Address("192.168.1.10")
    (route,) = topo.routes_of("lan")
    assert route.is_default and route.via == IPv4Address("192.168.1.1")
    # NAT tests rely on ext knowing nothing of the LAN.
    assert topo.routes_of("ext") == ()
    lan_net = ip_network("192.168.1.0/24")
    assert not any(a.network.overlaps(lan_net) for ep in topo.endpoints("ext") for a in ep.addresses)


def test_dual_is_basic_with_ipv6_beside_ipv4_on_every_link():
    basic, dual = load_topology("basic"), load_topology("dual")
    assert dual.host_names == basic.host_names and dual.router == basic.router
    for b, d in zip(basic.links, dual.links):
        for eb, ed in zip(b.endpoints, d.endpoints):
            assert (ed.host, ed.ifname) == (eb.host, eb.ifname)
            assert [a for a in ed.addresses if a.version == 4] == list(eb.addresses)
            (six,) = [a for a in ed.addresses if a.version == 6]
            # Documentation prefix outside (RFC 3849), a ULA inside (RFC 4193).
            assert six.network.subnet_of(ip_network("2001:db8::/32")) or six.network.subnet_of(ip_network("fc00::/7"))
    assert dual.address("lan", version=6).network.subnet_of(ip_network("fc00::/7"))
    assert {r.via for r in dual.routes_of("lan")} == {IPv4Address("192.168.1.1"), ip_address("fd00:1::1")}
    # As in basic: ext has no route to either of the LAN's prefixes, only NAT gets there.
    assert dual.routes_of("ext") == ()


def test_nat_tunnel_has_a_masquerading_nat_with_short_timeouts():
    topo = load_topology("nat-tunnel")
    assert topo.router == "nat"
    nat = topo.host("nat")
    assert nat.forwarding
    assert dict(nat.sysctls) == {
        "net.netfilter.nf_conntrack_udp_timeout": "5",
        "net.netfilter.nf_conntrack_udp_timeout_stream": "5",
        "net.netfilter.nf_conntrack_tcp_timeout_established": "10",
    }
    (cmd,) = nat.commands
    assert cmd[0] == "nft" and "masquerade" in cmd[1] and '"wan0"' in cmd[1]
    assert topo.address("priv").ip == IPv4Address("10.77.0.10")
    assert topo.routes_of("pub") == ()
    # Dual-stack (issue 17): IPv6 beside IPv4 on both links, a ULA inside,
    # masqueraded for both families (an inet table).
    for link in topo.links:
        for ep in link.endpoints:
            assert sorted(a.version for a in ep.addresses) == [4, 6], ep
    assert topo.address("priv", version=6).network.subnet_of(ip_network("fc00::/7"))
    assert "inet labnat" in cmd[1]


def test_load_by_path_and_by_env_dir(tmp_path, monkeypatch):
    doc = basic_doc()
    doc.pop("name")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    topo = load_topology(str(path))
    assert topo.name == "mine"  # the file's stem when "name" is absent
    assert topo.source == path

    monkeypatch.setenv("NFGATE_TOPOLOGIES", str(tmp_path))
    assert topologies_dir() == tmp_path
    assert list_topologies() == ["mine"]
    assert load_topology("mine").host_names == ("ext", "router", "lan")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown topology 'nope' .*known: .*basic"):
        resolve("nope")
    with pytest.raises(UsageError, match="topology name"):
        resolve("Bad Name")


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"hosts": {}\n  "links": []}')
    with pytest.raises(TopologyError, match=r"broken.json: line 2 column 3: invalid JSON"):
        load_topology(path)


def test_unreadable_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read topology"):
        load_topology(tmp_path / "missing.json")


def _set(doc: dict, path: tuple, value: object) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()

# (where in basic.json, new value, the one problem expected)
MISTAKES = [
    (("links", 1, "a", "host"), "rtr", "links[1].a.host: unknown host 'rtr'"),
    (("links", 0, "a", "ifname"), "averyveryverylongname", "links[0].a.ifname: 'averyveryverylongname': use 1-15"),
    (("links", 0, "a", "ifname"), "lo", "links[0].a.ifname: 'lo'"),
    (("links", 0, "a", "ifname"), "eth0.100", "links[0].a.ifname: 'eth0.100'"),
    (("links", 1, "a", "ifname"), "wan0", "links[1].a.ifname: 'wan0' already used on host 'router' at links[0].b"),
    (("links", 0, "a", "addresses"), ["203.0.113.10"], "links[0].a.addresses[0]: '203.0.113.10': expected an address"),
    (("links", 0, "a", "addresses"), ["203.0.113.300/24"], "links[0].a.addresses[0]:"),
    (("links", 1, "b", "addresses"), ["192.168.1.10/24", "203.0.113.1/24"], "links[1].b.addresses[1]: 203.0.113.1 is already used at links[0].b"),
    (("links", 0, "a", "mtu"), 1400, "links[0].a.mtu: unknown key"),
    (("links", 0, "b"), _DELETE, "links[0].b: missing"),
    (("links", 0), {"a": {"host": "ext", "ifname": "x"}, "b": {"host": "ext", "ifname": "y"}}, "links[0]: both ends"),
    (("links",), {}, "links: expected a list"),
    (("hosts", "ext", "forwarding"), "yes", "hosts.ext.forwarding: expected true or false"),
    (("hosts", "ext", "sysctls"), {"kernel.panic": 1}, "hosts.ext.sysctls.kernel.panic: only net.* sysctls"),
    (("hosts", "ext", "sysctls"), {"net.ipv4.ip_forward": [1]}, "hosts.ext.sysctls.net.ipv4.ip_forward: expected"),
    (("hosts", "ext", "colour"), "red", "hosts.ext.colour: unknown key"),
    (("hosts",), {}, "hosts: no hosts"),
    (("router",), "gateway", "router: unknown host 'gateway'"),
    (("router",), _DELETE, "router: missing"),
    (("hostz",), {}, "hostz: unknown key"),
    (("name",), "Basic Topology", "name: 'Basic Topology'"),
    (("routes", 0, "via"), "10.1.1.1", "routes[0].via: 10.1.1.1 is not on any network of host 'lan'"),
    (("routes", 0), {"host": "lan", "to": "10.0.0.0/8", "via": "fd00::1"}, "routes[0].via: fd00::1 is IPv6 but 'to' is IPv4"),
    (("routes", 0, "via"), "gateway", "routes[0].via: 'gateway' is not an IP address"),
    (("routes", 0, "to"), "10.0.0.1/8", "routes[0].to: '10.0.0.1/8'"),
    (("routes", 0, "dev"), "eth9", "routes[0].dev: host 'lan' has no interface 'eth9'"),
    (("routes", 0, "host"), "ghost", "routes[0].host: unknown host 'ghost'"),
    (("routes", 0), {"host": "lan", "to": "default"}, "routes[0]: needs 'via', 'dev' or both"),
    (("commands",), {"ghost": ["true"]}, "commands.ghost: unknown host 'ghost'"),
    (("commands",), {"ext": "true"}, "commands.ext: expected a list of commands"),
    (("commands",), {"ext": [["true", 1]]}, "commands.ext[0]: expected a string or a list of strings"),
    (("commands",), {"ext": ["echo 'unterminated"]}, "commands.ext[0]: cannot split"),
    (("commands",), {"ext": [[]]}, "commands.ext[0]: empty command"),
    (("config",), "/etc/nfgate/nfgate.toml", "config: '/etc/nfgate/nfgate.toml': use a relative path"),
    (("config",), "../outside.toml", "config: '../outside.toml': use a relative path"),
    (("config",), "examples/lab/none.toml", "config: 'examples/lab/none.toml': no such file"),
    (("config",), 7, "config: expected a string"),
    (("hosts", "ext"), {"bridge": True}, "hosts.ext.bridge: eth0 has addresses"),
    (("hosts", "ext"), {"bridge": "yes"}, "hosts.ext.bridge: expected true or false"),
]


def test_a_bridge_host_neither_forwards_nor_routes():
    doc = _set(basic_doc(), ("hosts", "lan"), {"bridge": True, "forwarding": True})
    doc["links"][1]["b"]["addresses"] = []
    doc["routes"] = [{"host": "lan", "to": "10.9.0.0/16", "dev": "eth0"}]
    assert problems_of(doc) == [
        "hosts.lan.forwarding: a bridge host switches at layer 2: it does not forward",
        "hosts.lan.bridge: a bridge host has no routes",
    ]


@pytest.mark.parametrize(("path", "value", "expected"), MISTAKES, ids=[m[2].split(":")[0] for m in MISTAKES])
def test_each_mistake_is_reported_with_its_key_path(path, value, expected):
    problems = problems_of(_set(basic_doc(), path, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_host_names_cannot_hold_a_dash_or_capitals():
    doc = basic_doc()
    doc["hosts"]["Ext-1"] = {}
    (problem,) = problems_of(doc)
    assert problem.startswith("hosts.Ext-1: host names are 1-15 lowercase letters and digits")


def test_all_problems_are_reported_at_once_one_per_line(tmp_path):
    doc = _set(basic_doc(), ("links", 1, "a", "host"), "rtr")
    doc = _set(doc, ("routes", 0, "via"), "10.1.1.1")
    doc = _set(doc, ("hosts", "ext", "sysctls"), {"vm.swappiness": 1})
    path = tmp_path / "three.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    err = info.value
    assert len(err.problems) == 3, err.problems
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any("links[1].a.host: unknown host 'rtr'" in line for line in lines)
    assert err.exit_code == 2


def test_not_an_object_at_the_top():
    assert problems_of([1, 2]) == ["expected an object, got list"]


def test_values_are_ipaddress_objects_and_commands_are_argv():
    doc = _set(basic_doc(), ("commands",), {"router": ["nft 'add table ip t'", ["nft", "list", "ruleset"]]})
    doc["routes"].append({"host": "lan", "to": "10.9.0.0/16", "dev": "eth0"})
    topo = parse_topology(doc)
    assert topo.host("router").commands == (("nft", "add table ip t"), ("nft", "list", "ruleset"))
    extra = topo.routes[1]
    assert extra.to == ip_network("10.9.0.0/16") and extra.via is None and extra.dev == "eth0"
    assert not extra.is_default
    assert all(isinstance(a, IPv4Interface) for link in topo.links for ep in link.endpoints for a in ep.addresses)


def test_ipv6_addresses_and_default_route():
    doc = basic_doc()
    doc["links"][1]["a"]["addresses"].append("fd00:1::1/64")
    doc["links"][1]["b"]["addresses"].append("fd00:1::10/64")
    doc["routes"].append({"host": "lan", "to": "default", "via": "fd00:1::1"})
    topo = parse_topology(doc)
    v6 = topo.routes[1]
    assert v6.to == ip_network("::/0") and v6.is_default
    assert topo.address("lan", version=6) == ip_interface("fd00:1::10/64")
    with pytest.raises(UsageError, match="no IPv6 address"):
        topo.address("ext", version=6)


def test_topology_objects_are_frozen_and_hashable():
    topo = load_topology("basic")
    with pytest.raises(AttributeError):
        topo.name = "other"  # type: ignore[misc]
    assert hash(topo) == hash(load_topology("basic"))


# JSON values of any shape, to throw at the parser.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
# Every place in basic.json where a wrong value can go.
_PLACES = [
    ("name",), ("router",), ("hosts",), ("hosts", "ext"), ("hosts", "router", "sysctls"), ("links",),
    ("links", 0), ("links", 0, "a"), ("links", 0, "a", "host"), ("links", 0, "a", "ifname"),
    ("links", 1, "b", "addresses"), ("routes",), ("routes", 0), ("routes", 0, "to"), ("routes", 0, "via"),
    ("commands",), ("config",),
]


@settings(max_examples=300, deadline=None)
@given(place=st.sampled_from(_PLACES), value=json_values)
def test_any_wrong_value_gives_a_topology_error_never_a_crash(place, value):
    try:
        parse_topology(_set(basic_doc(), place, value))
    except TopologyError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


@settings(max_examples=200, deadline=None)
@given(doc=json_values)
def test_any_json_document_gives_a_topology_error_never_a_crash(doc):
    with pytest.raises(TopologyError):
        parse_topology(doc)
