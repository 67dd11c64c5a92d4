"""gateways/ftp/core.py, sans-IO: playbooks of exact outputs, every chunking, limits at and past, Hypothesis."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall.signalling import Endpoint, RuleMode
from gateways.ftp.commands import allowed_commands
from gateways.ftp.core import (
    Close,
    DataChannel,
    DataMode,
    Direction,
    Event,
    FtpControl,
    Opaque,
    Parties,
    Policy,
    RequestRule,
    ToClient,
    ToServer,
)
from tests.gateways.ftp_dialogue import (
    C_EXT,
    C_LAN,
    INBOUND,
    LOGIN,
    OUTBOUND,
    S_EXT,
    S_LAN,
    W,
    Driver,
    every_chunking,
    run,
)

A = ipaddress.IPv4Address


def ep(addr: ipaddress.IPv4Address, port: int) -> Endpoint:
    return Endpoint(addr, port)


def logged_in(parties: Parties = INBOUND, policy: Policy = Policy()) -> Driver:
    d = Driver(parties, policy)
    for side, data in LOGIN:
        (d.client if side == "client" else d.server)(data)
    d.t.to_client = d.t.to_server = b""
    d.t.events.clear()
    return d


def no_events(outputs: list) -> list:
    return [o for o in outputs if not isinstance(o, Event)]


# ---- playbooks: the exact outputs, step by step ----------------------------------------------------


def test_playbook_inbound_pasv() -> None:
    """Inbound passive: the lan server's private 227 address becomes the router's, after the rule.

    allow mode: an ALLOW to the router's address, which the processor translates to the server."""
    c = FtpControl(INBOUND)
    assert c.client_data(b"") == []
    assert c.server_data(b"220 (vsFTPd 3.0.3)\r\n") == [ToClient(b"220 (vsFTPd 3.0.3)\r\n")]
    assert c.client_data(b"USER ftp\r\n") == [ToServer(b"USER ftp\r\n")]
    assert c.server_data(b"331 Please specify the password.\r\n") == [ToClient(b"331 Please specify the password.\r\n")]
    assert c.client_data(b"PASS x\r\n") == [ToServer(b"PASS x\r\n")]
    assert no_events(c.server_data(b"230 Login successful.\r\n")) == [ToClient(b"230 Login successful.\r\n")]
    assert c.client_data(b"pasv\r\n") == [ToServer(b"PASV\r\n")]
    out = c.server_data(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")
    assert out == [RequestRule(1, Direction.PASSIVE, ep(C_EXT, 0), ep(W, 50000), RuleMode.ALLOW, False)]
    assert c.waiting_for_rule == 1
    assert c.rule_answered(2, True) == []  # not the token it waits for
    assert no_events(c.rule_answered(1, True)) == [ToClient(b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n")]
    assert c.client_data(b"RETR f\r\n") == [ToServer(b"RETR f\r\n")]
    assert c.server_data(b"150 Opening BINARY mode data connection.\r\n226 Transfer complete.\r\n") == [
        ToClient(b"150 Opening BINARY mode data connection.\r\n"),
        ToClient(b"226 Transfer complete.\r\n"),
    ]
    assert c.client_data(b"QUIT\r\n") == [ToServer(b"QUIT\r\n")]
    assert c.server_data(b"221 Goodbye.\r\n") == [ToClient(b"221 Goodbye.\r\n")]
    assert c.server_eof() == [Close("server closed")]
    assert c.client_data(b"NOOP\r\n") == [] and c.server_eof() == []


def test_playbook_outbound_active_port() -> None:
    """Outbound active: the client's private PORT becomes the router's SNAT address; the rule comes only after 200."""
    d = logged_in(OUTBOUND)
    c = d.core
    assert c.client_data(b"PORT 192,168,1,10,195,81\r\n") == [ToServer(b"PORT 203,0,113,1,195,81\r\n")]
    # A pipelined RETR waits: the server must not connect before the rule is in.
    assert c.client_data(b"RETR f\r\n") == []
    out = c.server_data(b"200 PORT command successful. Consider using PASV.\r\n")
    assert out == [RequestRule(1, Direction.ACTIVE, ep(S_EXT, 0), ep(W, 50001), RuleMode.ALLOW, False)]
    assert no_events(c.rule_answered(1, True)) == [
        ToClient(b"200 PORT command successful. Consider using PASV.\r\n"),
        ToServer(b"RETR f\r\n"),
    ]


def test_playbook_inbound_active_is_allowed_through_the_kernel() -> None:
    d = logged_in(INBOUND)
    c = d.core
    assert c.client_data(b"EPRT !1!203.0.113.10!50002!\r\n") == [ToServer(b"EPRT |1|203.0.113.10|50002|\r\n")]
    assert c.server_data(b"200 EPRT command successful.\r\n") == [
        RequestRule(1, Direction.ACTIVE, ep(S_LAN, 0), ep(C_EXT, 50002), RuleMode.ALLOW, False)
    ]


def test_playbook_outbound_epsv_is_allowed_through_the_kernel() -> None:
    c = logged_in(OUTBOUND).core
    assert c.client_data(b"EPSV\r\n") == [ToServer(b"EPSV\r\n")]
    assert c.server_data(b"229 Entering Extended Passive Mode (|||50003|)\r\n") == [
        RequestRule(1, Direction.PASSIVE, ep(C_LAN, 0), ep(S_EXT, 50003), RuleMode.ALLOW, False)
    ]
    assert no_events(c.rule_answered(1, True)) == [ToClient(b"229 Entering Extended Passive Mode (|||50003|)\r\n")]


def test_inspect_mode_redirects_every_data_connection() -> None:
    c = logged_in(OUTBOUND, Policy(data_channel=DataChannel.INSPECT)).core
    c.client_data(b"PASV\r\n")
    (rule,) = c.server_data(b"227 Entering Passive Mode (203,0,113,10,195,84).\r\n")
    assert rule == RequestRule(1, Direction.PASSIVE, ep(C_LAN, 0), ep(S_EXT, 50004), RuleMode.REDIRECT, True)
    c = logged_in(INBOUND, Policy(data_channel=DataChannel.INSPECT)).core
    c.client_data(b"PASV\r\n")
    (rule,) = c.server_data(b"227 Entering Passive Mode (192,168,1,10,195,85).\r\n")
    assert rule == RequestRule(1, Direction.PASSIVE, ep(C_EXT, 0), ep(W, 50005), RuleMode.REDIRECT, True)


@pytest.mark.parametrize("parties", [INBOUND, OUTBOUND], ids=["inbound", "outbound"])
def test_allow_mode_allows_every_data_connection(parties: Parties) -> None:
    """All four cases, each verb: ALLOW, and the address announced is the one the rule names."""
    client = parties.client
    port_arg = ",".join(str(client).split(".")).encode()
    steps = [
        (b"PASV", b"227 Entering Passive Mode (%s,195,80).\r\n" % ",".join(str(parties.server).split(".")).encode()),
        (b"EPSV", b"229 Entering Extended Passive Mode (|||50001|)\r\n"),
        (b"PORT %s,195,82" % port_arg, b"200 PORT command successful.\r\n"),
        (b"EPRT |1|%s|50003|" % str(client).encode(), b"200 EPRT command successful.\r\n"),
    ]
    d = logged_in(parties)
    for line, reply in steps:
        d.client(line + b"\r\n")
        d.server(reply)
    assert [(r.direction, r.src, r.dst, r.mode) for r in d.t.rules] == [
        (Direction.PASSIVE, ep(client, 0), ep(parties.client_addressed, 50000), RuleMode.ALLOW),
        (Direction.PASSIVE, ep(client, 0), ep(parties.client_addressed, 50001), RuleMode.ALLOW),
        (Direction.ACTIVE, ep(parties.server, 0), ep(parties.client_seen_as, 50002), RuleMode.ALLOW),
        (Direction.ACTIVE, ep(parties.server, 0), ep(parties.client_seen_as, 50003), RuleMode.ALLOW),
    ]


def test_refused_rule_gives_425_and_the_session_goes_on() -> None:
    d = logged_in(INBOUND)
    d.grant = lambda r: False
    d.client(b"PASV\r\nNOOP\r\n")
    d.server(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")
    assert d.t.to_client == b"425 Can't open data connection: the firewall did not open the data port.\r\n"
    assert d.t.to_server == b"PASV\r\nNOOP\r\n"
    d.client(b"PORT 203,0,113,10,195,80\r\n")
    d.server(b"200 NOOP ok.\r\n200 PORT ok.\r\n")
    assert d.t.client_lines()[1:] == [b"200 NOOP ok.", b"425 Can't open data connection: the firewall did not open the data port."]
    assert d.t.names().count("rule.refused") == 2


# ---- every chunking gives the same transcript ------------------------------------------------------------

DIALOGUES = {
    "inbound-pasv": (INBOUND, LOGIN + [
        ("client", b"TYPE I\r\n"), ("server", b"200 Switching to Binary mode.\r\n"),
        ("client", b"PASV\r\n"), ("server", b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n"),
        ("client", b"RETR big.bin\r\n"),
        ("server", b"150 Opening BINARY mode data connection for big.bin (52428800 bytes).\r\n226 Transfer complete.\r\n"),
        ("client", b"QUIT\r\n"), ("server", b"221 Goodbye.\r\n"),
    ]),
    "outbound-port": (OUTBOUND, LOGIN + [
        ("client", b"PORT 192,168,1,10,195,81\r\n"), ("server", b"200 PORT command successful.\r\n"),
        ("client", b"STOR up.bin\r\n"), ("server", b"150 Ok to send data.\r\n226 Transfer complete.\r\n"),
        ("client", b"EPRT |1|192.168.1.10|50002|\r\n"), ("server", b"200 EPRT command successful.\r\n"),
        ("client", b"LIST\r\n"), ("server", b"150 Here comes the directory listing.\r\n226 Directory send OK.\r\n"),
    ]),
    "feat-and-refusals": (INBOUND, [
        ("server", b"220-Welcome\r\n220-to the test\r\n220 server\r\n"),
        ("client", b"FEAT\r\n"),
        ("server", b"211-Features:\r\n EPRT\r\n EPSV\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n MDTM\r\n UTF8\r\n211 End\r\n"),
        ("client", b"AUTH TLS\r\n"),
        ("client", b"PASV\r\n"),
        ("client", b"USER ftp\r\n"), ("server", b"331 Password.\r\n"),
        ("client", b"PASS x\r\n"), ("server", b"230 OK.\r\n"),
        ("client", b"PORT 198,51,100,99,195,80\r\n"),
        ("client", b"PORT 203,0,113,10,0,25\r\n"),
        ("client", b"PORT 203,0,113,10,300,1\r\n"),
        ("client", b"\xff\xf4\xff\xf2ABOR\r\n"), ("server", b"225 No transfer to ABOR.\r\n"),
    ]),
}


@pytest.mark.parametrize("name", DIALOGUES)
def test_every_chunking_gives_the_same_transcript(name: str) -> None:
    parties, steps = DIALOGUES[name]
    reference = run(steps, parties=parties)
    assert not reference.closes
    for label, chunker in every_chunking(steps):
        got = run(steps, parties=parties, chunker=chunker)
        assert got.same_as(reference), label


def test_dialogue_transcripts() -> None:
    t = run(DIALOGUES["outbound-port"][1], parties=OUTBOUND)
    assert t.to_server.split(b"\r\n")[2:] == [
        b"PORT 203,0,113,1,195,81", b"STOR up.bin", b"EPRT |1|203.0.113.1|50002|", b"LIST", b""
    ]
    assert [(r.src, r.dst, r.mode) for r in t.rules] == [
        (ep(S_EXT, 0), ep(W, 50001), RuleMode.ALLOW),
        (ep(S_EXT, 0), ep(W, 50002), RuleMode.ALLOW),
    ]
    t = run(DIALOGUES["feat-and-refusals"][1])
    assert t.client_lines() == [
        b"220-Welcome", b"220-to the test", b"220 server",
        b"211-Features:", b" EPRT", b" EPSV", b" MDTM", b" UTF8", b"211 End",  # no AUTH TLS, PBSZ, PROT
        b"534 TLS is refused by the firewall: it must read the data ports.",
        b"530 Please log in with USER and PASS first.",
        b"331 Password.", b"230 OK.",
        b"501 PORT must name your own address.",
        b"501 PORT port must be 1024 or above.",
        b"501 PORT numbers are 0 to 255",
        b"225 No transfer to ABOR.",
    ]
    assert t.to_server == b"FEAT\r\nUSER ftp\r\nPASS x\r\nABOR\r\n"
    assert t.rules == []
    assert {"refused.bounce", "refused.privileged_port", "refused.malformed", "refused.auth_tls"} <= set(t.names())


def test_whole_client_stream_pipelined_matches_lock_step() -> None:
    """The client sends everything at once: the core still forwards in order and waits at each data command."""
    steps = DIALOGUES["inbound-pasv"][1]
    lock_step = run(steps)
    server = [data for side, data in steps if side == "server"]
    client = b"".join(data for side, data in steps if side == "client")
    d = Driver(INBOUND)
    d.server(server[0])
    d.client(client)
    for reply in server[1:]:
        d.server(reply)
    assert d.t.to_server == lock_step.to_server and d.t.to_client == lock_step.to_client
    assert len(d.t.rules) == 1


# ---- the attack cases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, code, event",
    [
        (b"PORT 198,51,100,99,195,80", 501, "refused.bounce"),  # RFC 2577 section 3
        (b"EPRT |1|198.51.100.99|50000|", 501, "refused.bounce"),
        (b"PORT 192,168,1,10,195,80", 501, "refused.bounce"),  # the server's own address: a bounce too
        (b"PORT 203,0,113,10,3,255", 501, "refused.privileged_port"),
        (b"EPRT |1|203.0.113.10|21|", 501, "refused.privileged_port"),
        (b"PORT 203,0,113,10,256,1", 501, "refused.malformed"),
        (b"PORT 203,0,113,10,195", 501, "refused.malformed"),
        (b"PORT 203,0,113,10,195,80,1", 501, "refused.malformed"),
        (b"EPRT |2|::1|50000|", 522, "refused.family"),  # family mismatch: the session is IPv4
        (b"EPRT |1|203.0.113.10|50000", 501, "refused.malformed"),
        (b"EPSV 2", 522, "refused.family"),
        (b"PORT", 501, "refused.syntax"),
        (b"PASV x", 501, "refused.syntax"),
    ],
)
def test_data_port_attacks_get_their_code_and_no_rule(line: bytes, code: int, event: str) -> None:
    d = logged_in(INBOUND)
    d.client(line + b"\r\n")
    assert d.t.to_client.startswith(b"%d " % code)
    assert d.t.to_server == b"" and d.t.rules == []
    assert event in d.t.names()


@pytest.mark.parametrize(
    "reply",
    [
        b"227 Entering Passive Mode (198,51,100,99,195,80).",  # a foreign host
        b"227 Entering Passive Mode (192,168,1,10,0,25).",  # a privileged port
        b"227 Entering Passive Mode (192,168,1,10,195).",  # malformed
        b"227 Entering Passive Mode (192,168,1,10,256,1).",
    ],
)
def test_227_not_acted_on(reply: bytes) -> None:
    d = logged_in(INBOUND)
    d.client(b"PASV\r\n")
    d.server(reply + b"\r\n")
    assert d.t.rules == []
    assert d.t.to_client.startswith(b"425 ")
    assert b"198,51,100,99" not in d.t.to_client and b"192,168" not in d.t.to_client
    d.client(b"NOOP\r\n")  # the session goes on
    assert d.t.to_server.endswith(b"NOOP\r\n")


def test_227_and_229_are_acted_on_only_for_their_own_command() -> None:
    d = logged_in(INBOUND)
    d.server(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")  # unsolicited
    d.client(b"NOOP\r\n")
    d.server(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")  # answering NOOP
    d.client(b"EPSV\r\n")
    d.server(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")  # answering EPSV with a 227
    d.client(b"PASV\r\n")
    d.server(b"229 Entering Extended Passive Mode (|||50000|)\r\n")  # answering PASV with a 229
    assert d.t.rules == []
    assert b"192,168" not in d.t.to_client
    # Not even the code stays: a client parsing any 227 for an address finds none.
    assert d.t.client_lines() == [b"451 Reply not expected here; dropped by the firewall."] * 3 + [
        b"451 Reply not expected here; dropped by the firewall."
    ]


def test_200_only_confirms_a_pending_port() -> None:
    d = logged_in(INBOUND)
    d.client(b"NOOP\r\n")
    d.server(b"200 NOOP ok.\r\n")
    d.server(b"200 unsolicited.\r\n")
    assert d.t.rules == []
    d.client(b"PORT 203,0,113,10,195,80\r\n")
    d.server(b"500 Illegal PORT command.\r\n")  # the server refused it: no rule
    assert d.t.rules == [] and d.t.to_client.endswith(b"500 Illegal PORT command.\r\n")
    d.client(b"NOOP\r\n")  # not blocked
    assert d.t.to_server.endswith(b"NOOP\r\n")


@pytest.mark.parametrize(
    "first",
    [b"USER ftp\r\n", b"PORT 203,0,113,10,195,80\r\n", b"P", b"\r\n"],
)
def test_client_before_the_greeting_is_closed_and_opens_nothing(first: bytes) -> None:
    d = Driver(INBOUND)
    d.client(first)
    assert d.t.closes == ["client spoke before the greeting"]
    d.server(b"220 hello\r\n")
    d.server(b"200 PORT ok.\r\n")
    assert d.t.to_server == b"" and d.t.rules == []
    assert d.t.client_lines() == [b"421 Wait for the server's greeting; closing."]


@pytest.mark.parametrize(
    "first",
    [
        b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n",
        b"200 PORT command successful.\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"230 Login successful.\r\n",
    ],
)
def test_a_stream_that_does_not_start_with_220_opens_nothing(first: bytes) -> None:
    d = Driver(INBOUND)
    d.server(first)
    assert d.t.closes and d.t.rules == []
    d.client(b"PASV\r\n")
    d.server(b"220 late\r\n227 Entering Passive Mode (192,168,1,10,195,80).\r\n")
    assert d.t.rules == [] and d.t.to_server == b""
    assert b"192,168" not in d.t.to_client


def test_120_then_220_and_421_greetings() -> None:
    d = Driver(INBOUND)
    d.server(b"120 Ready in 1 minute.\r\n220 Ready.\r\n")
    assert not d.t.closes
    d = Driver(INBOUND)
    d.server(b"421 Too many users.\r\n")
    assert d.t.to_client == b"421 Too many users.\r\n" and d.t.closes == ["server refused the session (421)"]


def test_port_split_across_segments() -> None:
    line = b"PORT 192,168,1,10,195,81\r\n"
    for k in range(1, len(line)):
        d = logged_in(OUTBOUND)
        d.client(line[:k])
        assert d.t.to_server == b""
        d.client(line[k:])
        assert d.t.to_server == b"PORT 203,0,113,1,195,81\r\n", k


# ---- the command table ------------------------------------------------------------------------


def test_unknown_and_refused_commands() -> None:
    d = logged_in(INBOUND)
    d.client(b"XYZZ a\r\nSITE EXEC sh\r\nCD x\r\nRETR\r\nPWD x\r\n")
    assert d.t.client_lines() == [
        b"500 XYZZ: command unrecognized.",
        b"502 SITE: command not allowed through this firewall.",
        b"500 Syntax error, command unrecognized.",
        b"501 RETR needs an argument.",
        b"501 PWD takes no argument.",
    ]
    assert d.t.to_server == b""


def test_allow_and_deny_lists() -> None:
    d = logged_in(INBOUND, Policy(allowed=allowed_commands(allow=["site", "XCRC"], deny=["dele"])))
    d.client(b"SITE CHMOD 600 f\r\nXCRC f\r\nDELE f\r\n")
    assert d.t.to_server == b"SITE CHMOD 600 f\r\nXCRC f\r\n"
    d.server(b"200 ok\r\n250 crc\r\n")
    assert d.t.client_lines() == [b"200 ok", b"250 crc", b"502 DELE: command not allowed through this firewall."]


def test_local_replies_keep_their_turn() -> None:
    d = logged_in(INBOUND)
    d.client(b"NOOP\r\nFOOO\r\nSYST\r\n")
    assert d.t.to_client == b""  # the 500 waits behind NOOP's reply
    d.server(b"200 NOOP ok.\r\n")
    assert d.t.client_lines() == [b"200 NOOP ok.", b"500 FOOO: command unrecognized."]
    d.server(b"215 UNIX Type: L8\r\n")
    assert d.t.client_lines()[-1] == b"215 UNIX Type: L8"


def test_data_commands_need_a_login() -> None:
    d = Driver(INBOUND)
    d.server(b"220 hi\r\n")
    d.client(b"PASV\r\nEPSV\r\nPORT 203,0,113,10,195,80\r\nRETR f\r\nSYST\r\n")
    assert d.t.to_server == b"SYST\r\n"
    assert d.t.client_lines()[1:] == [b"530 Please log in with USER and PASS first."] * 4
    d.client(b"USER a\r\n")
    d.server(b"215 UNIX\r\n230 Anonymous in.\r\n")  # 230 to USER: logged in
    d.client(b"PASV\r\n")
    assert d.t.to_server.endswith(b"PASV\r\n")
    d.client(b"")
    d.server(b"227 (192,168,1,10,195,80)\r\n")
    d.client(b"REIN\r\n")
    d.server(b"220 Again.\r\n")
    d.client(b"PASV\r\n")
    assert d.t.client_lines()[-1] == b"530 Please log in with USER and PASS first."


def test_telnet_and_control_characters() -> None:
    d = logged_in(INBOUND)
    d.client(b"\xff\xf4\xff\xf2ABOR\r\n")
    assert d.t.to_server == b"ABOR\r\n"
    d.server(b"225 ok\r\n")
    d.client(b"RETR a\rDELE b\r\nRETR a\0b\r\n")
    assert d.t.to_server == b"ABOR\r\n"
    assert d.t.client_lines()[1:] == [b"500 Syntax error: control character in command."] * 2


def test_bare_lf_line_ends() -> None:
    d = Driver(INBOUND)
    d.server(b"220 hi\n")
    d.client(b"USER a\n")
    assert d.t.to_client == b"220 hi\r\n" and d.t.to_server == b"USER a\r\n"


def test_epsv_all_and_1() -> None:
    d = logged_in(OUTBOUND)
    d.client(b"EPSV ALL\r\n")
    d.server(b"200 EPSV ALL ok.\r\n")
    d.client(b"EPSV 1\r\n")
    d.server(b"229 Entering Extended Passive Mode (|||50000|)\r\n")
    assert d.t.to_server == b"EPSV ALL\r\nEPSV 1\r\n"
    assert len(d.t.rules) == 1


def test_active_mode_without_a_known_client_address() -> None:
    parties = Parties(C_LAN, S_EXT, S_EXT, None)
    d = logged_in(parties)
    d.client(b"PORT 192,168,1,10,195,81\r\nPASV\r\n")
    assert d.t.client_lines()[0].startswith(b"502 Active mode is not available")
    assert d.t.to_server == b"PASV\r\n"


def test_playbook_data_mode_active_translates_pasv_into_port() -> None:
    """data_mode = "active": the client's PASV reaches the server as a PORT to the client's address as
    the server sees it; after the 200 two REDIRECTs, the server's side (replacing earlier rules) then the
    client's, sharing one pair; then the client gets a 227 (or 229) for S' at the same port."""
    for parties, verb, reply in (
        (INBOUND, b"PASV", b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n"),
        (OUTBOUND, b"EPSV", b"229 Entering Extended Passive Mode (|||50000|)\r\n"),
    ):
        c = FtpControl(parties, Policy(data_mode=DataMode.ACTIVE), data_port=lambda: 50000)
        for side, data in LOGIN:
            (c.client_data if side == "client" else c.server_data)(data)
        seen_as = parties.client_seen_as
        assert no_events(c.client_data(verb + b"\r\n")) == [
            ToServer(b"PORT %s,195,80\r\n" % str(seen_as).replace(".", ",").encode())]
        first = no_events(c.server_data(b"200 PORT command successful.\r\n"))
        assert first == [RequestRule(1, Direction.ACTIVE, ep(parties.server, 0), ep(seen_as, 50000), RuleMode.REDIRECT,
                                     False, True, 1)]
        second = no_events(c.rule_answered(1, True))
        assert second == [RequestRule(2, Direction.PASSIVE, ep(parties.client, 0), ep(parties.client_addressed, 50000),
                                      RuleMode.REDIRECT, False, False, 1)]
        assert no_events(c.rule_answered(2, True)) == [ToClient(reply)]
        assert c.client_data(b"RETR f\r\n") == [ToServer(b"RETR f\r\n")]
    # Without a chooser the port comes from translated_ports.
    d = logged_in(INBOUND, Policy(data_mode=DataMode.ACTIVE, translated_ports=(40000, 40000)))
    d.client(b"EPSV\r\n")
    assert d.t.to_server == b"PORT 203,0,113,10,156,64\r\n"
    # A refused PORT is the PASV's answer; EPSV ALL and PORT pass as they are.
    d = logged_in(INBOUND, Policy(data_mode=DataMode.ACTIVE))
    d.client(b"PASV\r\n")
    d.server(b"500 Illegal PORT command.\r\n")
    assert d.t.rules == [] and d.t.client_lines() == [b"500 Illegal PORT command."]
    d.client(b"PORT 203,0,113,10,195,80\r\n")
    assert d.t.to_server.endswith(b"PORT 203,0,113,10,195,80\r\n")


def test_playbook_data_mode_passive_translates_port_into_pasv() -> None:
    """data_mode = "passive": the client's PORT or EPRT (checked as ever) reaches the server as a PASV;
    after its 227 two ORIGINATEs sharing a pair, the server's side (from what the server knows the
    client as, replacing earlier rules) then the client's (from S'); then the client gets its 200."""
    for parties, line in (
        (INBOUND, b"PORT 203,0,113,10,156,64\r\n"),
        (OUTBOUND, b"EPRT |1|192.168.1.10|40000|\r\n"),
    ):
        c = FtpControl(parties, Policy(data_mode=DataMode.PASSIVE))
        for side, data in LOGIN:
            (c.client_data if side == "client" else c.server_data)(data)
        assert no_events(c.client_data(line)) == [ToServer(b"PASV\r\n")]
        assert c.client_data(b"RETR f\r\n") == []  # held until the PORT is answered
        server = str(parties.server).replace(".", ",").encode()
        first = no_events(c.server_data(b"227 Entering Passive Mode (%s,195,80).\r\n" % server))
        assert first == [RequestRule(1, Direction.PASSIVE, ep(parties.client_seen_as, 0), ep(parties.server, 50000),
                                     RuleMode.ORIGINATE, False, True, 1)]
        second = no_events(c.rule_answered(1, True))
        assert second == [RequestRule(2, Direction.ACTIVE, ep(parties.client_addressed, 0), ep(parties.client, 40000),
                                      RuleMode.ORIGINATE, False, False, 1)]
        verb = line.split()[0].decode()
        assert no_events(c.rule_answered(2, True)) == [ToClient(f"200 {verb} command successful.\r\n".encode()),
                                                       ToServer(b"RETR f\r\n")]
    # Still refused before anything reaches the server: a third host, a low port.
    d = logged_in(INBOUND, Policy(data_mode=DataMode.PASSIVE))
    d.client(b"PORT 203,0,113,11,156,64\r\nPORT 203,0,113,10,0,21\r\n")
    assert d.t.to_server == b"" and d.t.rules == []
    assert [line[:4] for line in d.t.client_lines()] == [b"501 ", b"501 "]
    # The server refuses PASV: its answer is the PORT's. A 227 for another host opens nothing.
    d = logged_in(INBOUND, Policy(data_mode=DataMode.PASSIVE))
    d.client(b"PORT 203,0,113,10,156,64\r\n")
    d.server(b"500 PASV not understood.\r\n")
    assert d.t.rules == [] and d.t.client_lines() == [b"500 PASV not understood."]
    d.client(b"PORT 203,0,113,10,156,64\r\n")
    d.server(b"227 Entering Passive Mode (192,168,1,11,195,80).\r\n")
    assert d.t.rules == [] and d.t.client_lines()[-1].startswith(b"425 ")
    # A refused rule: the client's PORT fails with 425.
    d = Driver(OUTBOUND, Policy(data_mode=DataMode.PASSIVE), grant=lambda r: False)
    for side, data in LOGIN:
        (d.client if side == "client" else d.server)(data)
    d.client(b"PORT 192,168,1,10,156,64\r\n")
    d.server(b"227 Entering Passive Mode (203,0,113,10,195,80).\r\n")
    assert len(d.t.rules) == 1 and d.t.client_lines()[-1].startswith(b"425 ")


# ---- limits: at the limit and one past it ---------------------------------------------------------


def test_max_bad_commands_at_and_past() -> None:
    policy = Policy(max_bad_commands=3)
    d = logged_in(INBOUND, policy)
    d.client(b"FOOO\r\n" * 3)
    assert not d.t.closes and len(d.t.client_lines()) == 3
    d.client(b"NOOP\r\n")  # still served
    assert d.t.to_server == b"NOOP\r\n"
    d.server(b"200 ok\r\n")
    d.client(b"FOOO\r\n")
    assert d.t.closes == ["too many bad commands"]
    assert d.t.client_lines()[-1] == b"421 Too many bad commands; closing."


def test_commands_refused_by_policy_do_not_count_as_bad() -> None:
    """SITE (not allowed), EPSV 2 and EPRT |2| (IPv6 on an IPv4 session) are policy: answered, never
    counted; only unknown or malformed commands are, and the one past max_bad_commands closes."""
    d = logged_in(INBOUND, Policy(max_bad_commands=2))
    d.client(b"SITE CHMOD 600 f\r\n" * 5 + b"EPSV 2\r\n" * 3 + b"EPRT |2|::1|50000|\r\n" * 3)
    assert not d.t.closes and len(d.t.client_lines()) == 11
    assert d.t.to_server == b""
    d.client(b"XYZZ\r\nPORT 1,2\r\n")  # unknown, malformed: 2, the limit
    assert not d.t.closes
    d.client(b"FOOO\r\n")
    assert d.t.closes == ["too many bad commands"]


def test_private_addresses_are_masked_in_replies_through_a_port_forward() -> None:
    """mask_private_addresses (default): the lan server's address anywhere in a reply reads as the router's
    address the client used, other private addresses as 0.0.0.0; a 227 inside a multi-line reply is
    indented, so no client takes it for a final 227 line."""
    d = logged_in(INBOUND)
    d.client(b"STAT\r\n")
    d.server(b"211-Status of 192.168.1.10\r\n"
             b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n"
             b" peer 10.1.2.3, client 203.0.113.10, router 203.0.113.1, version 3.0.3\r\n"
             b"211 End of status for 192.168.1.10\r\n")
    assert d.t.client_lines() == [
        b"211-Status of 203.0.113.1",
        b" 227 Entering Passive Mode (203,0,113,1,195,80).",
        b" peer 0.0.0.0, client 203.0.113.10, router 203.0.113.1, version 3.0.3",
        b"211 End of status for 203.0.113.1",
    ]
    assert "reply.masked" in d.t.names() and "reply.indented" in d.t.names()
    assert d.t.rules == []


def test_private_addresses_kept_when_off_or_outbound() -> None:
    line = b"211 hello 192.168.1.10 and 10.1.2.3\r\n"
    for parties, policy in ((INBOUND, Policy(mask_private_addresses=False)), (OUTBOUND, Policy())):
        d = logged_in(parties, policy)
        d.client(b"STAT\r\n")
        d.server(line)
        assert d.t.to_client == line


@pytest.mark.parametrize("limit", [64, 100])
def test_max_line_length_at_and_past(limit: int) -> None:
    d = logged_in(INBOUND, Policy(max_line_length=limit))
    at = b"RETR " + b"a" * (limit - 5)
    d.client(at + b"\r\n")
    assert d.t.to_server == at + b"\r\n"
    d.server(b"550 no\r\n")
    d.client(at + b"a\r\n")
    assert d.t.client_lines()[-1] == b"500 Line too long."
    assert d.t.to_server == at + b"\r\n"
    # Longer than the buffer without a line end: one 500, then the rest is skipped up to the LF.
    d.client(b"RETR " + b"b" * (3 * limit))
    d.client(b"b" * limit)
    d.client(b"b\r\nNOOP\r\n")
    assert d.t.client_lines()[-1] == b"500 Line too long."
    assert d.t.to_server.endswith(b"NOOP\r\n")
    assert d.t.client_lines().count(b"500 Line too long.") == 2


def test_server_line_limit() -> None:
    d = logged_in(INBOUND, Policy(max_line_length=64))
    d.client(b"HELP\r\n")
    d.server(b"214 " + b"h" * 60 + b"\r\n")
    assert not d.t.closes
    d.client(b"HELP\r\n")
    d.server(b"214 " + b"h" * 61 + b"\r\n")
    assert d.t.closes == ["server line too long"]


@pytest.mark.parametrize("verb, key", [(b"USER", "max_username_length"), (b"PASS", "max_password_length")])
def test_username_and_password_length(verb: bytes, key: str) -> None:
    d = Driver(INBOUND, Policy(**{key: 10}))
    d.server(b"220 hi\r\n")
    d.client(verb + b" " + b"u" * 10 + b"\r\n")
    assert d.t.to_server == verb + b" " + b"u" * 10 + b"\r\n"
    d.server(b"331 ok\r\n")
    d.client(verb + b" " + b"u" * 11 + b"\r\n")
    assert d.t.client_lines()[-1].startswith(b"501 ")
    assert d.t.to_server == verb + b" " + b"u" * 10 + b"\r\n"


def test_max_login_failures_at_and_past() -> None:
    d = Driver(INBOUND, Policy(max_login_failures=3))
    d.server(b"220 hi\r\n")
    for n in range(3):
        d.client(b"USER a\r\n")
        d.server(b"331 pw\r\n")
        d.client(b"PASS wrong\r\n")
        d.server(b"530 Login incorrect.\r\n")
        assert bool(d.t.closes) == (n == 2)
    assert d.t.client_lines()[-2:] == [b"530 Login incorrect.", b"421 Too many failed logins; closing."]


def test_backlog_is_bounded() -> None:
    d = logged_in(INBOUND)
    d.client(b"PASV\r\n")  # the client's lines now wait for the 227
    d.client(b"NOOP\r\n" * 10)
    assert not d.t.closes
    d.client(b"N" * 70000)
    assert d.t.closes == ["client flooded the control channel"]


def test_in_flight_is_bounded() -> None:
    d = logged_in(INBOUND)
    d.client(b"NOOP\r\n" * 40)
    assert d.t.to_server.count(b"NOOP") == 32
    d.server(b"200 ok\r\n" * 8)
    assert d.t.to_server.count(b"NOOP") == 40


# ---- AUTH TLS ----------------------------------------------------------------------------------


def test_auth_tls_allowed_goes_opaque() -> None:
    d = logged_in(INBOUND, Policy(auth_tls=True))
    d.client(b"FEAT\r\n")
    d.server(b"211-Features:\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n")
    assert b"AUTH TLS" in d.t.to_client
    d.client(b"AUTH TLS\r\n\x16\x03\x01hello")  # the ClientHello right behind: never read as commands
    assert d.t.to_server == b"FEAT\r\nAUTH TLS\r\n"
    d.server(b"234 Proceed with negotiation.\r\n\x16\x03\x03")
    assert d.t.opaque == [Opaque(b"\x16\x03\x01hello", b"\x16\x03\x03")]
    assert d.core.opaque
    assert d.core.client_data(b"\x17\x03") == [ToServer(b"\x17\x03")]
    assert d.core.server_data(b"PORT 1,2,3,4,5,6\r\n") == [ToClient(b"PORT 1,2,3,4,5,6\r\n")]
    assert d.t.rules == []


def test_auth_refused_by_the_server_stays_clear() -> None:
    d = logged_in(INBOUND, Policy(auth_tls=True))
    d.client(b"AUTH TLS\r\nNOOP\r\n")
    assert d.t.to_server == b"AUTH TLS\r\n"
    d.server(b"530 Please login with USER and PASS.\r\n")
    assert d.t.to_server == b"AUTH TLS\r\nNOOP\r\n" and not d.core.opaque


# ---- EOF ---------------------------------------------------------------------------------------


def test_eof_closes() -> None:
    d = logged_in(INBOUND)
    assert d.core.client_eof() == [Close("client closed")]
    assert d.core.client_eof() == []
    d = logged_in(INBOUND)
    d.client(b"PASV\r\n")
    d.core.server_data(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")  # the rule is asked...
    assert d.core.server_eof() == [Close("server closed")]
    assert d.core.rule_answered(1, True) == []  # ...and its answer comes too late


# ---- Hypothesis ----------------------------------------------------------------------------------

COMMAND_WORDS = [b"USER a", b"PASS b", b"PASV", b"EPSV", b"EPSV ALL", b"PORT 203,0,113,10,195,80", b"EPRT |1|203.0.113.10|50000|",
                 b"PORT 1,2,3,4,5,6", b"RETR f", b"STOR f", b"FEAT", b"AUTH TLS", b"NOOP", b"QUIT", b"REIN", b"SITE x", b"XYZ",
                 b"\xff\xf4ABOR", b"", b"PORT 203,0,113,10,300,1"]
client_lines = st.lists(
    st.one_of(st.sampled_from(COMMAND_WORDS), st.binary(max_size=30).filter(lambda b: b"\n" not in b)), max_size=25
)


def server_reply_for(line: bytes) -> bytes:
    verb = line.split(b" ", 1)[0].upper()
    return {
        b"USER": b"331 pw\r\n",
        b"PASS": b"230 in\r\n",
        b"PASV": b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n",
        b"EPSV": b"229 Entering Extended Passive Mode (|||50000|)\r\n",
        b"FEAT": b"211-F\r\n AUTH TLS\r\n211 End\r\n",
        b"RETR": b"150 go\r\n226 done\r\n",
        b"REIN": b"220 again\r\n",
    }.get(verb, b"200 ok\r\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_lines, st.booleans(), st.randoms())
def test_fuzz_every_client_line_gets_a_reply_or_a_close(lines: list[bytes], granted: bool, rnd) -> None:
    """A responsive server answers each forwarded command; every client line ends in one reply, or the session closes."""
    d = Driver(INBOUND, Policy(max_bad_commands=1000), grant=lambda r: granted)
    d.server(b"220 hi\r\n")
    stream = b"".join(line + b"\r\n" for line in lines)
    answered = 0
    while stream:
        k = rnd.randint(1, len(stream))
        d.client(stream[:k])
        stream = stream[k:]
        # The server answers every command it has received, in order, until no new one comes.
        while answered < len(sent := d.t.to_server.split(b"\r\n")[:-1]) and not d.core.closed:
            d.server(server_reply_for(sent[answered]))
            answered += 1
        if d.t.closes or d.core.opaque:
            return
    finals = [line for line in d.t.client_lines()[1:] if len(line) >= 4 and line[:3].isdigit() and line[3:4] == b" "]
    finals = [f for f in finals if not f.startswith(b"150")]
    assert len(finals) == len(lines)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=40)), max_size=30), st.sampled_from([INBOUND, OUTBOUND]))
def test_fuzz_no_exception_and_no_rule_without_greeting(chunks: list[tuple[bool, bytes]], parties: Parties) -> None:
    """Arbitrary bytes from both sides: no exception escapes, and without a 220 first no rule is ever asked."""
    d = Driver(parties)
    for from_client, data in chunks:
        (d.client if from_client else d.server)(data)
    first_server = b"".join(data for c, data in chunks if not c)
    if not first_server.startswith((b"220", b"120")):
        assert d.t.rules == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=20))
def test_fuzz_server_after_login(chunks: list[bytes]) -> None:
    d = logged_in(INBOUND)
    d.client(b"PASV\r\n")
    for data in chunks:
        d.server(data)
    for rule in d.t.rules:  # anything it acted on names the real parties only
        assert rule.src == ep(C_EXT, 0) and rule.dst.address == W and rule.dst.port >= 1024
    d.core.server_eof()
    assert d.core.closed
