"""`nfgate run` end to end in the basic lab: the real processor, the real
gateways, real clients and servers.

ext (203.0.113.10) - router (wan0 203.0.113.1, lan0 192.168.1.1) - lan
(192.168.1.10). The router forwards tcp 8443 to lan:443 and udp 5353 to
lan:5353 through the tcp-relay and udp-relay gateways, and relays lan's
outbound tcp 9000 to ext through the tcp-relay with masquerade.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running, Server, probe

pytestmark = pytest.mark.netns


def test_relays_both_directions_restart_and_clean_stop(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    tls = Server(lab, "lan", 443)
    plain = Server(lab, "lan", 80)
    outside = Server(lab, "ext", 9000)
    Server(lab, "lan", 5353, "udp")
    run = Running(lab, tmp_path)

    # Inbound through the port forward and the tcp-relay: the server sees the real client.
    assert probe(lab, "ext", "203.0.113.1", 8443)
    assert tls.next_peer() == "203.0.113.10"
    assert re.search(r"203\.0\.113\.10:\d+ .*192\.168\.1\.10:443", run.text()), run.text()[-2000:]
    # Outbound through the relay and the processor's SNAT: ext sees the router's address.
    assert probe(lab, "lan", "203.0.113.10", 9000)
    assert outside.next_peer() == "203.0.113.1"
    # ... while the relay learned the client's private tuple by signalling.
    assert wait_for(
        lambda: re.search(r"relay open .*client=192\.168\.1\.10:\d+ original_dst=203\.0\.113\.10:9000", run.text()),
        timeout=5,
        what="the relay's log line for the outbound flow",
    )
    # UDP through the udp-relay.
    assert probe(lab, "ext", "203.0.113.1", 5353, "udp")

    # Traffic without a gateway never reaches the processor.
    stats = lambda: run.ask("status")["processors"]["processor-0"]  # noqa: E731
    queued = stats()["counters"]["queued"]
    assert probe(lab, "ext", "203.0.113.1", 8080)
    assert plain.next_peer() == "203.0.113.10"
    assert stats()["counters"]["queued"] == queued

    # A flow is listed with its original tuple while it lives, and released after.
    assert wait_for(lambda: run.ask("flows") == [], timeout=15, what="all bindings released")

    # SIGKILL a gateway: restarted within 2 s, the processor untouched, new connections work.
    before = run.processes()
    os.kill(before["gateway-relay"]["pid"], signal.SIGKILL)
    wait_for(
        lambda: (p := run.processes()["gateway-relay"])["state"] == "running" and p["pid"] != before["gateway-relay"]["pid"],
        timeout=2.0,
        interval=0.05,
        what="the relay back within 2 s",
        ignore=(OSError, ValueError),
    )
    assert run.processes()["processor-0"]["pid"] == before["processor-0"]["pid"]
    assert wait_for(lambda: probe(lab, "ext", "203.0.113.1", 8443, timeout=1.0), timeout=10, what="8443 through the restarted relay")

    assert run.stop() == 0
    assert not Path("/run/netns", run.gwns).exists()
    saved = lab.run("router", ["iptables-nft-save"]).stdout
    # The static rules stay; the steering is stopped (fail closed: dropped, never queued).
    assert "NFGATE-FORWARD" in saved and "NFQUEUE" not in saved, saved
    assert not run.control.exists()


def test_concurrent_connections_map_and_release(lab_factory, tmp_path: Path) -> None:
    """200 connections from two client addresses, which steering sends to two
    processor instances: every one reaches the server with its own client
    address, and every binding is released afterwards."""
    lab = lab_factory("basic")
    lab.run("ext", ["ip", "address", "add", "203.0.113.11/24", "dev", "eth0"])
    tls = Server(lab, "lan", 443)
    run = Running(lab, tmp_path, queues="[0, 1]")
    count = 200
    script = (
        "import socket, sys, concurrent.futures as cf\n"
        "def one(i):\n"
        "    src = '203.0.113.1%d' % (i % 2)\n"
        "    s = socket.create_connection(('203.0.113.1', 8443), timeout=10, source_address=(src, 0))\n"
        "    s.sendall(b'x%d' % i); data = s.recv(100); s.close(); return data == b'echo:x%d' % i\n"
        f"with cf.ThreadPoolExecutor(50) as ex: ok = sum(ex.map(one, range({count})))\n"
        f"print(ok); sys.exit(0 if ok == {count} else 1)\n"
    )
    result = lab.run("ext", [sys.executable, "-c", script], check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr + run.text()[-3000:]
    peers = sorted(tls.next_peer() for _ in range(count))
    assert peers == ["203.0.113.10"] * (count // 2) + ["203.0.113.11"] * (count // 2)
    assert wait_for(lambda: run.ask("flows") == [], timeout=20, what="all bindings released")
    processors = run.ask("status")["processors"]
    for name in ("processor-0", "processor-1"):
        assert processors[name]["counters"]["queued"] > 0, name  # each instance took its clients
        pools = processors[name]["pools"]
        assert pools["firewall_side"]["used"] == 0, (name, pools)  # every endpoint back in the pool
        assert all(p["used"] == 0 for p in pools["snat"].values()), (name, pools)
    assert run.stop() == 0
