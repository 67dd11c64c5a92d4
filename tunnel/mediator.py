"""The mediation system: asyncio around ``MediatorCore``, with reconnects.

"To be initialized, the mediation system 2 connects to a fixed port of the
control server 4 via a TCP channel" (seed, Figure 2 description), and from
then on makes "its TCP/UDP/IP interface available" to the server. This
module is the I/O half of that: it makes no protocol decision (DESIGN.md
invariant 9), and the shared ``CoreDriver`` (firewall/drive.py) carries the
core's outputs out and keeps its timer. ``Mediator.run`` keeps one channel up
at a time:

1. TCP to the server's service port, TLS, then the **pin check** -- before
   anything is sent, so a server that is not the pinned one never sees the
   token (tunnel/tls.py).
2. ``channel_up``; then every core output is carried out in order:
   ``OpenSocket`` binds (and, for a redirect, opens the UDP channel socket
   "connected" to the service port), ``ConnectSocket`` connects,
   ``ListenSocket`` accepts, and so on. Results go back to the core.
3. On loss (EOF, reset, BYE, dead server) every socket of the session is
   closed, and the next attempt comes after a bounded exponential backoff
   with jitter (tunnel/pacing.py). The server re-issues what it publishes.

Flow control (docs/tunnel-protocol.md section 21): when the channel's send
buffer is full, reading stops on every private connection. In version 3
each connection has its own window: the core says when to stop and start
reading one private socket (``PauseReading``, ``ResumeReading``), and this
layer tells it how many written bytes have left each socket's buffer
(``consumed``), so a slow private host holds up its own connection only.
In versions 1 and 2 a slow private host stops the reading of the channel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from firewall.drive import CoreDriver
from tunnel import tls
from tunnel.aio import (
    BindError, ChannelWriter, ReadGate, SourceRoutes, address_pair, bind_socket, cancel_all, client_socket, connect_socket,
    ephemeral_ports, family_of, grow_udp_buffer, limit_unsent, reset, run_main, settle_pause, stream, until_signalled,
)
from tunnel.commands import (
    AbortSocket, ChannelClosed, CloseChannel, CloseSocket, ConnectSocket, ListenSocket,
    KeepaliveLearned, OpenSocket, PauseReading, Ready, Refused, RelayFailed, ResumeReading, SendChannel,
    SendFrame, SendProbe, SendTo, ShutdownSocket, UdpChannelDead, WriteStream,
)
from tunnel.config import MediatorConfig
from tunnel.errors import ErrorCode
from tunnel.events import EventLog
from tunnel.frames import IPAddress, IPInterface, Proto
from tunnel.mediator_core import MediatorCore, MediatorIdentity
from tunnel.pacing import Backoff
from tunnel.policy import AllowList, Op, Rule
from tunnel.wire import endpoint_text
from tunnel.warm import WarmPool

LISTEN_BACKLOG = 128  # what a small private service needs; the kernel caps it at somaxconn


class ChannelFailure(Exception):
    """One attempt to bring the channel up failed (logged, then retried)."""


@dataclass(slots=True)
class _PortIO:
    """The sockets behind one port id."""

    port_id: int
    proto: Proto
    address: IPAddress
    port: int = 0
    sock: socket.socket | None = None  # bound, not yet connected or listening
    transport: asyncio.BaseTransport | None = None
    server: asyncio.AbstractServer | None = None
    channel: asyncio.DatagramTransport | None = None  # a redirect's UDP channel
    gate: ReadGate = field(default_factory=ReadGate)
    task: asyncio.Task[None] | None = None
    warm: asyncio.Transport | None = None  # connected before its ConnectSocket (warm pool, _open_connected), until that takes it
    open_connect: bool = False  # born of OPEN_CONNECT: its target gets warm connections
    written: int = 0  # bytes written to the private host (version 3's credit)
    reported: int = 0  # of those, reported to the core as gone from the buffer


class Mediator:
    """Keeps the tunnel to the control server up, and serves it."""

    def __init__(self, config: MediatorConfig, log: EventLog | None = None) -> None:
        self.config = config
        self.log = log or EventLog("mediator")
        self.backoff = Backoff(config.reconnect)
        self.counters: Counter[str] = Counter()
        self.session: _Session | None = None
        self.session_id: int | None = None
        self.learned: KeepaliveLearned | None = None  # the last keepalive discovery's result

    def stats(self) -> dict[str, Any]:
        dropped = self.session.core.dropped if self.session is not None else Counter()
        return {
            "session": self.session_id,
            "counters": dict(sorted(self.counters.items())),
            "dropped": {r.value: n for r, n in dropped.items()},
            # Version 5: windows grown towards the private hosts, and the budget they hold now.
            "windows": {
                "grown": self.session.core.windows_grown if self.session is not None else 0,
                "grown_bytes": self.session.core.grown_bytes() if self.session is not None else 0,
                "budget": self.config.protocol.stream_window_budget,
            },
            "keepalive": {
                "tcp": self.config.protocol.keepalive_interval,
                "udp_channels": self.session.core.channel_interval if self.session is not None else None,
                "learned": self.learned is not None,
            },
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, and reconnect until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            ready = False
            try:
                ready = await self._serve_once(stop)
            except ChannelFailure as err:
                self.counters["attempts_failed"] += 1
                self.log.warn("channel_failed", server=self.config.server, reason=str(err))
            except Exception as err:  # noqa: BLE001 - a bug must not end the tunnel for good
                self.counters["internal_errors"] += 1
                self.log.emit("internal_error", logging.ERROR, error=repr(err))
            if stop.is_set():
                break
            if ready:
                self.backoff.succeeded(loop.time() - started)
            delay = self.backoff.next_delay()
            self.log.emit("reconnect", delay=delay, failures=self.backoff.failures)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    async def _serve_once(self, stop: asyncio.Event) -> bool:
        """One channel, from connect to loss; True if it reached READY."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        context = tls.client_context(cfg.client_cert, cfg.client_key)
        self.counters["attempts"] += 1
        protocol = _ChannelProtocol()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: protocol, cfg.server, cfg.service_port, ssl=context,
                    ssl_handshake_timeout=cfg.channel_timeout,
                ),
                cfg.channel_timeout,
            )
        except (OSError, TimeoutError) as err:
            raise ChannelFailure(f"connect {server_text(cfg)}: {err}") from None
        try:
            tls.check_server_pin(transport.get_extra_info("ssl_object"), cfg.pin)
        except tls.PinMismatch as err:
            transport.abort()
            self.counters["pin_mismatch"] += 1
            raise ChannelFailure(str(err)) from None
        limit_unsent(transport, cfg.channel_unsent)
        local = address_pair(transport.get_extra_info("sockname"))
        remote = address_pair(transport.get_extra_info("peername"))
        assert local is not None and remote is not None
        # pyroute2's netlink must not run on this thread's event loop.
        interfaces = cfg.interfaces or (await loop.run_in_executor(None, _interface_of, local[0]),)
        session = _Session(self, transport, remote[0], interfaces)
        self.session = session
        session.start()  # HELLO first: the core takes no bytes before channel_up
        protocol.attach(session)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {session.done, stopping}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not session.done.done():
                session.driver.run(session.core.close(ErrorCode.NORMAL, "mediator stopping"))
                try:
                    await asyncio.wait_for(asyncio.shield(session.done), cfg.channel_timeout)
                except TimeoutError:
                    transport.abort()
        finally:
            stopping.cancel()
            session.shutdown()
        return session.ready


def server_text(cfg: MediatorConfig) -> str:
    """The server's name or address and service port (an IPv6 address in brackets)."""
    host = f"[{cfg.server}]" if ":" in cfg.server else cfg.server
    return f"{host}:{cfg.service_port}"


def _interface_of(address: IPAddress) -> IPInterface:
    """The address the channel leaves from, with its prefix from the kernel."""
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr(family=family_of(address)):
                if msg.get_attr("IFA_ADDRESS") == str(address) or msg.get_attr("IFA_LOCAL") == str(address):
                    return ipaddress.ip_interface(f"{address}/{msg['prefixlen']}")
    except Exception:  # noqa: BLE001 - netlink is a nicety here; the host route is always right
        pass
    return ipaddress.ip_interface(f"{address}/{address.max_prefixlen}")


class _ChannelProtocol(asyncio.BufferedProtocol):
    """The TLS channel's byte stream, handed to the session once it exists.

    Buffered, as the server's (``tunnel.server.ChannelProtocol``): TLS
    decrypts straight into the core's frame decoder. Before the session
    exists, what comes is kept and fed to it when it does."""

    def __init__(self) -> None:
        self.session: _Session | None = None
        self._early: list[bytes] = []
        self._scratch: bytearray | None = None
        self._lost: str | None = None

    def attach(self, session: _Session) -> None:
        self.session = session
        for data in self._early:
            session.on_data(data)
        self._early.clear()
        if self._lost is not None:
            session.on_lost(self._lost)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.session is None:
            self._scratch = bytearray(max(1, min(sizehint, 65536)))
            return memoryview(self._scratch)
        return self.session.read_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.session is None:
            assert self._scratch is not None
            self._early.append(bytes(self._scratch[:nbytes]))
            self._scratch = None
        else:
            self.session.on_buffer(nbytes)

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            self._early.append(data)
        else:
            self.session.on_data(data)

    def eof_received(self) -> bool:
        self._report("server closed the channel")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._report(f"channel lost: {exc}" if exc else "channel closed")

    def _report(self, why: str) -> None:
        if self.session is None:
            self._lost = self._lost or why
        else:
            self.session.on_lost(why)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.channel_full(True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.channel_full(False)


class _Session:
    """One channel's core and sockets; discarded when the channel ends."""

    def __init__(
        self, mediator: Mediator, transport: asyncio.Transport, server: IPAddress, interfaces: tuple[IPInterface, ...]
    ) -> None:
        cfg = mediator.config
        self.mediator = mediator
        self.log = mediator.log
        self.counters = mediator.counters
        self.transport = transport
        self.server = server
        self.loop = asyncio.get_running_loop()
        rules = list(cfg.allow)
        if cfg.client_ports is not None:
            # Binding a client port reaches nobody; what it then connects to
            # or sends to is checked by the owner's own rules.
            rules += [
                Rule(
                    ipaddress.ip_network(i.ip), cfg.client_ports.first, cfg.client_ports.last,
                    ops=frozenset({Op.OPEN, Op.REDIRECT}),
                )
                for i in interfaces
            ]
        identity = MediatorIdentity(cfg.identity, cfg.token, cfg.service, interfaces)
        self.allow = AllowList(rules)
        self.core = MediatorCore(identity, cfg.protocol, self.allow)
        # Per local address: may any port the kernel gives a connect be opened there?
        self._any_client_port: dict[IPAddress, bool] = {}
        self._kernel_ports = ephemeral_ports()
        self.ports: dict[int, _PortIO] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.ready = False
        self.channel_gate = ReadGate(transport)
        self._channel_full = False
        # Frames to write at the end of this loop iteration (a stream's OPENED: with the next ones).
        self.writer = ChannelWriter(transport, self.loop, cfg.opened_hold)
        self.probe: asyncio.DatagramTransport | None = None  # keepalive discovery's spare socket
        self.warm = WarmPool(cfg.warm_connections, cfg.warm_idle, cfg.connect_timeout, self.counters, SourceRoutes())
        self._probe_opening = False
        handlers = {
            SendFrame: self._send_frame, CloseChannel: self._close_channel,
            ChannelClosed: self._channel_closed, OpenSocket: self._open, ConnectSocket: self._connect,
            ListenSocket: self._listen, CloseSocket: self._close_socket, ShutdownSocket: self._shutdown,
            AbortSocket: self._abort, WriteStream: self._write, SendTo: self._send_to,
            SendChannel: self._send_channel, Ready: self._ready, Refused: self._refused,
            UdpChannelDead: self._channel_dead, RelayFailed: self._relay_failed,
            PauseReading: self._pause_reading, ResumeReading: self._resume_reading,
            SendProbe: self._send_probe, KeepaliveLearned: self._keepalive_learned,
        }
        core = self.core
        # Where TLS writes the channel's next bytes (``_ChannelProtocol.get_buffer``).
        self.read_buffer = core.read_buffer
        self.driver = CoreDriver(
            handlers, tick=core.tick, deadline=core.next_deadline, clock=self.loop.time
        )

    # -- driving the core ---------------------------------------------------------------

    def start(self) -> None:
        self.driver.run(self.core.channel_up(self.loop.time()))

    def on_data(self, data: bytes) -> None:
        self.counters["bytes_from_server"] += len(data)
        self._contain(self.core.receive_data, data)

    def on_buffer(self, nbytes: int) -> None:
        """``nbytes`` were written into ``read_buffer``'s view."""
        self.counters["bytes_from_server"] += nbytes
        self._contain(self.core.receive_into, nbytes)

    def _contain(self, receive: Any, arg: Any) -> None:
        try:
            self.driver.run(receive(arg, self.loop.time()))
        except Exception as err:  # noqa: BLE001 - ours, not the server's: say so, and end the channel cleanly
            self.counters["internal_errors"] += 1
            self.log.emit("internal_error", logging.ERROR, error=repr(err))
            self.driver.run(self.core.close(ErrorCode.INTERNAL, f"mediator error: {err!r}"))

    def on_lost(self, why: str) -> None:
        self.driver.run(self.core.channel_lost(why))
        if not self.done.done():
            self.done.set_result(None)

    def shutdown(self) -> None:
        """Whatever the way out, no socket or timer of this session survives it."""
        self.driver.close()
        cancel_all(self.tasks)
        self.warm.close()
        for port_id in list(self.ports):
            self._drop(port_id)
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        if not self.transport.is_closing():
            self.transport.abort()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- channel ------------------------------------------------------------------------

    def _send_frame(self, out: SendFrame) -> None:
        parts = out.parts
        self.counters["bytes_to_server"] += sum(map(len, parts))
        # Coalesced: the frames of one loop iteration (many sockets' reads,
        # a reply and its data) go as one TLS write, in fewer records (a
        # prompt one takes those before it along, at once).
        self.writer.add(parts, out.hold, now=out.prompt)

    def flush(self) -> None:
        """Write the frames collected since the last flush, in order."""
        self.writer.flush()

    def _close_channel(self, out: CloseChannel) -> None:
        self.flush()
        self.transport.close()

    def _channel_closed(self, out: ChannelClosed) -> None:
        code = out.code.name if out.code is not None else None
        self.log.emit("closed", code=code, reason=out.message, by_server=out.by_peer)
        if not self.done.done():
            self.done.set_result(None)

    def _ready(self, out: Ready) -> None:
        self.ready = True
        self.mediator.session_id = out.session_id
        self.counters["sessions"] += 1
        self.log.emit("ready", session=out.session_id, version=out.version, server=self.server)

    def _refused(self, out: Refused) -> None:
        # The owner's allow-list said no: the line an owner audits.
        self.counters["refused"] += 1
        self.log.warn("refused", op=out.op, proto=out.proto.name, address=out.address, port=out.port)

    def _relay_failed(self, out: RelayFailed) -> None:
        self.counters["relay_failed"] += 1
        if out.port_id in self.ports:  # frames in flight to a port that just ended are only counted
            self.log.emit("relay_failed", port=out.port_id, code=out.code, reason=out.message)

    def channel_full(self, full: bool) -> None:
        """The TLS channel's send buffer crossed its high (low) water mark."""
        self._channel_full = full
        for io in self.ports.values():
            if io.proto is Proto.TCP and io.transport is not None:
                (io.gate.pause if full else io.gate.resume)("channel")

    def conn_full(self, port_id: int, full: bool) -> None:
        """A private host reads slowly. Version 3: its window bounds what comes
        for it, and a drained buffer gives credit back; before: stop reading
        the channel until it catches up."""
        if self.core.windowed:
            if not full:
                self._flushed(port_id)
            return
        (self.channel_gate.pause if full else self.channel_gate.resume)(f"port {port_id}")

    def _flushed(self, port_id: int) -> None:
        """Tell the core how many written bytes have left ``port_id``'s buffer."""
        io = self.ports.get(port_id)
        transport = stream(io.transport) if io is not None else None
        if io is not None and transport is not None:
            self._gone(io, transport)

    def _gone(self, io: _PortIO, transport: asyncio.Transport) -> None:
        gone = io.written - transport.get_write_buffer_size() - io.reported
        if gone > 0:
            io.reported += gone
            self._relay(self.core.consumed(io.port_id, gone))

    def _pause_reading(self, out: PauseReading) -> None:
        io = self.ports.get(out.port_id)
        if io is not None:
            io.gate.pause("window")

    def _resume_reading(self, out: ResumeReading) -> None:
        io = self.ports.get(out.port_id)
        if io is not None:
            io.gate.resume("window")

    # -- ports --------------------------------------------------------------------------

    def _open(self, out: OpenSocket) -> None:
        io = _PortIO(out.port_id, out.proto, out.address, open_connect=out.connect_to is not None)
        self.ports[out.port_id] = io
        if out.proto is Proto.TCP and not out.redirect:
            self._open_tcp(io, out)
        else:
            io.task = self._spawn(self._open_task(io, out))

    def _open_tcp(self, io: _PortIO, out: OpenSocket) -> None:
        """A TCP port is bound at once: nothing to wait for, so no task and no
        loop trip per new connection. An OPEN_CONNECT's port is a waiting
        connection to its target if the warm pool has one (tunnel/warm.py),
        else one connected now (``_open_connected``)."""
        warm = self.warm.take((out.address, *out.connect_to)) if out.connect_to is not None else None
        if warm is not None:
            io.port, io.warm = warm
        elif out.connect_to is not None and self._any_client_port_at(out.address):
            io.task = self._spawn(self._open_connected(io, out.connect_to))
            return
        else:
            try:
                sock = bind_socket(Proto.TCP, out.address, out.port, out.mandatory, self.mediator.config.max_port_probes)
            except BindError as err:
                self.ports.pop(io.port_id, None)
                self.driver.run(self.core.failed(io.port_id, err.code, err.message))
                return
            io.sock = sock
            io.port = sock.getsockname()[1]
        self.driver.run(self.core.opened(io.port_id, io.port, self.loop.time()))

    def _any_client_port_at(self, local: IPAddress) -> bool:
        """Whether the allow-list lets the server open every port the kernel
        may give a connect from ``local`` (``client_ports`` covers its
        ephemeral range, as by default): then a connect may come before the
        check of its port, which cannot fail. Else the port is bound and
        checked first, and a refused one reaches nobody."""
        ok = self._any_client_port.get(local)
        if ok is None:
            kernel = self._kernel_ports
            ok = kernel is not None and self.allow.allows_all(Op.OPEN, local, kernel[0], kernel[1], Proto.TCP)
            self._any_client_port[local] = ok
        return ok

    async def _open_connected(self, io: _PortIO, target: tuple[IPAddress, int]) -> None:
        """An OPEN_CONNECT's port without a warm connection: connected first,
        then announced (``opened``, whose ConnectSocket finds it connected),
        as a warm one is. Its port is any, so the connect chooses it, for its
        4-tuple (``_connect_from``). Until the core knows it, the connection
        reads nothing and its end reaches nobody (``_TcpConn`` without a
        port id)."""
        address, port = target
        try:
            transport = await asyncio.wait_for(self._connect_from(io.address, address, port), self.mediator.config.connect_timeout)
        except BindError as err:
            self.ports.pop(io.port_id, None)
            self.driver.run(self.core.failed(io.port_id, err.code, err.message))
            return
        except (OSError, TimeoutError) as err:
            self.ports.pop(io.port_id, None)
            why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            self.driver.run(self.core.failed(io.port_id, ErrorCode.CONNECT_FAILED, f"{endpoint_text(address, port)}: {why}"))
            return
        io.port, io.warm = transport.get_extra_info("sockname")[1], transport
        self.driver.run(self.core.opened(io.port_id, io.port, self.loop.time()))

    async def _connect_from(self, local: IPAddress, address: IPAddress, port: int) -> asyncio.BaseTransport:
        """A connection from ``local`` to address:port, not reading yet: the
        loop's own connect where the routes give ``local`` (once more, bound,
        if they no longer do), else a socket of ours (``SourceRoutes``)."""
        routes = self.warm.routes
        if not routes.must_bind(local, address):
            transport, _ = await self.loop.create_connection(lambda: _TcpConn(self, None), str(address), port)
            if SourceRoutes.matches(transport, local):
                return transport
            transport.abort()
            routes.moved(local, address)
        sock = client_socket(local)
        try:
            await connect_socket(sock, address, port)
        except BaseException:
            sock.close()
            raise
        transport, _ = await self.loop.create_connection(lambda: _TcpConn(self, None), sock=sock)
        return transport

    async def _open_task(self, io: _PortIO, out: OpenSocket) -> None:
        cfg = self.mediator.config
        try:
            sock = bind_socket(out.proto, out.address, out.port, out.mandatory, cfg.max_port_probes)
        except BindError as err:
            self.ports.pop(io.port_id, None)
            self.driver.run(self.core.failed(io.port_id, err.code, err.message))
            return
        io.port = sock.getsockname()[1]
        try:
            if out.proto is Proto.UDP:
                io.transport, _ = await self.loop.create_datagram_endpoint(
                    lambda: _UdpPort(self, io.port_id), sock=sock
                )
                grow_udp_buffer(io.transport, cfg.udp_buffer)
            else:
                io.sock = sock
            if out.redirect:
                io.channel = await self._open_channel(io.port_id, out.address)
        except OSError as err:
            self._drop(io.port_id)
            self.driver.run(self.core.failed(io.port_id, ErrorCode.INTERNAL, f"{err.strerror or err}"))
            return
        self.driver.run(self.core.opened(io.port_id, io.port, self.loop.time()))

    async def _open_channel(self, port_id: int, local: IPAddress) -> asyncio.DatagramTransport:
        """The redirect's UDP channel: "any port of the system 2" to the service
        port (seed, Figure 1 description), connected so only the server's
        datagrams are taken."""
        cfg = self.mediator.config
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _ChannelDatagrams(self, port_id),
            remote_addr=(str(self.server), cfg.service_port),
            family=family_of(self.server),
        )
        grow_udp_buffer(transport)
        return transport

    def _channel_dead(self, out: UdpChannelDead) -> None:
        io = self.ports.get(out.port_id)
        if io is None or io.channel is None:
            return
        self.counters["channels_reopened"] += 1
        self.log.emit("channel_reopen", port=out.port_id)
        io.channel.close()
        io.channel = None

        async def reopen() -> None:
            try:
                channel = await self._open_channel(out.port_id, io.address)
            except OSError as err:
                self.log.warn("channel_reopen_failed", port=out.port_id, reason=str(err))
                return
            if self.ports.get(out.port_id) is io:
                io.channel = channel
            else:
                channel.close()

        self._spawn(reopen())

    def _connect(self, out: ConnectSocket) -> None:
        io = self.ports[out.port_id]
        transport, io.warm = io.warm, None
        if transport is None:
            io.task = self._spawn(self._connect_task(io, out))
            return
        # Connected already, to this very target, by _open_tcp (from the
        # warm pool: still reading, and the pool let go of none that had
        # bytes, tunnel/warm.py; nothing is read before ``_connected``
        # returns, no loop trip in between) or by _open_connected (not
        # reading, its early bytes kept).
        if transport.is_closing():  # the target reset it before the core knew of it
            self.driver.run(self.core.failed(io.port_id, ErrorCode.CONNECT_FAILED, f"{endpoint_text(out.address, out.port)}: reset"))
            return
        conn = transport.get_protocol()
        if not isinstance(conn, _TcpConn):
            conn = _TcpConn(self, io.port_id)
            transport.set_protocol(conn)
            conn.transport = stream(transport)
        conn.port_id, conn.peer = io.port_id, (out.address, out.port)
        io.transport = transport
        self._connected(io, out, conn)

    def _connected(self, io: _PortIO, out: ConnectSocket, conn: _TcpConn) -> None:
        self.counters["connects"] += 1
        self.driver.run(self.core.connected(io.port_id))
        conn.start()
        if io.open_connect:
            # Once this iteration's frames have left (the OPENED, the
            # target's first bytes): the next connects are on no one's path.
            self.writer.after(self.warm.refill, (io.address, out.address, out.port))

    async def _connect_task(self, io: _PortIO, out: ConnectSocket) -> None:
        cfg = self.mediator.config
        sock = io.sock
        if sock is None:  # a failed connect closed it: bind again, same address and port
            try:
                sock = bind_socket(Proto.TCP, io.address, io.port, True, 1)
            except BindError as err:
                self.driver.run(self.core.failed(io.port_id, err.code, err.message))
                return
        io.sock = None
        try:
            await asyncio.wait_for(connect_socket(sock, out.address, out.port), cfg.connect_timeout)
            conn = _TcpConn(self, io.port_id)
            io.transport, _ = await self.loop.create_connection(lambda: conn, sock=sock)
        except (OSError, TimeoutError) as err:
            sock.close()
            why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            try:
                io.sock = bind_socket(Proto.TCP, io.address, io.port, True, 1)
            except BindError:
                io.sock = None  # rebound at the next CONNECT or LISTEN
            self.driver.run(self.core.failed(io.port_id, ErrorCode.CONNECT_FAILED, f"{endpoint_text(out.address, out.port)}: {why}"))
            return
        if io.transport.is_closing():  # reset before the core even heard of it
            io.transport = None
            self.driver.run(self.core.failed(io.port_id, ErrorCode.CONNECT_FAILED, f"{endpoint_text(out.address, out.port)}: reset"))
            return
        self._connected(io, out, conn)

    def _listen(self, out: ListenSocket) -> None:
        io = self.ports[out.port_id]
        io.task = self._spawn(self._listen_task(io))

    async def _listen_task(self, io: _PortIO) -> None:
        try:
            sock = io.sock or bind_socket(Proto.TCP, io.address, io.port, True, 1)
            io.sock = None
            sock.listen(LISTEN_BACKLOG)
            io.server = await self.loop.create_server(lambda: _TcpConn(self, None, listen_id=io.port_id), sock=sock)
        except BindError as err:
            self.driver.run(self.core.failed(io.port_id, err.code, err.message))
            return
        except OSError as err:
            self.driver.run(self.core.failed(io.port_id, ErrorCode.INTERNAL, f"listen: {err.strerror or err}"))
            return
        self.driver.run(self.core.listening(io.port_id))

    def accepted(self, listen_id: int, conn: _TcpConn, transport: asyncio.Transport) -> int | None:
        peer = address_pair(transport.get_extra_info("peername"))
        if peer is None:
            return None
        conn_id, outs = self.core.accepted(listen_id, *peer)
        if conn_id is not None:
            io = _PortIO(conn_id, Proto.TCP, peer[0], transport=transport, gate=ReadGate(transport))
            if self._channel_full:
                io.gate.pause("channel")
            self.ports[conn_id] = io
            self.counters["accepted"] += 1
        self.driver.run(outs)
        return conn_id

    def _drop(self, port_id: int) -> None:
        io = self.ports.pop(port_id, None)
        if io is None:
            return
        if io.task is not None and not io.task.done():
            io.task.cancel()
        for closable in (io.transport, io.channel, io.server, io.sock, io.warm):
            if closable is not None:
                closable.close()
        self.channel_gate.resume(f"port {port_id}")

    def _close_socket(self, out: CloseSocket) -> None:
        self._drop(out.port_id)

    def _shutdown(self, out: ShutdownSocket) -> None:
        io = self.ports.get(out.port_id)
        transport = stream(io.transport) if io is not None else None
        if transport is None or transport.is_closing():
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:
            # The private host reset it meanwhile (ENOTCONN): that
            # connection's reset, never the channel's (issue 14 A).
            self._socket_failed(out.port_id)

    def _socket_failed(self, port_id: int) -> None:
        """A call on one private socket failed: reset that connection alone."""
        self.counters["socket_errors"] += 1
        io = self.ports.get(port_id)
        if io is not None:
            reset(io.transport)
            io.transport = None
        self.channel_gate.resume(f"port {port_id}")
        self.driver.run(self.core.reset(port_id))

    def _abort(self, out: AbortSocket) -> None:
        io = self.ports.get(out.port_id)
        if io is not None:
            reset(io.transport)
            io.transport = None

    def _write(self, out: WriteStream) -> None:
        io = self.ports.get(out.port_id)
        transport = stream(io.transport) if io is not None else None
        if io is not None and transport is not None and not transport.is_closing():
            self.counters["bytes_to_private"] += len(out.data)
            try:
                transport.write(out.data)
            except OSError:  # not raised by asyncio's transports today; contained all the same
                self._socket_failed(out.port_id)
                return
            io.written += len(out.data)
            if self.core.windowed:
                self._gone(io, transport)

    def _send_to(self, out: SendTo) -> None:
        io = self.ports.get(out.port_id)
        if io is not None and io.proto is Proto.UDP and io.transport is not None:
            self.counters["datagrams_to_private"] += 1
            io.transport.sendto(out.data, (str(out.address), out.port))  # type: ignore[attr-defined]

    def _send_probe(self, out: SendProbe) -> None:
        """Keepalive discovery: a PROBE from the spare socket (opened at first use)."""
        self.counters["probes"] += 1
        if self.probe is not None:
            self.probe.sendto(out.data)
            return
        if self._probe_opening:
            return  # the core counts it lost after its wait: a shorter one comes next

        async def open_and_send() -> None:
            self._probe_opening = True
            try:
                self.probe, _ = await self.loop.create_datagram_endpoint(
                    lambda: _ChannelDatagrams(self, 0),
                    remote_addr=(str(self.server), self.mediator.config.service_port),
                    family=family_of(self.server),
                )
            except OSError as err:
                self.log.warn("probe_failed", reason=str(err))
                return
            finally:
                self._probe_opening = False
            self.probe.sendto(out.data)

        self._spawn(open_and_send())

    def _keepalive_learned(self, out: KeepaliveLearned) -> None:
        self.mediator.learned = out
        self.log.emit("keepalive_learned", interval=round(out.interval, 2), survived=out.survived,
                      lost=out.lost, probes=out.probes)
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def _send_channel(self, out: SendChannel) -> None:
        # Frames first: a redirect's OPENED must leave before its channel's
        # first keepalive, or the server drops that as an unknown channel.
        self.flush()
        io = self.ports.get(out.port_id)
        if io is not None and io.channel is not None:
            self.counters["channel_datagrams_out"] += 1
            io.channel.sendto(out.data)

    # -- what the sockets report ----------------------------------------------------------

    def received(self, port_id: int, peer: tuple[IPAddress, int], data: bytes) -> None:
        if port_id in self.ports:
            self._relay(self.core.received(port_id, peer[0], peer[1], data))

    def _relay(self, outputs: list[Any]) -> None:
        """Carry out what the core answered to one relayed chunk, FIN, RST
        or credit, which leaves its deadline where it was: the driver's
        re-arm is spared when there is nothing to carry out (a FIN or bytes
        held behind the window, a credit too small to give back yet)."""
        if outputs:
            self.driver.run(outputs)

    def channel_datagram(self, data: bytes) -> None:
        self.counters["channel_datagrams_in"] += 1
        self.driver.run(self.core.receive_datagram(data, self.loop.time()))

    def fin(self, port_id: int) -> None:
        if port_id in self.ports:
            self._relay(self.core.fin(port_id))

    def lost(self, port_id: int, exc: Exception | None) -> None:
        io = self.ports.get(port_id)
        if io is None:
            return
        io.transport = None
        self.channel_gate.resume(f"port {port_id}")  # a dead socket holds the channel no more
        if exc is not None:
            self.driver.run(self.core.reset(port_id))


class _TcpConn(asyncio.Protocol):
    """One private TCP connection: a client port, or one accepted by a listener."""

    def __init__(self, session: _Session, port_id: int | None, listen_id: int | None = None) -> None:
        self.session = session
        self.port_id = port_id
        self.listen_id = listen_id
        self.peer: tuple[IPAddress, int] | None = None
        self.transport: asyncio.Transport | None = None
        self.started = listen_id is not None
        self.paused = False  # by connection_made, until start()
        self.early: list[bytes] = []  # read before the core knew the connection
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream(transport)
        assert self.transport is not None
        self.peer = address_pair(transport.get_extra_info("peername"))
        if self.listen_id is not None:
            self.port_id = self.session.accepted(self.listen_id, self, transport)
            if self.port_id is None:
                transport.abort()
        else:
            # A client port reads only once the core knows it is connected.
            transport.pause_reading()
            settle_pause(transport)
            self.paused = True

    def start(self) -> None:
        io = self.session.ports.get(self.port_id or 0)
        if io is None or self.transport is None:
            return
        self.started = True
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)
        if self.early_eof:
            self.eof_received()
        io.gate.attach(self.transport)
        if self.session._channel_full:
            io.gate.pause("channel")
        if self.paused and not io.gate.reasons:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.early.append(data)
            return
        if self.port_id is not None and self.peer is not None:
            self.session.counters["bytes_from_private"] += len(data)
            self.session.received(self.port_id, self.peer, data)

    def eof_received(self) -> bool:
        if not self.started:
            self.early_eof = True
        elif self.port_id is not None:
            self.session.fin(self.port_id)
        return True  # half-closed: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.port_id is not None:
            self.session.lost(self.port_id, exc)

    def pause_writing(self) -> None:
        if self.port_id is not None:
            self.session.conn_full(self.port_id, True)

    def resume_writing(self) -> None:
        if self.port_id is not None:
            self.session.conn_full(self.port_id, False)


class _UdpPort(asyncio.DatagramProtocol):
    """An opened or redirected UDP port on the private network."""

    def __init__(self, session: _Session, port_id: int) -> None:
        self.session = session
        self.port_id = port_id

    def datagram_received(self, data: bytes, addr: Any) -> None:
        peer = address_pair(addr)
        if peer is not None:
            self.session.counters["datagrams_from_private"] += 1
            self.session.received(self.port_id, peer, data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier sendto: UDP has no one to report it to.
        self.session.counters["udp_errors"] += 1


class _ChannelDatagrams(asyncio.DatagramProtocol):
    """A redirect's UDP channel to the service port."""

    def __init__(self, session: _Session, port_id: int) -> None:
        self.session = session
        self.port_id = port_id

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.session.channel_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while the server restarts: the dead-channel
        # timer, not one ICMP message, decides to reopen.
        self.session.counters["channel_errors"] += 1


def run_mediator(config: MediatorConfig, log: EventLog | None = None) -> None:
    """``nfgate tunnel mediator``: keep the tunnel up until SIGTERM or SIGINT."""
    log = log or EventLog("mediator")

    async def main() -> None:
        mediator = Mediator(config, log)
        stop = asyncio.Event()
        runner = asyncio.get_running_loop().create_task(mediator.run(stop))
        log.emit("started", identity=config.identity, server=server_text(config))
        try:
            await until_signalled(log, mediator.stats)
        finally:
            stop.set()
            await runner
            log.emit("stats", **mediator.stats())

    run_main(main(), config.event_loop)
