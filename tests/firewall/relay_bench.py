"""TCP through `nfgate run`'s tcp-relay against the kernel's own port forward, in one run.

    sudo .venv/bin/python -m tests.firewall.relay_bench [--seconds 5] [--connect-seconds 3]

Not a test (nothing is asserted): figures for ``scripts/bench processor`` and
docs/benchmarks.md. The basic lab runs nfgate with tests/firewall/run_harness.py's
config: ext -> router:8443 is port-forwarded to lan:443 through the tcp-relay
(queued, double-NATed, relayed in user space), ext -> router:8080 is
port-forwarded to lan:80 by the kernel alone, in the same ruleset. Each figure
is measured on both paths back to back and printed with the ratio:

- bulk: iperf3, one TCP stream, ``seconds`` long (received bits/s);
- new connections/s: 8 client threads in ext against a threaded echo server, each connecting, sending 4
  bytes, reading the echo and closing, for ``connect-seconds``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from tests.firewall.run_harness import Running

ECHO = r"""
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(64)
        self.request.sendall(b"echo:" + data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.request_queue_size = 512
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
"""

CONNECTOR = r"""
import socket, sys, threading, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done = [0] * 8
stop = time.monotonic() + seconds
def worker(i):
    while time.monotonic() < stop:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"ping")
            if s.recv(64) == b"echo:ping":
                done[i] += 1
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
start = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
print(sum(done) / (time.monotonic() - start))
"""


def iperf(lab, port: int, seconds: float) -> float:
    argv = ["iperf3", "-c", "203.0.113.1", "-p", str(port), "-t", str(seconds), "-J"]
    out = lab.run("ext", argv, timeout=seconds + 30).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def connections(lab, port: int, seconds: float) -> float:
    out = lab.run("ext", [sys.executable, "-c", CONNECTOR, "203.0.113.1", str(port), str(seconds)], timeout=seconds + 60)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connect-seconds", type=float, default=3.0)
    args = parser.parse_args()
    lab = Lab(load_topology("basic"), f"nfgr{int(time.time()) % 100000:05d}").up()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Running(lab, Path(tmp))
            try:
                servers = [lab.popen("lan", ["iperf3", "-s", "-p", str(p)], stdout=subprocess.DEVNULL) for p in (443, 80)]
                for p in (443, 80):
                    lab.wait_listening("lan", p)
                relay_bps, kernel_bps = iperf(lab, 8443, args.seconds), iperf(lab, 8080, args.seconds)
                for s in servers:
                    s.terminate()
                    s.wait(timeout=10)
                for p in (443, 80):
                    lab.popen("lan", [sys.executable, "-c", ECHO, str(p)])
                    lab.wait_listening("lan", p)
                relay_cps = connections(lab, 8443, args.connect_seconds)
                kernel_cps = connections(lab, 8080, args.connect_seconds)
            finally:
                run.stop()
    finally:
        lab.down()
    print(json.dumps({
        "tcp_bulk_relay_gbit": round(relay_bps / 1e9, 3),
        "tcp_bulk_kernel_gbit": round(kernel_bps / 1e9, 3),
        "ratio_bulk_relay_to_kernel": round(relay_bps / kernel_bps, 3),
        "new_conn_relay_per_s": round(relay_cps),
        "new_conn_kernel_per_s": round(kernel_cps),
        "ratio_conn_relay_to_kernel": round(relay_cps / kernel_cps, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
