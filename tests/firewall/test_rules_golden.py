"""Golden files: each example config, rendered in each format, byte for byte.

A change to the renderers or the builder shows up here as a diff that ops can
read. Regenerate after an intended change with
``NFGATE_REGEN_GOLDEN=1 scripts/test tests/firewall/test_rules_golden.py``
and review the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from firewall.config import load, loads
from firewall.rules import build, iptables, nft
from firewall.rules.model import Mark, Queue

ROOT = Path(__file__).parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = ("home", "mail", "office")
FORMATS = {"nft": lambda rs: nft.render(rs), "iptables": lambda rs: iptables.render(rs, 4), "ip6tables": lambda rs: iptables.render(rs, 6)}


def rendered(example: str, fmt: str) -> str:
    rs = build(load(ROOT / "examples" / f"{example}.toml"))
    rs.source = f"examples/{example}.toml"  # independent of where the checkout lives
    return FORMATS[fmt](rs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_golden(example: str, fmt: str) -> None:
    path = GOLDEN / f"{example}.{fmt}"
    text = rendered(example, fmt)
    if os.environ.get("NFGATE_REGEN_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with NFGATE_REGEN_GOLDEN=1 and review it"
    assert text == path.read_text()


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_rule_says_where_it_comes_from(example: str) -> None:
    text = rendered(example, "nft")
    # A flowtable's bare ``counter`` line is its accounting flag, not a rule (policy.fast_path).
    rules = [line.strip() for line in text.splitlines()
             if line.startswith("\t\t") and "counter" in line and line.strip() != "counter"]
    assert rules
    assert all(' comment "' in r for r in rules)
    ipt = rendered(example, "iptables")
    assert all("-m comment --comment" in line for line in ipt.splitlines() if line.startswith("-A "))


def test_rendering_is_deterministic() -> None:
    assert rendered("office", "nft") == rendered("office", "nft")
    assert rendered("office", "iptables") == rendered("office", "iptables")


GATEWAY_ONLY = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]

[[gateway]]
name = "ftp"
kind = "ftp"
[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 21
"""


def test_dynamic_rules_are_marks_whenever_there_are_gateways() -> None:
    """No port forward, no masquerade: the static rules still act on the marks the
    binding table's dynamic sets give (docs/datapath.md, "Dynamic rules")."""
    config = loads(GATEWAY_ONLY)
    rs = build(config)
    marks = config.processor.marks
    mangle = rs.chain("mangle_prerouting")
    assert any(Mark(marks.expect, marks.expect_value(0)) in r.matches and isinstance(r.statements[0], Queue)
               for r in mangle.rules)
    forward = rs.chain("forward")
    assert any(Mark(marks.allowed, marks.allowed) in r.matches for r in forward.rules)
    text = nft.render(rs)
    assert "set expect_0 {" in text and "map dnat_0_any {" in text and "set allow_dnat_0 {" in text
    # Without gateways nothing of it is rendered.
    plain = build(loads(GATEWAY_ONLY.split("[[gateway]]")[0]))
    assert plain.bind is None and "nfgate_bind" not in nft.render(plain)
