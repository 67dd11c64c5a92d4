"""udp-relay: a transparent UDP gateway that logs each flow with its real addresses.

The datagram counterpart of tcp-relay (see its docstring for the seed's
part). UDP has no connection to accept, so a flow is what the processor made
one binding of: every datagram from one F:f to G:g ("Connection
identification": F:f is unique per flow).

- Lookups, the early datagrams' queue, leg B per flow and ``max_flows``
  are every UDP gateway's (gateways/udp_flows.py).
- Datagrams pass both ways unchanged. A flow ends after ``idle_timeout``
  without a datagram either way, on the processor's FLOW_END, or at shutdown;
  it logs one ``open`` and one ``close`` line, with datagrams and bytes each way.
- ``offload_after`` N > 0: once N datagrams have crossed each way, the
  relay asks the processor to hand the flow to the kernel
  (``GatewayLayer.request_offload``, docs/datapath.md "Offload"); the
  processor's FLOW_END OFFLOADED then closes it (reason ``offloaded``), and
  its later datagrams never reach the gateway. A refusal is logged
  (``offload_refused``) and the flow goes on through the relay. An IPv6
  flow is offloaded the same way, on the IPv6 table (docs/datapath.md).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pydantic import Field

from firewall.fields import Frozen, Int, Number
from firewall.signalling import Endpoint
from gateways.kind import Kind
from gateways.manifest import Manifest
from gateways.layer import EndCause, EventLog, GatewayLayer, RuleError
from gateways.udp_flows import MAX_QUEUED_DATAGRAMS, State, UdpFlow, UdpFlows

__all__ = ["MAX_QUEUED_DATAGRAMS", "UdpRelay", "UdpRelaySettings"]

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


KIND = Kind(
    "udp-relay", ("udp",), UdpRelaySettings, gateway="gateways.udp_relay:UdpRelay.for_gateway", offload=True,
    ipv6=True,  # datagrams pass unchanged: nothing in them names an address
)


class _Flow(UdpFlow):
    __slots__ = ("started", "last", "up", "down", "datagrams_up", "datagrams_down", "timer", "offload")

    def __init__(self, fw: Endpoint, now: float) -> None:
        super().__init__(fw)
        self.started = now
        self.last = now
        self.up = self.down = 0
        self.datagrams_up = self.datagrams_down = 0
        self.timer: asyncio.TimerHandle | None = None
        self.offload: asyncio.Task[None] | None = None  # the OFFLOAD_REQUEST, once asked


class UdpRelay(UdpFlows):
    """The udp-relay gateway: a datagram endpoint on G:g in front of a ``GatewayLayer``."""

    def __init__(
        self,
        layer: GatewayLayer,
        *,
        listen: Endpoint,
        settings: UdpRelaySettings,
        log: EventLog,
        listen6: Endpoint | None = None,
    ) -> None:
        super().__init__(layer, listen, settings.max_flows, log, Counter(), listen6)
        self.settings = settings

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, manifest: Manifest, listen: Endpoint, log: EventLog) -> "UdpRelay":
        """The gateway as ``python -m gateways`` runs it: settings from its manifest."""
        listen6 = Endpoint(manifest.listen6, listen.port) if manifest.listen6 is not None else None
        return cls(layer, listen=listen, settings=UdpRelaySettings.model_validate(manifest.settings), log=log,
                   listen6=listen6)

    def leg_b_port(self, fw: Endpoint) -> int | None:
        """The local port of the leg B socket of the flow from ``fw``, if it is open."""
        flow = self._flows.get(fw)
        if flow is None or flow.leg_b is None:
            return None
        return int(flow.leg_b.get_extra_info("sockname")[1])

    async def close(self, grace: float) -> None:
        """End every flow and stop.

        ``grace`` is not waited for: UDP flows have no end of their own to
        wait for, and G:g is also the socket every flow's replies leave
        from, so it cannot stop accepting while the others finish.
        """
        await self._close_all("shutdown")

    # ---- datagrams ------------------------------------------------------------------------

    def _new_flow(self, fw: Endpoint) -> _Flow:
        return _Flow(fw, asyncio.get_running_loop().time())

    def _up(self, flow: UdpFlow, data: bytes) -> None:
        assert isinstance(flow, _Flow)
        flow.last = asyncio.get_running_loop().time()
        if self._send_up(flow, data, MAX_SEND_BUFFER):
            flow.up += len(data)
            flow.datagrams_up += 1
            self._maybe_offload(flow)

    def _down(self, flow: UdpFlow, data: bytes) -> None:
        assert isinstance(flow, _Flow)
        flow.last = asyncio.get_running_loop().time()
        if self._send_down(flow, data):
            flow.down += len(data)
            flow.datagrams_down += 1
            self._maybe_offload(flow)

    def _maybe_offload(self, flow: _Flow) -> None:
        after = self.settings.offload_after
        if after and flow.offload is None and min(flow.datagrams_up, flow.datagrams_down) >= after:
            flow.offload = asyncio.create_task(self._offload(flow))

    async def _offload(self, flow: _Flow) -> None:
        info = flow.info
        try:
            await self.layer.request_offload(info)
        except RuleError as exc:
            self.counters["offload.refused"] += 1
            self.log.emit("offload_refused", flow=f"{info.flow_id:#x}", why=str(exc))
            return
        self.counters["offload.acked"] += 1  # FLOW_END OFFLOADED closes the flow

    # ---- one flow ---------------------------------------------------------------------------

    def _attached(self, flow: UdpFlow) -> None:
        info = flow.info
        self.log.emit(
            "open",
            flow=f"{info.flow_id:#x}",
            client=info.client,
            original_dst=info.original_dst,
            server=info.server,
            via=info.firewall_side,
        )

    def _opened(self, flow: UdpFlow) -> None:
        assert isinstance(flow, _Flow)
        self._arm_idle(flow)

    def _leg_b_failed(self, flow: UdpFlow, exc: OSError) -> None:
        self._close_flow(flow, "leg_b_failed", exc.strerror or repr(exc))

    def _arm_idle(self, flow: _Flow) -> None:
        loop = asyncio.get_running_loop()
        delay = flow.last + self.settings.idle_timeout - loop.time()
        flow.timer = loop.call_later(max(0.0, delay), self._check_idle, flow)

    def _check_idle(self, flow: _Flow) -> None:
        flow.timer = None
        if flow.state is State.CLOSED:
            return
        if asyncio.get_running_loop().time() - flow.last >= self.settings.idle_timeout:
            self._close_flow(flow, "idle", f"{self.settings.idle_timeout:g}s without a datagram")
        else:
            self._arm_idle(flow)  # data came meanwhile: wait for the new deadline

    def _ended(self, flow: UdpFlow, cause: EndCause) -> None:
        if cause is EndCause.OFFLOADED:
            self._close_flow(flow, "offloaded", "the kernel carries the flow")
        else:
            self._close_flow(flow, "flow_end", cause.value)

    def _close_flow(self, flow: UdpFlow, reason: str, detail: str = "") -> None:
        assert isinstance(flow, _Flow)
        if flow.state is State.CLOSED:
            return
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.offload is not None and flow.offload is not asyncio.current_task():
            flow.offload.cancel()
        dropped = len(flow.queue)
        flow.queue.clear()
        hold = flow.hold
        super()._close_flow(flow, reason)
        self.counters[f"closed.{reason}"] += 1
        if hold is None:
            return
        info = hold.flow
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
