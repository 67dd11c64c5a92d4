"""tcp-relay's own cost per connection, without a lab: the gateway process alone on loopback, under callgrind.

    .venv/bin/python -m tests.gateways.relay_loop_bench [--connections 200] [--event-loop uvloop|asyncio]

Not a test (nothing is asserted): a figure for docs/benchmarks.md. The
tcp-relay gateway runs in a process of its own under valgrind's callgrind;
this process plays the processor (``FakeProcessor``: NEW_FLOW in three
copies before each connection, FLOW_END after it), the client (5 bytes,
their echo, a half-close) and the server (``loopback.echo``). It prints the
instructions the gateway executed in user space per relayed connection: the
same from run to run whatever else the machine does, so two versions of
the shared per-connection path (gateways/tcp_server.py, gateways/layer/) can
be compared on a shared machine. tests/gateways/smtp_loop_bench.py does the
same for the smtp gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from pathlib import Path

from firewall.signalling import Endpoint, FlowEndReason, Proto
from tests.gateways.fake_processor import KEY, FakeProcessor, instances_of
from tests.gateways.loopback import GATEWAY, POOL, ROUTER, echo, fw_socket, tcp_server_at
from tests.gateways.smtp_loop_bench import instructions
from tests.scratch import scratch

SIGNALLING, LISTEN, PROCESSOR = 24201, 24243, 24300


async def gateway(log: str) -> None:
    from gateways.layer import EventLog, GatewayLayer
    from gateways.layer.events import configure
    from gateways.tcp_relay import TcpRelay, TcpRelaySettings

    configure(json_lines=False, stream=open(log, "a"))
    layer = GatewayLayer(KEY, listen=Endpoint(GATEWAY, SIGNALLING), instances=instances_of(ROUTER, PROCESSOR, (0,), POOL),
                         gateway="relay", query_timeout=0.5, replay_window=5.0)
    await layer.start()
    gw = TcpRelay(layer, listen=Endpoint(GATEWAY, LISTEN), settings=TcpRelaySettings(), log=EventLog("relay"))
    await gw.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def connection(fake: FakeProcessor) -> None:
    sock, fw = fw_socket(socket.SOCK_STREAM)
    server = await tcp_server_at(fw, echo)
    flow = fake.new_flow(Proto.TCP, fw, Endpoint(GATEWAY, LISTEN))
    await asyncio.get_running_loop().sock_connect(sock, (str(GATEWAY), LISTEN))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    writer.write_eof()
    await reader.read()
    writer.close()
    server.close()
    fake.end_flow(flow, FlowEndReason.FIN)


async def drive(pid: int, count: int, out: Path) -> int | None:
    fake = FakeProcessor(base_port=PROCESSOR)
    await fake.start()
    fake.layer_address = Endpoint(GATEWAY, SIGNALLING)
    try:
        for _ in range(20):  # warm up
            await connection(fake)
        await asyncio.sleep(0.2)
        subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
        for _ in range(count):
            await connection(fake)
        await asyncio.sleep(0.1)
        done = instructions(pid, "connections", out)
        return done // count if done is not None else None
    finally:
        fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), help="default: the tcp-relay settings' event_loop")
    parser.add_argument("--gateway", help=argparse.SUPPRESS)  # the gateway process: its log file
    args = parser.parse_args(argv)
    if args.gateway:
        from gateways.__main__ import run_on
        from gateways.tcp_relay import TcpRelaySettings

        run_on(args.event_loop or TcpRelaySettings().event_loop, gateway(args.gateway))
        return
    with scratch("nfgate-relay-loop-") as tmp:
        out = tmp / "callgrind.out"
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                                 "tests.gateways.relay_loop_bench", "--gateway", str(tmp / "gateway.log"),
                                 *(["--event-loop", args.event_loop] if args.event_loop else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the gateway did not start")
            print(f"instructions per relayed connection: {asyncio.run(drive(proc.pid, args.connections, out))}")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
