"""New connections through tcp-relay with two versions of nfgate in one lab, alternated.

    sudo .venv/bin/python -m tests.firewall.relay_ab BEFORE_TREE AFTER_TREE [--rounds 6] [--seconds 5] [--events]

Not a test (nothing is asserted): a before/after comparison for
docs/benchmarks.md, less at the mercy of a shared machine than two runs of
relay_bench.py minutes apart. One basic lab (tests/firewall/run_harness.py's
config: ext -> router:8443 through the tcp-relay to lan:443, ext ->
router:8080 by the kernel's port forward to lan:80). ``nfgate run`` is
started from each source tree in turn (its processes get that tree on
PYTHONPATH and as their working directory), ``--rounds`` times each in ABBA
order, and each time measures:

- new connections/s through the relay and through the kernel (8 client
  threads, ``--seconds`` each, relay_bench.py's connector), and their ratio;
- the processor's CPU per relayed connection;
- the CPU (user + system) of every process in the lab's namespaces, and of
  the clients, per relayed and per kernel-forwarded connection;
- with ``--events``: the processor's CPU per kernel-forwarded connection,
  from its start until conntrack has destroyed it (a gateway-free
  connection's cost to it is its destroy event). The router's TIME-WAIT and
  CLOSE timeouts are 1 s then, so connections end within the run, and the
  relayed phase's are gone before the kernel phase starts;
- the single-thread latency of 300 relayed (and kernel-forwarded)
  connections, median and 90th percentile;
- the packets the processor's queue delivered per relayed flow.

Prints one JSON line per start, then per pair (neighbours in the ABBA
order) the after/before ratios' median and how many pairs favour after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.firewall.relay_bench import ECHO, WAN, connections, processor_cpu
from tests.firewall.run_harness import Running

LATENCY = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"ping")
        s.recv(64)
    out.append(time.perf_counter() - t)
out.sort()
print(round(1000 * out[len(out) // 2], 3), round(1000 * out[len(out) * 9 // 10], 3))
"""
LATENCY_CONNECTIONS = 300
# Lower is better for these; higher for the rest.
LOWER_BETTER = ("cpu_ms", "all_cpu_ms_relay", "lat_ms_p50", "cpu_us_per_kernel_conn")


def latency(lab: Lab, port: int) -> tuple[float, float]:
    got = lab.run("ext", [sys.executable, "-c", LATENCY, WAN, str(port), str(LATENCY_CONNECTIONS)], timeout=120).stdout.split()
    return float(got[0]), float(got[1])


def lab_cpu(lab: Lab, run: Running) -> float:
    """CPU seconds of every process in the lab's namespaces and the gateway namespace, and of
    this process's waited-for children (the clients lab.run started).

    The gateway namespace is found by a gateway's pid: ``nfgate run`` mounts it under
    /run/netns in its own mount namespace (``ip netns exec`` gave it one, as systemd
    does the unit), where this process sees only the empty file under that name."""
    inodes = set()
    for name in [lab.ns(h) for h in lab.topology.host_names]:
        try:
            inodes.add(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    inodes.add(os.stat(f"/proc/{run.processes()['gateway-relay']['pid']}/ns/net").st_ino)
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino not in inodes:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    t = os.times()
    return ticks / os.sysconf("SC_CLK_TCK") + t.children_user + t.children_system


SETTLED = 50  # conntrack entries left that count as "the phase's connections are gone"
SETTLE_SECONDS = 60.0


def settle(lab: Lab) -> None:
    """Wait until the router's conntrack has destroyed nearly every connection: a dump evicts
    the expired ones as it walks past them, so each poll also hastens the end."""
    def left() -> bool:
        listed = lab.run("router", ["conntrack", "-L"], check=False).stdout
        return listed.count("\n") <= SETTLED
    wait_for(left, timeout=SETTLE_SECONDS, what="the router's connections to end")


def one(lab: Lab, name: str, tree: str, seconds: float, events: bool = False) -> dict[str, object]:
    # Both: `python -m` looks in the working directory before PYTHONPATH.
    os.environ["PYTHONPATH"] = tree
    os.chdir(tree)
    lab.run("router", ["conntrack", "-F"], check=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = Running(lab, Path(tmp))
        try:
            connections(lab, 8443, 1.0)  # warm-up
            load = float(Path("/proc/loadavg").read_text().split()[0])
            c0, f0 = processor_cpu(run)
            a0 = lab_cpu(lab, run)
            relay = connections(lab, 8443, seconds)
            run.settled()  # the relayed connections' ends: theirs, not the kernel phase's
            a1 = lab_cpu(lab, run)
            c1, f1 = processor_cpu(run)
            k0 = k1 = 0.0
            if events:
                settle(lab)
                k0, _ = processor_cpu(run)
            kernel = connections(lab, 8080, seconds)
            a2 = lab_cpu(lab, run)
            if events:
                settle(lab)
                k1, _ = processor_cpu(run)
            lat, lat90 = latency(lab, 8443)
            klat, klat90 = latency(lab, 8080)
            counters = run.ask("status")["processors"]["processor-0"]["counters"]
        finally:
            run.stop()
    return {
        "tree": name, "load": load, "relay": round(relay), "kernel": round(kernel), "ratio": round(relay / kernel, 3),
        "cpu_ms": round(1000 * (c1 - c0) / max(1, f1 - f0), 3),
        "all_cpu_ms_relay": round(1000 * (a1 - a0) / max(1.0, relay * seconds), 3),
        "all_cpu_ms_kernel": round(1000 * (a2 - a1) / max(1.0, kernel * seconds), 3),
        # With --events: the processor's CPU for gateway-free connections, from their start to their end.
        **({"cpu_us_per_kernel_conn": round(1e6 * (k1 - k0) / max(1.0, kernel * seconds), 2)} if events else {}),
        "lat_ms_p50": lat, "lat_ms_p90": lat90, "kernel_lat_ms_p50": klat, "kernel_lat_ms_p90": klat90,
        "queued_per_flow": round(counters.get("queued", 0) / max(1, counters.get("flows.opened", 1)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the source tree of the version to compare against")
    parser.add_argument("after", help="the source tree of the version under test")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--events", action="store_true",
                        help="also the processor's CPU per gateway-free connection, until its destroy event")
    args = parser.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    order = []
    for i in range(args.rounds):
        order += ["before", "after"] if i % 2 == 0 else ["after", "before"]
    lab = Lab(load_topology("basic"), f"nfab{int(time.time()) % 100000:05d}").up()
    rows = []
    try:
        # Tens of thousands of connections a minute from one client address: its ports in
        # TIME-WAIT would run out and slow whichever phase comes next (seen as a kernel
        # path at a fifth of its rate). The client's own namespace only.
        lab.run("ext", ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"])
        if args.events:
            lab.run("router", ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
                               "net.netfilter.nf_conntrack_tcp_timeout_close=1"])
        for port in (443, 80):
            lab.popen("lan", [sys.executable, "-c", ECHO, str(port)])
            lab.wait_listening("lan", port)
        for name in order:
            rows.append(one(lab, name, trees[name], args.seconds, args.events))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        lab.down()
    pairs = [(a, b) if a["tree"] == "before" else (b, a) for a, b in zip(rows[::2], rows[1::2])]
    for key in ("ratio", "relay", "cpu_ms", "all_cpu_ms_relay", "lat_ms_p50", "cpu_us_per_kernel_conn"):
        r = [after[key] / before[key] for before, after in pairs if before.get(key)]
        if not r:
            continue
        better = sum(x < 1 if key in LOWER_BETTER else x > 1 for x in r)
        print(json.dumps({"figure": key, "after_over_before_median": round(statistics.median(r), 3),
                          "pairs_favouring_after": better, "pairs": len(r)}))


if __name__ == "__main__":
    main()
