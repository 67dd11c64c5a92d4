"""The fast path (``policy.fast_path``, firewall/rules/fast.py): its rendering, what it keeps off
the flowtable, the config's check, and what the backend loads when interfaces or the backend
do not allow it (dry runs: the interfaces are this process's). The kernel side is in
tests/firewall/test_fast_path_netns.py and, on a kernel with flowtables, tests/vm/test_fast_path.py."""

from __future__ import annotations

import pytest

from firewall import backend as be
from firewall.config import ConfigError, loads
from firewall.rules import build, fast, iptables, nft
from firewall.rules.model import FastPath

BASE = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0", "wlan0"]

[policy]
fast_path = true

[nat]
masquerade = ["wan"]
"""

GATEWAY = """
[[gateway]]
name = "relay"
kind = "tcp-relay"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443
"""


def offload_rule(text: str) -> str:
    (rule,) = [line.strip() for line in text.splitlines() if "flow add" in line]
    return rule


def test_off_by_default() -> None:
    rs = build(loads(BASE.replace("fast_path = true", "")))
    assert rs.fast is None
    assert fast.TABLE not in nft.render(rs)


def test_without_gateways_every_established_flow_may_take_it() -> None:
    rs = build(loads(BASE))
    assert rs.fast == FastPath(("wan0", "lan0", "wlan0"), 0)
    text = nft.render(rs)
    assert offload_rule(text) == (
        "ct state established meta l4proto { tcp, udp } counter flow add @ft "
        "comment \"policy.fast_path: an established flow the filter accepted, not one of nfgate's own\"")
    assert 'devices = { "wan0", "lan0", "wlan0" }' in text
    assert "type filter hook forward priority filter + 10; policy accept;" in text
    # The flowtable keeps conntrack's accounting (its counter flag).
    assert "\t\tcounter\n\t}" in text


def test_gateway_flows_stay_off_it() -> None:
    config = loads(BASE + GATEWAY)
    marks = config.processor.marks
    rs = build(config)
    assert rs.fast is not None and rs.fast.exclude == marks.rewritten | marks.allowed
    rule = offload_rule(nft.render(rs))
    # Both legs of a bound flow, log-only and offloaded gateway flows carry rewritten in the
    # connection's mark, a dynamic rule's flow allowed (docs/datapath.md, "Marks and loops").
    assert f"ct mark & {marks.rewritten | marks.allowed:#010x} == 0x00000000 counter flow add @ft" in rule
    # Stopped, the same: the filter and the fast path do not depend on the processor.
    assert build(config, stopped=True).fast == rs.fast


def test_iptables_rendering_says_where_the_flowtable_is() -> None:
    text = iptables.render(build(loads(BASE)), 4)
    assert "# policy.fast_path: nft's table inet nfgate_fast goes beside these" in text
    assert "flow" not in iptables.render(build(loads(BASE.replace("fast_path = true", ""))), 4)


def test_needs_established_related() -> None:
    with pytest.raises(ConfigError) as err:
        loads(BASE.replace("fast_path = true", "fast_path = true\nestablished_related = false"))
    assert "policy.fast_path" in str(err.value) and "established_related" in str(err.value)


def test_only_interfaces_that_exist_are_loaded() -> None:
    rs = build(loads(BASE.replace('["lan0", "wlan0"]', '["lo", "nfgnope0"]').replace('["wan0"]', '["nfgnope1"]')))
    report = be.Report("nft")
    be._apply_fast(rs, "nft", True, report)
    assert report.actions[0] == ("fast path: interfaces nfgnope1, nfgnope0 absent: flows through them take the "
                                 "forward chain until an apply or reload finds them")
    (load,) = report.actions[1:]
    assert 'devices = { "lo" }' in load


def test_no_interface_no_table() -> None:
    rs = build(loads(BASE.replace('["lan0", "wlan0"]', '["nfgnope0"]').replace('["wan0"]', '["nfgnope1"]')))
    report = be.Report("nft")
    be._apply_fast(rs, "nft", True, report)
    assert report.actions[-1] == "fast path: off: none of the zones' interfaces exists"


def test_iptables_legacy_has_none() -> None:
    rs = build(loads(BASE.replace('["lan0", "wlan0"]', '["lo"]')))
    report = be.Report("iptables-legacy")
    be._apply_fast(rs, "iptables-legacy", True, report)
    assert report.actions == ["fast path: off: the iptables-legacy backend keeps to the legacy tables, "
                              "and a flowtable is nftables' (policy.fast_path, docs/config.md)"]


def test_the_main_table_loads_without_it() -> None:
    """The filter's own transaction never names the flowtable: a kernel without one still takes it."""
    rs = build(loads(BASE.replace('["lan0", "wlan0"]', '["lo"]')))
    actions = be.apply(rs, "nft", dry_run=True).actions
    assert fast.TABLE not in actions[0] and f"table inet {nft.TABLE}" in actions[0]
    assert f"table inet {fast.TABLE}" in actions[-1]
