"""SMTP lines, parsed strictly and written anew: commands, paths and parameters, server replies.

Nothing here forwards a byte it has not understood: a command the core
passes on is rebuilt from its parsed parts (``MAIL FROM:<path> params``),
so a second command or a stray byte cannot ride along inside it. Syntax is
RFC 5321 section 4.1.2 (paths), 4.1.1.11 (parameters), 4.2 (replies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

CRLF = b"\r\n"

# Section 4.5.3.1.3: a path is at most 256 octets with its punctuation.
MAX_PATH = 256
# Section 4.5.3.1.1 and 4.5.3.1.2.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255

_VERB = re.compile(rb"[A-Za-z]{1,16}")
# Printable US-ASCII; with SMTPUTF8 any byte >= 0x80 too (checked as UTF-8 below).
_BAD_ASCII = re.compile(rb"[^\x20-\x7e]")
_BAD_UTF8 = re.compile(rb"[\x00-\x1f\x7f]")


class Malformed(ValueError):
    """A line the gateway refuses; ``str()`` says why, for the log."""


# A whole command line that passes every check of ``split_command`` and the
# core's line-end check, in plain US-ASCII: one match instead of five steps
# for the commands of a message (a line it does not match takes them all).
_GOOD_COMMAND = re.compile(rb"([A-Za-z]{1,16})(?: ([\x20-\x7e]*))?\r\n")


def good_command(line: bytes) -> tuple[str, bytes] | None:
    """(verb upper-cased, argument) of a command line with its CRLF when it is
    plain US-ASCII and well formed, as ``split_command`` gives it; else None,
    and the line takes the checks one by one (which then say why)."""
    m = _GOOD_COMMAND.fullmatch(line)
    if m is None:
        return None
    verb, arg = m.group(1, 2)
    return verb.decode("ascii").upper(), arg or b""


def split_command(line: bytes, utf8: bool) -> tuple[str, bytes]:
    """``VERB[ SP argument]`` of one command line without its CRLF: (verb upper-cased, argument)."""
    bad = (_BAD_UTF8 if utf8 else _BAD_ASCII).search(line)
    if bad is not None:
        raise Malformed(f"byte {line[bad.start()]:#04x} at {bad.start()}")
    if utf8:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("not UTF-8") from None
    verb, sep, arg = line.partition(b" ")
    if not _VERB.fullmatch(verb):
        raise Malformed("no verb")
    if sep and not arg:
        arg = b""
    return verb.decode("ascii").upper(), arg


def _atext(utf8: bool) -> bytes:
    return rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-" + (rb"\x80-\xff" if utf8 else b"") + rb"]"


def _label(utf8: bool) -> bytes:
    ch = rb"[A-Za-z0-9" + (rb"\x80-\xff" if utf8 else b"") + rb"]"
    return ch + rb"(?:[A-Za-z0-9\-" + (rb"\x80-\xff" if utf8 else b"") + rb"]*" + ch + rb")?"


def _path_regex(utf8: bool) -> re.Pattern[bytes]:
    atext = _atext(utf8)
    dot_string = atext + rb"+(?:\." + atext + rb"+)*"
    quoted = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + (rb"\x80-\xff" if utf8 else b"") + rb']|\\[\x20-\x7e])*"'
    label = _label(utf8)
    domain = label + rb"(?:\." + label + rb")*"
    literal = rb"\[[\x21-\x5a\x5e-\x7e]+\]"
    route = rb"(?:@" + domain + rb"(?:,@" + domain + rb")*:)?"
    box = rb"(?P<local>" + dot_string + rb"|" + quoted + rb")@(?P<domain>" + domain + rb"|" + literal + rb")"
    return re.compile(rb"<" + route + rb"(?:(?P<box>" + box + rb")|(?P<postmaster>[Pp][Oo][Ss][Tt][Mm][Aa][Ss][Tt][Ee][Rr]))?>")


_PATHS = {False: _path_regex(False), True: _path_regex(True)}
_PARAM = re.compile(rb"(?P<key>[A-Za-z0-9][A-Za-z0-9\-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")


class Path(NamedTuple):
    """A parsed MAIL or RCPT argument: the mailbox ("" for <>), the path as it will be sent, the parameters.

    A named tuple: made for every MAIL and RCPT, at a third of a frozen dataclass's cost."""

    mailbox: str  # local@domain, or "postmaster", or "" (the null reverse-path)
    domain: str  # lower-case; "" for the null path and <postmaster>
    wire: bytes  # <mailbox>, any source route dropped (section 4.1.2: SHOULD ignore it)
    params: tuple[tuple[str, bytes | None], ...]  # (KEYWORD upper-cased, value)


def parse_path(arg: bytes, prefix: bytes, utf8: bool, *, null_ok: bool, postmaster_ok: bool) -> Path:
    """``FROM:<path> [params]`` / ``TO:<path> [params]`` (section 4.1.1.2, 4.1.1.3).

    A space after the colon is tolerated, as most servers do; it is not sent on."""
    if arg[: len(prefix)].upper() != prefix:
        raise Malformed(f"expected {prefix.decode()}")
    rest = arg[len(prefix):].lstrip(b" ")
    m = _PATHS[utf8].match(rest)
    if m is None:
        raise Malformed("bad path")
    end = m.end()
    if end > MAX_PATH:
        raise Malformed("path too long")
    box, local, domain, postmaster = m.group("box", "local", "domain", "postmaster")
    if box:
        if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
            raise Malformed("local part or domain too long")
        mailbox = box.decode("utf-8", "surrogateescape")
        dom = domain.decode("utf-8", "surrogateescape").lower()
        wire = b"<" + box + b">"
    elif postmaster:
        if not postmaster_ok:
            raise Malformed("postmaster without a domain")
        mailbox, dom, wire = "postmaster", "", b"<" + postmaster + b">"
    else:
        if not null_ok:
            raise Malformed("empty path")
        mailbox, dom, wire = "", "", b"<>"
    if end == len(rest):
        return Path(mailbox, dom, wire, ())
    tail = rest[end:]
    params = []
    if tail:
        if not tail.startswith(b" "):
            raise Malformed("junk after the path")
        for word in tail[1:].split(b" "):
            pm = _PARAM.fullmatch(word)
            if pm is None:
                raise Malformed("bad parameter")
            params.append((pm.group("key").decode().upper(), pm.group("value")))
    return Path(mailbox, dom, wire, tuple(params))


def format_params(params: tuple[tuple[str, bytes | None], ...]) -> bytes:
    if not params:
        return b""
    return b"".join(b" " + k.encode() + (b"=" + v if v is not None else b"") for k, v in params)


def param_problem(key: str, value: bytes | None) -> str | None:
    """Why a parameter's value is wrong (RFC 1870, 6152, 6531, 3461), or None."""
    if key == "SIZE":
        return None if value is not None and value.isdigit() and len(value) <= 20 else "SIZE=<digits>"
    if key == "BODY":
        return None if value is not None and value.upper() in (b"7BIT", b"8BITMIME") else "BODY=7BIT|8BITMIME"
    if key == "SMTPUTF8":
        return None if value is None else "SMTPUTF8 takes no value"
    if key == "RET":
        return None if value is not None and value.upper() in (b"FULL", b"HDRS") else "RET=FULL|HDRS"
    if key in ("ENVID", "ORCPT"):
        return None if value is not None and _XTEXT.fullmatch(value) else f"{key}=<xtext>"
    if key == "NOTIFY":
        if value is None:
            return "NOTIFY=<list>"
        words = value.upper().split(b",")
        if words == [b"NEVER"] or (len(set(words)) == len(words) and set(words) <= {b"SUCCESS", b"FAILURE", b"DELAY"}):
            return None
        return "NOTIFY=NEVER|SUCCESS,FAILURE,DELAY"
    return "unknown parameter"


# ---- replies ---------------------------------------------------------------------------

_REPLY = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.S)
_BAD_REPLY_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A whole reply line with its CRLF that passes every check the core makes
# (CRLF only at its end, ``parse_reply_line``'s code and form, no control
# byte but HT): one match per line; a line it does not match takes the
# checks one by one, which say why it is refused.
GOOD_REPLY_LINE = re.compile(rb"[2-5][0-5][0-9](?:[ -][\x09\x20-\x7e\x80-\xff]*)?\r\n")


@dataclass(frozen=True)
class ReplyLine:
    code: int
    last: bool  # "ddd text" or "ddd": the reply's final line (section 4.2.1)
    text: bytes


def parse_reply_line(line: bytes) -> ReplyLine:
    """One reply line without its CRLF (section 4.2: Reply-code [ SP / "-" textstring ])."""
    m = _REPLY.fullmatch(line)
    if m is None:
        raise Malformed("not a reply line")
    bad = _BAD_REPLY_BYTE.search(line)
    if bad is not None:
        raise Malformed(f"byte {line[bad.start()]:#04x} in a reply")
    return ReplyLine(int(m.group(1)), m.group(2) != b"-", m.group(3) or b"")


def format_reply(code: int, texts: list[bytes]) -> bytes:
    """A whole reply: ``code-text`` lines and a last ``code text`` line."""
    c = str(code).encode()
    out = [c + b"-" + t + CRLF for t in texts[:-1]]
    out.append(c + b" " + texts[-1] + CRLF)
    return b"".join(out)


def rebuild_ehlo(lines: list[bytes], allowed: frozenset[str], max_size: int) -> tuple[bytes, frozenset[str], int]:
    """The server's positive EHLO reply from its allow-listed keywords only (section 4.1.1.1).

    ``lines`` are the reply's lines with their CRLF, each checked
    (``GOOD_REPLY_LINE``). Returns the reply, the keywords it offers and
    the SIZE it announces: the server's, or ``max_size`` when that is
    smaller or the server sets none (RFC 1870 section 4: SIZE 0 or no
    number is "no fixed limit")."""
    texts = [lines[0][4:-2]]
    offered = set()
    size = max_size
    for line in lines[1:]:
        words = line[4:-2].split()
        if not words:
            continue
        key = words[0].decode("ascii", "replace").upper()
        if key not in allowed or key in offered:
            continue
        if key == "SIZE":
            theirs = int(words[1]) if len(words) > 1 and words[1].isdigit() and len(words[1]) <= 20 else 0
            size = min(max_size, theirs) if theirs else max_size
            texts.append(b"SIZE %d" % size)
        else:
            texts.append(key.encode())  # the keyword alone: what parameters we check is ours to say
        offered.add(key)
    return format_reply(int(lines[0][:3]), texts), frozenset(offered), size
