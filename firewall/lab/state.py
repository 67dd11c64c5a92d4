"""What labs are up: one small JSON file per lab, written by ``lab up``.

A lab is found by what it is (its topology, its hosts, who built it), not by
guessing from namespace names: ``nfgate lab status``, ``exec`` and ``down``
and the test session's cleanup read ``/run/nfgate/labs/<prefix>.json``
(``$NFGATE_LAB_STATE_DIR`` elsewhere)::

    {"prefix": "t1", "topology": "basic", "source": ".../basic.json",
     "hosts": ["ext", "router", "lan"], "created": 1765000000.0,
     "owner": {"user": "alice", "uid": 0, "pid": 4242}}

``owner.pid`` is the process the lab belongs to: the one that built it in
Python, the shell that ran ``nfgate lab up`` (through sudo: the
shell that ran sudo), or whatever
``$NFGATE_LAB_OWNER_PID`` names (the test session sets it, so that the labs
its CLI calls build are its own). Nothing removes a lab because its owner is
gone, except the test session's cleanup for its own ``nfgt*`` labs; ``lab
status`` shows it.

The file is written before the first namespace is made, so a crash half way
through ``lab up`` still leaves a record that ``lab down`` and the cleanup
find; ``down`` removes it last.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A directory under /run: gone at reboot, as the namespaces are.
STATE_DIR_ENV = "NFGATE_LAB_STATE_DIR"
DEFAULT_STATE_DIR = Path("/run/nfgate/labs")
OWNER_PID_ENV = "NFGATE_LAB_OWNER_PID"


def state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else DEFAULT_STATE_DIR


@dataclass(frozen=True)
class Owner:
    user: str
    uid: int
    pid: int

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A recycled pid reads as alive: a lab kept too long, never one pulled from a live owner.
        return True


def current_owner(pid: int | None = None) -> Owner:
    """This user, and ``pid`` (default: $NFGATE_LAB_OWNER_PID, else this process)."""
    env = os.environ.get(OWNER_PID_ENV, "")
    if env.isdigit():
        pid = int(env)
    elif pid is None:
        pid = os.getpid()
    uid = os.getuid()
    user = os.environ.get("SUDO_USER") or _user_name(uid)
    return Owner(user=user, uid=uid, pid=pid)


# Commands that only run another as root: a lab built through them belongs to
# the shell that ran them, which outlives them.
_ELEVATORS = frozenset({"sudo", "doas", "su", "runuser", "pkexec"})


def invoking_shell(pid: int) -> int:
    """``pid``, or, when it is sudo (or doas, su...), the process that ran it: a lab
    built by ``sudo nfgate lab up`` belongs to the shell, not to sudo, which exits at once."""
    for _ in range(4):  # sudo may run under su: a few steps, never a walk to init
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return pid
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm not in _ELEVATORS:
            return pid
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        if parent <= 1:
            return pid
        pid = parent
    return pid


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class LabState:
    prefix: str
    topology: str
    hosts: tuple[str, ...]
    owner: Owner
    source: str | None = None
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["hosts"] = list(self.hosts)
        return doc


def path_of(prefix: str) -> Path:
    return state_dir() / f"{prefix}.json"


def write(state: LabState) -> None:
    """Write (or replace) a lab's file atomically; root-writable, world-readable."""
    d = state_dir()
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = d / f".{state.prefix}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state.to_json(), indent=1) + "\n")
    os.replace(tmp, path_of(state.prefix))


def read(prefix: str) -> LabState | None:
    """The lab's state, or None if it has none (or an unreadable one, which is treated as none)."""
    try:
        doc = json.loads(path_of(prefix).read_text())
        return LabState(
            prefix=str(doc["prefix"]),
            topology=str(doc["topology"]),
            hosts=tuple(str(h) for h in doc["hosts"]),
            owner=Owner(user=str(doc["owner"]["user"]), uid=int(doc["owner"]["uid"]), pid=int(doc["owner"]["pid"])),
            source=doc.get("source"),
            created=float(doc.get("created", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(prefix: str) -> None:
    path_of(prefix).unlink(missing_ok=True)


def all_states() -> list[LabState]:
    """Every lab with a state file, by prefix."""
    d = state_dir()
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.json")):
        state = read(path.stem)
        if state is not None and state.prefix == path.stem:
            out.append(state)
    return out
