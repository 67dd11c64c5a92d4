"""The blind track: created in a lab router's namespace, usable, removed cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from firewall import gwlink, namespaces
from firewall.config.model import GatewayLink
from firewall.errors import KernelError
from tests.firewall.test_lab import read_line

pytestmark = pytest.mark.netns


def link_for(lab) -> GatewayLink:
    return GatewayLink(netns=f"{lab.prefix}-gw")


@contextmanager
def deaf_to_sigterm(netns: str) -> Iterator[subprocess.Popen]:
    """A process inside ``netns`` that ignores SIGTERM, started behind gwlink's back."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc) == "ready"
        assert namespaces.namespace_pids([netns])[netns] == [proc.pid]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def link_kind(netns: str, ifname: str) -> str:
    with namespaces.netlink(netns) as ipr:
        (found,) = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])
    return found.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND")


def test_create_use_remove(lab_factory) -> None:
    lab = lab_factory("basic")
    router = lab.ns("router")
    link = link_for(lab)
    gwlink.create(link, router)
    assert gwlink.exists(link, router)
    # The gateway end reaches the router, and routes everything through it.
    ping = subprocess.run(["ip", "netns", "exec", link.netns, "ping", "-c1", "-W2", "172.31.255.1"], capture_output=True)
    assert ping.returncode == 0
    route = subprocess.run(["ip", "-n", link.netns, "route", "show", "default"], capture_output=True, text=True).stdout
    assert "via 172.31.255.1" in route
    # A namespace that `ip netns` lists and enters, like one made by `ip netns add`.
    assert link.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link_kind(router, link.router_if) == "veth"
    # Creating again replaces the link instead of failing.
    gwlink.create(link, router)
    gwlink.remove(link, router)
    assert not gwlink.exists(link, router)
    assert not Path("/run/netns", link.netns).exists()
    gwlink.remove(link, router)  # idempotent


def test_a_router_that_does_not_forward_is_refused(lab_factory) -> None:
    lab = lab_factory("basic")
    lab.run("router", ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    link = link_for(lab)
    with pytest.raises(KernelError, match="net.ipv4.ip_forward is 0"):
        gwlink.create(link, lab.ns("router"))
    assert not gwlink.exists(link, lab.ns("router"))


def test_blind_track_forwards(lab_factory) -> None:
    lab = lab_factory("basic")
    link = link_for(lab)
    gwlink.create(link, lab.ns("router"))
    try:
        assert lab.run("router", ["sysctl", "-n", "net.ipv4.conf.nfg-gw0.forwarding"]).stdout.strip() == "1"
    finally:
        gwlink.remove(link, lab.ns("router"))


def test_create_replaces_a_stale_namespace_and_kills_what_runs_in_it(lab_factory) -> None:
    # Left by a supervisor that died: the namespace, with a gateway still in it.
    lab = lab_factory("basic")
    link = link_for(lab)
    pr_netns.create(link.netns)
    with deaf_to_sigterm(link.netns) as leftover:
        gwlink.create(link, lab.ns("router"))
        assert leftover.wait(timeout=5) == -signal.SIGKILL
    assert namespaces.namespace_pids([link.netns])[link.netns] == []
    assert lab.ping("router", link.gateway_address.ip)


def test_create_replaces_another_kind_of_link_with_the_router_end_name(lab_factory) -> None:
    lab = lab_factory("basic")
    link = link_for(lab)
    lab.run("router", ["ip", "link", "add", link.router_if, "type", "bridge"])
    gwlink.create(link, lab.ns("router"))
    assert link_kind(lab.ns("router"), link.router_if) == "veth"
    assert lab.ping("router", link.gateway_address.ip)


def test_remove_kills_a_process_deaf_to_sigterm(lab_factory) -> None:
    lab = lab_factory("basic")
    link = link_for(lab)
    gwlink.create(link, lab.ns("router"))
    with deaf_to_sigterm(link.netns) as stubborn:
        gwlink.remove(link, lab.ns("router"))
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert not gwlink.exists(link, lab.ns("router"))
    assert link.netns not in pr_netns.listnetns()


def test_a_failed_create_names_the_step_and_leaves_nothing(lab_factory, monkeypatch) -> None:
    lab = lab_factory("basic")
    link = link_for(lab)

    def refused(ipr, route) -> None:
        raise NetlinkError(17, "File exists")

    monkeypatch.setattr(namespaces, "add_route", refused)
    with pytest.raises(KernelError, match=r"^gateway link: default route via 172\.31\.255\.1 in .*-gw: File exists$"):
        gwlink.create(link, lab.ns("router"))
    assert not gwlink.exists(link, lab.ns("router"))
    assert link.netns not in pr_netns.listnetns()


def test_an_unknown_router_namespace_is_named() -> None:
    link = GatewayLink(netns="nfgt-absent-gw")
    with pytest.raises(KernelError, match="sysctl net.ipv4.ip_forward: No such file or directory .*/nfgt-absent-router"):
        gwlink.create(link, "nfgt-absent-router")
    assert not gwlink.exists(link, "nfgt-absent-router")
    gwlink.remove(link, "nfgt-absent-router")  # nothing to remove, no error


def test_gateways_that_take_ipv6_on_a_router_that_does_not_forward_it_are_named(lab_factory) -> None:
    """Not refused like IPv4 (Debian's default is IPv6 forwarding off, and an IPv4-only site
    must start), but said at start: that IPv6 is dropped, not relayed."""
    from firewall.config import loads
    relay = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[[gateway]]
name = "relay"
kind = "tcp-relay"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 9000
"""
    lab = lab_factory("basic")
    router = lab.ns("router")
    lab.run("router", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"])
    warning = gwlink.ipv6_forwarding_warning(loads(relay), router)
    assert warning is not None and "forwarding is 0" in warning and "relay" in warning
    # A selector with IPv4 addresses takes no IPv6: nothing to say.
    assert gwlink.ipv6_forwarding_warning(loads(relay + 'saddr = ["192.0.2.0/24"]\n'), router) is None
    lab.run("router", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    assert gwlink.ipv6_forwarding_warning(loads(relay), router) is None
