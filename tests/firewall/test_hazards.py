"""`nfgate check`'s warnings and the errors of issue 12 (6 and 7 are also netns tests), and the unit file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from firewall.cli import main
from firewall.config import ConfigError, loads
from firewall.hazards import hazards
from firewall.rules import build
from firewall import backend as be
from firewall.fields import PortRange
from firewall.rules import iptables, nft
from firewall.rules.model import CtState, Drop, Family, InZone, OutZone, Port, Queue, Return

REPO = Path(__file__).parents[2]

BASE = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]
"""

SSH = """
[[rule]]
from = "lan"
to = "router"
proto = "tcp"
ports = 22
"""

GATEWAY = """
[nat]
masquerade = ["wan"]

[[gateway]]
name = "relay"
kind = "smtp"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000
daddr = ["0.0.0.0/0"]  # IPv4 addresses: the selector takes IPv4 only
"""


def paths(text: str) -> list[str]:
    return [h.path for h in hazards(loads(text))]


def test_input_drop_without_management_access_warns() -> None:
    assert paths(BASE) == ["policy.input"]
    assert paths(BASE + SSH) == []
    assert paths(BASE + '[policy]\ninput = "accept"\n') == []


def test_a_selector_wider_than_its_rules_warns_and_admits_nothing() -> None:
    config = loads(BASE + SSH + GATEWAY)
    assert [h.path for h in hazards(config)] == ["gateway[0].traffic[0]"]
    assert build(config).chain("admit_g0_0").rules == []
    allowed = BASE + SSH + '[[rule]]\nfrom = "lan"\nto = "wan"\nproto = "tcp"\nports = "9000-9001"\nsaddr = ["10.0.0.0/8"]\n' + GATEWAY
    assert paths(allowed) == ["gateway[0].traffic[0]"]  # the rule takes only some clients
    assert paths(BASE + SSH + GATEWAY + "allow = true\n") == []


def test_ipv6_that_skips_a_gateway_warns() -> None:
    everything = '[[rule]]\nname = "out"\nfrom = "lan"\nto = "wan"\n'
    assert paths(BASE + SSH + everything + GATEWAY) == ["gateway[0].traffic[0]"]
    assert "IPv6" in str(hazards(loads(BASE + SSH + everything + GATEWAY))[0])
    no_v6 = '[[rule]]\nfrom = "lan"\nto = "wan"\nproto = "tcp"\nports = 9000\nsaddr = ["::/0"]\naction = "drop"\n'
    assert paths(BASE + SSH + no_v6 + everything + GATEWAY) == []


def test_every_selector_drops_ipv6_on_its_ports_counted_by_name(tmp_path: Path) -> None:
    """Gateways take IPv4 only: the IPv6 a selector names is dropped, never let past the gateway (issue 17)."""
    # The tunnel takes IPv6, but not on a selector with addresses (they are IPv4): dropped, in input.
    tunnel = ('[[gateway]]\nname = "tun"\nkind = "tunnel"\n[[gateway.traffic]]\nfrom = "wan"\nto = "router"\n'
              'proto = "tcp"\nports = 7443\nsaddr = "198.51.100.0/24"\n[[gateway.traffic]]\nfrom = "wan"\nto = "router"\n'
              'proto = "udp"\nports = 7443\nsaddr = "198.51.100.0/24"\n')
    config = loads(BASE + SSH + GATEWAY + tunnel)
    rs = build(config)
    assert sorted(rs.counters) == ["ipv6_drop_g0_0", "ipv6_drop_g1_0", "ipv6_drop_g1_1"]
    drops = {r.counter: (c.name, r) for c in rs.chains for r in c.rules if r.counter}
    chain, rule = drops["ipv6_drop_g0_0"]
    assert chain == "forward" and rule.family is Family.V6 and rule.statements == (Drop(),)
    assert InZone("lan") in rule.matches and OutZone("wan") in rule.matches and CtState(("new",)) in rule.matches
    # The connection's original port: a port forward's DNAT does not hide it.
    assert Port("dst", (PortRange(9000, 9000),), original=True) in rule.matches
    # First in the chain: no [[rule]] decides before it.
    assert rs.chain("forward").rules[0] is rule
    assert drops["ipv6_drop_g1_0"][0] == drops["ipv6_drop_g1_1"][0] == "input"  # to = "router"
    text = nft.render(rs)
    assert "\tcounter ipv6_drop_g0_0 {" in text
    assert re.search(r'meta nfproto ipv6 iifname @zone_lan oifname @zone_wan ct state new meta l4proto tcp '
                     r'ct original proto-dst 9000 counter name "ipv6_drop_g0_0" drop', text), text
    v6 = iptables.render(rs, 6)
    assert '--ctorigdstport 9000 -m comment --comment "ipv6_drop_g0_0: gateway[0].traffic[0]' in v6
    assert "ipv6_drop" not in iptables.render(rs, 4)

    path = tmp_path / "nfgate.toml"
    path.write_text(BASE + SSH + GATEWAY + tunnel)
    checked = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert "IPv6 on its selectors' ports: dropped, counted as ipv6_drop_g1_0, ipv6_drop_g1_1" in checked.output
    assert "ipv6_drop_g1_1 (a selector whose addresses are IPv4 only)" in checked.output

    # Without addresses the tunnel's selectors take IPv6 into the gateway; the
    # input chain's drop stays for IPv6 that would skip it.
    path.write_text(BASE + SSH + GATEWAY + tunnel.replace('saddr = "198.51.100.0/24"\n', ""))
    checked = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert "IPv6 on its selectors' ports: through the gateway for gateway[1].traffic[0], gateway[1].traffic[1]" \
        in checked.output, checked.output


def test_ipv6_a_rule_accepts_is_dropped_and_check_says_where_it_is_counted() -> None:
    everything = '[[rule]]\nname = "out"\nfrom = "lan"\nto = "wan"\n'
    (warning,) = hazards(loads(BASE + SSH + everything + GATEWAY))
    assert "rule[1] accepts this traffic over IPv6 too" in warning.message
    assert "drops IPv6 tcp 9000 from lan to wan (counted as ipv6_drop_g0_0" in warning.message
    (warning,) = hazards(loads(BASE + SSH + '[policy]\nforward = "accept"\n' + GATEWAY))
    assert warning.message.startswith("policy.forward = accept would pass this traffic over IPv6 too")


def test_ipv6_a_rule_accepts_into_a_tcp_relay_is_relayed_no_warning(tmp_path: Path) -> None:
    """A tcp-relay or ftp selector takes IPv6 (issue 17): the rule's IPv6 goes through the gateway,
    nothing to warn of, and `nfgate check` says so."""
    everything = '[[rule]]\nname = "out"\nfrom = "lan"\nto = "wan"\n'
    for kind in ("tcp-relay", "ftp", "smtp"):
        config = BASE + SSH + everything + GATEWAY.replace('kind = "smtp"', f'kind = "{kind}"').replace('daddr = ["0.0.0.0/0"]', "")
        assert hazards(loads(config)) == [], kind
        path = tmp_path / f"{kind}.toml"
        path.write_text(config)
        checked = CliRunner().invoke(main, ["check", "-c", str(path)])
        assert "IPv6 on its selectors' ports: through the gateway for gateway[0].traffic[0]" in checked.stdout, checked.stdout
        assert "IPv6 on its selectors' ports: dropped" not in checked.stdout
    relay = GATEWAY.replace('kind = "smtp"', 'kind = "tcp-relay"').replace('daddr = ["0.0.0.0/0"]', "")
    log_only = relay.replace('kind = "tcp-relay"', 'kind = "tcp-relay"\nsettings = { mode = "log-only" }')
    assert hazards(loads(BASE + SSH + everything + log_only)) == []  # log-only takes IPv6 too
    ipv4_only = GATEWAY.replace('kind = "smtp"', 'kind = "tcp-relay"\nsettings = { mode = "log-only" }')
    (warning,) = hazards(loads(BASE + SSH + everything + ipv4_only))
    assert "takes IPv4 only (its kind, or IPv4 addresses)" in warning.message


def test_named_counters_are_read_from_ip6tables_save() -> None:
    saved = (
        "*filter\n:NFGATE-FORWARD - [0:0]\n"
        '[3:240] -A NFGATE-FORWARD -i lan0 -o wan0 -p tcp -m conntrack --ctstate NEW -m conntrack --ctorigdstport 9000 '
        '-m comment --comment "ipv6_drop_g0_0: gateway[0].traffic[0] gateway relay (tcp-relay): IPv6 dropped" -j DROP\n'
        '[2:160] -A NFGATE-FORWARD -i lan1 -o wan0 -p tcp -m conntrack --ctstate NEW -m conntrack --ctorigdstport 9000 '
        '-m comment --comment "ipv6_drop_g0_0: gateway[0].traffic[0] gateway relay (tcp-relay): IPv6 dropped" -j DROP\n'
        '[7:700] -A NFGATE-FORWARD -m comment --comment "policy.forward = drop" -j DROP\nCOMMIT\n'
    )
    assert be.counted(saved, {"ipv6_drop_g0_0", "ipv6_drop_g1_0"}) == {"ipv6_drop_g0_0": (5, 400)}
    assert be.counted(saved, set()) == {}


def test_check_strict_exits_2_on_warnings(tmp_path: Path) -> None:
    path = tmp_path / "nfgate.toml"
    path.write_text(BASE + '[supervisor]\ncontrol_socket = "' + str(tmp_path / "run" / "c.sock") + '"\n')
    runner = CliRunner()
    loose = runner.invoke(main, ["check", "-c", str(path)])
    assert loose.exit_code == 0 and "warning: policy.input" in loose.stderr
    strict = runner.invoke(main, ["check", "--strict", "-c", str(path)])
    assert strict.exit_code == 2


@pytest.mark.parametrize("example", ["home.toml", "mail.toml", "office.toml", "lab/basic.toml"])
def test_the_examples_have_no_warnings(example: str) -> None:
    assert hazards(loads((REPO / "examples" / example).read_text())) == []


def test_a_snat_pool_that_leaves_masquerade_no_ports_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        loads(BASE + SSH + GATEWAY + '[processor.pools]\nsnat_ports = "1024-2000"\n')
    assert "processor.pools.snat_ports" in str(err.value)
    loads(BASE + SSH + GATEWAY + '[processor.pools]\nsnat_ports = "2000-3000"\n')


def test_stopped_steering_follows_the_fail_mode() -> None:
    for mode, stopped in (("closed", Drop), ("open", Return)):
        config = loads(BASE + SSH + GATEWAY + f'[processor]\nfail_mode = "{mode}"\n')
        rs = build(config, stopped=True)
        statements = [s for c in rs.chains for r in c.rules for s in r.statements]
        assert not any(isinstance(s, Queue) for s in statements)
        assert any(isinstance(s, stopped) for s in rs.chain("mangle_prerouting").rules[2].statements)
        assert [c.name for c in rs.chains if c.hook] == [c.name for c in build(config).chains if c.hook]


def test_the_unit_runs_before_the_network_and_reloads() -> None:
    unit = (REPO / "scripts" / "nfgate.service").read_text()
    assert "Before=network-pre.target" in unit and "Wants=network-pre.target" in unit
    assert "After=network-pre.target" not in unit
    assert "ExecReload=/opt/nfgate/.venv/bin/nfgate reload" in unit
    assert "KillMode=mixed" in unit
    assert "LimitNOFILE=1048576" in unit
