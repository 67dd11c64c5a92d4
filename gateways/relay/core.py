"""The relay core: what happens to the bytes and the ends of two TCP legs, decided without I/O.

Theory of operation
-------------------
A relay joins two TCP connections: leg A, the one the gateway accepted, and
leg B, the one it opened. ``RelayCore`` is told what happened on them
(events) and answers what to do (commands), in the manner of mitmproxy's
``layers/tcp.py``; it never touches a socket. One driver carries the
commands out (``gateways/relay/driver.py``), for every gateway that relays.

A direction is named by the leg its bytes come from. For each:

- Data. ``DataReceived(side, data)`` becomes ``SendData(other, data)``,
  after the direction's inspector, if it has one, has seen the chunk and
  said ``PASS`` (or ``Replace(new)``: ``new`` is sent instead; or ``CLOSE``,
  or it raised: both legs are reset, reason ``hook``, because a broken check
  must not let data through unchecked). A direction without an inspector
  may be spliced: ``Spliced(side, size)`` says ``size`` bytes wait in the
  driver's pipe unread, and becomes ``SendSpliced(other, size)``.
- Backpressure. ``DataSent(side, size)`` confirms bytes written to ``side``.
  ``wants_read(side)`` is false while any byte read from ``side`` is still
  unsent, so each direction holds at most one chunk (one read, or one
  pipeful): a peer that stops reading stops its counterpart's sender too.
- Half-close (RFC 9293 section 3.6: a FIN says "no more data from me", and
  the other direction goes on). ``FinReceived(side)`` becomes
  ``HalfClose(other)`` (shutdown(SHUT_WR)) once every byte before the FIN is
  sent. When both directions are half-closed: ``Close`` both, ``Done("done")``.
- Reset. A read or write that fails on a leg (``ResetReceived``) means its
  peer reset, or the connection broke: both legs are reset (SO_LINGER 0, so
  the other peer sees an RST too, RFC 9293 section 3.5.2) and the reason is
  ``<name>_reset``, with the leg's name given at construction. A reset is
  seen after the bytes its peer sent before it (the kernel returns them
  first), and carried at once: the other peer gets what reached its
  socket's buffer and was sent before the RST; what the relay still holds
  for it, or its socket has not sent, is dropped (an RST discards the send
  queue), so a reset never passes off a truncated stream as complete.
- Idle. ``Tick`` at ``deadline()``: with no byte moved either way for
  ``idle_timeout``, both legs are closed, reason ``idle``: with a FIN, unless
  bytes for that leg are still unsent (a FIN would pass off a truncated
  stream as complete) or ``Limits.reset_on_idle`` says a FIN is never
  honest for this protocol (FTP data: a FIN ends the file).
- Limit. ``Limits.max_bytes`` counts both directions together; the chunk
  that passes it is not forwarded, and both legs are reset, reason ``limit``.
- ``Abort(reason)``: someone outside ends the relay (the processor ended the
  flow, the gateway is stopping): both legs are reset.

Every ending is one ``Done`` after the commands for both legs; the core
then answers nothing more. Byte counts (``received``) count what was read
from each leg, forwarded or not, and are exact.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union


class Side(enum.Enum):
    A = "a"  # leg A: the connection the gateway accepted
    B = "b"  # leg B: the connection the gateway opened

    # Sides key the relay's per-leg tables, several look-ups a chunk; a
    # member is its own only instance, so identity is its hash (Enum's
    # own hashes the name in Python).
    __hash__ = object.__hash__

    @property
    def other(self) -> "Side":
        return _OTHER[self]


_OTHER = {Side.A: Side.B, Side.B: Side.A}


# ---- inspection ----------------------------------------------------------------------------------


class Verdict(enum.Enum):
    PASS = "pass"  # forward the chunk as it is
    CLOSE = "close"  # forward nothing more: reset both legs


@dataclass(frozen=True, slots=True)
class Replace:
    """Forward ``data`` instead of the chunk (``b""``: nothing)."""

    data: bytes


# Sees each chunk of one direction, in order. Anything but PASS or a Replace
# is taken as CLOSE: a hook that returns None by mistake must not pass data.
Inspector = Callable[[bytes], Union[Verdict, Replace]]


@dataclass(frozen=True)
class Limits:
    idle_timeout: float = 0.0  # seconds without a byte either way; 0: none
    max_bytes: int = 0  # bytes both ways together; 0: none
    reset_on_idle: bool = False  # idle ends with RST on both legs instead of FIN


# ---- events in -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataReceived:
    side: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class Spliced:
    """``size`` bytes read from ``side`` wait in the driver's pipe, unseen."""

    side: Side
    size: int


@dataclass(frozen=True, slots=True)
class DataSent:
    """``size`` more bytes reached ``side``'s socket."""

    side: Side
    size: int


@dataclass(frozen=True, slots=True)
class FinReceived:
    side: Side


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """Reading from or writing to ``side`` failed: its peer reset, or the connection broke."""

    side: Side


@dataclass(frozen=True, slots=True)
class Tick:
    """The driver's timer: ``deadline()`` has come."""


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str
    detail: str = ""


Event = Union[DataReceived, Spliced, DataSent, FinReceived, ResetReceived, Tick, Abort]

TICK = Tick()


# ---- commands out --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendData:
    side: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class SendSpliced:
    """Move ``size`` bytes from the other direction's pipe to ``side``."""

    side: Side
    size: int


@dataclass(frozen=True, slots=True)
class HalfClose:
    """shutdown(SHUT_WR): a FIN to ``side``'s peer; reading from it goes on."""

    side: Side


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``side``; everything for it has been sent."""

    side: Side


@dataclass(frozen=True, slots=True)
class Reset:
    """Close ``side`` with RST (SO_LINGER 0), dropping whatever is unsent."""

    side: Side


@dataclass(frozen=True, slots=True)
class Done:
    reason: str  # done, idle, limit, hook, <name>_reset, or an Abort's reason
    detail: str = ""


Command = Union[SendData, SendSpliced, HalfClose, Close, Reset, Done]


class _Leg:
    __slots__ = ("side", "name", "inspector", "received", "unsent", "fin", "shut")

    def __init__(self, side: Side, name: str, inspector: Inspector | None) -> None:
        self.side = side
        self.name = name
        self.inspector = inspector
        self.received = 0  # bytes read from this leg
        self.unsent = 0  # bytes for this leg not yet confirmed sent
        self.fin = False  # its peer sent FIN
        self.shut = False  # we sent FIN to its peer (HalfClose)


class RelayCore:
    """The decisions of one relay between leg A and leg B (module docstring)."""

    def __init__(
        self,
        limits: Limits,
        now: float,
        *,
        inspectors: Mapping[Side, Inspector] | None = None,
        names: Mapping[Side, str] | None = None,
    ) -> None:
        names = names or {Side.A: "a", Side.B: "b"}
        inspectors = inspectors or {}
        self.limits = limits
        self.started = now
        self.last = now  # when a byte last moved either way
        self.outcome: Done | None = None
        self._legs = {side: _Leg(side, names[side], inspectors.get(side)) for side in Side}
        self._handlers: dict[type, Callable[[object, float], list[Command]]] = {
            DataReceived: self._data,  # type: ignore[dict-item]
            Spliced: self._spliced,  # type: ignore[dict-item]
            DataSent: self._sent,  # type: ignore[dict-item]
            FinReceived: self._fin,  # type: ignore[dict-item]
            ResetReceived: self._reset_received,  # type: ignore[dict-item]
            Tick: self._tick,  # type: ignore[dict-item]
            Abort: self._abort,  # type: ignore[dict-item]
        }

    # ---- queries -----------------------------------------------------------------------------

    def inspects(self, side: Side) -> bool:
        """Whether bytes from ``side`` must be seen (so they cannot be spliced)."""
        return self._legs[side].inspector is not None

    def wants_read(self, side: Side) -> bool:
        """Read from ``side`` now? Not after its FIN, nor while its last chunk is unsent."""
        leg = self._legs[side]
        return self.outcome is None and not leg.fin and self._legs[side.other].unsent == 0

    def received(self, side: Side) -> int:
        """Bytes read from ``side`` so far."""
        return self._legs[side].received

    @property
    def buffered(self) -> int:
        """Bytes read and not yet sent, both ways: what the relay holds."""
        return self._legs[Side.A].unsent + self._legs[Side.B].unsent

    def deadline(self) -> float | None:
        """When to send ``Tick``: the idle deadline, which each byte moved pushes back."""
        if self.outcome is not None or not self.limits.idle_timeout:
            return None
        return self.last + self.limits.idle_timeout

    # ---- events ------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        """The commands for ``event``, in the order they must be carried out."""
        if self.outcome is not None:
            return []
        return self._handlers[type(event)](event, now)

    def _data(self, event: DataReceived, now: float) -> list[Command]:
        src = self._legs[event.side]
        data = event.data
        over = self._count(src, len(data), now)
        if over:
            return over
        if src.inspector is not None:
            try:
                verdict = src.inspector(data)
            except Exception as exc:
                return self._reset_both("hook", f"the inspector raised {exc!r}")
            if isinstance(verdict, Replace):
                data = verdict.data
            elif verdict is not Verdict.PASS:
                return self._reset_both("hook")
        if not data:
            return []
        dst = self._legs[event.side.other]
        dst.unsent += len(data)
        return [SendData(dst.side, data)]

    def _spliced(self, event: Spliced, now: float) -> list[Command]:
        src = self._legs[event.side]
        if src.inspector is not None:
            raise RuntimeError(f"bytes from leg {src.side.value} must be inspected, not spliced")
        over = self._count(src, event.size, now)
        if over:
            return over
        dst = self._legs[event.side.other]
        dst.unsent += event.size
        return [SendSpliced(dst.side, event.size)]

    def _count(self, src: _Leg, size: int, now: float) -> list[Command]:
        src.received += size
        self.last = now
        limit = self.limits.max_bytes
        if limit and self._legs[Side.A].received + self._legs[Side.B].received > limit:
            return self._reset_both("limit", f"more than {limit} bytes")
        return []

    def _sent(self, event: DataSent, now: float) -> list[Command]:
        dst = self._legs[event.side]
        if event.size > dst.unsent:
            raise RuntimeError(f"{event.size} bytes sent to leg {dst.side.value}, {dst.unsent} were due")
        dst.unsent -= event.size
        self.last = now
        return self._half_close(dst)

    def _fin(self, event: FinReceived, now: float) -> list[Command]:
        self._legs[event.side].fin = True
        return self._half_close(self._legs[event.side.other])

    def _half_close(self, dst: _Leg) -> list[Command]:
        """Pass the FIN on to ``dst`` once its peer's FIN came and all before it is sent."""
        if dst.shut or dst.unsent or not self._legs[dst.side.other].fin:
            return []
        dst.shut = True
        out: list[Command] = [HalfClose(dst.side)]
        if self._legs[dst.side.other].shut:
            out += [Close(Side.A), Close(Side.B)]
            out.append(self._end("done"))
        return out

    def _reset_received(self, event: ResetReceived, now: float) -> list[Command]:
        return self._reset_both(f"{self._legs[event.side].name}_reset")

    def _tick(self, event: Tick, now: float) -> list[Command]:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        idle = self.limits.idle_timeout
        out: list[Command] = [
            Reset(leg.side) if self.limits.reset_on_idle or leg.unsent else Close(leg.side)
            for leg in self._legs.values()
        ]
        out.append(self._end("idle", f"{idle:g}s without data"))
        return out

    def _abort(self, event: Abort, now: float) -> list[Command]:
        return self._reset_both(event.reason, event.detail)

    def _reset_both(self, reason: str, detail: str = "") -> list[Command]:
        return [Reset(Side.A), Reset(Side.B), self._end(reason, detail)]

    def _end(self, reason: str, detail: str = "") -> Done:
        self.outcome = Done(reason, detail)
        return self.outcome
