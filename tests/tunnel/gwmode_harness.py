"""The tunnel's control server as gateway kind ``tunnel`` under ``nfgate run``, in the nat-tunnel lab.

``pub`` (198.51.100.10 and 2001:db8:51::10, eth0 = zone wan) is the router: it runs ``nfgate
run`` with one ``[[gateway]]`` of kind ``tunnel``, so the server lives in the
gateway namespace ``<prefix>-gw`` and every packet of its service port and of
its publishable ports is double-NATed into it by the processor. ``priv``
(10.77.0.10), behind the masquerading ``nat``, runs the mediator and the
private services; ``nat`` (198.51.100.1, on pub's wan link) is also the
public client.

Everything lives in one short temporary directory (unix socket paths must
fit in 108 bytes): the nfgate config, the signalling key, the supervisor's
run directory (with the tunnel's control socket ``tunnel-tunnel.sock``), the
server's files in ``tunnel/tunnel/`` next to the config, and the publication
state in ``state/`` (``STATE_DIRECTORY``). Processes are started with
``Lab.popen``, so the lab's teardown stops whatever a failed test left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from firewall.config import load
from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for
from firewall.control import ask
from tests.conntrack import fast_conntrack
from tests.tunnel.netns_harness import REPO, SERVICE_PORT, TOKENS, TunnelLab, _table

GATEWAY = "tunnel"
PUBLISH_FIRST, PUBLISH_LAST = 8000, 8099
UNSTEERED = 9080
START_TIMEOUT = 20.0

CONFIG = """\
[zones.wan]
interfaces = ["eth0"]

[processor]
queues = {queues}
fail_mode = "closed"

[gateway_link]
netns = "{gwns}"

[signalling]
key_file = "{dir}/signalling.key"

[supervisor]
control_socket = "{dir}/run/control.sock"
restart_initial = 0.2
stop_timeout = 8

[[gateway]]
name = "{gateway}"
kind = "tunnel"

[gateway.settings]
service_port = {service_port}
publish_first = {first}
publish_last = {last}
request_timeout = 5
min_keepalive_interval = 0.5

# The service port (the TLS channel, TCP; the UDP channels, UDP) and the
# publishable range, both protocols, from wan to the router itself: the
# server terminates these flows.
[[gateway.traffic]]
from = "wan"
to = "router"
proto = "tcp"
ports = [{service_port}, "{first}-{last}"]
allow = true

[[gateway.traffic]]
from = "wan"
to = "router"
proto = "udp"
ports = [{service_port}, "{first}-{last}"]
allow = true
"""


class GatewayModeLab:
    """``nfgate run`` with a tunnel gateway in ``pub``, a mediator in ``priv``."""

    def __init__(self, lab: Lab, queues: str = "[0]") -> None:
        """``queues``: ``processor.queues``, as TOML."""
        self.lab = lab
        self.queues = queues
        self.tl = TunnelLab(lab)  # its directory, mediators, peers and operator CLI
        self.dir = self.tl.dir
        self.gwns = f"{lab.prefix}-gw"
        self.config = self.dir / "nfgate.toml"
        self.control = self.dir / "run" / "control.sock"
        self.files = self.dir / "tunnel" / GATEWAY  # tunnel/<name>/ next to the config
        self.state = self.dir / "state"
        self.tl.socket = self.dir / "run" / f"tunnel-{GATEWAY}.sock"  # where run_gateway puts it
        self.log_path = self.dir / "run.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listen_port = 0  # the gateway's one port, where the processor sends its flows

    # -- set-up ----------------------------------------------------------------------------------

    def write_files(self) -> None:
        self.config.write_text(CONFIG.format(
            gwns=self.gwns, dir=self.dir, gateway=GATEWAY, queues=self.queues, service_port=SERVICE_PORT,
            first=PUBLISH_FIRST, last=PUBLISH_LAST,
        ))
        self.files.mkdir(parents=True, mode=0o700)
        out = self.tl.cli("keygen", "--cert", self.files / "server.crt", "--key", self.files / "server.key")
        self.tl.pin = out.stdout.strip()
        self.listen_port = load(self.config).gateways[0].listen_port
        mediators = self.files / "mediators.toml"
        # m1 may also publish UNSTEERED, which no selector brings: refused.
        # m2 is the IPv6 mediator (test_ipv6_...).
        publish = [f"{PUBLISH_FIRST}-{PUBLISH_LAST}", str(UNSTEERED)]
        mediators.write_text(_table("mediator.m1", {"token": TOKENS["m1"], "publish_ports": publish})
                             + _table("mediator.m2", {"token": TOKENS["m2"], "publish_ports": publish}))
        os.chmod(mediators, 0o600)

    def start(self) -> None:
        """``nfgate run`` in pub; returns when every process runs and the tunnel answers."""
        self.write_files()
        # The gateway lives in another namespace, so even a flow that ends "at
        # the router" is forwarded once rewritten: eth0 -> blind track, and its
        # answers back (docs/datapath.md, "Gateways that terminate a flow").
        self.lab.run("pub", ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        fast_conntrack(self.lab, "pub")
        env = {**os.environ, "STATE_DIRECTORY": str(self.state)}
        argv = [sys.executable, "-m", "firewall.cli", "run", "-c", str(self.config), "--backend", "iptables"]
        log = open(self.log_path, "wb")
        try:
            self.proc = self.lab.popen("pub", argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        finally:
            log.close()
        self.wait_running(START_TIMEOUT)

    def wait_running(self, timeout: float, not_pid: int | None = None) -> dict[str, Any]:
        """Every process running (the tunnel gateway with a pid other than
        ``not_pid``) and the tunnel's control socket answering."""

        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nfgate run exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            procs = self.processes()
            gw = procs.get(f"gateway-{GATEWAY}")
            if not gw or any(p["state"] != "running" or not p["ready"] for p in procs.values()) or gw["pid"] == not_pid:
                return None
            self.tl.listing()
            return procs

        return wait_for(ready, timeout=timeout, interval=0.1, what="nfgate run and its tunnel gateway",
                        ignore=(OSError, ValueError, AssertionError, TimeoutError))

    # -- looking -------------------------------------------------------------------------------

    def ask(self, cmd: str) -> Any:
        return ask(self.control, {"cmd": cmd})

    def processes(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.ask("status")["processes"]}

    def gateway_pid(self) -> int:
        return int(self.processes()[f"gateway-{GATEWAY}"]["pid"])

    def nfgate(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``nfgate ARGS -c CONFIG`` (status, flows) in pub, as an operator runs it."""
        argv = [sys.executable, "-m", "firewall.cli", *args, "-c", str(self.config)]
        return self.lab.run("pub", argv, cwd=REPO, timeout=15)

    def forward_dropped(self) -> int:
        """Packets the forward chain's drop policy took in pub (its counter)."""
        out = self.lab.run("pub", ["iptables-nft", "-L", "NFGATE-FORWARD", "-v", "-x", "-n"]).stdout
        line = next(ln for ln in out.splitlines() if "policy.forward = drop" in ln)
        return int(line.split()[0])

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- clients in nat ------------------------------------------------------------------------

    def curl(self, url: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """curl from ``nat``, the public client on pub's wan link (bounded by --max-time)."""
        argv = ["curl", "-sS", "--max-time", str(timeout), *args, url]
        return self.lab.run("nat", argv, check=False, timeout=timeout + 10)

    # -- taking down -----------------------------------------------------------------------------

    def stop(self) -> int | None:
        """SIGTERM ``nfgate run``; its exit code (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return None

    def cleanup(self) -> None:
        self.stop()
        self.tl.cleanup()

