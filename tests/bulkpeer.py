"""Bulk TCP peers for the datapath tests: a known byte stream, checked by sha256.

    python bulkpeer.py serve PORT [ADDR]          # each connection: read a command line, then act
                                                  # (ADDR "::": IPv6 too; default 0.0.0.0)
    python bulkpeer.py get HOST PORT MB [PAUSE]   # download MB MiB; with PAUSE MiB, stop there
                                                  # and wait for a line on stdin before the rest
    python bulkpeer.py put HOST PORT MB           # upload MB MiB; the server answers its digest
    python bulkpeer.py churn HOST PORT COUNT THREADS  # COUNT short connections, THREADS at a time

The stream is one fixed pseudo-random MiB repeated, so both ends know its
digest without storing it. Every socket has a timeout: nothing waits forever.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading

BLOCK = random.Random(20261206).randbytes(1 << 20)
TIMEOUT = 60.0


def digest(mb: int) -> str:
    h = hashlib.sha256()
    for _ in range(mb):
        h.update(BLOCK)
    return h.hexdigest()


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(TIMEOUT)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                return
            line += chunk
        verb, mb = line.decode().split()
        if verb == "get":
            for _ in range(int(mb)):
                conn.sendall(BLOCK)
        else:
            left, h = int(mb) << 20, hashlib.sha256()
            while left:
                chunk = conn.recv(min(left, 1 << 16))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            conn.sendall(h.hexdigest().encode() + b"\n")


def serve(port: int, addr: str = "0.0.0.0") -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    srv = socket.create_server((addr, port), family=family, reuse_port=True, backlog=128)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def get(host: str, port: int, mb: int, pause: int | None) -> int:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(f"get {mb}\n".encode())
        h, got = hashlib.sha256(), 0
        want = mb << 20
        while got < want:
            if pause is not None and got >= pause << 20:
                print("paused", got, flush=True)
                sys.stdin.readline()
                pause = None
            chunk = s.recv(min(want - got, 1 << 18))
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
    ok = got == want and h.hexdigest() == digest(mb)
    print("done", got, "intact" if ok else "broken", flush=True)
    return 0 if ok else 1


def put(host: str, port: int, mb: int) -> int:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(f"put {mb}\n".encode())
        for _ in range(mb):
            s.sendall(BLOCK)
        answer = s.makefile().readline().strip()
    ok = answer == digest(mb)
    print("done", "intact" if ok else f"broken {answer!r}", flush=True)
    return 0 if ok else 1


def churn(host: str, port: int, count: int, threads: int) -> int:
    """``count`` connections that each ask for nothing and see the server close."""
    done = [0] * threads
    per = [count // threads + (i < count % threads) for i in range(threads)]

    def worker(i: int) -> None:
        for _ in range(per[i]):
            with socket.create_connection((host, port), timeout=TIMEOUT) as s:
                s.sendall(b"get 0\n")
                if s.recv(1) == b"":
                    done[i] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print("done", sum(done), flush=True)
    return 0 if sum(done) == count else 1


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(int(args[0]), *args[1:2])
    elif mode == "get":
        sys.exit(get(args[0], int(args[1]), int(args[2]), int(args[3]) if len(args) > 3 else None))
    elif mode == "put":
        sys.exit(put(args[0], int(args[1]), int(args[2])))
    elif mode == "churn":
        sys.exit(churn(args[0], int(args[1]), int(args[2]), int(args[3])))
    else:
        sys.exit(f"unknown mode {mode!r}")
