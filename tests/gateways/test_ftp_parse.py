"""gateways/ftp/parse.py: PORT, EPRT, 227 and 229 parsed strictly and written anew; Hypothesis fuzzes each."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firewall.signalling import Endpoint
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
    split_command,
    strip_telnet,
)

A = ipaddress.IPv4Address


def ep(text: str) -> Endpoint:
    host, port = text.rsplit(":", 1)
    return Endpoint(A(host), int(port))


# ---- PORT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, want",
    [
        (b"192,168,1,10,4,1", "192.168.1.10:1025"),
        (b"0,0,0,0,0,0", "0.0.0.0:0"),
        (b"255,255,255,255,255,255", "255.255.255.255:65535"),
        (b"010,001,1,1,000,21", "10.1.1.1:21"),  # leading zeros are decimal, never octal
    ],
)
def test_port_parses(arg: bytes, want: str) -> None:
    assert parse_port(arg) == ep(want)


@pytest.mark.parametrize(
    "arg",
    [
        b"256,1,1,1,4,1",  # a value past 255
        b"1,1,1,1,4,256",
        b"1,1,1,1,4",  # five fields
        b"1,1,1,1,4,1,1",  # seven
        b"1,1,1,1,,1",  # an empty field
        b"1,1,1,1,4,1,",
        b" 1,1,1,1,4,1",
        b"1,1,1,1,4,1 ",
        b"1.1.1.1,4,1",
        b"a,1,1,1,4,1",
        b"-1,1,1,1,4,1",
        b"+1,1,1,1,4,1",
        b"1111,1,1,1,4,1",  # four digits
        "١,1,1,1,4,1".encode(),  # a non-ASCII digit
        b"",
    ],
)
def test_port_refuses_malformed(arg: bytes) -> None:
    with pytest.raises(Malformed) as err:
        parse_port(arg)
    assert err.value.code == 501


def test_port_format_round_trips() -> None:
    assert format_port(ep("203.0.113.1:50000")) == "203,0,113,1,195,80"
    assert parse_port(format_port(ep("203.0.113.1:50000")).encode()) == ep("203.0.113.1:50000")


# ---- EPRT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, want",
    [
        (b"|1|132.235.1.2|6275|", "132.235.1.2:6275"),  # RFC 2428's own example
        (b"!1!10.0.0.1!65535!", "10.0.0.1:65535"),  # any delimiter 33-126 but a digit
        (b"~1~10.0.0.1~1~", "10.0.0.1:1"),
    ],
)
def test_eprt_parses(arg: bytes, want: str) -> None:
    assert parse_eprt(arg) == ep(want)


@pytest.mark.parametrize(
    "arg, code",
    [
        (b"|2|1080::8:800:200C:417A|5282|", 522),  # IPv6: RFC 2428's answer is 522
        (b"|3|10.0.0.1|5282|", 501),
        (b"|1|10.0.0.1|0|", 501),
        (b"|1|10.0.0.1|65536|", 501),
        (b"|1|10.0.0.256|5000|", 501),
        (b"|1|010.0.0.1|5000|", 501),  # leading zeros are ambiguous (octal to some parsers)
        (b"|1|10.0.0.1|5000", 501),  # no closing delimiter
        (b"|1|10.0.0.1|5000||", 501),
        (b"|1|10.0.0.1|-5|", 501),
        (b"|1|host.example|5000|", 501),
        (b"1|1|10.0.0.1|5000|", 501),  # a digit as delimiter
        (b" |1|10.0.0.1|5000|", 501),
        (b"|", 501),
        (b"", 501),
    ],
)
def test_eprt_refuses(arg: bytes, code: int) -> None:
    with pytest.raises(Malformed) as err:
        parse_eprt(arg)
    assert err.value.code == code


def test_eprt_format() -> None:
    assert format_eprt(ep("203.0.113.1:50000")) == "|1|203.0.113.1|50000|"


# ---- 227 / 229 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        (b"227 Entering Passive Mode (192,168,1,10,195,80).", "192.168.1.10:50000"),
        (b"227 Entering Passive Mode 192,168,1,10,195,80", "192.168.1.10:50000"),  # no brackets
        (b"227 =192,168,1,10,195,80", "192.168.1.10:50000"),
    ],
)
def test_227_parses(text: bytes, want: str) -> None:
    assert parse_227(text) == ep(want)


@pytest.mark.parametrize(
    "text", [b"227 Entering Passive Mode (192,168,1,300,195,80).", b"227 ok", b"227 (1,2,3,4,5)", b"227 (1,2,3,4,5,0256)"]
)
def test_227_refuses(text: bytes) -> None:
    assert parse_227(text) is None


def test_227_and_229_are_written_anew() -> None:
    assert format_227(ep("203.0.113.1:50000")) == b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n"
    assert format_229(50000) == b"229 Entering Extended Passive Mode (|||50000|)\r\n"


@pytest.mark.parametrize(
    "text, want",
    [
        (b"229 Entering Extended Passive Mode (|||6446|)", 6446),
        (b"229 ok (!!!1!)", 1),
        (b"229 (|||0|)", None),
        (b"229 (|||65536|)", None),
        (b"229 (||6446|)", None),
        (b"229 (|!|6446|)", None),
        (b"229 (|||6446)", None),
        (b"229 Entering Extended Passive Mode", None),
    ],
)
def test_229(text: bytes, want: int | None) -> None:
    assert parse_229(text) == want


# ---- lines --------------------------------------------------------------------------------


def test_split_command() -> None:
    assert split_command(b"retr a b") == ("RETR", b"a b")
    assert split_command(b"NOOP") == ("NOOP", None)
    assert split_command(b"NOOP ") == ("NOOP", None)
    assert split_command(b"CD x") is None  # two letters
    assert split_command(b"RETRY x") is None
    assert split_command(b"R3TR x") is None
    assert split_command(b"") is None


def test_strip_telnet() -> None:
    assert strip_telnet(b"\xff\xf4\xff\xf2ABOR") == b"ABOR"  # IAC IP IAC DM before ABOR (RFC 959 4.1.3)
    assert strip_telnet(b"RETR a\xff\xffb") == b"RETR a\xffb"  # IAC IAC is a literal 0xFF
    assert strip_telnet(b"\xff\xfb\x01NOOP") == b"NOOP"  # IAC WILL ECHO
    assert strip_telnet(b"NOOP\xff") == b"NOOP"


def test_reply_lines() -> None:
    assert reply_start(b"220 hi") == reply_start(b"220") != None  # noqa: E711
    assert reply_start(b"220-hi").more
    assert reply_start(b"22 hi") is None
    assert reply_start(b"220hi") is None
    assert reply_start(b"020 hi") is None
    assert ends_reply(b"211 End", 211) and ends_reply(b"211", 211)
    assert not ends_reply(b"211-more", 211) and not ends_reply(b" 211 x", 211)


# ---- Hypothesis: no exception but Malformed escapes; what is written parses back ---------------


@given(st.binary(max_size=60))
def test_fuzz_port(arg: bytes) -> None:
    try:
        got = parse_port(arg)
    except Malformed as err:
        assert err.code == 501
    else:
        assert parse_port(format_port(got).encode()) == got


@given(st.binary(max_size=60))
def test_fuzz_eprt(arg: bytes) -> None:
    try:
        got = parse_eprt(arg)
    except Malformed as err:
        assert err.code in (501, 522)
    else:
        assert parse_eprt(format_eprt(got).encode()) == got


@given(st.binary(max_size=80))
def test_fuzz_replies(text: bytes) -> None:
    at = parse_227(text)
    if at is not None:
        assert parse_227(format_227(at)) == at
    port = parse_229(text)
    if port is not None:
        assert parse_229(format_229(port)) == port
    reply_start(text)
    split_command(text)
    strip_telnet(text)


@given(st.builds(Endpoint, st.builds(A, st.integers(0, 2**32 - 1)), st.integers(0, 65535)))
def test_port_round_trip(at: Endpoint) -> None:
    assert parse_port(format_port(at).encode()) == at
    if at.port:
        assert parse_eprt(format_eprt(at).encode()) == at
    assert parse_227(format_227(at)) == at


# ---- addresses in reply text ---------------------------------------------------------------------

S, W = A("192.168.1.10"), A("203.0.113.1")


def to_router(address: ipaddress.IPv4Address) -> ipaddress.IPv4Address | None:
    return W if address == S else None


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"220 192.168.1.10 ready", b"220 203.0.113.1 ready"),
        (b"227 Entering Passive Mode (192,168,1,10,195,80).", b"227 Entering Passive Mode (203,0,113,1,195,80)."),
        (b"211-at 192.168.1.10:21, again 192.168.1.10.", b"211-at 203.0.113.1:21, again 203.0.113.1."),
        (b"x 1192.168.1.10 192.168.1.100 192.168.1.10.5 2.192.168.1.10", None),  # longer runs: other numbers
        (b"x 192,168,1,10 192,168,1,10,1 192,168,1,10,1,2,3", None),  # commas only as h1..h4 of six numbers
        (b"x 192.168.1.256 vsFTPd 3.0.3", None),
    ],
)
def test_rewrite_addresses(line: bytes, expected: bytes | None) -> None:
    assert rewrite_addresses(line, to_router) == (line if expected is None else expected)


@given(st.binary(max_size=200))
def test_rewrite_addresses_never_raises_and_keeps_what_it_does_not_change(line: bytes) -> None:
    assert rewrite_addresses(line, lambda a: None) == line
    masked = rewrite_addresses(line, lambda a: A("0.0.0.0"))
    assert rewrite_addresses(masked, lambda a: A("0.0.0.0")) == masked  # nothing left to mask
    assert rewrite_addresses(masked, lambda a: None if a == A("0.0.0.0") else A("1.2.3.4")) == masked
