"""Binary frames of the tunnel's TCP channel, and a streaming decoder.

The seed leaves the syntax open: "Only the semantics of this protocol are
described here, the syntax being left to the discretion of the producers of
the service" (seed, just before "1. Open, redirect, and close port
requests"). This module is nfgate's syntax; docs/tunnel-protocol.md is its
specification, with byte offsets and examples.

Every frame is a 12-byte header and a body::

    0  version  u8     protocol version the body is encoded in
    1  type     u8     FrameType
    2  flags    u16    reserved, must be 0
    4  request  u32    request id; a reply carries its request's id
    8  length   u32    body length in bytes

All integers are big-endian. The header layout is frozen across versions, and
so are the bodies of HELLO and INIT_ERR, so that any two implementations can
always negotiate, or say why they cannot.

``FrameDecoder`` takes arbitrary chunks of the (decrypted) byte stream and
returns whole frames. On bad input it raises ``ProtocolError`` carrying the
code for the BYE that answers it, and nothing else: the hypothesis test in
tests/tunnel/test_frames.py holds it to that.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

from tunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from tunnel.wire import IPAddress, IPInterface, Proto, Reader, Writer, check_range

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "HEADER_SIZE", "MAX_UDP_PAYLOAD",
    "MIN_MAX_FRAME_SIZE", "DEFAULT_MAX_FRAME_SIZE", "UDP_KEY_SIZE", "VERSION_INDEPENDENT",
    "FrameType", "Role", "Proto", "IPAddress", "IPInterface", "Frame", "Hello", "InitOk",
    "InitErr", "OpenPort", "RedirectPort", "ConnectPort", "ListenPort", "ClosePort",
    "BASE_VERSION", "UdpKey", "OpenConnect", "OpenStream", "CheckTarget", "STREAM_ID_BASE", "SINCE_VERSION", "Opened", "Ack", "Err", "Data", "EventAccepted", "EventFin", "EventRst",
    "WindowUpdate", "Keepalive", "KeepaliveAck", "Bye", "FRAME_CLASSES", "encode_frame",
    "data_chunk_size", "FrameDecoder", "encode_frame_parts", "Bytes",
]

PROTOCOL_VERSION = 5  # the highest this code speaks
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2, 3, 4, 5)
# The version a frame is encoded in when the caller names none: the cores
# always name the negotiated one; the codec's tests and examples use this.
BASE_VERSION = 1

HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12

# The largest UDP payload (65535) must fit in one DATA frame: a datagram
# relayed over the TCP channel cannot be split (seed, "Packet relay").
MAX_UDP_PAYLOAD = 65535
DATA_OVERHEAD = 4 + 1 + 16 + 2  # port id, family, IPv6 address, port
MIN_MAX_FRAME_SIZE = HEADER_SIZE + DATA_OVERHEAD + MAX_UDP_PAYLOAD  # 65570
DEFAULT_MAX_FRAME_SIZE = 131072

UDP_KEY_SIZE = 32  # HMAC-SHA256 key for the UDP channels

# A payload as the I/O layers hand it over: a socket's read, or a view into
# one (a window or the frame size cut it), so that bulk is not copied on
# its way to the channel (docs/tunnel-protocol.md section 21, "Copies").
Bytes = bytes | memoryview

# Version 4: the server names the streams it opens (OPEN_STREAM) from the
# upper half of the u32 ids, the mediator its ports and accepted
# connections from the lower half, so neither can take the other's id
# (as HTTP/2's odd and even stream ids, RFC 9113 section 5.1.1).
STREAM_ID_BASE = 1 << 31


class FrameType(enum.IntEnum):
    """The frame types of protocol versions 1 to 4 (``SINCE_VERSION``)."""

    HELLO = 0x01
    INIT_OK = 0x02
    INIT_ERR = 0x03
    OPEN_PORT = 0x10
    REDIRECT_PORT = 0x11
    CONNECT = 0x12
    LISTEN = 0x13
    CLOSE = 0x14
    UDP_KEY = 0x15
    OPEN_CONNECT = 0x16  # version 2
    CHECK_TARGET = 0x17  # version 2
    OPEN_STREAM = 0x18  # version 4
    OPENED = 0x20
    ACK = 0x21
    ERR = 0x22
    DATA = 0x30
    EVENT_ACCEPTED = 0x31
    EVENT_FIN = 0x32
    EVENT_RST = 0x33
    WINDOW_UPDATE = 0x34  # version 3
    KEEPALIVE = 0x40
    KEEPALIVE_ACK = 0x41
    BYE = 0x50


# Readable whatever the header's version says: the negotiation frames.
VERSION_INDEPENDENT = frozenset({FrameType.HELLO, FrameType.INIT_ERR})
# Frame types that a version introduced; before it they are UNKNOWN_FRAME.
SINCE_VERSION = {
    FrameType.OPEN_CONNECT: 2, FrameType.CHECK_TARGET: 2, FrameType.WINDOW_UPDATE: 3, FrameType.OPEN_STREAM: 4,
}


class Role(enum.Enum):
    """How a frame uses the request id (checked by encoder and decoder)."""

    REQUEST = "request"  # request id != 0, answered by a reply with the same id
    REPLY = "reply"  # request id != 0, the id of the request it answers
    UNSOLICITED = "unsolicited"  # request id == 0
    ANY = "any"  # ERR, INIT_ERR: a reply, or 0 when they answer no request


@dataclass(slots=True)
class Frame(abc.ABC):
    """One frame. ``request_id`` is the header's request id (see ``Role``).

    A frame is a value, never changed once made; slotted, not frozen: a
    frozen dataclass costs twice as much to make, and every frame received
    or sent (a few per relayed connection) is one."""

    TYPE: ClassVar[FrameType]
    ROLE: ClassVar[Role]
    request_id: int = field(default=0, kw_only=True)

    @abc.abstractmethod
    def _write(self, w: Writer) -> None:
        """Append the body's fields."""

    @classmethod
    @abc.abstractmethod
    def _read(cls, r: Reader, request_id: int) -> Frame:
        """Parse the body's fields (the caller checks for trailing bytes)."""


@dataclass(slots=True)
class Hello(Frame):
    """Mediator -> server, first frame: who it is and what it has.

    The seed's initialization: the mediator informs the server "about its
    state and about its environment ... IP address, subnetwork mask, etc.,
    through authentication or identification, to a description of the service
    that it wishes to use" (seed, Figure 2 description). ``keepalive_ms`` and
    ``max_frame_size`` tell the server the mediator's keepalive interval (for
    dead-peer detection) and the largest frame it accepts.
    """

    TYPE = FrameType.HELLO
    ROLE = Role.REQUEST
    versions: tuple[int, ...]
    identity: str
    token: bytes
    service: str
    interfaces: tuple[IPInterface, ...]
    keepalive_ms: int
    max_frame_size: int

    def _write(self, w: Writer) -> None:
        w.versions(self.versions)
        w.u32(self.keepalive_ms, "keepalive_ms")
        w.u32(self.max_frame_size, "max_frame_size")
        w.text(self.identity, "identity")
        w.blob(self.token, "token")
        w.text(self.service, "service")
        w.u8(len(self.interfaces), "len(interfaces)")
        for interface in self.interfaces:
            w.interface(interface)

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Hello:
        versions = r.versions()
        keepalive_ms = r.u32()
        max_frame_size = r.u32()
        identity = r.text()
        token = r.blob()
        service = r.text()
        interfaces = tuple(r.interface() for _ in range(r.u8()))
        return cls(
            versions, identity, token, service, interfaces, keepalive_ms, max_frame_size,
            request_id=request_id,
        )


@dataclass(slots=True)
class InitOk(Frame):
    """Server -> mediator: HELLO accepted; ``version`` is used from now on."""

    TYPE = FrameType.INIT_OK
    ROLE = Role.REPLY
    version: int
    session_id: int
    max_frame_size: int

    def _write(self, w: Writer) -> None:
        w.u8(self.version, "version")
        w.u32(self.session_id, "session_id")
        w.u32(self.max_frame_size, "max_frame_size")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> InitOk:
        return cls(r.u8(), r.u32(), r.u32(), request_id=request_id)


@dataclass(slots=True)
class InitErr(Frame):
    """Server -> mediator: HELLO refused; ``versions`` are the server's own.

    Request id 0 when it answers something other than a HELLO (a frame sent
    before HELLO, or no HELLO in time): before negotiation INIT_ERR is the one
    refusal that any version can read.
    """

    TYPE = FrameType.INIT_ERR
    ROLE = Role.ANY
    code: ErrorCode
    message: str
    versions: tuple[int, ...]

    def _write(self, w: Writer) -> None:
        w.u16(self.code, "code")
        w.versions(self.versions)
        w.text(self.message, "message")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> InitErr:
        code = r.code()
        versions = r.versions()
        return cls(code, r.text(), versions, request_id=request_id)


@dataclass(slots=True)
class OpenPort(Frame):
    """Server -> mediator: open ``proto`` port ``port`` on ``address``.

    ``mandatory`` False is the seed's "desired" number: "the first free port
    starting from the number requested is assigned" (seed, "Open port").
    """

    TYPE = FrameType.OPEN_PORT
    ROLE = Role.REQUEST
    proto: Proto
    address: IPAddress
    port: int
    mandatory: bool

    def _write(self, w: Writer) -> None:
        w.u8(self.proto, "proto")
        w.u8(int(self.mandatory), "mandatory")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> OpenPort:
        proto = r.proto()
        mandatory = r.flag()
        return cls(proto, r.address(), r.u16(), mandatory, request_id=request_id)


@dataclass(slots=True)
class RedirectPort(Frame):
    """Server -> mediator: open UDP ``port`` and relay it over a UDP channel.

    Redirect exists so that UDP traffic keeps "the UDP as the underlying
    transport layer" instead of inheriting TCP's retransmission delay (seed,
    "Redirect port").
    """

    TYPE = FrameType.REDIRECT_PORT
    ROLE = Role.REQUEST
    address: IPAddress
    port: int
    mandatory: bool

    def _write(self, w: Writer) -> None:
        w.u8(int(self.mandatory), "mandatory")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> RedirectPort:
        mandatory = r.flag()
        return cls(r.address(), r.u16(), mandatory, request_id=request_id)


@dataclass(slots=True)
class ConnectPort(Frame):
    """Server -> mediator: connect opened TCP port ``port_id`` to address:port."""

    TYPE = FrameType.CONNECT
    ROLE = Role.REQUEST
    port_id: int
    address: IPAddress
    port: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> ConnectPort:
        return cls(r.u32(), r.address(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class OpenConnect(Frame):
    """Server -> mediator (version 2): open a TCP client port on ``local``
    (any port) and connect it to target:port, in one request. Answered by
    OPENED once connected, or ERR (port id 0): one round trip per new public
    connection instead of OPEN_PORT's and CONNECT's two."""

    TYPE = FrameType.OPEN_CONNECT
    ROLE = Role.REQUEST
    local: IPAddress
    address: IPAddress
    port: int

    def _write(self, w: Writer) -> None:
        w.address(self.local)
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> OpenConnect:
        return cls(r.address(), r.address(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class OpenStream(Frame):
    """Server -> mediator (version 4): OPEN_CONNECT with the id the server
    chose (``port_id``, at least ``STREAM_ID_BASE``). The stream exists
    from this frame on: the server may send DATA, EVENT_FIN and EVENT_RST on
    it at once, before the OPENED that answers it, so that a public
    client's first bytes cross the channel with the request instead of a
    round trip after it."""

    TYPE = FrameType.OPEN_STREAM
    ROLE = Role.REQUEST
    port_id: int
    local: IPAddress
    address: IPAddress
    port: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.address(self.local)
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> OpenStream:
        return cls(r.u32(), r.address(), r.address(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class CheckTarget(Frame):
    """Server -> mediator (version 2): would the owner's allow-list let the
    server relay to target:port (TCP: connect, UDP: send)? ACK or ERR
    NOT_ALLOWED with the mediator's reason; nothing is opened. A publish
    asks it first, so a target the mediator refuses is refused at once."""

    TYPE = FrameType.CHECK_TARGET
    ROLE = Role.REQUEST
    proto: Proto
    address: IPAddress
    port: int

    def _write(self, w: Writer) -> None:
        w.u8(self.proto, "proto")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> CheckTarget:
        return cls(r.proto(), r.address(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class _PortIdOnly(Frame):
    port_id: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Frame:
        return cls(r.u32(), request_id=request_id)


@dataclass(slots=True)
class ListenPort(_PortIdOnly):
    """Server -> mediator: make opened TCP port ``port_id`` a server port."""

    TYPE = FrameType.LISTEN
    ROLE = Role.REQUEST


@dataclass(slots=True)
class ClosePort(_PortIdOnly):
    """Server -> mediator: close port or connection ``port_id``."""

    TYPE = FrameType.CLOSE
    ROLE = Role.REQUEST


@dataclass(slots=True)
class UdpKey(Frame):
    """Server -> mediator: the key that authenticates the UDP channels.

    It travels over the TLS channel, so the UDP channels get the TCP
    channel's authentication without a handshake of their own.
    """

    TYPE = FrameType.UDP_KEY
    ROLE = Role.REQUEST
    key_id: int
    key: bytes

    def _write(self, w: Writer) -> None:
        w.u32(self.key_id, "key_id")
        w.blob(self.key, "key")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> UdpKey:
        return cls(r.u32(), r.blob(), request_id=request_id)


@dataclass(slots=True)
class Opened(Frame):
    """Mediator -> server: reply to OPEN_PORT/REDIRECT_PORT (id, port given)."""

    TYPE = FrameType.OPENED
    ROLE = Role.REPLY
    port_id: int
    port: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Opened:
        return cls(r.u32(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class Ack(Frame):
    """Reply: the request succeeded (the seed's "acknowledgement code")."""

    TYPE = FrameType.ACK
    ROLE = Role.REPLY

    def _write(self, w: Writer) -> None:
        return None

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Ack:
        return cls(request_id=request_id)


@dataclass(slots=True)
class Err(Frame):
    """Reply: the request failed with ``code`` ("or an error code").

    With request id 0 it reports on a DATA, EVENT_FIN or EVENT_RST frame
    (which have no id) for port ``port_id``.
    """

    TYPE = FrameType.ERR
    ROLE = Role.ANY
    code: ErrorCode
    port_id: int = 0
    message: str = ""

    def _write(self, w: Writer) -> None:
        w.u16(self.code, "code")
        w.u32(self.port_id, "port_id")
        w.text(self.message, "message")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Err:
        return cls(r.code(), r.u32(), r.text(), request_id=request_id)


@dataclass(slots=True)
class Data(Frame):
    """Either way: one packet (UDP) or a piece of the stream (TCP).

    Server -> mediator: send ``payload`` from port ``port_id`` to
    address:port. Mediator -> server: ``payload`` arrived at ``port_id`` from
    address:port (seed, "Packet relay").
    """

    TYPE = FrameType.DATA
    ROLE = Role.UNSOLICITED
    port_id: int
    address: IPAddress
    port: int
    payload: Bytes

    def _write(self, w: Writer) -> None:
        self._write_fields(w)
        w.raw(self.payload)

    def _write_fields(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Data:
        return cls(r.u32(), r.address(), r.u16(), r.rest(), request_id=request_id)


@dataclass(slots=True)
class EventAccepted(Frame):
    """Mediator -> server: a private host connected to listening ``port_id``.

    The seed's first relayed event, "corresponding to the sequence SYN,
    SYN/ACK, ACK" (seed, "Event relay"). ``conn_id`` names the new connection.
    """

    TYPE = FrameType.EVENT_ACCEPTED
    ROLE = Role.UNSOLICITED
    port_id: int
    conn_id: int
    address: IPAddress
    port: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.u32(self.conn_id, "conn_id")
        w.address(self.address)
        w.u16(self.port, "port")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> EventAccepted:
        return cls(r.u32(), r.u32(), r.address(), r.u16(), request_id=request_id)


@dataclass(slots=True)
class EventFin(_PortIdOnly):
    """Either way: the sender's side of TCP connection ``port_id`` sent FIN."""

    TYPE = FrameType.EVENT_FIN
    ROLE = Role.UNSOLICITED


@dataclass(slots=True)
class EventRst(_PortIdOnly):
    """Either way: TCP connection ``port_id`` was reset (RST)."""

    TYPE = FrameType.EVENT_RST
    ROLE = Role.UNSOLICITED


@dataclass(slots=True)
class WindowUpdate(Frame):
    """Either way (version 3): the sender's side of TCP connection ``port_id``
    has passed ``increment`` more bytes of DATA on to its socket: the peer may
    send that many more (tunnel/window.py)."""

    TYPE = FrameType.WINDOW_UPDATE
    ROLE = Role.UNSOLICITED
    port_id: int
    increment: int

    def _write(self, w: Writer) -> None:
        w.u32(self.port_id, "port_id")
        w.u32(self.increment, "increment")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> WindowUpdate:
        return cls(r.u32(), r.u32(), request_id=request_id)


@dataclass(slots=True)
class _Empty(Frame):
    def _write(self, w: Writer) -> None:
        return None

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Frame:
        return cls(request_id=request_id)


@dataclass(slots=True)
class Keepalive(_Empty):
    """The seed's "maintain channel packet"; the receiver answers at once."""

    TYPE = FrameType.KEEPALIVE
    ROLE = Role.REQUEST


@dataclass(slots=True)
class KeepaliveAck(_Empty):
    """Answer to KEEPALIVE; proves the peer alive (dead-peer detection)."""

    TYPE = FrameType.KEEPALIVE_ACK
    ROLE = Role.REPLY


@dataclass(slots=True)
class Bye(Frame):
    """Either way, last frame: why the sender closes the channel."""

    TYPE = FrameType.BYE
    ROLE = Role.UNSOLICITED
    code: ErrorCode
    message: str = ""

    def _write(self, w: Writer) -> None:
        w.u16(self.code, "code")
        w.text(self.message, "message")

    @classmethod
    def _read(cls, r: Reader, request_id: int) -> Bye:
        return cls(r.code(), r.text(), request_id=request_id)


FRAME_CLASSES: dict[FrameType, type[Frame]] = {
    cls.TYPE: cls
    for cls in (
        Hello, InitOk, InitErr, OpenPort, RedirectPort, ConnectPort, ListenPort,
        ClosePort, UdpKey, OpenConnect, OpenStream, CheckTarget, Opened, Ack, Err, Data, EventAccepted, EventFin,
        EventRst, WindowUpdate, Keepalive, KeepaliveAck, Bye,
    )
}


# What the decoder needs of a frame type, by its value, looked up once a
# frame: the class, the version it came in, and whether its request id must
# be non-zero (True), zero (False) or either (None), as ``Role`` says.
_DECODING: dict[int, tuple[type[Frame], int, bool | None]] = {
    int(t): (cls, SINCE_VERSION.get(t, 0), {Role.REQUEST: True, Role.REPLY: True, Role.UNSOLICITED: False}.get(cls.ROLE))
    for t, cls in FRAME_CLASSES.items()
}


def _check_request_id(role: Role, request_id: int) -> str | None:
    """Why ``request_id`` is wrong for a frame of ``role``, or None."""
    if role in (Role.REQUEST, Role.REPLY) and request_id == 0:
        return f"a {role.value} needs a request id"
    if role is Role.UNSOLICITED and request_id != 0:
        return "an unsolicited frame carries request id 0"
    return None


def encode_frame(frame: Frame, version: int = BASE_VERSION) -> bytes:
    """The bytes of ``frame``, header included, in protocol ``version``."""
    cls, since, wants_id = _DECODING[frame.TYPE]
    request_id = frame.request_id
    if wants_id is not None and (request_id != 0) is not wants_id:
        raise LocalProtocolError(f"{frame.TYPE.name}: {_check_request_id(frame.ROLE, request_id)}")
    if version < since:
        raise LocalProtocolError(f"{frame.TYPE.name} does not exist in version {version}")
    w = Writer()
    frame._write(w)
    body = b"".join(w.parts)
    if not (0 <= version < 0x100 and 0 <= request_id < 0x100000000 and len(body) < 0x100000000):
        check_range("version", version, 8)  # the one that does not fit says so
        check_range("request_id", request_id, 32)
        check_range("length", len(body), 32)
    return HEADER.pack(version, frame.TYPE, 0, request_id, len(body)) + body


def encode_frame_parts(frame: Frame, version: int = BASE_VERSION) -> tuple[Bytes, ...]:
    """``encode_frame``'s bytes as pieces to write in order: a DATA frame is
    its header and fields, then its payload as it came (not copied); any
    other frame is one piece."""
    if type(frame) is not Data:
        return (encode_frame(frame, version),)
    assert isinstance(frame, Data)
    problem = _check_request_id(frame.ROLE, frame.request_id)
    if problem is not None:
        raise LocalProtocolError(f"DATA: {problem}")
    return encode_data_parts(frame.port_id, frame.address, frame.port, frame.payload, version)


def encode_data_parts(port_id: int, address: IPAddress, port: int, payload: Bytes, version: int) -> tuple[Bytes, Bytes]:
    """A DATA frame's pieces, built from its fields without a ``Data``
    (the frame every relayed byte rides in): header and fields, then
    ``payload`` as it came."""
    fields_of = _DATA_FIELDS[4] if type(address) is ipaddress.IPv4Address else (
        _DATA_FIELDS[6] if type(address) is ipaddress.IPv6Address else None)
    if fields_of is not None and 0 <= port_id < 1 << 32 and 0 <= port < 1 << 16:
        fields = fields_of.pack(port_id, address.version, address.packed, port)
    else:  # the field by field writing says what is wrong
        w = Writer()
        Data(port_id, address, port, payload)._write_fields(w)
        fields = b"".join(w.parts)
    length = len(fields) + len(payload)
    check_range("version", version, 8)
    check_range("length", length, 32)
    return (HEADER.pack(version, FrameType.DATA, 0, 0, length) + fields, payload)


def data_chunk_size(max_frame_size: int, address: IPAddress) -> int:
    """The largest DATA payload that fits a frame of ``max_frame_size``."""
    return max_frame_size - HEADER_SIZE - (4 + 1 + address.max_prefixlen // 8 + 2)


# The decoder's buffer (``FrameDecoder.get_buffer``): an idle channel's stays
# this small, and a buffer past ``SHRINK_ABOVE`` is given back when it is empty
# and the next read is small.
IDLE_BUFFER = 1024
SHRINK_ABOVE = 1 << 16
# A DATA frame's fields (port id, address family and address, port) in one
# struct call each way, by family: the frame every relayed byte rides in.
_DATA_FIELDS = {4: struct.Struct("!IB4sH"), 6: struct.Struct("!IB16sH")}
# A DATA body longer than this is read field by field and its payload copied
# once, out of the buffer; a shorter one (and every other frame) is copied
# whole and read with a ``Reader``.
_DATA_FIELDS_MAX = 4 + 1 + 16 + 2
# A DATA frame's address, by its bytes (4 or 16, so a family's never
# passes for the other's): a channel relays for a few peers, and an address
# object takes Python code to build. At most this many, process-wide.
ADDRESSES_KEPT = 1024
_ADDRESSES: dict[bytes, IPAddress] = {}


class FrameDecoder:
    """Turns a byte stream into frames, whatever the chunking.

    ``versions`` are the versions accepted before negotiation; once the
    session has one, set ``version`` and every frame but HELLO and INIT_ERR
    must carry exactly it. ``max_frame_size`` bounds header plus body, and a
    header announcing more is refused at once, before its body is buffered.
    After a ``ProtocolError`` the decoder keeps raising it: framing is lost.

    Bytes come in by ``feed`` (a copy), or are written straight into the
    decoder's buffer: ``get_buffer`` lends the free end of it and
    ``buffer_updated`` says how much was written there (asyncio's
    ``BufferedProtocol``, through which TLS decrypts into it). A DATA
    frame's payload is then the only copy Python makes of relayed bytes
    on their way in (docs/tunnel-protocol.md section 21, "Copies").
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    ) -> None:
        if max_frame_size < HEADER_SIZE:
            raise ValueError(f"max_frame_size {max_frame_size} is below the header size")
        self.max_frame_size = max_frame_size
        self.versions = frozenset(versions)
        self.version: int | None = None
        self._buffer = bytearray()
        self._start = 0  # first byte not yet part of a returned frame
        self._end = 0  # end of the bytes received
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        """The buffer's size (what a channel costs in memory for it)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Buffer ``data``; frames come out of ``next_frame``."""
        if data:
            self._room(len(data))
            self._buffer[self._end : self._end + len(data)] = data
            self._end += len(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        """The free end of the buffer, at least ``min(sizehint, 1)`` bytes,
        to write received bytes into; then ``buffer_updated``. The view must
        be let go before the next ``get_buffer`` or ``feed``."""
        self._room(max(1, sizehint))
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of ``get_buffer``'s view."""
        if not 0 <= nbytes <= len(self._buffer) - self._end:
            raise ValueError(f"{nbytes} bytes do not fit the buffer lent")
        self._end += nbytes

    def _room(self, wanted: int) -> None:
        """Make ``wanted`` bytes free at the end of the buffer (never while a
        view of it is out: that is ``get_buffer``'s caller's promise)."""
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buffer) > SHRINK_ABOVE and wanted < IDLE_BUFFER:
                self._buffer = bytearray(IDLE_BUFFER)  # bulk is over: give the memory back
        if len(self._buffer) - self._end >= wanted:
            return
        if self._start:
            held = self._end - self._start
            self._buffer[:held] = self._buffer[self._start : self._end]
            self._start, self._end = 0, held
        if len(self._buffer) - self._end < wanted:
            self._buffer.extend(bytes(self._end + max(wanted, IDLE_BUFFER) - len(self._buffer)))

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            start = self._start
            if self._end - start < HEADER_SIZE:
                return None
            version, type_value, flags, request_id, length = HEADER.unpack_from(self._buffer, start)
            if version != self.version and type_value not in VERSION_INDEPENDENT:
                if self.version is not None or version not in self.versions:
                    raise ProtocolError(
                        ErrorCode.UNSUPPORTED_VERSION, f"frame in version {version}"
                    )
            decoding = _DECODING.get(type_value)
            if decoding is None:
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"frame type {type_value:#04x}")
            cls, since, wants_id = decoding
            if version < since:
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"frame type {type_value:#04x} in version {version}")
            if flags != 0:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"reserved flags {flags:#06x} set")
            if HEADER_SIZE + length > self.max_frame_size:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"{HEADER_SIZE + length} bytes > max frame size {self.max_frame_size}",
                )
            if wants_id is not None and (request_id != 0) is not wants_id:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{cls.TYPE.name}: {_check_request_id(cls.ROLE, request_id)}")
            end = start + HEADER_SIZE + length
            if self._end < end:
                return None
            self._start = end
            with memoryview(self._buffer) as view:
                if cls is Data:
                    body = start + HEADER_SIZE
                    fields_of = _DATA_FIELDS.get(self._buffer[body + 4]) if length > 4 else None
                    if fields_of is not None and length >= fields_of.size:
                        port_id, family, raw, port = fields_of.unpack_from(self._buffer, body)
                        address = _ADDRESSES.get(raw)
                        if address is None:
                            address = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
                            if len(_ADDRESSES) >= ADDRESSES_KEPT:
                                _ADDRESSES.clear()
                            _ADDRESSES[raw] = address
                        return Data(port_id, address, port, bytes(view[body + fields_of.size : end]))
                    # Anything else is a bad body: the field by field reading below says how.
                if cls is Data and length > _DATA_FIELDS_MAX:
                    fields = Reader(bytes(view[start + HEADER_SIZE : start + HEADER_SIZE + _DATA_FIELDS_MAX]))
                    port_id, address, port = fields.u32(), fields.address(), fields.u16()
                    payload = bytes(view[start + HEADER_SIZE + fields.position : end])
                    return Data(port_id, address, port, payload, request_id=request_id)
                reader = Reader(bytes(view[start + HEADER_SIZE : end]))
            frame = cls._read(reader, request_id)
            reader.end()
            return frame
        except ProtocolError as err:
            self._error = err
            raise

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

