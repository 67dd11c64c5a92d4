"""Reconnect backoff and the bytes/s token bucket, at their limits."""

from __future__ import annotations

import pytest

from tunnel.pacing import Backoff, BackoffSettings, TokenBucket


def test_backoff_doubles_up_to_the_maximum_with_jitter_inside_bounds() -> None:
    settings = BackoffSettings(initial=1.0, maximum=8.0, stable_after=30.0)
    top = Backoff(settings, rand=lambda: 0.999999)
    assert [round(top.next_delay(), 3) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    bottom = Backoff(settings, rand=lambda: 0.0)
    # Full jitter, but never below initial/2: no storm of instant retries.
    assert {bottom.next_delay() for _ in range(6)} == {0.5}


def test_backoff_resets_only_after_a_stable_connection() -> None:
    backoff = Backoff(BackoffSettings(initial=1.0, maximum=60.0, stable_after=30.0), rand=lambda: 0.999999)
    for _ in range(4):
        backoff.next_delay()
    backoff.succeeded(29.9)  # flapping: keep backing off
    assert round(backoff.next_delay(), 3) == 16.0
    backoff.succeeded(30.0)
    assert round(backoff.next_delay(), 3) == 1.0


def test_backoff_jitter_spreads_a_crowd() -> None:
    """A thousand mediators behind one rebooted NAT must not retry in lock step."""
    import random

    rng = random.Random(7)
    crowd = [Backoff(BackoffSettings(initial=1.0, maximum=60.0), rand=rng.random) for _ in range(1000)]
    fifth = []
    for backoff in crowd:
        for _ in range(4):
            backoff.next_delay()
        fifth.append(backoff.next_delay())
    assert 0.5 <= min(fifth) and max(fifth) <= 16.0
    assert len({round(d, 2) for d in fifth}) > 500  # spread over the whole window
    assert sum(d < 8.0 for d in fifth) > 300 and sum(d >= 8.0 for d in fifth) > 300


@pytest.mark.parametrize("bad", [dict(initial=0), dict(initial=2, maximum=1), dict(stable_after=-1)])
def test_backoff_settings_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError):
        BackoffSettings(**bad)


def test_token_bucket_at_the_burst_and_one_past_it() -> None:
    bucket = TokenBucket(rate=1000, burst=100, now=0.0)
    assert bucket.take(100, 0.0) == 0.0  # exactly the burst: no pause
    assert bucket.take(1, 0.0) == pytest.approx(0.001)  # one byte past: pay it at 1000 B/s
    assert bucket.delay(0.0005) == pytest.approx(0.0005)
    assert bucket.delay(0.001) == 0.0


def test_token_bucket_refills_at_rate_and_caps_at_burst() -> None:
    bucket = TokenBucket(rate=1000, burst=100, now=0.0)
    bucket.take(100, 0.0)
    assert bucket.try_take(50, 0.05)  # 50 bytes came back in 50 ms
    assert not bucket.try_take(1, 0.05)
    assert bucket.try_take(100, 10.0)  # a long pause refills only up to the burst
    assert not bucket.try_take(1, 10.0)


def test_token_bucket_debt_gives_the_pause_that_keeps_the_average() -> None:
    bucket = TokenBucket(rate=1_000_000, burst=65536, now=0.0)
    assert bucket.take(65536 + 1_000_000, 0.0) == pytest.approx(1.0)
    assert not bucket.try_take(1, 0.5)  # UDP is refused while in debt


def test_token_bucket_needs_a_rate_not_below_zero_and_a_positive_burst() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1, 1, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(1000, 0, 0.0)


def test_token_bucket_rate_zero_is_no_cap() -> None:
    """The default (issue 14 E): no bandwidth cap unless one is configured."""
    bucket = TokenBucket(0, 1, 0.0)
    assert bucket.take(10**12, 0.0) == 0.0 and bucket.try_take(10**9, 0.0) and bucket.delay(0.0) == 0.0


def test_backoff_defaults_reset_on_any_successful_session_and_cap_at_ten_seconds() -> None:
    """Issue 14 C: after a lost channel the mediator is back within initial, never a minute."""
    backoff = Backoff(rand=lambda: 0.999999)
    assert [round(backoff.next_delay(), 3) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.succeeded(0.1)  # a session reached READY, however briefly
    assert round(backoff.next_delay(), 3) == 1.0
