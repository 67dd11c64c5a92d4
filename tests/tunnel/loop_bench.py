"""A new public connection's cost through the tunnel, without a lab: event-loop iterations, channel writes, p50.

    PYTHONPATH=. .venv/bin/python -m tests.tunnel.loop_bench [--exchanges 500] [--loop asyncio|uvloop] [--http] [--warm 1] [--held]
    PYTHONPATH=. .venv/bin/python -m tests.tunnel.loop_bench --bulk 256 [--down] [--loop uvloop]
    PYTHONPATH=. .venv/bin/python -m tests.tunnel.loop_bench --streams 500 [--exchanges 500]

Not a test (nothing is asserted): a figure for docs/benchmarks.md. The
control server, one mediator (its warm pool on, as by default), an echo
target and the public client share one event loop on 127.0.0.1
(tests/tunnel/loopback.py). Each exchange is a new public connection: 100
bytes, a half-close, the echo and the target's FIN, until EOF (with
``--http``: the lab bench's request to ``python -m http.server``, a process
of its own with a thread per connection). It prints,
per exchange, the loop's iterations (asyncio's loop only: ``_run_once`` is
counted; a trip through a loop costs the same whatever the machine's load,
so two versions of the protocol can be compared on a shared machine), the
TLS writes on the channel in each direction (each is one or more TLS
records) and the frames they carried, the process's CPU time per exchange
(client and target included, the same in every version; less moved by the
machine's load than wall time, not unmoved), and the exchange's p50 and p99
in milliseconds and how many took over 5 and 20 ms (which the machine's
load moves).

``--held``: each client connects and sends from the loop's thread, blocking,
so its bytes are queued before the server's accept runs (in the lab the
request comes with the handshake's last ACK; in one loop it would come a
loop trip after the accept).

``--streams N`` holds N more connections open through the tunnel, silent,
while the exchanges run: a cost per event that grows with the number of
connections shows there.

``--bulk MB`` measures bulk instead: one public connection carries MB
megabytes from the client to a target that only counts them (``--down``:
from the target to the client), and it prints the process's CPU seconds
per GB and the channel's writes, frames and TLS records per MB. Run under
callgrind (``valgrind --tool=callgrind --callgrind-out-file=F python -m
tests.tunnel.loop_bench --bulk MB``) at two sizes, the difference of the
two instruction counts per MB is the bulk's own cost whatever the load.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.tunnel.loopback import echo_server, free_port, loopback
from tunnel import aio as aio_module
from tunnel import mediator as mediator_module
from tunnel import session as session_module

PAYLOAD = b"x" * 100


def _count_writes(counts: Counter[str]) -> None:
    """Count the channel's writes (one per loop iteration with frames) and their frames, both ends."""
    names: dict[int, str] = {}
    for name, cls in (("server", session_module.Session), ("mediator", mediator_module._Session)):
        init = cls.__init__

        def tagged(self: Any, *args: Any, _init: Any = init, _name: str = name, **kw: Any) -> None:
            _init(self, *args, **kw)
            names[id(self.writer)] = _name

        cls.__init__ = tagged  # type: ignore[method-assign]
    flush = aio_module.ChannelWriter.flush

    def counted(self: Any) -> None:
        if self.frames:
            name = names.get(id(self), "other")
            counts[f"{name}_writes"] += 1
            counts[f"{name}_frames"] += self.frames
        flush(self)

    aio_module.ChannelWriter.flush = counted  # type: ignore[method-assign]


HTTP_REQUEST = b"GET /small.txt HTTP/1.0\r\n\r\n"
HELD = False  # --held


async def exchange(port: int, http: bool = False) -> float:
    """One new public connection: 100 bytes, a half-close and their echo; or
    (``http``) scripts/bench_tunnel.py's request, answered and closed by the target."""
    started = time.perf_counter()
    if HELD:
        # Connect and send before the loop can run the accept, as in the lab,
        # where the request comes with the handshake's last ACK.
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(HTTP_REQUEST if http else PAYLOAD)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HTTP_REQUEST if http else PAYLOAD)
    if not http:
        writer.write_eof()
    got = b""
    while data := await reader.read(1 << 16):
        got += data
    writer.close()
    assert got.endswith(b"ok\n") if http else got == PAYLOAD, got
    return time.perf_counter() - started


CHUNK = b"b" * (1 << 18)


class _Sink(asyncio.Protocol):
    """The bulk target (or, ``--down``, its client): counts what it reads;
    sends ``send`` bytes (in ``CHUNK``s, as its writes drain), then
    half-closes; done once the peer's EOF has come and its own is out."""

    def __init__(self, send: int = 0) -> None:
        self.send = send
        self.received = 0
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.eof_sent = self.eof_received_ = False
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while self.send > 0 and not self.paused:
            n = min(self.send, len(CHUNK))
            self.transport.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.send -= n
        if self.send == 0 and not self.eof_sent:
            self.eof_sent = True
            self.transport.write_eof()
            self._check()

    def _check(self) -> None:
        if self.eof_sent and self.eof_received_ and not self.done.done():
            self.done.set_result(self.received)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def eof_received(self) -> bool:
        self.eof_received_ = True
        self._check()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.received)


async def bulk(megabytes: int, loop_name: str, down: bool) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    _count_writes(counts)
    size = megabytes << 20
    loop = asyncio.get_running_loop()
    targets: list[_Sink] = []

    def target() -> _Sink:
        targets.append(_Sink(size if down else 0))
        return targets[-1]

    with tempfile.TemporaryDirectory() as tmp:
        async with loopback(Path(tmp)) as lb:
            lb.start_mediator()
            session = await lb.session()
            server = await loop.create_server(target, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            public = free_port()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=port)
            cpu, started = time.process_time(), time.perf_counter()
            _, client = await loop.create_connection(lambda: _Sink(0 if down else size), "127.0.0.1", public)
            got = await asyncio.wait_for(client.done, 600)
            await asyncio.wait_for(targets[0].done, 60)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - started
            client.transport.close()  # type: ignore[union-attr]
            server.close()
            version = session.core.version
    moved = got if down else targets[0].received
    assert moved == size, (moved, size)
    per_mb = {k: round(v / megabytes, 2) for k, v in sorted(counts.items())}
    return {
        "loop": loop_name, "version": version, "direction": "down" if down else "up", "megabytes": megabytes,
        "cpu_s_per_gb": round(cpu * 1024 / megabytes, 3), "gbit_s": round(size * 8 / wall / 1e9, 3),
        "per_mb": per_mb,
    }


async def http_target(directory: Path, switch_interval: float | None = None) -> tuple[asyncio.subprocess.Process, int]:
    """``python -m http.server``, scripts/bench_tunnel.py's target: a process of
    its own, a thread per connection (``switch_interval``: its threads' GIL
    switch interval, ``sys.setswitchinterval``, instead of Python's 5 ms)."""
    (directory / "small.txt").write_text("ok\n" * 100)
    port = free_port()
    python = [sys.executable]
    if switch_interval is not None:
        python += ["-c", f"import runpy, sys; sys.setswitchinterval({switch_interval}); sys.argv[0] = 'http.server'; "
                   "runpy.run_module('http.server', run_name='__main__')"]
    else:
        python += ["-m", "http.server"]
    proc = await asyncio.create_subprocess_exec(
        *python, str(port), "--bind", "127.0.0.1", "--directory", str(directory),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc, port
        except OSError:
            await asyncio.sleep(0.02)
    raise RuntimeError("http.server did not start")


async def main(
    exchanges: int, loop_name: str, http: bool = False, warm: int = 1, streams: int = 0,
    switch_interval: float | None = None,
) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    _count_writes(counts)
    loop = asyncio.get_running_loop()
    if loop_name == "asyncio":
        run_once = loop._run_once  # type: ignore[attr-defined]

        def counted_run_once() -> None:
            counts["iterations"] += 1
            run_once()

        loop._run_once = counted_run_once  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        async with loopback(Path(tmp)) as lb:
            lb.start_mediator(warm_connections=warm)
            session = await lb.session()
            proc = None
            if http:
                proc, target = await http_target(Path(tmp), switch_interval)
            else:
                _, target = await echo_server()
            try:
                public = free_port()
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
                for _ in range(20):  # warm up: the pool, the TLS buffers, the allocators
                    await exchange(public, http)
                idle = []  # ``streams`` connections open through the tunnel all along, silent
                for _ in range(streams):
                    reader, writer = await asyncio.open_connection("127.0.0.1", public)
                    idle.append(writer)
                while streams and len(lb.mediators[0][0].session.ports) < streams:  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
                counts.clear()
                cpu = time.process_time()
                times = [await exchange(public, http) for _ in range(exchanges)]
                cpu = time.process_time() - cpu
                version = session.core.version
                for writer in idle:
                    writer.close()
            finally:
                if proc is not None:
                    proc.kill()
                    await proc.wait()
    per = {k: round(v / exchanges, 2) for k, v in sorted(counts.items())}
    times.sort()
    return {
        "loop": loop_name, "target": "http.server" if http else "echo", "warm": warm, "version": version,
        "streams": streams, "exchanges": exchanges, "per_exchange": per,
        "cpu_ms": round(cpu * 1000 / exchanges, 3),
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3),
        "over_5ms": sum(t > 0.005 for t in times), "over_20ms": sum(t > 0.02 for t in times),
    }


def run(
    exchanges: int, loop_name: str, http: bool = False, warm: int = 1, streams: int = 0,
    switch_interval: float | None = None,
) -> dict[str, Any]:
    return _run(main(exchanges, loop_name, http, warm, streams, switch_interval), loop_name)


def _run(coro: Any, loop_name: str) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[no-any-return]
    return asyncio.run(coro)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=500)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--http", action="store_true", help="the target is python -m http.server, as in the lab bench")
    parser.add_argument("--warm", type=int, default=1, help="the mediator's warm_connections")
    parser.add_argument("--streams", type=int, default=0,
                        help="connections held open (silent) through the tunnel while the exchanges run")
    parser.add_argument("--switch-interval", type=float, metavar="S",
                        help="--http: the target's GIL switch interval in seconds (Python's default 0.005)")
    parser.add_argument("--held", action="store_true",
                        help="each client connects and sends before the loop runs the accept (as in the lab)")
    parser.add_argument("--bulk", type=int, metavar="MB", help="one connection carrying MB megabytes instead")
    parser.add_argument("--down", action="store_true", help="--bulk: from the target to the client")
    args = parser.parse_args()
    HELD = args.held
    if args.bulk:
        print(_run(bulk(args.bulk, args.loop, args.down), args.loop))
    else:
        print(run(args.exchanges, args.loop, args.http, args.warm, args.streams, args.switch_interval))
