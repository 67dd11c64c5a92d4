"""Load and validate nfgate's TOML config.

- ``reader``: the strict table reader that collects every problem with its key path.
- ``model``: the validated config as frozen dataclasses.
- ``load(path)`` / ``loads(text)``: parse, validate, and return a ``Config``, or
  raise ``ConfigError`` carrying every problem at once.

docs/config.md is the reference for every key; keep it in step with this module.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

from firewall.config.locate import locate
from firewall.config.model import (
    GATEWAY_KINDS,
    PROTOS,
    ROUTER,
    Config,
    FilterRule,
    Gateway,
    GatewayLink,
    Marks,
    Nat,
    Policy,
    PortForward,
    PortRange,
    Pools,
    Processor,
    Signalling,
    Supervisor,
    Timeouts,
    Traffic,
    Zone,
)
from firewall.config.reader import (
    Problem,
    Problems,
    Table,
    bitmask,
    boolean,
    choice,
    ifname,
    integer,
    interface,
    listof,
    network,
    number,
    string,
    unique,
)
from firewall.config.settings import KIND_PROTOS, read_settings
from firewall.errors import UsageError

__all__ = ["Config", "ConfigError", "load", "loads", "PortRange"]

ZONE_NAME = r"[a-z][a-z0-9]{0,7}"  # short: iptables chain names are NFGATE-FWD-<zone>-<zone>, max 28
NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}"
NETNS = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}"
MAX_QUEUES = 64
MAX_POOL_ADDRESSES = 65536  # firewall.pools indexes addresses in 16 bits


class ConfigError(UsageError):
    """A config that cannot be used; ``problems`` lists every reason."""

    def __init__(self, path: Path | None, problems: list[Problem]):
        self.path = path
        self.problems = problems
        where = str(path) if path else "config"
        lines = [f"{where}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file (give one with --config)") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason})") from None
    return loads(text, path)


def loads(text: str, path: Path | None = None) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError(path, [Problem("(toml)", str(err))]) from None
    problems = Problems()
    config = _build(doc, path, problems)
    if problems:
        located = [Problem(p.path, p.reason, locate(text, p.path)) for p in problems]
        raise ConfigError(path, located)
    return config


def ports(value: Any, path: str, problems: Problems) -> tuple[PortRange, ...] | None:
    """25, "25", "1000-2000", or an array of those."""
    items = value if isinstance(value, list) else [value]
    out: list[PortRange] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        rng = _port_range(item, where, problems)
        if rng is None:
            return None
        out.append(rng)
    for i, a in enumerate(out):
        for b in out[i + 1 :]:
            if a.overlaps(b):
                problems.add(path, f"port ranges {a} and {b} overlap")
                return None
    return tuple(sorted(out))


def _port_range(item: Any, path: str, problems: Problems) -> PortRange | None:
    if isinstance(item, int) and not isinstance(item, bool):
        first = last = item
    elif isinstance(item, str):
        lo, sep, hi = item.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            problems.add(path, f"{item!r} is not a port or a range like '1000-2000'")
            return None
    else:
        problems.add(path, f"expected a port number or a 'first-last' string, got {item!r}")
        return None
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        problems.add(path, f"{item!r}: ports are 1 to 65535")
        return None
    if first > last:
        problems.add(path, f"{item!r}: the range runs backwards")
        return None
    return PortRange(first, last)


def single_range(value: Any, path: str, problems: Problems) -> PortRange | None:
    return _port_range(value, path, problems)


def _build(doc: dict[str, Any], path: Path | None, problems: Problems) -> Config:
    top = Table(doc, "", problems)
    zones = _zones(top.table("zones", required=True), problems)
    policy = _policy(top.table("policy"), zones, problems)
    rules = tuple(_rule(t, zones) for t in top.tables("rule"))
    nat = _nat(top.table("nat"), zones, problems)
    processor = _processor(top.table("processor"), problems)
    link = _gateway_link(top.table("gateway_link"), zones, processor, problems)
    signalling = _signalling(top.table("signalling"))
    gateways = tuple(_gateway(t, i, zones, link) for i, t in enumerate(top.tables("gateway")))
    supervisor = _supervisor(top.table("supervisor"))
    top.finish()
    _check_gateways(gateways, problems)
    _check_forwards(nat.forwards, problems)
    _check_buckets(processor, problems)
    _check_signalling_ports(signalling, processor, gateways, problems)
    return Config(
        path=path,
        zones=zones,
        policy=policy,
        rules=tuple(r for r in rules if r is not None),
        nat=nat,
        processor=processor,
        gateway_link=link,
        signalling=signalling,
        gateways=tuple(g for g in gateways if g is not None),
        supervisor=supervisor,
    )


def _zones(table: Table, problems: Problems) -> dict[str, Zone]:
    zones: dict[str, Zone] = {}
    owner: dict[str, str] = {}
    for name in table.data:
        zt = table.table(name)
        if not isinstance(name, str) or not _fullmatch(ZONE_NAME, name) or name == ROUTER:
            problems.add(zt.path, f"zone name {name!r} must be 1-8 lowercase letters/digits, not 'router'")
        interfaces = zt.take("interfaces", listof(ifname))
        networks = zt.take("networks", listof(network), ())
        zt.finish()
        if interfaces is None:
            continue
        if not interfaces:
            problems.add(f"{zt.path}.interfaces", "a zone needs at least one interface")
        for ifn in interfaces:
            if ifn in owner:
                problems.add(f"{zt.path}.interfaces", f"interface {ifn!r} is already in zone {owner[ifn]!r}")
            owner[ifn] = name
        zones[name] = Zone(name, interfaces, networks or ())
    if not table.data:
        problems.add(table.path, "define at least one zone, e.g. [zones.wan] and [zones.lan]")
    return zones


def _zone_ref(zones: dict[str, Zone], allow_router: bool):
    def convert(value: Any, path: str, problems: Problems) -> str | None:
        if value == ROUTER and allow_router:
            return value
        if not isinstance(value, str) or value not in zones:
            known = ", ".join(sorted(zones)) + (", router" if allow_router else "")
            problems.add(path, f"zone {value!r} does not exist (known: {known})")
            return None
        return value

    return convert


def _policy(t: Table, zones: dict[str, Zone], problems: Problems) -> Policy:
    verdict = choice("accept", "drop")
    d = Policy()
    policy = Policy(
        input=t.take("input", verdict, d.input),
        forward=t.take("forward", verdict, d.forward),
        output=t.take("output", verdict, d.output),
        established_related=t.take("established_related", boolean, d.established_related),
        drop_invalid=t.take("drop_invalid", boolean, d.drop_invalid),
        icmp_essential=t.take("icmp_essential", boolean, d.icmp_essential),
        ping_from=t.take("ping_from", listof(_zone_ref(zones, False)), d.ping_from),
    )
    t.finish()
    return policy


def _addr_list(t: Table, key: str):
    return t.take(key, listof(network, allow_scalar=True), ())


def _check_proto_fields(t: Table, proto: str | None, ports_: tuple | None, nets: tuple) -> None:
    if proto not in ("tcp", "udp") and ports_:
        t.problems.add(f"{t.path}.ports", f"ports need proto 'tcp' or 'udp', not {proto!r}")
    if proto == "icmp" and any(n.version == 6 for n in nets):
        t.problems.add(t.path, "proto 'icmp' is IPv4; use 'icmpv6' for IPv6 addresses")
    if proto == "icmpv6" and any(n.version == 4 for n in nets):
        t.problems.add(t.path, "proto 'icmpv6' is IPv6; use 'icmp' for IPv4 addresses")


def _rule(t: Table, zones: dict[str, Zone]) -> FilterRule | None:
    name = t.take("name", string(NAME, "a name (letters, digits, _ . -)"), "")
    from_zone = t.take("from", _zone_ref(zones, True))
    to_zone = t.take("to", _zone_ref(zones, True))
    proto = t.take("proto", choice(*PROTOS), "any")
    ports_ = t.take("ports", ports, ())
    saddr = _addr_list(t, "saddr")
    daddr = _addr_list(t, "daddr")
    action = t.take("action", choice("accept", "drop", "reject"), "accept")
    t.finish()
    if from_zone == ROUTER and to_zone == ROUTER:
        t.problems.add(t.path, "'from' and 'to' cannot both be 'router'")
    _check_proto_fields(t, proto, ports_, (saddr or ()) + (daddr or ()))
    if saddr and daddr and {n.version for n in saddr}.isdisjoint({n.version for n in daddr}):
        t.problems.add(t.path, "saddr and daddr are of different IP versions: the rule could never match")
    if None in (from_zone, to_zone, proto, ports_, saddr, daddr, action, name):
        return None
    return FilterRule(t.path, name, from_zone, to_zone, proto, ports_, saddr, daddr, action)


def _nat(t: Table, zones: dict[str, Zone], problems: Problems) -> Nat:
    masq = t.take("masquerade", listof(_zone_ref(zones, False)), ())
    forwards = []
    for ft in t.tables("forward"):
        name = ft.take("name", string(NAME, "a name"), "")
        from_zone = ft.take("from", _zone_ref(zones, False))
        proto = ft.take("proto", choice("tcp", "udp"))
        rng = ft.take("port", single_range)
        to = ft.take("to", _target)
        saddr = _addr_list(ft, "saddr")
        ft.finish()
        if None in (name, from_zone, proto, rng, to, saddr):
            continue
        to_addr, to_port = to
        if to_port is not None and len(rng) > 1:
            problems.add(f"{ft.path}.to", "a port range forwards to the same ports: leave the port out of 'to'")
            continue
        forwards.append(PortForward(ft.path, name, from_zone, proto, rng, to_addr, to_port, saddr))
    t.finish()
    return Nat(masq or (), tuple(forwards))


def _target(value: Any, path: str, problems: Problems):
    """"192.168.1.10" or "192.168.1.10:80": port forwards are IPv4 (NAT44)."""
    if not isinstance(value, str):
        problems.add(path, f"expected 'address' or 'address:port', got {value!r}")
        return None
    host, sep, port = value.partition(":")
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        problems.add(path, f"{host!r} is not an IPv4 address")
        return None
    if not sep:
        return addr, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        problems.add(path, f"{port!r} is not a port (1 to 65535)")
        return None
    return addr, int(port)


def _processor(t: Table, problems: Problems) -> Processor:
    d = Processor()
    queues = t.take("queues", listof(integer(0, 65535), allow_scalar=True), d.queues)
    if queues is not None:
        if not queues:
            problems.add(f"{t.path}.queues", "give at least one queue number")
        elif len(queues) > MAX_QUEUES:
            problems.add(f"{t.path}.queues", f"at most {MAX_QUEUES} queues")
        unique(queues, f"{t.path}.queues", "queue", problems)
    fail_mode = t.take("fail_mode", choice("open", "closed"), d.fail_mode)
    tuning = {
        "queue_maxlen": t.take("queue_maxlen", integer(64, 1 << 20), d.queue_maxlen),
        "queue_buffer": t.take("queue_buffer", integer(1 << 16, 1 << 30), d.queue_buffer),
        "queue_batch": t.take("queue_batch", integer(1, 65536), d.queue_batch),
        "route_cache": t.take("route_cache", number(0, 3600), d.route_cache),
        "max_rules": t.take("max_rules", integer(0, 1 << 20), d.max_rules),
        "max_rules_per_flow": t.take("max_rules_per_flow", integer(0, 1024), d.max_rules_per_flow),
        "adjacent_ttl": t.take("adjacent_ttl", number(1, 3600), d.adjacent_ttl),
        "conntrack_accounting": t.take("conntrack_accounting", boolean, d.conntrack_accounting),
    }

    mt = t.table("marks")
    dm = Marks()
    names = ("rewritten", "passed", "allowed", "expect")
    given = {k: mt.take(k, bitmask, getattr(dm, k)) for k in ("mask", "rewritten", "passed")}
    mask, used = given["mask"], (given["rewritten"] or 0) | (given["passed"] or 0)
    if mask is not None and not mt.has("allowed"):
        # Not given: the lowest bit of the mask that nothing else takes, and
        # every bit left for expect, so a config that sets only its mask,
        # rewritten and passed still gets valid ones.
        free = mask & ~used
        given["allowed"] = free & -free
    else:
        given["allowed"] = mt.take("allowed", bitmask, dm.allowed)
    if mask is not None and not mt.has("expect"):
        given["expect"] = mask & ~used & ~(given["allowed"] or 0)
    else:
        given["expect"] = mt.take("expect", bitmask, dm.expect)
    marks = Marks(**given)
    mt.finish()
    if None not in given.values():
        seen: dict[str, int] = {}
        for key in names:
            bits = getattr(marks, key)
            other = next((k for k, b in seen.items() if b & bits), None)
            if bits & ~marks.mask:
                problems.add(f"{mt.path}.{key}", f"{bits:#010x} has bits outside mask {marks.mask:#010x}")
            elif other is not None:
                problems.add(f"{mt.path}.{key}", f"{bits:#010x} overlaps {other} {seen[other]:#010x}")
            elif not bits:
                problems.add(f"{mt.path}.{key}", f"needs at least one bit of mask {marks.mask:#010x}")
            seen[key] = bits
        numbered = (1 << bin(marks.expect).count("1")) - 1
        if marks.expect and queues and numbered < len(queues):
            problems.add(f"{mt.path}.expect", f"{marks.expect:#010x} numbers at most {numbered} processor "
                         f"instances, and processor.queues has {len(queues)}: give the mask more bits")

    tt = t.table("timeouts")
    dt = Timeouts()
    for gone in ("tcp_idle", "tcp_closing", "tcp_handshake", "udp_idle"):
        if tt.has(gone):
            tt.taken.add(gone)
            problems.add(f"{tt.path}.{gone}", "no longer a setting: the kernel carries gateway flows, and conntrack's own timeouts end them (docs/datapath.md)")
    timeouts = Timeouts(
        confirm=tt.take("confirm", number(1, 600), dt.confirm),
        nat_element=tt.take("nat_element", number(1, 600), dt.nat_element),
        reap=tt.take("reap", number(0.1, 600), dt.reap),
    )
    tt.finish()

    pt = t.table("pools")
    dp = Pools()
    fw = pt.take("firewall_side", network, dp.firewall_side)
    if fw is not None and fw.version != 4:
        problems.add(f"{pt.path}.firewall_side", "the firewall-side pool is IPv4")
        fw = None
    elif fw is not None and fw.num_addresses > MAX_POOL_ADDRESSES:
        problems.add(f"{pt.path}.firewall_side", f"{fw} is larger than /16: at most {MAX_POOL_ADDRESSES} addresses")
        fw = None
    pool_ports = pt.take("ports", single_range, dp.ports)
    snat_ports = pt.take("snat_ports", single_range, dp.snat_ports)
    pt.finish()
    for key, rng in (("ports", pool_ports), ("snat_ports", snat_ports)):
        if rng is not None and rng.first < 1024:
            problems.add(f"{pt.path}.{key}", f"{rng} reaches below 1024: keep the pools off well-known ports")
    t.finish()
    return Processor(
        queues=queues or d.queues,
        fail_mode=fail_mode or d.fail_mode,
        **{k: (v if v is not None else getattr(d, k)) for k, v in tuning.items()},
        marks=marks,
        timeouts=timeouts,
        pools=Pools(fw or dp.firewall_side, pool_ports or dp.ports, snat_ports or dp.snat_ports),
    )


def _check_buckets(processor: Processor, problems: Problems) -> None:
    """Each processor instance owns the pool addresses whose low bits pick it."""
    buckets = bucket_count(len(processor.queues))
    if processor.pools.firewall_side.num_addresses < buckets:
        problems.add(
            "processor.pools.firewall_side",
            f"{processor.pools.firewall_side} has fewer than {buckets} addresses for {len(processor.queues)} queues",
        )
    if len(processor.pools.snat_ports) < buckets:
        problems.add("processor.pools.snat_ports", f"needs at least {buckets} ports")


def _check_signalling_ports(signalling: Signalling, processor: Processor, gateways, problems: Problems) -> None:
    """Processor instance i and gateway k listen on signalling.port + i / + k."""
    if signalling.port is None:
        return
    live = [g for g in gateways if g is not None]
    span = max(len(processor.queues), len(live), 1)
    if signalling.port + span - 1 > 65535:
        problems.add("signalling.port", f"{span} processors or gateways need ports {signalling.port} to {signalling.port + span - 1}")
    taken = range(signalling.port, signalling.port + len(live))
    for g in live:
        if g.listen_port in taken:
            problems.add(f"{g.source}.listen_port", f"{g.listen_port} is a gateway signalling port ({taken.start}-{taken.stop - 1})")


def bucket_count(instances: int) -> int:
    """The power of two >= instances: steering matches the low bits of a value."""
    return 1 << max(0, (instances - 1).bit_length())


def _gateway_link(t: Table, zones: dict[str, Zone], processor: Processor, problems: Problems) -> GatewayLink:
    d = GatewayLink()
    link = GatewayLink(
        netns=t.take("netns", string(NETNS, "a namespace name"), d.netns),
        router_if=t.take("router_if", ifname, d.router_if),
        gateway_if=t.take("gateway_if", ifname, d.gateway_if),
        router_address=t.take("router_address", interface, d.router_address),
        gateway_address=t.take("gateway_address", interface, d.gateway_address),
        port_base=t.take("port_base", integer(1024, 65000), d.port_base),
    )
    t.finish()
    if None in (link.router_if, link.router_address, link.gateway_address):
        return d
    for zone in zones.values():
        if link.router_if in zone.interfaces:
            problems.add(f"{t.path}.router_if", f"{link.router_if!r} is in zone {zone.name!r}: the blind track is in no zone")
    if link.router_address.network != link.gateway_address.network:
        problems.add(f"{t.path}.gateway_address", "must be in the same subnet as router_address")
    elif link.router_address.ip == link.gateway_address.ip:
        problems.add(f"{t.path}.gateway_address", "must differ from router_address")
    if link.router_address.network.overlaps(processor.pools.firewall_side):
        problems.add(f"{t.path}.router_address", f"overlaps processor.pools.firewall_side {processor.pools.firewall_side}")
    return link


def _signalling(t: Table) -> Signalling:
    d = Signalling()
    sig = Signalling(
        port=t.take("port", integer(1, 65535), d.port),
        key_file=Path(t.take("key_file", string(r"/.+", "an absolute path"), str(d.key_file)) or d.key_file),
        copies=t.take("copies", integer(1, 10), d.copies),
        query_timeout=t.take("query_timeout", number(0.01, 30), d.query_timeout),
        replay_window=t.take("replay_window", number(0.1, 300), d.replay_window),
        socket_buffer=t.take("socket_buffer", integer(1 << 16, 1 << 28), d.socket_buffer),
    )
    t.finish()
    return sig


def _supervisor(t: Table) -> Supervisor:
    d = Supervisor()
    sup = Supervisor(
        control_socket=Path(t.take("control_socket", string(r"/.+", "an absolute path"), str(d.control_socket)) or d.control_socket),
        restart_initial=t.take("restart_initial", number(0.01, 60), d.restart_initial),
        restart_max=t.take("restart_max", number(0.1, 3600), d.restart_max),
        stable_after=t.take("stable_after", number(1, 86400), d.stable_after),
        stop_timeout=t.take("stop_timeout", number(0.1, 120), d.stop_timeout),
    )
    t.finish()
    if None not in (sup.restart_initial, sup.restart_max) and sup.restart_initial > sup.restart_max:
        t.problems.add(f"{t.path}.restart_max", "must be at least restart_initial")
    return sup


def _gateway(t: Table, index: int, zones: dict[str, Zone], link: GatewayLink) -> Gateway | None:
    name = t.take("name", string(NAME, "a name (letters, digits, _ . -)"))
    kind = t.take("kind", choice(*GATEWAY_KINDS))
    listen_port = t.take("listen_port", integer(1024, 65535), link.port_base + index)
    traffic = []
    for tt in t.tables("traffic"):
        proto = tt.take("proto", choice("tcp", "udp"))
        item = Traffic(
            source=tt.path,
            from_zone=tt.take("from", _zone_ref(zones, False)),
            to_zone=tt.take("to", _zone_ref(zones, True)),
            proto=proto,
            ports=tt.take("ports", ports),
            saddr=_addr_list(tt, "saddr"),
            daddr=_addr_list(tt, "daddr"),
        )
        tt.finish()
        if kind in KIND_PROTOS and proto is not None and proto not in KIND_PROTOS[kind]:
            tt.problems.add(f"{tt.path}.proto", f"a {kind} gateway takes {' or '.join(KIND_PROTOS[kind])}, not {proto}")
        if item.from_zone is not None and item.from_zone == item.to_zone:
            tt.problems.add(tt.path, "'from' and 'to' are the same zone: the router never sees that traffic")
        for nets, key in ((item.saddr, "saddr"), (item.daddr, "daddr")):
            if nets and any(n.version != 4 for n in nets):
                tt.problems.add(f"{tt.path}.{key}", "gateway traffic is IPv4 (the processor's double NAT is NAT44)")
        if None not in (item.from_zone, item.to_zone, item.proto, item.ports, item.saddr, item.daddr):
            traffic.append(item)
    if not t.has("traffic"):
        t.problems.add(f"{t.path}.traffic", "a gateway needs at least one [[gateway.traffic]] selector")
    settings = read_settings(kind, t.table("settings")) if kind else None
    t.finish()
    if None in (name, kind, listen_port, settings):
        return None
    if kind == "tunnel":
        _check_tunnel(t, traffic, settings["service_port"])
    return Gateway(t.path, name, kind, listen_port, tuple(traffic), settings)


def _check_tunnel(t: Table, traffic: list[Traffic], service_port: int) -> None:
    """The tunnel's control server terminates its flows (docs/tunnel-protocol.md
    section 19): every selector ends at the router, and the service port must
    reach it over TCP (the channel) and UDP (the UDP channels)."""
    for item in traffic:
        if item.to_zone != ROUTER:
            t.problems.add(f"{item.source}.to", "a tunnel gateway terminates its flows: 'to' must be \"router\"")
    for proto in ("tcp", "udp"):
        if not any(s.proto == proto and any(r.first <= service_port <= r.last for r in s.ports) for s in traffic):
            t.problems.add(
                f"{t.path}.traffic",
                f"no {proto} selector brings settings.service_port {service_port} to the tunnel gateway",
            )


def _check_gateways(gateways: tuple[Gateway | None, ...], problems: Problems) -> None:
    live = [g for g in gateways if g is not None]
    unique([g.name for g in live], "gateway", "gateway name", problems)
    ports_seen: dict[int, str] = {}
    for g in live:
        if g.listen_port in ports_seen:
            problems.add(f"{g.source}.listen_port", f"{g.listen_port} is already used by {ports_seen[g.listen_port]}")
        ports_seen[g.listen_port] = g.source
    selectors = [(g, s) for g in live for s in g.traffic]
    for i, (ga, a) in enumerate(selectors):
        for gb, b in selectors[i + 1 :]:
            if _selectors_overlap(a, b):
                problems.add(
                    f"{b.source}.ports",
                    f"overlaps {a.source} ({a.proto} {', '.join(map(str, a.ports))} from {a.from_zone}): "
                    "a packet could belong to two gateways",
                )


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


def _check_forwards(forwards: tuple[PortForward, ...], problems: Problems) -> None:
    for i, a in enumerate(forwards):
        for b in forwards[i + 1 :]:
            if a.from_zone == b.from_zone and a.proto == b.proto and a.ports.overlaps(b.ports):
                problems.add(f"{b.source}.port", f"{b.proto} {b.ports} overlaps {a.source} ({a.ports})")


def _fullmatch(pattern: str, value: str) -> bool:
    import re

    return re.fullmatch(pattern, value) is not None
