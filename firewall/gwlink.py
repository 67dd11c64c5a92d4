"""The blind track: the gateway network namespace and the veth link to it.

With ``mode = "host"`` the gateways run on their own host (docs/ha.md, "The
AG host") and the link is an interface of the operator's: ``check_host``
only checks it; nothing here creates or removes it.

The gateways run in their own namespace at the end of a veth pair from the
router (seed fig. 1, "blind track"; DESIGN invariant 6). The router's end
belongs to no zone; the gateway end has the gateway address and a default
route back to the router, so everything a gateway sends goes back through the
processor. Both ends also have an IPv6 ULA address (``router_address6``,
``gateway_address6``) and the gateway end an IPv6 default route, for the
IPv6 flows of the kinds that take them (issue 17); the router's end forwards
IPv6 (its own ``forwarding`` sysctl; the router's ``all`` one is the
operator's).

Everything that enters the router on this link comes from the gateway
address: conntrack translates it after the routing decision (to the client
or the server) and at postrouting, so the reverse-path filter sees the
gateway's own address and may be as strict as the operator likes
(docs/datapath.md, "The blind-track interface"). A router that does not
forward IPv4 (``net.ipv4.ip_forward``) is refused with the sysctl to change,
never changed behind the operator's back: every gateway flow crosses the
link.

The track is described with the lab's topology data (two ``Endpoint``s and a
default ``Route``) and built by the same netlink steps as a lab's links
(``firewall.namespaces``, on pyroute2), in the router's namespace (the
current one, or ``router_netns`` for a lab) and in the gateway namespace.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network, IPv6Network

from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from firewall import namespaces
from firewall.config.model import Config, GatewayLink
from firewall.errors import KernelError
from firewall.lab.topology import Endpoint, Route

# How long the gateway namespace's processes get to die after SIGKILL.
KILL_TIMEOUT = 3.0
# gateway_link.tcp_timestamps: the value of the sysctl in the gateway namespace.
# 2 is timestamps from one clock (no random offset); 1 the kernel's default, an
# offset per address pair. A leg B's address pair (G, F) changes with each F of
# the pool, so with 1 its timestamps jump at random between connections, and a
# server's TIME-WAIT for the client's port refuses about half of those from a
# reused port (docs/datapath.md, "The server's own TIME-WAIT").
TCP_TIMESTAMPS_SYSCTL = "net.ipv4.tcp_timestamps"
TCP_TIMESTAMPS = {"monotonic": "2", "random": "1"}
# The hosts of the track's two ends in the topology data; their namespaces are
# ``router_netns`` and ``link.netns``.
ROUTER, GATEWAY = "router", "gateway"


def endpoints(link: GatewayLink) -> tuple[Endpoint, Endpoint]:
    """The router's end and the gateway's end of the track, as topology data."""
    return (
        Endpoint(ROUTER, link.router_if, (link.router_address, link.router_address6)),
        Endpoint(GATEWAY, link.gateway_if, (link.gateway_address, link.gateway_address6)),
    )


def default_route(link: GatewayLink) -> Route:
    """The gateway namespace's only route: everything back through the router."""
    return Route(GATEWAY, IPv4Network("0.0.0.0/0"), via=link.router_address.ip)


def default_route6(link: GatewayLink) -> Route:
    """The same for IPv6 (the blind track's ULA, issue 17)."""
    return Route(GATEWAY, IPv6Network("::/0"), via=link.router_address6.ip)


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Report a kernel refusal as a KernelError that names the step."""
    try:
        yield
    except NetlinkError as err:
        raise KernelError(f"gateway link: {what}: {err.args[1] if len(err.args) > 1 else err}") from None
    except OSError as err:
        where = f" ({os.fsdecode(err.filename)})" if err.filename else ""
        raise KernelError(f"gateway link: {what}: {err.strerror or err}{where}") from None


def _sysctl(netns: str | None, key: str, value: str | None = None) -> str:
    """Read ``key``, or write ``value`` to it, in a namespace (None: the current one)."""
    with _step(f"sysctl {key}"):
        return namespaces.sysctl(netns, key, value)


def ipv6_forwarding_warning(config: Config, router_netns: str | None = None) -> str | None:
    """What to tell the operator when gateways take IPv6 but the router does not forward it.

    Not a refusal, as for IPv4: Debian's default is IPv6 forwarding off, and an
    IPv4-only site must still start. Its IPv6 to those gateways is dropped (the
    kernel's routing drops the rewritten packet; nothing skips the gateway), so
    the warning names the gateways whose IPv6 goes nowhere. A kernel without
    IPv6 (no such sysctl) has no IPv6 to warn about."""
    takes = [g.name for g in config.gateways if any(g.takes_ipv6(t) for t in g.traffic)]
    if not takes:
        return None
    try:
        if namespaces.sysctl(router_netns, "net.ipv6.conf.all.forwarding") == "1":
            return None
    except FileNotFoundError:
        return None
    return (f"net.ipv6.conf.all.forwarding is 0: the IPv6 flows of {', '.join(takes)} are dropped; "
            "set it to 1 to relay them (docs/datapath.md)")


def exists(link: GatewayLink, router_netns: str | None = None) -> bool:
    try:
        with namespaces.netlink(router_netns) as ipr:
            return namespaces.has_link(ipr, link.router_if)
    except FileNotFoundError:
        return False  # no router namespace, so no link in it


def create(link: GatewayLink, router_netns: str | None = None) -> None:
    """Create the namespace and the link, replacing what is left of an earlier one.

    A link of the router end's name (of any kind) and a namespace of the
    gateway's name are ours by the config: both go first, and whatever still
    runs in that namespace is killed. A failure removes what this call built.
    """
    if _sysctl(router_netns, "net.ipv4.ip_forward") != "1":
        # Even a flow that "ends at the router" (a tunnel's service port) is
        # forwarded: the gateway sits in its own namespace behind the link.
        raise KernelError(
            "gateway link: net.ipv4.ip_forward is 0; gateways sit behind the blind track, "
            "so the router must forward IPv4: set it to 1"
        )
    remove(link, router_netns)
    with _step(f"creating namespace {link.netns}"):
        pr_netns.create(link.netns)
    try:
        _build(link, router_netns)
    except BaseException:
        try:
            remove(link, router_netns)
        except KernelError:
            pass  # the build error is the one worth reporting
        raise


def _build(link: GatewayLink, router_netns: str | None) -> None:
    router_end, gateway_end = endpoints(link)
    with _step(f"opening netlink in {router_netns or 'the router namespace'}"):
        router = namespaces.netlink(router_netns)
    with router:
        with _step(f"opening netlink in {link.netns}"):
            gateway = namespaces.netlink(link.netns)
        with gateway:
            with _step(f"veth {link.router_if} <-> {link.netns}:{link.gateway_if}"):
                namespaces.add_veth(router, link.router_if, link.gateway_if, link.netns)
            _sysctl(router_netns, f"net.ipv4.conf.{link.router_if}.forwarding", "1")
            _sysctl(router_netns, f"net.ipv6.conf.{link.router_if}.forwarding", "1")
            with _step(f"address {link.router_address} on {link.router_if}"):
                namespaces.configure(router, router_end)
            _sysctl(link.netns, TCP_TIMESTAMPS_SYSCTL, TCP_TIMESTAMPS[link.tcp_timestamps])
            with _step(f"lo in {link.netns}"):
                namespaces.set_up(gateway, "lo")
            with _step(f"address {link.gateway_address} on {link.netns}:{link.gateway_if}"):
                namespaces.configure(gateway, gateway_end)
            with _step(f"default route via {link.router_address.ip} in {link.netns}"):
                namespaces.add_route(gateway, default_route(link))
            with _step(f"default IPv6 route via {link.router_address6.ip} in {link.netns}"):
                namespaces.add_route(gateway, default_route6(link))


def check_host(link: GatewayLink, router_netns: str | None = None) -> None:
    """``mode = "host"``: the interface towards the AG host is the operator's; it must be here,
    hold ``router_address``, and the router must forward IPv4. Nothing is created or changed."""
    if _sysctl(router_netns, "net.ipv4.ip_forward") != "1":
        raise KernelError("gateway link: net.ipv4.ip_forward is 0; the gateways' flows are forwarded to "
                          "the AG host, so the router must forward IPv4: set it to 1")
    with _step(f"opening netlink in {router_netns or 'the router namespace'}"):
        router = namespaces.netlink(router_netns)
    with router:
        if not namespaces.has_link(router, link.router_if):
            raise KernelError(f"gateway link: no interface {link.router_if} towards the AG host "
                              "(gateway_link.router_if, mode = \"host\")")
    if link.router_address.ip not in namespaces.local_addresses(router_netns):
        raise KernelError(f"gateway link: this router does not hold {link.router_address.ip}, its address towards "
                          f"the AG host (gateway_link.router_address, or ha.nodes.NODE.addresses.gateway_link)")


def host_timestamps_warning(link: GatewayLink) -> str | None:
    """On the AG host (``mode = "host"``): what to tell the operator when the host's own
    ``net.ipv4.tcp_timestamps`` is not what ``tcp_timestamps`` asks. The host's sysctl is
    the operator's (it is the whole host's), so nfgate says so and changes nothing."""
    want = TCP_TIMESTAMPS[link.tcp_timestamps]
    try:
        have = namespaces.sysctl(None, TCP_TIMESTAMPS_SYSCTL)
    except OSError:
        return None
    if have == want:
        return None
    return (f"{TCP_TIMESTAMPS_SYSCTL} is {have} on this host, gateway_link.tcp_timestamps = "
            f"\"{link.tcp_timestamps}\" asks {want}: set it (sysctl -w {TCP_TIMESTAMPS_SYSCTL}={want}, and in "
            "/etc/sysctl.d) or change the key (docs/datapath.md, \"The server's own TIME-WAIT\")")


def remove(link: GatewayLink, router_netns: str | None = None) -> None:
    """Remove the link and the namespace, killing what still runs inside. Idempotent."""
    try:
        with namespaces.netlink(router_netns) as ipr:
            namespaces.delete_link(ipr, link.router_if)
    except FileNotFoundError:
        pass  # no router namespace (a lab already down): no link either
    except NetlinkError as err:
        if err.code != errno.ENODEV:  # gone meanwhile
            raise KernelError(f"gateway link: deleting {link.router_if}: {err.args[1]}") from None
    # The gateways get no TERM here: the supervisor has stopped its own, and
    # anything left is a leftover that must not keep the old namespace alive.
    namespaces.stop_inside([link.netns], (signal.SIGKILL,), KILL_TIMEOUT)
    with _step(f"removing namespace {link.netns}"):
        namespaces.remove_namespace(link.netns)
