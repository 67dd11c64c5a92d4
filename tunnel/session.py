"""One mediator's TCP channel on the control server: asyncio around ``ServerSession``.

The server core decides; this class carries its outputs out, in order
(through the shared ``CoreDriver``, firewall/drive.py, which also keeps the
core's timer), and turns its request/reply events into awaitable calls for
the publications and the operator (``await session.open_port(...)``
returns the ``PortOpened`` or raises ``RequestRefused`` with the mediator's
error code). Relayed
packets and events go to the *owner* of each port id: a public connection,
a UDP flow, or nobody for the operator's raw ports (then they are counted
and dropped, and a connection accepted on a raw listener is closed).

Counters say which socket carried each relayed UDP datagram -- the UDP
channel or a DATA frame on the TCP channel -- because redirect exists so
that UDP keeps "the UDP as the underlying transport layer" (seed, "Redirect
port"), and the operator must be able to see that it does.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from firewall.drive import CoreDriver
from tunnel.aio import ChannelWriter, ReadGate, grow_tls_read_buffer
from tunnel.commands import (
    ChannelClosed, CloseChannel, ConnectionAccepted, LimitExceeded, PauseReading, PeerFin, PeerReset, PortOpened,
    Received, RelayFailed, RequestAcked, RequestFailed, ResumeReading, SendDatagram, SendFrame, ServerOutput,
    SessionReady,
)
from tunnel.config import MediatorEntry, ServerConfig
from tunnel.datagrams import DatagramType
from tunnel.errors import ErrorCode, LocalProtocolError, RequestRefused
from tunnel.events import EventLog
from tunnel.frames import Hello, IPAddress, Proto
from tunnel.pacing import TokenBucket
from tunnel.policy import TokenAuthenticator
from tunnel.server_core import ServerSession
from tunnel.states import PortState
from tunnel.tls import pin_matches
from tunnel.wire import endpoint_text

_SENDABLE = frozenset({PortState.CONNECTED, PortState.OPEN, PortState.REDIRECTED})


class SessionHost(Protocol):
    """What a session needs of its server (``TunnelServer``, tunnel/server.py)."""

    log: EventLog
    config: ServerConfig
    mediators: dict[str, MediatorEntry]

    def client_cert_digest(self, identity: str) -> bytes | None: ...
    def session_ready(self, session: Session, event: SessionReady) -> None: ...
    def session_ended(self, session: Session) -> None: ...
    def send_datagram(self, data: bytes, address: IPAddress, port: int) -> None: ...


@dataclass
class MediatorRecord:
    """What the server keeps about one mediator identity, across its sessions."""

    entry: MediatorEntry
    bucket: TokenBucket
    counters: Counter[str] = field(default_factory=Counter)
    session: Session | None = None
    connects: int = 0
    since: float = 0.0  # wall clock of the last connect or loss
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class PortOwner(Protocol):
    """Who gets what the mediator relays for one port id."""

    def on_received(self, address: IPAddress, port: int, data: bytes) -> None: ...
    def on_fin(self) -> None: ...
    def on_reset(self) -> None: ...
    def on_accepted(self, conn_id: int, address: IPAddress, port: int) -> None: ...
    def on_gone(self, why: str) -> None: ...
    def on_opened(self, session: Session, port_id: int) -> None: ...
    def on_window(self, paused: bool) -> None: ...


class StreamOwner(PortOwner, Protocol):
    """The owner of a version 4 stream (``Session.open_stream``): its
    request's answer comes to it, ``on_opened`` or this."""

    def on_refused(self, why: str) -> None: ...


class SessionAuthenticator:
    """Token (constant time) and, if the mediators file names one, client certificate."""

    def __init__(self, server: SessionHost, peer_cert: bytes | None) -> None:
        self.server = server
        self.peer_cert = peer_cert
        self.reason = ""

    def authenticate(self, hello: Hello) -> bool:
        entry = self.server.mediators.get(hello.identity)
        tokens = {hello.identity: entry.token} if entry is not None else {}
        if not TokenAuthenticator(tokens).authenticate(hello):
            self.reason = "unknown identity or wrong token"
            return False
        assert entry is not None
        if entry.client_cert is not None:
            wanted = self.server.client_cert_digest(entry.identity)
            if wanted is None or not pin_matches(self.peer_cert, wanted):
                self.reason = "client certificate missing or not the one configured"
                return False
        return True


class Session:
    """The server's side of one TCP channel."""

    def __init__(
        self, server: SessionHost, transport: asyncio.Transport, peer: str, session_id: int, peer_cert: bytes | None
    ) -> None:
        self.server = server
        self.log = server.log
        self.transport = transport
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.auth = SessionAuthenticator(server, peer_cert)
        self.core = ServerSession(
            session_id, self.loop.time(), settings=server.config.protocol,
            limits=server.config.limits, authenticator=self.auth,
        )
        self.session_id = session_id
        self.identity: str | None = None
        self.record: MediatorRecord | None = None  # set when HELLO is accepted
        self.started = self.loop.time()
        self.closed = False
        self.channel_gate = ReadGate(transport)
        self.owners: dict[int, PortOwner] = {}
        self.raw_ports: set[int] = set()
        self._readers: set[ReadGate] = set()
        self._full = False
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._owners_at_open: dict[int, PortOwner] = {}  # OPEN_CONNECT request id -> its port's owner
        self._stream_owners: dict[int, StreamOwner] = {}  # OPEN_STREAM request id -> its stream's owner
        self._channel_waiters: dict[int, asyncio.Future[None]] = {}
        self._room_waiters: list[asyncio.Future[None]] = []  # new relays waiting for a request slot
        self.writer = ChannelWriter(transport, self.loop)  # frames to write at the end of this loop iteration
        self._busy = False  # the TLS read buffer was grown (``_took``)
        handlers = {
            SendFrame: self._send_frame, CloseChannel: self._close_channel, ChannelClosed: self._channel_closed,
            SendDatagram: self._send_datagram, SessionReady: self._ready, PortOpened: self._answer,
            RequestAcked: self._answer, RequestFailed: self._answer, Received: self._received,
            ConnectionAccepted: self._accepted, PeerFin: self._peer_fin, PeerReset: self._peer_reset,
            LimitExceeded: self._limit, RelayFailed: self._relay_failed,
            PauseReading: self._window, ResumeReading: self._window,
        }
        core = self.core
        self.driver = CoreDriver(
            handlers, tick=core.tick, deadline=core.next_deadline, clock=self.loop.time
        )
        self._via_channel = False
        # Where TLS writes the channel's next bytes (``ChannelProtocol.get_buffer``).
        self.read_buffer = self.core.read_buffer
        self._last_local: tuple[IPAddress, IPAddress] | None = None  # ``local_address_for``'s last

    # -- driving the core ------------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        self._took(len(data))
        self.driver.run(self.core.receive_data(data, self.loop.time()))

    def on_buffer(self, nbytes: int) -> None:
        """``nbytes`` were written into ``read_buffer``'s view."""
        self._took(nbytes)
        self.driver.run(self.core.receive_into(nbytes, self.loop.time()))

    def _took(self, nbytes: int) -> None:
        if not self._busy and nbytes * 2 >= self.server.config.tls_idle_read_buffer:
            # Bulk: larger reads from now on (an idle channel keeps the small buffer).
            self._busy = True
            grow_tls_read_buffer(self.transport, self.server.config.tls_read_buffer)
        if self.record is not None:  # ``_count``, written out: every read
            self.record.counters["bytes_from_mediator"] += nbytes

    def on_datagram(self, raw: bytes, source: tuple[IPAddress, int]) -> None:
        self._via_channel = True
        try:
            self.driver.run(self.core.receive_datagram(raw, source, self.loop.time()))
        finally:
            self._via_channel = False
        if self._channel_waiters:
            for port_id, waiter in list(self._channel_waiters.items()):
                if self.core.channel_address(port_id) is not None:
                    del self._channel_waiters[port_id]
                    if not waiter.done():
                        waiter.set_result(None)

    def on_lost(self, why: str) -> None:
        self.driver.run(self.core.channel_lost(why))

    def close(self, code: ErrorCode = ErrorCode.NORMAL, why: str = "") -> None:
        self.driver.run(self.core.close(code, why))

    @property
    def bucket(self) -> TokenBucket:
        """The mediator's bytes/s bucket (a session is used only once READY)."""
        assert self.record is not None, "session used before READY"
        return self.record.bucket

    def _count(self, key: str, n: int = 1) -> None:
        if self.record is not None:
            self.record.counters[key] += n

    # -- outputs ---------------------------------------------------------------------------

    def _send_frame(self, out: SendFrame) -> None:
        parts = out.parts
        if out.datagram:
            self._count("udp_via_frames_out")
        if self.record is not None:  # ``_count``, written out: every frame
            self.record.counters["bytes_to_mediator"] += sum(map(len, parts))
        # Coalesced: the frames of one loop iteration go as one TLS write
        # (a prompt one takes those before it along, at once).
        self.writer.add(parts, now=out.prompt)

    def flush(self) -> None:
        """Write the frames collected since the last flush, in order."""
        self.writer.flush()

    def _close_channel(self, out: CloseChannel) -> None:
        self.flush()
        self.transport.close()

    def _channel_closed(self, out: ChannelClosed) -> None:
        self.closed = True
        self.driver.close()
        code = out.code.name if out.code is not None else None
        reason = out.message
        if out.code is ErrorCode.AUTH_FAILED and self.auth.reason:
            reason = f"{out.message}: {self.auth.reason}"
        level_warn = out.code not in (None, ErrorCode.NORMAL)
        (self.log.warn if level_warn else self.log.emit)(
            "session_end", session=self.session_id, mediator=self.identity, peer=self.peer,
            code=code, reason=reason, by_mediator=out.by_peer,
        )
        for future in list(self._futures.values()) + list(self._channel_waiters.values()):
            if not future.done():
                lost = RequestRefused("CHANNEL_LOST", f"the mediator's channel closed: {reason}", local=True)
                future.set_exception(lost)
        self._futures.clear()
        self._channel_waiters.clear()
        self._stream_owners.clear()  # their streams are among ``owners``: told below
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._room_waiters.clear()
        owners, self.owners = self.owners, {}
        for owner in owners.values():
            owner.on_gone("the mediator's channel closed")
        self.server.session_ended(self)

    def _send_datagram(self, out: SendDatagram) -> None:
        self._count("channel_datagrams_out")
        # Relayed data only: not a KEEPALIVE_ACK (sent while a datagram is
        # handled) nor a PROBE_ACK (sent by the timer).
        if not self._via_channel and out.data[1] == DatagramType.DATA:
            self._count("udp_via_channel_out")
        self.server.send_datagram(out.data, out.address, out.port)

    def _ready(self, out: SessionReady) -> None:
        self.identity = out.identity
        self.server.session_ready(self, out)

    def _answer(self, out: PortOpened | RequestAcked | RequestFailed) -> None:
        self._wake_one()
        stream_owner = self._stream_owners.pop(out.request_id, None)
        if stream_owner is not None:
            if isinstance(out, RequestFailed):
                if self.core.port(out.port_id) is None:
                    self.owners.pop(out.port_id, None)  # refused: its id is free again
                why = f"{out.code.name}: {out.message}" if out.message else out.code.name
                self._contained(out.port_id, stream_owner, lambda: stream_owner.on_refused(why))
            else:
                self._contained(out.port_id, stream_owner, lambda: stream_owner.on_opened(self, out.port_id))
            return
        future = self._futures.pop(out.request_id, None)
        owner = self._owners_at_open.pop(out.request_id, None)
        if owner is not None and isinstance(out, PortOpened) and future is not None and not future.done():
            self.owners[out.port_id] = owner
            owner.on_opened(self, out.port_id)
        if isinstance(out, RequestFailed) and self.core.port(out.port_id) is None:
            self.owners.pop(out.port_id, None)  # a stream refused (version 4): its id is free again
        if future is not None and not future.done():
            if isinstance(out, RequestFailed):
                future.set_exception(RequestRefused(out.code.name, out.message))
            else:
                future.set_result(out)
        elif isinstance(out, PortOpened):
            # Nobody waits any more (timed out): do not leak the mediator's port.
            self.close_soon(out.port_id)

    def _received(self, out: Received) -> None:
        port_id = out.port_id
        proto = self._proto(port_id)
        if proto is Proto.UDP:
            self._count("udp_via_channel_in" if self._via_channel else "udp_via_frames_in")
        owner = self.owners.get(port_id)
        if owner is None:
            self._count("dropped_no_owner")
            return
        if self.record is not None and proto is Proto.TCP:
            delay = self.record.bucket.take(len(out.data), self.loop.time())
            if delay > 0:
                self.channel_gate.pause("rate")
                self.loop.call_later(delay, self.channel_gate.resume, "rate")
        try:
            owner.on_received(out.address, out.port, out.data)
        except Exception as err:  # noqa: BLE001 - one connection's failure is not the channel's
            self._failed(port_id, owner, err)

    def _contained(self, port_id: int, owner: PortOwner, call: Callable[[], None]) -> None:
        """Hand one relayed event to its port's owner. Containment: whatever
        goes wrong there (a socket the public client reset, a bug) ends that
        relay only, never the channel the event came in on (issue 14 A)."""
        try:
            call()
        except Exception as err:  # noqa: BLE001 - one connection's failure is not the channel's
            self._failed(port_id, owner, err)

    def _failed(self, port_id: int, owner: PortOwner, err: Exception) -> None:
        """``owner`` raised ``err`` on a relayed event (``_contained``): that relay ends, alone."""
        self._count("relay_errors")
        self.log.warn("relay_error", mediator=self.identity, port=port_id, error=repr(err))
        if self.owners.get(port_id) is owner:
            self.reset(port_id)
            self.close_soon(port_id)
        try:
            owner.on_gone(f"relay error: {err!r}")
        except Exception:  # noqa: BLE001 - it already failed once; the port is closed either way
            pass

    def _accepted(self, out: ConnectionAccepted) -> None:
        owner = self.owners.get(out.listen_id)
        if owner is None:
            # A raw listener has no consumer for connections: say so, close it.
            self.log.emit("accepted_closed", mediator=self.identity, listener=out.listen_id, conn=out.conn_id,
                          peer=endpoint_text(out.address, out.port))
            self.close_soon(out.conn_id)
            return
        self._contained(out.listen_id, owner, lambda: owner.on_accepted(out.conn_id, out.address, out.port))

    def _peer_fin(self, out: PeerFin) -> None:
        owner = self.owners.get(out.port_id)
        if owner is not None:
            self._contained(out.port_id, owner, owner.on_fin)

    def _peer_reset(self, out: PeerReset) -> None:
        owner = self.owners.get(out.port_id)
        if owner is not None:
            self._contained(out.port_id, owner, owner.on_reset)

    def _window(self, out: PauseReading | ResumeReading) -> None:
        owner = self.owners.get(out.port_id)
        if owner is not None:
            owner.on_window(isinstance(out, PauseReading))

    def _limit(self, out: LimitExceeded) -> None:
        self.log.warn("limit", mediator=self.identity, port=out.port_id, reason=out.message)

    def _relay_failed(self, out: RelayFailed) -> None:
        self._count("relay_failed")
        owner = self.owners.pop(out.port_id, None)
        if owner is None:
            # The rest of the frames that were in flight when the port
            # ended: counted, not logged one line each.
            return
        self.log.emit("relay_failed", mediator=self.identity, port=out.port_id, code=out.code, reason=out.message)
        owner.on_gone(f"{out.code.name}: {out.message}")

    def _proto(self, port_id: int) -> Proto | None:
        entry = self.core.port(port_id)
        return entry[0] if entry is not None else None

    # -- flow control -------------------------------------------------------------------------

    @property
    def windowed(self) -> bool:
        """Per-connection windows (version 3, docs/tunnel-protocol.md section 21)."""
        return self.core.windowed

    def consumed(self, port_id: int, n: int) -> None:
        """Version 3: ``n`` bytes relayed from ``port_id`` left the public socket's buffer."""
        if not self.closed:
            self._relay(self.core.consumed(port_id, n))

    def channel_full(self, full: bool) -> None:
        """The TLS channel's send buffer crossed its high (low) water mark."""
        self._full = full
        for gate in self._readers:
            (gate.pause if full else gate.resume)("channel")

    def add_reader(self, gate: ReadGate) -> None:
        self._readers.add(gate)
        if self._full:
            gate.pause("channel")

    def remove_reader(self, gate: ReadGate) -> None:
        self._readers.discard(gate)
        gate.resume("channel")

    # -- requests ------------------------------------------------------------------------------

    async def _request(self, issued: tuple[int, list[ServerOutput]]) -> Any:
        request_id, outputs = issued
        future: asyncio.Future[Any] = self.loop.create_future()
        self._futures[request_id] = future
        self.driver.run(outputs)
        try:
            return await asyncio.wait_for(future, self.server.config.request_timeout)
        finally:
            self._futures.pop(request_id, None)

    def _checked(self, make: Callable[[], tuple[int, list[ServerOutput]]]) -> tuple[int, list[ServerOutput]]:
        if self.closed:
            raise RequestRefused("CHANNEL_LOST", "the mediator's channel is closed", local=True)
        try:
            return make()
        except LocalProtocolError as err:
            raise RequestRefused("WRONG_STATE", err.message, local=True) from None

    async def _room(self) -> None:
        """Wait while ``max_pending`` requests are in flight (up to
        ``request_timeout``): a burst of new public connections queues here,
        first come first served, instead of being reset. After that the core
        refuses with ``LimitError``."""
        deadline = self.loop.time() + self.server.config.request_timeout
        while self.core.pending_full and not self.closed and (left := deadline - self.loop.time()) > 0:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                return
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)

    def _wake_one(self) -> None:
        """A request was answered: its slot goes to the longest waiter."""
        while self._room_waiters:
            waiter = self._room_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    async def open_port(self, proto: Proto, address: IPAddress, port: int, mandatory: bool = False) -> PortOpened:
        await self._room()
        issue = lambda: self.core.open_port(proto, address, port, mandatory=mandatory)  # noqa: E731
        opened: PortOpened = await self._request(self._checked(issue))
        return opened

    async def redirect_port(self, address: IPAddress, port: int, mandatory: bool = False) -> PortOpened:
        if not self.server.config.protocol.udp_channels:
            why = "UDP channels are off on this server (protocol.udp_channels)"
            raise RequestRefused("WRONG_STATE", why, local=True)
        await self._room()
        issue = lambda: self.core.redirect_port(address, port, mandatory=mandatory)  # noqa: E731
        opened: PortOpened = await self._request(self._checked(issue))
        return opened

    async def connect(self, port_id: int, address: IPAddress, port: int) -> RequestAcked:
        acked: RequestAcked = await self._request(self._checked(lambda: self.core.connect(port_id, address, port)))
        return acked

    async def open_connect(self, local: IPAddress, address: IPAddress, port: int, owner: PortOwner) -> PortOpened:
        """Version 2: a client port connected to address:port, in one round trip.

        ``owner`` owns the port from the OPENED on, before this coroutine
        resumes: the target's first bytes and its FIN may come in the same
        read as the OPENED, and must not find the port without an owner."""
        await self._room()
        return await self.opened(self.open_connect_now(local, address, port, owner))

    def open_connect_now(
        self, local: IPAddress, address: IPAddress, port: int, owner: PortOwner,
    ) -> tuple[int, asyncio.Future[Any]]:
        """``open_connect``'s request, issued now (no wait for a slot: the
        caller saw one free), so that it leaves in this loop iteration's write;
        ``opened`` awaits its answer. Raises ``RequestRefused``, ``LimitError``."""
        request_id, outputs = self._checked(lambda: self.core.open_connect(local, address, port))
        self._owners_at_open[request_id] = owner
        future: asyncio.Future[Any] = self.loop.create_future()
        self._futures[request_id] = future
        self.driver.run(outputs)
        return request_id, future

    def open_stream(self, local: IPAddress, address: IPAddress, port: int, owner: StreamOwner) -> tuple[int, int]:
        """Version 4: OPEN_STREAM, issued now: the request id and the stream's
        id. ``owner`` owns the stream at once and may send on it before the
        OPENED; the answer comes to it (``on_opened``, ``on_refused``), with
        no future and no task: a new public connection's hot path. The owner
        keeps its own deadline for the answer, and ``forget_stream`` when it
        no longer wants it. Raises ``RequestRefused``, ``LimitError``."""
        if self.closed:
            raise RequestRefused("CHANNEL_LOST", "the mediator's channel is closed", local=True)
        try:
            request_id, port_id, outputs = self.core.open_stream(local, address, port)
        except LocalProtocolError as err:
            raise RequestRefused("WRONG_STATE", err.message, local=True) from None
        self.owners[port_id] = owner
        self._stream_owners[request_id] = owner
        self.driver.run(outputs)
        return request_id, port_id

    def forget_stream(self, request_id: int) -> None:
        """The owner of ``open_stream``'s ``request_id`` wants no answer any
        more (it gave up waiting, or its relay ended): a late one is handled
        as nobody's (a late OPENED's stream is closed)."""
        self._stream_owners.pop(request_id, None)

    async def room(self) -> None:
        """Wait, up to ``request_timeout``, while ``max_pending`` requests are in flight."""
        await self._room()

    async def opened(self, issued: tuple[int, asyncio.Future[Any]]) -> PortOpened:
        """The answer to ``open_connect_now``'s request (up to ``request_timeout``)."""
        request_id, future = issued
        try:
            opened: PortOpened = await asyncio.wait_for(future, self.server.config.request_timeout)
        finally:
            self._futures.pop(request_id, None)
            self._owners_at_open.pop(request_id, None)
        return opened

    async def check_target(self, proto: Proto, address: IPAddress, port: int) -> RequestAcked:
        """Version 2: the mediator's allow-list verdict on a target (raises ``RequestRefused``)."""
        issue = lambda: self.core.check_target(proto, address, port)  # noqa: E731
        acked: RequestAcked = await self._request(self._checked(issue))
        return acked

    async def listen(self, port_id: int) -> RequestAcked:
        acked: RequestAcked = await self._request(self._checked(lambda: self.core.listen(port_id)))
        return acked

    async def close_port(self, port_id: int) -> RequestAcked:
        self.owners.pop(port_id, None)
        acked: RequestAcked = await self._request(self._checked(lambda: self.core.close_port(port_id)))
        return acked

    def close_soon(self, port_id: int) -> None:
        """Close ``port_id`` without waiting for the answer (a relay ended)."""
        self.owners.pop(port_id, None)
        self.raw_ports.discard(port_id)
        entry = None if self.closed else self.core.port(port_id)
        if entry is None:
            return
        if self.core.opens_streams and entry[1] is PortState.RESET:
            return  # version 4: our RST ends it (a stream reset before its OPENED waits for that)
        try:
            _, outputs = self.core.close_port(port_id)
        except LocalProtocolError:
            return  # already closing
        self.driver.run(outputs)

    def set_owner(self, port_id: int, owner: PortOwner) -> None:
        self.owners[port_id] = owner

    async def wait_channel(self, port_id: int, timeout: float) -> None:
        """Wait until ``port_id``'s UDP channel has shown its address (or ``timeout``)."""
        if self.core.channel_address(port_id) is not None or timeout <= 0:
            return
        waiter = self._channel_waiters.setdefault(port_id, self.loop.create_future())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            self._count("channel_wait_timeouts")
        finally:
            self._channel_waiters.pop(port_id, None)

    # -- relay ---------------------------------------------------------------------------------

    def send(self, port_id: int, address: IPAddress, port: int, data: bytes) -> None:
        if self.closed or self.core.port_state(port_id) not in _SENDABLE:
            self._count("dropped_port_gone")
            return
        self._relay(self.core.send(port_id, address, port, data))

    def fin(self, port_id: int) -> None:
        if not self.closed and self.core.port_state(port_id) is PortState.CONNECTED:
            self._relay(self.core.fin(port_id))

    def reset(self, port_id: int) -> None:
        if not self.closed and self.core.port_state(port_id) is PortState.CONNECTED:
            self._relay(self.core.reset(port_id))

    def _relay(self, outputs: list[ServerOutput]) -> None:
        """Carry out what the core answered to one relayed chunk, FIN, RST
        or credit: frames and reading switches, which leave its deadline
        where it was, so the driver's re-arm is spared when there is
        nothing (a credit too small to give back yet, a FIN held behind
        the window)."""
        if outputs:
            self.driver.run(outputs)

    def local_address_for(self, target: IPAddress) -> IPAddress:
        """The mediator address facing ``target``: the interface whose network
        holds it, else its first address of the same family (HELLO's list).
        The last answer is kept: a publication asks for its one target at
        every new connection."""
        last = self._last_local
        if last is not None and last[0] is target:
            return last[1]
        local = self._local_address_for(target)
        self._last_local = (target, local)
        return local

    def _local_address_for(self, target: IPAddress) -> IPAddress:
        hello = self.core.hello
        interfaces = hello.interfaces if hello is not None else ()
        for iface in interfaces:
            if target.version == iface.version and target in iface.network:
                return iface.ip
        for iface in interfaces:
            if target.version == iface.version:
                return iface.ip
        announced = ", ".join(str(i) for i in interfaces) or "none"
        raise RequestRefused(
            "NO_SUCH_ADDRESS",
            f"mediator {self.identity} announced no IPv{target.version} address (it announced {announced}),"
            f" so it cannot reach {target}: list one in its interfaces",
            local=True,
        )

    def describe(self) -> dict[str, Any]:
        hello = self.core.hello
        ports = []
        for port_id, (proto, state) in sorted(self.core.ports.items()):
            owner = self.owners.get(port_id)
            kind = "raw" if port_id in self.raw_ports else type(owner).__name__ if owner is not None else "-"
            channel = self.core.channel_address(port_id)
            ports.append({
                "id": port_id, "proto": proto.name.lower(), "state": state.value, "owner": kind,
                **({"channel": endpoint_text(*channel)} if channel else {}),
            })
        return {
            "session": self.session_id,
            "peer": self.peer,
            "state": self.core.state.value,
            "version": self.core.version,
            "service": hello.service if hello else None,
            "interfaces": [str(i) for i in hello.interfaces] if hello else [],
            "keepalive": hello.keepalive_ms / 1000 if hello else None,
            "uptime": round(self.loop.time() - self.started, 1),
            "ports": ports,
            "dropped": {r.value: n for r, n in self.core.dropped.items()},
            # Version 5: windows grown towards the public clients, and the budget they hold now.
            "windows": {"grown": self.core.windows_grown, "grown_bytes": self.core.grown_bytes(),
                        "budget": self.core.window_budget},
        }
