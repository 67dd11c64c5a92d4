"""The SMTP session, sans-IO: client and server bytes in, outputs out (issue 10, item 1).

Theory of operation
-------------------

``SmtpRelay`` sits between an SMTP client and its server, one instance per
session. It does no I/O (STYLE.md, after h11): ``client_data``,
``server_data``, ``client_eof``, ``server_eof``, ``expired``,
``tls_started`` and ``tls_failed`` go in, and each returns a list of
outputs (``model``) that a thin adapter carries out in order.

1. Nothing of the client's is read before the server's greeting (RFC 5321
   section 4.3.1): a client that talks first is closed.
2. Each client line is checked: CRLF and nothing else ends it (a lone CR
   or LF is refused, never forwarded), at most ``max_command_line`` bytes
   (section 4.5.3.1.4), a verb of the command table (``commands``) with the
   argument it needs, in sequence (``state``), then the command's own
   checks: paths and parameters (``lines``), the extensions offered, the
   limits, the policy hooks. What passes is forwarded rebuilt from its
   parsed parts; what does not is answered by the gateway.
3. PIPELINING (RFC 2920): commands are handled in the order they came. Each
   one forwarded waits in ``_pending`` for the server's reply; a reply of
   the gateway's own waits in the same queue behind the replies still due,
   so the client reads its replies in the order it sent its commands.
   ``sync`` commands (EHLO, HELO, QUIT, DATA, STARTTLS) stop the reading of
   client lines until their reply is in; after a ``barrier`` (DATA,
   STARTTLS) any byte before the reply is refused: content before 354,
   plaintext before the TLS handshake (CVE-2011-0411).
4. Every server reply is checked: CRLF only, at most ``max_reply_line``
   bytes (section 4.5.3.1.5), three digits, one code per multiline reply
   (section 4.2.1), and only in answer to a command (or a 421). The EHLO
   reply is rebuilt from the allow-listed extensions (``lines.rebuild_ehlo``).
5. After 354 the gateway reads the content itself (``data.Content``): the
   end is CRLF.CRLF and nothing else, lines are un-dotted and re-dotted,
   and the gateway writes its own end-of-data.
6. CHUNKING (RFC 3030), when the policy lists it and the server offers it:
   ``BDAT <size> [LAST]`` is forwarded like a command, then the next
   <size> client bytes are the chunk, streamed to the server as they come
   (never buffered whole), checked by ``data.Chunks`` and counted against
   the message size before a byte of them is read (552 and close: the
   gateway will not read a chunk it refuses). BDAT may be pipelined
   (section 4.2); a BDAT out of sequence gets 503 and its chunk is read and
   dropped, so chunk bytes are never taken for commands (section 2).
   The BDAT handling is the ``chunking`` mixin's; the gateway's own replies
   are in ``replies``.

Every input ends in a reply, a close or a wait for more bytes: no exception
escapes for any bytes (tests fuzz both sides with Hypothesis). Buffers are
bounded: a line by its limit, what piles up behind a sync command by
``MAX_BACKLOG``, the commands in flight by ``MAX_IN_FLIGHT``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gateways.smtp.chunking import Chunking
from gateways.smtp.commands import COMMANDS, EXTENSIONS, REFUSED, Arg
from gateways.smtp.data import Chunks, Content
from gateways.smtp.lines import (
    GOOD_REPLY_LINE,
    Malformed,
    Path,
    format_params,
    good_command,
    param_problem,
    parse_path,
    parse_reply_line,
    rebuild_ehlo,
    split_command,
)
from gateways.smtp.model import Close, Event, Opaque, Output, Policy, Reply, StartTls, ToClient, ToServer
from gateways.smtp.replies import (
    BAD_ARGUMENT, BAD_PARAMETER, BAD_SEQUENCE, BARE_LINE_END, EARLY_TALKER, LINE_TOO_LONG, NO_EXPN, NO_RELAY,
    NO_STARTTLS, NO_VRFY, PIPELINED_AFTER_DATA, PIPELINED_AFTER_STARTTLS, SERVER_GONE, SERVER_REFUSED, START_TLS,
    TLS_FAILED, TOO_BIG, TOO_MANY_ERRORS, TOO_MANY_MESSAGES, TOO_MANY_RECIPIENTS, TOO_MUCH_INPUT, UNRECOGNIZED,
)
from gateways.smtp.state import BDAT_LAST, END_OF_DATA, GREETING, State, after, in_sequence

# Bytes a client may send while the core does not read its lines (a sync
# command's reply is awaited). RFC 2920 clients send one group, a few KB.
MAX_BACKLOG = 65536
# Commands forwarded and not yet answered; past this the core reads no more
# client lines until replies come. A 100-recipient group fits.
MAX_IN_FLIGHT = 128
# The gateway's own answers (refusals, 252 to VRFY, ...) given per input
# before the rest of the pipelined commands wait for ``more``, which the
# adapter calls once the client has taken what was written for it: a client
# that sends commands and never reads makes the gateway hold about this many
# answers beyond its write buffer (64 KiB of pipelined VRFYs would be 600 KB
# of answers at once).
MAX_ANSWERS_PER_TURN = 64
# Lines of one server reply; an EHLO reply has a dozen or two.
MAX_REPLY_LINES = 64
# EHLO/HELO argument: a domain or an address literal (section 4.1.1.1), at most 255 octets.
MAX_HELO = 255


@dataclass
class _Pending:
    """A command the server has yet to answer, or a reply of the gateway's waiting its turn."""

    verb: str
    local: bytes | None = None
    path: Path | None = None
    size: int = 0  # END_OF_DATA, BDAT_LAST: the content's size, for the log


class SmtpRelay(Chunking):
    """One SMTP session between a client and its server (module docstring)."""

    def __init__(self, policy: Policy = Policy()) -> None:
        self.policy = policy
        self.state = State.GREETING  # confirmed by the server's replies
        self._expected = State.GREETING  # with every pending command assumed to succeed
        self._pending: deque[_Pending] = deque([_Pending(GREETING)])
        self._client_buf = bytearray()
        self._server_buf = bytearray()
        self._skipping = False  # inside an over-long client line: drop up to its LF
        self._held: str | None = None  # the sync command whose reply is awaited
        self._reply: list[bytes] = []  # the lines of a reply so far, with their CRLF
        self._content: Content | None = None
        self._chunk_left = 0  # bytes of the current BDAT chunk still to come
        self._chunk_forward = False  # the current chunk goes to the server (else: dropped after a 503)
        self._chunk_last = False  # the current chunk is the LAST one
        self._chunked = 0  # this transaction's chunk bytes, the current chunk's included
        self._chunks: Chunks | None = None  # this transaction's BDAT content check
        self.offered: frozenset[str] = frozenset()
        self.size_limit = policy.max_message_size
        self._in_flight = 1  # commands at the server, the greeting included
        self._recipients = 0  # RCPTs of this transaction forwarded and not refused
        self.messages = 0  # MAILs of this session forwarded and not refused
        self.delivered = 0  # messages the server accepted (250 after end of data)
        self._bad = 0
        self._answers = 0  # the gateway's own answers in this turn (MAX_ANSWERS_PER_TURN)
        self._more = False  # pipelined commands left for ``more``
        self._out: list[Output] = []

    # ---- inputs -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def wants_more(self) -> bool:
        """Commands were left unread for ``MAX_ANSWERS_PER_TURN``: call ``more`` once the client has its answers."""
        return self._more and self.state is not State.CLOSED

    def more(self) -> list[Output]:
        """Read on: the pipelined commands the last turn left."""
        self._answers = 0
        self._more = False
        if self.state is not State.CLOSED and self.state is not State.TLS and self._content is None:
            self._read_commands()
        return self._take()

    @property
    def buffered(self) -> int:
        """Input held and not yet parsed: client and server bytes, an unfinished content line."""
        content = len(self._content._tail) if self._content is not None else 0
        return len(self._client_buf) + len(self._server_buf) + content

    def client_data(self, data: bytes) -> list[Output]:
        if self.state is State.CLOSED or not data:
            return []
        self._answers = 0
        if self.state is State.TLS:
            # Passthrough after Opaque: the adapter relays by itself; anything
            # here came before the handshake and is refused (CVE-2011-0411).
            self._violation(PIPELINED_AFTER_STARTTLS, "refused.pipelined_after_starttls")
        elif self.state is State.GREETING:
            self._violation(EARLY_TALKER, "refused.early_talker")
        elif self._content is not None:
            self._feed_content(data)
        elif self._chunk_left and not self._client_buf:
            n = self._chunk_left
            self._chunk_piece(data[:n])  # the whole input, not a copy, when the chunk takes it all
            if len(data) > n and self.state is not State.CLOSED:
                self._client_buf += data[n:]
                self._read_commands()
        elif self._held in ("DATA", "STARTTLS"):
            self._violation(PIPELINED_AFTER_DATA if self._held == "DATA" else PIPELINED_AFTER_STARTTLS,
                            f"refused.pipelined_after_{self._held.lower()}")
        else:
            self._client_buf += data
            self._read_commands()
        return self._take()

    def server_data(self, data: bytes) -> list[Output]:
        if self.state is State.CLOSED or not data:
            return []
        self._answers = 0
        if (not self._server_buf and not self._reply and len(data) <= self.policy.max_reply_line
                and data.find(b"\n") == len(data) - 1 and data[3:4] != b"-" and GOOD_REPLY_LINE.fullmatch(data) is not None):
            # One whole single-line reply and nothing held: most replies.
            # ``_read_replies`` would take it the same way, through its buffer.
            self._on_reply(int(data[:3]), [data], data if len(data) > 5 else data[:3] + b" \r\n")
            return self._take()
        self._server_buf += data
        self._read_replies()
        return self._take()

    def client_eof(self) -> list[Output]:
        if self.state is not State.CLOSED:
            self._close("client_eof")
        return self._take()

    def server_eof(self) -> list[Output]:
        if self.state is not State.CLOSED:
            if any(p.local is None for p in self._pending):
                self._to_client(SERVER_GONE.wire())
            self._close("server_eof")
        return self._take()

    def expired(self, what: str) -> list[Output]:
        """A timeout of the adapter's (``idle``, ``session``): 421 and close (RFC 5321 section 4.5.3.2)."""
        if self.state is not State.CLOSED:
            self._event(f"closed.{what}_timeout")
            self._to_client(Reply(421, "4.4.2", f"{what.capitalize()} timeout; closing").wire())
            self._close(f"{what}_timeout")
        return self._take()

    def tls_started(self) -> list[Output]:
        """Terminate mode: both handshakes are done. RFC 3207 section 4.2: forget
        everything learnt before; the client must say EHLO again."""
        if self.state is State.TLS:
            self.state = self._expected = State.INIT
            self.offered = frozenset()
            self._client_buf.clear()
            self._server_buf.clear()
            self._event("tls.started")
        return self._take()

    def tls_failed(self, why: str, leg: str = "client") -> list[Output]:
        """Terminate mode: a handshake failed. Towards the server, the client is
        still in plaintext waiting for its 220: it hears why (421)."""
        if self.state is not State.CLOSED:
            self._event("tls.failed", leg=leg, detail=why)
            if leg == "server":
                self._to_client(TLS_FAILED.wire())
            self._close("tls_failed")
        return self._take()

    # ---- outputs ------------------------------------------------------------------------

    def _take(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def _to_client(self, data: bytes) -> None:
        if self._out and isinstance(self._out[-1], ToClient):
            self._out[-1] = ToClient(self._out[-1].data + data)
        else:
            self._out.append(ToClient(data))

    def _to_server(self, data: bytes) -> None:
        if self._out and isinstance(self._out[-1], ToServer):
            self._out[-1] = ToServer(self._out[-1].data + data)
        else:
            self._out.append(ToServer(data))

    def _event(self, name: str, **fields: object) -> None:
        self._out.append(Event(name, fields))

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._content = None
        self._client_buf.clear()
        self._server_buf.clear()
        self._out.append(Close(reason))

    def _violation(self, reply: Reply, event: str, **fields: object) -> None:
        """The client broke the protocol where no answer can put it right: reply now and close."""
        self._event(event, **fields)
        self._to_client(reply.wire())
        self._close(event.rpartition(".")[2])

    def _server_violation(self, detail: str) -> None:
        self._event("refused.server_reply", detail=detail)
        self._to_client(SERVER_REFUSED.wire())
        self._close("server_protocol")

    # ---- the client's side --------------------------------------------------------------

    def _answer(self, reply: Reply | bytes) -> None:
        """A reply of the gateway's, in its turn behind the replies still due."""
        wire = reply.wire() if isinstance(reply, Reply) else reply
        self._answers += 1
        if self._pending:
            self._pending.append(_Pending("", local=wire))
        else:
            self._to_client(wire)

    def _refuse(self, reply: Reply, event: str, **fields: object) -> None:
        self._event(event, **fields)
        self._answer(reply)

    def _bad_command(self, reply: Reply, event: str, **fields: object) -> None:
        """An unknown, refused or malformed command; past ``max_bad_commands`` the session ends."""
        self._bad += 1
        if self._bad <= self.policy.max_bad_commands:
            self._refuse(reply, event, **fields)
            return
        self._event(event, **fields)
        self._event("refused.too_many_errors", count=self._bad)
        for p in self._pending:  # the gateway's answers already given; the server's are not awaited
            if p.local is not None:
                self._to_client(p.local)
        self._pending.clear()
        self._to_client(TOO_MANY_ERRORS.wire())
        self._close("too_many_errors")

    def _read_commands(self) -> None:
        buf = self._client_buf
        limit = self.policy.max_command_line
        self._more = False
        while self.state is not State.CLOSED and self._content is None and self._held is None:
            if self._chunk_left:  # a chunk's bytes: never lines, whatever the limits on commands
                if not buf:
                    break
                piece = bytes(buf[: self._chunk_left])
                del buf[: len(piece)]
                self._chunk_piece(piece)
                continue
            if self._in_flight >= MAX_IN_FLIGHT:
                break
            if self._answers >= MAX_ANSWERS_PER_TURN:
                self._more = buf.find(b"\n") >= 0
                break
            lf = buf.find(b"\n")
            if lf < 0:
                if len(buf) >= limit:  # no CRLF within the limit: the line is too long
                    self._skipping = True
                    del buf[:-1]  # keep a trailing CR: it may pair with the next LF
                break
            line = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            if self._skipping:
                self._skipping = False
                self._bad_command(LINE_TOO_LONG, "refused.line_too_long", limit=limit)
            elif len(line) > limit:
                self._bad_command(LINE_TOO_LONG, "refused.line_too_long", limit=limit)
            elif (parsed := None if "SMTPUTF8" in self.offered else good_command(line)) is not None:
                self._dispatch(*parsed)
            elif not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                self._bad_command(BARE_LINE_END, "refused.bare_line_end")
            else:
                self._command(line[:-2])
        if len(buf) > MAX_BACKLOG and self.state is not State.CLOSED:
            self._violation(TOO_MUCH_INPUT, "refused.too_much_input", bytes=len(buf))

    def _command(self, line: bytes) -> None:
        try:
            verb, arg = split_command(line, utf8="SMTPUTF8" in self.offered)
        except Malformed as exc:
            self._bad_command(UNRECOGNIZED, "refused.malformed", detail=str(exc))
            return
        self._dispatch(verb, arg)

    def _dispatch(self, verb: str, arg: bytes) -> None:
        """A command line split and checked: the command table, the sequence, the verb's own checks."""
        spec = COMMANDS.get(verb)
        if spec is None:
            if verb in REFUSED:
                self._bad_command(Reply(502, "5.5.1", REFUSED[verb]), "refused.not_implemented", verb=verb)
            else:
                self._bad_command(UNRECOGNIZED, "refused.unknown_command", verb=verb)
            return
        if (spec.arg is Arg.NONE and arg) or (spec.arg is Arg.REQUIRED and not arg):
            self._bad_command(BAD_ARGUMENT, "refused.argument", verb=verb)
            return
        if verb == "BDAT":
            self._bdat(arg)
            return
        if verb == "STARTTLS" and "STARTTLS" not in self.offered:
            if self._client_buf:
                self._violation(PIPELINED_AFTER_STARTTLS, "refused.pipelined_after_starttls")
            else:
                self._refuse(NO_STARTTLS, "refused.starttls", mode=self.policy.starttls)
            return
        if not in_sequence(self._expected, verb):
            self._refuse(BAD_SEQUENCE, "refused.sequence", verb=verb, state=self._expected.value)
            return
        if spec.barrier and self._client_buf:
            self._violation(PIPELINED_AFTER_DATA if verb == "DATA" else PIPELINED_AFTER_STARTTLS,
                            f"refused.pipelined_after_{verb.lower()}")
            return
        handler = _CMD.get(verb)
        if handler is not None:
            handler(self, arg)
        else:
            self._forward(verb, verb.encode())

    def _forward(self, verb: str, line: bytes, path: Path | None = None, size: int = 0) -> None:
        self._to_server(line + b"\r\n")
        self._pending.append(_Pending(verb, path=path, size=size))
        self._in_flight += 1
        self._expected = after(self._expected, verb)
        if verb in _SYNC:
            self._held = verb

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._helo("EHLO", arg)

    def _cmd_helo(self, arg: bytes) -> None:
        self._helo("HELO", arg)

    def _helo(self, verb: str, arg: bytes) -> None:
        if len(arg) > MAX_HELO or b" " in arg:
            self._bad_command(BAD_ARGUMENT, "refused.argument", verb=verb)
            return
        self._recipients = 0
        self._forward(verb, verb.encode() + b" " + arg)

    def _cmd_rset(self, arg: bytes) -> None:
        self._forward("RSET", b"RSET")

    def _cmd_noop(self, arg: bytes) -> None:
        self._forward("NOOP", b"NOOP")  # the argument is ignored (section 4.1.1.9); not sent on

    def _cmd_vrfy(self, arg: bytes) -> None:
        if self.policy.allow_vrfy:
            self._forward("VRFY", b"VRFY " + arg)
        else:
            self._refuse(NO_VRFY, "refused.vrfy")

    def _cmd_expn(self, arg: bytes) -> None:
        if self.policy.allow_expn:
            self._forward("EXPN", b"EXPN " + arg)
        else:
            self._refuse(NO_EXPN, "refused.expn")

    def _cmd_mail(self, arg: bytes) -> None:
        utf8 = "SMTPUTF8" in self.offered
        try:
            path = parse_path(arg, b"FROM:", utf8, null_ok=True, postmaster_ok=False)
        except Malformed as exc:
            self._bad_command(BAD_ARGUMENT, "refused.argument", verb="MAIL", detail=str(exc))
            return
        if path.params and not self._params_ok("MAIL", path):
            return
        size = next((int(v) for k, v in path.params if k == "SIZE" and v is not None), 0) if path.params else 0
        if size > self.size_limit:
            self._refuse(TOO_BIG, "refused.size", sender=path.mailbox, size=size, limit=self.size_limit)
            return
        if self.messages >= self.policy.max_messages:
            self._refuse(TOO_MANY_MESSAGES, "refused.too_many_messages", limit=self.policy.max_messages)
            return
        if path.mailbox and self.policy.sender is not None:
            verdict = self.policy.sender(path.mailbox)
            if verdict is not None:
                self._refuse(verdict, "refused.sender", sender=path.mailbox)
                return
        self.messages += 1
        self._recipients = 0
        self._chunked = 0
        self._chunks = None
        self._forward("MAIL", b"MAIL FROM:" + path.wire + format_params(path.params), path)

    def _cmd_rcpt(self, arg: bytes) -> None:
        utf8 = "SMTPUTF8" in self.offered
        try:
            path = parse_path(arg, b"TO:", utf8, null_ok=False, postmaster_ok=True)
        except Malformed as exc:
            self._bad_command(BAD_ARGUMENT, "refused.argument", verb="RCPT", detail=str(exc))
            return
        if path.params and not self._params_ok("RCPT", path):
            return
        if self._recipients >= self.policy.max_recipients:
            self._refuse(TOO_MANY_RECIPIENTS, "refused.too_many_recipients", limit=self.policy.max_recipients)
            return
        if path.mailbox != "postmaster":  # always deliverable (RFC 5321 section 4.5.1)
            hook = self.policy.recipient
            verdict = NO_RELAY if hook is None else hook(path.mailbox)
            if verdict is not None:
                self._refuse(verdict, "refused.recipient", recipient=path.mailbox)
                return
        self._recipients += 1
        self._forward("RCPT", b"RCPT TO:" + path.wire + format_params(path.params), path)

    def _params_ok(self, verb: str, path: Path) -> bool:
        allowed = set()
        for key in self.offered:
            ext = EXTENSIONS.get(key)
            if ext is not None:
                allowed |= ext.mail if verb == "MAIL" else ext.rcpt
        seen = set()
        for key, value in path.params:
            problem = "not offered" if key not in allowed else "twice" if key in seen else param_problem(key, value)
            seen.add(key)
            if problem is not None:
                self._bad_command(BAD_PARAMETER, "refused.parameter", verb=verb, parameter=key, detail=problem)
                return False
        return True

    def _cmd_data(self, arg: bytes) -> None:
        self._forward("DATA", b"DATA")

    def _cmd_starttls(self, arg: bytes) -> None:
        self._forward("STARTTLS", b"STARTTLS")

    def _feed_content(self, data: bytes) -> None:
        content = self._content
        assert content is not None
        chunk = content.feed(data)
        if chunk.forward:
            self._to_server(chunk.forward)
        if not chunk.done:
            return
        self._content = None
        if content.spoilt is not None:
            # The server saw no end of data: closing aborts its transaction.
            self._event("refused.content", reason=content.spoilt.text, size=content.size)
            self._answer(content.spoilt)
            self._release()
            self._close("content_refused")
            return
        # Commands may follow the end of data at once (RFC 2920 section 3.1
        # lists it among no barrier): they are read in the state it leads to.
        self._pending.append(_Pending(END_OF_DATA, size=content.size))
        self._in_flight += 1
        self._expected = after(self._expected, END_OF_DATA)
        if chunk.rest:
            self._client_buf += chunk.rest
            self._read_commands()

    # ---- the server's side --------------------------------------------------------------

    def _read_replies(self) -> None:
        buf = self._server_buf
        limit = self.policy.max_reply_line
        good = GOOD_REPLY_LINE.fullmatch
        while self.state is not State.CLOSED:
            lf = buf.find(b"\n")
            if lf < 0:
                if len(buf) >= limit:
                    self._server_violation(f"reply line over {limit} bytes")
                break
            if lf + 1 > limit:
                self._server_violation(f"reply line over {limit} bytes")
                break
            line = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            if good(line) is None:
                self._server_violation(_reply_problem(line))
                break
            reply = self._reply
            if reply and line[:3] != reply[0][:3]:
                self._server_violation("codes differ within a multiline reply")
                break
            reply.append(line)
            if len(reply) > MAX_REPLY_LINES:
                self._server_violation(f"reply of more than {MAX_REPLY_LINES} lines")
                break
            if line[3:4] != b"-":  # "ddd text" or "ddd": the reply's last line (section 4.2.1)
                self._reply = []
                if len(line) == 5:  # "ddd" alone is sent on as "ddd " and an empty text
                    wire = b"".join(reply[:-1]) + line[:3] + b" \r\n"
                else:
                    wire = line if len(reply) == 1 else b"".join(reply)
                self._on_reply(int(line[:3]), reply, wire)

    def _on_reply(self, code: int, lines: list[bytes], wire: bytes) -> None:
        """A whole reply: ``lines`` with their CRLF, ``wire`` as the client gets it."""
        pending = self._pending
        head = pending[0] if pending else None
        if head is None or head.local is not None:
            if code == 421:  # the server may close at any time (section 3.8)
                self._to_client(wire)
                self._close("server_421")
            else:
                self._server_violation("reply without a command")
            return
        pending.popleft()
        self._in_flight -= 1
        verb = head.verb
        ok = 200 <= code < 300 if verb != "DATA" else code == 354
        if verb == "STARTTLS" and ok and code != 220:
            ok = False
        if ok:
            self.state = after(self.state, verb)
        _REPLY.get(verb, SmtpRelay._reply_plain)(self, head, ok, code, lines, wire)
        if self.state is State.CLOSED:
            return
        expected = self.state
        for p in pending:
            if p.local is None:
                expected = after(expected, p.verb)
        self._expected = expected
        if self._held == verb:
            self._held = None
        if pending and pending[0].local is not None:
            self._release()
        if self._content is None and self.state is not State.TLS:
            if self._client_buf:
                self._read_commands()
            else:
                self._more = False  # what reading an empty buffer would do
        if code == 421:
            self._close("server_421")

    def _release(self) -> None:
        """Send the gateway's own replies that have reached the head of the queue."""
        while self._pending and self._pending[0].local is not None:
            self._to_client(self._pending.popleft().local)  # type: ignore[arg-type]

    def _reply_plain(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        self._to_client(wire)

    def _reply_greeting(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if code not in (220, 421, 554):  # section 4.3.2: the only greetings
            self._server_violation(f"greeting {code}")
            return
        self.state = State.INIT  # after 554 the server answers 503 to all but QUIT (section 3.1)
        self._to_client(wire)

    def _reply_ehlo(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if not ok:
            self._to_client(wire)
            return
        allowed = set(self.policy.extensions) & set(EXTENSIONS)
        if self.policy.starttls == "passthrough" or (self.policy.starttls == "terminate" and self.policy.tls_available):
            allowed.add("STARTTLS")
        reply, self.offered, self.size_limit = rebuild_ehlo(lines, frozenset(allowed), self.policy.max_message_size)
        self._recipients = 0
        self._to_client(reply)

    def _reply_helo(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if ok:
            self.offered = frozenset()
            self.size_limit = self.policy.max_message_size
            self._recipients = 0
        self._to_client(wire)

    def _reply_mail(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if not ok:
            self.messages -= 1
        self._to_client(wire)

    def _reply_rcpt(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if not ok:
            self._recipients -= 1
        self._to_client(wire)

    def _reply_rset(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if ok:
            self._recipients = 0
        self._to_client(wire)

    def _reply_data(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if ok:
            self._content = Content(self.policy.max_text_line, self.size_limit)
        self._to_client(wire)

    def _reply_end_of_data(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        # Whatever the reply, the transaction is over (section 4.1.1.4).
        self.state = State.READY
        self._recipients = 0
        if ok:
            self.delivered += 1
            self._event("message.accepted", size=head.size, code=code)
        else:
            self._event("message.refused_by_server", size=head.size, code=code)
        self._to_client(wire)

    def _reply_quit(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        self._to_client(wire)
        self._close("quit")

    def _reply_starttls(self, head: _Pending, ok: bool, code: int, lines: list[bytes], wire: bytes) -> None:
        if not ok:
            self._to_client(wire)
            return
        if self._server_buf:  # the server's plaintext after its 220: injection (CVE-2011-0411)
            self._server_violation("bytes after the 220 to STARTTLS")
            return
        self.state = State.TLS
        self._held = None
        if self.policy.starttls == "passthrough":
            self._event("tls.passthrough", inspection="off")  # docs/smtp.md: what passthrough gives up
            self._to_client(wire)
            self._out.append(Opaque())
        else:
            self._out.append(StartTls(START_TLS.wire()))


def _reply_problem(line: bytes) -> str:
    """Why a reply line (with its LF) that ``GOOD_REPLY_LINE`` does not match is refused, for the log."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return "bare CR or LF in a reply"
    try:
        parse_reply_line(line[:-2])
    except Malformed as exc:
        return str(exc)
    raise AssertionError(f"a reply line both good and refused: {line!r}")  # GOOD_REPLY_LINE is parse_reply_line's rule


# The handlers by verb, looked up once here rather than by name per command
# and per reply: ``_cmd_<verb>`` for a command, ``_reply_<verb>`` (GREETING
# and END_OF_DATA included) for its reply; a verb without one is forwarded
# as it is, and its reply passed on.
_CMD = {verb: getattr(SmtpRelay, f"_cmd_{verb.lower()}") for verb in COMMANDS
        if hasattr(SmtpRelay, f"_cmd_{verb.lower()}")}
_REPLY = {verb: getattr(SmtpRelay, f"_reply_{verb.lower().strip('<>').replace('-', '_')}")
          for verb in (*COMMANDS, GREETING, END_OF_DATA)
          if hasattr(SmtpRelay, f"_reply_{verb.lower().strip('<>').replace('-', '_')}")}
_REPLY[BDAT_LAST] = SmtpRelay._reply_bdat
_SYNC = frozenset(verb for verb, spec in COMMANDS.items() if spec.sync)
