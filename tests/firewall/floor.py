"""What any user-mode relay could reach on nfgate's datapath: stand-ins put in a running gateway's place.

For the benches (``relay_bench``'s new connections/s, ``smtp_bench``'s
`each` and `session`; tests/firewall/test_floor_netns.py checks that the
stand-ins carry connections, never a figure). A gateway's cost per connection
is its own work (signalling, the log lines, limits, a relay core) plus
what any relay pays (accept, connect, reads and writes, closes), and the
datapath around it (the processor's two first packets, two TCP
connections through NAT) is the same whichever relay sits there. To tell
them apart, ``StandIns`` puts two relays that do nothing but relay on the
gateway's own listening socket, in its namespace, with the same processor
and bindings:

- ``compiled``: tests/firewall/floor_relay.c (epoll, one thread), built
  with gcc (scripts/setup installs it): the floor of a user-mode relay;
- ``python``: tests/firewall/floor_pyrelay.py (uvloop, readiness
  callbacks on the sockets): the floor of a relay written in Python.

Each takes the gateway's listening socket with pidfd_getfd(2) and
connects leg B to leg A's peer, as the gateway does. ``use(name)`` stops
(SIGSTOP) all but one of the gateway and the two stand-ins, so the one
left running takes every connection from the shared backlog. While a
stand-in serves, the stopped gateway misses the processor's NEW_FLOW and
FLOW_END messages (its socket buffer keeps some; it reads them, for flows
it never saw, when it runs again: a bench lets it settle first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from firewall.lab.wait import wait_for

HERE = Path(__file__).parent
SOURCE = HERE / "floor_relay.c"
PYRELAY = HERE / "floor_pyrelay.py"
NAMES = ("gateway", "python", "compiled")
TCP_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket


def compile_relay(out: Path) -> Path:
    """floor_relay.c built into ``out``: the binary's path."""
    binary = out / "floor_relay"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(SOURCE)], check=True, capture_output=True, text=True)
    return binary


def listening_fd(pid: int) -> int:
    """The descriptor number of process ``pid``'s one IPv4 listening TCP socket."""
    inodes = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == TCP_LISTEN:
            inodes.add(fields[9])
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            found.append(int(fd))
    if len(found) != 1:
        raise RuntimeError(f"process {pid} has {len(found)} IPv4 listening sockets, not one")
    return found[0]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


class StandIns:
    """The compiled and the Python stand-in on gateway ``pid``'s listening socket (module docstring).

    Starts with the gateway serving and both stand-ins stopped; ``close``
    ends the stand-ins and leaves the gateway running."""

    def __init__(self, pid: int, tmp: Path) -> None:
        self.pids = {"gateway": pid}
        self._procs: list[subprocess.Popen[str]] = []
        fd = str(listening_fd(pid))
        enter = ["nsenter", f"--net=/proc/{pid}/ns/net"]  # nsenter execs: the child's pid is the relay's
        try:
            for name, argv in (("compiled", [str(compile_relay(tmp))]), ("python", [sys.executable, str(PYRELAY)])):
                proc = subprocess.Popen([*enter, *argv, str(pid), fd], stdout=subprocess.PIPE, text=True)
                self._procs.append(proc)
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {name} stand-in did not start")
                self.pids[name] = proc.pid
            self.use("gateway")
        except BaseException:
            self.close()
            raise

    def use(self, name: str) -> None:
        """Let only ``name`` (gateway, python or compiled) run: it takes every new connection."""
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a stand-in ({proc.args[-3]}) has ended: {proc.returncode}")
        others = [pid for other, pid in self.pids.items() if other != name]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        os.kill(self.pids[name], signal.SIGCONT)
        wait_for(lambda: all(_stopped(pid) for pid in others), timeout=5, interval=0.01, what="the others to stop")

    def cpu(self, name: str) -> float:
        return cpu_seconds(self.pids[name])

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()
        os.kill(self.pids["gateway"], signal.SIGCONT)
