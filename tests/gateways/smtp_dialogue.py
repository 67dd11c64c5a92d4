"""Driving ``SmtpRelay`` in tests: a dialogue as steps, fed whole, byte by byte or split anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from gateways.smtp.core import SmtpRelay
from gateways.smtp.model import Close, Event, Opaque, Output, Policy, StartTls, ToClient, ToServer

ANY = lambda mailbox: None  # noqa: E731 - a recipient hook that lets everything pass

GREETING = b"220 mx.example.com ESMTP\r\n"
EHLO_REPLY = (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
              b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
              b"250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")


@dataclass
class Seen:
    """What a dialogue produced: the bytes each peer got, the events, how it ended."""

    to_client: bytes = b""
    to_server: bytes = b""
    events: list[str] = field(default_factory=list)
    closed: str | None = None
    opaque: bool = False
    start_tls: bytes | None = None

    def take(self, outputs: Iterable[Output]) -> "Seen":
        for out in outputs:
            assert self.closed is None, f"output after close: {out}"
            if isinstance(out, ToClient):
                self.to_client += out.data
            elif isinstance(out, ToServer):
                self.to_server += out.data
            elif isinstance(out, Event):
                self.events.append(out.name)
            elif isinstance(out, Close):
                self.closed = out.reason
            elif isinstance(out, Opaque):
                self.opaque = True
            elif isinstance(out, StartTls):
                self.start_tls = out.reply
        return self

    def replies(self) -> list[bytes]:
        """The client's replies, one entry per final line's code + text."""
        return [line for line in self.to_client.split(b"\r\n") if len(line) > 3 and line[3:4] != b"-"]


Step = tuple[str, bytes]  # ("c" | "s", bytes)


def play(steps: list[Step], policy: Policy = Policy(recipient=ANY), split: int | None = None) -> Seen:
    """Feed ``steps`` in order; ``split``: each step's bytes in pieces of that many bytes, or at one offset (negative)."""
    core = SmtpRelay(policy)
    seen = Seen()
    for side, data in steps:
        feed = core.client_data if side == "c" else core.server_data
        for piece in pieces(data, split):
            seen.take(feed(piece))
            while core.wants_more:  # as the adapter does, once the client has its answers
                seen.take(core.more())
    return seen


def pieces(data: bytes, split: int | None) -> list[bytes]:
    if split is None:
        return [data]
    if split < 0:  # one cut at offset -split
        at = -split
        return [p for p in (data[:at], data[at:]) if p]
    return [data[i:i + split] for i in range(0, len(data), split)]


def session(*middle: Step) -> list[Step]:
    """Greeting, EHLO and its reply, then ``middle``."""
    return [("s", GREETING), ("c", b"EHLO client.example.org\r\n"), ("s", EHLO_REPLY), *middle]


def strict_line_ends(data: bytes) -> bool:
    """Every LF is preceded by CR and every CR followed by LF."""
    return data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


def unchunk(stream: bytes) -> tuple[bytes, list[bytes]]:
    """The server's stream without BDAT chunks, and the chunks' content per transaction (a MAIL starts one).

    Only for dialogues without DATA content: a content line ``BDAT 5`` would read as a command."""
    import re

    lines: list[bytes] = []
    messages: list[bytes] = []
    i = 0
    while i < len(stream):
        lf = stream.find(b"\n", i)
        line = stream[i:lf + 1] if lf >= 0 else stream[i:]
        i += len(line)
        lines.append(line)
        if line.startswith(b"MAIL "):
            messages.append(b"")
        bdat = re.fullmatch(rb"BDAT (\d+)( LAST)?\r\n", line)
        if bdat is not None:
            n = int(bdat[1])
            messages[-1] += stream[i:i + n]
            i += n
    return b"".join(lines), messages
