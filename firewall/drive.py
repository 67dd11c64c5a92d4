"""The one driver of a sans-IO core: carry out its outputs, keep its timer armed, tick it.

STYLE.md: "A single small server loop carries out the commands." Three
asyncio adapters drive a core that way, each with this class: the
deNAT/reNAT layer (``LayerCore``, gateways/layer/endpoint.py), the mediation
system (``MediatorCore``, tunnel/mediator.py) and the server's side of one
channel (``ServerSession``, tunnel/session.py). An adapter gives it:

- one handler per output type; an output of any other type is a bug of the
  adapter and raises ``KeyError``;
- the core's ``tick(now)`` and when it wants it next (``deadline(now)``);
- the clock the core's times are on: wall time for the layer, because
  signalling timestamps are wall time; the loop's monotonic clock for the
  tunnel.

After every batch of outputs the driver asks for the next deadline and keeps
one timer at or before it, so a core never has to say "call me later": a
deadline that moves earlier moves the timer; one that moves later leaves it,
and the early tick (which finds nothing due: a core's ``tick`` may be called
at any time) arms it again at the new deadline. It
makes no decision of its own (DESIGN.md invariant 9).

Only the standard library: the gateways and the tunnel import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Handler = Callable[[Any], None]


class CoreDriver:
    """Runs one core's outputs through its handlers and ticks it when its deadline comes."""

    def __init__(
        self,
        handlers: Mapping[type, Handler],
        *,
        tick: Callable[[float], Iterable[Any]],
        deadline: Callable[[float], float | None],
        clock: Callable[[], float],
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """``on_error``: where an exception from a tick goes instead of the
        event loop's handler (the layer counts it and keeps its timers)."""
        self._handlers = dict(handlers)
        self._tick = tick
        self._deadline = deadline
        self.clock = clock
        self._on_error = on_error
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._depth = 0  # runs under way: a handler's own ``run`` is nested in its caller's
        self.closed = False

    def run(self, outputs: Iterable[Any]) -> None:
        """Carry out ``outputs`` in order, then re-arm the timer (also when a
        handler raises). A run nested in a handler (the adapter feeds the
        core an I/O result at once) leaves the timer to the outermost run:
        no timer fires before that returns."""
        self._depth += 1
        try:
            for out in outputs:
                self._handlers[type(out)](out)
        finally:
            self._depth -= 1
            if not self._depth:
                self.arm()

    def arm(self) -> None:
        """Keep one timer at or before the core's next deadline (none if it has none, or once closed)."""
        if self.closed:
            return
        now = self.clock()
        deadline = self._deadline(now)
        if deadline == self._timer_at:
            return
        if deadline is not None and self._timer is not None and self._timer_at is not None and self._timer_at < deadline:
            # Moved later (a tunnel's silence deadline does at every frame):
            # the armed timer fires early, the tick finds nothing due, and the
            # timer is armed at the new deadline then -- one timer call per
            # deadline instead of one per event.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - now), self._on_timer)

    def close(self) -> None:
        """No timer survives this, and none is armed again."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        try:
            self.run(self._tick(self.clock()))
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)
            self.arm()
