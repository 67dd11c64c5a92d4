"""Capture one UDP channel datagram on an interface, then replay and forge it.

    inject.py IFACE SPORT DPORT TYPE REPLAYS

Runs in the namespace of the datagram's *receiver*. It sniffs IFACE
(AF_PACKET) for the first IPv4/UDP packet with that source and destination
port (0: any) whose tunnel datagram type byte is TYPE, and prints
``{"sniffing": true}`` first so the caller knows when to make traffic. Then
it sends, with a raw socket to the packet's own destination (which is local,
so it arrives over lo exactly as the original did):

- the captured packet, REPLAYS times (the replay window must drop them);
- a copy with its last tag byte flipped (the HMAC must drop it);
- a copy with another key id (no session must take it).

The UDP checksum is zeroed (valid in IPv4): veth checksum offload leaves a
partial one in captured packets. One JSON line reports what was sent.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

ETH_P_IP = 0x0800
SNIFF_TIMEOUT = 15.0


def main(argv: list[str]) -> None:
    iface, sport, dport, dtype, replays = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sniffer.bind((iface, ETH_P_IP))
    print(json.dumps({"sniffing": True}), flush=True)
    deadline = time.monotonic() + SNIFF_TIMEOUT
    packet = None
    while packet is None:
        left = deadline - time.monotonic()
        if left <= 0:
            print(json.dumps({"error": "nothing captured"}), flush=True)
            sys.exit(1)
        sniffer.settimeout(left)
        try:
            frame = sniffer.recv(65535)
        except TimeoutError:
            continue
        if len(frame) < 28 or frame[9] != socket.IPPROTO_UDP:
            continue
        ihl = (frame[0] & 0x0F) * 4
        sp, dp = struct.unpack_from("!HH", frame, ihl)
        body = frame[ihl + 8 :]
        if (sport and sp != sport) or (dport and dp != dport) or len(body) < 36 or body[1] != dtype:
            continue
        packet = bytearray(frame[: ihl + 8 + len(body)])
        packet[ihl + 6 : ihl + 8] = b"\x00\x00"  # no UDP checksum
    ihl = (packet[0] & 0x0F) * 4
    dst = socket.inet_ntoa(bytes(packet[16:20]))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(replays):
        raw.sendto(bytes(packet), (dst, 0))
    forged = bytearray(packet)
    forged[-1] ^= 0xFF
    raw.sendto(bytes(forged), (dst, 0))
    other_key = bytearray(packet)
    other_key[ihl + 8 + 4 : ihl + 8 + 8] = b"\xde\xad\xbe\xef"
    raw.sendto(bytes(other_key), (dst, 0))
    print(json.dumps({"captured": len(packet), "replayed": replays, "forged": 1, "other_key": 1, "to": dst}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
