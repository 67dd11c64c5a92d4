"""IPv6 into a gateway whose kind takes it (issue 17, step 4): the queue rules, the IPv6 binding
table, the blind track's IPv6 and the settings; every other kind's IPv6 stays dropped and counted."""

from __future__ import annotations

import re

import pytest

from firewall.config import ConfigError, loads
from firewall.hazards import hazards
from firewall.rules import bind, build, iptables, nft
from firewall.manifests import manifest_for
from firewall.rules.model import Family, Mark, Queue
from gateways.kinds import KINDS

BASE = """
[zones.ext]
interfaces = ["ext0"]

[zones.lan]
interfaces = ["lan0"]

[policy]
forward = "accept"

[[gateway]]
name = "relay"
kind = "tcp-relay"
[[gateway.traffic]]
from = "ext"
to = "lan"
proto = "tcp"
ports = 9000

[[gateway]]
name = "media"
kind = "rtp"
[[gateway.traffic]]
from = "ext"
to = "lan"
proto = "udp"
ports = 5004
daddr = ["192.168.1.0/24"]  # addresses: an rtp selector that takes IPv4 only
"""


def test_only_a_selector_whose_kind_takes_ipv6_queues_it() -> None:
    rs = build(loads(BASE))
    mangle = rs.chain("mangle_prerouting").rules
    by_comment = {r.comment: r for r in mangle}
    relay = by_comment["gateway[0].traffic[0] gateway relay (tcp-relay): request, if the filter admits it"]
    rtp = by_comment["gateway[1].traffic[0] gateway media (rtp): request, if the filter admits it"]
    assert relay.family is Family.BOTH and rtp.family is Family.V4
    admit = [r for r in rs.chain("admit_g0_0").rules if r.family is Family.V6]
    assert [r.comment for r in admit] == ["gateway[0].traffic[0] admitted by policy.forward = accept"]
    assert not [r for r in rs.chain("admit_g1_0").rules if r.family is Family.V6]
    leg_b = [r for r in mangle if r.family is Family.V6 and "IPv6 firewall-side pool" in r.comment]
    assert len(leg_b) == 1 and "fd6e:6667:6174:fe::/124" in nft.render(rs)
    # The rtp selector's IPv6 is still dropped under its counter, and so is the
    # relay's that did not pass the gateway.
    text = nft.render(rs)
    assert 'counter name "ipv6_drop_g1_0" drop' in text and 'counter name "ipv6_drop_g0_0" drop' in text
    assert "IPv6 dropped, gateways take IPv4 only" in rs.counters["ipv6_drop_g1_0"]
    assert "skipped the gateway" in rs.counters["ipv6_drop_g0_0"]


def test_ipv6_is_steered_over_the_instances_as_ipv4_is() -> None:
    """By the low bits of the client's address (requests) and by the IPv6 pool's slices (leg B),
    the same slices the processor's pools and the gateways' manifests have."""
    config = loads(BASE + '\n[processor]\nqueues = [4, 5]\n')
    rs = build(config)
    text = nft.render(rs)
    assert 'ip6 saddr & ::1 == ::1 counter queue num 5 comment "IPv6 request, by the client\'s address: slice 1 -> queue 5"' in text
    assert "ip6 daddr fd6e:6667:6174:fe::8/125 counter queue num 5" in text
    assert "ip6 daddr fd6e:6667:6174:fe::/125 counter queue num 4" in text
    assert 'meta nfproto ipv6 counter jump steer_client_src6 comment "gateway[0].traffic[0] admitted by policy.forward = accept"' in text
    slices6 = [manifest_for(config, config.gateways[0]).processor.nodes[0].instances[i].slices6 for i in (0, 1)]
    assert [list(map(str, s)) for s in slices6] == [["fd6e:6667:6174:fe::/125"], ["fd6e:6667:6174:fe::8/125"]]
    assert "-s ::1/::1 -m comment --comment \"IPv6 request, by the client's address: slice 1 -> queue 5\" -j NFQUEUE --queue-num 5" \
        in iptables.render(rs, 6)


def test_addressed_selectors_keep_dropping_ipv6() -> None:
    config = loads(BASE.replace("ports = 9000", 'ports = 9000\ndaddr = ["10.0.0.0/8"]', 1))
    assert not config.gateways[0].takes_ipv6(config.gateways[0].traffic[0])
    rs = build(config)
    assert not [r for r in rs.chain("admit_g0_0").rules if r.family is Family.V6]
    assert "IPv6 firewall-side pool" not in nft.render(rs)


def test_a_log_only_selector_takes_ipv6_its_drop_sparing_the_processors_flows() -> None:
    """Log-only over IPv6 (issue 17): queued as IPv4 is; the first packet the processor passes
    (``rewritten``) leaves to the to-zone unchanged, so its drop spares that mark."""
    config = loads(BASE.replace('kind = "tcp-relay"', 'kind = "tcp-relay"\nsettings = { mode = "log-only" }', 1))
    assert config.gateways[0].takes_ipv6(config.gateways[0].traffic[0])
    rs = build(config)
    assert [r for r in rs.chain("admit_g0_0").rules if r.family is not Family.V4]
    drop = next(r for c in rs.chains for r in c.rules if r.counter == "ipv6_drop_g0_0")
    marks = config.processor.marks
    assert Mark(marks.rewritten, 0) in drop.matches and Mark(marks.allowed, 0) in drop.matches
    relayed = next(r for c in build(loads(BASE)).chains for r in c.rules if r.counter == "ipv6_drop_g0_0")
    assert Mark(marks.rewritten, 0) not in relayed.matches  # a relayed flow's first packet never leaves to the zone


def test_the_ipv6_binding_table_and_its_elements() -> None:
    rs = build(loads(BASE))
    text = nft.render(rs)
    assert "table ip6 nfgate_bind6 {" in text
    assert "dnat ip6 to meta l4proto . ct original ip6 saddr . ct original proto-src" in text
    assert "snat ip6 to meta l4proto . ct original ip6 saddr" in text
    c, g = 0x20010DB8000200000000000000000010, 0xFD6E66676174_00FF_0000_0000_0000_0002
    ops = [(bind.DNAT6_MAP, "tcp", (c, 40000, 0x20010DB8000200000000000000000001, 9000), (g, 20000)),
           (bind.DNAT_MAP, "tcp", (0x0A000001, 40000, 0x0A000002, 9000), (0xAC1FFF02, 20000))]
    assert bind.add_text(ops, 5).splitlines() == [
        "add element ip6 nfgate_bind6 leg_dnat6 { tcp . 2001:db8:2::10 . 40000 . 2001:db8:2::1 . 9000 timeout 5s "
        ": fd6e:6667:6174:ff::2 . 20000 }",
        "add element ip nfgate_bind leg_dnat { tcp . 10.0.0.1 . 40000 . 10.0.0.2 . 9000 timeout 5s : 172.31.255.2 . 20000 }",
    ]


def test_iptables_queues_ipv6_through_ip6tables() -> None:
    text = iptables.render(build(loads(BASE)), 6)
    assert "-A NFGATE-MANGLE-PREROUTING -i nfg-gw0 -d fd6e:6667:6174:fe::/124" in text
    assert "-A NFGATE-ADMIT-G0-0 -m comment --comment \"gateway[0].traffic[0] admitted by policy.forward = accept\" -j NFQUEUE" in text


@pytest.mark.parametrize("change, path, reason", [
    ('[processor.pools]\nfirewall_side6 = "2001:db8::/120"\n', "processor.pools.firewall_side6", "ULA"),
    ('[processor.pools]\nfirewall_side6 = "fd00::/96"\n', "processor.pools.firewall_side6", "a /112 at most"),
    ('[gateway_link]\nrouter_address6 = "2001:db8::1/64"\n', "gateway_link.router_address6", "ULA"),
    ('[gateway_link]\ngateway_address6 = "fd00:9::2/64"\n', "gateway_link.gateway_address6", "same subnet"),
    ('[gateway_link]\nrouter_address6 = "fd6e:6667:6174:fe::1/64"\ngateway_address6 = "fd6e:6667:6174:fe::2/64"\n',
     "gateway_link.router_address6", "overlaps processor.pools.firewall_side6"),
])
def test_ipv6_blind_track_settings_are_checked(change: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(BASE + change)
    assert path in str(err.value) and reason in str(err.value)


def test_the_blind_track_lets_neighbour_discovery_through_for_ipv6_flows() -> None:
    nd = "gateway_link: neighbour discovery for IPv6 gateway flows"
    rs = build(loads(BASE))
    for chain in ("input", "output"):
        (rule,) = [r for r in rs.chain(chain).rules if r.comment == nd]
        assert rule.family is Family.V6
    rtp_only = BASE[:BASE.index("[[gateway]]")] + BASE[BASE.index('[[gateway]]\nname = "media"'):]
    assert not [r for r in build(loads(rtp_only)).chain("input").rules if r.comment == nd]


def test_which_kinds_take_ipv6() -> None:
    assert {k.name for k in KINDS if k.ipv6} == {"tcp-relay", "udp-relay", "smtp", "ftp", "tunnel", "rtp"}
    # Every kind: what still takes IPv4 only is a selector with IPv4 addresses.
    assert {k.name for k in KINDS} == {k.name for k in KINDS if k.ipv6}


def test_an_rtp_selector_without_addresses_queues_ipv6() -> None:
    plain = BASE.replace('daddr = ["192.168.1.0/24"]  # addresses: an rtp selector that takes IPv4 only\n', "")
    rs = build(loads(plain))
    (rtp,) = [r for r in rs.chain("mangle_prerouting").rules
              if r.comment == "gateway[1].traffic[0] gateway media (rtp): request, if the filter admits it"]
    assert rtp.family is Family.BOTH
    assert "skipped the gateway" in rs.counters["ipv6_drop_g1_0"]
    # An IPv6 forward into it is the gateway's too: `nfgate check` has nothing to warn of.
    assert not [h for h in hazards(loads(plain + FORWARDS)) if "forwards IPv6" in h.message]


FORWARDS = """
[[nat.forward]]
name = "relay6"
from = "ext"
proto = "tcp"
port = 9000
to = "[fd00:1::10]:9001"

[[nat.forward]]
name = "media6"
from = "ext"
proto = "udp"
port = 5004
to = "fd00:1::10"
"""


def test_an_ipv6_forward_into_a_selector_that_takes_ipv6_is_admitted_to_its_queue() -> None:
    rs = build(loads(BASE.replace('forward = "accept"', 'forward = "drop"') + FORWARDS))
    (relay,) = [r for r in rs.chain("admit_g0_0").rules if "forward relay6" in r.comment]
    assert relay.family is Family.V6 and isinstance(relay.statements[0], Queue)
    # The rtp selector (IPv4 addresses) takes IPv4 only: its IPv6 forward is not queued (the counted drop takes it).
    assert not [r for r in rs.chain("admit_g1_0").rules if "forward media6" in r.comment]
    text = nft.render(rs)
    assert ('meta nfproto ipv6 fib daddr type local tcp dport 9000 counter queue num 0 comment '
            '"gateway[0].traffic[0] admitted by nat.forward[0] forward relay6"') in text, text


def test_check_warns_of_an_ipv6_forward_only_into_a_selector_that_takes_ipv4_only() -> None:
    config = loads(BASE + FORWARDS)
    (warning,) = [h for h in hazards(config) if "forwards IPv6" in h.message]
    assert warning.path == "nat.forward[1]" and "this selector takes IPv4 only" in warning.message


def test_masquerade6_keeps_below_the_processors_snat_pool_once_a_selector_takes_ipv6() -> None:
    """Leg B into a masquerade6 zone takes W6:w of processor.pools.snat_ports (processor/six.py):
    the kernel's NAT66 keeps below that range, as IPv4's masquerade does; a pool from 1024 is refused."""
    config = loads(BASE + '\n[nat]\nmasquerade6 = ["lan"]\n')
    text = nft.render(build(config))
    assert re.search(r'oifname @zone_lan meta l4proto tcp counter masquerade to :1024-60999 comment '
                     r'"nat.masquerade6 lan: tcp below processor.pools.snat_ports"', text), text
    assert ('-A NFGATE-SRCNAT -o lan0 -p udp -m comment --comment "nat.masquerade6 lan: udp below '
            'processor.pools.snat_ports" -j MASQUERADE --to-ports 1024-60999') in iptables.render(build(config), 6)
    with pytest.raises(ConfigError) as err:
        loads(BASE + '\n[nat]\nmasquerade6 = ["lan"]\n[processor.pools]\nsnat_ports = "1024-2047"\n')
    assert "processor.pools.snat_ports" in str(err.value)
