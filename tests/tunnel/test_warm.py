"""The mediator's warm pool (tunnel/warm.py), end to end on loopback.

A pre-connected connection must behave exactly as a fresh one: a target
that speaks first, or closes idle connections, or is not used for
``warm_idle`` seconds, gets fresh connections, and never a reconnect loop.
Each target here counts the connections it accepts, so the tests see what
the pool did to it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from ipaddress import ip_address, ip_interface
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.tunnel.loopback import WAIT, free_port, loopback, until
from tunnel.warm import Key, WarmPool, _slot, _Waiting

LOCALHOST = ip_address("127.0.0.1")


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


class Target:
    """A TCP server on 127.0.0.1 that greets (or not), answers, or closes at once."""

    def __init__(self, greeting: bytes = b"", close_at_once: bool = False) -> None:
        self.greeting = greeting
        self.close_at_once = close_at_once
        self.accepted = 0
        self.port = 0

    async def start(self) -> asyncio.AbstractServer:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.close_at_once:
                return
            if self.greeting:
                writer.write(self.greeting)
            request = await reader.read(1000)
            if request:
                writer.write(b"answer to " + request)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def exchange(public: int, request: bytes = b"hello") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", public)
    writer.write(request)
    await writer.drain()
    got = bytearray()
    while data := await asyncio.wait_for(reader.read(1000), WAIT):
        got += data
    writer.close()
    return bytes(got)


async def publish(lb: object, target: Target) -> int:
    public = free_port()
    await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public,  # type: ignore[attr-defined]
                 address="127.0.0.1", port=target.port)
    return public


def test_a_silent_target_is_answered_from_a_warm_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator()
            await lb.session()
            target = Target()
            await target.start()
            public = await publish(lb, target)
            assert await exchange(public) == b"answer to hello"
            # One made ahead, waiting (the target accepted it, nothing was sent).
            await until(lambda: mediator.counters["warm_connected"] == 1, what="a warm connection")
            assert target.accepted == 2
            for n in range(1, 4):
                assert await exchange(public, b"again %d" % n) == b"answer to again %d" % n
                assert mediator.counters["warm_taken"] == n
                # Each client took the waiting one and one more was made, no more than that.
                await until(lambda: mediator.counters["warm_connected"] == n + 1, what="the pool to refill")
                assert target.accepted == n + 2

    run(main())


def test_a_target_that_speaks_first_gets_fresh_connections_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator()
            await lb.session()
            target = Target(greeting=b"220 ready\r\n")
            await target.start()
            public = await publish(lb, target)
            assert await exchange(public) == b"220 ready\r\nanswer to hello"
            # The waiting connection heard the greeting: closed, and the target is not pooled any more.
            await until(lambda: mediator.counters["warm_speaks_first"] == 1, what="the greeting to be seen")
            for _ in range(3):
                # The greeting once, as fresh as for a connection of its own.
                assert await exchange(public) == b"220 ready\r\nanswer to hello"
            assert mediator.counters["warm_taken"] == 0
            assert target.accepted == 1 + 1 + 3

    run(main())


def test_a_target_that_closes_idle_connections_costs_no_reconnect_loop(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator()
            await lb.session()
            target = Target(close_at_once=True)
            await target.start()
            public = await publish(lb, target)
            assert await exchange(public) == b""  # the target closes: so does the relay
            await until(lambda: mediator.counters["warm_closed"] == 1, what="the warm connection to be closed")
            # Not replaced until the next client: the target sees one extra connection, not a stream.
            assert target.accepted == 2
            assert await exchange(public) == b""
            await until(lambda: mediator.counters["warm_closed"] == 2, what="the second warm connection")
            assert target.accepted == 4 and mediator.counters["warm_taken"] == 0

    run(main())


def test_a_warm_connection_is_closed_after_warm_idle(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator(warm_idle=0.2)
            await lb.session()
            target = Target()
            await target.start()
            public = await publish(lb, target)
            assert await exchange(public) == b"answer to hello"
            await until(lambda: mediator.counters["warm_stale"] == 1, what="the warm connection to go stale")
            assert await exchange(public) == b"answer to hello"  # a fresh one
            assert mediator.counters["warm_taken"] == 0

    run(main())


def test_warm_connections_0_makes_none(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator(warm_connections=0)
            await lb.session()
            target = Target()
            await target.start()
            public = await publish(lb, target)
            for _ in range(3):
                assert await exchange(public) == b"answer to hello"
            assert target.accepted == 3 and mediator.counters["warm_connected"] == 0

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_warm_connection_can_be_taken_as_soon_as_it_is_up(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the very callback that says it is connected, not a loop iteration
    later: a client that reconnects at once (HTTP/1.0, one request a
    connection) sends its next request about then, and every other one got
    a fresh connect, the pool's connection unused beside it."""
    taken: list[object] = []
    keys: list[Key] = []
    made = _Waiting.connection_made

    def made_then_taken(entry: _Waiting, transport: asyncio.BaseTransport) -> None:
        made(entry, transport)
        taken.append(entry.pool.take(keys[0]))

    monkeypatch.setattr(_Waiting, "connection_made", made_then_taken)

    async def main() -> None:
        target = Target()
        server = await target.start()
        keys.append((LOCALHOST, LOCALHOST, target.port))
        pool = WarmPool(1, 30.0, 10.0, Counter())
        pool.refill(keys[0])
        await until(lambda: taken, what="the warm connection")
        assert taken[0] is not None
        port, transport = taken[0]  # type: ignore[misc]
        assert transport.get_extra_info("sockname") == ("127.0.0.1", port)
        assert pool.counters["warm_taken"] == 1 and not pool.waiting[_slot(keys[0])]
        transport.close()
        pool.close()
        server.close()

    {"asyncio": asyncio.run, "uvloop": uvloop.run}[loop](asyncio.wait_for(main(), 60))


class PeerTarget(Target):
    """A Target that notes each connection's source address."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sources.append(writer.get_extra_info("peername")[0])
        await super()._serve(reader, writer)


async def _published_from_127_0_0_2(lb: Any) -> tuple[Any, PeerTarget, int]:
    """A mediator whose one address is 127.0.0.2, and a public port to a target through it."""
    mediator = lb.start_mediator(interfaces=(ip_interface("127.0.0.2/8"),))
    await lb.session()
    target = PeerTarget()
    await target.start()
    return mediator, target, await publish(lb, target)


def test_a_local_address_the_routes_do_not_give_is_bound(tmp_path: Path) -> None:
    """The server names 127.0.0.2 (the mediator's only announced address);
    the routes give 127.0.0.1 for 127.0.0.1: both the first connection
    (fresh) and the warm ones come from 127.0.0.2, as named."""
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator, target, public = await _published_from_127_0_0_2(lb)
            for n in range(3):
                assert await exchange(public, b"hi %d" % n) == b"answer to hi %d" % n
                await until(lambda: mediator.counters["warm_connected"] == n + 1, what="the pool to refill")
            assert mediator.counters["warm_taken"] == 2
            # No connection more than that: none made unbound and closed for its source.
            await until(lambda: target.accepted == 4, what="the last warm connection's accept")
            assert set(target.sources) == {"127.0.0.2"} and mediator.counters["warm_moved"] == 0

    run(main())


def test_a_connection_from_another_source_than_named_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The routes' answer gone stale (here: a route lookup that says 127.0.0.2
    where the kernel uses 127.0.0.1): the unbound connection comes from the
    wrong source, so it is closed unused, a warm one as a fresh one, and
    the client is served from a bound one, as named."""
    import tunnel.aio

    monkeypatch.setattr(tunnel.aio, "route_source", lambda target: ip_address("127.0.0.2"))

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator, target, public = await _published_from_127_0_0_2(lb)
            for n in range(3):
                assert await exchange(public, b"hi %d" % n) == b"answer to hi %d" % n
                await until(lambda: mediator.counters["warm_moved"] == n + 1, what="the unbound warm one to go")
            assert mediator.counters["warm_taken"] == 0
            # Each client's own connection: one unbound from 127.0.0.1, closed unused, then one bound.
            await until(lambda: target.accepted == 3 * 3, what="every connection to be accepted")
            assert target.sources.count("127.0.0.2") == 3

    run(main())
