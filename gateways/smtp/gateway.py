"""The ``smtp`` gateway kind: the asyncio adapter around ``SmtpRelay`` (docs/smtp.md).

It makes no protocol decision (STYLE.md): it carries out what the core
says. Per accepted connection F:f -> G:g:

1. ``GatewayLayer.attach``: the original tuple (client C:c, original
   destination S':s', server S:s), or a reset. Every log line of the
   session carries it (issue 10: "every decision logged with the original
   tuple").
2. ``max_sessions`` and ``max_sessions_per_client`` (by the client's real
   address, from signalling; an IPv6 client by its ``client_prefix6``
   prefix, ``client_group``): past either, the client gets 421 and the
   server is never contacted.
3. Leg B to the server through F:f: its SYN leaves before anything else
   is done (``GatewayLayer.start_tcp``), and the ``open`` line is written
   while the processor and the server answer it. Then each leg is its
   socket with a readiness callback (``_Leg``) feeding the core, and the
   core's outputs are written at once, one write per batch.

Speed (issue 10, item 3): ``TCP_NODELAY`` on both legs, so a reply or a
command line leaves at once instead of waiting for the peer's delayed ACK
(the ~40 ms per reply the user-mode anchor proxsmtpd loses); no task,
stream or transport per leg, only the loop's readiness callbacks on the
two sockets (an asyncio transport costs a leg about as much again in set-up
and wake-ups); the content is handled a chunk at a time (``data``).
Backpressure: when a leg has ``buffer_high_water`` bytes (a setting) the
kernel has not taken, neither leg is read until they drop below a quarter
of it; so a peer
that stops reading holds its session to that much and what one read makes
(the core's replies to up to ``READ_SIZE`` of pipelined commands), until the
idle timeout ends it.

Timeouts: ``idle_timeout`` (no byte from either peer) and
``session_timeout`` end the session with 421 (the core says so); the
connection to the server has ``connect_timeout``.

STARTTLS (``starttls``): strip (the core refuses it), passthrough (after
the core's ``Opaque`` the legs relay bytes unchanged: no inspection), and
terminate (``StartTls``: TLS to the server, then the 220 and TLS to the
client with ``tls_certificate``; the server's certificate is checked only
against ``tls_server_ca``, if set: ``tls_contexts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

from firewall.signalling import Endpoint, FlowInfo
from gateways.layer import EventLog, GatewayLayer, Hold
from gateways.manifest import Manifest
from gateways.relay import reset_socket
from gateways.relay.driver import arm_reset
from gateways.smtp.core import SmtpRelay
from gateways.smtp.model import Close, Event, Opaque, Output, Reply, StartTls, ToClient, ToServer
from gateways.smtp.policy import policy_of
from gateways.smtp.settings import SmtpSettings
from gateways.tcp_server import CLOSE_FLUSH_TIMEOUT, TcpGateway

TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many sessions; try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many sessions from your address; try again later")
NO_SERVER = Reply(421, "4.4.1", "The mail server cannot be reached; try again later")

# Events that get a log line of their own; the rest are only counted.
_LOGGED = ("refused.", "tls.", "closed.")


def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_contexts(settings: SmtpSettings, config_dir: Path | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server-side context for clients, client-side context towards the server) in terminate mode.

    Towards the server TLS is opportunistic by default (RFC 7435, and what
    MTAs do among themselves, RFC 3207 section 4.1): encrypted, the
    certificate not checked. With ``tls_server_ca`` its chain must lead to
    that CA, and with ``tls_server_name`` it must name that host too."""
    if settings.starttls != "terminate":
        return None, None
    base = config_dir if config_dir is not None else Path(".")
    to_clients = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    to_clients.load_cert_chain(base / settings.tls_certificate, base / settings.tls_key)
    if settings.tls_server_ca:
        to_server = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(base / settings.tls_server_ca))
        to_server.check_hostname = bool(settings.tls_server_name)
    else:
        to_server = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        to_server.check_hostname = False
        to_server.verify_mode = ssl.CERT_NONE
    return to_clients, to_server


class SmtpGateway(TcpGateway):
    """The smtp gateway: a listener on G:g in front of a ``GatewayLayer``."""

    def __init__(self, layer: GatewayLayer, *, listen: Endpoint, settings: SmtpSettings, log: EventLog,
                 config_dir: Path | None = None, listen6: Endpoint | None = None) -> None:
        super().__init__(layer, listen=listen, log=log, listen6=listen6)
        self.settings = settings
        self.tls_to_clients, self.tls_to_server = tls_contexts(settings, config_dir)
        self.policy = policy_of(settings, tls_available=self.tls_to_clients is not None)
        self._sessions: set[_Session] = set()
        self._per_client: Counter[Any] = Counter()

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, gw: Manifest, listen: Endpoint, log: EventLog) -> "SmtpGateway":
        """The gateway as ``python -m gateways`` runs it: its settings from its manifest."""
        settings = SmtpSettings.model_validate(dict(gw.settings))
        listen6 = Endpoint(gw.listen6, listen.port) if gw.listen6 is not None else None
        return cls(layer, listen=listen, settings=settings, log=log, config_dir=Path(gw.config_dir), listen6=listen6)

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def buffered(self) -> int:
        """Bytes the live sessions hold (unsent, or read and not yet parsed), for the stats line."""
        return sum(session.buffered for session in self._sessions)

    async def _serve(self, sock: socket.socket) -> None:
        hold = await self._attach(sock)
        if hold is None:
            return
        with hold:
            flow = hold.flow
            address = client_group(flow.client.address, self.settings.client_prefix6)
            refusal = None
            if len(self._sessions) >= self.settings.max_sessions:
                refusal, why, limit = TOO_MANY_SESSIONS, "max_sessions", self.settings.max_sessions
            elif self._per_client[address] >= self.settings.max_sessions_per_client:
                refusal, why, limit = TOO_MANY_FROM_YOU, "max_sessions_per_client", self.settings.max_sessions_per_client
            if refusal is not None:
                self.counters[f"refused.{why}"] += 1
                self.log.emit("refused", logging.WARNING, reason=why, limit=limit, client=flow.client,
                              original_dst=flow.original_dst, server=flow.server, counted_as=address)
                with contextlib.suppress(OSError):
                    sock.send(refusal.wire())
                sock.close()
                return
            session = _Session(self, hold, sock)
            self._sessions.add(session)
            self._per_client[address] += 1
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
                self._per_client[address] -= 1
                if not self._per_client[address]:
                    del self._per_client[address]


def client_group(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix6: int) -> Any:
    """What ``max_sessions_per_client`` counts a client as: an IPv4 address itself; an IPv6
    address by its ``prefix6`` prefix, since one host may hold a whole /64 (RFC 4941, RFC 8981)."""
    if address.version == 4:
        return address
    return ipaddress.IPv6Network((address, prefix6), strict=False)


# Bytes read from a leg at a time: a whole pipelined group, or a good piece
# of a message's content for one pass of the content reader.
READ_SIZE = 1 << 16


class _Leg:
    """One TCP leg of a session on its socket, driven by the loop's readiness callbacks.

    What it reads goes to the session; what the session writes is sent at
    once, and what the kernel does not take waits in ``unsent`` (past
    the ``buffer_high_water`` setting the other leg is not read until it drains). No transport
    and no task: a session costs two sockets, two callbacks and the core.
    In terminate mode the leg hands its socket to an asyncio transport for
    TLS (``to_transport``) and goes on through ``_TlsProtocol``."""

    __slots__ = ("session", "sock", "fd", "client", "unsent", "reading", "writing", "throttled", "ended", "open",
                 "shut", "closing", "transport", "gone", "_loop")

    def __init__(self, session: "_Session", sock: socket.socket, client: bool) -> None:
        self.session = session
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.unsent = bytearray()
        self.reading = False
        self.writing = False
        self.throttled = False  # unsent passed buffer_high_water: neither leg is read (_Session.backpressure)
        self.ended = False  # the peer's FIN (or an error) was read: nothing more to read
        self.open = True  # the socket is ours to use and close
        self.shut = False  # write_eof asked: shut the write side once unsent is out
        self.closing = False  # close asked: close once unsent is out
        self.transport: asyncio.Transport | None = None  # terminate mode, after STARTTLS
        self.gone: asyncio.Future[None] | None = None  # set when a close waits for unsent
        self._loop = asyncio.get_running_loop()

    # ---- reading -----------------------------------------------------------------------------

    def resume_reading(self) -> None:
        if self.transport is not None:
            if not self.transport.is_closing():
                self.transport.resume_reading()
        elif self.open and not self.reading and not self.ended and not self.closing:
            self.reading = True
            self._loop.add_reader(self.fd, self._readable)

    def pause_reading(self) -> None:
        if self.transport is not None:
            if not self.transport.is_closing():
                self.transport.pause_reading()
        elif self.reading:
            self.reading = False
            self._loop.remove_reader(self.fd)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.ended = True
            self.pause_reading()
            self.session.lost(self, exc)
            return
        if not data:
            self.ended = True
            self.pause_reading()
            self.session.eof(self)
            return
        self.session.received(self, data)

    # ---- writing -----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        if self.transport is not None:
            return self.transport.get_write_buffer_size()
        return len(self.unsent)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            return
        if not self.open or self.shut or self.closing:
            return
        if not self.unsent:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.session.lost(self, exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self.writing = True
            self._loop.add_writer(self.fd, self._writable)
        self.unsent += data
        if not self.throttled and len(self.unsent) >= self.session.gw.settings.buffer_high_water:
            self.throttled = True
            self.session.backpressure(self, True)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._stop_writing()
            if self.closing:
                self._finish()
            else:
                self.session.lost(self, exc)
            return
        del self.unsent[:sent]
        if self.throttled and len(self.unsent) < self.session.gw.settings.buffer_high_water // 4:
            self.throttled = False
            if not self.closing:
                self.session.backpressure(self, False)
        if not self.unsent:
            self._stop_writing()
            if self.closing:
                self._finish()
            elif self.shut:
                self._shutdown()

    def _stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self._loop.remove_writer(self.fd)

    # ---- the end -----------------------------------------------------------------------------

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof() if self.transport is not None else self.open

    def write_eof(self) -> None:
        """Half-close after what is unsent (passthrough mode passes a FIN on)."""
        if self.transport is not None:
            self.transport.write_eof()
        elif self.open and not self.shut:
            self.shut = True
            if not self.unsent:
                self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> asyncio.Future[None] | None:
        """Close once what is unsent is out; a future for that, or None if closed already."""
        if self.transport is not None:
            self.transport.close()
            if self.gone is None:
                self.gone = self._loop.create_future()
            return None if self.gone.done() else self.gone
        if not self.open:
            return None
        self.pause_reading()
        if not self.unsent:
            self._finish()
            return None
        self.closing = True
        self.gone = self._loop.create_future()
        return self.gone

    def abort(self) -> None:
        """Close at once with RST: what a TCP peer sees when a connection is aborted."""
        if self.transport is not None:
            arm_reset(self.transport.get_extra_info("socket"))
            self.transport.abort()
            return
        if self.open:
            arm_reset(self.sock)
            self._finish()

    def _finish(self) -> None:
        self.pause_reading()
        self._stop_writing()
        self.open = False
        self.unsent.clear()
        self.sock.close()
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)

    # ---- TLS (terminate mode) ----------------------------------------------------------------

    async def to_transport(self) -> asyncio.Transport:
        """Hand the socket to an asyncio transport, for ``loop.start_tls``."""
        self.pause_reading()
        self._stop_writing()
        pending, self.unsent = bytes(self.unsent), bytearray()
        self.open = False  # the transport owns the socket from here
        transport, _ = await self._loop.connect_accepted_socket(lambda: _TlsProtocol(self), sock=self.sock)
        if pending:
            transport.write(pending)
        self.transport = transport
        return transport


class _TlsProtocol(asyncio.Protocol):
    """A leg's protocol once its socket is an asyncio transport (terminate mode, after STARTTLS)."""

    def __init__(self, leg: _Leg) -> None:
        self.leg = leg

    def data_received(self, data: bytes) -> None:
        self.leg.session.received(self.leg, data)

    def eof_received(self) -> bool:
        self.leg.session.eof(self.leg)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        leg = self.leg
        if leg.gone is None:
            leg.gone = asyncio.get_running_loop().create_future()
        if not leg.gone.done():
            leg.gone.set_result(None)
        if exc is not None:
            leg.session.lost(leg, exc)
        else:
            leg.session.eof(leg)

    def pause_writing(self) -> None:
        self.leg.session.backpressure(self.leg, True)

    def resume_writing(self) -> None:
        self.leg.session.backpressure(self.leg, False)


class _Session:
    """One SMTP session: two legs and the core between them."""

    def __init__(self, gw: SmtpGateway, hold: Hold, sock: socket.socket) -> None:
        self.gw = gw
        self.hold = hold
        self.flow: FlowInfo = hold.flow
        self.sock = sock
        self.core = SmtpRelay(gw.policy)
        self.a: _Leg | None = None
        self.b: _Leg | None = None
        self.opaque = False
        self.reason = ""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last = 0.0
        self._eofs: set[bool] = set()  # opaque: the legs that sent FIN
        self._throttled: set[bool] = set()  # the legs with too much unsent (by leg.client)
        self._more_soon = False  # a call of the core's ``more`` is scheduled
        self._reset = False
        self._timers: list[asyncio.TimerHandle] = []
        self._tls: asyncio.Task[None] | None = None
        # Every line of the session carries these; rendered once, not per line.
        self._tag = {"session": f"{self.flow.flow_id:#x}", "client": str(self.flow.client),
                     "original_dst": str(self.flow.original_dst), "server": str(self.flow.server)}

    @property
    def buffered(self) -> int:
        """Bytes this session holds: unsent on either leg, and the core's unread input."""
        return sum(leg.buffered for leg in (self.a, self.b) if leg is not None) + self.core.buffered

    async def run(self) -> None:
        gw, loop = self.gw, asyncio.get_running_loop()
        started = loop.time()
        gw.counters["sessions.opened"] += 1
        detail: dict[str, str] = {}
        try:
            try:
                # Leg B's SYN goes out first: the open line and the rest are
                # done while the processor and the server answer it.
                b = gw.layer.start_tcp(self.flow)
                gw.log.emit("open", **self._tag)
                _nodelay(self.sock)
                await gw.layer.connected(b, connect_timeout=gw.settings.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self.reason, detail = "connect_failed", {"detail": repr(exc)}  # in the one close line below
                with contextlib.suppress(OSError):
                    self.sock.send(NO_SERVER.wire())
                self.sock.close()
                return
            _nodelay(b)
            self.a, self.b = _Leg(self, self.sock, True), _Leg(self, b, False)
            self._last = loop.time()
            self._timers.append(loop.call_later(gw.settings.idle_timeout, self._idle))
            self._timers.append(loop.call_later(gw.settings.session_timeout, self._expired, "session"))
            # The processor ended the flow (its binding is gone): nothing more can pass.
            self.hold.notify(lambda cause: self._end("flow_end", reset=True))
            if not self.done.done():
                self.backpressure(self.a, False)  # both legs read
            await self.done
            await self._flush_close()
        except asyncio.CancelledError:
            self.reason = self.reason or "shutdown"
            self._abort()
            raise
        finally:
            for t in self._timers:
                t.cancel()
            if self._tls is not None:
                self._tls.cancel()
            gw.counters[f"sessions.closed.{self.reason or 'error'}"] += 1
            gw.log.emit("close", logging.WARNING if detail else logging.INFO, reason=self.reason or "error",
                        messages=self.core.delivered, duration=round(loop.time() - started, 3), **detail, **self._tag)

    # ---- from the legs -------------------------------------------------------------------

    def _other(self, leg: _Leg) -> _Leg:
        return self.b if leg is self.a else self.a  # type: ignore[return-value]

    def received(self, leg: _Leg, data: bytes) -> None:
        self._last = time.monotonic()  # the loop's clock (asyncio's loop.time), without the loop
        if self.opaque:
            self._other(leg).write(data)
            return
        self._do(self.core.client_data(data) if leg is self.a else self.core.server_data(data))

    def eof(self, leg: _Leg) -> None:
        if self.done.done():
            return
        if self.opaque:  # half-close passes through; both halves closed end the session
            self._eofs.add(leg.client)
            other = self._other(leg)
            if other.can_write_eof():
                with contextlib.suppress(OSError):
                    other.write_eof()
            if len(self._eofs) == 2:
                self._end("eof")
            return
        if self.core.closed:
            self._end("closed")
            return
        self._do(self.core.client_eof() if leg is self.a else self.core.server_eof())

    def lost(self, leg: _Leg, exc: Exception) -> None:
        """A leg failed (a reset, a send that cannot go): the session ends, both legs reset."""
        if not self.done.done():
            self._end("client_reset" if leg is self.a else "server_reset", reset=True)

    def backpressure(self, leg: _Leg, paused: bool) -> None:
        """A leg has too much unsent (or has drained): read neither leg until
        no leg has. Both, because either side's input can make output for
        either (a server's replies go to the client, but so do the gateway's
        own answers to the client's commands, and a reply frees pipelined
        commands for the server)."""
        (self._throttled.add if paused else self._throttled.discard)(leg.client)
        for each in (self.a, self.b):
            if each is not None:
                (each.pause_reading if self._throttled else each.resume_reading)()
        if not self._throttled and self.core.wants_more:
            self._read_on()

    # ---- the core's outputs ----------------------------------------------------------------

    def _do(self, outputs: list[Output]) -> None:
        gw = self.gw
        for out in outputs:
            kind = type(out)
            if kind is ToClient:
                self.a.write(out.data)  # type: ignore[union-attr, attr-defined]
            elif kind is ToServer:
                self.b.write(out.data)  # type: ignore[union-attr, attr-defined]
            elif kind is Event:
                name = out.name  # type: ignore[attr-defined]
                gw.counters[name] += 1
                if name.startswith(_LOGGED):
                    level = logging.WARNING if name.startswith("refused.") else logging.INFO
                    gw.log.emit(name, level, **out.fields, **self._tag)  # type: ignore[attr-defined]
                elif name == "message.accepted":
                    gw.counters["bytes.messages"] += int(out.fields.get("size", 0))  # type: ignore[attr-defined]
            elif kind is Opaque:
                self.opaque = True
            elif kind is StartTls:
                self._tls = asyncio.ensure_future(self._start_tls(out.reply))  # type: ignore[attr-defined]
            elif kind is Close:
                self._end(out.reason)  # type: ignore[attr-defined]
        if self.core.wants_more and not self._throttled:
            self._read_on()

    def _read_on(self) -> None:
        """The core left pipelined commands for later (``SmtpRelay.more``): a
        turn of the loop later, once what it wrote has had a chance to go."""
        if not self._more_soon:
            self._more_soon = True
            asyncio.get_running_loop().call_soon(self._more)

    def _more(self) -> None:
        self._more_soon = False
        if not self.done.done() and not self._throttled:
            self._do(self.core.more())

    async def _start_tls(self, reply: bytes) -> None:
        loop = asyncio.get_running_loop()
        gw = self.gw
        assert gw.tls_to_server is not None and gw.tls_to_clients is not None
        assert self.a is not None and self.b is not None
        name = gw.settings.tls_server_name or None
        leg = "server"
        try:
            b = await self.b.to_transport()
            self.b.transport = await loop.start_tls(b, b.get_protocol(), gw.tls_to_server,  # type: ignore[assignment]
                                                    server_hostname=name,
                                                    ssl_handshake_timeout=gw.settings.connect_timeout)
            leg = "client"
            a = await self.a.to_transport()
            a.write(reply)
            self.a.transport = await loop.start_tls(a, a.get_protocol(), gw.tls_to_clients,  # type: ignore[assignment]
                                                    server_side=True, ssl_handshake_timeout=gw.settings.connect_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            self._do(self.core.tls_failed(repr(exc), leg))
            return
        self._do(self.core.tls_started())

    def _expired(self, what: str) -> None:
        if self.opaque:
            self._end(f"{what}_timeout")
        else:
            self._do(self.core.expired(what))

    def _idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.gw.settings.idle_timeout
        remaining = self._last + idle - loop.time()
        if remaining > 0:
            self._timers.append(loop.call_later(remaining, self._idle))
            return
        self._expired("idle")

    # ---- the end -----------------------------------------------------------------------------

    def _end(self, reason: str, *, reset: bool = False) -> None:
        if self.done.done():
            return
        self.reason = reason
        self._reset = reset
        self.done.set_result(None)

    def _abort(self) -> None:
        if self.a is None:
            reset_socket(self.sock)
            return
        for leg in (self.a, self.b):
            if leg is not None:
                leg.abort()

    async def _flush_close(self) -> None:
        """Close both legs after what is unsent for them is out; a peer that
        does not read gets ``CLOSE_FLUSH_TIMEOUT``, then a reset."""
        if self._reset:
            self._abort()
            return
        waits = [w for w in (self.a.close(), self.b.close()) if w is not None]  # type: ignore[union-attr]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=CLOSE_FLUSH_TIMEOUT)
            if pending:
                self._abort()
