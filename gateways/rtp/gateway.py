"""The ``rtp`` gateway kind: the asyncio adapter around ``RtpCore`` (docs/rtp.md).

It makes no protocol decision (STYLE.md): it moves datagrams, asks the core
about each one, and carries out the core's outputs. Like udp-relay, a flow
is one binding of the processor, every datagram from one F:f to G:g:

- The first datagram from a new F:f starts ``GatewayLayer.attach``;
  datagrams arriving meanwhile wait (``MAX_QUEUED_DATAGRAMS``; beyond it they
  are dropped and counted). ``FlowUnknown``: the queue is dropped, the flow
  forgotten.
- Once attached, the core learns the flow (``flow_opened``) and leg B opens:
  a socket of its own on the gateway address, connected to F:f (the seed's
  swap). Every datagram, queued or new, from the client (leg A) or the
  server (leg B), goes through ``RtpCore.datagram`` and is relayed at once
  if it says so: one parse, one dict look-up and one ``sendto``.
- ``RequestRule`` becomes ``GatewayLayer.request_rule`` (UDP, REDIRECT,
  one-shot); its answer and its RULE_END go back to the core. ``EndFlow``
  closes the flow's leg B; the flow stays known, its datagrams dropped,
  until the processor's FLOW_END. ``Event`` is a log line.
- Every ``TICK`` seconds the core's clock advances (no-media timeouts).
- At most ``max_flows`` flows; a datagram that would start one more is
  dropped and counted.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from typing import Any

from firewall.signalling import Endpoint, Proto, RuleEndReason, RuleMode
from gateways.layer import EndCause, EventLog, FlowUnknown, GatewayLayer, Hold, RuleError
from gateways.layer.endpoint import endpoint_of
from gateways.manifest import Manifest
from gateways.rtp.core import EndFlow, Event, RequestRule, RtpCore
from gateways.rtp.settings import RtpSettings

# Datagrams of one flow held while its original tuple is looked up (at most
# four query_timeouts): 50 packets a second of 20 ms audio for over half a second.
MAX_QUEUED_DATAGRAMS = 32

# Bytes asyncio may hold for one socket when the kernel's buffer is full.
# Beyond it datagrams are dropped and counted: late media is useless media,
# and UDP has no backpressure.
MAX_SEND_BUFFER = 1 << 18

# How often the core's clock advances: the granularity of no_media_timeout.
TICK = 0.25

# Events worth a warning rather than an info line.
_WARN = ("refused", "rule.not_granted", "ssrc.changed")


class _State(enum.Enum):
    LOOKUP = "lookup"
    OPENING = "opening"
    OPEN = "open"
    ENDED = "ended"  # the core ended its stream: datagrams dropped until FLOW_END
    CLOSED = "closed"


class _Flow:
    __slots__ = ("fw", "state", "queue", "hold", "leg_b", "task")

    def __init__(self, fw: Endpoint) -> None:
        self.fw = fw
        self.state = _State.LOOKUP
        self.queue: deque[bytes] = deque()
        self.hold: Hold | None = None
        self.leg_b: asyncio.DatagramTransport | None = None
        self.task: asyncio.Task[None] | None = None


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, gw: "RtpGateway") -> None:
        self._gw = gw

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._gw._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._gw.counters["socket_errors.leg_a"] += 1


class _LegBProtocol(asyncio.DatagramProtocol):
    def __init__(self, gw: "RtpGateway", flow: _Flow) -> None:
        self._gw = gw
        self._flow = flow

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._gw._from_server(self._flow, data)

    def error_received(self, exc: Exception) -> None:
        # Port unreachable at the receiver: media goes on, the receiver may come up.
        self._gw.counters["socket_errors.leg_b"] += 1


class RtpGateway:
    """The rtp gateway: a datagram endpoint on G:g in front of a ``GatewayLayer``."""

    def __init__(self, layer: GatewayLayer, *, listen: Endpoint, settings: RtpSettings, log: EventLog) -> None:
        self.layer = layer
        self.listen = listen
        self.settings = settings
        self.log = log
        self.core = RtpCore(settings.policy())
        self.counters = self.core.counters  # one set of counters for the stats line
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: dict[Endpoint, _Flow] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._rule_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_gateway(cls, layer: GatewayLayer, gw: Manifest, listen: Endpoint, log: EventLog) -> "RtpGateway":
        """The gateway as ``python -m gateways`` runs it: its settings from its manifest."""
        return cls(layer, listen=listen, settings=RtpSettings.model_validate(gw.settings), log=log)

    @property
    def active(self) -> int:
        """Flows held (looking up, relaying, or ended and waiting for FLOW_END)."""
        return len(self._flows)

    @property
    def streams(self) -> int:
        return len(self.core.streams)

    async def start(self) -> None:
        """Bind G:g. OSError if the address is not here."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), local_addr=(str(self.listen.address), self.listen.port)
        )
        self._transport = transport
        self.listen = Endpoint(self.listen.address, transport.get_extra_info("sockname")[1])
        self._ticker = asyncio.create_task(self._tick())

    async def close(self, grace: float) -> None:
        """End every stream and flow and stop (``grace`` unused: a stream has no end to wait for)."""
        if self._ticker is not None:
            self._ticker.cancel()
        self.core.shutdown(asyncio.get_running_loop().time())
        self._drain()
        flows = list(self._flows.values())
        for flow in flows:
            self._close(flow)
        tasks = [t for t in (*(f.task for f in flows), *self._rule_tasks, self._ticker) if t is not None]
        for task in self._rule_tasks:
            task.cancel()
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
        flow = self._flows.get(fw)
        if flow is None:
            if len(self._flows) >= self.settings.max_flows:
                self.counters["dropped.max_flows"] += 1
                return
            flow = _Flow(fw)
            self._flows[fw] = flow
            self.counters["flows.started"] += 1
            flow.task = asyncio.create_task(self._open(flow))
        if flow.state is _State.OPEN or flow.state is _State.ENDED:
            self._up(flow, data)
        elif len(flow.queue) < MAX_QUEUED_DATAGRAMS:
            flow.queue.append(data)
        else:
            self.counters["dropped.queue_full"] += 1

    def _up(self, flow: _Flow, data: bytes) -> None:
        core = self.core
        if core.datagram(flow.fw, True, data, asyncio.get_running_loop().time()) is None:
            leg_b = flow.leg_b
            assert leg_b is not None
            if leg_b.get_write_buffer_size() > MAX_SEND_BUFFER:
                self.counters["dropped.send_buffer"] += 1
            else:
                leg_b.sendto(data)
        if core.outbox:
            self._drain()

    def _from_server(self, flow: _Flow, data: bytes) -> None:
        transport = self._transport
        if flow.state is not _State.OPEN or transport is None:
            return
        core = self.core
        if core.datagram(flow.fw, False, data, asyncio.get_running_loop().time()) is None:
            if transport.get_write_buffer_size() > MAX_SEND_BUFFER:
                self.counters["dropped.send_buffer"] += 1
            else:
                transport.sendto(data, (str(flow.fw.address), flow.fw.port))
        if core.outbox:
            self._drain()

    # ---- the core's outputs ------------------------------------------------------------------

    def _drain(self) -> None:
        outbox = self.core.outbox
        while outbox:
            out = outbox.pop(0)
            if isinstance(out, RequestRule):
                task = asyncio.create_task(self._request(out))
                self._rule_tasks.add(task)
                task.add_done_callback(self._rule_tasks.discard)
            elif isinstance(out, EndFlow):
                flow = self._flows.get(out.fw)
                if flow is not None and flow.state is _State.OPEN:
                    flow.state = _State.ENDED
                    if flow.leg_b is not None:
                        flow.leg_b.close()
                        flow.leg_b = None
            elif isinstance(out, Event):
                level = logging.WARNING if out.name.startswith(_WARN) else logging.INFO
                self.log.emit(out.name, level, **out.fields)

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

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            self.core.tick(loop.time())
            self._drain()

    # ---- one flow ---------------------------------------------------------------------------

    async def _open(self, flow: _Flow) -> None:
        try:
            hold = await self.layer.attach(Proto.UDP, flow.fw, self.listen, on_end=lambda cause: self._ended(flow, cause))
        except FlowUnknown as exc:
            self.counters["flows.unknown"] += 1
            self.counters["dropped.unknown_flow"] += len(flow.queue)
            self.log.emit("unknown_flow", via=flow.fw, to=self.listen, why=exc.why, dropped=len(flow.queue))
            self._forget(flow)
            return
        except asyncio.CancelledError:
            self._forget(flow)
            raise
        if flow.state is _State.CLOSED:
            hold.release()
            return
        flow.hold = hold
        flow.state = _State.OPENING
        info = hold.flow
        try:
            transport, _ = await self.layer.open_udp(info, lambda: _LegBProtocol(self, flow))
        except OSError as exc:
            self.counters["flows.leg_b_failed"] += 1
            self.log.emit("leg_b_failed", logging.WARNING, flow=f"{info.flow_id:#x}", error=exc.strerror or repr(exc))
            self._close(flow)
            return
        if flow.state is _State.CLOSED:
            transport.close()
            return
        flow.leg_b = transport
        flow.state = _State.OPEN
        self.core.flow_opened(info)
        while flow.queue and flow.state is _State.OPEN:
            self._up(flow, flow.queue.popleft())
        flow.queue.clear()

    def _ended(self, flow: _Flow, cause: EndCause) -> None:
        """The processor's FLOW_END (or the layer's, at shutdown): the flow is gone."""
        self.core.flow_gone(flow.fw, asyncio.get_running_loop().time())
        self._close(flow)
        self._drain()

    def _forget(self, flow: _Flow) -> None:
        flow.state = _State.CLOSED
        flow.queue.clear()
        if self._flows.get(flow.fw) is flow:
            del self._flows[flow.fw]

    def _close(self, flow: _Flow) -> None:
        if flow.state is _State.CLOSED:
            return
        attached = flow.hold is not None
        flow.state = _State.CLOSED
        if self._flows.get(flow.fw) is flow:
            del self._flows[flow.fw]
        if flow.task is not None and flow.task is not asyncio.current_task() and not attached:
            flow.task.cancel()  # still looking up: nobody waits for the answer
        if flow.leg_b is not None:
            flow.leg_b.close()
            flow.leg_b = None
        if flow.queue:
            self.counters["dropped.closed"] += len(flow.queue)
            flow.queue.clear()
        if flow.hold is not None:
            self.core.flow_gone(flow.fw, asyncio.get_running_loop().time())
            flow.hold.release()
