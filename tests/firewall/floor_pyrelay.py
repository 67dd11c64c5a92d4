"""The floor of a Python relay on nfgate's datapath: a minimal relay on uvloop in a gateway's place,
for the benches only (tests/firewall/floor.py).

    python floor_pyrelay.py PID FD

Like floor_relay.c: takes the gateway's listening socket (fd FD of process
PID, by pidfd_getfd(2)), connects each leg B from the listening address to
leg A's peer and relays bytes both ways. Nothing else: no signalling, no
log, no limit, no timer, no task; readiness callbacks on the sockets
(``add_reader``/``add_writer``), as the gateways' relay driver uses them
(gateways/relay/driver.py), and one ``recv`` and ``send`` per chunk. What a
relay written in Python costs per connection at the least, against the
gateway that also does the seed's work (tcp-relay). (A version on uvloop's
transports, ``sock_connect`` and ``create_connection(sock=)``, died now and
then with "double free or corruption" inside uvloop 0.23.)
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys

import uvloop

SYS_PIDFD_GETFD = 438
IP_BIND_ADDRESS_NO_PORT = 24
CHUNK = 1 << 16


class Pair:
    """Leg A and leg B of one connection."""

    __slots__ = ("loop", "a", "b", "ended", "open")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket) -> None:
        self.loop, self.a, self.b = loop, a, b
        self.ended: set[socket.socket] = set()  # legs whose peer has sent its FIN
        self.open = True
        loop.add_writer(b.fileno(), self.connected)

    def connected(self) -> None:
        self.loop.remove_writer(self.b.fileno())
        if self.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.close()
            return
        self.loop.add_reader(self.a.fileno(), self.readable, self.a, self.b)
        self.loop.add_reader(self.b.fileno(), self.readable, self.b, self.a)

    def readable(self, src: socket.socket, dst: socket.socket) -> None:
        while self.open:
            try:
                data = src.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data:
                self.loop.remove_reader(src.fileno())
                self.ended.add(src)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if len(self.ended) == 2:
                    self.close()
                return
            try:
                try:
                    sent = dst.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent < len(data):
                    # Small messages in the benches: a full buffer waits here, blocking.
                    dst.setblocking(True)
                    dst.sendall(data[sent:])
                    dst.setblocking(False)
            except OSError:
                self.close()
                return

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        for sock in (self.a, self.b):
            if sock not in self.ended:
                self.loop.remove_reader(sock.fileno())
            sock.close()


def main() -> None:
    pid, fd = int(sys.argv[1]), int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    got = libc.syscall(SYS_PIDFD_GETFD, os.pidfd_open(pid), fd, 0)
    if got < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    listener = socket.socket(fileno=got)
    listener.setblocking(False)
    local = listener.getsockname()[0]
    loop = uvloop.new_event_loop()

    def accept() -> None:
        for _ in range(64):
            try:
                a, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            a.setblocking(False)
            b = socket.socket()
            try:
                b.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                b.bind((local, 0))
                b.setblocking(False)
                b.connect_ex(peer)
            except OSError:
                a.close()
                b.close()
                continue
            Pair(loop, a, b)

    loop.add_reader(listener.fileno(), accept)
    print("ready", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
