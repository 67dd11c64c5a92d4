"""A message's content after 354, read by the gateway itself: the end of data, dots, line ends, size.

This is what makes the gateway immune to SMTP smuggling (CVE-2023-51764,
-51765, -51766 class): the end of the content is CRLF "." CRLF and nothing
else (RFC 5321 section 4.1.1.4), a lone CR or LF is never forwarded
(section 2.3.8: they "MUST NOT" be sent except as CRLF), and the gateway
un-dots and re-dots every line (section 4.5.2), and a NUL, which some
servers drop, is refused too and writes the end-of-data
itself. What the server receives is therefore one message with the end
the gateway saw, whatever its own parser accepts as an end.

It works on whole chunks, not bytes (issue 10, item 3: no per-byte Python
on the hot path): a chunk's complete lines are split at CRLF once, a CR or
LF left in their texts is a bare one, the longest text finds an over-long
line, and only the rare lines that start with a dot are touched.

When a chunk breaks a rule, the content is spoilt: nothing more of it is
forwarded, the rest is read up to the strict end and dropped, and the core
answers with the refusal and closes both legs. The server never sees an
end-of-data, so it delivers nothing of that message (RFC 5321 section 3.8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateways.smtp.model import Reply

END = b"\r\n.\r\n"
FIRST_LINE_END = b".\r\n"  # the end of an empty message, right after 354
# Single bytes are looked for as ints (``_CR in data``): ``b"\r" in data``
# first tries its operand as an int, and raises and clears a TypeError each
# time (about 1 µs, more than the search in a 2 KB message).
_CR, _LF, _NUL = 0x0D, 0x0A, 0x00
# A line that begins with one dot (a line that begins with two keeps both:
# un-dotting takes one, re-dotting puts it back).
_UNSTUFFED = re.compile(rb"(?m)^\.(?!\.)")

BARE_LINE_END = Reply(554, "5.6.0", "Bare CR or LF in message content; message refused")
# RFC 5322 section 3.5 and RFC 6152 section 3 keep NUL out of message text;
# servers that drop NULs would turn CRLF NUL "." CRLF into an end of data.
NUL_IN_CONTENT = Reply(554, "5.6.0", "NUL in message content; message refused")
TEXT_LINE_TOO_LONG = Reply(554, "5.6.0", "Message line too long (RFC 5321 section 4.5.3.1.6); message refused")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


@dataclass
class Chunk:
    forward: bytes  # content for the server (with the gateway's own end-of-data when done)
    done: bool  # the end of data was read
    rest: bytes  # bytes after the end of data: the next commands


class Content:
    """One message's content: ``feed`` chunks until ``done``; ``spoilt`` says why it was refused."""

    def __init__(self, max_line: int, max_size: int) -> None:
        self.max_line = max_line  # with its CRLF
        self.max_size = max_size
        self._tail = b""  # an incomplete last line (or, once spoilt, the last 4 bytes)
        self._bol = True  # the tail starts a line
        self.size = 0
        self.spoilt: Reply | None = None

    def feed(self, data: bytes) -> Chunk:
        buf = self._tail + data if self._tail else data
        if self.spoilt is not None:
            return self._discard(buf)
        if self._bol and buf.startswith(FIRST_LINE_END):
            end, after = 0, len(FIRST_LINE_END)
        else:
            i = buf.find(END)
            end, after = (i + 2, i + len(END)) if i >= 0 else (-1, -1)
        if end >= 0:
            content, tail = buf[:end], b""
        else:
            last = buf.rfind(b"\n") + 1
            content, tail = buf[:last], buf[last:]
        problem = self._check(content, tail if end < 0 else b"")
        if problem is not None:
            self.spoilt = problem
            if end >= 0:
                return Chunk(b"", True, buf[after:])
            self._tail, self._bol = buf[-4:], False
            return Chunk(b"", False, b"")
        if content.startswith(b".") or content.find(b"\n.") >= 0:
            content = _UNSTUFFED.sub(b"", content)
        self.size += len(content)
        if self.size > self.max_size:
            self.spoilt = TOO_BIG
            if end >= 0:
                return Chunk(b"", True, buf[after:])
            self._tail, self._bol = buf[-4:], False
            return Chunk(b"", False, b"")
        if end >= 0:
            self._tail = b""
            return Chunk(content + FIRST_LINE_END, True, buf[after:])
        self._tail = tail
        return Chunk(content, False, b"")

    def _check(self, content: bytes, tail: bytes) -> Reply | None:
        # ``content`` is whole lines. Split at CRLF, its lines' texts: a CR or
        # LF left in them is a bare one (CRLF cannot overlap itself, so every
        # pair is cut out), and the longest text is the longest line less its
        # CRLF. One split, one join and three searches in C: about 3x faster
        # than counting CR, LF and CRLF apart and splitting at LF (the lines'
        # longest by split is ~50x faster than a [^\n]{n} search).
        texts = content.split(b"\r\n")
        joined = b"".join(texts)
        if _CR in joined or _LF in joined:
            return BARE_LINE_END
        cr = tail.find(b"\r")
        if cr >= 0 and cr != len(tail) - 1 or _LF in tail:
            return BARE_LINE_END
        if len(tail) >= self.max_line or (content and max(map(len, texts)) + 1 >= self.max_line):
            return TEXT_LINE_TOO_LONG
        if _NUL in joined or _NUL in tail:
            return NUL_IN_CONTENT
        return None

    def _discard(self, buf: bytes) -> Chunk:
        """Spoilt: drop everything up to the strict end of data."""
        if self._bol and buf.startswith(FIRST_LINE_END):
            return Chunk(b"", True, buf[len(FIRST_LINE_END):])
        i = buf.find(END)
        if i >= 0:
            self._tail = b""
            return Chunk(b"", True, buf[i + len(END):])
        self._tail, self._bol = buf[-4:], False
        return Chunk(b"", False, b"")


class Chunks:
    """One message's BDAT content (RFC 3030): ``check`` each piece as it streams to the server.

    Chunk bytes are not dot-stuffed and have no end marker (the size says
    where a chunk ends), so nothing is rewritten. The policy is the same as
    for DATA content all the same: CRLF is the only line end (a CRLF may be
    split between two pieces or two chunks: a CR that ends one piece must
    meet an LF first in the next), no NUL, no line over ``max_line`` bytes
    with its CRLF. 8-bit bytes pass, as after DATA: BODY= is the server's to
    judge. A piece that breaks a rule may already have a part of its chunk
    at the server, so the core closes both legs: the transaction the server
    never saw end is aborted (RFC 5321 section 3.8). ``finish`` checks the
    message's end after the LAST chunk (no CR left alone).
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line  # with its CRLF
        self._line = 0  # bytes of the current line so far (its CR included)
        self._cr = False  # the last piece ended with a CR

    def check(self, data: bytes) -> Reply | None:
        if not data:
            return None
        if _NUL in data:
            return NUL_IN_CONTENT
        joined = b"\r" + data if self._cr else data
        self._cr = joined.endswith(b"\r")
        body = joined[:-1] if self._cr else joined
        lf = body.count(b"\n")
        if lf != body.count(b"\r") or lf != body.count(b"\r\n"):
            return BARE_LINE_END
        first = data.find(b"\n")
        if first < 0:
            self._line += len(data)
        else:
            last = data.rfind(b"\n")
            if self._line + first >= self.max_line:
                return TEXT_LINE_TOO_LONG
            # The longest whole line: split is ~50x faster than a [^\n]{n} search (2 ms per 64 KiB).
            if last > first and max(map(len, data[first + 1:last].split(b"\n"))) >= self.max_line:
                return TEXT_LINE_TOO_LONG
            self._line = len(data) - last - 1
        if self._line >= self.max_line:
            return TEXT_LINE_TOO_LONG
        return None

    def finish(self) -> Reply | None:
        return BARE_LINE_END if self._cr else None
