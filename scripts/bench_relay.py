#!/usr/bin/env python3
"""The gateways' TCP relay against a socat relay, bulk throughput on loopback, in one run.

    .venv/bin/python scripts/bench_relay.py [--seconds 3] [--rounds 3] [--json]

Not a test (nothing is asserted): the figures for ``scripts/bench relay``
and docs/benchmarks.md. An iperf3 server listens on 127.0.0.1; one iperf3
client stream (``-t seconds``) goes to it through each relay in turn,
``rounds`` times round-robin (the median is shown, with every run), each
relay a process of its own listening on 127.0.0.1 and connecting on to the
server:

- ``splice``: ``gateways.relay`` as tcp-relay runs it (no inspector:
  os.splice through a pipe per direction, opened once the direction's
  first read fills ``SPLICE_AFTER``);
- ``inspect``: the same with an inspector on both directions that passes
  every chunk, as FTP inspect mode runs with a content hook (recv, hook,
  send, 256 KiB reads);
- ``copy``: the same without inspector and without pipes, to show what
  splice saves;
- ``socat``: ``socat TCP-LISTEN:...,fork TCP:...``, with its default 8 KiB
  buffer, and ``socat -b 262144`` (its largest useful buffer), the
  baselines;
- ``direct``: iperf3 to the server with no relay, the ceiling.

For each: the received Gbit/s, the ratio to socat's, and the relay
process's CPU seconds (user + system, children included) per GB moved, so
that what limits a figure shows: the two cores are shared by the iperf3
client, the iperf3 server and the relay. The relay here is the byte path
alone: the processor's NFQUEUE path, which a gateway flow also crosses
twice, is measured by ``tests/firewall/relay_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from firewall.signalling import Endpoint  # noqa: E402
from gateways.layer import EventLog  # noqa: E402
from gateways.relay import Limits, Relay, RelayCore, Side, Verdict  # noqa: E402
from gateways.tcp_server import Acceptor, listen_socket  # noqa: E402

HOST = "127.0.0.1"
START = 10.0  # seconds a relay or server may take to listen
MODES = ("splice", "inspect", "copy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    """Poll until something listens on ``port``: binding it fails. (Connecting to find out
    would reach the iperf3 server through the relay, as a client that says nothing.)"""
    deadline = time.monotonic() + START
    while time.monotonic() < deadline:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                return
        time.sleep(0.02)
    raise SystemExit(f"bench_relay: nothing listens on {HOST}:{port} after {START:g}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (socat's forked children count once reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def iperf3(port: int, seconds: float) -> tuple[float, int]:
    """One stream for ``seconds``: (received bits/s, bytes received)."""
    out = subprocess.run(
        ["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    received = json.loads(out)["end"]["sum_received"]
    return float(received["bits_per_second"]), int(received["bytes"])


# ---- the relay under test (a child process) --------------------------------------------------------


async def serve(listen_port: int, target_port: int, mode: str) -> None:
    loop = asyncio.get_running_loop()
    inspectors = {side: (lambda chunk: Verdict.PASS) for side in Side} if mode == "inspect" else None
    tasks: set[asyncio.Task[Any]] = set()

    async def one(a: socket.socket) -> None:
        b = socket.socket()
        b.setblocking(False)
        await loop.sock_connect(b, (HOST, target_port))
        core = RelayCore(Limits(idle_timeout=300), loop.time(), inspectors=inspectors)
        await Relay(core, a, b, splice=mode != "copy").run()

    def accepted(sock: socket.socket) -> None:
        task = loop.create_task(one(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    listener = listen_socket(Endpoint(ipaddress.IPv4Address(HOST), listen_port))
    Acceptor(listener, accepted, EventLog("bench"), collections.Counter())
    await asyncio.Event().wait()  # until killed


# ---- the run ---------------------------------------------------------------------------------------


def measure(proc: subprocess.Popen[bytes] | None, port: int, seconds: float) -> tuple[float, float | None]:
    """One iperf3 run through ``port``: (Gbit/s, the relay's CPU seconds per GB, if there is a relay)."""
    before = cpu_seconds(proc.pid) if proc is not None else 0.0
    bps, moved = iperf3(port, seconds)
    if proc is None:
        return bps / 1e9, None
    # socat's forked child counts once it has exited and been reaped.
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + START
    while children.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bps / 1e9, (cpu_seconds(proc.pid) - before) / (moved / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each iperf3 run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path, round-robin; the median is shown")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    parser.add_argument("--serve", nargs=3, metavar=("LISTEN", "TARGET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        listen, target, mode = args.serve
        asyncio.run(serve(int(listen), int(target), mode))
        return 0
    for tool in ("iperf3", "socat"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_relay: {tool} is not installed (apt-get install {tool})")

    target = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-B", HOST, "-p", str(target)], stdout=subprocess.DEVNULL)
    paths: dict[str, tuple[subprocess.Popen[bytes] | None, int]] = {"direct": (None, target)}
    samples: dict[str, list[tuple[float, float | None]]] = {}
    try:
        wait_listening(target)
        for label, extra in (("socat", []), ("socat -b 262144", ["-b", "262144"])):
            port = free_port()
            argv = ["socat", *extra, f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork", f"TCP:{HOST}:{target}"]
            # socat's stderr is left out: it reports iperf3's reset of its control connection.
            paths[label] = (subprocess.Popen(argv, stderr=subprocess.DEVNULL), port)
        for mode in MODES:
            port = free_port()
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), str(target), mode]
            paths[f"nfgate {mode}"] = (subprocess.Popen(argv, cwd=TOP), port)
        for _, port in paths.values():
            wait_listening(port)
        # Round-robin, so that a burst of load from elsewhere falls on every path alike.
        for _ in range(args.rounds):
            for name, (proc, port) in paths.items():
                samples.setdefault(name, []).append(measure(proc, port, args.seconds))
    finally:
        for proc, _ in paths.values():
            if proc is not None:
                proc.kill()
                proc.wait()
        server.kill()
        server.wait()

    results: list[dict[str, Any]] = []
    for name, runs in samples.items():
        result: dict[str, Any] = {"path": name, "gbit_s": round(statistics.median(g for g, _ in runs), 2),
                                  "runs": [round(g, 2) for g, _ in runs]}
        if runs[0][1] is not None:
            result["cpu_s_per_gb"] = round(statistics.median(c for _, c in runs if c is not None), 3)
        results.append(result)
    socat = next(r["gbit_s"] for r in results if r["path"] == "socat")
    for r in results:
        r["vs_socat"] = round(r["gbit_s"] / socat, 2) if socat else None
    if args.json:
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "results": results}, indent=2))
        return 0
    print(f"bulk TCP on loopback, one iperf3 stream, {args.seconds:g} s a run, median of {args.rounds} rounds")
    print(f"{'path':<18} {'Gbit/s':>8} {'/ socat':>8} {'CPU s/GB':>9}  runs")
    for r in results:
        runs = " ".join(f"{g:.1f}" for g in r["runs"])
        print(f"{r['path']:<18} {r['gbit_s']:>8.2f} {r['vs_socat']:>8.2f} {r.get('cpu_s_per_gb', ''):>9}  {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
