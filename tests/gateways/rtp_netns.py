"""The rtp gateway under `nfgate run` in the basic lab: for tests/gateways/test_rtp_netns.py.

ext (203.0.113.10, and 203.0.113.11 as a third host) - router (wan0
203.0.113.1, lan0 192.168.1.1) - lan (192.168.1.10). The router forwards
wan udp 5004-5041 to lan, keeping the ports, and every port of that range
is a selector of one of two rtp gateways, so nothing reaches lan on it but
through a gateway (a port forward alone is accepted by the kernel).

``rtp`` (ssrc_change "drop") has the pairs 5004, 5010, 5020 and 5030,
``rtp-allow`` (ssrc_change "allow") 5040; each test its own pair. Both run
with ``adjacent = "gateway"``, a no-media timeout of 2 s and 3 s rules. The
processor adds a rule of its own for every flow of kind rtp today; it lives
``adjacent_ttl`` = 1 s here, so what the tests see later is the gateway's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from firewall.lab.wait import wait_for
from tests.bindtable import dynamic_elements
from tests.firewall.run_harness import Running

EXT = "203.0.113.10"
EXT2 = "203.0.113.11"  # a third host on the wan side
WAN = "203.0.113.1"
LAN = "192.168.1.10"
PEERS = str(Path(__file__).with_name("rtp_peers.py"))

GATEWAY = """
[[gateway]]
name = "{name}"
kind = "rtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = {ports}

[gateway.settings]
adjacent = "gateway"
no_media_timeout = 2
adjacent_rule_ttl = 3
ssrc_change = "{ssrc}"
"""

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
name = "rtp-in"
from = "wan"
proto = "udp"
port = "5004-5041"
to = "192.168.1.10"

[processor]
queues = [0]
fail_mode = "closed"
adjacent_ttl = 1

[gateway_link]
netns = "{gwns}"

[signalling]
key_file = "{tmp}/signalling.key"

[supervisor]
control_socket = "{tmp}/run/control.sock"
restart_initial = 0.2
stop_timeout = 8
""" + GATEWAY.format(name="rtp", ports='["5004-5005", "5010-5011", "5020-5021", "5030-5031"]', ssrc="drop") \
    + GATEWAY.format(name="rtp-allow", ports='["5040-5041"]', ssrc="allow")

SDP = """v=0
o=- 0 0 IN IP4 {sender}
s=nfgate rtp test
c=IN IP4 {sender}
t=0 0
m=audio {port} RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""


class RtpRunning(Running):
    """`nfgate run` with the two rtp gateways in the lab router; their log, counters and rules."""

    def __init__(self, lab: Any, tmp: Path) -> None:
        super().__init__(lab, tmp, config=CONFIG)

    def counters(self, gateway: str = "rtp") -> dict[str, int]:
        """The gateway's counters now: SIGUSR1 makes it log a ``stats`` line."""
        proc = self.processes()[f"gateway-{gateway}"]
        before = len(self.events("stats", gateway))
        self.lab.run("router", ["kill", "-USR1", str(proc["pid"])])

        def stats() -> dict[str, int] | None:
            lines = self.events("stats", gateway)
            if len(lines) == before:
                return None
            return {k[len("relay."):]: int(v) for k, v in re.findall(r" (relay\.\S+)=(\d+)", lines[-1])}

        return wait_for(stats, timeout=10, interval=0.05, what=f"{gateway}'s stats line")

    def events(self, name: str, gateway: str = "rtp") -> list[str]:
        """The gateway's log lines of event ``name``."""
        return [line for line in self.text().splitlines() if f"Z {gateway} {name} " in line]

    def rules_for(self, port: int) -> list[str]:
        """The binding table's dynamic elements that name ``port``."""
        return [e for e in dynamic_elements(self.lab) if re.search(rf"\b{port}\b", e.split(":", 1)[1])]


def send(lab: Any, src: str, sport: int, dport: int, plan: str) -> int:
    result = lab.run("ext", [sys.executable, PEERS, "send", src, str(sport), WAN, str(dport), plan], check=False,
                     timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(json.loads(result.stdout)["sent"])


class Sink:
    """rtp_peers.py sink in lan: what reached each port, and from whom."""

    def __init__(self, lab: Any, *ports: int, seconds: float = 30, idle: float = 2.5) -> None:
        argv = [sys.executable, "-u", PEERS, "sink", str(seconds), str(idle), *map(str, ports)]
        self.proc = lab.popen("lan", argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self) -> dict[int, list[list[Any]]]:
        out, _ = self.proc.communicate(timeout=60)
        return {int(k): v for k, v in json.loads(out).items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
