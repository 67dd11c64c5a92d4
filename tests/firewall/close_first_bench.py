"""Relayed connections whose clients close first, for long enough to fill the gateway's TIME-WAIT.

    sudo .venv/bin/python -m tests.firewall.close_first_bench TREE [TREE ...] [--seconds 40]

Not a test (nothing is asserted): a figure for docs/benchmarks.md. One basic
lab (tests/firewall/run_harness.py's config: ext -> router:8443 through the
tcp-relay to lan:443), whose server answers and then waits for its client
to close: each client closes first, so each relayed connection's leg B
sends its FIN first and holds a TIME-WAIT on the gateway address, as with
clients that hang up once answered. ``nfgate run`` is started from each
source tree in turn (its processes get that tree on PYTHONPATH and as
their working directory), and 8 client threads connect for ``--seconds``.
Prints one JSON line per tree: new connections/s in each 5 s window, and
the gateway namespace's TIME-WAIT sockets every 5 s. The gateway namespace
goes with ``nfgate run``, and its TIME-WAITs with it, so one tree's run
leaves none to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from tests.firewall.relay_bench import WAN
from tests.firewall.run_harness import Running

WINDOW = 5.0  # seconds a rate and a TIME-WAIT count are taken over

ANSWER_THEN_WAIT = r"""
import socketserver, sys
class Answer(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"echo:" + self.request.recv(64))
        while self.request.recv(64):  # until the client's FIN: it closes first
            pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.request_queue_size = 512
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Answer).serve_forever()
"""

CLIENTS = r"""
import socket, sys, threading, time
host, port, seconds, window = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
counts = [0] * int(seconds / window + 1)
lock = threading.Lock()
def client():
    while time.monotonic() < start + seconds:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"ping")
                s.recv(64)
        except OSError:
            continue
        with lock:
            counts[int((time.monotonic() - start) / window)] += 1
threads = [threading.Thread(target=client) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(" ".join(str(round(c / window)) for c in counts[:-1]))
"""


def time_wait_in(pid: int) -> int:
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ss", "-Htan", "state", "time-wait"],
                         capture_output=True, text=True, timeout=30).stdout
    return out.count("\n")


def one(lab: Lab, tree: str, seconds: float) -> dict[str, object]:
    os.environ["PYTHONPATH"] = tree  # both: `python -m` looks in the working directory first
    os.chdir(tree)
    lab.run("router", ["conntrack", "-F"], check=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = Running(lab, Path(tmp))
        try:
            gateway = run.processes()["gateway-relay"]["pid"]
            counts: list[int] = []
            done = threading.Event()

            def count() -> None:
                while not done.wait(WINDOW):
                    counts.append(time_wait_in(gateway))

            threading.Thread(target=count, daemon=True).start()
            try:
                rates = lab.run("ext", [sys.executable, "-c", CLIENTS, WAN, "8443", str(seconds), str(WINDOW)],
                                timeout=seconds + 120).stdout.split()
            finally:
                done.set()
        finally:
            run.stop()
    return {"tree": tree, "connections_per_s": [int(r) for r in rates], "gateway_time_wait": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees, run in this order")
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    lab = Lab(load_topology("basic"), f"nfcf{int(time.time()) % 100000:05d}").up()
    try:
        # The clients' own TIME-WAITs (ext closes first too) must not be what runs out.
        lab.run("ext", ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"])
        lab.popen("lan", [sys.executable, "-c", ANSWER_THEN_WAIT, "443"])
        lab.wait_listening("lan", 443)
        for tree in args.trees:
            print(json.dumps(one(lab, str(Path(tree).resolve()), args.seconds)), flush=True)
    finally:
        lab.down()


if __name__ == "__main__":
    main()
