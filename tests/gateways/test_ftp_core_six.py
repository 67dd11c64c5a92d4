"""gateways/ftp/core.py over IPv6 (issue 17; RFC 2428): a session whose parties are IPv6 speaks EPRT |2|
and EPSV only; PORT, PASV and the IPv4 network protocol are answered 522 by the gateway, never
forwarded, and no 227 answers anything. Playbooks, every chunking, and the same checks as IPv4."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firewall.signalling import Endpoint, RuleMode
from gateways.ftp.core import DataChannel, DataMode, Direction, FtpControl, Parties, Policy, RequestRule, ToClient, ToServer
from gateways.ftp.parse import Malformed, format_eprt, parse_eprt, rewrite_addresses6
from tests.gateways.ftp_dialogue import LOGIN, Driver, every_chunking, run
from tests.gateways.test_ftp_core import no_events

A6 = ipaddress.IPv6Address
C6, S6, THIRD6 = A6("2001:db8:2::10"), A6("fd00:1::10"), A6("2001:db8:2::99")
# Routed IPv6 (the dual lab): the client addresses the server itself, which sees the client.
INBOUND6 = Parties(client=C6, server=S6, client_addressed=S6, client_seen_as=C6)
OUTBOUND6 = Parties(client=S6, server=C6, client_addressed=C6, client_seen_as=S6)


def ep(addr: ipaddress.IPv6Address, port: int) -> Endpoint:
    return Endpoint(addr, port)


def logged_in(parties: Parties = INBOUND6, policy: Policy = Policy()) -> Driver:
    d = Driver(parties, policy)
    for side, data in LOGIN:
        (d.client if side == "client" else d.server)(data)
    d.t.to_client = d.t.to_server = b""
    d.t.events.clear()
    return d


def test_playbook_epsv_over_ipv6() -> None:
    """EPSV (and EPSV 2) goes to the server; its 229 waits for the ALLOW to S6:p, then reaches the client."""
    for verb in (b"EPSV", b"EPSV 2"):
        c = logged_in().core
        assert c.client_data(verb + b"\r\n") == [ToServer(verb + b"\r\n")]
        reply = b"229 Entering Extended Passive Mode (|||50003|)\r\n"
        assert no_events(c.server_data(reply)) == [
            RequestRule(1, Direction.PASSIVE, ep(C6, 0), ep(S6, 50003), RuleMode.ALLOW, False)]
        assert no_events(c.rule_answered(1, True)) == [ToClient(reply)]


def test_playbook_eprt_over_ipv6() -> None:
    """EPRT |2| (any delimiter) is checked and written anew; after the 200 the server's data connection
    from S6 (any port) to C6:p is asked for, here in inspect mode a REDIRECT."""
    c = logged_in(policy=Policy(data_channel=DataChannel.INSPECT)).core
    assert c.client_data(b"EPRT !2!2001:DB8:2:0::10!50002!\r\n") == [ToServer(b"EPRT |2|2001:db8:2::10|50002|\r\n")]
    assert c.client_data(b"RETR f\r\n") == []  # held until the rule is in
    assert no_events(c.server_data(b"200 EPRT command successful.\r\n")) == [
        RequestRule(1, Direction.ACTIVE, ep(S6, 0), ep(C6, 50002), RuleMode.REDIRECT, True)]
    assert no_events(c.rule_answered(1, True)) == [ToClient(b"200 EPRT command successful.\r\n"), ToServer(b"RETR f\r\n")]


@pytest.mark.parametrize("line, code, text", [
    (b"PORT 203,0,113,10,195,80", b"522", b"use EPRT (2)"),  # PORT cannot carry an IPv6 address
    (b"PASV", b"522", b"use EPSV (2)"),  # nor PASV's 227
    (b"EPRT |1|203.0.113.10|50000|", b"522", b"use (2)"),  # the other family: RFC 2428 section 2
    (b"EPSV 1", b"522", b"use (2)"),
])
def test_ipv4_data_commands_are_refused_on_an_ipv6_session(line: bytes, code: bytes, text: bytes) -> None:
    """Answered by the gateway (a policy refusal, not a bad command), never forwarded, no rule."""
    d = logged_in()
    d.client(line + b"\r\n")
    assert d.t.to_server == b"" and d.t.rules == []
    (reply,) = d.t.client_lines()
    assert reply.startswith(code + b" ") and text in reply, reply
    assert d.t.names() == ["refused.family"]
    d.client(b"NOOP\r\n")
    assert d.t.to_server == b"NOOP\r\n"  # the session goes on


def test_eprt_over_ipv6_is_checked_as_port_is() -> None:
    """A third host (the bounce), the server itself, a privileged port, a malformed address: 501,
    never forwarded; the sixth bad command closes the session."""
    d = logged_in()
    for arg in (f"|2|{THIRD6}|50000|", f"|2|{S6}|50000|", f"|2|{C6}|21|", "|2|2001:db8:2::g|50000|",
                "|2|::ffff:203.0.113.10|50000|", "|2|fe80::1%eth0|50000|"):
        d.client(b"EPRT " + arg.encode() + b"\r\n")
    assert d.t.to_server == b"" and d.t.rules == []
    assert [line[:4] for line in d.t.client_lines()] == [b"501 "] * 5 + [b"421 "]
    assert "refused.bounce" in d.t.names() and "refused.privileged_port" in d.t.names()


def test_a_227_on_an_ipv6_session_is_never_acted_on() -> None:
    """No PASV is ever forwarded on an IPv6 session, so a 227 answers nothing: its code and address
    never reach the client, and no rule is asked for."""
    d = logged_in()
    d.client(b"NOOP\r\n")
    d.server(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")
    assert d.t.rules == [] and d.t.client_lines() == [b"451 Reply not expected here; dropped by the firewall."]


def test_data_modes_over_ipv6_send_the_server_eprt_and_epsv() -> None:
    """data_mode active: the client's EPSV reaches the server as EPRT |2| to the client's address as
    the server sees it; data_mode passive: the client's EPRT reaches it as EPSV, whose 229 gives the
    port the gateway connects to."""
    c = FtpControl(INBOUND6, Policy(data_mode=DataMode.ACTIVE), data_port=lambda: 50000)
    for side, data in LOGIN:
        (c.client_data if side == "client" else c.server_data)(data)
    assert no_events(c.client_data(b"EPSV\r\n")) == [ToServer(b"EPRT |2|2001:db8:2::10|50000|\r\n")]
    assert no_events(c.server_data(b"200 EPRT command successful.\r\n")) == [
        RequestRule(1, Direction.ACTIVE, ep(S6, 0), ep(C6, 50000), RuleMode.REDIRECT, False, True, 1)]
    assert no_events(c.rule_answered(1, True)) == [
        RequestRule(2, Direction.PASSIVE, ep(C6, 0), ep(S6, 50000), RuleMode.REDIRECT, False, False, 1)]
    assert no_events(c.rule_answered(2, True)) == [ToClient(b"229 Entering Extended Passive Mode (|||50000|)\r\n")]

    c = FtpControl(OUTBOUND6, Policy(data_mode=DataMode.PASSIVE))
    for side, data in LOGIN:
        (c.client_data if side == "client" else c.server_data)(data)
    assert no_events(c.client_data(f"EPRT |2|{S6}|40000|\r\n".encode())) == [ToServer(b"EPSV\r\n")]
    assert no_events(c.server_data(b"229 Entering Extended Passive Mode (|||50001|)\r\n")) == [
        RequestRule(1, Direction.PASSIVE, ep(S6, 0), ep(C6, 50001), RuleMode.ORIGINATE, False, True, 1)]
    assert no_events(c.rule_answered(1, True)) == [
        RequestRule(2, Direction.ACTIVE, ep(C6, 0), ep(S6, 40000), RuleMode.ORIGINATE, False, False, 1)]
    assert no_events(c.rule_answered(2, True)) == [ToClient(b"200 EPRT command successful.\r\n")]


def test_an_ipv6_dialogue_gives_one_transcript_in_every_chunking() -> None:
    steps = LOGIN + [
        ("client", b"EPSV\r\n"), ("server", b"229 Entering Extended Passive Mode (|||50003|)\r\n"),
        ("client", b"PASV\r\nEPRT |2|2001:db8:2::10|50002|\r\n"), ("server", b"200 EPRT command successful.\r\n"),
        ("client", b"QUIT\r\n"), ("server", b"221 Goodbye.\r\n"),
    ]
    first = run(steps, parties=INBOUND6)
    assert len(first.rules) == 2 and b"522 " in first.to_client
    for name, chunker in every_chunking(steps):
        assert run(steps, parties=INBOUND6, chunker=chunker).same_as(first), name


@pytest.mark.parametrize("arg, want", [
    (b"|2|1080::8:800:200C:417A|5282|", "1080::8:800:200c:417a"),  # RFC 2428's own example
    (b"$2$2001:db8::1$65535$", "2001:db8::1"),
])
def test_eprt_parses_ipv6(arg: bytes, want: str) -> None:
    at = parse_eprt(arg, 2)
    assert at == Endpoint(A6(want), int(arg.decode().split(arg.decode()[0])[3]))
    assert parse_eprt(format_eprt(at).encode(), 2) == at and format_eprt(at).startswith("|2|")


@pytest.mark.parametrize("arg, code", [
    (b"|1|10.0.0.1|5000|", 522),  # the other family
    (b"|2|10.0.0.1|5000|", 501),
    (b"|2|::ffff:10.0.0.1|5000|", 501),  # IPv4-mapped: IPv4 in disguise
    (b"|2|fe80::1%eth0|5000|", 501),  # a zone names no host beyond a link
    (b"|2|2001:db8::1|0|", 501),
    (b"|2|2001:db8:::1|5000|", 501),
])
def test_eprt_refuses_for_an_ipv6_session(arg: bytes, code: int) -> None:
    with pytest.raises(Malformed) as err:
        parse_eprt(arg, 2)
    assert err.value.code == code


W6 = A6("2001:db8:2::1")


def test_private_ipv6_addresses_are_masked_through_a_port_forward() -> None:
    """An IPv6 session through a port forward (the client addressed the router's W6 for S6): the
    server's address reads as W6, another ULA or link-local address as ::, and a private IPv4
    address as 0.0.0.0; a public address and the client's own are kept."""
    d = Driver(Parties(client=C6, server=S6, client_addressed=W6, client_seen_as=C6))
    d.server(b"220-Welcome to fd00:1::10 (lan; printer at fd00:1::99, fe80::1, 10.20.30.40).\r\n"
             b"220-You are 2001:db8:2::10; mirror at 2001:db8:5::1; at 22:13:05.\r\n220 FD00:1:0::10\r\n")
    assert d.t.client_lines() == [
        b"220-Welcome to 2001:db8:2::1 (lan; printer at ::, ::, 0.0.0.0).",
        b"220-You are 2001:db8:2::10; mirror at 2001:db8:5::1; at 22:13:05.",
        b"220 2001:db8:2::1",
    ]


@pytest.mark.parametrize("line, expected", [
    (b"220 fd00:1::10 ready", b"220 2001:db8:2::1 ready"),
    (b"211 at fd00:1::10.", b"211 at 2001:db8:2::1."),  # the full stop is the sentence's
    (b"211 [fd00:1::10]:21 and fd00:1:0:0:0:0:0:10", b"211 [2001:db8:2::1]:21 and 2001:db8:2::1"),
    (b"x 12:30:45 22:13 a::b::c fd00:1::10g xfd00:1::10 ::ffff:192.168.1.10", None),
])
def test_rewrite_addresses6(line: bytes, expected: bytes | None) -> None:
    def to_router(a: ipaddress.IPv6Address) -> ipaddress.IPv6Address | None:
        return W6 if a == S6 else None
    assert rewrite_addresses6(line, to_router) == (line if expected is None else expected)


@given(st.binary(max_size=200))
def test_rewrite_addresses6_never_raises_and_keeps_what_it_does_not_change(line: bytes) -> None:
    assert rewrite_addresses6(line, lambda a: None) == line
    masked = rewrite_addresses6(line, lambda a: A6("::"))
    assert rewrite_addresses6(masked, lambda a: None if a == A6("::") else A6("::1")) == masked
