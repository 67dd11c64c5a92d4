"""The receiving side: authenticate a datagram, refuse replays, fold redundant copies.

``Guard.check(data, now)`` returns a ``Received`` or a ``Refusal`` and never
raises, whatever the bytes. The checks run in a fixed order, cheapest and
least trusting first, so that nothing from an unauthenticated datagram is
believed before the MAC has passed:

1. size, version, type, direction: a type's size is fixed, so a truncated
   or padded datagram goes before any hashing (TOO_SHORT, MALFORMED,
   BAD_VERSION, UNKNOWN_TYPE, WRONG_DIRECTION);
2. a fresh copy of a message already accepted, recognised by its content
   (DUPLICATE; "Copies" below);
3. the MAC, compared in constant time (BAD_MAC);
4. the timestamp, within +-``replay_window`` of ``now`` (STALE);
5. the sequence number, against the sender's sliding window (REPLAY);
6. the body (MALFORMED).

The Guard's state changes only when it accepts a datagram (or counts a
copy), so a refused datagram can be refused again the same way.

Why both a timestamp and a sequence number. The sequence window alone
refuses a replay only while the receiver remembers the sender: after the
receiver restarts, or forgets a sender to bound its memory, every message
ever captured would be new again. The timestamp alone bounds a replay to the
window but cannot tell a replay inside it from a fresh message. Together:
the timestamp gives every message a shelf life, so the sequence state only
has to cover one window and may be forgotten after it.

Forgetting safely. A sender is forgotten when every message it has had
accepted is stale, or when the table is full (``max_senders``) and it is
the least recently heard from. Either way the Guard raises its ``horizon``
to the newest timestamp it accepted from that sender, and refuses
(REPLAY) any message from a sender it does not know whose timestamp is not
newer than the horizon. The horizon starts at the Guard's creation: a
receiver that restarts refuses everything sent before it existed, which
closes the window an attacker would otherwise get by replaying the last
few seconds of traffic to a fresh process. (Create the Guard before binding
the socket.) The cost: when more than ``max_senders`` senders are active
within one window, a new sender whose clock is behind an evicted one's is
refused until it catches up. On one host the clocks are the same clock.

Copies. The seed's "simple redundancy" ("Out-of-band signalling") sends a
message several times. Copies share the sender, sequence number, timestamp
and body and differ only in the copy byte (so also in the MAC). The first to
arrive is accepted; another copy number of the same content is DUPLICATE,
silently dropped; the same copy number again, or other content under a
sequence number already used, is REPLAY: an honest sender never sends the
same bytes twice. A copy is recognised before its MAC is checked, by its
content's digest against the accepted message's (which passed the MAC):
the HMAC runs once per message, not once per copy. Nothing of a copy is
believed: it is dropped either way, and the only state it touches is its
copy bit, so a forged copy (the accepted content under another copy byte,
any MAC) is counted DUPLICATE rather than BAD_MAC, and the genuine copy of
that number after it REPLAY; neither is ever accepted.
"""

from __future__ import annotations

import enum
import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from firewall.replay import ReplayWindow
from firewall.signalling.codec import (
    COPY_OFFSET,
    DATAGRAM_SIZE,
    HEADER,
    HEADER_SIZE,
    MAC_SIZE,
    MAX_COPIES,
    MIN_MESSAGE_SIZE,
    VERSION,
    Mac,
    decode_body,
    timestamp_ms,
)
from firewall.signalling.messages import SENDER_OF, Message, MsgType, Role

DEFAULT_REPLAY_WINDOW = 5.0  # seconds; the default of the config's signalling.replay_window

# How far behind its newest sequence number a sender's message may arrive.
# Over the blind-track veth datagrams arrive in the order sent; the window
# only has to cover a burst of copies and replies interleaved by the
# sender's event loop. 1024 costs 10 KiB per sender (two arrays and the window).
SEQ_WINDOW = 1024

# Senders tracked at once. One per processor instance (at most 64 NFQUEUEs,
# firewall.config.MAX_QUEUES) on the gateway side; one per gateway process
# and per restart within a window on the processor side. 128 senders cost
# at most 1.3 MiB.
MAX_SENDERS = 128

_DIGEST_SIZE = 8  # bytes; tells copies of one seq apart from other content under it


class Refusal(enum.Enum):
    """Why ``Guard.check`` did not accept a datagram. The caller counts these."""

    TOO_SHORT = "shorter than its message type's size"
    BAD_VERSION = "unknown protocol version"
    UNKNOWN_TYPE = "unknown message type"
    WRONG_DIRECTION = "a type this receiver's peer never sends"
    BAD_MAC = "MAC does not match: wrong key or altered"
    STALE = "timestamp outside the replay window"
    REPLAY = "already seen, or older than the sender's window"
    DUPLICATE = "a redundant copy of a message already accepted"
    MALFORMED = "longer than its type's size, or a field out of range"


@dataclass(frozen=True, slots=True)
class Received:
    """An accepted message and its header."""

    sender: int
    seq: int
    timestamp_ms: int
    copy: int
    message: Message


class _Sender:
    """The replay state of one sender: its ``ReplayWindow`` and, per slot, what was accepted.

    Slot ``seq % window`` holds that seq's content digest and a mask of the
    copies seen. Two seqs inside one window never share a slot, so while the
    window says a seq was seen, its slot is that seq's.
    """

    __slots__ = ("window", "max_ts", "digests", "copies")

    def __init__(self, window: int) -> None:
        self.window = ReplayWindow(window)
        self.max_ts = 0  # the newest timestamp accepted
        self.digests = array("Q", bytes(8 * window))
        self.copies = array("H", bytes(2 * window))


class Guard:
    """Accepts authentic, fresh, first-seen datagrams for one receiver (pure: ``now`` is passed in)."""

    def __init__(
        self,
        key: bytes,
        receiver: Role,
        *,
        now: float,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        seq_window: int = SEQ_WINDOW,
        max_senders: int = MAX_SENDERS,
    ) -> None:
        if not (math.isfinite(replay_window) and replay_window > 0):
            raise ValueError(f"replay_window must be a positive number of seconds, got {replay_window!r}")
        if seq_window < 1 or max_senders < 1:
            raise ValueError("seq_window and max_senders must be at least 1")
        self._mac = Mac(key)
        self.receiver = receiver
        self._accepts = frozenset(t for t, sender in SENDER_OF.items() if sender is not receiver)
        self._types = {int(t): t for t in MsgType}
        self._window_ms = round(replay_window * 1000)
        self._seq_window = seq_window
        self._max_senders = max_senders
        self._senders: OrderedDict[int, _Sender] = OrderedDict()  # least recently accepted first
        # Anything sent before this Guard existed is refused (module docstring).
        self._horizon = timestamp_ms(now) - 1

    @property
    def senders(self) -> int:
        """How many senders' windows are held."""
        return len(self._senders)

    @property
    def horizon(self) -> int:
        """Unix ms; an unknown sender's message must be newer than this."""
        return self._horizon

    def check(self, data: bytes | bytearray | memoryview, now: float) -> Received | Refusal:
        """The message in ``data``, or why not. Never raises."""
        if type(data) is not bytes:
            data = bytes(data)  # a memoryview or bytearray from a recv_into buffer
        size = len(data)
        if size < MIN_MESSAGE_SIZE:
            return Refusal.TOO_SHORT
        version, raw_type, copy, sender, seq, ts = HEADER.unpack_from(data)
        if version != VERSION:
            return Refusal.BAD_VERSION
        msg_type = self._types.get(raw_type)
        if msg_type is None:
            return Refusal.UNKNOWN_TYPE
        if msg_type not in self._accepts:
            return Refusal.WRONG_DIRECTION
        expected = DATAGRAM_SIZE[msg_type]
        if size < expected:
            return Refusal.TOO_SHORT
        if size > expected or copy >= MAX_COPIES:
            return Refusal.MALFORMED

        now_ms = timestamp_ms(now)
        state = self._senders.get(sender)
        if state is not None and state.window.seen(seq) and abs(ts - now_ms) <= self._window_ms:
            # A later copy of a message already accepted: its content (all
            # but the copy byte and the MAC) matches the verified one's, so
            # it is folded without another MAC (module docstring, "Copies").
            slot = seq % self._seq_window
            seen = state.copies[slot]
            if not seen >> copy & 1 and state.digests[slot] == _digest(data):
                state.copies[slot] = seen | 1 << copy
                return Refusal.DUPLICATE

        if not self._mac.verify(data[:-MAC_SIZE], data[-MAC_SIZE:]):
            return Refusal.BAD_MAC

        if abs(ts - now_ms) > self._window_ms:
            return Refusal.STALE

        self._forget_stale(now_ms)
        state = self._senders.get(sender)
        if state is None:
            if ts <= self._horizon:
                return Refusal.REPLAY
        elif not state.window.check(seq):
            # The same copy again, other content under a used seq, or beyond
            # the window (where it cannot be told from a replay).
            return Refusal.REPLAY

        message = decode_body(msg_type, data[HEADER_SIZE:-MAC_SIZE])
        if message is None:
            return Refusal.MALFORMED

        if state is None:
            state = self._admit(sender)
        else:
            self._senders.move_to_end(sender)
        slot = seq % self._seq_window
        state.window.update(seq)
        state.digests[slot] = _digest(data)
        state.copies[slot] = 1 << copy
        state.max_ts = max(state.max_ts, ts)
        return Received(sender, seq, ts, copy, message)

    def _forget(self, sender: int) -> None:
        state = self._senders.pop(sender)
        self._horizon = max(self._horizon, state.max_ts)

    def _forget_stale(self, now_ms: int) -> None:
        # Oldest-heard-from first; stop at the first sender still live. The
        # order is by acceptance, not timestamp, so a stale sender behind a
        # live one waits a little longer: memory stays capped by max_senders.
        oldest = now_ms - self._window_ms
        while self._senders:
            sender, state = next(iter(self._senders.items()))
            if state.max_ts >= oldest:
                return
            self._forget(sender)

    def _admit(self, sender: int) -> _Sender:
        if len(self._senders) >= self._max_senders:
            self._forget(next(iter(self._senders)))
        state = _Sender(self._seq_window)
        self._senders[sender] = state
        return state


def _digest(data: bytes) -> int:
    """The content of a datagram, leaving out what differs between copies (copy byte, MAC)."""
    content = data[:COPY_OFFSET] + data[COPY_OFFSET + 1 : -MAC_SIZE]
    return int.from_bytes(hashlib.blake2b(content, digest_size=_DIGEST_SIZE).digest(), "big")
