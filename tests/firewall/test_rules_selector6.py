"""Selectors with IPv6 addresses (issue 17): each version's prefixes in a queue rule of their own,
the counted drop only for the IPv6 the selector names, and the config's checks. The expected
lines are the rendered rules, whole (a golden in small)."""

from __future__ import annotations

import ipaddress

import pytest

from firewall.config import ConfigError, loads
from firewall.processor.policy import Policy
from firewall.rules import build, iptables, nft

BASE = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[policy]
forward = "accept"

[[gateway]]
name = "mail"
kind = "smtp"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 25
daddr = ["192.168.1.10", "fd00:1::10"]
saddr = ["0.0.0.0/0", "2001:db8:2::/64"]
"""


def lines(text: str, needle: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if needle in line]


def test_each_versions_prefixes_are_a_queue_rule_of_their_own() -> None:
    rs = build(loads(BASE))
    text = nft.render(rs)
    assert lines(text, "gateway mail (smtp): request") == [
        'meta nfproto ipv4 iifname @zone_wan ip saddr 0.0.0.0/0 ip daddr 192.168.1.10 tcp dport 25 '
        'counter jump admit_g0_0 comment "gateway[0].traffic[0] gateway mail (smtp): request, if the filter admits it"',
        'meta nfproto ipv6 iifname @zone_wan ip6 saddr 2001:db8:2::/64 ip6 daddr fd00:1::10 tcp dport 25 '
        'counter jump admit_g0_0 comment "gateway[0].traffic[0] gateway mail (smtp): request, if the filter admits it"',
    ]
    # What skipped the gateway is dropped only where the selector names it (and no ALLOW, such
    # as an offload's, marked it ``allowed``): by its IPv6
    # sources and its original IPv6 destination (before any port forward).
    assert lines(text, 'name "ipv6_drop_g0_0"') == [
        'meta nfproto ipv6 iifname @zone_wan oifname @zone_lan ip6 saddr 2001:db8:2::/64 ct original ip6 daddr fd00:1::10 '
        'meta mark & 0x00040000 == 0x00000000 ct state new meta l4proto tcp ct original proto-dst 25 counter name "ipv6_drop_g0_0" drop comment '
        '"gateway[0].traffic[0] gateway mail (smtp): IPv6 that skipped the gateway dropped"',
    ]
    v6 = iptables.render(rs, 6)
    assert lines(v6, "gateway mail (smtp): request") == [
        '-A NFGATE-MANGLE-PREROUTING -i wan0 -p tcp -s 2001:db8:2::/64 -d fd00:1::10 --dport 25 -m comment '
        '--comment "gateway[0].traffic[0] gateway mail (smtp): request, if the filter admits it" -j NFGATE-ADMIT-G0-0',
    ]
    assert lines(v6, "ipv6_drop_g0_0:") == [
        '-A NFGATE-FORWARD -i wan0 -o lan0 -s 2001:db8:2::/64 -m conntrack --ctorigdst fd00:1::10 -m mark --mark 0x0/0x40000 '
        '-m conntrack --ctstate NEW -p tcp -m conntrack --ctorigdstport 25 -m comment --comment "ipv6_drop_g0_0: gateway[0].traffic[0] gateway '
        'mail (smtp): IPv6 that skipped the gateway dropped" -j DROP',
    ]
    assert "2001:db8" not in iptables.render(rs, 4) and "fd00:1::10" not in iptables.render(rs, 4)


def test_an_ipv6_only_selector_queues_no_ipv4() -> None:
    text = nft.render(build(loads(BASE.replace('"192.168.1.10", ', "").replace('"0.0.0.0/0", ', ""))))
    (rule,) = lines(text, "gateway mail (smtp): request")
    assert rule.startswith("meta nfproto ipv6 ") and "admit_g0_0" in rule


def test_the_processor_matches_each_version_by_its_own_prefixes() -> None:
    policy = Policy(loads(BASE.replace('"0.0.0.0/0", ', "")))
    v6 = lambda a: int(ipaddress.IPv6Address(a))  # noqa: E731
    v4 = lambda a: int(ipaddress.IPv4Address(a))  # noqa: E731
    assert policy.selector("wan", 6, v6("2001:db8:2::10"), v6("fd00:1::10"), 25, six=True) is not None
    assert policy.selector("wan", 6, v6("2001:db8:3::10"), v6("fd00:1::10"), 25, six=True) is None
    assert policy.selector("wan", 6, v6("2001:db8:2::10"), v6("fd00:1::11"), 25, six=True) is None
    # saddr has no IPv4 prefix left: no IPv4 client is named, whatever its destination.
    assert policy.selector("wan", 6, v4("203.0.113.10"), v4("192.168.1.10"), 25) is None


def test_ipv6_addresses_a_selector_cannot_use_are_refused() -> None:
    reason = "IPv6 addresses on one side only"
    with pytest.raises(ConfigError) as err:
        loads(BASE.replace('saddr = ["0.0.0.0/0", "2001:db8:2::/64"]', 'saddr = ["0.0.0.0/0"]'))
    assert reason in str(err.value) and "gateway[0].traffic[0]" in str(err.value)
    # A log-only tcp-relay takes IPv6 (issue 17): its IPv6 prefixes are its own.
    log_only = loads(BASE.replace('kind = "smtp"', 'kind = "tcp-relay"\nsettings = { mode = "log-only" }'))
    assert log_only.gateways[0].takes_ipv6(log_only.gateways[0].traffic[0])
