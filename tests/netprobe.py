"""A tiny TCP/UDP echo peer and client for netns tests, run as a script.

    netprobe.py serve tcp|udp PORT [ADDR]
                                        echo server on ADDR (0.0.0.0; "::" takes IPv6 and IPv4);
                                        prints "peer IP PORT" per connection/datagram
    netprobe.py probe tcp|udp HOST PORT [TIMEOUT]
                                        sends "ping", prints the reply; exit 0 on a reply, 1 otherwise

The server prints the peer address it saw, so a test can tell whether NAT
happened (masquerade: the router's address; port forward: the real client).
"""

from __future__ import annotations

import ipaddress
import socket
import sys


def _peer(host: str) -> str:
    """An IPv4 peer of a dual-stack socket as IPv4 (not ::ffff:a.b.c.d)."""
    addr = ipaddress.ip_address(host)
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def _socket(kind: int, addr: str) -> socket.socket:
    if ":" not in addr:
        return socket.socket(socket.AF_INET, kind)
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return s


def serve(proto: str, port: int, addr: str = "0.0.0.0") -> None:
    if proto == "udp":
        s = _socket(socket.SOCK_DGRAM, addr)
        s.bind((addr, port))
        while True:
            data, peer = s.recvfrom(65535)
            print(f"peer {_peer(peer[0])} {peer[1]}", flush=True)
            s.sendto(b"echo:" + data, peer)
    s = _socket(socket.SOCK_STREAM, addr)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    while True:
        conn, peer = s.accept()
        print(f"peer {_peer(peer[0])} {peer[1]}", flush=True)
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65535)
                conn.sendall(b"echo:" + data)
            except OSError:
                pass


def probe(proto: str, host: str, port: int, timeout: float) -> int:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
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
        serve(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        sys.exit(probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 2.0))
