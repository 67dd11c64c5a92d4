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

Before all of it, the run lock (``firewall.state``): a second ``run``
refuses and names the first one's pid; a predecessor killed with SIGKILL
left its processors and gateways running, and they are stopped (found by
the pid file); the blind track it left is replaced. A gateway namespace
nfgate did not create is refused, never entered.

The loop is single-threaded: signals (SIGCHLD, SIGTERM, SIGINT, SIGHUP)
wake it through ``signal.set_wakeup_fd``; the control socket
(``firewall.control``: ``status``, ``flows``, ``reload``) is served from
the same loop without blocking, so that a stuck client cannot stall the
supervisor.

``reload`` (SIGHUP, ``nfgate reload``) reads the config again and refuses a
bad one, with its key paths, keeping everything as it is; else it applies
the static and steering rules in one transaction per table, keeping the
binding table (bindings, dynamic rules), restarts only the gateways whose
manifest changed, starts and stops the gateways added and removed, and
restarts the processors only if what they read changed (their successors
adopt the bindings from conntrack). Live flows of a gateway that is kept
go on.

On SIGTERM or SIGINT the processes are stopped and the blind track and the
manifests removed; the static ruleset stays, with the steering stopped per
``processor.fail_mode`` (``rules.build(stopped=True)``): the router is
never left open by a stop, a crash or a restart. ``nfgate flush`` alone
removes the rules.
"""

from __future__ import annotations

import os
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
from firewall import state
from firewall.config import Config, load
from firewall.control import Command, ControlError, ControlServer, SelectorLoop, ask
from firewall.errors import KernelError, NfgateError, UsageError
from firewall.hazards import hazards
from firewall.rules import build
from firewall.signalling import load_or_create_key
from gateways.kinds import KINDS

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


def processor_view(config: Config) -> Any:
    """What a processor reads of the config: a reload that changes it restarts the processors.

    Everything but the filter rules, the policy and the supervisor; of a
    gateway's settings only what its kind tells the processor (rules.build's
    filter decides what is queued, in the kernel)."""
    data = config.model_dump(mode="json", exclude={"path", "rules", "policy", "supervisor", "gateways"})
    data["gateways"] = [
        {**g.model_dump(mode="json", exclude={"settings"}),
         "log_only": KINDS[g.kind].log_only(g.settings), "adjacent": KINDS[g.kind].adjacent_port(g.settings)}
        for g in config.gateways
    ]
    return data


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
        self.reload_wanted = False
        self.control: ControlServer[Supervisor] | None = None
        self.lock = state.Lock(config)
        self._installed: list[str] = []

    # -- bringing up --------------------------------------------------------

    def claim(self) -> None:
        """Take the run lock; stop what a killed predecessor left. Changes nothing else."""
        cfg = self.config
        self.lock.acquire()
        foreign = state.foreign_netns(cfg)
        if foreign is not None:
            self.lock.release()
            raise UsageError(f"gateway_link.netns: {foreign}")
        state.stop_orphans(cfg, cfg.supervisor.stop_timeout, self.log)

    def setup(self) -> None:
        cfg = self.config
        for hazard in hazards(cfg):
            self.log(f"warning: {hazard}")
        load_or_create_key(cfg.signalling.key_file)
        run_dir = state.ensure(cfg)
        self._installed.append("manifests")
        manifests.write_all(cfg, run_dir)
        if cfg.gateways:
            state.claim_netns(cfg)
            gwlink.create(cfg.gateway_link)
            self._installed.append("gwlink")
            self.log(f"blind track up: {cfg.gateway_link.router_if} <-> {cfg.gateway_link.netns}")
        rs = build(cfg)
        choice = be.choose(self.backend_wanted, rs)
        report = be.apply(rs, choice.backend)
        self._installed.append("rules")
        self.backend = choice.backend
        self._record_applied()
        self.log(f"rules applied with {choice.backend} ({choice.reason})")
        for line in report.actions:
            self.log(line)

    def _record_applied(self) -> None:
        if self.config.path is not None and self.backend is not None:
            try:
                state.record_applied(self.config, Path(self.config.path).read_text(), self.backend)
            except OSError as err:
                self.log(f"cannot record the applied config: {err}")

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
        self._record_children()

    def _record_children(self) -> None:
        try:
            state.record_children(self.config, [(c.name, c.proc.pid) for c in self.children if c.running])
        except OSError as err:
            self.log(f"cannot record the children's pids: {err}")

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
        self.claim()
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ, _drain)
        old_wakeup = signal.set_wakeup_fd(wfd.fileno())
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
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
            try:
                self.stop()
            finally:
                self.lock.release()
            sel.close()
            rfd.close()
            wfd.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_wanted = True

    def _loop(self, sel: selectors.BaseSelector) -> None:
        assert self.control is not None
        while not self.stopping:
            now = time.monotonic()
            due = [c.next_start for c in self.children if c.next_start is not None]
            timeout = max(0.0, min(due) - now) if due else 1.0
            # Wake at least every CLIENT_TIMEOUT: the control socket's timeouts are swept here.
            for key, _ in sel.select(min(timeout, CLIENT_TIMEOUT)):
                key.data(key.fileobj)
            if self.reload_wanted and not self.stopping:
                self.reload_wanted = False
                try:
                    self.reload()
                except NfgateError as err:
                    self.log(f"reload refused: {err}")
            now = time.monotonic()
            self.control.expire(now)
            self._reap(now)
            for child in self.children:
                if child.next_start is not None and child.next_start <= now and not self.stopping:
                    self._start(child, now)

    # -- reload -------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Apply the config file as it is now; refuse, changing nothing, if it cannot be.

        Raises NfgateError (a ConfigError names every key path) with the old
        rules and processes untouched."""
        old = self.config
        new = load(self.config_path)
        for key in ("gateway_link", "supervisor.control_socket"):
            before, after = old, new
            for part in key.split("."):
                before, after = getattr(before, part), getattr(after, part)
            if before != after:
                raise UsageError(f"{key} changed: a running nfgate cannot move it; restart nfgate run to use the new one")
        if bool(old.gateways) != bool(new.gateways):
            raise UsageError("gateways added to a config that had none, or all removed: restart nfgate run")
        warnings = [str(h) for h in hazards(new)]
        for line in warnings:
            self.log(f"warning: {line}")
        assert self.backend is not None
        processors_change = processor_view(old) != processor_view(new)
        report = be.apply(build(new), self.backend, keep_bind=not processors_change)
        for line in report.actions:
            self.log(line)
        self.config = new
        self._record_applied()
        run_dir = state.directory(new)
        manifests.write_all(new, run_dir)
        old_manifests = {g.name: manifests.manifest_for(old, g).to_json() for g in old.gateways}
        wanted = children_for(new, self.config_path)
        by_name = {c.name: c for c in self.children}
        restarted, started, stopped = [], [], []
        now = time.monotonic()
        keep: list[Child] = []
        for fresh in wanted:
            current = by_name.pop(fresh.name, None)
            if current is None:
                started.append(fresh.name)
                keep.append(fresh)
                continue
            if fresh.kind == "processor":
                changed = processors_change
            else:
                gw = next(g for g in new.gateways if f"gateway-{g.name}" == fresh.name)
                changed = old_manifests.get(gw.name) != manifests.manifest_for(new, gw).to_json()
            if changed:
                self._terminate(current)
                restarted.append(fresh.name)
                keep.append(fresh)
            else:
                keep.append(current)
        for gone in by_name.values():
            self._terminate(gone)
            manifests.manifest_path(run_dir, gone.name.removeprefix("gateway-")).unlink(missing_ok=True)
            stopped.append(gone.name)
        self.children = keep
        for child in keep:
            if child.proc is None and child.next_start is None:
                self._start(child, now)
        self._record_children()
        if processors_change:
            self.log("processor settings changed (they take no config live): processors restarted; "
                     "their successors adopt the bindings from conntrack")
        self.log(f"reloaded {self.config_path}: rules applied; restarted {', '.join(restarted) or 'nothing'}; "
                 f"started {', '.join(started) or 'nothing'}; stopped {', '.join(stopped) or 'nothing'}")
        return {"restarted": restarted, "started": started, "stopped": stopped, "warnings": warnings,
                "actions": report.actions}

    def _reload_command(self) -> dict[str, Any]:
        try:
            return self.reload()
        except NfgateError as err:
            self.log(f"reload refused, nothing changed: {err}")
            raise ControlError(f"reload refused, nothing changed: {err}") from None

    def _terminate(self, child: Child) -> None:
        """Stop one child now: SIGTERM, then SIGKILL after ``supervisor.stop_timeout``."""
        child.next_start = None
        if not child.running:
            return
        timeout = self.config.supervisor.stop_timeout
        child.proc.terminate()
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{child.name}: no exit {timeout:.0f}s after SIGTERM: killing")
            child.proc.kill()
            child.proc.wait(timeout=timeout)

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
            "pid": os.getpid(),
            "processes": [c.describe(now) for c in self.children],
            "processors": processors,
        }

    def flows(self, cmd: str = "flows") -> list[Any]:
        """Every processor's answer to ``cmd`` (``flows`` or ``rules``), merged."""
        out: list[Any] = []
        for child in self.children:
            if child.control is not None:
                answer = self._ask_processor(child, {"cmd": cmd})
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
        if "rules" in self._installed and self.backend is not None:
            self._stop_steering()
        if "gwlink" in self._installed:
            gwlink.remove(self.config.gateway_link)
            state.release_netns(self.config)
            self.log("blind track removed")
        if "manifests" in self._installed:
            run_dir = self.config.supervisor.control_socket.parent
            for gw in self.config.gateways:
                manifests.manifest_path(run_dir, gw.name).unlink(missing_ok=True)
            state.forget_children(self.config)
        self._installed.clear()

    def _stop_steering(self) -> None:
        """The static rules stay; only the steering goes, per the fail mode."""
        mode = self.config.processor.fail_mode
        try:
            be.apply(build(self.config, stopped=True), self.backend)
        except NfgateError as err:
            self.log(f"cannot stop the steering ({err}): the running ruleset stays; without processors "
                     f"its queues {'pass' if mode == 'open' else 'drop'} gateway traffic")
            return
        if self.config.gateways:
            what = "dropped (fail_mode closed)" if mode == "closed" else "left to the filter (fail_mode open)"
            self.log(f"static rules stay; steering stopped: gateway traffic is {what}; nfgate flush removes everything")
        else:
            self.log("static rules stay; nfgate flush removes them")


COMMANDS: dict[str, Command[Supervisor]] = {
    "status": Command(lambda s, a: s.status(), help="the processes, and each processor's stats"),
    "flows": Command(lambda s, a: s.flows(), help="every processor's live bindings"),
    "rules": Command(lambda s, a: s.flows("rules"), help="every processor's dynamic rules"),
    "reload": Command(lambda s, a: s._reload_command(), help="apply the config file again; refuse a bad one"),
}


def query(config: Config, cmd: str, timeout: float | None = None, refused: type[NfgateError] = KernelError) -> Any:
    """What ``nfgate status`` / ``flows`` / ``reload`` ask the running supervisor; a refusal raises ``refused``."""
    path = config.supervisor.control_socket
    try:
        return ask(path, {"cmd": cmd}, *(() if timeout is None else (timeout,)))
    except FileNotFoundError:
        raise KernelError(f"nfgate is not running here (no control socket {path})") from None
    except ConnectionRefusedError:
        raise KernelError(f"nfgate is not answering on {path} (stale socket?)") from None
    except ControlError as err:
        raise refused(f"nfgate on {path}: {err}" if refused is KernelError else str(err)) from None
    except (OSError, ValueError) as err:
        raise KernelError(f"cannot read status from {path}: {err}") from None
