"""The tunnel's roles as real processes in the ``nat-tunnel`` lab.

``pub`` (198.51.100.10) runs the control server; ``priv`` (10.77.0.10),
behind the masquerading ``nat`` with short conntrack timeouts, runs the
mediators and the private services. Processes log JSON lines; ``Proc``
collects them in a thread so tests can poll for an event (never sleep).
Everything is started through ``Lab.popen``, so the lab's teardown stops it
even when a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PUB, PRIV = "198.51.100.10", "10.77.0.10"
NAT_WAN = "198.51.100.1"
SERVICE_PORT = 7443
TOKENS = {"m1": "token-of-m1-0123456789abcdef", "m2": "token-of-m2-0123456789abcdef"}
START_TIMEOUT = 10.0
READ_TAIL_TIMEOUT = 2.0  # seconds to read what an exited process left in its pipes


class Proc:
    """A background process whose stdout and stderr lines are collected."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self.popen = popen
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (popen.stdout, popen.stderr) if stream is not None
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.text.append(line)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    self.lines.append(doc)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.lines)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [d for d in self.snapshot() if d.get("event") == event]

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = START_TIMEOUT, what: str = "") -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.popen.poll() is not None:
                # Exited: its last lines may still be in the pipes; read them before judging.
                for reader in self._readers:
                    reader.join(timeout=READ_TAIL_TIMEOUT)
            if self.popen.poll() is not None and not any(predicate(d) for d in self.snapshot()):
                raise AssertionError(f"{self.name} exited {self.popen.returncode}: {self.output()}")
            return next((d for d in self.snapshot() if predicate(d)), None)

        return wait_for(found, timeout=timeout, interval=0.05, what=what or f"{self.name} to log it")

    def wait_event(self, event: str, timeout: float = START_TIMEOUT, **fields: Any) -> dict[str, Any]:
        return self.wait(
            lambda d: d.get("event") == event and all(d.get(k) == v for k, v in fields.items()),
            timeout, f"{self.name} to log {event} {fields or ''}",
        )

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.text[-30:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


class TunnelLab:
    """Server, mediators and peers of one nat-tunnel lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        # Short: a unix socket path must fit in 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="nfgtun-"))
        self.socket = self.dir / "control.sock"
        self.pin = ""
        self.server: Proc | None = None
        self.procs: list[Proc] = []

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.stop()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    # -- files ---------------------------------------------------------------------------------

    def keygen(self) -> str:
        out = self.cli("keygen", "--cert", self.dir / "server.crt", "--key", self.dir / "server.key", "--force")
        self.pin = out.stdout.strip()
        return self.pin

    def write_mediators(self, entries: dict[str, dict[str, Any]]) -> Path:
        path = self.dir / "mediators.toml"
        path.write_text("".join(_table(f"mediator.{name}", values) for name, values in entries.items()))
        os.chmod(path, 0o600)
        return path

    # -- processes -------------------------------------------------------------------------------

    def _start(self, host: str, argv: list[Any], name: str) -> Proc:
        popen = self.lab.popen(
            host, [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )
        proc = Proc(popen, name)
        self.procs.append(proc)
        return proc

    def start_server(
        self, server: dict[str, Any] | None = None, protocol: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None, mediators: dict[str, dict[str, Any]] | None = None,
    ) -> Proc:
        if not self.pin:
            self.keygen()
        self.write_mediators(mediators or {
            name: {"token": token, "publish_ports": ["8000-9999"]} for name, token in TOKENS.items()
        })
        config = self.dir / "server.toml"
        config.write_text(
            _table("server", {
                "listen": PUB, "service_port": SERVICE_PORT, "public_address": PUB,
                "cert": self.dir / "server.crt", "key": self.dir / "server.key",
                "mediators": self.dir / "mediators.toml", "control_socket": self.socket,
                "request_timeout": 3.0, "channel_wait": 2.0, **(server or {}),
            })
            + _table("protocol", protocol or {})
            + _table("limits", limits or {})
        )
        self.server = self._start("pub", [sys.executable, "-m", "tunnel.cli", "server", "-c", config, "--log-json"], "server")
        self.server.wait_event("ready")
        return self.server

    def start_mediator(
        self, identity: str = "m1", *, token: str | None = None, pin: str | None = None,
        protocol: dict[str, Any] | None = None, allow: list[dict[str, Any]] | None = None,
        wait_ready: bool = True, **mediator: Any,
    ) -> Proc:
        token_file = self.dir / f"{identity}-{len(self.procs)}.token"
        token_file.write_text((token or TOKENS[identity]) + "\n")
        os.chmod(token_file, 0o600)
        config = self.dir / f"{identity}-{len(self.procs)}.toml"
        rules = allow if allow is not None else [
            {"to": "10.77.0.10/32", "ports": ["8000", "9000-9100"], "proto": "any", "ops": ["connect", "send", "open"]},
        ]
        config.write_text(
            _table("mediator", {
                "identity": identity, "token_file": token_file, "server": PUB, "service_port": SERVICE_PORT,
                "server_pin": pin or self.pin, "service": "netns-test", "reconnect_initial": 0.2,
                "reconnect_max": 1.0, **mediator,
            })
            # A protocol key set to None is left out: the mediator's own default.
            + _table("protocol", {k: v for k, v in {"keepalive_interval": 2.0, **(protocol or {})}.items() if v is not None})
            + "".join(_table("[allow]", rule) for rule in rules)
        )
        proc = self._start("priv", [sys.executable, "-m", "tunnel.cli", "mediator", "-c", config, "--log-json"], identity)
        if wait_ready:
            proc.wait_event("ready")
        return proc

    def peer(self, host: str, *args: Any, name: str = "peer") -> Proc:
        return self._start(host, [sys.executable, HERE / "netpeer.py", *args], name)

    def run_peer(self, host: str, *args: Any, timeout: float = 30.0) -> dict[str, Any]:
        proc = self.lab.run(host, [sys.executable, str(HERE / "netpeer.py"), *map(str, args)], timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def udp_echo(self, port: int) -> Proc:
        proc = self.peer("priv", "udp-echo", PRIV, port, name=f"udp-echo-{port}")
        proc.wait(lambda d: "listening" in d, what="the UDP echo to bind")
        return proc

    # -- the operator ------------------------------------------------------------------------------

    def cli(self, *args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tunnel.cli", *map(str, args)]
        env = {**os.environ, "NFGATE_TUNNEL_SOCKET": str(self.socket)}
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[3:])} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def listing(self) -> dict[str, Any]:
        return json.loads(self.cli("list", "--json").stdout)

    def mediator(self, identity: str = "m1") -> dict[str, Any]:
        return next(m for m in self.listing()["mediators"] if m["identity"] == identity)

    def publish(self, identity: str, target: str, public: int, udp: bool = False) -> None:
        self.cli("publish", identity, "--to", target, "--public", public, *(["--udp"] if udp else []))

    def wait_connects(self, identity: str, count: int, timeout: float) -> dict[str, Any]:
        return wait_for(
            lambda: (m := self.mediator(identity))["connects"] >= count and m["state"] == "connected" and m,
            timeout=timeout, interval=0.1, what=f"{identity} to connect {count} times",
        )


def curl(lab: Lab, url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """curl from pub (bounded by --max-time), output and exit code as they come."""
    return lab.run("pub", ["curl", "-sS", "--max-time", str(timeout), *args, url], check=False, timeout=timeout + 10)


def conntrack(lab: Lab, *args: str) -> str:
    return lab.run("nat", ["conntrack", *args], check=False).stdout


def monotonic() -> float:
    return time.monotonic()
