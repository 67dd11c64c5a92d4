"""Datapath v2 end to end: the kernel carries every gateway flow after its first packet.

`nfgate run` in the basic lab (tests/firewall/run_harness.py): ext
203.0.113.10 -> router:8443 -> tcp-relay -> lan 192.168.1.10:443, with
real peers (tests/bulkpeer.py) moving known bytes checked by sha256. Each
test is one promise of docs/datapath.md, "The kernel carries every gateway
flow", checked against the kernel's own counters and tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running

pytestmark = pytest.mark.netns

BULK = str(Path(__file__).parents[1] / "bulkpeer.py")
WAN, EXT, LAN = "203.0.113.1", "203.0.113.10", "192.168.1.10"


def processor(run: Running) -> dict:
    return run.ask("status")["processors"]["processor-0"]


def running(lab, tmp_path: Path, **kw: str) -> Running:
    """`nfgate run`, once its processor answers with counters."""
    run = Running(lab, tmp_path, **kw)
    wait_for(lambda: "counters" in processor(run), timeout=10, interval=0.1, what="the processor to answer")
    return run


def counter(run: Running, name: str) -> int:
    return int(processor(run)["counters"].get(name, 0))


def serve(lab) -> subprocess.Popen:
    proc = lab.popen("lan", [sys.executable, "-u", BULK, "serve", "443"], stdout=subprocess.PIPE, text=True)
    lab.wait_listening("lan", 443, "tcp")
    return proc


def fetch(lab, mb: int) -> bool:
    """A real client's download through the tcp-relay, intact."""
    got = lab.run("ext", [sys.executable, BULK, "get", WAN, "8443", str(mb)], check=False, timeout=120)
    return got.returncode == 0 and "intact" in got.stdout


def map_elements(lab) -> int:
    out = lab.run("router", ["nft", "-j", "list", "table", "ip", "nfgate_bind"]).stdout
    items = json.loads(out)["nftables"]
    return sum(len(i["map"].get("elem", [])) for i in items if "map" in i)


def test_an_established_flow_never_reaches_the_processor(lab_factory, tmp_path: Path) -> None:
    """100 MB through the tcp-relay: the processor sees the two first packets (one per leg), nothing more."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path)
    before = counter(run, "queued")
    got = lab.run("ext", [sys.executable, BULK, "get", WAN, "8443", "100"], check=False, timeout=120)
    assert got.returncode == 0 and "intact" in got.stdout, got.stdout + got.stderr
    queued = counter(run, "queued") - before
    assert 2 <= queued <= 4, queued  # leg A's SYN, leg B's SYN (and a retransmission at most)
    assert counter(run, "verdict.bound") == 2


def test_a_strict_reverse_path_filter_carries_gateway_flows(lab_factory, tmp_path: Path) -> None:
    """rp_filter = 1 everywhere on the router: inbound (port forward) and outbound (masquerade)
    relayed flows still work, since the blind track only ever carries the gateway's address."""
    lab = lab_factory("basic")
    serve(lab)
    lab.run("router", ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1"])
    outside = lab.popen("ext", [sys.executable, "-u", BULK, "serve", "9000"], stdout=subprocess.PIPE, text=True)
    lab.wait_listening("ext", 9000, "tcp")
    run = running(lab, tmp_path)
    assert lab.run("router", ["sysctl", "-n", "net.ipv4.conf.nfg-gw0.rp_filter"]).stdout.strip() == "1"
    assert fetch(lab, 5)
    got = lab.run("lan", [sys.executable, BULK, "get", EXT, "9000", "5"], check=False, timeout=120)
    assert got.returncode == 0 and "intact" in got.stdout, got.stdout + got.stderr
    assert counter(run, "flows.opened") == 2 and counter(run, "verdict.drop") == 0
    outside.terminate()


def test_ipv6_to_a_gateway_port_never_reaches_the_processor(lab_factory, tmp_path: Path) -> None:
    """The gateways are IPv4: a TCP SYN over IPv6 to the relayed port is the kernel's
    (filtered by the IPv6 ruleset), never queued, never bound."""
    lab = lab_factory("basic")
    lab.run("router", ["ip", "-6", "address", "add", "fd00:77::1/64", "dev", "wan0", "nodad"])
    lab.run("ext", ["ip", "-6", "address", "add", "fd00:77::10/64", "dev", "eth0", "nodad"])
    run = running(lab, tmp_path)
    before = counter(run, "queued")
    probe = ("import socket\ns = socket.socket(socket.AF_INET6)\ns.settimeout(2)\n"
             "try:\n    s.connect(('fd00:77::1', 8443)); print('connected')\nexcept OSError as e:\n    print('refused', e)")
    out = lab.run("ext", [sys.executable, "-c", probe], timeout=20).stdout
    assert out.startswith("refused"), out
    assert counter(run, "queued") == before and processor(run)["flows"] == 0


def test_legacy_steering_with_the_nft_binding_table(lab_factory, tmp_path: Path) -> None:
    """iptables-legacy steers the first packet (xt NFQUEUE), nf_tables' maps carry the NAT beside it."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path, backend="iptables-legacy")
    assert "NFGATE-MANGLE-PREROUTING" in lab.run("router", ["iptables-legacy-save", "-t", "mangle"]).stdout
    assert fetch(lab, 20)
    assert 2 <= counter(run, "queued") <= 4


def test_kill_9_of_the_processor_cuts_no_established_flow(lab_factory, tmp_path: Path) -> None:
    """A 100 MB download survives the processor's SIGKILL: the kernel holds the flow, the new
    processor adopts its binding from conntrack, and new flows work again after the restart."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path)
    client = lab.popen("ext", [sys.executable, "-u", BULK, "get", WAN, "8443", "100", "10"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = wait_for(client.stdout.readline, timeout=30, what="the download to reach 10 MB")  # type: ignore[union-attr]
    assert line.startswith("paused"), line
    (flow,) = run.ask("flows")
    # conntrack's accounting, per leg (processor.conntrack_accounting): 10 MB through each so far.
    assert flow["leg_a_bytes"] >= 10 << 20 and flow["leg_b_bytes"] >= 10 << 20, flow
    old = processor(run)["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: processor(run).get("pid") not in (None, old), timeout=10, interval=0.1,
             what="the supervisor to restart the processor", ignore=(KeyError, OSError))
    # The new processor found the flow in conntrack: same tuples, same F:f.
    assert counter(run, "flows.adopted") == 1
    (adopted,) = run.ask("flows")
    for key in ("client", "original_dst", "server", "firewall_side", "ag"):
        assert adopted[key] == flow[key], (key, adopted, flow)
    client.stdin.write("go\n")  # type: ignore[union-attr]
    client.stdin.flush()  # type: ignore[union-attr]
    done = wait_for(client.stdout.readline, timeout=60, what="the rest of the download")  # type: ignore[union-attr]
    assert client.wait(timeout=10) == 0 and "intact" in done, done
    assert counter(run, "queued") == 0  # the new processor saw nothing of it
    assert fetch(lab, 1)  # and new flows work
    # The adopted binding ends like any other when conntrack is done with it.
    wait_for(lambda: run.ask("flows") == [], timeout=20, interval=0.2, what="the adopted binding to end")
    assert counter(run, "flows.ended.fin") >= 1


def test_path_mtu_discovery_works_through_the_relay(lab_factory, tmp_path: Path) -> None:
    """With a 1280-byte link from the router to lan, 10 MB upload with DF: the router's
    "fragmentation needed" is translated by conntrack and reaches the gateway's leg B."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path)
    lab.run("router", ["ip", "link", "set", "lan0", "mtu", "1280"])
    assert lab.run("ext", ["sysctl", "-n", "net.ipv4.ip_no_pmtu_disc"]).stdout.strip() == "0"  # DF set
    got = lab.run("ext", [sys.executable, BULK, "put", WAN, "8443", "10"], check=False, timeout=120)
    assert got.returncode == 0 and "intact" in got.stdout, got.stdout + got.stderr + run.text()[-2000:]
    # The gateway learnt the smaller path towards the firewall-side endpoint it
    # sends leg B to (the run's first binding has the pool's first address).
    # nfgate run made the gateway namespace in the router's mount namespace:
    # enter it through the gateway process.
    pid = run.processes()["gateway-relay"]["pid"]
    cached = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "route", "get", "172.31.254.0"],
                            capture_output=True, text=True)
    assert cached.returncode == 0, cached.stderr
    cached = cached.stdout
    assert "mtu 1280" in cached, cached


def test_a_syn_flood_shows_as_queue_drops_and_real_clients_still_connect(lab_factory, tmp_path: Path) -> None:
    """30k SYNs from spoofed sources at a short queue: `nfgate status` shows the kernel's
    queue drops, and a real client still gets through."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path, queues="[0]\nqueue_maxlen = 64")
    flood = FLOOD.replace("@WAN@", WAN)
    sent = lab.run("ext", [sys.executable, "-c", flood], timeout=120).stdout.strip()
    assert sent == "30000"
    wait_for(lambda: counter(run, "queue.kernel.dropped_full") > 0, timeout=10, interval=0.2,
             what="the kernel's queue drops in nfgate status")
    assert fetch(lab, 1)
    status = processor(run)
    assert status["counters"]["queue.kernel.dropped_full"] + status["counters"]["queued"] >= 30000 * 0.9


def test_ten_thousand_closed_flows_leave_nothing_behind(lab_factory, tmp_path: Path) -> None:
    """Bindings, pool entries and map elements all go back to zero once the flows are closed."""
    lab = lab_factory("basic")
    serve(lab)
    run = running(lab, tmp_path)
    got = lab.run("ext", [sys.executable, BULK, "churn", WAN, "8443", "10000", "8"], check=False, timeout=300)
    assert got.returncode == 0 and got.stdout.split() == ["done", "10000"], got.stdout + got.stderr
    assert counter(run, "flows.opened") == 10000, processor(run)["counters"]

    def empty() -> bool:
        p = processor(run)
        return p["flows"] == 0 and p["pools"]["firewall_side"]["used"] == 0 and map_elements(lab) == 0

    wait_for(empty, timeout=60, interval=0.5, what="bindings, pool entries and map elements to go")
    assert counter(run, "flows.ended.fin") == 10000


# 30k TCP SYNs to WAN:8443 from 198.18.0.0/15 (RFC 2544's benchmark range), with
# correct checksums (conntrack drops a bad one as invalid before the queue).
FLOOD = r"""
import socket, struct
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
dst = socket.inet_aton("@WAN@")
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
sent = 0
for i in range(30000):
    src = socket.inet_aton("198.18.%d.%d" % (i >> 8 & 0xFF, i & 0xFF | 1))
    sport = 1024 + i % 60000
    tcp = struct.pack("!HHIIBBHHH", sport, 8443, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64, 6, 0, src, dst)
    for attempt in range(100):  # the socket buffer may be full for a moment
        try:
            s.sendto(ip + tcp, ("@WAN@", 0))
            sent += 1
            break
        except OSError:
            continue
print(sent)
"""
