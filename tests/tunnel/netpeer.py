"""Scripted peers for the tunnel's netns tests, run inside a namespace.

    netpeer.py tcp-serve HOST PORT STEP...   accept one connection, run the steps
    netpeer.py tcp-client HOST PORT STEP...  connect, run the steps
    netpeer.py udp-echo HOST PORT            answer every datagram; one JSON line each
    netpeer.py udp-client HOST PORT COUNT WAIT [SIZE [LPORT]]
                                             send COUNT datagrams one by one (from
                                             local port LPORT, if given), each
                                             waiting up to WAIT s for its echo
    netpeer.py udp-flood HOST PORT SECONDS SIZE
                                             send as fast as possible; count echoes
    netpeer.py rst-flood HOST PORT SECONDS   connect, send a request, reset (RST),
                                             over and over, at every step of the
                                             answer; count the connections
    netpeer.py udp-rate HOST PORT RATE SECONDS SIZE
                                             send RATE datagrams/s for SECONDS from a
                                             new port; count the echoes (1 s to drain)
    netpeer.py slow-downloads HOST PORT N PATH SIZE CHUNK INTERVAL
                                             N HTTP/1.0 GETs of PATH at once; each
                                             reads CHUNK bytes every INTERVAL s until
                                             EOF; count the bodies of SIZE bytes

TCP steps: ``send:TEXT``, ``recv:N`` (exactly N bytes), ``recv-eof`` (until
EOF or reset), ``hold:SECONDS`` (read nothing for that long), ``shut`` (shutdown SHUT_WR: a FIN), ``rst`` (SO_LINGER 0 and
close: an RST), ``close``. The script prints one JSON object at the end:
``{"got": "...", "end": "eof" | "reset" | "open", "ready": port}``; a
server prints ``{"listening": port}`` first. Every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

TIMEOUT = 15.0


def _family(host: str) -> socket.AddressFamily:
    """HOST is an address: an IPv6 one has colons."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _shown(addr: tuple) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _steps(sock: socket.socket, steps: list[str]) -> dict[str, object]:
    got = b""
    end = "open"
    for step in steps:
        verb, _, arg = step.partition(":")
        try:
            if verb == "send":
                sock.sendall(arg.encode())
            elif verb == "recv":
                want = int(arg)
                while len(got) < want:
                    chunk = sock.recv(want - len(got))
                    if not chunk:
                        end = "eof"
                        break
                    got += chunk
            elif verb == "recv-eof":
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        end = "eof"
                        break
                    got += chunk
            elif verb == "hold":
                time.sleep(float(arg))
                print(json.dumps({"held": float(arg)}), flush=True)
            elif verb == "shut":
                sock.shutdown(socket.SHUT_WR)
            elif verb == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                end = "reset-sent"
            elif verb == "close":
                sock.close()
            else:
                raise SystemExit(f"unknown step {step!r}")
        except ConnectionResetError:
            end = "reset"
            break
        except TimeoutError:
            end = "timeout"
            break
    return {"got": got.decode(errors="replace"), "end": end}


def tcp_serve(host: str, port: int, steps: list[str]) -> None:
    listener = socket.socket(_family(host))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(8)
    listener.settimeout(TIMEOUT)
    print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    print(json.dumps(_steps(conn, steps)), flush=True)


def tcp_client(host: str, port: int, steps: list[str]) -> None:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    print(json.dumps(_steps(sock, steps)), flush=True)


def udp_echo(host: str, port: int) -> None:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.bind((host, port))
    print(json.dumps({"listening": sock.getsockname()[1]}), flush=True)
    count = 0
    while True:
        data, addr = sock.recvfrom(65535)
        count += 1
        sock.sendto(data, addr)
        print(json.dumps({"rx": count, "from": _shown(addr), "size": len(data)}), flush=True)


def udp_client(host: str, port: int, count: int, wait: float, size: int = 32, lport: int = 0) -> None:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if ":" in host else "", lport))
    sock.connect((host, port))
    received = 0
    extra = 0
    for i in range(count):
        payload = (b"%08d" % i).ljust(size, b".")
        sock.send(payload)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                break
            if data == payload:
                received += 1
                break
            extra += 1
    # Anything more that arrives shortly after is a duplicate (a replay let through).
    sock.settimeout(0.3)
    try:
        while sock.recv(65535):
            extra += 1
    except (TimeoutError, ConnectionRefusedError):
        pass
    print(json.dumps({"sent": count, "received": received, "extra": extra}), flush=True)


def udp_flood(host: str, port: int, seconds: float, size: int) -> None:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    payload = b"x" * size
    sent = received = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(64):
            try:
                sock.send(payload)
                sent += 1
            except BlockingIOError:
                break
        while True:
            try:
                sock.recv(65535)
                received += 1
            except (BlockingIOError, ConnectionRefusedError):
                break
    drain = time.monotonic() + 1.0
    sock.setblocking(True)
    while (left := drain - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            sock.recv(65535)
            received += 1
        except (TimeoutError, ConnectionRefusedError):
            break
    print(json.dumps({"sent": sent, "received": received, "seconds": seconds}), flush=True)


def rst_flood(host: str, port: int, seconds: float) -> None:
    """Request-then-RST clients, one after another, resetting before the
    answer, after its first byte, and after all of it (issue 14 A)."""
    request = b"GET /index.html HTTP/1.0\r\n\r\n"
    done = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock = socket.socket(_family(host))
        sock.settimeout(2.0)
        try:
            sock.connect((host, port))
            sock.sendall(request)
            step = done % 3
            if step == 1:
                sock.recv(1)
            elif step == 2:
                while sock.recv(65536):
                    pass
        except OSError:
            errors += 1
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        done += 1
    print(json.dumps({"connections": done, "errors": errors}), flush=True)


def udp_rate(host: str, port: int, rate: float, seconds: float, size: int) -> None:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    sent = received = 0
    start = time.monotonic()
    while (now := time.monotonic()) < start + seconds:
        while sent < int((now - start) * rate) + 1:
            payload = (b"%08d" % sent).ljust(size, b".")
            try:
                sock.send(payload)
            except BlockingIOError:
                break
            sent += 1
        while True:
            try:
                sock.recv(65535)
                received += 1
            except (BlockingIOError, ConnectionRefusedError):
                break
        time.sleep(0.0005)
    sock.setblocking(True)
    drain = time.monotonic() + 1.0
    while received < sent and (left := drain - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            sock.recv(65535)
            received += 1
        except (TimeoutError, ConnectionRefusedError):
            break
    print(json.dumps({"sent": sent, "received": received}), flush=True)


def slow_downloads(host: str, port: int, n: int, path: str, size: int, chunk: int, interval: float) -> None:
    """Issue 14: many readers slower than the tunnel, all at once."""
    started = time.monotonic()
    socks, got = [], []
    for _ in range(n):
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        sock.setblocking(False)
        socks.append(sock)
        got.append(bytearray())
    live = set(range(n))
    errors = 0
    deadline = started + 120.0
    while live and time.monotonic() < deadline:
        for i in list(live):
            try:
                data = socks[i].recv(chunk)
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
                live.discard(i)
                continue
            if not data:
                live.discard(i)
            got[i] += data
        time.sleep(interval)
    complete = 0
    for sock, body in zip(socks, got):
        sock.close()
        head, _, rest = bytes(body).partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.0 200") and len(rest) == size:
            complete += 1
    print(json.dumps({"complete": complete, "errors": errors, "unfinished": len(live),
                      "seconds": round(time.monotonic() - started, 2)}), flush=True)


def main(argv: list[str]) -> None:
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "tcp-serve":
        tcp_serve(host, port, argv[3:])
    elif mode == "tcp-client":
        tcp_client(host, port, argv[3:])
    elif mode == "udp-echo":
        udp_echo(host, port)
    elif mode == "udp-client":
        udp_client(host, port, int(argv[3]), float(argv[4]), *(int(a) for a in argv[5:7]))
    elif mode == "udp-flood":
        udp_flood(host, port, float(argv[3]), int(argv[4]))
    elif mode == "rst-flood":
        rst_flood(host, port, float(argv[3]))
    elif mode == "udp-rate":
        udp_rate(host, port, float(argv[3]), float(argv[4]), int(argv[5]))
    elif mode == "slow-downloads":
        slow_downloads(host, port, int(argv[3]), argv[4], int(argv[5]), int(argv[6]), float(argv[7]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
