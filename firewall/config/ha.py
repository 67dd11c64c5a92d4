"""``[ha]``: a router pair on keepalived (VRRP) and conntrackd (docs/ha.md).

One config describes both nodes, so that ``nfgate ha render`` writes both
nodes' keepalived.conf, conntrackd.conf and notify script from it, and each
node's file names the other as its peer::

    [ha]
    sync_interface = "sync0"
    advert_interval = 1.0
    preempt_delay = 15.0

    [ha.nodes.r1]
    priority = 150
    sync_address = "172.31.252.1"
    addresses = { lan = "192.168.1.2", wan = "203.0.113.2" }

    [ha.nodes.r2]
    priority = 100
    sync_address = "172.31.252.2"
    addresses = { lan = "192.168.1.3", wan = "203.0.113.3" }

    [ha.virtual.lan]
    address = "192.168.1.1/24"
    vrid = 51

A key of ``virtual`` and of each node's ``addresses`` is a zone (its first
interface carries the virtual address) or ``gateway_link`` (its
``router_if``: the segment of the gateways' host).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, model_validator

from firewall.fields import AbsPath, Address, Bool, Frozen, IfName, Int, IPv4Iface, Number, fail, report

GATEWAY_LINK = "gateway_link"
NODE_NAME = r"[a-z][a-z0-9]{0,14}"


def _v4(value: Any) -> Any:
    if not isinstance(value, ipaddress.IPv4Address):
        fail(f"{value} is not an IPv4 address (the pair's VRRP and sync run on IPv4)")
    return value


class HaNode(Frozen):
    priority: Int(1, 254) = Field(description="VRRP priority: the higher one is the master when both are up")
    sync_address: Address = Field(description="this node's IPv4 address on the sync interface")
    addresses: dict[str, Address] = Field(
        description="this node's own IPv4 address per zone of ha.virtual (VRRP's unicast source and peer)")

    @model_validator(mode="after")
    def _ipv4(self) -> "HaNode":
        _v4(self.sync_address)
        for addr in self.addresses.values():
            _v4(addr)
        return self


class HaVirtual(Frozen):
    address: IPv4Iface = Field(description="the virtual address with its prefix length, e.g. \"192.168.1.1/24\"")
    vrid: Int(1, 255) = Field(description="the VRRP virtual router id, unique on the segment")


class Ha(Frozen):
    sync_interface: IfName = Field(description="the dedicated link to the peer, for conntrackd")
    sync_port: Int(1, 65535) = Field(3780, description="conntrackd's UDP port on the sync link")
    advert_interval: Number(0.01, 40) = Field(1.0, description="seconds between VRRP adverts; the backup takes "
                                              "over after about 3 missed ones")
    preempt_delay: Number(0, 1000) = Field(15.0, description="seconds a recovered master waits, as backup, "
                                           "before it takes the addresses back (time for conntrackd to resync)")
    nodes: dict[str, HaNode] = Field(description="[ha.nodes.NAME]: the two routers")
    virtual: dict[str, HaVirtual] = Field(description="[ha.virtual.ZONE]: a virtual address per zone")
    config_dir: AbsPath = Field(Path("/etc/nfgate/ha"), description="where nfgate ha render writes, one folder per node")
    run_dir: AbsPath = Field(Path("/run/nfgate/ha"), description="conntrackd's socket, lock and log, the notify "
                             "script's state file; each named by node")
    socket_buffer: Int(1 << 16, 1 << 30) = Field(1249280, description="bytes of conntrackd's sync socket buffers")
    hash_limit: Int(1024, 1 << 24) = Field(262144, description="conntrack entries conntrackd's caches hold")
    udp_refresh: Number(0, 3600) = Field(10.0, description="seconds between the master's refreshes of its UDP "
                                         "connections' copies on the backup (docs/ha.md, \"UDP refresh\"); 0: none")
    udp_refresh_all: Bool = Field(False, description="refresh every UDP connection's copy, not only nfgate's")

    @model_validator(mode="after")
    def _pair(self, info: ValidationInfo) -> "Ha":
        if 0 < self.udp_refresh < 1:
            report(info, "ha.udp_refresh", f"{self.udp_refresh} s is below 1 s: each refresh lists every UDP "
                   "connection of nfgate's (0 turns it off)")
        if len(self.nodes) != 2:
            report(info, "ha.nodes", f"an HA pair has two nodes, not {len(self.nodes)}")
        for name, node in self.nodes.items():
            if not re.fullmatch(NODE_NAME, name):
                report(info, f"ha.nodes.{name}", "node names are 1-15 lowercase letters and digits, starting with a letter")
            for zone in node.addresses:
                if zone not in self.virtual:
                    report(info, f"ha.nodes.{name}.addresses.{zone}", f"{zone!r} has no [ha.virtual.{zone}]")
            for zone in self.virtual:
                if zone not in node.addresses:
                    report(info, f"ha.nodes.{name}.addresses", f"no address in {zone!r} (ha.virtual.{zone})")
                elif node.addresses[zone] not in self.virtual[zone].address.network:
                    report(info, f"ha.nodes.{name}.addresses.{zone}",
                           f"{node.addresses[zone]} is not in {self.virtual[zone].address.network}")
        prios = [n.priority for n in self.nodes.values()]
        if len(prios) == 2 and prios[0] == prios[1]:
            report(info, "ha.nodes", "the two nodes need different priorities (the higher one is the master)")
        vrids: dict[int, str] = {}
        for zone, v in self.virtual.items():
            if v.vrid in vrids:
                report(info, f"ha.virtual.{zone}.vrid", f"{v.vrid} is already ha.virtual.{vrids[v.vrid]}'s")
            vrids[v.vrid] = zone
        return self

    def peer_of(self, node: str) -> str:
        (peer,) = [n for n in self.nodes if n != node]
        return peer


def check_ha(info: ValidationInfo, ha: Ha | None, zones: dict[str, Any], router_if: str) -> None:
    """Across tables: each virtual key is a zone or gateway_link, and the sync interface is in no zone."""
    if ha is None:
        return
    for key in ha.virtual:
        if key != GATEWAY_LINK and key not in zones:
            report(info, f"ha.virtual.{key}", f"{key!r} is neither a zone ({', '.join(sorted(zones))}) nor {GATEWAY_LINK}")
    for zone in zones.values():
        if ha.sync_interface in zone.interfaces:
            report(info, "ha.sync_interface", f"{ha.sync_interface!r} is in zone {zone.name!r}: the sync link is in no zone")
    if ha.sync_interface == router_if:
        report(info, "ha.sync_interface", f"{ha.sync_interface!r} is gateway_link.router_if")


def node_index(ha: Ha, node: str) -> int:
    """A node's place in the pair, by name (both nodes agree whatever order their files list them)."""
    return sorted(ha.nodes).index(node)


def node_pool(pool: ipaddress.IPv4Network, ha: Ha, node: str) -> ipaddress.IPv4Network:
    """The half of the firewall-side pool node ``node`` allocates F from: the two nodes'
    bindings never collide, and F alone names the node that made a flow (docs/ha.md)."""
    return list(pool.subnets(prefixlen_diff=1))[node_index(ha, node)]


def node_link_address(ha: Ha, node: str) -> ipaddress.IPv4Interface | None:
    """The node's own address on the gateway link, with the prefix of the pair's address there."""
    virtual, own = ha.virtual.get(GATEWAY_LINK), ha.nodes[node].addresses.get(GATEWAY_LINK)
    if virtual is None or own is None:
        return None
    return ipaddress.IPv4Interface(f"{own}/{virtual.address.network.prefixlen}")
