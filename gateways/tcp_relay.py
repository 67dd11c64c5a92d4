"""tcp-relay: a transparent TCP gateway that logs each connection with its real addresses.

The smallest useful application gateway of the seed's system: it "processes
the packet as if it had received it directly from its original source"
("Signalling in general") and returns it by connecting to the firewall-side
endpoint ("Packet restoration", the swap). Processing here is relaying the
bytes unchanged; the value is the log line per connection with the original
tuple (client C:c, the destination it addressed S':s', the real server S:s),
which a packet filter behind NAT cannot give, and the limits below.

Per connection (leg A accepted on G:g from F:f):

1. Over ``max_connections`` live connections: reset at once, counted.
2. ``GatewayLayer.attach``: the original tuple, or ``FlowUnknown`` -> reset
   ("a flow whose original tuple never arrives is closed and counted").
3. One ``open`` line with the tuple; leg B to F:f within ``connect_timeout``
   (refused or timed out: reset leg A, as the server's own refusal would).
4. Bytes both ways with backpressure (``drain``), FIN carried across as a
   half-close in each direction, a reset on either leg carried as a reset
   to the other (SO_LINGER 0), ``idle_timeout`` without data either way
   closes both, and the processor's FLOW_END resets both (its binding is
   gone, so nothing more can pass).
5. One ``close`` line: bytes each way, duration, reason.

Limits come from the gateway's ``[gateway.settings]`` (firewall/config/settings.py).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Mapping

from firewall.config.settings import KIND_SETTINGS
from firewall.signalling import Endpoint, Proto
from gateways.layer import EventLog, FlowUnknown, GatewayLayer, Hold
from gateways.layer.endpoint import STREAM_LIMIT, endpoint_of
from gateways.tcp_server import CLOSE_FLUSH_TIMEOUT, TcpGateway, reset

# One read's worth: the StreamReader buffer size, so a read never waits for
# more than the reader can hold, and a full buffer is one write downstream.
READ_CHUNK = STREAM_LIMIT

_DEFAULTS = KIND_SETTINGS["tcp-relay"]


@dataclass(frozen=True)
class TcpRelaySettings:
    """The tcp-relay keys of ``[gateway.settings]``; defaults as in the config schema."""

    max_connections: int = _DEFAULTS["max_connections"].default
    idle_timeout: float = _DEFAULTS["idle_timeout"].default
    connect_timeout: float = _DEFAULTS["connect_timeout"].default

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "TcpRelaySettings":
        return cls(**{k: settings[k] for k in ("max_connections", "idle_timeout", "connect_timeout") if k in settings})


class _Leg(enum.Enum):
    """How one direction of copying ended."""

    EOF = "eof"  # the source sent FIN; it was passed on
    SOURCE_RESET = "source_reset"  # reading failed: the source reset
    SINK_FAILED = "sink_failed"  # writing failed: the destination reset


class _Connection:
    __slots__ = ("started", "last", "up", "down")

    def __init__(self, now: float) -> None:
        self.started = now
        self.last = now
        self.up = 0  # client -> server bytes
        self.down = 0  # server -> client bytes


class TcpRelay(TcpGateway):
    """The tcp-relay gateway: an asyncio server on G:g in front of a ``GatewayLayer``."""

    read_limit = STREAM_LIMIT

    def __init__(
        self,
        layer: GatewayLayer,
        *,
        listen: Endpoint,
        settings: TcpRelaySettings,
        log: EventLog,
    ) -> None:
        super().__init__(layer, listen=listen, log=log)
        self.settings = settings
        self._active = 0

    @property
    def active(self) -> int:
        """Connections accepted and not yet closed (those over the limit never count)."""
        return self._active

    # ---- one connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fw = endpoint_of(writer.get_extra_info("peername"))
        ag = endpoint_of(writer.get_extra_info("sockname"))
        if fw is None or ag is None:
            self.counters["closed.gone"] += 1  # reset before we looked at it
            writer.transport.abort()
            return
        if self._active >= self.settings.max_connections:
            self.counters["refused.max_connections"] += 1
            self.log.emit("refused", via=fw, reason="max_connections", limit=self.settings.max_connections)
            reset(writer)
            return
        self._active += 1
        self.counters["connections.accepted"] += 1
        try:
            try:
                hold = await self.layer.attach(Proto.TCP, fw, ag)
            except FlowUnknown as exc:
                self.counters["closed.unknown_flow"] += 1
                self.log.emit("unknown_flow", via=fw, to=ag, why=exc.why)
                reset(writer)
                return
            except asyncio.CancelledError:
                reset(writer)  # stopping before the flow was known
                raise
            with hold:
                await self._relay(hold, reader, writer)
        finally:
            self._active -= 1

    async def _relay(self, hold: Hold, a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter) -> None:
        flow = hold.flow
        loop = asyncio.get_running_loop()
        conn = _Connection(loop.time())
        self.log.emit(
            "open",
            flow=f"{flow.flow_id:#x}",
            client=flow.client,
            original_dst=flow.original_dst,
            server=flow.server,
            via=flow.firewall_side,
        )
        b_writer: asyncio.StreamWriter | None = None
        reason, detail = "error", ""
        try:
            try:
                b_reader, b_writer = await self.layer.open_tcp(flow, connect_timeout=self.settings.connect_timeout)
            except asyncio.TimeoutError:
                reason, detail = "connect_timeout", f"no answer within {self.settings.connect_timeout:g}s"
                reset(a_writer)
                return
            except OSError as exc:
                reason, detail = "connect_failed", exc.strerror or repr(exc)
                reset(a_writer)
                return
            reason, detail = await self._pump(conn, hold, a_reader, a_writer, b_reader, b_writer)
        except BaseException as exc:
            # Shutdown (the task is cancelled after the grace time), or a bug:
            # either way neither leg may be left open behind us.
            reason = "shutdown" if isinstance(exc, asyncio.CancelledError) else "error"
            reset(a_writer)
            if b_writer is not None:
                reset(b_writer)
            raise
        finally:
            self.counters[f"closed.{reason}"] += 1
            self.counters["bytes.up"] += conn.up
            self.counters["bytes.down"] += conn.down
            fields: dict[str, Any] = {"detail": detail} if detail else {}
            self.log.emit(
                "close",
                flow=f"{flow.flow_id:#x}",
                client=flow.client,
                server=flow.server,
                via=flow.firewall_side,
                reason=reason,
                bytes_up=conn.up,
                bytes_down=conn.down,
                duration=loop.time() - conn.started,
                **fields,
            )

    async def _pump(
        self,
        conn: _Connection,
        hold: Hold,
        a_reader: asyncio.StreamReader,
        a_writer: asyncio.StreamWriter,
        b_reader: asyncio.StreamReader,
        b_writer: asyncio.StreamWriter,
    ) -> tuple[str, str]:
        """Relay until both directions are done or something ends the connection; close both legs."""
        up = asyncio.create_task(self._copy(a_reader, b_writer, conn, upstream=True))
        down = asyncio.create_task(self._copy(b_reader, a_writer, conn, upstream=False))
        ended = asyncio.create_task(hold.ended.wait())
        idle = asyncio.create_task(self._idle(conn))
        pending: set[asyncio.Task[Any]] = {up, down, ended, idle}
        verdict: tuple[str, str] | None = None
        try:
            # Each pass retires at least one of the four tasks: at most four passes.
            while verdict is None and pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    verdict = ("flow_end", hold.cause.value if hold.cause else "")
                elif idle in done:
                    verdict = ("idle", f"{self.settings.idle_timeout:g}s without data")
                for task, upstream in ((up, True), (down, False)):
                    if task in done and verdict is None:
                        outcome = task.result()
                        if outcome is _Leg.SOURCE_RESET:
                            verdict = ("client_reset" if upstream else "server_reset", "")
                        elif outcome is _Leg.SINK_FAILED:
                            verdict = ("server_reset" if upstream else "client_reset", "")
                if verdict is None and up.done() and down.done():
                    verdict = ("done", "")
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        assert verdict is not None
        reason = verdict[0]
        if reason in ("done", "idle"):
            await _close(a_writer, b_writer)
        else:
            # A reset on one leg is carried to the other; a flow the processor
            # ended can carry nothing more, so both legs are reset.
            reset(a_writer)
            reset(b_writer)
        return verdict

    async def _copy(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Connection, *, upstream: bool
    ) -> _Leg:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await src.read(READ_CHUNK)
            except OSError:
                return _Leg.SOURCE_RESET
            if not data:
                break
            conn.last = loop.time()
            if upstream:
                conn.up += len(data)
            else:
                conn.down += len(data)
            try:
                dst.write(data)
                await dst.drain()  # backpressure: wait while the other leg's buffer is full
            except OSError:
                return _Leg.SINK_FAILED
        if dst.can_write_eof():
            try:
                dst.write_eof()  # half-close: pass the FIN on, keep the other direction open
            except OSError:
                return _Leg.SINK_FAILED
        return _Leg.EOF

    async def _idle(self, conn: _Connection) -> None:
        """Return once ``idle_timeout`` has passed with no data either way."""
        loop = asyncio.get_running_loop()
        idle = self.settings.idle_timeout
        # Sleeps until the current deadline, which data keeps pushing back;
        # the task is cancelled when the connection ends first.
        while (remaining := conn.last + idle - loop.time()) > 0:
            await asyncio.sleep(remaining)


async def _close(*writers: asyncio.StreamWriter) -> None:
    """Close gracefully (FIN after what is buffered); drop what will not flush in time."""
    for w in writers:
        w.close()
    for w in writers:
        try:
            await asyncio.wait_for(w.wait_closed(), CLOSE_FLUSH_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            w.transport.abort()
