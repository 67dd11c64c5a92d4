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

A gateway with ``workers = N`` is N processes, one manifest each (seed
fig. 5b). Each holds a pipe to the supervisor open (``--ready-fd``): it
writes ``ready`` once it listens, and its end of file is its death, even by
SIGKILL. The supervisor tells every processor at once which workers are
live (their control socket's ``workers`` command, firewall/processor/spread.py),
so new flows skip a dead worker within milliseconds, and retries a
processor that could not be told (one starting) every ``LIVE_RETRY`` seconds.

Each process is isolated (DESIGN invariant 6): when one dies, only it is
restarted, after ``supervisor.restart_initial`` seconds, doubling with each
crash in a row up to ``restart_max``; a process that ran ``stable_after``
seconds starts again from the shortest wait. The processor and the other
gateways never notice.

With ``gateway_link.mode = "host"`` the gateways run on their own host
(docs/ha.md, "The AG host"): a router's ``nfgate run`` starts none (step 5)
and builds no blind track (step 2 only checks the interface), and ``nfgate
gateways`` on the AG host is this supervisor with ``role = GATEWAYS``: the
key, the manifests and step 5 alone, no rules, no link, no daemons of the pair.

Before all of it, the run lock (``firewall.state``): a second ``run``
refuses and names the first one's pid (with [ha], a second one for the same
node from another state directory too: the node lock, ``ha.node_lock``); a
predecessor killed with SIGKILL left its processors and gateways running,
and they are stopped (found by the pid file); the blind track it left is
replaced. A gateway namespace nfgate did not create is refused, never
entered.

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

Readiness and the watchdog (firewall/sdnotify.py). Each child says
``READY=1`` on the supervisor's own notify socket once it serves (a
processor bound to its queue, a gateway listening); when all have, ``nfgate
run`` says ``READY=1`` to systemd (``Type=notify``), so nothing ordered after
nfgate.service meets a router whose first SYN finds no processor. A kind that
runs its whole process itself (the tunnel) counts as ready when started.
Under ``WatchdogSec=`` the loop pings systemd every half period.

Logs and metrics. Every line the supervisor writes goes through
firewall/eventlog.py in the ``[log]`` format, which its children are given
too; ``[metrics] listen`` serves Prometheus series (firewall/metrics.py) from
a thread of their own, reading each child's counters over its control socket.

On SIGTERM or SIGINT the processes are stopped and the blind track and the
manifests removed; the static ruleset stays, with the steering stopped per
``processor.fail_mode`` (``rules.build(stopped=True)``): the router is
never left open by a stop, a crash or a restart. ``nfgate flush`` alone
removes the rules.
"""

from __future__ import annotations

import logging
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
from firewall import ha
from firewall import manifests
from firewall import namespaces
from firewall import sdnotify
from firewall import state
from firewall.metrics import Metrics, Process, parse_listen
from firewall.config import Config, load
from firewall.control import Command, ControlError, ControlServer, SelectorLoop, ask
from firewall.errors import KernelError, NfgateError, UsageError
from firewall.hazards import hazards
from firewall.rules import build
from firewall.signalling import load_or_create_key
from gateways.kinds import KINDS

CLIENT_TIMEOUT = 1.0  # seconds a control-socket client gets to send its request, and to read the answer
LIVE_RETRY = 0.05  # seconds between tries to tell a processor (one that is starting) which workers are live
HOLD_POLL = 0.05  # seconds between looks at what a child's earlier run left, before it starts again
PROCESSOR_TIMEOUT = 1.0  # seconds a processor's control socket gets to answer
REQUEST_MAX = 4096  # bytes of one control request
NOTIFY_SOCKET = "notify.sock"  # the children's NOTIFY_SOCKET, in the state directory
LOG = logging.getLogger("nfgate.run")


@dataclass
class Child:
    """One supervised process."""

    name: str
    kind: str  # "processor" or "gateway"
    argv: list[str]
    control: Path | None = None  # its own control socket (processors, gateways but standalone kinds)
    notifies: bool = True  # says READY=1 once it serves
    gateway: str = ""  # a gateway process: its gateway's name
    worker: int = 0  # and which of its workers
    watched: bool = False  # one of several workers: readiness and death through a pipe (--ready-fd)
    ready_fd: int | None = None  # the pipe's read end while it runs
    proc: subprocess.Popen | None = None
    ready: bool = False
    started: float = 0.0
    restarts: int = 0
    streak: int = 0  # crashes in a row without a stable run
    next_start: float | None = None
    last_exit: int | None = None
    stale: tuple[Path, ...] = ()  # files a killed predecessor leaves that would stop it: removed before each start
    # The live processes an earlier run of it left (keepalived's VRRP child, shutting down after its parent
    # was killed): each start waits for them to exit, and kills them after supervisor.stop_timeout.
    leftovers: Callable[[], list[int]] | None = None
    held_until: float | None = None  # waiting for leftovers: when they are killed
    # Run after each exit, however it died (keepalived's records the node as fault); returns what it did.
    on_exit: Callable[[], str] | None = None

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
            "ready": self.ready and self.running,  # it said READY=1 (a processor: serving its queues)
        }


def processor_view(config: Config) -> Any:
    """What a processor reads of the config: a reload that changes it restarts the processors.

    Everything but the filter rules, the policy and the supervisor; of a
    gateway's settings only what its kind tells the processor (rules.build's
    filter decides what is queued, in the kernel)."""
    data = config.model_dump(mode="json", exclude={"path", "rules", "policy", "supervisor", "gateways", "log", "metrics", "ha"})
    data["gateways"] = [
        {**g.model_dump(mode="json", exclude={"settings"}),
         "log_only": KINDS[g.kind].log_only(g.settings), "adjacent": KINDS[g.kind].adjacent_port(g.settings)}
        for g in config.gateways
    ]
    return data


def processor_control(config: Config, queue: int) -> Path:
    return config.supervisor.control_socket.parent / f"processor-{queue}.sock"


ROUTER, GATEWAYS = "router", "gateways"  # what a supervisor runs: nfgate run, nfgate gateways (the AG host)


def ha_children(config: Config, node: str) -> list[Child]:
    """With [ha], this node's conntrackd then keepalived (docs/ha.md): started first, in the
    foreground, restarted like any child; conntrackd's lock and socket left by a SIGKILL go first,
    and keepalived's pid files once no process of an earlier keepalived runs."""
    daemons = ha.daemons(config, node)

    def keepalived_gone() -> str:
        # Killed, keepalived runs no notify script: its state file would still say primary while
        # its dying VRRP process gives the addresses up, and the processors would act as master
        # beside the peer. A node without keepalived is not master (docs/ha.md).
        ha.record_state(config, node, "fault")
        return "node recorded as fault until its next transition"

    return [
        Child("conntrackd", "ha", daemons["conntrackd"], notifies=False, stale=tuple(ha.stale_files(config, node))),
        Child("keepalived", "ha", daemons["keepalived"], notifies=False, stale=tuple(ha.keepalived_stale_files(config, node)),
              leftovers=lambda: ha.keepalived_leftovers(config, node), on_exit=keepalived_gone),
    ]


def local_node(config: Config) -> str | None:
    """With [ha], the node this host is (by its sync address); None without."""
    return None if config.ha is None else ha.local_node(config, namespaces.local_addresses())


def runs_gateways(config: Config, role: str) -> bool:
    """Whether this supervisor starts the gateways: a router with its own gateway namespace,
    or the AG host (gateway_link.mode = "host": the routers start none)."""
    return role == GATEWAYS or config.gateway_link.mode == "namespace"


def children_for(config: Config, config_path: str, role: str = ROUTER) -> list[Child]:
    py = sys.executable
    out: list[Child] = []
    if role == ROUTER:
        node = local_node(config)
        if node is not None:
            out += ha_children(config, node)
        # No [[gateway]]: nothing is queued, so no processor (it would refuse to start).
        for i, queue in enumerate(config.processor.queues if config.gateways else ()):
            control = processor_control(config, queue)
            argv = [py, "-m", "firewall.processor", "--config", config_path, "--instance", str(i), "--control", str(control),
                    *(["--node", node] if node is not None else [])]
            out.append(Child(f"processor-{queue}", "processor", argv, control))
    if not runs_gateways(config, role):
        return out
    run_dir = config.supervisor.control_socket.parent
    log_args = ["--log-level", config.log.level] + (["--log-json"] if config.log.format == "json" else [])
    # In the router's gateway namespace; on the AG host, where they are started.
    enter = ["ip", "netns", "exec", config.gateway_link.netns] if config.gateway_link.mode == "namespace" else []
    for gw in config.gateways:
        standalone = KINDS[gw.kind].standalone  # runs its whole process itself: no stats socket, no READY
        for worker, name in enumerate(manifests.process_names(gw)):
            manifest = manifests.manifest_path(run_dir, name)
            control = None if standalone else gateway_control(config, name)
            argv = [*enter, py, "-m", "gateways", *log_args,
                    *(["--control", str(control)] if control is not None else []), "--manifest", str(manifest)]
            out.append(Child(f"gateway-{name}", "gateway", argv, control, notifies=not standalone,
                             gateway=gw.name, worker=worker, watched=gw.workers > 1))
    return out


def gateway_control(config: Config, name: str) -> Path:
    return config.supervisor.control_socket.parent / f"gateway-{name}.sock"


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
        role: str = ROUTER,
    ):
        self.role = role
        # With [ha], a router runs the config as its node does (Config.for_node): its half of the
        # pool, its address on a host gateway link. The AG host runs the config as a whole.
        self.ha_node = local_node(config) if role == ROUTER else None
        self.config = config if self.ha_node is None else config.for_node(self.ha_node)
        self.config_path = config_path
        self.backend_wanted = backend
        self.backend: str | None = None
        self.children = children if children is not None else children_for(config, config_path, role)
        self._log = log
        self.started = time.time()
        self.notify: sdnotify.Listener | None = None
        self.announced = False  # READY=1 went to systemd
        self.watchdog = sdnotify.watchdog_interval()
        self.next_ping = 0.0
        self.metrics: Metrics | None = None
        self.stopping = False
        self.reload_wanted = False
        self.control: ControlServer[Supervisor] | None = None
        self.lock = state.run_lock(config)
        self.node_lock = None if self.ha_node is None else state.Lock(ha.node_lock(config, self.ha_node), state.NodeTaken)
        self._installed: list[str] = []
        self._sel: selectors.BaseSelector | None = None
        self._tell: set[str] = set()  # processors not yet told the live workers

    def log(self, line: str, level: int = logging.INFO) -> None:
        if self._log is not None:
            self._log(line)
        else:
            LOG.log(level, "%s", line)

    def warn(self, line: str) -> None:
        self.log(line, logging.WARNING)

    # -- bringing up --------------------------------------------------------

    def claim(self) -> None:
        """Take the run lock (with [ha], the node's too); stop what a killed predecessor left. Changes nothing else."""
        cfg = self.config
        self.lock.acquire()
        try:
            if self.node_lock is not None:
                self.node_lock.path.parent.mkdir(parents=True, exist_ok=True)
                self.node_lock.acquire()  # another config's nfgate run for this node: no second keepalived
            foreign = state.foreign_netns(cfg) if self.role == ROUTER else None
            if foreign is not None:
                raise UsageError(f"gateway_link.netns: {foreign}")
        except BaseException:
            self._release()
            raise
        state.stop_orphans(cfg, cfg.supervisor.stop_timeout, self.log)

    def _release(self) -> None:
        if self.node_lock is not None:
            self.node_lock.release()
        self.lock.release()

    def setup(self) -> None:
        cfg = self.config
        for hazard in hazards(cfg) if self.role == ROUTER else ():  # the AG host applies no rule
            self.warn(str(hazard))
        load_or_create_key(cfg.signalling.key_file)
        run_dir = state.ensure(cfg)
        if runs_gateways(cfg, self.role):
            self._installed.append("manifests")
            manifests.write_all(cfg, run_dir)
        if self.role == GATEWAYS:
            self.log(f"gateways of {self.config_path}: {len(cfg.gateways)}, for the processors at "
                     + ", ".join(f"{n.name} {n.address}" for n in manifests.nodes(cfg)))
            if (warning := gwlink.host_timestamps_warning(cfg.gateway_link)) is not None:
                self.warn(warning)
            return  # the AG host: no rules, no link, no daemons of the pair
        node = self.ha_node
        if cfg.ha is not None and node is not None:
            ha.write(cfg, nodes=(node,))
            cfg.ha.run_dir.mkdir(parents=True, exist_ok=True)
            self.log(f"ha: node {node} (peer {cfg.ha.peer_of(node)}), files in {ha.paths(cfg.ha, node).config_dir}"
                     f"; firewall-side pool half {cfg.own_pool}")
        if cfg.gateways and cfg.gateway_link.mode == "namespace":
            state.claim_netns(cfg)
            gwlink.create(cfg.gateway_link)
            self._installed.append("gwlink")
            if (warning := gwlink.ipv6_forwarding_warning(cfg)) is not None:
                self.warn(warning)
            self.log(f"blind track up: {cfg.gateway_link.router_if} <-> {cfg.gateway_link.netns}")
        elif cfg.gateways:
            gwlink.check_host(cfg.gateway_link)
            self.log(f"gateway link: {cfg.gateway_link.router_if} ({cfg.gateway_link.router_address}) to the AG host "
                     f"{cfg.gateway_link.gateway_address.ip}")
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
                self.warn(f"cannot record the applied config: {err}")

    def _child_env(self) -> dict[str, str]:
        """The children's environment: their NOTIFY_SOCKET is ours, and systemd's watchdog is ours alone."""
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        return env

    def _start(self, child: Child, now: float) -> None:
        if self._held(child, now):
            return
        child.next_start = None
        child.ready = not child.notifies
        for path in child.stale:
            path.unlink(missing_ok=True)
        argv, keep = child.argv, ()
        if child.watched and self._sel is not None:
            self._unwatch(child)
            child.ready_fd, write_end = os.pipe()
            argv, keep = [*argv, "--ready-fd", str(write_end)], (write_end,)
        try:
            child.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=self._child_env(), pass_fds=keep)
        except OSError as err:
            self.warn(f"{child.name}: cannot start: {err}")
            self._unwatch(child)
            self._schedule(child, now)
            return
        finally:
            for fd in keep:
                os.close(fd)  # the child's now: its exit closes the last write end
        if child.ready_fd is not None and self._sel is not None:
            os.set_blocking(child.ready_fd, False)
            self._sel.register(child.ready_fd, selectors.EVENT_READ, lambda fd, c=child: self._on_ready(c))
        if child.kind == "processor" and self._watched_workers():
            self._tell.add(child.name)
        child.started = now
        self.log(f"{child.name}: started, pid {child.proc.pid}")
        self._record_children()

    def _held(self, child: Child, now: float) -> bool:
        """Whether the child's start waits for what its earlier run left (``Child.leftovers``): it
        would refuse to start beside them, or run twice. Polled every HOLD_POLL; after
        ``supervisor.stop_timeout`` they are killed."""
        pids = child.leftovers() if child.leftovers is not None else []
        if not pids:
            child.held_until = None
            return False
        timeout = self.config.supervisor.stop_timeout
        if child.held_until is None:
            child.held_until = now + timeout
            self.log(f"{child.name}: waiting for pid {', '.join(map(str, pids))} of its earlier run to exit")
        elif now >= child.held_until:
            self.warn(f"{child.name}: pid {', '.join(map(str, pids))} of its earlier run still there "
                      f"{timeout:.0f}s on: killing")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            child.held_until = now + timeout
        child.next_start = now + HOLD_POLL
        return True

    # -- workers: readiness, death, and telling the processors ----------------

    def _watched_workers(self) -> list[Child]:
        return [c for c in self.children if c.watched]

    def _unwatch(self, child: Child) -> None:
        if child.ready_fd is not None:
            if self._sel is not None:
                try:
                    self._sel.unregister(child.ready_fd)
                except (KeyError, ValueError):
                    pass
            os.close(child.ready_fd)
            child.ready_fd = None
        if child.watched:
            self._set_ready(child, False)  # the processors learn of it
        else:
            child.ready = False

    def _on_ready(self, child: Child) -> None:
        """The worker's pipe: ``ready`` once it listens; end of file when it exits, however."""
        assert child.ready_fd is not None
        try:
            data = os.read(child.ready_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._set_ready(child, b"ready" in data or child.ready)
        else:
            self._unwatch(child)

    def _set_ready(self, child: Child, ready: bool) -> None:
        if child.ready == ready:
            return
        child.ready = ready
        self.log(f"{child.name}: {'ready: takes new flows' if ready else 'gone: new flows go to the other workers'}")
        self._tell.update(c.name for c in self.children if c.kind == "processor")
        self._tell_processors()

    def _live_workers(self) -> dict[str, list[int]]:
        live: dict[str, list[int]] = {}
        for c in self._watched_workers():
            live.setdefault(c.gateway, [])
            if c.ready and c.running:
                live[c.gateway].append(c.worker)
        return live

    def _tell_processors(self) -> None:
        """Tell each processor not yet told which workers are live; a failure is retried."""
        if not self._tell:
            return
        live = self._live_workers()
        if not live:
            self._tell.clear()
            return
        for child in self.children:
            if child.name not in self._tell or child.control is None:
                continue
            if not child.running:
                self._tell.discard(child.name)  # told when it starts again
                continue
            try:
                ask(child.control, {"cmd": "workers", "live": live}, PROCESSOR_TIMEOUT)
            except (ControlError, OSError, ValueError):
                continue  # starting: its control socket is not there yet
            self._tell.discard(child.name)

    def _record_children(self) -> None:
        try:
            state.record_children(self.config, [(c.name, c.proc.pid) for c in self.children if c.running])
        except OSError as err:
            self.warn(f"cannot record the children's pids: {err}")

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
            self._unwatch(child)
            child.last_exit = code
            child.restarts += 1
            child.ready = False
            self.log(f"{child.name}: exited with {code}", logging.ERROR)
            if child.on_exit is not None:
                self.log(f"{child.name}: gone: {child.on_exit()}")
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
        self._sel = sel
        try:
            self.setup()
            self.control = ControlServer(
                self.config.supervisor.control_socket, COMMANDS, self, timeout=CLIENT_TIMEOUT, request_max=REQUEST_MAX,
                warn=lambda event, **fields: self.warn(" ".join([event, *(f"{k}={v}" for k, v in fields.items())])),
            )
            self.control.open()
            self.control.attach(SelectorLoop(sel))
            self.notify = sdnotify.Listener(state.directory(self.config) / NOTIFY_SOCKET)
            sel.register(self.notify.sock, selectors.EVENT_READ, lambda sock: self._on_notify())
            # The metrics' threads start after setup() and stop before the blind track
            # goes: pyroute2's netns sockets fork, and a fork must not copy a lock that
            # another thread holds.
            self._serve_metrics()
            now = time.monotonic()
            for child in self.children:
                self._start(child, now)
            self._check_ready()
            self._loop(sel)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            try:
                self.stop()
            finally:
                self._release()
            sel.close()
            rfd.close()
            wfd.close()

    def _serve_metrics(self) -> None:
        listen = parse_listen(self.config.metrics.listen)
        if listen is None:
            return
        metrics = Metrics(self.processes, self.config.metrics.poll, ha=self.ha_status)
        try:
            metrics.start(listen)
        except OSError as err:
            raise KernelError(f"metrics.listen: cannot serve on {self.config.metrics.listen}: {err.strerror or err}") from None
        self.metrics = metrics
        self.log(f"metrics on http://{self.config.metrics.listen}/metrics")

    def processes(self) -> list[Process]:
        """The children as the metrics see them (called from the metrics' threads)."""
        return [Process(c.name, c.kind, c.proc.pid if c.running else None, c.restarts, c.control)
                for c in list(self.children)]

    def _on_notify(self) -> None:
        assert self.notify is not None
        by_pid = {c.proc.pid: c for c in self.children if c.proc is not None}
        for pid, fields in self.notify.receive():
            child = by_pid.get(pid)
            if child is not None and fields.get("READY") == "1" and not child.ready:
                if child.watched:
                    self._set_ready(child, True)  # the processors learn of a worker that serves
                else:
                    child.ready = True
                    self.log(f"{child.name}: serving")
        self._check_ready()

    def _check_ready(self) -> None:
        """READY=1 to systemd once every child serves; once, for the life of nfgate run."""
        if self.announced or not all(c.ready for c in self.children):
            return
        self.announced = True
        names = ", ".join(c.name for c in self.children) or "no processes"
        self.log(f"ready: every process serves ({names})")
        sdnotify.notify(f"READY=1\nSTATUS=serving: {names}")

    def _ping(self, now: float) -> None:
        if self.watchdog is not None and now >= self.next_ping:
            sdnotify.notify("WATCHDOG=1")
            self.next_ping = now + self.watchdog

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
            self._ping(now)
            if self._tell:
                timeout = min(timeout, LIVE_RETRY)
            # Wake at least every CLIENT_TIMEOUT: the control socket's timeouts are swept here.
            for key, _ in sel.select(min(timeout, CLIENT_TIMEOUT, self.watchdog or CLIENT_TIMEOUT)):
                key.data(key.fileobj)
            if self.reload_wanted and not self.stopping:
                self.reload_wanted = False
                try:
                    self.reload()
                except NfgateError as err:
                    self.warn(f"reload refused: {err}")
            now = time.monotonic()
            self.control.expire(now)
            self._reap(now)
            self._tell_processors()
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
        if self.ha_node is not None:
            if new.ha is None or self.ha_node not in new.ha.nodes:
                raise UsageError(f"[ha] no longer names this node {self.ha_node}: restart nfgate run")
            new = new.for_node(self.ha_node)
            if old.ha is not None and new.ha.run_dir != old.ha.run_dir:
                raise UsageError("ha.run_dir changed: a running nfgate cannot move it (its node lock and its daemons' "
                                 "pid files are there); restart nfgate run to use the new one")
        for key in ("gateway_link", "supervisor.control_socket"):
            before, after = old, new
            for part in key.split("."):
                before, after = getattr(before, part), getattr(after, part)
            if before != after:
                raise UsageError(f"{key} changed: a running nfgate cannot move it; restart nfgate run to use the new one")
        if bool(old.gateways) != bool(new.gateways):
            raise UsageError("gateways added to a config that had none, or all removed: restart nfgate run")
        warnings = [str(h) for h in hazards(new)] if self.role == ROUTER else []
        for line in warnings:
            self.warn(line)
        for key in ("log", "metrics"):
            if getattr(old, key) != getattr(new, key):
                self.warn(f"[{key}] changed: it takes effect when nfgate run starts again")
        processors_change = processor_view(old) != processor_view(new)
        actions: list[str] = []
        if self.role == ROUTER:
            assert self.backend is not None
            actions = be.apply(build(new), self.backend, keep_bind=not processors_change).actions
        for line in actions:
            self.log(line)
        self.config = new
        self._record_applied()
        run_dir = state.directory(new)
        if runs_gateways(new, self.role):
            manifests.write_all(new, run_dir)
        old_manifests = {f"gateway-{name}": manifests.manifest_for(old, g, i).to_json()
                         for g in old.gateways for i, name in enumerate(manifests.process_names(g))}
        wanted = children_for(new, self.config_path, self.role)
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
            elif fresh.kind == "ha":
                changed = old.ha != new.ha
                if changed and self.ha_node is not None:
                    ha.write(new, nodes=(self.ha_node,))
            else:
                gw = next(g for g in new.gateways if g.name == fresh.gateway)
                changed = old_manifests.get(fresh.name) != manifests.manifest_for(new, gw, fresh.worker).to_json()
            if changed:
                self._terminate(current)
                self._unwatch(current)
                restarted.append(fresh.name)
                keep.append(fresh)
            else:
                keep.append(current)
        for gone in by_name.values():
            self._terminate(gone)
            self._unwatch(gone)
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
                "actions": actions}

    def _reload_command(self) -> dict[str, Any]:
        try:
            return self.reload()
        except NfgateError as err:
            self.warn(f"reload refused, nothing changed: {err}")
            raise ControlError(f"reload refused, nothing changed: {err}") from None

    def _terminate(self, child: Child) -> None:
        """Stop one child now: SIGTERM, then SIGKILL after ``supervisor.stop_timeout``."""
        child.next_start = None
        if not child.running:
            return
        timeout = self.config.supervisor.stop_timeout
        self._ping(time.monotonic())  # a reload may stop many children, each taking up to stop_timeout
        child.proc.terminate()
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.warn(f"{child.name}: no exit {timeout:.0f}s after SIGTERM: killing")
            child.proc.kill()
            child.proc.wait(timeout=timeout)

    # -- control socket ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        processors = {}
        for child in self.children:
            if child.kind == "processor" and child.control is not None:
                processors[child.name] = self._ask_processor(child, {"cmd": "stats"})
        return {
            "backend": self.backend,
            "since": self.started,
            "pid": os.getpid(),
            "processes": [c.describe(now) for c in self.children],
            "processors": processors,
            **({"ha": self.ha_status()} if self.config.ha is not None else {}),
        }

    def ha_status(self) -> dict[str, Any] | None:
        """The pair as this node sees it (firewall.ha.node_status); None without [ha]."""
        if self.config.ha is None or self.ha_node is None:
            return None
        return ha.node_status(self.config, self.ha_node)

    def flows(self, cmd: str = "flows") -> list[Any]:
        """Every processor's answer to ``cmd`` (``flows`` or ``rules``), merged."""
        out: list[Any] = []
        for child in self.children:
            if child.kind == "processor" and child.control is not None:
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
        sdnotify.notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
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
                self.warn(f"{child.name}: no exit {timeout:.0f}s after SIGTERM: killing")
                child.proc.kill()
                child.proc.wait(timeout=timeout)
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if "rules" in self._installed and self.backend is not None:
            self._stop_steering()
        if "gwlink" in self._installed:
            gwlink.remove(self.config.gateway_link)
            state.release_netns(self.config)
            self.log("blind track removed")
        for child in self.children:
            if child.ready_fd is not None:
                os.close(child.ready_fd)  # the selector closes with the loop
                child.ready_fd = None
        if "manifests" in self._installed:
            run_dir = self.config.supervisor.control_socket.parent
            for gw in self.config.gateways:
                for name in manifests.process_names(gw):
                    manifests.manifest_path(run_dir, name).unlink(missing_ok=True)
            state.forget_children(self.config)
        self._installed.clear()

    def _stop_steering(self) -> None:
        """The static rules stay; only the steering goes, per the fail mode."""
        mode = self.config.processor.fail_mode
        try:
            be.apply(build(self.config, stopped=True), self.backend)
        except NfgateError as err:
            self.warn(f"cannot stop the steering ({err}): the running ruleset stays; without processors "
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
