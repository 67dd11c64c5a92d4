"""The ``smtp`` gateway kind: the asyncio adapter around ``SmtpRelay`` (docs/smtp.md).

It makes no protocol decision (STYLE.md): it carries out what the core
says. Per accepted connection F:f -> G:g:

1. ``GatewayLayer.attach``: the original tuple (client C:c, original
   destination S':s', server S:s), or a reset. Every log line of the
   session carries it (issue 10: "every decision logged with the original
   tuple").
2. ``max_sessions`` and ``max_sessions_per_client`` (by the client's real
   address, from signalling): past either, the client gets 421 and the
   server is never contacted.
3. Leg B to the server through F:f; then the two legs are asyncio
   ``Protocol`` objects feeding the core, and the core's outputs are
   written at once, one write per batch.

Speed (issue 10, item 3): ``TCP_NODELAY`` on both legs, so a reply or a
command line leaves at once instead of waiting for the peer's delayed ACK
(the ~40 ms per reply the user-mode anchor proxsmtpd loses); no task or
stream per read, only callbacks; the content is handled a chunk at a time
(``data``). Backpressure: when one leg's write buffer passes asyncio's high
mark, the other leg stops being read until it drains.

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
import logging
import socket
import ssl
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
                 config_dir: Path | None = None) -> None:
        super().__init__(layer, listen=listen, log=log)
        self.settings = settings
        self.tls_to_clients, self.tls_to_server = tls_contexts(settings, config_dir)
        self.policy = policy_of(settings, tls_available=self.tls_to_clients is not None)
        self._sessions: set[_Session] = set()
        self._per_client: Counter[Any] = Counter()

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, gw: Manifest, listen: Endpoint, log: EventLog) -> "SmtpGateway":
        """The gateway as ``python -m gateways`` runs it: its settings from its manifest."""
        settings = SmtpSettings.model_validate(dict(gw.settings))
        return cls(layer, listen=listen, settings=settings, log=log, config_dir=Path(gw.config_dir))

    @property
    def active(self) -> int:
        return len(self._sessions)

    async def _serve(self, sock: socket.socket) -> None:
        hold = await self._attach(sock)
        if hold is None:
            return
        with hold:
            flow = hold.flow
            address = flow.client.address
            refusal = None
            if len(self._sessions) >= self.settings.max_sessions:
                refusal, why, limit = TOO_MANY_SESSIONS, "max_sessions", self.settings.max_sessions
            elif self._per_client[address] >= self.settings.max_sessions_per_client:
                refusal, why, limit = TOO_MANY_FROM_YOU, "max_sessions_per_client", self.settings.max_sessions_per_client
            if refusal is not None:
                self.counters[f"refused.{why}"] += 1
                self.log.emit("refused", logging.WARNING, reason=why, limit=limit, client=flow.client,
                              original_dst=flow.original_dst, server=flow.server)
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


class _Leg(asyncio.Protocol):
    """One TCP leg of a session; what it reads goes to the session."""

    __slots__ = ("session", "client", "transport", "gone")

    def __init__(self, session: "_Session", client: bool) -> None:
        self.session = session
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.session.received(self, data)

    def eof_received(self) -> bool:
        self.session.eof(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.lost(self, exc)

    def pause_writing(self) -> None:
        self.session.backpressure(self, True)

    def resume_writing(self) -> None:
        self.session.backpressure(self, False)


class _Session:
    """One SMTP session: two legs and the core between them."""

    def __init__(self, gw: SmtpGateway, hold: Hold, sock: socket.socket) -> None:
        self.gw = gw
        self.hold = hold
        self.flow: FlowInfo = hold.flow
        self.sock = sock
        self.core = SmtpRelay(gw.policy)
        self.a = _Leg(self, True)
        self.b = _Leg(self, False)
        self.opaque = False
        self.reason = ""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last = 0.0
        self._eofs: set[bool] = set()  # opaque: the legs that sent FIN
        self._reset = False
        self._timers: list[asyncio.TimerHandle] = []
        self._tls: asyncio.Task[None] | None = None
        # Every line of the session carries these; rendered once, not per line.
        self._tag = {"session": f"{self.flow.flow_id:#x}", "client": str(self.flow.client),
                     "original_dst": str(self.flow.original_dst), "server": str(self.flow.server)}

    async def run(self) -> None:
        gw, loop = self.gw, asyncio.get_running_loop()
        started = loop.time()
        gw.counters["sessions.opened"] += 1
        gw.log.emit("open", **self._tag)
        _nodelay(self.sock)
        try:
            try:
                b = await gw.layer.connect_tcp(self.flow, connect_timeout=gw.settings.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self.reason = "connect_failed"
                gw.log.emit("close", logging.WARNING, reason=self.reason, detail=repr(exc), **self._tag)
                with contextlib.suppress(OSError):
                    self.sock.send(NO_SERVER.wire())
                self.sock.close()
                return
            _nodelay(b)
            await loop.connect_accepted_socket(lambda: self.a, sock=self.sock)
            await loop.create_connection(lambda: self.b, sock=b)
            self._last = loop.time()
            self._timers.append(loop.call_later(gw.settings.idle_timeout, self._idle))
            self._timers.append(loop.call_later(gw.settings.session_timeout, self._expired, "session"))
            # The processor ended the flow (its binding is gone): nothing more can pass.
            self.hold.notify(lambda cause: self._end("flow_end", reset=True))
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
            gw.log.emit("close", reason=self.reason or "error", messages=self.core.delivered,
                        duration=round(loop.time() - started, 3), **self._tag)

    # ---- from the legs -------------------------------------------------------------------

    def received(self, leg: _Leg, data: bytes) -> None:
        self._last = asyncio.get_running_loop().time()
        if self.opaque:
            other = self.b if leg is self.a else self.a
            if other.transport is not None:
                other.transport.write(data)
            return
        self._do(self.core.client_data(data) if leg is self.a else self.core.server_data(data))

    def eof(self, leg: _Leg) -> None:
        if self.opaque:  # half-close passes through; both halves closed end the session
            self._eofs.add(leg.client)
            other = self.b if leg is self.a else self.a
            if other.transport is not None and other.transport.can_write_eof():
                with contextlib.suppress(OSError):
                    other.transport.write_eof()
            if len(self._eofs) == 2:
                self._end("eof")
            return
        self._do(self.core.client_eof() if leg is self.a else self.core.server_eof())

    def lost(self, leg: _Leg, exc: Exception | None) -> None:
        if not leg.gone.done():
            leg.gone.set_result(None)
        if self.done.done():
            return
        if exc is not None:
            self._end("client_reset" if leg is self.a else "server_reset", reset=True)
        elif self.opaque or self.core.closed:
            self._end("closed")
        else:
            self._do(self.core.client_eof() if leg is self.a else self.core.server_eof())

    def backpressure(self, leg: _Leg, paused: bool) -> None:
        other = self.b if leg is self.a else self.a
        if other.transport is not None and not other.transport.is_closing():
            (other.transport.pause_reading if paused else other.transport.resume_reading)()

    # ---- the core's outputs ----------------------------------------------------------------

    def _do(self, outputs: list[Output]) -> None:
        gw = self.gw
        for out in outputs:
            if isinstance(out, ToClient):
                if self.a.transport is not None:
                    self.a.transport.write(out.data)
            elif isinstance(out, ToServer):
                if self.b.transport is not None:
                    self.b.transport.write(out.data)
            elif isinstance(out, Event):
                gw.counters[out.name] += 1
                if out.name.startswith(_LOGGED):
                    level = logging.WARNING if out.name.startswith("refused.") else logging.INFO
                    gw.log.emit(out.name, level, **out.fields, **self._tag)
                elif out.name == "message.accepted":
                    gw.counters["bytes.messages"] += int(out.fields.get("size", 0))
            elif isinstance(out, Opaque):
                self.opaque = True
            elif isinstance(out, StartTls):
                self._tls = asyncio.ensure_future(self._start_tls(out.reply))
            elif isinstance(out, Close):
                self._end(out.reason)

    async def _start_tls(self, reply: bytes) -> None:
        loop = asyncio.get_running_loop()
        gw = self.gw
        assert gw.tls_to_server is not None and gw.tls_to_clients is not None
        name = gw.settings.tls_server_name or None
        leg = "server"
        try:
            assert self.a.transport is not None and self.b.transport is not None
            self.b.transport = await loop.start_tls(self.b.transport, self.b, gw.tls_to_server,  # type: ignore[assignment]
                                                    server_hostname=name,
                                                    ssl_handshake_timeout=gw.settings.connect_timeout)
            leg = "client"
            self.a.transport.write(reply)
            self.a.transport = await loop.start_tls(self.a.transport, self.a, gw.tls_to_clients,  # type: ignore[assignment]
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
        for leg in (self.a, self.b):
            if leg.transport is not None:
                arm_reset(leg.transport.get_extra_info("socket"))
                leg.transport.abort()
        if self.a.transport is None:
            reset_socket(self.sock)

    async def _flush_close(self) -> None:
        """Close both legs after what is buffered for them is sent; a peer that
        does not read gets ``CLOSE_FLUSH_TIMEOUT``, then a reset."""
        if self._reset:
            self._abort()
            return
        legs = [leg for leg in (self.a, self.b) if leg.transport is not None]
        for leg in legs:
            leg.transport.close()  # type: ignore[union-attr]
        gone = [leg.gone for leg in legs]
        if gone:
            _, pending = await asyncio.wait(gone, timeout=CLOSE_FLUSH_TIMEOUT)
            if pending:
                self._abort()
