"""The mediator's warm pool: private connections made ahead of the next public client.

A new public connection costs the mediator a bind, a connect to the private
host and the asyncio plumbing around them, several event-loop trips before
its OPENED can leave (issue 14, latency). So after each OPEN_CONNECT to a
target, the mediator connects up to ``warm_connections`` more sockets to that
same target, from the same local address, and the next OPEN_CONNECT to it
takes one of those and answers at once.

A pre-connected connection must behave exactly as a fresh one would, so the
pool keeps only connections on which nothing has happened:

- **The target speaks first** (a greeting: SMTP, FTP, SSH): the first byte
  that arrives on a waiting connection closes it, and the pool stops
  pre-connecting to that target for the rest of the session. A client then
  gets a fresh connection and the greeting as fresh as ever.
- **The target closes idle connections** (EOF or reset while waiting): the
  connection leaves the pool; it is not replaced until the next
  OPEN_CONNECT, so a target that closes at once costs at most one extra
  connection per client, never a loop of reconnects.
- **Stale**: a connection waits at most ``warm_idle`` seconds, then it is
  closed (below the idle timeouts servers usually give a connection that
  has sent nothing).

What is bounded: at most ``warm_connections`` waiting per target (local
address, host, port), made only after the server asked for that target and
the allow-list let it (the core checked the OPEN_CONNECT), each for at most
``warm_idle`` seconds; all are closed with the session. The pool is I/O, not
protocol: the core sees the same OpenSocket, ``opened``, ConnectSocket,
``connected`` as for a fresh socket, and the server cannot tell.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter, deque

from tunnel.aio import BindError, SourceRoutes, client_socket, connect_socket, stream
from tunnel.frames import IPAddress

Key = tuple[IPAddress, IPAddress, int]  # local address, target address, target port
# A key as numbers, as the pool's dicts hold it: a tuple of ints hashes in C,
# where an address object's hash is Python code (about 20 of them a new
# connection, when the pool's dicts were keyed by ``Key``).
Slot = tuple[int, int, int, int]


def _slot(key: Key) -> Slot:
    local, address, port = key
    return (int(local), int(address), port, address.version)


class _Waiting(asyncio.Protocol):
    """A pre-connected connection in the pool: it reads only to see the target speak or close."""

    def __init__(self, pool: WarmPool, key: Key, slot: Slot) -> None:
        self.pool = pool
        self.local, self.target = key[0], key[1]
        self.slot = slot  # its target's, as the pool's dicts hold it
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: asyncio.Timeout | None = None  # the connect's, while connecting
        self.gone = False  # taken or discarded: the pool has nothing more to do with it
        self.port = 0  # the local port, learned here, off the path of the client it will serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream(transport)
        assert self.transport is not None
        self.port = transport.get_extra_info("sockname")[1]
        self.pool.connected(self)

    def data_received(self, data: bytes) -> None:
        self.pool.spoke(self)

    def eof_received(self) -> bool:
        self.pool.discard(self, "closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self, "closed")


class WarmPool:
    """Pre-connected TCP connections per target, for one session of the mediator."""

    def __init__(
        self, size: int, idle: float, connect_timeout: float, counters: Counter[str], routes: SourceRoutes | None = None,
    ) -> None:
        self.size = size
        self.routes = routes or SourceRoutes()
        self.idle = idle
        self.connect_timeout = connect_timeout
        self.counters = counters
        self.loop = asyncio.get_running_loop()
        self.waiting: dict[Slot, deque[_Waiting]] = {}
        self.connecting: Counter[Slot] = Counter()
        self.speaks_first: set[Slot] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def take(self, key: Key) -> tuple[int, asyncio.Transport] | None:
        """A waiting connection to ``key``'s target, out of the pool (None: connect afresh).

        Returns its local port and its transport, still reading: the
        caller sets its own protocol on it."""
        queue = self.waiting.get(_slot(key))
        while queue:
            entry = queue.popleft()
            transport = entry.transport
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.gone or transport is None or transport.is_closing():
                continue
            entry.gone = True
            self.counters["warm_taken"] += 1
            return entry.port, transport
        return None

    def refill(self, key: Key) -> None:
        """After an OPEN_CONNECT to ``key``: connect in the background up to ``size`` waiting."""
        if self.closed or self.size <= 0:
            return
        slot = _slot(key)
        if slot in self.speaks_first:
            return
        missing = self.size - len(self.waiting.get(slot, ())) - self.connecting[slot]
        if missing > 0:
            # The caller chose the moment (the mediator: once the frames of
            # the connection that took one have left); the connects run from
            # the tasks' first steps, after this callback.
            self.connecting[slot] += missing
            for _ in range(missing):
                task = self.loop.create_task(self._connect(key, slot))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _connect(self, key: Key, slot: Slot) -> None:
        local, address, port = key
        entry = _Waiting(self, key, slot)
        sock: socket.socket | None = None
        try:
            if self.closed:
                return
            # Never the loop's connect from ``local_addr``: that binds with
            # SO_REUSEADDR and takes its port at the bind, which costs
            # milliseconds once thousands of the mediator's ports are in
            # TIME_WAIT. The loop's connect without a bind where the routes
            # give ``local`` anyway, else a socket of ours (``client_socket``).
            if self.routes.must_bind(local, address):
                sock = client_socket(local)
            async with asyncio.timeout(self.connect_timeout) as entry.deadline:
                if sock is None:
                    await self.loop.create_connection(lambda: entry, str(address), port)
                else:
                    await connect_socket(sock, address, port)
                    handed, sock = sock, None  # the transport's from here, closed with it
                    await self.loop.create_connection(lambda: entry, sock=handed)
        except (OSError, TimeoutError, BindError):
            self.counters["warm_failed"] += 1  # the next client connects afresh and reports it
        finally:
            if sock is not None:
                sock.close()
            self.connecting[slot] -= 1

    def connected(self, entry: _Waiting) -> None:
        """A connection is up: it waits from now on, not from its task's next
        step, which comes a loop iteration later: a request that arrives in
        that iteration (a client that reconnects at once: every other
        request of the lab's HTTP client, under strace) would connect afresh."""
        if entry.deadline is not None:
            if entry.deadline.expired():
                entry.gone = True  # timed out in this same iteration: create_connection closes it
                return
            entry.deadline.reschedule(None)  # up: no time-out may close it under a client
        self.counters["warm_connected"] += 1
        if self.closed or entry.slot in self.speaks_first:
            self.discard(entry, "ended")
            return
        assert entry.transport is not None
        if not SourceRoutes.matches(entry.transport, entry.local):
            # Unbound, and the routes now give another source: the pair is
            # asked again at the next refill, which binds if it must.
            self.routes.moved(entry.local, entry.target)
            self.discard(entry, "moved")
            return
        entry.timer = self.loop.call_later(self.idle, self.discard, entry, "stale")
        self.waiting.setdefault(entry.slot, deque()).append(entry)

    def spoke(self, entry: _Waiting) -> None:
        """The target sent bytes to a connection nobody uses yet: it speaks first."""
        self.speaks_first.add(entry.slot)
        self.discard(entry, "speaks_first")
        for other in list(self.waiting.pop(entry.slot, ())):
            self.discard(other, "speaks_first")

    def discard(self, entry: _Waiting, why: str) -> None:
        """Close a waiting connection (once), counted by why: ``speaks_first``,
        ``closed`` (by the target), ``stale``, ``ended`` (the session),
        ``moved`` (not from the local address: the routes changed)."""
        if entry.gone:
            return
        entry.gone = True
        self.counters[f"warm_{why}"] += 1
        queue = self.waiting.get(entry.slot)
        if queue is not None and entry in queue:
            queue.remove(entry)
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.transport is not None and not entry.transport.is_closing():
            entry.transport.close()

    def close(self) -> None:
        """The session ends: nothing of the pool survives it."""
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        for queue in list(self.waiting.values()):
            for entry in list(queue):
                self.discard(entry, "ended")
        self.waiting.clear()

