"""The one sliding replay window, for every receiver of numbered, authenticated messages.

The IPsec anti-replay scheme (RFC 4303 section 3.4.3): a number above the
highest seen slides the window; one inside it is accepted once; one older
than the window is refused, since it can no longer be told from a replay.
A window, not a strict counter, because UDP may reorder.

Two receivers keep one window per peer: the signalling ``Guard`` per sender
(firewall/signalling/guard.py, which also tells redundant copies from
replays) and the tunnel's UDP channels per channel and direction
(tunnel/datagrams.py). Check a number only after the message's MAC or tag
has passed, so that forged messages cannot move the window.

Only the standard library: the gateways and the tunnel use it too.
"""

from __future__ import annotations


class ReplayWindow:
    """A bitmap of the last ``size`` sequence numbers, below and including ``highest``."""

    __slots__ = ("size", "highest", "_bits", "_mask")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set: highest - i was seen
        self._mask = (1 << size) - 1

    def check(self, seq: int) -> bool:
        """Would ``seq`` be accepted? (Does not record it.)"""
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < self.size and not (self._bits >> offset) & 1

    def seen(self, seq: int) -> bool:
        """Was ``seq`` recorded, and is it still inside the window?"""
        offset = self.highest - seq
        return 0 <= offset < self.size and bool((self._bits >> offset) & 1)

    def update(self, seq: int) -> None:
        """Record ``seq`` as seen (call only after ``check`` and the MAC)."""
        if seq > self.highest:
            jump = seq - self.highest
            # A jump past the whole window clears it; shifting by an
            # authenticated but huge u64 jump would build a huge integer.
            self._bits = ((self._bits << jump) | 1) & self._mask if jump < self.size else 1
            self.highest = seq
        else:
            self._bits |= 1 << (self.highest - seq)

    def accept(self, seq: int) -> bool:
        """``check`` then ``update``: True if ``seq`` is new."""
        if not self.check(seq):
            return False
        self.update(seq)
        return True
