"""A tiny TCP/UDP echo peer and client for netns tests, run as a script.

    netprobe.py serve tcp|udp PORT      echo server; prints "peer IP PORT" per connection/datagram
    netprobe.py probe tcp|udp HOST PORT [TIMEOUT]
                                        sends "ping", prints the reply; exit 0 on a reply, 1 otherwise

The server prints the peer address it saw, so a test can tell whether NAT
happened (masquerade: the router's address; port forward: the real client).
"""

from __future__ import annotations

import socket
import sys


def serve(proto: str, port: int) -> None:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        while True:
            data, peer = s.recvfrom(65535)
            print(f"peer {peer[0]} {peer[1]}", flush=True)
            s.sendto(b"echo:" + data, peer)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        conn, peer = s.accept()
        print(f"peer {peer[0]} {peer[1]}", flush=True)
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65535)
                conn.sendall(b"echo:" + data)
            except OSError:
                pass


def probe(proto: str, host: str, port: int, timeout: float) -> int:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(b"ping")
            reply = s.recv(65535)
        except OSError as err:
            print(f"fail {type(err).__name__}: {err}", flush=True)
            return 1
    print(f"reply {reply.decode(errors='replace')}", flush=True)
    return 0 if reply == b"echo:ping" else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 2.0))
