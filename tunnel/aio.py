"""Small socket and asyncio helpers of the tunnel's I/O layers.

- ``ReadGate``: a transport's reading is paused while *any* reason holds
  (the TLS channel is full, the rate limit is in debt, the peer is slow), and
  resumes only when the last one clears. Without it, one reason's resume
  would undo another's pause and the buffers would grow without bound.
- ``reset``: close a TCP transport with RST (SO_LINGER 0), which is how a
  relayed EVENT_RST is carried out (seed, "Event relay": "destruction
  (message TCP RST) of a TCP connection").
- ``limit_unsent``, ``grow_udp_buffer``, ``grow_tls_read_buffer``: socket
  sizes that keep a busy channel from delaying what is not bulk, and an
  idle one cheap (docs/tunnel-protocol.md section 21).
- ``bind_socket``: the mediator's OpenSocket, with the seed's "desired" and
  "mandatory" port numbers and the errors mapped to protocol codes;
  ``client_socket``, a socket for a connect whose port is any;
  ``connect_socket``, a ConnectSocket on a numeric address.
- ``udp_socket``: a server's UDP socket on one address, IPv6 only on an IPv6
  address, so that ``0.0.0.0`` and ``::`` can both hold one port.
- ``address_pair``: a socket address as an address value and a port.
- ``ChannelWriter``: the frames of one loop iteration as one write on a
  TLS channel, bulk payloads passed on without a copy.
- ``until_signalled`` and ``run_main``: how both roles run in the foreground
  until SIGTERM or SIGINT, with a ``stats`` line on SIGUSR1, on uvloop or
  asyncio's own loop (``stream`` accepts both loops' transports).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import errno
import functools
import ipaddress
import resource
import signal
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firewall.connect import IP_BIND_ADDRESS_NO_PORT, wait_connected
from tunnel.errors import ErrorCode
from tunnel.events import EventLog
from tunnel.frames import Bytes, IPAddress, Proto
from tunnel.wire import endpoint_text
from tunnel.settings import EventLoop

# SO_LINGER on, 0 seconds: close() sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# Unsent bytes the kernel keeps queued on a TCP channel. Without a bound it
# autotunes to megabytes, and a frame that answers a request (OPENED for a
# new UDP flow, an ACK, a WINDOW_UPDATE) waits behind all of them: seconds
# on a busy channel. Beyond this, bytes wait in the transport's own buffer,
# whose high-water mark stops the reading of the relayed sockets.
CHANNEL_UNSENT = 131072
# Receive buffer of every UDP socket of the tunnel (channels, redirected
# ports, the service port, public ports). The kernel's default (208 KiB) is
# about 200 small datagrams: a process busy relaying bulk TCP, or waiting for
# a core on a shared machine, for 0.2 s at 1000 datagrams/s loses some
# (issue 14 D). Memory is used only while datagrams wait.
UDP_BUFFER = 2 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# Socket address texts remembered as address values (``address_pair``): at
# most this many, about 200 bytes each.
ADDRESS_CACHE = 1024
# (local address, target) pairs whose route source is remembered
# (``SourceRoutes``): at most this many a session, about 250 bytes each.
ROUTE_SOURCES_KEPT = 1024


class ReadGate:
    """Pause a transport's reading while any named reason holds."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.BaseTransport | None = None) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def attach(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.reasons:
            self._apply(True)

    def pause(self, reason: str) -> None:
        was_open = not self.reasons
        self.reasons.add(reason)
        if was_open:
            self._apply(True)

    def resume(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons:
            self._apply(False)

    def _apply(self, pause: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            if pause:
                transport.pause_reading()  # type: ignore[attr-defined]
            else:
                transport.resume_reading()  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            pass  # closed meanwhile, or a transport that cannot pause


# A payload at least this long is handed to TLS as it is, in its own TLS
# records (the largest is 16 KiB, RFC 8446 section 5.1); shorter pieces
# (headers, requests, window updates) are joined into one.
OWN_RECORDS = 16384


class ChannelWriter:
    """The frames of one loop iteration as one write on a TLS channel.

    Frames come as pieces (``SendFrame.parts``: a DATA frame's header, then
    its payload as the socket read it). At the end of the iteration the
    short pieces are joined and every long payload follows as it is, all
    in one ``writelines``: TLS encrypts a payload from the read it came in,
    and Python copies none of it (docs/tunnel-protocol.md section 21,
    "Copies")."""

    __slots__ = ("transport", "loop", "hold", "parts", "frames", "_soon", "_timer", "_after")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop, hold: float = 0.0) -> None:
        self.transport = transport
        self.loop = loop
        self.hold = hold  # seconds a held frame may wait for the next write
        self.parts: list[Bytes] = []
        self.frames = 0  # frames in ``parts``
        self._soon = False  # a flush is due at the end of this iteration
        self._timer: asyncio.TimerHandle | None = None  # the held frames' flush
        self._after: list[tuple[Callable[..., object], tuple[Any, ...]]] = []  # ``after``'s, until the flush

    def add(self, parts: tuple[Bytes, ...], hold: bool = False, now: bool = False) -> None:
        """``hold``: the frame may wait up to ``self.hold`` seconds for the
        next frame not held, and leave in its write (one TLS record, one
        wake-up of the peer, instead of two). ``now``: it is written at
        once, with the frames before it (a WINDOW_UPDATE: the loop may be
        in a long run of reads, up to 32 of one socket on uvloop, and the
        peer's sender waits for the credit)."""
        if now:
            self.parts.extend(parts)
            self.frames += 1
            self.flush()
            return
        if hold and self.hold > 0:
            if not self._soon and self._timer is None:
                self._timer = self.loop.call_later(self.hold, self.flush)
        elif not self._soon:
            self._soon = True
            self.loop.call_soon(self.flush)
        self.parts.extend(parts)
        self.frames += 1

    def after(self, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` once the frames added so far have been
        written (soon, if none wait): work that is on no peer's path (the
        warm pool's next connects) does not go before them."""
        if self.parts:
            self._after.append((callback, args))
        else:
            self.loop.call_soon(callback, *args)

    def flush(self) -> None:
        """Write what was added since the last flush, in order."""
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parts, self.parts, self.frames = self.parts, [], 0
        if self._after:
            after, self._after = self._after, []
            for callback, args in after:
                self.loop.call_soon(callback, *args)
        if not parts or self.transport.is_closing():
            return
        if len(parts) == 1:
            self.transport.write(parts[0])
            return
        pieces: list[Bytes] = []
        short: list[Bytes] = []
        for part in parts:
            if len(part) < OWN_RECORDS:
                short.append(part)
                continue
            if short:
                pieces.append(b"".join(short))
                short = []
            pieces.append(part)
        if short:
            pieces.append(b"".join(short))
        if len(pieces) == 1:
            self.transport.write(pieces[0])
        else:
            self.transport.writelines(pieces)


def settle_pause(transport: asyncio.BaseTransport) -> None:
    """Make a pause done in ``connection_made`` stick.

    On Python 3.11 a new socket transport registers its reader *after*
    ``connection_made`` has run, and ``pause_reading`` there only sets a
    flag: reading goes on. On the next loop iteration the reader exists, so
    un-pausing and pausing again removes it for real. One read may still
    land in ``data_received`` before that: callers keep it until they are
    ready for it.
    """

    def settle() -> None:
        if transport.is_closing() or transport.is_reading():  # type: ignore[attr-defined]
            return  # closed, or already resumed on purpose
        transport.resume_reading()  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]

    asyncio.get_running_loop().call_soon(settle)


def stream(transport: asyncio.BaseTransport | None) -> asyncio.Transport | None:
    """``transport`` as a stream transport, or None (no transport, or a datagram one).

    By what it can do, not by class: uvloop's transports (``run_main``) are
    not subclasses of asyncio's."""
    if transport is None or not hasattr(transport, "write_eof"):
        return None
    return transport  # type: ignore[return-value]


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Abort a TCP transport with RST instead of FIN."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already closed: abort() below is all that is left
    transport.abort()  # type: ignore[attr-defined]


def limit_unsent(transport: asyncio.BaseTransport, unsent: int = CHANNEL_UNSENT) -> None:
    """Bound the kernel's unsent queue of a TCP channel (``CHANNEL_UNSENT``)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, unsent)
    except OSError:
        pass  # a kernel without it: the unbounded queue, as before


def grow_udp_buffer(transport: asyncio.BaseTransport, size: int = UDP_BUFFER) -> None:
    """Give a UDP socket a receive buffer of ``size`` (``UDP_BUFFER``): root may
    pass net.core.rmem_max, anyone else gets at most that."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def grow_tls_read_buffer(transport: asyncio.BaseTransport, size: int) -> bool:
    """Let one TLS connection read ``size`` bytes at a time from now on
    (asyncio's SSL protocol grows its buffer at the next read when its
    ``max_size`` is above it). False if ``transport`` is not asyncio's TLS."""
    protocol = getattr(transport, "_ssl_protocol", None)
    if not isinstance(protocol, asyncio.sslproto.SSLProtocol):
        return False
    protocol.max_size = size
    return True


def peer_of(transport: asyncio.BaseTransport) -> tuple[IPAddress, int] | None:
    """The transport's peer as an address value and a port."""
    return address_pair(transport.get_extra_info("peername"))


def address_pair(sockaddr: Any) -> tuple[IPAddress, int] | None:
    """``("10.0.0.1", 80)`` (or a 4-tuple for IPv6) as (address, port)."""
    if not sockaddr or not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    address = _address(sockaddr[0])
    return None if address is None else (address, int(sockaddr[1]))


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _address(text: str) -> IPAddress | None:
    """A socket's address text as a value (``::ffff:a.b.c.d`` is a.b.c.d).
    Remembered: parsing costs a few thousand instructions, and the same
    addresses come back at every connection (the clients, the targets)."""
    try:
        address: IPAddress = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def udp_socket(address: IPAddress, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to address:port (OSError as it comes).

    An IPv6 socket is IPv6 only (``IPV6_V6ONLY``), as asyncio makes its TCP
    listeners: a server that listens on ``0.0.0.0`` and ``::`` has two
    sockets on one port, and neither takes the other's family."""
    sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
    try:
        if address.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((str(address), port))
    except OSError:
        sock.close()
        raise
    return sock


def cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    for task in list(tasks):
        task.cancel()
    tasks.clear()


def bind_socket(proto: Proto, address: IPAddress, port: int, mandatory: bool, probes: int) -> socket.socket:
    """A non-blocking socket bound as OpenSocket asks (seed, "Open port").

    A *desired* port takes "the first free port starting from the number
    requested", trying at most ``probes`` numbers; a *mandatory* one is that
    port or nothing. Raises ``BindError`` with the protocol's code.
    """
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    if mandatory or port == 0:
        candidates: range | list[int] = [port]
    else:
        candidates = range(port, min(65536, port + probes))
    for number in candidates:
        sock = socket.socket(family_of(address), kind)
        try:
            sock.setblocking(False)
            if proto is Proto.TCP:
                # Relayed bytes leave at once, as on every other socket of the
                # tunnel: asyncio sets TCP_NODELAY only on sockets it creates
                # with proto IPPROTO_TCP, not on this one (proto 0).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((str(address), number))
            return sock
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE and not mandatory:
                continue
            raise BindError.of(err, address, number, mandatory) from None
    raise BindError(ErrorCode.NO_FREE_PORT, f"no free {proto.name} port on {address} from {port} ({probes} tried)")


class SourceRoutes:
    """Whether a connect from a named local address to a target must bind
    that address, or may leave the source to the kernel's routes (which
    give that very address): asked once per pair, with a UDP socket's
    connect, which sends nothing.

    A connect without a bind is the cheapest (the loop's own connect) and
    takes its port for its 4-tuple. A bound one (``client_socket``) needs
    a socket of ours handed to the loop: about 35 us more of Python a
    connect. The answer may go stale if the routes change: a connection
    whose source is not the named address is then not used
    (``matches``), and the pair is asked again (``moved``).
    """

    def __init__(self) -> None:
        self._bind: dict[tuple[int, int, int], bool] = {}

    def must_bind(self, local: IPAddress, target: IPAddress) -> bool:
        key = (int(local), int(target), local.version)
        bind = self._bind.get(key)
        if bind is None:
            if len(self._bind) >= ROUTE_SOURCES_KEPT:
                self._bind.clear()
            bind = self._bind[key] = route_source(target) != local
        return bind

    def moved(self, local: IPAddress, target: IPAddress) -> None:
        self._bind.pop((int(local), int(target), local.version), None)

    @staticmethod
    def matches(transport: asyncio.BaseTransport, local: IPAddress) -> bool:
        """Whether a connected transport's source is ``local``."""
        sockname = transport.get_extra_info("sockname")
        if not sockname:
            return False
        text = sockname[0]
        return text == local.compressed or _address(text) == local


def route_source(target: IPAddress) -> IPAddress | None:
    """The source address the routes give a connection to ``target`` (None: no route)."""
    try:
        with socket.socket(family_of(target), socket.SOCK_DGRAM) as probe:
            probe.connect((str(target), 9))
            return _address(probe.getsockname()[0])
    except OSError:
        return None


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int] | None:
    """The ports the kernel gives a connect (this network namespace's
    ``ip_local_port_range``; IPv6 uses the same); None if it cannot be read."""
    try:
        first, last = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return None
    return first, last


def client_socket(address: IPAddress) -> socket.socket:
    """A non-blocking TCP socket bound to ``address``, its port left to the
    connect (``IP_BIND_ADDRESS_NO_PORT``, Linux 4.2): an OPEN_CONNECT's or
    a warm connection's, whose port is any.

    A bind to port 0 alone takes a port for every destination at once, from
    the ports no socket holds, those in TIME_WAIT included. Once a few
    thousand are in TIME_WAIT (a mediator whose clients close first), each
    such bind searches the range for milliseconds of system time: 1-6 ms a
    connect from about 8,000 TIME_WAIT sockets with SO_REUSEADDR, from
    about 14,000 without, against 50-80 us for this one
    (docs/benchmarks.md, issue 14, ninth pass). The connect chooses a port
    for its own 4-tuple, as a connect without a bind does.
    Raises ``BindError`` with the protocol's code.
    """
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((str(address), 0))
    except OSError as err:
        sock.close()
        raise BindError.of(err, address, 0, False) from None
    return sock


async def connect_socket(sock: socket.socket, address: IPAddress, port: int) -> None:
    """``loop.sock_connect`` for a non-blocking socket and an address that is
    already a number: connect, and wait until the socket is writable.

    uvloop's ``sock_connect`` (0.23) resolves every address in its resolver's
    thread pool, a numeric one too (its fast path needs the socket type,
    which it does not pass): a thread's round trip, 1-2 ms, on each fresh
    connect to a target. Raises ``OSError`` as ``sock_connect`` does.
    """
    try:
        sock.connect((str(address), port))
        return
    except (BlockingIOError, InterruptedError):
        pass
    await wait_connected(sock)


@dataclass
class BindError(Exception):
    code: ErrorCode
    message: str

    @classmethod
    def of(cls, err: OSError, address: IPAddress, port: int, mandatory: bool) -> BindError:
        if err.errno == errno.EADDRINUSE:
            return cls(ErrorCode.PORT_IN_USE if mandatory else ErrorCode.NO_FREE_PORT, f"{endpoint_text(address, port)} is in use")
        if err.errno == errno.EADDRNOTAVAIL:
            return cls(ErrorCode.NO_SUCH_ADDRESS, f"{address} is not an address of the mediator")
        return cls(ErrorCode.INTERNAL, f"bind {endpoint_text(address, port)}: {err.strerror or err}")


async def until_signalled(log: EventLog, stats: Callable[[], dict[str, Any]]) -> None:
    """Wait for SIGTERM or SIGINT; on SIGUSR1 log ``stats()`` as a ``stats`` line."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.emit("stats", **stats()))
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard one; returns it.

    Every relayed connection is a socket on each end, and a systemd unit
    without ``LimitNOFILE`` starts with a soft limit of 1024: the defaults'
    ``max_ports`` (settings.py) would meet EMFILE first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft
    return hard


def run_main(coro: Coroutine[Any, Any, None], event_loop: EventLoop = "uvloop") -> None:
    """Run ``coro`` on ``event_loop``, quiet about a second Ctrl-C while
    stopping, with the soft limit on open files raised first (``raise_nofile``).

    uvloop by default: a relayed connection crosses the server's and the
    mediator's loops several times, and libuv's loop and TLS take about a
    third less time per crossing than asyncio's (docs/benchmarks.md, issue
    14). The layers above use only what both loops' transports offer
    (``stream``; ``grow_tls_read_buffer`` is asyncio's alone, uvloop sizes
    its TLS reads itself)."""
    raise_nofile()
    try:
        if event_loop == "uvloop":
            import uvloop  # only when chosen: event_loop = "asyncio" runs without it

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        pass
