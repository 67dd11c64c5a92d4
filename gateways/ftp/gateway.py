"""The ``ftp`` gateway kind: the asyncio adapter around ``FtpControl`` (docs/ftp.md).

It makes no protocol decision (STYLE.md): it carries out what the core says.
Everything arrives on one listener G:g, because a REDIRECT rule sends its
data connection into the gateway that asked for it (firewall/processor/
rulebook.py). So, per accepted connection F:f -> G:g:

1. ``GatewayLayer.attach``: the original tuple (client C:c, original
   destination S':s', server S:s), or a reset.
2. If (C, S':s') is a data connection this gateway expects (a REDIRECT rule
   it asked for), it is relayed (``gateways.relay``, with ``data``'s core:
   inspection in inspect mode); the expectation is used up.
3. Else, if s' is one of the gateway's selector ports, it is a control
   session: leg B to the server, and the core between the two legs. The
   core's ``RequestRule`` becomes ``GatewayLayer.request_rule`` (exact
   addresses, one-shot, ``data_rule_ttl``), and the core hears the answer.
4. Anything else is reset and counted (``refused.unexpected_flow``).

Rules end by themselves: when used (one-shot), at their TTL, or when the
control connection's binding ends (RULE_END FLOW_ENDED); the gateway's own
expectations end with them, and with the session.

Who the server sees as the client (for PORT/EPRT) comes from signalling:
the flow's ``snat`` W:w when the processor SNATs the session (a masqueraded
to-zone), else the client's own address (docs/ftp.md, "Active mode behind
masquerade").

In allow mode every data connection is an ALLOW rule: the kernel carries it,
and no expectation is kept here; where the peer that connects was told the
router's address, the processor installs the DNAT to the real party with
the accept. In inspect mode it is a REDIRECT, expected here and relayed.

A translated data connection (``data_mode = "active"``: the client passive,
the server active) is two REDIRECTs that share a ``pair``: both peers
connect to the gateway, the client to S':p, the server to C:p (or W:p), and
the first to arrive waits (at most the rule's TTL) for the other; then the
two accepted connections are relayed to each other, with no leg B. The
reverse (``data_mode = "passive"``: the client active, the server passive)
is two ORIGINATE rules sharing a ``pair``: once both are granted the
gateway connects to the client's C:q, then to the server's S:p
(``open_pair``), and relays the two; the processor makes each leave the
router as the address its peer expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any

from firewall.signalling import Endpoint, FlowInfo, Proto, RuleEndReason, RuleMode
from gateways.ftp.core import (
    Close,
    Direction,
    Event,
    FtpControl,
    Opaque,
    Output,
    Parties,
    Policy,
    RequestRule,
    ToClient,
    ToServer,
)
from gateways.ftp.data import ContentHook, Transfer, data_core, load_hook, transferred
from gateways.manifest import Manifest
from gateways.layer import EventLog, GatewayLayer, Hold, RuleError
from gateways.relay import RelayCore, reset_socket
from gateways.ftp.kind import FtpSettings
from gateways.tcp_server import CLOSE_FLUSH_TIMEOUT, TcpGateway, reset

CONTROL_CHUNK = 1 << 14  # control lines are short; a read never needs more

# How long an expectation outlives its rule's TTL: the RULE_END USED of a
# REDIRECT can overtake the connection's accept by a few milliseconds.
EXPECT_GRACE = 5.0


# Which events are worth a log line of their own (the rest are only counted).
_LOGGED = ("refused.", "rule.", "data.", "auth_tls.")


def parties_of(flow: FlowInfo) -> Parties:
    """The session's parties from its signalled tuple: the server sees the client as
    the processor's SNAT address when there is one, else as itself."""
    seen_as = flow.snat.address if flow.snat is not None else flow.client.address
    return Parties(flow.client.address, flow.server.address, flow.original_dst.address, seen_as)


ExpectKey = tuple[ipaddress.IPv4Address, Endpoint]  # (source address, destination) of a data connection


class _Expectation:
    __slots__ = ("key", "session", "rule", "timer")

    def __init__(self, key: ExpectKey, session: "_Session", rule: RequestRule) -> None:
        self.key = key
        self.session = session
        self.rule = rule
        self.timer: asyncio.TimerHandle | None = None


class _Meeting:
    """The two connections of a translated data connection, meeting in the gateway."""

    __slots__ = ("sides", "done")

    def __init__(self) -> None:
        self.sides: dict[Direction, tuple[Hold, socket.socket]] = {}
        self.done = asyncio.Event()


class FtpGateway(TcpGateway):
    """The ftp gateway: a listener on G:g in front of a ``GatewayLayer``."""

    def __init__(
        self,
        layer: GatewayLayer,
        *,
        listen: Endpoint,
        settings: FtpSettings,
        log: EventLog,
        control_ports: frozenset[int] | None = None,
        hook: ContentHook | None = None,
        listen6: Endpoint | None = None,
    ) -> None:
        super().__init__(layer, listen=listen, log=log, listen6=listen6)
        self.settings = settings
        self.policy = Policy.of(settings)
        self.control_ports = control_ports  # None: every port is a control port (tests)
        self.hook = hook
        self._sessions: set[_Session] = set()
        self._data = 0
        self._expected: dict[ExpectKey, _Expectation] = {}
        self._meetings: dict[tuple[int, int], _Meeting] = {}  # (session flow id, pair) -> the first side
        self._opened: set[asyncio.Task[None]] = set()  # data_mode passive: pairs the gateway opened

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, gw: Manifest, listen: Endpoint, log: EventLog) -> "FtpGateway":
        """The gateway as ``python -m gateways`` runs it: settings and selector ports from its manifest,
        and G6 on the same port when its selectors take IPv6."""
        settings = FtpSettings.model_validate(gw.settings)
        ports = frozenset(p for t in gw.traffic for r in t.ports for p in range(r.first, r.last + 1))
        listen6 = Endpoint(gw.listen6, listen.port) if gw.listen6 is not None else None
        return cls(layer, listen=listen, settings=settings, log=log, control_ports=ports,
                   hook=load_hook(settings.content_hook), listen6=listen6)

    @property
    def active(self) -> int:
        """Control sessions and relayed data connections now open."""
        return len(self._sessions) + self._data

    @property
    def expected(self) -> int:
        """Data connections the gateway waits for (REDIRECT rules it holds)."""
        return len(self._expected)

    # ---- expectations ------------------------------------------------------------------------

    def _expect(self, session: "_Session", rule: RequestRule) -> _Expectation:
        key = (rule.src.address, rule.dst)
        old = self._expected.pop(key, None)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        exp = _Expectation(key, session, rule)
        self._expected[key] = exp
        delay = self.settings.data_rule_ttl + EXPECT_GRACE
        exp.timer = asyncio.get_running_loop().call_later(delay, self._unexpect, exp, "expired")
        return exp

    def _unexpect(self, exp: _Expectation, why: str) -> None:
        if self._expected.get(exp.key) is exp:
            del self._expected[exp.key]
            self.counters[f"expectations.ended.{why}"] += 1
        if exp.timer is not None:
            exp.timer.cancel()
            exp.timer = None

    def _claim(self, flow: FlowInfo) -> _Expectation | None:
        exp = self._expected.get((flow.client.address, flow.original_dst))
        if exp is None or exp.session.done:
            return None
        self._unexpect(exp, "used")
        return exp

    # ---- connections ---------------------------------------------------------------------------

    async def _serve(self, sock: socket.socket) -> None:
        hold = await self._attach(sock)
        if hold is None:
            return
        with hold:
            flow = hold.flow
            exp = self._claim(flow)
            if exp is not None and exp.rule.pair:
                await self._meet(exp, hold, sock)
            elif exp is not None:
                await self._transfer(exp, hold, sock)
            elif self.control_ports is not None and flow.original_dst.port not in self.control_ports:
                self.counters["refused.unexpected_flow"] += 1
                self.log.emit("refused", reason="unexpected_flow", client=flow.client, original_dst=flow.original_dst)
                reset_socket(sock)
            elif len(self._sessions) >= self.settings.max_sessions:
                self.counters["refused.max_sessions"] += 1
                self.log.emit("refused", reason="max_sessions", client=flow.client, limit=self.settings.max_sessions)
                reset_socket(sock)
            else:
                reader, writer = await asyncio.open_connection(sock=sock)
                session = _Session(self, hold, reader, writer)
                self._sessions.add(session)
                try:
                    await session.run()
                except BaseException:
                    reset(writer)  # the transport owns the socket now: it closes it, not the caller
                    raise
                finally:
                    self._sessions.discard(session)
                    for key in [k for k, e in self._expected.items() if e.session is session]:
                        self._unexpect(self._expected[key], "session_ended")

    async def _meet(self, exp: _Expectation, hold: Hold, sock: socket.socket) -> None:
        """One side of a translated data connection: wait for the other, or relay the two."""
        key = (exp.session.flow.flow_id, exp.rule.pair)
        meeting = self._meetings.setdefault(key, _Meeting())
        meeting.sides[exp.rule.direction] = (hold, sock)
        if len(meeting.sides) < 2:
            try:
                await asyncio.wait_for(meeting.done.wait(), self.settings.data_rule_ttl + EXPECT_GRACE)
            except asyncio.CancelledError:
                reset_socket(sock)
                raise
            except asyncio.TimeoutError:
                self.counters["data.unmatched"] += 1
                self.log.emit("data", reason="unmatched", session=f"{exp.session.flow.flow_id:#x}",
                              waited=exp.rule.direction.value)
                reset_socket(sock)
            finally:
                if self._meetings.get(key) is meeting and not meeting.done.is_set():
                    del self._meetings[key]
            return
        del self._meetings[key]
        try:
            client_hold, a = meeting.sides[Direction.PASSIVE]  # the client connected (PASV)
            _, b = meeting.sides[Direction.ACTIVE]  # the server connected (its PORT)
            await self._transfer(exp, client_hold, a, b)
        finally:
            meeting.done.set()

    async def _transfer(self, exp: _Expectation, hold: Hold, a: socket.socket, b: socket.socket | None = None) -> None:
        """One data connection of a session, redirected here by its rule."""
        flow, rule, session = hold.flow, exp.rule, exp.session
        self._data += 1
        self.counters["data.accepted"] += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        fields: dict[str, Any] = {"session": f"{session.flow.flow_id:#x}", "direction": rule.direction.value,
                                  "client": flow.client, "server": flow.server, "inspect": rule.inspect}
        translated = b is not None  # both peers connected to the gateway: a is the client's
        if translated:
            fields["translated"] = True
        try:
            if b is None:
                try:
                    b = await self.layer.connect_tcp(flow, connect_timeout=self.settings.connect_timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    self.counters["data.connect_failed"] += 1
                    self.log.emit("data", reason="connect_failed", detail=repr(exc), **fields)
                    reset_socket(a)
                    return
            passive = translated or rule.direction is Direction.PASSIVE
            await self._relay_data(session, a, b, hold, Transfer(rule.direction.value, session.parties.client,
                                                                 session.parties.server, flow),
                                   inspect=rule.inspect, passive=passive, started=started, fields=fields)
        finally:
            self._data -= 1

    async def _relay_data(self, session: "_Session", a: socket.socket, b: socket.socket, hold: Hold | None,
                          transfer: Transfer, *, inspect: bool, passive: bool, started: float,
                          fields: dict[str, Any]) -> None:
        """Relay one data connection's two legs (``a`` the client's), through the content
        hook when the rule inspects, and count and log how it ended."""
        loop = asyncio.get_running_loop()
        inspector = None
        if inspect and self.hook is not None:
            try:
                inspector = self.hook(transfer)
            except Exception as exc:  # a broken hook stops the transfer: nothing passes unchecked
                self.counters["data.hook_failed"] += 1
                self.log.emit("data", logging.ERROR, reason="hook_failed", detail=repr(exc), **fields)
                reset_socket(a)
                reset_socket(b)
                return
        core = data_core(loop.time(), passive=passive, inspector=inspector,
                         max_bytes=self.settings.max_transfer_bytes if inspect else 0,
                         idle_timeout=self.settings.idle_timeout)
        session.transfers.add(core)
        try:
            outcome = await self._relay_legs(core, a, b, hold)  # type: ignore[arg-type]
        finally:
            session.transfers.discard(core)
            session.touch()  # the control session's idle time runs from the transfer's end
        to_client, to_server = transferred(core, passive)
        self.counters[f"data.closed.{outcome.reason}"] += 1
        self.counters["bytes.data_to_client"] += to_client
        self.counters["bytes.data_to_server"] += to_server
        level = logging.WARNING if outcome.reason in ("limit", "hook") else logging.INFO
        detail = {"detail": outcome.detail} if outcome.detail else {}
        self.log.emit("data", level, reason=outcome.reason, to_client=to_client,
                      to_server=to_server, duration=loop.time() - started, **detail, **fields)


    def open_pair(self, session: "_Session", server_rule: RequestRule, client_rule: RequestRule) -> None:
        """``data_mode = "passive"``: both ORIGINATE rules of a pair are granted; open and join them."""
        task = asyncio.create_task(self._open_pair(session, server_rule, client_rule))
        self._opened.add(task)
        task.add_done_callback(self._opened.discard)

    async def _open_pair(self, session: "_Session", server_rule: RequestRule, client_rule: RequestRule) -> None:
        """Connect to the client's PORT, then to the server's passive port, and relay the two.

        The processor makes each leave the router as the address its peer
        expects (ORIGINATE, docs/signalling.md). The client's side first: the
        server sends a file as soon as its side is open, and would report it
        delivered (226) with the bytes still in the gateway. A client that
        does not accept within ``connect_timeout`` (at most half of
        ``data_rule_ttl``, so the server's rule is still there) gets nothing,
        and the server's side is never opened: the server sees what a
        passive client that never connects shows it, and fails the transfer
        after its own accept timeout (vsftpd: 425); the server's rule ends
        at its TTL. Opening it to reset it would race the server's write:
        a small file fits in the socket buffers and is reported delivered.
        """
        loop = asyncio.get_running_loop()
        wait = min(self.settings.connect_timeout, self.settings.data_rule_ttl / 2)

        async def connect(to: Endpoint) -> socket.socket:
            # An IPv6 session's from G6, by the gateway namespace's IPv6 default route.
            sock = socket.socket(socket.AF_INET6 if to.address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (str(to.address), to.port)), wait)
            except BaseException:
                reset_socket(sock)
                raise
            return sock

        fields: dict[str, Any] = {"session": f"{session.flow.flow_id:#x}", "client": client_rule.dst,
                                  "server": server_rule.dst, "inspect": client_rule.inspect, "opened": True}
        try:
            a = await connect(client_rule.dst)  # the client's
        except (OSError, asyncio.TimeoutError) as exc:
            self.counters["data.connect_failed"] += 1
            self.log.emit("data", reason="connect_failed", detail=repr(exc), waited="client", **fields)
            return
        try:
            b = await connect(server_rule.dst)  # the server's
        except (OSError, asyncio.TimeoutError) as exc:
            self.counters["data.connect_failed"] += 1
            self.log.emit("data", reason="connect_failed", detail=repr(exc), waited="server", **fields)
            reset_socket(a)
            return
        except BaseException:
            reset_socket(a)
            raise
        self._data += 1
        self.counters["data.accepted"] += 1
        started = loop.time()
        try:
            await self._relay_data(session, a, b, None, Transfer(Direction.ACTIVE.value, session.parties.client,
                                                                 session.parties.server, session.flow),
                                   inspect=client_rule.inspect, passive=True, started=started, fields=fields)
        finally:
            self._data -= 1


class _Session:
    """One control connection: two legs and the core between them."""

    def __init__(self, gw: FtpGateway, hold: Hold, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gw = gw
        self.hold = hold
        self.flow = hold.flow
        self.parties = parties_of(self.flow)
        self.core = FtpControl(self.parties, gw.policy)
        self.a_reader, self.a_writer = reader, writer
        self.b_writer: asyncio.StreamWriter | None = None
        self.done = False
        self.reason = ""
        self._closing = asyncio.Event()
        self._rule_tasks: set[asyncio.Task[None]] = set()
        self._last = asyncio.get_running_loop().time()
        self._reset = False
        # Its data connections now relayed: while bytes move on them, the
        # control connection is quiet but not idle.
        self.transfers: set[RelayCore] = set()
        # data_mode passive: the granted ORIGINATE rule of each pair, until its other side's
        self._originated: dict[int, RequestRule] = {}

    def touch(self) -> None:
        self._last = asyncio.get_running_loop().time()

    def last_activity(self) -> float:
        return max([self._last, *(core.last for core in self.transfers)])

    async def run(self) -> None:
        gw, flow = self.gw, self.flow
        loop = asyncio.get_running_loop()
        started = loop.time()
        gw.counters["sessions.opened"] += 1
        ident = f"{flow.flow_id:#x}"
        gw.log.emit("open", session=ident, client=flow.client, original_dst=flow.original_dst,
                    server=flow.server, client_seen_as=self.parties.client_seen_as)
        try:
            try:
                b_reader, self.b_writer = await gw.layer.open_tcp(flow, connect_timeout=gw.settings.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self.reason = "connect_failed"
                gw.log.emit("close", session=ident, reason=self.reason, detail=repr(exc))
                reset(self.a_writer)
                return
            await self._serve(b_reader)
        finally:
            self.done = True
            for task in self._rule_tasks:
                task.cancel()
            if self._rule_tasks:
                await asyncio.gather(*self._rule_tasks, return_exceptions=True)
            gw.counters[f"sessions.closed.{self.reason or 'error'}"] += 1
            if self.b_writer is not None:
                gw.log.emit("close", session=ident, reason=self.reason or "error", duration=loop.time() - started)

    async def _serve(self, b_reader: asyncio.StreamReader) -> None:
        assert self.b_writer is not None
        core = self.core
        pumps = {
            asyncio.create_task(self._pump(self.a_reader, core.client_data, core.client_eof, "client")),
            asyncio.create_task(self._pump(b_reader, core.server_data, core.server_eof, "server")),
        }
        watchers = {
            asyncio.create_task(self._closing.wait()),
            asyncio.create_task(self.hold.ended.wait()),
            asyncio.create_task(self._idle()),
        }
        pending = pumps | watchers
        try:
            while not self._closing.is_set() and pumps & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if self.hold.ended.is_set() and not self._closing.is_set():
                    self._end("flow_end", reset=True)
                for task in done & pumps:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        except BaseException:
            self.reason = self.reason or ("shutdown" if asyncio.current_task().cancelling() else "error")  # type: ignore[union-attr]
            self._reset = True
            raise
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._close_legs()

    async def _pump(self, reader: asyncio.StreamReader, feed: Any, eof: Any, peer: str) -> None:
        while not self._closing.is_set():
            try:
                data = await reader.read(CONTROL_CHUNK)
            except OSError:
                self._end(f"{peer}_reset", reset=True)
                return
            if not data:
                await self._do(eof())
                return
            self.touch()
            await self._do(feed(data))

    async def _idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.gw.settings.idle_timeout
        while (remaining := self.last_activity() + idle - loop.time()) > 0:
            await asyncio.sleep(remaining)
        self.gw.log.emit("idle", session=f"{self.flow.flow_id:#x}", seconds=idle)
        await self._do([ToClient(b"421 Idle timeout; closing.\r\n"), Close("idle")])

    def _end(self, reason: str, *, reset: bool = False) -> None:
        if not self._closing.is_set():
            self.reason = reason
            self._reset = reset
            self._closing.set()

    async def _do(self, outputs: list[Output]) -> None:
        """Carry out the core's outputs, in order."""
        assert self.b_writer is not None
        gw = self.gw
        for out in outputs:
            if isinstance(out, ToClient):
                self.a_writer.write(out.data)
            elif isinstance(out, ToServer):
                self.b_writer.write(out.data)
            elif isinstance(out, RequestRule):
                task = asyncio.create_task(self._request(out))
                self._rule_tasks.add(task)
                task.add_done_callback(self._rule_tasks.discard)
            elif isinstance(out, Event):
                gw.counters[out.name] += 1
                if out.name.startswith(_LOGGED):
                    level = logging.WARNING if out.name.startswith("refused.") else logging.INFO
                    gw.log.emit(out.name, level, session=f"{self.flow.flow_id:#x}", **out.fields)
            elif isinstance(out, Opaque):
                self.a_writer.write(out.to_client)
                self.b_writer.write(out.to_server)
            elif isinstance(out, Close):
                self._end(out.reason.replace(" ", "_"))
        for w in (self.a_writer, self.b_writer):
            try:
                await w.drain()
            except OSError:
                self._end("client_reset" if w is self.a_writer else "server_reset", reset=True)
                return

    async def _request(self, rule: RequestRule) -> None:
        gw = self.gw
        exp = gw._expect(self, rule) if rule.mode is RuleMode.REDIRECT else None
        ttl = gw.settings.data_rule_ttl

        def ended(reason: RuleEndReason) -> None:
            gw.counters[f"rules.ended.{reason.name.lower()}"] += 1
            if exp is not None and reason is not RuleEndReason.USED:
                gw._unexpect(exp, reason.name.lower())

        try:
            # replaces: only the latest data-port command's rule may exist (a second
            # PASV withdraws the first one's port, RULE_END SUPERSEDED).
            await gw.layer.request_rule(self.flow, Proto.TCP, rule.src, rule.dst, ttl, rule.mode, True, on_end=ended,
                                        replaces=rule.replaces)
            granted = True
        except RuleError as exc:
            granted = False
            gw.counters["rules.not_granted"] += 1
            gw.log.emit("rule.not_granted", logging.WARNING, session=f"{self.flow.flow_id:#x}",
                        src=rule.src, dst=rule.dst, why=str(exc))
            if exp is not None:
                gw._unexpect(exp, "refused")
        if granted and rule.mode is RuleMode.ORIGINATE:
            other = self._originated.pop(rule.pair, None)
            if other is None:
                self._originated = {rule.pair: rule}  # only the latest pair: a newer PORT supersedes
            elif not self._closing.is_set():
                server_rule, client_rule = (other, rule) if other.direction is Direction.PASSIVE else (rule, other)
                gw.open_pair(self, server_rule, client_rule)
        if not self._closing.is_set():
            await self._do(self.core.rule_answered(rule.token, granted))

    async def _close_legs(self) -> None:
        writers = [w for w in (self.a_writer, self.b_writer) if w is not None]
        if self._reset:
            for w in writers:
                reset(w)
            return
        for w in writers:
            with contextlib.suppress(OSError):
                w.close()
        for w in writers:
            try:
                await asyncio.wait_for(w.wait_closed(), CLOSE_FLUSH_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                w.transport.abort()
