"""The asyncio side of the deNAT/reNAT layer: one UDP socket, timers, futures, leg B.

``GatewayLayer`` carries out what ``LayerCore`` decides, through the shared
core driver (``firewall.drive``), and makes no protocol decisions of its own
(STYLE.md: "a single small server loop carries out the commands"). It gives
a gateway four things:

- ``attach(proto, F:f, G:g)``: the original tuple of the connection the
  gateway just accepted, held until the gateway releases it; ``Hold.ended``
  is set (and ``on_end`` called, given to ``attach`` or later to
  ``Hold.notify``) when the processor ends the flow, so the gateway closes
  it. ``lookup`` is the same without holding.
- ``connect_tcp(flow)`` (a socket; or in two steps, ``start_tcp`` then
  ``connected``, to do other work while the SYN is answered) /
  ``open_tcp(flow)`` (streams) / ``open_udp(flow, ...)``: leg B, the seed's "swap"
  ("Packet restoration"): a new socket on the gateway address connects to
  F:f, and the processor restores it to C:c -> S:s. Every leg B has its own
  ephemeral port, because the processor tells the legs of one binding apart
  by the gateway's port (docs/datapath.md, step 4).
- ``request_rule(...)``: a dynamic rule, or ``RuleRefusedError``;
  ``request_offload(flow)``: the same for handing a flow to the kernel.
- ``on_logged_end``: called with each ``LoggedFlowEnded`` (a log-only
  gateway's flows, which only the kernel carried).
- ``counters``: everything the core counted.

The event loop never blocks: the socket is non-blocking, every wait is a
future resolved by a datagram or a timer, and a datagram that makes the core
fail is counted and dropped rather than taking the endpoint down.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import time
from typing import Any, Callable, TypeVar

from firewall.connect import IP_BIND_ADDRESS_NO_PORT, wait_connected
from firewall.drive import CoreDriver
from firewall.signalling import MAX_DATAGRAM, Endpoint, FlowInfo, Proto, RuleAck, RuleEndReason, RuleMode, RuleRefusal
from gateways.layer.core import LayerCore
from gateways.layer.outputs import (
    EndCause,
    FlowGone,
    FlowKey,
    FlowKnown,
    FlowNotKnown,
    LoggedFlowEnded,
    RuleAnswered,
    RuleGone,
    RuleUnanswered,
    Send,
    describe,
    flow_key,
)
from gateways.layer.events import EventLog
from gateways.layer.instances import ProcessorInstances
from gateways.manifest import Manifest

# The signalling socket's receive buffer. The processor pushes ``copies``
# datagrams per new flow back to back; the kernel's default (rmem_default,
# about 200 KiB of skb truesize) holds a few hundred small datagrams, a burst
# of under a hundred flows. 1 MiB holds several thousand; what still
# overflows is recovered by the pull. As root the buffer is forced past
# rmem_max (SO_RCVBUFFORCE); otherwise the kernel caps it there.
SIGNALLING_RCVBUF = 1 << 20

# Datagrams read per wake-up of the loop, so that a burst of pushes does not
# starve the connections; the rest wait for the next turn.
READ_BATCH = 64
# StreamReader's buffer on a leg B read as streams (FTP control): asyncio's
# default 64 KiB.
STREAM_LIMIT = 1 << 16


class FlowUnknown(Exception):
    """No original tuple for a connection: no push, no answer, or NOT_FOUND. Close it."""

    def __init__(self, key: FlowKey, why: str) -> None:
        self.key = key
        self.why = why
        super().__init__(f"{describe(key)}: {why}")


class RuleError(Exception):
    """A dynamic rule was not granted."""


class RuleRefusedError(RuleError):
    """The processor (or the layer itself, ``local``) refused a rule request."""

    def __init__(self, reason: RuleRefusal, *, local: bool = False) -> None:
        self.reason = reason
        self.local = local
        super().__init__(f"rule refused: {reason.name}{' (before asking)' if local else ''}")


class RuleNoAnswer(RuleError):
    """The processor did not answer a rule request, resends included."""


RuleEndCallback = Callable[[RuleEndReason], None]
FlowEndCallback = Callable[[EndCause], None]
P = TypeVar("P", bound=asyncio.DatagramProtocol)


class Hold:
    """A connection's claim on a flow. Release it when the connection closes."""

    __slots__ = ("flow", "ended", "cause", "_on_end", "_layer", "_released")

    def __init__(self, layer: "GatewayLayer", flow: FlowInfo, on_end: FlowEndCallback | None) -> None:
        self.flow = flow
        self.ended = asyncio.Event()
        self.cause: EndCause | None = None
        self._on_end = on_end
        self._layer = layer
        self._released = False

    def _end(self, cause: EndCause) -> None:
        if self.cause is not None:
            return
        self.cause = cause
        self.ended.set()
        if self._on_end is not None:
            self._on_end(cause)

    def notify(self, on_end: FlowEndCallback) -> None:
        """Call ``on_end`` when the processor ends the flow (at once if it has),
        instead of a task waiting on ``ended``."""
        self._on_end = on_end
        if self.cause is not None:
            on_end(self.cause)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._layer._release(self)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    __slots__ = ("future", "claim", "on_end")

    def __init__(self, future: asyncio.Future[Any], claim: bool, on_end: FlowEndCallback | None) -> None:
        self.future = future
        self.claim = claim
        self.on_end = on_end


class GatewayLayer:
    """The signalling endpoint of one gateway process (docs/signalling.md)."""

    def __init__(
        self,
        key: bytes,
        *,
        listen: Endpoint,
        instances: ProcessorInstances,
        gateway: str | None = None,
        query_timeout: float,
        replay_window: float,
        log: EventLog | None = None,
        clock: Callable[[], float] = time.time,
        **core_options: Any,
    ) -> None:
        self.listen = listen
        self.gateway_address = listen.address
        self._bind_address = str(listen.address)
        self._clock = clock
        self._log = log
        # The core (and its Guard) exists before the socket is bound.
        self.core = LayerCore(
            key,
            instances,
            now=clock(),
            gateway=gateway,
            query_timeout=query_timeout,
            replay_window=replay_window,
            **core_options,
        )
        self._sock: socket.socket | None = None
        self._closed = False
        self._driver = CoreDriver(
            {
                Send: self._send, FlowKnown: self._resolve, FlowNotKnown: self._not_known,
                FlowGone: self._gone, RuleAnswered: self._rule_answered,
                RuleUnanswered: self._rule_unanswered, RuleGone: self._rule_gone,
                LoggedFlowEnded: self._logged_end,
            },
            tick=self.core.tick,
            deadline=self.core.next_deadline,
            clock=clock,
            on_error=lambda exc: self._internal_error("timers", exc),
        )
        self._waiters: dict[FlowKey, list[_Waiter]] = {}
        self._holds: dict[FlowKey, set[Hold]] = {}
        self._rule_futures: dict[int, tuple[asyncio.Future[RuleAck], RuleEndCallback | None]] = {}
        self._rule_ends: dict[int, RuleEndCallback] = {}
        self.on_rule_end: Callable[[int, RuleEndReason], None] | None = None
        self.on_logged_end: Callable[[LoggedFlowEnded], None] | None = None

    # ---- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the signalling socket. OSError if the address is not here (wrong netns)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            _grow_receive_buffer(sock)
            sock.bind((str(self.listen.address), self.listen.port))
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        port = sock.getsockname()[1]
        self.listen = Endpoint(self.listen.address, port)  # the real port, if 0 was asked for

    async def close(self) -> None:
        """Stop: nothing more is sent or received; whoever still waits is told so."""
        self._closed = True
        self._driver.close()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for key, waiters in list(self._waiters.items()):
            for w in waiters:
                if not w.future.done():
                    w.future.set_exception(FlowUnknown(key, "the gateway is stopping"))
        self._waiters.clear()
        for future, _ in self._rule_futures.values():
            if not future.done():
                future.set_exception(RuleNoAnswer("the gateway is stopping"))
        self._rule_futures.clear()

    @classmethod
    def from_manifest(cls, manifest: Manifest, key: bytes, log: EventLog | None = None, **options: Any) -> "GatewayLayer":
        """The layer of the gateway ``manifest`` describes (not started yet)."""
        sig = manifest.signalling
        return cls(
            key,
            listen=sig.listen.endpoint,
            instances=ProcessorInstances.from_spec(manifest.processor),
            gateway=manifest.name,
            query_timeout=sig.query_timeout,
            replay_window=sig.replay_window,
            log=log,
            **options,
        )

    @property
    def counters(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.core.counters.items()) if v}

    # ---- flows ------------------------------------------------------------------------------

    async def lookup(self, proto: Proto, fw_endpoint: Endpoint, ag_endpoint: Endpoint) -> FlowInfo:
        """The original tuple of the flow F:f -> G:g. Raises ``FlowUnknown``."""
        result = await self._find((Proto(proto), fw_endpoint, ag_endpoint), claim=False, on_end=None)
        assert isinstance(result, FlowInfo)
        return result

    async def attach(
        self,
        proto: Proto,
        fw_endpoint: Endpoint,
        ag_endpoint: Endpoint,
        *,
        on_end: FlowEndCallback | None = None,
    ) -> Hold:
        """Look the flow up and hold it until ``Hold.release()``. Raises ``FlowUnknown``.

        The claim is taken the moment the flow is known, so a FLOW_END that
        arrives before the caller resumes still reaches it.
        """
        result = await self._find((Proto(proto), fw_endpoint, ag_endpoint), claim=True, on_end=on_end)
        assert isinstance(result, Hold)
        return result

    async def _find(self, key: FlowKey, *, claim: bool, on_end: FlowEndCallback | None) -> FlowInfo | Hold:
        if self._closed:
            raise FlowUnknown(key, "the gateway is stopping")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, claim, on_end)
        self._waiters.setdefault(key, []).append(waiter)
        self._driver.run(self.core.lookup(key, self._clock()))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                result = future.result()
                if isinstance(result, Hold):
                    result.release()
            else:
                self._drop_waiter(key, waiter)
            raise

    def _drop_waiter(self, key: FlowKey, waiter: _Waiter) -> None:
        waiters = self._waiters.get(key)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._waiters[key]
            self.core.abandon(key)
            self._driver.arm()

    def _release(self, hold: Hold) -> None:
        key = flow_key(hold.flow)
        holds = self._holds.get(key)
        if holds is not None:
            holds.discard(hold)
            if not holds:
                del self._holds[key]
        self.core.release(hold.flow, self._clock())
        self._driver.arm()

    # ---- leg B --------------------------------------------------------------------------------

    async def connect_tcp(self, flow: FlowInfo, *, connect_timeout: float) -> socket.socket:
        """Leg B: a non-blocking socket on the gateway address, connected to F:f.
        TimeoutError or OSError on failure."""
        sock = self.start_tcp(flow)
        await self.connected(sock, connect_timeout=connect_timeout)
        return sock

    def start_tcp(self, flow: FlowInfo) -> socket.socket:
        """Leg B begun: a non-blocking socket on the gateway address whose SYN to
        F:f is on its way, so that a gateway can do its own set-up while the
        processor and the server answer it (then ``connected``). OSError if
        the connect cannot even start."""
        fw = flow.firewall_side
        six = fw.address.version == 6  # a family 6 flow: leg B from G6 (its ``ag``) to F6:f
        sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # The port is chosen by the connect, for leg B's 4-tuple, not by
            # the bind among the ports no socket holds: once thousands of leg
            # Bs are in TIME_WAIT (their clients close first), such a bind
            # costs milliseconds of system time (docs/benchmarks.md, issue
            # 14, ninth pass).
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((str(flow.ag.address) if six else self._bind_address, 0))
            err = sock.connect_ex((str(fw.address), fw.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock

    async def connected(self, sock: socket.socket, *, connect_timeout: float) -> None:
        """Wait for ``start_tcp``'s connect. TimeoutError or OSError on failure,
        and then (or when cancelled) the socket is closed."""
        try:
            await wait_connected(sock, connect_timeout)
        except BaseException:
            sock.close()
            raise

    async def open_tcp(
        self, flow: FlowInfo, *, connect_timeout: float, limit: int = STREAM_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Leg B as streams (``connect_tcp``), for a gateway that reads a protocol on it."""
        sock = await self.connect_tcp(flow, connect_timeout=connect_timeout)
        return await asyncio.open_connection(sock=sock, limit=limit)

    async def open_udp(
        self, flow: FlowInfo, protocol_factory: Callable[[], P]
    ) -> tuple[asyncio.DatagramTransport, P]:
        """Leg B for one UDP flow: a fresh socket on the gateway address (a family 6 flow's:
        G6, its ``ag``), connected to F:f."""
        fw = flow.firewall_side
        local = str(flow.ag.address) if fw.address.version == 6 else str(self.gateway_address)
        loop = asyncio.get_running_loop()
        return await loop.create_datagram_endpoint(
            protocol_factory,
            local_addr=(local, 0),
            remote_addr=(str(fw.address), fw.port),
        )

    # ---- rules --------------------------------------------------------------------------------

    async def request_rule(
        self,
        flow: FlowInfo,
        proto: Proto,
        src: Endpoint,
        dst: Endpoint,
        ttl: int,
        mode: RuleMode,
        one_shot: bool,
        *,
        on_end: RuleEndCallback | None = None,
        replaces: bool = False,
    ) -> RuleAck:
        """Ask the flow's processor instance for a dynamic rule (seed: "Dynamic changes in
        packet processing"); ``replaces``: the flow's earlier rules that still wait end
        (RULE_END SUPERSEDED). Raises ``RuleRefusedError`` or ``RuleNoAnswer``."""
        if self._closed:
            raise RuleNoAnswer("the gateway is stopping")
        return await self._answer(
            *self.core.request_rule(flow, proto, src, dst, ttl, mode, one_shot, self._clock(), replaces), on_end)

    async def request_offload(self, flow: FlowInfo) -> RuleAck:
        """Ask the flow's processor instance to let the kernel carry the flow without the gateway;
        FLOW_END OFFLOADED follows the ack. Raises ``RuleRefusedError`` or ``RuleNoAnswer``."""
        if self._closed:
            raise RuleNoAnswer("the gateway is stopping")
        return await self._answer(*self.core.request_offload(flow, self._clock()), None)

    async def _answer(self, request_id: int, outputs: list[Any], on_end: RuleEndCallback | None) -> RuleAck:
        """Send a rule or offload request and wait for its answer (resends are the core's)."""
        future: asyncio.Future[RuleAck] = asyncio.get_running_loop().create_future()
        self._rule_futures[request_id] = (future, on_end)
        self._driver.run(outputs)
        try:
            return await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                self._rule_futures.pop(request_id, None)
                self.core.cancel_rule(request_id)
            self._rule_ends.pop(request_id, None)
            raise

    # ---- the machinery ------------------------------------------------------------------------

    def _readable(self) -> None:
        """The datagrams waiting, up to ``READ_BATCH``: the processor pushes its
        copies back to back, and one wake-up of the loop takes them all. The
        batch stops after a datagram that did something (resolved a lookup or a
        rule, ended a flow): whoever that woke runs before the next datagram,
        as it would with one datagram per wake-up (an offload's RULE_ACK is
        seen before the FLOW_END OFFLOADED that follows it)."""
        sock = self._sock
        if sock is None:
            return
        for _ in range(READ_BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket (a processor that is not listening)
                self.core.counters["signalling.socket_errors"] += 1
                continue
            if self._on_datagram(data):
                return  # the socket is still readable: the rest come next turn

    def _on_datagram(self, data: bytes) -> bool:
        """Carry out what one datagram makes the core do; whether it did anything."""
        try:
            outputs = self.core.receive(data, self._clock())
            self._driver.run(outputs)
        except Exception as exc:  # a bug here must not stop the signalling of every other flow
            self._internal_error("signalling", exc)
            self._driver.arm()
            return True
        return bool(outputs)

    def _internal_error(self, where: str, exc: Exception) -> None:
        self.core.counters["signalling.internal_errors"] += 1
        if self._log is not None:
            self._log.emit("internal_error", logging.ERROR, where=where, error=repr(exc))

    def _send(self, out: Send) -> None:
        if self._sock is None:
            self.core.counters["signalling.send_errors"] += 1
            return
        try:
            # Never queued: a full buffer drops it, and the core's resend (every
            # query_timeout) stands in for it, as for a datagram lost on the way.
            self._sock.sendto(out.data, (str(out.to.address), out.to.port))
        except OSError:
            self.core.counters["signalling.send_errors"] += 1

    def _not_known(self, out: FlowNotKnown) -> None:
        for w in self._waiters.pop(out.key, []):
            if not w.future.done():
                w.future.set_exception(FlowUnknown(out.key, out.why))

    def _gone(self, out: FlowGone) -> None:
        for hold in list(self._holds.get(flow_key(out.flow), ())):
            if hold.flow.flow_id == out.flow.flow_id or hold.flow.flow_id in out.moved_from:
                hold._end(out.cause)

    def _resolve(self, out: FlowKnown) -> None:
        for w in self._waiters.pop(out.key, []):
            if w.future.done():
                continue
            if not w.claim:
                w.future.set_result(out.flow)
                continue
            hold = Hold(self, out.flow, w.on_end)
            # Cannot fail: the flow was known a moment ago, in this same call.
            self.core.claim(out.flow)
            self._holds.setdefault(out.key, set()).add(hold)
            w.future.set_result(hold)

    def _rule_answered(self, out: RuleAnswered) -> None:
        future, on_end = self._rule_futures.pop(out.request_id, (None, None))
        if future is None or future.done():
            return
        reply = out.reply
        if isinstance(reply, RuleAck):
            if on_end is not None:
                self._rule_ends[out.request_id] = on_end
            future.set_result(reply)
        else:
            future.set_exception(RuleRefusedError(reply.reason, local=out.local))

    def _rule_unanswered(self, out: RuleUnanswered) -> None:
        future, _ = self._rule_futures.pop(out.request_id, (None, None))
        if future is not None and not future.done():
            future.set_exception(RuleNoAnswer(f"no answer to rule request {out.request_id}"))

    def _logged_end(self, out: LoggedFlowEnded) -> None:
        if self.on_logged_end is not None:
            self.on_logged_end(out)

    def _rule_gone(self, out: RuleGone) -> None:
        callback = self._rule_ends.pop(out.request_id, None)
        if callback is not None:
            callback(out.reason)
        if self.on_rule_end is not None:
            self.on_rule_end(out.rule_id, out.reason)


def endpoint_of(address: Any) -> Endpoint | None:
    """An ``Endpoint`` from a socket address tuple (peername, recvfrom), or None (gone, or not an address)."""
    try:
        return Endpoint(ipaddress.ip_address(address[0]), int(address[1]))
    except (TypeError, ValueError, IndexError):
        return None


def _grow_receive_buffer(sock: socket.socket) -> None:
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None and os.geteuid() == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SIGNALLING_RCVBUF)
            return
        except OSError:
            pass  # no CAP_NET_ADMIN in this namespace: the capped size below
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SIGNALLING_RCVBUF)
