"""The FTP lines the gateway must understand, parsed strictly and regenerated.

Pure functions, no state. The gateway never forwards the peer's own bytes for
the four lines that carry a data address (STYLE.md; the issue's item 1): it
parses them here, checks the values, and writes a new line with
``format_*``. What a parser refuses comes back as ``Malformed`` with the
reply code the client should get.

- PORT h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2): exactly six decimal fields,
  each 0-255.
- EPRT <d>net<d>addr<d>port<d> (RFC 2428 section 2): the delimiter is any
  printable ASCII character but a digit; net 1 is IPv4 (dotted decimal), 2
  IPv6 (RFC 4291 section 2.2 text). The session's own family is the only
  one taken (its control connection's: a data connection never changes
  family through the gateway); the other is answered 522 naming it, as RFC
  2428 section 2 asks of a server that does not support a family.
- 227 reply (RFC 959 section 4.2.2; RFC 1123 section 4.1.2.6: the numbers
  are found by scanning the text, whose wording varies between servers).
- 229 reply (RFC 2428 section 3): "(<d><d><d>port<d>)".
- Addresses in reply text (``rewrite_addresses``): dotted quads, and the
  four address numbers of a 227-style "h1,h2,h3,h4,p1,p2", each put
  through a function that keeps, replaces or masks it; IPv6 addresses in
  RFC 4291 section 2.2 text likewise (``rewrite_addresses6``).

Telnet (RFC 854) and the FTP command line (RFC 959 section 5.3): a line ends
at LF (CR LF, or a bare LF from a lax peer); IAC sequences are removed
(``strip_telnet``) before the verb is read, because a client may put
``IAC IP IAC DM`` in front of ABOR (RFC 959 section 4.1.3).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from firewall.signalling import Endpoint

IAC = 255
_TELNET_OPTION_VERBS = range(251, 255)  # WILL, WONT, DO, DONT: IAC, verb, option
_VERB = re.compile(rb"[A-Za-z]{3,4}")  # RFC 959 section 5.3.1: commands are 3 or 4 letters
_DIGITS = re.compile(r"[0-9]{1,3}")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_H227 = re.compile(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")
_H229 = re.compile(r"\(([\x21-\x7e])\1\1([0-9]{1,5})\1\)")
# An IPv4 address in text: a dotted quad that is not part of a longer run of
# numbers and dots, or the first four numbers of six comma-separated ones
# (a 227's h1,h2,h3,h4,p1,p2, RFC 959 section 4.1.2).
_TEXT_ADDRESS = re.compile(
    rb"(?<![0-9.])([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9]|\.[0-9])"
    rb"|(?<![0-9,])([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3})(?=,[0-9]{1,3},[0-9]{1,3}(?![0-9,]))"
)


class Malformed(ValueError):
    """A command argument the gateway refuses: reply ``code`` with ``text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


# ---- lines -------------------------------------------------------------------------------


def strip_telnet(line: bytes) -> bytes:
    """``line`` without Telnet IAC sequences (RFC 854); IAC IAC is a literal 0xFF."""
    if IAC not in line:
        return line
    out = bytearray()
    i, n = 0, len(line)
    while i < n:
        b = line[i]
        if b != IAC:
            out.append(b)
            i += 1
        elif i + 1 < n and line[i + 1] == IAC:
            out.append(IAC)
            i += 2
        elif i + 1 < n and line[i + 1] in _TELNET_OPTION_VERBS:
            i += 3
        else:
            i += 2
    return bytes(out)


def split_command(line: bytes) -> tuple[str, bytes | None] | None:
    """(VERB, argument or None) of a command line without its line end; None if no verb.

    The verb is upper-cased; the argument is what follows the first space,
    unchanged (paths are bytes, RFC 2640). "CMD " with nothing after it has
    an empty argument, which the command table treats as none.
    """
    verb, sep, arg = line.partition(b" ")
    if not _VERB.fullmatch(verb):
        return None
    return verb.decode("ascii").upper(), (arg if sep and arg else None)


@dataclass(frozen=True)
class ReplyLine:
    """One line of a server reply: its code and whether more lines follow (RFC 959 section 4.2)."""

    code: int
    more: bool  # "ddd-": the first line of a multi-line reply


def reply_start(line: bytes) -> ReplyLine | None:
    """The code of a line that starts a reply ("ddd text", "ddd-text", "ddd"), or None."""
    if len(line) < 3 or not line[:3].isdigit() or line[0:1] == b"0":
        return None
    if len(line) == 3:
        return ReplyLine(int(line[:3]), False)
    sep = line[3:4]
    if sep == b"-":
        return ReplyLine(int(line[:3]), True)
    if sep == b" ":
        return ReplyLine(int(line[:3]), False)
    return None


def ends_reply(line: bytes, code: int) -> bool:
    """Whether ``line`` is the last line of a multi-line reply with ``code``: "ddd text" or "ddd"."""
    head = b"%03d" % code
    return line == head or line.startswith(head + b" ")


# ---- PORT / EPRT ---------------------------------------------------------------------------


def parse_port(arg: bytes) -> Endpoint:
    """PORT's h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2). Raises ``Malformed`` (501)."""
    try:
        text = arg.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed(501, "PORT takes six numbers: h1,h2,h3,h4,p1,p2") from None
    fields = text.split(",")
    if len(fields) != 6 or not all(_DIGITS.fullmatch(f) for f in fields):
        raise Malformed(501, "PORT takes six numbers: h1,h2,h3,h4,p1,p2")
    values = [int(f) for f in fields]
    if any(v > 255 for v in values):
        raise Malformed(501, "PORT numbers are 0 to 255")
    address = ipaddress.IPv4Address(bytes(values[:4]))
    return Endpoint(address, values[4] * 256 + values[5])


def format_port(at: Endpoint) -> str:
    """The argument of a PORT command, or the numbers of a 227 reply."""
    h = str(at.address).replace(".", ",")
    return f"{h},{at.port >> 8},{at.port & 0xFF}"


def parse_eprt(arg: bytes, net: int = 1) -> Endpoint:
    """EPRT's <d>net<d>addr<d>port<d> (RFC 2428 section 2), for a session of network protocol
    ``net`` (1 IPv4, 2 IPv6). Raises ``Malformed`` (501, or 522 for the other family)."""
    usage = f"EPRT takes |{net}|address|port|"
    try:
        text = arg.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed(501, usage) from None
    if len(text) < 2 or not "\x21" <= text[0] <= "\x7e" or text[0].isdigit():
        raise Malformed(501, usage)
    d = text[0]
    fields = text[1:].split(d)
    if len(fields) != 4 or fields[3] != "":
        raise Malformed(501, usage)
    family, host, port = fields[:3]
    if family not in ("1", "2"):
        raise Malformed(501, "EPRT network protocol must be 1 (IPv4) or 2 (IPv6)")
    if family != str(net):
        raise Malformed(522, f"Network protocol not supported, use ({net})")
    try:
        # No zone index ("%eth0"): a link-local data address names no host beyond a link.
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(host) if net == 1 else ipaddress.IPv6Address(host))
        if net == 2 and ("%" in host or address.ipv4_mapped is not None):  # type: ignore[union-attr]
            raise ValueError(host)
    except ValueError:
        kind = "an IPv4 address in dotted decimal" if net == 1 else "an IPv6 address (RFC 4291 text, no zone, not IPv4-mapped)"
        raise Malformed(501, f"EPRT address is not {kind}") from None
    if not _PORT_DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise Malformed(501, "EPRT port must be 1 to 65535")
    return Endpoint(address, int(port))


def format_eprt(at: Endpoint) -> str:
    return f"|{1 if at.address.version == 4 else 2}|{at.address}|{at.port}|"


# ---- 227 / 229 ------------------------------------------------------------------------------


def parse_227(text: bytes) -> Endpoint | None:
    """The address and port of a 227 reply's text, or None (RFC 1123 section 4.1.2.6: scan for them)."""
    m = _H227.search(text.decode("latin-1"))
    if m is None:
        return None
    values = [int(v) for v in m.groups()]
    if any(v > 255 for v in values) or any(len(v) > 3 for v in m.groups()):
        return None
    return Endpoint(ipaddress.IPv4Address(bytes(values[:4])), values[4] * 256 + values[5])


def format_227(at: Endpoint) -> bytes:
    return f"227 Entering Passive Mode ({format_port(at)}).\r\n".encode("ascii")


def parse_229(text: bytes) -> int | None:
    """The port of a 229 reply's text, "(|||port|)", or None (RFC 2428 section 3)."""
    m = _H229.search(text.decode("latin-1"))
    if m is None:
        return None
    port = int(m.group(2))
    return port if 1 <= port <= 65535 else None


def format_229(port: int) -> bytes:
    return f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode("ascii")


# ---- addresses in reply text ------------------------------------------------------------


def rewrite_addresses(
    line: bytes, change: Callable[[ipaddress.IPv4Address], ipaddress.IPv4Address | None]
) -> bytes:
    """``line`` with each IPv4 address it names (``_TEXT_ADDRESS``) put through ``change``:
    None keeps it, an address replaces it, written the same way (dots or commas)."""
    if not _HAS_DIGIT.search(line):
        return line

    def one(m: re.Match[bytes]) -> bytes:
        dotted = m.group(1) is not None
        parts = m.groups()[:4] if dotted else m.groups()[4:]
        values = [int(v) for v in parts]
        if any(v > 255 for v in values):
            return m.group(0)
        new = change(ipaddress.IPv4Address(bytes(values)))
        if new is None:
            return m.group(0)
        return str(new).encode("ascii") if dotted else str(new).replace(".", ",").encode("ascii")

    return _TEXT_ADDRESS.sub(one, line)


_HAS_DIGIT = re.compile(rb"[0-9]")

# An IPv6 address in text (RFC 4291 section 2.2, embedded IPv4 included): a
# run of hex digits, colons and dots with two colons at least, not part of a
# longer word. Times ("22:13") have one colon; "12:30:45" is no address.
_TEXT_ADDRESS6 = re.compile(rb"(?<![0-9A-Za-z:.])[0-9A-Fa-f]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?![0-9A-Za-z:])")


def rewrite_addresses6(
    line: bytes, change: Callable[[ipaddress.IPv6Address], ipaddress.IPv6Address | None]
) -> bytes:
    """``line`` with each IPv6 address it names (``_TEXT_ADDRESS6``) put through ``change``:
    None keeps it, an address replaces it (compressed, RFC 5952). A full stop after an
    address ends a sentence: it is kept, not read as part of the address."""
    if b":" not in line:
        return line

    def one(m: re.Match[bytes]) -> bytes:
        text = m.group(0)
        stop = len(text.rstrip(b"."))
        try:
            address = ipaddress.IPv6Address(text[:stop].decode("ascii"))
        except ValueError:
            return text
        new = change(address)
        return text if new is None else str(new).encode("ascii") + text[stop:]

    return _TEXT_ADDRESS6.sub(one, line)
