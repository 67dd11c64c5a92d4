"""`scripts/bench ha` (its last part): what the master's UDP refresh costs (docs/ha.md, "UDP refresh").

In a namespace of its own (nothing else in its conntrack table): FLOWS gateway
flows' worth of UDP entries (two legs each, nfgate's ``rewritten`` mark), and
as many TCP entries with the same mark that the kernel's filter must skip;
an update-event listener (``conntrack -E``, as conntrackd would be) started
before them, so each update is reported as on a pair's master. Then one pass
of ``Refresher`` as the processor's loop drives it, a ``step`` per wake-up:
the whole pass's wall time, and each step's (what a queued packet can wait
behind), median and max, with the process's CPU time.

Speed is reported, never asserted (docs/benchmarks.md).

    python -m tests.firewall.refresh_bench [FLOWS]
"""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.processor.refresh import Refresher

REPO = Path(__file__).resolve().parents[2]
FLOWS = 10_000
MARK = 0x10000
BATCH = 200  # create messages per send


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _tuple(kind: int, src: int, sport: int, dst: int, dport: int, proto: int) -> bytes:
    ip = _nla(1, struct.pack("!I", src)) + _nla(2, struct.pack("!I", dst))
    pr = _nla(1, bytes([proto])) + _nla(2, struct.pack("!H", sport)) + _nla(3, struct.pack("!H", dport))
    return _nla(kind | 0x8000, _nla(1 | 0x8000, ip) + _nla(2 | 0x8000, pr))


def _create(seq: int, proto: int, src: int, sport: int, dst: int, dport: int) -> bytes:
    body = (_tuple(1, src, sport, dst, dport, proto) + _tuple(2, dst, dport, src, sport, proto)
            + _nla(7, struct.pack("!I", 30)) + _nla(8, struct.pack("!I", MARK)))
    if proto == 6:  # CTA_PROTOINFO / CTA_PROTOINFO_TCP / CTA_PROTOINFO_TCP_STATE: established
        body += _nla(4 | 0x8000, _nla(1 | 0x8000, _nla(1, bytes([3]))))
    data = struct.pack("=BBH", socket.AF_INET, 0, 0) + body
    # NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL; ctnetlink IPCTNL_MSG_CT_NEW
    return struct.pack("=IHHII", 16 + len(data), 1 << 8, 0x1 | 0x400 | 0x200, seq, 0) + data


def fill(flows: int) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    sock.bind((0, 0))
    base = 0x0A000000
    msgs = []
    for i in range(flows):
        port = 1024 + i % 60000
        host = base + 1 + i // 60000
        msgs.append(_create(i, 17, host, port, 0xCB007101, 5004))  # leg A
        msgs.append(_create(i, 17, 0xAC1FFD0A, port, 0xAC1FFE00 + i // 60000, port))  # leg B
        msgs.append(_create(i, 6, host, port, 0xCB007101, 8081))  # a TCP flow the filter skips
    for i in range(0, len(msgs), BATCH):
        sock.send(b"".join(msgs[i:i + BATCH]))
    sock.close()


def inner(flows: int) -> None:
    listener = subprocess.Popen(["conntrack", "-E", "-e", "UPDATE"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        fill(flows)
        counters: Counter[str] = Counter()
        r = Refresher([(MARK, MARK), (0x40000, 0x50000)], counters, families=(socket.AF_INET,))
        steps = []
        cpu0, t0 = time.process_time(), time.monotonic()
        r.begin()
        while r.busy:
            select.select([r.sock], [], [], 1.0)
            s = time.perf_counter()
            r.step()
            steps.append(time.perf_counter() - s)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        r.answers()
        print(json.dumps({"entries": 3 * flows, "counters": counters, "wall": wall, "cpu": cpu, "steps": len(steps),
                          "step_median_ms": 1000 * statistics.median(steps), "step_max_ms": 1000 * max(steps),
                          "slowest": steps.index(max(steps))}))
    finally:
        listener.terminate()
        listener.wait()


def main() -> None:
    flows = int(sys.argv[1]) if len(sys.argv) > 1 else FLOWS
    with tempfile.TemporaryDirectory(prefix="nfgate-refresh-bench-") as tmp:
        topo = Path(tmp) / "one.json"
        topo.write_text(json.dumps({"router": "router", "hosts": {"router": {}, "peer": {}}, "links": [
            {"a": {"host": "router", "ifname": "eth0", "addresses": ["10.9.0.1/24"]},
             "b": {"host": "peer", "ifname": "eth0", "addresses": ["10.9.0.2/24"]}}]}))
        lab = Lab(load_topology(topo), "nfgb-refresh").up()
        try:
            out = lab.run("router", [sys.executable, "-m", "tests.firewall.refresh_bench", "--inner", str(flows)],
                          cwd=str(REPO), timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
        finally:
            lab.down()
    got = json.loads(out.strip().splitlines()[-1])
    c = Counter(got["counters"])
    print(f"== ha: UDP refresh, one pass over {flows} gateway flows' {2 * flows} UDP legs (and {flows} TCP entries "
          f"the kernel's filter skips), an update listener running")
    print(f"  listed {c['refresh.listed']}, updated {c['refresh.updated']}, gone {c['refresh.gone']}: "
          f"{got['wall']:.3f} s wall, {got['cpu']:.3f} s CPU in {got['steps']} steps; "
          f"a step: median {got['step_median_ms']:.2f} ms, max {got['step_max_ms']:.2f} ms (step {got['slowest'] + 1}; "
          f"the one that starts the second dump, which matches nothing, walks the table in one go)")
    load_avg = open("/proc/loadavg").read().split()[:3]
    print(f"  (load average at the end: {' '.join(load_avg)})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--inner":
        inner(int(sys.argv[2]))
    else:
        main()
