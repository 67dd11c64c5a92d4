"""systemd's notify protocol (sd_notify(3)), both ends, in the standard library.

The sender: a process started with ``NOTIFY_SOCKET`` in its environment sends
``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` or ``STOPPING=1`` as one datagram
to that unix socket (a leading ``@`` names the abstract namespace). Without
the variable, ``notify`` does nothing: the same code runs under systemd, by
hand and in tests.

The receiver: ``nfgate run`` is systemd's ``Type=notify`` main process, and it
says READY only once every child serves. Each child learns it the same way:
the supervisor binds a socket of its own (``Listener``, a path in its state
directory, since the gateways run in another network namespace and abstract
sockets are per namespace) and gives that path to its children as their
``NOTIFY_SOCKET``. The kernel stamps each datagram with the sender's pid
(SO_PASSCRED), so a child cannot speak for another. ``ip netns exec`` execs
its command in place, so a gateway's pid is the one the supervisor started.

The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the
unit has ``WatchdogSec=``; ``watchdog_interval`` gives half of it, the pace
of the pings.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

MAX_MESSAGE = 4096  # bytes of one notification; ours are a few dozen
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _address(env: str) -> str:
    return "\0" + env[1:] if env.startswith("@") else env


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` ("READY=1", ...) to ``NOTIFY_SOCKET``; False when there is none or it is gone."""
    target = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not target:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(target))
    except OSError:
        return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None without a watchdog
    or when it is meant for another process (``WATCHDOG_PID``)."""
    env = env if env is not None else os.environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Listener:
    """The supervisor's notify socket: ``receive`` gives (pid, {key: value}) per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)  # mode 0600 from the first instant, as every socket of nfgate's
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every datagram waiting now; a datagram without credentials is dropped."""
        out = []
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(_CREDS.size))
            except BlockingIOError:
                return out
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                    pid = _CREDS.unpack_from(payload)[0]
            if pid is None:
                continue
            fields = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    fields[key] = value
            out.append((pid, fields))

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
