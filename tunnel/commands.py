"""What the cores hand to the I/O layer: commands to carry out, events to note.

The cores do no I/O (DESIGN.md invariant 9). Every call returns a list of
these values, in the order they must be carried out; the asyncio layer
executes the commands and reports the results back (mitmproxy's
``SendData``/``OpenConnection``/``CloseConnection``, in our vocabulary).

Commands (do something): ``SendFrame``, ``CloseChannel``; on the mediator
``OpenSocket``, ``ConnectSocket``, ``ListenSocket``, ``CloseSocket``,
``ShutdownSocket``, ``AbortSocket``, ``WriteStream``, ``SendTo``,
``SendChannel``; on the server ``SendDatagram``.

Events (something happened, decide or log): ``ChannelClosed`` and
``RelayFailed`` on both; on the mediator ``Ready``, ``Refused``, ``UdpChannelDead``; on the server
``SessionReady``, ``PortOpened``, ``RequestAcked``, ``RequestFailed``,
``Received``, ``ConnectionAccepted``, ``PeerFin``,
``PeerReset``, ``LimitExceeded``.

They are values: made once, never changed. Not frozen dataclasses, though:
a frozen one costs over twice a plain one's making (a Python-level
``__setattr__`` per field), and a new public connection makes about a
dozen on each side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunnel.errors import ErrorCode
from tunnel.frames import (
    BASE_VERSION, HEADER_SIZE, Bytes, Frame, FrameDecoder, IPAddress, IPInterface, Proto, encode_frame_parts,
)
from tunnel.policy import Op

# -- both sides ---------------------------------------------------------------


class SendFrame:
    """Write a frame on the TCP (TLS) channel: its encoding, made by the core.

    ``parts`` are its bytes in pieces to write in order
    (``encode_frame_parts``: a DATA frame's header and fields, then its
    payload as it came, not copied); ``data`` joins them. ``frame`` is the
    frame itself, decoded again from ``parts`` when the core built them
    straight from a frame's fields (``encoded``: the DATA frames of a
    stream, the tunnel's hot path), for tests and logs. Two are equal when
    their bytes and ``hold`` are.
    """

    __slots__ = ("parts", "hold", "datagram", "prompt", "_frame")

    def __init__(self, frame: Frame, version: int = BASE_VERSION, hold: bool = False) -> None:
        self.parts: tuple[Bytes, ...] = encode_frame_parts(frame, version)
        self.hold = hold
        """May wait for the channel's next write (a stream's OPENED: the server
        relays without it), up to the adapter's ``opened_hold``."""
        self.datagram = False
        """A UDP datagram in a DATA frame (counted apart by the server)."""
        self.prompt = False
        """To be written at once, not at the end of the loop's iteration (a
        WINDOW_UPDATE: the peer's sender may be waiting for it, while this
        end goes on with a long run of reads)."""
        self._frame: Frame | None = frame

    @classmethod
    def encoded(cls, parts: tuple[Bytes, ...], *, datagram: bool = False) -> SendFrame:
        """A frame the core encoded itself (``encode_data_parts``)."""
        out = cls.__new__(cls)
        out.parts, out.hold, out.datagram, out.prompt, out._frame = parts, False, datagram, False, None
        return out

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)

    @property
    def version(self) -> int:
        return self.parts[0][0]

    @property
    def frame(self) -> Frame:
        if self._frame is None:
            decoder = FrameDecoder(max(len(self.data), HEADER_SIZE))
            decoder.feed(self.data)
            self._frame = decoder.next_frame()
            assert self._frame is not None
        return self._frame

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SendFrame):
            return NotImplemented
        return self.data == other.data and self.hold == other.hold

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SendFrame({self.frame!r}, {self.version}{', hold=True' if self.hold else ''})"


@dataclass(slots=True)
class CloseChannel:
    """Close the TCP channel (after flushing what was sent before)."""


@dataclass(slots=True)
class ChannelClosed:
    """The channel is over. ``code`` is None when it was lost without a BYE."""

    code: ErrorCode | None
    message: str
    by_peer: bool


@dataclass(slots=True)
class RelayFailed:
    """The peer could not take a DATA/FIN/RST/ACCEPTED for ``port_id``
    (an ERR with request id 0): log it; the port may have just closed."""

    port_id: int
    code: ErrorCode
    message: str = ""


@dataclass(slots=True)
class PauseReading:
    """Version 3: stop reading TCP connection ``port_id``'s socket (its
    window to the peer is used up); a command on the mediator, an event for
    the port's owner on the server."""

    port_id: int


@dataclass(slots=True)
class ResumeReading:
    """Version 3: read ``port_id``'s socket again (the peer gave credit back)."""

    port_id: int


# -- mediator: commands -------------------------------------------------------


@dataclass(slots=True)
class OpenSocket:
    """Bind a ``proto`` socket on address:port and report ``opened``/``failed``.

    ``mandatory`` False: bind the first free port from ``port`` up (port 0:
    any port), as the seed's "desired" number. ``redirect``: a UDP port whose
    datagrams go over a UDP channel; also open that channel's socket to the
    server's service port, and report success only when both are up.
    ``connect_to``: an OPEN_CONNECT's target, which a ConnectSocket follows
    (the I/O layer may take a connection it made to it ahead, tunnel/warm.py).
    """

    port_id: int
    proto: Proto
    address: IPAddress
    port: int
    mandatory: bool
    redirect: bool = False
    connect_to: tuple[IPAddress, int] | None = None


@dataclass(slots=True)
class ConnectSocket:
    """Connect TCP port ``port_id`` to address:port; ``connected``/``failed``."""

    port_id: int
    address: IPAddress
    port: int


@dataclass(slots=True)
class ListenSocket:
    """Make TCP port ``port_id`` listen; ``listening``/``failed``."""

    port_id: int


@dataclass(slots=True)
class CloseSocket:
    """Close ``port_id`` (and its UDP channel socket); no result expected."""

    port_id: int


@dataclass(slots=True)
class ShutdownSocket:
    """Half-close TCP connection ``port_id`` (shutdown SHUT_WR): relays FIN."""

    port_id: int


@dataclass(slots=True)
class AbortSocket:
    """Reset TCP connection ``port_id`` (SO_LINGER 0, then close): relays RST."""

    port_id: int


@dataclass(slots=True)
class WriteStream:
    """Write ``data`` to TCP connection ``port_id``."""

    port_id: int
    data: bytes


@dataclass(slots=True)
class SendTo:
    """Send a datagram from UDP port ``port_id`` to a private address:port."""

    port_id: int
    address: IPAddress
    port: int
    data: bytes


@dataclass(slots=True)
class SendProbe:
    """Send ``data`` (a PROBE datagram) from the spare probe socket to the
    service port, opening that socket first if need be; what it receives
    goes to ``receive_datagram``."""

    data: bytes


@dataclass(slots=True)
class KeepaliveLearned:
    """Keepalive discovery is over: the UDP channels keep alive every
    ``interval`` seconds (the mapping survived ``survived`` s idle, and was
    lost after ``lost`` s, if ever)."""

    interval: float
    survived: float
    lost: float | None
    probes: int


@dataclass(slots=True)
class SendChannel:
    """Send ``data`` (an authenticated datagram) on ``port_id``'s UDP channel."""

    port_id: int
    data: bytes


# -- mediator: events ---------------------------------------------------------


@dataclass(slots=True)
class Ready:
    """INIT_OK received: the channel is up in ``version``."""

    session_id: int
    version: int


@dataclass(slots=True)
class Refused:
    """The owner's allow-list refused a request: log it (ERR NOT_ALLOWED sent)."""

    op: Op
    address: IPAddress
    port: int
    proto: Proto


@dataclass(slots=True)
class UdpChannelDead:
    """No datagram on ``port_id``'s channel for the dead-peer time.

    The NAT mapping has probably gone: reopen the channel's socket from a new
    source port. The server learns the new address from the next
    authenticated datagram.
    """

    port_id: int


# -- server: commands ---------------------------------------------------------


@dataclass(slots=True)
class SendDatagram:
    """Send ``data`` from the service port to a mediator's channel address."""

    address: IPAddress
    port: int
    data: bytes


# -- server: events -----------------------------------------------------------


@dataclass(slots=True)
class SessionReady:
    """HELLO accepted: the mediator, its environment and the version."""

    session_id: int
    identity: str
    service: str
    interfaces: tuple[IPInterface, ...]
    version: int


@dataclass(slots=True)
class PortOpened:
    """OPEN_PORT/REDIRECT_PORT ``request_id`` succeeded."""

    request_id: int
    port_id: int
    port: int


@dataclass(slots=True)
class RequestAcked:
    """CONNECT/LISTEN/CLOSE ``request_id`` on ``port_id`` succeeded."""

    request_id: int
    port_id: int


@dataclass(slots=True)
class RequestFailed:
    """Request ``request_id`` failed with ``code``."""

    request_id: int
    port_id: int
    code: ErrorCode
    message: str = ""


@dataclass(slots=True)
class Received:
    """A packet (or stream bytes) from address:port arrived at ``port_id``."""

    port_id: int
    address: IPAddress
    port: int
    data: bytes


@dataclass(slots=True)
class ConnectionAccepted:
    """A private host connected to listening ``listen_id``; it is ``conn_id``."""

    listen_id: int
    conn_id: int
    address: IPAddress
    port: int


@dataclass(slots=True)
class PeerFin:
    """The private end of connection ``port_id`` sent FIN."""

    port_id: int


@dataclass(slots=True)
class PeerReset:
    """Connection ``port_id`` was reset on the private side."""

    port_id: int


@dataclass(slots=True)
class LimitExceeded:
    """The mediator pushed past a limit; ``port_id`` is being closed."""

    port_id: int
    message: str = field(default="")


MediatorOutput = (
    SendFrame | CloseChannel | ChannelClosed | OpenSocket | ConnectSocket | ListenSocket
    | CloseSocket | ShutdownSocket | AbortSocket | WriteStream | SendTo | SendChannel
    | Ready | Refused | UdpChannelDead | RelayFailed | PauseReading | ResumeReading | SendProbe
    | KeepaliveLearned
)
ServerOutput = (
    SendFrame | CloseChannel | ChannelClosed | SendDatagram | SessionReady | PortOpened
    | RequestAcked | RequestFailed | RelayFailed | Received | ConnectionAccepted
    | PeerFin | PeerReset | LimitExceeded | PauseReading | ResumeReading
)
