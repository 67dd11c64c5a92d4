"""Per-connection windows (protocol version 3, tunnel/window.py), on both cores.

Playbooks: the exact frames and commands each step gives, with a private
host that sends more than the window, one that closes behind held bytes,
and peers that break the window's rules (issue 14 D); from version 5,
windows that grow for readers that keep up, within the channel's budget.
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
from tunnel.frames import Bye, Bytes, Data, EventFin, WindowUpdate, encode_frame
from tunnel.window import GRANT_AT, MAX_STREAM_WINDOW, STREAM_WINDOW, StreamWindow

PEER = (WEB, 80)


def connected_pair(versions: tuple[int, ...] = (1, 2, 3), **server: object) -> Pair:
    """Both cores, with port 1 a client port connected to WEB:80 (OPEN_CONNECT);
    ``server``: more of the server's settings."""
    pair = Pair(versions=versions, **server)
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


# -- version 5: windows that grow --------------------------------------------------------

V5 = (1, 2, 3, 4, 5)


def more(pair: Pair, port_id: int) -> None:
    """Client port ``port_id`` (the mediator's next id), connected to WEB:80 as port 1 is."""
    request_id, commands = pair.server.open_connect(ME, *PEER)
    assert pair.up(pair.down(commands)) == []
    assert pair.up(pair.mediator.connected(port_id)) == [PortOpened(request_id, port_id, 40000)]


def keep_up(pair: Pair, port_id: int, out: Sequence[object]) -> list[int]:
    """The server's public client takes everything the mediator sends for
    ``port_id`` at once; the increments of the WINDOW_UPDATEs that gives."""
    increments = []
    while True:
        got = payload(pair.up(out))
        if not got:
            return increments
        updates = pair.server.consumed(port_id, len(got))
        for update in updates:
            assert update.prompt  # written at once, not at the end of the iteration
            increments.append(update.frame.increment)
        out = pair.down(updates)


def test_a_reader_that_keeps_up_doubles_its_window_up_to_stream_window_max() -> None:
    pair = connected_pair(versions=V5)
    window = pair.server._remotes[1].credit
    assert window.grow_to == 4 << 20 and window.size == STREAM_WINDOW
    out = pair.mediator.received(1, *PEER, b"d" * (16 << 20))  # a private host with 16 MiB at once
    increments = keep_up(pair, 1, out)
    # Each window's worth taken at once: credit back, and the window doubled with it.
    assert increments[:3] == [2 * STREAM_WINDOW, 4 * STREAM_WINDOW, 8 * STREAM_WINDOW]
    assert window.size == 4 << 20 and pair.mediator._ports[1].credit.limit == MAX_STREAM_WINDOW
    # All of it but the last 256 KiB (less than a quarter of 4 MiB: no grant yet), plus the growth.
    assert sum(increments) == (16 << 20) - STREAM_WINDOW + (4 << 20) - STREAM_WINDOW


def test_the_mediator_grows_the_windows_towards_its_private_hosts_too() -> None:
    pair = connected_pair(versions=V5)
    out = pair.server.send(1, *PEER, b"u" * (2 << 20))  # a public client uploading 2 MiB at once
    increments = []
    for _ in range(16):
        written = sum(len(w.data) for w in pair.down(out) if isinstance(w, WriteStream))
        if not written:
            break
        updates = pair.mediator.consumed(1, written)  # the private host takes it all at once
        increments += [u.frame.increment for u in updates]
        out = pair.up(updates)
    assert increments[:2] == [2 * STREAM_WINDOW, 4 * STREAM_WINDOW]
    assert pair.mediator._ports[1].credit.size > STREAM_WINDOW and pair.mediator.windows_grown >= 2


def test_a_reader_that_falls_behind_keeps_a_256_kib_window() -> None:
    pair = connected_pair(versions=V5)
    out = pair.mediator.received(1, *PEER, b"s" * (4 << 20))
    waiting = 0  # in the public client's socket buffer: it reads slowly, a grant's worth at a time
    for _ in range(48):  # 256 KiB, then 47 grants' worth: the mediator still has more
        waiting += len(payload(pair.up(out)))
        updates = pair.server.consumed(1, GRANT_AT)
        waiting -= GRANT_AT
        assert [u.frame.increment for u in updates] == [GRANT_AT]
        out = pair.down(updates)
        assert waiting > 0 and pair.server._remotes[1].credit.size == STREAM_WINDOW


def test_grown_windows_stay_within_the_channels_budget_and_free_it_when_they_end() -> None:
    pair = connected_pair(versions=V5, stream_window_budget=STREAM_WINDOW)  # one doubling
    second = 2
    more(pair, second)
    first, other = pair.server._remotes[1].credit, pair.server._remotes[second].credit
    keep_up(pair, 1, pair.mediator.received(1, *PEER, b"a" * (2 << 20)))
    assert first.size == 2 * STREAM_WINDOW
    keep_up(pair, second, pair.mediator.received(second, *PEER, b"b" * (2 << 20)))
    assert other.size == STREAM_WINDOW  # the budget is spent
    assert other.moved < STREAM_WINDOW  # and the next try waits for another window's worth
    pair.up(pair.mediator.reset(1))  # the grown one ends
    keep_up(pair, second, pair.mediator.received(second, *PEER, b"c" * (2 << 20)))
    assert other.size == 2 * STREAM_WINDOW


def test_version_4_windows_never_grow_and_credit_past_them_is_still_an_error() -> None:
    pair = connected_pair(versions=(1, 2, 3, 4))
    increments = keep_up(pair, 1, pair.mediator.received(1, *PEER, b"f" * (2 << 20)))
    assert sum(increments) == 2 << 20 and max(increments) <= STREAM_WINDOW
    assert pair.server._remotes[1].credit.size == STREAM_WINDOW
    out = pair.mediator.receive_data(encode_frame(WindowUpdate(1, STREAM_WINDOW), 4), 1.0)
    assert SendFrame(Bye(ErrorCode.BAD_REQUEST, "WINDOW_UPDATE past port 1's window"), 4) in out


def test_in_version_5_credit_past_16_mib_is_a_protocol_error() -> None:
    pair = connected_pair(versions=V5)
    assert pair.mediator.receive_data(encode_frame(WindowUpdate(1, MAX_STREAM_WINDOW - STREAM_WINDOW), 5), 1.0) == []
    out = pair.mediator.receive_data(encode_frame(WindowUpdate(1, 1), 5), 1.0)
    assert SendFrame(Bye(ErrorCode.BAD_REQUEST, "WINDOW_UPDATE past port 1's window"), 5) in out


def test_data_past_a_grown_window_is_a_protocol_error() -> None:
    pair = connected_pair(versions=V5)
    keep_up(pair, 1, pair.mediator.received(1, *PEER, b"g" * STREAM_WINDOW))  # grown to 512 KiB
    assert pair.server._remotes[1].credit.size == 2 * STREAM_WINDOW
    chunk = b"z" * 65000
    wire = b"".join(encode_frame(Data(1, *PEER, chunk), 5) for _ in range(9))  # 585000 > 524288
    out = pair.server.receive_data(wire, 1.0)
    assert len([o for o in out if isinstance(o, Received)]) == 8
    assert ChannelClosed(ErrorCode.BAD_REQUEST, "DATA past port 1's window", False) in out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["read", "consume", "drain"]), st.integers(1, 300000)), max_size=60))
def test_a_growing_window_never_has_more_in_flight_than_its_size(steps: list[tuple[str, int]]) -> None:
    """As the fixed window's property, with growth (version 5, a budget of
    1 MiB): in flight stays within the receiver's window, which stays within
    ``grow_to``; nothing is lost or reordered."""
    sender, receiver = StreamWindow(MAX_STREAM_WINDOW), StreamWindow(MAX_STREAM_WINDOW, 2 << 20)
    sent, source = bytearray(), bytearray()
    buffered = 0  # at the receiver, not yet consumed
    for kind, n in steps:
        out: Bytes = b""
        if kind == "read":
            data = bytes([len(source) % 251]) * n
            source += data
            out, _ = sender.send(data)
        else:
            n = buffered if kind == "drain" else min(n, buffered)
            buffered -= n
            grant = receiver.consumed(n)
            if grant and receiver.ripe:
                grant += receiver.grow((1 << 20) - receiver.grown)
            got = sender.granted(grant) if grant else None
            assert got is not None or not grant
            out = got[0] if got else b""
        assert receiver.received(len(out))
        buffered += len(out)
        sent += out
        assert receiver.outstanding <= receiver.size <= 2 << 20 and receiver.grown <= 1 << 20
        assert sender.paused == (bool(sender.held) or sender.credit == 0)
    assert bytes(sent) + sender.held == bytes(source)
