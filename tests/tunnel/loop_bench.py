"""A new public connection's cost through the tunnel, without a lab: event-loop iterations, channel writes, p50.

    PYTHONPATH=. .venv/bin/python -m tests.tunnel.loop_bench [--exchanges 500] [--loop asyncio|uvloop] [--http] [--warm 1]

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
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.tunnel.loopback import echo_server, free_port, loopback
from tunnel import mediator as mediator_module
from tunnel import session as session_module

PAYLOAD = b"x" * 100


def _count_writes(counts: Counter[str]) -> None:
    """Count the channel's writes (one per loop iteration with frames) and their frames, both ends."""
    for name, cls in (("server", session_module.Session), ("mediator", mediator_module._Session)):
        flush = cls.flush

        def counted(self: Any, _flush: Any = flush, _name: str = name) -> None:
            if self.outbox if _name == "mediator" else self._outbox:
                counts[f"{_name}_writes"] += 1
                counts[f"{_name}_frames"] += len(self.outbox if _name == "mediator" else self._outbox)
            _flush(self)

        cls.flush = counted  # type: ignore[method-assign]


HTTP_REQUEST = b"GET /small.txt HTTP/1.0\r\n\r\n"


async def exchange(port: int, http: bool = False) -> float:
    """One new public connection: 100 bytes, a half-close and their echo; or
    (``http``) scripts/bench_tunnel.py's request, answered and closed by the target."""
    started = time.perf_counter()
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


async def http_target(directory: Path) -> tuple[asyncio.subprocess.Process, int]:
    """``python -m http.server``, scripts/bench_tunnel.py's target: a process of
    its own, a thread per connection."""
    (directory / "small.txt").write_text("ok\n" * 100)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory),
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


async def main(exchanges: int, loop_name: str, http: bool = False, warm: int = 1) -> dict[str, Any]:
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
                proc, target = await http_target(Path(tmp))
            else:
                _, target = await echo_server()
            try:
                public = free_port()
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
                for _ in range(20):  # warm up: the pool, the TLS buffers, the allocators
                    await exchange(public, http)
                counts.clear()
                cpu = time.process_time()
                times = [await exchange(public, http) for _ in range(exchanges)]
                cpu = time.process_time() - cpu
                version = session.core.version
            finally:
                if proc is not None:
                    proc.kill()
                    await proc.wait()
    per = {k: round(v / exchanges, 2) for k, v in sorted(counts.items())}
    times.sort()
    return {
        "loop": loop_name, "target": "http.server" if http else "echo", "warm": warm, "version": version, "exchanges": exchanges, "per_exchange": per,
        "cpu_ms": round(cpu * 1000 / exchanges, 3),
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3),
        "over_5ms": sum(t > 0.005 for t in times), "over_20ms": sum(t > 0.02 for t in times),
    }


def run(exchanges: int, loop_name: str, http: bool = False, warm: int = 1) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main(exchanges, loop_name, http, warm))
    return asyncio.run(main(exchanges, loop_name, http, warm))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=500)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--http", action="store_true", help="the target is python -m http.server, as in the lab bench")
    parser.add_argument("--warm", type=int, default=1, help="the mediator's warm_connections")
    args = parser.parse_args()
    print(run(args.exchanges, args.loop, args.http, args.warm))
