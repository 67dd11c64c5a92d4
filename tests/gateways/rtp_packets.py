"""Building RTP and RTCP datagrams for the rtp gateway's tests (no scapy: the unit tests stay fast).

``rtp(...)`` makes an RTP datagram field by field (RFC 3550 section 5.1),
``sr``/``rr``/``sdes``/``bye``/``app``/``fb`` one RTCP packet each (section
6.4-6.7, RFC 4585 section 6.1), to be concatenated into a compound one. The
hostile senders of the netns tests (tests/gateways/rtp_netns.py) use the
same builders, run as a script in a lab host.
"""

from __future__ import annotations

import struct


def rtp(seq: int = 1, *, ssrc: int = 0x11223344, pt: int = 0, ts: int = 0, marker: bool = False,
        version: int = 2, csrc: tuple[int, ...] = (), extension: bytes | None = None,
        payload: bytes = b"\xff" * 160, padding: int = 0, cc: int | None = None, pad_count: int | None = None) -> bytes:
    """An RTP datagram; ``cc`` and ``pad_count`` may lie about what follows."""
    count = len(csrc) if cc is None else cc
    first = version << 6 | (0x20 if padding else 0) | (0x10 if extension is not None else 0) | count
    data = struct.pack("!BBHII", first, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    data += b"".join(struct.pack("!I", c) for c in csrc)
    if extension is not None:
        data += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    data += payload
    if padding:
        data += b"\0" * (padding - 1) + bytes([padding if pad_count is None else pad_count])
    return data


def rtcp_packet(ptype: int, count: int, body: bytes, *, version: int = 2, padding: int = 0,
                length: int | None = None) -> bytes:
    """One RTCP packet: header, ``body``, padding; ``length`` may lie."""
    if padding:
        body += b"\0" * (padding - 1) + bytes([padding])
    words = len(body) // 4 if length is None else length  # (4 + len(body)) / 4 - 1
    first = version << 6 | (0x20 if padding else 0) | count
    return struct.pack("!BBH", first, ptype, words) + body


def _block(ssrc: int) -> bytes:
    return struct.pack("!IIIIII", ssrc, 0, 0, 0, 0, 0)


def sr(ssrc: int = 0x11223344, blocks: tuple[int, ...] = (), **kw: int) -> bytes:
    info = struct.pack("!IIIII", 0, 0, 0, 0, 0)
    return rtcp_packet(200, len(blocks), struct.pack("!I", ssrc) + info + b"".join(map(_block, blocks)), **kw)


def rr(ssrc: int = 0x55667788, blocks: tuple[int, ...] = (), **kw: int) -> bytes:
    return rtcp_packet(201, len(blocks), struct.pack("!I", ssrc) + b"".join(map(_block, blocks)), **kw)


def sdes(ssrc: int = 0x11223344, cname: bytes = b"user@host", **kw: int) -> bytes:
    chunk = struct.pack("!IBB", ssrc, 1, len(cname)) + cname + b"\0"
    chunk += b"\0" * (-len(chunk) % 4)
    return rtcp_packet(202, 1, chunk, **kw)


def bye(*ssrcs: int, **kw: int) -> bytes:
    return rtcp_packet(203, len(ssrcs), b"".join(struct.pack("!I", s) for s in ssrcs), **kw)


def app(ssrc: int = 0x11223344, name: bytes = b"TEST", data: bytes = b"", **kw: int) -> bytes:
    return rtcp_packet(204, 0, struct.pack("!I", ssrc) + name + data, **kw)


def fb(ptype: int = 205, fmt: int = 1, sender: int = 0x55667788, media: int = 0x11223344, fci: bytes = b"",
       **kw: int) -> bytes:
    return rtcp_packet(ptype, fmt, struct.pack("!II", sender, media) + fci, **kw)
