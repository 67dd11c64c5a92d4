"""The blind track: the gateway network namespace and the veth link to it.

The gateways run in their own namespace at the end of a veth pair from the
router (seed fig. 1, "blind track"; DESIGN invariant 6). The router's end
belongs to no zone; the gateway end has the gateway address and a default
route back to the router, so everything a gateway sends goes back through the
processor.

Everything that enters the router on this link comes from the gateway
address: conntrack translates it after the routing decision (to the client
or the server) and at postrouting, so the reverse-path filter sees the
gateway's own address and may be as strict as the operator likes
(docs/datapath.md, "The blind-track interface"). A router that does not
forward IPv4 (``net.ipv4.ip_forward``) is refused with the sysctl to change,
never changed behind the operator's back: every gateway flow crosses the
link.

Everything here runs ``ip`` in the router's namespace (the current one, or
``router_netns`` for a lab) and in the gateway namespace by name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from firewall.config.model import GatewayLink
from firewall.errors import KernelError

TIMEOUT = 10.0


def _ip(router_netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", router_netns] if router_netns else []) + list(args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise KernelError(f"gateway link: `{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def _sysctl(netns: str | None, key: str, value: str | None = None) -> str:
    """Read ``key``, or write ``value`` to it, in a namespace (None: the current one)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    args = ["sysctl", "-n", key] if value is None else ["sysctl", "-qw", f"{key}={value}"]
    result = subprocess.run(prefix + args, capture_output=True, text=True, timeout=TIMEOUT)
    # procps sysctl can exit 0 on a write error, so stderr counts as failure too.
    if result.returncode != 0 or result.stderr.strip():
        raise KernelError(f"gateway link: sysctl {key}: {result.stderr.strip() or 'failed'}")
    return result.stdout.strip()


def exists(link: GatewayLink, router_netns: str | None = None) -> bool:
    return _ip(router_netns, "link", "show", link.router_if, check=False).returncode == 0


def create(link: GatewayLink, router_netns: str | None = None) -> None:
    """Create the namespace and the link; replaces a stale link of the same name."""
    if _sysctl(router_netns, "net.ipv4.ip_forward") != "1":
        # Even a flow that "ends at the router" (a tunnel's service port) is
        # forwarded: the gateway sits in its own namespace behind the link.
        raise KernelError(
            "gateway link: net.ipv4.ip_forward is 0; gateways sit behind the blind track, "
            "so the router must forward IPv4: set it to 1"
        )
    if exists(link, router_netns):
        remove(link, router_netns)
    if not Path("/run/netns", link.netns).exists():
        subprocess.run(["ip", "netns", "add", link.netns], check=True, capture_output=True, timeout=TIMEOUT)
    _ip(router_netns, "link", "add", link.router_if, "type", "veth", "peer", "name", link.gateway_if, "netns", link.netns)
    _sysctl(router_netns, f"net.ipv4.conf.{link.router_if}.forwarding", "1")
    _ip(router_netns, "address", "add", str(link.router_address), "dev", link.router_if)
    _ip(router_netns, "link", "set", link.router_if, "up")
    _ip(link.netns, "link", "set", "lo", "up")
    _ip(link.netns, "address", "add", str(link.gateway_address), "dev", link.gateway_if)
    _ip(link.netns, "link", "set", link.gateway_if, "up")
    _ip(link.netns, "route", "add", "default", "via", str(link.router_address.ip))


def remove(link: GatewayLink, router_netns: str | None = None) -> None:
    """Remove the link and the namespace, killing what still runs inside. Idempotent."""
    _ip(router_netns, "link", "del", link.router_if, check=False)
    if Path("/run/netns", link.netns).exists():
        pids = subprocess.run(["ip", "netns", "pids", link.netns], capture_output=True, text=True, timeout=TIMEOUT)
        for pid in pids.stdout.split():
            subprocess.run(["kill", "-KILL", pid], capture_output=True, timeout=TIMEOUT)
        subprocess.run(["ip", "netns", "del", link.netns], capture_output=True, timeout=TIMEOUT)
