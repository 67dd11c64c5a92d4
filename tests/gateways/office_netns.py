"""examples/office.toml under `nfgate run` in the basic lab: for tests/gateways/test_office_netns.py and scripts/demo.

The example as shipped, with what a lab needs changed and nothing else:
its ``lan`` zone's interfaces become the basic lab's ``lan0`` (the lab has
no ``lan1``), and ``[gateway_link]``, ``[signalling]`` and ``[supervisor]``
point into the test's own namespace and directory. The lab gains the
office's phone network: 192.168.20.1/24 on the router's lan0,
192.168.20.10 on lan (a desk phone), and ext routes 192.168.20.0/24 through
the router (the office's rtp selector names the phones' addresses, with no
port forward).

The supervisor reports a processor running before it has bound its queue.
With the example's ``fail_mode = "open"``, a flow whose first datagram
comes in that gap is the kernel's for its whole life (a one-way stream is
never new again), and with ``"closed"`` its first datagrams are dropped:
``OfficeRunning`` waits for every processor's queue.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from firewall.lab.wait import wait_for
from tests.gateways.rtp_netns import EXT, PEERS, RUN, WAN, RtpRunning
from tests.firewall.run_harness import Running

OFFICE = Path(__file__).parents[2] / "examples" / "office.toml"
PHONE = "192.168.20.10"
RTP_PORT = 16384  # the first pair of the office's rtp range



def office_config(fail_mode: str | None = None) -> str:
    """The example adapted to the lab; ``fail_mode`` replaces its ``"open"`` when given."""
    text = OFFICE.read_text()
    lan, fail = 'interfaces = ["lan0", "lan1"]', 'fail_mode = "open"'
    assert text.count(lan) == 1 and text.count(fail) == 1 and "{" not in text, \
        "examples/office.toml changed: adapt tests/gateways/office_netns.py"
    if fail_mode is not None:
        text = text.replace(fail, f'fail_mode = "{fail_mode}"')
    return text.replace(lan, 'interfaces = ["lan0"]') + RUN


def prepare(lab: Any) -> None:
    """The office's phone network in the basic lab."""
    lab.run("router", ["ip", "address", "add", "192.168.20.1/24", "dev", "lan0"])
    lab.run("lan", ["ip", "address", "add", f"{PHONE}/24", "dev", "eth0"])
    lab.run("ext", ["ip", "route", "add", "192.168.20.0/24", "via", WAN])


class OfficeRunning(RtpRunning):
    """`nfgate run -c examples/office.toml` (adapted) in the lab router."""

    def __init__(self, lab: Any, tmp: Path, fail_mode: str | None = None) -> None:
        Running.__init__(self, lab, tmp, config=office_config(fail_mode))
        # Each processor logs its signalling line once its queue is bound.
        wait_for(lambda: self.text().count("nfgate processor: queue ") >= 2 and
                 all(f"queue {q}: signalling" in self.text() for q in (0, 1)), timeout=20, interval=0.05,
                 what="both processors' queues")


def send(lab: Any, sport: int, dport: int, plan: str) -> int:
    """rtp_peers.py's plan from ext to the phone."""
    import json

    result = lab.run("ext", [sys.executable, PEERS, "send", EXT, str(sport), PHONE, str(dport), plan], check=False,
                     timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(json.loads(result.stdout)["sent"])
