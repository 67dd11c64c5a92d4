"""Playbooks for the control server's session core, and both cores together."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.commands import (
    ChannelClosed, CloseChannel, CloseSocket, ConnectionAccepted, ConnectSocket, LimitExceeded, OpenSocket,
    PeerFin, PeerReset, PortOpened, Received, RelayFailed, RequestAcked, RequestFailed,
    SendChannel, SendDatagram, SendFrame, SendTo, SessionReady, WriteStream,
)
from tunnel.datagrams import Datagram, DatagramType, DropReason, encode_datagram, peek_key_id
from tunnel.errors import ErrorCode, LimitError, LocalProtocolError
from tunnel.frames import (
    Ack, Bye, ClosePort, ConnectPort, Data, Err, EventAccepted, EventFin, EventRst, Frame,
    Hello, InitErr, InitOk, Keepalive, KeepaliveAck, ListenPort, Opened, OpenPort, Proto,
    RedirectPort, UdpKey, encode_frame,
)
from tunnel.mediator_core import MediatorCore, MediatorIdentity
from tunnel.policy import AllowList, Rule, TokenAuthenticator
from tunnel.server_core import ServerSession, _Remote, _Remotes
from tunnel.settings import MediatorLimits, MediatorSettings, ServerSettings
from tunnel.states import PortState, ServerState

ME = IPv4Address("192.168.1.2")
WEB = IPv4Address("192.168.1.10")
PHONE = IPv4Address("192.168.1.50")
NAT = IPv4Address("203.0.113.7")  # the mediator's public address, as its NAT maps it
KEY = bytes(range(32))
IFACES = (IPv4Interface("192.168.1.2/24"),)
AUTH = TokenAuthenticator({"mediator-7": b"secret"})
HELLO = Hello((1,), "mediator-7", b"secret", "web-help", IFACES, 25000, 131072, request_id=1)


def out(*frames: Frame) -> list[SendFrame]:
    return [SendFrame(f) for f in frames]


def feed(session: ServerSession, *frames: Frame, now: float = 1.0) -> list[object]:
    return list(session.receive_data(b"".join(encode_frame(f) for f in frames), now))


def new_session(**kw: object) -> ServerSession:
    kw.setdefault("authenticator", AUTH)
    kw.setdefault("settings", ServerSettings(dead_after=3))  # the playbooks' timers
    return ServerSession(7, 0.0, random_bytes=lambda n: KEY[:n], **kw)  # type: ignore[arg-type]


def ready(**kw: object) -> ServerSession:
    session = new_session(**kw)
    feed(session, HELLO, now=0.5)
    assert feed(session, Ack(request_id=1), now=0.5) == []  # UDP_KEY accepted
    return session


def opened(session: ServerSession, proto: Proto = Proto.TCP, port: int = 8080, port_id: int = 1) -> int:
    request_id, _ = session.open_port(proto, ME, port)
    assert feed(session, Opened(port_id, port, request_id=request_id)) == [
        PortOpened(request_id, port_id, port)
    ]
    return port_id


def connected(session: ServerSession, port_id: int) -> None:
    request_id, _ = session.connect(port_id, WEB, 80)
    assert feed(session, Ack(request_id=request_id)) == [RequestAcked(request_id, port_id)]


def refused_init(code: ErrorCode, message: str, request_id: int = 1) -> list[object]:
    return [
        SendFrame(InitErr(code, message, (1, 2, 3, 4, 5), request_id=request_id), 5),
        CloseChannel(), ChannelClosed(code, message, False),
    ]


def closed_by_us(code: ErrorCode, message: str) -> list[object]:
    return [SendFrame(Bye(code, message)), CloseChannel(), ChannelClosed(code, message, False)]


# -- init ----------------------------------------------------------------------------


def test_init_accepted() -> None:
    session = new_session()
    assert session.state is ServerState.WAIT_HELLO and session.next_deadline() == 10.0
    assert feed(session, HELLO, now=0.5) == [
        SendFrame(InitOk(1, 7, 131072, request_id=1)),
        SendFrame(UdpKey(7, KEY, request_id=1)),
        SessionReady(7, "mediator-7", "web-help", IFACES, 1),
    ]
    assert session.state is ServerState.READY and session.hello == HELLO
    assert session.next_deadline() == 75.5  # 3 of the mediator's 25 s intervals


@pytest.mark.parametrize(
    ("hello", "code", "message"),
    [
        (Hello((1,), "mediator-7", b"wrong", "web-help", (), 25000, 131072, request_id=1),
         ErrorCode.AUTH_FAILED, "unknown identity or token"),
        (Hello((1,), "mediator-7", b"secret", "web-help", (), 500, 131072, request_id=1),
         ErrorCode.BAD_REQUEST, "keepalive interval 0.5 s out of range"),
        (Hello((1,), "mediator-7", b"secret", "web-help", (), 25000, 4096, request_id=1),
         ErrorCode.BAD_REQUEST, "max frame size too small"),
    ],
    ids=["token", "interval", "frame-size"],
)
def test_init_refused(hello: Hello, code: ErrorCode, message: str) -> None:
    session = new_session()
    assert feed(session, hello) == refused_init(code, message)
    assert session.state is ServerState.CLOSED


def test_no_authenticator_refuses_everyone() -> None:
    session = new_session(authenticator=None)
    assert feed(session, HELLO) == refused_init(ErrorCode.AUTH_FAILED, "unknown identity or token")


def test_version_mismatch() -> None:
    """A future mediator speaking only version 6 gets INIT_ERR, in a frame it can read."""
    session = new_session()
    hello_v6 = Hello((6,), "mediator-7", b"secret", "web-help", (), 25000, 131072, request_id=1)
    result = session.receive_data(encode_frame(hello_v6, version=6), 0.5)
    assert result == refused_init(ErrorCode.UNSUPPORTED_VERSION, "no common version (offered 6)")
    first = result[0]
    assert isinstance(first, SendFrame) and first.data[:2] == b"\x05\x03"


def test_highest_common_version_is_chosen() -> None:
    session = new_session(settings=ServerSettings(versions=(1, 2), udp_channels=False))
    hello = Hello((1, 2, 3), "mediator-7", b"secret", "web-help", (), 25000, 131072, request_id=1)
    assert feed(session, hello)[0] == SendFrame(InitOk(2, 7, 131072, request_id=1), version=2)
    assert session.version == 2


def test_frame_before_hello() -> None:
    session = new_session()
    assert feed(session, Keepalive(request_id=1)) == refused_init(
        ErrorCode.UNEXPECTED_FRAME, "KEEPALIVE not allowed in WAIT_HELLO", request_id=0
    )


def test_garbage_before_hello() -> None:
    session = new_session()
    assert session.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0.1) == refused_init(
        ErrorCode.UNSUPPORTED_VERSION, "frame in version 71", request_id=0
    )


def test_hello_timeout() -> None:
    session = new_session()
    assert session.tick(9.9) == []
    assert session.tick(10.0) == refused_init(ErrorCode.TIMEOUT, "no HELLO in time", request_id=0)


# -- requests and replies ----------------------------------------------------------------


def test_open_desired_and_mandatory() -> None:
    session = ready()
    assert session.open_port(Proto.TCP, ME, 8080) == (
        2, out(OpenPort(Proto.TCP, ME, 8080, False, request_id=2))
    )
    assert feed(session, Opened(1, 8081, request_id=2)) == [PortOpened(2, 1, 8081)]
    assert session.open_port(Proto.UDP, ME, 5060, mandatory=True) == (
        3, out(OpenPort(Proto.UDP, ME, 5060, True, request_id=3))
    )
    assert feed(session, Err(ErrorCode.PORT_IN_USE, 0, "5060 is taken", request_id=3)) == [
        RequestFailed(3, 0, ErrorCode.PORT_IN_USE, "5060 is taken")
    ]
    assert session.ports == {1: (Proto.TCP, PortState.OPEN)}


def test_connect_relay_fin_rst_close() -> None:
    session = ready()
    port_id = opened(session)
    assert session.connect(port_id, WEB, 80) == (3, out(ConnectPort(1, WEB, 80, request_id=3)))
    assert session.ports[port_id] == (Proto.TCP, PortState.CONNECTING)
    assert feed(session, Ack(request_id=3)) == [RequestAcked(3, 1)]
    assert session.send(1, WEB, 80, b"GET /") == out(Data(1, WEB, 80, b"GET /"))
    assert feed(session, Data(1, WEB, 80, b"200 OK")) == [Received(1, WEB, 80, b"200 OK")]
    assert feed(session, EventFin(1)) == [PeerFin(1)]
    assert session.fin(1) == out(EventFin(1))
    assert feed(session, EventRst(1)) == [PeerReset(1)]
    assert session.ports[1] == (Proto.TCP, PortState.RESET)
    with pytest.raises(LocalProtocolError):
        session.send(1, WEB, 80, b"x")
    assert session.close_port(1) == (4, out(ClosePort(1, request_id=4)))
    assert feed(session, Data(1, WEB, 80, b"in flight")) == []  # closing: dropped
    assert feed(session, Ack(request_id=4)) == [RequestAcked(4, 1)]
    assert session.ports == {}


def test_connect_refused_by_the_mediator() -> None:
    session = ready(limits=MediatorLimits(max_connections=1))
    port_id = opened(session)
    request_id, _ = session.connect(port_id, WEB, 22)
    message = "connect TCP 192.168.1.10:22 is not allowed"
    assert feed(session, Err(ErrorCode.NOT_ALLOWED, 1, message, request_id=request_id)) == [
        RequestFailed(request_id, 1, ErrorCode.NOT_ALLOWED, message)
    ]
    assert session.ports[1] == (Proto.TCP, PortState.OPEN)
    connected(session, port_id)  # the failed one no longer counts


def test_listen_and_accepted() -> None:
    session = ready()
    port_id = opened(session)
    assert session.listen(port_id) == (3, out(ListenPort(1, request_id=3)))
    assert feed(session, Ack(request_id=3)) == [RequestAcked(3, 1)]
    assert feed(session, EventAccepted(1, 2, PHONE, 51000)) == [ConnectionAccepted(1, 2, PHONE, 51000)]
    assert session.send(2, PHONE, 51000, b"hi") == out(Data(2, PHONE, 51000, b"hi"))
    assert session.ports == {1: (Proto.TCP, PortState.LISTENING), 2: (Proto.TCP, PortState.CONNECTED)}
    with pytest.raises(LocalProtocolError):
        session.connect(1, WEB, 80)


def test_relay_errors_and_unknown_ids() -> None:
    session = ready()
    assert feed(session, Err(ErrorCode.NOT_ALLOWED, 3, "send UDP 10.9.9.9:53 is not allowed")) == [
        RelayFailed(3, ErrorCode.NOT_ALLOWED, "send UDP 10.9.9.9:53 is not allowed")
    ]
    assert feed(session, Data(9, WEB, 80, b"?")) == out(Err(ErrorCode.NO_SUCH_ID, 9, "no port 9"))


def test_reply_to_no_request_is_unexpected() -> None:
    session = ready()
    assert feed(session, Opened(1, 80, request_id=42)) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "OPENED answers no such request 42"
    )


def test_keepalive_ack_is_never_expected_by_the_server() -> None:
    session = ready()
    assert feed(session, KeepaliveAck(request_id=1)) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "KEEPALIVE_ACK not allowed in READY"
    )


# -- limits (per mediator) -----------------------------------------------------------------


def test_max_ports_counts_requests_in_flight() -> None:
    session = ready(limits=MediatorLimits(max_ports=2))
    session.open_port(Proto.TCP, ME, 8080)
    session.redirect_port(ME, 5004)
    with pytest.raises(LimitError) as info:
        session.open_port(Proto.TCP, ME, 8081)
    assert info.value.code is ErrorCode.LIMIT and str(info.value) == "max_ports 2 reached"


def test_max_pending() -> None:
    session = new_session(limits=MediatorLimits(max_pending=2))
    feed(session, HELLO)  # UDP_KEY is in flight: 1 of 2
    session.open_port(Proto.TCP, ME, 8080)
    with pytest.raises(LimitError):
        session.open_port(Proto.TCP, ME, 8081)


def test_max_connections_closes_the_extra_accepted_connection() -> None:
    session = ready(limits=MediatorLimits(max_connections=1))
    port_id = opened(session)
    request_id, _ = session.listen(port_id)
    feed(session, Ack(request_id=request_id))
    assert feed(session, EventAccepted(1, 2, PHONE, 51000)) == [ConnectionAccepted(1, 2, PHONE, 51000)]
    assert feed(session, EventAccepted(1, 3, PHONE, 51001)) == [
        SendFrame(ClosePort(3, request_id=4)),
        LimitExceeded(3, "max_connections 1 reached"),
    ]
    assert feed(session, Data(3, PHONE, 51001, b"x")) == []
    port2 = opened(session, port=8081, port_id=4)
    with pytest.raises(LimitError):
        session.connect(port2, WEB, 80)


# -- redirect and the UDP channel ------------------------------------------------------------


def mediator_datagram(seq: int, dtype: DatagramType = DatagramType.DATA, data: bytes = b"rtp") -> bytes:
    is_data = dtype is DatagramType.DATA
    datagram = Datagram(dtype, 7, 1, seq, False, PHONE if is_data else None, 40000 if is_data else 0,
                        data if is_data else b"")
    return encode_datagram(datagram, KEY)


def test_redirect_over_the_udp_channel() -> None:
    session = ready()
    assert session.redirect_port(ME, 5004) == (2, out(RedirectPort(ME, 5004, False, request_id=2)))
    assert feed(session, Opened(1, 5004, request_id=2)) == [PortOpened(2, 1, 5004)]
    # No datagram yet: the channel's address is unknown, so DATA goes over TCP.
    assert session.send(1, PHONE, 40000, b"early") == out(Data(1, PHONE, 40000, b"early"))
    keepalive = mediator_datagram(0, DatagramType.KEEPALIVE)
    assert peek_key_id(keepalive) == session.key_id == 7
    ack = encode_datagram(Datagram(DatagramType.KEEPALIVE_ACK, 7, 1, 0, True), KEY)
    assert session.receive_datagram(keepalive, (NAT, 40001), 2.0) == [SendDatagram(NAT, 40001, ack)]
    assert session.receive_datagram(mediator_datagram(1), (NAT, 40001), 2.0) == [
        Received(1, PHONE, 40000, b"rtp")
    ]
    answer = encode_datagram(Datagram(DatagramType.DATA, 7, 1, 1, True, PHONE, 40000, b"answer"), KEY)
    assert session.send(1, PHONE, 40000, b"answer") == [SendDatagram(NAT, 40001, answer)]
    # The NAT moved the mapping: the next authenticated datagram tells us.
    assert session.receive_datagram(mediator_datagram(2), (NAT, 40999), 3.0) == [
        Received(1, PHONE, 40000, b"rtp")
    ]
    [moved] = session.send(1, PHONE, 40000, b"again")
    assert isinstance(moved, SendDatagram) and moved.port == 40999


def test_bad_datagrams_are_dropped_and_counted() -> None:
    session = ready()
    session.redirect_port(ME, 5004)
    feed(session, Opened(1, 5004, request_id=2))
    good = mediator_datagram(5)
    assert session.receive_datagram(good, (NAT, 1), 2.0) != []
    forged = bytearray(mediator_datagram(6))
    forged[30] ^= 0xFF
    reflected = encode_datagram(Datagram(DatagramType.DATA, 7, 1, 7, True, PHONE, 1, b""), KEY)
    other_channel = encode_datagram(Datagram(DatagramType.KEEPALIVE, 7, 9, 8, False), KEY)
    for raw in (good, bytes(forged), reflected, other_channel, b"\x00" * 8):
        assert session.receive_datagram(raw, (NAT, 1), 2.0) == []
    assert session.dropped == {
        DropReason.REPLAY: 1, DropReason.BAD_TAG: 1, DropReason.DIRECTION: 1,
        DropReason.UNKNOWN_CHANNEL: 1, DropReason.MALFORMED: 1,
    }


def test_without_udp_channels_redirect_is_a_local_error() -> None:
    session = new_session(settings=ServerSettings(udp_channels=False))
    assert feed(session, HELLO)[-1] == SessionReady(7, "mediator-7", "web-help", IFACES, 1)
    with pytest.raises(LocalProtocolError):
        session.redirect_port(ME, 5004)


# -- keepalive and dead peer --------------------------------------------------------------------


def test_keepalive_answered_and_dead_mediator() -> None:
    session = ready()  # last frame at 0.5
    assert feed(session, Keepalive(request_id=2), now=25.0) == out(KeepaliveAck(request_id=2))
    assert session.next_deadline() == 100.0
    assert session.tick(99.9) == []
    assert session.tick(100.0) == closed_by_us(ErrorCode.TIMEOUT, "nothing from the mediator for 75 s")
    assert session.next_deadline() is None


def test_dead_peer_uses_the_mediators_interval() -> None:
    session = new_session(settings=ServerSettings(dead_after=2))
    hello = Hello((1,), "mediator-7", b"secret", "", (), 10000, 131072, request_id=1)
    feed(session, hello, now=0.0)
    assert session.next_deadline() == 20.0


# -- closing and misuse -----------------------------------------------------------------------


def test_bye_from_the_mediator() -> None:
    session = ready()
    opened(session)
    assert feed(session, Bye(ErrorCode.NORMAL, "shutting down")) == [
        CloseChannel(), ChannelClosed(ErrorCode.NORMAL, "shutting down", True)
    ]
    assert session.ports == {}
    with pytest.raises(LocalProtocolError):
        session.open_port(Proto.TCP, ME, 80)


def test_local_close() -> None:
    session = ready()
    assert session.close(ErrorCode.NORMAL, "operator") == closed_by_us(ErrorCode.NORMAL, "operator")
    assert session.close() == []


def test_local_misuse() -> None:
    session = new_session()
    with pytest.raises(LocalProtocolError):
        session.open_port(Proto.TCP, ME, 80)  # not READY
    session = ready()
    with pytest.raises(LocalProtocolError):
        session.connect(5, WEB, 80)  # unknown id
    udp = opened(session, Proto.UDP, 5000)
    with pytest.raises(LocalProtocolError):
        session.listen(udp)
    with pytest.raises(LocalProtocolError):
        session.send(udp, WEB, 53, b"x" * 65536)
    with pytest.raises(ValueError):
        ServerSession(0, 0.0)


def test_chunking_does_not_change_the_outcome() -> None:
    frames: list[Frame] = [HELLO, Ack(request_id=1), Keepalive(request_id=2), Data(9, WEB, 1, b"x")]
    raw = b"".join(encode_frame(f) for f in frames)

    def run(chunks: list[bytes]) -> list[object]:
        session = new_session()
        result: list[object] = []
        for chunk in chunks:
            result += session.receive_data(chunk, 1.0)
        return result

    whole = run([raw])
    assert len(whole) == 5
    assert run([raw[i : i + 1] for i in range(len(raw))]) == whole
    for cut in range(len(raw) + 1):
        assert run([raw[:cut], raw[cut:]]) == whole


# -- both cores together ------------------------------------------------------------------------


class Pair:
    """A mediator and a server session wired together, as the I/O layers would.

    The mediator's sockets all work: an ``OpenSocket`` binds the port asked
    for (or 40000 for "any"); other socket commands are recorded in ``done``.
    """

    def __init__(
        self, service: str = "web-help", versions: tuple[int, ...] = (1, 2, 3), **server: object
    ) -> None:
        self.mediator = MediatorCore(
            MediatorIdentity("mediator-7", b"secret", service, IFACES),
            MediatorSettings(versions=versions, keepalive_interval=25.0, dead_after=3),
            policy=AllowList([Rule(ip_network("192.168.1.0/24"))]),
        )
        # ``server``: more of the server's ``ServerSettings``.
        self.server = new_session(settings=ServerSettings(dead_after=3, **server))  # type: ignore[arg-type]
        self.done: list[object] = []
        self.now = 0.0

    def _mediator_io(self, commands: Sequence[object]) -> bytes:
        wire = b""
        for command in commands:
            if isinstance(command, SendFrame):
                wire += command.data
            elif isinstance(command, OpenSocket):
                wire += self._mediator_io(self.mediator.opened(command.port_id, command.port or 40000, self.now))
            else:
                self.done.append(command)
        return wire

    def up(self, commands: Sequence[object]) -> list[object]:
        """Carry out the mediator's ``commands``; the server's outputs."""
        return list(self.server.receive_data(self._mediator_io(commands), self.now))

    def down(self, commands: Sequence[object]) -> list[object]:
        """Send the server's frames to the mediator; the mediator's outputs."""
        wire = b"".join(c.data for c in commands if isinstance(c, SendFrame))
        return list(self.mediator.receive_data(wire, self.now))

    def start(self) -> None:
        events = self.up(self.mediator.channel_up(self.now))
        assert events[-1] == SessionReady(7, "mediator-7", self.mediator.identity.service, IFACES, max(self.mediator.settings.versions))
        assert self.up(self.down(events)) == []  # INIT_OK, UDP_KEY -> ACK
        assert self.mediator.state.value == self.server.state.value == "READY"


def test_both_cores_connect_in_one_round_trip_and_check_a_target() -> None:
    """Version 2 (issue 14): OPEN_CONNECT is one request per new public
    connection, and CHECK_TARGET gives the owner's verdict before a publish."""
    pair = Pair()
    pair.start()
    request_id, commands = pair.server.check_target(Proto.TCP, WEB, 80)
    assert pair.up(pair.down(commands)) == [RequestAcked(request_id, 0)]
    request_id, commands = pair.server.check_target(Proto.UDP, IPv4Address("10.9.9.9"), 53)
    refusal = pair.up(pair.down(commands))
    assert refusal == [RequestFailed(request_id, 0, ErrorCode.NOT_ALLOWED, "send UDP 10.9.9.9:53 is not allowed")]
    request_id, commands = pair.server.open_connect(ME, WEB, 80)
    # One frame down; the mediator binds, then connects, and answers once.
    assert pair.up(pair.down(commands)) == []
    assert pair.done[-1] == ConnectSocket(1, WEB, 80)
    assert pair.up(pair.mediator.connected(1)) == [PortOpened(request_id, 1, 40000)]
    assert pair.server.ports[1] == (Proto.TCP, PortState.CONNECTED)
    assert pair.down(pair.server.send(1, WEB, 80, b"GET /")) == [WriteStream(1, b"GET /")]
    # A failed connect forgets the id on both ends: the server never learnt it.
    request_id, commands = pair.server.open_connect(ME, WEB, 81)
    pair.up(pair.down(commands))
    failed = pair.mediator.failed(2, ErrorCode.CONNECT_FAILED, "refused")
    assert failed[0] == CloseSocket(2)
    assert pair.up(failed) == [RequestFailed(request_id, 0, ErrorCode.CONNECT_FAILED, "refused")]
    assert 2 not in pair.server.ports and 2 not in pair.mediator.ports


def test_version_1_sessions_have_no_open_connect() -> None:
    session = ready()
    assert not session.pipelines_connect
    with pytest.raises(LocalProtocolError):
        session.open_connect(ME, WEB, 80)
    with pytest.raises(LocalProtocolError):
        session.check_target(Proto.TCP, WEB, 80)


def test_both_cores_publish_a_web_server() -> None:
    """`nfgate tunnel publish MEDIATOR --to 192.168.1.10:80`, as the cores see it."""
    pair = Pair()
    pair.start()
    request_id, commands = pair.server.open_port(Proto.TCP, ME, 0)
    assert pair.up(pair.down(commands)) == [PortOpened(request_id, 1, 40000)]
    request_id, commands = pair.server.connect(1, WEB, 80)
    assert pair.down(commands) == [ConnectSocket(1, WEB, 80)]
    assert pair.up(pair.mediator.connected(1)) == [RequestAcked(request_id, 1)]
    assert pair.down(pair.server.send(1, WEB, 80, b"GET / HTTP/1.0\r\n\r\n")) == [
        WriteStream(1, b"GET / HTTP/1.0\r\n\r\n")
    ]
    assert pair.up(pair.mediator.received(1, WEB, 80, b"HTTP/1.0 200 OK\r\n\r\n")) == [
        Received(1, WEB, 80, b"HTTP/1.0 200 OK\r\n\r\n")
    ]
    assert pair.up(pair.mediator.fin(1)) == [PeerFin(1)]
    request_id, commands = pair.server.close_port(1)
    assert pair.up(pair.down(commands)) == [RequestAcked(request_id, 1)]
    assert pair.mediator.ports == pair.server.ports == {}


def test_both_cores_relay_udp_over_a_channel() -> None:
    pair = Pair("voip")
    pair.start()
    request_id, commands = pair.server.redirect_port(ME, 5004, mandatory=True)
    assert pair.up(pair.down(commands)) == [PortOpened(request_id, 1, 5004)]
    [first_keepalive] = [c for c in pair.done if isinstance(c, SendChannel)]
    [ack] = pair.server.receive_datagram(first_keepalive.data, (NAT, 40001), 1.0)
    assert isinstance(ack, SendDatagram) and pair.mediator.receive_datagram(ack.data, 1.0) == []
    [up] = pair.mediator.received(1, PHONE, 40000, b"rtp")
    assert isinstance(up, SendChannel)
    assert pair.server.receive_datagram(up.data, (NAT, 40001), 1.0) == [Received(1, PHONE, 40000, b"rtp")]
    [down] = pair.server.send(1, PHONE, 40000, b"rtp back")
    assert isinstance(down, SendDatagram) and (down.address, down.port) == (NAT, 40001)
    assert pair.mediator.receive_datagram(down.data, 1.0) == [SendTo(1, PHONE, 40000, b"rtp back")]


@pytest.mark.parametrize("size", [65507 - 43, 65507 - 42, 65507])
def test_a_datagram_too_large_for_the_channel_goes_as_a_data_frame(size: int) -> None:
    """A channel datagram is the data plus 43 bytes (IPv4): what does not fit
    in 65507 crosses the TCP channel, both ways, whole (issue 14 F)."""
    pair = Pair("voip")
    pair.start()
    request_id, commands = pair.server.redirect_port(ME, 5004, mandatory=True)
    assert pair.up(pair.down(commands)) == [PortOpened(request_id, 1, 5004)]
    [first_keepalive] = [c for c in pair.done if isinstance(c, SendChannel)]
    [ack] = pair.server.receive_datagram(first_keepalive.data, (NAT, 40001), 1.0)
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    up = pair.mediator.received(1, PHONE, 40000, data)
    down = pair.server.send(1, PHONE, 40000, data)
    if size <= 65507 - 43:
        assert [type(c) for c in up] == [SendChannel] and len(up[0].data) == 65507
        assert [type(c) for c in down] == [SendDatagram] and len(down[0].data) == 65507
        return
    assert pair.up(up) == [Received(1, PHONE, 40000, data)]
    assert pair.down(down) == [SendTo(1, PHONE, 40000, data)]


def test_both_cores_keep_the_channel_alive() -> None:
    pair = Pair()
    pair.start()
    for step in range(1, 9):  # 200 s of idle channel: keepalives keep both ends up
        pair.now = step * 25.0
        assert pair.down(pair.up(pair.mediator.tick(pair.now))) == []  # KEEPALIVE, ACK
        assert pair.server.tick(pair.now) == []
    assert pair.mediator.state.value == pair.server.state.value == "READY"
    pair.now = 300.0  # the server vanished: no ACKs since 200 s
    [bye, close, closed] = pair.mediator.tick(pair.now)
    assert closed == ChannelClosed(ErrorCode.TIMEOUT, "nothing from the server for 75 s", False)


# -- fuzzing: whatever the mediator sends, the session answers or closes ---------------------

ADDRS = st.sampled_from([ME, WEB, IPv6Address("fd00::9")])
IDS = st.integers(0, 5)
RIDS = st.integers(1, 6)
MEDIATOR_FRAMES = st.one_of(
    st.builds(Opened, IDS, st.sampled_from([0, 80, 5004]), request_id=RIDS),
    st.builds(Ack, request_id=RIDS),
    st.builds(Err, st.sampled_from(list(ErrorCode)), IDS, request_id=IDS),
    st.builds(Data, IDS, ADDRS, st.integers(0, 3), st.binary(max_size=8)),
    st.builds(EventAccepted, IDS, IDS, ADDRS, st.integers(0, 3)),
    st.builds(EventFin, IDS),
    st.builds(EventRst, IDS),
    st.builds(Keepalive, request_id=RIDS),
    st.builds(KeepaliveAck, request_id=RIDS),
    st.builds(Hello, st.just((1,)), st.just("m"), st.just(b""), st.just(""), st.just(()),
              st.just(25000), st.just(131072), request_id=RIDS),
    st.builds(Bye, st.sampled_from(list(ErrorCode))),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(MEDIATOR_FRAMES, st.binary(min_size=36, max_size=60)), max_size=25),
    st.integers(0, 5),
)
def test_fuzz_mediator_frames(script: list[Frame | bytes], port_id: int) -> None:
    """Frames in any order, with any ids, and stray datagrams: never an exception."""
    session = ready(limits=MediatorLimits(max_connections=2))
    session.open_port(Proto.TCP, ME, 80)
    session.open_port(Proto.UDP, ME, 53)
    session.redirect_port(ME, 5004)
    for step, item in enumerate(script):
        if isinstance(item, bytes):
            session.receive_datagram(item, (NAT, 1), 1.0 + step)
            continue
        session.receive_data(encode_frame(item), 1.0 + step)
        if session.closed:
            break
        state = session.ports.get(port_id)
        if state == (Proto.TCP, PortState.OPEN):
            session.listen(port_id)
        elif state is not None and state[1] in (PortState.CONNECTED, PortState.REDIRECTED):
            session.send(port_id, WEB, 1, b"x")
        session.tick(1.0 + step)


@given(st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "conn", "clear"]), st.integers(1, 6),
                          st.booleans(), st.booleans()), max_size=60))
def test_the_remotes_count_ports_and_connections_as_a_sum_would(steps: list[tuple[str, int, bool, bool]]) -> None:
    remotes = _Remotes()
    for op, port_id, a, b in steps:
        if op == "set":
            remotes[port_id] = _Remote(port_id, Proto.TCP, PortState.OPEN, is_port=a, connection=b)
        elif op == "del" and port_id in remotes:
            del remotes[port_id]
        elif op == "pop":
            remotes.pop(port_id, None)
        elif op == "conn" and port_id in remotes:
            remotes.set_connection(remotes[port_id], a)
        elif op == "clear":
            remotes.clear()
        assert remotes.port_count == sum(r.is_port for r in remotes.values())
        assert remotes.connection_count == sum(r.connection for r in remotes.values())
