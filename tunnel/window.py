"""Per-connection credit windows on the TCP channel (protocol version 3), sans-IO.

Theory of operation
-------------------

Every relayed TCP connection shares the one TCP channel (the seed's single
channel). Without a window of its own, a private or public host that reads
slowly makes its side stop reading the channel, and every other connection
and every request waits behind it (issue 14 D). Version 3 gives each
connection, in each direction, a credit of ``STREAM_WINDOW`` bytes of DATA
payload, as SSH's channel windows and HTTP/2's stream windows do:

- the sender sends at most its credit; what its socket read beyond it is
  held here (at most one read, since the I/O layer stops reading that socket
  as soon as it is told to), and a FIN waits behind held bytes;
- the receiver writes what arrives to its socket and gives the credit back
  with WINDOW_UPDATE once the bytes have left its socket's buffer, in pieces
  of at least ``GRANT_AT`` bytes. So the receiver never holds more than a
  window per connection, and never needs to stop reading the channel.

A grant is a quarter of the window (``GRANT_AT`` for the first one), at
most the window less asyncio's write-buffer high-water mark (64 KiB): a
receiver whose buffer drains below that mark without a ``resume_writing``
then still holds enough flushed, ungranted bytes to have granted them at
its last write, so a sender is never left without credit.

**Growing windows (version 5).** Every window starts at ``STREAM_WINDOW``.
A fixed 256 KiB caps one connection at a window per round trip of the
credit: 2 Gbit/s at 1 ms, 42 Mbit/s across a 50 ms path. From version 5 a
receiver may give more credit than was consumed, up to ``MAX_STREAM_WINDOW``:
its window doubles, up to its own ``stream_window_max``, each time a whole
window's worth has gone on to a reader that kept up (nothing of the
connection waiting in our socket's buffer when the credit went back). A
reader that falls behind never grows its window, so it still holds at most
a window; what the grown windows of one channel add up to is bounded by its
``stream_window_budget`` (the core asks ``grow`` with the room that leaves).
"""

from __future__ import annotations

from tunnel.frames import Bytes

STREAM_WINDOW = 256 * 1024
"""Bytes of DATA payload in flight per connection and direction (version 3):
where every window starts, and all it is before version 5. A protocol
constant: 256 KiB keeps one stream near 2 Gbit/s at a 1 ms round trip, and
500 stalled readers under 128 MiB of buffers."""
GRANT_AT = STREAM_WINDOW // 4
MAX_STREAM_WINDOW = 16 << 20
"""Version 5: the most credit a receiver may give one connection; more is
the peer's protocol error."""


class StreamWindow:
    """Both directions of one connection's credit.

    ``limit``: the most credit the peer may give us (``STREAM_WINDOW``
    before version 5, ``MAX_STREAM_WINDOW`` from it). ``grow_to``: the
    largest window we give the peer (``STREAM_WINDOW``: it never grows)."""

    __slots__ = ("credit", "held", "fin_held", "paused", "outstanding", "flushed", "limit", "size", "grow_to",
                 "moved")

    def __init__(self, limit: int = STREAM_WINDOW, grow_to: int = STREAM_WINDOW) -> None:
        self.credit = STREAM_WINDOW  # bytes we may still send
        self.held: Bytes = b""  # read from our socket, not yet sendable (a view into that read)
        self.fin_held = False  # our socket's FIN, waiting behind ``held``
        self.paused = False  # the I/O layer was told to stop reading our socket
        self.outstanding = 0  # bytes received and not yet given back
        self.flushed = 0  # of those, bytes that left our socket's buffer
        self.limit = limit
        self.size = STREAM_WINDOW  # the window we give the peer
        self.grow_to = grow_to
        self.moved = 0  # bytes given back, with our reader keeping up, since the window last grew

    # -- sending ---------------------------------------------------------------

    def send(self, data: Bytes) -> tuple[Bytes, bool]:
        """What of held bytes and ``data`` may be sent now (the rest is held),
        and whether reading our socket must now stop or start again.

        Views, not copies: a read cut by the credit is sent and held as two
        views of it (a read that lands while bytes are held, at most one,
        is the only one joined)."""
        buf = (bytes(self.held) + data if data else self.held) if self.held else data
        n = min(len(buf), self.credit)
        self.credit -= n
        if n == len(buf):
            sendable, self.held = buf, b""
        else:
            view = memoryview(buf)
            sendable, self.held = view[:n], view[n:]
        paused = len(self.held) > 0 or self.credit == 0
        changed, self.paused = paused != self.paused, paused
        return sendable, changed

    def granted(self, increment: int) -> tuple[Bytes, bool] | None:
        """The peer gave ``increment`` bytes back: as ``send``; None if that
        is more than it may give (the peer's protocol error)."""
        if increment == 0 or self.credit + increment > self.limit:
            return None
        self.credit += increment
        return self.send(b"")

    # -- receiving -------------------------------------------------------------

    def received(self, n: int) -> bool:
        """``n`` bytes of DATA arrived; False if that overruns the window."""
        self.outstanding += n
        return self.outstanding <= self.size

    def consumed(self, n: int) -> int:
        """``n`` received bytes left our socket's buffer; the credit to give back now (0: not yet)."""
        self.flushed = min(self.outstanding, self.flushed + n)
        if self.flushed < self.size // 4:
            return 0
        grant, self.flushed = self.flushed, 0
        if grant == self.outstanding and self.size < self.grow_to:
            self.moved += grant  # nothing waits in our buffer: the reader keeps up
        self.outstanding -= grant
        return grant

    @property
    def ripe(self) -> bool:
        """A window's worth went on to a reader that kept up, and the window may still grow."""
        return self.moved >= self.size and self.size < self.grow_to

    @property
    def grown(self) -> int:
        """Bytes of window given beyond ``STREAM_WINDOW`` (what counts against the budget)."""
        return self.size - STREAM_WINDOW

    def grow(self, room: int) -> int:
        """Double the window, within ``grow_to`` and ``room`` bytes; the
        extra credit to give with the next grant (0: none). Either way the
        next try waits for another window's worth: with the budget spent, a
        busy channel does not add up its windows at every grant."""
        extra = min(self.size, self.grow_to - self.size, room)
        self.moved = 0
        if extra <= 0:
            return 0
        self.size += extra
        return extra
