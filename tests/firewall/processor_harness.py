"""A lab router with nfgate applied, the blind track, a processor and a stand-in gateway.

Used by tests/firewall/test_processor_netns.py and processor_bench.py. The
basic lab: ext 203.0.113.10 - (wan0 203.0.113.1) router (lan0 192.168.1.1) -
lan 192.168.1.10; the gateway namespace ``<prefix>-gw`` at the end of the
blind track. Every background process is started here and stopped in
``close()``; the lab fixture removes the namespaces (the gateway one too: it
carries the lab's prefix).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from tests.bindtable import dynamic_elements
from tests.conntrack import fast_conntrack
from tests.gateways.process import write_manifest
from firewall import gwlink
from firewall.config.model import GatewayLink
from firewall.control import ask
from firewall.lab.wait import wait_for
from firewall.signalling import load_or_create_key

HERE = Path(__file__).parent
CLIENT = str(HERE / "processor_client.py")
GATEWAY = str(HERE / "processor_gateway.py")
EXT, WAN, LAN = "203.0.113.10", "203.0.113.1", "192.168.1.10"
STOP_TIMEOUT = 10.0
# A connection the kernel drops is retried by TCP after 1 s; two seconds of
# silence show it is dropped and not merely slow.
NEGATIVE_WAIT = 2.0

CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[policy]
input = "drop"
forward = "drop"

[[rule]]
name = "lan-out"
from = "lan"
to = "wan"

[nat]
masquerade = ["wan"]

[[nat.forward]]
name = "web"
from = "wan"
proto = "tcp"
port = 8080
to = "192.168.1.10:80"

[[nat.forward]]
name = "relayed"
from = "wan"
proto = "tcp"
port = 8443
to = "192.168.1.10:443"

[[nat.forward]]
name = "ftp"
from = "wan"
proto = "tcp"
port = 2121
to = "192.168.1.10"

[processor]
fail_mode = "{fail_mode}"

[gateway_link]
netns = "{netns}"

[signalling]
key_file = "{key}"

[[gateway]]
name = "relay"
kind = "tcp-relay"
listen_port = 20000

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
name = "ftp"
kind = "ftp"
listen_port = 20021

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 2121
"""

class Lines:
    """A child's stdout, read by a thread into a queue, so a test can wait with a bound.

    ``next(match)`` takes the first line, in order, that matches, whether it
    arrived before or after the call: a peer's threads print in no fixed order.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []  # everything read so far
        self.pending: list[str] = []  # read, not yet taken by next()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))

    def drain(self) -> list[str]:
        """Move what has arrived into ``seen`` and ``pending``; return ``seen``."""
        while True:
            try:
                line = self.queue.get_nowait()
            except queue.Empty:
                return self.seen
            self.seen.append(line)
            self.pending.append(line)

    def next(self, match: Callable[[str], bool] = lambda line: True, timeout: float = 10.0) -> str:
        def one() -> str | None:
            self.drain()
            for i, line in enumerate(self.pending):
                if match(line):
                    return self.pending.pop(i)
            return None

        try:
            line = wait_for(one, timeout=timeout, interval=0.02, what="a line from a test peer")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; the last lines were: {self.seen[-8:]}") from None
        assert line is not None
        return line


class Server:
    """processor_client.py serve in a lab host; ``peers(n)`` waits for n connections' addresses."""

    def __init__(self, lab: Any, host: str, port: int) -> None:
        proc = lab.popen(host, [sys.executable, "-u", CLIENT, "serve", str(port)], stdout=subprocess.PIPE, text=True)
        self.lines = Lines(proc)
        lab.wait_listening(host, port)

    def peers(self, count: int = 1, timeout: float = 10.0) -> list[str]:
        return [self.lines.next(timeout=timeout).split()[1] for _ in range(count)]


class Harness:
    def __init__(self, lab: Any, tmp_path: Path, fail_mode: str = "closed", extra: str = "") -> None:
        self.lab = lab
        self.extra = extra  # more config (TOML) after the standard text
        self.tmp = tmp_path
        self.gwns = f"{lab.prefix}-gw"
        self.link = GatewayLink(netns=self.gwns)
        self.key = tmp_path / "keys" / "signalling.key"
        self.control_path = tmp_path / "processor-0.sock"
        self.processor: subprocess.Popen[str] | None = None
        self.processor_log = tmp_path / "processor.log"
        self.gateway: subprocess.Popen[str] | None = None
        self.events: Lines | None = None
        gwlink.create(self.link, lab.ns("router"))
        fast_conntrack(lab)
        load_or_create_key(self.key)  # the stand-in reads it; the processor would create it too
        self.apply(fail_mode)

    # ---- rules ------------------------------------------------------------------------

    def config_text(self, fail_mode: str) -> str:
        return CONFIG.format(fail_mode=fail_mode, netns=self.gwns, key=self.key) + self.extra

    def apply(self, fail_mode: str) -> None:
        self.config = self.tmp / f"nfgate-{fail_mode}.toml"
        self.config.write_text(self.config_text(fail_mode))
        result = self.lab.run("router", [sys.executable, "-m", "firewall.cli", "apply", "-c", self.config, "--backend", "iptables"], check=False)
        assert result.returncode == 0, result.stderr

    def dynamic_rules(self) -> list[str]:
        """The dynamic rules' elements in the binding table, ``"<set>: <element>"`` each."""
        return dynamic_elements(self.lab)

    # ---- the processor ----------------------------------------------------------------

    def start_processor(self, *extra: str) -> None:
        log = self.processor_log.open("a")
        self.processor = self.lab.popen(
            "router",
            [sys.executable, "-m", "firewall.processor", "--config", self.config, "--instance", "0",
             "--control", self.control_path, *extra],
            stdout=log, stderr=log, text=True,
        )
        log.close()
        wait_for(lambda: self._alive() and self.control_path.exists() and self.stats(), timeout=15,
                 interval=0.05, what="the processor's control socket", ignore=(OSError, ValueError))

    def _alive(self) -> bool:
        assert self.processor is not None
        if self.processor.poll() is not None:
            raise AssertionError(f"processor exited {self.processor.returncode}:\n{self.log()}")
        return True

    def log(self) -> str:
        return self.processor_log.read_text() if self.processor_log.exists() else ""

    def stop_processor(self) -> int:
        assert self.processor is not None
        self.processor.send_signal(signal.SIGTERM)
        try:
            return self.processor.wait(timeout=STOP_TIMEOUT)
        finally:
            self.processor = None

    def control(self, request: dict[str, Any]) -> Any:
        return ask(self.control_path, request)

    def stats(self) -> dict[str, Any]:
        return self.control({"cmd": "stats"})

    def counter(self, name: str) -> int:
        return int(self.stats()["counters"].get(name, 0))

    # ---- the stand-in gateway ---------------------------------------------------------

    def start_gateway(self) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.gwns, sys.executable, "-u", GATEWAY, "--key", str(self.key),
             "--gateway", str(self.link.gateway_address.ip), "--processor", str(self.link.router_address.ip),
             "--listen", "20000", "--listen", "20021", "--signalling-port", "7500", "--signalling-port", "7501"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.gateway = proc
        self.events = Lines(proc)
        self.event("ready")

    def start_real_gateway(self, name: str) -> None:
        """The gateway layer of gateways/ (``python -m gateways``) instead of the stand-in."""
        manifest = write_manifest(self.config, name)  # what nfgate run would give it
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.gwns, sys.executable, "-u", "-m", "gateways", "--manifest", str(manifest),
             "--log-json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        proc.stdout = proc.stderr  # its events are JSON lines on stderr
        self.gateway = proc
        self.events = Lines(proc)
        self.event("ready")

    def event(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        assert self.events is not None

        def match(line: str) -> bool:
            ev = json.loads(line)
            return ev.get("event") == kind and all(ev.get(k) == v for k, v in fields.items())

        return json.loads(self.events.next(match, timeout=timeout))

    def command(self, **cmd: Any) -> None:
        assert self.gateway is not None and self.gateway.stdin is not None
        self.gateway.stdin.write(json.dumps(cmd) + "\n")
        self.gateway.stdin.flush()
        self.event("done", cmd=cmd["cmd"])

    # ---- peers ------------------------------------------------------------------------

    def many(self, host: str, dst: str, port: int, count: int, connect_timeout: float = 10.0) -> dict[str, Any]:
        """``count`` concurrent echo connections from ``host``; the client's JSON summary."""
        argv = [sys.executable, CLIENT, "many", dst, str(port), str(count), str(connect_timeout)]
        result = self.lab.run(host, argv, check=False, timeout=60 + connect_timeout * count)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def refused(self, host: str, dst: str, port: int) -> bool:
        """True if one connection gets no echo within ``NEGATIVE_WAIT`` (the kernel dropped it)."""
        return self.many(host, dst, port, 1, connect_timeout=NEGATIVE_WAIT)["replies"] == 0

    def conntrack(self) -> str:
        """The router's conntrack table, one entry a line."""
        return self.lab.run("router", ["conntrack", "-L"], check=False).stdout

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.kill()
            self.gateway.wait(timeout=STOP_TIMEOUT)
            self.gateway = None
        if self.processor is not None and self.processor.poll() is None:
            self.stop_processor()
        gwlink.remove(self.link, self.lab.ns("router"))
