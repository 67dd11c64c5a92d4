"""Short conntrack timeouts in a lab router, so gateway flows end within a test.

The kernel carries gateway flows (docs/datapath.md), so a binding ends when
conntrack destroys its connections: after TIME-WAIT (120 s by default) for a
closed TCP flow. Tests that wait for bindings and pool entries to come back
shorten the router namespace's own timeouts (per-namespace sysctls: nothing
outside the lab changes).
"""

from __future__ import annotations

from typing import Any

FAST = {
    "nf_conntrack_tcp_timeout_time_wait": 1,
    "nf_conntrack_tcp_timeout_close": 1,
    "nf_conntrack_tcp_timeout_close_wait": 2,
    "nf_conntrack_tcp_timeout_fin_wait": 2,
    "nf_conntrack_tcp_timeout_last_ack": 2,
    "nf_conntrack_udp_timeout": 5,
    "nf_conntrack_udp_timeout_stream": 5,
}


def fast_conntrack(lab: Any, host: str = "router", **override: int) -> None:
    """Set the conntrack timeouts of ``host``'s namespace to ``FAST`` (and ``override``)."""
    values = {**FAST, **override}
    argv = ["sysctl", "-q", "-w"] + [f"net.netfilter.{k}={v}" for k, v in values.items()]
    lab.run(host, argv)
