"""The smtp gateway under `nfgate run` with real peers in the basic lab (tests/gateways/smtp_netns.py).

A private Postfix in lan behind the port forward (inbound, through
``smtp-in``) and one in ext (outbound from lan through masquerade, through
``smtp-out``); swaks and Python's smtplib as clients. The stored messages
are compared byte for byte with what was sent, minus the trace headers the
MTA adds. Then the attacks of the issue against the running gateway, each
with the reply or close it must get; Postfix runs with its defaults, which
are open to SMTP smuggling (PEERS.md), so no second message proves the
gateway's protection.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.smtp_netns import EXT, LAN, SMTPLIB, WAN, Postfix, SmtpRunning, client, stored_body

pytestmark = pytest.mark.netns

MB = 1 << 20
# smtp-in offers CHUNKING (not a default) for the BDAT tests; the others do not use it.
CHUNKING = 'extensions = ["SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING"]'


@pytest.fixture(scope="module")
def mail(module_lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One lab, a Postfix at each end and one `nfgate run` for the module's tests."""
    lab = module_lab_factory("basic")
    tmp = tmp_path_factory.mktemp("smtp")
    inbound = Postfix(lab, "lan", tmp, LAN, "example.com")
    r = SimpleNamespace(lab=lab, tmp=tmp, inbound=inbound, outbound=None, run=None)
    try:
        r.outbound = Postfix(lab, "ext", tmp, EXT, "example.net")
        r.run = SmtpRunning(lab, tmp, idle=3, extra=CHUNKING)
        yield r
    finally:
        if r.run is not None:
            r.run.stop()
        if r.outbound is not None:
            r.outbound.stop()
        r.inbound.stop()  # the one running now: a test may have started a new one


def message(tmp: Path, name: str, body: bytes) -> Path:
    path = tmp / name
    path.write_bytes(b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: " + name.encode() + b"\r\n\r\n" + body)
    return path


def sent_ok(result: Any) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_smtplib_messages_arrive_byte_identical(mail: SimpleNamespace) -> None:
    """Pipelined smtplib sessions: 8BITMIME, lines starting with '.', a 10 MB message."""
    mail.inbound.clear()
    dots = message(mail.tmp, "dots", b".starts with a dot\r\n..two dots\r\n.\r\nx\r\n. \r\nend\r\n")
    eight = message(mail.tmp, "eight", "Grüße, naïve café\r\n".encode() * 10)
    line = os.urandom(36).hex().encode() + b"\r\n"  # 74-byte lines
    big = message(mail.tmp, "big", line * (10 * MB // len(line)))
    files = [dots, eight, big]
    out = sent_ok(client(mail.lab, "ext", "send", WAN, "alice@example.org", "bob@example.com", "session", *map(str, files)))
    assert out["sent"] == 3
    mail.inbound.wait_count(3)
    stored = {m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0]: m for m in mail.inbound.messages()}
    for f in files:
        assert stored_body(stored[f.name.encode()]) == f.read_bytes(), f.name


def test_a_hundred_messages_in_one_session_and_swaks(mail: SimpleNamespace) -> None:
    mail.inbound.clear()
    out = sent_ok(client(mail.lab, "ext", "load", WAN, "alice@example.org", "bob@example.com", "session", "100", "2000"))
    assert out["sent"] == 100
    swaks = mail.lab.run("ext", ["swaks", "--server", WAN, "--from", "carol@example.org", "--to", "bob@example.com",
                                 "--pipeline", "--header", "Subject: swaks", "--body", ".dot line\n..two\nplain"],
                         check=False, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    mail.inbound.wait_count(101)
    bodies = [stored_body(m) for m in mail.inbound.messages()]
    assert sum(1 for b in bodies if b.startswith(b"Subject: load ")) == 100
    sw = next(b for b in bodies if b"Subject: swaks" in b)
    assert b"\r\n\r\n.dot line\r\n..two\r\nplain\r\n" in sw


def test_outbound_from_lan_through_masquerade(mail: SimpleNamespace) -> None:
    mail.outbound.clear()
    msg = message(mail.tmp, "outbound", b"from the lan\r\n")
    sent_ok(client(mail.lab, "lan", "send", EXT, "alice@example.com", "dave@example.net", "each", str(msg)))
    mail.outbound.wait_count(1)
    assert stored_body(mail.outbound.messages()[0]) == msg.read_bytes()
    assert "client=unknown[203.0.113.1]" in mail.outbound.log.read_text()  # the MTA saw the router's address
    # A sender outside example.com may not send out.
    bad = client(mail.lab, "lan", "send", EXT, "mallory@evil.org", "dave@example.net", "each", str(msg))
    assert bad.returncode != 0 and "Sender domain not allowed here" in bad.stderr


def raw(mail: SimpleNamespace, *steps: bytes, host: str = "ext", server: str = WAN) -> str:
    result = client(mail.lab, host, "raw", server, *(s.hex() for s in steps), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["received"]


EHLO = b"EHLO attacker.example.org\r\n"
ENVELOPE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
SMUGGLED = (b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            b"From: admin@example.com\r\nSubject: SMUGGLED\r\n\r\nspoofed\r\n")


@pytest.mark.parametrize("end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r\r\n", b"\r.\r\n", b"\n.\r\r\n"], ids=repr)
def test_smuggling_never_makes_a_second_message(mail: SimpleNamespace, end: bytes) -> None:
    mail.inbound.clear()
    got = raw(mail, EHLO, ENVELOPE, b"Subject: real\r\n\r\nreal" + end + SMUGGLED + b".\r\n")
    assert "554 5.6.0 Bare CR or LF in message content; message refused" in got
    # Postfix got no end of data, so it stored nothing; its log says the client went away mid-DATA.
    wait_for(lambda: "lost connection after DATA" in mail.inbound.log.read_text(), timeout=10, what="Postfix to see the abort")
    assert mail.inbound.count() == 0
    assert "SMUGGLED" not in mail.inbound.log.read_text()


def test_the_same_smuggling_without_the_gateway_does_make_a_second_message(mail: SimpleNamespace) -> None:
    """The control: straight from the router to Postfix (no gateway), the bare-LF end works on it."""
    mail.inbound.clear()
    raw(mail, EHLO, ENVELOPE, b"Subject: real\r\n\r\nreal\n.\n" + SMUGGLED + b".\r\n", host="router", server=LAN)
    mail.inbound.wait_count(2)
    assert any(b"SMUGGLED" in m for m in mail.inbound.messages())


def test_starttls_with_commands_pipelined_after_it(mail: SimpleNamespace) -> None:
    got = raw(mail, EHLO, b"STARTTLS\r\nMAIL FROM:<alice@example.org>\r\n")
    assert "STARTTLS" not in got.split("\r\n250 ", 1)[0].split("220 ", 1)[1]  # not offered in strip mode
    assert got.endswith("554 5.5.0 Commands pipelined after STARTTLS; closing\r\n")


def test_limits_and_relay_against_the_running_gateway(mail: SimpleNamespace) -> None:
    long_line = raw(mail, EHLO, b"NOOP " + b"x" * 600 + b"\r\n")
    assert "500 5.5.6 Line too long" in long_line
    rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(101))
    many = raw(mail, EHLO, b"MAIL FROM:<alice@example.org>\r\n" + rcpts)
    assert many.count("250 2.1.5 Ok") == 100 and "452 4.5.3 Too many recipients" in many
    size = raw(mail, EHLO, b"MAIL FROM:<alice@example.org> SIZE=20971521\r\n")
    assert "552 5.3.4 Message size exceeds fixed maximum message size" in size
    relay = raw(mail, EHLO, b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<someone@elsewhere.net>\r\n")
    assert "550 5.7.1 Relay access denied" in relay
    unknown = raw(mail, EHLO, b"XYZZY\r\n" * 5, b"XYZZY\r\n")
    assert unknown.count("500 5.5.2") == 5 and unknown.endswith("421 4.7.0 Too many errors; closing\r\n")
    garbage = raw(mail, EHLO, b"\x00\x01\xff garbage\r\n", b"MA\x00IL FROM:<a@b.c>\r\n")
    assert garbage.count("500 5.5.2 Syntax error, command unrecognized") == 2


def test_a_silent_client_gets_the_idle_timeout(mail: SimpleNamespace) -> None:
    got = raw(mail, EHLO, b"")  # then silence, until the gateway speaks
    assert got.endswith("421 4.4.2 Idle timeout; closing\r\n")


def test_a_server_that_breaks_the_reply_rules(mail: SimpleNamespace) -> None:
    """A fake server in lan (Postfix stopped for it) with a bare-LF reply, then an over-long one."""
    mail.inbound.stop()
    try:
        for bad in (b"250 ok\n", b"250 " + b"x" * 600 + b"\r\n"):
            fake = mail.lab.popen("lan", ["python3", "-c", FAKE_SERVER, LAN, bad.hex()])
            try:
                mail.lab.wait_listening("lan", 25)
                got = raw(mail, EHLO)
                assert got.endswith("421 4.4.0 The server's reply was refused; closing\r\n"), got
            finally:
                fake.kill()
                fake.wait()
    finally:
        mail.inbound = Postfix(mail.lab, "lan", mail.tmp, LAN, "example.com")


FAKE_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 25)); s.listen(4)
while True:
    c, _ = s.accept()
    c.sendall(b"220 fake ESMTP\r\n")
    c.recv(512)
    c.sendall(bytes.fromhex(sys.argv[2]))
    c.recv(512)
    c.close()
"""


# ---- hostile peers ------------------------------------------------------------------------
# The module's gateway has idle_timeout = 3 s; a closing leg that does not
# read gets CLOSE_FLUSH_TIMEOUT (5 s), then a reset.

# What a session may hold however much its peers send: 64 KiB unsent on a
# leg before the other is not read (the buffer_high_water setting's default),
# one read of 64 KiB, the core's own input buffers (64 KiB of pipelined
# commands at most); a quarter MiB with room to spare.
BOUND = 256 * 1024


def popen_client(mail: SimpleNamespace, host: str, *args: str) -> subprocess.Popen:
    return mail.lab.popen(host, [sys.executable, SMTPLIB, *args], stdout=subprocess.PIPE, text=True)


def line_of(proc: subprocess.Popen, timeout: float = 60) -> dict:
    line = wait_for(proc.stdout.readline, timeout=timeout, what="the client's report")  # type: ignore[union-attr]
    return json.loads(line)


def buffered(mail: SimpleNamespace) -> int:
    """What the smtp-in gateway holds now: its stats line (SIGUSR1), field ``buffered``."""
    pid = mail.run.processes()["gateway-smtp-in"]["pid"]
    seen = mail.run.text().count(" smtp-in stats ")
    os.kill(pid, signal.SIGUSR1)
    text = wait_for(lambda: (t := mail.run.text()).count(" smtp-in stats ") > seen and t, timeout=10,
                    what="the stats line")
    return int(re.findall(r" smtp-in stats .*?\bbuffered=(\d+)", text)[-1])


def closed(mail: SimpleNamespace, port: int, timeout: float = 20) -> str:
    """The reason in the smtp-in close line of the session from ext's ``port``."""
    pattern = re.compile(rf" smtp-in close reason=(\S+) .*client={EXT}:{port}\b")
    return wait_for(lambda: (m := pattern.search(mail.run.text())) and m.group(1), timeout=timeout,
                    what=f"the close line of the session from port {port}")


@contextlib.contextmanager
def fake_server(mail: SimpleNamespace, script: str) -> Iterator[None]:
    """``script`` (python, given the address) listening on lan:25 in Postfix's place."""
    mail.inbound.stop()
    try:
        server = mail.lab.popen("lan", [sys.executable, "-c", script, LAN])
        try:
            mail.lab.wait_listening("lan", 25)
            yield
        finally:
            server.kill()
            server.wait()
    finally:
        mail.inbound = Postfix(mail.lab, "lan", mail.tmp, LAN, "example.com")


# Postfix answers what it is asked and no more; a server that sends much
# needs a script: each NOOP gets a reply of 60 lines of 480 bytes (29 KB).
FLOODING_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 25)); s.listen(4)
c, _ = s.accept()
f = c.makefile("rb")
c.sendall(b"220 flooding ESMTP\r\n")
big = b"".join(b"250-" + b"%03d" % i + b"x" * 477 + b"\r\n" for i in range(59)) + b"250 end\r\n"
while line := f.readline():
    c.sendall(big if line.upper().startswith(b"NOOP") else b"250 flooding\r\n")
time.sleep(60)
"""


def test_a_client_that_stops_reading_while_the_server_sends(mail: SimpleNamespace) -> None:
    """100 NOOPs in one go into a 4 KiB window, each answered with 29 KB
    (3 MB in all), and nothing read: the gateway stops reading both legs
    with at most BOUND held, and the idle timeout ends the session (the
    client's leg by a reset, since it never reads what waits for it)."""
    with fake_server(mail, FLOODING_SERVER):
        deaf = popen_client(mail, "ext", "deaf", WAN, "30", "100", b"NOOP\r\n".hex())
        try:
            port = line_of(deaf)["port"]
            held: list[int] = []
            wait_for(lambda: held.append(buffered(mail)) or held[-1] > 64 * 1024, timeout=10,
                     what="the replies to back up in the gateway")
            assert closed(mail, port) == "idle_timeout"
            assert max(held) <= BOUND, held
            end = line_of(deaf, timeout=30)
            assert end["ended"] and end["after"] < 15, end
        finally:
            deaf.kill()
            deaf.wait()
    assert buffered(mail) == 0


STALLING_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 25)); s.listen(4)
c, _ = s.accept()
f = c.makefile("rb")
c.sendall(b"220 stalling ESMTP\r\n")
while line := f.readline():
    verb = line[:4].upper()
    if verb == b"EHLO":
        c.sendall(b"250-stalling\r\n250 PIPELINING\r\n")
    elif verb == b"DATA":
        c.sendall(b"354 go ahead\r\n")
        time.sleep(120)  # and never read again
    else:
        c.sendall(b"250 ok\r\n")
"""


def test_a_server_that_stops_reading_mid_data(mail: SimpleNamespace) -> None:
    """After 354 the server reads nothing more: the client's content backs up
    to the gateway, which stops reading the client with at most BOUND held;
    the idle timeout tells the client 421 and ends both legs (the server's by
    a reset, since it never reads what waits for it)."""
    with fake_server(mail, STALLING_SERVER):
        flood = popen_client(mail, "ext", "flood", WAN, "30", "alice@example.org", "bob@example.com")
        try:
            report = line_of(flood)
            assert report["stalled"], report  # the gateway stopped taking the content
            assert buffered(mail) <= BOUND
            assert closed(mail, report["port"]) == "idle_timeout"
            received = line_of(flood, timeout=40)["received"]
            assert received.endswith("421 4.4.2 Idle timeout; closing\r\n"), received[-200:]
        finally:
            flood.kill()
            flood.wait()


def test_a_client_that_resets_right_after_its_end_of_data(mail: SimpleNamespace) -> None:
    """The message is stored whole or not at all (never cut short, never
    twice), the session ends as a client reset, and the next one works."""
    mail.inbound.clear()
    body = b"Subject: reset after dot\r\n\r\n" + b"line of the message\r\n" * 500
    result = client(mail.lab, "ext", "rst-after-dot", WAN, "alice@example.org", "bob@example.com", body.hex())
    port = json.loads(result.stdout)["port"]
    assert closed(mail, port) == "client_reset"
    wait_for(lambda: mail.inbound.count() == 1 or "lost connection after DATA" in mail.inbound.log.read_text(),
             timeout=15, what="Postfix to store the message or drop it")
    stored = mail.inbound.messages()
    assert len(stored) <= 1
    if stored:
        assert stored_body(stored[0]) == body
    msg = message(mail.tmp, "after-reset", b"next\r\n")
    sent_ok(client(mail.lab, "ext", "send", WAN, "alice@example.org", "bob@example.com", "each", str(msg)))


def test_kill_9_of_the_gateway_with_sessions_open(mail: SimpleNamespace) -> None:
    """The open session's client sees its connection end; the supervisor
    starts the gateway again, and a new session carries a mail."""
    deaf = popen_client(mail, "ext", "deaf", WAN, "20", "1", b"NOOP\r\n".hex())
    try:
        line_of(deaf)
        before = mail.run.processes()["gateway-smtp-in"]["pid"]
        os.kill(before, signal.SIGKILL)
        end = line_of(deaf, timeout=30)
        assert end["ended"] and end["after"] < 5, end
    finally:
        deaf.kill()
        deaf.wait()
    wait_for(lambda: (p := mail.run.processes()["gateway-smtp-in"])["state"] == "running" and p["pid"] != before,
             timeout=10, interval=0.05, what="the gateway started again", ignore=(OSError, ValueError))
    mail.inbound.clear()
    msg = message(mail.tmp, "after-kill", b"the gateway was killed and came back\r\n")
    wait_for(lambda: client(mail.lab, "ext", "send", WAN, "alice@example.org", "bob@example.com", "each",
                            str(msg)).returncode == 0, timeout=20, what="a mail through the new gateway")
    mail.inbound.wait_count(1)
    assert stored_body(mail.inbound.messages()[0]) == msg.read_bytes()


# ---- CHUNKING (RFC 3030): BDAT through the gateway to Postfix --------------------------------------


def test_bdat_messages_arrive_byte_identical(mail: SimpleNamespace) -> None:
    """Pipelined BDAT chunks (the client checks that CHUNKING is offered and each BDAT gets 250): messages
    in 11-byte chunks with dot lines, CRLFs split between chunks and 8-bit text; 10 MB in 1 MB chunks."""
    mail.inbound.clear()
    dots = message(mail.tmp, "bdat-dots", b".starts with a dot\r\n..two dots\r\n.\r\nend\r\n")
    eight = message(mail.tmp, "bdat-eight", "Grüße, naïve café\r\n".encode() * 10)
    line = os.urandom(36).hex().encode() + b"\r\n"
    big = message(mail.tmp, "bdat-big", line * (10 * MB // len(line)))
    small = sent_ok(client(mail.lab, "ext", "bdat", WAN, "alice@example.org", "bob@example.com", "11",
                           str(dots), str(eight)))
    large = sent_ok(client(mail.lab, "ext", "bdat", WAN, "alice@example.org", "bob@example.com", str(MB), str(big)))
    assert small["sent"] == 2 and large["sent"] == 1
    mail.inbound.wait_count(3)
    stored = {m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0]: m for m in mail.inbound.messages()}
    for f in (dots, eight, big):
        assert stored_body(stored[f.name.encode()]) == f.read_bytes(), f.name


BDAT_ENVELOPE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\n"


def test_bdat_from_a_lying_or_mixing_client(mail: SimpleNamespace) -> None:
    mail.inbound.clear()
    # More bytes than the size: the rest is read as a command and refused; the message is the size's bytes.
    body = b"Subject: bdat-more\r\n\r\nsized\r\n"
    more = raw(mail, EHLO, BDAT_ENVELOPE + b"BDAT %d LAST\r\n" % len(body) + body + b"not a command\r\n")
    assert re.search(r"250 2\.0\.0 Ok: \d+ bytes queued as \w+\r\n|250 2\.0\.0 Ok: queued as \w+\r\n", more), more
    assert "500 5.5.2 Syntax error, command unrecognized\r\n" in more
    mail.inbound.wait_count(1)
    assert stored_body(mail.inbound.messages()[0]) == body
    # BDAT then DATA in one transaction: 503 from the gateway; RSET puts it right.
    mixed = raw(mail, EHLO, BDAT_ENVELOPE + b"BDAT 5\r\nhello", b"DATA\r\n", b"RSET\r\n")
    assert "503 5.5.1 Bad sequence of commands\r\n" in mixed and mixed.count("250 2.0.0 Ok\r\n") >= 1
    # A size beyond max_message_size (20 MiB here): 552 before a byte of it is read, and close.
    huge = raw(mail, EHLO, BDAT_ENVELOPE + b"BDAT 20971521 LAST\r\n")
    assert huge.endswith("552 5.3.4 Message size exceeds fixed maximum message size; closing\r\n"), huge
    # Fewer bytes than the size, then silence: the idle timeout (3 s here), and no message.
    short = raw(mail, EHLO, BDAT_ENVELOPE + b"BDAT 1000 LAST\r\nSubject: short\r\n", b"")
    assert short.endswith("421 4.4.2 Idle timeout; closing\r\n"), short[-300:]
    assert mail.inbound.count() == 1


def test_a_client_that_resets_mid_chunk(mail: SimpleNamespace) -> None:
    mail.inbound.clear()
    result = client(mail.lab, "ext", "bdat-rst", WAN, "alice@example.org", "bob@example.com", str(MB), "65536")
    port = json.loads(result.stdout)["port"]
    assert closed(mail, port) == "client_reset"
    wait_for(lambda: "lost connection after BDAT" in mail.inbound.log.read_text(), timeout=15,
             what="Postfix to drop the cut transaction")
    assert mail.inbound.count() == 0
    msg = message(mail.tmp, "bdat-after-reset", b"next\r\n")
    sent_ok(client(mail.lab, "ext", "bdat", WAN, "alice@example.org", "bob@example.com", "4096", str(msg)))
    mail.inbound.wait_count(1)
