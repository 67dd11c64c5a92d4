"""`nfgate run` on both routers of the ha lab, for tests/firewall/test_ha_netns.py and scripts/bench ha.

Both nodes read one config but for the paths two processes on one host must
not share (the control socket, the signalling key): ``{node}`` in the
template. The [ha] table is the same for both. The pair forwards wan's tcp
8080 on the virtual address to lan's client:80 through the kernel, so a
stream from the server to 203.0.113.1:8080 crosses whichever node is master.
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

from firewall.control import ask
from firewall.lab.wait import wait_for
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

[gateway_link]
netns = "{prefix}-gw{node}"

[signalling]
key_file = "{tmp}/{node}/signalling.key"

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
addresses = {{ lan = "192.168.1.2", wan = "203.0.113.2" }}

[ha.nodes.r2]
priority = 100
sync_address = "172.31.252.2"
addresses = {{ lan = "192.168.1.3", wan = "203.0.113.3" }}

[ha.virtual.lan]
address = "192.168.1.1/24"
vrid = 51

[ha.virtual.wan]
address = "203.0.113.1/24"
vrid = 52
"""

VIP = {"lan": ("lan0", "192.168.1.1"), "wan": ("wan0", "203.0.113.1")}
LINKS = ("lan0", "wan0", "sync0")


class Pair:
    """Both nodes under `nfgate run`, their logs, and the failures a test makes."""

    def __init__(self, lab: Any, tmp: Path, advert: float = 0.3, preempt: float = 4.0) -> None:
        self.lab, self.tmp = lab, tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Any] = {}
        self.paths = {}
        for node in NODES:
            (tmp / node).mkdir(parents=True, exist_ok=True)
            path = tmp / node / "nfgate.toml"
            path.write_text(CONFIG.format(node=node, tmp=tmp, prefix=lab.prefix, advert=advert, preempt=preempt))
            self.paths[node] = path
            fast_conntrack(lab, node)
        try:
            self.start("r1")
            wait_for(lambda: self.master() == "r1", timeout=30, interval=0.1, what="r1 to become master")
            self.start("r2")
            wait_for(lambda: self.vrrp("r2") == "backup", timeout=30, interval=0.1, what="r2 to become backup")
        except BaseException:
            self.stop()
            raise

    def start(self, node: str) -> None:
        log = self.logs[node] = open(self.tmp / f"run-{node}.log", "a")
        argv = [sys.executable, "-m", "firewall.cli", "run", "-c", str(self.paths[node]), "--backend", "iptables"]
        self.procs[node] = self.lab.popen(node, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: self._serving(node), timeout=30, interval=0.1, what=f"nfgate run on {node}")

    def _serving(self, node: str) -> bool:
        if self.procs[node].poll() is not None:
            raise AssertionError(f"nfgate run on {node} exited: {self.log(node)[-2000:]}")
        try:
            procs = ask(self.tmp / node / "run" / "control.sock", {"cmd": "status"})["processes"]
        except (OSError, ValueError):
            return False
        return all(p["state"] == "running" for p in procs)

    def status(self, node: str) -> dict[str, Any]:
        return ask(self.tmp / node / "run" / "control.sock", {"cmd": "status"})

    def log(self, node: str) -> str:
        return (self.tmp / f"run-{node}.log").read_text()

    def holds_vips(self, node: str) -> bool:
        out = self.lab.run(node, ["ip", "-4", "-o", "addr", "show"]).stdout
        return all(f" {addr}/" in out for _, addr in VIP.values())

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
        for ifname in LINKS:
            self.lab.run(node, ["ip", "link", "set", ifname, state])

    def kill_keepalived(self, node: str) -> int:
        """SIGKILL the node's keepalived (the parent its supervisor started); return its pid."""
        child = next(p for p in self.status(node)["processes"] if p["name"] == "keepalived")
        os.kill(child["pid"], signal.SIGKILL)
        return child["pid"]

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


def stream(lab: Any, mb: int, rate: float) -> subprocess.Popen:
    """The server's download of MB MiB at RATE MiB/s from lan's client, through the pair's wan address."""
    argv = [sys.executable, "-m", "tests.hapeer", "get", VIP["wan"][1], "8080", str(mb), str(rate)]
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
