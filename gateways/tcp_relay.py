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
4. The bytes, relayed by ``gateways.relay`` (spliced in the kernel once a
   direction carries bulk: nothing here inspects them): FIN carried across as a half-close in each
   direction, a reset on either leg carried as a reset to the other
   (SO_LINGER 0), ``idle_timeout`` without data either way closes both,
   and the processor's FLOW_END resets both (its binding is gone, so
   nothing more can pass).
5. One ``close`` line: bytes each way, duration, reason.

Limits come from the gateway's ``[gateway.settings]`` (``TcpRelaySettings``, below, with the kind's declaration ``KIND``).

With ``mode = "log-only"`` the processor never sends a connection here: it
passes each one's first packet to the kernel, which carries the connection,
and reports its end with conntrack's counters (docs/datapath.md, "Log-only
gateways"). The gateway logs one ``flow`` line per connection: the client's
tuple, the server, the reason, and packets and bytes each way (IP headers
included, as conntrack counts them).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from pydantic import Field

from firewall.fields import Choice, Frozen, Int, Number
from firewall.signalling import Endpoint, Proto
from gateways.kind import Kind
from gateways.manifest import Manifest
from gateways.layer import EventLog, FlowUnknown, GatewayLayer, Hold
from gateways.layer.outputs import LoggedFlowEnded
from gateways.layer.endpoint import endpoint_of
from gateways.relay import Limits, RelayCore, Side, reset_socket
from gateways.tcp_server import TcpGateway

# Leg A comes from the client (through F:f), leg B goes to the server.
NAMES = {Side.A: "client", Side.B: "server"}



RelayMode = Choice("relay", "log-only")
EventLoop = Choice("uvloop", "asyncio")


class TcpRelaySettings(Frozen):
    """The tcp-relay keys of ``[gateway.settings]``."""

    max_connections: Int(1, 1_000_000) = Field(1024, description="concurrent connections; more are refused (RST)")
    idle_timeout: Number(1, 86400) = Field(300.0, description="seconds without data in either direction before closing")
    connect_timeout: Number(0.1, 300) = Field(10.0, description="seconds to open leg B to the server")
    mode: RelayMode = Field(
        "relay", description="relay: every connection through the gateway; log-only: the kernel carries it, "
        "the gateway logs it (docs/datapath.md, \"Log-only gateways\")")
    event_loop: EventLoop = Field(
        "uvloop", description="the event loop the gateway process runs on: uvloop (libuv: fewer instructions per "
                              "relayed connection, docs/benchmarks.md) or asyncio")


KIND = Kind(
    "tcp-relay", ("tcp",), TcpRelaySettings, gateway="gateways.tcp_relay:TcpRelay.for_gateway",
    log_only=lambda settings: settings.mode == "log-only",
    workers=True,  # independent connections: several worker processes may share the load
    ipv6=True,  # a byte stream: nothing in it names an address
    event_loop=lambda settings: settings.event_loop,
)


class TcpRelay(TcpGateway):
    """The tcp-relay gateway: a listener on G:g in front of a ``GatewayLayer``."""

    def __init__(
        self,
        layer: GatewayLayer,
        *,
        listen: Endpoint,
        settings: TcpRelaySettings,
        log: EventLog,
        listen6: Endpoint | None = None,
    ) -> None:
        super().__init__(layer, listen=listen, log=log, listen6=listen6)
        self.settings = settings
        self._active = 0
        if settings.mode == "log-only":
            layer.on_logged_end = self._logged_end


    @classmethod
    def for_gateway(cls, layer: GatewayLayer, manifest: Manifest, listen: Endpoint, log: EventLog) -> "TcpRelay":
        """The gateway as ``python -m gateways`` runs it: settings from its manifest."""
        listen6 = Endpoint(manifest.listen6, listen.port) if manifest.listen6 is not None else None
        return cls(layer, listen=listen, settings=TcpRelaySettings.model_validate(manifest.settings), log=log, listen6=listen6)

    @property
    def active(self) -> int:
        """Connections accepted and not yet closed (those over the limit never count)."""
        return self._active

    def _logged_end(self, out: LoggedFlowEnded) -> None:
        """A connection the kernel carried (log-only) is over: its one line."""
        flow, counters = out.flow, out.counters
        self.counters["flows.logged"] += 1
        fields: dict[str, Any] = {}
        if counters is not None:
            self.counters["bytes.up"] += counters.bytes_up
            self.counters["bytes.down"] += counters.bytes_down
            fields = {"packets_up": counters.packets_up, "bytes_up": counters.bytes_up,
                      "packets_down": counters.packets_down, "bytes_down": counters.bytes_down}
        self.log.emit("flow", flow=f"{flow.flow_id:#x}", client=flow.client, original_dst=flow.original_dst,
                      server=flow.server, reason=out.cause.value, **fields)

    # ---- one connection -------------------------------------------------------------------

    async def _serve(self, sock: socket.socket) -> None:
        try:
            fw, ag = endpoint_of(sock.getpeername()), endpoint_of(sock.getsockname())
        except OSError:
            fw = ag = None
        if fw is None or ag is None:
            self.counters["closed.gone"] += 1  # reset before we looked at it
            sock.close()
            return
        if self._active >= self.settings.max_connections:
            self.counters["refused.max_connections"] += 1
            self.log.emit("refused", via=fw, reason="max_connections", limit=self.settings.max_connections)
            reset_socket(sock)
            return
        self._active += 1
        self.counters["connections.accepted"] += 1
        try:
            try:
                hold = await self.layer.attach(Proto.TCP, fw, ag)
            except FlowUnknown as exc:
                self.counters["closed.unknown_flow"] += 1
                self.log.emit("unknown_flow", via=fw, to=ag, why=exc.why)
                reset_socket(sock)
                return
            except asyncio.CancelledError:
                reset_socket(sock)  # stopping before the flow was known
                raise
            with hold:
                await self._relay(hold, sock)
        finally:
            self._active -= 1

    async def _relay(self, hold: Hold, a: socket.socket) -> None:
        flow = hold.flow
        loop = self._loop
        core = RelayCore(Limits(idle_timeout=self.settings.idle_timeout), loop.time(), names=NAMES)
        # Leg B's SYN leaves first; the open line is written while the
        # processor and the server answer it.
        b: socket.socket | OSError
        try:
            b = self.layer.start_tcp(flow)
        except OSError as exc:
            b = exc  # raised below, after the open line
        self.log.emit(
            "open",
            flow=f"{flow.flow_id:#x}",
            client=flow.client,
            original_dst=flow.original_dst,
            server=flow.server,
            via=flow.firewall_side,
        )
        reason, detail = "error", ""
        try:
            try:
                if isinstance(b, OSError):
                    raise b
                await self.layer.connected(b, connect_timeout=self.settings.connect_timeout)
            except asyncio.TimeoutError:
                reason, detail = "connect_timeout", f"no answer within {self.settings.connect_timeout:g}s"
                reset_socket(a)
                return
            except OSError as exc:
                reason, detail = "connect_failed", exc.strerror or repr(exc)
                reset_socket(a)
                return
            except asyncio.CancelledError:
                reason = "shutdown"
                reset_socket(a)
                raise
            done = await self._relay_legs(core, a, b, hold)
            reason, detail = done.reason, done.detail
        finally:
            if core.outcome is not None:  # cancelled while relaying: the core knows why
                reason, detail = core.outcome.reason, core.outcome.detail
            up, down = core.received(Side.A), core.received(Side.B)
            self.counters[f"closed.{reason}"] += 1
            self.counters["bytes.up"] += up
            self.counters["bytes.down"] += down
            fields: dict[str, Any] = {"detail": detail} if detail else {}
            self.log.emit(
                "close",
                flow=f"{flow.flow_id:#x}",
                client=flow.client,
                server=flow.server,
                via=flow.firewall_side,
                reason=reason,
                bytes_up=up,
                bytes_down=down,
                duration=loop.time() - core.started,
                **fields,
            )
