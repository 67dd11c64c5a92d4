"""``nfgate run``: bring the whole firewall up, keep it up, take it down cleanly.

Start-up, in this order, so that no packet is queued before someone listens
(or, in fail-open mode, so that the bypass covers the gap):

1. the signalling key (created root-only on first start);
2. the blind track: the gateway namespace and its veth link (firewall.gwlink);
3. the ruleset (firewall.backend, ``--backend`` as for ``nfgate apply``);
4. one processor process per queue, in the router's namespace;
5. one process per gateway, in the gateway namespace (``ip netns exec``),
   each given its manifest (firewall.manifests, written root-only next to
   the control socket before any gateway starts): a gateway reads nothing else.

Each process is isolated (DESIGN invariant 6): when one dies, only it is
restarted, after ``supervisor.restart_initial`` seconds, doubling with each
crash in a row up to ``restart_max``; a process that ran ``stable_after``
seconds starts again from the shortest wait. The processor and the other
gateways never notice.

The loop is single-threaded: signals (SIGCHLD, SIGTERM, SIGINT) wake it
through ``signal.set_wakeup_fd``; the control socket (``firewall.control``:
``status`` and ``flows``) is served from the same loop without blocking, so
that a stuck client cannot stall the supervisor. On SIGTERM or SIGINT
everything started is stopped and everything installed is removed:
processes, ruleset, blind track, manifests, socket.
"""

from __future__ import annotations

import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from firewall import backend as be
from firewall import gwlink
from firewall import manifests
from firewall.config import Config
from firewall.control import Command, ControlError, ControlServer, SelectorLoop, ask
from firewall.errors import KernelError
from firewall.rules import build
from firewall.signalling import load_or_create_key

CLIENT_TIMEOUT = 1.0  # seconds a control-socket client gets to send its request, and to read the answer
PROCESSOR_TIMEOUT = 1.0  # seconds a processor's control socket gets to answer
REQUEST_MAX = 4096  # bytes of one control request


@dataclass
class Child:
    """One supervised process."""

    name: str
    kind: str  # "processor" or "gateway"
    argv: list[str]
    control: Path | None = None  # the processor's own control socket
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    streak: int = 0  # crashes in a row without a stable run
    next_start: float | None = None
    last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.proc.pid if self.running else None,
            "state": "running" if self.running else ("restarting" if self.next_start else "stopped"),
            "restarts": self.restarts,
            "uptime": round(now - self.started, 1) if self.running else 0.0,
            "last_exit": self.last_exit,
        }


def processor_control(config: Config, queue: int) -> Path:
    return config.supervisor.control_socket.parent / f"processor-{queue}.sock"


def children_for(config: Config, config_path: str) -> list[Child]:
    py = sys.executable
    out = []
    for i, queue in enumerate(config.processor.queues):
        control = processor_control(config, queue)
        argv = [py, "-m", "firewall.processor", "--config", config_path, "--instance", str(i), "--control", str(control)]
        out.append(Child(f"processor-{queue}", "processor", argv, control))
    run_dir = config.supervisor.control_socket.parent
    for gw in config.gateways:
        manifest = manifests.manifest_path(run_dir, gw.name)
        argv = ["ip", "netns", "exec", config.gateway_link.netns, py, "-m", "gateways", "--manifest", str(manifest)]
        out.append(Child(f"gateway-{gw.name}", "gateway", argv))
    return out


def _drain(wake: socket.socket) -> None:
    """Empty the wake-up socket: the signal handlers have already run."""
    try:
        while wake.recv(512):
            pass
    except BlockingIOError:
        pass


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: str,
        backend: str = "auto",
        children: list[Child] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.backend_wanted = backend
        self.backend: str | None = None
        self.children = children if children is not None else children_for(config, config_path)
        self.log = log or (lambda line: print(f"nfgate run: {line}", file=sys.stderr, flush=True))
        self.started = time.time()
        self.stopping = False
        self.control: ControlServer[Supervisor] | None = None
        self._installed: list[str] = []

    # -- bringing up --------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        load_or_create_key(cfg.signalling.key_file)
        run_dir = cfg.supervisor.control_socket.parent
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._installed.append("manifests")
        manifests.write_all(cfg, run_dir)
        if cfg.gateways:
            gwlink.create(cfg.gateway_link)
            self._installed.append("gwlink")
            self.log(f"blind track up: {cfg.gateway_link.router_if} <-> {cfg.gateway_link.netns}")
        rs = build(cfg)
        choice = be.choose(self.backend_wanted, rs)
        self._installed.append("rules")
        report = be.apply(rs, choice.backend)
        self.backend = choice.backend
        self.log(f"rules applied with {choice.backend} ({choice.reason})")
        for line in report.actions:
            self.log(line)

    def _start(self, child: Child, now: float) -> None:
        child.next_start = None
        try:
            child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL)
        except OSError as err:
            self.log(f"{child.name}: cannot start: {err}")
            self._schedule(child, now)
            return
        child.started = now
        self.log(f"{child.name}: started, pid {child.proc.pid}")

    def _schedule(self, child: Child, now: float) -> None:
        sup = self.config.supervisor
        if now - child.started >= sup.stable_after:
            child.streak = 0
        delay = min(sup.restart_max, sup.restart_initial * (2**child.streak))
        child.streak += 1
        child.next_start = now + delay
        self.log(f"{child.name}: restarting in {delay:.1f}s")

    def _reap(self, now: float) -> None:
        for child in self.children:
            if child.proc is None or child.next_start is not None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.last_exit = code
            child.restarts += 1
            self.log(f"{child.name}: exited with {code}")
            self._schedule(child, now)

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Set up, supervise until SIGTERM/SIGINT, then tear down. Raises NfgateError on set-up failure."""
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ, _drain)
        old_wakeup = signal.set_wakeup_fd(wfd.fileno())
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.setup()
            self.control = ControlServer(
                self.config.supervisor.control_socket, COMMANDS, self, timeout=CLIENT_TIMEOUT, request_max=REQUEST_MAX,
                warn=lambda event, **fields: self.log(" ".join([event, *(f"{k}={v}" for k, v in fields.items())])),
            )
            self.control.open()
            self.control.attach(SelectorLoop(sel))
            now = time.monotonic()
            for child in self.children:
                self._start(child, now)
            self._loop(sel)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.stop()
            sel.close()
            rfd.close()
            wfd.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    def _loop(self, sel: selectors.BaseSelector) -> None:
        assert self.control is not None
        while not self.stopping:
            now = time.monotonic()
            due = [c.next_start for c in self.children if c.next_start is not None]
            timeout = max(0.0, min(due) - now) if due else 1.0
            # Wake at least every CLIENT_TIMEOUT: the control socket's timeouts are swept here.
            for key, _ in sel.select(min(timeout, CLIENT_TIMEOUT)):
                key.data(key.fileobj)
            now = time.monotonic()
            self.control.expire(now)
            self._reap(now)
            for child in self.children:
                if child.next_start is not None and child.next_start <= now and not self.stopping:
                    self._start(child, now)

    # -- control socket ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        processors = {}
        for child in self.children:
            if child.control is not None:
                processors[child.name] = self._ask_processor(child, {"cmd": "stats"})
        return {
            "backend": self.backend,
            "since": self.started,
            "processes": [c.describe(now) for c in self.children],
            "processors": processors,
        }

    def flows(self) -> list[Any]:
        out: list[Any] = []
        for child in self.children:
            if child.control is not None:
                answer = self._ask_processor(child, {"cmd": "flows"})
                if isinstance(answer, list):
                    out += answer
        return out

    def _ask_processor(self, child: Child, request: dict[str, Any]) -> Any:
        if not child.running:
            return {"error": "not running"}
        try:
            return ask(child.control, request, PROCESSOR_TIMEOUT)
        except ControlError as err:
            return {"error": str(err)}
        except (OSError, ValueError) as err:
            return {"error": f"no answer: {err}"}

    # -- taking down ----------------------------------------------------------------

    def stop(self) -> None:
        timeout = self.config.supervisor.stop_timeout
        for child in self.children:
            child.next_start = None
            if child.running:
                child.proc.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{child.name}: no exit {timeout:.0f}s after SIGTERM: killing")
                child.proc.kill()
                child.proc.wait(timeout=timeout)
        if self.control is not None:
            self.control.close()
            self.control = None
        if "rules" in self._installed:
            for line in be.flush():
                self.log(line)
        if "gwlink" in self._installed:
            gwlink.remove(self.config.gateway_link)
            self.log("blind track removed")
        if "manifests" in self._installed:
            run_dir = self.config.supervisor.control_socket.parent
            for gw in self.config.gateways:
                manifests.manifest_path(run_dir, gw.name).unlink(missing_ok=True)
        self._installed.clear()


COMMANDS: dict[str, Command[Supervisor]] = {
    "status": Command(lambda s, a: s.status(), help="the processes, and each processor's stats"),
    "flows": Command(lambda s, a: s.flows(), help="every processor's live bindings"),
}


def query(config: Config, cmd: str) -> Any:
    """What ``nfgate status`` / ``nfgate flows`` ask the running supervisor."""
    path = config.supervisor.control_socket
    try:
        return ask(path, {"cmd": cmd})
    except FileNotFoundError:
        raise KernelError(f"nfgate is not running here (no control socket {path})") from None
    except ConnectionRefusedError:
        raise KernelError(f"nfgate is not answering on {path} (stale socket?)") from None
    except ControlError as err:
        raise KernelError(f"nfgate on {path}: {err}") from None
    except (OSError, ValueError) as err:
        raise KernelError(f"cannot read status from {path}: {err}") from None
