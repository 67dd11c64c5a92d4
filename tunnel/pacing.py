"""Pacing for the tunnel's I/O layer: reconnect backoff and a byte-rate limit.

Both are sans-IO (DESIGN.md invariant 9): they take ``now`` and a random
source, and say how long to wait; the asyncio layers do the waiting.

- ``Backoff``: bounded exponential backoff with full jitter, for the
  mediator's reconnects and the server's re-publishing. The seed's tunnel
  exists only while the mediator keeps it up ("the system 2 sets up the
  tunnel 6 to the server 4 via a single fixed port"), so after any loss the
  mediator must come back by itself -- but a thousand mediators behind one
  NAT that reboots must not come back in lock step, hence the jitter
  ("Exponential Backoff And Jitter", AWS architecture blog, 2015: full
  jitter spreads retries best for the least total work).
- ``TokenBucket``: the server's bytes/s limit per mediator. A mediator uses
  the server's uplink on behalf of terminals the server operator does not
  control; the bucket bounds what one of them can take.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffSettings:
    """How retries are spaced: ``initial`` * 2**n, capped at ``maximum``."""

    initial: float = 1.0
    """Seconds before the first retry (before jitter)."""
    maximum: float = 10.0
    """Longest wait between retries: a mediator whose server came back is
    back within this, whatever happened before (issue 14 C: a minute's cap
    kept a service down 30-59 s after one lost channel)."""
    stable_after: float = 0.0
    """Seconds a successful session must have lasted for the next failure to
    start again from ``initial``. 0: any session that reached READY resets
    it; the jitter's floor still spaces retries by ``initial``/2."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("need 0 < initial <= maximum")
        if self.stable_after < 0:
            raise ValueError("stable_after must not be negative")


class Backoff:
    """Bounded exponential backoff with full jitter.

    ``next_delay()`` returns a wait drawn uniformly from [initial/2, cap],
    where cap doubles with each consecutive failure up to ``maximum``. The
    floor of initial/2 keeps a storm of instant retries impossible even with
    an unlucky draw. ``succeeded(duration)`` resets it when the connection
    lasted ``stable_after`` seconds.
    """

    def __init__(
        self, settings: BackoffSettings | None = None, rand: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings or BackoffSettings()
        self.failures = 0
        self._rand = rand

    def next_delay(self) -> float:
        """The wait before the next attempt; counts one more failure."""
        s = self.settings
        cap = min(s.maximum, s.initial * float(1 << min(self.failures, 62)))
        self.failures += 1
        low = s.initial / 2
        return low + (cap - low) * self._rand() if cap > low else cap

    def succeeded(self, lasted: float) -> None:
        """An attempt worked and lasted ``lasted`` seconds before it ended."""
        if lasted >= self.settings.stable_after:
            self.failures = 0

    def reset(self) -> None:
        self.failures = 0


class TokenBucket:
    """Bytes per second with a burst, allowing debt.

    ``take(n, now)`` always takes the bytes (a TCP read has already happened
    and cannot be undone) and returns how long the reader must pause so that
    the average stays at ``rate``; 0 means go on. ``try_take`` is for UDP,
    which cannot be paused: it refuses a datagram the bucket cannot pay for,
    and the caller drops and counts it.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        """``rate`` 0: no limit (every ``take`` is free)."""
        if rate < 0 or burst <= 0:
            raise ValueError("rate must not be negative, and burst must be positive")
        self.unlimited = rate == 0
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, amount: int, now: float) -> float:
        """Take ``amount`` bytes; the seconds to pause before reading more."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, amount: int, now: float) -> bool:
        """Take ``amount`` bytes only if the bucket holds them."""
        if self.unlimited:
            return True
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def delay(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 if it is not)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
