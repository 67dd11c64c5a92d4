"""What every UDP gateway does with a flow before its protocol sees a datagram: udp-relay and rtp share it.

UDP has no connection to accept, so a flow is what the processor made one
binding of: every datagram from one F:f to G:g ("Connection
identification": F:f is unique per flow). ``UdpFlows`` is the part of a
datagram gateway that is the same whatever it does with the datagrams:

- G:g, the listen socket (leg A), bound by ``start``; a kind that takes
  IPv6 (``listen6``) binds G6 on the same port too, and a family 6 flow's
  datagrams come in, and its replies leave, there. It is read straight
  from the event loop, up to ``READ_BATCH`` datagrams per readiness, and
  written with ``sendto`` at once: a datagram that finds the kernel's
  buffer full is dropped and counted (``dropped.send_buffer``), never
  queued (late media is useless media; UDP has no backpressure).
- The first datagram from a new F:f starts ``GatewayLayer.attach``;
  datagrams arriving meanwhile wait in the flow's queue (``max_queued``;
  beyond it they are dropped and counted ``dropped.queue_full``: UDP may
  lose them, and the lookup is bounded anyway). ``FlowUnknown``: the queue
  is dropped and counted, and the flow forgotten, so its next datagram asks
  again.
- Leg B is a socket of its own per flow, on the gateway address, connected
  to F:f (the seed's swap): the processor tells leg A from leg B, and one
  flow's leg B from another's, by the gateway's source port.
- At most ``max_flows`` flows; a datagram that would start one more is
  dropped and counted.

The subclass decides what a datagram means, through its hooks: ``_up``
(from the client, once the flow is open, queued ones first), ``_down``
(from the server), ``_attached`` (the original tuple is known),
``_opened`` (leg B is up), ``_leg_b_failed``, ``_ended`` (the processor's
FLOW_END), and closes a flow with ``_close_flow``.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import socket
from collections import Counter, deque
from typing import Any

from firewall.signalling import Endpoint, FlowInfo, Proto
from gateways.layer import EndCause, EventLog, FlowUnknown, GatewayLayer, Hold
from gateways.layer.endpoint import endpoint_of

# Datagrams of one flow held while its original tuple is looked up (at most
# four query_timeouts): 50 packets a second of 20 ms audio for over half a
# second. A client sending faster than that during the lookup loses the
# excess, as it would on a congested path.
MAX_QUEUED_DATAGRAMS = 32

# Datagrams read from G:g per readiness of its socket: one event loop turn
# and one epoll_wait for many, and still a turn for leg B and signalling.
READ_BATCH = 64
MAX_DATAGRAM = 65535


class State(enum.Enum):
    LOOKUP = "lookup"
    OPENING = "opening"
    OPEN = "open"
    ENDED = "ended"  # the gateway stopped relaying it: datagrams go to ``_up`` (to be dropped) until FLOW_END
    CLOSED = "closed"


class UdpFlow:
    """One binding as a datagram gateway holds it; a subclass adds its own fields."""

    __slots__ = ("fw", "addr", "state", "queue", "hold", "leg_b", "task")

    def __init__(self, fw: Endpoint) -> None:
        self.fw = fw
        self.addr: Any = None  # F:f as recvfrom gave it (IPv6: a 4-tuple), the ``_by_addr`` key
        self.state = State.LOOKUP
        self.queue: deque[bytes] = deque()
        self.hold: Hold | None = None
        self.leg_b: asyncio.DatagramTransport | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def info(self) -> FlowInfo:
        assert self.hold is not None
        return self.hold.flow


class _LegBProtocol(asyncio.DatagramProtocol):
    def __init__(self, gw: "UdpFlows", flow: UdpFlow) -> None:
        self._gw = gw
        self._flow = flow

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._flow.state is State.OPEN:
            self._gw._down(self._flow, data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a connected socket (port unreachable at the
        # server): UDP carries on, the server may come up; it is counted.
        self._gw.counters["socket_errors.leg_b"] += 1


class UdpFlows(abc.ABC):
    """Leg A, the lookups and leg B of a datagram gateway (module docstring)."""

    max_queued = MAX_QUEUED_DATAGRAMS

    def __init__(self, layer: GatewayLayer, listen: Endpoint, max_flows: int, log: EventLog,
                 counters: Counter[str], listen6: Endpoint | None = None) -> None:
        self.layer = layer
        self.listen = listen
        self.listen6 = listen6  # a kind that takes IPv6: G6 on listen's port (issue 17)
        self.log = log
        self.counters = counters
        self._max_flows = max_flows
        self._sock: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._flows: dict[Endpoint, UdpFlow] = {}
        # The same flows by the socket's own address tuple: a datagram of a
        # known flow costs one dict look-up, no address object.
        self._by_addr: dict[Any, UdpFlow] = {}

    @property
    def active(self) -> int:
        """Flows held (looking up, open, or ended and waiting for FLOW_END)."""
        return len(self._flows)

    async def start(self) -> None:
        """Bind G:g (and G6 on its port). OSError if an address is not here."""
        sock = _bind(self.listen)
        self.listen = Endpoint(self.listen.address, sock.getsockname()[1])
        if self.listen6 is not None:
            try:
                sock6 = _bind(Endpoint(self.listen6.address, self.listen.port))
            except BaseException:
                sock.close()
                raise
            self.listen6 = Endpoint(self.listen6.address, self.listen.port)
            self._sock6 = sock6
            asyncio.get_running_loop().add_reader(sock6.fileno(), self._read, sock6)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read, sock)

    async def _close_all(self, reason: str) -> None:
        """Close every flow, wait for their lookups, and release G:g."""
        flows = list(self._flows.values())
        for flow in flows:
            self._close_flow(flow, reason)
        tasks = [f.task for f in flows if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for sock in (self._sock, self._sock6):
            if sock is not None:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
        self._sock = self._sock6 = None

    # ---- hooks -------------------------------------------------------------------------------

    def _new_flow(self, fw: Endpoint) -> UdpFlow:
        return UdpFlow(fw)

    @abc.abstractmethod
    def _up(self, flow: UdpFlow, data: bytes) -> None:
        """A datagram from the client of an open (or ended) flow."""

    @abc.abstractmethod
    def _down(self, flow: UdpFlow, data: bytes) -> None:
        """A datagram from the server on an open flow's leg B."""

    def _attached(self, flow: UdpFlow) -> None:
        """The flow's original tuple is known (``flow.info``); leg B is being opened."""

    def _opened(self, flow: UdpFlow) -> None:
        """Leg B is open; the queued datagrams go to ``_up`` next."""

    @abc.abstractmethod
    def _leg_b_failed(self, flow: UdpFlow, exc: OSError) -> None:
        """Leg B could not be opened: close the flow."""

    @abc.abstractmethod
    def _ended(self, flow: UdpFlow, cause: EndCause) -> None:
        """The processor's FLOW_END (or the layer's, at shutdown): close the flow."""

    def _close_flow(self, flow: UdpFlow, reason: str, detail: str = "") -> None:
        """Close the flow and release what it holds (a subclass logs and counts, then calls this)."""
        if flow.state is State.CLOSED:
            return
        attached = flow.hold is not None
        flow.state = State.CLOSED
        self._remove(flow)
        if flow.task is not None and flow.task is not asyncio.current_task() and not attached:
            flow.task.cancel()  # still looking up: nobody waits for the answer
        if flow.leg_b is not None:
            flow.leg_b.close()
            flow.leg_b = None
        if flow.queue:
            self.counters["dropped.closed"] += len(flow.queue)
            flow.queue.clear()
        if flow.hold is not None:
            flow.hold.release()

    # ---- datagrams ---------------------------------------------------------------------------

    def _read(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket
                self.counters["socket_errors.leg_a"] += 1
                continue
            self._from_client(data, addr)

    def _from_client(self, data: bytes, addr: Any) -> None:
        flow = self._by_addr.get(addr)
        if flow is not None and (flow.state is State.OPEN or flow.state is State.ENDED):
            self._up(flow, data)
            return
        fw = endpoint_of(addr)
        if fw is None:
            self.counters["dropped.bad_source"] += 1
            return
        flow = self._flows.get(fw)
        if flow is None:
            if len(self._flows) >= self._max_flows:
                self.counters["dropped.max_flows"] += 1
                return
            flow = self._new_flow(fw)
            flow.addr = addr
            self._flows[fw] = flow
            self._by_addr[addr] = flow
            self.counters["flows.started"] += 1
            flow.task = asyncio.create_task(self._open(flow))
        state = flow.state
        if state is State.OPEN or state is State.ENDED:
            self._up(flow, data)
        elif len(flow.queue) < self.max_queued:
            flow.queue.append(data)
        else:
            self.counters["dropped.queue_full"] += 1

    def _send_down(self, flow: UdpFlow, data: bytes) -> bool:
        """To the client from G:g (G6:g for IPv6); False (counted) when the socket's buffer is full."""
        sock = self._sock6 if flow.fw.address.version == 6 else self._sock
        if sock is None:
            return False
        try:
            sock.sendto(data, (str(flow.fw.address), flow.fw.port))
        except (BlockingIOError, InterruptedError):
            self.counters["dropped.send_buffer"] += 1
            return False
        except OSError:
            self.counters["socket_errors.leg_a"] += 1
            return False
        return True

    def _send_up(self, flow: UdpFlow, data: bytes, limit: int) -> bool:
        """To the server on leg B; False (counted) when asyncio already holds ``limit`` bytes."""
        leg_b = flow.leg_b
        if leg_b is None:
            return False
        if leg_b.get_write_buffer_size() > limit:
            self.counters["dropped.send_buffer"] += 1
            return False
        leg_b.sendto(data)
        return True

    # ---- one flow ---------------------------------------------------------------------------

    async def _open(self, flow: UdpFlow) -> None:
        try:
            ag = self.listen6 if flow.fw.address.version == 6 and self.listen6 is not None else self.listen
            hold = await self.layer.attach(Proto.UDP, flow.fw, ag, on_end=lambda cause: self._ended(flow, cause))
        except FlowUnknown as exc:
            self.counters["flows.unknown"] += 1
            self.counters["dropped.unknown_flow"] += len(flow.queue)
            self.log.emit("unknown_flow", via=flow.fw, to=self.listen, why=exc.why, dropped=len(flow.queue))
            self._forget(flow)
            return
        except asyncio.CancelledError:
            self._forget(flow)
            raise
        if flow.state is State.CLOSED:  # closed (shutdown) while the answer was on its way
            hold.release()
            return
        flow.hold = hold
        flow.state = State.OPENING
        self._attached(flow)
        try:
            transport, _ = await self.layer.open_udp(hold.flow, lambda: _LegBProtocol(self, flow))
        except OSError as exc:
            self._leg_b_failed(flow, exc)
            return
        if flow.state is State.CLOSED:
            transport.close()
            return
        flow.leg_b = transport
        flow.state = State.OPEN
        self._opened(flow)
        while flow.queue and flow.state is State.OPEN:
            self._up(flow, flow.queue.popleft())
        flow.queue.clear()

    def _forget(self, flow: UdpFlow) -> None:
        """Drop a flow that never opened (no open line, nothing to release)."""
        flow.state = State.CLOSED
        flow.queue.clear()
        self._remove(flow)

    def _remove(self, flow: UdpFlow) -> None:
        if self._flows.get(flow.fw) is flow:
            del self._flows[flow.fw]
        if self._by_addr.get(flow.addr) is flow:
            del self._by_addr[flow.addr]


def _bind(listen: Endpoint) -> socket.socket:
    """A non-blocking datagram socket on ``listen``. OSError if the address is not here."""
    sock = socket.socket(socket.AF_INET6 if listen.address.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((str(listen.address), listen.port))
    except BaseException:
        sock.close()
        raise
    return sock
