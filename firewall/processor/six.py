"""IPv6 gateway flows: the processor's first-packet path for IPv6 (issue 17).

What: the same double NAT as for IPv4 (docs/datapath.md), for the
selectors whose gateway kind takes IPv6 (``Gateway.takes_ipv6``): leg A
C:c -> S:s becomes F6:f -> G6:g, leg B G6:e -> F6:f becomes C:c -> S:s (a
selector ``to = "router"`` has leg A only: its gateway is the flow's end), the
elements written into ``table ip6 nfgate_bind6`` before the verdict, the
gateway told by a family 6 NEW_FLOW. F6:f comes from
``processor.pools.firewall_side6``, G6 is ``gateway_link.gateway_address6``.

Why a table of its own beside ``firewall.flows.FlowTable``: that table's
keys pack 32-bit addresses into one int for speed, and IPv6 is a small part
of the traffic here. A ``Binding6`` answers what the dynamic rules read of
a binding (``gateway``, ``visible_client``, ``snat``, ``info``), so the
rulebook checks an IPv6 flow's requests as an IPv4 one's; ``redirect``
binds the first packet a REDIRECT expects, ``offload`` hands a binding to
the kernel (OFFLOAD_REQUEST: its elements and leg A's connection go, leg
B's is the offload's ALLOW's to hold). What this slice does not do
yet, so the ruleset never sends it here: a selector whose addresses are
IPv4 only. A server behind ``nat.masquerade6`` sees leg B from the router's
W6:w as IPv4's sees W:w (``Binding6.seen_as``): W6 is the route's source to
the server (the address the kernel's masquerade would take), w from the
SNAT pools shared with IPv4 (``SnatPools``, one per address). Several instances share IPv6 as they share
IPv4: each one's requests by the low bits of the client's address, and
its own slice of the IPv6 pool, and its flows' dynamic rules are its own. A
processor that restarts adopts its IPv6 bindings from conntrack
(``adopt``), as it does its IPv4 ones (their dynamic rules are not kept).

An IPv6 port forward (DNAT66) into the gateway: the client addressed the
router, and the forward's target is the binding's server (leg B's S:s), as
for IPv4.

UDP (udp-relay): a datagram on a young binding's tuple before conntrack
confirmed the first is that binding's, as for IPv4 (core.py ``_new``).

Ends: conntrack's destroy events for either leg (the core hands over those
with IPv6 addresses), and a check ``processor.timeouts.confirm`` seconds
after a binding opened that leg A made it into conntrack.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from firewall.config import Config
from firewall.config.model import ROUTER
from firewall.flows import AgEndpoint
from firewall.packet import ACK, FIN, RST, SYN, TCP, Packet
from firewall.pools import EndpointPool, SliceBy, Slicing, SnatPools
from firewall.processor.policy import Policy, Selector
from firewall.rules.bind import DNAT6_MAP, LEGB_DNAT6_MAP, LEGB_SNAT6_MAP, SNAT6_MAP
from firewall.signalling import Endpoint, FlowEnd, FlowEndReason, FlowInfo, make_flow_id

_SYN_FLAGS = SYN | ACK | RST | FIN
_PROTO_NAME = {TCP: "tcp", 17: "udp"}
# Sources no IPv6 packet to a gateway may carry: ::/8 (unspecified, loopback,
# IPv4-compatible and IPv4-mapped; it also keeps every IPv6 address of a flow
# above 2**32, which is how the kernel helpers tell the families apart) and
# multicast ff00::/8; link-local fe80::/10 is never forwarded.
_MARTIANS6 = tuple((int(n.network_address), int(n.netmask)) for n in
                   map(ipaddress.IPv6Network, ("::/8", "ff00::/8", "fe80::/10")))

NatOp = tuple[str, str, tuple[int, ...], tuple[int, int]]


def martian6(addr: int) -> bool:
    return any(addr & mask == net for net, mask in _MARTIANS6)


def _ep(addr: int, port: int) -> Endpoint:
    return Endpoint(ipaddress.IPv6Address(addr), port)


@dataclass(slots=True)
class Binding6:
    """One IPv6 gateway flow's double NAT."""

    fid: int
    proto: int
    client: tuple[int, int]
    original_dst: tuple[int, int]
    server: tuple[int, int]
    fw: tuple[int, int]
    ag: AgEndpoint  # the worker (its IPv4 G:g names it; its IPv6 G6 shares the port)
    created: float
    eport: int | None = None  # leg B's port on G6, once seen
    ahead: bool = False  # leg B's elements (by G6, F6, f) went in with leg A's
    a_alive: bool = False
    a_gone: bool = False
    b_gone: bool = False
    g6: int = 0  # G6, where leg A goes (``gateway_link.gateway_address6``)
    seen_as: tuple[int, int] | None = None  # W6:w, leg B's source for a server behind masquerade6
    stale: tuple[int, ...] | None = None  # the leg B of the binding this one replaced, deleted at this one's (core._new)

    # What the dynamic rules read of a binding (``firewall.flows.Binding``'s names): the
    # server sees C, or W6:w for a server behind masquerade6.
    @property
    def snat(self) -> bool:
        return self.seen_as is not None

    @property
    def gateway(self) -> AgEndpoint:
        return self.ag

    @property
    def visible_client(self) -> tuple[int, int]:
        return self.seen_as or self.client

    def info(self, fid: int | None = None) -> FlowInfo:
        """NEW_FLOW's flow, family 6: every address IPv6."""
        return FlowInfo(self.fid, self.proto, self.ag.name, _ep(*self.client), _ep(*self.original_dst),
                        _ep(*self.server), _ep(*self.fw), _ep(self.g6, self.ag.port),
                        _ep(*self.seen_as) if self.seen_as is not None else None)

    def leg_a(self) -> tuple[int, int, int, int]:
        return (*self.client, *self.original_dst)

    def leg_b(self, g6: int) -> tuple[int, int, int, int]:
        return (g6, self.eport or 0, *self.fw)

    @property
    def ended(self) -> bool:
        return self.a_gone and (self.eport is None or self.b_gone)


class SixFlows:
    """The IPv6 bindings of one processor instance, and their decisions."""

    def __init__(self, config: Config, instance: int, policy: Policy, counters: Counter[str], *,
                 local_addresses: Callable[[], Iterable[ipaddress.IPv6Address]],
                 snat_pools: SnatPools | None = None) -> None:
        proc = config.processor
        self.queue = proc.queues[instance]
        self.policy = policy
        self.counters = counters
        self.g6 = int(config.gateway_link.gateway_address6.ip)
        # This instance's slice of the IPv6 pool, cut as the IPv4 one is (and as the ruleset's
        # steer_pool6 and the manifest's slices6 have it).
        self.pool = EndpointPool(proc.pools.firewall_side6, proc.pools.ports, instance=instance,
                                 instances=len(proc.queues), slice_by=SliceBy.ADDRESS, slicing=Slicing.CONTIGUOUS)
        self._masq6 = frozenset(config.nat.masquerade6)
        # W6:w (the processor's, IPv4's W:w beside them when shared)
        self.snat_pools = snat_pools or SnatPools(proc.pools.snat_ports, instance, len(proc.queues))
        self._confirm = proc.timeouts.confirm
        # How long the elements written at a binding's first verdict surely last
        # (their timeout, less a second each for the clock and the kernel's rounding).
        self._ahead_for = proc.timeouts.nat_element - 2
        self._element_for = proc.timeouts.nat_element + 1  # a written element may still be in the kernel
        self._local_addresses = local_addresses
        self._local_list: Iterable[ipaddress.IPv6Address] | None = None  # ``own``'s cache
        self._local: frozenset[int] = frozenset()
        self._by_client: dict[tuple[int, ...], Binding6] = {}
        self._by_fw: dict[tuple[int, int, int], Binding6] = {}
        self._by_fid: dict[int, Binding6] = {}
        # Each worker by its port: G6 is the workers' one address, each on its G:g's port.
        self._agents = {ag.port: ag for workers in policy.workers.values() for ag in workers}
        self.endings: list[tuple[FlowEnd, AgEndpoint]] = []  # FLOW_END to send, and to which worker
        # Leg B connections of replaced bindings, (proto, *orig tuple), for the core to delete
        # before the new binding's verdict (a closing leg B's reply tuple is the new one's).
        self.closing_legs: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self._by_fid)

    def own(self, addr: int) -> bool:
        """Whether ``addr`` is one of the router's IPv6 addresses. The look-up's list is cached by
        its giver (the runner's, refreshed every few seconds): its set is made again only when
        the list itself changes, not per first packet."""
        addrs = self._local_addresses()
        if addrs is not self._local_list:
            self._local_list, self._local = addrs, frozenset(int(a) for a in addrs)
        return addr in self._local

    # ---- packets ------------------------------------------------------------------

    def request(self, pkt: Packet, sel: Selector, zone: str | None, server_zone: str | None,
                ag: AgEndpoint, now: float, serial: int,
                server: tuple[int, int] | None = None,
                source: int | None = None) -> tuple[str, Binding6 | None, tuple[NatOp, ...]]:
        """A selected IPv6 first packet: (counter, binding or None, elements). The counter
        names the outcome: ``bound`` with a binding, else a ``passed.*`` or ``drop.*``.
        ``server``: an IPv6 port forward's target, when the client addressed the router;
        ``source``: the route's source address to the server (W6 behind masquerade6)."""
        proto, src, sport, dst, dport, flags = pkt[:6]
        if not sel.gateway.takes_ipv6(sel.traffic):
            return "drop.ipv6.not_taken", None, ()  # the ruleset queues no such packet
        if server_zone != sel.traffic.to_zone:
            return "passed.other_zone", None, ()
        # server_zone ROUTER: a gateway that terminates the flow (the tunnel's
        # server, docs/datapath.md): leg A alone, into G6:g; no leg B comes.
        if proto == TCP and flags & _SYN_FLAGS != SYN:
            return "drop.not_new_flow", None, ()
        return self._bind(pkt, server or (dst, dport), ag, now, serial, leg_b=server_zone != ROUTER,
                          masq=self._masq_source(server_zone, source))

    def redirect(self, pkt: Packet, server: tuple[int, int], server_zone: str | None, ag: AgEndpoint, now: float,
                 serial: int, source: int | None = None) -> tuple[str, Binding6 | None, tuple[NatOp, ...]]:
        """A first packet that a REDIRECT rule expects (``rulebook``), into the rule's gateway
        worker ``ag``, its leg B to ``server``: as ``request``, without a selector."""
        return self._bind(pkt, server, ag, now, serial, masq=self._masq_source(server_zone, source))

    def _masq_source(self, server_zone: str | None, source: int | None) -> int | None:
        """W6 for a server behind masquerade6 (0: such a server, but no source address); else None."""
        if server_zone not in self._masq6:
            return None
        return source or 0

    def _bind(self, pkt: Packet, server: tuple[int, int], ag: AgEndpoint, now: float,
              serial: int, leg_b: bool = True, masq: int | None = None) -> tuple[str, Binding6 | None, tuple[NatOp, ...]]:
        """The binding and its elements; ``leg_b`` False: a gateway that ends the flow, no leg B's;
        ``masq``: W6 (0 for none known) that leg B leaves from, with a port of the SNAT pool."""
        proto, src, sport, dst, dport = pkt[:5]
        old = self._by_client.get((proto, src, sport, dst, dport))
        if old is not None:
            if not old.a_alive and now - old.created < self._confirm:
                # A retransmitted first packet before conntrack confirmed the first one's,
                # or a UDP flow's next datagram: conntrack made it a connection of its own,
                # which becomes the first one's at confirmation. The same binding; its
                # elements again once those written with the first may have timed out.
                self.counters["passed.ipv6.bound_young"] += 1
                if now - old.created < self._ahead_for:
                    return "bound_again", old, ()
                return "bound_again", old, self._leg_a_ops(old)
            self.counters["flows.replaced"] += 1
            # Its leg B's connection goes before the new leg B's verdict (core._new); at once
            # if no new binding comes of this packet.
            stale = (proto, *old.leg_b(self.g6)) if old.eport is not None else None
            self.end(old, FlowEndReason.FIN if proto == TCP else FlowEndReason.IDLE)
            verdict, b, ops = self._bind_new(pkt, server, ag, now, serial, leg_b, masq)
            if stale is not None:
                if b is None:
                    self._delete_stale(stale)
                else:
                    b.stale = stale
            return verdict, b, ops
        return self._bind_new(pkt, server, ag, now, serial, leg_b, masq)

    def _bind_new(self, pkt: Packet, server: tuple[int, int], ag: AgEndpoint, now: float,
                  serial: int, leg_b: bool, masq: int | None) -> tuple[str, Binding6 | None, tuple[NatOp, ...]]:
        """``_bind``'s new binding, its tuple free."""
        proto, src, sport, dst, dport = pkt[:5]
        if masq == 0:
            return "drop.no_source_address", None, ()
        fw = self.pool.allocate()
        if fw is None:
            return "drop.refused.pool_exhausted", None, ()
        seen_as = None
        if masq is not None:
            self.snat_pools.prefer(masq)
            seen_as = self.snat_pools.allocate()
            if seen_as is None:
                self.pool.release(*fw)
                return "drop.refused.snat_pool_exhausted", None, ()
        fid = make_flow_id(self.queue, serial)
        b = Binding6(fid, proto, (src, sport), (dst, dport), server, fw, ag, now, g6=self.g6, seen_as=seen_as)
        self._by_client[(proto, src, sport, dst, dport)] = b
        self._by_fw[(proto, *fw)] = b
        self._by_fid[fid] = b
        self.counters["flows.opened"] += 1
        self.counters["flows.ipv6.opened"] += 1
        if not leg_b:
            return "bound", b, self._leg_a_ops(b)
        # Leg B's pair ahead, keyed by (G6, F6, f), in the same transaction: its first
        # packet then needs none of its own (bind.py; F6:f is the binding's alone).
        b.ahead = True
        name = _PROTO_NAME[proto]
        key_b = (self.g6, *fw)
        return "bound", b, (*self._leg_a_ops(b), (LEGB_DNAT6_MAP, name, key_b, b.server),
                            (LEGB_SNAT6_MAP, name, key_b, b.visible_client))

    def _leg_a_ops(self, b: Binding6) -> tuple[NatOp, ...]:
        name = _PROTO_NAME[b.proto]
        key = b.leg_a()
        return (DNAT6_MAP, name, key, (self.g6, b.ag.port)), (SNAT6_MAP, name, key, b.fw)

    def leg_b(self, pkt: Packet, alive: Callable[..., bool], now: float,
              closing: Callable[..., bool] = lambda *_: False) -> tuple[str, tuple[NatOp, ...]]:
        """A gateway's new IPv6 connection to F6:f: leg B of that binding (counter, elements:
        none while those written ahead with leg A's surely last)."""
        proto, src, sport, dst, dport, flags = pkt[:6]
        b = self._by_fw.get((proto, dst, dport))
        if b is None or src != self.g6 or sport == b.ag.port:
            return "drop.gateway_without_binding", ()
        if proto == TCP and flags & _SYN_FLAGS != SYN:
            return "drop.not_new_flow", ()
        if b.eport != sport:
            if b.stale is not None:
                self._delete_stale(b.stale)  # the replaced binding's leg B, before this one's verdict
                b.stale = None
            if b.a_gone:
                return "drop.flow_ended", ()
            if b.eport is not None and not b.b_gone and alive(proto, src, b.eport, dst, dport):
                if proto != TCP or not closing(proto, src, b.eport, dst, dport):
                    return "drop.leg_b_busy", ()
                # Closing: conntrack reopened leg A after an RST; the old leg goes first (core._leg_b).
                self.closing_legs.append((proto, src, b.eport, dst, dport))
                self.counters["conntrack.closing_leg_b_deleted"] += 1
        # A first packet of G:e again, after its connection was destroyed (the gateway's SYN
        # retransmitted after an RST): the leg is in conntrack again (core._leg_b).
        b.eport, b.b_gone = sport, False
        b.a_alive = True  # leg B comes after leg A's connection answered the gateway
        if b.ahead and now - b.created < self._ahead_for:
            return "bound", ()
        name = _PROTO_NAME[proto]
        key = (src, sport, dst, dport)
        return "bound", ((DNAT6_MAP, name, key, b.server), (SNAT6_MAP, name, key, b.visible_client))

    def offload(self, b: Binding6, now: float) -> tuple[list[NatOp], tuple[int, ...], tuple[int, ...] | None]:
        """The kernel has ``b``'s offload ALLOW (``core.offloaded``'s IPv6 twin): the binding ends
        OFFLOADED (F6:f back to the pool). Returns its elements to delete (leg A's while they may
        still be in the kernel: one left would bind the flow's next packet into the gateway again;
        leg B's, written at its verdict, whose absence the delete tolerates), leg A's connection
        (proto, *tuple) to delete, and leg B's, which the ALLOW holds till its use (None: no leg B)."""
        name = _PROTO_NAME[b.proto]
        unbind = list(self._leg_a_ops(b)) if now - b.created < self._element_for else []
        leg_b = None
        if b.eport is not None:
            key = b.leg_b(self.g6)
            unbind += [(DNAT6_MAP, name, key, b.server), (SNAT6_MAP, name, key, b.visible_client)]
            leg_b = (b.proto, *key)
        self.end(b, FlowEndReason.OFFLOADED)
        return unbind, (b.proto, *b.leg_a()), leg_b

    def info(self, b: Binding6) -> FlowInfo:
        return b.info()

    def records(self, now: float, wall: float, queue: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` IPv6 bindings as ``nfgate flows`` lists them (``Binding.listing``'s
        keys, addresses as ``[a]:p``; state ``ipv6`` with the legs seen)."""
        out = []
        for b in list(self._by_fid.values())[:max(0, limit)]:
            state = ["ipv6"] + (["a_alive"] if b.a_alive else []) + (["a_gone"] if b.a_gone else []) + \
                (["b_gone"] if b.b_gone else [])
            out.append({
                "proto": _PROTO_NAME[b.proto], "client": str(_ep(*b.client)), "original_dst": str(_ep(*b.original_dst)),
                "server": str(_ep(*b.server)), "firewall_side": str(_ep(*b.fw)), "gateway": b.ag.name,
                "ag": str(_ep(self.g6, b.ag.port)), "ag_eport": b.eport,
                "snat": str(_ep(*b.seen_as)) if b.seen_as is not None else None, "state": state,
                "age": round(now - b.created, 1), "created": round(wall - (now - b.created), 3),
                "flow_id": b.fid, "queue": queue,
            })
        return out

    def adopt(self, connections: Iterable[Any], now: float, serial: Callable[[], int],
              forward_target: Callable[[int, int, int, int], tuple[int, int] | None],
              masq_source: Callable[[int], int | None] = lambda server: None) -> list[Binding6]:
        """Rebuild the IPv6 bindings the kernel carried across a restart (``core.adopt``'s twin):
        a leg A answers from G6:g (a worker's port) to an F6:f of the pool, a leg B goes from
        G6:e to one. Their F6:f are claimed; the server is leg B's, or else, for a flow that
        addressed the router, the IPv6 forward's target (``forward_target(proto, src, dst,
        dport)``). Leg B's W6:w (its reply's destination, if not the client) is claimed too; a
        binding without leg B whose server is behind masquerade6 (``masq_source(server)``: its
        W6) gets a new one. Returns the bindings, which no NEW_FLOW announces (the gateway has them)."""
        legs_a: dict[tuple[int, int, int], Any] = {}
        legs_b: dict[tuple[int, int, int], Any] = {}
        for c in connections:
            rsrc, rsport, rdst, rdport = c.reply
            if rsrc == self.g6 and rsport in self._agents and self.pool.owns(rdst, rdport):
                legs_a[(c.proto, rdst, rdport)] = c
            elif c.orig[0] == self.g6 and self.pool.owns(c.orig[2], c.orig[3]):
                legs_b[(c.proto, c.orig[2], c.orig[3])] = c
        adopted = []
        for (proto, f, fport), a in legs_a.items():
            src, sport, dst, dport = a.orig
            leg_b = legs_b.get((proto, f, fport))
            seen_as: tuple[int, int] | None = None
            if leg_b is not None:
                server, eport = leg_b.reply[:2], leg_b.orig[1]
                if leg_b.reply[2:] != (src, sport):
                    seen_as = leg_b.reply[2:]
            else:
                server, eport = forward_target(proto, src, dst, dport) or (dst, dport), None
            if (proto, src, sport, dst, dport) in self._by_client or self.pool.in_use(f, fport):
                self.counters["conntrack.adopt_conflict"] += 1
                continue
            if seen_as is not None:
                if not self.snat_pools.claim(*seen_as):
                    self.counters["conntrack.adopt_conflict"] += 1
                    continue
            elif leg_b is None and (w6 := masq_source(server[0])):
                self.snat_pools.prefer(w6)
                seen_as = self.snat_pools.allocate()
                if seen_as is None:
                    self.counters["conntrack.adopt_conflict"] += 1
                    continue
            self.pool.claim(f, fport)
            b = Binding6(make_flow_id(self.queue, serial()), proto, (src, sport), (dst, dport), server, (f, fport),
                         self._agents[a.reply[1]], now, eport, a_alive=True, g6=self.g6, seen_as=seen_as)
            self._by_client[(proto, *b.client, *b.original_dst)] = b
            self._by_fw[(proto, f, fport)] = b
            self._by_fid[b.fid] = b
            adopted.append(b)
        self.counters["flows.ipv6.adopted"] += len(adopted)
        return adopted

    def leg(self, c: Any) -> bool:
        """Whether connection ``c`` is a leg of an IPv6 binding, any instance's (``adopt``'s test
        of the whole pool): the rest of a dump may be log-only flows."""
        return (c.reply[0] == self.g6 and c.reply[1] in self._agents) or c.orig[0] == self.g6

    def by_firewall_side(self, proto: int, addr: int, port: int) -> Binding6 | None:
        return self._by_fw.get((proto, addr, port))

    def binding(self, fid: int) -> Binding6 | None:
        return self._by_fid.get(fid)

    # ---- ends -----------------------------------------------------------------------

    def destroyed(self, proto: int, orig: tuple[int, int, int, int], reply: tuple[int, int, int, int]) -> None:
        """A conntrack destroy event with IPv6 addresses; a binding it ends goes to ``endings``."""
        src, sport, dst, dport = orig
        b = self._by_client.get((proto, src, sport, dst, dport))
        if b is not None and reply[:2] == (self.g6, b.ag.port) and reply[2:] == b.fw:
            b.a_gone = True
        else:
            b = self._by_fw.get((proto, dst, dport))
            if b is None or (src, sport) != (self.g6, b.eport):
                self.counters["conntrack.destroy_unknown"] += 1
                return
            b.b_gone = True
        if b.ended:
            self.end(b, FlowEndReason.FIN if proto == TCP else FlowEndReason.IDLE)

    def due(self, now: float, alive: Callable[..., bool]) -> None:
        """The confirmation check: a binding whose leg A never made it into conntrack ends."""
        for b in list(self._by_fid.values()):
            if b.a_alive or now - b.created < self._confirm:
                continue
            self.counters["conntrack.checks"] += 1
            if alive(b.proto, *b.leg_a()):
                b.a_alive = True
                continue
            self.counters["conntrack.never_confirmed"] += 1
            b.a_gone = True
            if b.eport is not None and not alive(b.proto, *b.leg_b(self.g6)):
                b.b_gone = True
            if b.ended:
                self.end(b, FlowEndReason.FIN if b.proto == TCP else FlowEndReason.IDLE)

    def resync(self, alive: set[tuple[int, ...]]) -> None:
        """Conntrack events were lost: end every binding whose connections are not in ``alive``
        (the (proto, *orig) of the IPv6 connections with nfgate's mark)."""
        for b in list(self._by_fid.values()):
            if b.a_alive and (b.proto, *b.leg_a()) not in alive:
                b.a_gone = True
            if b.a_gone and b.eport is not None and (b.proto, *b.leg_b(self.g6)) not in alive:
                b.b_gone = True
            if b.ended:
                self.end(b, FlowEndReason.FIN if b.proto == TCP else FlowEndReason.IDLE)
        self.counters["conntrack.resyncs6"] += 1

    def _delete_stale(self, key: tuple[int, ...]) -> None:
        self.closing_legs.append(key)
        self.counters["conntrack.closing_leg_b_deleted"] += 1

    def end(self, b: Binding6, reason: FlowEndReason) -> None:
        if b.stale is not None:
            self._delete_stale(b.stale)  # it ended before its leg B came: the one it replaced goes now
            b.stale = None
        self._remove(b)
        self.counters[f"flows.ended.{reason.name.lower()}"] += 1
        self.endings.append((FlowEnd(b.fid, reason), b.ag))

    def _remove(self, b: Binding6) -> None:
        del self._by_client[(b.proto, *b.client, *b.original_dst)]
        del self._by_fw[(b.proto, *b.fw)]
        del self._by_fid[b.fid]
        self.pool.release(*b.fw)
        if b.seen_as is not None:
            self.snat_pools.release(*b.seen_as)
