"""`nfgate run` in a basic lab, for tests/firewall/test_run_netns.py and scripts/bench.

The config forwards tcp 8443 (to lan:443) and udp 5353 (to lan:5353) through
the tcp-relay and udp-relay gateways, tcp 8080 (to lan:80) through the kernel
alone, and relays lan's outbound tcp 9000 with masquerade.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conntrack import fast_conntrack
from firewall.control import ask
from firewall.lab.wait import wait_for
from tests.labconfig import RUN

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

""" + RUN + """
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


# A lan server on 443 that answers each connection once (b"answer") and closes it: with a FIN,
# or with an RST (SO_LINGER 0) if argv[1] is "reset". For the relay's close and reuse tests.
ANSWER_SERVER = r"""
import socket, struct, sys
reset = sys.argv[1:] == ["reset"]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 443))
s.listen(64)
while True:
    c, _ = s.accept()
    c.recv(64)
    c.sendall(b"answer")
    if reset:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""


class Server:
    """An echo server (tests/netprobe.py) in a lab host; ``next_peer()`` is who it saw."""

    def __init__(self, lab, host: str, port: int, proto: str = "tcp", addr: str = "0.0.0.0"):
        argv = [sys.executable, "-u", NETPROBE, "serve", proto, str(port), addr]
        self.proc = lab.popen(host, argv, stdout=subprocess.PIPE, text=True)
        lab.wait_listening(host, port, proto)

    def next_peer(self, timeout: float = 5.0) -> str:
        line = wait_for(self.proc.stdout.readline, timeout=timeout, what="the server to report a peer")
        return line.split()[1]


def probe(lab, host: str, dst: str, port: int, proto: str = "tcp", timeout: float = 3.0) -> bool:
    argv = [sys.executable, NETPROBE, "probe", proto, dst, str(port), str(timeout)]
    return lab.run(host, argv, check=False, timeout=timeout + 10).returncode == 0


class Running:
    """`nfgate run` in the lab router, its log, and its control socket.

    ``config`` is a template: ``{gwns}`` and ``{tmp}`` are filled in, and so
    is each of ``fields`` (this module's CONFIG takes ``queues``).
    """

    def __init__(self, lab, tmp: Path, queues: str = "[0]", config: str = CONFIG, backend: str = "iptables",
                 wrap: tuple[str, ...] = (), log_name: str = "run.log", **fields: str):
        self.lab = lab
        self.gwns = f"{lab.prefix}-gw"
        self.path = tmp / "nfgate.toml"
        self.path.write_text(config.format(gwns=self.gwns, tmp=tmp, queues=queues, **fields))
        self.control = tmp / "run" / "control.sock"
        self.log_path = tmp / log_name
        self.log = open(self.log_path, "w")
        argv = [*wrap, sys.executable, "-m", "firewall.cli", "run", "-c", str(self.path), "--backend", backend]
        fast_conntrack(lab)
        self.proc = lab.popen("router", argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(self.ready, timeout=30, interval=0.1, what="nfgate run to start every process")
        except BaseException:
            self.stop()
            raise

    def ask(self, cmd: str):
        return ask(self.control, {"cmd": cmd})

    def processes(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.ask("status")["processes"]}

    def ready(self) -> bool:
        try:
            procs = self.processes()
        except (OSError, ValueError):
            return False
        # Every process serves (READY=1): a processor "running" may not have bound its queue yet, and
        # a packet meanwhile is dropped (fail_mode closed) or passes unseen (open).
        return all(p["state"] == "running" and p["ready"] for p in procs.values())

    def text(self) -> str:
        return self.log_path.read_text()

    def settled(self, timeout: float = 60.0) -> None:
        """Wait until no processor holds a binding: every gateway flow has ended (its destroy
        events, FLOW_ENDs and the gateway's closes are done). A bench waits for this between
        a relayed phase and its baseline, which would otherwise pay for those ends."""
        def idle() -> bool:
            return all(p.get("flows", 0) == 0 for p in self.ask("status")["processors"].values())
        wait_for(idle, timeout=timeout, interval=0.1, what="the gateway flows to end")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
