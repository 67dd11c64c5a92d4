"""Version 4's streams (OPEN_STREAM, docs/tunnel-protocol.md sections 6.2 and 10), on both cores.

Playbooks: the exact frames and commands each step gives. The server names
a new public connection's stream and sends its first bytes and its FIN
before the OPENED; both FINs, or one RST, release the id on both ends
without CLOSE and ACK. Hostile and unlucky peers: a stream reset at every
step from either end, DATA for an id never opened or already released, an
id that is not the server's to choose, more bytes before the OPENED than
the window allows; each ends that stream at most, never the channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tunnel.test_server_core import ME, WEB, Pair
from tunnel.commands import (
    AbortSocket, ChannelClosed, CloseSocket, ConnectSocket, OpenSocket, PauseReading, PeerFin, PeerReset,
    PortOpened, Received, RelayFailed, RequestAcked, RequestFailed, ResumeReading, SendFrame, ShutdownSocket,
    WriteStream,
)
from tunnel.errors import ErrorCode, LocalProtocolError
from tunnel.frames import (
    STREAM_ID_BASE, Bye, ClosePort, Data, Err, EventFin, EventRst, FrameType, Opened, OpenStream, WindowUpdate,
    encode_frame,
)
from tunnel.window import GRANT_AT, STREAM_WINDOW

V4 = (1, 2, 3, 4)
PEER = (WEB, 80)
S1 = STREAM_ID_BASE  # the server's first stream id


def pair4() -> Pair:
    pair = Pair(versions=V4)
    pair.start()
    assert pair.server.version == pair.mediator.version == 4
    return pair


def frames(outputs: Sequence[object]) -> list[object]:
    return [o.frame for o in outputs if isinstance(o, SendFrame)]


def wire(*items: object) -> bytes:
    return b"".join(encode_frame(f, 4) for f in items)  # type: ignore[arg-type]


def open_stream(pair: Pair) -> tuple[int, int]:
    """OPEN_STREAM down, the mediator binds and starts connecting: (request id, stream id)."""
    request_id, port_id, commands = pair.server.open_stream(ME, *PEER)
    assert pair.up(pair.down(commands)) == []
    assert pair.done[-1] == ConnectSocket(port_id, *PEER)
    return request_id, port_id


def released(pair: Pair, port_id: int) -> bool:
    return port_id not in pair.server.ports and port_id not in pair.mediator.ports


def channel_up(pair: Pair) -> bool:
    return pair.server.state.value == pair.mediator.state.value == "READY"


def test_the_first_bytes_and_fin_go_before_the_opened_and_both_fins_release_the_id() -> None:
    pair = pair4()
    request_id, port_id, commands = pair.server.open_stream(ME, *PEER)
    assert port_id == S1 and pair.server.ports[S1][1].value == "CONNECTED"
    # The request, the client's bytes and its FIN leave together, before any answer.
    commands += pair.server.send(S1, *PEER, b"GET / HTTP/1.0\r\n\r\n") + pair.server.fin(S1)
    assert [f.TYPE for f in frames(commands)] == [FrameType.OPEN_STREAM, FrameType.DATA, FrameType.EVENT_FIN]
    out = pair.down(commands)
    assert [type(o) for o in out] == [OpenSocket]
    assert pair.up(out) == [] and pair.done[-1] == ConnectSocket(S1, *PEER)
    # Connected: what came before the OPENED and the FIN go to the target, then the OPENED.
    out = pair.mediator.connected(S1)
    assert out[:-1] == [WriteStream(S1, b"GET / HTTP/1.0\r\n\r\n"), ShutdownSocket(S1)]
    assert out[-1].hold  # the server relays without it: it may wait for the target's first bytes
    assert pair.up(out[-1:]) == [PortOpened(request_id, S1, 40000)]
    assert pair.up(pair.mediator.received(S1, *PEER, b"HTTP/1.0 200 OK\r\n\r\n")) == [
        Received(S1, *PEER, b"HTTP/1.0 200 OK\r\n\r\n"),
    ]
    # The target's FIN: the last of the four; both ends let the id go, no CLOSE, no ACK.
    out = pair.mediator.fin(S1)
    assert out == [SendFrame(EventFin(S1), 4), CloseSocket(S1)]
    assert pair.up(out) == [PeerFin(S1)]
    assert released(pair, S1) and pair.server.ports == pair.mediator.ports == {}


def test_the_window_counts_bytes_sent_before_the_opened() -> None:
    """Credit: the server's window runs from its request, the mediator's from
    receiving it; bytes held before the connect are given back once written."""
    pair = pair4()
    request_id, port_id, commands = pair.server.open_stream(ME, *PEER)
    data = bytes(range(256)) * 1100  # 281600 bytes: more than a window
    sent = pair.server.send(S1, *PEER, data)
    assert sent[-1] == PauseReading(S1)
    pair.up(pair.down(commands + sent[:-1]))
    [write, opened] = pair.mediator.connected(S1)
    assert write == WriteStream(S1, data[:STREAM_WINDOW])
    assert pair.up([opened]) == [PortOpened(request_id, S1, 40000)]
    # The private host's socket took it all: credit back in pieces, and the rest goes.
    [update, *_] = pair.mediator.consumed(S1, STREAM_WINDOW)
    assert update == SendFrame(WindowUpdate(S1, STREAM_WINDOW), 4)
    out = pair.up([update])
    assert out[-1] == ResumeReading(S1)
    assert pair.down(out[:-1]) == [WriteStream(S1, data[STREAM_WINDOW:])]
    assert pair.mediator.consumed(S1, GRANT_AT - 1) == []


def test_data_after_the_servers_fin_is_refused_before_the_opened_too() -> None:
    pair = pair4()
    open_stream(pair)
    out = pair.mediator.receive_data(wire(EventFin(S1), Data(S1, *PEER, b"late")), 1.0)
    assert frames(out) == [Err(ErrorCode.WRONG_STATE, S1, f"cannot data stream {S1} after its FIN")]
    assert pair.mediator.connected(S1)[:-1] == [ShutdownSocket(S1)] and channel_up(pair)


def test_more_than_a_window_before_the_opened_is_a_protocol_error() -> None:
    pair = pair4()
    open_stream(pair)
    chunk = b"x" * 65536
    assert pair.mediator.receive_data(wire(*[Data(S1, *PEER, chunk)] * 4), 1.0) == []  # exactly the window
    [bye, *rest] = pair.mediator.receive_data(wire(Data(S1, *PEER, b"x")), 1.0)
    assert bye == SendFrame(Bye(ErrorCode.BAD_REQUEST, f"DATA past port {S1}'s window"), 4)
    assert isinstance(rest[-1], ChannelClosed)


def test_a_reset_before_the_opened_cancels_the_request_and_frees_the_id() -> None:
    pair = pair4()
    request_id, _ = open_stream(pair)
    out = pair.down(pair.server.send(S1, *PEER, b"GET") + pair.server.reset(S1))
    assert out == [CloseSocket(S1), SendFrame(Err(ErrorCode.CANCELLED, S1, "reset by the server", request_id=request_id), 4)]
    assert pair.up(out) == [RequestFailed(request_id, S1, ErrorCode.CANCELLED, "reset by the server")]
    assert released(pair, S1) and channel_up(pair)
    # The connect that was under way finds the id gone: its socket is closed.
    assert pair.mediator.connected(S1) == [CloseSocket(S1)]


def test_an_opened_that_crosses_the_servers_reset_still_frees_the_id_on_both_ends() -> None:
    pair = pair4()
    request_id, _ = open_stream(pair)
    opened = pair.mediator.connected(S1)  # on its way up...
    reset = pair.server.reset(S1)  # ...while the server's RST goes down
    assert pair.down(reset) == [AbortSocket(S1), CloseSocket(S1)]
    assert pair.up(opened) == [PortOpened(request_id, S1, 40000)]
    assert released(pair, S1) and channel_up(pair)


@pytest.mark.parametrize("who", ["server", "mediator"])
def test_an_rst_releases_the_id_without_close(who: str) -> None:
    pair = pair4()
    request_id, _ = open_stream(pair)
    pair.up(pair.mediator.connected(S1))
    if who == "server":
        assert pair.down(pair.server.reset(S1)) == [AbortSocket(S1), CloseSocket(S1)]
    else:
        out = pair.mediator.reset(S1)
        assert out == [SendFrame(EventRst(S1), 4), CloseSocket(S1)]
        assert pair.up(out) == [PeerReset(S1)]
    assert released(pair, S1) and channel_up(pair)
    # Both RSTs crossing each other: each end ignores the other's.
    assert pair.server.receive_data(wire(EventRst(S1)), 2.0) == []
    assert pair.mediator.receive_data(wire(EventRst(S1)), 2.0) == []


# The steps of one stream's life; ``reset_at_every_step`` resets it after each.
STEPS = ("open", "data_down", "fin_down", "opened", "data_up", "fin_up")


def _walk(pair: Pair, until: str) -> int:
    request_id, port_id, commands = pair.server.open_stream(ME, *PEER)
    if until == "open":
        pair.up(pair.down(commands))
        return request_id
    commands += pair.server.send(port_id, *PEER, b"request")
    if until == "data_down":
        pair.up(pair.down(commands))
        return request_id
    commands += pair.server.fin(port_id)
    pair.up(pair.down(commands))
    if until == "fin_down":
        return request_id
    assert pair.up(pair.mediator.connected(port_id))[0] == PortOpened(request_id, port_id, 40000)
    if until == "opened":
        return request_id
    pair.up(pair.mediator.received(port_id, *PEER, b"answer"))
    return request_id


@pytest.mark.parametrize("who", ["server", "mediator"])
@pytest.mark.parametrize("step", STEPS[:-1])
def test_a_stream_reset_at_every_step_ends_that_stream_only(step: str, who: str) -> None:
    """Containment (issue 14 A) for version 4: whichever end resets, at
    whichever step, the id is freed on both ends and the channel, and a
    stream beside it, go on."""
    pair = pair4()
    request_id, other, commands = pair.server.open_stream(ME, *PEER)
    pair.up(pair.down(commands))
    pair.up(pair.mediator.connected(other))
    _walk(pair, step)
    mine = STREAM_ID_BASE + 1
    connected = mine in pair.mediator.ports and pair.mediator.ports[mine][1].value == "CONNECTED"
    if who == "server" or not connected:
        pair.up(pair.down(pair.server.reset(mine)))
    else:
        pair.down(pair.up(pair.mediator.reset(mine)))
    # A connect still under way for it finds it gone.
    if step in ("open", "data_down", "fin_down"):
        assert pair.mediator.connected(mine) == [CloseSocket(mine)]
    assert released(pair, mine) and channel_up(pair)
    assert pair.down(pair.server.send(other, *PEER, b"still here")) == [WriteStream(other, b"still here")]
    assert pair.up(pair.mediator.received(other, *PEER, b"and here")) == [Received(other, *PEER, b"and here")]


def test_data_for_an_id_never_opened_or_released_ends_nothing_but_that() -> None:
    pair = pair4()
    open_stream(pair)
    pair.up(pair.mediator.connected(S1))
    never = STREAM_ID_BASE + 99
    # The server's DATA (and FIN) for a stream the mediator never saw: ERR per frame, request id 0.
    assert frames(pair.mediator.receive_data(wire(Data(never, *PEER, b"x"), EventFin(never)), 2.0)) == [
        Err(ErrorCode.NO_SUCH_ID, never, f"no port {never}"), Err(ErrorCode.NO_SUCH_ID, never, f"no port {never}"),
    ]
    # The mediator's DATA for an id the server released: ERR, which ends the
    # mediator's side of it if it still had one.
    pair.down(pair.server.reset(S1))
    assert frames(pair.server.receive_data(wire(Data(S1, *PEER, b"late")), 2.0)) == [
        Err(ErrorCode.NO_SUCH_ID, S1, f"no port {S1}"),
    ]
    assert pair.mediator.receive_data(wire(Err(ErrorCode.NO_SUCH_ID, S1, "gone")), 2.0) == [
        RelayFailed(S1, ErrorCode.NO_SUCH_ID, "gone"),
    ]
    assert pair.server.receive_data(wire(Err(ErrorCode.NO_SUCH_ID, never, "gone")), 2.0) == [
        RelayFailed(never, ErrorCode.NO_SUCH_ID, "gone"),
    ]
    assert channel_up(pair)


@pytest.mark.parametrize("port_id", [5, STREAM_ID_BASE - 1, S1])
def test_an_open_stream_on_an_id_not_the_servers_to_choose_is_refused(port_id: int) -> None:
    """The lower half is the mediator's (and S1 is in use): ERR, the channel stays."""
    pair = pair4()
    open_stream(pair)
    out = pair.mediator.receive_data(wire(OpenStream(port_id, ME, *PEER, request_id=40)), 2.0)
    assert frames(out) == [
        Err(ErrorCode.BAD_REQUEST, 0, f"stream id {port_id} is not the server's or is taken", request_id=40),
    ]
    assert S1 in pair.mediator.ports and channel_up(pair)


def test_close_still_ends_a_stream_before_or_after_its_opened() -> None:
    pair = pair4()
    request_id, _ = open_stream(pair)
    close_id, commands = pair.server.close_port(S1)
    out = pair.down(commands)
    assert out[0] == SendFrame(Err(ErrorCode.CANCELLED, S1, "port closed", request_id=request_id), 4)
    assert pair.up(out) == [
        RequestFailed(request_id, S1, ErrorCode.CANCELLED, "port closed"), RequestAcked(close_id, S1),
    ]
    assert released(pair, S1)


def test_ids_the_mediator_chooses_stay_below_the_servers() -> None:
    pair = pair4()
    request_id, commands = pair.server.open_connect(ME, *PEER)  # OPEN_CONNECT: the mediator's id
    pair.up(pair.down(commands))
    assert pair.up(pair.mediator.connected(1)) == [PortOpened(request_id, 1, 40000)]
    assert 1 < STREAM_ID_BASE


def test_a_version_3_peer_gets_version_3_and_close() -> None:
    """Both ends still speak 1 to 3: against a version-3 mediator the server
    chooses 3, has no OPEN_STREAM, and ends a connection with CLOSE."""
    pair = Pair(versions=(1, 2, 3))
    pair.start()
    assert pair.server.version == 3 and not pair.server.opens_streams
    with pytest.raises(LocalProtocolError):
        pair.server.open_stream(ME, *PEER)
    request_id, commands = pair.server.open_connect(ME, *PEER)
    pair.up(pair.down(commands))
    pair.up(pair.mediator.connected(1))
    pair.down(pair.server.fin(1))
    assert pair.up(pair.mediator.fin(1)) == [PeerFin(1)]
    assert 1 in pair.server.ports and 1 in pair.mediator.ports  # no release without CLOSE in version 3
    close_id, commands = pair.server.close_port(1)
    assert pair.up(pair.down(commands)) == [RequestAcked(close_id, 1)]
    assert released(pair, 1)
    # OPEN_STREAM does not exist in version 3: UNKNOWN_FRAME, whoever sends it.
    in_v3 = bytearray(encode_frame(OpenStream(S1, ME, *PEER, request_id=9), 4))
    in_v3[0] = 3
    [bye, *_] = pair.mediator.receive_data(bytes(in_v3), 2.0)
    assert isinstance(bye, SendFrame) and bye.frame.code is ErrorCode.UNKNOWN_FRAME  # type: ignore[attr-defined]


def test_a_stream_that_was_released_is_not_closed_again() -> None:
    pair = pair4()
    open_stream(pair)
    pair.up(pair.mediator.connected(S1))
    pair.down(pair.server.fin(S1))
    pair.up(pair.mediator.fin(S1))
    assert released(pair, S1)
    with pytest.raises(LocalProtocolError):
        pair.server.close_port(S1)
    [err] = frames(pair.mediator.receive_data(wire(ClosePort(S1, request_id=50)), 2.0))
    assert err == Err(ErrorCode.NO_SUCH_ID, S1, f"no port {S1}", request_id=50)


# -- fuzzing: version 4's frames in any order, with any ids, on both cores -------------------

SIDS = st.sampled_from([0, 1, 2, S1, S1 + 1, S1 + 2, STREAM_ID_BASE - 1])
SERVER_FRAMES = st.one_of(
    st.builds(OpenStream, SIDS, st.just(ME), st.sampled_from([WEB, IPv6Address("fd00::9")]), st.sampled_from([0, 80]),
              request_id=st.integers(1, 4)),
    st.builds(Data, SIDS, st.just(WEB), st.sampled_from([80, 81]), st.binary(max_size=8)),
    st.builds(EventFin, SIDS),
    st.builds(EventRst, SIDS),
    st.builds(ClosePort, SIDS, request_id=st.integers(1, 4)),
    st.builds(WindowUpdate, SIDS, st.integers(1, STREAM_WINDOW)),
)
MEDIATOR_FRAMES = st.one_of(
    st.builds(Opened, SIDS, st.sampled_from([0, 40000]), request_id=st.integers(1, 4)),
    st.builds(Err, st.sampled_from([ErrorCode.CANCELLED, ErrorCode.NO_SUCH_ID]), SIDS, request_id=st.integers(0, 4)),
    st.builds(Data, SIDS, st.just(WEB), st.just(80), st.binary(max_size=8)),
    st.builds(EventFin, SIDS),
    st.builds(EventRst, SIDS),
    st.builds(WindowUpdate, SIDS, st.integers(1, STREAM_WINDOW)),
)
# What the I/O layer may report on a stream meanwhile.
SOCKET_RESULTS = st.sampled_from(["connected", "failed", "fin", "reset", "received", "consumed"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(SERVER_FRAMES, SOCKET_RESULTS.map(lambda r: (r, S1))), max_size=20))
def test_fuzz_a_servers_stream_frames(script: list[object]) -> None:
    """Whatever the server sends about streams, and whatever the sockets do,
    the mediator answers, refuses or closes with BYE: never an exception."""
    pair = pair4()
    open_stream(pair)
    core = pair.mediator
    for item in script:
        if core.closed:
            break
        if isinstance(item, tuple):
            result, port_id = item
            state = core.ports.get(port_id)
            if state is None:
                continue
            if result == "connected" and state[1].value == "CONNECTING":
                core.connected(port_id)
            elif result == "failed" and state[1].value == "CONNECTING":
                core.failed(port_id, ErrorCode.CONNECT_FAILED, "refused")
            elif state[1].value == "CONNECTED":
                {"fin": lambda: core.fin(port_id), "reset": lambda: core.reset(port_id),
                 "received": lambda: core.received(port_id, *PEER, b"x"),
                 "consumed": lambda: core.consumed(port_id, 1)}.get(result, list)()
            continue
        core.receive_data(wire(item), 2.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(MEDIATOR_FRAMES, st.sampled_from(["send", "fin", "reset", "close", "open"])), max_size=20))
def test_fuzz_a_mediators_stream_frames(script: list[object]) -> None:
    """Whatever the mediator sends about streams, and whatever the relay asks,
    the server answers, refuses or closes with BYE: never an exception."""
    pair = pair4()
    open_stream(pair)
    server = pair.server
    for item in script:
        if server.closed:
            break
        if isinstance(item, str):
            live = [p for p, (_, state) in server.ports.items() if state.value == "CONNECTED"]
            if item == "open":
                server.open_stream(ME, *PEER)
            elif live:
                {"send": lambda: server.send(live[0], *PEER, b"x"), "fin": lambda: server.fin(live[0]),
                 "reset": lambda: server.reset(live[0]), "close": lambda: server.close_port(live[0])}[item]()
            continue
        server.receive_data(wire(item), 2.0)
