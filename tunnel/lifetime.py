"""Keepalive discovery: how long the NAT keeps an idle UDP mapping, sans-IO.

Theory of operation
-------------------

Seed, "3. Maintain channel": the client sends its maintain channel packet
"before the end of the TTL of the channel in question". That TTL is the
NAT's, and nobody tells the mediator: RFC 4787 REQ-5 asks for 2 minutes,
home NATs often keep 30 s, the ``nat-tunnel`` lab 5 s. So the mediator
measures it, as RFC 5780 section 4.6 (binding lifetime discovery) does with
STUN, on a spare UDP socket of its own (version 3, docs/tunnel-protocol.md
section 9):

1. It sends PROBE(wait) from that socket to the service port; the server
   answers PROBE_ACK ``wait`` seconds later, to the address the PROBE came
   from. If the answer arrives, a mapping idle for ``wait`` seconds survived;
   if it has not come ``PROBE_GRACE`` after that, the mapping (or a
   datagram) was lost, and the wait counts as too long (erring short is
   safe: keepalives come more often).
2. Waits double from ``2 × floor`` while they survive, up to the ceiling;
   after the first loss they are bisected between the longest that
   survived and the shortest that did not, until the two are within 20%
   (or 0.5 s).
3. The result is ``KEEP_FRACTION`` of the longest wait that survived,
   within [floor, ceiling]: the UDP channels' keepalive interval, and with
   it their dead-channel time. Until it is known they use the configured
   ``keepalive_interval``.

``Probe`` keeps no clock: every call takes ``now``.
"""

from __future__ import annotations

PROBE_GRACE = 1.0  # seconds an answer may be late (round trip, a busy server)
KEEP_FRACTION = 0.8  # of the measured lifetime: the keepalive comes well before it ends
CLOSE_ENOUGH = 0.2  # bisect until the bounds are within 20% (or 0.5 s)


class Probe:
    """One discovery: the next wait to try, and what the answers showed."""

    def __init__(self, floor: float, ceiling: float, now: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError("need 0 < floor <= ceiling")
        self.floor = floor
        self.ceiling = ceiling
        self.survived = 0.0  # longest wait whose answer came
        self.lost: float | None = None  # shortest wait whose answer did not
        self.wait = min(2 * floor, ceiling)
        self.sent_at: float | None = None  # the pending probe's send time
        self.next_at = now  # when to send the next probe
        self.result: float | None = None  # the keepalive interval, once known
        self.probes = 0

    # -- what to do --------------------------------------------------------------

    def due(self, now: float) -> int | None:
        """The wait (ms) of a PROBE to send now, or None."""
        if self.result is not None or self.sent_at is not None or now < self.next_at:
            return None
        self.sent_at = now
        self.probes += 1
        return round(self.wait * 1000)

    def deadline(self) -> float | None:
        """When ``tick`` must be called next (None: discovery is over)."""
        if self.result is not None:
            return None
        if self.sent_at is not None:
            return self.sent_at + self.wait + PROBE_GRACE
        return self.next_at

    def tick(self, now: float) -> None:
        """A pending probe's answer is overdue: that wait was too long."""
        if self.sent_at is not None and now >= self.sent_at + self.wait + PROBE_GRACE:
            self._answered(False, now)

    def answered(self, wait_ms: int, now: float) -> None:
        """A PROBE_ACK for ``wait_ms`` arrived (an old one's is ignored)."""
        if self.sent_at is not None and wait_ms == round(self.wait * 1000):
            self._answered(True, now)

    # -- the search --------------------------------------------------------------

    def _answered(self, survived: bool, now: float) -> None:
        self.sent_at = None
        self.next_at = now
        if survived:
            self.survived = max(self.survived, self.wait)
        else:
            self.lost = self.wait if self.lost is None else min(self.lost, self.wait)
        if self.survived >= self.ceiling:
            self._finish()
        elif self.lost is None:
            self.wait = min(2 * self.wait, self.ceiling)
        elif self.lost <= self.floor or self.lost - self.survived <= max(0.5, CLOSE_ENOUGH * self.survived):
            self._finish()
        else:
            self.wait = (self.survived + self.lost) / 2 if self.survived else self.lost / 2

    def _finish(self) -> None:
        self.result = min(self.ceiling, max(self.floor, KEEP_FRACTION * self.survived))
