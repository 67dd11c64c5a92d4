"""Runs a Supervisor whose children are stand-ins, for tests/firewall/test_supervisor.py.

    supervised.py CONFIG N   supervise N stand-in processes (each sleeps in a
                             bounded loop), with the config's rules and blind track
"""

from __future__ import annotations

import sys

from firewall.config import load
from firewall.supervisor import Child, Supervisor

# A stand-in child: lives at most ten minutes, so nothing can outlive a test run.
LOOP = "import time\nfor _ in range(600): time.sleep(1)"

if __name__ == "__main__":
    path, count = sys.argv[1], int(sys.argv[2])
    children = [Child(f"standin-{i}", "gateway", [sys.executable, "-c", LOOP]) for i in range(count)]
    Supervisor(load(path), path, backend="iptables", children=children).run()
