"""What every TCP gateway shares: listening on G:g, one task per connection,
a bug in one connection never taking the gateway down, a bounded close, and
surviving the end of the file descriptors.

A subclass implements ``_serve(sock)`` for one accepted connection (leg A
from the firewall-side endpoint F:f, a non-blocking socket it owns) and
relays it (``gateways.relay``) or wraps it in streams.

Descriptors: a spliced relay holds up to six (two sockets, and a pipe for
each direction that carried bulk: gateways/relay/driver.py), so a
gateway raises its soft ``RLIMIT_NOFILE`` to the hard limit when it starts
(``raise_file_limit``; ``LimitNOFILE=`` in scripts/nfgate.service sets the
hard one). When accept fails for want of descriptors or memory anyway, the
``Acceptor`` stops accepting for ``ACCEPT_PAUSE`` seconds, counts it, and
says so in one log line (at most one per ``ACCEPT_LOG_INTERVAL``), where
asyncio's own server would log a traceback per attempt; the connections
wait in the listen backlog meanwhile.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import resource
import socket
from collections import Counter
from collections.abc import Callable

from firewall.eventlog import EventLog as AnyEventLog
from firewall.signalling import Endpoint, Proto
from gateways.layer import EventLog, FlowUnknown, GatewayLayer, Hold
from gateways.layer.endpoint import endpoint_of
from gateways.relay import Done, Relay, RelayCore, reset_socket
from gateways.relay.driver import arm_reset

# How long a closing leg may take to flush what is buffered for it before it
# is dropped; a peer that stopped reading must not keep a slot forever.
CLOSE_FLUSH_TIMEOUT = 5.0

# Out of descriptors (or kernel memory), accepting again at once fails again:
# wait this long, so that live connections can end and free some.
ACCEPT_PAUSE = 0.1
# At most one accept_paused line this often, however long the shortage lasts.
ACCEPT_LOG_INTERVAL = 60.0
# Connections accepted per wake-up, so that a burst does not starve the rest.
ACCEPT_BATCH = 64

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a stream with RST: what a TCP peer sees when a connection is refused or aborted."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        arm_reset(sock)
    writer.transport.abort()


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the soft limit now in force.

    systemd's default soft limit, 1024, would cap a relay at about 170
    spliced connections (six descriptors each), and a tunnel server at about
    a thousand mediators (a socket or two each), however much memory there is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have: the Acceptor copes with running out
    return soft


class Acceptor:
    """Accepts connections on a listening socket and hands each on, pausing when out of descriptors."""

    def __init__(
        self,
        listener: socket.socket,
        on_socket: Callable[[socket.socket], None],
        log: AnyEventLog,
        counters: Counter[str],
    ) -> None:
        self.listener = listener
        self.on_socket = on_socket
        self.log = log
        self.counters = counters
        self._loop = asyncio.get_running_loop()
        self._fd = listener.fileno()
        self._timer: asyncio.TimerHandle | None = None
        self._logged_at: float | None = None
        self._since_logged = 0  # pauses not yet said in a line
        listener.setblocking(False)
        self._loop.add_reader(self._fd, self._ready)

    def close(self) -> None:
        """Stop accepting and close the listener; what waits in its backlog is reset by the kernel."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        else:
            self._loop.remove_reader(self._fd)
        self.listener.close()

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                # ECONNABORTED and the like: that one client gave up in the backlog.
                self.counters["accept.failed"] += 1
                continue
            sock.setblocking(False)
            self.on_socket(sock)

    def _pause(self, exc: OSError) -> None:
        self._loop.remove_reader(self._fd)
        self._timer = self._loop.call_later(ACCEPT_PAUSE, self._resume)
        self.counters["accept.paused"] += 1
        self._since_logged += 1
        now = self._loop.time()
        if self._logged_at is None or now - self._logged_at >= ACCEPT_LOG_INTERVAL:
            self._logged_at = now
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            self.log.emit(
                "accept_paused", logging.WARNING, error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                pause=ACCEPT_PAUSE, pauses=self._since_logged, open_files_limit=soft,
            )
            self._since_logged = 0

    def _resume(self) -> None:
        self._timer = None
        self._loop.add_reader(self._fd, self._ready)


def listen_socket(listen: Endpoint, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A non-blocking TCP listener on ``listen``. OSError if the address is not here."""
    sock = socket.socket(socket.AF_INET6 if listen.address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(listen.address), listen.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class TcpGateway(abc.ABC):
    """A listener on G:g in front of a ``GatewayLayer``."""

    _loop: asyncio.AbstractEventLoop  # the one start() ran on

    def __init__(self, layer: GatewayLayer, *, listen: Endpoint, log: EventLog, listen6: Endpoint | None = None) -> None:
        self.layer = layer
        self.listen = listen
        self.listen6 = listen6  # a kind that takes IPv6: G6 on the same port (issue 17)
        self.log = log
        self.counters: Counter[str] = Counter()
        self._acceptor: Acceptor | None = None
        self._acceptor6: Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._relays: set[RelayCore] = set()

    @property
    def buffered(self) -> int:
        """Bytes the live relays hold (read, not yet sent), for the stats line."""
        return sum(core.buffered for core in self._relays)

    async def start(self) -> None:
        """Listen on G:g. OSError if the address is not here."""
        self._loop = asyncio.get_running_loop()  # each accepted socket's task, without a look-up (a getpid) each
        listener = listen_socket(self.listen)
        self._acceptor = Acceptor(listener, self._on_socket, self.log, self.counters)
        self.listen = Endpoint(self.listen.address, listener.getsockname()[1])
        if self.listen6 is not None:
            try:
                listener6 = listen_socket(Endpoint(self.listen6.address, self.listen.port))
            except OSError:
                self._acceptor.close()
                self._acceptor = None
                raise
            self._acceptor6 = Acceptor(listener6, self._on_socket, self.log, self.counters)

    async def close(self, grace: float) -> None:
        """Stop accepting; let live connections finish for up to ``grace`` seconds, then reset them."""
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        if self._acceptor6 is not None:
            self._acceptor6.close()
            self._acceptor6 = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_FLUSH_TIMEOUT)

    def _on_socket(self, sock: socket.socket) -> None:
        task = self._loop.create_task(self._contain(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _contain(self, sock: socket.socket) -> None:
        try:
            await self._serve(sock)
        except Exception as exc:  # a bug in one connection must not take the gateway down
            self.counters["errors.internal"] += 1
            self.log.emit("error", logging.ERROR, error=repr(exc))
            reset_socket(sock)

    async def _attach(self, sock: socket.socket) -> Hold | None:
        """The flow of an accepted connection (``GatewayLayer.attach``), or None when
        there is none to serve: the peer is gone (closed) or the flow unknown (reset);
        both counted, the second logged."""
        try:
            fw, ag = endpoint_of(sock.getpeername()), endpoint_of(sock.getsockname())
        except OSError:
            fw = ag = None
        if fw is None or ag is None:
            self.counters["closed.gone"] += 1
            sock.close()
            return None
        try:
            return await self.layer.attach(Proto.TCP, fw, ag)
        except FlowUnknown as exc:
            self.counters["closed.unknown_flow"] += 1
            self.log.emit("unknown_flow", via=fw, to=ag, why=exc.why)
            reset_socket(sock)
            return None
        except asyncio.CancelledError:
            reset_socket(sock)  # stopping before the flow was known
            raise

    async def _relay_legs(self, core: RelayCore, a: socket.socket, b: socket.socket, hold: Hold) -> Done:
        """Relay leg A and leg B as ``core`` decides (``gateways.relay``); both are closed after."""
        self._relays.add(core)
        try:
            return await Relay(core, a, b).run(hold)
        finally:
            self._relays.discard(core)

    @abc.abstractmethod
    async def _serve(self, sock: socket.socket) -> None:
        """Serve one accepted connection: each gateway kind its own protocol."""
