"""IPv6 in the dual lab: no IPv6 packet on a selector's port skips its gateway (issue 17).

ext (203.0.113.10, 2001:db8:2::10) - router - lan (192.168.1.10,
fd00:1::10). The router relays lan's outbound tcp 9000 and udp 5353
through a tcp-relay and a udp-relay (whose selectors name IPv4 addresses,
so they take IPv4 only), and a rule accepts everything from
lan to wan, for both IP versions: before issue 17 the IPv6 part of that
rule carried lan's IPv6 to ext:9000 around the relay. A counter in ext's
own namespace, before anything else there sees a packet, is the server
side's capture.
"""

from __future__ import annotations

import json
import os
import signal
from ipaddress import ip_address
import re
import subprocess
import sys
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running, Server, probe
from tests.firewall.test_offload_netns import BULK, lines
from tests.labconfig import RUN

pytestmark = pytest.mark.netns

EXT6 = "2001:db8:2::10"
W6_ROUTER = "2001:db8:2::1"  # the router's address on wan

# The dual lab's two zones, by interface only (both families), and a router
# that drops what no rule passes: the start of every config here.
ZONES6 = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[policy]
forward = "drop"
input = "drop"
"""

CONFIG = ZONES6 + """
[[rule]]
name = "lan-out"
from = "lan"
to = "wan"

[nat]
masquerade = ["wan"]

[processor]
queues = [0]
""" + RUN + """
[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000
daddr = ["203.0.113.0/24"]  # addresses: a tcp-relay selector that still takes IPv4 only

[[gateway]]
name = "dns"
kind = "udp-relay"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "udp"
ports = 5353
daddr = ["203.0.113.0/24"]  # likewise a udp-relay selector that takes IPv4 only
"""

# ext counts every IPv6 packet that reaches it for the gated ports, and for
# 9001, a port no selector names (the control: the capture sees IPv6).
CAPTURE = """
table inet seen {
\tcounter gated { }
\tcounter control { }
\tchain pre {
\t\ttype filter hook prerouting priority raw - 10; policy accept;
\t\tmeta nfproto ipv6 tcp dport 9000 counter name "gated"
\t\tmeta nfproto ipv6 udp dport 5353 counter name "gated"
\t\tmeta nfproto ipv6 tcp dport 9001 counter name "control"
\t}
}
"""

# A bare ACK in the middle of nowhere, over IPv6: conntrack picks it up as a
# new connection (nf_conntrack_tcp_loose), the way a mid-stream packet would.
LONE_ACK = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.setsockopt(socket.IPPROTO_IPV6, 7, 16)  # IPV6_CHECKSUM: the kernel fills in TCP's at offset 16
tcp = struct.pack("!HHIIBBHHH", 40000, int(sys.argv[2]), 1000, 2000, 5 << 4, 0x10, 65535, 0, 0)
for _ in range(3):
    s.sendto(tcp, (sys.argv[1], 0))
"""


def seen(lab, name: str, host: str = "ext") -> int:
    """Packets of ``host``'s capture counter ``name`` (table inet seen)."""
    out = json.loads(lab.run(host, ["nft", "-j", "list", "counter", "inet", "seen", name]).stdout)
    return next(item["counter"]["packets"] for item in out["nftables"] if "counter" in item)


def no_tentative_addresses(lab) -> None:
    """DAD is off in the lab; a tentative address would still say otherwise."""
    for host in lab.topology.host_names:
        wait_for(lambda: not lab.run(host, ["ip", "-6", "addr", "show", "tentative"]).stdout.strip(),
                 timeout=5, interval=0.05, what=f"{host}'s IPv6 addresses to leave DAD")


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_no_ipv6_on_a_selectors_port_skips_the_gateway(lab_factory, tmp_path: Path, backend: str) -> None:
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["nft", "-f", "-"], input=CAPTURE)
    outside = Server(lab, "ext", 9000, addr="::")
    Server(lab, "ext", 5353, "udp", addr="::")
    run = Running(lab, tmp_path, config=CONFIG, backend=backend)

    # IPv4 goes through the relay, as before.
    assert probe(lab, "lan", "203.0.113.10", 9000)
    assert outside.next_peer() == "203.0.113.1"
    assert wait_for(lambda: re.search(r"relay open .*client=192\.168\.1\.10:\d+ original_dst=203\.0\.113\.10:9000",
                                      run.text()), timeout=5, what="the relay's log line")
    assert probe(lab, "lan", "203.0.113.10", 5353, "udp")
    queued = run.ask("status")["processors"]["processor-0"]["counters"]["queued"]

    # IPv6 on the same ports: dropped on the router, none of it reaches ext.
    assert not probe(lab, "lan", EXT6, 9000, timeout=1.0)
    assert not probe(lab, "lan", EXT6, 5353, "udp", timeout=1.0)
    lab.run("lan", [sys.executable, "-c", LONE_ACK, EXT6, "9000"])
    # The control: IPv6 to a port no selector names does reach ext (ext has
    # no route back to the ULA, so it only counts the SYN).
    assert not probe(lab, "lan", EXT6, 9001, timeout=1.0)
    assert wait_for(lambda: seen(lab, "control") > 0, timeout=5, what="lan's IPv6 to ext:9001 to arrive")
    assert seen(lab, "gated") == 0

    # Counted by name, in the kernel, and shown by nfgate status.
    status = lab.run("router", [sys.executable, "-m", "firewall.cli", "status", "-c", str(run.path), "--json"])
    dropped = json.loads(status.stdout)["ipv6_dropped"]
    assert dropped["ipv6_drop_g0_0"]["packets"] >= 2, dropped  # the SYN (and its retry), the lone ACKs
    assert dropped["ipv6_drop_g1_0"]["packets"] >= 1, dropped
    assert "gateway relay (tcp-relay)" in dropped["ipv6_drop_g0_0"]["what"]
    text = lab.run("router", [sys.executable, "-m", "firewall.cli", "status", "-c", str(run.path)]).stdout
    assert re.search(r"ipv6_drop_g0_0 = [1-9]\d* packets", text), text
    # Never queued: the processor saw none of it.
    assert run.ask("status")["processors"]["processor-0"]["counters"]["queued"] == queued

    # Stopped (fail closed), the static rules keep dropping it.
    assert run.stop() == 0
    assert not probe(lab, "lan", EXT6, 9000, timeout=1.0)
    assert seen(lab, "gated") == 0


NAT66 = ZONES6 + """
[[rule]]
name = "lan-out6"
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000
daddr = ["2001:db8:2::/64"]

[[rule]]
name = "ssh"
from = "lan"
to = "router"
proto = "tcp"
ports = 22

[nat]
masquerade6 = ["wan"]

[[nat.forward]]
name = "web6"
from = "wan"
proto = "tcp"
port = 8080
to = "[fd00:1::10]:80"

[[nat.forward]]
name = "web"
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"
"""


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_dual_stack_port_forward_masquerade6_and_rules(lab_factory, tmp_path: Path, backend: str) -> None:
    """DNAT66 to a lan host (the server sees the real client), NAT66 out of wan
    (ext, with no route to the ULA, sees the router), an IPv6-only rule."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    path = tmp_path / "nfgate.toml"
    path.write_text(NAT66)
    applied = lab.run("router", [sys.executable, "-m", "firewall.cli", "apply", "-c", str(path), "--backend", backend],
                      check=False)
    assert applied.returncode == 0, applied.stderr
    web = lab.popen("lan", [sys.executable, "-m", "http.server", "80", "--bind", "::"], cwd=tmp_path,
                    stderr=subprocess.PIPE, text=True)
    lab.wait_listening("lan", 80)
    echo = lab.popen("ext", ["socat", "TCP6-LISTEN:9000,reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"])
    lab.wait_listening("ext", 9000)

    # One port, both versions: each forward DNATs its own.
    for url in ("http://[2001:db8:2::1]:8080/", "http://203.0.113.1:8080/"):
        got = lab.run("ext", ["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url])
        assert got.stdout == "200", got
    seen = [wait_for(web.stderr.readline, timeout=5, what="the web server's log").split()[0] for _ in range(2)]
    assert seen == ["2001:db8:2::10", "::ffff:203.0.113.10"], seen

    # NAT66 out of wan: ext answers the router's address (it has no route to fd00:1::/64).
    out = lab.run("lan", ["socat", "-T", "5", "-", "TCP6:[2001:db8:2::10]:9000"], input="")
    assert ip_address(out.stdout.strip().strip("[]")) == ip_address("2001:db8:2::1"), out
    # The rule is IPv6-only: IPv4 to the same port meets the forward policy.
    assert not probe(lab, "lan", "203.0.113.10", 9000, timeout=1.0)
    assert echo.poll() is None and web.poll() is None


NPT6 = ZONES6 + """
[[rule]]
name = "lan-out"
from = "lan"
to = "wan"

[[rule]]
name = "web-in"
from = "wan"
to = "lan"
proto = "tcp"
ports = 80
daddr = ["fd00:1::10/128"]

[[rule]]
name = "ssh"
from = "lan"
to = "router"
proto = "tcp"
ports = 22

[nat]
masquerade6 = ["wan"]

[[nat.npt6]]
name = "lan"
zone = "wan"
inside = "fd00:1::/64"
outside = "2001:db8:3::/64"
"""


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_npt6_maps_the_ula_prefix_both_ways(lab_factory, tmp_path: Path, backend: str) -> None:
    """[[nat.npt6]]: lan's ULA leaves as 2001:db8:3::/64 with its host bits (before the zone's
    masquerade6), and that prefix, routed to the router, reaches lan; the filter still decides."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:2::1"])
    path = tmp_path / "nfgate.toml"
    path.write_text(NPT6)
    applied = lab.run("router", [sys.executable, "-m", "firewall.cli", "apply", "-c", str(path), "--backend", backend],
                      check=False)
    assert applied.returncode == 0, applied.stderr
    lab.popen("ext", ["socat", "TCP6-LISTEN:9000,reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"])
    lab.wait_listening("ext", 9000)
    web = lab.popen("lan", [sys.executable, "-m", "http.server", "80", "--bind", "::"], cwd=tmp_path,
                    stderr=subprocess.PIPE, text=True)
    lab.wait_listening("lan", 80)

    out = lab.run("lan", ["socat", "-T", "5", "-", "TCP6:[2001:db8:2::10]:9000"], input="")
    assert ip_address(out.stdout.strip().strip("[]")) == ip_address("2001:db8:3::10"), out
    got = lab.run("ext", ["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                          "http://[2001:db8:3::10]:80/"])
    assert got.stdout == "200", got
    assert wait_for(web.stderr.readline, timeout=5, what="the web server's log").split()[0] == "2001:db8:2::10"
    # Only what a rule accepts comes in: port 81 of the same host does not.
    refused = lab.run("ext", ["curl", "-sS", "-g", "--max-time", "1", "http://[2001:db8:3::10]:81/"], check=False)
    assert refused.returncode == 28, refused  # timed out: dropped, not refused by lan


TO_ROUTER = ZONES6 + """
[[rule]]
name = "ssh"
from = "lan"
to = "router"
proto = "tcp"
ports = 22

[[rule]]
name = "tunnel-in"
from = "wan"
to = "router"
proto = "tcp"
ports = [7443, 7444]

[processor]
queues = [0]
""" + RUN + """
[[gateway]]
name = "tun"
kind = "tunnel"

[[gateway.traffic]]
from = "wan"
to = "router"
proto = "tcp"
ports = 7443
saddr = ["0.0.0.0/0"]  # IPv4 addresses: the selector takes IPv4 only (the tunnel kind takes both)

[[gateway.traffic]]
from = "wan"
to = "router"
proto = "udp"
ports = 7443
saddr = ["0.0.0.0/0"]

[[nat.forward]]
name = "web"
from = "wan"
proto = "tcp"
port = 8443
to = "192.168.1.10:443"

[[gateway]]
name = "web"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443
"""


def test_ipv6_to_a_terminating_gateways_port_is_dropped_counted(lab_factory, tmp_path: Path) -> None:
    """A to = "router" selector: IPv6 to the router's own port is dropped in input, by name,
    even though a [[rule]] accepts that port for both versions; a port no selector names is not.
    Likewise IPv6 to an IPv4 port forward's port that a selector takes (the issue's
    "router:8443 silently times out")."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    path = tmp_path / "nfgate.toml"
    path.write_text(TO_ROUTER.format(gwns=f"{lab.prefix}-gw", tmp=tmp_path))
    checked = lab.run("router", [sys.executable, "-m", "firewall.cli", "check", "-c", str(path)])
    assert "IPv6 on its selectors' ports: dropped, counted as ipv6_drop_g0_0, ipv6_drop_g0_1" in checked.stdout
    assert "rule[1] accepts this traffic over IPv6 too" in checked.stderr
    lab.run("router", [sys.executable, "-m", "firewall.cli", "apply", "-c", str(path), "--backend", "iptables"])
    # Something on the router's own stack listens on both ports, both versions.
    Server(lab, "router", 7443, addr="::")
    Server(lab, "router", 7444, addr="::")
    assert not probe(lab, "ext", "2001:db8:2::1", 7443, timeout=1.0)
    assert probe(lab, "ext", "2001:db8:2::1", 7444)
    saved = lab.run("router", ["ip6tables-nft-save", "-c"]).stdout
    (count,) = re.findall(r"^\[(\d+):\d+\] -A NFGATE-INPUT .*ipv6_drop_g0_0: ", saved, re.M)
    assert int(count) >= 1, saved
    # The IPv4 port forward's port, over IPv6 to the router: dropped under the selector's counter,
    # though something listens there.
    Server(lab, "router", 8443, addr="::")
    assert not probe(lab, "ext", "2001:db8:2::1", 8443, timeout=1.0)
    saved = lab.run("router", ["ip6tables-nft-save", "-c"]).stdout
    (count,) = re.findall(r"^\[(\d+):\d+\] -A NFGATE-INPUT .*ipv6_drop_g1_0: ", saved, re.M)
    assert int(count) >= 1, saved


RELAY6 = ZONES6 + """
[[rule]]
name = "in"
from = "wan"
to = "lan"
proto = "tcp"
ports = [9000, 25]

[processor]
queues = [0]
fail_mode = "open"
""" + RUN + """
[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000

[[gateway]]
name = "mail"
kind = "smtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 25
daddr = ["192.168.1.0/24"]  # IPv4 addresses: this selector takes IPv4 only
"""


def test_tcp_relay_over_ipv6_on_the_kernel_maps(lab_factory, tmp_path: Path) -> None:
    """ext's IPv6 to lan's server through a tcp-relay: the processor binds it in the IPv6 maps, the
    relay connects leg B over IPv6, the server sees the client's real IPv6 address. IPv4 goes
    through the same relay; IPv6 on the port of the smtp selector, which names IPv4 addresses,
    is still dropped and counted."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    # ext routes to lan's prefixes through the router: no NAT66 in this config.
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    lab.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", "203.0.113.1"])
    server = Server(lab, "lan", 9000, addr="::")
    Server(lab, "lan", 25, addr="::")
    run = Running(lab, tmp_path, config=RELAY6)
    checked = lab.run("router", [sys.executable, "-m", "firewall.cli", "check", "-c", str(run.path)]).stdout
    assert "through the gateway for gateway[0].traffic[0]" in checked, checked
    assert "dropped, counted as ipv6_drop_g1_0" in checked, checked

    for _ in range(3):
        assert probe(lab, "ext", "fd00:1::10", 9000)
        assert server.next_peer() == "2001:db8:2::10"
    assert wait_for(lambda: re.search(r"relay open .*client=\[?2001:db8:2::10\]?:\d+", run.text()), timeout=5,
                    what="the relay's log line for the IPv6 flow")
    assert probe(lab, "ext", "192.168.1.10", 9000)
    assert server.next_peer() == "203.0.113.10"
    counters = run.ask("status")["processors"]["processor-0"]["counters"]
    assert counters["flows.ipv6.opened"] == 3, counters
    # curl over IPv6 too (an HTTP request the echo server answers with what it saw).
    curl = lab.run("ext", ["curl", "-s", "-m", "5", "--http0.9", "http://[fd00:1::10]:9000/"], check=False)
    assert curl.returncode in (0, 52, 56), curl  # the echo server is no HTTP server: reached is what counts
    assert server.next_peer() == "2001:db8:2::10"

    # The binding ends with its connections: FLOW_END, the IPv6 pool entry back.
    assert wait_for(lambda: run.ask("status")["processors"]["processor-0"].get("flows_ipv6", 1) == 0, timeout=20,
                    interval=0.2, what="the IPv6 bindings to end")

    # The smtp selector takes IPv4 only: its IPv6 is dropped by the ruleset, counted, never queued.
    queued = run.ask("status")["processors"]["processor-0"]["counters"]["queued"]
    assert not probe(lab, "ext", "fd00:1::10", 25, timeout=1.0)
    status = lab.run("router", [sys.executable, "-m", "firewall.cli", "status", "-c", str(run.path), "--json"])
    dropped = json.loads(status.stdout)["ipv6_dropped"]
    assert dropped["ipv6_drop_g1_0"]["packets"] >= 1, dropped
    assert dropped["ipv6_drop_g0_0"]["packets"] == 0, dropped  # nothing skipped the relay
    assert run.ask("status")["processors"]["processor-0"]["counters"]["queued"] == queued

    # Stopped with fail_mode = "open": IPv4 passes to the server directly, as the filter allows,
    # but the relay selector's IPv6 is dropped and counted: it never skips the gateway.
    assert run.stop() == 0
    assert probe(lab, "ext", "192.168.1.10", 9000)
    assert server.next_peer() == "203.0.113.10"
    assert not probe(lab, "ext", "fd00:1::10", 9000, timeout=1.0)
    saved = lab.run("router", ["ip6tables-nft-save", "-c"]).stdout
    (count,) = re.findall(r"^\[(\d+):\d+\] -A NFGATE-FORWARD .*ipv6_drop_g0_0: ", saved, re.M)
    assert int(count) >= 1, saved


SELECTOR6 = ZONES6 + """
[[rule]]
name = "in"
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000

[processor]
queues = [0]
""" + RUN + """
[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000
daddr = ["192.168.1.10", "fd00:1::10"]
"""


def test_a_selector_with_ipv6_addresses_takes_only_the_ipv6_it_names(lab_factory, tmp_path: Path) -> None:
    """daddr names fd00:1::10: IPv6 to it goes through the relay; IPv6 to lan's other address on the
    same port is the filter's (its rule accepts it), neither relayed nor dropped."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("lan", ["ip", "-6", "addr", "add", "fd00:1::20/64", "dev", "eth0", "nodad"])
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    server = Server(lab, "lan", 9000, addr="::")
    run = Running(lab, tmp_path, config=SELECTOR6)

    def opened() -> int:
        return run.ask("status")["processors"]["processor-0"]["counters"].get("flows.ipv6.opened", 0)

    assert probe(lab, "ext", "fd00:1::10", 9000)
    assert server.next_peer() == "2001:db8:2::10"
    assert opened() == 1
    assert wait_for(lambda: re.search(r"relay open .*original_dst=\[fd00:1::10\]:9000", run.text()), timeout=5,
                    what="the relay's log line")
    assert probe(lab, "ext", "fd00:1::20", 9000)
    assert server.next_peer() == "2001:db8:2::10"
    assert opened() == 1 and "fd00:1::20" not in run.text()
    status = lab.run("router", [sys.executable, "-m", "firewall.cli", "status", "-c", str(run.path), "--json"])
    assert json.loads(status.stdout)["ipv6_dropped"]["ipv6_drop_g0_0"]["packets"] == 0


# One IPv6 connection through the relay, held open across whatever the test does on "go".
HELD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=10)
s.sendall(b"before\n")
print(s.recv(100).decode().strip(), flush=True)
sys.stdin.readline()
s.sendall(b"after\n")
print(s.recv(100).decode().strip(), flush=True)
s.close()
"""


def test_kill_9_of_the_processor_keeps_an_ipv6_relay_flow_and_adopts_it(lab_factory, tmp_path: Path) -> None:
    """The kernel carries the IPv6 flow while the processor is gone; the new one adopts its binding
    from conntrack (same tuples, same F6:f), and it ends with its connections (FLOW_END, pool)."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    lab.popen("lan", ["socat", "TCP6-LISTEN:9000,reuseaddr,fork", "EXEC:cat"])
    lab.wait_listening("lan", 9000)
    run = Running(lab, tmp_path, config=RELAY6)

    def proc() -> dict:
        return run.ask("status")["processors"]["processor-0"]

    client = lab.popen("ext", [sys.executable, "-u", "-c", HELD, "fd00:1::10"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    assert wait_for(client.stdout.readline, timeout=10, what="the first echo").strip() == "before"
    (flow,) = [f for f in run.ask("flows") if "ipv6" in f["state"]]
    old = proc()["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: proc().get("pid") not in (None, old), timeout=10, interval=0.1,
             what="the supervisor to restart the processor", ignore=(KeyError, OSError))
    assert proc()["counters"]["flows.ipv6.adopted"] == 1
    (adopted,) = [f for f in run.ask("flows") if "ipv6" in f["state"]]
    for key in ("client", "original_dst", "server", "firewall_side", "ag", "ag_eport"):
        assert adopted[key] == flow[key], (key, adopted, flow)
    client.stdin.write("go\n")
    client.stdin.flush()
    assert wait_for(client.stdout.readline, timeout=10, what="the echo after the restart").strip() == "after"
    assert client.wait(timeout=10) == 0
    assert proc()["counters"].get("queued", 0) == 0  # the new processor saw nothing of it
    wait_for(lambda: proc()["flows_ipv6"] == 0, timeout=20, interval=0.2, what="the adopted IPv6 binding to end")
    assert proc()["counters"]["signalling.sent.flow_end"] >= 1


TWO_QUEUES = ZONES6 + """
[[rule]]
name = "in"
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000

[processor]
queues = [0, 1]
""" + RUN + """
[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000
"""

# One echo exchange from a given source address: what the server answered.
FROM_SOURCE = r"""
import socket, sys
s = socket.create_connection((sys.argv[2], 9000), timeout=5, source_address=(sys.argv[1], 0))
s.sendall(b"ping")
print(s.recv(100).decode())
"""


def test_two_processor_instances_share_ipv6_by_the_clients_address(lab_factory, tmp_path: Path) -> None:
    """queues = [0, 1]: a client whose address ends in an even bit goes to instance 0, an odd one to
    instance 1, each binding from its own slice of the IPv6 pool; the gateway asks the right one."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "addr", "add", "2001:db8:2::11/64", "dev", "eth0", "nodad"])
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    server = Server(lab, "lan", 9000, addr="::")
    run = Running(lab, tmp_path, config=TWO_QUEUES)
    for source in ("2001:db8:2::10", "2001:db8:2::11"):
        out = lab.run("ext", [sys.executable, "-c", FROM_SOURCE, source, "fd00:1::10"], timeout=20)
        assert out.stdout.strip() == "echo:ping", out
        assert server.next_peer() == source
    procs = run.ask("status")["processors"]
    assert [procs[f"processor-{i}"]["counters"].get("flows.ipv6.opened") for i in (0, 1)] == [1, 1], procs
    sides = {f["firewall_side"].rsplit(":", 1)[0] for f in run.ask("flows") if "ipv6" in f["state"]}
    assert sides == {"[fd6e:6667:6174:fe::]", "[fd6e:6667:6174:fe::8]"}, sides  # each instance's own slice


MASQ6 = ZONES6 + """
[[rule]]
name = "lan-out"
from = "lan"
to = "wan"

[nat]
masquerade6 = ["wan"]

[processor]
queues = [0]
""" + RUN + """
[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = [9000, 9001]

[[gateway]]
name = "logger"
kind = "tcp-relay"
[gateway.settings]
mode = "log-only"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9002
"""


def test_ipv6_into_a_masquerade6_zone_through_a_relay_and_a_log_only_relay(lab_factory, tmp_path: Path) -> None:
    """ext has no route to lan's ULA fd00:1::/64: only the router's W6 can be answered. Through the
    tcp-relay, leg B leaves from W6:w (the server sees the router, a download arrives intact); through
    the log-only tcp-relay the kernel carries the flow (one packet queued, its masquerade6 applies) and
    the gateway logs conntrack's bytes."""
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    server = Server(lab, "ext", 9000, addr="::")
    for port in (9001, 9002):
        lab.popen("ext", [sys.executable, "-u", BULK, "serve", str(port), "::"], stdout=subprocess.DEVNULL)
        lab.wait_listening("ext", port, "tcp")
    run = Running(lab, tmp_path, config=MASQ6)

    def processor() -> dict:
        return run.ask("status")["processors"]["processor-0"]

    assert probe(lab, "lan", EXT6, 9000)
    assert server.next_peer() == W6_ROUTER
    got = lab.run("lan", [sys.executable, BULK, "get", EXT6, "9001", "8"], check=False, timeout=60)
    assert got.returncode == 0 and "intact" in got.stdout, got.stdout + got.stderr
    proc = processor()
    assert proc["counters"]["flows.ipv6.opened"] == 2 and "drop.ipv6.masquerade6" not in proc["counters"], proc
    assert proc["pools"]["snat"][W6_ROUTER]["used"] <= 2, proc["pools"]
    assert wait_for(lambda: len(re.findall(r"relay open .*client=\[fd00:1::10\]:\d+", run.text())) == 2, timeout=5,
                    what="the relay's two open lines")

    queued = processor()["counters"]["queued"]
    got = lab.run("lan", [sys.executable, BULK, "get", EXT6, "9002", "8"], check=False, timeout=60)
    assert got.returncode == 0 and "intact" in got.stdout, got.stdout + got.stderr
    counters = processor()["counters"]
    assert counters["queued"] == queued + 1 and counters["verdict.logged"] == 1, counters  # the SYN, then the kernel's
    (flow,) = wait_for(lambda: lines(run, "logger", "flow"), timeout=20, interval=0.2, what="the log-only flow line")
    assert flow["client"].startswith("[fd00:1::10]:") and flow["server"] == f"[{EXT6}]:9002", flow
    assert 8 << 20 < int(flow["bytes_down"]) < (8 << 20) * 1.05 and int(flow["bytes_up"]) > 0, flow
    assert processor()["counters"]["queued"] == queued + 1
    status = lab.run("router", [sys.executable, "-m", "firewall.cli", "status", "-c", str(run.path), "--json"])
    dropped = json.loads(status.stdout)["ipv6_dropped"]
    assert all(d["packets"] == 0 for d in dropped.values()), dropped  # nothing skipped a gateway
