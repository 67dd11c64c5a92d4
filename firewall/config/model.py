"""The validated config as frozen dataclasses.

Everything downstream (rule builder, processor, gateways) reads these, never
the raw TOML. Addresses are ``ipaddress`` values, ports are ``PortRange``s,
and every entry that ends up in a rule keeps ``source``: the key path it came
from, which the renderers put in the rule's comment for ops review.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from firewall.config.reader import IPAddress, IPNetwork

ROUTER = "router"  # the pseudo-zone for the firewall itself (input/output)
GATEWAY_KINDS = ("smtp", "ftp", "rtp", "tcp-relay", "udp-relay", "tunnel")
PROTOS = ("tcp", "udp", "icmp", "icmpv6", "any")


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __len__(self) -> int:
        return self.last - self.first + 1

    def overlaps(self, other: "PortRange") -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Zone:
    name: str
    interfaces: tuple[str, ...]
    networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Policy:
    input: str = "drop"
    forward: str = "drop"
    output: str = "accept"
    established_related: bool = True
    drop_invalid: bool = True
    icmp_essential: bool = True
    ping_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class FilterRule:
    source: str
    name: str
    from_zone: str
    to_zone: str
    proto: str = "any"
    ports: tuple[PortRange, ...] = ()
    saddr: tuple[IPNetwork, ...] = ()
    daddr: tuple[IPNetwork, ...] = ()
    action: str = "accept"


@dataclass(frozen=True)
class PortForward:
    source: str
    name: str
    from_zone: str
    proto: str
    ports: PortRange
    to_addr: ipaddress.IPv4Address
    to_port: int | None = None  # None: keep the port (required for a range)
    saddr: tuple[IPNetwork, ...] = ()

    @property
    def target_ports(self) -> PortRange:
        if self.to_port is None:
            return self.ports
        return PortRange(self.to_port, self.to_port)


@dataclass(frozen=True)
class Nat:
    masquerade: tuple[str, ...] = ()
    forwards: tuple[PortForward, ...] = ()


@dataclass(frozen=True)
class Marks:
    mask: int = 0x00FF0000
    rewritten: int = 0x00010000
    passed: int = 0x00020000
    allowed: int = 0x00040000
    expect: int = 0x00F80000

    def expect_value(self, instance: int) -> int:
        """The ``expect`` bits that send a packet to processor instance ``instance``:
        ``instance + 1`` spread over the field's bits, lowest first."""
        n, out, bit = instance + 1, 0, 1
        while n:
            while not self.expect & bit:
                bit <<= 1
            if n & 1:
                out |= bit
            n >>= 1
            bit <<= 1
        return out


@dataclass(frozen=True)
class Timeouts:
    confirm: float = 5.0
    nat_element: float = 10.0
    reap: float = 1.0


@dataclass(frozen=True)
class Pools:
    firewall_side: ipaddress.IPv4Network = ipaddress.IPv4Network("172.31.254.0/28")
    ports: PortRange = PortRange(1024, 65535)
    snat_ports: PortRange = PortRange(61000, 65535)


@dataclass(frozen=True)
class Processor:
    queues: tuple[int, ...] = (0,)
    fail_mode: str = "closed"
    queue_maxlen: int = 16384
    queue_buffer: int = 32 * 1024 * 1024
    queue_batch: int = 512
    route_cache: float = 2.0
    max_rules: int = 1024
    max_rules_per_flow: int = 8
    adjacent_ttl: float = 30.0
    conntrack_accounting: bool = True
    marks: Marks = field(default_factory=Marks)
    timeouts: Timeouts = field(default_factory=Timeouts)
    pools: Pools = field(default_factory=Pools)


@dataclass(frozen=True)
class GatewayLink:
    netns: str = "nfgate-gw"
    router_if: str = "nfg-gw0"
    gateway_if: str = "nfg-gw1"
    router_address: ipaddress.IPv4Interface = ipaddress.IPv4Interface("172.31.255.1/30")
    gateway_address: ipaddress.IPv4Interface = ipaddress.IPv4Interface("172.31.255.2/30")
    port_base: int = 20000


@dataclass(frozen=True)
class Signalling:
    port: int = 7500
    key_file: Path = Path("/etc/nfgate/signalling.key")
    copies: int = 3
    query_timeout: float = 0.5
    replay_window: float = 5.0
    socket_buffer: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class Supervisor:
    control_socket: Path = Path("/run/nfgate/control.sock")
    restart_initial: float = 0.2
    restart_max: float = 30.0
    stable_after: float = 60.0
    stop_timeout: float = 5.0


@dataclass(frozen=True)
class Traffic:
    """Which traffic a gateway takes: the seed's fig. 6a step 602 selector."""

    source: str
    from_zone: str
    to_zone: str
    proto: str
    ports: tuple[PortRange, ...]
    saddr: tuple[IPNetwork, ...] = ()
    daddr: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Gateway:
    source: str
    name: str
    kind: str
    listen_port: int
    traffic: tuple[Traffic, ...]
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    path: Path | None
    zones: Mapping[str, Zone]
    policy: Policy
    rules: tuple[FilterRule, ...]
    nat: Nat
    processor: Processor
    gateway_link: GatewayLink
    signalling: Signalling
    gateways: tuple[Gateway, ...]
    supervisor: Supervisor = field(default_factory=Supervisor)

    def zone_of(self, ifname: str) -> str | None:
        for zone in self.zones.values():
            if ifname in zone.interfaces:
                return zone.name
        return None

    @property
    def has_gateways(self) -> bool:
        return bool(self.gateways)

    def processor_signalling_port(self, instance: int) -> int:
        """Processor instance i listens on router_address:(signalling.port + i)."""
        return self.signalling.port + instance

    def gateway_signalling_port(self, name: str) -> int:
        """Gateway k (its index here) listens on gateway_address:(signalling.port + k):
        each gateway is its own process, and a UDP port delivers to one socket."""
        for index, gateway in enumerate(self.gateways):
            if gateway.name == name:
                return self.signalling.port + index
        raise KeyError(name)


def addresses_family(nets: tuple[IPNetwork | IPAddress, ...]) -> set[int]:
    return {n.version for n in nets}
