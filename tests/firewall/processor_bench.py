"""Rough packets/s: the processor's runner against a bare netfilterqueue accept loop on the same queue.

    sudo .venv/bin/python -m tests.firewall.processor_bench [--seconds 3] [--size 64]

Not a test (nothing is asserted): the numbers for ``scripts/bench processor``
and docs/benchmarks.md. In the basic lab with nfgate applied (iptables
backend) and a udp-relay gateway on wan udp 5353 (forwarded to lan), a
Python sender in ext floods one UDP flow at the router's 5353 for
``seconds`` + warm-up. Each consumer counts what it handled in a window that
starts after the warm-up:

- runner: ``python -m firewall.processor``; every packet after the first
  is a flow-table hit, rewritten F:f -> G:g and repeated into the gateway
  namespace, where the kernel drops it (no socket; ``--sink`` drains it with
  a Python socket instead). Read from the control socket's ``queued``
  counter.
- bare: a netfilterqueue callback that only accepts, read with
  ``run(block=False)`` from a select loop, the smallest consumer there is;
  the same callback read as the runner reads (``run_socket`` with a
  512-message batch), to show what the batching costs; and one that gives
  the runner's verdict (same payload back, ``rewritten`` mark, NF_REPEAT),
  so the kernel's share of a rewrite shows apart from the Python work.
- core: ``ProcessorCore.handle`` alone on one packet in a loop, no kernel,
  for the share of the time that is Python.

Both consumers share the machine's two cores with the sender and the
kernel, so compare only figures from one run (PEERS.md: about +-30%).
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
from firewall.lab.wait import wait_for
from tests.firewall.processor_harness import WAN, Harness

EXTRA = """
[[nat.forward]]
name = "bench"
from = "wan"
proto = "udp"
port = 5353
to = "192.168.1.10"

[[gateway]]
name = "bench"
kind = "udp-relay"
listen_port = 20053

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = 5353
"""
WARMUP = 1.0  # seconds of flood before a window opens: the first packet opens the binding

SENDER = """
import socket, sys, time
dst, seconds, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, 5353))
data, sent, end = b"x" * size, 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.send(data)
            sent += 1
        except OSError:
            pass
print(sent)
"""

SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
s.bind((sys.argv[1], 20053))
print("ready", flush=True)
while True:
    s.recv(65536)
"""

BARE = """
import errno, json, select, socket, sys, time
from netfilterqueue import NetfilterQueue
warmup, seconds, mode = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
count, marks = 0, {}
def accept(pkt):
    # Timed in the callback: under a flood run() does not return until the flood ends.
    global count
    count += 1
    if mode == "repeat":  # the runner's verdict, without its work
        pkt.set_payload(pkt.get_payload())
        pkt.set_mark(0x10000)
        pkt.repeat()
    else:
        pkt.accept()
    if count & 1023 == 0:
        now = time.monotonic()
        marks.setdefault("first", (count, now))
        if "start" not in marks and now >= marks["first"][1] + warmup:
            marks["start"] = (count, now)
        elif "start" in marks and "end" not in marks and now >= marks["start"][1] + seconds:
            marks["end"] = (count, now)
class Batch:
    # what the runner gives run_socket: EAGAIN after 512 messages
    def __init__(self, sock):
        self.sock, self.left = sock, 0
    def recv(self, size):
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(size)
q = NetfilterQueue()
q.bind(0, accept, max_len=16384, sock_len=32 << 20)  # as the runner binds
fd = q.get_fd()
batch = Batch(socket.socket(fileno=fd))
batch.sock.setblocking(False)
print("ready", flush=True)
deadline = time.monotonic() + 60
while "end" not in marks and time.monotonic() < deadline:
    select.select([fd], [], [], 0.1)
    if mode == "run":
        q.run(block=False)
    else:
        batch.left = 512
        q.run_socket(batch)
(c0, t0), (c1, t1) = marks["start"], marks["end"]
print(json.dumps({"pps": (c1 - c0) / (t1 - t0)}), flush=True)
batch.sock.detach()
q.unbind()
"""


def flood(h: Harness, seconds: float, size: int) -> subprocess.Popen[str]:
    return h.lab.popen("ext", [sys.executable, "-c", SENDER, WAN, str(seconds), str(size)], stdout=subprocess.PIPE, text=True)


def runner_pps(h: Harness, seconds: float, size: int) -> tuple[float, int]:
    h.start_processor()
    sender = flood(h, WARMUP + seconds + 1, size)
    wait_for(lambda: h.counter("queued"), timeout=10, what="the first packet")
    time.sleep(WARMUP)  # a measurement window, not a wait for a condition
    p0, t0 = h.counter("queued"), time.monotonic()
    time.sleep(seconds)
    p1, t1 = h.counter("queued"), time.monotonic()
    sent = int(sender.communicate(timeout=60)[0])
    stats = h.stats()
    h.stop_processor()
    assert stats["flows"] <= 1, stats
    return (p1 - p0) / (t1 - t0), sent


def bare_pps(h: Harness, seconds: float, size: int, mode: str) -> tuple[float, int]:
    argv = [sys.executable, "-c", BARE, str(WARMUP), str(seconds), mode]
    bare = h.lab.popen("router", argv, stdout=subprocess.PIPE, text=True)
    assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
    sender = flood(h, WARMUP + seconds + 2, size)
    result = json.loads(bare.communicate(timeout=90)[0])
    sent = int(sender.communicate(timeout=60)[0])
    return result["pps"], sent


def core_pps(iterations: int = 200_000) -> float:
    from scapy.layers.inet import IP, UDP

    from tests.firewall.test_processor_core import Rig

    rig = Rig()
    payload = bytes(IP(src="192.168.1.10", dst="203.0.113.10") / UDP(sport=4000, dport=10050) / (b"x" * 64))
    handle, now = rig.core.handle, rig.now
    handle(payload, 0, 3, now)  # opens the flow (lan -> wan RTP selector)
    start = time.perf_counter()
    for _ in range(iterations):
        handle(payload, 0, 3, now)
    assert rig.core.repeated == iterations + 1
    return iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--sink", action="store_true",
                        help="drain the flow with a Python socket in the gateway namespace (costs a share of a core)")
    args = parser.parse_args()
    lab = Lab(load_topology("basic"), f"nfgb{int(time.time()) % 100000:05d}").up()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            h = Harness(lab, Path(tmp), extra=EXTRA)
            sink = None
            if args.sink:
                sink = subprocess.Popen(["ip", "netns", "exec", h.gwns, sys.executable, "-u", "-c", SINK,
                                         str(h.link.gateway_address.ip)], stdout=subprocess.PIPE, text=True)
                assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            try:
                runner, sent_r = runner_pps(h, args.seconds, args.size)
                bare, sent_b = bare_pps(h, args.seconds, args.size, "run")
                batched, _ = bare_pps(h, args.seconds, args.size, "batch")
                repeat, _ = bare_pps(h, args.seconds, args.size, "repeat")
            finally:
                if sink is not None:
                    sink.kill()
                    sink.wait()
                h.close()
    finally:
        lab.down()
    core = core_pps()
    span = WARMUP + args.seconds
    print(json.dumps({
        "udp_payload": args.size,
        "runner_pps": round(runner),
        "bare_accept_pps": round(bare),
        "bare_accept_batched_pps": round(batched),
        "bare_repeat_batched_pps": round(repeat),
        "ratio_runner_to_bare": round(runner / bare, 2),
        "sender_pps_runner_run": round(sent_r / (span + 1)),
        "sender_pps_bare_run": round(sent_b / (span + 2)),
        "core_handle_pps": round(core),
        "core_handle_us": round(1e6 / core, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
