"""The one replay window (firewall/replay.py), shared by the signalling Guard and the tunnel's UDP channels."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.replay import ReplayWindow


def test_replayed_and_too_old_refused() -> None:
    window = ReplayWindow(64)
    assert window.accept(5)
    assert not window.accept(5)  # replay
    assert window.accept(3)  # late but inside the window
    assert not window.accept(3)
    assert window.accept(100)  # slides: 100 - 64 = 36 is now the oldest refused
    assert not window.accept(36)
    assert window.accept(37)
    assert not window.accept(5)  # too old
    assert window.check(99) and not window.check(100)


def test_window_starts_at_zero() -> None:
    window = ReplayWindow(4)
    assert window.accept(0) and not window.accept(0)
    assert window.accept(4) and not window.check(0) and window.check(1)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 70), st.lists(st.integers(0, 200), max_size=60))
def test_replay_window_model(size: int, seqs: list[int]) -> None:
    window = ReplayWindow(size)
    seen: set[int] = set()
    for seq in seqs:
        expected = seq not in seen and (not seen or seq > max(seen) - size)
        assert window.accept(seq) is expected
        if expected:
            seen.add(seq)


def test_seen_is_inside_the_window_only() -> None:
    window = ReplayWindow(8)
    assert not window.seen(0)  # nothing yet
    window.update(10)
    assert window.seen(10) and not window.seen(9) and not window.seen(11)
    window.update(5)
    assert window.seen(5)
    window.update(13)  # 5 = 13 - 8 is out of the window now
    assert not window.seen(5) and not window.check(5)


def test_a_jump_past_the_window_clears_it() -> None:
    window = ReplayWindow(1024)
    assert window.accept(3)
    assert window.accept(2**64 - 1)  # an authenticated but absurd jump: cheap
    assert window.highest == 2**64 - 1 and window.seen(2**64 - 1) and not window.seen(2**64 - 2)
    assert not window.accept(3)
