"""udp-relay on loopback: datagrams both ways, one leg B per flow, the lookup queue, limits, FLOW_END."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from firewall.signalling import Endpoint, FlowEndReason, FlowInfo, Proto, load_or_create_key
from gateways.layer import EventLog, GatewayLayer
from gateways.udp_relay import MAX_QUEUED_DATAGRAMS, UdpRelay, UdpRelaySettings
from tests.gateways.fake_processor import FakeProcessor, rig
from tests.gateways.loopback import (
    GATEWAY,
    DatagramQueue,
    UdpEcho,
    fw_socket,
    run,
    udp_client_at,
    udp_server_at,
    wait_until,
)
from tests.gateways.process import events, next_event, start_gateway, write_config


class Flow:
    """One client on F:f, the restored server on the same F:f, and the binding between them."""

    def __init__(self, fw: Endpoint, client: DatagramQueue, server: UdpEcho | None, info: FlowInfo | None) -> None:
        self.fw = fw
        self.client = client
        self.server = server
        self.info = info

    def send(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.sendto(data)

    async def reply(self) -> tuple[int, bytes]:
        """The next echo: (the leg B port the server saw, the datagram)."""
        data, _ = await self.client.get()
        port, _, payload = data.partition(b"|")
        return int(port), payload


class World:
    def __init__(self, fake: FakeProcessor, layer: GatewayLayer, relay: UdpRelay) -> None:
        self.fake = fake
        self.layer = layer
        self.relay = relay
        self.transports: list[asyncio.BaseTransport] = []

    async def flow(self, *, known: bool = True, **fields: Any) -> Flow:
        sock, fw = fw_socket(socket.SOCK_DGRAM)
        server_transport, server = await udp_server_at(fw)
        info = self.fake.new_flow(Proto.UDP, fw, self.relay.listen, **fields) if known else None
        client = await udp_client_at(sock, self.relay.listen)
        assert client.transport is not None
        self.transports += [server_transport, client.transport]
        return Flow(fw, client, server, info)


@contextlib.asynccontextmanager
async def world(settings: UdpRelaySettings = UdpRelaySettings(), query_timeout: float = 5.0) -> AsyncIterator[World]:
    async with rig(query_timeout=query_timeout) as (fake, layer):
        relay = UdpRelay(layer, listen=Endpoint(GATEWAY, 0), settings=settings, log=EventLog("relay"))
        await relay.start()
        w = World(fake, layer, relay)
        try:
            yield w
        finally:
            await relay.close(grace=0)
            for t in w.transports:
                t.close()


def test_datagrams_cross_both_ways_and_the_open_line_has_the_tuple(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            f = await w.flow()
            for i in range(5):
                f.send(b"datagram %d" % i)
            replies = [await f.reply() for _ in range(5)]
            assert [payload for _, payload in replies] == [b"datagram %d" % i for i in range(5)]
            leg_b = w.relay.leg_b_port(f.fw)
            assert {port for port, _ in replies} == {leg_b}
            assert f.server is not None and set(f.server.sources) == {(str(GATEWAY), leg_b)}
            assert f.info is not None
            (opened,) = events(log, "open")
            assert (opened["client"], opened["via"], opened["server"]) == (
                str(f.info.client), str(f.fw), str(f.info.server)
            )
            assert w.layer.counters.get("queries.sent") is None

    run(main())


def test_each_flow_has_its_own_leg_b_port() -> None:
    async def main() -> None:
        async with world() as w:
            flows = [await w.flow() for _ in range(4)]
            for i, f in enumerate(flows):
                f.send(b"%d" % i)
            ports = [(await f.reply())[0] for f in flows]
            assert len(set(ports)) == len(flows)
            assert w.relay.listen.port not in ports
            assert ports == [w.relay.leg_b_port(f.fw) for f in flows]

    run(main())


def test_datagrams_wait_for_the_lookup_up_to_the_queue_bound() -> None:
    async def main() -> None:
        async with world(query_timeout=0.05) as w:
            w.fake.drop_pushes = True  # every flow is pulled, one query_timeout after its first datagram
            f = await w.flow()
            extra = 5
            for i in range(MAX_QUEUED_DATAGRAMS + extra):
                f.send(b"early %d" % i)
            got = [(await f.reply())[1] for _ in range(MAX_QUEUED_DATAGRAMS)]
            assert got == [b"early %d" % i for i in range(MAX_QUEUED_DATAGRAMS)]
            f.send(b"after")
            assert (await f.reply())[1] == b"after"  # loopback keeps order: the extras were dropped
            assert w.relay.counters["dropped.queue_full"] == extra

    run(main())


def test_an_idle_flow_ends_and_the_next_datagram_starts_another(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(UdpRelaySettings.model_construct(idle_timeout=0.3)) as w:  # below the config's 1 s, for speed
            f = await w.flow()
            f.send(b"one")
            await f.reply()
            await wait_until(lambda: bool(events(log, "close")), what="the idle close", timeout=5)
            (closed,) = events(log, "close")
            assert closed["reason"] == "idle" and closed["datagrams_up"] == closed["datagrams_down"] == 1
            assert w.relay.active == 0
            f.send(b"two")  # the binding lives on at the processor: the layer still knows it
            assert (await f.reply())[1] == b"two"
            assert w.relay.counters["flows.started"] == 2

    run(main())


def test_max_flows_at_the_limit_and_one_past_it() -> None:
    async def main() -> None:
        async with world(UdpRelaySettings(max_flows=2)) as w:
            flows = [await w.flow() for _ in range(3)]
            for f in flows[:2]:
                f.send(b"in")
                assert (await f.reply())[1] == b"in"
            flows[2].send(b"one too many")
            await wait_until(lambda: w.relay.counters["dropped.max_flows"] == 1, what="the drop")
            assert w.relay.active == 2 and flows[2].client.queue.empty()

    run(main())


def test_flow_end_closes_the_flow_and_the_processor_then_knows_it_no_more(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(query_timeout=0.05) as w:
            f = await w.flow()
            f.send(b"x")
            await f.reply()
            assert f.info is not None
            w.fake.end_flow(f.info, FlowEndReason.IDLE)
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            closed = events(log, "close")[0]
            assert (closed["reason"], closed["detail"]) == ("flow_end", "idle")
            f.send(b"after the end")
            await wait_until(lambda: w.relay.counters["flows.unknown"] == 1, what="the NOT_FOUND")
            assert w.relay.counters["dropped.unknown_flow"] == 1

    run(main())


def test_a_flow_never_signalled_is_dropped_and_counted(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(query_timeout=0.05) as w:
            w.fake.answer_queries = False
            f = await w.flow(known=False)
            f.send(b"a")
            f.send(b"b")
            await wait_until(lambda: w.relay.counters["flows.unknown"] == 1, what="giving up")
            assert w.relay.counters["dropped.unknown_flow"] == 2 and w.relay.active == 0
            assert events(log, "unknown_flow")[0]["dropped"] == 2

    run(main())


def test_the_gateway_process_runs_a_udp_relay(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeProcessor(load_or_create_key(tmp_path / "keys" / "signalling.key"))
        await fake.start()
        assert fake.base_port is not None
        proc = await start_gateway(write_config(tmp_path, port=fake.base_port, kind="udp-relay"))
        seen: list[dict[str, Any]] = []
        try:
            ready = await next_event(proc, "ready", seen)
            fake.layer_address = Endpoint(GATEWAY, fake.base_port)
            listen = Endpoint(GATEWAY, int(ready["listen"].rsplit(":", 1)[1]))
            sock, fw = fw_socket(socket.SOCK_DGRAM)
            server, _ = await udp_server_at(fw)
            fake.new_flow(Proto.UDP, fw, listen)
            client = await udp_client_at(sock, listen)
            assert client.transport is not None
            client.transport.sendto(b"via the process")
            data, _ = await client.get()
            assert data.endswith(b"|via the process")
            proc.send_signal(signal.SIGTERM)
            closed = await next_event(proc, "close", seen)
            assert closed["reason"] == "shutdown"
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            server.close()
            client.transport.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            fake.close()

    run(main())
