"""What a bind before a connect costs as TIME_WAIT sockets pile up: the mediator's case.

    .venv/bin/python -m tests.tunnel.bind_bench [--connects 34000] [--ways connect,bind,reuse,noport]

Not a test (nothing is asserted): a figure for docs/benchmarks.md; root,
for the network namespace it makes and removes. In that namespace, a
client connects to a server on 127.0.0.1 and closes first, so each
connection leaves a socket in TIME_WAIT on the client's side, as a mediator
whose public clients close first does. The ways to connect:

- ``connect``: no bind (the kernel picks address and port for the 4-tuple);
- ``bind``: bind(127.0.0.1, 0), then connect;
- ``reuse``: the same with SO_REUSEADDR, as a loop's
  ``create_connection(local_addr=...)`` binds;
- ``noport``: ``IP_BIND_ADDRESS_NO_PORT``, then the bind and the connect
  (``tunnel.aio.client_socket``).

Each prints, every 2000 connects, the TIME_WAIT sockets and the client
thread's system and user time per connect. On loopback the kernel reuses a
TIME_WAIT port for a new connect (``tcp_tw_reuse`` 2), so the count levels
off; a bind does not get that reuse.
"""

from __future__ import annotations

import argparse
import resource
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from firewall.connect import IP_BIND_ADDRESS_NO_PORT

TOP = Path(__file__).resolve().parents[2]
WAYS = ("connect", "bind", "reuse", "noport")
BATCH = 2000
ADDRESS = "127.0.0.1"


def _serve(listener: socket.socket) -> None:
    """Accept, and close each connection once its client's FIN has come."""
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    while True:
        for fd, _ in poll.poll(1.0):
            if fd == listener.fileno():
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conns[conn.fileno()] = conn
                    poll.register(conn.fileno(), select.EPOLLIN)
            else:
                poll.unregister(fd)
                conns.pop(fd).close()


def _time_wait() -> int:
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[3] == "06")


def _usage() -> tuple[float, float]:
    use = resource.getrusage(resource.RUSAGE_THREAD)
    return use.ru_stime, use.ru_utime


def inside(way: str, connects: int) -> None:
    listener = socket.create_server((ADDRESS, 0), backlog=4096)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    failures = 0
    (sys0, user0), start = _usage(), time.monotonic()
    for n in range(1, connects + 1):
        sock = socket.socket()
        try:
            if way == "noport":
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if way == "reuse":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if way != "connect":
                sock.bind((ADDRESS, 0))
            sock.connect((ADDRESS, port))
        except OSError:
            failures += 1
        sock.close()
        if n % BATCH == 0:
            (sys1, user1), wall = _usage(), time.monotonic() - start
            print(f"{way:8} {n:6d} connects  time_wait {_time_wait():6d}  system {1e6 * (sys1 - sys0) / BATCH:7.1f} us"
                  f"  user {1e6 * (user1 - user0) / BATCH:5.1f} us  wall {1e6 * wall / BATCH:7.1f} us  failed {failures}",
                  flush=True)
            (sys0, user0), start = _usage(), time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=34000)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.inside, args.connects)
        return 0
    for way in args.ways.split(","):
        if way not in WAYS:
            parser.error(f"unknown way {way!r}: {', '.join(WAYS)}")
        name = f"nfgbind{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.tunnel.bind_bench",
                            "--inside", way, "--connects", str(args.connects)], check=True, cwd=TOP, timeout=600)
        finally:
            subprocess.run(["ip", "netns", "del", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
