"""A fake packet processor for gateway tests: the real signalling code, on loopback.

``FakeProcessor`` speaks docs/signalling.md as the processor does, with the
real ``Encoder`` and ``Guard`` (role processor): one socket, one sender id
and one Guard per instance, instance *i* on ROUTER:(base + i). It keeps a
table of the flows it "redirected", pushes NEW_FLOW (unless told to drop
pushes), answers QUERY from that table (ANSWER or NOT_FOUND, to the query's
source), answers RULE_REQUEST by a policy the test sets (and a repeated
request id with the first reply, as the spec asks), and sends FLOW_END and
RULE_END on demand. The kernel's part (the client and the restored server on
F:f) is in ``loopback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import random
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable, Sequence

from firewall.signalling import (
    Answer,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Guard,
    NewFlow,
    NotFound,
    Proto,
    Query,
    Refusal,
    Role,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    make_flow_id,
)
from firewall.pools import address_slices
from gateways.layer import GatewayLayer, ProcessorInstances
from gateways.manifest import InstanceSpec, NodeSpec
from tests.gateways.loopback import GATEWAY, POOL, ROUTER

KEY = bytes(range(32))
CLIENT = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 40000)
ORIGINAL_DST = Endpoint(ipaddress.IPv4Address("203.0.113.1"), 8443)
SERVER = Endpoint(ipaddress.IPv4Address("192.168.1.20"), 443)

RulePolicy = Callable[[RuleRequest], "RuleAck | RuleRefusal | None"]

_PORT_TRIES = 50  # random base ports tried before giving up (each try binds every instance)


class _Instance(asyncio.DatagramProtocol):
    def __init__(self, fake: "FakeProcessor", index: int, key: bytes) -> None:
        self.fake = fake
        self.index = index
        self.encoder = Encoder(key, Role.PROCESSOR)
        self.guard = Guard(key, Role.PROCESSOR, now=time.time())
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fake._received(self, data, addr)

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.fake.sent.append(data)
        self.transport.sendto(data, to)


def instances_of(
    router: ipaddress.IPv4Address, base_port: int, queues: Sequence[int], pool: ipaddress.IPv4Network
) -> ProcessorInstances:
    """What a manifest tells a gateway of processor instances on ``base_port + i``
    that own ``pool``'s contiguous slices, as the supervisor writes them."""
    slices = address_slices(pool, len(queues))
    specs = tuple(InstanceSpec(queue=q, port=base_port + i, slices=slices[i]) for i, q in enumerate(queues))
    return ProcessorInstances(pool, [NodeSpec(name="router", address=router, instances=specs)])


class FakeProcessor:
    """The processor's side of signalling, for tests."""

    def __init__(
        self,
        key: bytes = KEY,
        *,
        queues: tuple[int, ...] = (0,),
        pool: ipaddress.IPv4Network = POOL,
        copies: int = 3,
        base_port: int | None = None,
    ) -> None:
        self.key = key
        self.queues = queues
        self.pool = pool
        self.copies = copies
        self.base_port = base_port
        self.layer_address: Endpoint | None = None  # where pushes go
        self.drop_pushes = False
        self.answer_queries = True
        self.rule_policy: RulePolicy = self.grant
        self.drop_rule_requests = 0  # ignore this many RULE_REQUEST datagrams first
        self.flows: dict[int, FlowInfo] = {}
        self.queries: list[tuple[int, Query]] = []  # (instance index, query)
        self.rule_requests: list[tuple[int, RuleRequest]] = []
        self.sent: list[bytes] = []
        self.refusals: Counter[Refusal] = Counter()
        self._instances: list[_Instance] = []
        self._replies: dict[tuple[int, int], RuleAck | RuleRefused | None] = {}  # (sender, request id) -> first
        self._serial = itertools.count(1)
        self._rule_ids = itertools.count(100)

    # ---- set-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tries = 1 if self.base_port is not None else _PORT_TRIES
        for _ in range(tries):
            base = self.base_port if self.base_port is not None else random.randrange(20000, 32000)
            opened: list[_Instance] = []
            try:
                for i in range(len(self.queues)):
                    inst = _Instance(self, i, self.key)
                    await loop.create_datagram_endpoint(lambda inst=inst: inst, local_addr=(str(ROUTER), base + i))
                    opened.append(inst)
            except OSError:
                for inst in opened:
                    assert inst.transport is not None
                    inst.transport.close()
                if self.base_port is not None:
                    raise
                continue
            self.base_port = base
            self._instances = opened
            return
        raise AssertionError(f"no {len(self.queues)} free consecutive UDP ports on {ROUTER}")

    def close(self) -> None:
        for inst in self._instances:
            if inst.transport is not None:
                inst.transport.close()

    @property
    def instances(self) -> ProcessorInstances:
        """What the layer is told about this processor."""
        assert self.base_port is not None
        return instances_of(ROUTER, self.base_port, self.queues, self.pool)

    def sender_id(self, index: int = 0) -> int:
        return self._instances[index].encoder.sender_id

    # ---- the processor's part -----------------------------------------------------------------

    def new_flow(
        self,
        proto: Proto,
        fw: Endpoint,
        ag: Endpoint,
        *,
        client: Endpoint = CLIENT,
        original_dst: Endpoint = ORIGINAL_DST,
        server: Endpoint = SERVER,
        gateway: str = "relay",
        snat: Endpoint | None = None,
        push: bool = True,
    ) -> FlowInfo:
        """Make a binding for F:f -> G:g, and push it unless pushes are dropped."""
        index = self.instances.index_for_firewall_side(fw.address)
        flow = FlowInfo(
            flow_id=make_flow_id(self.queues[index], next(self._serial)),
            proto=proto,
            gateway=gateway,
            client=client,
            original_dst=original_dst,
            server=server,
            firewall_side=fw,
            ag=ag,
            snat=snat,
        )
        self.flows[flow.flow_id] = flow
        if push and not self.drop_pushes:
            self.push(flow)
        return flow

    def push(self, flow: FlowInfo, copies: int | None = None) -> None:
        inst = self._owner(flow)
        for data in inst.encoder.encode_copies(NewFlow(flow), time.time(), copies or self.copies):
            inst.send(data, self._layer())

    def end_flow(self, flow: FlowInfo, reason: FlowEndReason = FlowEndReason.FIN) -> None:
        self.flows.pop(flow.flow_id, None)
        inst = self._owner(flow)
        inst.send(inst.encoder.encode(FlowEnd(flow.flow_id, reason), time.time()), self._layer())

    def end_rule(self, rule_id: int, reason: RuleEndReason = RuleEndReason.USED, index: int = 0) -> None:
        inst = self._instances[index]
        inst.send(inst.encoder.encode(RuleEnd(rule_id, reason), time.time()), self._layer())

    def send_raw(self, data: bytes, index: int = 0) -> None:
        self._instances[index].send(data, self._layer())

    @staticmethod
    def grant(request: RuleRequest) -> RuleAck:
        return RuleAck(request.request_id, 0, int((time.time() + request.ttl) * 1000))

    # ---- internals ----------------------------------------------------------------------------

    def _layer(self) -> tuple[str, int]:
        assert self.layer_address is not None, "set layer_address first"
        return str(self.layer_address.address), self.layer_address.port

    def _owner(self, flow: FlowInfo) -> _Instance:
        return self._instances[self.queues.index(flow.flow_id >> 48)]

    def _received(self, inst: _Instance, data: bytes, addr: tuple[str, int]) -> None:
        result = inst.guard.check(data, time.time())
        if isinstance(result, Refusal):
            self.refusals[result] += 1
            return
        message = result.message
        if isinstance(message, Query):
            self.queries.append((inst.index, message))
            if not self.answer_queries:
                return
            for flow in self.flows.values():
                if (flow.proto, flow.firewall_side, flow.ag) == (message.proto, message.firewall_side, message.ag):
                    reply: Any = Answer(message.query_id, flow)
                    break
            else:
                reply = NotFound(message.query_id, message.proto, message.firewall_side, message.ag)
            inst.send(inst.encoder.encode(reply, time.time()), addr)
        elif isinstance(message, RuleRequest):
            self.rule_requests.append((inst.index, message))
            if self.drop_rule_requests > 0:
                self.drop_rule_requests -= 1
                return
            ident = (result.sender, message.request_id)
            if ident not in self._replies:
                decision = self.rule_policy(message)
                if decision is None:
                    self._replies[ident] = None
                elif isinstance(decision, RuleAck):
                    self._replies[ident] = RuleAck(message.request_id, next(self._rule_ids), decision.expires_ms)
                else:
                    self._replies[ident] = RuleRefused(message.request_id, decision)
            first = self._replies[ident]
            if first is not None:
                # The first reply again, freshly encoded: the same bytes twice would be a replay.
                inst.send(inst.encoder.encode(first, time.time()), addr)


@contextlib.asynccontextmanager
async def rig(
    *,
    queues: tuple[int, ...] = (0,),
    query_timeout: float = 5.0,
    gateway: str | None = "relay",
    fake: FakeProcessor | None = None,
    **layer_options: Any,
) -> AsyncIterator[tuple[FakeProcessor, GatewayLayer]]:
    """A fake processor (``fake``, or a new one) and a real layer on loopback, wired to each other."""
    fake = fake if fake is not None else FakeProcessor(queues=queues)
    await fake.start()
    layer = GatewayLayer(
        KEY,
        listen=Endpoint(GATEWAY, 0),
        instances=fake.instances,
        gateway=gateway,
        query_timeout=query_timeout,
        **{"replay_window": 5.0, **layer_options},
    )
    try:
        await layer.start()
        fake.layer_address = layer.listen
        yield fake, layer
    finally:
        await layer.close()
        fake.close()
