"""What ``nfgate run`` keeps in its state directory, so that one instance runs and a killed one is cleaned up.

The state directory is the control socket's (``supervisor.control_socket``,
``/run/nfgate`` by default: gone at reboot, like every pid it records). It
holds, root-only:

- ``run.lock``: ``flock``ed by the running supervisor, with its pid. The
  kernel drops the lock when the process dies, however it dies, so a lock
  that can be taken is a dead owner's, and a second ``run`` that cannot take
  it refuses and names the pid.
- ``children.json``: the supervisor's children, each with its pid and the
  kernel's start time of that pid, so that a successor of a supervisor killed
  with SIGKILL stops exactly the processors and gateways it orphaned, and
  never a process that reused a pid.
- ``netns``: the gateway namespace nfgate created. A namespace of that name
  that this file does not name is someone else's: ``nfgate check`` refuses
  it, and nothing of nfgate's enters or deletes it.
- ``applied.toml`` / ``applied.json``: the config text of the ruleset last
  applied, and the backend, for ``nfgate apply --confirm``'s rollback.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from firewall.config import Config
from firewall.errors import KernelError
from firewall.namespaces import NETNS_DIR

LOCK, CHILDREN, NETNS, APPLIED, APPLIED_META = "run.lock", "children.json", "netns", "applied.toml", "applied.json"
REAP_POLL = 0.05  # seconds between looks at an orphan that was told to stop


def directory(config: Config) -> Path:
    return config.supervisor.control_socket.parent


def ensure(config: Config) -> Path:
    path = directory(config)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _write(path: Path, text: str) -> None:
    """Atomically, root-only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


# -- one instance -------------------------------------------------------------


class AlreadyRunning(KernelError):
    def __init__(self, pid: int | None, path: Path):
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"nfgate (run or gateways) is already running here ({who}, lock {path}): stop it, or use nfgate reload")


class NodeTaken(AlreadyRunning):
    """[ha]: another ``nfgate run`` (another config copy, another state directory) runs this node's daemons."""

    def __init__(self, pid: int | None, path: Path):
        KernelError.__init__(self, f"this node's keepalived and conntrackd are run by another nfgate run "
                                   f"({f'pid {pid}' if pid else 'another process'}, lock {path}): "
                                   "one nfgate run per node of the pair")
        self.pid = pid


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


class Lock:
    """An ``flock`` held for the life of the supervisor (the file descriptor is not inherited): the run
    lock (``run_lock``), and with [ha] the node's (``firewall.ha.node_lock``). ``refusal`` is raised,
    with the holder's pid, when another process holds it."""

    def __init__(self, path: Path, refusal: Callable[[int | None, Path], KernelError] = AlreadyRunning):
        self.path = path
        self.refusal = refusal
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.refusal(_pid_in(self.path), self.path) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def run_lock(config: Config) -> Lock:
    return Lock(ensure(config) / LOCK)


def running_pid(config: Config) -> int | None:
    """The pid of the live ``nfgate run`` that holds the lock, or None."""
    path = directory(config) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(path) or -1
    finally:
        os.close(fd)
    return None


# -- the children, for a successor ------------------------------------------------


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks after boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: split after its end.
    return int(stat[stat.rindex(")") + 2:].split()[19])


@dataclass(frozen=True)
class Recorded:
    name: str
    pid: int
    start: int


def record_children(config: Config, children: Iterable[tuple[str, int]]) -> None:
    out = []
    for name, pid in children:
        start = start_time(pid)
        if start is not None:
            out.append({"name": name, "pid": pid, "start": start})
    _write(directory(config) / CHILDREN, json.dumps(out) + "\n")


def orphans(config: Config) -> list[Recorded]:
    """The recorded children still alive: the same pid with the same start time."""
    try:
        entries = json.loads((directory(config) / CHILDREN).read_text())
    except (OSError, ValueError):
        return []
    found = []
    for e in entries if isinstance(entries, list) else ():
        try:
            item = Recorded(str(e["name"]), int(e["pid"]), int(e["start"]))
        except (KeyError, TypeError, ValueError):
            continue
        if start_time(item.pid) == item.start:
            found.append(item)
    return found


def stop_orphans(config: Config, timeout: float, log: Callable[[str], None]) -> list[Recorded]:
    """SIGTERM what a killed predecessor left running, SIGKILL what outlives ``timeout``."""
    found = orphans(config)
    if not found:
        return []
    log("a predecessor was killed without stopping: stopping what it left: "
        + ", ".join(f"{o.name} (pid {o.pid})" for o in found))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for o in found:
            if start_time(o.pid) == o.start:
                try:
                    os.kill(o.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(start_time(o.pid) == o.start for o in found):
            time.sleep(REAP_POLL)
        if not any(start_time(o.pid) == o.start for o in found):
            break
    (directory(config) / CHILDREN).unlink(missing_ok=True)
    return found


def forget_children(config: Config) -> None:
    (directory(config) / CHILDREN).unlink(missing_ok=True)


# -- the gateway namespace ----------------------------------------------------------


def claim_netns(config: Config) -> None:
    _write(ensure(config) / NETNS, config.gateway_link.netns + "\n")


def release_netns(config: Config) -> None:
    (directory(config) / NETNS).unlink(missing_ok=True)


def foreign_netns(config: Config) -> str | None:
    """Why ``gateway_link.netns`` may not be used, or None.

    A namespace of that name that nfgate did not create belongs to someone
    else: starting would kill everything inside it and delete it. Without
    read access to the state directory (not root), nothing can be told.
    """
    name = config.gateway_link.netns
    if not config.gateways or not (NETNS_DIR / name).exists():
        return None
    try:
        ours = (directory(config) / NETNS).read_text().strip()
    except FileNotFoundError:
        ours = None
    except OSError:
        return None
    if ours == name:
        return None
    return (f"namespace {name!r} exists and nfgate did not create it: nfgate kills everything inside its "
            "gateway namespace and deletes it on stop; name one that does not exist")


# -- the last applied ruleset ------------------------------------------------------


def record_applied(config: Config, text: str, backend: str) -> None:
    where = ensure(config)
    _write(where / APPLIED, text)
    _write(where / APPLIED_META, json.dumps({"backend": backend, "source": str(config.path or "")}) + "\n")


def applied(config: Config) -> tuple[str, str] | None:
    """(config text, backend) of the ruleset last applied, or None."""
    where = directory(config)
    try:
        text = (where / APPLIED).read_text()
        meta = json.loads((where / APPLIED_META).read_text())
        return text, str(meta["backend"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
