"""Playbooks for the mediation system's core: frames in, commands out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.commands import (
    AbortSocket, ChannelClosed, CloseChannel, CloseSocket, ConnectSocket, ListenSocket,
    OpenSocket, Ready, Refused, RelayFailed, SendChannel, SendFrame, SendTo, ShutdownSocket,
    UdpChannelDead, WriteStream,
)
from tunnel.datagrams import Datagram, DatagramType, DropReason, encode_datagram
from tunnel.errors import ErrorCode, LocalProtocolError
from tunnel.frames import (
    MIN_MAX_FRAME_SIZE, Ack, Bye, ClosePort, ConnectPort, Data, Err, EventAccepted, EventFin,
    EventRst, Frame, Hello, InitErr, InitOk, Keepalive, KeepaliveAck, ListenPort, Opened,
    OpenPort, Proto, RedirectPort, UdpKey, encode_frame,
)
from tunnel.mediator_core import MediatorCore, MediatorIdentity
from tunnel.policy import AllowList, Op, Rule
from tunnel.settings import MediatorSettings
from tunnel.states import MediatorState, PortState

LAN = ip_network("192.168.1.0/24")
ME = IPv4Address("192.168.1.2")
WEB = IPv4Address("192.168.1.10")
PHONE = IPv4Address("192.168.1.50")
OUTSIDE = IPv4Address("10.9.9.9")
KEY = bytes(range(32))
IDENTITY = MediatorIdentity("mediator-7", b"secret", "web-help", (IPv4Interface("192.168.1.2/24"),))
# The owner allows the LAN, every port but 22 (ssh stays private).
POLICY = AllowList([Rule(LAN, 1, 21), Rule(LAN, 23, 65535)])
# The playbooks' timers: version 1's 25 s interval and 3 intervals to a dead peer.
S25 = MediatorSettings(keepalive_interval=25.0, dead_after=3)


def out(*frames: Frame) -> list[SendFrame]:
    return [SendFrame(f) for f in frames]


def feed(core: MediatorCore, *frames: Frame, now: float = 1.0) -> list[object]:
    return list(core.receive_data(b"".join(encode_frame(f) for f in frames), now))


def ready(settings: MediatorSettings | None = None, policy: AllowList | None = POLICY) -> MediatorCore:
    core = MediatorCore(IDENTITY, settings or S25, policy)
    core.channel_up(0.0)
    assert feed(core, InitOk(1, 7, 131072, request_id=1), now=0.5) == [Ready(7, 1)]
    return core


def keyed(settings: MediatorSettings | None = None) -> MediatorCore:
    core = ready(settings)
    assert feed(core, UdpKey(7, KEY, request_id=90)) == out(Ack(request_id=90))
    return core


def open_tcp(core: MediatorCore, port: int = 8080, request_id: int = 2) -> int:
    [command] = feed(core, OpenPort(Proto.TCP, ME, port, False, request_id=request_id))
    assert isinstance(command, OpenSocket)
    assert core.opened(command.port_id, port, 1.0) == out(Opened(command.port_id, port, request_id=request_id))
    return command.port_id


def closed_by_us(code: ErrorCode, message: str, *closes: int) -> list[object]:
    return [
        SendFrame(Bye(code, message)), *[CloseSocket(i) for i in closes],
        CloseChannel(), ChannelClosed(code, message, False),
    ]


# -- init (seed: the mediator informs the server of its environment) -----------


def test_init() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    assert core.state is MediatorState.CONNECTING
    hello = Hello(
        (1, 2, 3, 4, 5), "mediator-7", b"secret", "web-help", (IPv4Interface("192.168.1.2/24"),),
        25000, 131072, request_id=1,
    )
    [send] = core.channel_up(0.0)
    # Before negotiation, in the highest version it speaks.
    assert send == SendFrame(hello, 5) and send.data == encode_frame(hello, 5)
    assert core.state is MediatorState.INIT_SENT and core.next_deadline() == 10.0
    assert feed(core, InitOk(1, 7, 131072, request_id=1), now=0.5) == [Ready(7, 1)]
    assert core.state is MediatorState.READY and core.session_id == 7 and core.version == 1
    assert core.next_deadline() == 25.5


def test_init_refused() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    core.channel_up(0.0)
    assert feed(core, InitErr(ErrorCode.AUTH_FAILED, "unknown identity", (1,), request_id=1)) == [
        CloseChannel(), ChannelClosed(ErrorCode.AUTH_FAILED, "unknown identity", True),
    ]
    assert core.state is MediatorState.CLOSED
    assert feed(core, Keepalive(request_id=5)) == []  # nothing after CLOSED


def test_init_timeout() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    core.channel_up(0.0)
    assert core.tick(9.99) == []
    [bye, *rest] = core.tick(10.0)
    assert bye == SendFrame(Bye(ErrorCode.TIMEOUT, "no INIT_OK in time"), 5)
    assert rest == closed_by_us(ErrorCode.TIMEOUT, "no INIT_OK in time")[1:]


def test_version_mismatch_answered_by_init_err() -> None:
    """A mediator that speaks only a future version 2 meets a v1 server."""
    core = MediatorCore(IDENTITY, MediatorSettings(versions=(2,)), POLICY)
    [hello] = core.channel_up(0.0)
    assert isinstance(hello, SendFrame) and isinstance(hello.frame, Hello)
    assert hello.data[0] == 2 and hello.frame.versions == (2,)
    refusal = InitErr(ErrorCode.UNSUPPORTED_VERSION, "no common version (offered 2)", (1,), request_id=1)
    assert core.receive_data(encode_frame(refusal, version=1), 0.1) == [
        CloseChannel(), ChannelClosed(ErrorCode.UNSUPPORTED_VERSION, "no common version (offered 2)", True),
    ]


def test_server_choosing_a_version_we_do_not_speak() -> None:
    core = MediatorCore(IDENTITY, MediatorSettings(versions=(1, 2)), POLICY)
    core.channel_up(0.0)
    [bye, *rest] = feed(core, InitOk(3, 7, 131072, request_id=1))
    # Nothing is negotiated: the BYE goes out in our highest version.
    assert bye == SendFrame(Bye(ErrorCode.UNSUPPORTED_VERSION, "server chose version 3"), version=2)
    assert rest == closed_by_us(ErrorCode.UNSUPPORTED_VERSION, "server chose version 3")[1:]


def test_frame_in_another_version_after_negotiation() -> None:
    core = ready(MediatorSettings(versions=(1, 2)))
    assert core.receive_data(encode_frame(Keepalive(request_id=4), version=2), 1.0) == closed_by_us(
        ErrorCode.UNSUPPORTED_VERSION, "frame in version 2"
    )


def test_request_before_init_ok_is_unexpected() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    core.channel_up(0.0)
    [bye, *_] = feed(core, OpenPort(Proto.TCP, ME, 80, False, request_id=2))
    assert bye == SendFrame(Bye(ErrorCode.UNEXPECTED_FRAME, "OPEN_PORT not allowed in INIT_SENT"), 5)


# -- open port (seed, "Open port") ------------------------------------------------


def test_open_desired_gets_first_free_port() -> None:
    core = ready()
    assert feed(core, OpenPort(Proto.TCP, ME, 8080, False, request_id=2)) == [
        OpenSocket(1, Proto.TCP, ME, 8080, False, False)
    ]
    assert core.ports == {1: (Proto.TCP, PortState.OPENING)}
    assert core.opened(1, 8081, 1.0) == out(Opened(1, 8081, request_id=2))
    assert core.ports == {1: (Proto.TCP, PortState.OPEN)}


def test_open_mandatory_port_in_use() -> None:
    core = ready()
    assert feed(core, OpenPort(Proto.UDP, ME, 5060, True, request_id=3)) == [
        OpenSocket(1, Proto.UDP, ME, 5060, True, False)
    ]
    assert core.failed(1, ErrorCode.PORT_IN_USE, "5060 is taken") == out(
        Err(ErrorCode.PORT_IN_USE, 0, "5060 is taken", request_id=3)
    )
    assert core.ports == {}


def test_open_mandatory_port_zero_is_a_bad_request() -> None:
    core = ready()
    assert feed(core, OpenPort(Proto.TCP, ME, 0, True, request_id=2)) == out(
        Err(ErrorCode.BAD_REQUEST, 0, "a mandatory port needs a number", request_id=2)
    )


def test_open_refused_by_allow_list() -> None:
    core = ready()
    assert feed(core, OpenPort(Proto.TCP, ME, 22, True, request_id=2)) == [
        Refused(Op.OPEN, ME, 22, Proto.TCP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, 0, "open TCP 192.168.1.2:22 is not allowed", request_id=2)),
    ]


def test_remembered_verdicts_are_the_rules_verdicts_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunnel.policy

    monkeypatch.setattr(tunnel.policy, "VERDICTS", 8)
    rules = [Rule(LAN, 1, 21, ops=frozenset({Op.CONNECT})), Rule(ip_network("fd00::/64"), protos=frozenset({Proto.UDP}))]
    remembering = AllowList(rules)
    asked = [
        (op, address, port, proto)
        for op in (Op.CONNECT, Op.SEND)
        for address in (ME, IPv6Address("::ffff:192.168.1.2"), IPv4Address("10.0.0.1"), IPv6Address("fd00::5"))
        for port in (21, 22)
        for proto in (Proto.TCP, Proto.UDP)
    ]
    for _ in range(2):  # the second round from what it remembers, where it still does
        for question in asked:
            assert remembering.check(*question) == any(
                r.matches(question[0], tunnel.policy._plain(question[1]), *question[2:]) for r in rules
            ), question
            assert len(remembering._ranges) <= 8
    assert remembering.check(Op.CONNECT, IPv6Address("::ffff:192.168.1.2"), 21, Proto.TCP)  # mapped: as the IPv4 address


def test_allows_all_is_every_port_checked_one_by_one() -> None:
    """``allows_all`` (may a connect take any port of a range?) against
    ``check`` of each port, for overlapping, adjacent and gapped rules."""
    open_only = frozenset({Op.OPEN})
    rules = [Rule(LAN, 10, 20, ops=open_only), Rule(LAN, 15, 30, ops=open_only), Rule(LAN, 31, 40, ops=open_only),
             Rule(LAN, 45, 50, ops=open_only)]
    allow = AllowList(rules)
    for first in range(5, 52, 3):
        for last in range(first, 55, 4):
            every = all(allow.check(Op.OPEN, ME, port, Proto.TCP) for port in range(first, last + 1))
            assert allow.allows_all(Op.OPEN, ME, first, last, Proto.TCP) == every, (first, last)
    assert not allow.allows_all(Op.CONNECT, ME, 10, 20, Proto.TCP)
    assert not AllowList([]).allows_all(Op.OPEN, ME, 1, 1, Proto.TCP)


def test_open_any_port_checks_the_assigned_one() -> None:
    core = ready()
    assert feed(core, OpenPort(Proto.TCP, ME, 0, False, request_id=2)) == [
        OpenSocket(1, Proto.TCP, ME, 0, False, False)
    ]
    assert core.opened(1, 22, 1.0) == [
        CloseSocket(1),
        Refused(Op.OPEN, ME, 22, Proto.TCP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, 0, "open TCP 192.168.1.2:22 is not allowed", request_id=2)),
    ]
    assert core.ports == {}


def test_no_policy_refuses_everything() -> None:
    core = ready(policy=None)
    [refused, err] = feed(core, OpenPort(Proto.TCP, ME, 8080, False, request_id=2))
    assert refused == Refused(Op.OPEN, ME, 8080, Proto.TCP)
    assert isinstance(err, SendFrame) and err.frame == Err(
        ErrorCode.NOT_ALLOWED, 0, "open TCP 192.168.1.2:8080 is not allowed", request_id=2
    )


# -- connect, data both ways, FIN, RST, close (seed, "Connect port", relay) ---


def test_connect_and_relay_both_ways() -> None:
    core = ready()
    port_id = open_tcp(core)
    assert feed(core, ConnectPort(port_id, WEB, 80, request_id=3)) == [ConnectSocket(port_id, WEB, 80)]
    assert core.connected(port_id) == out(Ack(request_id=3))
    assert core.ports[port_id] == (Proto.TCP, PortState.CONNECTED)
    assert feed(core, Data(port_id, WEB, 80, b"GET / HTTP/1.0\r\n\r\n")) == [
        WriteStream(port_id, b"GET / HTTP/1.0\r\n\r\n")
    ]
    assert core.received(port_id, WEB, 80, b"HTTP/1.0 200 OK\r\n") == out(
        Data(port_id, WEB, 80, b"HTTP/1.0 200 OK\r\n")
    )
    assert core.fin(port_id) == out(EventFin(port_id))
    assert feed(core, EventFin(port_id)) == [ShutdownSocket(port_id)]
    assert feed(core, Data(port_id, WEB, 80, b"late")) == out(
        Err(ErrorCode.WRONG_STATE, port_id, "cannot data TCP port 1 in CONNECTED")
    )
    assert feed(core, ClosePort(port_id, request_id=4)) == [CloseSocket(port_id), SendFrame(Ack(request_id=4))]
    assert core.ports == {}


def test_data_for_another_peer_is_refused() -> None:
    core = ready()
    port_id = open_tcp(core)
    feed(core, ConnectPort(port_id, WEB, 80, request_id=3))
    core.connected(port_id)
    assert feed(core, Data(port_id, PHONE, 80, b"x")) == out(
        Err(ErrorCode.BAD_REQUEST, port_id, "not this connection's peer")
    )


def test_connection_reset_both_ways() -> None:
    core = ready()
    for port_id, request_id in ((1, 2), (2, 4)):
        assert open_tcp(core, 8080 + port_id, request_id) == port_id
        feed(core, ConnectPort(port_id, WEB, 80, request_id=request_id + 1))
        core.connected(port_id)
    assert core.reset(1) == out(EventRst(1))
    assert core.ports[1] == (Proto.TCP, PortState.RESET)
    assert feed(core, EventRst(2)) == [AbortSocket(2)]
    assert feed(core, Data(2, WEB, 80, b"x")) == out(
        Err(ErrorCode.WRONG_STATE, 2, "cannot data TCP port 2 in RESET")
    )


def test_connect_refused_by_allow_list() -> None:
    core = ready()
    port_id = open_tcp(core)
    assert feed(core, ConnectPort(port_id, OUTSIDE, 80, request_id=3)) == [
        Refused(Op.CONNECT, OUTSIDE, 80, Proto.TCP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, port_id, "connect TCP 10.9.9.9:80 is not allowed", request_id=3)),
    ]
    assert core.ports[port_id] == (Proto.TCP, PortState.OPEN)


def test_connect_failure_leaves_the_port_open() -> None:
    core = ready()
    port_id = open_tcp(core)
    feed(core, ConnectPort(port_id, WEB, 81, request_id=3))
    assert core.failed(port_id, ErrorCode.CONNECT_FAILED, "refused") == out(
        Err(ErrorCode.CONNECT_FAILED, port_id, "refused", request_id=3)
    )
    assert core.ports[port_id] == (Proto.TCP, PortState.OPEN)


@pytest.mark.parametrize(
    ("request_frame", "code", "message"),
    [
        (ConnectPort(9, WEB, 80, request_id=3), ErrorCode.NO_SUCH_ID, "no port 9"),
        (ConnectPort(1, WEB, 0, request_id=3), ErrorCode.BAD_REQUEST, "cannot connect to port 0"),
        # A socket bound to an IPv4 address cannot reach an IPv6 host (issue 17).
        (ConnectPort(1, IPv6Address("fd00::10"), 80, request_id=3), ErrorCode.BAD_REQUEST,
         "cannot connect from IPv4 address 192.168.1.2 to IPv6 address fd00::10"),
        (ListenPort(9, request_id=3), ErrorCode.NO_SUCH_ID, "no port 9"),
        (ClosePort(9, request_id=3), ErrorCode.NO_SUCH_ID, "no port 9"),
    ],
)
def test_refused_requests(request_frame: Frame, code: ErrorCode, message: str) -> None:
    core = ready()
    open_tcp(core)
    port_id = getattr(request_frame, "port_id", 0)
    assert feed(core, request_frame) == out(Err(code, port_id, message, request_id=3))


def test_connect_a_udp_port_is_wrong_state() -> None:
    core = ready()
    feed(core, OpenPort(Proto.UDP, ME, 5000, False, request_id=2))
    core.opened(1, 5000, 1.0)
    assert feed(core, ConnectPort(1, WEB, 80, request_id=3)) == out(
        Err(ErrorCode.WRONG_STATE, 1, "cannot connect UDP port 1 in OPEN", request_id=3)
    )


# -- listen and accepted (seed, "Make server port", "Event relay") ----------------


def test_listen_accept_and_relay() -> None:
    core = ready()
    port_id = open_tcp(core, 8080)
    assert feed(core, ListenPort(port_id, request_id=3)) == [ListenSocket(port_id)]
    assert core.listening(port_id) == out(Ack(request_id=3))
    conn_id, commands = core.accepted(port_id, PHONE, 51000)
    assert conn_id == 2 and commands == out(EventAccepted(port_id, 2, PHONE, 51000))
    assert core.ports == {1: (Proto.TCP, PortState.LISTENING), 2: (Proto.TCP, PortState.CONNECTED)}
    assert core.received(2, PHONE, 51000, b"hello") == out(Data(2, PHONE, 51000, b"hello"))
    assert feed(core, Data(2, PHONE, 51000, b"world")) == [WriteStream(2, b"world")]
    assert feed(core, ConnectPort(port_id, WEB, 80, request_id=4)) == out(
        Err(ErrorCode.WRONG_STATE, 1, "cannot connect TCP port 1 in LISTENING", request_id=4)
    )
    # Closing the listener leaves the accepted connection alone, like sockets.
    assert feed(core, ClosePort(port_id, request_id=5)) == [CloseSocket(1), SendFrame(Ack(request_id=5))]
    assert core.ports == {2: (Proto.TCP, PortState.CONNECTED)}
    assert core.accepted(port_id, PHONE, 51001) == (None, [])


def test_listen_refused_by_allow_list() -> None:
    core = ready(policy=AllowList([Rule(LAN, ops=frozenset({Op.OPEN}))]))
    port_id = open_tcp(core, 8080)
    assert feed(core, ListenPort(port_id, request_id=3)) == [
        Refused(Op.LISTEN, ME, 8080, Proto.TCP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, port_id, "listen TCP 192.168.1.2:8080 is not allowed", request_id=3)),
    ]


def test_close_cancels_the_pending_request() -> None:
    core = ready()
    port_id = open_tcp(core)
    feed(core, ConnectPort(port_id, WEB, 80, request_id=3))
    assert feed(core, ClosePort(port_id, request_id=4)) == [
        SendFrame(Err(ErrorCode.CANCELLED, port_id, "port closed", request_id=3)),
        CloseSocket(port_id),
        SendFrame(Ack(request_id=4)),
    ]
    assert core.connected(port_id) == [CloseSocket(port_id)]  # late result
    assert core.failed(port_id, ErrorCode.CONNECT_FAILED) == []


def test_large_stream_is_cut_to_the_servers_frame_size() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    core.channel_up(0.0)
    feed(core, InitOk(1, 7, MIN_MAX_FRAME_SIZE, request_id=1))
    port_id = open_tcp(core)
    feed(core, ConnectPort(port_id, WEB, 80, request_id=3))
    core.connected(port_id)
    payload = bytes(range(256)) * 800  # 204800 bytes
    frames = core.received(port_id, WEB, 80, payload)
    assert [len(f.data) for f in frames if isinstance(f, SendFrame)] == [MIN_MAX_FRAME_SIZE] * 3 + [
        12 + 11 + (204800 - 3 * 65547)
    ]
    assert b"".join(f.frame.payload for f in frames if isinstance(f, SendFrame) and isinstance(f.frame, Data)) == payload


# -- UDP ports and redirect (seed, "Redirect port") ----------------------------------


def server_datagram(seq: int, dtype: DatagramType = DatagramType.DATA, address: IPv4Address = PHONE) -> bytes:
    datagram = Datagram(dtype, 7, 1, seq, True, address if dtype is DatagramType.DATA else None,
                        40000 if dtype is DatagramType.DATA else 0,
                        b"answer" if dtype is DatagramType.DATA else b"")
    return encode_datagram(datagram, KEY)


def channel(seq: int, dtype: DatagramType = DatagramType.KEEPALIVE, **kw: object) -> SendChannel:
    datagram = Datagram(dtype, 7, 1, seq, False, **kw)  # type: ignore[arg-type]
    return SendChannel(1, encode_datagram(datagram, KEY))


def test_udp_port_relays_over_the_tcp_channel() -> None:
    core = ready()
    feed(core, OpenPort(Proto.UDP, ME, 5000, False, request_id=2))
    core.opened(1, 5000, 1.0)
    assert core.received(1, PHONE, 40000, b"query") == out(Data(1, PHONE, 40000, b"query"))
    assert feed(core, Data(1, PHONE, 40000, b"reply")) == [SendTo(1, PHONE, 40000, b"reply")]
    assert feed(core, Data(1, OUTSIDE, 53, b"leak")) == [
        Refused(Op.SEND, OUTSIDE, 53, Proto.UDP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, 1, "send UDP 10.9.9.9:53 is not allowed")),
    ]


def test_redirect_needs_a_udp_key() -> None:
    core = ready()
    assert feed(core, RedirectPort(ME, 5004, False, request_id=2)) == out(
        Err(ErrorCode.WRONG_STATE, 0, "no UDP_KEY yet: no UDP channel", request_id=2)
    )


def test_redirect_relays_over_a_udp_channel() -> None:
    core = keyed()
    assert feed(core, RedirectPort(ME, 5004, False, request_id=2)) == [
        OpenSocket(1, Proto.UDP, ME, 5004, False, True)
    ]
    assert core.opened(1, 5004, 2.0) == [SendFrame(Opened(1, 5004, request_id=2)), channel(0)]
    assert core.ports == {1: (Proto.UDP, PortState.REDIRECTED)}
    assert core.received(1, PHONE, 40000, b"rtp") == [
        channel(1, DatagramType.DATA, address=PHONE, port=40000, data=b"rtp")
    ]
    assert core.receive_datagram(server_datagram(0), 3.0) == [SendTo(1, PHONE, 40000, b"answer")]
    assert core.receive_datagram(server_datagram(0), 3.0) == []  # replayed
    assert core.receive_datagram(server_datagram(1, DatagramType.KEEPALIVE_ACK), 3.0) == []
    forged = bytearray(server_datagram(2))
    forged[-1] ^= 1
    assert core.receive_datagram(bytes(forged), 3.0) == []
    assert core.receive_datagram(server_datagram(3, address=OUTSIDE), 3.0) == [
        Refused(Op.SEND, OUTSIDE, 40000, Proto.UDP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, 1, "send UDP 10.9.9.9:40000 is not allowed")),
    ]
    assert core.dropped == {DropReason.REPLAY: 1, DropReason.BAD_TAG: 1}


def test_redirect_refused_by_allow_list() -> None:
    core = keyed()
    assert feed(core, RedirectPort(ME, 22, True, request_id=2)) == [
        Refused(Op.REDIRECT, ME, 22, Proto.UDP),
        SendFrame(Err(ErrorCode.NOT_ALLOWED, 0, "redirect UDP 192.168.1.2:22 is not allowed", request_id=2)),
    ]


def test_datagrams_dropped_without_key_or_channel() -> None:
    core = ready()
    assert core.receive_datagram(server_datagram(0), 1.0) == []
    feed(core, UdpKey(7, KEY, request_id=90))
    assert core.receive_datagram(server_datagram(0), 1.0) == []  # channel 1 not redirected
    assert core.receive_datagram(b"\x01" * 10, 1.0) == []
    assert core.dropped == {
        DropReason.UNKNOWN_KEY: 1, DropReason.UNKNOWN_CHANNEL: 1, DropReason.MALFORMED: 1
    }


def test_bad_udp_key_is_refused() -> None:
    core = ready()
    assert feed(core, UdpKey(7, b"short", request_id=90)) == out(
        Err(ErrorCode.BAD_REQUEST, 0, "a UDP key is 32 bytes", request_id=90)
    )


# -- limits ---------------------------------------------------------------------------


def test_max_ports() -> None:
    core = ready(MediatorSettings(max_ports=2))
    port_id = open_tcp(core, 8080)
    feed(core, ListenPort(port_id, request_id=3))
    core.listening(port_id)
    assert open_tcp(core, 8081, request_id=4) == 2
    assert feed(core, OpenPort(Proto.TCP, ME, 8082, False, request_id=5)) == out(
        Err(ErrorCode.LIMIT, 0, "max_ports 2 reached", request_id=5)
    )
    assert core.accepted(port_id, PHONE, 51000) == (None, [])
    assert core.accepts_refused == 1


def test_max_pending() -> None:
    core = ready(MediatorSettings(max_pending=1))
    feed(core, OpenPort(Proto.TCP, ME, 8080, False, request_id=2))
    assert feed(core, OpenPort(Proto.TCP, ME, 8081, False, request_id=3)) == out(
        Err(ErrorCode.LIMIT, 0, "max_pending 1 reached", request_id=3)
    )


def test_reused_pending_request_id_is_a_protocol_error() -> None:
    core = ready()
    feed(core, OpenPort(Proto.TCP, ME, 8080, False, request_id=2))
    assert feed(core, OpenPort(Proto.TCP, ME, 8081, False, request_id=2)) == closed_by_us(
        ErrorCode.BAD_REQUEST, "request id 2 is still pending", 1
    )


# -- maintain channel (seed, "3. Maintain channel") ---------------------------------------


def test_keepalive_due_and_dead_peer() -> None:
    core = ready()  # READY at 0.5
    assert core.tick(25.4) == []
    assert core.tick(25.5) == out(Keepalive(request_id=2))
    assert core.next_deadline() == 50.5
    assert feed(core, KeepaliveAck(request_id=2), now=26.0) == []
    assert core.tick(50.5) == out(Keepalive(request_id=3))
    assert core.tick(75.5) == out(Keepalive(request_id=4))  # no ACK to 3 yet: tolerated
    assert core.next_deadline() == 100.5
    assert core.tick(100.5) == out(Keepalive(request_id=5))
    assert core.next_deadline() == 101.0  # 26.0 + 3 * 25
    assert core.tick(101.0) == closed_by_us(ErrorCode.TIMEOUT, "nothing from the server for 75 s")
    assert core.next_deadline() is None


def test_keepalive_interval_is_configurable() -> None:
    core = ready(MediatorSettings(keepalive_interval=10.0, dead_after=2))
    assert core.tick(10.5) == out(Keepalive(request_id=2))
    assert core.tick(20.5) == closed_by_us(ErrorCode.TIMEOUT, "nothing from the server for 20 s")


def test_any_frame_proves_the_server_alive() -> None:
    core = ready()
    feed(core, Keepalive(request_id=9), now=70.0)
    assert core.tick(75.5) == out(Keepalive(request_id=2))


def test_udp_channel_keepalive_and_dead_channel() -> None:
    core = keyed()  # READY at 0.5: TCP keepalives at 25.5, 50.5, ...
    feed(core, RedirectPort(ME, 5004, False, request_id=2))
    assert core.opened(1, 5004, 2.0)[1] == channel(0)  # channel keepalives at 27, 52, ...
    assert feed(core, Keepalive(request_id=50), now=20.0) == out(KeepaliveAck(request_id=50))
    assert core.next_deadline() == 25.5
    assert core.tick(25.5) == out(Keepalive(request_id=2))
    assert core.next_deadline() == 27.0
    assert core.tick(27.0) == [channel(1)]
    assert core.receive_datagram(server_datagram(0, DatagramType.KEEPALIVE_ACK), 27.5) == []
    feed(core, KeepaliveAck(request_id=2), now=50.0)
    assert core.tick(50.5) == out(Keepalive(request_id=3))
    assert core.tick(52.0) == [channel(2)]
    feed(core, KeepaliveAck(request_id=3), now=75.5)
    assert core.tick(75.5) == out(Keepalive(request_id=4))
    assert core.tick(77.0) == [channel(3)]
    feed(core, KeepaliveAck(request_id=4), now=100.5)
    assert core.tick(100.5) == out(Keepalive(request_id=5))
    assert core.next_deadline() == 102.0
    assert core.tick(102.0) == [channel(4)]
    # No datagram from the server since 27.5: dead at 27.5 + 3 * 25, re-armed.
    assert core.next_deadline() == 102.5
    assert core.tick(102.5) == [UdpChannelDead(1)]
    assert core.next_deadline() == 125.5


def test_unanswered_keepalives_are_remembered_up_to_dead_after() -> None:
    core = ready()
    for step in range(1, 5):  # the server talks, but never answers: ids 2..5
        feed(core, Keepalive(request_id=100 + step), now=25.0 * step)
        assert core.tick(25.0 * step + 0.5) == out(Keepalive(request_id=step + 1))
    assert feed(core, KeepaliveAck(request_id=3), now=101.0) == []
    # Id 2 was forgotten: its answer is late, not a protocol error (issue 14 B).
    assert feed(core, KeepaliveAck(request_id=2), now=101.0) == []
    assert core.late_keepalive_acks == 1 and core.state is MediatorState.READY
    # The HELLO's id, and an id never issued, are still protocol errors.
    assert feed(core, KeepaliveAck(request_id=1), now=101.0) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "KEEPALIVE_ACK for no KEEPALIVE"
    )


def test_server_keepalive_is_answered() -> None:
    core = ready()
    assert feed(core, Keepalive(request_id=77)) == out(KeepaliveAck(request_id=77))


def test_server_reports_a_relay_it_could_not_take() -> None:
    core = ready()
    assert feed(core, Err(ErrorCode.NO_SUCH_ID, 4, "no port 4")) == [
        RelayFailed(4, ErrorCode.NO_SUCH_ID, "no port 4")
    ]
    assert feed(core, Err(ErrorCode.LIMIT, 0, "?", request_id=1)) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "ERR answers no request of ours"
    )


def test_unknown_keepalive_ack_is_unexpected() -> None:
    core = ready()
    assert feed(core, KeepaliveAck(request_id=77)) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "KEEPALIVE_ACK for no KEEPALIVE"
    )


# -- containment (issue 14 A): a peer that resets at every step --------------------


@pytest.mark.parametrize("step", ["opening", "connecting", "connected", "fin_out", "fin_in", "both_fins"])
def test_a_connection_reset_at_any_step_ends_only_that_connection(step: str) -> None:
    """The private end fails at each step of a connection's life while the
    server's frames for it are still in flight: each is answered for that
    port (ERR or ACK), never with BYE, and a second connection relays on."""
    core = ready()
    other = open_tcp(core, 9090, request_id=50)
    feed(core, ConnectPort(other, WEB, 80, request_id=51))
    core.connected(other)
    [opening] = feed(core, OpenPort(Proto.TCP, ME, 8080, False, request_id=2))
    assert isinstance(opening, OpenSocket)
    port_id = opening.port_id
    if step == "opening":
        assert core.failed(port_id, ErrorCode.INTERNAL, "reset") == out(Err(ErrorCode.INTERNAL, 0, "reset", request_id=2))
    else:
        core.opened(port_id, 8080, 1.0)
        feed(core, ConnectPort(port_id, WEB, 80, request_id=3))
        if step == "connecting":
            core.failed(port_id, ErrorCode.CONNECT_FAILED, "reset")
        else:
            core.connected(port_id)
            if step in ("fin_out", "both_fins"):
                core.fin(port_id)
            if step in ("fin_in", "both_fins"):
                feed(core, EventFin(port_id))
            core.reset(port_id)
    in_flight = (Data(port_id, WEB, 80, b"late"), EventFin(port_id), EventRst(port_id))
    for frame in in_flight:
        for answer in feed(core, frame):
            assert isinstance(answer, SendFrame) and isinstance(answer.frame, Err)
            assert answer.frame.port_id == port_id
    answers = feed(core, ClosePort(port_id, request_id=7))
    assert all(isinstance(a, (SendFrame, CloseSocket)) and not isinstance(getattr(a, "frame", None), Bye)
               for a in answers)
    assert core.state is MediatorState.READY
    assert feed(core, Data(other, WEB, 80, b"still here")) == [WriteStream(other, b"still here")]


# -- closing -------------------------------------------------------------------------------


def test_server_bye_closes_every_socket() -> None:
    core = ready()
    open_tcp(core, 8080, 2)
    open_tcp(core, 8081, 3)
    assert feed(core, Bye(ErrorCode.NORMAL, "maintenance")) == [
        CloseSocket(1), CloseSocket(2), CloseChannel(), ChannelClosed(ErrorCode.NORMAL, "maintenance", True),
    ]
    assert core.state is MediatorState.CLOSED and core.ports == {}
    assert core.opened(1, 8080, 5.0) == [CloseSocket(1)]


def test_malformed_bytes_get_bye_and_close() -> None:
    core = ready()
    open_tcp(core)
    assert core.receive_data(b"\x01\x7f\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 1.0) == closed_by_us(
        ErrorCode.UNKNOWN_FRAME, "frame type 0x7f", 1
    )


def test_frame_the_mediator_never_receives_is_unexpected() -> None:
    core = ready()
    assert feed(core, EventAccepted(1, 2, PHONE, 1)) == closed_by_us(
        ErrorCode.UNEXPECTED_FRAME, "EVENT_ACCEPTED not allowed in READY"
    )


def test_local_close_and_channel_lost() -> None:
    core = ready()
    open_tcp(core)
    assert core.close() == [
        SendFrame(Bye(ErrorCode.NORMAL, "")), CloseSocket(1), CloseChannel(),
        ChannelClosed(ErrorCode.NORMAL, "", False),
    ]
    other = ready()
    assert other.channel_lost() == [CloseChannel(), ChannelClosed(None, "channel lost", True)]
    assert other.close() == []


def test_local_misuse_raises() -> None:
    core = MediatorCore(IDENTITY, S25, POLICY)
    with pytest.raises(LocalProtocolError):
        core.receive_data(b"", 0.0)
    core = ready()
    with pytest.raises(LocalProtocolError):
        core.opened(42, 80, 1.0)
    port_id = open_tcp(core)
    with pytest.raises(LocalProtocolError):
        core.connected(port_id)  # no connect pending
    with pytest.raises(LocalProtocolError):
        core.accepted(port_id, PHONE, 1)  # not listening


# -- fed whole, byte by byte, split at every offset --------------------------------------


def script() -> bytes:
    frames: list[Frame] = [
        InitOk(1, 7, 131072, request_id=1),
        UdpKey(7, KEY, request_id=2),
        OpenPort(Proto.TCP, ME, 8080, False, request_id=3),
        OpenPort(Proto.UDP, IPv6Address("fd00::2"), 0, False, request_id=4),
        Keepalive(request_id=5),
        ClosePort(9, request_id=6),
    ]
    return b"".join(encode_frame(f) for f in frames)


def run(chunks: list[bytes]) -> list[object]:
    core = MediatorCore(IDENTITY, S25, POLICY)
    core.channel_up(0.0)
    result: list[object] = []
    for chunk in chunks:
        result += core.receive_data(chunk, 1.0)
    return result


def test_chunking_does_not_change_the_outcome() -> None:
    raw = script()
    whole = run([raw])
    assert len(whole) == 6
    assert run([raw[i : i + 1] for i in range(len(raw))]) == whole
    for cut in range(len(raw) + 1):
        assert run([raw[:cut], raw[cut:]]) == whole, cut


# -- fuzzing: whatever the server sends, the core answers or closes ------------------------

ADDRS = st.sampled_from([ME, WEB, OUTSIDE, IPv6Address("fd00::2")])
IDS = st.integers(0, 4)
RIDS = st.integers(1, 4)  # requests and replies need an id
PORTS = st.sampled_from([0, 22, 80, 8080])
SERVER_FRAMES = st.one_of(
    st.builds(OpenPort, st.sampled_from(list(Proto)), ADDRS, PORTS, st.booleans(), request_id=RIDS),
    st.builds(RedirectPort, ADDRS, PORTS, st.booleans(), request_id=RIDS),
    st.builds(ConnectPort, IDS, ADDRS, PORTS, request_id=RIDS),
    st.builds(ListenPort, IDS, request_id=RIDS),
    st.builds(ClosePort, IDS, request_id=RIDS),
    st.builds(UdpKey, IDS, st.sampled_from([KEY, b"short"]), request_id=RIDS),
    st.builds(Data, IDS, ADDRS, PORTS, st.binary(max_size=8)),
    st.builds(EventFin, IDS),
    st.builds(EventRst, IDS),
    st.builds(Keepalive, request_id=RIDS),
    st.builds(KeepaliveAck, request_id=RIDS),
    st.builds(Err, st.sampled_from(list(ErrorCode)), IDS, request_id=IDS),
    st.builds(EventAccepted, IDS, IDS, ADDRS, PORTS),
    st.builds(InitOk, st.integers(1, 2), IDS, st.just(131072), request_id=RIDS),
    st.builds(Bye, st.sampled_from(list(ErrorCode))),
)


def carry_out(core: MediatorCore, commands: list[object], succeed: bool) -> None:
    """A fake I/O layer: report a result for every socket command."""
    for command in commands:
        if isinstance(command, OpenSocket):
            if succeed:
                carry_out(core, core.opened(command.port_id, command.port or 40000, 2.0), succeed)
            else:
                carry_out(core, core.failed(command.port_id, ErrorCode.PORT_IN_USE), succeed)
        elif isinstance(command, ConnectSocket):
            carry_out(core, core.connected(command.port_id), succeed)
        elif isinstance(command, ListenSocket):
            carry_out(core, core.listening(command.port_id), succeed)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(SERVER_FRAMES, st.booleans()), max_size=25), st.integers(0, 4))
def test_fuzz_server_frames(script: list[tuple[Frame, bool]], socket_event_id: int) -> None:
    """Valid frames in any order, with any ids: never an exception."""
    core = ready(policy=AllowList([Rule(LAN), Rule(ip_network("fd00::/64"))]))
    for step, (frame, succeed) in enumerate(script):
        carry_out(core, core.receive_data(encode_frame(frame), 1.0 + step), succeed)
        if core.closed:
            break
        record = core.ports.get(socket_event_id)
        if record == (Proto.TCP, PortState.CONNECTED):
            core.received(socket_event_id, WEB, 80, b"x")
            core.fin(socket_event_id)
        elif record == (Proto.TCP, PortState.LISTENING):
            core.accepted(socket_event_id, PHONE, 5)
        core.tick(1.0 + step)
