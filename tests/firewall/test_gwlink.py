"""The blind track: created in a lab router's namespace, usable, removed cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from firewall import gwlink
from firewall.config.model import GatewayLink
from firewall.errors import KernelError

pytestmark = pytest.mark.netns


def link_for(lab) -> GatewayLink:
    return GatewayLink(netns=f"{lab.prefix}-gw")


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
