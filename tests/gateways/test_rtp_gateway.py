"""The rtp gateway's adapter on loopback (a fake processor, real sockets): relaying, drops, rules, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest

from firewall import manifests
from firewall.config import load
from firewall.signalling import (
    Counters, Endpoint, FlowEnd, FlowEndReason, FlowInfo, MsgType, NewFlow, OffloadRequest, Proto, RuleAck, RuleMode,
    RuleRefusal, RuleRequest, load_or_create_key, make_flow_id,
)
from firewall.signalling.guard import Refusal
from gateways.layer import EventLog
from gateways.rtp.gateway import RtpGateway
from gateways.rtp.settings import RtpSettings
from tests.gateways.fake_processor import FakeProcessor, rig
from tests.gateways.loopback import GATEWAY, DatagramQueue, fw_socket, run, udp_client_at, wait_until
from tests.gateways.process import events, free_port, next_event, start_gateway, write_config
from tests.gateways.rtp_packets import rr, rtp

IP = ipaddress.IPv4Address
C = IP("198.51.100.7")
T = IP("198.51.100.66")
S_ = IP("203.0.113.1")
S = IP("192.168.1.10")
N = 5004


class Leg:
    """One flow: the client on F:f, the restored server on the same F:f."""

    def __init__(self, info: FlowInfo, client: DatagramQueue, server: DatagramQueue) -> None:
        self.info = info
        self.client = client
        self.server = server

    def send(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.sendto(data)

    def reply(self, data: bytes) -> None:
        """The server answers to where leg B came from."""
        assert self.server.transport is not None
        self.server.transport.sendto(data, self.last)

    async def at_server(self) -> bytes:
        data, self.last = await self.server.get()
        return data


class World:
    def __init__(self, fake: FakeProcessor, gw: RtpGateway) -> None:
        self.fake = fake
        self.gw = gw
        self.transports: list[asyncio.BaseTransport] = []

    async def leg(self, client: ipaddress.IPv4Address = C, cport: int = 40000, dport: int = N) -> Leg:
        sock, fw = fw_socket(socket.SOCK_DGRAM)
        loop = asyncio.get_running_loop()
        server_t, server = await loop.create_datagram_endpoint(
            DatagramQueue, local_addr=(str(fw.address), fw.port), reuse_port=True)
        info = self.fake.new_flow(Proto.UDP, fw, self.gw.listen, client=Endpoint(client, cport),
                                  original_dst=Endpoint(S_, dport), server=Endpoint(S, dport), gateway="rtp")
        client_q = await udp_client_at(sock, self.gw.listen)
        assert client_q.transport is not None
        self.transports += [server_t, client_q.transport]
        return Leg(info, client_q, server)


class OffloadingProcessor(FakeProcessor):
    """The fake processor, answering OFFLOAD_REQUEST as the processor does: RULE_ACK, then FLOW_END
    OFFLOADED; and reporting the end of a connection the kernel carried as a flow without a binding."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offloads: list[OffloadRequest] = []

    def _received(self, inst: Any, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 2 or data[1] != MsgType.OFFLOAD_REQUEST:
            return super()._received(inst, data, addr)
        result = inst.guard.check(data, time.time())
        assert not isinstance(result, Refusal), result
        req = result.message
        self.offloads.append(req)
        inst.send(inst.encoder.encode(RuleAck(req.request_id, 7, int((time.time() + 30) * 1000)), time.time()), addr)
        self.end_flow(self.flows[req.flow_id], FlowEndReason.OFFLOADED)

    def kernel_end(self, flow: FlowInfo, counters: Counters) -> None:
        """The offloaded flow's kernel connection: pushed without F:f, then ended with conntrack's counters."""
        carried = FlowInfo(make_flow_id(self.queues[0], 1 << 40), Proto.UDP, flow.gateway, flow.client,
                           flow.original_dst, flow.server, Endpoint(IP(0), 0), flow.ag, None)
        inst = self._owner(carried)
        inst.send(inst.encoder.encode(NewFlow(carried), time.time()), self._layer())
        inst.send(inst.encoder.encode(FlowEnd(carried.flow_id, FlowEndReason.IDLE, counters), time.time()),
                  self._layer())


@contextlib.asynccontextmanager
async def world(settings: RtpSettings = RtpSettings()) -> AsyncIterator[World]:
    async with rig(gateway="rtp", fake=OffloadingProcessor()) as (fake, layer):
        gw = RtpGateway(layer, listen=Endpoint(GATEWAY, 0), settings=settings, log=EventLog("rtp"))
        await gw.start()
        w = World(fake, gw)
        try:
            yield w
        finally:
            await gw.close(grace=0)
            for t in w.transports:
                t.close()


def test_valid_datagrams_cross_both_ways_invalid_ones_are_dropped_and_the_rule_is_asked(
        log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            a = await w.leg()
            a.send(rtp(version=1))
            a.send(rtp()[:11])
            a.send(rtp(1))
            assert await a.at_server() == rtp(1)  # loopback keeps order: the two before were dropped
            a.reply(rtp(7, ssrc=0x99))
            data, _ = await a.client.get()
            assert data == rtp(7, ssrc=0x99)
            a.reply(b"\x80")  # a broken datagram from the server is not relayed either
            a.send(rtp(2))
            assert await a.at_server() == rtp(2)
            assert a.client.queue.empty()
            c = w.gw.counters
            assert (c["dropped.rtp.version"], c["dropped.rtp.truncated"]) == (1, 2) and c["relayed.rtp"] == 3
            await wait_until(lambda: bool(events(log, "rule.granted")), what="the rule's grant")
            ((_, req),) = w.fake.rule_requests
            assert (req.flow_id, req.proto, req.mode, req.one_shot) == (a.info.flow_id, Proto.UDP, RuleMode.REDIRECT, True)
            assert (req.src, req.dst, req.ttl) == (Endpoint(C, 40001), Endpoint(S_, N + 1), 30)
            assert events(log, "stream.open")[0]["client"] == str(a.info.client)

    run(main())


def test_a_third_host_on_the_streams_port_gets_nothing_through() -> None:
    async def main() -> None:
        async with world() as w:
            a = await w.leg()
            a.send(rtp(1))
            await a.at_server()
            t = await w.leg(client=T)
            for i in range(3):
                t.send(rtp(i, ssrc=0x11223344))
            rtcp = await w.leg(client=T, cport=40001, dport=N + 1)
            rtcp.send(rr())
            await wait_until(lambda: w.gw.counters["dropped.not_latched"] == 4, what="the drops")
            assert t.server.queue.empty() and rtcp.server.queue.empty()
            a.send(rtp(2))
            assert await a.at_server() == rtp(2)

    run(main())


def test_no_media_ends_the_stream_then_flow_end_forgets_the_flow(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(RtpSettings(no_media_timeout=1.0)) as w:
            a = await w.leg()
            a.send(rtp(1))
            await a.at_server()
            await wait_until(lambda: w.gw.counters["streams.ended.no_media"] == 1, timeout=5, what="the timeout")
            (closed,) = events(log, "stream.close")
            assert (closed["reason"], closed["datagrams_up"]) == ("no_media", 1)
            a.send(rtp(2))
            await wait_until(lambda: w.gw.counters["dropped.stream_ended"] == 1, what="the drop")
            assert a.server.queue.empty() and w.gw.active == 1
            w.fake.end_flow(a.info, FlowEndReason.IDLE)
            await wait_until(lambda: w.gw.active == 0, what="the flow to be forgotten")

    run(main())


def test_a_refused_rule_is_logged_and_not_asked_again(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(RtpSettings(adjacent_rule_ttl=1)) as w:
            def refuse(req: RuleRequest) -> RuleAck | RuleRefusal:
                return RuleRefusal.LIMIT

            w.fake.rule_policy = refuse
            a = await w.leg()
            a.send(rtp(1))
            await a.at_server()
            await wait_until(lambda: bool(events(log, "rule.not_granted")), what="the refusal")
            a.send(rtp(2))
            await a.at_server()
            assert len(w.fake.rule_requests) == 1 and w.gw.counters["rules.not_granted"] == 1

    run(main())


def test_adjacent_processor_asks_for_nothing() -> None:
    async def main() -> None:
        async with world(RtpSettings(adjacent="processor")) as w:
            a = await w.leg()
            a.send(rtp(1))
            await a.at_server()
            b = await w.leg(cport=40001, dport=N + 1)
            b.send(rr())
            assert await b.at_server() == rr()
            assert w.fake.rule_requests == [] and w.gw.counters["relayed.rtcp"] == 1

    run(main())


def test_the_gateway_process_runs_kind_rtp(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeProcessor(load_or_create_key(tmp_path / "keys" / "signalling.key"))
        await fake.start()
        assert fake.base_port is not None
        proc = await start_gateway(write_config(tmp_path, port=fake.base_port, kind="rtp"))
        seen: list[dict[str, Any]] = []
        try:
            ready = await next_event(proc, "ready", seen)
            assert ready["kind"] == "rtp"
            fake.layer_address = Endpoint(GATEWAY, fake.base_port)
            listen = Endpoint(GATEWAY, int(ready["listen"].rsplit(":", 1)[1]))
            sock, fw = fw_socket(socket.SOCK_DGRAM)
            loop = asyncio.get_running_loop()
            server_t, server = await loop.create_datagram_endpoint(
                DatagramQueue, local_addr=(str(fw.address), fw.port), reuse_port=True)
            fake.new_flow(Proto.UDP, fw, listen, client=Endpoint(C, 40000), original_dst=Endpoint(S_, 8444),
                          server=Endpoint(S, 8444), gateway="relay")  # even: RTP
            client = await udp_client_at(sock, listen)
            assert client.transport is not None
            client.transport.sendto(rtp(1))
            try:
                data, _ = await server.get(timeout=10)
            except asyncio.TimeoutError:
                proc.send_signal(signal.SIGUSR1)
                await next_event(proc, "stats", seen)
                raise AssertionError(seen) from None
            assert data == rtp(1)
            await next_event(proc, "stream.open", seen)
            proc.send_signal(signal.SIGTERM)
            closed = await next_event(proc, "stream.close", seen)
            assert closed["reason"] == "shutdown"
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            server_t.close()
            client.transport.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            fake.close()

    run(main())


def test_a_validated_stream_goes_to_the_kernel_and_its_reported_end_closes_it(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(RtpSettings(offload="after-validation", offload_after_packets=3)) as w:
            fake = w.fake
            assert isinstance(fake, OffloadingProcessor)
            a = await w.leg()
            b = await w.leg(cport=40001, dport=N + 1)
            b.send(rr())
            assert await b.at_server() == rr()
            for i in range(3):
                a.send(rtp(i))
                assert await a.at_server() == rtp(i)
            await wait_until(lambda: w.gw.active == 0, what="both flows handed to the kernel")
            assert sorted(r.flow_id for r in fake.offloads) == sorted((a.info.flow_id, b.info.flow_id))
            assert [e["role"] for e in events(log, "offloaded")] in (["rtp", "rtcp"], ["rtcp", "rtp"])
            assert w.gw.streams == 1 and w.gw.counters["offload.acked"] == 2
            t = await w.leg(client=T)  # a third host on the stream's port, after the offload
            t.send(rtp(1))
            await wait_until(lambda: w.gw.counters["dropped.not_latched"] == 1, what="the third host's drop")
            fake.kernel_end(a.info, Counters(250, 250 * 200, 0, 0))
            await wait_until(lambda: bool(events(log, "stream.close")), what="the stream's end")
            (closed,) = events(log, "stream.close")
            assert (closed["reason"], closed["datagrams_up"], closed["offloaded"]) == ("kernel_end", 254, True)

    run(main())


def test_the_rtp_gateway_listens_on_g6_when_its_selectors_take_ipv6(tmp_path: Path) -> None:
    """rtp takes IPv6 (issue 17): its manifest names G6, where it takes datagrams on its G:g's port too."""
    cfg = load(write_config(tmp_path, port=free_port(GATEWAY), kind="rtp", name="rtp"))
    gateway = next(g for g in cfg.gateways if g.name == "rtp")
    manifest = manifests.manifest_for(cfg, gateway)
    assert manifest.listen6 == cfg.gateway_link.gateway_address6.ip
    listen = Endpoint(GATEWAY, manifest.listen.port)
    gw = RtpGateway.for_gateway(SimpleNamespace(), manifest, listen, EventLog("rtp"))  # type: ignore[arg-type]
    assert gw.listen6 == Endpoint(manifest.listen6, listen.port)
