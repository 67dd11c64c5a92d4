"""Dynamic rules: what a gateway asked for, what the processor expects, and the kernel elements behind them.

Pure, like ``core``, and it knows nothing of the core: it is given plain
values and look-ups (the config, its instance, the gateways' signalling
ports, a binding by flow id, the router's addresses), and each of its entry points returns commands
as data, in order: ``Send`` a message, a ``KernelOp`` adding or removing
elements of the binding table's dynamic sets and maps (``firewall.rules.bind``;
docs/datapath.md, "Dynamic rules"), ``Offloaded`` (end the flow's binding).
The core carries them out; the runner writes the kernel operations
in-process (``firewall.processor.kernel``) and reports back with
``kernel_done``. docs/signalling.md (RULE_REQUEST) is the contract; the
seed's "Dynamic changes in packet processing" the requirement.

- A request is checked in the document's order (NOT_EXACT/BAD_TTL,
  UNKNOWN_FLOW, THIRD_PARTY, POLICY, LIMIT); a repeated (sender, request id)
  gets the first reply again, re-encoded (the same bytes would be a replay).
  RULE_ACK goes out only when the kernel has the rule: it promises that the
  rule is in place.
- Every rule has an ``expect`` element of this instance: the expected flow's
  first packet (for TCP, its SYN) is marked for this instance's queue (the
  static rules know neither port). A rule with source port 0 lives in the
  ``_any`` sets, matching any source port.
- REDIRECT: that first packet gets a binding to the asking flow's gateway,
  and the kernel carries the flow from there; a one-shot expectation then
  ends (RULE_END USED) and its elements go.
- ALLOW: an ``allow`` element too: the forward hook marks the flow's new
  connection ``allowed``, which the static forward rule accepts; the kernel
  carries the flow and conntrack its replies. When the destination is the
  router's own address standing in for a party of the asking flow (the port
  forward's S' for its server S, with the client as the source; the flow's
  SNAT address W for its client C, with the server as the source), a
  ``dnat`` element translates it (src -> W:p becomes src -> party:p, the
  port kept), and the accept is an ``allow_dnat`` element for the
  translated tuple, which asks ``ct status dnat``: it admits only what the
  DNAT made. A router address that stands for nobody of the flow is refused
  THIRD_PARTY: the translation target always comes from the binding, never
  from the request. A rule's elements are one unit: they go in and out
  together, in one transaction.
- Use of an ALLOW, TCP or UDP, is seen, and one-shot enforced, by the
  processor itself: its first packet comes here and is passed unchanged
  (the ``passed`` mark: conntrack, the DNAT and the accept then take it like
  any packet), which ends a one-shot rule (RULE_END USED). The elements stay
  ``USED_GRACE`` seconds more, so that a retransmitted SYN of that same
  connection (same source port) is passed too, while another source port's
  first packet is dropped: one connection, exactly. Later packets of the
  connection are conntrack's. One packet per data connection crosses into
  user space.
- Every rule ends on first use (one-shot), at its TTL, or with its flow
  (RULE_END FLOW_ENDED); a request flagged ``replaces`` ends the flow's
  earlier requested rules that still wait (RULE_END SUPERSEDED): FTP's
  latest PASV or PORT is the only one whose port is open.
- Offload (OFFLOAD_REQUEST; docs/datapath.md, "Offload") is the same ALLOW,
  made by the processor for a flow the gateway has seen enough of: exact
  (the client's own source port) and one-shot, for the flow's original
  tuple C:c -> S':s', with the DNAT to S:s where S' stands in for the
  server. It belongs to no flow (its binding goes as soon as the kernel
  has the rule: ``ProcessorCore.offloaded``), so it ends on use or at
  ``OFFLOAD_TTL``; it holds the flow's leg B connection until then
  (``DeleteConnection`` when it ends). The rules the offloaded flow owned
  live on, owned by no flow (``flow_offloaded``); where one of them names
  the same first packet, the offload's ALLOW wins (``expected``). TCP is refused NOT_UDP: the gateway terminated both
  connections, and two TCP connections cannot become one mid-stream.
- IPv6: a request whose flow is an IPv6 binding (``six.Binding6``, of
  this instance) names IPv6 addresses, is checked the same way (the router's
  IPv6 addresses stand in for parties, the gateway's ORIGINATE leaves from
  G6), and its elements go in the IPv6 table's sets (``dyn_name(..., six=True)``);
  the processor sees its use on its IPv6 path. Offload and the adjacent
  rule too: the same elements in the IPv6 sets, DNAT where the router's
  IPv6 address stands in for the server.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Callable, Iterable, Union

from firewall.config import Config
from firewall.flows import AgEndpoint, Binding
from firewall.processor.six import Binding6
from firewall.packet import TCP, UDP
from firewall.rules.bind import dyn_name
from gateways.kinds import KINDS
from firewall.signalling import (
    Message,
    first_serial,
    OffloadRequest,
    Received,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    flow_id_queue,
    make_flow_id,
    names_third_party,
    rule_request_problem,
)

# Which dynamic rules a gateway may ask for (the POLICY check), and whether it
# may offload (OFFLOAD_REQUEST), is its kind's (gateways/kind.py: rule_modes,
# offload): FTP needs its data connections, RTP its control port; a relay,
# SMTP or the tunnel has no protocol reason to open a second flow.
# How long an offloaded flow's ALLOW waits for the client's next datagram.
# Conntrack's own UDP timeout (30 s by default) is how long a quiet flow
# lives anyway; a flow that stays quiet longer is selected and bound again,
# into the gateway, like any new one.
OFFLOAD_TTL = 30
MAX_KERNEL_OPS_IN_FLIGHT = 256  # operations not yet carried out; beyond this requests are refused LIMIT
# How long a used one-shot TCP ALLOW stays in the kernel, passing SYN
# retransmissions of its one connection (Linux resends a SYN after 1 s, then
# 3 s) and dropping any other connection's SYN.
USED_GRACE = 3.0

# A repeated (sender, request id) gets the first reply again; the gateway
# retries within a few query timeouts, so a minute is plenty.
REPLY_CACHE_SIZE = 4096
REPLY_CACHE_SECONDS = 60.0

_PROTO_NAME = {TCP: "tcp", UDP: "udp"}


def _endpoint(addr: int, port: int) -> str:
    """An address and port as nfgate lists them ("[a]:p" for IPv6); port 0 is "any"."""
    text = f"{ipaddress.IPv4Address(addr)}" if addr <= 0xFFFFFFFF else f"[{ipaddress.IPv6Address(addr)}]"
    return f"{text}:{port if port else '*'}"


def _six(addr: int) -> bool:
    """An IPv6 flow's address: above 2**32 (``six`` refuses ::/8)."""
    return addr > 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class KernelRule:
    """One element of a dynamic set or map of the binding table (firewall.rules.bind).

    ``key`` is (proto name, src, sport, dst, dport), or (proto name, src,
    dst, dport) in an ``_any`` set (any source port); ``value`` the DNAT
    target (address, port) of a ``dnat`` map's element, else None.
    """

    name: str
    key: tuple[Any, ...]
    value: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class KernelOp:
    """Add or remove elements in one transaction."""

    token: int
    add: bool
    rules: tuple[KernelRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to ``to``: a request's source, or a gateway's signalling port."""

    msg: Message
    to: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Offloaded:
    """The kernel has flow ``flow_id``'s offload ALLOW (``rule``): its binding goes
    (``ProcessorCore.offloaded``), which gives the rule leg B's connection to hold."""

    flow_id: int
    rule: "DynRule"


@dataclass(frozen=True, slots=True)
class DeleteConnection:
    """Delete the conntrack entry with this original tuple (proto, src, sport, dst, dport):
    an offloaded flow's leg B, held until the flow's next packet takes the ALLOW."""

    key: tuple[int, int, int, int, int]


Command = Union[Send, KernelOp, Offloaded, DeleteConnection]


@dataclass(slots=True, eq=False)
class DynRule:
    """A dynamic rule: a gateway's (``reply_to`` set) or the processor's own."""

    rule_id: int
    mode: RuleMode
    proto: int
    src: int
    sport: int  # 0: any
    dst: int
    dport: int
    owner: int  # flow id of the flow it belongs to; NO_OWNER for an offload's
    gateway: AgEndpoint
    server: tuple[int, int]  # REDIRECT: where leg B goes; ALLOW: where the kernel's DNAT sends it (or dst)
    one_shot: bool
    expires: float  # monotonic seconds
    expires_ms: int  # the same moment, Unix ms, for RULE_ACK
    kernel: tuple[KernelRule, ...]
    reply_to: tuple[int, int] | None = None  # (sender, request id)
    acked: bool = False
    ended: RuleEndReason | None = None
    watched: bool = False  # an ALLOW: its flows' first packets are queued to the processor (``allowed``)
    offload: bool = False  # an offload's ALLOW: its use starts a connection the kernel carries for the gateway
    # An offload's: the flow's leg B connection, kept until the ALLOW is used (or ends):
    # what the gateway still relays on it meanwhile reaches the server.
    hold: tuple[int, int, int, int, int] | None = None
    # An ORIGINATE's: the address its connection leaves the router from (the gateway's port kept).
    source: int = 0


@dataclass(slots=True, eq=False)
class Spent:
    """A one-shot TCP ALLOW after its first SYN: its kernel rules wait ``USED_GRACE`` before they go."""

    key: tuple[int, int, int, int]  # (proto, src, dst, dport), as the expectation index
    sport: int  # the source port of the one connection it let through
    any_port: bool  # the rule named any source port: another port's first packet is its too
    owner: int
    kernel: tuple[KernelRule, ...]
    remove_at: float
    removing: bool = False


NO_OWNER = 0  # flow ids start at serial 1: no flow has this id


class RuleBook:
    """The dynamic rules of one processor instance (module docstring)."""

    def __init__(
        self,
        config: Config,
        instance: int,
        queue: int,
        *,
        counters: Counter[str],
        gateway_peers: dict[str, tuple[str, int]],
        binding: Callable[[int], Binding | Binding6 | None],
        gateway_at: dict[tuple[str, int], str] | None = None,
        local_addresses: Callable[[], Iterable[IPv4Address]],
        local_addresses6: Callable[[], Iterable[IPv6Address]] = lambda: (),
    ) -> None:
        proc = config.processor
        self.queue = queue
        self.instance = instance
        self.counters = counters  # the processor's, shared: one set of counters per instance
        self._peers = gateway_peers
        self._binding = binding
        self._local_addresses = local_addresses
        self._local_addresses6 = local_addresses6
        self._g6 = int(config.gateway_link.gateway_address6.ip)  # where an IPv6 ORIGINATE's connection starts
        self.expect: dict[tuple[int, int, int, int], list[DynRule]] = {}
        self.spent: dict[tuple[int, int, int, int], list[Spent]] = {}
        self._max_rules = proc.max_rules
        self._max_per_flow = proc.max_rules_per_flow
        self._kind = {g.name: KINDS[g.kind] for g in config.gateways}
        # A gateway's requests come from its own signalling port (docs/datapath.md, "Signalling ports"),
        # one per worker process (``gateway_at``: every worker's, when there are several).
        self._gateway_at = {peer: name for name, peer in gateway_peers.items()} | dict(gateway_at or {})
        self._rules: dict[int, DynRule] = {}  # rule id -> live rule
        self._rules_of: dict[int, list[DynRule]] = {}  # flow id -> its live rules
        self._ops: dict[int, tuple[Any, ...]] = {}  # token -> what its completion means
        self._tokens = itertools.count(1)
        self._serial = itertools.count(first_serial(config.node_index))
        self._replies: OrderedDict[tuple[int, int], tuple[float, RuleAck | RuleRefused | None]] = OrderedDict()
        self._offloading: set[int] = set()  # flow ids whose offload's rule is being installed
        self._out: list[Command] = []  # what the entry point being run returns

    def _peer(self, ag: AgEndpoint) -> tuple[str, int]:
        """Where the gateway (worker) behind ``ag`` takes its signalling."""
        return ag.peer or self._peers[ag.name]

    def _done(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    def __len__(self) -> int:
        return len(self._rules)

    # ---- requests ---------------------------------------------------------------------

    def request(self, got: Received, req: RuleRequest, source: tuple[str, int], now: float, wall: float) -> list[Command]:
        """RULE_REQUEST: the rule's kernel operation (its RULE_ACK follows ``kernel_done``), or the refusal."""
        key = (got.sender, req.request_id)
        cached = self._replies.get(key)
        if cached is not None:
            self.counters["rules.repeated"] += 1
            if cached[1] is not None:  # None: the first is still being installed
                self._out.append(Send(cached[1], source))
            return self._done()
        self.counters["rules.requests"] += 1
        made = self._check(req, now, wall)
        if isinstance(made, RuleRefusal):
            self._reply(key, RuleRefused(req.request_id, made), source, now)
            return self._done()
        if req.replaces:
            for earlier in self._superseded(req):
                self._retire(earlier, RuleEndReason.SUPERSEDED)
        made.reply_to = key
        self._replies[key] = (now, None)
        self._add(made)
        self._kernel(True, made.kernel, ("ack", made, source))
        return self._done()

    def _superseded(self, req: RuleRequest) -> list[DynRule]:
        """The rules a ``replaces`` request ends: its flow's that a gateway asked for
        (not the processor's own adjacent ones) and that still wait for their flow."""
        return [r for r in self._rules_of.get(req.flow_id, ()) if r.reply_to is not None]

    def offload(self, got: Received, req: OffloadRequest, source: tuple[str, int], now: float, wall: float) -> list[Command]:
        """OFFLOAD_REQUEST: an exact one-shot ALLOW for the flow; the binding goes once the kernel has it."""
        key = (got.sender, req.request_id)
        cached = self._replies.get(key)
        if cached is not None:
            self.counters["offload.repeated"] += 1
            if cached[1] is not None:
                self._out.append(Send(cached[1], source))
            return self._done()
        self.counters["offload.requests"] += 1
        made = self._check_offload(req, source, now, wall)
        if isinstance(made, RuleRefusal):
            self.counters[f"offload.refused.{made.name.lower()}"] += 1
            self._reply(key, RuleRefused(req.request_id, made), source, now)
            return self._done()
        made.reply_to = key
        self._replies[key] = (now, None)
        self._add(made)
        self._kernel(True, made.kernel, ("offload", made, source, req.flow_id))
        return self._done()

    def _check_offload(self, req: OffloadRequest, source: tuple[str, int], now: float, wall: float) -> DynRule | RuleRefusal:
        """docs/signalling.md, "Offload", in its order: the rule, or the first refusal."""
        b = self._binding(req.flow_id) if flow_id_queue(req.flow_id) == self.queue else None
        if b is None or req.flow_id in self._offloading:
            return RuleRefusal.UNKNOWN_FLOW
        if self._gateway_at.get(source) != b.gateway.name:
            return RuleRefusal.OTHER_GATEWAY
        if b.proto != UDP:
            return RuleRefusal.NOT_UDP
        if not self._kind[b.gateway.name].offload:
            return RuleRefusal.POLICY
        if len(self._rules) >= self._max_rules or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT:
            return RuleRefusal.LIMIT
        (ca, cp), (oa, op) = b.client, b.original_dst
        self._offloading.add(req.flow_id)
        # The client's tuple exactly, as it addressed the server; the server it reaches.
        rule = self._make(RuleMode.ALLOW, b.proto, ca, cp, oa, op, NO_OWNER, b, b.server, True, OFFLOAD_TTL, now, wall)
        rule.offload = True
        return rule

    def _check(self, req: RuleRequest, now: float, wall: float) -> DynRule | RuleRefusal:
        """The checks of docs/signalling.md, in its order: the rule, or the first refusal."""
        problem = rule_request_problem(req)
        if problem is not None:
            return problem
        b = self._binding(req.flow_id) if flow_id_queue(req.flow_id) == self.queue else None
        if b is None:
            return RuleRefusal.UNKNOWN_FLOW
        local = list(self._local_addresses6() if isinstance(b, Binding6) else self._local_addresses())
        if names_third_party(req, b.info(req.flow_id), local):
            return RuleRefusal.THIRD_PARTY
        src, dst = int(req.src.address), int(req.dst.address)
        if req.mode is RuleMode.ORIGINATE:
            return self._check_originate(req, b, src, dst, now, wall)
        if req.mode is RuleMode.ALLOW:
            target = self._allow_target(b, src, dst)
            if target is None and any(int(a) == dst for a in local):
                # The router's address standing in for nobody: an accept in the
                # forward chain could never match it, and a translation to
                # anything the binding does not name would be a bounce.
                return RuleRefusal.THIRD_PARTY
            server = (target if target is not None else dst, req.dst.port)
        else:
            server = self._server_for(b, dst, req.dst.port)
        if req.mode not in self._kind[b.gateway.name].rule_modes:
            return RuleRefusal.POLICY
        kept = len(self._rules_of.get(req.flow_id, ())) - (len(self._superseded(req)) if req.replaces else 0)
        if (
            kept >= self._max_per_flow
            or len(self._rules) >= self._max_rules
            or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT
        ):
            return RuleRefusal.LIMIT
        return self._make(req.mode, req.proto, src, req.src.port, dst, req.dst.port, req.flow_id, b,
                          server, req.one_shot, req.ttl, now, wall)

    def _check_originate(self, req: RuleRequest, b: Binding | Binding6, src: int, dst: int, now: float, wall: float) -> DynRule | RuleRefusal:
        """The rest of ORIGINATE's checks (docs/signalling.md): the connection the gateway opens
        from G to dst leaves the router from src, which must be what dst knows the other
        party as: S' for the client, C (or the binding's W) for the server."""
        if req.src.port:
            return RuleRefusal.NOT_EXACT  # the connection keeps the gateway's own port
        (ca, _), (oa, _), (sa, _), (va, _) = b.client, b.original_dst, b.server, b.visible_client
        if (src, dst) not in ((oa, ca), (va, sa)):
            return RuleRefusal.THIRD_PARTY
        if req.mode not in self._kind[b.gateway.name].rule_modes:
            return RuleRefusal.POLICY
        kept = len(self._rules_of.get(req.flow_id, ())) - (len(self._superseded(req)) if req.replaces else 0)
        if kept >= self._max_per_flow or len(self._rules) >= self._max_rules or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT:
            return RuleRefusal.LIMIT
        g, proto, dport = self._g6 if isinstance(b, Binding6) else b.gateway.addr, req.proto, req.dst.port
        rule_id = make_flow_id(self.queue, next(self._serial))
        rule = DynRule(rule_id, RuleMode.ORIGINATE, proto, g, 0, dst, dport, req.flow_id, b.gateway, (dst, dport),
                       req.one_shot, now + req.ttl, round((wall + req.ttl) * 1000),
                       (self._element("expect", proto, g, 0, dst, dport),), source=src)
        return rule

    def originated(self, rule: DynRule) -> list[Command]:
        """The first packet of an ORIGINATE's connection, from the gateway: a one-shot rule is used."""
        self.counters["rules.originated_flows"] += 1
        if rule.one_shot:
            self._retire(rule, RuleEndReason.USED)
        return self._done()

    @staticmethod
    def _server_for(b: Binding | Binding6, dst: int, dport: int) -> tuple[int, int]:
        """Where a redirected flow to dst:dport really goes.

        The router's address may stand in for a party: the port forward's
        address for the server S, the masquerade address W for the client C.
        The port is what the gateway announced (PASV, PORT), so it is kept.
        """
        if dst == b.original_dst[0] and dst != b.server[0]:
            return b.server[0], dport
        if b.snat and dst == b.visible_client[0]:
            return b.client[0], dport
        return dst, dport

    @staticmethod
    def _allow_target(b: Binding | Binding6, src: int, dst: int) -> int | None:
        """The party of ``b`` that the router's address ``dst`` stands for, for a flow from ``src``; else None.

        Only the two stand-ins the binding itself made: the port forward's
        address S' that the client addressed, for the server S (inbound
        passive FTP: the client connects to S'); and the address W the
        processor SNATs the flow to, for the client C (outbound active FTP:
        the server connects to W). The source must be the other party.
        """
        (ca, _), (oa, _), (sa, _) = b.client, b.original_dst, b.server
        if dst == oa and oa != sa and src == ca:
            return sa
        if b.snat and dst == b.visible_client[0] and src == sa:
            return ca
        return None

    def _make(
        self, mode: RuleMode, proto: int, src: int, sport: int, dst: int, dport: int, owner: int,
        b: Binding | Binding6, server: tuple[int, int], one_shot: bool, ttl: int, now: float, wall: float,
    ) -> DynRule:
        rule_id = make_flow_id(self.queue, next(self._serial))
        kernel: tuple[KernelRule, ...]
        if mode is RuleMode.ALLOW and server != (dst, dport):
            # The router's address to the party it stands for (an FTP rule keeps
            # the port; an offloaded port forward's flow goes to its S:s), and
            # the accept for the translated tuple only, after that DNAT.
            kernel = (self._element("dnat", proto, src, sport, dst, dport, server),
                      self._element("allow_dnat", proto, src, sport, *server))
        elif mode is RuleMode.ALLOW:
            kernel = (self._element("allow", proto, src, sport, dst, dport),)
        else:
            kernel = ()
        # The flow's first packet comes to this instance: a REDIRECT's to be
        # bound into the gateway, an ALLOW's so that its use is seen, exactly.
        kernel = (self._element("expect", proto, src, sport, dst, dport), *kernel)
        watched = mode is RuleMode.ALLOW
        expires_ms = round((wall + ttl) * 1000)
        return DynRule(rule_id, mode, proto, src, sport, dst, dport, owner, b.gateway, server,
                       one_shot, now + ttl, expires_ms, kernel, watched=watched)

    def _element(self, kind: str, proto: int, src: int, sport: int, dst: int, dport: int,
                 value: tuple[int, int] | None = None) -> KernelRule:
        name = dyn_name(kind, self.instance, not sport, _six(src))
        key = (_PROTO_NAME[proto], src, sport, dst, dport) if sport else (_PROTO_NAME[proto], src, dst, dport)
        return KernelRule(name, key, value)

    def _add(self, rule: DynRule) -> None:
        self._rules[rule.rule_id] = rule
        self._rules_of.setdefault(rule.owner, []).append(rule)
        if rule.mode is not RuleMode.ALLOW or rule.watched:
            self.expect.setdefault((rule.proto, rule.src, rule.dst, rule.dport), []).append(rule)

    def _reply(self, key: tuple[int, int], msg: RuleAck | RuleRefused, to: tuple[str, int], now: float) -> None:
        counters = self.counters
        if isinstance(msg, RuleRefused):
            counters[f"rules.refused.{msg.reason.name.lower()}"] += 1
        else:
            counters["rules.acked"] += 1
        self._replies[key] = (now, msg)
        self._replies.move_to_end(key)
        while len(self._replies) > REPLY_CACHE_SIZE:
            self._replies.popitem(last=False)
        self._out.append(Send(msg, to))

    # ---- expectations -----------------------------------------------------------------

    def adjacent(self, fid: int, b: Binding | Binding6, step: int, now: float, wall: float, ttl: float) -> list[Command]:
        """The processor's own one-shot REDIRECT for the port ``step`` beside this flow's (above or below)."""
        (ca, _), (oa, op), (sa, sp) = b.client, b.original_dst, b.server
        if not (0 < op + step <= 0xFFFF and 0 < sp + step <= 0xFFFF):
            return []
        if len(self._rules) >= self._max_rules or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT:
            self.counters["rules.adjacent_skipped"] += 1
            return []
        rule = self._make(RuleMode.REDIRECT, b.proto, ca, 0, oa, op + step, fid, b, (sa, sp + step),
                          True, int(ttl), now, wall)
        rule.acked = True  # nobody waits for an ACK; the kernel applies the ops in order
        self._add(rule)
        self._kernel(True, rule.kernel)
        self.counters["rules.adjacent"] += 1
        return self._done()

    def expected(self, proto: int, src: int, sport: int, dst: int, dport: int, now: float) -> DynRule | None:
        """The live rule that expects this first packet; an offload's first. A flow the kernel
        now carries may also be named by an older REDIRECT that outlived its owner's offload
        (RTCP's flow asked for RTP's port, and RTP came by its selector): the offload wins."""
        found = None
        for rule in self.expect.get((proto, src, dst, dport), ()):
            if (rule.sport == 0 or rule.sport == sport) and rule.expires > now:
                if rule.offload:
                    return rule
                if found is None:
                    found = rule
        return found

    def allowed(self, rule: DynRule, sport: int, now: float) -> list[Command]:
        """The first SYN of a watched ALLOW's flow: it passes; a one-shot rule is used up (module docstring)."""
        self.counters["rules.allowed_flows"] += 1
        if rule.hold is not None:
            # Before the verdict: the new connection's reply tuple (S:s -> C:c) is leg B's.
            self._out.append(DeleteConnection(rule.hold))
            rule.hold = None
        if not rule.one_shot:
            return self._done()
        self._retire(rule, RuleEndReason.USED, keep_kernel=True)
        key = (rule.proto, rule.src, rule.dst, rule.dport)
        spent = Spent(key, sport, rule.sport == 0, rule.owner, rule.kernel, now + USED_GRACE)
        self.spent.setdefault(key, []).append(spent)
        return self._done()

    def spent_verdict(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool | None:
        """For a first packet that a used one-shot ALLOW's rules name: True if it is its connection's
        (a retransmission), False if it is another connection's; None if no such rule. A rule with
        an exact source port names no other port's packet."""
        spent = [s for s in self.spent.get((proto, src, dst, dport), ()) if s.any_port or s.sport == sport]
        if not spent:
            return None
        return any(s.sport == sport for s in spent)

    def watched(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool:
        """Whether a watched ALLOW, live or past its TTL but not yet retired, names this flow."""
        return any(r.watched and (r.sport == 0 or r.sport == sport) for r in self.expect.get((proto, src, dst, dport), ()))

    def _unspend(self, spent: Spent) -> None:
        if not spent.removing:
            spent.removing = True
            self._kernel(False, spent.kernel, ("unspent", spent))

    def redirected(self, rule: DynRule, fid: int, b: Binding | Binding6) -> list[Command]:
        """An expected flow got binding ``b`` (the kernel carries it from here); end a one-shot."""
        self.counters["rules.redirected_flows"] += 1
        if rule.one_shot:
            self._retire(rule, RuleEndReason.USED)
        return self._done()

    def flow_offloaded(self, fid: int) -> list[Command]:
        """Flow ``fid``'s binding went to the kernel: its rules live on, owned by no flow, to their
        use or TTL (an RTP flow's adjacent rule still brings RTCP into the gateway)."""
        kept = self._rules_of.pop(fid, [])
        for rule in kept:
            rule.owner = NO_OWNER
        if kept:
            self._rules_of.setdefault(NO_OWNER, []).extend(kept)
            self.counters["rules.kept_through_offload"] += len(kept)
        return self._done()

    def flow_ended(self, fid: int) -> list[Command]:
        """Flow ``fid``'s binding is gone: its rules end with it (RULE_END FLOW_ENDED)."""
        for rule in self._rules_of.pop(fid, ()):
            self._retire(rule, RuleEndReason.FLOW_ENDED)
        for spent in [s for group in self.spent.values() for s in group if s.owner == fid]:
            self._unspend(spent)
        return self._done()

    def _retire(self, rule: DynRule, reason: RuleEndReason | None, keep_kernel: bool = False) -> None:
        """End a live rule: out of the indexes and the kernel; RULE_END once acknowledged.

        ``reason`` None: it never started (the kernel refused it). ``keep_kernel``:
        its kernel rules stay, and a ``Spent`` takes them over.
        """
        if self._rules.pop(rule.rule_id, None) is None:
            return
        rule.ended = reason
        if reason is not None:
            self.counters[f"rules.ended.{reason.name.lower()}"] += 1
        siblings = self._rules_of.get(rule.owner)
        if siblings is not None and rule in siblings:
            siblings.remove(rule)
        if rule.mode is not RuleMode.ALLOW or rule.watched:
            key = (rule.proto, rule.src, rule.dst, rule.dport)
            waiting = self.expect[key]
            waiting.remove(rule)
            if not waiting:
                del self.expect[key]
        if not keep_kernel:
            self._kernel(False, rule.kernel)
        if rule.hold is not None:  # an offload's ALLOW that ends unused: leg B goes with it
            self._out.append(DeleteConnection(rule.hold))
            rule.hold = None
        if reason is not None and rule.acked and rule.reply_to is not None:
            self._out.append(Send(RuleEnd(rule.rule_id, reason), self._peer(rule.gateway)))

    # ---- the listing -----------------------------------------------------------------

    def listing(self, now: float, wall: float, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` dynamic rules as ``nfgate flows --rules`` lists them: the live ones
        (a gateway's REDIRECT or ALLOW, such as FTP's data connections; the processor's own
        adjacent-port rule; an offload's ALLOW, with the leg B it holds), then the used
        one-shot ALLOWs whose elements wait out ``USED_GRACE``."""
        out: list[dict[str, Any]] = []
        for rule in itertools.islice(self._rules.values(), max(0, limit)):
            if rule.offload:
                kind = "offload"
            elif rule.reply_to is None:
                kind = "adjacent"  # the processor's own
            else:
                kind = rule.mode.name.lower()
            rec: dict[str, Any] = {
                "kind": kind, "rule_id": rule.rule_id, "queue": self.queue, "proto": _PROTO_NAME[rule.proto],
                "src": _endpoint(rule.src, rule.sport), "dst": _endpoint(rule.dst, rule.dport),
                "to": _endpoint(*rule.server), "gateway": rule.gateway.name,
                "flow_id": rule.owner if rule.owner != NO_OWNER else None,
                "one_shot": rule.one_shot, "state": "live" if rule.acked else "installing",
                "expires": round(wall + rule.expires - now, 3), "expires_in": round(rule.expires - now, 1),
            }
            if rule.offload:
                rec["holds_leg_b"] = rule.hold is not None
            out.append(rec)
        for group in self.spent.values():
            for spent in group:
                if len(out) >= limit:
                    return out
                proto, src, dst, dport = spent.key
                out.append({
                    "kind": "used", "rule_id": None, "queue": self.queue, "proto": _PROTO_NAME[proto],
                    "src": _endpoint(src, spent.sport), "dst": _endpoint(dst, dport), "to": None, "gateway": None,
                    "flow_id": spent.owner if spent.owner != NO_OWNER else None, "one_shot": True,
                    "state": "used", "expires": round(wall + spent.remove_at - now, 3),
                    "expires_in": round(spent.remove_at - now, 1),
                })
        return out

    # ---- time and the kernel ----------------------------------------------------------

    def tick(self, now: float) -> list[Command]:
        """Expired rules end, used ALLOWs' elements go after their grace, old replies are forgotten."""
        for rule in [r for r in self._rules.values() if r.expires <= now]:
            self._retire(rule, RuleEndReason.EXPIRED)
        for spent in [s for group in self.spent.values() for s in group if s.remove_at <= now]:
            self._unspend(spent)
        while self._replies:
            key, (at, _) = next(iter(self._replies.items()))
            if at > now - REPLY_CACHE_SECONDS:
                break
            del self._replies[key]
        return self._done()

    def _kernel(self, add: bool, rules: tuple[KernelRule, ...], purpose: tuple[Any, ...] = ("rules",)) -> None:
        token = next(self._tokens)
        self._ops[token] = purpose
        self._out.append(KernelOp(token, add, rules))

    def kernel_done(self, token: int, ok: bool, now: float) -> list[Command]:
        """A ``KernelOp`` finished."""
        purpose = self._ops.pop(token, None)
        if purpose is None:
            return []
        counters = self.counters
        counters["kernel.ops"] += 1
        if not ok:
            counters["kernel.failed"] += 1
        if purpose[0] == "unspent":
            # Gone from the kernel (or never there): its SYNs no longer come here.
            spent = purpose[1]
            group = self.spent.get(spent.key, [])
            if spent in group:
                group.remove(spent)
                if not group:
                    del self.spent[spent.key]
        elif purpose[0] == "offload":
            rule, source, fid = purpose[1], purpose[2], purpose[3]
            self._offloading.discard(fid)
            key = rule.reply_to
            if not ok:
                counters["rules.install_failed"] += 1
                self._retire(rule, None)
                self._reply(key, RuleRefused(key[1], RuleRefusal.LIMIT), source, now)
            elif self._binding(fid) is None:
                # It ended while its rule went in: nothing left to offload.
                self._retire(rule, None)
                self._reply(key, RuleRefused(key[1], RuleRefusal.UNKNOWN_FLOW), source, now)
            else:
                rule.acked = True
                self._reply(key, RuleAck(key[1], rule.rule_id, rule.expires_ms), source, now)
                self._out.append(Offloaded(fid, rule))
                if rule.ended is not None:
                    self._out.append(Send(RuleEnd(rule.rule_id, rule.ended), self._peer(rule.gateway)))
        elif purpose[0] == "ack":
            rule, source = purpose[1], purpose[2]
            key = rule.reply_to
            if not ok:
                # The kernel refused the rule: a resource the router could not provide.
                counters["rules.install_failed"] += 1
                self._retire(rule, None)
                self._reply(key, RuleRefused(key[1], RuleRefusal.LIMIT), source, now)
            elif rule.ended is RuleEndReason.FLOW_ENDED:
                self._reply(key, RuleRefused(key[1], RuleRefusal.UNKNOWN_FLOW), source, now)
            else:
                rule.acked = True
                if rule.mode is RuleMode.ALLOW and rule.server[0] != rule.dst:
                    counters["rules.translated"] += 1  # an ALLOW with its DNAT
                self._reply(key, RuleAck(key[1], rule.rule_id, rule.expires_ms), source, now)
                if rule.ended is not None:  # used or expired while it was being installed
                    self._out.append(Send(RuleEnd(rule.rule_id, rule.ended), self._peer(rule.gateway)))
        return self._done()
