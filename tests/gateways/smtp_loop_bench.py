"""The smtp gateway's own cost, without a lab: one gateway process on loopback.

    .venv/bin/python -m tests.gateways.smtp_loop_bench [--connections 1000] [--messages 1000] [--callgrind [--keep DIR]]
        [--event-loop uvloop|asyncio] [--profile FILE]

Not a test (nothing is asserted): figures for docs/benchmarks.md ("smtp",
second pass). The gateway runs in a process of its own (a ``GatewayLayer``
and an ``SmtpGateway`` on 127.0.0.2); this process plays everything else
on loopback (tests/gateways/loopback.py): the processor
(``FakeProcessor``: NEW_FLOW pushed in three copies before each connection,
FLOW_END after it), the client (EHLO, MAIL, RCPT, DATA, about 2 KB of
content, QUIT, each waiting for its reply, as smtplib does) and the MTA
(``MiniMta``). It prints the gateway's CPU time (user + system, from /proc)
per connection with one message (``each``) and per message in one session
of ``messages`` (``session``).

With ``--callgrind`` the gateway runs under valgrind's callgrind, and the
figures are the instructions it executed in user space per connection and
per message: slow (fewer connections will do: 200), but the same from run
to run whatever else the machine is doing, so two versions can be compared
on a shared machine. ``--keep DIR`` keeps callgrind's files there (for
``callgrind_annotate``).

The gateway runs on the event loop its settings name (``event_loop``, by
default uvloop, as ``python -m gateways`` runs it); ``--event-loop asyncio``
measures the other. ``--profile FILE`` runs it under cProfile instead and
writes the statistics to FILE when it ends (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from firewall.signalling import Endpoint, FlowEndReason, Proto
from tests.gateways.fake_processor import KEY, FakeProcessor, instances_of
from tests.gateways.loopback import GATEWAY, POOL, ROUTER, fw_socket, tcp_server_at
from tests.gateways.test_smtp_gateway import MiniMta
from tests.scratch import scratch

C = Endpoint(ipaddress.IPv4Address("203.0.113.10"), 40000)
W = Endpoint(ipaddress.IPv4Address("203.0.113.1"), 25)
S = Endpoint(ipaddress.IPv4Address("192.168.1.10"), 25)
SIGNALLING, LISTEN, PROCESSOR = 24001, 24025, 24100
BODY = b"Subject: x\r\n\r\n" + (b"x" * 70 + b"\r\n") * 28


def settings(event_loop: str | None) -> Any:
    from gateways.smtp.settings import SmtpSettings

    loop = {"event_loop": event_loop} if event_loop else {}
    return SmtpSettings(recipient_domains=("example.com",), max_sessions=5000, max_sessions_per_client=5000, **loop)


def run_gateway(log: str, event_loop: str | None, profile: str | None) -> None:
    """The gateway process: on the loop its settings name (``gateways.__main__.run_on``)."""
    from gateways.__main__ import run_on
    from gateways.smtp.settings import KIND

    chosen = settings(event_loop)
    if profile is None:
        run_on(KIND.event_loop(chosen), gateway(log, chosen))
        return
    import cProfile

    profiler = cProfile.Profile()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(profile)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    profiler.enable()
    run_on(KIND.event_loop(chosen), gateway(log, chosen))


async def gateway(log: str, settings: Any) -> None:
    from gateways.layer import EventLog, GatewayLayer
    from gateways.layer.events import configure
    from gateways.smtp.gateway import SmtpGateway

    configure(json_lines=False, stream=open(log, "a"))
    layer = GatewayLayer(KEY, listen=Endpoint(GATEWAY, SIGNALLING), instances=instances_of(ROUTER, PROCESSOR, (0,), POOL),
                         gateway="smtp", query_timeout=0.5, replay_window=5.0)
    await layer.start()
    gw = SmtpGateway(layer, listen=Endpoint(GATEWAY, LISTEN), settings=settings, log=EventLog("smtp-in"))
    await gw.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError("the gateway closed the session")
        if line[3:4] != b"-":
            return line


async def session(fake: FakeProcessor, messages: int) -> None:
    sock, fw = fw_socket(socket.SOCK_STREAM)
    server = await tcp_server_at(fw, MiniMta())
    flow = fake.new_flow(Proto.TCP, fw, Endpoint(GATEWAY, LISTEN), gateway="smtp", client=C, original_dst=W, server=S)
    await asyncio.get_running_loop().sock_connect(sock, (str(GATEWAY), LISTEN))
    reader, writer = await asyncio.open_connection(sock=sock)
    await reply(reader)
    writer.write(b"EHLO c\r\n")
    await reply(reader)
    for _ in range(messages):
        for cmd in (b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n", BODY + b".\r\n"):
            writer.write(cmd)
            await reply(reader)
    writer.write(b"QUIT\r\n")
    await reply(reader)
    await reader.read()
    writer.close()
    server.close()
    fake.end_flow(flow, FlowEndReason.FIN)


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instructions(pid: int, name: str, out: Path) -> int | None:
    """Dump the callgrind counters of ``pid`` (zeroed at the phase's start); the instructions since."""
    subprocess.run(["callgrind_control", "-d", name, str(pid)], capture_output=True, check=True)
    for dump in out.parent.glob(out.name + "*"):
        text = dump.read_text(errors="replace")
        if f"Trigger: dump {name}" in text:
            return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("summary:"))
    return None


async def drive(pid: int, connections: int, messages: int, callgrind: Path | None) -> dict:
    fake = FakeProcessor(base_port=PROCESSOR)
    await fake.start()
    fake.layer_address = Endpoint(GATEWAY, SIGNALLING)
    try:
        for _ in range(20):  # warm up
            await session(fake, 1)
        figures: dict = {}
        for mode, count in (("each", connections), ("session", messages)):
            await asyncio.sleep(0.2)
            if callgrind is not None:
                subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
            before, start = cpu(pid), time.monotonic()
            if mode == "each":
                for _ in range(count):
                    await session(fake, 1)
            else:
                await session(fake, count)
            await asyncio.sleep(0.05)
            figures[f"{mode}_cpu_ms"] = round((cpu(pid) - before) * 1000 / count, 3)
            figures[f"{mode}_per_s"] = round(count / (time.monotonic() - start), 1)
            if callgrind is not None:
                done = instructions(pid, mode, callgrind)
                figures[f"{mode}_instructions"] = done // count if done is not None else None
        return figures
    finally:
        fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000, help="in one session (the gateway's max_messages is 1000)")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--keep", type=Path, help="with --callgrind: keep callgrind's files in this folder")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), help="default: the smtp settings' event_loop")
    parser.add_argument("--profile", help="run the gateway under cProfile; its statistics to this file")
    parser.add_argument("--gateway", help=argparse.SUPPRESS)  # the gateway process: its log file
    args = parser.parse_args(argv)
    if args.gateway:
        run_gateway(args.gateway, args.event_loop, args.profile)
        return
    with scratch("nfgate-smtp-loop-") as tmp:
        out = tmp / "callgrind.out"
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] if args.callgrind else []
        options = [*(["--event-loop", args.event_loop] if args.event_loop else []),
                   *(["--profile", str(Path(args.profile).resolve())] if args.profile else [])]
        proc = subprocess.Popen([*wrap, sys.executable, "-m", "tests.gateways.smtp_loop_bench", "--gateway", str(tmp / "gateway.log"),
                                 *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the gateway did not start")
            figures = asyncio.run(drive(proc.pid, args.connections, args.messages, out if args.callgrind else None))
        finally:
            proc.terminate()
            proc.wait()
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in tmp.glob("callgrind.out*"):
                shutil.copy(dump, args.keep / dump.name)
    figures["event_loop"] = settings(args.event_loop).event_loop
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
