"""The config as frozen pydantic models: what the TOML may say, and what it means.

Everything downstream (rule builder, processor, gateways) reads these, never
the raw TOML. The models validate the TOML too: each field's type
(``firewall.fields``) checks its value, defaults are written once, here,
and ``Field(description=...)`` is each key's one-line meaning in the JSON
Schema (``nfgate config schema``). The TOML's names stay the TOML's: ``from``
and ``to`` are ``from_zone`` and ``to_zone`` by alias, ``[[rule]]`` is
``rules``, ``[[gateway]]`` is ``gateways``.

Addresses are ``ipaddress`` values, ports are ``PortRange``s, and every
entry that ends up in a rule keeps ``source``: the key path it came from,
which the renderers put in the rule's comment for ops review. The loader
(``firewall.config``) sets ``source`` and each zone's ``name``; neither is
a TOML key.

Checks across the fields of one table run in its ``model_validator``;
those across tables in ``Config``'s. They ``report`` into the validation
context, so one run says every problem; a zone reference is checked against
the context's ``zones``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, ValidationInfo, create_model, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from firewall.config.ha import GATEWAY_LINK, Ha, check_ha, node_index, node_link_address, node_pool
from firewall.signalling.guard import DEFAULT_REPLAY_WINDOW
from gateways.kinds import KINDS
from firewall.fields import (
    NAME, ROUTER, AbsPath, Bitmask, Bool, Choice, Frozen, IfName, Int, IPNetwork, IPv4Iface, IPv6Iface, ListOf, Name,
    Network, Number, PortRange, Ports, Removed, SinglePortRange, String, Tables, bitmask, fail, ordered, report, typed, unique,
)

PROTOS = ("tcp", "udp", "icmp", "icmpv6", "any")
ZONE_NAME = r"[a-z][a-z0-9]{0,7}"  # short: iptables chain names are NFGATE-FWD-<zone>-<zone>, max 28
NETNS = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}"
MAX_QUEUES = 64
MAX_WORKERS = 64  # worker processes of one gateway: each holds a port and a process
MAX_POOL_ADDRESSES = 65536  # firewall.pools indexes addresses in 16 bits


def ZoneRef(allow_router: bool) -> Any:
    """A zone's name, checked against the zones the context names."""

    def check(value: Any, info: ValidationInfo) -> str:
        if value == ROUTER and allow_router:
            return value
        zones = (info.context or {}).get("zones")
        if not isinstance(value, str) or (zones is not None and value not in zones):
            known = ", ".join(sorted(zones or ())) + (", router" if allow_router else "")
            fail(f"zone {value!r} does not exist (known: {known})")
        return value

    return typed(check, {"type": "string"}, str)


def _zone_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(ZONE_NAME, value) or value == ROUTER:
        fail(f"zone name {value!r} must be 1-8 lowercase letters/digits, not 'router'")
    return value


ZoneName = typed(_zone_name, {"type": "string", "pattern": f"^{ZONE_NAME}$"}, str)
Zones = ZoneRef(False)
ZonesOrRouter = ZoneRef(True)
Verdict = Choice("accept", "drop")
Proto = Choice(*PROTOS)
TcpUdp = Choice("tcp", "udp")
Action = Choice("accept", "drop", "reject")
FailMode = Choice("open", "closed")
LinkMode = Choice("namespace", "host")
TcpTimestamps = Choice("monotonic", "random")
Netns = String(NETNS, "a namespace name")
ForwardName = String(NAME, "a name")
Addresses = ListOf(Network, allow_scalar=True)
Source = SkipJsonSchema[str]
GONE_TIMEOUT = Removed("no longer a setting: the kernel carries gateway flows, and conntrack's own timeouts end them (docs/datapath.md)")


def _target(value: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    """Where a port forward sends its connections: "192.168.1.10", "192.168.1.10:80",
    "fd00:1::10" or "[fd00:1::10]:80" (RFC 3986 section 3.2.2's brackets: an IPv6
    address with a port). The address's version is the forward's: NAT44 or NAT66."""
    if not isinstance(value, str):
        fail(f"expected 'address' or 'address:port', got {value!r}")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            fail(f"{value!r}: an IPv6 address in brackets needs its closing ']', as in '[fd00:1::10]:80'")
        if rest and not rest.startswith(":"):
            fail(f"{value!r}: after ']' comes ':port' or nothing, as in '[fd00:1::10]:80'")
        port, sep = rest[1:], bool(rest)
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            fail(f"{host!r} in {value!r} is not an IPv6 address (brackets are for IPv6 with a port)")
    elif value.count(":") > 1:
        try:
            return ipaddress.IPv6Address(value), None
        except ValueError:
            fail(f"{value!r} is not an IPv6 address; with a port, write it as '[fd00:1::10]:80'")
    else:
        host, colon, port = value.partition(":")
        sep = bool(colon)
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            fail(f"{host!r} is not an IPv4 address (an IPv6 one with a port is written '[fd00:1::10]:80')")
    if not sep:
        return addr, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        fail(f"{port!r} is not a port (1 to 65535)")
    return addr, int(port)


Target = typed(_target, {"type": "string", "description": "address or address:port"}, tuple)


class Zone(Frozen):
    name: Source = ""
    interfaces: Annotated[ListOf(IfName), AfterValidator(lambda v: v or fail("a zone needs at least one interface"))] = (
        Field(description="the interfaces in the zone"))
    networks: ListOf(Network) = Field((), description="addresses or prefixes of the zone (documentation and checks)")


class Policy(Frozen):
    input: Verdict = Field("drop", description="traffic to the router")
    forward: Verdict = Field("drop", description="traffic through the router")
    output: Verdict = Field("accept", description="traffic from the router")
    established_related: Bool = Field(True, description="accept packets of connections already accepted")
    drop_invalid: Bool = Field(True, description="drop packets conntrack calls invalid")
    icmp_essential: Bool = Field(True, description="accept the ICMP errors path MTU discovery and others need")
    ping_from: ListOf(Zones) = Field((), description="zones that may ping the router")
    fast_path: Bool = Field(False, description="carry established gateway-free TCP and UDP flows through an nftables "
                            "flowtable: their later packets skip the forward chain")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Policy":
        if self.fast_path and not self.established_related:
            # An offloaded flow's packets skip the filter, so they would pass unjudged: the
            # promise established_related = false makes (every packet judged by the rules) breaks.
            report(info, "policy.fast_path", "needs established_related = true: an offloaded flow's packets "
                   "skip the forward chain, where established_related = false judges every packet")
        return self


def _check_proto_fields(info: ValidationInfo, where: str, proto: str, ports: tuple, nets: tuple) -> None:
    if proto not in ("tcp", "udp") and ports:
        report(info, f"{where}.ports", f"ports need proto 'tcp' or 'udp', not {proto!r}")
    if proto == "icmp" and any(n.version == 6 for n in nets):
        report(info, where, "proto 'icmp' is IPv4; use 'icmpv6' for IPv6 addresses")
    if proto == "icmpv6" and any(n.version == 4 for n in nets):
        report(info, where, "proto 'icmpv6' is IPv6; use 'icmp' for IPv4 addresses")


class FilterRule(Frozen):
    source: Source = ""
    name: Name = Field("", description="a name for the rule's comment")
    from_zone: ZonesOrRouter = Field(alias="from", description="the zone the traffic comes from, or router")
    to_zone: ZonesOrRouter = Field(alias="to", description="the zone the traffic goes to, or router")
    proto: Proto = Field("any", description="the protocol")
    ports: Ports = Field((), description="destination ports: 25, \"1000-2000\", or an array of those (tcp, udp)")
    saddr: Addresses = Field((), description="source addresses or prefixes")
    daddr: Addresses = Field((), description="destination addresses or prefixes")
    action: Action = Field("accept", description="what to do with matching traffic")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "FilterRule":
        if self.from_zone == ROUTER and self.to_zone == ROUTER:
            report(info, self.source, "'from' and 'to' cannot both be 'router'")
        _check_proto_fields(info, self.source, self.proto, self.ports, self.saddr + self.daddr)
        if self.saddr and self.daddr and {n.version for n in self.saddr}.isdisjoint({n.version for n in self.daddr}):
            report(info, self.source, "saddr and daddr are of different IP versions: the rule could never match")
        return self


class PortForward(Frozen):
    source: Source = ""
    name: ForwardName = Field("", description="a name for the rule's comment")
    from_zone: Zones = Field(alias="from", description="the zone the connections come from")
    proto: TcpUdp = Field(description="the protocol")
    ports: SinglePortRange = Field(alias="port", description="the router's port, or a range \"first-last\"")
    to: Target = Field(description="\"address\", \"address:port\" or \"[IPv6 address]:port\"; its IP version is the "
                       "forward's; a range keeps its ports")
    saddr: Addresses = Field((), description="source addresses or prefixes allowed (of the forward's IP version)")

    @property
    def to_addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.to[0]

    @property
    def version(self) -> int:
        """4: NAT44; 6: NAT66, which no gateway stands in front of."""
        return self.to[0].version

    @property
    def to_port(self) -> int | None:
        """None: keep the port (required for a range)."""
        return self.to[1]

    @property
    def target_ports(self) -> PortRange:
        if self.to_port is None:
            return self.ports
        return PortRange(self.to_port, self.to_port)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "PortForward":
        if self.to_port is not None and len(self.ports) > 1:
            report(info, f"{self.source}.to", "a port range forwards to the same ports: leave the port out of 'to'")
        if any(n.version != self.version for n in self.saddr):
            report(info, f"{self.source}.saddr", f"the forward is IPv{self.version} ('to' is {self.to_addr}): "
                   f"give IPv{self.version} sources, and a second [[nat.forward]] for the other version")
        return self


def _place(items: Any, where: str, info: ValidationInfo, nested: str | None) -> Any:
    if not isinstance(items, list):
        return items  # Tables says what is wrong
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if "source" in item:
                report(info, f"{where}[{i}].source", "unknown key")
            item = {**item, "source": f"{where}[{i}]"}
            if nested:
                if nested in item:
                    item[nested] = _place(item[nested], f"{where}[{i}].{nested}", info, None)
        out.append(item)
    return out


def _sources(where: str, nested: str | None = None) -> Any:
    """Give each table of an array its key path as ``source``, and the tables
    of its ``nested`` array theirs."""
    return BeforeValidator(lambda items, info: _place(items, where, info, nested))


Forwards = Annotated[Tables(PortForward, "nat.forward"), _sources("nat.forward")]


def _ipv6_prefix(net: IPNetwork) -> ipaddress.IPv6Network:
    if net.version != 6:
        fail(f"{net} is not an IPv6 prefix: NPTv6 translates IPv6 prefixes")
    return net


Prefix6 = Annotated[Network, AfterValidator(_ipv6_prefix)]


class Npt6(Frozen):
    """One prefix translation (NPTv6) on a zone's border: ``inside`` leaves
    through ``zone`` as ``outside``, and ``outside`` arriving in ``zone`` goes
    to ``inside``; the host bits are kept."""

    source: Source = ""
    name: ForwardName = Field("", description="a name for the rules' comments")
    zone: Zones = Field(description="the zone the outside prefix faces (usually wan)")
    inside: Prefix6 = Field(description="the prefix the hosts have, e.g. a ULA fd00:1::/64")
    outside: Prefix6 = Field(description="the prefix they have outside, routed to the router, of the same length")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Npt6":
        if self.inside.prefixlen != self.outside.prefixlen:
            report(info, f"{self.source}.outside", f"/{self.outside.prefixlen} differs from inside's "
                   f"/{self.inside.prefixlen}: a prefix translation maps one prefix onto another of its length")
        elif self.inside.overlaps(self.outside):
            report(info, f"{self.source}.outside", f"overlaps inside {self.inside}")
        return self


Npts = Annotated[Tables(Npt6, "nat.npt6"), _sources("nat.npt6")]


class Nat(Frozen):
    masquerade: ListOf(Zones) = Field((), description="zones whose outgoing IPv4 traffic takes the router's address")
    masquerade6: ListOf(Zones) = Field((), description="zones whose outgoing IPv6 traffic takes the router's address (NAT66)")
    forward: Forwards = Field((), description="port forwards ([[nat.forward]]), IPv4 and IPv6")
    npt6: Npts = Field((), description="IPv6 prefix translations ([[nat.npt6]])")

    @property
    def forwards(self) -> tuple[PortForward, ...]:
        """The IPv4 port forwards (NAT44)."""
        return tuple(f for f in self.forward if f.version == 4)

    @property
    def forwards6(self) -> tuple[PortForward, ...]:
        """The IPv6 port forwards (DNAT66): into a gateway only where its selector takes IPv6."""
        return tuple(f for f in self.forward if f.version == 6)


class Marks(Frozen):
    mask: Bitmask = Field(0x00FF0000, description="the conntrack mark bits nfgate owns")
    rewritten: Bitmask = Field(0x00010000, description="the processor rewrote this flow")
    passed: Bitmask = Field(0x00020000, description="the processor passed this flow unchanged")
    allowed: Bitmask = Field(0x00040000, description="a dynamic rule allowed this flow (default: the lowest free bit of mask)")
    expect: Bitmask = Field(0x00F80000, description="which processor instance expects this flow (default: the bits of mask left)")

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

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        """``allowed`` not given: the lowest bit of the mask that nothing else
        takes; ``expect`` not given: every bit left. So a config that sets only
        its mask, rewritten and passed still gets valid ones."""
        if not isinstance(data, dict) or ("allowed" in data and "expect" in data):
            return data
        try:
            given = {k: bitmask(data[k]) if k in data else cls.model_fields[k].default for k in ("mask", "rewritten", "passed")}
            allowed = bitmask(data["allowed"]) if "allowed" in data else None
        except PydanticCustomError:
            return data  # the field says what is wrong
        free = given["mask"] & ~(given["rewritten"] | given["passed"])
        derived = dict(data)
        if allowed is None:
            allowed = derived["allowed"] = free & -free
        if "expect" not in data:
            derived["expect"] = free & ~allowed
        return derived

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Marks":
        marks = self
        seen: dict[str, int] = {}
        for key in ("rewritten", "passed", "allowed", "expect"):
            bits = getattr(marks, key)
            other = next((k for k, b in seen.items() if b & bits), None)
            where = f"processor.marks.{key}"
            if bits & ~marks.mask:
                report(info, where, f"{bits:#010x} has bits outside mask {marks.mask:#010x}")
            elif other is not None:
                report(info, where, f"{bits:#010x} overlaps {other} {seen[other]:#010x}")
            elif not bits:
                report(info, where, f"needs at least one bit of mask {marks.mask:#010x}")
            seen[key] = bits
        return self


class Timeouts(Frozen):
    confirm: Number(1, 600) = Field(5.0, description="seconds a queued first packet waits for the gateway's binding")
    nat_element: Number(1, 600) = Field(10.0, description="seconds a NAT set element lives unconfirmed")
    reap: Number(0.1, 600) = Field(1.0, description="seconds between sweeps of expired bindings")
    tcp_idle: GONE_TIMEOUT = Field(None, repr=False, exclude=True)
    tcp_closing: GONE_TIMEOUT = Field(None, repr=False, exclude=True)
    tcp_handshake: GONE_TIMEOUT = Field(None, repr=False, exclude=True)
    udp_idle: GONE_TIMEOUT = Field(None, repr=False, exclude=True)


def _firewall_side(net: IPNetwork) -> ipaddress.IPv4Network:
    if net.version != 4:
        fail("the firewall-side pool is IPv4")
    if net.num_addresses > MAX_POOL_ADDRESSES:
        fail(f"{net} is larger than /16: at most {MAX_POOL_ADDRESSES} addresses")
    return net


ULA = ipaddress.IPv6Network("fc00::/7")


def _firewall_side6(net: IPNetwork) -> ipaddress.IPv6Network:
    if net.version != 6 or not net.subnet_of(ULA):
        fail("the IPv6 firewall-side pool is a ULA prefix (fc00::/7): it never leaves the router")
    if net.num_addresses > MAX_POOL_ADDRESSES:
        fail(f"{net} has more than {MAX_POOL_ADDRESSES} addresses (a /112 at most)")
    return net


def _ula_iface(iface: ipaddress.IPv6Interface) -> ipaddress.IPv6Interface:
    if not iface.network.subnet_of(ULA):
        fail(f"{iface} is not a ULA address (fc00::/7): the blind track is the router's own")
    return iface


def _above_well_known(rng: PortRange) -> PortRange:
    if rng.first < 1024:
        fail(f"{rng} reaches below 1024: keep the pools off well-known ports")
    return rng


PoolPorts = Annotated[SinglePortRange, AfterValidator(_above_well_known)]


class Pools(Frozen):
    firewall_side: Annotated[Network, AfterValidator(_firewall_side)] = Field(
        ipaddress.IPv4Network("172.31.254.0/28"), description="the addresses the processor translates gateway flows to (IPv4, at most /16)")
    ports: PoolPorts = Field(PortRange(1024, 65535), description="the ports of those addresses")
    snat_ports: PoolPorts = Field(PortRange(61000, 65535), description="the ports the processor's SNAT takes")
    firewall_side6: Annotated[Network, AfterValidator(_firewall_side6)] = Field(
        ipaddress.IPv6Network("fd6e:6667:6174:fe::/124"),
        description="the IPv6 addresses the processor translates IPv6 gateway flows to (a ULA prefix, at most /112)")


def _queues(queues: tuple[int, ...]) -> tuple[int, ...]:
    if not queues:
        fail("give at least one queue number")
    if len(queues) > MAX_QUEUES:
        fail(f"at most {MAX_QUEUES} queues")
    return unique(queues, "queue")


def bucket_count(instances: int) -> int:
    """The power of two >= instances: steering matches the low bits of a value."""
    return 1 << max(0, (instances - 1).bit_length())


class Processor(Frozen):
    queues: Annotated[ListOf(Int(0, 65535), allow_scalar=True), AfterValidator(_queues)] = Field(
        (0,), description="the NFQUEUE numbers, one processor instance each")
    fail_mode: FailMode = Field("closed", description="closed: drop what no processor takes; open: let it pass")
    queue_maxlen: Int(64, 1 << 20) = Field(16384, description="packets a queue holds before the kernel acts on fail_mode")
    queue_buffer: Int(1 << 16, 1 << 30) = Field(32 * 1024 * 1024, description="bytes of the netlink socket buffer")
    queue_batch: Int(1, 65536) = Field(512, description="packets read per wake-up")
    route_cache: Number(0, 3600) = Field(2.0, description="seconds a route lookup is cached")
    max_rules: Int(0, 1 << 20) = Field(1024, description="dynamic rules at once")
    max_rules_per_flow: Int(0, 1024) = Field(8, description="dynamic rules one gateway flow may ask for")
    adjacent_ttl: Number(1, 3600) = Field(30.0, description="seconds an adjacent-connection rule lives unused")
    conntrack_accounting: Bool = Field(True, description="turn on conntrack's byte and packet counters")
    marks: Marks = Field(default_factory=Marks, description="[processor.marks]")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="[processor.timeouts]")
    pools: Pools = Field(default_factory=Pools, description="[processor.pools]")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Processor":
        marks, queues = self.marks, self.queues
        numbered = (1 << bin(marks.expect).count("1")) - 1
        if marks.expect and numbered < len(queues):
            report(info, "processor.marks.expect", f"{marks.expect:#010x} numbers at most {numbered} processor "
                   f"instances, and processor.queues has {len(queues)}: give the mask more bits")
        # Each processor instance owns the pool addresses whose low bits pick it.
        buckets = bucket_count(len(queues))
        if self.pools.firewall_side.num_addresses < buckets:
            report(info, "processor.pools.firewall_side",
                   f"{self.pools.firewall_side} has fewer than {buckets} addresses for {len(queues)} queues")
        if len(self.pools.snat_ports) < buckets:
            report(info, "processor.pools.snat_ports", f"needs at least {buckets} ports")
        return self


class GatewayLink(Frozen):
    mode: LinkMode = Field("namespace", description="namespace: the gateways run in a namespace of this router behind a "
                           "veth (the blind track); host: on their own host (the AG host, seed fig. 8b) reached over "
                           "router_if, an existing interface, and run there by nfgate gateways")
    netns: Netns = Field("nfgate-gw", description="the gateways' network namespace")
    router_if: IfName = Field("nfg-gw0", description="the router's end of the blind track")
    gateway_if: IfName = Field("nfg-gw1", description="the gateways' end of the blind track")
    router_address: IPv4Iface = Field(ipaddress.IPv4Interface("172.31.255.1/30"), description="the router's address on it")
    gateway_address: IPv4Iface = Field(ipaddress.IPv4Interface("172.31.255.2/30"), description="the gateways' address on it")
    router_address6: Annotated[IPv6Iface, AfterValidator(_ula_iface)] = Field(
        ipaddress.IPv6Interface("fd6e:6667:6174:ff::1/64"), description="the router's IPv6 address on it (ULA)")
    gateway_address6: Annotated[IPv6Iface, AfterValidator(_ula_iface)] = Field(
        ipaddress.IPv6Interface("fd6e:6667:6174:ff::2/64"), description="the gateways' IPv6 address on it (ULA)")
    port_base: Int(1024, 65000) = Field(20000, description="each gateway's workers listen on the next ports from port_base, "
                                        "in file order, unless it sets listen_port")
    tcp_timestamps: TcpTimestamps = Field(
        "monotonic", description="the TCP timestamps of the gateways' connections (net.ipv4.tcp_timestamps in their "
        "namespace): monotonic (2): one clock for all, so a server's TIME-WAIT takes a leg B from a client's reused "
        "port as a new connection, as it would the client's own; random (1, the kernel's default): an offset per "
        "address pair, hiding the router's uptime, and about half of those leg Bs wait 10-20 ms for a retry "
        "(docs/datapath.md, \"The server's own TIME-WAIT\")")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "GatewayLink":
        if self.mode == "host":
            return self  # the addresses are checked with [ha] (the node's own address), in Config
        if self.router_address.network != self.gateway_address.network:
            report(info, "gateway_link.gateway_address", "must be in the same subnet as router_address")
        elif self.router_address.ip == self.gateway_address.ip:
            report(info, "gateway_link.gateway_address", "must differ from router_address")
        if self.router_address6.network != self.gateway_address6.network:
            report(info, "gateway_link.gateway_address6", "must be in the same subnet as router_address6")
        elif self.router_address6.ip == self.gateway_address6.ip:
            report(info, "gateway_link.gateway_address6", "must differ from router_address6")
        return self


class Signalling(Frozen):
    port: Int(1, 65535) = Field(7500, description="processor instance i listens on port + i, the gateways' worker processes on port, port + 1, ... in file order")
    key_file: AbsPath = Field(Path("/etc/nfgate/signalling.key"), description="the shared key (made if missing)")
    copies: Int(1, 10) = Field(3, description="copies of each message (UDP may lose one)")
    query_timeout: Number(0.01, 30) = Field(0.5, description="seconds a gateway waits for an answer before asking again")
    replay_window: Number(0.1, 300) = Field(DEFAULT_REPLAY_WINDOW, description="seconds a message is accepted after it was sent")
    socket_buffer: Int(1 << 16, 1 << 28) = Field(4 * 1024 * 1024, description="bytes of each signalling socket's buffers")


class Supervisor(Frozen):
    control_socket: AbsPath = Field(Path("/run/nfgate/control.sock"), description="the operator's control socket")
    restart_initial: Number(0.01, 60) = Field(0.2, description="first delay before restarting a failed process")
    restart_max: Number(0.1, 3600) = Field(30.0, description="longest delay between restarts")
    stable_after: Number(1, 86400) = Field(60.0, description="seconds up after which the delay starts over")
    stop_timeout: Number(0.1, 120) = Field(5.0, description="seconds a process has to stop before it is killed")

    _restart = ordered("restart_initial", "restart_max", "supervisor")


LogFormat = Choice("text", "json")
LogLevel = Choice("debug", "info", "warning", "error")


class Log(Frozen):
    format: LogFormat = Field(
        "text", description="text: one key=value line per event; json: one JSON object per line, for every process")
    level: LogLevel = Field("info", description="the least severe level logged")


def _listen(value: Any) -> str:
    """``address:port`` (an IPv6 address in brackets), or "" for no endpoint."""
    if not isinstance(value, str):
        fail(f"expected a string, got {type(value).__name__}")
    if value == "":
        return value
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        fail(f"{value!r} is not address:port (e.g. 127.0.0.1:9469, [::1]:9469), or \"\"")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        fail(f"{value!r}: the port must be 1 to 65535")
    return value


Listen = typed(_listen, {"type": "string", "description": "address:port, or \"\" for none"}, str)


class Metrics(Frozen):
    listen: Listen = Field(
        "127.0.0.1:9469", description="where nfgate run serves Prometheus metrics over HTTP (\"\": nowhere)")
    poll: Number(0.5, 3600) = Field(
        5.0, description="seconds between the supervisor's reads of its children's counters, whose totals outlive them")


class Traffic(Frozen):
    """Which traffic a gateway takes: the seed's fig. 6a step 602 selector."""

    source: Source = ""
    from_zone: Zones = Field(alias="from", description="the zone the traffic comes from")
    to_zone: ZonesOrRouter = Field(alias="to", description="the zone it goes to, or router")
    proto: TcpUdp = Field(description="the protocol (the kind says which it takes)")
    ports: Ports = Field(description="destination ports: 25, \"1000-2000\", or an array of those")
    saddr: Addresses = Field((), description="source addresses or prefixes (IPv6 ones where the kind takes IPv6)")
    daddr: Addresses = Field((), description="destination addresses or prefixes (likewise)")
    allow: Bool = Field(False, description="the selector admits its traffic itself, as an accept [[rule]] would; "
                        "false: the filter's rules decide what reaches the gateway")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Traffic":
        if self.from_zone == self.to_zone:
            report(info, self.source, "'from' and 'to' are the same zone: the router never sees that traffic")
        if not self.names(4) and not self.names(6):
            report(info, self.source, "saddr and daddr share no IP version: the selector names no traffic")
        return self

    def names(self, version: int) -> bool:
        """Whether the selector can name traffic of IP ``version``: each of ``saddr`` and
        ``daddr`` is empty or has a prefix of that version."""
        return all(not nets or any(n.version == version for n in nets) for nets in (self.saddr, self.daddr))


Selectors = Tables(Traffic, "gateway.traffic")


class Gateway(Frozen):
    """One ``[[gateway]]``; ``settings`` is its kind's settings model."""

    source: Source = ""
    name: Name = Field(description="the gateway's name (signalling carries it)")
    kind: str = Field(description="the kind of gateway")
    listen_port: Int(1024, 65535) = Field(None, description="the gateway's port G:g, its worker i's listen_port + i "
                                          "(default: the next ports from gateway_link.port_base)")
    workers: Int(1, MAX_WORKERS) = Field(1, description="worker processes, each with its own G:g and signalling port; "
                                         "the processor spreads new flows over the live ones (kinds that allow it)")
    traffic: Selectors = Field(
        (), description="the traffic the gateway takes ([[gateway.traffic]])")
    settings: Any = None
    # False when the gateways sit on an AG host (gateway_link.mode = "host"): no IPv6 crosses to them.
    _ipv6_link: bool = PrivateAttr(True)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Gateway":
        kind = KINDS[self.kind]
        if not self.traffic:
            report(info, f"{self.source}.traffic", "a gateway needs at least one [[gateway.traffic]] selector")
        for item in self.traffic:
            v6 = [n for n in item.saddr + item.daddr if n.version == 6]
            if v6 and not kind.ipv6:
                report(info, item.source, f"IPv6 addresses ({v6[0]}), but a "
                       f"{self.kind} gateway takes IPv4 only (kinds that take IPv6: "
                       f"{', '.join(k.name for k in KINDS if k.ipv6)})")
            elif v6 and not item.names(6) and item.names(4):
                report(info, item.source, "IPv6 addresses on one side only (saddr or daddr): the selector names no "
                       "IPv6 traffic; give IPv6 prefixes on both sides, or none")
            if item.proto not in kind.protos:
                report(info, f"{item.source}.proto", f"a {self.kind} gateway takes {' or '.join(kind.protos)}, not {item.proto}")
            if kind.terminates and item.to_zone != ROUTER:
                report(info, f"{item.source}.to", f"a {self.kind} gateway terminates its flows: 'to' must be \"router\"")
        for path, reason in kind.check(self) if kind.check is not None else ():
            report(info, path, reason)
        if self.workers > 1 and not kind.workers:
            report(info, f"{self.source}.workers", f"a {self.kind} gateway runs as one process")
        elif self.workers > 1 and kind.log_only(self.settings):
            report(info, f"{self.source}.workers", "a log-only gateway carries no flow: one process logs them all")
        if self.listen_port is not None and self.listen_port + self.workers - 1 > 65535:
            report(info, f"{self.source}.listen_port", f"{self.workers} workers need ports up to {self.listen_port + self.workers - 1}")
        return self

    def takes_ipv6(self, t: Traffic) -> bool:
        """Whether selector ``t`` queues IPv6 to this gateway (issue 17): its kind takes IPv6
        (``Kind.ipv6``; a log-only tcp-relay's too, its flows carried by the kernel), and its
        addresses, if any, name IPv6 (``Traffic.names``). Otherwise the IPv6 on its ports is
        dropped and counted."""
        return self._ipv6_link and KINDS[self.kind].ipv6 and t.names(6)

    @property
    def log_only(self) -> bool:
        """Whether the processor lets its flows pass unbound (``Kind.log_only``)."""
        return KINDS[self.kind].log_only(self.settings)

    @property
    def listen_ports(self) -> range:
        """Worker i listens on listen_port + i."""
        if self.listen_port is None:
            return range(0)
        return range(self.listen_port, self.listen_port + self.workers)


def _kind_model(kind: str, settings: type) -> type[Gateway]:
    """The ``[[gateway]]`` of one kind: ``kind`` is its tag, ``settings`` its model."""
    return create_model(
        "Gateway_" + kind.replace("-", "_"),
        __base__=Gateway,
        __doc__=f"A [[gateway]] of kind {kind}.",
        kind=(Literal[kind], Field(description="the kind of gateway")),  # type: ignore[valid-type]
        settings=(settings, Field(default_factory=settings, description=f"the {kind} gateway's settings")),
    )


KIND_GATEWAYS = {kind.name: _kind_model(kind.name, kind.settings) for kind in KINDS}
AnyGateway = Annotated[Union[tuple(KIND_GATEWAYS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]


def _zones(zones: dict[str, Any]) -> dict[str, Any]:
    if not zones:
        fail("define at least one zone, e.g. [zones.wan] and [zones.lan]")
    return zones


def _named(value: Any, info: ValidationInfo) -> Any:
    """Give each zone its name (the table's key)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for name, table in value.items():
        if isinstance(table, dict):
            if "name" in table:
                report(info, f"zones.{name}.name", "unknown key")
            table = {**table, "name": name}
        out[name] = table
    return out


Rules = Annotated[Tables(FilterRule, "rule"), _sources("rule")]
Gateways = Annotated[Tables(AnyGateway, "gateway"), _sources("gateway", "traffic")]


class Config(Frozen):
    path: SkipJsonSchema[Path | None] = None
    zones: Annotated[dict[ZoneName, Zone], BeforeValidator(_named), AfterValidator(_zones)] = Field(
        description="[zones.NAME]: the zones and their interfaces",
        json_schema_extra={"additionalProperties": False})  # a zone's name is its key: 1-8 of a-z 0-9
    policy: Policy = Field(default_factory=Policy, description="[policy]: the default verdicts")
    rules: Rules = Field(
        (), alias="rule", description="[[rule]]: filter rules")
    nat: Nat = Field(default_factory=Nat, description="[nat]: masquerading and port forwards")
    processor: Processor = Field(default_factory=Processor, description="[processor]: the packet processor")
    gateway_link: GatewayLink = Field(default_factory=GatewayLink, description="[gateway_link]: the blind track")
    signalling: Signalling = Field(default_factory=Signalling, description="[signalling]")
    gateways: Gateways = Field(
        (), alias="gateway", description="[[gateway]]: the gateways")
    supervisor: Supervisor = Field(default_factory=Supervisor, description="[supervisor]")
    log: Log = Field(default_factory=Log, description="[log]: the log format of nfgate run and its processes")
    metrics: Metrics = Field(default_factory=Metrics, description="[metrics]: the Prometheus endpoint")
    ha: Ha | None = Field(None, description="[ha]: the router pair (keepalived + conntrackd), docs/ha.md")
    # With [ha]: the node this process runs for (``for_node``); None for the config as a whole.
    _node: str | None = PrivateAttr(None)

    def for_node(self, node: str) -> "Config":
        """The config as node ``node`` of the pair runs it (docs/ha.md, "The AG host"): its half of
        the firewall-side pool (``own_pool``), its flow ids (``node_index``) and, with the gateways on
        their own host, its own address on the gateway link as ``gateway_link.router_address``."""
        if self.ha is None or node not in self.ha.nodes:
            raise ValueError(f"no node {node!r} in [ha]")
        update = {}
        address = node_link_address(self.ha, node) if self.gateway_link.mode == "host" else None
        if address is not None:
            update["gateway_link"] = self.gateway_link.model_copy(update={"router_address": address})
        view = self.model_copy(update=update)
        view._node = node
        return view

    @property
    def node(self) -> str | None:
        return self._node

    @property
    def node_index(self) -> int:
        """0 or 1: this node's place in the pair (its half of the pool, the node bit of its flow ids); 0 alone."""
        return 0 if self.ha is None or self._node is None else node_index(self.ha, self._node)

    @property
    def own_pool(self) -> ipaddress.IPv4Network:
        """The firewall-side addresses this router allocates F from: the whole pool, or its node's half."""
        pool = self.processor.pools.firewall_side
        return pool if self.ha is None or self._node is None else node_pool(pool, self.ha, self._node)

    @property
    def peer_pool(self) -> ipaddress.IPv4Network | None:
        """With [ha] and the gateways on their own host, the peer's half of the firewall-side pool:
        this node takes over the peer's bindings from there when it becomes master (docs/ha.md,
        "Takeover"); else None (without a shared gateway nobody would ask about them)."""
        if self.ha is None or self._node is None or self.gateway_link.mode != "host":
            return None
        peer = next(n for n in self.ha.nodes if n != self._node)
        return node_pool(self.processor.pools.firewall_side, self.ha, peer)

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

    def gateway_signalling_port(self, name: str, worker: int = 0) -> int:
        """A gateway's worker listens on gateway_address:(signalling.port + n), n counting
        the workers of every gateway in file order (gateway k with one worker each: + k):
        each worker is its own process, and a UDP port delivers to one socket."""
        return self.gateway_signalling_ports(name)[worker]

    def gateway_signalling_ports(self, name: str) -> range:
        """The signalling ports of a gateway's workers (``gateway_signalling_port``)."""
        first = self.signalling.port
        for gateway in self.gateways:
            if gateway.name == name:
                return range(first, first + gateway.workers)
            first += gateway.workers
        raise KeyError(name)

    @model_validator(mode="before")
    @classmethod
    def _listen_ports(cls, data: Any) -> Any:
        """A gateway's listen_port defaults to the next free port from gateway_link.port_base:
        port_base + its index when every gateway has one worker."""
        if not isinstance(data, dict) or not isinstance(data.get("gateway"), list):
            return data
        link = data.get("gateway_link")
        base = link.get("port_base") if isinstance(link, dict) else None
        if not isinstance(base, int) or isinstance(base, bool):
            base = GatewayLink.model_fields["port_base"].default  # or its problem is reported there
        gateways = []
        for g in data["gateway"]:
            if isinstance(g, dict) and "listen_port" not in g:
                g = {**g, "listen_port": base}
            gateways.append(g)
            workers = g.get("workers", 1) if isinstance(g, dict) else 1
            base += workers if isinstance(workers, int) and not isinstance(workers, bool) and 1 <= workers <= MAX_WORKERS else 1
        return {**data, "gateway": gateways}

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Config":
        _check_zones(info, self)
        _check_link(info, self)
        _check_gateways(info, self.gateways)
        _check_forwards(info, self.nat.forward)
        _check_signalling_ports(info, self)
        _check_snat_ports(info, self)
        check_ha(info, self.ha, self.zones, self.gateway_link.router_if)
        _check_host_link(info, self)
        _check_pool6(info, self)  # after the host link, which may take IPv6 from every selector
        return self


def _check_host_link(info: ValidationInfo, config: Config) -> None:
    """With [ha] the pool is halved; ``gateway_link.mode = "host"``: whose address is the router's,
    and what the link cannot carry."""
    link, ha = config.gateway_link, config.ha
    buckets = bucket_count(len(config.processor.queues))
    if ha is not None and config.processor.pools.firewall_side.num_addresses < 2 * buckets:
        report(info, "processor.pools.firewall_side", "with [ha] each node owns half of the pool: it needs at least "
               f"{2 * buckets} addresses for {len(config.processor.queues)} queues")
    if link.mode != "host":
        return
    if ha is None:
        if link.router_address.network != link.gateway_address.network:
            report(info, "gateway_link.gateway_address", "must be in the same subnet as router_address (the AG host is on-link)")
        elif link.router_address.ip == link.gateway_address.ip:
            report(info, "gateway_link.gateway_address", "must differ from router_address")
    elif GATEWAY_LINK not in ha.virtual:
        report(info, "ha.virtual", "gateway_link.mode = \"host\" with [ha] needs [ha.virtual.gateway_link]: "
               "the AG host routes the firewall-side pool by the pair's address on its segment")
    elif link.gateway_address.ip not in ha.virtual[GATEWAY_LINK].address.network:
        report(info, "gateway_link.gateway_address",
               f"{link.gateway_address.ip} is not in ha.virtual.gateway_link's {ha.virtual[GATEWAY_LINK].address.network}")
    for gw in config.gateways:
        # The AG host has no address of the blind track's ULA, and the pair moves IPv4 only:
        # a selector's IPv6 is dropped and counted, as for a kind that takes none.
        gw._ipv6_link = False


def _check_pool6(info: ValidationInfo, config: Config) -> None:
    """Each processor instance owns a slice of the IPv6 pool, as of the IPv4 one, once IPv6 is taken."""
    pool6, queues = config.processor.pools.firewall_side6, config.processor.queues
    buckets = bucket_count(len(queues))
    if pool6.num_addresses < buckets and any(g.takes_ipv6(t) for g in config.gateways for t in g.traffic):
        report(info, "processor.pools.firewall_side6",
               f"{pool6} has fewer than {buckets} addresses for {len(queues)} queues")


def _check_snat_ports(info: ValidationInfo, config: Config) -> None:
    """The kernel's masquerade takes the ports below the processor's SNAT pool (rules.build)."""
    snat = config.processor.pools.snat_ports
    if config.gateways and (config.nat.masquerade or config.nat.masquerade6) and snat.first <= 1024:
        report(info, "processor.pools.snat_ports",
               f"{snat} leaves nat.masquerade no ports below it (masquerade takes 1024 to {snat.first - 1}): "
               "start the pool higher, e.g. \"61000-65535\"")


def _check_zones(info: ValidationInfo, config: Config) -> None:
    owner: dict[str, str] = {}
    for zone in config.zones.values():
        for ifname in zone.interfaces:
            if ifname in owner:
                report(info, f"zones.{zone.name}.interfaces", f"interface {ifname!r} is already in zone {owner[ifname]!r}")
            owner[ifname] = zone.name


def _check_link(info: ValidationInfo, config: Config) -> None:
    link, pool = config.gateway_link, config.processor.pools.firewall_side
    for zone in config.zones.values():
        if link.router_if in zone.interfaces:
            report(info, "gateway_link.router_if", f"{link.router_if!r} is in zone {zone.name!r}: the blind track is in no zone")
    if link.router_address.network.overlaps(pool):
        report(info, "gateway_link.router_address", f"overlaps processor.pools.firewall_side {pool}")
    pool6 = config.processor.pools.firewall_side6
    if link.router_address6.network.overlaps(pool6):
        report(info, "gateway_link.router_address6", f"overlaps processor.pools.firewall_side6 {pool6}")


def _check_signalling_ports(info: ValidationInfo, config: Config) -> None:
    """Processor instance i and gateway k listen on signalling.port + i / + k."""
    port, gateways = config.signalling.port, config.gateways
    workers = sum(g.workers for g in gateways)
    span = max(len(config.processor.queues), workers, 1)
    if port + span - 1 > 65535:
        report(info, "signalling.port", f"{span} processors or gateway workers need ports {port} to {port + span - 1}")
    taken = range(port, port + workers)
    for g in gateways:
        if any(p in taken for p in g.listen_ports):
            report(info, f"{g.source}.listen_port", f"{g.listen_port} is a gateway signalling port ({taken.start}-{taken.stop - 1})")


def _check_gateways(info: ValidationInfo, gateways: tuple[Gateway, ...]) -> None:
    names: set[str] = set()
    for g in gateways:
        if g.name in names:
            report(info, "gateway", f"gateway name {g.name} appears twice")
        names.add(g.name)
    ports_seen: dict[int, str] = {}
    for g in gateways:
        clash = next((p for p in g.listen_ports if p in ports_seen), None)
        if clash is not None:
            report(info, f"{g.source}.listen_port", f"{clash} is already used by {ports_seen[clash]}")
        for p in g.listen_ports:
            ports_seen.setdefault(p, g.source)
    selectors = [s for g in gateways for s in g.traffic]
    for i, a in enumerate(selectors):
        for b in selectors[i + 1:]:
            if _selectors_overlap(a, b):
                report(info, f"{b.source}.ports",
                       f"overlaps {a.source} ({a.proto} {', '.join(map(str, a.ports))} from {a.from_zone}): "
                       "a packet could belong to two gateways")


def _selectors_overlap(a: Traffic, b: Traffic) -> bool:
    if a.proto != b.proto or a.from_zone != b.from_zone:
        return False
    if not any(x.overlaps(y) for x in a.ports for y in b.ports):
        return False
    # The queue rule can only see the ingress zone (raw prerouting runs before
    # routing), so two selectors from one zone on one port clash even if their
    # 'to' zones differ, unless addresses keep them apart.
    for mine, theirs in ((a.saddr, b.saddr), (a.daddr, b.daddr)):
        if mine and theirs and not any(x.overlaps(y) for x in mine for y in theirs):
            return False
    return True


def _check_forwards(info: ValidationInfo, forwards: tuple[PortForward, ...]) -> None:
    for i, a in enumerate(forwards):
        for b in forwards[i + 1:]:
            if a.version == b.version and a.from_zone == b.from_zone and a.proto == b.proto and a.ports.overlaps(b.ports):
                report(info, f"{b.source}.port", f"{b.proto} {b.ports} overlaps {a.source} ({a.ports})")

