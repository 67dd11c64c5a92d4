"""RelayCore as playbooks: the exact events in and commands out, fed byte by byte where it matters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateways.relay.core import (
    TICK,
    Abort,
    Close,
    DataReceived,
    DataSent,
    Done,
    FinReceived,
    HalfClose,
    Limits,
    RelayCore,
    Replace,
    Reset,
    ResetReceived,
    SendData,
    SendSpliced,
    Side,
    Spliced,
    Verdict,
)

A, B = Side.A, Side.B
NAMES = {A: "client", B: "server"}


def core(limits: Limits = Limits(), **kw: Any) -> RelayCore:
    return RelayCore(limits, 0.0, names=NAMES, **kw)


def play(relay: RelayCore, *steps: tuple[Any, ...]) -> None:
    """Each step: (event, expected commands) or (event, expected commands, now)."""
    for i, step in enumerate(steps):
        event, expected, *when = step
        got = relay.handle(event, when[0] if when else 1.0)
        assert got == expected, f"step {i}: {event}"


def echo_steps(side: Side, data: bytes) -> list[tuple[Any, ...]]:
    """``data`` from ``side`` byte by byte, each byte sent on before the next is read."""
    steps: list[tuple[Any, ...]] = []
    for i in range(len(data)):
        byte = data[i : i + 1]
        steps += [(DataReceived(side, byte), [SendData(side.other, byte)]), (DataSent(side.other, 1), [])]
    return steps


# ---- data and backpressure -------------------------------------------------------------------------


def test_bytes_both_ways_fed_byte_by_byte_are_forwarded_in_order_and_counted() -> None:
    relay = core()
    play(relay, *echo_steps(A, b"GET / HTTP/1.0\r\n\r\n"), *echo_steps(B, b"HTTP/1.0 200 OK\r\n"))
    assert (relay.received(A), relay.received(B), relay.buffered) == (18, 17, 0)


def test_a_leg_is_not_read_while_its_last_chunk_is_unsent() -> None:
    relay = core()
    play(relay, (DataReceived(A, b"0123456789"), [SendData(B, b"0123456789")]))
    assert not relay.wants_read(A) and relay.wants_read(B) and relay.buffered == 10
    for sent in (1, 8):  # the kernel takes it in pieces: still not all gone
        play(relay, (DataSent(B, sent), []))
        assert not relay.wants_read(A)
    play(relay, (DataSent(B, 1), []))
    assert relay.wants_read(A) and relay.buffered == 0


def test_spliced_bytes_are_only_counted_and_moved() -> None:
    relay = core()
    play(relay, (Spliced(A, 65536), [SendSpliced(B, 65536)]), (DataSent(B, 65536), []),
         (Spliced(B, 3), [SendSpliced(A, 3)]))
    assert (relay.received(A), relay.received(B), relay.buffered) == (65536, 3, 3)


def test_the_driver_misusing_the_core_is_a_bug() -> None:
    relay = core(inspectors={A: lambda chunk: Verdict.PASS})
    assert relay.inspects(A) and not relay.inspects(B)
    with pytest.raises(RuntimeError, match="inspected"):
        relay.handle(Spliced(A, 1), 1.0)
    with pytest.raises(RuntimeError, match="due"):
        relay.handle(DataSent(B, 1), 1.0)


# ---- half-close ------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [A, B])
def test_a_fin_is_passed_on_and_the_other_direction_stays_open(first: Side) -> None:
    second = first.other
    relay = core()
    play(
        relay,
        (FinReceived(first), [HalfClose(second)]),
        *echo_steps(second, b"still talking"),
        (FinReceived(second), [HalfClose(first), Close(A), Close(B), Done("done")]),
    )
    assert relay.outcome == Done("done")


def test_a_fin_waits_for_the_bytes_before_it() -> None:
    relay = core()
    play(
        relay,
        (DataReceived(A, b"last words"), [SendData(B, b"last words")]),
        (FinReceived(A), []),  # B has not had them all yet: no FIN before them
        (DataSent(B, 4), []),
        (DataSent(B, 6), [HalfClose(B)]),
        (DataSent(B, 0), []),  # said once
    )
    assert not relay.wants_read(A) and relay.wants_read(B)


# ---- resets, aborts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "reason"), [(A, "client_reset"), (B, "server_reset")])
def test_a_reset_on_either_leg_resets_both_and_ends_it(side: Side, reason: str) -> None:
    relay = core()
    play(
        relay,
        (DataReceived(A, b"request"), [SendData(B, b"request")]),
        (ResetReceived(side), [Reset(A), Reset(B), Done(reason)]),
        (DataSent(B, 7), []),  # over: nothing more is decided
        (FinReceived(B), []),
        (TICK, [], 1e9),
    )
    assert not relay.wants_read(A) and not relay.wants_read(B) and relay.deadline() is None


def test_a_reset_after_a_half_close_still_resets_both() -> None:
    relay = core()
    play(relay, (FinReceived(A), [HalfClose(B)]), (ResetReceived(B), [Reset(A), Reset(B), Done("server_reset")]))


def test_abort_resets_both_with_its_reason() -> None:
    play(core(), (Abort("flow_end", "idle"), [Reset(A), Reset(B), Done("flow_end", "idle")]))


# ---- idle ------------------------------------------------------------------------------------------


def test_idle_closes_both_with_fin_once_nothing_moved_for_the_timeout() -> None:
    relay = core(Limits(idle_timeout=5.0))
    assert relay.deadline() == 5.0
    play(relay, (TICK, [], 4.9), (DataReceived(A, b"x"), [SendData(B, b"x")], 3.0))
    assert relay.deadline() == 8.0  # data pushes it back
    play(relay, (DataSent(B, 1), [], 4.0))
    assert relay.deadline() == 9.0  # so does data leaving
    play(relay, (TICK, [], 8.5), (TICK, [Close(A), Close(B), Done("idle", "5s without data")], 9.0))
    assert relay.deadline() is None


def test_idle_resets_a_leg_whose_bytes_are_unsent() -> None:
    """A FIN after lost bytes would pass a truncated stream off as complete."""
    relay = core(Limits(idle_timeout=5.0))
    play(relay, (DataReceived(B, b"for a reader that stopped"), [SendData(A, b"for a reader that stopped")], 0.0),
         (TICK, [Reset(A), Close(B), Done("idle", "5s without data")], 5.0))


def test_idle_resets_both_where_a_fin_is_never_honest() -> None:
    relay = core(Limits(idle_timeout=0.5, reset_on_idle=True))
    play(relay, (TICK, [Reset(A), Reset(B), Done("idle", "0.5s without data")], 0.5))


def test_no_idle_timeout_means_no_deadline() -> None:
    relay = core(Limits(idle_timeout=0))
    assert relay.deadline() is None
    play(relay, (TICK, [], 1e9))


# ---- limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spliced", [False, True])
def test_max_bytes_counts_both_ways_at_the_limit_and_one_past_it(spliced: bool) -> None:
    relay = core(Limits(max_bytes=10))
    for i in range(10):  # byte by byte, alternating directions: all ten pass
        side = A if i % 2 else B
        event = Spliced(side, 1) if spliced else DataReceived(side, b"x")
        command = SendSpliced(side.other, 1) if spliced else SendData(side.other, b"x")
        play(relay, (event, [command]), (DataSent(side.other, 1), []))
    past = Spliced(A, 1) if spliced else DataReceived(A, b"y")
    play(relay, (past, [Reset(A), Reset(B), Done("limit", "more than 10 bytes")]))
    assert relay.received(A) + relay.received(B) == 11  # what was read, forwarded or not


def test_a_chunk_that_crosses_the_limit_is_not_forwarded() -> None:
    relay = core(Limits(max_bytes=10))
    play(relay, (DataReceived(A, b"123456789"), [SendData(B, b"123456789")]), (DataSent(B, 9), []),
         (DataReceived(A, b"AB"), [Reset(A), Reset(B), Done("limit", "more than 10 bytes")]))


# ---- inspection ------------------------------------------------------------------------------------


def test_an_inspector_sees_each_chunk_of_its_direction_only() -> None:
    seen: list[bytes] = []

    def watch(chunk: bytes) -> Verdict:
        seen.append(chunk)
        return Verdict.PASS

    relay = core(inspectors={B: watch})
    play(relay, *echo_steps(B, b"abc"), *echo_steps(A, b"up"), *echo_steps(B, b"d"))
    assert seen == [b"a", b"b", b"c", b"d"]


def test_replace_sends_what_the_inspector_gives_and_empty_sends_nothing() -> None:
    relay = core(inspectors={A: lambda chunk: Replace(b"") if chunk == b"-" else Replace(chunk.upper())})
    play(
        relay,
        (DataReceived(A, b"a"), [SendData(B, b"A")]),
        (DataSent(B, 1), []),
        (DataReceived(A, b"-"), []),  # dropped: nothing due, so reading goes on
    )
    assert relay.wants_read(A) and relay.received(A) == 2


@pytest.mark.parametrize(
    ("inspector", "detail"),
    [
        (lambda chunk: Verdict.CLOSE, ""),
        (lambda chunk: None, ""),  # not a verdict: taken as CLOSE, never as PASS
        (lambda chunk: 1 / 0, "the inspector raised ZeroDivisionError('division by zero')"),
    ],
)
def test_an_inspector_that_says_close_or_breaks_resets_both(inspector: Any, detail: str) -> None:
    relay = core(inspectors={B: inspector})
    play(relay, *echo_steps(A, b"RETR x"), (DataReceived(B, b"EICAR"), [Reset(A), Reset(B), Done("hook", detail)]))


# ---- properties ------------------------------------------------------------------------------------

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.sampled_from(Side), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("splice"), st.sampled_from(Side), st.integers(1, 1 << 20)),
        st.tuples(st.just("sent"), st.sampled_from(Side), st.integers(1, 1 << 20)),
        st.tuples(st.just("fin"), st.sampled_from(Side), st.none()),
        st.tuples(st.just("reset"), st.sampled_from(Side), st.none()),
        st.tuples(st.just("tick"), st.none(), st.floats(0, 100)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_steps, st.integers(0, 64))
def test_any_well_driven_sequence_keeps_the_rules(steps: list[tuple[str, Any, Any]], max_bytes: int) -> None:
    """A driver that reads only when asked and confirms no more than is due: every byte
    forwarded is accounted for, a FIN never overtakes data, and one Done ends all."""
    relay = RelayCore(Limits(idle_timeout=30, max_bytes=max_bytes), 0.0, names=NAMES)
    due = {A: 0, B: 0}
    shut = {A: False, B: False}
    fin = {A: False, B: False}
    ended: list[Done] = []
    now = 0.0
    for kind, side, value in steps:
        if kind in ("data", "splice", "fin") and not relay.wants_read(side):
            continue
        if kind == "sent":
            value = min(value, due[side])
            if not value:
                continue
        now += 0.1
        event = {
            "data": lambda: DataReceived(side, value),
            "splice": lambda: Spliced(side, value),
            "sent": lambda: DataSent(side, value),
            "fin": lambda: FinReceived(side),
            "reset": lambda: ResetReceived(side),
            "tick": lambda: TICK,
        }[kind]()
        if kind == "tick":
            now += value
        if kind == "fin":
            fin[side] = True
        out = relay.handle(event, now)
        assert not (ended and out), "nothing after Done"
        for command in out:
            if isinstance(command, SendData):
                due[command.side] += len(command.data)
            elif isinstance(command, SendSpliced):
                due[command.side] += command.size
            elif isinstance(command, HalfClose):
                assert fin[command.side.other] and not shut[command.side], "FIN from the other leg, once"
                shut[command.side] = True
            elif isinstance(command, Done):
                ended.append(command)
        if shut[A] and shut[B]:
            assert ended == [Done("done")]
        if ended:
            continue  # what it held is dropped with the legs
        if kind == "sent":
            due[side] -= value
        assert relay.buffered == due[A] + due[B]
        if max_bytes:
            assert relay.received(A) + relay.received(B) <= max_bytes
    assert len(ended) <= 1 and (relay.outcome is None) == (not ended)
