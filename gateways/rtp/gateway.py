"""The ``rtp`` gateway kind: the asyncio adapter around ``RtpCore`` (docs/rtp.md).

It makes no protocol decision (STYLE.md): it moves datagrams, asks the core
about each one, and carries out the core's outputs. Like udp-relay, a flow
is one binding of the processor, every datagram from one F:f to G:g; the
lookups, the early datagrams' queue, leg B and ``max_flows`` are every UDP
gateway's (gateways/udp_flows.py), and so is IPv6: a second socket on G6
(``listen6``), each IPv6 flow's leg B from G6 (issue 17):

- Once leg B is open, the core learns the flow (``flow_opened``). Every
  datagram, queued or new, from the client (leg A) or the
  server (leg B), goes through ``RtpCore.datagram`` and is relayed at once
  if it says so: one parse, one dict look-up and one ``sendto``.
- ``RequestRule`` becomes ``GatewayLayer.request_rule`` (UDP, REDIRECT,
  one-shot); its answer and its RULE_END go back to the core. ``EndFlow``
  closes the flow's leg B; the flow stays known, its datagrams dropped,
  until the processor's FLOW_END. ``Event`` is a log line.
- ``Offload`` becomes ``GatewayLayer.request_offload``; its answer goes
  back to the core, and the processor's FLOW_END OFFLOADED closes the flow
  (``RtpCore.flow_gone(offloaded=True)``). The processor's report of the
  end of a connection the kernel carried for this gateway (a flow without a
  binding, ``GatewayLayer.on_logged_end``, with conntrack's counters) goes
  to ``RtpCore.kernel_ended``.
- Every ``TICK`` seconds the core's clock advances (no-media timeouts).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

from firewall.signalling import Endpoint, Proto, RuleEndReason, RuleMode
from gateways.layer import EndCause, EventLog, GatewayLayer, RuleError
from gateways.layer.outputs import LoggedFlowEnded
from gateways.manifest import Manifest
from gateways.rtp.core import EndFlow, Event, Offload, RequestRule, RtpCore
from gateways.rtp.settings import RtpSettings
from gateways.udp_flows import State, UdpFlow, UdpFlows

# Bytes asyncio may hold for one socket when the kernel's buffer is full.
# Beyond it datagrams are dropped and counted: late media is useless media,
# and UDP has no backpressure.
MAX_SEND_BUFFER = 1 << 18

# How often the core's clock advances: the granularity of no_media_timeout.
TICK = 0.25

# Events worth a warning rather than an info line.
_WARN = ("refused", "rule.not_granted", "ssrc.changed", "offload.refused")


class RtpGateway(UdpFlows):
    """The rtp gateway: a datagram endpoint on G:g in front of a ``GatewayLayer``."""

    def __init__(self, layer: GatewayLayer, *, listen: Endpoint, settings: RtpSettings, log: EventLog,
                 listen6: Endpoint | None = None) -> None:
        self.core = RtpCore(settings.policy())
        # One set of counters for the stats line: the core's.
        super().__init__(layer, listen, settings.max_flows, log, self.core.counters, listen6)
        self.settings = settings
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        layer.on_logged_end = self._kernel_ended

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, gw: Manifest, listen: Endpoint, log: EventLog) -> "RtpGateway":
        """The gateway as ``python -m gateways`` runs it: its settings from its manifest, and
        G6 on listen's port too when it takes IPv6 (the manifest's ``listen6``)."""
        listen6 = Endpoint(gw.listen6, listen.port) if gw.listen6 is not None else None
        return cls(layer, listen=listen, settings=RtpSettings.model_validate(gw.settings), log=log, listen6=listen6)

    @property
    def streams(self) -> int:
        return len(self.core.streams)

    async def start(self) -> None:
        """Bind G:g. OSError if the address is not here."""
        await super().start()
        self._ticker = asyncio.create_task(self._tick())

    async def close(self, grace: float) -> None:
        """End every stream and flow and stop (``grace`` unused: a stream has no end to wait for)."""
        if self._ticker is not None:
            self._ticker.cancel()
        self.core.shutdown(asyncio.get_running_loop().time())
        self._drain()
        tasks = [t for t in (*self._tasks, self._ticker) if t is not None]
        for task in self._tasks:
            task.cancel()
        await self._close_all("shutdown")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- datagrams ------------------------------------------------------------------------

    def _up(self, flow: UdpFlow, data: bytes) -> None:
        core = self.core
        if core.datagram(flow.fw, True, data, asyncio.get_running_loop().time()) is None:
            self._send_up(flow, data, MAX_SEND_BUFFER)
        if core.outbox:
            self._drain()

    def _down(self, flow: UdpFlow, data: bytes) -> None:
        core = self.core
        if core.datagram(flow.fw, False, data, asyncio.get_running_loop().time()) is None:
            self._send_down(flow, data)
        if core.outbox:
            self._drain()

    # ---- the core's outputs ------------------------------------------------------------------

    def _drain(self) -> None:
        outbox = self.core.outbox
        while outbox:
            out = outbox.pop(0)
            if isinstance(out, RequestRule):
                self._spawn(self._request(out))
            elif isinstance(out, Offload):
                self._spawn(self._offload(out))
            elif isinstance(out, EndFlow):
                flow = self._flows.get(out.fw)
                if flow is not None and flow.state is State.OPEN:
                    flow.state = State.ENDED
                    if flow.leg_b is not None:
                        flow.leg_b.close()
                        flow.leg_b = None
            elif isinstance(out, Event):
                level = logging.WARNING if out.name.startswith(_WARN) else logging.INFO
                self.log.emit(out.name, level, **out.fields)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, out: RequestRule) -> None:
        core = self.core

        def ended(reason: RuleEndReason) -> None:
            core.rule_ended(out.token, reason)
            self._drain()

        try:
            await self.layer.request_rule(out.owner, Proto.UDP, out.src, out.dst, out.ttl, RuleMode.REDIRECT, True,
                                          on_end=ended)
        except RuleError as exc:
            core.rule_answered(out.token, False, str(exc))
        else:
            core.rule_answered(out.token, True)
            self.log.emit("rule.granted", src=out.src, dst=out.dst, ttl=out.ttl, flow=f"{out.owner.flow_id:#x}")
        self._drain()

    async def _offload(self, out: Offload) -> None:
        flow = self._flows.get(out.fw)
        if flow is None or flow.hold is None:
            return
        try:
            await self.layer.request_offload(flow.info)
        except RuleError as exc:
            self.core.offload_answered(out.fw, False, str(exc))
        else:
            self.core.offload_answered(out.fw, True)  # FLOW_END OFFLOADED closes the flow
        self._drain()

    def _kernel_ended(self, out: LoggedFlowEnded) -> None:
        """The processor reports the end of a connection the kernel carried for this gateway."""
        flow = out.flow
        if not self.core.kernel_ended(flow.client, flow.original_dst, out.counters, asyncio.get_running_loop().time()):
            self.counters["offload.end_unmatched"] += 1
        self._drain()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            self.core.tick(loop.time())
            self._drain()

    # ---- one flow ---------------------------------------------------------------------------

    def _opened(self, flow: UdpFlow) -> None:
        self.core.flow_opened(flow.info)

    def _leg_b_failed(self, flow: UdpFlow, exc: OSError) -> None:
        self.counters["flows.leg_b_failed"] += 1
        self.log.emit("leg_b_failed", logging.WARNING, flow=f"{flow.info.flow_id:#x}", error=exc.strerror or repr(exc))
        self._close_flow(flow, "leg_b_failed")

    def _ended(self, flow: UdpFlow, cause: EndCause) -> None:
        """The processor's FLOW_END (or the layer's, at shutdown): the flow is gone."""
        self.core.flow_gone(flow.fw, asyncio.get_running_loop().time(), offloaded=cause is EndCause.OFFLOADED)
        self._close_flow(flow, cause.value)
        self._drain()

    def _close_flow(self, flow: UdpFlow, reason: str, detail: str = "") -> None:
        if flow.state is State.CLOSED:
            return
        if flow.hold is not None:
            self.core.flow_gone(flow.fw, asyncio.get_running_loop().time())
        super()._close_flow(flow, reason)
