"""The packet processor's decisions: pure code, no sockets, no clock, no kernel.

Theory of operation (the seed's figs. 6a-6c, "Connection identification" and
"Packet restoration"; docs/datapath.md walks one flow through it). Only the
first packet of a connection reaches the processor (mangle prerouting, after
conntrack, ``ct state new``); the kernel carries the rest (DESIGN invariant
3). ``ProcessorCore.handle`` takes one such packet and returns its verdict
with the binding-table elements to write before it. Whatever else an entry
point wants done (datagrams, dynamic rules' kernel operations, an offloaded
flow's elements and connections to delete) waits in the core's ``Outputs``
until the runner takes it (``take``) and carries it out. The dynamic rules
(``rulebook``) know nothing of the core: they return their commands as
data, and the core carries them out.
The config's selectors and port forwards are matched by ``policy``, the
log-only flows tracked by ``logged``. Route lookups, interface names, the
router's own addresses and conntrack look-ups come in as plain callables, so tests drive the whole core with
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
elements and leg A's connection go (``Outputs.unbind``,
``Outputs.ct_deletes``), and a one-shot ALLOW takes the flow's next packet,
whose verdict waits for leg B's connection to go (held till then, so what
the gateway still relays reaches the server); the kernel then carries that
connection for the gateway, reported like a log-only flow's.

A log-only gateway's flow gets no binding (``logged``): its first packet is
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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from firewall.config import Config
from firewall.config.model import ROUTER
from firewall.flows import AgEndpoint, Binding, FlowState, FlowTable
from firewall.flows import Refusal as TableRefusal
from firewall.flows import flow_key, fw_key
from firewall.packet import SYN, TCP, UDP, ACK, FIN, RST, Drop, Packet, parse
from firewall.pools import EndpointPool, SliceBy, Slicing, SnatPools, pool_stats
from firewall.processor.logged import CtKey, Ending, LoggedFlows, flow_info, kernel_flow_info
from firewall.processor.policy import MARTIANS, Policy, Selector, inside
from firewall.packet6 import parse6
from firewall.processor.six import Binding6, SixFlows, martian6
from firewall.processor.rulebook import Command, DeleteConnection, DynRule, KernelOp, Offloaded, RuleBook, Send
from firewall.processor.spread import Spread
from firewall.rules.bind import DNAT6_MAP, DNAT_MAP, LEGB_DNAT_MAP, LEGB_SNAT_MAP, SNAT6_MAP, SNAT_MAP
from firewall.signalling import (
    NO_COUNTERS,
    first_serial,
    Answer,
    Counters,
    Encoder,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Guard,
    Message,
    NewFlow,
    NotFound,
    OffloadRequest,
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
# On a pair's node that takes bindings over: how long after a leg's destroy event it is looked up
# again (``_leg_destroyed``); the look-up runs at the first tick (a second apart) after that.
HA_DESTROY_RECHECK = 0.5

_SYN_FLAGS = SYN | ACK | RST | FIN
_BLIND = "\0blind"  # the class of the blind-track ifindex; no zone can have this name
_UNKNOWN = "\0unknown"
_MALFORMED = {reason: f"drop.malformed.{reason.name.lower()}" for reason in Drop}
_A_GONE = int(FlowState.A_GONE)
_B_GONE = int(FlowState.B_GONE)
_A_ALIVE = int(FlowState.A_ALIVE)
_AHEAD = int(FlowState.LEG_B_AHEAD)
_B_WRITTEN = int(FlowState.LEG_B_WRITTEN)
_PROTO_NAME = {TCP: "tcp", UDP: "udp"}

NatOp = tuple[str, str, tuple[int, ...], tuple[int, int]]  # (map, proto, key, value)
# (DROP|PASS, the binding-table elements to write before the verdict, mark)
Verdict = tuple[int, tuple[NatOp, ...], int]
CtLookup = Callable[[int, int, int, int, int], bool]  # (proto, src, sport, dst, dport) -> alive


@dataclass(slots=True)
class Outputs:
    """What the core's entry points want done besides verdicts, in the order the runner
    carries it out: kernel operations (each answered with ``kernel_done``), then the
    binding elements and connections to delete, then the datagrams."""

    kernel_ops: list[KernelOp] = field(default_factory=list)
    unbind: list[NatOp] = field(default_factory=list)  # binding elements to delete (an offloaded flow's)
    ct_deletes: list[CtKey] = field(default_factory=list)  # conntrack entries to delete, after ``unbind``
    datagrams: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.kernel_ops or self.unbind or self.ct_deletes or self.datagrams)


class Route(NamedTuple):
    """What a route lookup says about a destination."""

    local: bool  # one of the router's own addresses
    ifname: str | None  # the output interface
    prefsrc: int | None  # the source the router would use: W, for SNAT


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
        local_addresses6: Callable[[], Iterable[ipaddress.IPv6Address]] = lambda: (),
        closing: CtLookup = lambda *_: False,
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
        # With [ha], True while this node is backup or in fault (the runner reads the notify
        # script's state file): the bindings the node loses then (its table flushed as it
        # steps back) go on at the peer, so their gateways are not told they ended (docs/ha.md).
        self.standby = False
        # The flow ids of the bindings it lost meanwhile, by client tuple: should it take one over
        # again (``adopt``), it is the same flow under the same id to its gateway, not a new one
        # that would replace it (and close its connection). Cleared at each takeover.
        self._let_go: dict[int, int] = {}
        self._route = route
        self._ifname = ifname
        self.local_addresses = local_addresses
        self._alive = conntrack
        self._closing = closing  # a TCP connection of this original tuple past ESTABLISHED
        self._local: frozenset[int] = frozenset()
        self._local_until = now - 1.0
        self._out = Outputs()
        # How long after its binding opened leg B's first packet still finds the
        # elements written with leg A's (their timeout, less a second for the
        # whole-second clock of ``Binding.created`` and one for the kernel's rounding).
        self._ahead_for = proc.timeouts.nat_element - 2
        self._element_for = proc.timeouts.nat_element + 1  # a written element may still be in the kernel
        # How long a binding whose leg A conntrack has not shown yet is taken to be
        # waiting for its first packet's verdict or confirmation (``_new``).
        self._young_for = proc.timeouts.confirm
        self._now = now  # the monotonic time of the event being handled
        self.wall_offset = wall - now
        self._keep = ~proc.marks.mask & 0xFFFFFFFF
        self._rewritten = proc.marks.rewritten
        self._passed = proc.marks.passed
        # With [ha], this node's half of the pool (``Config.own_pool``), then this instance's slices of it.
        self.fw_pool = EndpointPool(
            config.own_pool, proc.pools.ports, instance=instance, instances=len(queues),
            slice_by=SliceBy.ADDRESS, slicing=Slicing.CONTIGUOUS,
        )
        # With [ha] and the gateways on their own host, the peer's matching slice of its half: the
        # F:f of the peer's bindings this node takes over when it becomes master (``adopt``).
        peer = config.peer_pool
        self.peer_pool = None if peer is None else EndpointPool(
            peer, proc.pools.ports, instance=instance, instances=len(queues),
            slice_by=SliceBy.ADDRESS, slicing=Slicing.CONTIGUOUS,
        )
        self.snat_pools = SnatPools(proc.pools.snat_ports, instance, len(queues))
        # SnatPools has the two methods FlowTable uses of its SNAT pool.
        self.table = FlowTable(proc.timeouts, self.fw_pool, self.snat_pools, now=now,  # type: ignore[arg-type]
                               peer_pool=self.peer_pool)
        self._rechecks: list[tuple[float, Binding, bool, tuple[int, ...]]] = []  # ``_leg_destroyed``
        link = config.gateway_link
        self.gateway_address = str(link.gateway_address.ip)
        # Each gateway is its own process on its own signalling port (docs/datapath.md,
        # "Signalling ports"): a flow's pushes go to the gateway it belongs to.
        self.gateway_peers = {g.name: (self.gateway_address, config.gateway_signalling_port(g.name)) for g in config.gateways}
        self._copies = config.signalling.copies
        self._masq = frozenset(config.nat.masquerade)
        self._masq6 = frozenset(config.nat.masquerade6)
        self._zone_of_if = {i: z.name for z in config.zones.values() for i in z.interfaces}
        self.policy = Policy(config)
        # A gateway of several workers: which one takes a new flow (spread.py); a
        # binding's own worker is its AgEndpoint, and that worker's ``peer`` its signalling.
        self.spread = Spread(self.policy.workers)
        self._iface: dict[int, str | None] = {}
        self._iface_until = now + IFACE_CACHE_SECONDS

        self.counters: Counter[str] = Counter()
        self.queued = 0  # the two hottest counters live outside the Counter
        self.bound = 0
        self._serial = itertools.count(first_serial(config.node_index))  # a pair's two nodes' ids never collide
        self._flows: dict[int, Binding] = {}  # flow id -> binding
        self._flow_of: dict[int, int] = {}  # binding.client_key -> flow id
        # A replaced binding's leg B connection, deleted at the new binding's leg B (or at its
        # end, if that never comes): (proto, F, f) of the new binding -> the old leg B's tuple.
        # ``_replacing`` carries it from the replacement to the new binding's ``_register``.
        self._stale_legs: dict[tuple[int, int, int], tuple[int, int, int, int, int]] = {}
        self._replacing: tuple[int, int, int, int, int] | None = None
        self.logged = LoggedFlows(proc.timeouts.confirm, self.counters)
        # IPv6 flows are steered as IPv4 ones (firewall.rules.build): each instance has its own.
        self.six = SixFlows(config, instance, self.policy, self.counters, local_addresses=local_addresses6,
                            snat_pools=self.snat_pools) \
            if any(g.takes_ipv6(t) for g in config.gateways for t in g.traffic) else None
        self.rules = RuleBook(
            config, instance, self.queue, counters=self.counters, gateway_peers=self.gateway_peers,
            binding=self.binding, local_addresses=local_addresses, gateway_at=self.spread.peers(),
            local_addresses6=local_addresses6,
        )

    def take(self) -> Outputs:
        """What the entry points called since the last ``take`` want done (``Outputs``)."""
        out, self._out = self._out, Outputs()
        return out

    def _carry(self, commands: list[Command]) -> None:
        """Carry out the rulebook's commands, in order."""
        for c in commands:
            if type(c) is Send:
                self.send(c.msg, c.to)
            elif type(c) is KernelOp:
                self._out.kernel_ops.append(c)
            elif type(c) is Offloaded:
                self.offloaded(c.flow_id, c.rule)
            elif type(c) is DeleteConnection:
                self._out.ct_deletes.append(c.key)
            else:
                raise TypeError(f"not a rulebook command: {c!r}")

    def _ended(self, endings: list[Ending]) -> None:
        for msg, gateway in endings:
            self.send(msg, self.gateway_peers[gateway])

    # ---- packets ----------------------------------------------------------------------

    def handle(self, payload: bytes, mark: int, indev: int, now: float) -> Verdict:
        """The verdict for one queued packet; see the module docstring."""
        self.queued += 1
        if payload and payload[0] >> 4 == 6 and self.six is not None:
            return self._handle6(payload, mark, indev, now)
        # Headers only: the copy of a packet above the queue's copy range is
        # cut short, and a verdict never changes a payload (issue 14 F).
        pkt = parse(payload, whole=False)
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
        if inside(src, MARTIANS) or src == 0xFFFFFFFF:
            return self._drop("drop.martian", mark)
        if src in self._local_set(now):
            return self._drop("drop.own_address", mark)
        try:
            return self._new(pkt, mark, where, now)
        finally:
            stale = self._replacing
            if stale is not None:
                # No new binding took the replaced one's leg B (the new connection went
                # elsewhere, or was refused): it goes now, before this packet's verdict.
                self._replacing = None
                self._delete_stale(stale)

    def _handle6(self, payload: bytes, mark: int, indev: int, now: float) -> Verdict:
        """An IPv6 first packet (``six``): from the blind track leg B (or the gateway's own
        connection an ORIGINATE expects); from a zone, what a dynamic rule names, else a
        selector's request."""
        six = self.six
        assert six is not None
        pkt = parse6(payload)
        if type(pkt) is not Packet:
            return self._drop(f"drop.malformed6.{pkt.name.lower()}", mark)  # type: ignore[union-attr]
        if pkt.more_fragments:
            return self._drop("drop.fragment", mark)
        self._now = now
        where = self._iface.get(indev, _UNKNOWN)
        if where is _UNKNOWN:
            where = self._classify(indev)
        if where == _BLIND:
            if self.rules.expect and six.by_firewall_side(pkt.proto, pkt.dst, pkt.dport) is None:
                rule = self.rules.expected(*pkt[:5], now)
                if rule is not None and rule.mode is RuleMode.ORIGINATE:
                    return self._originate(rule, pkt, mark)
            why, ops = six.leg_b(pkt, self._alive, now, self._closing)
            self._six_ended()  # a closing leg B it let go of (``closing_legs``)
            if why != "bound":
                return self._drop(why, mark)
            self.bound += 1
            return PASS, ops, (mark & self._keep) | self._rewritten
        proto, src, sport, dst, dport = pkt[:5]
        if martian6(src) or martian6(dst):
            return self._drop("drop.martian", mark)
        if six.own(src):
            return self._drop("drop.own_address", mark)
        if (self.rules.expect or self.rules.spent) and (proto != TCP or pkt.flags & _SYN_FLAGS == SYN):
            verdict = self._by_rule(pkt, mark, now)
            if verdict is not None:
                return verdict
        sel = self.policy.selector(where, proto, src, dst, dport, six=True)
        if sel is None:
            return self._pass("passed.not_a_selector", mark)
        route = self._route(dst)
        server = None
        if route is not None and route.local:
            # An IPv6 port forward (DNAT66) into the gateway: its target is the server.
            server = self.policy.forward_target(where, proto, src, dport, six=True)  # type: ignore[arg-type]
            if server is not None:
                route = self._route(server[0])
        if route is None:
            return self._pass("passed.no_route", mark)
        if sel.log_only and sel.gateway.takes_ipv6(sel.traffic):
            # As for IPv4 (``_new``): no binding, the kernel carries it.
            if self._zone(route) != sel.traffic.to_zone:
                return self._pass("passed.other_zone", mark)
            if proto == TCP and pkt.flags & _SYN_FLAGS != SYN:
                return self._drop("drop.not_new_flow", mark)
            return self._log_only(pkt, sel, server, mark, now)
        why, b, ops = six.request(pkt, sel, where, self._zone(route), self.spread.pick(sel.ag), now, next(self._serial),
                                  server, route.prefsrc)
        self._six_ended()
        if b is None:
            return self._pass(why, mark) if why.startswith("passed.") else self._drop(why, mark)
        if why == "bound":
            self._push(six.info(b), b.ag.name, b.ag.peer)
            self._adjacent(sel, dport, b.fid, b, now)
        self.bound += 1
        return PASS, ops, (mark & self._keep) | self._rewritten

    def _redirect6(self, rule: DynRule, pkt: Packet, mark: int, route: Route, now: float) -> Verdict:
        """An IPv6 first packet that a REDIRECT expects: a binding into the rule's gateway worker."""
        six = self.six
        assert six is not None
        why, b, ops = six.redirect(pkt, rule.server, self._zone(route), rule.gateway, now, next(self._serial),
                                   route.prefsrc)
        self._six_ended()
        if b is None:
            return self._drop(why, mark)
        if why == "bound":
            self._push(b.info(), b.ag.name, b.ag.peer)
            self._carry(self.rules.redirected(rule, b.fid, b))
        self.bound += 1
        return PASS, ops, (mark & self._keep) | self._rewritten

    def _six_ended(self) -> None:
        six = self.six
        if six is not None and six.closing_legs:
            self._out.ct_deletes += six.closing_legs  # type: ignore[arg-type]
            six.closing_legs = []
        if six is not None and six.endings:
            endings, six.endings = six.endings, []
            for msg, ag in endings:
                self.send(msg, ag.peer or self.gateway_peers[ag.name])
                self._rules_after(msg.flow_id, msg.reason)

    def _local_set(self, now: float) -> frozenset[int]:
        if now >= self._local_until:
            self._local = frozenset(int(a) for a in self.local_addresses())
            self._local_until = now + IFACE_CACHE_SECONDS
        return self._local

    def _bound(self, mark: int, proto: int, leg: tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]] | None) -> Verdict:
        """PASS with the ``rewritten`` mark, and the leg's two elements (its DNAT and SNAT) to write first."""
        self.bound += 1
        if leg is None:
            return PASS, (), (mark & self._keep) | self._rewritten
        key, dnat, snat = leg
        name = _PROTO_NAME[proto]
        return PASS, ((DNAT_MAP, name, key, dnat), (SNAT_MAP, name, key, snat)), (mark & self._keep) | self._rewritten

    def _bound_a(self, mark: int, b: Binding, route: Route) -> Verdict:
        """Leg A's first packet bound: its elements, and leg B's keyed by (G, F, f) ahead of
        it (``LEG_B_AHEAD``), in the same transaction; a flow the router terminates has no leg B."""
        verdict = self._bound(mark, b.proto, b.leg_a())
        if route.local:
            return verdict
        b.state |= _AHEAD
        name = _PROTO_NAME[b.proto]
        key = (b.gateway.addr, *b.firewall_side)
        return PASS, (*verdict[1], (LEGB_DNAT_MAP, name, key, b.server), (LEGB_SNAT_MAP, name, key, b.visible_client)), verdict[2]

    def _leg_b(self, pkt: Packet, mark: int, now: float) -> Verdict:
        """A gateway's new connection to F:f: leg B of that binding (the seed's swap)."""
        proto, src, sport, dst, dport, flags = pkt[:6]
        b = self.table.by_firewall_side(proto, dst, dport)
        if b is None and self.rules.expect:
            rule = self.rules.expected(proto, src, sport, dst, dport, now)
            if rule is not None and rule.mode is RuleMode.ORIGINATE:
                return self._originate(rule, pkt, mark)
        if b is None or src != b.gateway.addr or sport == b.gateway.port:
            # G:g -> F:f is leg A's reply, which conntrack carries: never new.
            return self._drop("drop.gateway_without_binding", mark)
        if proto == TCP and flags & _SYN_FLAGS != SYN:
            return self._drop("drop.not_new_flow", mark)
        e = b.ag_eport
        if e != sport:
            stale = self._stale_legs.pop((proto, dst, dport), None) if self._stale_legs else None
            if stale is not None:
                self._delete_stale(stale)  # the replaced binding's leg B, before this one's verdict
            if b.state & _A_GONE:
                return self._drop("drop.flow_ended", mark)  # the client has gone
            if e is not None and not b.state & _B_GONE:
                f = b.firewall_side
                if self._alive(proto, src, e, f[0], f[1]):
                    if proto != TCP or not self._closing(proto, src, e, f[0], f[1]):
                        return self._drop("drop.leg_b_busy", mark)  # one leg B at a time
                    # The old leg B is closing: conntrack reopened leg A after an RST (its
                    # entry in CLOSE keeps its NAT), so the gateway's new connection came on
                    # this binding. The old leg goes before this one's verdict: its reply
                    # tuple, S:s -> C:c, is the new one's.
                    self._out.ct_deletes.append((proto, src, e, f[0], f[1]))
                    self.counters["conntrack.closing_leg_b_deleted"] += 1
            self.table.learn_ag_port(b, sport)
        elif b.state & _B_GONE:
            # Its first packet again after its connection was destroyed (the server's
            # TIME-WAIT answered the SYN, the gateway reset it and sent the SYN again):
            # the leg is in conntrack again, and the binding must wait for its end, or
            # it ends with leg A while this leg B lives on (and holds S:s -> C:c).
            b.state &= ~_B_GONE
        if b.state & _AHEAD and now - b.created < self._ahead_for:
            return self._bound(mark, proto, None)  # its elements went in with leg A's: no transaction
        b.state |= _B_WRITTEN
        return self._bound(mark, proto, b.leg_b())

    def _originate(self, rule: DynRule, pkt: Packet, mark: int) -> Verdict:
        """The gateway's own connection G:e -> D:d that an ORIGINATE rule expects: it leaves
        the router from the rule's source, keeping the port (docs/signalling.md, ORIGINATE).
        No binding: conntrack carries it, with its NAT, from this first packet on."""
        proto, src, sport, dst, dport, flags = pkt[:6]
        if proto == TCP and flags & _SYN_FLAGS != SYN:
            return self._drop("drop.not_new_flow", mark)
        self._carry(self.rules.originated(rule))
        key = (src, sport, dst, dport)
        if src > 0xFFFFFFFF:  # from G6: the IPv6 table's maps
            self.bound += 1
            name = _PROTO_NAME[proto]
            ops = ((DNAT6_MAP, name, key, (dst, dport)), (SNAT6_MAP, name, key, (rule.source, sport)))
            return PASS, ops, (mark & self._keep) | self._rewritten
        return self._bound(mark, proto, (key, (dst, dport), (rule.source, sport)))

    def _drop(self, why: str, mark: int) -> Verdict:
        self.counters[why] += 1
        self.counters["verdict.drop"] += 1
        return DROP, (), mark

    def _pass(self, why: str, mark: int) -> Verdict:
        self.counters[why] += 1
        self.counters["verdict.pass"] += 1
        return PASS, (), (mark & self._keep) | self._passed

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
        if old is not None and proto == UDP and not old.state & _A_ALIVE and now - old.created < self._young_for:
            # A young UDP binding whose first datagram is still queued, or not
            # yet confirmed: this datagram came before conntrack had the
            # connection, so conntrack made it a connection of its own, which
            # becomes the first one's at confirmation. The same binding, not a
            # new one. (TCP: a SYN on a young binding's tuple is decided below,
            # as before; the 10k-connections netns test counts one binding per
            # connection, and a client may reuse a port within seconds.)
            self.counters["passed.bound_young"] += 1
            if now - old.created < self._ahead_for:
                return self._bound(mark, proto, None)  # the elements are in, or in this batch's transaction
            return self._bound(mark, proto, old.leg_a())
        if old is not None and self._alive(proto, src, sport, dst, dport):
            # Its connection is in conntrack, with its NAT: a packet of it that
            # conntrack still calls new (the rules return confirmed connections,
            # so this is rare). It belongs to the binding it has.
            self.counters["passed.bound_again"] += 1
            return self._bound(mark, proto, None)
        if old is not None:
            # A new connection on the tuple of a binding: the old connection is
            # gone (a SYN ended its TIME-WAIT, or its first packet never made it
            # into conntrack). Its binding goes with it; this one gets a fresh F:f.
            # The old leg B's connection goes too: it may still be in TIME-WAIT
            # (120 s), and its reply tuple, S:s -> C:c, is the one the new leg B
            # needs; conntrack would refuse the new leg B (insert_failed) until it
            # timed out. It goes before the new leg B's verdict, not this packet's:
            # a client that connects again at once may be here before the gateway
            # has passed the old connection's last FIN (or its reset) on to the
            # server, which must not find that leg gone (docs/datapath.md, "A
            # client that reuses its port").
            if old.ag_eport is not None:
                self._replacing = (proto, *old.leg_b()[0])
            self._end(self._flow_of[old.client_key], FlowEndReason.FIN if proto == TCP else FlowEndReason.IDLE)
            self.counters["flows.replaced"] += 1
        if first and (self.rules.expect or self.rules.spent):
            verdict = self._by_rule(pkt, mark, now)
            if verdict is not None:
                return verdict
        sel = self.policy.selector(zone, proto, src, dst, dport)
        if sel is None:
            return self._pass("passed.not_a_selector", mark)
        route = self._route(dst)
        server = None
        if route is not None and route.local:
            server = self.policy.forward_target(zone, proto, src, dport)  # type: ignore[arg-type]
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
        b = self._open(pkt, self.spread.pick(sel.ag), server, route, now)
        if isinstance(b, str):
            return self._drop(b, mark)
        fid = self._register(b)
        self._adjacent(sel, dport, fid, b, now)
        return self._bound_a(mark, b, route)

    def _adjacent(self, sel: Selector, dport: int, fid: int, b: Binding | Binding6, now: float) -> None:
        """A kind whose protocol also uses the port ``step`` beside the selected
        one: the processor expects that flow itself (seed, "Dynamic changes":
        "the packet processor part may by itself deduce the other port
        number(s)"): RTP data on even N, RTCP on N+1 (RFC 3550 section 11);
        a flow on the odd port (RTCP seen first) gets N below it. Either family."""
        step = sel.adjacent
        if step is not None:
            step = -step if dport % 2 else step
            self._carry(self.rules.adjacent(fid, b, step, now, self._wall(), self.config.processor.adjacent_ttl))

    def _by_rule(self, pkt: Packet, mark: int, now: float) -> Verdict | None:
        """The verdict on a first packet (for TCP its SYN) that a dynamic rule names, of either
        family (an IPv6 one's addresses are above 2**32); None if no rule names it."""
        proto, src, sport, dst, dport = pkt[:5]
        again = self.rules.spent_verdict(proto, src, sport, dst, dport)
        if again:  # a retransmitted SYN of the connection a one-shot ALLOW let through
            return self._pass("passed.allowed", mark)
        rule = self.rules.expected(proto, src, sport, dst, dport, now)
        if rule is not None and rule.mode is RuleMode.ORIGINATE:
            return self._drop("drop.originate_not_from_gateway", mark)  # only the gateway opens it
        if rule is not None and rule.mode is RuleMode.ALLOW:
            # A TCP ALLOW's SYN (rulebook, "watched"): the kernel carries the flow,
            # through the rule's DNAT and accept; the processor only counts its use.
            self._carry(self.rules.allowed(rule, sport, now))
            if rule.offload:
                return self._offload_used(rule, sport, mark, now)
            return self._pass("passed.allowed", mark)
        if again is False:  # another connection on a used one-shot ALLOW
            return self._drop("drop.rule_used", mark)
        if rule is None:
            if self.rules.watched(proto, src, sport, dst, dport):
                return self._drop("drop.rule_expired", mark)  # its TTL ran out; the tick retires it
            return None
        route = self._route(rule.server[0])
        if route is None:
            return self._drop("drop.no_route", mark)
        if src > 0xFFFFFFFF:
            return self._redirect6(rule, pkt, mark, route, now)
        b = self._open(pkt, rule.gateway, rule.server, route, now)
        if isinstance(b, str):
            return self._drop(b, mark)
        self._carry(self.rules.redirected(rule, self._register(b), b))
        return self._bound_a(mark, b, route)

    def _log_only(self, pkt: Packet, sel: Selector, server: tuple[int, int] | None, mark: int, now: float) -> Verdict:
        """A log-only gateway's flow: no binding; the kernel carries it, and conntrack's end reports it."""
        proto, src, sport, dst, dport = pkt[:5]
        key = (proto, src, sport, dst, dport)
        self._ended(self.logged.replaced(key))
        self.counters["verdict.logged"] += 1
        verdict = (PASS, (), (mark & self._keep) | self._rewritten)
        if self.logged.full:
            self.counters["flows.logged_untracked"] += 1
            return verdict
        info = flow_info(make_flow_id(self.queue, next(self._serial)), key, sel, server,
                         self.six.g6 if self.six is not None else 0)
        self.logged.add(key, info, now)
        self._push(info, sel.gateway.name)
        return verdict

    def _offload_used(self, rule: DynRule, sport: int, mark: int, now: float) -> Verdict:
        """An offloaded flow's next packet, which its ALLOW lets through: the kernel carries
        the connection from here, for the gateway, which learns of it as of a log-only
        flow's (NEW_FLOW without F:f) and of its end with conntrack's counters (FLOW_END)."""
        key = (rule.proto, rule.src, sport, rule.dst, rule.dport)
        self._ended(self.logged.replaced(key))
        self.counters["passed.offloaded"] += 1
        self.counters["verdict.pass"] += 1
        # The ``rewritten`` mark: the binding table marks the connection as nfgate's, so its
        # destroy event comes (no binding element names it: no translation but the ALLOW's).
        verdict = (PASS, (), (mark & self._keep) | self._rewritten)
        if self.logged.full:
            self.counters["flows.logged_untracked"] += 1
            return verdict
        server = rule.server if rule.server != (rule.dst, rule.dport) else None
        g6 = self.six.g6 if self.six is not None else 0
        info = kernel_flow_info(make_flow_id(self.queue, next(self._serial)), key, rule.gateway, server, g6)
        self.logged.add(key, info, now, "offloaded")
        self._push(info, rule.gateway.name)
        return verdict

    @property
    def watching(self) -> bool:
        """Whether conntrack holds connections whose end the processor waits for."""
        return bool(len(self.table) or len(self.logged) or (self.six is not None and len(self.six)))

    def _forward_target_any(self, proto: int, src: int, dst: int, dport: int, six: bool = False) -> tuple[int, int] | None:
        """A port forward's S:s for a flow whose ingress zone is unknown (adoption); ``six``: IPv6's."""
        route = self._route(dst)
        if route is None or not route.local:
            return None
        return self.policy.forward_target_any(proto, src, dport, six)

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

    def _register(self, b: Binding, push: bool = True, fid: int | None = None) -> int:
        if self._replacing is not None:
            # The binding this one replaced has a leg B: it goes at this one's (``_new``).
            self._stale_legs[(b.proto, *b.firewall_side)] = self._replacing
            self._replacing = None
        if fid is None:
            fid = make_flow_id(self.queue, next(self._serial))
        self._flows[fid] = b
        self._flow_of[b.client_key] = fid
        if not push:
            return fid
        self.counters["flows.opened"] += 1
        self._push(b.info(fid), b.gateway.name, b.gateway.peer)
        return fid

    def _push(self, info: FlowInfo, gateway: str, peer: tuple[str, int] | None = None) -> None:
        if self.push:
            # Ahead of the verdict, so the push races ahead of the first packet.
            datagrams = self.encoder.encode_copies(NewFlow(info), self._wall(), self._copies)
            peer = peer or self.gateway_peers[gateway]
            self._out.datagrams += [(d, peer) for d in datagrams]
            self.counters["signalling.sent.new_flow"] += 1
            self.counters["signalling.copies"] += len(datagrams)
        else:
            self.counters["signalling.push_skipped"] += 1

    def binding(self, fid: int) -> Binding | Binding6 | None:
        """Flow ``fid``'s binding, of either family (the dynamic rules' look-up)."""
        b = self._flows.get(fid)
        if b is None and self.six is not None:
            return self.six.binding(fid)
        return b

    def _delete_stale(self, key: tuple[int, int, int, int, int]) -> None:
        self._out.ct_deletes.append(key)
        self.counters["conntrack.closing_leg_b_deleted"] += 1

    def _end(self, fid: int, reason: FlowEndReason) -> None:
        """Everything that goes with the end of a binding."""
        b = self._flows.pop(fid)
        del self._flow_of[b.client_key]
        if self._stale_legs:
            stale = self._stale_legs.pop((b.proto, *b.firewall_side), None)
            if stale is not None:
                self._delete_stale(stale)  # it ended before its leg B came: the one it replaced goes now
        self.table.remove(b)
        self.counters[f"flows.ended.{reason.name.lower()}"] += 1
        if self.standby and self.peer_pool is not None:
            self._let_go[b.client_key] = fid  # the peer carries it on (docs/ha.md, "Takeover")
        self.send(FlowEnd(fid, reason), b.gateway.peer or self.gateway_peers[b.gateway.name])
        self._rules_after(fid, reason)

    def _rules_after(self, fid: int, reason: FlowEndReason) -> None:
        """A binding of either family ended: its dynamic rules end with it, or, offloaded, live on."""
        if reason is FlowEndReason.OFFLOADED:
            self._carry(self.rules.flow_offloaded(fid))
        else:
            self._carry(self.rules.flow_ended(fid))

    def offloaded(self, fid: int, rule: DynRule) -> None:
        """The kernel has the offloaded flow's ALLOW (``rule``): the binding goes, and with
        it leg A's connection, which would take the flow's next packet into the gateway.

        Leg B's connection stays, held by the rule, until that next packet takes the
        ALLOW (or the rule ends unused): what the gateway relays meanwhile (the datagrams
        it read before FLOW_END OFFLOADED reached it) still reaches the server. It must
        go before that packet's verdict: the direct connection's reply tuple is leg B's.
        An IPv6 binding's are in ``six`` (``SixFlows.offload``), the same steps."""
        b = self._flows.get(fid)
        if b is None:
            self._offloaded6(fid, rule)
            return
        name = _PROTO_NAME[b.proto]
        key, dnat, snat = b.leg_a()
        if self._now - b.created < self._element_for:
            # Deleted before the connection: an element still there would bind
            # the flow's next packet into the gateway again. (Past its timeout
            # the kernel has dropped it: a delete would fail the transaction.)
            self._out.unbind += [(DNAT_MAP, name, key, dnat), (SNAT_MAP, name, key, snat)]
        self._out.ct_deletes.append((b.proto, *key))
        if b.ag_eport is not None:
            key_b, dnat_b, snat_b = b.leg_b()
            if b.state & _B_WRITTEN:
                self._out.unbind += [(DNAT_MAP, name, key_b, dnat_b), (SNAT_MAP, name, key_b, snat_b)]
            if rule.ended is None:
                rule.hold = (b.proto, *key_b)
            else:  # used (or expired) while it went in
                self._out.ct_deletes.append((b.proto, *key_b))
        # Leg B's elements written ahead (by G, F, f) are left to their timeout: only a
        # packet the processor marks as leg B of a binding of F:f can use them, and a
        # new binding of F:f (the pool hands it out last) writes its own over them.
        self.counters["flows.offloaded"] += 1
        self._end(fid, FlowEndReason.OFFLOADED)

    def _offloaded6(self, fid: int, rule: DynRule) -> None:
        six = self.six
        b = six.binding(fid) if six is not None else None
        if six is None or b is None:
            raise KeyError(fid)  # the rulebook offloads only a flow it found a binding for
        unbind, leg_a, leg_b = six.offload(b, self._now)
        self._out.unbind += unbind
        self._out.ct_deletes.append(leg_a)  # type: ignore[arg-type]
        if leg_b is not None:
            if rule.ended is None:
                rule.hold = leg_b  # type: ignore[assignment]
            else:  # used (or expired) while it went in
                self._out.ct_deletes.append(leg_b)  # type: ignore[arg-type]
        self.counters["flows.offloaded"] += 1
        self._six_ended()

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
        if self._rechecks:
            self._recheck(now)
        self._carry(self.rules.tick(now))
        self._ended(self.logged.due(now, self._alive))
        if self.six is not None:
            self.six.due(now, self._alive)
            self._six_ended()
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
        if (proto, *orig) in self.logged:
            self._ended(self.logged.end((proto, *orig), counters))
            return
        src, sport, dst, dport = orig
        if src > 0xFFFFFFFF or dst > 0xFFFFFFFF:  # an IPv6 connection (six keeps IPv6 addresses above 2**32)
            if self.six is not None:
                self.six.destroyed(proto, orig, reply)
                self._six_ended()
            else:
                self.counters["conntrack.destroy_unknown"] += 1
            return
        b = self.table.by_client(proto, src, sport, dst, dport)
        if b is not None:
            g = b.gateway
            if reply[:2] == (g.addr, g.port) and reply[2:] == b.firewall_side:
                self._leg_destroyed(b, True, (proto, *orig), now)
                return
        b = self.table.by_firewall_side(proto, dst, dport)
        if b is not None and (src, sport) == (b.gateway.addr, b.ag_eport):
            self._leg_destroyed(b, False, (proto, *orig), now)
            return
        self.counters["conntrack.destroy_unknown"] += 1

    def _leg_destroyed(self, b: Binding, leg_a: bool, key: tuple[int, ...], now: float) -> None:
        """A destroy event for one of ``b``'s legs. On a pair's node that takes bindings over
        (``peer_pool``) it may be conntrackd replacing the entry with the peer's copy (its
        injection destroys and re-creates an entry it cannot update): the leg is looked up
        again ``HA_DESTROY_RECHECK`` seconds later (``tick``), and is gone only if it is
        still missing then."""
        if self.peer_pool is None:
            self.leg_gone(b, leg_a=leg_a, now=now)
        else:
            self._rechecks.append((now + HA_DESTROY_RECHECK, b, leg_a, key))

    def _recheck(self, now: float) -> None:
        """The destroyed legs whose look-up is due (``_leg_destroyed``)."""
        due = [r for r in self._rechecks if r[0] <= now]
        if not due:
            return
        self._rechecks = [r for r in self._rechecks if r[0] > now]
        for _, b, leg_a, key in due:
            if self._flows.get(self._flow_of.get(b.client_key, -1)) is not b or b.ended:
                continue  # ended meanwhile
            if self._alive(*key):
                self.counters["conntrack.destroy_recreated"] += 1
            else:
                self.leg_gone(b, leg_a=leg_a, now=now)

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

    def adopt(self, connections: Iterable[Any], now: float, takeover: bool = False) -> int:
        """Rebuild the bindings the kernel carried across a restart; how many.

        ``connections`` are conntrack's entries with nfgate's mark
        (``kernel.Connection``): a leg A answers from G:g to an F:f of this
        instance's slice, a leg B goes from G:e to one. Their pool entries are
        claimed, so no new flow can be given an F:f or W:w that is still in use.
        Any other is a log-only gateway's flow (``logged``), if a log-only
        selector names it and its client is steered to this instance.

        ``takeover``: this node of a pair just became master (docs/ha.md,
        "Takeover"): the bindings of the peer's matching slice too (conntrackd
        copied their entries), and of this node's own that it let go of when it
        stepped back; then every binding it holds is pushed (NEW_FLOW) under its
        flow id here, so that the gateways ask this node about them from now on.
        A binding it let go of while standby gets the flow id it had (``_let_go``):
        its gateway knows the flow by it, and a new id would make it a new flow
        on the tuple there (replaced, its connection closed) unless the peer had
        pushed it meanwhile.
        Log-only flows are not taken over.
        """
        agents = self.policy.agents
        peer = self.peer_pool if takeover else None
        fw_pool = self.fw_pool

        def owns(addr: int, port: int) -> bool:
            return fw_pool.owns(addr, port) or (peer is not None and peer.owns(addr, port))

        legs_a: dict[tuple[int, int, int], Any] = {}
        legs_b: dict[tuple[int, int, int], Any] = {}
        others = []
        for c in connections:
            rsrc, rsport, rdst, rdport = c.reply
            if owns(rdst, rdport) and (rsrc, rsport) in agents:
                legs_a[(c.proto, rdst, rdport)] = c
            elif owns(c.orig[2], c.orig[3]):
                legs_b[(c.proto, c.orig[2], c.orig[3])] = c
            elif not takeover and not self.policy.gateway_leg(c.orig, c.reply):
                others.append(c)
        self._adopt_logged(others, now)
        adopted = 0
        for (proto, f, fport), a in legs_a.items():
            src, sport, dst, dport = a.orig
            if takeover:
                held = self.table.by_key(fw_key(proto, f, fport))
                if held is not None and held.client_key == flow_key(proto, src, sport, dst, dport):
                    continue  # never let go of: its flow id stays
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
            # One it let go of keeps its flow id (``_let_go``).
            self._register(b, push=False, fid=self._let_go.pop(b.client_key, None) if takeover else None)
            adopted += 1
        if not takeover:
            self.counters["flows.adopted"] += adopted
            return adopted
        self.counters["flows.taken_over"] += adopted
        self.counters["takeovers"] += 1
        self._let_go.clear()  # what it did not find again ended at the peer
        for fid, b in self._flows.items():
            self._push(b.info(fid), b.gateway.name, b.gateway.peer)
        return adopted

    def adopt6(self, connections: Iterable[Any], now: float) -> int:
        """``adopt`` for the IPv6 bindings (``six.adopt``) of this instance's slice; how many."""
        if self.six is None:
            return 0

        def target(proto: int, src: int, dst: int, dport: int) -> tuple[int, int] | None:
            return self._forward_target_any(proto, src, dst, dport, six=True)

        def masq_source(server: int) -> int | None:
            route = self._route(server)
            return route.prefsrc if route is not None and self._zone(route) in self._masq6 else None

        connections = list(connections)
        six = self.six
        self._adopt_logged([c for c in connections if not six.leg(c)], now, six=True)
        adopted = len(six.adopt(connections, now, lambda: next(self._serial), target, masq_source))
        self.counters["flows.adopted"] += adopted
        return adopted

    def _adopt_logged(self, connections: list[Any], now: float, six: bool = False) -> None:
        """Log-only flows the kernel carried across a restart: tracked and pushed again
        under new flow ids (the only ones this instance can end). ``six``: IPv6 connections."""
        g6 = self.six.g6 if self.six is not None else 0
        for c in connections:
            src, _, dst, dport = c.orig
            sel = self.policy.log_only_selector(c.proto, src, dst, dport, six)
            if sel is None or self.policy.client_instance(src) != self.instance:
                continue  # not a log-only flow, or steered to another instance
            key = (c.proto, *c.orig)
            info = flow_info(make_flow_id(self.queue, next(self._serial)), key, sel,
                             self._forward_target_any(c.proto, src, dst, dport, six), g6)
            if self.logged.adopt(key, info, now):
                self.counters["flows.adopted_logged"] += 1
                self._push(info, sel.gateway.name)

    def resync(self, connections: Iterable[Any], now: float) -> None:
        """Conntrack events were lost: end every binding whose connections are gone."""
        alive = {(c.proto, *c.orig) for c in connections}
        self._ended(self.logged.resync(alive, six=False))
        for b in list(self._flows.values()):
            if (b.proto, *b.leg_a()[0]) not in alive and b.state & _A_ALIVE:
                self.leg_gone(b, leg_a=True, now=now)
            elif b.ag_eport is not None and (b.proto, *b.leg_b()[0]) not in alive and b.state & _A_GONE:
                self.leg_gone(b, leg_a=False, now=now)
        self.counters["conntrack.resyncs"] += 1

    def resync6(self, connections: Iterable[Any]) -> None:
        """``resync`` for the IPv6 bindings, from a dump of the IPv6 connections."""
        alive = {(c.proto, *c.orig) for c in connections}
        self._ended(self.logged.resync(alive, six=True))  # offloaded IPv6 flows' connections
        if self.six is not None:
            self.six.resync(alive)
            self._six_ended()

    def kernel_done(self, token: int, ok: bool, now: float) -> None:
        """The runner carried out kernel operation ``token`` (``Outputs.kernel_ops``)."""
        self._now = now
        self._carry(self.rules.kernel_done(token, ok, now))

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
            self._carry(self.rules.request(got, msg, source, now, self._wall()))
        elif isinstance(msg, OffloadRequest):
            self._carry(self.rules.offload(got, msg, source, now, self._wall()))

    def _query(self, q: Query, source: tuple[str, int]) -> None:
        if q.firewall_side.address.version == 6:
            b6 = self.six.by_firewall_side(q.proto, int(q.firewall_side.address), q.firewall_side.port) if self.six else None
            if b6 is not None and (int(q.ag.address), q.ag.port) == (self.six.g6, b6.ag.port):  # type: ignore[union-attr]
                self.counters["queries.answered"] += 1
                self.send(Answer(q.query_id, self.six.info(b6)), source)  # type: ignore[union-attr]
            else:
                self.counters["queries.not_found"] += 1
                self.send(NotFound(q.query_id, q.proto, q.firewall_side, q.ag), source)
            return
        key = fw_key(q.proto, int(q.firewall_side.address), q.firewall_side.port)
        b = self.table.by_key(key)
        if b is not None and b.fw == key and (b.gateway.addr, b.gateway.port) == (int(q.ag.address), q.ag.port):
            self.counters["queries.answered"] += 1
            self.send(Answer(q.query_id, b.info(self._flow_of[b.client_key])), source)
        else:
            self.counters["queries.not_found"] += 1
            self.send(NotFound(q.query_id, q.proto, q.firewall_side, q.ag), source)

    def send(self, msg: Message, to: tuple[str, int]) -> None:
        """Queue one message for ``to``: a request's source, or a gateway's signalling port."""
        if self.standby and isinstance(msg, FlowEnd):
            self.counters["signalling.held.flow_end_standby"] += 1
            return
        self._out.datagrams.append((self.encoder.encode(msg, self._wall()), to))
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
            "flows_ipv6": len(self.six) if self.six is not None else 0,
            "logged_flows": len(self.logged),
            "flows_per_gateway": self.table.per_gateway(),
            "rules": len(self.rules),
            "kernel_ops_in_flight": self.rules.in_flight,
            "pools": {"firewall_side": pool_stats(self.fw_pool), "snat": self.snat_pools.stats(),
                      # With [ha] and the AG host: the peer's bindings this node took over (``adopt``).
                      **({"firewall_side_peer": pool_stats(self.peer_pool)} if self.peer_pool is not None else {})},
        }

    def flows(self, now: float, limit: int, acct: dict[tuple[int, ...], tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` live flows as JSON values: the bindings (``Binding.listing``, with
        ``acct``, conntrack's accounting by original tuple, where given), then the log-only
        flows (``LoggedFlows.records``)."""
        out = []
        wall = now + self.wall_offset
        for fid, b in itertools.islice(self._flows.items(), limit):
            out.append({**b.listing(now, wall, acct), "flow_id": fid, "queue": self.queue})
        if self.six is not None:
            out += self.six.records(now, wall, self.queue, limit - len(out))
        return out + self.logged.records(now, wall, self.queue, limit - len(out), acct)
