"""Peers for the processor's netns tests, run as a script inside a lab host.

    processor_client.py serve PORT             echo every byte back until EOF, many connections at once;
                                               prints "peer IP PORT" per connection
    processor_client.py many HOST PORT N [T]   open N connections at once (T s to connect, default 10),
                                               then send each its own line and read it back; prints one
                                               JSON summary
    processor_client.py hold HOST PORT         connect, check one echo, print "held", keep the
                                               connection until stdin closes
    processor_client.py raw DST HEX...         send crafted IPv4 packets (hex) through a raw socket

Unlike tests/netprobe.py, whose server answers once and closes, these keep
connections open as long as the peer does, so a test can hold a gateway
flow (an FTP control connection) while it asks for rules.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

TIMEOUT = 10.0  # seconds any one socket operation may take
BACKLOG = 256


def serve(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(BACKLOG)
    lock = threading.Lock()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT * 6)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, peer = srv.accept()
        with lock:
            print(f"peer {peer[0]} {peer[1]}", flush=True)
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def many(host: str, port: int, count: int, connect_timeout: float = TIMEOUT) -> int:
    socks: list[socket.socket | None] = []
    errors: list[str] = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(connect_timeout)
        try:
            s.connect((host, port))
            s.settimeout(TIMEOUT)
            socks.append(s)
        except OSError as err:
            errors.append(f"connect: {err}")
            s.close()
            socks.append(None)
    # Every connection is open before any data moves: they are concurrent.
    replies = 0
    for i, conn in enumerate(socks):
        if conn is None:
            continue
        line = f"connection {i} from port {conn.getsockname()[1]}\n".encode()
        try:
            conn.sendall(line)
            if _read_line(conn) == line:
                replies += 1
            else:
                errors.append(f"{i}: wrong reply")
        except OSError as err:
            errors.append(f"{i}: {err}")
    for conn in socks:
        if conn is not None:
            conn.close()
    print(json.dumps({"connected": sum(c is not None for c in socks), "replies": replies, "errors": errors[:5]}), flush=True)
    return 0 if replies == count else 1


def hold(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(b"hold\n")
        if _read_line(s) != b"hold\n":
            print("no echo", flush=True)
            return 1
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    return 0


def raw(dst: str, packets: list[str]) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        for hexed in packets:
            s.sendto(bytes.fromhex(hexed), (dst, 0))
    return 0


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(int(args[0]))
    elif mode == "many":
        sys.exit(many(args[0], int(args[1]), int(args[2]), *(float(a) for a in args[3:4])))
    elif mode == "hold":
        sys.exit(hold(args[0], int(args[1])))
    elif mode == "raw":
        sys.exit(raw(args[0], args[1:]))
    else:
        sys.exit(f"unknown mode {mode!r}")
