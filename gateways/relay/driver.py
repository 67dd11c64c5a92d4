"""The one asyncio loop that carries out ``RelayCore``'s commands on two TCP sockets.

``await Relay(core, a, b).run(hold)`` relays until the core says ``Done``
and returns it; cancelled, it resets both legs first, and either way both
sockets are closed when it returns. It makes no decision
of its own (STYLE.md, "Relays are sans-IO too"): it reads when
``core.wants_read`` says so, writes what the core says, and reports back
what the kernel did. Everything runs from the event loop's readiness
callbacks (``add_reader``/``add_writer``): no task per direction, no
StreamReader buffer. A readable leg is read until the kernel says EAGAIN
(or the core wants no more): uvloop wakes a reader only once for a socket
in error, so the ECONNRESET behind a peer's last bytes must be read in the
same wake-up as those bytes.

Two byte paths, chosen per direction:

- splice, where the core inspects nothing: ``os.splice`` moves the bytes
  socket -> pipe -> socket inside the kernel, never copied into Python.
  A spliced direction starts on the copy path all the same, reading
  ``SPLICE_AFTER`` bytes at a time, and takes its pipe only when a read
  fills that: most relayed connections carry a request and an answer of
  a few KiB, for which a pipe is four system calls a direction (pipe2,
  F_SETPIPE_SZ, two closes) and the kernel's work behind them, and saves
  nothing (a small read costs one call either way); a direction that
  fills its reads is bulk, where a pipeful a call pays. From then on the
  direction's own pipe, grown with ``F_SETPIPE_SZ`` to ``PIPE_SIZE``
  (capped at /proc/sys/fs/pipe-max-size), carries it; if the kernel
  refuses the size the pipe keeps its default (64 KiB), and if no pipe can
  be had (out of descriptors) the direction stays on the copy path. The
  bytes already read when the pipe is opened are written before any from
  the pipe (``_flush``), and the core reads a leg only once they are sent,
  so the switch keeps the order.
- copy, where an inspector must see the bytes: ``recv`` of up to
  ``CHUNK`` bytes, the inspector, ``send``. Nothing else runs per chunk.

Backpressure comes from the core: a leg is read only while nothing read
from it is unsent, so a peer that stops reading leaves at most one pipeful
(or one read) per direction in the relay, and the kernel's full buffers
push back on the sender (a full pipe is what stops splice).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import socket
import struct
from collections import deque
from pathlib import Path
from typing import Any

from gateways.layer import Hold
from gateways.layer.outputs import EndCause
from gateways.relay.core import (
    TICK,
    Abort,
    Close,
    Command,
    DataReceived,
    DataSent,
    Done,
    Event,
    FinReceived,
    HalfClose,
    RelayCore,
    Reset,
    ResetReceived,
    SendData,
    SendSpliced,
    Side,
    Spliced,
)

# One read of an inspected direction: a quarter MiB keeps the per-chunk
# Python cost (the inspector's call) small against the bytes moved.
CHUNK = 1 << 18

# A spliced direction reads this much at a time before it has a pipe, and
# a read that fills it opens the pipe (the module docstring): the kernel's
# default pipe size, the most one splice would move without F_SETPIPE_SZ,
# so a direction whose reads stay under it gains nothing from a pipe.
SPLICE_AFTER = 1 << 16

# Each spliced direction's pipe: 1 MiB, the kernel's default pipe-max-size.
# A pipeful is what one splice moves, so larger means fewer wake-ups per
# byte; it is also the most one direction holds for a peer that stops
# reading. The pages are the socket buffers' own, taken by reference.
PIPE_SIZE = 1 << 20
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")

# Reads of one leg per readiness callback before the others' turn: enough
# that a wake-up ends with the kernel's EAGAIN (or the core saying stop),
# which a wake-up must (Relay._on_readable), few enough that one fast
# sender does not hold the loop.
READS_PER_WAKE = 16

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


def arm_reset(sock: Any) -> None:
    """Make the next close of ``sock`` send RST (a socket, or asyncio's TransportSocket)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def reset_socket(sock: socket.socket) -> None:
    """Close with RST: what a TCP peer sees when a connection is refused or aborted."""
    arm_reset(sock)
    sock.close()


@functools.cache
def pipe_size() -> int:
    """``PIPE_SIZE``, or less if the kernel allows less to an unprivileged pipe."""
    try:
        return min(PIPE_SIZE, int(PIPE_MAX_SIZE.read_text()))
    except (OSError, ValueError):
        return PIPE_SIZE


def open_pipe() -> tuple[int, int, int] | None:
    """A non-blocking pipe (read end, write end, capacity), or None when out of descriptors."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        capacity = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_size())
    except OSError:
        # EPERM past the user's pipe-user-pages-soft: the default size still works.
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, capacity


class _Leg:
    """One socket, and the pipe that bytes read from it go through (once spliced)."""

    __slots__ = ("side", "sock", "fd", "splice", "piped", "pipe_r", "pipe_w", "capacity", "unsent", "spliced",
                 "reading", "writing", "open")

    def __init__(self, side: Side, sock: socket.socket, splice: bool) -> None:
        self.side = side
        self.sock = sock
        self.fd = sock.fileno()
        self.splice = splice  # bytes from this leg go by splice once a read fills SPLICE_AFTER
        self.piped = False  # it carried bulk: it has had its pipe
        self.pipe_r = self.pipe_w = -1  # the pipe, while open
        self.capacity = SPLICE_AFTER if splice else CHUNK  # the most one read takes
        self.unsent: memoryview | None = None  # bytes for this leg not yet written (copy path)
        self.spliced = 0  # bytes for this leg waiting in the other leg's pipe
        self.reading = False
        self.writing = False
        self.open = True

    def open_pipe(self) -> None:
        """Splice from now on; without a pipe to be had, copy for good."""
        pipe = open_pipe()
        if pipe is None:
            self.splice, self.capacity = False, CHUNK
        else:
            self.pipe_r, self.pipe_w, self.capacity = pipe
            self.piped = True


class Relay:
    """Carries out one ``RelayCore``'s commands on leg A and leg B."""

    def __init__(self, core: RelayCore, a: socket.socket, b: socket.socket, *, splice: bool = True) -> None:
        self.core = core
        self.loop = asyncio.get_running_loop()
        legs = {}
        for side, sock in ((Side.A, a), (Side.B, b)):
            if sock.gettimeout() != 0.0:  # the gateways' sockets are non-blocking already: no FIONBIO ioctl
                sock.setblocking(False)
            # Whatever the peer sends is passed on at once, as asyncio's transports did.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            legs[side] = _Leg(side, sock, splice and not core.inspects(side))
        self._legs = legs
        self._queue: deque[Event] = deque()
        self._busy = False
        self._done: asyncio.Future[Done] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def spliced(self) -> dict[Side, bool]:
        """Which directions (by the leg they come from) move, or will move once bulk, by splice."""
        return {side: leg.splice for side, leg in self._legs.items()}

    @property
    def piped(self) -> dict[Side, bool]:
        """Which directions (by the leg they come from) have their pipe: they carried bulk."""
        return {side: leg.piped for side, leg in self._legs.items()}

    async def run(self, hold: Hold | None = None) -> Done:
        """Relay until the core is done; the processor ending ``hold``'s flow aborts it.

        The end comes by ``hold.notify`` (no task per connection waiting on
        ``hold.ended``), which replaces any ``on_end`` the hold had."""
        try:
            self._arm()
            self._feed_all()
            if hold is not None:
                hold.notify(self._flow_ended)
            return await self._done
        except asyncio.CancelledError:
            self.abort("shutdown")
            raise
        finally:
            self._release()

    def _flow_ended(self, cause: EndCause) -> None:
        if not self._done.done():  # a flow's end after the relay's is nothing to abort
            self.abort("flow_end", cause.value)

    def abort(self, reason: str, detail: str = "") -> None:
        """End the relay from outside: both legs are reset."""
        self._feed(Abort(reason, detail))

    # ---- the machinery -------------------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        self._queue.append(event)
        self._feed_all()

    def _feed_all(self) -> None:
        """Hand queued events to the core and carry out its commands; they may queue more."""
        if self._busy:
            return  # the loop below, further up the stack, takes it
        self._busy = True
        try:
            queue, core, now = self._queue, self.core, self.loop.time()
            while queue:
                for command in core.handle(queue.popleft(), now):
                    self._do(command)
        finally:
            self._busy = False
        self._watch()

    def _do(self, command: Command) -> None:
        leg = self._legs[command.side] if not isinstance(command, Done) else None
        if isinstance(command, SendSpliced):
            assert leg is not None
            leg.spliced += command.size
            self._flush(leg)
        elif isinstance(command, SendData):
            assert leg is not None
            data = memoryview(command.data)
            leg.unsent = data if not leg.unsent else memoryview(bytes(leg.unsent) + command.data)
            self._flush(leg)
        elif isinstance(command, HalfClose):
            assert leg is not None
            try:
                leg.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._queue.append(ResetReceived(leg.side))
        elif isinstance(command, Close):
            assert leg is not None
            self._close(leg, reset=False)
        elif isinstance(command, Reset):
            assert leg is not None
            self._close(leg, reset=True)
        elif isinstance(command, Done):
            if not self._done.done():
                self._done.set_result(command)

    def _on_readable(self, leg: _Leg) -> None:
        """Read ``leg`` until the kernel has nothing more, or the core wants no more from it.

        Not one read per wake-up: libuv (uvloop) stops polling a socket
        after the first wake-up that carries EPOLLERR, so a peer's data and
        RST that are both queued before the first read give one callback;
        read once, the RST's ECONNRESET would wait forever for a second one.
        Past ``READS_PER_WAKE`` the rest waits its turn behind the other
        connections (``call_soon``), not behind epoll."""
        for _ in range(READS_PER_WAKE):
            if not (leg.open and leg.reading):
                return  # the core wants no more now; add_reader polls the socket afresh when it does
            event = self._read(leg)
            if event is None:
                return  # nothing more; epoll says when there is
            self._feed(event)
        self.loop.call_soon(self._on_readable, leg)

    def _read(self, leg: _Leg) -> Event | None:
        """One read of ``leg``, as the core's event; None when the kernel has nothing."""
        try:
            if leg.pipe_w >= 0:
                size = os.splice(leg.fd, leg.pipe_w, leg.capacity, flags=_SPLICE_FLAGS)
                return Spliced(leg.side, size) if size else FinReceived(leg.side)
            data = leg.sock.recv(leg.capacity)
            if not data:
                return FinReceived(leg.side)
            if leg.splice and len(data) == SPLICE_AFTER:
                leg.open_pipe()  # bulk: the next read splices, after these bytes are sent
            return DataReceived(leg.side, data)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return ResetReceived(leg.side)

    def _on_writable(self, leg: _Leg) -> None:
        self._flush(leg)
        self._feed_all()

    def _flush(self, leg: _Leg) -> None:
        """Write what is due to ``leg`` until the kernel takes no more; report what it took."""
        sent = 0
        try:
            # Copied bytes first: a direction's last read before its pipe opened
            # came before everything in the pipe (the module docstring).
            while leg.unsent:
                n = leg.sock.send(leg.unsent)
                leg.unsent = leg.unsent[n:]
                sent += n
            if leg.spliced:
                source = self._legs[leg.side.other].pipe_r
                while leg.spliced:
                    n = os.splice(source, leg.fd, leg.spliced, flags=_SPLICE_FLAGS)
                    if not n:
                        break  # cannot happen while the pipe holds bytes; never spin on it
                    leg.spliced -= n
                    sent += n
        except (BlockingIOError, InterruptedError):
            pass  # the socket's buffer is full: add_writer below
        except OSError:
            leg.spliced, leg.unsent = 0, None
            self._queue.append(ResetReceived(leg.side))
        if sent:
            self._queue.append(DataSent(leg.side, sent))
        due = bool(leg.spliced or leg.unsent)
        if due != leg.writing and leg.open:
            leg.writing = due
            if due:
                self.loop.add_writer(leg.fd, self._on_writable, leg)
            else:
                self.loop.remove_writer(leg.fd)

    def _watch(self) -> None:
        """Read exactly the legs the core wants read."""
        core = self.core
        for leg in self._legs.values():
            want = leg.open and core.wants_read(leg.side)
            if want != leg.reading:
                leg.reading = want
                if want:
                    self.loop.add_reader(leg.fd, self._on_readable, leg)
                else:
                    self.loop.remove_reader(leg.fd)

    def _arm(self) -> None:
        deadline = self.core.deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._feed(TICK)
        self._arm()

    def _close(self, leg: _Leg, *, reset: bool) -> None:
        if not leg.open:
            return
        leg.open = False
        if leg.reading:
            self.loop.remove_reader(leg.fd)
            leg.reading = False
        if leg.writing:
            self.loop.remove_writer(leg.fd)
            leg.writing = False
        if reset:
            reset_socket(leg.sock)
        else:
            leg.sock.close()

    def _release(self) -> None:
        """After the end, or a bug: no leg stays open, no pipe, no timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for leg in self._legs.values():
            self._close(leg, reset=True)
            for fd in (leg.pipe_r, leg.pipe_w):
                if fd >= 0:
                    os.close(fd)
            leg.pipe_r = leg.pipe_w = -1
