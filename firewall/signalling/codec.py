"""The wire format: header, one fixed body layout per message type, the MAC, and the sender side.

A datagram is ``header | body | mac``. Every integer is big-endian. Layouts
are data (``HEADER_FIELDS``, ``BODY_FIELDS``): the structs are built from
them and so are the byte tables in docs/signalling.md, so code and document
cannot disagree.

    off size field
      0    1 version     VERSION
      1    1 type        MsgType
      2    1 copy        0..copies-1 for a redundant message, else 0
      3    8 sender      random per process start
     11    8 seq         per sender; copies share one
     19    8 timestamp   ms since the Unix epoch
     27    n body        fixed size per type
   27+n   16 mac         HMAC-SHA256(key, bytes 0..27+n), first 16 bytes

Each type's body has one size, so the receiver knows from the type byte
alone how long the datagram must be, and refuses a truncated or padded one
before spending a MAC on it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Callable

from firewall.signalling.messages import (
    GATEWAY_NAME_SIZE,
    SENDER_OF,
    U64_MAX,
    Answer,
    Counters,
    Endpoint,
    Family,
    FlowEnd,
    FlowInfo,
    Message,
    MsgType,
    NewFlow,
    NotFound,
    OffloadRequest,
    Query,
    Role,
    RuleAck,
    RuleEnd,
    RuleRefused,
    RuleRequest,
    family_of,
)

# 2: NEW_FLOW and ANSWER carry the flow's SNAT endpoint (``snat``). 3:
# FLOW_END carries conntrack's counters; OFFLOAD_REQUEST is new. 4: every
# address field is 16 bytes, IPv6 or IPv4-mapped (RFC 4291 section
# 2.5.5.2) as the body's family byte says (issue 17). A body layout changed,
# so the version did: a peer of an older version is refused BAD_VERSION,
# which names the cause, instead of TOO_SHORT or MALFORMED.
VERSION = 5
KEY_SIZE = 32  # HMAC-SHA256's block-internal strength is 256 bits; a longer key adds nothing (RFC 2104 s.3)

# HMAC-SHA256 truncated to 128 bits. RFC 2104 section 5 recommends keeping
# at least half the hash output (and at least 80 bits); 128 bits leaves a
# forger a 2**-128 chance per datagram, and the receiver answers nothing, so
# there is no oracle to learn from. The saving is 16 bytes a message.
MAC_SIZE = 16

# One unfragmented UDP datagram on Ethernet: 1500 - 20 (IPv4) - 8 (UDP).
MAX_DATAGRAM = 1472

# The config allows 1-10 copies; the receiver remembers which copies of a
# sequence number it has seen in a 16-bit mask.
MAX_COPIES = 16

# The random sender id an Encoder picks: 64 bits, so two process starts
# colliding (and sharing a replay window) is a 2**-64 event.
SENDER_ID_BITS = 64


@dataclass(frozen=True)
class Field:
    """One field of a layout: its name, ``struct`` code and meaning (for the doc)."""

    name: str
    fmt: str
    meaning: str

    @property
    def size(self) -> int:
        return struct.calcsize("!" + self.fmt)


HEADER_FIELDS: tuple[Field, ...] = (
    Field("version", "B", f"protocol version, {VERSION}"),
    Field("type", "B", "message type"),
    Field("copy", "B", "which copy of a redundant message, 0..copies-1; 0 when sent once"),
    Field("sender", "Q", "sender id: random, chosen at each process start"),
    Field("seq", "Q", "sequence number of this sender; copies share one"),
    Field("timestamp", "Q", "milliseconds since the Unix epoch, when encoded"),
)
HEADER = struct.Struct("!" + "".join(f.fmt for f in HEADER_FIELDS))
HEADER_SIZE = HEADER.size
COPY_OFFSET = 2  # the one header byte that differs between copies

_PROTO = Field("proto", "B", "6 TCP, 17 UDP")
_FAMILY = Field("family", "B", "4: every address in this body is IPv4, written IPv4-mapped "
                "(::ffff:a.b.c.d); 6: every address is IPv6 (none IPv4-mapped)")
ADDRESS_SIZE = 16  # one size for both families, so each type keeps one datagram size


def _endpoint_fields(name: str, address: str, port: str) -> tuple[Field, Field]:
    return Field(f"{name}_addr", f"{ADDRESS_SIZE}s", address), Field(f"{name}_port", "H", port)


FLOW_FIELDS: tuple[Field, ...] = (
    Field("flow_id", "Q", "flow id: NFQUEUE number (16 bits), serial (48 bits)"),
    _PROTO,
    _FAMILY,
    Field("gateway", f"{GATEWAY_NAME_SIZE}s", "gateway name, ASCII, NUL-padded"),
    *_endpoint_fields("client", "C, the client", "c"),
    *_endpoint_fields("original_dst", "S', what the client addressed (the router, for a port forward)", "s'"),
    *_endpoint_fields("server", "S, the real server", "s"),
    *_endpoint_fields("firewall_side", "F, from the processor's pool: the source the gateway sees", "f"),
    *_endpoint_fields("ag", "G, the gateway's listen address", "g"),
    *_endpoint_fields("snat", "W, what the server sees as the client when the processor SNATs the flow "
                      "(masquerade); all zeros: no SNAT, the server sees C", "w; 0 with no SNAT"),
)
_TUPLE_FIELDS: tuple[Field, ...] = (
    _PROTO,
    _FAMILY,
    *_endpoint_fields("firewall_side", "F, the source the gateway saw", "f"),
    *_endpoint_fields("ag", "G, the destination the gateway saw (its own)", "g"),
)
_QUERY_ID = Field("query_id", "Q", "chosen by the gateway; the answer echoes it")
_REQUEST_ID = Field("request_id", "Q", "chosen by the gateway; the reply echoes it")
_RULE_ID = Field("rule_id", "Q", "chosen by the processor")

BODY_FIELDS: dict[MsgType, tuple[Field, ...]] = {
    MsgType.NEW_FLOW: FLOW_FIELDS,
    MsgType.QUERY: (_QUERY_ID, *_TUPLE_FIELDS),
    MsgType.ANSWER: (_QUERY_ID, *FLOW_FIELDS),
    MsgType.NOT_FOUND: (_QUERY_ID, *_TUPLE_FIELDS),
    MsgType.FLOW_END: (
        Field("flow_id", "Q", "the flow that ended"),
        Field("reason", "B", "1 FIN, 2 RST, 3 IDLE, 4 POLICY, 5 OFFLOADED"),
        Field("packets_up", "Q", "conntrack's packets from the client (a flow without a binding: log-only, or an offloaded flow's direct connection); else 0"),
        Field("bytes_up", "Q", "its bytes, IP headers included"),
        Field("packets_down", "Q", "packets to the client"),
        Field("bytes_down", "Q", "their bytes"),
    ),
    MsgType.RULE_REQUEST: (
        _REQUEST_ID,
        Field("flow_id", "Q", "the requesting flow, whose parties the rule may name"),
        _PROTO,
        _FAMILY,
        Field("mode", "B", "1 REDIRECT into the gateway, 2 ALLOW through the kernel, 3 ORIGINATE: the gateway opens it"),
        Field("flags", "B", "bit 0: one-shot; bit 1: replaces the flow's earlier rules; other bits 0"),
        Field("ttl", "H", "seconds the rule waits for its flow, 1..max"),
        *_endpoint_fields("src", "the new flow's source address, exact", "its source port, 0 = any"),
        *_endpoint_fields("dst", "the new flow's destination address, exact", "its destination port, not 0"),
    ),
    MsgType.RULE_ACK: (
        _REQUEST_ID,
        _RULE_ID,
        Field("expires", "Q", "when the rule ends, ms since the Unix epoch"),
    ),
    MsgType.RULE_REFUSED: (
        _REQUEST_ID,
        Field("reason", "B", "1 NOT_EXACT, 2 THIRD_PARTY, 3 UNKNOWN_FLOW, 4 LIMIT, 5 BAD_TTL, 6 POLICY, "
              "7 NOT_UDP, 8 OTHER_GATEWAY"),
    ),
    MsgType.RULE_END: (
        _RULE_ID,
        Field("reason", "B", "1 USED, 2 EXPIRED, 3 FLOW_ENDED, 4 SUPERSEDED"),
    ),
    MsgType.OFFLOAD_REQUEST: (
        _REQUEST_ID,
        Field("flow_id", "Q", "the flow to hand to the kernel: one of the asking gateway's"),
    ),
}
BODY: dict[MsgType, struct.Struct] = {
    t: struct.Struct("!" + "".join(f.fmt for f in fields)) for t, fields in BODY_FIELDS.items()
}
# The exact datagram size of each type: the receiver's first filter.
DATAGRAM_SIZE: dict[MsgType, int] = {t: HEADER_SIZE + s.size + MAC_SIZE for t, s in BODY.items()}
MAX_MESSAGE_SIZE = max(DATAGRAM_SIZE.values())
MIN_MESSAGE_SIZE = min(DATAGRAM_SIZE.values())
if MAX_MESSAGE_SIZE > MAX_DATAGRAM:  # not `assert`: it must hold under python -O too
    raise AssertionError(f"largest message {MAX_MESSAGE_SIZE} bytes exceeds one datagram ({MAX_DATAGRAM})")

ONE_SHOT_FLAG = 0x01
REPLACES_FLAG = 0x02  # the flow's earlier rules that still wait for their flow end (RULE_END SUPERSEDED)
_KNOWN_FLAGS = ONE_SHOT_FLAG | REPLACES_FLAG

# ---- body values <-> messages ------------------------------------------------------

_MAPPED = bytes(10) + b"\xff\xff"  # the IPv4-mapped prefix, ::ffff:0:0/96


def _ep(endpoint: Endpoint) -> tuple[bytes, int]:
    packed = endpoint.address.packed
    return (_MAPPED + packed if len(packed) == 4 else packed), endpoint.port


_NO_ENDPOINT = (bytes(ADDRESS_SIZE), 0)  # an optional endpoint that is absent: all zeros, either family


def _address(raw: bytes, family: Family) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A body's address, as its family says; a field that is not of that family is MALFORMED."""
    mapped = raw[:12] == _MAPPED
    if family is Family.IPV4:
        if not mapped:
            raise ValueError("an address of a family 4 body is not IPv4-mapped")
        return ipaddress.IPv4Address(raw[12:])
    if mapped:
        raise ValueError("an IPv4-mapped address in a family 6 body")
    return ipaddress.IPv6Address(raw)


def _point(raw: bytes, port: int, family: Family) -> Endpoint:
    return Endpoint(_address(raw, family), port)


def _flow_values(flow: FlowInfo) -> tuple[Any, ...]:
    return (
        flow.flow_id,
        flow.proto,
        flow.family,
        flow.gateway.encode("ascii"),  # struct NUL-pads a short "32s" value
        *_ep(flow.client),
        *_ep(flow.original_dst),
        *_ep(flow.server),
        *_ep(flow.firewall_side),
        *_ep(flow.ag),
        *(_ep(flow.snat) if flow.snat is not None else _NO_ENDPOINT),
    )


def _name(raw: bytes) -> str:
    name = raw.rstrip(b"\0")
    # FlowInfo's pattern check then refuses a NUL inside the name, or non-ASCII.
    return name.decode("ascii")


def _flow(v: tuple[Any, ...]) -> FlowInfo:
    f = Family(v[2])  # ValueError (MALFORMED) for an unknown family
    return FlowInfo(
        flow_id=v[0],
        proto=v[1],
        gateway=_name(v[3]),
        client=_point(v[4], v[5], f),
        original_dst=_point(v[6], v[7], f),
        server=_point(v[8], v[9], f),
        firewall_side=_point(v[10], v[11], f),
        ag=_point(v[12], v[13], f),
        # All zeros: no SNAT. Anything else must be a whole W:w, or FlowInfo refuses it.
        snat=None if (v[14], v[15]) == _NO_ENDPOINT else _point(v[14], v[15], f),
    )


def _tuple_values(m: Query | NotFound) -> tuple[Any, ...]:
    return (m.query_id, m.proto, family_of(m.firewall_side, m.ag), *_ep(m.firewall_side), *_ep(m.ag))


def _query(v: tuple[Any, ...]) -> Query:
    f = Family(v[2])
    return Query(v[0], v[1], _point(v[3], v[4], f), _point(v[5], v[6], f))


def _not_found(v: tuple[Any, ...]) -> NotFound:
    f = Family(v[2])
    return NotFound(v[0], v[1], _point(v[3], v[4], f), _point(v[5], v[6], f))


def _rule_request_values(m: RuleRequest) -> tuple[Any, ...]:
    flags = (ONE_SHOT_FLAG if m.one_shot else 0) | (REPLACES_FLAG if m.replaces else 0)
    return (m.request_id, m.flow_id, m.proto, family_of(m.src, m.dst), m.mode, flags, m.ttl, *_ep(m.src), *_ep(m.dst))


def _rule_request(v: tuple[Any, ...]) -> RuleRequest:
    f = Family(v[3])
    flags = v[5]
    if flags & ~_KNOWN_FLAGS:
        raise ValueError(f"unknown rule flags {flags:#x}")
    return RuleRequest(
        request_id=v[0],
        flow_id=v[1],
        proto=v[2],
        src=_point(v[7], v[8], f),
        dst=_point(v[9], v[10], f),
        ttl=v[6],
        mode=v[4],
        one_shot=bool(flags & ONE_SHOT_FLAG),
        replaces=bool(flags & REPLACES_FLAG),
    )


_TO_VALUES: dict[MsgType, Callable[[Any], tuple[Any, ...]]] = {
    MsgType.NEW_FLOW: lambda m: _flow_values(m.flow),
    MsgType.QUERY: _tuple_values,
    MsgType.ANSWER: lambda m: (m.query_id, *_flow_values(m.flow)),
    MsgType.NOT_FOUND: _tuple_values,
    MsgType.FLOW_END: lambda m: (m.flow_id, m.reason, m.counters.packets_up, m.counters.bytes_up,
                                 m.counters.packets_down, m.counters.bytes_down),
    MsgType.RULE_REQUEST: _rule_request_values,
    MsgType.RULE_ACK: lambda m: (m.request_id, m.rule_id, m.expires_ms),
    MsgType.RULE_REFUSED: lambda m: (m.request_id, m.reason),
    MsgType.RULE_END: lambda m: (m.rule_id, m.reason),
    MsgType.OFFLOAD_REQUEST: lambda m: (m.request_id, m.flow_id),
}
_FROM_VALUES: dict[MsgType, Callable[[tuple[Any, ...]], Message]] = {
    MsgType.NEW_FLOW: lambda v: NewFlow(_flow(v)),
    MsgType.QUERY: _query,
    MsgType.ANSWER: lambda v: Answer(v[0], _flow(v[1:])),
    MsgType.NOT_FOUND: _not_found,
    MsgType.FLOW_END: lambda v: FlowEnd(v[0], v[1], Counters(*v[2:])),
    MsgType.RULE_REQUEST: _rule_request,
    MsgType.RULE_ACK: lambda v: RuleAck(v[0], v[1], v[2]),
    MsgType.RULE_REFUSED: lambda v: RuleRefused(v[0], v[1]),
    MsgType.RULE_END: lambda v: RuleEnd(v[0], v[1]),
    MsgType.OFFLOAD_REQUEST: lambda v: OffloadRequest(v[0], v[1]),
}


def encode_body(message: Message) -> bytes:
    """The body bytes of ``message`` (no header, no MAC)."""
    return BODY[message.TYPE].pack(*_TO_VALUES[message.TYPE](message))


def decode_body(msg_type: MsgType, body: bytes) -> Message | None:
    """The message in ``body``, or None if any field is out of range. Never raises."""
    try:
        return _FROM_VALUES[msg_type](BODY[msg_type].unpack(body))
    except (ValueError, TypeError, struct.error):
        # ValueError covers unknown enum numbers, bad names (UnicodeDecodeError
        # is one), an unknown family, an address not of the body's family and
        # unknown flags.
        return None


# ---- MAC -----------------------------------------------------------------------------


class Mac:
    """HMAC-SHA256 with the key schedule done once; ``tag`` costs one copy and two hash runs."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError(f"the signalling key must be {KEY_SIZE} bytes")
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def tag(self, data: bytes) -> bytes:
        h = self._base.copy()
        h.update(data)
        return h.digest()[:MAC_SIZE]

    def verify(self, data: bytes, tag: bytes) -> bool:
        # Constant time, so response timing tells a forger nothing about
        # how many leading bytes of a guess were right.
        return hmac.compare_digest(self.tag(data), tag)


# ---- sender side ---------------------------------------------------------------------


def timestamp_ms(now: float) -> int:
    """``now`` (seconds since the Unix epoch, as ``time.time()``) in whole milliseconds."""
    return int(now * 1000)


class Encoder:
    """The sending half of one process: key, sender id and the next sequence number.

    Pure: the caller passes ``now`` and sends the bytes. One Encoder per
    process start (its random sender id is the "epoch" receivers key their
    replay windows by); never share one between processes.
    """

    __slots__ = ("_mac", "role", "sender_id", "_seq")

    def __init__(self, key: bytes, role: Role, *, sender_id: int | None = None, first_seq: int = 0) -> None:
        self._mac = Mac(key)
        self.role = role
        self.sender_id = secrets.randbits(SENDER_ID_BITS) if sender_id is None else sender_id
        if not 0 <= self.sender_id <= U64_MAX:
            raise ValueError(f"sender id {self.sender_id} is not a u64")
        if not 0 <= first_seq <= U64_MAX:
            raise ValueError(f"first_seq {first_seq} is not a u64")
        self._seq = first_seq

    @property
    def next_seq(self) -> int:
        return self._seq

    def encode(self, message: Message, now: float) -> bytes:
        """One datagram carrying ``message``; uses one sequence number."""
        return self.encode_copies(message, now, 1)[0]

    def encode_copies(self, message: Message, now: float, copies: int) -> list[bytes]:
        """``copies`` datagrams of ``message`` sharing one sequence number and timestamp.

        They differ only in the copy byte and the MAC, so the receiver accepts
        the first to arrive and counts the rest as DUPLICATE, while a datagram
        it has already seen, byte for byte, is a REPLAY (the seed's "simple
        redundancy", made safe to combine with replay protection).
        """
        if SENDER_OF[message.TYPE] is not self.role:
            raise ValueError(f"a {self.role.value} does not send {message.TYPE.name}")
        if not 1 <= copies <= MAX_COPIES:
            raise ValueError(f"copies must be 1..{MAX_COPIES}, got {copies}")
        if self._seq > U64_MAX:
            raise ValueError("sequence numbers exhausted: start a new Encoder (new sender id)")
        ts = timestamp_ms(now)
        if not 0 <= ts <= U64_MAX:
            raise ValueError(f"timestamp {now!r} is out of range")
        body = encode_body(message)
        datagrams = []
        for copy in range(copies):
            data = HEADER.pack(VERSION, message.TYPE, copy, self.sender_id, self._seq, ts) + body
            datagrams.append(data + self._mac.tag(data))
        self._seq += 1
        return datagrams
