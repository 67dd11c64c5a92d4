"""The packet processor's decisions: pure code, no sockets, no clock, no kernel.

Theory of operation (the seed's figs. 6a-6c, "Connection identification" and
"Packet restoration"; docs/datapath.md walks one flow through it). Only the
first packet of a connection reaches the processor (mangle prerouting, after
conntrack, ``ct state new``); the kernel carries the rest (DESIGN invariant
3). ``ProcessorCore.handle`` takes one such packet and returns a verdict;
whatever else it wants done it appends to ``outbox`` (datagrams),
``nat_ops`` (binding-table elements, written before the verdict) and
``rules.kernel_ops`` (dynamic rules), and the runner carries that out.
Route lookups, interface names, the router's own addresses and conntrack
look-ups come in as plain callables, so tests drive the whole core with
crafted bytes (DESIGN invariant 9, applied to the processor).

Per packet:

- Impossible sources (martians, the router's own addresses) are dropped
  before anything else: no binding, no signalling.
- From the blind track (fig. 6c): a gateway's new connection to F:f is leg B
  of the binding F:f names; its NAT (G:e -> F:f becomes C:c -> S:s) goes into
  the maps. Anything else from the gateways is dropped.
- From outside (fig. 6a): a dynamic rule (``rulebook``) takes it first: a
  REDIRECT expectation opens a binding into the gateway; the SYN of a TCP
  ALLOW's flow is passed to the kernel, which carries the flow, and a
  one-shot ALLOW is used up. Then the selector of step 602: ingress zone,
  protocol, port, addresses. No selector: ``PASS``. The server is the port
  forward's target when the client addressed the router, else the
  destination; a route lookup for it gives the to-zone, which prerouting
  cannot match. Another zone: ``PASS``. The selector's zone: TCP must be a
  bare SYN (step 604) or the packet is dropped as "not a new flow"; then a
  binding, the NEW_FLOW push ahead of the verdict (steps 605-606), and leg
  A's NAT into the maps.

A bound packet is accepted with the ``rewritten`` mark (the forward chain
admits it; the binding table copies it to the connection's mark). A binding
ends when conntrack has destroyed its connections (``conntrack_destroyed``,
from ctnetlink events), or when a check finds them gone (``tick``), or when
its gateway hands it to the kernel (``offloaded``, OFFLOAD_REQUEST): its NAT
elements and both legs' connections go (``unbind_ops``, ``ct_deletes``,
carried out by the runner), and a one-shot ALLOW takes the flow's next packet.

A log-only gateway's flow gets no binding (``_logged``): its first packet is
accepted with the ``rewritten`` mark too, unchanged, so the forward chain
admits it and conntrack marks it as nfgate's, and the kernel carries it to
the server (the ruleset's port forward, masquerade). The gateway gets
NEW_FLOW with no F:f, and, when conntrack destroys the connection, FLOW_END
with the kernel's counters.
``handle`` never raises for any bytes (invariant 10); a packet it cannot use
is dropped and counted by reason.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

from firewall.config import Config
from firewall.config.model import ROUTER, Gateway, PortForward, PortRange, Traffic
from firewall.flows import AgEndpoint, Binding, FlowState, FlowTable
from firewall.flows import Refusal as TableRefusal
from firewall.flows import flow_key, fw_key
from firewall.packet import SYN, TCP, UDP, ACK, FIN, RST, Drop, Packet, parse
from firewall.pools import EndpointPool, SliceBy, Slicing
from firewall.processor.rulebook import RuleBook
from firewall.rules.bind import DNAT_MAP, SNAT_MAP
from gateways.kinds import KINDS
from firewall.signalling import (
    NO_COUNTERS,
    Answer,
    Counters,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Guard,
    Message,
    NewFlow,
    NotFound,
    OffloadRequest,
    Proto,
    Query,
    Received,
    RuleMode,
    RuleRequest,
    make_flow_id,
)

# Verdicts of ``handle``; the runner turns them into NFQUEUE verdicts. Both
# accepts continue at the next hook, so no packet is ever queued twice.
DROP = 0
PASS = 1  # NF_ACCEPT with the mark ``handle`` returns: ``passed`` or ``rewritten``


IFACE_CACHE_SECONDS = 10.0  # how long an ifindex -> zone answer is trusted
# Log-only flows tracked at once (about 200 bytes each); beyond, a flow still
# passes, and its gateway is not told (``flows.logged_untracked``).
MAX_LOGGED_FLOWS = 1 << 20
NO_ENDPOINT = Endpoint(ipaddress.IPv4Address(0), 0)  # NEW_FLOW's F:f of a flow without a binding

_SYN_FLAGS = SYN | ACK | RST | FIN
_BLIND = "\0blind"  # the class of the blind-track ifindex; no zone can have this name
_UNKNOWN = "\0unknown"
_MALFORMED = {reason: f"drop.malformed.{reason.name.lower()}" for reason in Drop}
_A_GONE = int(FlowState.A_GONE)
_B_GONE = int(FlowState.B_GONE)
_A_ALIVE = int(FlowState.A_ALIVE)
# Sources no packet may carry (RFC 1122 3.2.1.3, RFC 5735): "this network",
# loopback, multicast and the reserved class E, which includes broadcast.
MARTIANS = tuple((int(n.network_address), int(n.netmask)) for n in map(ipaddress.IPv4Network, ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3")))
_PROTO = {"tcp": TCP, "udp": UDP}
_PROTO_NAME = {TCP: "tcp", UDP: "udp"}
_IP = ipaddress.IPv4Address

Verdict = tuple[int, None, int]  # (DROP|PASS, unused, mark)
NatOp = tuple[str, str, tuple[int, int, int, int], tuple[int, int]]  # (map, proto, key, value)
CtKey = tuple[int, int, int, int, int]  # (proto, src, sport, dst, dport): a connection's original tuple
CtLookup = Callable[[int, int, int, int, int], bool]  # (proto, src, sport, dst, dport) -> alive


class Route(NamedTuple):
    """What a route lookup says about a destination."""

    local: bool  # one of the router's own addresses
    ifname: str | None  # the output interface
    prefsrc: int | None  # the source the router would use: W, for SNAT


class SnatPools:
    """W:w for leg B through masquerade: one port-sliced pool per egress address.

    ``FlowTable`` draws from one SNAT pool; this stands in for it so that a
    router with several wan addresses SNATs each flow to the address its
    route leaves by: ``prefer(W)`` before ``FlowTable.open`` picks it. A pool
    appears on first use, so an address that changes (DHCP) gets a new one.
    Slices are port slices, contiguous, as the kernel's ``steer_snat`` rules
    cut them.
    """

    def __init__(self, ports: PortRange, instance: int, instances: int) -> None:
        self._ports = ports
        self._instance = instance
        self._instances = instances
        self._pools: dict[int, EndpointPool] = {}
        self._want: EndpointPool | None = None

    def prefer(self, addr: int) -> None:
        pool = self._pools.get(addr)
        if pool is None:
            pool = self._pools[addr] = EndpointPool(
                [_IP(addr)], self._ports, instance=self._instance, instances=self._instances,
                slice_by=SliceBy.PORT, slicing=Slicing.CONTIGUOUS,
            )
        self._want = pool

    def allocate(self) -> tuple[int, int] | None:
        if self._want is None:
            raise ValueError("SnatPools.allocate before prefer(): no egress address chosen")
        return self._want.allocate()

    def release(self, addr: int, port: int) -> None:
        self._pools[addr].release(addr, port)

    def claim(self, addr: int, port: int) -> bool:
        """Mark W:w in use (a binding adopted at start); False if it cannot be this instance's."""
        self.prefer(addr)
        pool = self._want
        assert pool is not None
        if not pool.owns(addr, port) or pool.in_use(addr, port):
            return False
        pool.claim(addr, port)
        return True

    def stats(self) -> dict[str, dict[str, int]]:
        return {str(_IP(a)): pool_stats(p) for a, p in self._pools.items()}


def pool_stats(pool: EndpointPool) -> dict[str, int]:
    return {"used": len(pool), "capacity": pool.capacity, "exhausted": pool.exhausted}


def _nets(nets: Iterable[Any]) -> tuple[tuple[int, int], ...]:
    return tuple((int(n.network_address), int(n.netmask)) for n in nets)


def _in(addr: int, nets: tuple[tuple[int, int], ...]) -> bool:
    return any(addr & mask == net for net, mask in nets)


@dataclass(frozen=True, slots=True)
class _Selector:
    """A gateway traffic selector, precomputed to match ints."""

    traffic: Traffic
    gateway: Gateway
    ag: AgEndpoint
    ports: tuple[tuple[int, int], ...]
    saddr: tuple[tuple[int, int], ...]
    daddr: tuple[tuple[int, int], ...]
    log_only: bool  # the gateway only logs its flows: the kernel carries them, unbound
    adjacent: int | None  # the kind's adjacent-port step (RTP's RTCP): the processor opens it itself

    def matches(self, src: int, dst: int, dport: int) -> bool:
        # The same fields, and the same addresses, as the queue rule (rules.build._selector).
        return (
            any(first <= dport <= last for first, last in self.ports)
            and (not self.saddr or _in(src, self.saddr))
            and (not self.daddr or _in(dst, self.daddr))
        )


class ProcessorCore:
    """One processor instance's state and decisions (module docstring)."""

    def __init__(
        self,
        config: Config,
        instance: int,
        encoder: Encoder,
        guard: Guard,
        *,
        route: Callable[[int], Route | None],
        ifname: Callable[[int], str | None],
        local_addresses: Callable[[], Iterable[ipaddress.IPv4Address]],
        conntrack: CtLookup,
        now: float,
        wall: float,
        push: bool = True,
    ) -> None:
        proc = config.processor
        queues = proc.queues
        if not 0 <= instance < len(queues):
            raise ValueError(f"instance {instance}: processor.queues has {len(queues)} entries")
        self.config = config
        self.instance = instance
        self.queue = queues[instance]
        self.encoder = encoder
        self.guard = guard
        self.push = push  # False only in tests: the gateway layer must then pull
        self._route = route
        self._ifname = ifname
        self.local_addresses = local_addresses
        self._alive = conntrack
        self._local: frozenset[int] = frozenset()
        self._local_until = now - 1.0
        self.nat_ops: list[NatOp] = []
        self.unbind_ops: list[NatOp] = []  # binding elements to delete (an offloaded flow's)
        self.ct_deletes: list[CtKey] = []  # conntrack entries to delete, after ``unbind_ops``
        self._nat_timeout = proc.timeouts.nat_element
        self._now = now  # the monotonic time of the event being handled
        self.wall_offset = wall - now
        self._keep = ~proc.marks.mask & 0xFFFFFFFF
        self._rewritten = proc.marks.rewritten
        self._passed = proc.marks.passed
        self.fw_pool = EndpointPool(
            proc.pools.firewall_side, proc.pools.ports, instance=instance, instances=len(queues),
            slice_by=SliceBy.ADDRESS, slicing=Slicing.CONTIGUOUS,
        )
        self.snat_pools = SnatPools(proc.pools.snat_ports, instance, len(queues))
        # SnatPools has the two methods FlowTable uses of its SNAT pool.
        self.table = FlowTable(proc.timeouts, self.fw_pool, self.snat_pools, now=now)  # type: ignore[arg-type]
        link = config.gateway_link
        self.gateway_address = str(link.gateway_address.ip)
        # Each gateway is its own process on its own signalling port (docs/datapath.md,
        # "Signalling ports"): a flow's pushes go to the gateway it belongs to.
        self.gateway_peers = {g.name: (self.gateway_address, config.gateway_signalling_port(g.name)) for g in config.gateways}
        self._copies = config.signalling.copies
        self._masq = frozenset(config.nat.masquerade)
        self._zone_of_if = {i: z.name for z in config.zones.values() for i in z.interfaces}
        self._selectors: dict[tuple[str, int], list[_Selector]] = {}
        self._agents: dict[tuple[int, int], AgEndpoint] = {}
        for gw in config.gateways:
            ag = AgEndpoint.of(gw.name, link.gateway_address.ip, gw.listen_port)
            self._agents[(ag.addr, ag.port)] = ag
            for t in gw.traffic:
                ports = tuple((r.first, r.last) for r in t.ports)
                kind = KINDS[gw.kind]
                sel = _Selector(t, gw, ag, ports, _nets(t.saddr), _nets(t.daddr),
                                kind.log_only(gw.settings), kind.adjacent_port(gw.settings))
                self._selectors.setdefault((t.from_zone, _PROTO[t.proto]), []).append(sel)
        self._forwards: dict[tuple[str, int], list[tuple[PortForward, tuple[tuple[int, int], ...]]]] = {}
        for f in config.nat.forwards:
            self._forwards.setdefault((f.from_zone, _PROTO[f.proto]), []).append((f, _nets(f.saddr)))
        self._iface: dict[int, str | None] = {}
        self._iface_until = now + IFACE_CACHE_SECONDS

        self.outbox: list[tuple[bytes, tuple[str, int]]] = []
        self.counters: Counter[str] = Counter()
        self.queued = 0  # the two hottest counters live outside the Counter
        self.bound = 0
        self._serial = itertools.count(1)
        self._flows: dict[int, Binding] = {}  # flow id -> binding
        self._flow_of: dict[int, int] = {}  # binding.client_key -> flow id
        # Log-only flows: original tuple -> (flow id, gateway name); their first
        # packets wait in ``_logged_due`` for the confirmation check.
        self._logged: dict[CtKey, tuple[int, str]] = {}
        self._logged_due: deque[tuple[float, CtKey, int]] = deque()
        self.rules = RuleBook(self)

    # ---- packets ----------------------------------------------------------------------

    def handle(self, payload: bytes, mark: int, indev: int, now: float) -> Verdict:
        """The verdict for one queued packet; see the module docstring."""
        self.queued += 1
        pkt = parse(payload)
        if type(pkt) is not Packet:
            return self._drop(_MALFORMED[pkt], mark)  # type: ignore[index]
        if pkt.more_fragments:
            # Conntrack reassembles before mangle: a lone fragment here is broken.
            return self._drop("drop.fragment", mark)
        self._now = now
        where = self._iface.get(indev, _UNKNOWN)
        if where is _UNKNOWN:
            where = self._classify(indev)
        if where == _BLIND:
            return self._leg_b(pkt, mark, now)
        src = pkt.src
        if _in(src, MARTIANS) or src == 0xFFFFFFFF:
            return self._drop("drop.martian", mark)
        if src in self._local_set(now):
            return self._drop("drop.own_address", mark)
        return self._new(pkt, mark, where, now)

    def _local_set(self, now: float) -> frozenset[int]:
        if now >= self._local_until:
            self._local = frozenset(int(a) for a in self.local_addresses())
            self._local_until = now + IFACE_CACHE_SECONDS
        return self._local

    def _bound(self, mark: int) -> Verdict:
        self.bound += 1
        return PASS, None, (mark & self._keep) | self._rewritten

    def _nat(self, proto: int, leg: tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]) -> None:
        key, dnat, snat = leg
        name = _PROTO_NAME[proto]
        self.nat_ops.append((DNAT_MAP, name, key, dnat))
        self.nat_ops.append((SNAT_MAP, name, key, snat))

    def _leg_b(self, pkt: Packet, mark: int, now: float) -> Verdict:
        """A gateway's new connection to F:f: leg B of that binding (the seed's swap)."""
        proto, src, sport, dst, dport, flags = pkt[:6]
        b = self.table.by_firewall_side(proto, dst, dport)
        if b is None or src != b.gateway.addr or sport == b.gateway.port:
            # G:g -> F:f is leg A's reply, which conntrack carries: never new.
            return self._drop("drop.gateway_without_binding", mark)
        if proto == TCP and flags & _SYN_FLAGS != SYN:
            return self._drop("drop.not_new_flow", mark)
        e = b.ag_eport
        if e != sport:
            if b.state & _A_GONE:
                return self._drop("drop.flow_ended", mark)  # the client has gone
            if e is not None and not b.state & _B_GONE:
                f = b.firewall_side
                if self._alive(proto, src, e, f[0], f[1]):
                    return self._drop("drop.leg_b_busy", mark)  # one leg B at a time
            self.table.learn_ag_port(b, sport)
        self._nat(proto, b.leg_b())
        return self._bound(mark)

    def _drop(self, why: str, mark: int) -> Verdict:
        self.counters[why] += 1
        self.counters["verdict.drop"] += 1
        return DROP, None, mark

    def _pass(self, why: str, mark: int) -> Verdict:
        self.counters[why] += 1
        self.counters["verdict.pass"] += 1
        return PASS, None, (mark & self._keep) | self._passed

    def _classify(self, indev: int) -> str | None:
        name = self._ifname(indev)
        where = _BLIND if name == self.config.gateway_link.router_if else self._zone_of_if.get(name or "")
        self._iface[indev] = where
        return where

    def _zone(self, route: Route) -> str | None:
        return ROUTER if route.local else self._zone_of_if.get(route.ifname or "")

    def _new(self, pkt: Packet, mark: int, zone: str | None, now: float) -> Verdict:
        proto, src, sport, dst, dport, flags = pkt[:6]
        first = proto != TCP or flags & _SYN_FLAGS == SYN
        old = self.table.by_client(proto, src, sport, dst, dport)
        if old is not None and self._alive(proto, src, sport, dst, dport):
            # Its connection is in conntrack, with its NAT: a packet of it that
            # conntrack still calls new (the rules return confirmed connections,
            # so this is rare). It belongs to the binding it has.
            self.counters["passed.bound_again"] += 1
            return self._bound(mark)
        if old is not None:
            # A new connection on the tuple of a binding: the old connection is
            # gone (a SYN ended its TIME-WAIT, or its first packet never made it
            # into conntrack). Its binding goes with it; this one gets a fresh F:f.
            self._end(self._flow_of[old.client_key], FlowEndReason.FIN if proto == TCP else FlowEndReason.IDLE)
            self.counters["flows.replaced"] += 1
        if first and (self.rules.expect or self.rules.spent):
            again = self.rules.spent_verdict(proto, src, sport, dst, dport)
            if again:  # a retransmitted SYN of the connection a one-shot ALLOW let through
                return self._pass("passed.allowed", mark)
            rule = self.rules.expected(proto, src, sport, dst, dport, now)
            if rule is not None and rule.mode is RuleMode.ALLOW:
                # A TCP ALLOW's SYN (rulebook, "watched"): the kernel carries the flow,
                # through the rule's DNAT and accept; the processor only counts its use.
                self.rules.allowed(rule, sport, now)
                return self._pass("passed.allowed", mark)
            if again is False:  # another connection on a used one-shot ALLOW
                return self._drop("drop.rule_used", mark)
            if rule is None and self.rules.watched(proto, src, sport, dst, dport):
                return self._drop("drop.rule_expired", mark)  # its TTL ran out; the tick retires it
            if rule is not None:
                route = self._route(rule.server[0])
                if route is None:
                    return self._drop("drop.no_route", mark)
                b = self._open(pkt, rule.gateway, rule.server, route, now)
                if isinstance(b, str):
                    return self._drop(b, mark)
                self.rules.redirected(rule, self._register(b), b)
                self._nat(proto, b.leg_a())
                return self._bound(mark)
        sel = None
        for candidate in self._selectors.get((zone, proto), ()):  # type: ignore[arg-type]
            if candidate.matches(src, dst, dport):
                sel = candidate
                break
        if sel is None:
            return self._pass("passed.not_a_selector", mark)
        route = self._route(dst)
        server = None
        if route is not None and route.local:
            server = self._forward_target(zone, proto, src, dport)  # type: ignore[arg-type]
            if server is not None:
                route = self._route(server[0])
        if route is None:
            return self._pass("passed.no_route", mark)
        if self._zone(route) != sel.traffic.to_zone:
            return self._pass("passed.other_zone", mark)  # fig. 6a: not this gateway's direction
        if not first:
            return self._drop("drop.not_new_flow", mark)
        if sel.log_only:
            return self._log_only(pkt, sel, server, mark, now)
        b = self._open(pkt, sel.ag, server, route, now)
        if isinstance(b, str):
            return self._drop(b, mark)
        fid = self._register(b)
        # A kind whose protocol also uses the port ``step`` beside the selected
        # one: the processor expects that flow itself (seed, "Dynamic changes":
        # "the packet processor part may by itself deduce the other port
        # number(s)"): RTP data on even N, RTCP on N+1 (RFC 3550 section 11);
        # a flow on the odd port (RTCP seen first) gets N below it.
        step = sel.adjacent
        if step is not None:
            step = -step if dport % 2 else step
            self.rules.adjacent(fid, b, step, now, self.config.processor.adjacent_ttl)
        self._nat(proto, b.leg_a())
        return self._bound(mark)

    def _log_only(self, pkt: Packet, sel: _Selector, server: tuple[int, int] | None, mark: int, now: float) -> Verdict:
        """A log-only gateway's flow: no binding; the kernel carries it, and conntrack's end reports it."""
        proto, src, sport, dst, dport = pkt[:5]
        key = (proto, src, sport, dst, dport)
        old = self._logged.pop(key, None)
        if old is not None:
            # A new connection on the tuple of a logged one (a SYN that ended its TIME-WAIT).
            self._end_logged(key, old, NO_COUNTERS)
            self.counters["flows.replaced"] += 1
        self.counters["verdict.logged"] += 1
        verdict = (PASS, None, (mark & self._keep) | self._rewritten)
        if len(self._logged) >= MAX_LOGGED_FLOWS:
            self.counters["flows.logged_untracked"] += 1
            return verdict
        fid = make_flow_id(self.queue, next(self._serial))
        gw = sel.gateway
        self._logged[key] = (fid, gw.name)
        self._logged_due.append((now + self.config.processor.timeouts.confirm, key, fid))
        self.counters["flows.logged"] += 1
        s = server or (dst, dport)
        info = FlowInfo(fid, Proto(proto), gw.name, Endpoint(_IP(src), sport), Endpoint(_IP(dst), dport),
                        Endpoint(_IP(s[0]), s[1]), NO_ENDPOINT, Endpoint(_IP(sel.ag.addr), sel.ag.port))
        self._push(info, gw.name)
        return verdict

    def _end_logged(self, key: CtKey, entry: tuple[int, str], counters: Counters) -> None:
        fid, gateway = entry
        self.counters["flows.ended.logged"] += 1
        reason = FlowEndReason.FIN if key[0] == TCP else FlowEndReason.IDLE
        self.send(FlowEnd(fid, reason, counters), self.gateway_peers[gateway])

    @property
    def watching(self) -> bool:
        """Whether conntrack holds connections whose end the processor waits for."""
        return bool(len(self.table) or self._logged)

    def _forward_target_any(self, proto: int, src: int, dst: int, dport: int) -> tuple[int, int] | None:
        """A port forward's S:s for a flow whose ingress zone is unknown (adoption)."""
        route = self._route(dst)
        if route is None or not route.local:
            return None
        for zone, p in self._forwards:
            if p == proto:
                target = self._forward_target(zone, proto, src, dport)
                if target is not None:
                    return target
        return None

    def _forward_target(self, zone: str, proto: int, src: int, dport: int) -> tuple[int, int] | None:
        """The port forward's S:s for a client that addressed the router, as the DNAT rule has it."""
        for f, saddr in self._forwards.get((zone, proto), ()):
            if f.ports.first <= dport <= f.ports.last and (not saddr or _in(src, saddr)):
                return int(f.to_addr), dport if f.to_port is None else f.to_port
        return None

    def _open(self, pkt: Packet, ag: AgEndpoint, server: tuple[int, int] | None, route: Route, now: float) -> Binding | str:
        """A binding for a new flow, or the counter name of why not."""
        snat = self._zone(route) in self._masq
        if snat:
            if route.prefsrc is None:
                return "drop.no_source_address"
            self.snat_pools.prefer(route.prefsrc)
        if server == (pkt.dst, pkt.dport):
            server = None
        b = self.table.open(pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, ag, now, server=server, snat=snat)
        if isinstance(b, TableRefusal):
            return f"drop.refused.{b.name.lower()}"
        return b

    def _register(self, b: Binding, push: bool = True) -> int:
        fid = make_flow_id(self.queue, next(self._serial))
        self._flows[fid] = b
        self._flow_of[b.client_key] = fid
        if not push:
            return fid
        self.counters["flows.opened"] += 1
        self._push(self.flow_info(fid, b), b.gateway.name)
        return fid

    def _push(self, info: FlowInfo, gateway: str) -> None:
        if self.push:
            # Ahead of the verdict, so the push races ahead of the first packet.
            datagrams = self.encoder.encode_copies(NewFlow(info), self._wall(), self._copies)
            peer = self.gateway_peers[gateway]
            self.outbox += [(d, peer) for d in datagrams]
            self.counters["signalling.sent.new_flow"] += 1
            self.counters["signalling.copies"] += len(datagrams)
        else:
            self.counters["signalling.push_skipped"] += 1

    def binding(self, fid: int) -> Binding | None:
        return self._flows.get(fid)

    def flow_info(self, fid: int, b: Binding) -> FlowInfo:
        """What the gateway layer is told about a flow (NEW_FLOW, ANSWER)."""
        def ep(pair: tuple[int, int]) -> Endpoint:
            return Endpoint(_IP(pair[0]), pair[1])

        g = b.gateway
        return FlowInfo(fid, Proto(b.proto), g.name, ep(b.client), ep(b.original_dst), ep(b.server),
                        ep(b.firewall_side), ep((g.addr, g.port)), ep(b.visible_client) if b.snat else None)

    def _end(self, fid: int, reason: FlowEndReason) -> None:
        """Everything that goes with the end of a binding."""
        b = self._flows.pop(fid)
        del self._flow_of[b.client_key]
        self.table.remove(b)
        self.counters[f"flows.ended.{reason.name.lower()}"] += 1
        self.send(FlowEnd(fid, reason), self.gateway_peers[b.gateway.name])
        self.rules.flow_ended(fid)

    def offloaded(self, fid: int) -> None:
        """The kernel has the offloaded flow's ALLOW (rulebook): the binding goes, and
        with it everything that still sends the flow into the gateway."""
        b = self._flows[fid]
        name = _PROTO_NAME[b.proto]
        legs = [b.leg_a()]
        if b.ag_eport is not None:
            legs.append(b.leg_b())
        for key, dnat, snat in legs:
            # Deleted before the connections: an element still there would
            # bind the flow's next packet into the gateway again.
            self.unbind_ops += [(DNAT_MAP, name, key, dnat), (SNAT_MAP, name, key, snat)]
            self.ct_deletes.append((b.proto, *key))
        self.counters["flows.offloaded"] += 1
        self._end(fid, FlowEndReason.OFFLOADED)

    # ---- time -------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> None:
        """About once a second: confirmation checks, rules and cached replies."""
        self._now = now
        self.wall_offset = wall - now
        table = self.table
        for b in table.due(now):
            self.counters["conntrack.checks"] += 1
            key = b.leg_a()[0]
            if self._alive(b.proto, *key):
                table.confirmed(b)
            else:
                # Its first packet never made it into conntrack: no event will come.
                self.counters["conntrack.never_confirmed"] += 1
                self.leg_gone(b, leg_a=True, now=now)
        self.rules.tick(now)
        due = self._logged_due
        while due and due[0][0] <= now:
            _, key, fid = due.popleft()
            entry = self._logged.get(key)
            if entry is not None and entry[0] == fid and not self._alive(*key):
                # Its first packet never made it into conntrack: no event will come.
                self.counters["conntrack.never_confirmed"] += 1
                self._end_logged(key, self._logged.pop(key), NO_COUNTERS)
        if now >= self._iface_until:
            self._iface.clear()  # interfaces come and go: the blind track is recreated on restarts
            self._iface_until = now + IFACE_CACHE_SECONDS

    # ---- conntrack ----------------------------------------------------------------------

    def conntrack_destroyed(self, proto: int, orig: tuple[int, int, int, int], reply: tuple[int, int, int, int], now: float,
                            counters: Counters = NO_COUNTERS) -> None:
        """Conntrack destroyed a connection with our mark: the end of one leg, or of a logged flow.

        ``orig``/``reply`` are (src, sport, dst, dport) of its two tuples; the
        reply tuple tells a leg A of this binding from an older connection that
        had the same client tuple (a replaced binding). ``counters`` are the
        connection's, for a logged flow's FLOW_END.
        """
        logged = self._logged.pop((proto, *orig), None)
        if logged is not None:
            self._end_logged((proto, *orig), logged, counters)
            return
        src, sport, dst, dport = orig
        b = self.table.by_client(proto, src, sport, dst, dport)
        if b is not None:
            g = b.gateway
            if reply[:2] == (g.addr, g.port) and reply[2:] == b.firewall_side:
                self.leg_gone(b, leg_a=True, now=now)
                return
        b = self.table.by_firewall_side(proto, dst, dport)
        if b is not None and (src, sport) == (b.gateway.addr, b.ag_eport):
            self.leg_gone(b, leg_a=False, now=now)
            return
        self.counters["conntrack.destroy_unknown"] += 1

    def leg_gone(self, b: Binding, *, leg_a: bool, now: float) -> None:
        """One leg of ``b`` is gone from conntrack; the binding ends with its last one."""
        b.state |= _A_GONE if leg_a else _B_GONE
        if not b.ended and leg_a and not b.state & _B_GONE:
            # Leg B started, but did its first packet make it into conntrack?
            key = b.leg_b()[0]
            if not self._alive(b.proto, *key):
                b.state |= _B_GONE
        if b.ended:
            self._end(self._flow_of[b.client_key], FlowEndReason.FIN if b.proto == TCP else FlowEndReason.IDLE)

    def adopt(self, connections: Iterable[Any], now: float) -> int:
        """Rebuild the bindings the kernel carried across a restart; how many.

        ``connections`` are conntrack's entries with nfgate's mark
        (``kernel.Connection``): a leg A answers from G:g to an F:f of this
        instance's slice, a leg B goes from G:e to one. Their pool entries are
        claimed, so no new flow can be given an F:f or W:w that is still in use.
        """
        agents = self._agents
        legs_a: dict[tuple[int, int, int], Any] = {}
        legs_b: dict[tuple[int, int, int], Any] = {}
        for c in connections:
            rsrc, rsport, rdst, rdport = c.reply
            if self.fw_pool.owns(rdst, rdport) and (rsrc, rsport) in agents:
                legs_a[(c.proto, rdst, rdport)] = c
            elif self.fw_pool.owns(c.orig[2], c.orig[3]):
                legs_b[(c.proto, c.orig[2], c.orig[3])] = c
        adopted = 0
        for (proto, f, fport), a in legs_a.items():
            src, sport, dst, dport = a.orig
            ag = agents[(a.reply[0], a.reply[1])]
            leg_b = legs_b.get((proto, f, fport))
            if leg_b is not None and leg_b.orig[0] == ag.addr:
                server, seen_as = leg_b.reply[:2], leg_b.reply[2:]
            else:
                leg_b = None
                server = self._forward_target_any(proto, src, dst, dport) or (dst, dport)
                seen_as = (src, sport)
            state = int(FlowState.A_ALIVE)
            snat = seen_as != (src, sport)
            if leg_b is None:
                route = self._route(server[0])
                if route is not None and self._zone(route) in self._masq and route.prefsrc is not None:
                    self.snat_pools.prefer(route.prefsrc)
                    got = self.snat_pools.allocate()
                    if got is None:
                        self.counters["conntrack.adopt_conflict"] += 1
                        continue
                    seen_as, snat = got, True
            elif snat and not self.snat_pools.claim(*seen_as):
                self.counters["conntrack.adopt_conflict"] += 1
                continue
            if snat:
                state |= int(FlowState.SNAT)
            t = int(now)
            b = Binding(
                flow_key(proto, src, sport, dst, dport),
                flow_key(proto, server[0], server[1], seen_as[0], seen_as[1]),
                fw_key(proto, f, fport), ag, t, t,
                leg_b.orig[1] if leg_b is not None else None, state,
            )
            if not self.table.claim(b):
                if snat:
                    self.snat_pools.release(*seen_as)
                self.counters["conntrack.adopt_conflict"] += 1
                continue
            self._register(b, push=False)
            adopted += 1
        self.counters["flows.adopted"] += adopted
        return adopted

    def resync(self, connections: Iterable[Any], now: float) -> None:
        """Conntrack events were lost: end every binding whose connections are gone."""
        alive = {(c.proto, *c.orig) for c in connections}
        for key in [k for k in self._logged if k not in alive]:
            self._end_logged(key, self._logged.pop(key), NO_COUNTERS)
        for b in list(self._flows.values()):
            if (b.proto, *b.leg_a()[0]) not in alive and b.state & _A_ALIVE:
                self.leg_gone(b, leg_a=True, now=now)
            elif b.ag_eport is not None and (b.proto, *b.leg_b()[0]) not in alive and b.state & _A_GONE:
                self.leg_gone(b, leg_a=False, now=now)
        self.counters["conntrack.resyncs"] += 1

    def kernel_done(self, token: int, ok: bool, now: float) -> None:
        """The runner finished ``rules.kernel_ops`` entry ``token``."""
        self._now = now
        self.rules.kernel_done(token, ok, now)

    # ---- signalling -------------------------------------------------------------------

    def datagram(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """One datagram from the signalling socket: checked, then answered or acted on."""
        self._now = now
        if source[0] != self.gateway_address:
            self.counters["signalling.refused.wrong_source"] += 1
            return
        got = self.guard.check(data, self._wall())
        if not isinstance(got, Received):
            self.counters[f"signalling.refused.{got.name.lower()}"] += 1
            return
        self.counters["signalling.received"] += 1
        msg = got.message
        if isinstance(msg, Query):
            self._query(msg, source)
        elif isinstance(msg, RuleRequest):
            self.rules.request(got, msg, source, now)
        elif isinstance(msg, OffloadRequest):
            self.rules.offload(got, msg, source, now)

    def _query(self, q: Query, source: tuple[str, int]) -> None:
        key = fw_key(q.proto, int(q.firewall_side.address), q.firewall_side.port)
        b = self.table.by_key(key)
        if b is not None and b.fw == key and (b.gateway.addr, b.gateway.port) == (int(q.ag.address), q.ag.port):
            self.counters["queries.answered"] += 1
            self.send(Answer(q.query_id, self.flow_info(self._flow_of[b.client_key], b)), source)
        else:
            self.counters["queries.not_found"] += 1
            self.send(NotFound(q.query_id, q.proto, q.firewall_side, q.ag), source)

    def send(self, msg: Message, to: tuple[str, int]) -> None:
        """Queue one message for ``to``: a request's source, or a gateway's signalling port."""
        self.outbox.append((self.encoder.encode(msg, self._wall()), to))
        self.counters[f"signalling.sent.{msg.TYPE.name.lower()}"] += 1

    def _wall(self) -> float:
        # Messages carry the wall clock of the event that made them.
        return self._now + self.wall_offset

    # ---- reports ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["queued"] = self.queued  # every packet the queue delivered
        counters["verdict.bound"] = self.bound
        return {
            "queue": self.queue,
            "counters": dict(sorted(counters.items())),
            "flows": len(self.table),
            "logged_flows": len(self._logged),
            "flows_per_gateway": self.table.per_gateway(),
            "rules": len(self.rules),
            "kernel_ops_in_flight": self.rules.in_flight,
            "pools": {"firewall_side": pool_stats(self.fw_pool), "snat": self.snat_pools.stats()},
        }

    def flows(self, now: float, limit: int, acct: dict[tuple[int, ...], tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` live bindings as JSON values: ``Binding.record()``, addresses as
        strings, and each leg's packets and bytes from ``acct`` (conntrack's accounting,
        by original tuple) where given."""
        out = []
        wall = now + self.wall_offset
        for fid, b in itertools.islice(self._flows.items(), limit):
            rec = b.record()
            for key in ("client", "original_dst", "server", "firewall_side", "ag", "snat"):
                if rec[key] is not None:
                    rec[key] = f"{rec[key][0]}:{rec[key][1]}"
            rec["proto"] = _PROTO_NAME.get(rec["proto"], str(rec["proto"]))
            rec["state"] = [str(s.name).lower() for s in FlowState if rec["state"] & s]
            rec["flow_id"] = fid
            rec["queue"] = self.queue
            rec["age"] = round(now - b.created, 1)
            rec["created"] = round(wall - (now - b.created), 3)  # Unix seconds
            if acct is not None:
                legs = [(b.proto, *b.leg_a()[0])] + ([(b.proto, *b.leg_b()[0])] if b.ag_eport is not None else [])
                for name, key in zip(("leg_a", "leg_b"), legs):
                    packets, count = acct.get(key, (0, 0))
                    rec[f"{name}_packets"], rec[f"{name}_bytes"] = packets, count
            out.append(rec)
        return out
