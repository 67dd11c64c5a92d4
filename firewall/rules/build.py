"""Build the rule model from a validated config.

The layout (docs/datapath.md explains it, hook by hook):

- ``mangle_prerouting`` (mangle, priority -150: after conntrack, before NAT):
  only the first packet of a connection that can belong to a gateway flow is
  queued (DESIGN invariant 1): a selector's request, and a gateway's new
  connection to the firewall-side pool (leg B). ``ct state new`` is part of
  every queue rule, so an established gateway flow never leaves the kernel:
  the processor writes the flow's binding into the NAT maps of the binding
  table (``firewall.rules.bind``) before its verdict, and conntrack NATs that
  packet and every later one, in both directions (invariant 3). The
  processor's verdict continues at the next hook, so no packet is queued
  twice (invariant 4).
- ``dstnat`` / ``srcnat``: port forwards and masquerade.
- Dynamic rules (what gateways ask for) are elements of the binding table's
  sets; the binding table's own chains mark the packets they name, and the
  static rules here act on the marks: ``expect`` bits send a flow's first
  packet to the processor instance that made the rule, ``allowed`` accepts
  a new connection in forward.
- ``input``, ``forward``, ``output``: the stateful filter, with one regular
  chain per zone pair holding the config's ``[[rule]]`` entries in order.
- With ``policy.fast_path``, the flowtable of ``firewall.rules.fast`` (a
  table of its own) after the forward chain.

With several queues, each flow must reach the one processor instance that
holds its binding. Requests are steered by the low bits of the client's
address; a gateway's leg B by the firewall-side pool slice it connects to.
Replies are never queued: conntrack carries them.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from firewall.config import Config, bucket_count
from firewall.ha import interface_of
from firewall.config.model import ROUTER, FilterRule, PortRange, Traffic
from firewall.rules.model import (
    Accept,
    Addr,
    AddrBits,
    Chain,
    CtConfirmed,
    CtDnat,
    CtMark,
    CtState,
    Dnat,
    Drop,
    DstLocal,
    Family,
    FastPath,
    Hook,
    IcmpType,
    InIface,
    InZone,
    Jump,
    Kind,
    Mark,
    Masquerade,
    Netmap,
    OutIface,
    OutZone,
    Port,
    Proto,
    Queue,
    Reject,
    Return,
    Ruleset,
)

ICMP_ERRORS = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMPV6_ERRORS = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem")
# RFC 4890 section 4.4.1: neighbour discovery must reach the router itself.
ICMPV6_ND = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")


def build(config: Config, stopped: bool = False) -> Ruleset:
    """The ruleset of ``config``; ``stopped``: as it stays while ``nfgate run`` is not running.

    Stopped, the static rules (filter, NAT, port forwards) are the same and
    only the steering changes, per ``processor.fail_mode``: what would be
    queued is dropped (closed) or left to the filter (open).
    """
    rs = Ruleset(zones={z.name: z.interfaces for z in config.zones.values()}, chains=[])
    rs.source = str(config.path) if config.path else ""
    if config.gateways:
        marks = config.processor.marks
        rs.bind = (marks, len(config.processor.queues))
        _steer(config, rs, stopped)
    _nat(config, rs)
    _filter(config, rs)
    if config.policy.fast_path:
        # nfgate's own flows carry these connection-mark bits (docs/datapath.md, "Marks"):
        # they stay off the flowtable, so the processor sees them as it does without it.
        marks = config.processor.marks
        exclude = marks.rewritten | marks.allowed if config.gateways else 0
        rs.fast = FastPath(tuple(i for z in config.zones.values() for i in z.interfaces), exclude)
    return rs


# ---- mangle: steering the first packet of gateway flows into the queues ----------


def _steer(config: Config, rs: Ruleset, stopped: bool) -> None:
    proc = config.processor
    link = config.gateway_link
    chain = Chain("mangle_prerouting", Kind.MANGLE, Hook.PREROUTING)
    rs.chains.append(chain)
    v6 = _any_ipv6(config)
    head = Family.BOTH if v6 else Family.V4
    # Only a connection's first packet can open a binding; the kernel carries
    # the rest. A return, not an accept, leaves the operator's own rules in the
    # built-in chain (iptables) to run.
    chain.add([CtState(("established", "related", "invalid", "untracked"))], [Return()], "conntrack carries established flows", head)
    # A retransmitted SYN, or a second datagram before any reply, is still
    # "new" to conntrack, but its connection already carries its NAT.
    chain.add([CtConfirmed()], [Return()], "conntrack carries a connection after its first packet", head)
    bypass = proc.fail_mode == "open"
    queues = proc.queues
    # Stopped, nobody listens on the queues: say in the ruleset what the
    # kernel would do anyway (drop without bypass, pass with it).

    def send(q: int) -> Queue | Drop | Return:
        if not stopped:
            return Queue(q, bypass)
        return Return() if bypass else Drop()

    # The first packet of a flow a gateway asked for (seed, "Dynamic changes
    # in packet processing"): the binding table's expect chain marked it for
    # the instance that holds the rule.
    marks = proc.marks
    for i, q in enumerate(queues):
        # An IPv6 flow's dynamic rules are the instance's that bound it, as an IPv4 one's.
        chain.add([Mark(marks.expect, marks.expect_value(i))], [send(q)],
                  f"dynamic rules: a flow a gateway asked for, to processor instance {i}", head)
    buckets = bucket_count(len(queues))

    def steer(name: str, comment: str, slices: list[list], family: Family = Family.V4) -> Jump | Queue | Drop | Return:
        """One queue (or stopped): queue directly. Several: a chain of rules, ``len(slices) // buckets``
        consecutive rules for each slice; slice b goes to queue b % instances."""
        if len(queues) == 1 or stopped:
            return send(queues[0])
        sub = Chain(name, Kind.MANGLE)
        rs.chains.append(sub)
        per_slice = len(slices) // buckets
        for i, matches in enumerate(slices):
            b = i // per_slice
            q = queues[b % len(queues)]
            sub.add(matches, [send(q)], f"{comment}: slice {b} -> queue {q}", family)
        return Jump(name)

    low_bits = buckets - 1
    by_src = steer(
        "steer_client_src",
        "request, by the client's address",
        [[AddrBits("src", low_bits, b)] for b in range(buckets)],
    )
    pool = config.own_pool  # with [ha], this node's half (docs/ha.md)
    sub_prefix = pool.prefixlen + (buckets - 1).bit_length()
    by_pool = steer(
        "steer_pool",
        "from the blind track, by firewall-side pool slice",
        [[Addr("dst", (net,))] for net in pool.subnets(new_prefix=sub_prefix)],
    )
    chain.add(
        [InIface(link.router_if), Addr("dst", (pool,))],
        [by_pool],
        "gateway_link: a gateway's new connection to the firewall-side pool (leg B)",
        Family.V4,
    )
    if pool != proc.pools.firewall_side:
        # The peer's half: a leg B whose leg A the peer bound (a failover between the two legs)
        # has no binding here, and forwarded as it is it would leave with the gateway's address.
        chain.add(
            [InIface(link.router_if), Addr("dst", (proc.pools.firewall_side,))],
            [Drop()],
            "gateway_link: a new connection to the pair's other node's half of the pool: its binding is not here",
            Family.V4,
        )
    by_src6: Jump | Queue | Drop | Return = send(queues[0])
    if v6:
        # IPv6 flows are steered as IPv4's: a request by the low bits of the client's
        # address, leg B by the slice of the IPv6 pool that holds F6 (the instance's).
        by_src6 = steer("steer_client_src6", "IPv6 request, by the client's address",
                        [[AddrBits("src", low_bits, b, 6)] for b in range(buckets)], Family.V6)
        pool6 = proc.pools.firewall_side6
        by_pool6 = steer("steer_pool6", "from the blind track, by IPv6 firewall-side pool slice",
                         [[Addr("dst", (net,))] for net in pool6.subnets(new_prefix=pool6.prefixlen + (buckets - 1).bit_length())],
                         Family.V6)
        chain.add(
            [InIface(link.router_if), Addr("dst", (pool6,))],
            [by_pool6],
            "gateway_link: a gateway's new IPv6 connection to the IPv6 firewall-side pool (leg B)",
            Family.V6,
        )
    for g, gw in enumerate(config.gateways):
        for i, t in enumerate(gw.traffic):
            tag = f"{t.source} gateway {gw.name} ({gw.kind})"
            what = "request"
            if t.to_zone == ROUTER:
                # The gateway terminates the flow (the tunnel's server): only a
                # packet for one of the router's own addresses can be its.
                # Routed traffic on these ports stays in the kernel.
                what = "request to the router"
            four, six = t.names(4), gw.takes_ipv6(t)
            if t.allow:
                if four:
                    chain.add(_selector(t, 4), [by_src], f"{tag}: {what}, admitted by the selector (allow = true)", Family.V4)
                if six:
                    chain.add(_selector(t, 6), [by_src6], f"{tag}: IPv6 {what}, admitted by the selector (allow = true)",
                              Family.V6)
                continue
            admit = _admit(config, rs, t, f"admit_g{g}_{i}", by_src if four else None, by_src6 if six else None)
            if four and six and not t.saddr and not t.daddr:
                chain.add(_selector(t), [Jump(admit)], f"{tag}: {what}, if the filter admits it", head)
                continue
            # Addresses of each version in a rule of their own (a selector's IPv6 prefixes, issue 17).
            for version, family, ok in ((4, Family.V4, four), (6, Family.V6, six)):
                if ok:
                    chain.add(_selector(t, version), [Jump(admit)], f"{tag}: {what}, if the filter admits it", family)


def _any_ipv6(config: Config) -> bool:
    """Whether any selector queues IPv6 (``Gateway.takes_ipv6``)."""
    return any(gw.takes_ipv6(t) for gw in config.gateways for t in gw.traffic)


def _admit(config: Config, rs: Ruleset, t: Traffic, name: str, to_queue: Jump | Queue | Drop | Return | None,
           to_queue6: Jump | Queue | Drop | Return | None = None) -> str:
    """The filter's verdict on a selector's first packets, before they are queued.

    The seed's processor filters first and redirects what passes (fig. 6a):
    a selector says which traffic goes through a gateway, the [[rule]]s and
    port forwards say which traffic may pass at all. The chain holds, in the
    filter's own order, the port forwards and the rules of the selector's
    zone pair that can match it: an accept queues the packet, a drop or
    reject returns it to the kernel's filter, which drops or rejects it; the
    chain's end is the pair's policy. So ``nfgate rules`` shows what a
    selector admits, rule by rule.
    """
    chain = Chain(name, Kind.MANGLE)
    rs.chains.append(chain)
    if t.to_zone != ROUTER:
        for f in config.nat.forward:
            if f.from_zone != t.from_zone or f.proto != t.proto or not any(f.ports.overlaps(p) for p in t.ports):
                continue
            queue = to_queue if f.version == 4 else to_queue6
            if queue is None:
                continue  # an IPv6 forward into a selector that takes IPv4 only: _ipv6_drops takes it
            matches: list = [DstLocal(), Proto(f.proto)]
            if f.saddr:
                matches.append(Addr("src", f.saddr))
            matches.append(Port("dst", (f.ports,)))
            chain.add(matches, [queue], f"{t.source} admitted by {f.source} forward {f.name}", _version(f.version))
    for rule in config.rules:
        if (rule.from_zone, rule.to_zone) != (t.from_zone, t.to_zone) or rule.proto not in ("any", t.proto):
            continue
        for family, matches in _rule_matches(rule):
            label = f"{rule.source} {rule.name}".strip()
            for fam, queue in ((Family.V4, to_queue), (Family.V6, to_queue6)):
                if queue is None or family not in (Family.BOTH, fam):
                    continue  # IPv6 only for a selector that takes it
                if rule.action == "accept":
                    chain.add(matches, [queue], f"{t.source} admitted by {label}", fam)
                else:
                    chain.add(matches, [Return()], f"{t.source} refused by {label}: the filter {rule.action}s it", fam)
    policy = config.policy.input if t.to_zone == ROUTER else config.policy.forward
    key = "input" if t.to_zone == ROUTER else "forward"
    if policy == "accept":
        if to_queue is not None:
            chain.add([], [to_queue], f"{t.source} admitted by policy.{key} = accept", Family.V4)
        if to_queue6 is not None:
            chain.add([], [to_queue6], f"{t.source} admitted by policy.{key} = accept", Family.V6)
    return name


def signalling_ports(config: Config) -> PortRange:
    """The processors' signalling ports on the router address (docs/datapath.md)."""
    first = config.processor_signalling_port(0)
    return PortRange(first, config.processor_signalling_port(len(config.processor.queues) - 1))


def _selector(t: Traffic, version: int | None = None) -> list:
    """The prerouting match for a gateway selector's requests: ingress zone, protocol, port,
    and the addresses of IP ``version`` (None: a selector without addresses).

    Prerouting runs before routing, so the 'to' zone cannot be matched here;
    the processor checks it (seed fig. 6a step 602) and passes what does not
    belong to the gateway back to the kernel.
    """
    matches: list = [InZone(t.from_zone), Proto(t.proto)]
    matches += _selector_addrs(t, version)
    matches.append(Port("dst", t.ports))
    if t.to_zone == ROUTER:
        matches.append(DstLocal())
    return matches


def _selector_addrs(t: Traffic, version: int | None, original: bool = False) -> list:
    """A selector's source and destination prefixes of one IP version, as matches
    (``original``: the connection's original destination, before any DNAT)."""
    out: list = []
    saddr = tuple(n for n in t.saddr if n.version == version)
    daddr = tuple(n for n in t.daddr if n.version == version)
    if saddr:
        out.append(Addr("src", saddr))
    if daddr:
        out.append(Addr("dst", daddr, original))
    return out


# ---- nat ---------------------------------------------------------------------------


def _version(version: int) -> Family:
    return Family.V4 if version == 4 else Family.V6


def _nat(config: Config, rs: Ruleset) -> None:
    if config.nat.forward or config.nat.npt6:
        dst = Chain("dstnat", Kind.NAT, Hook.PREROUTING)
        rs.chains.append(dst)
        for f in config.nat.forward:
            matches: list = [InZone(f.from_zone), DstLocal(), Proto(f.proto)]
            if f.saddr:
                matches.append(Addr("src", f.saddr))
            matches.append(Port("dst", (f.ports,)))
            target = None if f.to_port is None else PortRange(f.to_port, f.to_port)
            dst.add(matches, [Dnat(f.to_addr, target)], f"{f.source} forward {f.name}", _version(f.version))
    # NPTv6 inbound: a port forward of the same address came first.
    for n in config.nat.npt6:
        dst.add([InZone(n.zone), Addr("dst", (n.outside,))], [Netmap("dst", n.outside, n.inside)],
                f"{n.source} npt6 {n.name}".strip(), Family.V6)
    if config.nat.masquerade or config.nat.masquerade6 or config.nat.npt6:
        src = Chain("srcnat", Kind.NAT, Hook.POSTROUTING)
        rs.chains.append(src)
    snat = config.processor.pools.snat_ports
    for zone in config.nat.masquerade:
        tag = f"nat.masquerade {zone}"
        if config.gateways:
            # Keep the kernel's masquerade ports clear of the processor's SNAT pool.
            below = PortRange(1024, snat.first - 1)
            for proto in ("tcp", "udp"):
                src.add(
                    [OutZone(zone), Proto(proto)],
                    [Masquerade(below)],
                    f"{tag}: {proto} below processor.pools.snat_ports",
                    Family.V4,
                )
        src.add([OutZone(zone)], [Masquerade()], tag, Family.V4)
    # The prefix translation before any masquerade of its zone, which would
    # take its hosts' connections first.
    for n in config.nat.npt6:
        src.add([OutZone(n.zone), Addr("src", (n.inside,))], [Netmap("src", n.inside, n.outside)],
                f"{n.source} npt6 {n.name}".strip(), Family.V6)
    # NAT66 only where the operator asks: IPv6 is routed untranslated
    # otherwise. A gateway flow's leg B into the zone takes W6:w of the
    # processor's SNAT pool (processor/six.py), so the kernel's masquerade
    # keeps below it, as for IPv4.
    for zone in config.nat.masquerade6:
        tag = f"nat.masquerade6 {zone}"
        if any(gw.takes_ipv6(t) for gw in config.gateways for t in gw.traffic):
            below = PortRange(1024, snat.first - 1)
            for proto in ("tcp", "udp"):
                src.add([OutZone(zone), Proto(proto)], [Masquerade(below)],
                        f"{tag}: {proto} below processor.pools.snat_ports", Family.V6)
        src.add([OutZone(zone)], [Masquerade()], tag, Family.V6)


# ---- filter ------------------------------------------------------------------------


def _filter(config: Config, rs: Ruleset) -> None:
    pol = config.policy
    marks = config.processor.marks
    link = config.gateway_link
    gateways = bool(config.gateways)

    inp = Chain("input", Kind.FILTER, Hook.INPUT, pol.input)
    fwd = Chain("forward", Kind.FILTER, Hook.FORWARD, pol.forward)
    out = Chain("output", Kind.FILTER, Hook.OUTPUT, pol.output)
    rs.chains += [inp, fwd, out]

    inp.add([InIface("lo")], [Accept()], "loopback")
    out.add([OutIface("lo")], [Accept()], "loopback")
    _ipv6_drops(config, rs, inp, fwd)
    bound = Family.BOTH if _any_ipv6(config) else Family.V4
    if gateways:
        fwd.add(
            [Mark(marks.mask, marks.rewritten)],
            [Accept()],
            "first packet of a gateway flow: the processor checked the policy and bound it",
            bound,
        )
        # A UDP flow that no reply has answered yet (one-way media) stays
        # "new" to conntrack, so established does not cover its later packets.
        fwd.add(
            [CtMark(marks.rewritten, marks.rewritten)],
            [Accept()],
            "later packets of a gateway flow before its first reply (one-way UDP): the processor bound it",
            bound,
        )
    for chain in (inp, fwd, out):
        _stateful(chain, config)
    if gateways:
        fwd.add([Mark(marks.allowed, marks.allowed), CtState(("new",))], [Accept()],
                "dynamic rules: a flow a gateway asked the kernel to carry", bound)
    if pol.icmp_essential:
        for chain in (inp, fwd, out):
            chain.add([Proto("icmp"), IcmpType(ICMP_ERRORS)], [Accept()], "policy.icmp_essential", Family.V4)
            chain.add([Proto("icmpv6"), IcmpType(ICMPV6_ERRORS)], [Accept()], "policy.icmp_essential", Family.V6)
        for chain in (inp, out):
            chain.add([Proto("icmpv6"), IcmpType(ICMPV6_ND)], [Accept()], "policy.icmp_essential: RFC 4890 ND", Family.V6)
    for zone in pol.ping_from:
        inp.add([InZone(zone), Proto("icmp"), IcmpType(("echo-request",))], [Accept()], f"policy.ping_from {zone}", Family.V4)
        inp.add([InZone(zone), Proto("icmpv6"), IcmpType(("echo-request",))], [Accept()], f"policy.ping_from {zone}", Family.V6)
    if config.ha is not None:
        _ha_input(config, inp)

    if gateways:
        # The blind track carries signalling to the processor and nothing else
        # to the router itself (DESIGN invariant 5).
        sig = signalling_ports(config)
        inp.add(
            [InIface(link.router_if), Addr("dst", (ipaddress.ip_network(link.router_address.ip),)), Proto("udp"), Port("dst", (sig,))],
            [Accept()],
            "signalling from the gateways",
            Family.V4,
        )
        out.add([OutIface(link.router_if), Proto("udp")], [Accept()], "signalling to the gateways", Family.V4)
        if _any_ipv6(config):
            # IPv6 gateway flows cross the link: its neighbours must resolve, whatever
            # policy.icmp_essential says (IPv4's ARP is no business of the filter).
            inp.add([InIface(link.router_if), Proto("icmpv6"), IcmpType(ICMPV6_ND)], [Accept()],
                    "gateway_link: neighbour discovery for IPv6 gateway flows", Family.V6)
            out.add([OutIface(link.router_if), Proto("icmpv6"), IcmpType(ICMPV6_ND)], [Accept()],
                    "gateway_link: neighbour discovery for IPv6 gateway flows", Family.V6)

    for f in config.nat.forward:
        matches: list = [InZone(f.from_zone), CtDnat(), Addr("dst", (ipaddress.ip_network(f.to_addr),)), Proto(f.proto)]
        if f.saddr:
            matches.append(Addr("src", f.saddr))
        matches.append(Port("dst", (f.target_ports,)))
        fwd.add(matches, [Accept()], f"{f.source} forward {f.name}", _version(f.version))

    if gateways and config.processor.fail_mode == "open":
        # With the processor gone, the queue rules' bypass hands these packets
        # to the kernel unchanged and tracked: what a selector admits by its
        # own allow passes directly.
        for gw in config.gateways:
            for t in gw.traffic:
                if t.to_zone == ROUTER or not t.allow:
                    continue  # without allow, the filter's own rules already decide
                if not t.names(4):
                    continue
                matches = [InZone(t.from_zone), OutZone(t.to_zone)] + _selector(t, 4)[1:]
                fwd.add(matches, [Accept()], f"{t.source} gateway {gw.name}: fail open", Family.V4)

    _zone_chains(config, rs, inp, fwd, out)

    for chain, key in ((inp, "input"), (fwd, "forward"), (out, "output")):
        if chain.policy == "drop":
            chain.add([], [Drop()], f"policy.{key} = drop")


IPV6_COUNTER = "ipv6_drop_g{g}_{i}"


def ipv6_counter(g: int, i: int) -> str:
    """The named counter of selector ``i`` of gateway ``g``'s dropped IPv6."""
    return IPV6_COUNTER.format(g=g, i=i)


def _ipv6_drops(config: Config, rs: Ruleset, inp: Chain, fwd: Chain) -> None:
    """Drop the IPv6 on a selector's ports that did not pass its gateway, counted by name.

    Only a kind that takes IPv6 (``Gateway.takes_ipv6``) has its selectors'
    IPv6 queued (``_steer``): bound, it leaves by the blind track, so this
    rule sees only what skipped the gateway. Every other selector's IPv6
    meets it first. Left to the filter, a rule that accepts the same traffic for both IP versions
    would let its IPv6 part skip the gateway (issue 17). So every selector
    drops the first packet of an IPv6 connection on its ports, first thing
    in the chain that sees it: forward for a selector to a zone (after
    routing, so the to-zone is known; the connection's original port, so a
    port forward does not hide it), input for one to the router. A
    selector whose addresses are IPv4 only says nothing of IPv6 clients: all
    of the zone pair's IPv6 on those ports is dropped; one that takes IPv6
    drops only the IPv6 its prefixes name, if it has any. Where an IPv4 port
    forward of the selector's zone takes its ports, the same IPv6 to the
    router's own address (no IPv6 forward there: the input chain's) is
    dropped under the same counter, so that a client of the forwarded port
    over IPv6 is counted, not left to time out unexplained.
    """
    for g, gw in enumerate(config.gateways):
        for i, t in enumerate(gw.traffic):
            name = ipv6_counter(g, i)
            if gw.takes_ipv6(t):
                # Its IPv6 is queued and bound into the gateway: leg A leaves by the
                # blind track, never to the to-zone. What still matches here did
                # not pass the gateway (fail-open bypass, a passed packet): dropped.
                comment = f"{t.source} gateway {gw.name} ({gw.kind}): IPv6 that skipped the gateway dropped"
            else:
                comment = f"{t.source} gateway {gw.name} ({gw.kind}): IPv6 dropped, gateways take IPv4 only"
            rs.counters[name] = comment
            matches: list = [InZone(t.from_zone)]
            chain = inp
            if t.to_zone != ROUTER:
                matches.append(OutZone(t.to_zone))
                chain = fwd
            # A selector that takes IPv6 names its IPv6 by its prefixes, if it has any: IPv6
            # it does not name is the filter's, as IPv4 it does not name is.
            named = _selector_addrs(t, 6, original=True) if gw.takes_ipv6(t) else []
            # An offloaded flow's direct connection (docs/datapath.md, "Offload") skips the
            # gateway because the gateway asked: the ``allowed`` mark of its one-shot ALLOW,
            # set by the binding table's allow chain before this one, is no bypass.
            asked = [Mark(config.processor.marks.allowed, 0)] if gw.takes_ipv6(t) and chain is fwd else []
            if gw.takes_ipv6(t) and gw.log_only:
                # A log-only flow's first packet leaves to the to-zone unchanged, with the
                # processor's ``rewritten`` mark (docs/datapath.md, "Log-only gateways").
                asked.append(Mark(config.processor.marks.rewritten, 0))
            matches += [*named, *asked, CtState(("new",)), Proto(t.proto), Port("dst", t.ports, original=True)]
            chain.add(matches, [Drop()], comment, Family.V6, counter=name)
            if t.to_zone != ROUTER and any(f.from_zone == t.from_zone and f.proto == t.proto
                                           and any(f.ports.overlaps(p) for p in t.ports) for f in config.nat.forwards):
                inp.add([InZone(t.from_zone), *named, DstLocal(), CtState(("new",)), Proto(t.proto), Port("dst", t.ports)],
                        [Drop()], f"{comment} (to the router's port forward)", Family.V6, counter=name)


def _ha_input(config: Config, inp: Chain) -> None:
    """The pair's own traffic (docs/ha.md): VRRP adverts from either node on each
    virtual address's interface, and conntrackd's sync on the sync link."""
    ha = config.ha
    assert ha is not None
    for key in ha.virtual:
        nodes = tuple(ipaddress.ip_network(n.addresses[key]) for n in ha.nodes.values())
        inp.add([InIface(interface_of(config, key)), Proto("vrrp"), Addr("src", nodes)], [Accept()],
                f"ha.virtual.{key}: VRRP adverts of the pair", Family.V4)
    syncs = tuple(ipaddress.ip_network(n.sync_address) for n in ha.nodes.values())
    inp.add([InIface(ha.sync_interface), Proto("udp"), Addr("src", syncs),
             Port("dst", (PortRange(ha.sync_port, ha.sync_port),))], [Accept()],
            "ha.sync_interface: conntrackd's sync", Family.V4)


def _stateful(chain: Chain, config: Config) -> None:
    pol = config.policy
    if pol.established_related:
        chain.add([CtState(("established", "related"))], [Accept()], "policy.established_related")
    if pol.drop_invalid:
        chain.add([CtState(("invalid",))], [Drop()], "policy.drop_invalid")


def _zone_chains(config: Config, rs: Ruleset, inp: Chain, fwd: Chain, out: Chain) -> None:
    """One regular chain per (from, to) pair that has rules, in config order."""
    pairs: dict[tuple[str, str], list[FilterRule]] = {}
    for rule in config.rules:
        pairs.setdefault((rule.from_zone, rule.to_zone), []).append(rule)
    for (src, dst), rules in pairs.items():
        if dst == ROUTER:
            name, parent, matches = f"in_{src}", inp, [InZone(src)]
        elif src == ROUTER:
            name, parent, matches = f"out_{dst}", out, [OutZone(dst)]
        else:
            name, parent, matches = f"fwd_{src}_{dst}", fwd, [InZone(src), OutZone(dst)]
        chain = Chain(name, Kind.FILTER)
        rs.chains.append(chain)
        parent.add(matches, [Jump(name)], f"rules from {src} to {dst}")
        for rule in rules:
            for family, matches_ in _rule_matches(rule):
                verdict = {"accept": Accept(), "drop": Drop(), "reject": Reject()}[rule.action]
                label = f"{rule.source} {rule.name}".strip()
                chain.add(matches_, [verdict], label, family)


def _rule_matches(rule: FilterRule) -> Iterable[tuple[Family, list]]:
    """Split a rule by IP version where its addresses or protocol demand it."""
    versions = {n.version for n in rule.saddr + rule.daddr}
    if rule.proto == "icmp":
        versions = {4}
    elif rule.proto == "icmpv6":
        versions = {6}
    for version in sorted(versions) or [None]:
        matches: list = []
        if rule.proto != "any":
            matches.append(Proto(rule.proto))
        saddr = tuple(n for n in rule.saddr if version is None or n.version == version)
        daddr = tuple(n for n in rule.daddr if version is None or n.version == version)
        if rule.saddr and not saddr or rule.daddr and not daddr:
            continue  # this IP version has no addresses on one side: nothing to match
        if saddr:
            matches.append(Addr("src", saddr))
        if daddr:
            matches.append(Addr("dst", daddr))
        if rule.ports:
            matches.append(Port("dst", rule.ports))
        family = Family.BOTH if version is None else (Family.V4 if version == 4 else Family.V6)
        yield family, matches
