"""SMTP clients for the netns tests and the bench, run inside a lab host.

    smtp_client.py send HOST SENDER RECIPIENT (session|each) FILE...
        smtplib: send each file's bytes as one message, all in one session
        or one connection each; prints {"sent": n, "seconds": s}.
    smtp_client.py sendtls HOST CAFILE SENDER RECIPIENT (session|each) FILE...
        the same after STARTTLS, the server's certificate checked against
        CAFILE (not its name); prints its subject's commonName as "peer" too.
    smtp_client.py load HOST SENDER RECIPIENT (session|each) COUNT SIZE
        the same with COUNT generated messages of SIZE bytes (the bench).
    smtp_client.py raw HOST HEX...
        a raw dialogue: after the greeting, send each step (hex) and wait for
        some reply (an empty step: send nothing, wait up to 30 s); then QUIT
        and read to the end; prints {"received": ...}.
    smtp_client.py idle HOST COUNT SECONDS
        hold COUNT sessions open after their greeting for SECONDS, then QUIT.
    smtp_client.py deaf HOST SECONDS COUNT HEX
        a client that stops reading: a receive buffer of 4 KiB, the greeting
        read, then COUNT times HEX sent and nothing more read; prints {"port", "sent"},
        then waits up to SECONDS for the connection to end (a FIN or RST,
        seen without reading) and prints {"ended", "after"}.
    smtp_client.py flood HOST SECONDS SENDER RECIPIENT
        MAIL, RCPT, DATA, then message lines until the gateway stops taking
        them (no progress for 2 s; 64 MB at most); prints {"port", "sent",
        "stalled"}, then reads until the end (SECONDS at most) and prints
        {"received"}.
    smtp_client.py bdat HOST SENDER RECIPIENT CHUNK FILE...
        CHUNKING (RFC 3030): one session, EHLO (CHUNKING must be offered),
        then per file MAIL, RCPT and its bytes as BDAT chunks of CHUNK bytes,
        the last one LAST, all pipelined (section 4.2) before any reply is
        read; every reply must be 250; prints {"sent": n, "seconds": s}.
    smtp_client.py bdat-rst HOST SENDER RECIPIENT SIZE SENT
        MAIL, RCPT, "BDAT SIZE LAST" and SENT bytes of it, then a reset
        (SO_LINGER 0); prints {"port"}.
    smtp_client.py rst-after-dot HOST SENDER RECIPIENT HEX
        MAIL, RCPT, DATA, the message HEX and its end of data, then a reset
        at once (SO_LINGER 0) before any reply is read; prints {"port"}.
"""

from __future__ import annotations

import json
import re
import resource
import select
import smtplib
import socket
import ssl
import struct
import sys
import time
from typing import Callable


def send(host: str, sender: str, rcpt: str, mode: str, messages: list[bytes], cafile: str | None = None) -> dict:
    start = time.monotonic()
    sent = 0
    smtp = None
    peer = None
    for msg in messages:
        if smtp is None:
            name, _, port = host.partition(":")
            smtp = smtplib.SMTP(name, int(port or 25), timeout=60)
            smtp.ehlo("client.example.org")
            if cafile is not None:
                context = ssl.create_default_context(cafile=cafile)
                context.check_hostname = False
                smtp.starttls(context=context)
                smtp.ehlo("client.example.org")
                subject = dict(kv for rdn in smtp.sock.getpeercert()["subject"] for kv in rdn)
                peer = subject["commonName"]
        options = ["BODY=8BITMIME"] if re.search(rb"[\x80-\xff]", msg) else []
        refused = smtp.sendmail(sender, [rcpt], msg, mail_options=options)
        assert not refused, refused
        sent += 1
        if mode == "each":
            smtp.quit()
            smtp = None
    if smtp is not None:
        smtp.quit()
    out = {"sent": sent, "seconds": time.monotonic() - start}
    if cafile is not None:
        out["peer"] = peer
    return out


def load(host: str, sender: str, rcpt: str, mode: str, count: int, size: int) -> dict:
    line = b"x" * 70 + b"\r\n"
    body = line * max(1, size // len(line))
    msgs = [b"Subject: load %d\r\n\r\n" % i + body for i in range(count)]
    return send(host, sender, rcpt, mode, msgs)


def _read_some(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except (socket.timeout, ConnectionError):
        return b""


def raw(host: str, steps: list[bytes]) -> dict:
    sock = socket.create_connection((host, 25), timeout=10)
    got = bytearray(_read_some(sock, 10))
    closed = False
    for step in steps:
        if not step:  # an empty step: stay silent, as a stuck client does, until the server speaks
            got += _read_some(sock, 30)
            closed = closed or _eof(sock)
            continue
        try:
            sock.sendall(step)
        except OSError:
            closed = True
            break
        data = _read_some(sock, 5)
        if not data:
            # EOF or silence: either way, nothing more will come for this step
            closed = closed or _eof(sock)
        got += data
    if not closed:
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        data = _read_some(sock, 1)
        if not data and _eof(sock):
            break
        got += data
    sock.close()
    return {"received": got.decode("latin-1")}


def _eof(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def idle(host: str, count: int, seconds: float) -> dict:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, 25), timeout=30)
        socks.append(s)
    greeted = sum(1 for s in socks if s.recv(512).startswith(b"220"))
    print(json.dumps({"greeted": greeted}), flush=True)
    time.sleep(seconds)
    for s in socks:
        s.close()
    return {"held": greeted}


def _dialogue(host: str, sender: str, rcpt: str, rcvbuf: int = 0) -> socket.socket:
    """Connected, greeted, EHLO said, and MAIL, RCPT, DATA answered 250, 250, 354."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window it offers
    sock.settimeout(10)
    sock.connect((host, 25))
    f = sock.makefile("rb")

    def reply() -> bytes:
        while (line := f.readline())[3:4] == b"-":
            pass
        return line

    assert reply().startswith(b"220")
    for cmd, code in ((b"EHLO client.example.org", b"250"), (b"MAIL FROM:<%s>" % sender.encode(), b"250"),
                      (b"RCPT TO:<%s>" % rcpt.encode(), b"250"), (b"DATA", b"354")):
        sock.sendall(cmd + b"\r\n")
        got = reply()
        assert got.startswith(code), (cmd, got)
    return sock


def _ended(sock: socket.socket, seconds: float) -> tuple[bool, float]:
    """Whether the peer ended the connection (FIN or RST) within ``seconds``, seen without reading."""
    start = time.monotonic()
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLERR | select.POLLHUP)
    while (left := start + seconds - time.monotonic()) > 0:
        if poller.poll(left * 1000):
            return True, time.monotonic() - start
    return False, seconds


def deaf(host: str, seconds: float, data: bytes) -> dict:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, 25))
    assert sock.recv(512).startswith(b"220")
    sock.sendall(data)
    print(json.dumps({"port": sock.getsockname()[1], "sent": len(data)}), flush=True)
    ended, after = _ended(sock, seconds)
    sock.close()
    return {"ended": ended, "after": round(after, 2)}


def flood(host: str, seconds: float, sender: str, rcpt: str) -> dict:
    sock = _dialogue(host, sender, rcpt)
    sock.setblocking(False)
    chunk = (b"x" * 78 + b"\r\n") * 800  # 64 KB of message lines
    sent, last, stalled = 0, time.monotonic(), False
    while sent < 64 << 20:
        try:
            sent += sock.send(chunk)
            last = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - last > 2.0:
                stalled = True
                break
            select.select([], [sock], [], 0.1)
        except OSError:
            break
    print(json.dumps({"port": sock.getsockname()[1], "sent": sent, "stalled": stalled}), flush=True)
    sock.setblocking(True)
    sock.settimeout(1)
    got, deadline = bytearray(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        got += data
    sock.close()
    return {"received": got.decode("latin-1")}


def _bdat_session(host: str) -> tuple[socket.socket, Callable[[], bytes]]:
    sock = socket.create_connection((host, 25), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")

    def reply() -> bytes:
        lines = b""
        while (line := f.readline())[3:4] == b"-":
            lines += line
        return lines + line

    assert reply().startswith(b"220")
    sock.sendall(b"EHLO client.example.org\r\n")
    ehlo = reply()
    assert ehlo.startswith(b"250") and b"CHUNKING" in ehlo, ehlo
    return sock, reply


def bdat(host: str, sender: str, rcpt: str, chunk: int, messages: list[bytes]) -> dict:
    start = time.monotonic()
    sock, reply = _bdat_session(host)
    for msg in messages:
        parts = [msg[i:i + chunk] for i in range(0, len(msg), chunk)] or [b""]
        out = [b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\n" % (sender.encode(), rcpt.encode())]
        for i, part in enumerate(parts):
            out.append(b"BDAT %d%s\r\n" % (len(part), b" LAST" if i == len(parts) - 1 else b"") + part)
        sock.sendall(b"".join(out))
        for _ in range(2 + len(parts)):
            got = reply()
            assert got.startswith(b"250"), got
    sock.sendall(b"QUIT\r\n")
    assert reply().startswith(b"221")
    sock.close()
    return {"sent": len(messages), "seconds": round(time.monotonic() - start, 3)}


def bdat_rst(host: str, sender: str, rcpt: str, size: int, sent: int) -> dict:
    sock, reply = _bdat_session(host)
    sock.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\n" % (sender.encode(), rcpt.encode()))
    assert reply().startswith(b"250") and reply().startswith(b"250")
    sock.sendall(b"BDAT %d LAST\r\n" % size + (b"x" * 78 + b"\r\n") * (sent // 80))
    port = sock.getsockname()[1]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return {"port": port}


def rst_after_dot(host: str, sender: str, rcpt: str, message: bytes) -> dict:
    sock = _dialogue(host, sender, rcpt)
    sock.sendall(message + (b"" if message.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    port = sock.getsockname()[1]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return {"port": port}


def main(argv: list[str]) -> None:
    cmd, host, *rest = argv
    if cmd == "send":
        sender, rcpt, mode, *files = rest
        out = send(host, sender, rcpt, mode, [open(f, "rb").read() for f in files])
    elif cmd == "sendtls":
        cafile, sender, rcpt, mode, *files = rest
        out = send(host, sender, rcpt, mode, [open(f, "rb").read() for f in files], cafile)
    elif cmd == "load":
        sender, rcpt, mode, count, size = rest
        out = load(host, sender, rcpt, mode, int(count), int(size))
    elif cmd == "raw":
        out = raw(host, [bytes.fromhex(h) for h in rest])
    elif cmd == "idle":
        out = idle(host, int(rest[0]), float(rest[1]))
    elif cmd == "deaf":
        out = deaf(host, float(rest[0]), bytes.fromhex(rest[2]) * int(rest[1]))
    elif cmd == "flood":
        out = flood(host, float(rest[0]), rest[1], rest[2])
    elif cmd == "bdat":
        sender, rcpt, chunk, *files = rest
        out = bdat(host, sender, rcpt, int(chunk), [open(f, "rb").read() for f in files])
    elif cmd == "bdat-rst":
        out = bdat_rst(host, rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif cmd == "rst-after-dot":
        out = rst_after_dot(host, rest[0], rest[1], bytes.fromhex(rest[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
