"""RTP peers for the netns tests, run as a script in a lab host (tests/gateways/test_rtp_netns.py).

    rtp_peers.py send SRC SPORT DST DPORT PLAN   # prints {"sent": n}
    rtp_peers.py sink SECONDS IDLE PORT...       # prints {port: [[source, kind, ssrc], ...]}
    rtp_peers.py flood DST DPORT N               # prints {"sent": n}: one RTP datagram from each of N fresh ports

PLAN is a sequence of ``KIND*COUNT[@SSRC]`` steps, sent in order at 50
datagrams a second (20 ms audio), from SRC:SPORT:

- ``rtp``: a valid RTP datagram (PCMU, 160 bytes of payload), sequence numbers
  running on across steps;
- ``rr``: a valid compound RTCP datagram (RR and SDES);
- ``v1``: RTP version 1; ``trunc``: the first 8 bytes of an RTP header.

The sink binds every PORT on all addresses and records each datagram's
source, whether it is RTCP (RFC 5761's test) and its SSRC, until SECONDS
have passed or IDLE seconds went by without one after the first.

Addresses of either family: an IPv6 SRC or DST makes an IPv6 socket.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gateways.rtp_packets import rr, rtp, sdes  # noqa: E402

INTERVAL = 0.02


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def send(src: str, sport: int, dst: str, dport: int, plan: str) -> int:
    sock = socket.socket(_family(src), socket.SOCK_DGRAM)
    sock.bind((src, sport))
    seq = sent = 0
    for step in plan.split():
        kind, _, rest = step.partition("*")
        count, _, ssrc_text = rest.partition("@")
        ssrc = int(ssrc_text, 0) if ssrc_text else 0x11223344
        for _ in range(int(count)):
            seq += 1
            if kind == "rtp":
                data = rtp(seq, ssrc=ssrc, ts=seq * 160)
            elif kind == "rr":
                data = rr(ssrc) + sdes(ssrc)
            elif kind == "v1":
                data = rtp(seq, ssrc=ssrc, version=1)
            elif kind == "trunc":
                data = rtp(seq, ssrc=ssrc)[:8]
            else:
                raise SystemExit(f"unknown kind {kind!r}")
            sock.sendto(data, (dst, dport))
            sent += 1
            time.sleep(INTERVAL)
    return sent


def flood(dst: str, dport: int, count: int) -> int:
    """A flood of new sources: one valid RTP datagram from each of ``count`` fresh ports."""
    for seq in range(count):
        with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
            sock.sendto(rtp(seq + 1, ssrc=0x5EED0000 + seq), (dst, dport))
    return count


def sink(seconds: float, idle: float, ports: list[int]) -> dict[int, list[list[object]]]:
    socks = {}
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        socks[s] = port
    print("ready", flush=True)
    got: dict[int, list[list[object]]] = {port: [] for port in ports}
    end = time.monotonic() + seconds
    last = None
    while (now := time.monotonic()) < end and (last is None or now - last < idle):
        ready, _, _ = select.select(list(socks), [], [], 0.1)
        for s in ready:
            data, addr = s.recvfrom(65536)
            last = time.monotonic()
            rtcp = len(data) > 1 and 192 <= data[1] <= 223
            ssrc = struct.unpack_from("!I", data, 4 if rtcp else 8)[0] if len(data) >= 12 else None
            got[socks[s]].append([f"{addr[0]}:{addr[1]}", "rtcp" if rtcp else "rtp", ssrc])
    return got


def main(argv: list[str]) -> None:
    if argv[0] == "send":
        print(json.dumps({"sent": send(argv[1], int(argv[2]), argv[3], int(argv[4]), argv[5])}))
    elif argv[0] == "flood":
        print(json.dumps({"sent": flood(argv[1], int(argv[2]), int(argv[3]))}))
    elif argv[0] == "sink":
        print(json.dumps(sink(float(argv[1]), float(argv[2]), [int(p) for p in argv[3:]])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
