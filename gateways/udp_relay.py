"""udp-relay: a transparent UDP gateway that logs each flow with its real addresses.

The datagram counterpart of tcp-relay (see its docstring for the seed's
part). UDP has no connection to accept, so a flow is what the processor made
one binding of: every datagram from one F:f to G:g ("Connection
identification": F:f is unique per flow).

- The first datagram from a new F:f starts ``GatewayLayer.attach``;
  datagrams arriving meanwhile wait in a queue of ``MAX_QUEUED_DATAGRAMS``
  (beyond it they are dropped and counted: UDP may lose them, and the
  lookup is bounded anyway). ``FlowUnknown``: the queue is dropped and
  counted, and the flow forgotten, so its next datagram asks again.
- Leg B is a socket of its own per flow, on the gateway address, connected
  to F:f (the seed's swap): the processor tells leg A from leg B, and one
  flow's leg B from another's, by the gateway's source port.
- Datagrams pass both ways unchanged. A flow ends after ``idle_timeout``
  without a datagram either way, on the processor's FLOW_END, or at shutdown;
  it logs one ``open`` and one ``close`` line, with datagrams and bytes each way.
- At most ``max_flows`` flows; a datagram that would start one more is
  dropped and counted.
- ``offload_after`` N > 0: once N datagrams have crossed each way, the
  relay asks the processor to hand the flow to the kernel
  (``GatewayLayer.request_offload``, docs/datapath.md "Offload"); the
  processor's FLOW_END OFFLOADED then closes it (reason ``offloaded``), and
  its later datagrams never reach the gateway. A refusal is logged
  (``offload_refused``) and the flow goes on through the relay.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, deque
from typing import Any

from pydantic import Field

from firewall.fields import Frozen, Int, Number
from firewall.signalling import Endpoint, Proto
from gateways.kind import Kind
from gateways.manifest import Manifest
from gateways.layer import EndCause, EventLog, FlowUnknown, GatewayLayer, Hold, RuleError
from gateways.layer.endpoint import endpoint_of

# Datagrams of one flow held while its original tuple is looked up (at most
# four query_timeouts). A client sending faster than that during the first
# two seconds loses the excess, as it would on a congested path.
MAX_QUEUED_DATAGRAMS = 32

# Bytes asyncio may hold for one socket when the kernel's buffer is full
# (sendto would block). Beyond it datagrams are dropped and counted: UDP has
# no backpressure, and an unbounded buffer is a memory leak in waiting.
MAX_SEND_BUFFER = 1 << 20


class UdpRelaySettings(Frozen):
    """The udp-relay keys of ``[gateway.settings]``."""

    max_flows: Int(1, 1_000_000) = Field(4096, description="concurrent UDP flows; more are dropped")
    idle_timeout: Number(1, 86400) = Field(60.0, description="seconds without a datagram before the flow ends")
    offload_after: Int(0, 1_000_000) = Field(
        0, description="datagrams relayed each way before the flow is handed to the kernel (0: never)")


KIND = Kind("udp-relay", ("udp",), UdpRelaySettings, gateway="gateways.udp_relay:UdpRelay.for_gateway", offload=True)


class _State(enum.Enum):
    LOOKUP = "lookup"
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


class _Flow:
    __slots__ = (
        "fw", "state", "queue", "hold", "leg_b", "started", "last",
        "up", "down", "datagrams_up", "datagrams_down", "timer", "task", "offload",
    )

    def __init__(self, fw: Endpoint, now: float) -> None:
        self.fw = fw
        self.state = _State.LOOKUP
        self.queue: deque[bytes] = deque()
        self.hold: Hold | None = None
        self.leg_b: asyncio.DatagramTransport | None = None
        self.started = now
        self.last = now
        self.up = self.down = 0
        self.datagrams_up = self.datagrams_down = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.offload: asyncio.Task[None] | None = None  # the OFFLOAD_REQUEST, once asked


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: "UdpRelay") -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._relay.counters["socket_errors.leg_a"] += 1


class _LegBProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: "UdpRelay", flow: _Flow) -> None:
        self._relay = relay
        self._flow = flow

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._relay._from_server(self._flow, data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a connected socket (port unreachable at the
        # server): UDP carries on, the server may come up; it is counted.
        self._relay.counters["socket_errors.leg_b"] += 1


class UdpRelay:
    """The udp-relay gateway: a datagram endpoint on G:g in front of a ``GatewayLayer``."""

    def __init__(
        self,
        layer: GatewayLayer,
        *,
        listen: Endpoint,
        settings: UdpRelaySettings,
        log: EventLog,
    ) -> None:
        self.layer = layer
        self.listen = listen
        self.settings = settings
        self.log = log
        self.counters: Counter[str] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: dict[Endpoint, _Flow] = {}


    @classmethod
    def for_gateway(cls, layer: GatewayLayer, manifest: Manifest, listen: Endpoint, log: EventLog) -> "UdpRelay":
        """The gateway as ``python -m gateways`` runs it: settings from its manifest."""
        return cls(layer, listen=listen, settings=UdpRelaySettings.model_validate(manifest.settings), log=log)
    @property
    def active(self) -> int:
        """Flows held (looking up, or open)."""
        return len(self._flows)

    def leg_b_port(self, fw: Endpoint) -> int | None:
        """The local port of the leg B socket of the flow from ``fw``, if it is open."""
        flow = self._flows.get(fw)
        if flow is None or flow.leg_b is None:
            return None
        return int(flow.leg_b.get_extra_info("sockname")[1])

    async def start(self) -> None:
        """Bind G:g. OSError if the address is not here."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), local_addr=(str(self.listen.address), self.listen.port)
        )
        self._transport = transport
        self.listen = Endpoint(self.listen.address, transport.get_extra_info("sockname")[1])

    async def close(self, grace: float) -> None:
        """End every flow and stop.

        ``grace`` is not waited for: UDP flows have no end of their own to
        wait for, and G:g is also the socket every flow's replies leave
        from, so it cannot stop accepting while the others finish.
        """
        flows = list(self._flows.values())
        for flow in flows:
            self._close(flow, "shutdown")
        tasks = [f.task for f in flows if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # ---- datagrams ------------------------------------------------------------------------

    def _from_client(self, data: bytes, addr: Any) -> None:
        fw = endpoint_of(addr)
        if fw is None:
            self.counters["dropped.bad_source"] += 1
            return
        loop = asyncio.get_running_loop()
        flow = self._flows.get(fw)
        if flow is None:
            if len(self._flows) >= self.settings.max_flows:
                self.counters["dropped.max_flows"] += 1
                return
            flow = _Flow(fw, loop.time())
            self._flows[fw] = flow
            self.counters["flows.started"] += 1
            flow.task = asyncio.create_task(self._open(flow))
        flow.last = loop.time()
        if flow.state is _State.OPEN:
            self._send_up(flow, data)
        elif len(flow.queue) < MAX_QUEUED_DATAGRAMS:
            flow.queue.append(data)
        else:
            self.counters["dropped.queue_full"] += 1

    def _from_server(self, flow: _Flow, data: bytes) -> None:
        if flow.state is not _State.OPEN or self._transport is None:
            return
        flow.last = asyncio.get_running_loop().time()
        if self._transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            self.counters["dropped.send_buffer"] += 1
            return
        self._transport.sendto(data, (str(flow.fw.address), flow.fw.port))
        flow.down += len(data)
        flow.datagrams_down += 1
        self._maybe_offload(flow)

    def _send_up(self, flow: _Flow, data: bytes) -> None:
        assert flow.leg_b is not None
        if flow.leg_b.get_write_buffer_size() > MAX_SEND_BUFFER:
            self.counters["dropped.send_buffer"] += 1
            return
        flow.leg_b.sendto(data)
        flow.up += len(data)
        flow.datagrams_up += 1
        self._maybe_offload(flow)

    def _maybe_offload(self, flow: _Flow) -> None:
        after = self.settings.offload_after
        if after and flow.offload is None and min(flow.datagrams_up, flow.datagrams_down) >= after:
            flow.offload = asyncio.create_task(self._offload(flow))

    async def _offload(self, flow: _Flow) -> None:
        assert flow.hold is not None
        info = flow.hold.flow
        try:
            await self.layer.request_offload(info)
        except RuleError as exc:
            self.counters["offload.refused"] += 1
            self.log.emit("offload_refused", flow=f"{info.flow_id:#x}", why=str(exc))
            return
        self.counters["offload.acked"] += 1  # FLOW_END OFFLOADED closes the flow

    # ---- one flow ---------------------------------------------------------------------------

    async def _open(self, flow: _Flow) -> None:
        try:
            hold = await self.layer.attach(
                Proto.UDP, flow.fw, self.listen, on_end=lambda cause: self._ended(flow, cause)
            )
        except FlowUnknown as exc:
            self.counters["flows.unknown"] += 1
            self.counters["dropped.unknown_flow"] += len(flow.queue)
            self.log.emit("unknown_flow", via=flow.fw, to=self.listen, why=exc.why, dropped=len(flow.queue))
            self._forget(flow)
            return
        except asyncio.CancelledError:
            self._forget(flow)
            raise
        if flow.state is _State.CLOSED:  # closed (shutdown) while the answer was on its way
            hold.release()
            return
        flow.hold = hold
        flow.state = _State.OPENING
        info = hold.flow
        self.log.emit(
            "open",
            flow=f"{info.flow_id:#x}",
            client=info.client,
            original_dst=info.original_dst,
            server=info.server,
            via=info.firewall_side,
        )
        try:
            transport, _ = await self.layer.open_udp(info, lambda: _LegBProtocol(self, flow))
        except OSError as exc:
            self._close(flow, "leg_b_failed", exc.strerror or repr(exc))
            return
        if flow.state is _State.CLOSED:
            transport.close()
            return
        flow.leg_b = transport
        flow.state = _State.OPEN
        while flow.queue:
            self._send_up(flow, flow.queue.popleft())
        self._arm_idle(flow)

    def _arm_idle(self, flow: _Flow) -> None:
        loop = asyncio.get_running_loop()
        delay = flow.last + self.settings.idle_timeout - loop.time()
        flow.timer = loop.call_later(max(0.0, delay), self._check_idle, flow)

    def _check_idle(self, flow: _Flow) -> None:
        flow.timer = None
        if flow.state is _State.CLOSED:
            return
        if asyncio.get_running_loop().time() - flow.last >= self.settings.idle_timeout:
            self._close(flow, "idle", f"{self.settings.idle_timeout:g}s without a datagram")
        else:
            self._arm_idle(flow)  # data came meanwhile: wait for the new deadline

    def _ended(self, flow: _Flow, cause: EndCause) -> None:
        if cause is EndCause.OFFLOADED:
            self._close(flow, "offloaded", "the kernel carries the flow")
        else:
            self._close(flow, "flow_end", cause.value)

    def _forget(self, flow: _Flow) -> None:
        """Drop a flow that never opened, without a close line (it had no open line)."""
        flow.state = _State.CLOSED
        flow.queue.clear()
        if self._flows.get(flow.fw) is flow:
            del self._flows[flow.fw]

    def _close(self, flow: _Flow, reason: str, detail: str = "") -> None:
        if flow.state is _State.CLOSED:
            return
        attached = flow.hold is not None
        flow.state = _State.CLOSED
        if self._flows.get(flow.fw) is flow:
            del self._flows[flow.fw]
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.task is not None and flow.task is not asyncio.current_task() and not attached:
            flow.task.cancel()  # still looking up: nobody waits for the answer
        if flow.leg_b is not None:
            flow.leg_b.close()
        if flow.offload is not None and flow.offload is not asyncio.current_task():
            flow.offload.cancel()
        dropped = len(flow.queue)
        flow.queue.clear()
        if flow.hold is None:
            self.counters[f"closed.{reason}"] += 1
            return
        flow.hold.release()
        info = flow.hold.flow
        self.counters[f"closed.{reason}"] += 1
        self.counters["datagrams.up"] += flow.datagrams_up
        self.counters["datagrams.down"] += flow.datagrams_down
        self.counters["bytes.up"] += flow.up
        self.counters["bytes.down"] += flow.down
        fields: dict[str, Any] = {"detail": detail} if detail else {}
        if dropped:
            fields["dropped"] = dropped
        self.log.emit(
            "close",
            flow=f"{info.flow_id:#x}",
            client=info.client,
            server=info.server,
            via=info.firewall_side,
            reason=reason,
            datagrams_up=flow.datagrams_up,
            datagrams_down=flow.datagrams_down,
            bytes_up=flow.up,
            bytes_down=flow.down,
            duration=asyncio.get_running_loop().time() - flow.started,
            **fields,
        )
