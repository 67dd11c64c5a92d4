"""What both ends of the TCP channel share: decoding, states, closing.

``ChannelCore`` feeds received bytes to a ``FrameDecoder``, moves the channel
state through the table in tunnel/states.py *before* acting on each frame,
and turns a peer's protocol error into BYE plus a close. The mediator and
server cores subclass it and supply the handlers and the teardown.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Container, Iterable
from typing import Any, Generic, TypeVar

from tunnel.commands import ChannelClosed, CloseChannel, SendFrame
from tunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from tunnel.frames import (
    MIN_MAX_FRAME_SIZE, Bye, Bytes, Frame, FrameDecoder, FrameType, IPAddress, WindowUpdate,
    data_chunk_size, encode_data_parts,
)
from tunnel.states import Local, Trigger
from tunnel.window import MAX_STREAM_WINDOW, STREAM_WINDOW, StreamWindow

S = TypeVar("S", bound=enum.Enum)

MAX_ID = (1 << 32) - 1


class IdAllocator:
    """u32 ids from ``first`` up to ``last``, never 0, never one still in use after wrapping."""

    def __init__(self, first: int = 1, last: int = MAX_ID) -> None:
        self._first, self._last = first, last
        self._next = first
        self.wrapped = False

    def new(self, in_use: Container[int]) -> int:
        while True:
            candidate = self._next
            self._next = candidate + 1 if candidate < self._last else self._first
            if candidate == self._last:
                self.wrapped = True
            if candidate not in in_use:
                return candidate

    def issued(self, value: int) -> bool:
        """Could ``value`` have come from this allocator?"""
        if not self._first <= value <= self._last:
            return False
        return self.wrapped or value < self._next


class ChannelCore(abc.ABC, Generic[S]):
    """Decoder, state table and closing rules of one end of a TCP channel."""

    def __init__(
        self,
        state: S,
        transitions: dict[S, dict[Trigger, S]],
        closed: S,
        versions: tuple[int, ...],
        max_frame_size: int,
    ) -> None:
        self._state = state
        self._transitions = transitions
        self._closed = closed
        self.closed = state == closed
        """Whether the channel is over (the closed state): kept by ``_move``, read for every event."""
        self._versions = versions
        self._decoder = FrameDecoder(max_frame_size, versions)
        self.read_buffer: Callable[[int], memoryview] = self._decoder.get_buffer
        """``read_buffer(sizehint)``: where the I/O layer may write the
        channel's next bytes (about ``sizehint`` of them:
        ``BufferedProtocol.get_buffer``); then ``receive_into``. No copy of
        them is made before their frames. The decoder's own method: the
        TLS layer asks for every read."""
        self._version: int | None = None
        # What the negotiated version has (nothing until then); attributes,
        # not properties: the I/O layers ask for every relayed event.
        self.pipelines_connect = False
        """Version 2: OPEN_CONNECT and CHECK_TARGET (one round trip per new connection)."""
        self.windowed = False
        """Version 3: per-connection windows (a slow reader no longer holds the channel)."""
        self.opens_streams = False
        """Version 4: OPEN_STREAM (a connection's first bytes before its OPENED), and
        both FINs or an RST release a connection's id, without CLOSE and ACK."""
        self.grows_windows = False
        """Version 5: a receiver may grow a connection's window past ``STREAM_WINDOW``."""
        self.window_max = STREAM_WINDOW
        """The largest window this end gives a connection (version 5; the
        settings' ``stream_window_max``)."""
        self.window_budget = 0
        """What this end's grown windows may add up to (the settings' ``stream_window_budget``)."""
        self.windows_grown = 0
        """Times this end grew a connection's window (version 5)."""
        self._peer_max_frame = MIN_MAX_FRAME_SIZE
        self._last_received = 0.0
        self._handlers: dict[FrameType, Callable[[Any, float], list[Any]]] = {}

    @property
    def state(self) -> S:
        """The channel state (see tunnel/states.py)."""
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once there is one."""
        return self._version

    def _move(self, trigger: Trigger) -> None:
        target = self._transitions[self._state].get(trigger)
        if target is None:
            if isinstance(trigger, FrameType):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_FRAME, f"{trigger.name} not allowed in {self._state.value}"
                )
            raise LocalProtocolError(f"{trigger.value} not allowed in {self._state.value}")
        self._state = target
        self.closed = target == self._closed

    def _negotiated(self, version: int, peer_max_frame: int) -> None:
        self._version = version
        self._decoder.version = version
        self._peer_max_frame = peer_max_frame
        self.pipelines_connect, self.windowed, self.opens_streams = version >= 2, version >= 3, version >= 4
        self.grows_windows = version >= 5

    def _window(self) -> StreamWindow | None:
        """A new connection's windows: none before version 3, fixed before 5."""
        if self.grows_windows:
            return StreamWindow(MAX_STREAM_WINDOW, self.window_max)
        return StreamWindow() if self.windowed else None

    def _windows(self) -> Iterable[StreamWindow]:
        """The live connections' windows (for the budget)."""
        return ()

    def grown_bytes(self) -> int:
        """What the live connections' windows have grown by, in all (against ``window_budget``)."""
        return sum(w.grown for w in self._windows())

    def _grant(self, port_id: int, credit: StreamWindow, n: int) -> list[SendFrame]:
        """``n`` bytes of a connection left our socket's buffer: its WINDOW_UPDATE,
        if one is due, with what its window grows by (version 5). Sent at once:
        the peer's sender may be waiting for it."""
        grant = credit.consumed(n)
        if not grant:
            return []
        if credit.ripe:
            extra = credit.grow(self.window_budget - self.grown_bytes())
            if extra:
                self.windows_grown += 1
                grant += extra
        out = self._send(WindowUpdate(port_id, grant))
        out.prompt = True
        return [out]

    def _send(self, frame: Frame, hold: bool = False) -> SendFrame:
        return SendFrame(frame, self._version if self._version is not None else max(self._versions), hold)

    def _data_frames(
        self, port_id: int, address: IPAddress, port: int, data: Bytes, *, stream: bool
    ) -> list[SendFrame]:
        """DATA frames for ``data``: a stream is cut to the peer's max frame
        size (views of ``data``, not copies), a datagram must fit in one
        frame (it cannot be split). Encoded here, from the fields: no
        ``Data`` is built for a relayed chunk."""
        version = self._version if self._version is not None else max(self._versions)
        chunk = data_chunk_size(self._peer_max_frame, address)
        if stream and not data:
            return []
        if len(data) <= chunk:
            return [SendFrame.encoded(encode_data_parts(port_id, address, port, data, version), datagram=not stream)]
        if not stream:
            raise LocalProtocolError(f"a {len(data)}-byte datagram does not fit in a frame")
        data = memoryview(data)
        return [
            SendFrame.encoded(encode_data_parts(port_id, address, port, data[i : i + chunk], version))
            for i in range(0, len(data), chunk)
        ]

    def receive_into(self, nbytes: int, now: float) -> list[Any]:
        """``nbytes`` were written into ``read_buffer``'s view: as ``receive_data``."""
        self._decoder.buffer_updated(nbytes)
        return self._drain(now)

    def _receive(self, data: bytes, now: float) -> list[Any]:
        if self.closed:
            return []
        self._decoder.feed(data)
        return self._drain(now)

    def _drain(self, now: float) -> list[Any]:
        """The frames buffered so far, handled in order."""
        out: list[Any] = []
        decoder, handlers = self._decoder, self._handlers
        while not self.closed:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    break
                self._last_received = now
                kind = frame.TYPE
                if self._transitions[self._state].get(kind) is not self._state:
                    self._move(kind)  # a change of state, or the frame's refusal
                out += handlers[kind](frame, now)
            except ProtocolError as err:
                out += self._fault(err.code, err.message)
                break
        return out

    def _fault(self, code: ErrorCode, message: str) -> list[Any]:
        """Close because the peer broke the protocol or went silent."""
        self._move(Local.FAULT)
        return [self._send(Bye(code, message)), *self._teardown(code, message, by_peer=False)]

    def _on_bye(self, frame: Bye, now: float) -> list[Any]:
        return self._teardown(frame.code, frame.message, by_peer=True)

    def _close(self, code: ErrorCode, message: str, *, send_bye: bool) -> list[Any]:
        if self.closed:
            return []
        self._move(Local.CLOSE)
        head: list[Any] = [self._send(Bye(code, message))] if send_bye else []
        return head + self._teardown(code, message, by_peer=False)

    def channel_lost(self, message: str = "channel lost") -> list[Any]:
        """The I/O layer lost the TCP channel (EOF, reset, TLS error)."""
        if self.closed:
            return []
        self._move(Local.CLOSE)
        return self._teardown(None, message, by_peer=True)

    def _teardown(self, code: ErrorCode | None, message: str, *, by_peer: bool) -> list[Any]:
        """Release everything; the state is already the closed one."""
        return [*self._release(), CloseChannel(), ChannelClosed(code, message, by_peer)]

    @abc.abstractmethod
    def _release(self) -> list[Any]:
        """Forget the session's ports; commands to close their sockets."""
