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
import subprocess
import sys
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from firewall.supervisor import ask

pytestmark = pytest.mark.netns

NETPROBE = str(Path(__file__).parents[1] / "netprobe.py")

CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[policy]
ping_from = ["lan"]

[[rule]]
name = "lan-out"
from = "lan"
to = "wan"

[nat]
masquerade = ["wan"]

[[nat.forward]]
name = "relayed"
from = "wan"
proto = "tcp"
port = 8443
to = "192.168.1.10:443"

[[nat.forward]]
name = "plain"
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"

[[nat.forward]]
name = "dns"
from = "wan"
proto = "udp"
port = 5353
to = "192.168.1.10"

[processor]
queues = {queues}
fail_mode = "closed"

[processor.timeouts]
tcp_closing = 1
udp_idle = 5

[gateway_link]
netns = "{gwns}"

[signalling]
key_file = "{tmp}/signalling.key"

[supervisor]
control_socket = "{tmp}/run/control.sock"
restart_initial = 0.2
stop_timeout = 8

[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 9000

[[gateway]]
name = "dns"
kind = "udp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5353
"""


class Server:
    def __init__(self, lab, host: str, port: int, proto: str = "tcp"):
        self.proc = lab.popen(host, [sys.executable, "-u", NETPROBE, "serve", proto, str(port)], stdout=subprocess.PIPE, text=True)
        lab.wait_listening(host, port, proto)

    def next_peer(self, timeout: float = 5.0) -> str:
        line = wait_for(self.proc.stdout.readline, timeout=timeout, what="the server to report a peer")
        return line.split()[1]


def probe(lab, host: str, dst: str, port: int, proto: str = "tcp", timeout: float = 3.0) -> bool:
    argv = [sys.executable, NETPROBE, "probe", proto, dst, str(port), str(timeout)]
    return lab.run(host, argv, check=False, timeout=timeout + 10).returncode == 0


class Running:
    """`nfgate run` in the lab router, its log, and its control socket."""

    def __init__(self, lab, tmp: Path, queues: str = "[0]"):
        self.lab = lab
        self.gwns = f"{lab.prefix}-gw"
        self.path = tmp / "nfgate.toml"
        self.path.write_text(CONFIG.format(gwns=self.gwns, tmp=tmp, queues=queues))
        self.control = tmp / "run" / "control.sock"
        self.log_path = tmp / "run.log"
        self.log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "firewall.cli", "run", "-c", str(self.path), "--backend", "iptables"]
        self.proc = lab.popen("router", argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.ready, timeout=20, interval=0.1, what="nfgate run to start every process")

    def ask(self, cmd: str):
        return ask(self.control, {"cmd": cmd})

    def processes(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.ask("status")["processes"]}

    def ready(self) -> bool:
        try:
            procs = self.processes()
        except (OSError, ValueError):
            return False
        return all(p["state"] == "running" for p in procs.values()) and "ready" in self.log_path.read_text()

    def text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


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
    assert "NFGATE" not in lab.run("router", ["iptables-nft-save"]).stdout
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
    assert run.stop() == 0
