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
"""

from __future__ import annotations

import json
import re
import resource
import smtplib
import socket
import ssl
import sys
import time


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
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
