"""policy.fast_path on a kernel that has flowtables: Debian's stock kernel in the VM.

Why in a VM: our hosts' kernel has no flowtables (CONFIG_NF_FLOW_TABLE off; there
tests/firewall/test_fast_path_netns.py shows the apply going on without one).
The guest side is ``guest_fast_path.sh``, in the same boot as every other guest
check; it applies ``CONFIG`` with ``nfgate apply`` in a router namespace and
reports what it saw, one ``key=value`` line each:

- the flowtable holds the zone interfaces that exist, and apply names the one
  that does not (``ppp9``);
- a gateway-free TCP flow is offloaded (conntrack's ``[OFFLOAD]``), and
  conntrack still counts its bytes (the flowtable's counter flag);
- a flow with nfgate's connection mark (``rewritten``, as a gateway flow's
  legs, a log-only or offloaded gateway flow carry) is never offloaded, and
  conntrack counts it through the forward chain as before;
- a reload that removes the accepting rule (the tables ``nfgate apply``
  loads for it, rendered on the host): the established, offloaded flow goes
  on (as the ``established_related`` accept already lets it) and is
  offloaded again, a new connection is refused.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from firewall.config import loads
from firewall.rules import build, fast, nft

from . import harness

pytestmark = pytest.mark.vm

GUEST_SCRIPT = Path(__file__).with_name("guest_fast_path.sh")

CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0", "ppp9"]

[policy]
input = "drop"
forward = "drop"
fast_path = true
{rule}
[nat]
masquerade = ["wan"]

[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443
"""

LAN_OUT = """
[[rule]]
name = "lan-out"
from = "lan"
to = "wan"
"""


def prepare(out: Path) -> None:
    (out / "nfgate.toml").write_text(CONFIG.format(rule=LAN_OUT))
    # The reload's tables as `nfgate apply` loads them with the nft backend, for the guest's
    # interfaces: rendered here, since Python starts slowly in software emulation.
    rs = build(loads(CONFIG.format(rule="")))
    assert rs.fast is not None
    (out / "narrow.nft").write_text(nft.render(replace(rs, fast=None)))
    (out / "narrow_fast.nft").write_text(fast.render(rs.fast, ("wan0", "lan0")))


CHECK = harness.register(harness.GuestCheck(
    name="fast_path",
    argv=("bash", str(GUEST_SCRIPT), "{out}", "{python}", str(harness.REPO)),
    timeout=400,  # one nfgate apply: about 160 s in software emulation on a loaded host
    prepare=prepare,
))


@pytest.fixture(scope="module")
def guest() -> dict[str, list[str]]:
    res = harness.batch(timeout=harness.BATCH_TIMEOUT)[CHECK.name]
    found: dict[str, list[str]] = {}
    for line in res.log.splitlines():
        if line.startswith(("apply: ", "narrow: ")):
            found.setdefault(line.split(":")[0], []).append(line.split(": ", 1)[1])
            continue
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            found.setdefault(key, []).append(value)
    assert res.rc == 0 and "step" in found and found["step"][-1].startswith("done"), harness.describe(res)
    found["_describe"] = [harness.describe(res)]
    return found


def one(guest: dict[str, list[str]], key: str) -> str:
    assert key in guest, f"{key} missing\n{guest['_describe'][0]}"
    return guest[key][-1]


def most_bytes(lines: list[str]) -> int:
    """The largest original-direction byte count among conntrack lines (the data connection)."""
    return max(int(re.search(r"bytes=(\d+)", line).group(1)) for line in lines)


def sent_bytes(line: str) -> float:
    """iperf3's sender line: its transfer size in bytes."""
    m = re.search(r"([\d.]+) ([KMG])Bytes", line)
    assert m, line
    return float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def test_apply_loads_the_interfaces_that_exist(guest) -> None:
    assert one(guest, "apply_rc") == "0", guest["_describe"][0]
    apply = "\n".join(guest.get("apply", []))
    assert "fast path: interface ppp9 absent" in apply, apply
    assert "nft: replaced table inet nfgate_fast (flowtable on wan0, lan0)" in apply, apply
    assert sorted(one(guest, "devices").split(",")) == ["lan0", "wan0"]


def test_a_gateway_free_flow_is_offloaded_and_still_counted(guest) -> None:
    assert one(guest, "plain_offloaded") == "1", guest["_describe"][0]
    assert one(guest, "plain_rc") == "0"
    # The flowtable's counter flag keeps conntrack's accounting of the offloaded packets.
    assert most_bytes(guest["plain_ct"]) >= 0.95 * sent_bytes(one(guest, "plain_sent")), guest["plain_ct"]


def test_a_flow_with_nfgates_mark_stays_in_the_forward_chain(guest) -> None:
    assert one(guest, "marked_offloaded_while_running") == "0", guest["_describe"][0]
    assert one(guest, "marked_rc") == "0"
    assert all("mark=65536" in line for line in guest["marked_ct"]), guest["marked_ct"]
    assert most_bytes(guest["marked_ct"]) >= 0.95 * sent_bytes(one(guest, "marked_sent")), guest["marked_ct"]


def test_a_reload_without_the_rule_keeps_the_established_flow_only(guest) -> None:
    assert one(guest, "long_offloaded") == "1", guest["_describe"][0]
    assert one(guest, "narrow_rc") == "0"
    # Still carried after the table was replaced, and offloaded again.
    assert one(guest, "long_grew_after_narrow") == "1", guest["_describe"][0]
    assert one(guest, "long_offloaded_after_narrow") == "1", guest["_describe"][0]
    assert one(guest, "new_after_narrow_rc") != "0"

