"""`scripts/bench ha`: the router pair's failover stall and the flows/s its sync keeps up with.

In the ha lab, with `nfgate run` on both routers (tests/firewall/ha_harness.py):

- stall: two paced streams from the server through port forwards on the
  virtual address at once, one carried by the kernel alone, one relayed by
  tcp-relay on the AG host (a gateway flow, both legs double-NATed by the
  master; docs/ha.md, "The AG host"); the master's links go down, the other
  takes over, the links come back and the first takes the addresses back
  after the preempt delay. The longest gap in each stream after each event
  is its stall. Median of RUNS, for 1 s and 0.3 s adverts.
- sync: COUNT new connections through the master, THREADS at a time; how
  many flows/s the master carried, and how many of those entries conntrackd
  injected into the backup's table, and how long after the last one.

Speed is reported, never asserted (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from tests.firewall.ha_harness import RELAYED_PORT, REPO, VIP, Pair, result, serve, stream, wait_master

RUNS = 5
ADVERTS = (1.0, 0.3)
PREEMPT = 3.0
MB, RATE = 60, 5.0
CHURN, THREADS = 3000, 16
SYNC_WAIT = 10.0


STREAMS = {"kernel": 8080, "relayed": RELAYED_PORT}


def one_run(lab: Lab, pair: Pair) -> dict[str, tuple[float, float]]:
    """Per stream (STREAMS), (failover stall, failback stall) of one run."""
    start = time.monotonic()
    flows = {name: stream(lab, MB, RATE, port=port) for name, port in STREAMS.items()}
    time.sleep(2.0)
    t_fail = time.monotonic() - start
    pair.links("r1", "down")
    wait_master(pair, "r2", timeout=30)
    t_up = time.monotonic() - start
    pair.links("r1", "up")
    wait_master(pair, "r1", timeout=60)
    out = {}
    for name, flow in flows.items():
        got = result(flow, timeout=180)
        if not got["ok"]:
            raise SystemExit(f"ha bench: the {name} stream broke: {got}")
        # Each stall starts at [0] and lasts [1]; the stream's clock started a little after ours.
        failover = max([g for t, g in got["stalls"] if t_fail - 0.5 <= t < t_up] or [0.0])
        failback = max([g for t, g in got["stalls"] if t >= t_up - 0.5] or [0.0])
        out[name] = (failover, failback)
    return out


def entries(lab: Lab, node: str) -> int:
    """The node's conntrack entries of the churn's flows (original destination port 8080)."""
    out = lab.run(node, ["conntrack", "-L", "-p", "tcp", "--dport", "8080"], check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("tcp"))


def sync_rate(lab: Lab, pair: Pair) -> None:
    # The churn's entries must outlive the count: TIME_WAIT back to the kernel's 120 s.
    for node in ("r1", "r2"):
        lab.run(node, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=120"])
    argv = [sys.executable, "-m", "tests.hapeer", "churn", VIP["wan"][1], "8080", str(CHURN), str(THREADS)]
    out = lab.run("server", argv, cwd=str(REPO), timeout=600).stdout
    got = json.loads(out.strip().splitlines()[-1])
    end = time.monotonic()
    master = entries(lab, "r1")
    copies = 0
    while time.monotonic() - end < SYNC_WAIT:
        copies = entries(lab, "r2")
        if copies >= master:
            break
        time.sleep(0.1)
    lag = time.monotonic() - end
    rate = got["ok"] / got["seconds"]
    print(f"  sync: {got['ok']} new flows through r1 in {got['seconds']:.2f} s ({rate:.0f} flows/s, {got['failed']} failed); "
          f"r1 holds {master} entries, r2 {copies} ({100 * copies / max(master, 1):.0f}%), "
          f"{'all' if copies >= master else 'not all'} {lag:.2f} s after the last flow")


def main() -> None:
    for advert in ADVERTS:
        with tempfile.TemporaryDirectory(prefix="nfgate-ha-bench-") as tmp:
            lab = Lab(load_topology("ha"), f"nfgb-ha{int(advert * 10)}").up()
            pair = None
            try:
                pair = Pair(lab, Path(tmp), advert=advert, preempt=PREEMPT, ag=True)
                serve(lab)
                runs = [one_run(lab, pair) for _ in range(RUNS)]
                print(f"== ha: advert {advert:g} s, preempt {PREEMPT:g} s, {MB} MiB at {RATE:g} MiB/s, {RUNS} runs")
                for name in STREAMS:
                    overs, backs = [r[name][0] for r in runs], [r[name][1] for r in runs]
                    print(f"  {name} flow: failover stall: median {statistics.median(overs):.2f} s "
                          f"(runs: {', '.join(f'{x:.2f}' for x in overs)})")
                    print(f"  {name} flow: failback stall: median {statistics.median(backs):.2f} s "
                          f"(runs: {', '.join(f'{x:.2f}' for x in backs)}; 0 = no gap over 0.2 s)")
                if advert == ADVERTS[-1]:
                    sync_rate(lab, pair)
            finally:
                if pair is not None:
                    pair.stop()
                lab.down()
    load_avg = open("/proc/loadavg").read().split()[:3]
    print(f"  (load average at the end: {' '.join(load_avg)}; {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs)")


if __name__ == "__main__":
    main()
