"""Datagrams of the tunnel's UDP channels: format and HMAC.

"The tunnel 6 consists of a TCP channel and where applicable a plurality of
UDP channels between any port of the system 2 and the service port of the
server 4" (seed, Figure 1 description). A UDP channel carries what arrives at
a redirected port, "systematically relayed to the server 4 at its fixed port
using the UDP" (seed, "Redirect port"), and the server's answers.

UDP has no TLS around it, so every datagram is authenticated on its own: an
HMAC-SHA256 tag, truncated to 16 bytes, over header and payload, with the key
the server sent in UDP_KEY over the TLS channel. A sequence number and a
sliding ``ReplayWindow`` (firewall/replay.py) refuse replays; a direction
flag stops a datagram from being reflected back to its sender. Layout
(big-endian)::

    0  version   u8    1
    1  type      u8    DatagramType
    2  flags     u8    bit 0: sent by the server; other bits 0
    3  reserved  u8    0
    4  key_id    u32   which UDP_KEY authenticates it
    8  channel   u32   the redirected port's id
    12 seq       u64   per channel and direction, from 0 up
    20 payload         DATA: family u8, address, port u16, data; else empty
    -16 tag            HMAC-SHA256(key, everything before the tag)[:16]

A datagram that fails any check is dropped and counted, never answered
(DESIGN.md invariant 10): answering unauthenticated UDP would make the
service port a reflector.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from tunnel.frames import UDP_KEY_SIZE, IPAddress

DATAGRAM_VERSION = 1
DGRAM_HEADER = struct.Struct("!BBBBIIQ")
DGRAM_HEADER_SIZE = DGRAM_HEADER.size  # 20
TAG_SIZE = 16
MIN_DATAGRAM_SIZE = DGRAM_HEADER_SIZE + TAG_SIZE
FLAG_FROM_SERVER = 0x01
DEFAULT_REPLAY_WINDOW = 1024  # sequence numbers per channel and direction
MAX_SEQ = (1 << 64) - 1
# The largest UDP payload over IPv4 (65535 - 20 - 8): a channel datagram
# must fit in one, so a relayed datagram whose data and the channel's own
# bytes do not fit goes as a DATA frame on the TCP channel instead (issue 14 F).
MAX_CHANNEL_DATAGRAM = 65507


def fits_channel(address: IPAddress, data: bytes) -> bool:
    """Does a DATA datagram of ``data`` to or from ``address`` fit in one UDP datagram?"""
    overhead = DGRAM_HEADER_SIZE + 1 + address.max_prefixlen // 8 + 2 + TAG_SIZE
    return overhead + len(data) <= MAX_CHANNEL_DATAGRAM


class DatagramType(enum.IntEnum):
    """What a UDP channel datagram carries."""

    DATA = 1  # a relayed packet
    KEEPALIVE = 2  # mediator -> server: keeps the NAT mapping alive
    KEEPALIVE_ACK = 3  # server -> mediator: the channel still works
    PROBE = 4  # version 3, mediator -> server, channel 0: answer after ``wait_ms`` (tunnel/lifetime.py)
    PROBE_ACK = 5  # version 3, server -> mediator, channel 0: that answer, ``wait_ms`` later


_PROBES = (DatagramType.PROBE, DatagramType.PROBE_ACK)


class DropReason(enum.Enum):
    """Why a datagram was dropped (the counters' keys)."""

    MALFORMED = "malformed"  # too short, bad version, reserved bits, bad body
    DIRECTION = "direction"  # sent the way we send: a reflection
    UNKNOWN_KEY = "unknown key"  # key id is not the current key
    BAD_TAG = "bad tag"  # forged or corrupted
    REPLAY = "replay"  # sequence number seen, or older than the window
    UNKNOWN_CHANNEL = "unknown channel"  # no redirected port with that id
    UNEXPECTED_TYPE = "unexpected type"  # e.g. a KEEPALIVE sent to the mediator


class DatagramError(Exception):
    """A datagram to drop; ``reason`` says which counter to bump."""

    def __init__(self, reason: DropReason, message: str = "") -> None:
        super().__init__(message or reason.value)
        self.reason = reason


@dataclass(frozen=True)
class Datagram:
    """One UDP channel datagram, decoded and authenticated."""

    type: DatagramType
    key_id: int
    channel_id: int
    seq: int
    from_server: bool
    address: IPAddress | None = None  # DATA only: the private end
    port: int = 0
    data: bytes = b""
    wait_ms: int = 0  # PROBE and PROBE_ACK only


def _tag(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()[:TAG_SIZE]


def encode_datagram(datagram: Datagram, key: bytes) -> bytes:
    """The bytes of ``datagram``, tag included, authenticated with ``key``."""
    if len(key) != UDP_KEY_SIZE:
        raise ValueError(f"UDP key must be {UDP_KEY_SIZE} bytes")
    if not 0 <= datagram.seq <= MAX_SEQ:
        raise ValueError(f"sequence number {datagram.seq} out of range")
    flags = FLAG_FROM_SERVER if datagram.from_server else 0
    header = DGRAM_HEADER.pack(
        DATAGRAM_VERSION, datagram.type, flags, 0,
        datagram.key_id, datagram.channel_id, datagram.seq,
    )
    if datagram.type is DatagramType.DATA:
        address = datagram.address
        if address is None:
            raise ValueError("a DATA datagram needs an address")
        family = b"\x04" if isinstance(address, ipaddress.IPv4Address) else b"\x06"
        payload = family + address.packed + datagram.port.to_bytes(2, "big") + datagram.data
    elif datagram.type in _PROBES:
        payload = datagram.wait_ms.to_bytes(4, "big")
    else:
        payload = b""
    signed = header + payload
    return signed + _tag(key, signed)


def peek_key_id(raw: bytes) -> int | None:
    """The key id of ``raw`` before it is verified (to find its session)."""
    if len(raw) < MIN_DATAGRAM_SIZE or raw[0] != DATAGRAM_VERSION:
        return None
    return int.from_bytes(raw[4:8], "big")


def verify_datagram(raw: bytes, key: bytes, key_id: int, *, from_server: bool) -> Datagram:
    """Decode ``raw`` if ``key`` authenticates it and it came the expected way.

    ``from_server`` is the direction the receiver expects. Replay is the
    caller's check (``ReplayWindow``, per channel), made after this one so
    that forged datagrams cannot move the window. Raises only
    ``DatagramError``.
    """
    if len(raw) < MIN_DATAGRAM_SIZE:
        raise DatagramError(DropReason.MALFORMED, "shorter than header and tag")
    version, type_value, flags, reserved, got_key_id, channel, seq = DGRAM_HEADER.unpack_from(raw)
    if version != DATAGRAM_VERSION or reserved != 0 or flags & ~FLAG_FROM_SERVER:
        raise DatagramError(DropReason.MALFORMED, "bad version or reserved bits")
    if got_key_id != key_id:
        raise DatagramError(DropReason.UNKNOWN_KEY, f"key id {got_key_id}")
    signed, tag = raw[:-TAG_SIZE], raw[-TAG_SIZE:]
    if not hmac.compare_digest(_tag(key, signed), tag):
        raise DatagramError(DropReason.BAD_TAG)
    if bool(flags & FLAG_FROM_SERVER) != from_server:
        raise DatagramError(DropReason.DIRECTION)
    if type_value not in DatagramType._value2member_map_:
        raise DatagramError(DropReason.MALFORMED, f"type {type_value}")
    dtype = DatagramType(type_value)
    payload = signed[DGRAM_HEADER_SIZE:]
    if dtype in _PROBES:
        if len(payload) != 4:
            raise DatagramError(DropReason.MALFORMED, "a probe carries its wait, 4 bytes")
        return Datagram(dtype, got_key_id, channel, seq, from_server, wait_ms=int.from_bytes(payload, "big"))
    if dtype is not DatagramType.DATA:
        if payload:
            raise DatagramError(DropReason.MALFORMED, "keepalive with a payload")
        return Datagram(dtype, got_key_id, channel, seq, from_server)
    address: IPAddress
    if payload[:1] == b"\x04" and len(payload) >= 7:
        address, rest = ipaddress.IPv4Address(payload[1:5]), payload[5:]
    elif payload[:1] == b"\x06" and len(payload) >= 19:
        address, rest = ipaddress.IPv6Address(payload[1:17]), payload[17:]
    else:
        raise DatagramError(DropReason.MALFORMED, "bad address in DATA")
    port = int.from_bytes(rest[:2], "big")
    return Datagram(dtype, got_key_id, channel, seq, from_server, address, port, rest[2:])
