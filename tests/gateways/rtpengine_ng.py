"""rtpengine's ng control protocol, for the anchor of scripts/bench rtp (tests/gateways/rtp_bench.py).

    rtpengine_ng.py calls N SPORT CALLEE_BASE TAG   # prints {"ports": [the caller's destination port per call]}
    rtpengine_ng.py delete N TAG

Run in the router's namespace, next to ``rtpengine --listen-ng=127.0.0.1:2223``
(PEERS.md: userspace, ``--table=-1``, interfaces ``pub`` and ``priv``).
``calls`` sets up N calls: an ``offer`` from the caller in ext
(203.0.113.10, RTP from SPORT + 2i) from ``pub`` to ``priv``, replacing the
SDP's origin and connection, and an ``answer`` from the callee in lan
(192.168.1.10, port CALLEE_BASE + 2i). The caller then sends to the ``pub``
address and the port the answer's SDP gives it; rtpengine relays to the
callee. ng messages are a cookie and a bencoded dictionary over UDP.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from typing import Any

NG = ("127.0.0.1", 2223)
CALLER, CALLEE = "203.0.113.10", "192.168.1.10"

SDP = "v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


def bencode(value: Any) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(value[k]) for k in sorted(value)) + b"e"


def bdecode(data: bytes, i: int = 0) -> tuple[Any, int]:
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if c in (b"l", b"d"):
        i += 1
        items = []
        while data[i:i + 1] != b"e":
            item, i = bdecode(data, i)
            items.append(item)
        if c == b"l":
            return items, i + 1
        return {items[k].decode(): items[k + 1] for k in range(0, len(items), 2)}, i + 1
    colon = data.index(b":", i)
    size = int(data[i:colon])
    return data[colon + 1:colon + 1 + size], colon + 1 + size


class Ng:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.serial = 0

    def __call__(self, **message: Any) -> dict[str, Any]:
        self.serial += 1
        cookie = b"%d_%d" % (os.getpid(), self.serial)
        self.sock.sendto(cookie + b" " + bencode(message), NG)
        while True:
            data, _ = self.sock.recvfrom(65536)
            got, _, body = data.partition(b" ")
            if got == cookie:
                reply, _ = bdecode(body)
                if reply.get("result") != b"ok":
                    raise SystemExit(f"rtpengine: {message['command']}: {reply}")
                return reply


def calls(n: int, sport: int, callee_base: int, tag: str) -> list[int]:
    ng = Ng()
    ports = []
    for i in range(n):
        call = f"{tag}-{i}"
        ng(command="offer", **{"call-id": call, "from-tag": "caller", "sdp": SDP.format(addr=CALLER, port=sport + 2 * i),
                               "direction": ["pub", "priv"], "replace": ["origin", "session-connection"],
                               "ICE": "remove"})
        answer = ng(command="answer", **{"call-id": call, "from-tag": "caller", "to-tag": "callee",
                                         "sdp": SDP.format(addr=CALLEE, port=callee_base + 2 * i),
                                         "replace": ["origin", "session-connection"], "ICE": "remove"})
        port = re.search(rb"m=audio (\d+)", answer["sdp"])
        assert port is not None, answer
        ports.append(int(port.group(1)))
    return ports


def delete(n: int, tag: str) -> None:
    ng = Ng()
    for i in range(n):
        ng(command="delete", **{"call-id": f"{tag}-{i}"})


def main(argv: list[str]) -> None:
    if argv[0] == "calls":
        print(json.dumps({"ports": calls(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])}))
    elif argv[0] == "delete":
        delete(int(argv[1]), argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
