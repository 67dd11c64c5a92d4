"""udp-relay over IPv6 in the dual lab (issue 17): a real UDP peer sees the client's IPv6 address.

ext (2001:db8:2::10) routes lan's ULA through the router; lan runs socat as
a UDP echo that answers each datagram with the peer address it saw. The
router relays wan -> lan udp 5353 through a udp-relay, with an IPv6
firewall-side pool cut to 2 addresses x 5 ports, so that a flood of new
sources meets its end. A datagram from ext's link-local address (a martian
for a routed flow) gets no binding. A flow that has crossed the relay
``offload_after`` times each way is handed to the kernel, on the IPv6 table.
"""

from __future__ import annotations

import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from tests.conntrack import fast_conntrack
from tests.firewall.run_harness import Running
from tests.firewall.test_ipv6_netns import ZONES6, no_tentative_addresses
from tests.labconfig import RUN

pytestmark = pytest.mark.netns

LAN6 = "fd00:1::10"
POOL = 10  # firewall_side6 /127 x ports 40000-40004

CONFIG = ZONES6 + """
[[rule]]
name = "dns-in"
from = "wan"
to = "lan"
proto = "udp"
ports = 5353

[processor]
queues = [0]

[processor.pools]
ports = "40000-40004"
firewall_side6 = "fd6e:6667:6174:fe::/127"
""" + RUN + """
[[gateway]]
name = "dns"
kind = "udp-relay"

[gateway.settings]
idle_timeout = 3
offload_after = 3

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5353
"""

# Many new sources at once: one datagram from each of N fresh ports.
FLOOD = r"""
import socket, sys
for _ in range(int(sys.argv[2])):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"flood", (sys.argv[1], 5353))
"""

# One datagram from the given source address (ext's link-local, on eth0).
FROM = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0, 0, socket.if_nametoindex("eth0")))
for _ in range(3):
    s.sendto(b"martian", (sys.argv[2], 5353))
"""

# A client with a fixed source port: each datagram waits for its echo (bounded); prints the
# addresses the echo saw, one a line ("-": no answer). argv: DST SPORT COUNT
DATAGRAMS = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("", int(sys.argv[2])))
s.settimeout(2.0)
for i in range(int(sys.argv[3])):
    s.sendto(b"q%d\n" % i, (sys.argv[1], 5353))
    try:
        print(s.recvfrom(2048)[0].decode().strip().strip("[]"), flush=True)
    except OSError:
        print("-", flush=True)
"""


def ask_peer(lab, payload: str = "q") -> str:
    """One datagram from ext to lan's echo; the address the echo saw (empty: no reply)."""
    out = lab.run("ext", ["socat", "-t", "1", "-T", "2", "-", f"UDP6:[{LAN6}]:5353"], input=payload + "\n", check=False)
    return out.stdout.strip().strip("[]")


def test_udp_relay_over_ipv6_with_a_real_peer(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    # The datagram's line read first: an echo that exits before socat hands it over breaks its pipe.
    lab.popen("lan", ["socat", "UDP6-RECVFROM:5353,fork,reuseaddr", "SYSTEM:read x; echo $SOCAT_PEERADDR"])
    lab.wait_listening("lan", 5353, "udp")
    run = Running(lab, tmp_path, config=CONFIG)
    # Resolve the router first: a lone datagram sent while ext still resolves it was seen
    # to reach the queue rule but never the processor, for IPv4 as for IPv6 (TCP retries).
    lab.run("ext", ["ping", "-c", "1", "-W", "1", "2001:db8:2::1"], check=False)

    def counters() -> dict:
        return run.ask("status")["processors"]["processor-0"]["counters"]

    # The server sees ext's real IPv6 address, and its reply comes back through the relay.
    for _ in range(2):
        assert ip_address(ask_peer(lab)) == ip_address("2001:db8:2::10")
    assert wait_for(lambda: "open" in run.text() and "client=[2001:db8:2::10]" in run.text(), timeout=5,
                    what="the relay's open line for the IPv6 flow")
    assert counters()["flows.ipv6.opened"] == 2
    listed = lab.run("router", [sys.executable, "-m", "firewall.cli", "flows", "-c", str(run.path), "--json"]).stdout
    assert '"udp"' in listed and "2001:db8:2::10" in listed, listed

    fast_conntrack(lab, nf_conntrack_udp_timeout=2, nf_conntrack_udp_timeout_stream=2)  # for the ends below

    # A flood of new sources: never more bindings than the pool has, the rest refused and counted.
    before = counters()
    lab.run("ext", [sys.executable, "-c", FLOOD, LAN6, "40"])
    wait_for(lambda: counters()["queued"] - before["queued"] >= 40, timeout=10, what="the flood to be queued")
    after = counters()
    opened = after["flows.ipv6.opened"] - before["flows.ipv6.opened"]
    refused = after.get("drop.refused.pool_exhausted", 0) - before.get("drop.refused.pool_exhausted", 0)
    assert opened + refused == 40 and refused >= 40 - POOL, (opened, refused)
    assert run.ask("status")["processors"]["processor-0"]["flows_ipv6"] <= POOL

    # Conntrack's idle end (2 s UDP timeouts here) ends every binding: the pool is whole again.
    wait_for(lambda: run.ask("status")["processors"]["processor-0"]["flows_ipv6"] == 0, timeout=30, interval=0.3,
             what="the IPv6 UDP bindings to end with their connections")
    assert counters()["flows.ended.idle"] >= opened
    assert ip_address(ask_peer(lab)) == ip_address("2001:db8:2::10")

    # From a martian source (ext's link-local address): dropped, no binding, no signalling.
    ll = lab.run("ext", ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).stdout.split()[3].split("/")[0]
    before = counters()
    lab.run("ext", [sys.executable, "-c", FROM, ll, LAN6])
    wait_for(lambda: counters().get("drop.martian", 0) > before.get("drop.martian", 0), timeout=5,
             what="the martian datagram to be dropped")
    after = counters()
    assert after["flows.ipv6.opened"] == before["flows.ipv6.opened"]
    assert after.get("signalling.sent.new_flow", 0) == before.get("signalling.sent.new_flow", 0)

    # Offload: three echoes through the relay (the client waits for each, so nothing is in flight
    # at the hand-over: docs/datapath.md, "Offload"), then the kernel carries the flow: the next
    # datagram is queued once for its ALLOW, the rest not at all, and the server still sees ext.
    def echoes(count: int) -> list[str]:
        out = lab.run("ext", [sys.executable, "-c", DATAGRAMS, LAN6, "41000", str(count)], timeout=60).stdout
        return out.split()

    before = counters()
    assert [ip_address(a) for a in echoes(3)] == [ip_address("2001:db8:2::10")] * 3
    wait_for(lambda: counters().get("flows.offloaded", 0) == before.get("flows.offloaded", 0) + 1, timeout=10,
             interval=0.1, what="the IPv6 flow's offload")
    assert wait_for(lambda: "reason=offloaded" in run.text(), timeout=5, what="the relay's close line")
    queued = counters()["queued"]
    assert [ip_address(a) for a in echoes(10)] == [ip_address("2001:db8:2::10")] * 10
    after = counters()
    assert after["queued"] == queued + 1 and after.get("passed.offloaded", 0) == before.get("passed.offloaded", 0) + 1
    assert run.stop() == 0
