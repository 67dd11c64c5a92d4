"""The double-NAT flow table: one ``Binding`` per redirected flow, found in O(1) from any packet.

Theory of operation (DESIGN invariant 2; the seed's "Connection
identification" and "Packet restoration" sections). A client C:c opens a flow
to S:s (or to R:r, a port forward whose real target is S:s). The processor
gives it a binding and NATs each packet twice:

====================  ====================  ===========================
direction             arrives as            leaves as (``target``)
====================  ====================  ===========================
``CLIENT_TO_AG``      C:c -> S:s (R:r)      F:f -> G:g   (leg A, into the AG)
``AG_TO_CLIENT``      G:g -> F:f            S:s (R:r) -> C:c
``AG_TO_SERVER``      G:e -> F:f            C:c (W:w) -> S:s  (leg B)
``SERVER_TO_AG``      S:s -> C:c (W:w)      F:f -> G:e
====================  ====================  ===========================

F:f comes from the firewall-side pool and is unique per binding, which is
what makes the 4-tuple the AG sees unique (the seed's answer to the "ftp1 /
ftp2" confusion). G:g is the AG's listen endpoint. G:e is the AG's own
ephemeral port for leg B: the seed's "swap" has the AG address F:f, and the
processor learns e from the first such packet that is not from G:g. W:w is
the router's wan address and a port from the SNAT pool, used when leg B
leaves through masquerade (NOTRACKed packets get no kernel NAT).

Keys. Every binding is indexed under exactly three ints in one dict:

- ``client_key = flow_key(proto, C, c, S|R, s|r)``: what the client sends;
- ``server_key = flow_key(proto, S, s, C|W, c|w)``: what the server sends;
- ``fw = fw_key(proto, F, f)``: both AG directions; the source port then
  tells leg A (g) from leg B (e), so e needs no key of its own.

``flow_key`` packs proto(8) src(32) dst(32) sport(16) dport(16) into one int
of >= 2**96; ``fw_key`` packs proto(8) addr(32) port(16) below 2**56, so the
kinds cannot collide and one lookup per packet finds binding and direction.
The binding stores the same int objects the dict holds, and reads its
addresses back out of them, so a key costs no memory twice. A binding is a
plain record (ints, one shared ``AgEndpoint``), enough for a later issue to
install it as kernel NAT; ``Binding.record()`` spells it out.

Expiry. Conntrack never sees these flows (they are NOTRACKed after the
rewrite, DESIGN invariant 3), so the table keeps the TCP state it needs to
let go: a leg is done after FIN both ways or an RST; when both legs are done
(or leg A is and leg B never started) the flow is closing and gets the short
``tcp_closing`` timeout. Until the client's first ACK a TCP flow has the
``tcp_handshake`` timeout (a SYN flood must not pin pool entries for an
hour), then ``tcp_idle``; UDP has ``udp_idle``. All are idle timeouts: a
packet restarts them. Times are whole seconds ("ticks").

A timer wheel keeps ``expire`` from scanning the table: one bucket per tick,
each a circular doubly-linked ring threaded through the bindings' own
``_prev``/``_next`` slots, so a binding is unlinked in O(1) when removed or
moved and a dead binding is never kept alive by a far-future bucket. A packet
only stores ``last_seen``; the bucket a binding sits in is a lower bound of
its deadline, re-checked when the bucket comes due (lazy re-check), and moved
early only when the deadline shrinks (entering closing). Each binding is
touched O(1) times per timeout period.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from firewall.config.model import Timeouts
from firewall.packet import ACK, FIN, RST, SYN, TCP, Packet
from firewall.pools import EndpointPool

M16 = 0xFFFF
M32 = 0xFFFFFFFF


def flow_key(proto: int, src: int, sport: int, dst: int, dport: int) -> int:
    """The key of a packet src:sport -> dst:dport as the client or server sends it."""
    return proto << 96 | src << 64 | dst << 32 | sport << 16 | dport


def fw_key(proto: int, addr: int, port: int) -> int:
    """The key of a firewall-side endpoint F:f (the destination of all AG output)."""
    return proto << 48 | addr << 16 | port


class Direction(enum.IntEnum):
    """Which of the four packet paths of a binding a packet is on (table above)."""

    CLIENT_TO_AG = 0
    AG_TO_CLIENT = 1
    AG_TO_SERVER = 2
    SERVER_TO_AG = 3


class FlowState(enum.IntFlag):
    """The bits of ``Binding.state``. Stored as a plain int below 256, which
    CPython shares, so the state costs a binding nothing but its slot."""

    FIN_FROM_CLIENT = 1
    FIN_FROM_AG_A = 2  # the AG's FIN to the client, leg A
    FIN_FROM_AG_B = 4  # the AG's FIN to the server, leg B
    FIN_FROM_SERVER = 8
    RST_A = 16
    RST_B = 32
    ESTABLISHED = 64  # the client ACKed the AG's SYN-ACK
    SNAT = 128  # leg B uses W:w from the SNAT pool


class Refusal(enum.Enum):
    """Why ``FlowTable.open`` made no binding. The caller drops the packet and counts."""

    EXISTS = "the flow already has a binding"
    FW_POOL_EXHAUSTED = "no free firewall-side endpoint"
    SNAT_POOL_EXHAUSTED = "no free SNAT endpoint"
    CONFLICT = "another binding already uses one of this flow's tuples"


_C2A = Direction.CLIENT_TO_AG
_A2C = Direction.AG_TO_CLIENT
_A2S = Direction.AG_TO_SERVER
_S2A = Direction.SERVER_TO_AG

_FIN_BIT = (1, 2, 4, 8)  # FIN_FROM_* by Direction
_RST_BIT = (16, 16, 32, 32)  # RST_A or RST_B by Direction
_LEG_A_FINS = 3
_LEG_B_FINS = 12
_LEG_B_BITS = 4 | 8 | 32
_ESTABLISHED = 64
_SNAT = 128
_SYN_ACK_RST = SYN | ACK | RST


def _closing(state: int, leg_b_started: bool) -> bool:
    leg_a = state & 16 or state & _LEG_A_FINS == _LEG_A_FINS
    leg_b = not leg_b_started or state & 32 or state & _LEG_B_FINS == _LEG_B_FINS
    return bool(leg_a and leg_b)


@dataclass(frozen=True, slots=True)
class AgEndpoint:
    """An application gateway's listen endpoint G:g, shared by all its bindings."""

    name: str
    addr: int
    port: int

    @classmethod
    def of(cls, name: str, addr: ipaddress.IPv4Address, port: int) -> AgEndpoint:
        return cls(name, int(addr), port)

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

    Build one with ``FlowTable.open``; ``created``/``last_seen`` are ticks
    (whole seconds of the clock the table is given).
    """

    client_key: int
    server_key: int
    fw: int
    gateway: AgEndpoint
    created: int
    last_seen: int
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
    def established(self) -> bool:
        return bool(self.state & _ESTABLISHED)

    @property
    def closing(self) -> bool:
        return self.fw >> 48 == TCP and _closing(self.state, self.ag_eport is not None)

    def target(self, direction: Direction) -> tuple[int, int, int, int]:
        """(src, sport, dst, dport) to rewrite a packet on ``direction`` to."""
        if direction == _C2A:
            f = self.fw
            g = self.gateway
            return f >> 16 & M32, f & M16, g.addr, g.port
        if direction == _S2A:
            e = self.ag_eport
            if e is None:
                raise ValueError("no leg B yet: the AG has not opened its connection to F:f")
            f = self.fw
            return f >> 16 & M32, f & M16, self.gateway.addr, e
        # The two restorations send the key of the opposite direction back, swapped.
        k = self.client_key if direction == _A2C else self.server_key
        return k >> 32 & M32, k & M16, k >> 64 & M32, k >> 16 & M16

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
            "last_seen": self.last_seen,
            "state": FlowState(self.state),
        }


def _ticks(seconds: float) -> int:
    t = math.ceil(seconds)
    if t < 1:
        raise ValueError(f"timeout {seconds!r}: need at least 1 second")
    return t


class FlowTable:
    """Bindings by key, their pool entries, and their expiry.

    ``fw_pool`` supplies F:f (and should be this instance's slice);
    ``snat_pool``, if given, supplies W:w for ``open(..., snat=True)``.
    Times are seconds of a monotonic clock; they only move forward.
    """

    def __init__(
        self,
        timeouts: Timeouts,
        fw_pool: EndpointPool,
        snat_pool: EndpointPool | None = None,
        *,
        now: float = 0.0,
    ) -> None:
        self._t_tcp_idle = _ticks(timeouts.tcp_idle)
        self._t_closing = _ticks(timeouts.tcp_closing)
        self._t_handshake = _ticks(timeouts.tcp_handshake)
        self._t_udp_idle = _ticks(timeouts.udp_idle)
        self._fw_pool = fw_pool
        self._snat_pool = snat_pool
        self._index: dict[int, Binding] = {}
        self._wheel: dict[int, _Ring] = {}
        self._tick = int(now)
        self._next_tick = self._tick  # the first wheel bucket expire() has not emptied
        self._per_gateway: dict[str, int] = {}
        self._count = 0
        self.recycled = 0  # closing bindings replaced by a new SYN on the same tuple

    # ---- clock and wheel ------------------------------------------------------------

    def _clock(self, now: float) -> int:
        # Reuse one int object per second: every binding touched in that second
        # then shares it instead of holding its own.
        t = int(now)
        if t > self._tick:
            self._tick = t
        return self._tick

    def _timeout(self, b: Binding) -> int:
        if b.fw >> 48 != TCP:
            return self._t_udp_idle
        st = b.state
        if _closing(st, b.ag_eport is not None):
            return self._t_closing
        return self._t_tcp_idle if st & _ESTABLISHED else self._t_handshake

    def _schedule(self, b: Binding, deadline: int) -> None:
        if deadline < self._next_tick:
            deadline = self._next_tick
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

    def create(self, b: Binding) -> bool:
        """Register a binding under its three keys; False (and nothing changed) if one is taken.

        The binding's F:f (and W:w with SNAT) must have come from this table's
        pools: ``remove`` gives them back.
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
        self._schedule(b, b.last_seen + self._timeout(b))
        return True

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
        self._fw_pool.release(f >> 16 & M32, f & M16)
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

    def expire(self, now: float) -> list[Binding]:
        """Remove and return every binding idle past its timeout at ``now``.

        Costs O(buckets due + bindings in them), never a scan of the table.
        """
        t = self._clock(now)
        gone: list[Binding] = []
        start = self._next_tick
        if start > t:
            return gone
        wheel = self._wheel
        # After a long pause, visit the buckets that exist rather than every second.
        due = range(start, t + 1) if t - start < len(wheel) else sorted(k for k in wheel if k <= t)
        self._next_tick = t + 1
        for tick in due:
            head = wheel.pop(tick, None)
            if head is None:
                continue
            b = head._next
            while b is not head:
                nxt = b._next
                deadline = b.last_seen + self._timeout(b)
                if deadline <= t:
                    self.remove(b)
                    gone.append(b)
                else:
                    self._unlink(b)
                    self._schedule(b, deadline)
                b = nxt
        return gone

    # ---- per-packet lookups ---------------------------------------------------------

    def by_key(self, key: int) -> Binding | None:
        """The binding indexed under a ``flow_key`` or ``fw_key``."""
        return self._index.get(key)

    def match_outside(self, pkt: Packet) -> tuple[Binding, Direction] | None:
        """A packet from a client or a server (not from the blind track): its binding and direction.

        A bare SYN on the tuple of a closing binding is a new connection that
        reuses the client's port (RFC 9293 3.10.7.4 lets TIME-WAIT accept it):
        the old binding is removed and None returned, so the caller opens a
        fresh one with a fresh F:f.
        """
        proto, src, sport, dst, dport, flags, _, _, _ = pkt
        k = proto << 96 | src << 64 | dst << 32 | sport << 16 | dport
        b = self._index.get(k)
        if b is None:
            return None
        if k == b.client_key:
            if proto == TCP and flags & _SYN_ACK_RST == SYN and _closing(b.state, b.ag_eport is not None):
                self.remove(b)
                self.recycled += 1
                return None
            return b, _C2A
        # The server can only answer once the AG has opened leg B.
        if b.ag_eport is None:
            return None
        return b, _S2A

    def match_gateway(self, pkt: Packet) -> tuple[Binding, Direction] | None:
        """A packet from the blind track to F:f: its binding and direction.

        From G:g it is leg A's reply. From any other port of G it is leg B: the
        first such packet (a bare SYN for TCP) teaches the binding G:e. A TCP
        leg B that is done may be replaced by a new SYN from another port (the
        AG retrying the server).
        """
        proto, src, sport, dst, dport, flags, _, _, _ = pkt
        b = self._index.get(proto << 48 | dst << 16 | dport)
        if b is None:
            return None
        gw = b.gateway
        if src != gw.addr:
            return None
        if sport == gw.port:
            return b, _A2C
        e = b.ag_eport
        if sport == e:
            return b, _A2S
        if proto == TCP:
            if flags & _SYN_ACK_RST != SYN:
                return None
            st = b.state
            if e is not None and not (st & 32 or st & _LEG_B_FINS == _LEG_B_FINS):
                return None
        elif e is not None:
            return None
        self.learn_ag_port(b, sport)
        return b, _A2S

    def learn_ag_port(self, b: Binding, port: int) -> None:
        """Record G:e, the AG's leg-B port, starting leg B's TCP state afresh."""
        b.ag_eport = port
        b.state &= ~_LEG_B_BITS

    def seen(self, b: Binding, direction: Direction, flags: int, now: float) -> None:
        """Note a packet of ``b``: restart its idle timer and track TCP FIN/RST/handshake.

        ``flags`` is ``Packet.flags`` (0 for UDP).
        """
        t = int(now)
        if t > self._tick:
            self._tick = t
        b.last_seen = self._tick
        if not flags & (FIN | RST) and (direction != _C2A or b.state & _ESTABLISHED or not flags & ACK):
            return
        st = old = b.state
        if flags & FIN:
            st |= _FIN_BIT[direction]
        if flags & RST:
            st |= _RST_BIT[direction]
        if direction == _C2A and flags & (ACK | SYN) == ACK:
            st |= _ESTABLISHED
        if st == old:
            return
        b.state = st
        started = b.ag_eport is not None
        if _closing(st, started) and not _closing(old, started) and b._prev is not None:
            # The deadline shrank: move the binding to an earlier bucket now.
            self._unlink(b)
            self._schedule(b, self._tick + self._t_closing)

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
