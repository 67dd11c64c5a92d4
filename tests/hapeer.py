"""A paced TCP stream across a router pair's failovers: its integrity and its stalls.

    python hapeer.py serve PORT                  # each connection: read "MB RATE\\n", send MB MiB at RATE MiB/s
    python hapeer.py get HOST PORT MB RATE       # receive, check the sha256, print one JSON line:
                                                 # {"ok", "bytes", "seconds", "stall", "stalls"}
    python hapeer.py churn HOST PORT COUNT THREADS  # COUNT empty connections, THREADS at a time:
                                                 # {"ok", "failed", "seconds"}
    python hapeer.py udpsink SECONDS IDLE PORT...  # count each port's datagrams until SECONDS, or IDLE after
                                                 # the first port's last: {"counts", "stall", "stalls"}
                                                 # (the stalls of the first port's datagrams)
    python hapeer.py ftp HOST                    # one anonymous FTP session (ftplib, passive) kept open:
                                                 # each NAME read on stdin, pub/NAME downloaded, one JSON
                                                 # line: {"name", "ok", "bytes", "sha256", "seconds"}

``stall`` is the longest time between two reads that returned data;
``stalls`` lists each gap over STALL_REPORT seconds as [seconds since the start, gap].
Pacing keeps the stream running long enough for the failovers a test makes.
Every socket has a timeout: nothing waits forever.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import selectors
import socket
import sys
import threading
import time

from tests.bulkpeer import BLOCK, digest

TIMEOUT = 60.0
CHUNK = 64 * 1024
STALL_REPORT = 0.2


def _send(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(TIMEOUT)
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = conn.recv(64 - len(line))
            if not chunk:
                return
            line += chunk
        mb, rate = line.split()
        total, per_second = int(mb) << 20, float(rate) * (1 << 20)
        start, sent = time.monotonic(), 0
        try:
            while sent < total:
                off = sent % len(BLOCK)
                n = min(CHUNK, total - sent, len(BLOCK) - off)
                conn.sendall(BLOCK[off:off + n])
                sent += n
                ahead = sent / per_second - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            return


def serve(port: int) -> None:
    ls = socket.create_server(("0.0.0.0", port), reuse_port=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_send, args=(conn,), daemon=True).start()


def get(host: str, port: int, mb: int, rate: float) -> int:
    import hashlib

    h, got, total = hashlib.sha256(), 0, mb << 20
    stall, stalls = 0.0, []
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(f"{mb} {rate}\n".encode())
        start = last = time.monotonic()
        while got < total:
            try:
                data = s.recv(1 << 16)
            except OSError as err:
                print(json.dumps({"ok": False, "bytes": got, "error": str(err), "stall": stall, "stalls": stalls}))
                return 1
            if not data:
                break
            now = time.monotonic()
            gap = now - last
            if gap > STALL_REPORT:
                stalls.append([round(last - start, 3), round(gap, 3)])
            stall, last = max(stall, gap), now
            h.update(data)
            got += len(data)
    ok = got == total and h.hexdigest() == digest(mb)
    print(json.dumps({"ok": ok, "bytes": got, "seconds": round(time.monotonic() - start, 3),
                      "stall": round(stall, 3), "stalls": stalls}))
    return 0 if ok else 1


def churn(host: str, port: int, count: int, threads: int) -> int:
    left, failed, lock = [count], [0], threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(b"0 1\n")
                    s.recv(1)  # the server closes: end of file
            except OSError:
                with lock:
                    failed[0] += 1

    start = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"ok": count - failed[0], "failed": failed[0], "seconds": round(time.monotonic() - start, 3)}))
    return 0


def udpsink(seconds: float, idle: float, ports: list[int]) -> int:
    """Datagrams to each port (a media stream on the first) and the first port's stalls."""
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
        socks.append(sock)
    print("ready", flush=True)
    counts = dict.fromkeys(ports, 0)
    start = time.monotonic()
    last = None
    stall, stalls = 0.0, []
    sel = selectors.DefaultSelector()
    for sock, port in zip(socks, ports):
        sel.register(sock, selectors.EVENT_READ, port)
    while True:
        now = time.monotonic()
        if now - start >= seconds or (last is not None and now - last >= idle):
            break
        for key, _ in sel.select(0.05):
            while True:
                try:
                    key.fileobj.recv(2048)  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                counts[key.data] += 1
                if key.data == ports[0]:
                    now = time.monotonic()
                    if last is not None:
                        gap = now - last
                        stall = max(stall, gap)
                        if gap > STALL_REPORT:
                            stalls.append([round(now - start, 2), round(gap, 3)])
                    last = now
    print(json.dumps({"counts": counts, "stall": round(stall, 3), "stalls": stalls}), flush=True)
    return 0


def ftp(host: str) -> int:
    """One FTP control connection across a pair's failovers; a download for each name on stdin."""
    session = ftplib.FTP(host, timeout=TIMEOUT)
    session.login()
    for line in sys.stdin:
        name = line.strip()
        h, got, start = hashlib.sha256(), [0], time.monotonic()

        def take(block: bytes) -> None:
            h.update(block)
            got[0] += len(block)
        try:
            session.retrbinary(f"RETR pub/{name}", take)
            result = {"ok": True}
        except (OSError, EOFError, ftplib.Error) as err:
            result = {"ok": False, "error": repr(err)}
        print(json.dumps({"name": name, **result, "bytes": got[0], "sha256": h.hexdigest(),
                          "seconds": round(time.monotonic() - start, 3)}), flush=True)
    session.quit()
    return 0


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(int(args[0]))
    elif mode == "churn":
        sys.exit(churn(args[0], int(args[1]), int(args[2]), int(args[3])))
    elif mode == "udpsink":
        sys.exit(udpsink(float(args[0]), float(args[1]), [int(p) for p in args[2:]]))
    elif mode == "ftp":
        sys.exit(ftp(args[0]))
    elif mode == "get":
        sys.exit(get(args[0], int(args[1]), int(args[2]), float(args[3])))
    else:
        sys.exit(f"usage: {__doc__}")
