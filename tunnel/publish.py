"""Publishing a private service on a public port of the control server.

The seed's help-desk case: "a technician on a public network verify and
correct a faulty equipment configuration via an HTTP connection", without
the customer "personally creating a route" (seed, on the help service).
``nfgate tunnel publish MEDIATOR --to 192.168.1.10:80 --public 8080`` makes
the server listen on public port 8080 and relay each connection through the
tunnel:

- **TCP**: per public connection, OPEN_STREAM (version 4: a client port on
  the mediator's address facing the target, on a stream id the server
  chooses, so the client's bytes follow at once, without waiting for the
  OPENED; both FINs or an RST free the id); OPEN_CONNECT with a version-2
  or 3 mediator (the same, in one round trip before the first bytes);
  version 1: OPEN_PORT then CONNECT. Bytes go
  as DATA frames, FIN and RST as events, both ways (seed, "Packet and event
  relay").
- **UDP** (``--udp``): per public client, REDIRECT_PORT, so that the
  target's answers come back over that port's UDP channel and keep "the UDP
  as the underlying transport layer" (seed, "Redirect port"); the server
  sends to the target over the same channel. A datagram from anyone but the
  target is dropped and counted.

The publication belongs to the server and is keyed by the mediator's
identity, so it outlives the mediator's channel: a public client that comes
while the mediator is reconnecting waits for it (``request_timeout``), and
live UDP flows get new redirects on the new session.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tunnel.aio import ReadGate, address_pair, reset, stream
from tunnel.config import ServerConfig
from tunnel.errors import LimitError, RequestRefused
from tunnel.events import EventLog
from tunnel.frames import IPAddress, Proto
from tunnel.session import MediatorRecord, Session
from tunnel.wire import endpoint_text

Reply = Callable[[bytes], None]



class PublishHost(Protocol):
    """What a publication needs of its server (``TunnelServer``, tunnel/server.py)."""

    log: EventLog
    config: ServerConfig
    records: dict[str, MediatorRecord]

    async def wait_session(self, identity: str, timeout: float) -> Session | None: ...


@dataclass(frozen=True)
class PublishSpec:
    """What the operator asked: public proto/port -> mediator's private target."""

    identity: str
    proto: Proto
    public_port: int
    target: IPAddress
    target_port: int

    def key(self) -> tuple[Proto, int]:
        return (self.proto, self.public_port)

    def to_json(self) -> dict[str, Any]:
        return {
            "mediator": self.identity, "proto": self.proto.name.lower(), "public": self.public_port,
            "to": endpoint_text(self.target, self.target_port),
        }


class Publication:
    """A live publish: its listener (if the frontend binds one) and relays."""

    def __init__(self, server: PublishHost, spec: PublishSpec) -> None:
        self.server = server
        self.spec = spec
        self.target_text = endpoint_text(spec.target, spec.target_port)  # for the lines of its connections
        self.log = server.log
        self.loop = asyncio.get_running_loop()
        self.counters: Counter[str] = Counter()
        self.state = "new"
        self.listener: Any = None  # set by the frontend that binds it
        self.connections: set[PublicConnection] = set()
        self.flows: dict[tuple[IPAddress, int], UdpFlow] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        if spec.proto is Proto.UDP:
            self._arm_sweeper()

    def describe(self) -> dict[str, Any]:
        active = len(self.connections) if self.spec.proto is Proto.TCP else len(self.flows)
        return {**self.spec.to_json(), "state": self.state, "active": active, "counters": dict(self.counters)}

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        """Unpublished or stopping: every relay of it ends (RST for TCP)."""
        self.state = "closed"
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in list(self.connections):
            conn.abort("unpublished")
        for flow in list(self.flows.values()):
            flow.end("unpublished")
        for task in list(self.tasks):
            task.cancel()

    async def session(self) -> Session | None:
        """The mediator's live session; waits for a reconnect up to request_timeout."""
        return await self.server.wait_session(self.spec.identity, self.server.config.request_timeout)

    def session_ready(self, session: Session) -> None:
        """A new session of our mediator: UDP flows still alive get redirects again."""
        for flow in self.flows.values():
            if flow.port_id is None and flow.opening is None:
                flow.open()

    # -- TCP ---------------------------------------------------------------------------

    def tcp_protocol(self, origin: tuple[IPAddress, int] | None = None) -> PublicConnection:
        """A protocol for one public connection. ``origin``: the client's real
        address when the socket's peer is not it (the gateway kind, where
        the peer is the processor's firewall-side endpoint), for the logs."""
        return PublicConnection(self, origin)

    # -- UDP ---------------------------------------------------------------------------

    def datagram(
        self, data: bytes, client: tuple[IPAddress, int], reply: Reply, origin: tuple[IPAddress, int] | None = None,
    ) -> None:
        """A datagram from a public client (any frontend). ``client`` keys the
        flow; ``origin`` is the client's real address if that is not it (the
        gateway kind), for the logs."""
        self.counters["datagrams_in"] += 1
        flow = self.flows.get(client)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                # Each flow costs a mediator port: beyond its limit, drop
                # quietly (a log line per spoofed source would be a flood).
                self.counters["dropped_flows_full"] += 1
                return
            flow = self.flows[client] = UdpFlow(self, client, reply, origin)
            self.counters["flows"] += 1
            flow.open()
        flow.to_target(data)

    @property
    def max_flows(self) -> int:
        record = self.server.records.get(self.spec.identity)
        return record.entry.limits.max_ports if record is not None else 0

    def _arm_sweeper(self) -> None:
        period = max(0.5, self.server.config.udp_idle_timeout / 4)
        self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        horizon = self.loop.time() - self.server.config.udp_idle_timeout
        for flow in [f for f in self.flows.values() if f.last < horizon]:
            flow.end("idle")
        if self.state != "closed":
            self._arm_sweeper()


class PublicConnection(asyncio.Protocol):
    """One public TCP connection, relayed to the target through the tunnel.

    Two legs: the public client's connection, and the mediator's port to
    the target, which is not a socket but a port multiplexed on the TLS
    channel: its bytes are DATA frames, paced by the channel's gate, the
    port's window and the mediator's rate, and its FIN and RST are
    EVENT_FIN and EVENT_RST. Every chunk is taken at once by the leg it goes
    to (framed, or written to the client's transport), so the relay holds
    no bytes, and its rules are those of ``gateways.relay.core`` with
    nothing ever unsent:

    - a FIN from one leg is passed on to the other at once (half-close,
      RFC 9293 section 3.6); once both have crossed, the client's
      connection closes: reason ``done``;
    - a reset, or a failed socket call, on either leg resets both: reason
      ``client_reset`` or ``target_reset`` (a write or shutdown that fails
      on a client that has reset is that client's reset, never the
      channel's: issue 14 A);
    - ``abort(why)`` (unpublished, the channel ended, a relay error) resets both.

    The relay core's own events and commands are not used here: a new
    public connection is the tunnel's hot path, and with no byte ever held
    they decide nothing a flag does not.
    """

    def __init__(self, publication: Publication, origin: tuple[IPAddress, int] | None = None) -> None:
        self.pub = publication
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()
        self.client: tuple[IPAddress, int] | None = None
        self._client_text: str | None = None
        self.session: Session | None = None
        self.port_id: int | None = None
        self.done = False
        self.bytes_in = 0  # from the public client to the target
        self.bytes_out = 0  # from the target to the public client
        self.fin_in = False  # the client's FIN, passed on to the target
        self.fin_out = False  # the target's FIN, passed on to the client
        self.task: asyncio.Task[None] | None = None
        self.request_id = 0  # version 4: our OPEN_STREAM's, until its answer comes
        self.timer: asyncio.TimerHandle | None = None  # version 4: the deadline for that answer
        self.line_due = False  # attached (opened), its "connection" line not yet written
        self.attached = False
        self.early: list[bytes] = []  # read before the tunnel side existed
        self.early_eof = False
        self.error = ""  # the client's socket error that ended the relay, if one did
        self.written = 0  # bytes written to the client (version 3's credit)
        self.reported = 0  # of those, reported to the session as gone from the buffer

    @property
    def client_text(self) -> str:
        """The client's address for this connection's lines, made once, off the request's path."""
        if self._client_text is None:
            self._client_text = _fmt(self.client)
        return self._client_text

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream(transport)
        assert self.transport is not None
        self.gate.attach(transport)
        # Reading goes on until the client's first bytes (a request sent
        # with the handshake): they are kept and leave with the OPENED's
        # answer, in the same write, instead of one loop trip after it.
        self.client = self.origin or address_pair(transport.get_extra_info("peername"))
        self.pub.connections.add(self)
        self.pub.counters["connections"] += 1
        if not self._open_now():
            self.task = self.pub.spawn(self._attach())

    def _open_now(self) -> bool:
        """The common case -- the mediator connected, version 2 or later, a
        request slot free -- issues the request here, in the accept's own
        loop iteration, not one later from a task: OPEN_STREAM (version 4,
        answered to ``on_opened`` or ``on_refused``: no task at all) or
        OPEN_CONNECT (answered to ``_opened``). Anything else (or a
        refusal) is left to ``_attach``, which waits or refuses as it must."""
        record = self.pub.server.records.get(self.pub.spec.identity)
        session = record.session if record is not None else None
        if session is None or session.closed or not session.core.pipelines_connect or session.core.pending_full:
            return False
        spec = self.pub.spec
        try:
            local = session.local_address_for(spec.target)
            if session.core.opens_streams:
                self._open_stream(session, local)
            else:
                issued = session.open_connect_now(local, spec.target, spec.target_port, self)
                self.task = self.pub.spawn(self._opened(session, issued))
        except (RequestRefused, LimitError):
            return False
        return True

    def _open_stream(self, session: Session, local: IPAddress) -> None:
        """Version 4: the stream is ours from the request on, so the relay
        starts now and the client's bytes follow the OPEN_STREAM without
        waiting for its OPENED, which must come within ``request_timeout``."""
        spec = self.pub.spec
        self.request_id, self.port_id = session.open_stream(local, spec.target, spec.target_port, self)
        self.session = session
        self.timer = self.pub.loop.call_later(self.pub.server.config.request_timeout, self._unanswered)
        self._attached(session)

    def _unanswered(self) -> None:
        self.timer = None
        self._refuse("refused", "no answer from the mediator in time")

    def _stop_waiting(self) -> None:
        """No answer to our OPEN_STREAM is wanted any more (it came, or the relay is over)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.request_id and self.session is not None:
            self.session.forget_stream(self.request_id)
        self.request_id = 0

    async def _opened(self, session: Session, issued: tuple[int, asyncio.Future[Any]]) -> None:
        """Version 2 or 3: the answer to the OPEN_CONNECT ``_open_now`` issued."""
        try:
            await session.opened(issued)
        except (RequestRefused, TimeoutError) as err:
            self._refuse("refused", str(err) or "no answer from the mediator in time")
            return
        self._attached(session)

    async def _attach(self) -> None:
        spec = self.pub.spec
        session = await self.pub.session()
        if session is None:
            self._refuse("no_mediator", f"mediator {spec.identity} is not connected")
            return
        try:
            local = session.local_address_for(spec.target)
            if session.core.opens_streams:
                await session.room()
                self._open_stream(session, local)
                return
            if session.core.pipelines_connect:
                # Version 2: OPEN_CONNECT, one round trip (issue 14, latency).
                await session.open_connect(local, spec.target, spec.target_port, self)
            else:
                opened = await session.open_port(Proto.TCP, local, 0)
                self.session, self.port_id = session, opened.port_id
                session.set_owner(opened.port_id, self)
                await session.connect(opened.port_id, spec.target, spec.target_port)
        except (RequestRefused, LimitError, TimeoutError) as err:
            self._refuse("refused", str(err) or "no answer from the mediator in time")
            return
        self._attached(session)

    def _attached(self, session: Session) -> None:
        """The port to the target is connected: relay from now on (once)."""
        if self.attached or self.done:
            return
        session.add_reader(self.gate)
        self.attached = True
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)
        if self.early_eof:
            self.eof_received()
        self.gate.resume("attach")
        if not session.core.opens_streams:
            # The log line after the frames of this iteration have left, not
            # before (version 4: once the OPENED has come, ``on_opened``).
            self._line_soon()

    def _line_soon(self) -> None:
        """The "connection" line at the end of this loop iteration, once what
        this read brought has gone on; or first thing in ``_release`` if the
        connection is over by then: always before its end line."""
        if self.done:
            return
        self.line_due = True
        self.pub.loop.call_soon(self._due_line)

    def _due_line(self) -> None:
        if self.line_due:
            self.line_due = False
            self._connection_line()

    def _connection_line(self) -> None:
        spec = self.pub.spec
        self.pub.log.emit(
            "connection", public=spec.public_port, client=self.client_text,
            to=self.pub.target_text, mediator=spec.identity, port=self.port_id,
        )

    def _refuse(self, event: str, why: str) -> None:
        if self.done:
            return
        self._stop_waiting()
        self.pub.counters["refused"] += 1
        self.pub.log.warn(event, public=self.pub.spec.public_port, client=self.client_text, reason=why)
        self.done = True
        if self.session is not None and self.port_id is not None:
            self.session.remove_reader(self.gate)
            self.session.close_soon(self.port_id)
        reset(self.transport)

    def _release(self, reason: str, detail: str = "") -> None:
        """The relay is over (once): free the mediator's port, say why."""
        if self.done:
            return
        self.done = True
        self._stop_waiting()
        if self.session is not None and self.port_id is not None:
            self.session.remove_reader(self.gate)
            # A slow client that had paused the channel must not keep it paused.
            self.session.channel_gate.resume(f"public {id(self)}")
            self.session.close_soon(self.port_id)
        if self.line_due:  # opened, and over within the same loop iteration
            self.line_due = False
            self._connection_line()
        detail = detail or self.error
        self.pub.log.emit(
            "connection_end", public=self.pub.spec.public_port, client=self.client_text, port=self.port_id,
            reason=reason, bytes_in=self.bytes_in, bytes_out=self.bytes_out, **({"detail": detail} if detail else {}),
        )

    def _client_failed(self, err: OSError) -> None:
        """Containment: a socket call that fails on the client's connection (a
        write or shutdown on one the client has reset: ENOTCONN, EPIPE) is
        that client's reset, and ends this relay only. Nothing of it reaches
        the channel that called us."""
        self.pub.counters["client_errors"] += 1
        self.error = err.strerror or str(err)
        self._reset_both("client_reset")

    def _reset_both(self, reason: str, detail: str = "") -> None:
        """RST to the client, EVENT_RST to the target (a no-op where the
        target's own RST or the session's end came first)."""
        reset(self.transport)
        if self.session is not None and self.port_id is not None:
            self.session.reset(self.port_id)
        self._release(reason, detail)

    def _both_fins(self) -> None:
        """Both FINs have crossed: the client's connection closes, the relay is done."""
        if self.transport is not None:
            self.transport.close()
        self._release("done")

    def _flushed(self) -> None:
        """Version 3: give the mediator credit for what left the client's buffer."""
        if self.session is None or self.port_id is None or self.transport is None:
            return
        gone = self.written - self.transport.get_write_buffer_size() - self.reported
        if gone > 0:
            self.reported += gone
            self.session.consumed(self.port_id, gone)

    def _writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        if not self.attached:
            # Kept until the tunnel side exists; one read at most.
            self.early.append(data)
            self.gate.pause("attach")
            return
        session, port_id = self.session, self.port_id
        if session is None or port_id is None or self.done:
            return
        n = len(data)
        self.bytes_in += n
        self.pub.counters["bytes_in"] += n
        spec = self.pub.spec
        session.send(port_id, spec.target, spec.target_port, data)
        delay = session.bucket.take(n, self.pub.loop.time())
        if delay > 0:
            # Over the mediator's bytes/s: stop reading until the debt is paid.
            self.gate.pause("rate")
            self.pub.loop.call_later(delay, self.gate.resume, "rate")

    def eof_received(self) -> bool:
        if not self.attached:
            self.early_eof = True
            return True
        if self.session is not None and self.port_id is not None and not self.done and not self.fin_in:
            self.fin_in = True
            self.session.fin(self.port_id)
            if self.fin_out:
                self._both_fins()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.pub.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if not self.done:
            # Gone without both FINs: the target must not wait for more.
            self._reset_both("client_reset")

    def pause_writing(self) -> None:
        # Version 3: the window bounds what comes for this client; before,
        # a slow client stops the reading of the whole channel.
        if self.session is not None and not self.session.windowed:
            self.session.channel_gate.pause(f"public {id(self)}")

    def resume_writing(self) -> None:
        if self.session is not None and self.session.windowed:
            self._flushed()
        elif self.session is not None:
            self.session.channel_gate.resume(f"public {id(self)}")

    # -- from the tunnel -------------------------------------------------------------------

    def on_received(self, address: IPAddress, port: int, data: bytes) -> None:
        if self.done:
            return
        self.bytes_out += len(data)
        if not self._writable():
            return
        self.pub.counters["bytes_out"] += len(data)
        try:
            self.transport.write(data)  # type: ignore[union-attr]
        except OSError as err:  # not raised by asyncio's transports today; contained all the same
            self._client_failed(err)
            return
        self.written += len(data)
        if self.session is not None and self.session.windowed:
            self._flushed()

    def on_fin(self) -> None:
        if self.done or self.fin_out:
            return
        self.fin_out = True
        if self._writable() and self.transport.can_write_eof():  # type: ignore[union-attr]
            try:
                self.transport.write_eof()  # type: ignore[union-attr]
            except OSError as err:
                self._client_failed(err)
                return
        if self.fin_in:
            self._both_fins()

    def on_reset(self) -> None:
        self.pub.counters["resets_from_target"] += 1
        if not self.done:
            self._reset_both("target_reset")

    def on_accepted(self, conn_id: int, address: IPAddress, port: int) -> None:
        raise AssertionError("a client port never accepts")

    def on_opened(self, session: Session, port_id: int) -> None:
        """Version 4: the OPENED of our stream, which is ours since the
        request: the target is connected too, and the connection is logged.
        Version 2 or 3: OPEN_CONNECT answered: ours from now on, and relayed
        at once (the client's first bytes go out with this read's frames),
        not when ``_opened`` resumes a loop trip later."""
        if self.request_id:
            self._stop_waiting()
            # Its line after what came with the OPENED (the target's first
            # bytes, in this same read) has gone to the client, and before
            # the connection's end line.
            self._line_soon()
            return
        self.session, self.port_id = session, port_id
        self._attached(session)

    def on_refused(self, why: str) -> None:
        """Version 4: the mediator refused our stream, or could not connect it."""
        self.request_id = 0  # answered: nothing to forget
        self._refuse("refused", why)

    def on_window(self, paused: bool) -> None:
        """Version 3: the window to the target is used up (or has credit again)."""
        (self.gate.pause if paused else self.gate.resume)("window")

    def on_gone(self, why: str) -> None:
        self.abort(why)

    def abort(self, why: str) -> None:
        if not self.done:
            self._reset_both(why)


class UdpFlow:
    """One public UDP client of a publication, on its own redirected port."""

    def __init__(
        self, pub: Publication, client: tuple[IPAddress, int], reply: Reply,
        origin: tuple[IPAddress, int] | None = None,
    ) -> None:
        self.pub = pub
        self.client = client
        self.shown = origin or client  # who the logs name
        self.reply = reply
        self.port_id: int | None = None
        self.session: Session | None = None
        self.ready = False
        self.opening: asyncio.Task[None] | None = None
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes in ``queue``
        self.last = pub.loop.time()

    def open(self) -> None:
        self.opening = self.pub.spawn(self._open())

    async def _open(self) -> None:
        spec = self.pub.spec
        try:
            session = await self.pub.session()
            if session is None:
                raise RequestRefused("NO_MEDIATOR", f"mediator {spec.identity} is not connected", local=True)
            opened = await session.redirect_port(session.local_address_for(spec.target), 0)
            self.session, self.port_id = session, opened.port_id
            session.set_owner(opened.port_id, self)
            # Until the mediator's first channel datagram shows its NAT'd
            # address, the server could only answer over the TCP channel.
            await session.wait_channel(opened.port_id, self.pub.server.config.channel_wait)
        except (RequestRefused, LimitError, TimeoutError) as err:
            self.pub.counters["refused"] += 1
            self.pub.log.warn("flow_refused", public=spec.public_port, client=_fmt(self.shown), reason=str(err))
            self.end("refused", close_port=False)
            return
        finally:
            self.opening = None
        self.ready = True
        self.pub.log.emit("flow", public=spec.public_port, client=_fmt(self.shown), port=self.port_id)
        while self.queue:
            self._send(self.queue.popleft())
        self.queued = 0

    def to_target(self, data: bytes) -> None:
        self.last = self.pub.loop.time()
        if self.ready:
            self._send(data)
        elif (len(self.queue) < self.pub.server.config.udp_queue
              and self.queued + len(data) <= self.pub.server.config.udp_queue_bytes):
            self.queue.append(data)
            self.queued += len(data)
        else:
            self.pub.counters["dropped_queue_full"] += 1

    def _send(self, data: bytes) -> None:
        session, port_id = self.session, self.port_id
        if session is None or port_id is None or session.closed:
            self.pub.counters["dropped_no_session"] += 1
            return
        if not session.bucket.try_take(len(data), self.pub.loop.time()):
            self.pub.counters["dropped_rate"] += 1
            return
        spec = self.pub.spec
        session.send(port_id, spec.target, spec.target_port, data)

    def on_received(self, address: IPAddress, port: int, data: bytes) -> None:
        spec = self.pub.spec
        if (address, port) != (spec.target, spec.target_port):
            self.pub.counters["dropped_not_target"] += 1
            return
        if self.session is not None and not self.session.bucket.try_take(len(data), self.pub.loop.time()):
            self.pub.counters["dropped_rate"] += 1
            return
        self.last = self.pub.loop.time()
        self.pub.counters["datagrams_out"] += 1
        self.reply(data)

    def on_fin(self) -> None:
        return None  # UDP has no FIN

    def on_reset(self) -> None:
        return None

    def on_accepted(self, conn_id: int, address: IPAddress, port: int) -> None:
        raise AssertionError("a UDP port never accepts")

    def on_opened(self, session: Session, port_id: int) -> None:
        return None  # a flow's port comes from REDIRECT_PORT

    def on_window(self, paused: bool) -> None:
        return None  # UDP has no window

    def on_gone(self, why: str) -> None:
        """The session ended: a new one re-issues the redirect (``session_ready``)."""
        self.session, self.port_id, self.ready = None, None, False

    def end(self, why: str, close_port: bool = True) -> None:
        if self.pub.flows.get(self.client) is self:
            del self.pub.flows[self.client]
        if self.opening is not None and self.opening is not asyncio.current_task():
            self.opening.cancel()
        if close_port and self.session is not None and self.port_id is not None:
            self.session.close_soon(self.port_id)
        self.session, self.port_id, self.ready = None, None, False
        self.queue.clear()
        self.queued = 0
        self.pub.log.emit("flow_end", public=self.pub.spec.public_port, client=_fmt(self.shown), reason=why)


def _fmt(pair: tuple[IPAddress, int] | None) -> str:
    return endpoint_text(*pair) if pair else "-"
