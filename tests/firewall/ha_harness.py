"""`nfgate run` on both routers of the ha lab, for tests/firewall/test_ha_netns.py and scripts/bench ha.

Both nodes read one config but for the paths two processes on one host must
not share (the control socket, the signalling key): ``{node}`` in the
template. The [ha] table is the same for both. The pair forwards wan's tcp
8080 on the virtual address to lan's client:80 through the kernel, so a
stream from the server to 203.0.113.1:8080 crosses whichever node is master.

With ``ag``, the gateways run on the AG host (docs/ha.md, "The AG host"):
``gateway_link.mode = "host"`` over each router's ag0, the pair's virtual
address 172.31.253.1 on that segment, and ``nfgate gateways`` on ag running
a tcp-relay for wan's tcp 8081 (forwarded like 8080) and the ftp gateway in
allow mode for wan's tcp 21 (forwarded to lan's client), and the rtp gateway for
wan's udp 5004 (forwarded to lan's client; 5005, RTCP, is not forwarded: it
crosses only by the gateway's adjacent rule). Then the three share one signalling key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from firewall import ha
from firewall.control import ask
from firewall.lab.wait import wait_for
from firewall.signalling import load_or_create_key
from tests.conntrack import fast_conntrack

REPO = Path(__file__).resolve().parents[2]
NODES = ("r1", "r2")

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
networks = ["203.0.113.0/24"]

[zones.lan]
interfaces = ["lan0"]
networks = ["192.168.1.0/24"]

[policy]
forward = "drop"
input = "drop"

[[nat.forward]]
name = "plain"
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"

{gateway_link}
[signalling]
key_file = "{key_file}"

[supervisor]
control_socket = "{tmp}/{node}/run/control.sock"
restart_initial = 0.2
stop_timeout = 8

[ha]
sync_interface = "sync0"
advert_interval = {advert}
preempt_delay = {preempt}
config_dir = "{tmp}/ha"
run_dir = "{tmp}/ha/run"

[ha.nodes.r1]
priority = 150
sync_address = "172.31.252.1"
addresses = {{ lan = "192.168.1.2", wan = "203.0.113.2"{r1_link} }}

[ha.nodes.r2]
priority = 100
sync_address = "172.31.252.2"
addresses = {{ lan = "192.168.1.3", wan = "203.0.113.3"{r2_link} }}

[ha.virtual.lan]
address = "192.168.1.1/24"
vrid = 51

[ha.virtual.wan]
address = "203.0.113.1/24"
vrid = 52
"""

# Without the AG host: no gateway, the gateway namespace named by node.
NO_GATEWAYS = """
[gateway_link]
netns = "{prefix}-gw{node}"
"""

# The gateways on the AG host (docs/ha.md, "The AG host"): tcp-relay takes wan's tcp 8081,
# forwarded on the virtual address to lan's client:80 like 8080, which stays in the kernel;
# the ftp gateway (allow mode: the kernel carries the data connections) takes wan's tcp 21,
# forwarded to a vsftpd on lan's client.
AG_HOST = """
[[nat.forward]]
name = "relayed"
from = "wan"
proto = "tcp"
port = 8081
to = "192.168.1.10:80"

[[nat.forward]]
name = "ftp"
from = "wan"
proto = "tcp"
port = 21
to = "192.168.1.10:21"

[[nat.forward]]
name = "media"
from = "wan"
proto = "udp"
port = 5004
to = "192.168.1.10"

[gateway_link]
mode = "host"
router_if = "ag0"
gateway_address = "172.31.253.10/24"

[[gateway]]
name = "relay"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8081

[[gateway]]
name = "ftp"
kind = "ftp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21

[gateway.settings]
data_channel = "allow"

[[gateway]]
name = "rtp"
kind = "rtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5004

[gateway.settings]
adjacent = "gateway"
adjacent_rule_ttl = 2
no_media_timeout = 10

[ha.virtual.gateway_link]
address = "172.31.253.1/24"
vrid = 53
"""
AG_ADDRESSES = {"r1": ', gateway_link = "172.31.253.2"', "r2": ', gateway_link = "172.31.253.3"'}
AG = "ag"
RELAYED_PORT = 8081
AG_PORTS = (20000, 20001)  # the relay's and the ftp gateway's G:g on the AG host (gateway_link.port_base)
RTP_PORT = 20002  # the rtp gateway's (udp)

VIP = {"lan": ("lan0", "192.168.1.1"), "wan": ("wan0", "203.0.113.1")}
AG_VIP = ("ag0", "172.31.253.1")
LINKS = ("lan0", "wan0", "sync0")
AG_LINKS = LINKS + ("ag0",)


class Pair:
    """Both nodes under `nfgate run`, their logs, and the failures a test makes."""

    def __init__(self, lab: Any, tmp: Path, advert: float = 0.3, preempt: float = 4.0, ag: bool = False,
                 conntrack: dict[str, int] | None = None) -> None:
        """``ag``: the tcp-relay gateway on the AG host, started there by ``nfgate gateways``
        (after both routers, which signal to it); one signalling key for the three.
        ``conntrack``: timeouts (sysctl names) over ``tests.conntrack.FAST``'s on both nodes."""
        self.lab, self.tmp, self.ag = lab, tmp, ag
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Any] = {}
        self.paths = {}
        self.vips = {**VIP, "gateway_link": AG_VIP} if ag else dict(VIP)
        if ag:
            load_or_create_key(tmp / "signalling.key")
        for node in (*NODES, AG) if ag else NODES:
            (tmp / node).mkdir(parents=True, exist_ok=True)
            path = tmp / node / "nfgate.toml"
            path.write_text(CONFIG.format(
                node=node, tmp=tmp, advert=advert, preempt=preempt,
                gateway_link=AG_HOST if ag else NO_GATEWAYS.format(prefix=lab.prefix, node=node),
                key_file=tmp / "signalling.key" if ag else tmp / node / "signalling.key",
                r1_link=AG_ADDRESSES["r1"] if ag else "", r2_link=AG_ADDRESSES["r2"] if ag else ""))
            self.paths[node] = path
            if node != AG:
                fast_conntrack(lab, node, **(conntrack or {}))
        try:
            self.start("r1")
            wait_for(lambda: self.master() == "r1", timeout=30, interval=0.1, what="r1 to become master")
            self.start("r2")
            wait_for(lambda: self.vrrp("r2") == "backup", timeout=30, interval=0.1, what="r2 to become backup")
            if ag:
                self.start(AG, "gateways")
                for port in AG_PORTS:
                    lab.wait_listening(AG, port, timeout=10)
                lab.wait_listening(AG, RTP_PORT, "udp", timeout=10)
        except BaseException:
            self.stop()
            raise

    def start(self, node: str, command: str = "run") -> None:
        log = self.logs[node] = open(self.tmp / f"run-{node}.log", "a")
        argv = [sys.executable, "-m", "firewall.cli", command, "-c", str(self.paths[node])]
        if command == "run":
            argv += ["--backend", "iptables"]
        self.procs[node] = self.lab.popen(node, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: self._serving(node), timeout=30, interval=0.1, what=f"nfgate run on {node}")

    def _serving(self, node: str) -> bool:
        if self.procs[node].poll() is not None:
            raise AssertionError(f"nfgate run on {node} exited: {self.log(node)[-2000:]}")
        try:
            procs = ask(self.tmp / node / "run" / "control.sock", {"cmd": "status"})["processes"]
        except (OSError, ValueError):
            return False
        return all(p["state"] == "running" and p["ready"] for p in procs)

    def status(self, node: str) -> dict[str, Any]:
        return ask(self.tmp / node / "run" / "control.sock", {"cmd": "status"})

    def log(self, node: str) -> str:
        return (self.tmp / f"run-{node}.log").read_text()

    def holds_vips(self, node: str) -> bool:
        out = self.lab.run(node, ["ip", "-4", "-o", "addr", "show"]).stdout
        return all(f" {addr}/" in out for _, addr in self.vips.values())

    def master(self) -> str | None:
        """The one node that holds every virtual address and says it is primary, else None."""
        held = [n for n in NODES if self.holds_vips(n)]
        if len(held) == 1 and self.vrrp(held[0]) == "primary":
            return held[0]
        return None

    def vrrp(self, node: str) -> str:
        path = self.tmp / "ha" / "run" / f"state-{node}.jsonl"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return "unknown"
        return json.loads(lines[-1])["state"] if lines else "unknown"

    def links(self, node: str, state: str) -> None:
        """All of a node's links down (a hard failure) or up again."""
        for ifname in AG_LINKS if self.ag else LINKS:
            self.lab.run(node, ["ip", "link", "set", ifname, state])

    def kill_keepalived(self, node: str) -> int:
        """SIGKILL the node's keepalived (the parent its supervisor started); return its pid."""
        child = next(p for p in self.status(node)["processes"] if p["name"] == "keepalived")
        os.kill(child["pid"], signal.SIGKILL)
        return child["pid"]

    def keepalived_tree(self, node: str) -> dict[int, int]:
        """pid -> parent pid of every process running the node's keepalived.conf, anywhere on the host;
        each must be in the node's namespace."""
        conf = self.tmp / "ha" / node / "keepalived.conf"
        netns = os.stat(f"/run/netns/{self.lab.ns(node)}").st_ino
        tree = {}
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and ha.runs_keepalived((entry / "cmdline").read_bytes(), conf):
                    assert os.stat(entry / "ns" / "net").st_ino == netns, f"keepalived pid {entry.name} outside {node}"
                    tree[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone meanwhile
        return tree

    def stop(self) -> None:
        for node, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.logs[node].close()


def stream(lab: Any, mb: int, rate: float, port: int = 8080) -> subprocess.Popen:
    """The server's download of MB MiB at RATE MiB/s from lan's client, through the pair's wan address
    (port 8080: in the kernel; RELAYED_PORT: through the relay on the AG host)."""
    argv = [sys.executable, "-m", "tests.hapeer", "get", VIP["wan"][1], str(port), str(mb), str(rate)]
    return lab.popen("server", argv, stdout=subprocess.PIPE, text=True, cwd=REPO)


def serve(lab: Any) -> subprocess.Popen:
    proc = lab.popen("client", [sys.executable, "-m", "tests.hapeer", "serve", "80"], cwd=REPO)
    lab.wait_listening("client", 80)
    return proc


def result(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def wait_master(pair: Pair, node: str, timeout: float) -> float:
    """Poll until ``node`` is the one master; return how long that took."""
    start = time.monotonic()
    wait_for(lambda: pair.master() == node, timeout=timeout, interval=0.05, what=f"{node} to become master")
    return time.monotonic() - start
