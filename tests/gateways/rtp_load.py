"""RTP load for scripts/bench rtp, run as a script in a lab host (tests/gateways/rtp_bench.py).

    rtp_load.py send SRC SPORT DST BASE N RAMP SECONDS [PORTS]  # prints {"sent": n, "sent_steady": n}
    rtp_load.py blast SRC SPORT DST PORT SECONDS          # prints {"sent": n}
    rtp_load.py recv PORT SPORT N SECONDS IDLE            # prints the receiver's figures

``send``: N streams of 20 ms PCMU (172-byte RTP datagrams, 50 a second),
stream i from SRC:SPORT+2i to DST:BASE+2i (even ports: RTCP would take the
next ones), started evenly over RAMP seconds; all of them stop RAMP +
SECONDS after the start. One process sends them all, in micro-batches: it
sleeps only when the next datagram is due more than a millisecond later.
PORTS, a JSON file ``{"ports": [...]}``, gives each stream's destination
port instead (a relay's own ports: rtpengine's). Each payload starts with the stream number, the sequence
number, a ``steady`` flag (sent from RAMP + 1 s on, when every stream has
run for a second at least: past its start-up) and the sending time
(CLOCK_REALTIME in ns: every network namespace reads the same clock).

``blast``: one stream, as fast as one socket sends, for SECONDS, after a
second of 20 ms datagrams that let the processor bind it first (a flood's
first second measures the queue to the processor, not the gateway). Only
the flood's datagrams are ``steady``.

``recv``: one socket on PORT (the lab's lan redirects the whole range to
it: each stream's own source port keeps their connections apart), counting
only datagrams from source ports SPORT to SPORT+2N (one run's; N 0: any),
until
SECONDS have passed or IDLE seconds went by without one after the first.
It prints the datagrams received and the steady ones, the steady ones'
one-way latency p50/p99/max in ms (all of them where none is steady), and
the mean of each stream's RFC 3550 interarrival jitter (section 6.4.1,
A.8) in ms.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import struct
import sys
import time
from array import array

INTERVAL = 0.02
PACKET = 172
_HEAD = struct.Struct("!BBHII")  # RTP: V=2, PT 0, sequence, timestamp, SSRC
_MARK = struct.Struct("!IIBQ")  # stream, sequence, steady, sending time (ns)


def more_files() -> None:
    """A stream per socket: the soft descriptor limit up to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def datagram(stream: int, seq: int) -> bytearray:
    buf = bytearray(PACKET)
    _HEAD.pack_into(buf, 0, 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, stream + 1)
    return buf


def send(src: str, sport: int, dst: str, base: int, n: int, ramp: float, seconds: float,
         ports: list[int] | None = None) -> dict[str, int]:
    more_files()
    socks = []
    for i in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((src, sport + 2 * i))
        socks.append(sock)
    starts = [ramp * i / n for i in range(n)]
    # Every stream's k-th datagram is due at t0 + start + k * INTERVAL: sorted by phase, the
    # streams of one 20 ms period go out in due order.
    order = sorted(range(n), key=lambda i: starts[i] % INTERVAL)
    bufs = [datagram(i, 0) for i in range(n)]
    addrs = [(dst, ports[i] if ports else base + 2 * i) for i in range(n)]
    sent = steady = 0
    t0 = time.monotonic() + 0.2
    stop = t0 + ramp + seconds
    steady_from = t0 + ramp + 1.0
    for p in range(int((ramp + seconds) / INTERVAL) + 1):
        for i in order:
            k = p - int(starts[i] // INTERVAL)
            if k < 0:
                continue
            due = t0 + starts[i] + k * INTERVAL
            if due >= stop:
                continue
            ahead = due - time.monotonic()
            if ahead > 0.001:
                time.sleep(ahead)
            buf = bufs[i]
            late = due >= steady_from
            struct.pack_into("!H", buf, 2, k & 0xFFFF)
            _MARK.pack_into(buf, 12, i, k, late, time.time_ns())
            try:
                socks[i].sendto(buf, addrs[i])
            except OSError:
                continue  # the sender's own queue is full: a loss like any other
            sent += 1
            steady += late
    return {"sent": sent, "sent_steady": steady}


def blast(src: str, sport: int, dst: str, port: int, seconds: float) -> dict[str, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src, sport))
    sock.connect((dst, port))
    buf = datagram(0, 0)
    sent = 0
    for k in range(50):
        _MARK.pack_into(buf, 12, 0, k, 0, time.time_ns())
        sock.send(buf)
        time.sleep(INTERVAL)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(64):
            struct.pack_into("!H", buf, 2, sent & 0xFFFF)
            _MARK.pack_into(buf, 12, 0, 50 + sent, 1, time.time_ns())
            try:
                sock.send(buf)
            except OSError:
                continue
            sent += 1
    return {"sent": sent}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def recv(port: int, sport: int, n: int, seconds: float, idle: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 26)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 26)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    print("ready", flush=True)
    latency = array("d")
    steady_latency = array("d")
    transit: dict[int, float] = {}
    jitter: dict[int, float] = {}
    got = steady = 0
    buf = bytearray(2048)
    end = time.monotonic() + seconds
    last = None
    while (now := time.monotonic()) < end and (last is None or now - last < idle):
        ready, _, _ = select.select([sock], [], [], 0.1)
        if not ready:
            continue
        while True:
            try:
                size, addr = sock.recvfrom_into(buf)
            except BlockingIOError:
                break
            at = time.time_ns()
            if size < 12 + _MARK.size or (n and not sport <= addr[1] < sport + 2 * n):
                continue  # another run's straggler
            stream, seq, late, sent_at = _MARK.unpack_from(buf, 12)
            one_way = (at - sent_at) / 1e6
            latency.append(one_way)
            got += 1
            if late:
                steady += 1
                steady_latency.append(one_way)
            # RFC 3550 A.8: J += (|D| - J) / 16, D the change in transit time.
            before = transit.get(stream)
            if before is not None:
                j = jitter.get(stream, 0.0)
                jitter[stream] = j + (abs(one_way - before) - j) / 16
            transit[stream] = one_way
            last = time.monotonic()
    values = sorted(steady_latency or latency)
    return {
        "received": got,
        "received_steady": steady,
        "streams": len(transit),
        "latency_ms_p50": round(percentile(values, 0.5), 4),
        "latency_ms_p99": round(percentile(values, 0.99), 4),
        "latency_ms_max": round(values[-1], 4) if values else None,
        "jitter_ms": round(sum(jitter.values()) / len(jitter), 4) if jitter else None,
    }


def main(argv: list[str]) -> None:
    if argv[0] == "send":
        ports = json.load(open(argv[8]))["ports"] if len(argv) > 8 else None
        out: object = send(argv[1], int(argv[2]), argv[3], int(argv[4]), int(argv[5]), float(argv[6]), float(argv[7]),
                           ports)
    elif argv[0] == "blast":
        out = blast(argv[1], int(argv[2]), argv[3], int(argv[4]), float(argv[5]))
    elif argv[0] == "recv":
        out = recv(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]), float(argv[5]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
