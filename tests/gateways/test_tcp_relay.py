"""tcp-relay on loopback: data, half-close, resets, limits, the log, and the gateway process itself."""

from __future__ import annotations

import asyncio
import json
import contextlib
import hashlib
import ipaddress
import os
import signal
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from firewall.signalling import Endpoint, FlowEndReason, FlowInfo, Proto, load_or_create_key
from gateways.layer import EventLog, GatewayLayer
from gateways.tcp_relay import TcpRelay, TcpRelaySettings
from tests.gateways.fake_processor import ORIGINAL_DST, SERVER, FakeProcessor, rig
from tests.gateways.loopback import (
    GATEWAY,
    Handler,
    echo,
    fw_socket,
    run,
    set_reset_on_close,
    tcp_connect_from,
    tcp_server_at,
    wait_until,
)
from tests.gateways.process import (
    events, exit_of, foreign_address, free_port, next_event, start_gateway, write_config, write_manifest,
)

MB = 1 << 20


class World:
    """A fake processor, a layer, a tcp-relay, and the clients and servers of the test."""

    def __init__(self, fake: FakeProcessor, layer: GatewayLayer, relay: TcpRelay) -> None:
        self.fake = fake
        self.layer = layer
        self.relay = relay
        self.servers: list[asyncio.AbstractServer] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(
        self,
        handler: Handler | None = echo,
        *,
        address: ipaddress.IPv4Address | None = None,
        known: bool = True,
        **flow: Any,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FlowInfo | None]:
        """A client on a fresh F:f, its restored server there (unless ``handler`` is None), its binding."""
        sock, fw = fw_socket(socket.SOCK_STREAM, address)
        if handler is not None:
            self.servers.append(await tcp_server_at(fw, handler))
        info = self.fake.new_flow(Proto.TCP, fw, self.relay.listen, **flow) if known else None
        reader, writer = await tcp_connect_from(sock, self.relay.listen)
        self.writers.append(writer)
        return reader, writer, info


@contextlib.asynccontextmanager
async def world(settings: TcpRelaySettings = TcpRelaySettings(), query_timeout: float = 5.0) -> AsyncIterator[World]:
    async with rig(query_timeout=query_timeout) as (fake, layer):
        relay = TcpRelay(layer, listen=Endpoint(GATEWAY, 0), settings=settings, log=EventLog("relay"))
        await relay.start()
        w = World(fake, layer, relay)
        try:
            yield w
        finally:
            for writer in w.writers:
                writer.transport.abort()
            await relay.close(grace=1.0)
            for server in w.servers:
                server.close()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


async def expect_reset(reader: asyncio.StreamReader) -> None:
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 10)


# ---- data -----------------------------------------------------------------------------------------


def test_5_mb_both_ways_arrive_intact_and_fin_crosses(log: pytest.LogCaptureFixture) -> None:
    payload = os.urandom(5 * MB)

    async def main() -> None:
        async with world() as w:
            reader, writer, f = await w.connect(echo)

            async def send() -> None:
                for i in range(0, len(payload), 256 * 1024):
                    writer.write(payload[i : i + 256 * 1024])
                    await writer.drain()
                writer.write_eof()

            _, back = await asyncio.gather(send(), read_to_eof(reader))
            assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            (closed,) = events(log, "close")
            assert closed["reason"] == "done"
            assert closed["bytes_up"] == closed["bytes_down"] == len(payload)
            assert w.relay.counters["closed.done"] == 1 and w.relay.active == 0

    run(main())


def test_half_close_each_way_keeps_the_other_direction_open() -> None:
    async def main() -> None:
        heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def server_finishes_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"banner")
            writer.write_eof()  # the server is done talking, and still listens
            heard.set_result(await reader.read())
            writer.close()

        async def client_finishes_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.read()  # until the client's FIN
            writer.write(b"reply:" + request)
            writer.close()

        async with world() as w:
            reader, writer, _ = await w.connect(server_finishes_first)
            assert await read_to_eof(reader) == b"banner"
            writer.write(b"late words")
            writer.write_eof()
            assert await asyncio.wait_for(heard, 10) == b"late words"

            reader, writer, _ = await w.connect(client_finishes_first)
            writer.write(b"hello")
            writer.write_eof()
            assert await read_to_eof(reader) == b"reply:hello"

    run(main())


def test_the_open_line_names_the_original_tuple(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            reader, writer, f = await w.connect(echo)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert f is not None
            (opened,) = events(log, "open")
            assert opened == {
                "flow": f"{f.flow_id:#x}",
                "client": "198.51.100.7:40000",
                "original_dst": str(ORIGINAL_DST),
                "server": str(SERVER),
                "via": str(f.firewall_side),
            }

    run(main())


def test_200_concurrent_connections_each_get_their_own_original_tuple(log: pytest.LogCaptureFixture) -> None:
    count = 200

    async def main() -> None:
        async with world() as w:

            async def one(i: int) -> None:
                async def tell_fw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    host, port = writer.get_extra_info("sockname")[:2]
                    writer.write(f"{host}:{port}|".encode())
                    await echo(reader, writer)

                client = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 10000 + i)
                reader, writer, f = await w.connect(tell_fw, client=client)
                assert f is not None
                writer.write(f"client {i}".encode())
                writer.write_eof()
                assert await read_to_eof(reader) == f"{f.firewall_side}|client {i}".encode()

            await asyncio.gather(*(one(i) for i in range(count)))
            opened = events(log, "open")
            assert len(opened) == count
            by_via = {e["via"]: e["client"] for e in opened}
            flows = {str(f.firewall_side): str(f.client) for f in w.fake.flows.values()}
            assert by_via == flows and len(set(by_via.values())) == count

    run(main(), timeout=120)


# ---- resets ---------------------------------------------------------------------------------------


def test_a_server_reset_reaches_the_client(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def crash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(4)
            set_reset_on_close(writer)
            writer.transport.abort()

        async with world() as w:
            reader, writer, _ = await w.connect(crash)
            writer.write(b"ping")
            await expect_reset(reader)
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            assert events(log, "close")[0]["reason"] == "server_reset"

    run(main())


def test_a_client_reset_reaches_the_server(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(4))
            try:
                outcome.set_result(await reader.read())
            except ConnectionResetError as exc:
                outcome.set_result(exc)

        async with world() as w:
            reader, writer, _ = await w.connect(server)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            set_reset_on_close(writer)
            writer.transport.abort()
            assert isinstance(await asyncio.wait_for(outcome, 10), ConnectionResetError)
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            assert events(log, "close")[0]["reason"] == "client_reset"

    run(main())


def test_a_refused_leg_b_resets_leg_a(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            reader, _, _ = await w.connect(handler=None)  # nothing listens where leg B goes
            await expect_reset(reader)
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            assert events(log, "close")[0]["reason"] == "connect_failed"

    run(main())


def test_flow_end_from_the_processor_resets_the_connection(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            reader, writer, f = await w.connect(echo)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert f is not None
            w.fake.end_flow(f, FlowEndReason.IDLE)
            await expect_reset(reader)
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            closed = events(log, "close")[0]
            assert (closed["reason"], closed["detail"]) == ("flow_end", "idle")

    run(main())


# ---- lookups --------------------------------------------------------------------------------------


def test_pulled_flows_relay_like_pushed_ones() -> None:
    async def main() -> None:
        async with world(query_timeout=0.05) as w:
            w.fake.drop_pushes = True
            reader, writer, _ = await w.connect(echo)
            writer.write(b"pulled")
            writer.write_eof()
            assert await read_to_eof(reader) == b"pulled"
            assert w.layer.counters["answers.received"] == 1

    run(main())


def test_a_flow_never_signalled_is_reset_and_counted(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(query_timeout=0.05) as w:
            w.fake.answer_queries = False
            reader, _, _ = await w.connect(echo, known=False)
            await expect_reset(reader)
            assert w.relay.counters["closed.unknown_flow"] == 1
            assert w.layer.counters["flows.unknown"] == 1
            (unknown,) = events(log, "unknown_flow")
            assert "no answer" in unknown["why"]
            assert events(log, "open") == []

    run(main())


# ---- limits ---------------------------------------------------------------------------------------


def test_idle_connections_are_closed(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(TcpRelaySettings.model_construct(idle_timeout=0.3)) as w:  # below the config's 1 s, for speed
            reader, writer, _ = await w.connect(echo)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert await read_to_eof(reader) == b""  # the relay's FIN, after 0.3 s of silence
            await wait_until(lambda: bool(events(log, "close")), what="the close line")
            closed = events(log, "close")[0]
            assert closed["reason"] == "idle" and closed["duration"] >= 0.3

    run(main())


def test_max_connections_at_the_limit_and_one_past_it(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world(TcpRelaySettings(max_connections=2)) as w:
            held = []
            for _ in range(2):
                reader, writer, _ = await w.connect(echo)
                writer.write(b"in")
                assert await reader.readexactly(2) == b"in"
                held.append(writer)
            assert w.relay.active == 2
            reader, writer, _ = await w.connect(echo)
            await expect_reset(reader)
            assert w.relay.counters["refused.max_connections"] == 1
            assert events(log, "refused")[0]["reason"] == "max_connections"

            held[0].write_eof()  # one leaves; its slot is free again
            await wait_until(lambda: w.relay.active == 1, what="a free slot")
            reader, writer, _ = await w.connect(echo)
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"

    run(main())


def test_closing_the_relay_lets_connections_finish_then_resets_them(log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            reader, writer, _ = await w.connect(echo)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            closing = asyncio.create_task(w.relay.close(grace=0.2))
            await expect_reset(reader)  # it did not finish within the grace time
            await asyncio.wait_for(closing, 10)
            assert events(log, "close")[0]["reason"] == "shutdown"
            assert w.relay.active == 0 and w.relay.counters["closed.shutdown"] == 1

    run(main())


# ---- the gateway process ----------------------------------------------------------------------------

def test_the_gateway_process_relays_logs_stats_on_sigusr1_and_stops_on_sigterm(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeProcessor(load_or_create_key(tmp_path / "keys" / "signalling.key"))
        await fake.start()
        assert fake.base_port is not None
        config = write_config(tmp_path, port=fake.base_port)
        proc = await start_gateway(config)
        seen: list[dict[str, Any]] = []
        try:
            ready = await next_event(proc, "ready", seen)
            fake.layer_address = Endpoint(GATEWAY, fake.base_port)  # gateway 0: signalling.port itself
            listen = Endpoint(GATEWAY, int(ready["listen"].rsplit(":", 1)[1]))
            assert ready["signalling"] == str(fake.layer_address)

            sock, fw = fw_socket(socket.SOCK_STREAM)
            server = await tcp_server_at(fw, echo)
            f = fake.new_flow(Proto.TCP, fw, listen)
            reader, writer = await tcp_connect_from(sock, listen)
            writer.write(b"through the process")
            writer.write_eof()
            assert await read_to_eof(reader) == b"through the process"
            opened = await next_event(proc, "open", seen)
            assert (opened["client"], opened["via"], opened["server"]) == (str(f.client), str(fw), str(f.server))
            await next_event(proc, "close", seen)

            proc.send_signal(signal.SIGUSR1)
            stats = await next_event(proc, "stats", seen)
            assert stats["layer"]["pushes.received"] == 1 and stats["relay"]["closed.done"] == 1

            proc.send_signal(signal.SIGTERM)
            await next_event(proc, "stopping", seen)
            final = await next_event(proc, "stats", seen)
            assert final["active"] == 0
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            server.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            fake.close()

    run(main())


def test_out_of_descriptors_the_gateway_pauses_accepting_with_one_line_and_recovers(tmp_path: Path) -> None:
    """An EMFILE storm: with 32 descriptors (8 in use at rest, 6 per spliced connection) and
    24 clients at once, accept fails; the gateway pauses, says so once, serves what it can,
    and accepts again when the storm has passed."""
    files, storm = 32, 24

    async def main() -> None:
        fake = FakeProcessor(load_or_create_key(tmp_path / "keys" / "signalling.key"))
        await fake.start()
        assert fake.base_port is not None
        config = write_config(tmp_path, port=fake.base_port)
        proc = await start_gateway(config, files=files)  # soft = hard: raising cannot help
        seen: list[dict[str, Any]] = []
        servers: list[asyncio.AbstractServer] = []
        clients: list[asyncio.StreamWriter] = []

        async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            sock, fw = fw_socket(socket.SOCK_STREAM)
            servers.append(await tcp_server_at(fw, echo))
            fake.new_flow(Proto.TCP, fw, listen)
            reader, writer = await tcp_connect_from(sock, listen)
            clients.append(writer)
            return reader, writer

        try:
            ready = await next_event(proc, "ready", seen)
            assert ready["open_files"] == files
            fake.layer_address = Endpoint(GATEWAY, fake.base_port)
            listen = Endpoint(GATEWAY, int(ready["listen"].rsplit(":", 1)[1]))
            for _ in range(storm):
                _, writer = await client()
                writer.write(b"ping")
            paused = await next_event(proc, "accept_paused", seen)
            assert paused["error"] == "EMFILE" and paused["open_files_limit"] == files

            for writer in clients:  # the storm passes
                writer.transport.abort()
            for attempt in range(100):  # bounded: the backlog is served first, then us
                reader, writer = await client()
                writer.write(b"after the storm")
                writer.write_eof()
                try:
                    if await asyncio.wait_for(reader.read(), 10) == b"after the storm":
                        break
                except ConnectionResetError:
                    pass  # reset while descriptors were still short: try again
            else:
                raise AssertionError("the gateway never accepted again")

            proc.send_signal(signal.SIGUSR1)
            stats = await next_event(proc, "stats", seen)
            assert stats["relay"]["accept.paused"] >= 1
            assert [e["event"] for e in seen].count("accept_paused") == 1  # one line, however many pauses
            assert not [e for e in seen if e["event"] == "error"]
        finally:
            for writer in clients:
                writer.transport.abort()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for server in servers:
                server.close()
            fake.close()

    run(main(), timeout=120)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda doc: None, "cannot read the gateway manifest"),
        (lambda doc: doc.update(version=99), "manifest version 99, this gateway reads version 3"),
        (lambda doc: doc.pop("processor"), "processor: Field required"),
        (lambda doc: doc["listen"].update(port="eighty"), "listen.port:"),
        (lambda doc: doc.update(extra=1), "extra: Extra inputs are not permitted"),
        (lambda doc: doc.update(kind="fax"), "gateway 'relay': this version knows no kind fax"),
        (lambda doc: "not json {", "not a JSON gateway manifest"),
    ],
)
def test_a_manifest_it_cannot_use_is_refused_in_one_line(tmp_path: Path, spoil: Any, message: str) -> None:
    """A missing, foreign (another release's), truncated or tampered manifest:
    exit 2 with one line naming the problem, never a traceback or a half start."""
    path = write_manifest(write_config(tmp_path, port=free_port(GATEWAY)), "relay")
    doc = json.loads(path.read_text())
    spoilt = spoil(doc)
    if message.startswith("cannot read"):
        path.unlink()
    else:
        path.write_text(spoilt if isinstance(spoilt, str) else json.dumps(doc))
    returncode, lines = run(exit_of(tmp_path, manifest=path))
    assert returncode == 2
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], lines


def test_outside_the_gateway_namespace_the_process_says_so(tmp_path: Path) -> None:
    gateway = foreign_address()
    config = write_config(tmp_path, port=7500, router=gateway - 1, gateway=gateway, listen_port=20000)
    returncode, lines = run(exit_of(config))
    assert returncode == 1
    (line,) = lines
    assert f"cannot bind {gateway}:7500" in line and "ip netns exec nfgate-gw" in line and "nfgate exec -- " in line
