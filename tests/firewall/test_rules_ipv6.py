"""Dual-stack rules where the config reaches (issue 17): DNAT66 port forwards, NAT66 masquerade, and
what a selector's IPv6 drop means for them."""

from __future__ import annotations

import pytest

from firewall.config import ConfigError, loads
from firewall.hazards import hazards
from firewall.rules import build, iptables, nft
from firewall.rules.model import DstLocal, Family

BASE = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[[rule]]
from = "lan"
to = "router"
proto = "tcp"
ports = 22
"""

FORWARDS = """
[nat]
masquerade = ["wan"]
masquerade6 = ["wan"]

[[nat.forward]]
name = "web"
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"

[[nat.forward]]
name = "web6"
from = "wan"
proto = "tcp"
port = 8080
to = "[fd00:1::10]:80"
saddr = ["2001:db8:2::/64"]

[[nat.forward]]
name = "dns6"
from = "wan"
proto = "udp"
port = "5300-5310"
to = "fd00:1::10"
"""


def test_ipv6_forwards_and_masquerade6_render_for_ip6_only() -> None:
    rs = build(loads(BASE + FORWARDS))
    families = [(r.comment, r.family) for r in rs.chain("dstnat").rules]
    assert families == [("nat.forward[0] forward web", Family.V4), ("nat.forward[1] forward web6", Family.V6),
                        ("nat.forward[2] forward dns6", Family.V6)]
    assert [(r.comment, r.family) for r in rs.chain("srcnat").rules] == [
        ("nat.masquerade wan", Family.V4), ("nat.masquerade6 wan", Family.V6)]
    text = nft.render(rs)
    assert ("meta nfproto ipv6 iifname @zone_wan fib daddr type local ip6 saddr 2001:db8:2::/64 tcp dport 8080 "
            'counter dnat ip6 to [fd00:1::10]:80 comment "nat.forward[1] forward web6"') in text
    assert "udp dport 5300-5310 counter dnat ip6 to fd00:1::10 comment" in text
    assert ("meta nfproto ipv6 iifname @zone_wan ct status dnat ip6 daddr fd00:1::10 ip6 saddr 2001:db8:2::/64 "
            "tcp dport 80 counter accept") in text
    v6, v4 = iptables.render(rs, 6), iptables.render(rs, 4)
    assert "--dport 8080 -m comment --comment \"nat.forward[1] forward web6\" -j DNAT --to-destination [fd00:1::10]:80" in v6
    assert "--dport 5300:5310 -m comment --comment \"nat.forward[2] forward dns6\" -j DNAT --to-destination fd00:1::10" in v6
    assert '-A NFGATE-SRCNAT -o wan0 -m comment --comment "nat.masquerade6 wan" -j MASQUERADE' in v6
    assert "fd00" not in v4 and "masquerade6" not in v4
    assert "192.168.1.10" not in v6 and '"nat.masquerade wan"' not in v6


def test_without_masquerade6_ipv6_is_routed_untranslated() -> None:
    rs = build(loads(BASE + FORWARDS.replace('masquerade6 = ["wan"]\n', "")))
    assert all(r.family is Family.V4 for r in rs.chain("srcnat").rules)


def test_an_ipv6_forward_on_a_selectors_port_is_named_in_check() -> None:
    """Only where the selector takes IPv4 only (here, its addresses are IPv4): into one that
    takes IPv6 the forward's IPv6 goes through the gateway (test_rules_ipv6_gateway.py)."""
    gateway = ('[[gateway]]\nname = "web"\nkind = "tcp-relay"\n'
               '[[gateway.traffic]]\nfrom = "wan"\nto = "lan"\n'
               'proto = "tcp"\nports = 8080\nsaddr = ["0.0.0.0/0"]\ndaddr = ["0.0.0.0/0"]\n[[rule]]\nfrom = "wan"\nto = "lan"\nproto = "tcp"\nports = 80\n'
               'daddr = ["192.168.1.10/32"]\n')
    config = loads(BASE + FORWARDS + gateway)
    found = [h for h in hazards(config) if h.path == "nat.forward[1]"]
    assert len(found) == 1, hazards(config)
    relayed = loads(BASE + FORWARDS + gateway.replace('saddr = ["0.0.0.0/0"]\ndaddr = ["0.0.0.0/0"]\n', ""))
    assert not [h for h in hazards(relayed) if h.path == "nat.forward[1]"]
    assert "forwards IPv6 tcp 8080 to fd00:1::10" in found[0].message
    assert "counted as ipv6_drop_g0_0" in found[0].message
    # The IPv4 forward on the same port is the gateway's: it still admits the selector.
    assert not [h for h in hazards(config) if "no [[rule]] or port forward accepts" in h.message]


NPT6 = """
[nat]
masquerade6 = ["wan"]

[[nat.npt6]]
name = "lan"
zone = "wan"
inside = "fd00:1::/64"
outside = "2001:db8:3::/64"
"""


def test_npt6_maps_both_ways_before_the_zones_masquerade6() -> None:
    rs = build(loads(BASE + NPT6))
    (inbound,) = rs.chain("dstnat").rules
    assert inbound.family is Family.V6 and inbound.comment == "nat.npt6[0] npt6 lan"
    assert [r.comment for r in rs.chain("srcnat").rules] == ["nat.npt6[0] npt6 lan", "nat.masquerade6 wan"]
    text = nft.render(rs)
    assert ("meta nfproto ipv6 oifname @zone_wan ip6 saddr fd00:1::/64 counter snat ip6 prefix to ip6 saddr "
            "map { fd00:1::/64 : 2001:db8:3::/64 }") in text
    assert ("meta nfproto ipv6 iifname @zone_wan ip6 daddr 2001:db8:3::/64 counter dnat ip6 prefix to ip6 daddr "
            "map { 2001:db8:3::/64 : fd00:1::/64 }") in text
    v6 = iptables.render(rs, 6)
    assert '-A NFGATE-SRCNAT -o wan0 -s fd00:1::/64 -m comment --comment "nat.npt6[0] npt6 lan" -j NETMAP --to 2001:db8:3::/64' in v6
    assert '-A NFGATE-DSTNAT -i wan0 -d 2001:db8:3::/64 -m comment --comment "nat.npt6[0] npt6 lan" -j NETMAP --to fd00:1::/64' in v6
    assert "NETMAP" not in iptables.render(rs, 4)


@pytest.mark.parametrize("change, path, reason", [
    (("2001:db8:3::/64", "2001:db8:3::/56"), "nat.npt6[0].outside", "/56 differs from inside's /64"),
    (("2001:db8:3::/64", "fd00:1::/64"), "nat.npt6[0].outside", "overlaps inside fd00:1::/64"),
    (("fd00:1::/64", "10.0.0.0/24"), "nat.npt6[0].inside", "10.0.0.0/24 is not an IPv6 prefix"),
    (('zone = "wan"', 'zone = "dmz"'), "nat.npt6[0].zone", "zone 'dmz' does not exist"),
])
def test_npt6_errors(change: tuple[str, str], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(BASE + NPT6.replace(*change))
    (problem,) = info.value.problems
    assert problem.path == path and reason in problem.reason, problem


def test_ipv6_to_the_routers_forwarded_port_is_dropped_under_the_selectors_counter() -> None:
    """The issue's "IPv6 to router:8443 silently times out": an IPv4 forward takes the selector's
    port, IPv6 to the router's address on it is the input chain's, and is counted by name."""
    gateway = ('[[gateway]]\nname = "web"\nkind = "tcp-relay"\n[[gateway.traffic]]\nfrom = "wan"\nto = "lan"\n'
               'proto = "tcp"\nports = 8080\n')
    rs = build(loads(BASE + FORWARDS + gateway))
    named = [(c.name, r) for c in rs.chains for r in c.rules if r.counter == "ipv6_drop_g0_0"]
    assert [c for c, _ in named] == ["input", "forward"]
    (_, local), _ = named
    assert DstLocal() in local.matches and local.family is Family.V6
    assert 'fib daddr type local ct state new tcp dport 8080 counter name "ipv6_drop_g0_0" drop' in nft.render(rs)
    # Without a forward on the port, the router's own port is not the selector's business.
    plain = build(loads(BASE + gateway))
    assert [c.name for c in plain.chains for r in c.rules if r.counter] == ["forward"]
