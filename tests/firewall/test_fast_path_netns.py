"""policy.fast_path on this kernel, in a lab router: the apply goes on whatever stops the flowtable.

Our hosts' kernel has no flowtables (CONFIG_NF_FLOW_TABLE off): the apply says
so and the firewall works without one. On a kernel that has them the same
test checks the table holds only the interfaces that exist. The offload itself
(conntrack's [OFFLOAD], nfgate's flows kept off, a reload) is proven on
Debian's stock kernel: tests/vm/test_fast_path.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.firewall.test_apply import CONFIG, GATEWAY, Server, nfgate, probe, write_config

pytestmark = pytest.mark.netns

FAST = CONFIG.replace('ping_from = ["lan"]', 'ping_from = ["lan"]\nfast_path = true').replace(
    'interfaces = ["lan0"]', 'interfaces = ["lan0", "ppp9"]')


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_a_missing_interface_or_flowtable_leaves_the_firewall_working(lab_factory, tmp_path: Path, backend: str) -> None:
    lab = lab_factory("basic")
    ext_srv = Server(lab, "ext", 9000)
    config = write_config(lab, tmp_path, FAST + GATEWAY.format(fail_mode="closed"))
    # An earlier apply's table (a kernel that had flowtables): replaced or removed, never left.
    lab.run("router", ["nft", "add", "table", "inet", "nfgate_fast"])
    result = nfgate(lab, "apply", "-c", config, "--backend", backend)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    listed = lab.run("router", ["nft", "list", "table", "inet", "nfgate_fast"], check=False)
    if backend == "iptables-legacy":
        assert "fast path: off: the iptables-legacy backend keeps to the legacy tables" in out, out
        assert listed.returncode != 0
    else:
        assert "fast path: interface ppp9 absent: flows through it take the forward chain" in out, out
        if "nft: replaced table inet nfgate_fast" in out:  # a kernel with flowtables
            assert "wan0" in listed.stdout and "lan0" in listed.stdout and "ppp9" not in listed.stdout
        else:
            assert "fast path: off: the kernel refused the flowtable" in out, out
            assert "CONFIG_NF_FLOW_TABLE" in out, out
            assert listed.returncode != 0
    # The firewall itself is whole: lan -> ext passes, masqueraded.
    assert probe(lab, "lan", "203.0.113.10", 9000)
    assert ext_srv.next_peer() == "203.0.113.1"
    lab.run("router", ["nft", "add", "table", "inet", "nfgate_fast"], check=False)
    assert nfgate(lab, "flush").returncode == 0
    assert lab.run("router", ["nft", "list", "table", "inet", "nfgate_fast"], check=False).returncode != 0
