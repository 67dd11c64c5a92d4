"""The kernel here checks every rendering it can.

- nft: ``nft -c -f`` inside a lab namespace. This kernel lacks nft's queue
  expression, so for configs with gateways the queue statements are swapped
  for ``accept`` before the check (everything else is checked as rendered);
  tests/vm/test_nft_queue.py proves the real queue statements on a stock
  kernel.
- iptables: each rendering is loaded for real, with iptables-nft and with
  iptables-legacy, into a namespace of its own, and read back.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from firewall.config import load
from firewall.rules import build, iptables, nft

ROOT = Path(__file__).parents[2]
EXAMPLES = ("home", "mail", "office")

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def router(module_lab_factory):
    """One basic lab for the module: the checks do not change its state (nft -c)
    or load into namespaces of their own (iptables)."""
    return module_lab_factory("basic")


@pytest.mark.parametrize("example", EXAMPLES)
def test_nft_rendering_passes_kernel_check(router, example: str) -> None:
    rs = build(load(ROOT / "examples" / f"{example}.toml"))
    # What `nfgate apply` loads first; policy.fast_path's table it loads apart, and only on a kernel
    # with flowtables (ours has none): tests/vm/test_fast_path.py loads it on Debian's.
    text = nft.render(replace(rs, fast=None))
    checked = re.sub(r"queue num \d+( bypass)?", "accept", text)
    assert ("queue num" in text) == rs.has_queue()
    result = router.run("router", ["nft", "-c", "-f", "-"], input=checked, check=False, text=True)
    assert result.returncode == 0, result.stderr
    # -c committed nothing.
    listed = router.run("router", ["nft", "list", "tables"], text=True).stdout
    assert "nfgate" not in listed


def test_nft_kernel_check_catches_a_bad_rule(router) -> None:
    bad = nft.render(build(load(ROOT / "examples" / "home.toml"))).replace("ct state invalid", "ct state bogus", 1)
    result = router.run("router", ["nft", "-c", "-f", "-"], input=bad, check=False, text=True)
    assert result.returncode != 0


@pytest.mark.parametrize("variant", ["nft", "legacy"])
@pytest.mark.parametrize("example", EXAMPLES)
def test_iptables_rendering_loads(router, example: str, variant: str) -> None:
    rs = build(load(ROOT / "examples" / f"{example}.toml"))
    # A namespace of the lab's own prefix, so the lab's teardown removes it too.
    ns = f"{router.prefix}-{example[:4]}{variant[:3]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for version, tool in ((4, "iptables"), (6, "ip6tables")):
            text = iptables.render(rs, version)
            result = subprocess.run(
                ["ip", "netns", "exec", ns, f"{tool}-{variant}-restore", "--noflush"],
                input=text, capture_output=True, text=True, timeout=30,
            )
            assert result.returncode == 0, result.stderr
            saved = subprocess.run(
                ["ip", "netns", "exec", ns, f"{tool}-{variant}-save"], capture_output=True, text=True, timeout=30
            ).stdout
            wanted = [line for line in text.splitlines() if line.startswith("-A ")]
            got = [line for line in saved.splitlines() if line.startswith("-A NFGATE-")]
            assert len(got) == len(wanted), (version, len(got), len(wanted))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# Run inside the namespace: the counters the kernel holds there, by name.
_READ_COUNTERS = r"""
import json, sys
from firewall import backend as be
from firewall.config import load
from firewall.rules import build
names = build(load(sys.argv[1])).counters
print(json.dumps(be.named_counters(sys.argv[2], names)))
"""


@pytest.mark.parametrize("variant", ["nft", "iptables", "iptables-legacy"])
def test_named_counters_read_back_from_each_backend(router, variant: str) -> None:
    """The IPv6 a gateway cannot take is counted by name (rules.build._ipv6_drops), and
    ``backend.named_counters`` reads every name back, whatever the backend."""
    config = ROOT / "examples" / "office.toml"
    rs = build(load(config))
    ns = f"{router.prefix}-cnt{variant[-3:]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        if variant == "nft":
            text = re.sub(r"queue num \d+( bypass)?", "accept", nft.render(rs))
            loads = [(["nft", "-f", "-"], text)]
        else:
            tool = "legacy" if variant == "iptables-legacy" else "nft"
            loads = [([f"ip6tables-{tool}-restore", "--noflush"], iptables.render(rs, 6))]
        for argv, text in loads:
            result = subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, capture_output=True, text=True,
                                    timeout=30)
            assert result.returncode == 0, result.stderr
        read = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _READ_COUNTERS, str(config), variant],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert read.returncode == 0, read.stderr
        counts = json.loads(read.stdout)
        assert sorted(counts) == sorted(rs.counters) and len(counts) >= 4, counts
        assert all(c == [0, 0] for c in counts.values()), counts
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
