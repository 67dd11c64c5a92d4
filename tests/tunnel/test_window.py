"""Per-connection windows (protocol version 3, tunnel/window.py), on both cores.

Playbooks: the exact frames and commands each step gives, with a private
host that sends more than the window, one that closes behind held bytes,
and peers that break the window's rules (issue 14 D).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tunnel.test_server_core import ME, WEB, Pair
from tunnel.commands import (
    ChannelClosed, PauseReading, PeerFin, PortOpened, Received, ResumeReading, SendFrame, WriteStream,
)
from tunnel.errors import ErrorCode
from tunnel.frames import Bye, Data, EventFin, WindowUpdate, encode_frame
from tunnel.window import GRANT_AT, STREAM_WINDOW, StreamWindow

PEER = (WEB, 80)


def connected_pair(versions: tuple[int, ...] = (1, 2, 3)) -> Pair:
    """Both cores, with port 1 a client port connected to WEB:80 (OPEN_CONNECT)."""
    pair = Pair(versions=versions)
    pair.start()
    request_id, commands = pair.server.open_connect(ME, *PEER)
    assert pair.up(pair.down(commands)) == []
    assert pair.up(pair.mediator.connected(1)) == [PortOpened(request_id, 1, 40000)]
    return pair


def payload(outputs: Sequence[object]) -> bytes:
    return b"".join(o.data for o in outputs if isinstance(o, Received))


def frames(outputs: Sequence[object]) -> list[object]:
    return [o.frame for o in outputs if isinstance(o, SendFrame)]


def test_a_window_of_bytes_then_reading_stops_until_credit_comes_back() -> None:
    pair = connected_pair()
    data = bytes(range(256)) * 1200  # 307200 bytes, one big read of the private host
    out = pair.mediator.received(1, *PEER, data)
    assert out[-1] == PauseReading(1)
    assert payload(pair.up(out)) == data[:STREAM_WINDOW]
    # The public client's socket took less than a grant's worth: no credit yet.
    assert pair.server.consumed(1, GRANT_AT - 1) == []
    [update] = pair.server.consumed(1, 1)
    assert update == SendFrame(WindowUpdate(1, GRANT_AT), 3)
    out = pair.down([update])
    assert out[-1] == ResumeReading(1)  # the rest fitted: read again
    assert payload(pair.up(out)) == data[STREAM_WINDOW:]


def test_a_fin_waits_behind_the_bytes_the_window_holds() -> None:
    pair = connected_pair()
    data = b"x" * (STREAM_WINDOW + 10)
    pair.up(pair.mediator.received(1, *PEER, data))
    assert pair.mediator.fin(1) == []  # 10 bytes still held
    out = pair.down(pair.server.consumed(1, STREAM_WINDOW))
    assert [type(o) for o in out] == [SendFrame, ResumeReading, SendFrame]
    assert pair.up(out) == [Received(1, *PEER, b"x" * 10), PeerFin(1)]


def test_the_server_holds_what_the_public_client_sends_past_the_window() -> None:
    pair = connected_pair()
    data = b"y" * (STREAM_WINDOW + GRANT_AT)
    out = pair.server.send(1, *PEER, data)
    assert out[-1] == PauseReading(1)
    written = [o for o in pair.down(out) if isinstance(o, WriteStream)]
    assert sum(len(w.data) for w in written) == STREAM_WINDOW
    assert pair.server.fin(1) == []  # behind the held bytes
    [update] = pair.mediator.consumed(1, STREAM_WINDOW)
    assert update.frame == WindowUpdate(1, STREAM_WINDOW)
    sent = pair.up([update])
    assert [type(o) for o in sent] == [SendFrame, ResumeReading, SendFrame]
    assert frames(sent) == [Data(1, *PEER, b"y" * GRANT_AT), EventFin(1)]


def test_data_past_the_window_is_a_protocol_error() -> None:
    pair = connected_pair()
    chunk = b"z" * 60000
    wire = b"".join(encode_frame(Data(1, *PEER, chunk), 3) for _ in range(5))  # 300000 > 262144
    out = pair.server.receive_data(wire, 1.0)
    assert [o for o in out if isinstance(o, Received)] == [Received(1, *PEER, chunk)] * 4
    assert SendFrame(Bye(ErrorCode.BAD_REQUEST, "DATA past port 1's window"), 3) in out
    assert ChannelClosed(ErrorCode.BAD_REQUEST, "DATA past port 1's window", False) in out


def test_credit_past_the_window_is_a_protocol_error_and_credit_for_a_gone_port_is_ignored() -> None:
    pair = connected_pair()
    assert pair.mediator.receive_data(encode_frame(WindowUpdate(9, 100), 3), 1.0) == []
    out = pair.mediator.receive_data(encode_frame(WindowUpdate(1, 1), 3), 1.0)
    assert SendFrame(Bye(ErrorCode.BAD_REQUEST, "WINDOW_UPDATE past port 1's window"), 3) in out


def test_version_2_has_no_window() -> None:
    pair = connected_pair(versions=(1, 2))
    data = b"w" * (STREAM_WINDOW * 2)
    out = pair.mediator.received(1, *PEER, data)
    assert not any(isinstance(o, (PauseReading, ResumeReading)) for o in out)
    assert payload(pair.up(out)) == data
    assert pair.server.consumed(1, STREAM_WINDOW) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 100000)), max_size=40))
def test_the_sender_never_has_more_than_a_window_in_flight(steps: list[tuple[bool, int]]) -> None:
    """Reads and the receiver's consumption in any order: what is in flight stays
    within the window, nothing is lost or reordered, and a sender that holds
    bytes is always paused."""
    sender, receiver = StreamWindow(), StreamWindow()
    sent = bytearray()
    source = bytearray()
    buffered = 0  # at the receiver, not yet consumed
    for is_read, n in steps:
        if is_read:
            data = bytes([len(source) % 251]) * n
            source += data
            out, _ = sender.send(data)
        else:
            n = min(n, buffered)
            buffered -= n
            grant = receiver.consumed(n)
            got = sender.granted(grant) if grant else None
            out = got[0] if got else b""
        assert receiver.received(len(out))
        buffered += len(out)
        sent += out
        assert receiver.outstanding <= STREAM_WINDOW
        assert sender.paused == (bool(sender.held) or sender.credit == 0)
    assert bytes(sent) + sender.held == bytes(source)


def test_grants_are_never_zero_nor_past_the_window() -> None:
    window = StreamWindow()
    assert window.granted(0) is None
    assert window.granted(1) is None  # the full credit is already ours
    window.send(b"a" * 10)
    assert window.granted(10) == (b"", False)


@pytest.mark.parametrize("n", [GRANT_AT - 1, GRANT_AT])
def test_credit_goes_back_in_pieces(n: int) -> None:
    window = StreamWindow()
    assert window.received(STREAM_WINDOW)
    assert window.consumed(n) == (n if n >= GRANT_AT else 0)
    assert not window.received(STREAM_WINDOW - window.outstanding + 1)


def test_a_read_cut_by_the_credit_is_sent_and_held_as_views_of_it() -> None:
    window = StreamWindow()
    read = bytes(range(256)) * 2048  # 512 KiB: two windows
    sent, changed = window.send(read)
    assert changed and isinstance(sent, memoryview) and sent.obj is read and len(sent) == STREAM_WINDOW
    assert isinstance(window.held, memoryview) and window.held.obj is read
    granted = window.granted(GRANT_AT)
    assert granted is not None and granted[0].obj is read  # type: ignore[union-attr]
    late, _ = window.send(b"late")  # the one read that lands while bytes are held: joined behind them
    assert late == b"" and bytes(window.held).endswith(b"late")
    assert bytes(sent) + bytes(granted[0]) + bytes(window.held) == read + b"late"
