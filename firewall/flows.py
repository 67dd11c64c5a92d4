"""The double-NAT binding table: one ``Binding`` per gateway flow, found in O(1).

Theory of operation (DESIGN invariants 2 and 3; the seed's "Connection
identification" and "Packet restoration"). A client C:c opens a flow to S:s
(or to R:r, a port forward whose real target is S:s). The processor gives it
a binding; the kernel carries both legs through the binding table's NAT maps
(``firewall.rules.bind``), keyed by each connection's original tuple:

==========  ======================  =====================================
connection  original tuple          translated to (``leg_a`` / ``leg_b``)
==========  ======================  =====================================
leg A       C:c -> S:s (R:r)        F:f -> G:g   (into the AG)
leg B       G:e -> F:f              C:c (W:w) -> S:s  (the swap, to the server)
==========  ======================  =====================================

Replies follow each connection's reply tuple: conntrack un-NATs them.
F:f comes from the firewall-side pool and is unique per binding, which is
what makes the 4-tuple the AG sees unique (the seed's answer to the "ftp1 /
ftp2" confusion). G:g is the AG's listen endpoint; G:e the AG's own port for
leg B, learnt from leg B's first packet. W:w is the router's address and a
port from the SNAT pool, used when leg B leaves through masquerade (the
binding's own SNAT takes the place of the masquerade for that connection).

Keys. Every binding is indexed under three ints in one dict:

- ``client_key = flow_key(proto, C, c, S|R, s|r)``: leg A's original tuple;
- ``server_key = flow_key(proto, S, s, C|W, c|w)``: leg B's reply tuple, so no
  two bindings can make the server see the same connection;
- ``fw = fw_key(proto, F, f)``: leg B's destination; its source port is e.

``flow_key`` packs proto(8) src(32) dst(32) sport(16) dport(16) into one int
of >= 2**96; ``fw_key`` packs proto(8) addr(32) port(16) below 2**56, so the
kinds cannot collide. The binding stores the same int objects the dict
holds, and reads its addresses back out of them.

Lifetime is conntrack's (invariant 3): a binding ends when the kernel has
destroyed leg A's connection and leg B's (or leg B never started). The
processor learns that from ctnetlink destroy events (``leg_gone``). A first
packet the kernel drops after the processor's verdict, before conntrack
confirms its connection, makes no event; so a binding whose leg A has not
shown itself alive (leg B's arrival is proof enough) is due for a check
against conntrack ``confirm`` seconds after it opened. A timer wheel holds
those checks, one bucket per second: each a circular doubly-linked ring
threaded through the bindings' own ``_prev``/``_next`` slots, so a binding
leaves it in O(1) and ``due`` never scans the table.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from firewall.config.model import Timeouts
from firewall.pools import EndpointPool
from firewall.signalling import Endpoint, FlowInfo, Proto

M16 = 0xFFFF
M32 = 0xFFFFFFFF
_PROTO_NAME = {6: "tcp", 17: "udp"}


def flow_key(proto: int, src: int, sport: int, dst: int, dport: int) -> int:
    """The key of a packet src:sport -> dst:dport as the client or server sends it."""
    return proto << 96 | src << 64 | dst << 32 | sport << 16 | dport


def fw_key(proto: int, addr: int, port: int) -> int:
    """The key of a firewall-side endpoint F:f (the destination of all AG output)."""
    return proto << 48 | addr << 16 | port


class FlowState(enum.IntFlag):
    """The bits of ``Binding.state``, a plain int below 256 (CPython shares those)."""

    A_ALIVE = 1  # leg A's connection is confirmed: its end comes as a destroy event
    A_GONE = 2  # conntrack destroyed leg A's connection
    B_GONE = 4  # conntrack destroyed leg B's connection
    LEG_B_AHEAD = 8  # leg B's elements went into the kernel with leg A's (firewall.rules.bind, legb_*)
    LEG_B_WRITTEN = 16  # leg B's own exact elements were written (it came after the ahead ones' time)
    SNAT = 128  # leg B uses W:w from the SNAT pool


class Refusal(enum.Enum):
    """Why ``FlowTable.open`` made no binding. The caller drops the packet and counts."""

    EXISTS = "the flow already has a binding"
    FW_POOL_EXHAUSTED = "no free firewall-side endpoint"
    SNAT_POOL_EXHAUSTED = "no free SNAT endpoint"
    CONFLICT = "another binding already uses one of this flow's tuples"


_A_ALIVE = 1
_A_GONE = 2
_B_GONE = 4
_SNAT = 128


@dataclass(frozen=True, slots=True)
class AgEndpoint:
    """An application gateway's listen endpoint G:g, shared by all its bindings; ``peer``:
    where the gateway process listening there takes its signalling (one per worker)."""

    name: str
    addr: int
    port: int
    peer: tuple[str, int] | None = None

    @classmethod
    def of(cls, name: str, addr: ipaddress.IPv4Address, port: int, peer: tuple[str, int] | None = None) -> AgEndpoint:
        return cls(name, int(addr), port, peer)

    @property
    def address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.addr)


class _Ring:
    """The head of one timer-wheel bucket: a sentinel of a circular list."""

    __slots__ = ("_prev", "_next")

    def __init__(self) -> None:
        self._prev: Any = self
        self._next: Any = self


@dataclass(slots=True, eq=False)
class Binding:
    """One double-NATed flow. Addresses and ports are read out of the packed keys.

    Build one with ``FlowTable.open``; ``created`` and ``check_at`` are ticks
    (whole seconds of the clock the table is given).
    """

    client_key: int
    server_key: int
    fw: int
    gateway: AgEndpoint
    created: int
    check_at: int
    ag_eport: int | None = None
    state: int = 0
    _prev: Any = field(default=None, repr=False)
    _next: Any = field(default=None, repr=False)

    # ---- the tuples -----------------------------------------------------------------

    @property
    def proto(self) -> int:
        return self.fw >> 48

    @property
    def client(self) -> tuple[int, int]:
        """C:c, the client's endpoint."""
        k = self.client_key
        return k >> 64 & M32, k >> 16 & M16

    @property
    def original_dst(self) -> tuple[int, int]:
        """S:s, or R:r for a port forward: what the client addressed."""
        k = self.client_key
        return k >> 32 & M32, k & M16

    @property
    def server(self) -> tuple[int, int]:
        """S:s, the real server."""
        k = self.server_key
        return k >> 64 & M32, k >> 16 & M16

    @property
    def visible_client(self) -> tuple[int, int]:
        """What the server sees as the client: C:c, or W:w with SNAT."""
        k = self.server_key
        return k >> 32 & M32, k & M16

    @property
    def firewall_side(self) -> tuple[int, int]:
        """F:f, this binding's unique firewall-side endpoint."""
        f = self.fw
        return f >> 16 & M32, f & M16

    @property
    def snat(self) -> bool:
        return bool(self.state & _SNAT)

    @property
    def ended(self) -> bool:
        """Both legs are gone in the kernel (or leg A is and leg B never started)."""
        st = self.state
        return bool(st & _A_GONE and (self.ag_eport is None or st & _B_GONE))

    def leg_a(self) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """(original tuple, DNAT to G:g, SNAT to F:f) of leg A, for the NAT maps."""
        k = self.client_key
        g = self.gateway
        f = self.fw
        return (k >> 64 & M32, k >> 16 & M16, k >> 32 & M32, k & M16), (g.addr, g.port), (f >> 16 & M32, f & M16)

    def leg_b(self) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """(original tuple, DNAT to S:s, SNAT to C:c or W:w) of leg B, once G:e is known."""
        e = self.ag_eport
        if e is None:
            raise ValueError("no leg B yet: the AG has not opened its connection to F:f")
        f = self.fw
        k = self.server_key
        return (self.gateway.addr, e, f >> 16 & M32, f & M16), (k >> 64 & M32, k >> 16 & M16), (k >> 32 & M32, k & M16)

    def info(self, flow_id: int) -> FlowInfo:
        """What the gateway layer is told about the flow (NEW_FLOW, ANSWER; docs/signalling.md)."""
        def ep(pair: tuple[int, int]) -> Endpoint:
            return Endpoint(ipaddress.IPv4Address(pair[0]), pair[1])

        g = self.gateway
        return FlowInfo(flow_id, Proto(self.proto), g.name, ep(self.client), ep(self.original_dst), ep(self.server),
                        ep(self.firewall_side), ep((g.addr, g.port)), ep(self.visible_client) if self.snat else None)

    def listing(self, now: float, wall: float, acct: dict[tuple[int, ...], tuple[int, int]] | None) -> dict[str, Any]:
        """``record()`` as JSON values, for ``nfgate flows``: addresses as strings, the state's
        names, age and creation (Unix seconds, ``wall`` being ``now``'s), and each leg's packets
        and bytes from ``acct`` (conntrack's accounting, by original tuple) where given."""
        rec = self.record()
        for key in ("client", "original_dst", "server", "firewall_side", "ag", "snat"):
            if rec[key] is not None:
                rec[key] = f"{rec[key][0]}:{rec[key][1]}"
        rec["proto"] = _PROTO_NAME.get(rec["proto"], str(rec["proto"]))
        rec["state"] = [str(s.name).lower() for s in FlowState if rec["state"] & s and s is not FlowState.LEG_B_AHEAD]
        rec["age"] = round(now - self.created, 1)
        rec["created"] = round(wall - (now - self.created), 3)
        if acct is not None:
            legs = [(self.proto, *self.leg_a()[0])] + ([(self.proto, *self.leg_b()[0])] if self.ag_eport is not None else [])
            for name, key in zip(("leg_a", "leg_b"), legs):
                rec[f"{name}_packets"], rec[f"{name}_bytes"] = acct.get(key, (0, 0))
        return rec

    def record(self) -> dict[str, Any]:
        """The binding as plain values: for logs, signalling, or installing as kernel NAT."""
        ip = ipaddress.IPv4Address

        def ep(pair: tuple[int, int]) -> tuple[ipaddress.IPv4Address, int]:
            return ip(pair[0]), pair[1]

        return {
            "proto": self.proto,
            "client": ep(self.client),
            "original_dst": ep(self.original_dst),
            "server": ep(self.server),
            "firewall_side": ep(self.firewall_side),
            "gateway": self.gateway.name,
            "ag": (ip(self.gateway.addr), self.gateway.port),
            "ag_eport": self.ag_eport,
            "snat": ep(self.visible_client) if self.snat else None,
            "created": self.created,
            "state": FlowState(self.state),
        }


def _ticks(seconds: float) -> int:
    t = math.ceil(seconds)
    if t < 1:
        raise ValueError(f"timeout {seconds!r}: need at least 1 second")
    return t


class FlowTable:
    """Bindings by key, their pool entries, and their confirmation checks.

    ``fw_pool`` supplies F:f (and should be this instance's slice);
    ``snat_pool``, if given, supplies W:w for ``open(..., snat=True)``;
    ``peer_pool``, on a router pair's node, is the peer's matching slice: it
    allocates nothing, and holds the F:f of the peer's bindings this node
    took over (``claim``; docs/ha.md).
    Times are seconds of a monotonic clock; they only move forward.
    """

    def __init__(
        self,
        timeouts: Timeouts,
        fw_pool: EndpointPool,
        snat_pool: EndpointPool | None = None,
        *,
        now: float = 0.0,
        peer_pool: EndpointPool | None = None,
    ) -> None:
        self._t_confirm = _ticks(timeouts.confirm)
        self._fw_pool = fw_pool
        self._peer_pool = peer_pool
        self._snat_pool = snat_pool
        self._index: dict[int, Binding] = {}
        self._wheel: dict[int, _Ring] = {}
        self._tick = int(now)
        self._next_tick = self._tick  # the first wheel bucket due() has not emptied
        self._per_gateway: dict[str, int] = {}
        self._count = 0

    # ---- clock and wheel ------------------------------------------------------------

    def _clock(self, now: float) -> int:
        # Reuse one int object per second: every binding made in that second
        # then shares it instead of holding its own.
        t = int(now)
        if t > self._tick:
            self._tick = t
        return self._tick

    def _schedule(self, b: Binding, deadline: int) -> None:
        if deadline < self._next_tick:
            deadline = self._next_tick
        b.check_at = deadline
        head = self._wheel.get(deadline)
        if head is None:
            head = self._wheel[deadline] = _Ring()
        tail = head._prev
        b._prev = tail
        b._next = head
        tail._next = b
        head._prev = b

    @staticmethod
    def _unlink(b: Binding) -> None:
        if b._prev is None:
            return
        prev, nxt = b._prev, b._next
        prev._next = nxt
        nxt._prev = prev
        b._prev = b._next = None

    # ---- making and dropping bindings -----------------------------------------------

    def open(
        self,
        proto: int,
        src: int,
        sport: int,
        dst: int,
        dport: int,
        gateway: AgEndpoint,
        now: float,
        *,
        server: tuple[int, int] | None = None,
        snat: bool = False,
    ) -> Binding | Refusal:
        """A new binding for the client packet src:sport -> dst:dport, or why not.

        ``server`` is the real target S:s when dst:dport is a port forward's
        R:r; ``snat`` asks for W:w from the SNAT pool for leg B.
        """
        if snat and self._snat_pool is None:
            raise ValueError("open(snat=True) on a FlowTable without a SNAT pool")
        k1 = flow_key(proto, src, sport, dst, dport)
        taken = self._index.get(k1)
        if taken is not None:
            return Refusal.EXISTS if taken.client_key == k1 else Refusal.CONFLICT
        fw_ep = self._fw_pool.allocate()
        if fw_ep is None:
            return Refusal.FW_POOL_EXHAUSTED
        state = 0
        seen_as = (src, sport)
        if snat:
            w = self._snat_pool.allocate()  # type: ignore[union-attr]
            if w is None:
                self._fw_pool.release(*fw_ep)
                return Refusal.SNAT_POOL_EXHAUSTED
            seen_as = w
            state = _SNAT
        s_addr, s_port = server if server is not None else (dst, dport)
        t = self._clock(now)
        b = Binding(
            k1,
            flow_key(proto, s_addr, s_port, seen_as[0], seen_as[1]),
            fw_key(proto, fw_ep[0], fw_ep[1]),
            gateway,
            t,
            t,
            None,
            state,
        )
        if not self.create(b):
            self._fw_pool.release(*fw_ep)
            if snat:
                self._snat_pool.release(*seen_as)  # type: ignore[union-attr]
            return Refusal.CONFLICT
        return b

    def create(self, b: Binding, *, check: bool = True) -> bool:
        """Register a binding under its three keys; False (and nothing changed) if one is taken.

        The binding's F:f (and W:w with SNAT) must be in use in this table's
        pools (``open`` allocates them, ``claim`` after a restart): ``remove``
        gives them back. ``check`` schedules its confirmation check.
        """
        index = self._index
        k1, k4, kf = b.client_key, b.server_key, b.fw
        if b._prev is not None:
            raise ValueError("binding is already in a flow table")
        if k1 == k4 or k1 in index or k4 in index or kf in index:
            return False
        index[k1] = b
        index[k4] = b
        index[kf] = b
        name = b.gateway.name
        self._per_gateway[name] = self._per_gateway.get(name, 0) + 1
        self._count += 1
        if check:
            self._schedule(b, b.created + self._t_confirm)
        return True

    def claim(self, b: Binding) -> bool:
        """Register a binding found alive in conntrack (after a restart, or at a pair's
        takeover): its F:f, of this instance's slice or the peer's, becomes in use again.
        False if it, or one of its keys, is taken. Its W:w, with SNAT, the caller has in
        use already (``remove`` releases it).
        """
        f = b.fw
        fw_ep = (f >> 16 & M32, f & M16)
        pool = self._pool_of(*fw_ep)
        if pool is None or pool.in_use(*fw_ep):
            return False
        if not self.create(b, check=False):
            return False
        pool.reclaim(*fw_ep)
        return True

    def _pool_of(self, addr: int, port: int) -> EndpointPool | None:
        if self._fw_pool.owns(addr, port):
            return self._fw_pool
        peer = self._peer_pool
        return peer if peer is not None and peer.owns(addr, port) else None

    def remove(self, b: Binding) -> bool:
        """Drop a binding and give its pool entries back; False if it was not in the table."""
        index = self._index
        if index.get(b.fw) is not b:
            return False
        del index[b.fw]
        del index[b.client_key]
        del index[b.server_key]
        self._unlink(b)
        f = b.fw
        if self._peer_pool is None:
            self._fw_pool.release(f >> 16 & M32, f & M16)
        else:
            self._pool_of(f >> 16 & M32, f & M16).release(f >> 16 & M32, f & M16)  # type: ignore[union-attr]
        if b.state & _SNAT:
            k = b.server_key
            self._snat_pool.release(k >> 32 & M32, k & M16)  # type: ignore[union-attr]
        name = b.gateway.name
        left = self._per_gateway[name] - 1
        if left:
            self._per_gateway[name] = left
        else:
            del self._per_gateway[name]
        self._count -= 1
        return True

    def due(self, now: float) -> list[Binding]:
        """Bindings whose confirmation check is due at ``now``; they leave the wheel.

        Costs O(buckets due + bindings in them), never a scan of the table.
        """
        t = self._clock(now)
        out: list[Binding] = []
        start = self._next_tick
        if start > t:
            return out
        wheel = self._wheel
        # After a long pause, visit the buckets that exist rather than every second.
        ticks = range(start, t + 1) if t - start < len(wheel) else sorted(k for k in wheel if k <= t)
        self._next_tick = t + 1
        for tick in ticks:
            head = wheel.pop(tick, None)
            if head is None:
                continue
            b = head._next
            while b is not head:
                nxt = b._next
                b._prev = b._next = None
                out.append(b)
                b = nxt
        return out

    def confirmed(self, b: Binding) -> None:
        """Leg A is alive in conntrack: from now on its destroy event ends it."""
        b.state |= _A_ALIVE
        self._unlink(b)

    # ---- lookups --------------------------------------------------------------------

    def by_key(self, key: int) -> Binding | None:
        """The binding indexed under a ``flow_key`` or ``fw_key``."""
        return self._index.get(key)

    def by_client(self, proto: int, src: int, sport: int, dst: int, dport: int) -> Binding | None:
        """The binding whose leg A has this original tuple."""
        b = self._index.get(proto << 96 | src << 64 | dst << 32 | sport << 16 | dport)
        return b if b is not None and b.client_key == proto << 96 | src << 64 | dst << 32 | sport << 16 | dport else None

    def by_firewall_side(self, proto: int, addr: int, port: int) -> Binding | None:
        """The binding whose F:f this is."""
        return self._index.get(proto << 48 | addr << 16 | port)

    def learn_ag_port(self, b: Binding, port: int) -> None:
        """Record G:e, the AG's leg-B port; a new leg B starts with no destroy seen."""
        b.ag_eport = port
        b.state = (b.state & ~_B_GONE) | _A_ALIVE  # leg A reached the AG: it is confirmed
        self._unlink(b)

    # ---- counts ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Binding]:
        return (b for k, b in self._index.items() if k == b.fw)

    def __contains__(self, b: object) -> bool:
        return isinstance(b, Binding) and self._index.get(b.fw) is b

    def count(self, gateway: str) -> int:
        """How many bindings the named gateway has."""
        return self._per_gateway.get(gateway, 0)

    def per_gateway(self) -> dict[str, int]:
        """Binding counts by gateway name (gateways with none are absent)."""
        return dict(self._per_gateway)
