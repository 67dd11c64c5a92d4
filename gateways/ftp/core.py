"""The FTP control channel, sans-IO: bytes from each peer in, commands out.

Theory of operation
-------------------

``FtpControl`` sits between an FTP client and its server, one instance per
control connection. It does no I/O (DESIGN invariant 9, STYLE.md after h11):
``client_data`` / ``server_data`` / ``client_eof`` / ``server_eof`` /
``rule_answered`` go in, and each returns a list of outputs (``model``,
re-exported here), which a thin adapter carries out in order:

- ``ToClient`` / ``ToServer``: bytes for a peer;
- ``RequestRule``: ask the processor for a dynamic rule for one data
  connection (the seed's "Dynamic changes in packet processing": FTP is its
  example); its answer comes back through ``rule_answered``;
- ``Opaque``: AUTH TLS succeeded; from now on relay bytes unchanged;
- ``Close``: close both connections (after sending what came before);
- ``Event``: something to count and log (a refusal, a rule).

The addresses it needs are the session's ``Parties``, which the gateway
layer learnt by signalling: the client's real address C, the server's S, the
address the client connected to S' (the router, through a port forward), and
the address the server sees as the client (C, or the router's W that the
processor SNATs the session to behind masquerade: signalling's ``snat``).

Which rule a data connection gets: in ``allow`` mode an ALLOW in every case,
and the kernel carries it; where the connecting peer was told the router's
address (inbound passive: S' for S; outbound active: W for C) the processor
adds the DNAT back to the real party itself. In ``inspect`` mode a REDIRECT,
so the connection comes through the gateway.

The dialogue, in order (RFC 959 section 5.4, lock-step with pipelining):

1. Nothing happens before the server's 220 greeting (a 120 may precede it):
   a client that speaks first, or a server whose first reply is anything
   else, is closed, and so nothing that arrived before the greeting can ever
   open a rule (the issue's item 4).
2. Each client line is checked against the command table (``commands``):
   syntax, allow-list, argument, login, then the command's own checks. A
   refusal is answered by the gateway itself; its reply waits in
   ``_pending`` behind the replies of the commands already forwarded, so
   the client reads replies in the order it sent commands.
3. Each command forwarded to the server is remembered in ``_pending``; the
   server's next final reply (not 1xx) answers it. The core acts on a reply
   only through the command it answers: a 227 only for a pending PASV, a 229
   only for a pending EPSV, a 200 only for a pending PORT/EPRT.
4. A data-port command (PORT, EPRT, PASV, EPSV) stops the reading of client
   lines until its reply is delivered, and its reply waits until the rule is
   answered: the peer that will connect reads the address only once the
   rule is in place (RULE_ACK promises that), and a pipelined RETR cannot
   reach the server before the rule. AUTH and the login commands (USER,
   PASS, ACCT, REIN) stop it too: what follows AUTH may be a TLS handshake,
   and whether the next line needs a login depends on the login's reply.
5. The lines that carry a data address are never passed through: they are
   parsed strictly (``parse``) and written anew.
6. ``data_mode = "active"``: a client's PASV/EPSV goes to the server as a
   PORT to the client's side; after its 200 two REDIRECTs (the server's
   side, then the client's, sharing a ``pair``) and then the 227/229 for S'
   (``_translate``): the adapter joins the two connections.
   ``data_mode = "passive"``: the reverse, a client's PORT/EPRT goes to the
   server as PASV; after its 227 two ORIGINATE rules (the gateway opens
   both connections, ``_passivate``) and then the client's 200.
7. Each rule request replaces the session's earlier rules (the processor
   ends them, RULE_END SUPERSEDED): only the latest data command's port is open.
8. A session over IPv6 (its ``Parties`` are IPv6) speaks RFC 2428 only:
   EPRT |2| and EPSV (2); PORT and PASV, which cannot carry an IPv6
   address, and the IPv4 network protocol (1) are answered 522 by the
   gateway and never forwarded, and no 227 can answer anything. Where the
   gateway itself sends a data command (``data_mode``) it sends EPRT or
   EPSV.

Every input ends in a reply or a close: no exception escapes for any bytes
(tests fuzz this with Hypothesis). Buffers are bounded: a line is at most
``max_line_length``, and input that piles up while the core waits (a rule,
a data-port reply) is bounded by ``MAX_BACKLOG``.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from firewall.signalling import Endpoint, RuleMode
from gateways.ftp.commands import COMMANDS, SECURITY_FEATURES, Arg, Role, spec_of
from gateways.ftp.model import (
    Close,
    DataChannel,
    DataMode,
    Direction,
    Event,
    Opaque,
    Output,
    Parties,
    Policy,
    RequestRule,
    ToClient,
    ToServer,
)
from gateways.ftp.parse import (
    Malformed,
    ends_reply,
    format_227,
    format_229,
    format_eprt,
    format_port,
    parse_227,
    parse_229,
    parse_eprt,
    parse_port,
    reply_start,
    rewrite_addresses,
    rewrite_addresses6,
    split_command,
    strip_telnet,
)

# Bytes a peer may send while the core is not reading its lines (a data-port
# reply or a rule is awaited). A client that waits for replies, as RFC 959
# section 5.4 has it, sends a few lines at most; more is a flood.
MAX_BACKLOG = 65536

# Commands forwarded and not yet answered. Pipelining clients keep a handful
# in flight; past this the core stops reading client lines until replies come.
MAX_IN_FLIGHT = 32

# Lines of one reply the core holds to act on it as a whole (227, 229, 200).
# Those replies are one line; a server that sends pages of them is refused.
MAX_HELD_REPLY_LINES = 16

# Picks the port of a translated data connection (``data_mode = "active"``,
# from ``translated_ports``): the server connects to the client's side at it,
# the client to the server's side at the same one.
_PORTS = random.SystemRandom()

# Data ports below this are refused in PORT, EPRT, 227 and 229: RFC 2577
# section 3 ("the server not open data connections to TCP ports less than
# 1024"), so no data rule can reach a well-known service.
FIRST_DATA_PORT = 1024

CRLF = b"\r\n"

# What ``mask_private_addresses`` hides besides the server's own address: the
# private ranges a protected network is numbered from (RFC 1918, RFC 6598,
# link-local RFC 3927).
PRIVATE_NETWORKS = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
)
MASKED = ipaddress.IPv4Address("0.0.0.0")
# The same for IPv6: unique local (RFC 4193) and link-local (RFC 4291 section 2.5.6).
PRIVATE_NETWORKS6 = tuple(ipaddress.IPv6Network(n) for n in ("fc00::/7", "fe80::/10"))
MASKED6 = ipaddress.IPv6Address("::")


# ---- state -----------------------------------------------------------------------------


@dataclass
class _Plan:
    """A data connection a data-port command will need, once its reply confirms it."""

    direction: Direction
    src: Endpoint
    dst: Endpoint
    mode: RuleMode
    pair: int = 0  # a translated data connection: its two rules share this (``data_mode``)


@dataclass
class _Pending:
    """A command the server has yet to answer, or a reply of the gateway's own waiting its turn."""

    verb: str = ""
    role: Role = Role.PLAIN
    plan: _Plan | None = None  # PORT/EPRT: the rule the 200 will confirm
    # A client's PASV/EPSV sent on as a PORT (``data_mode = "active"``), or its PORT/EPRT as a PASV ("passive")
    translated: Role | None = None
    local: bytes | None = None  # a reply of the gateway's, sent when it reaches the head


class _Phase(enum.Enum):
    GREETING = 0
    OPEN = 1
    OPAQUE = 2
    CLOSED = 3


class FtpControl:
    """One FTP control connection between a client and its server (module docstring)."""

    def __init__(self, parties: Parties, policy: Policy = Policy(), data_port: Callable[[], int] | None = None) -> None:
        # The port of a translated data connection (``data_mode``): any of ``translated_ports``.
        self._data_port = data_port or (lambda: _PORTS.randint(*policy.translated_ports))
        self.parties = parties
        self.policy = policy
        self._phase = _Phase.GREETING
        self._client_buf = bytearray()
        self._server_buf = bytearray()
        self._client_skipping = False  # inside an over-long client line: drop up to its LF
        self._pending: deque[_Pending] = deque()
        self._setups = 0  # commands of _SYNC_ROLES awaiting their reply: client lines wait
        self._reply: tuple[int, list[bytes]] | None = None  # a reply being read: code, held lines
        self._reply_role: Role | None = None  # the pending role the reply in progress answers
        # The rule asked for: token, plan, the reply it releases, the plans to ask for after it.
        self._rule: tuple[int, _Plan, bytes, list[_Plan]] | None = None
        self._tokens = itertools.count(1)
        self._pairs = itertools.count(1)
        self._logged_in = False
        self._bad = 0
        self._login_failures = 0
        self._out: list[Output] = []
        # A session through a port forward: the server S is hidden behind S'.
        self._mask = policy.mask_private_addresses and parties.client_addressed != parties.server
        # RFC 2428's network protocol of the session: 1 IPv4, 2 IPv6 (step 8).
        self._net = 2 if parties.client.version == 6 else 1

    # ---- inputs -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    @property
    def opaque(self) -> bool:
        return self._phase is _Phase.OPAQUE

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    @property
    def waiting_for_rule(self) -> int | None:
        """The token of the rule request the core waits for, if any."""
        return self._rule[0] if self._rule is not None else None

    def client_data(self, data: bytes) -> list[Output]:
        if self._phase is _Phase.CLOSED or not data:
            return []
        if self._phase is _Phase.OPAQUE:
            return [ToServer(bytes(data))]
        if self._phase is _Phase.GREETING:
            # RFC 959 section 5.4: the client waits for the greeting. Whatever
            # comes first is not read, so it can open nothing.
            self._event("refused.before_greeting", bytes=len(data))
            self._out += self._close("client spoke before the greeting", b"421 Wait for the server's greeting; closing.")
            return self._flush()
        self._client_buf += data
        self._pump_client()
        return self._flush()

    def server_data(self, data: bytes) -> list[Output]:
        if self._phase is _Phase.CLOSED or not data:
            return []
        if self._phase is _Phase.OPAQUE:
            return [ToClient(bytes(data))]
        self._server_buf += data
        self._pump_server()
        self._pump_client()  # a reply may have unblocked waiting client lines
        return self._flush()

    def client_eof(self) -> list[Output]:
        if self._phase is _Phase.CLOSED:
            return []
        self._phase = _Phase.CLOSED
        return [Close("client closed")]

    def server_eof(self) -> list[Output]:
        if self._phase is _Phase.CLOSED:
            return []
        if self._phase is not _Phase.OPAQUE:
            self._pump_server()  # a last reply without its line end stays unsent: it was never a reply
        if self._phase is not _Phase.CLOSED:
            self._phase = _Phase.CLOSED
            self._out.append(Close("server closed"))
        return self._flush()

    def rule_answered(self, token: int, granted: bool) -> list[Output]:
        """The processor's answer to ``RequestRule(token)``: the held reply goes out, or a refusal."""
        if self._rule is None or self._rule[0] != token or self._phase is not _Phase.OPEN:
            return []
        _, plan, reply, rest = self._rule
        self._rule = None
        if granted:
            self._event("rule.granted", direction=plan.direction.value, src=plan.src, dst=plan.dst, mode=plan.mode.name)
            if rest:  # a translated data connection: its other side's rule next
                self._ask(rest, reply, replaces=False)
                return self._flush()
            self._to_client(reply)
        else:
            self._event("rule.refused", direction=plan.direction.value, src=plan.src, dst=plan.dst)
            self._to_client(b"425 Can't open data connection: the firewall did not open the data port.\r\n")
        self._setup_done()
        self._pump_server()
        self._pump_client()
        return self._flush()

    # ---- client lines ------------------------------------------------------------------

    def _pump_client(self) -> None:
        while self._phase is _Phase.OPEN and not self._setups and len(self._pending) < MAX_IN_FLIGHT:
            line = self._client_line()
            if line is None:
                break
            self._command(line)
        if self._phase is _Phase.OPEN and len(self._client_buf) > MAX_BACKLOG:
            self._event("refused.backlog", peer="client")
            self._out += self._close("client flooded the control channel", b"421 Too much input; closing.")

    def _client_line(self) -> bytes | None:
        buf = self._client_buf
        limit = self.policy.max_line_length
        while self._phase is _Phase.OPEN:
            end = buf.find(b"\n")
            if self._client_skipping:
                if end < 0:
                    buf.clear()
                    return None
                del buf[: end + 1]
                self._client_skipping = False
                continue
            if end < 0:
                if len(buf) > limit + 1:  # + 1: the CR of a line of exactly ``limit``
                    buf.clear()
                    self._client_skipping = True
                    self._bad_command("", 500, "Line too long.", "line_too_long")
                return None
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._bad_command("", 500, "Line too long.", "line_too_long")
                continue
            return line
        return None

    def _command(self, raw: bytes) -> None:
        line = strip_telnet(raw)
        if b"\r" in line or b"\0" in line:
            # A CR or NUL inside a line could end it for the server but not
            # for us: two commands where the gateway checked one.
            self._bad_command("", 500, "Syntax error: control character in command.", "syntax")
            return
        parsed = split_command(line)
        if parsed is None:
            self._bad_command("", 500, "Syntax error, command unrecognized.", "syntax")
            return
        verb, arg = parsed
        if verb not in self.policy.allowed:
            if verb not in COMMANDS:
                self._bad_command(verb, 500, f"{verb}: command unrecognized.", "unknown_command")
            else:
                self._refuse(verb, 502, f"{verb}: command not allowed through this firewall.", "not_allowed")
            return
        spec = spec_of(verb)
        if spec.arg is Arg.REQUIRED and arg is None:
            self._bad_command(verb, 501, f"{verb} needs an argument.", "syntax")
            return
        if spec.arg is Arg.NONE and arg is not None:
            self._bad_command(verb, 501, f"{verb} takes no argument.", "syntax")
            return
        if spec.login and not self._logged_in:
            self._event("refused.not_logged_in", verb=verb)
            self._local(b"530 Please log in with USER and PASS first.")
            return
        handler = _HANDLERS.get(spec.role)
        if handler is None:
            self._forward(verb, arg, spec.role)
        else:
            handler(self, verb, arg)

    def _user(self, verb: str, arg: bytes | None) -> None:
        assert arg is not None
        if len(arg) > self.policy.max_username_length:
            self._bad_command(verb, 501, "User name too long.", "username_too_long")
            return
        self._logged_in = False  # a new USER starts a new login (RFC 959 section 4.1.1)
        self._forward(verb, arg, Role.USER)

    def _pass(self, verb: str, arg: bytes | None) -> None:
        if arg is not None and len(arg) > self.policy.max_password_length:
            self._bad_command(verb, 501, "Password too long.", "password_too_long")
            return
        self._forward(verb, arg, Role.PASS)

    def _active(self, verb: str, arg: bytes | None) -> None:
        assert arg is not None
        if verb == "PORT" and self._net == 2:
            self._refuse(verb, 522, "Network protocol not supported, use EPRT (2)", "family")
            return
        try:
            at = parse_port(arg) if verb == "PORT" else parse_eprt(arg, self._net)
        except Malformed as bad:
            if bad.code == 522:  # a well-formed EPRT of the other family: policy, nothing malformed
                self._refuse(verb, bad.code, bad.text, "family")
            else:
                self._bad_command(verb, bad.code, bad.text, "malformed")
            return
        p = self.parties
        if at.address != p.client:
            # RFC 2577 section 3: a PORT for another host is the bounce attack.
            self._bad_command(verb, 501, f"{verb} must name your own address.", "bounce", named=at.address)
            return
        if at.port < FIRST_DATA_PORT:
            self._bad_command(verb, 501, f"{verb} port must be {FIRST_DATA_PORT} or above.", "privileged_port", port=at.port)
            return
        if self.policy.data_mode is DataMode.PASSIVE and p.client_seen_as is not None:
            self._passivate(verb, at)
            return
        if p.client_seen_as is None:
            self._event("refused.active_unavailable", verb=verb)
            self._local(b"502 Active mode is not available through this firewall; use passive mode (PASV).")
            return
        announce = Endpoint(p.client_seen_as, at.port)
        # The server connects to what it is told; the processor maps the
        # router's address back to the client, keeping the port.
        plan = _Plan(Direction.ACTIVE, Endpoint(p.server, 0), announce, self._mode())
        text = f"PORT {format_port(announce)}" if verb == "PORT" else f"EPRT {format_eprt(announce)}"
        self._pending.append(_Pending(verb, Role.PORT, plan))
        self._setups += 1
        self._to_server(text.encode("ascii") + CRLF)

    def _passive(self, verb: str, arg: bytes | None) -> None:
        own, other = (b"2", b"1") if self._net == 2 else (b"1", b"2")
        if verb == "PASV" and self._net == 2:
            self._refuse(verb, 522, "Network protocol not supported, use EPSV (2)", "family")
            return
        if self.policy.data_mode is DataMode.ACTIVE and not (arg is not None and arg.upper() in (b"ALL", other)):
            if self._translate(verb, arg):
                return
        if verb == "EPSV" and arg is not None:
            word = arg.upper()
            if word == b"ALL":
                # RFC 2428 section 4: no reply to act on; the server refuses
                # PORT, EPRT and PASV from now on itself.
                self._forward(verb, b"ALL", Role.PLAIN)
                return
            if word == other:
                self._refuse(verb, 522, f"Network protocol not supported, use ({self._net})", "family")
                return
            if word != own:
                self._bad_command(verb, 501, f"EPSV takes {self._net} or ALL.", "malformed")
                return
        self._pending.append(_Pending(verb, Role.EPSV if verb == "EPSV" else Role.PASV))
        self._setups += 1
        self._to_server(verb.encode("ascii") + (b" " + arg if arg is not None else b"") + CRLF)

    def _translate(self, verb: str, arg: bytes | None) -> bool:
        """``data_mode = "active"``: the client's PASV/EPSV goes to the server as a PORT.

        The server connects to the address it sees as the client (C, or the
        router's W) at a port the gateway chose; the client connects to S'
        (what it addressed) at the same port. Both connections are
        REDIRECTed into the gateway, which joins them (seed, "Dynamic
        changes": the gateway decides the data channel). False: not possible
        here (the server's view of the client is unknown), left as it is.
        """
        p = self.parties
        if p.client_seen_as is None or (verb == "EPSV" and arg is not None and arg != str(self._net).encode()):
            return False
        port = self._data_port()
        toward_server = Endpoint(p.client_seen_as, port)
        pair = next(self._pairs)
        server_side = _Plan(Direction.ACTIVE, Endpoint(p.server, 0), toward_server, RuleMode.REDIRECT, pair)
        self._event("data.translated", verb=verb, port=port)
        self._pending.append(_Pending("PORT", Role.PORT, server_side, translated=Role.EPSV if verb == "EPSV" else Role.PASV))
        self._setups += 1
        text = f"EPRT {format_eprt(toward_server)}" if self._net == 2 else f"PORT {format_port(toward_server)}"
        self._to_server(text.encode("ascii") + CRLF)
        return True

    def _passivate(self, verb: str, at: Endpoint) -> None:
        """``data_mode = "passive"``: the client's PORT/EPRT (checked) goes to the server as a PASV.

        After the server's 227 the gateway opens both data connections itself
        (two ORIGINATE rules sharing a ``pair``, ``_passive_reply``): one to
        the server's port, leaving the router as the client the server knows
        (C, or W), one to the client's port, leaving it as S', the address
        the client addressed. Only then the client gets its 200.
        """
        p = self.parties
        client_side = _Plan(Direction.ACTIVE, Endpoint(p.client_addressed, 0), at, RuleMode.ORIGINATE, next(self._pairs))
        self._event("data.translated", verb=verb, port=at.port)
        # Over IPv6 the server is asked EPSV: PASV's 227 cannot name an IPv6 address.
        ask, role = ("EPSV", Role.EPSV) if self._net == 2 else ("PASV", Role.PASV)
        self._pending.append(_Pending(ask, role, client_side, translated=Role.PORT if verb == "PORT" else Role.EPRT))
        self._setups += 1
        self._to_server(ask.encode("ascii") + CRLF)

    def _auth(self, verb: str, arg: bytes | None) -> None:
        if not self.policy.auth_tls:
            # RFC 2228 section 3: 534, "request denied for policy reasons".
            # TLS would hide the data ports the firewall has to open.
            self._event("refused.auth_tls")
            self._local(b"534 TLS is refused by the firewall: it must read the data ports.")
            return
        self._pending.append(_Pending(verb, Role.AUTH))
        self._setups += 1  # what follows AUTH may be a TLS handshake: not read as commands
        self._to_server(b"AUTH " + (arg or b"") + CRLF)

    def _forward(self, verb: str, arg: bytes | None, role: Role) -> None:
        self._pending.append(_Pending(verb, role))
        if role in _SYNC_ROLES:
            self._setups += 1  # the login state decides how later lines are checked
        self._to_server(verb.encode("ascii") + (b" " + arg if arg is not None else b"") + CRLF)

    def _mode(self) -> RuleMode:
        """ALLOW: the kernel carries the data connection, translating the router's
        address where the peer was told it (the processor's DNAT); REDIRECT: the
        gateway relays and inspects it."""
        return RuleMode.ALLOW if self.policy.data_channel is DataChannel.ALLOW else RuleMode.REDIRECT

    # ---- server lines --------------------------------------------------------------------

    def _pump_server(self) -> None:
        limit = self.policy.max_line_length
        buf = self._server_buf
        while self._phase in (_Phase.GREETING, _Phase.OPEN) and self._rule is None:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > limit + 1:
                    self._event("refused.server_line_too_long")
                    self._out += self._close("server line too long", b"421 The server's reply was too long; closing.")
                return
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._event("refused.server_line_too_long")
                self._out += self._close("server line too long", b"421 The server's reply was too long; closing.")
                return
            self._reply_line(line)
        if self._phase is _Phase.OPEN and len(buf) > MAX_BACKLOG:
            self._event("refused.backlog", peer="server")
            self._out += self._close("server flooded the control channel", b"421 Too much input; closing.")

    def _reply_line(self, line: bytes) -> None:
        if self._reply is None:
            start = reply_start(line)
            if start is None:
                self._event("refused.server_syntax")
                self._out += self._close("server sent a line that is not a reply", b"421 The server broke the protocol; closing.")
                return
            if self._phase is _Phase.GREETING and start.code not in (120, 220, 421):
                self._event("refused.no_greeting", code=start.code)
                self._out += self._close(
                    "server did not greet with 220", b"421 Service not available: the server did not greet; closing."
                )
                return
            self._reply = (start.code, [])
            self._reply_role = self._answering(start.code)
            self._reply_body(line, first=True)
            if not start.more:
                self._reply_done()
            return
        code = self._reply[0]
        last = ends_reply(line, code)
        self._reply_body(line, first=False, last=last)
        if last and self._phase is not _Phase.CLOSED:
            self._reply_done()

    def _answering(self, code: int) -> Role | None:
        """The role of the command a reply with ``code`` answers, or None (greeting, unsolicited)."""
        if self._phase is _Phase.GREETING or not self._pending or code < 200:
            return None
        return self._pending[0].role

    def _holds(self) -> bool:
        """Whether the reply in progress is held to be acted on as a whole."""
        assert self._reply is not None
        code, _ = self._reply
        # Every 227 and 229: their address is never passed on as the server wrote it.
        return self._phase is _Phase.OPEN and (code in (227, 229) or (self._reply_role is Role.PORT and code == 200))

    def _reply_body(self, line: bytes, *, first: bool, last: bool = False) -> None:
        assert self._reply is not None
        code, held = self._reply
        if self._holds():
            if len(held) >= MAX_HELD_REPLY_LINES:
                self._event("refused.server_reply_too_long", code=code)
                self._out += self._close("server reply too long", b"421 The server's reply was too long; closing.")
                return
            held.append(line)
            return
        if self._reply_role is Role.FEAT and code == 211 and not first and not last and not self._feature_visible(line):
            self._event("feat.hidden", feature=line.strip().decode("latin-1")[:40])
            return
        if not first and not last:
            inner = reply_start(line)
            if inner is not None and inner.code != code:
                # A text line that reads as another reply ("227 Entering Passive
                # Mode (...)" inside a 211): indented, as RFC 959 section 4.2
                # asks, so no client takes it for the end of the reply.
                self._event("reply.indented", code=code, inner=inner.code)
                line = b" " + line
        self._to_client(self._outward(line) + CRLF)

    def _outward(self, line: bytes) -> bytes:
        """A server's reply line as the client may see it: through a port forward
        (``mask_private_addresses``), the server's address S becomes S', the one the
        client connected to, and other private addresses 0.0.0.0 (IPv6: ``::``)."""
        if not self._mask:
            return line
        masked = rewrite_addresses(rewrite_addresses6(line, self._hidden), self._hidden)  # type: ignore[arg-type]
        if masked != line:
            self._event("reply.masked", code=self._reply[0] if self._reply is not None else 0)
        return masked

    def _hidden(self, address: Any) -> Any:
        """What an address in a reply becomes (module docstring of ``parse``): S is S',
        the client's and S' are kept, other private addresses of either family masked."""
        p = self.parties
        if address == p.server:
            return p.client_addressed
        if address in (p.client_addressed, p.client):
            return None
        if address.version == 6:
            return MASKED6 if any(address in n for n in PRIVATE_NETWORKS6) else None
        return MASKED if any(address in n for n in PRIVATE_NETWORKS) else None

    def _feature_visible(self, line: bytes) -> bool:
        """RFC 2389 section 3.2: one feature per line, after a space; hide what the gateway would refuse."""
        name = line.strip().split(b" ", 1)[0].decode("latin-1").upper()
        if name in SECURITY_FEATURES:
            return self.policy.auth_tls and name in self.policy.allowed | {"ADAT", "MIC", "CONF", "ENC"}
        if name in COMMANDS:
            return name in self.policy.allowed
        return True

    def _reply_done(self) -> None:
        assert self._reply is not None
        code, held = self._reply
        role = self._reply_role
        self._reply = None
        self._reply_role = None
        if self._phase is _Phase.GREETING:
            if code == 220:
                self._phase = _Phase.OPEN
            elif code == 421:
                self._out += self._close("server refused the session (421)")
            return
        if role is None:  # preliminary (1xx), or nothing pending: no command to act for
            if held:
                self._unexpected(code)
            return
        pending = self._pending.popleft()
        if (role is Role.PASV and code == 227) or (role is Role.EPSV and code == 229):
            if self._passive_reply(pending, code, held):
                return  # the reply waits for the rule
        elif role is Role.PORT and code == 200 and pending.translated is not None:
            assert pending.plan is not None
            p, port = self.parties, pending.plan.dst.port
            toward_client = Endpoint(p.client_addressed, port)
            client_side = _Plan(Direction.PASSIVE, Endpoint(p.client, 0), toward_client, RuleMode.REDIRECT,
                                pending.plan.pair)
            reply = format_229(port) if pending.translated is Role.EPSV else format_227(toward_client)
            self._ask([pending.plan, client_side], reply)
            return
        elif role is Role.PORT and code == 200:
            assert pending.plan is not None
            self._ask(pending.plan, b"".join(self._outward(line) + CRLF for line in held))
            return
        elif role is Role.AUTH and code == 234:
            # RFC 4217 section 4: TLS starts right after this reply.
            self._phase = _Phase.OPAQUE
            self._event("auth_tls.started")
            self._out.append(Opaque(bytes(self._client_buf), bytes(self._server_buf)))
            self._client_buf.clear()
            self._server_buf.clear()
            return
        elif held:
            self._unexpected(code)
        if role in (Role.USER, Role.PASS, Role.ACCT):
            self._login_reply(role, code)
        elif role is Role.REIN and code == 220:
            self._logged_in = False
        if role in _SYNC_ROLES:
            self._setup_done()
        self._flush_local()

    def _unexpected(self, code: int) -> None:
        """A 227 or 229 that answers no PASV/EPSV: never acted on, its address never passed on,
        and not even its code: a client waiting for a PASV answer reads a 451 and gives up
        on that data connection, whatever it parses out of a 227."""
        self._event("refused.unsolicited_reply", code=code)
        self._to_client(b"451 Reply not expected here; dropped by the firewall.\r\n")

    def _passive_reply(self, pending: _Pending, code: int, held: list[bytes]) -> bool:
        """Act on a 227 to PASV or a 229 to EPSV; True if it now waits for the rule."""
        p = self.parties
        text = b" ".join(held)
        if pending.role is Role.PASV:
            at = parse_227(text)
            if at is None:
                return self._not_acted(code, "malformed 227", b"425 The server's passive address is malformed.")
            if at.address != p.server:
                self._event("refused.foreign_227", named=at.address, server=p.server)
                return self._not_acted(code, "227 names another host", b"425 The server named an address that is not its own.")
            port = at.port
        else:
            parsed = parse_229(text)
            if parsed is None:
                return self._not_acted(code, "malformed 229", b"425 The server's passive port is malformed.")
            port = parsed
        if port < FIRST_DATA_PORT:
            self._event("refused.privileged_port", port=port, verb=pending.verb)
            return self._not_acted(code, "privileged passive port", b"425 The server named a port below 1024.")
        if pending.translated is not None:  # data_mode passive: the gateway opens both (``_passivate``)
            assert pending.plan is not None and p.client_seen_as is not None
            server_side = _Plan(Direction.PASSIVE, Endpoint(p.client_seen_as, 0), Endpoint(p.server, port),
                                RuleMode.ORIGINATE, pending.plan.pair)
            self._ask([server_side, pending.plan], f"200 {pending.translated.name} command successful.".encode("ascii") + CRLF)
            return True
        # The client connects to the address it already uses for the control
        # connection (S'); the processor maps it to the server, keeping the port.
        announce = Endpoint(p.client_addressed, port)
        plan = _Plan(Direction.PASSIVE, Endpoint(p.client, 0), announce, self._mode())
        self._ask(plan, format_229(port) if pending.role is Role.EPSV else format_227(announce))
        return True

    def _not_acted(self, code: int, why: str, reply: bytes) -> bool:
        self._event("data.not_acted", code=code, why=why)
        self._to_client(reply + CRLF)
        return False

    def _ask(self, plans: _Plan | list[_Plan], reply: bytes, replaces: bool = True) -> None:
        """Request the plan's rule (of several, one after the other); ``reply`` goes to the
        client once all are granted. The first replaces the session's earlier rules: only the
        latest data command's may exist (docs/ftp.md, "Rule life")."""
        plan, *rest = plans if isinstance(plans, list) else [plans]
        token = next(self._tokens)
        self._rule = (token, plan, reply, rest)
        self._out.append(
            RequestRule(token, plan.direction, plan.src, plan.dst, plan.mode,
                        self.policy.data_channel is DataChannel.INSPECT, replaces, plan.pair)
        )

    def _setup_done(self) -> None:
        if self._setups:
            self._setups -= 1
        self._flush_local()

    def _login_reply(self, role: Role, code: int) -> None:
        if code in (230, 232):
            self._logged_in = True
            self._login_failures = 0
            self._event("login")
        elif role is Role.PASS and code == 530:
            self._login_failures += 1
            self._event("login.failed", failures=self._login_failures)
            if self._login_failures >= self.policy.max_login_failures:
                # RFC 2577 section 5: close after a small number (3-5) of failed logins.
                self._out += self._close("too many failed logins", b"421 Too many failed logins; closing.")

    # ---- replies of the gateway's own ---------------------------------------------------

    def _local(self, reply: bytes) -> None:
        """A reply of the gateway's: now, or after the replies the client is still owed."""
        if self._pending:
            self._pending.append(_Pending(local=reply + CRLF))
        else:
            self._to_client(reply + CRLF)

    def _flush_local(self) -> None:
        while self._pending and self._pending[0].local is not None:
            self._to_client(self._pending.popleft().local)  # type: ignore[arg-type]

    def _refuse(self, verb: str, code: int, text: str, why: str, **fields: Any) -> None:
        """A command well formed but refused by policy (the allow-list, IPv6): answered, not
        counted toward ``max_bad_commands``, which is for what no honest client sends."""
        self._event(f"refused.{why}", verb=verb, code=code, **fields)
        self._local(f"{code} {text}".encode("ascii"))

    def _bad_command(self, verb: str, code: int, text: str, why: str, **fields: Any) -> None:
        self._bad += 1
        self._event(f"refused.{why}", verb=verb, code=code, **fields)
        if self._bad > self.policy.max_bad_commands:
            # aiosmtpd's rule for SMTP, applied to FTP: a peer that keeps
            # sending what the gateway refuses is probing it.
            self._out += self._close("too many bad commands", b"421 Too many bad commands; closing.")
            return
        self._local(f"{code} {text}".encode("ascii"))

    # ---- helpers -------------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        self._out.append(ToClient(data))

    def _to_server(self, data: bytes) -> None:
        self._out.append(ToServer(data))

    def _event(self, name: str, **fields: Any) -> None:
        self._out.append(Event(name, fields))

    def _close(self, reason: str, reply: bytes | None = None) -> list[Output]:
        if self._phase is _Phase.CLOSED:
            return []
        self._phase = _Phase.CLOSED
        self._rule = None
        out: list[Output] = [ToClient(reply + CRLF)] if reply is not None else []
        return out + [Close(reason)]

    def _flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out


# Commands after which the core reads no client line until their reply is
# handled: the data-port commands and AUTH (module docstring, step 4), and the
# login commands, whose reply decides whether the next line needs a login.
_SYNC_ROLES = frozenset({Role.PORT, Role.PASV, Role.EPSV, Role.AUTH, Role.USER, Role.PASS, Role.ACCT, Role.REIN})

_HANDLERS = {
    Role.USER: FtpControl._user,
    Role.PASS: FtpControl._pass,
    Role.PORT: FtpControl._active,
    Role.EPRT: FtpControl._active,
    Role.PASV: FtpControl._passive,
    Role.EPSV: FtpControl._passive,
    Role.AUTH: FtpControl._auth,
}
