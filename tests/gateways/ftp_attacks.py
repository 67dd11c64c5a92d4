"""Hostile FTP peers for tests/gateways/test_ftp_netns.py, run inside a lab host (stdlib only).

    python ftp_attacks.py client CASE SERVER [ARGS...]   # prints one JSON object
    python ftp_attacks.py server MODE ADDRESS            # a fake FTP server on ADDRESS:21

Client cases (anonymous login to vsftpd first, except ``before-greeting``):

- ``replies LINE...``: send each line, collect each reply's first line.
- ``never-accept MYADDR PORT``: PORT for MYADDR:PORT (whose SYNs its host
  drops), RETR of pub/probe.bin; the reply codes, up to the final one.
- ``split-port MYADDR``: a PORT line in two TCP segments, then RETR of
  pub/small.bin through it; returns the reply codes and the bytes' sha256.
- ``third-host MYADDR THIRD``: PASV (EPSV to an IPv6 server), then a
  connection to the 227 address from THIRD (another address of this host),
  then from MYADDR; RETR.
- ``second-connection MYADDR``: PASV (EPSV to an IPv6 server), a first data
  connection, a second one to the same port, then RETR over the first.
- ``before-greeting MYADDR``: connect and send PORT at once, before any greeting.
- ``pasv``: login and PASV against a fake server; the reply.
- ``greeting``: every line of the greeting and of a STAT reply, and a PASV's reply.
- ``two-pasv MYADDR``: PASV twice, then a connection to the first 227's port
  (``refused``: the server reset it, so the router let it through;
  ``dropped``: the router did) and one to the second's, and RETR over it.

Server modes: ``hold-greeting`` waits for the client to speak or leave before
greeting (so nothing it is sent can come before the greeting) and reports
what it got; ``foreign-227`` greets, accepts any login, and answers PASV with
a 227 that names another host; ``noop-227`` answers NOOP with a 227 naming a
private address.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time

TIMEOUT = 5.0
REFUSED_WITHIN = 2.0  # a connection the router drops gives no answer: how long to wait for one


def _lines(sock: socket.socket):
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.rstrip(b"\r").decode("latin-1")


class Control:
    def __init__(self, server: str, source: str = "") -> None:
        self.sock = socket.create_connection((server, 21), timeout=TIMEOUT, source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lines = _lines(self.sock)

    def reply(self) -> str:
        """One whole reply (RFC 959 section 4.2); returns its last line."""
        line = next(self.lines)
        if line[3:4] != "-":
            return line
        code = line[:3]
        while not ((line := next(self.lines))[:3] == code and line[3:4] in (" ", "")):
            pass
        return line

    def send(self, line: str) -> str:
        self.sock.sendall(line.encode("latin-1") + b"\r\n")
        return self.reply()

    def whole(self) -> list[str]:
        """Every line of one reply."""
        lines = [next(self.lines)]
        if lines[0][3:4] == "-":
            code = lines[0][:3]
            while not ((line := next(self.lines))[:3] == code and line[3:4] in (" ", "")):
                lines.append(line)
            lines.append(line)
        return lines

    def login(self) -> list[str]:
        return [self.reply(), self.send("USER anonymous"), self.send("PASS x"), self.send("TYPE I")]


def _pasv_endpoint(reply: str) -> tuple[str, int]:
    inner = reply[reply.index("(") + 1 : reply.index(")")]
    h = inner.split(",")
    return ".".join(h[:4]), int(h[4]) * 256 + int(h[5])


def _passive(c: "Control", server: str) -> tuple[str, tuple[str, int]]:
    """PASV's reply and data endpoint; over IPv6 EPSV's (RFC 2428: the control connection's address)."""
    if ":" not in server:
        reply = c.send("PASV")
        return reply, _pasv_endpoint(reply)
    reply = c.send("EPSV")
    return reply, (server, int(reply[reply.index("(") + 1 : reply.index(")")].strip("|")))


def _connect_outcome(to: tuple[str, int], source: str) -> tuple[str, socket.socket | None]:
    """("connected", sock), ("refused", None): a reset came back; ("dropped", None): nothing did."""
    try:
        return "connected", socket.create_connection(to, timeout=REFUSED_WITHIN, source_address=(source, 0))
    except ConnectionRefusedError:
        return "refused", None
    except OSError:
        return "dropped", None


def _connect_or_not(to: tuple[str, int], source: str) -> socket.socket | None:
    try:
        return socket.create_connection(to, timeout=REFUSED_WITHIN, source_address=(source, 0))
    except OSError:
        return None


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def client(case: str, server: str, args: list[str]) -> dict:
    if case == "replies":
        c = Control(server)
        c.login()
        return {"replies": [c.send(line) for line in args]}
    if case == "never-accept":
        # PORT for a port whose SYNs the host drops, then RETR: the replies until a final one.
        me, port = args[0], int(args[1])
        c = Control(server)
        c.login()
        codes = [c.send(f"PORT {me.replace('.', ',')},{port >> 8},{port & 255}")[:3]]
        c.sock.settimeout(60)
        codes.append(c.send("RETR pub/probe.bin")[:3])
        while codes[-1].startswith("1"):
            codes.append(c.reply()[:3])
        return {"codes": codes}
    if case == "split-port":
        me = args[0]
        listener = socket.create_server((me, 0))
        port = listener.getsockname()[1]
        c = Control(server)
        c.login()
        line = f"PORT {me.replace('.', ',')},{port >> 8},{port & 255}\r\n".encode()
        c.sock.sendall(line[:7])
        time.sleep(0.1)  # the scenario itself: the rest of the line in a later TCP segment
        c.sock.sendall(line[7:])
        port_reply = c.reply()
        retr = c.send("RETR pub/small.bin")
        listener.settimeout(TIMEOUT)
        data_sock, peer = listener.accept()
        data = _read_all(data_sock)
        return {"port": port_reply, "retr": retr, "done": c.reply(), "sha256": hashlib.sha256(data).hexdigest(),
                "data_peer": peer[0]}
    if case in ("third-host", "second-connection"):
        me = args[0]
        c = Control(server, me)
        c.login()
        pasv, to = _passive(c, server)
        other = args[1] if case == "third-host" else me
        first = _connect_or_not(to, me) if case == "second-connection" else None
        intruder = _connect_or_not(to, other)
        if case == "third-host":
            first = _connect_or_not(to, me)
        out = {"pasv": pasv, "intruder_connected": intruder is not None, "client_connected": first is not None}
        if first is not None:
            out["retr"] = c.send("RETR pub/small.bin")
            out["sha256"] = hashlib.sha256(_read_all(first)).hexdigest()
            out["done"] = c.reply()
        return out
    if case == "greeting":
        c = Control(server)
        greeting = c.whole()
        for line in ("USER anonymous", "PASS x"):
            c.send(line)
        c.sock.sendall(b"STAT\r\n")
        stat = c.whole()
        return {"greeting": greeting, "stat": stat, "pasv": c.send("PASV")}
    if case == "two-pasv":
        me = args[0]
        c = Control(server, me)
        c.login()
        first, second = c.send("PASV"), c.send("PASV")
        old, _ = _connect_outcome(_pasv_endpoint(first), me)
        outcome, sock = _connect_outcome(_pasv_endpoint(second), me)
        out = {"first": first, "second": second, "old_port": old, "new_port": outcome}
        if sock is not None:
            out["retr"] = c.send("RETR pub/small.bin")
            out["sha256"] = hashlib.sha256(_read_all(sock)).hexdigest()
            out["done"] = c.reply()
        return out
    if case == "before-greeting":
        me = args[0]
        sock = socket.create_connection((server, 21), timeout=TIMEOUT)
        sock.sendall(f"PORT {me.replace('.', ',')},200,1\r\n".encode())
        sock.settimeout(TIMEOUT)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except OSError:
            pass
        return {"received": got.decode("latin-1")}
    if case == "pasv":
        c = Control(server)
        c.login()
        return {"pasv": c.send("PASV"), "after": c.send("NOOP")}
    raise SystemExit(f"unknown case {case}")


def server(mode: str, address: str) -> None:
    listener = socket.create_server((address, 21), reuse_port=False)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        if mode == "hold-greeting":
            try:
                early = conn.recv(4096)  # b"" when the client side went away first
            except OSError:
                early = b"<timeout>"
            try:
                conn.sendall(b"220 late greeting\r\n227 Entering Passive Mode (203,0,113,11,195,80).\r\n")
            except OSError:
                pass
            print(json.dumps({"early": early.decode("latin-1")}), flush=True)
            conn.close()
            continue
        conn.sendall(b"220 fake\r\n")
        for line in _lines(conn):
            verb = line.split(" ", 1)[0].upper()
            if verb == "PASV":
                conn.sendall(b"227 Entering Passive Mode (203,0,113,99,195,80).\r\n")
            elif verb == "NOOP" and mode == "noop-227":
                conn.sendall(b"227 Entering Passive Mode (192,168,1,10,195,80).\r\n")
            elif verb == "USER":
                conn.sendall(b"331 any password\r\n")
            elif verb == "PASS":
                conn.sendall(b"230 in\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 bye\r\n")
                break
            else:
                conn.sendall(b"200 ok\r\n")
        conn.close()


if __name__ == "__main__":
    role, what, where, *rest = sys.argv[1:]
    if role == "client":
        print(json.dumps(client(what, where, rest)))
    else:
        server(what, where)
