"""Dynamic rules: what a gateway asked for, what the processor expects, and the kernel rules behind them.

Pure, like ``core``: the ``RuleBook`` decides and queues ``KernelOp``s; the
runner has ``firewall.processor.dynamic`` carry them out and reports back
with ``kernel_done``. docs/signalling.md (RULE_REQUEST) is the contract; the
seed's "Dynamic changes in packet processing" the requirement.

- A request is checked in the document's order (NOT_EXACT/BAD_TTL,
  UNKNOWN_FLOW, THIRD_PARTY, POLICY, LIMIT); a repeated (sender, request id)
  gets the first reply again, re-encoded (the same bytes would be a replay).
  RULE_ACK goes out only when the kernel has the rule: it promises that the
  rule is in place.
- REDIRECT: an expectation here, plus one kernel rule in ``dyn_redirect``
  that queues the expected flow's first packet to this instance (the static
  rules know neither port). That packet gets a binding to the asking flow's
  gateway, and the kernel carries the flow from there (its NAT is in
  conntrack, docs/datapath.md); a one-shot expectation then ends (RULE_END
  USED) and its rule goes.
- ALLOW: one ``ct state new`` accept rule in ``dyn_allow``; the kernel
  carries the flow and conntrack its replies. When the destination is the
  router's own address standing in for a party of the asking flow (the port
  forward's S' for its server S, with the client as the source; the flow's
  SNAT address W for its client C, with the server as the source), the
  accept is preceded by an exact DNAT in ``dyn_dnat`` (src -> W:p becomes
  src -> party:p, the port kept), and it is for the translated tuple and
  asks ``ct status dnat``, so it admits only what the DNAT made. A rule's
  kernel rules are one unit: they go in and out together, in one operation. The flow is then an ordinary
  tracked connection: kernel speed, replies un-NATed by conntrack. A
  router address that stands for nobody of the flow (another local
  address, or the right one with the wrong source) is refused THIRD_PARTY:
  the translation target always comes from the binding, never from the
  request.
- Use of a TCP ALLOW is seen, and one-shot enforced, by the processor
  itself: a third rule in ``dyn_redirect`` queues the expected flow's SYNs
  (only those: SYN without ACK, FIN or RST) to this instance, which
  passes the first one unchanged (the ``passed`` mark: conntrack, the DNAT
  and the accept then take it like any packet) and ends a one-shot rule
  there (RULE_END USED). The kernel rules stay ``USED_GRACE`` seconds more,
  so that a retransmitted SYN of that same connection (same source port)
  is passed too, while a SYN from any other source port is dropped: one
  connection, exactly. Then all of the unit goes, in one operation (with
  iptables the mangle rule last, so no SYN can reach the DNAT or the accept
  without passing the processor). One packet per data connection crosses
  into user space; the rest is the kernel's.
- A UDP ALLOW has no first packet to tell apart: its use is seen in the
  accept rule's packet counter, polled each tick while such a rule exists,
  so a one-shot UDP ALLOW ends within one tick of its first packet (inside
  that tick another flow from the same exact source address to the same
  port could pass too).
- Every rule ends on first use (one-shot), at its TTL, or with its flow
  (RULE_END FLOW_ENDED).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firewall.config.model import PortRange
from firewall.flows import AgEndpoint, Binding
from firewall.packet import TCP, UDP
from firewall.rules.build import DYN_ALLOW, DYN_DNAT, DYN_REDIRECT
from firewall.rules.model import Accept, Addr, CtDnat, CtState, Dnat, Family, Port, Queue, Rule, TcpSyn
from firewall.rules.model import Proto as ProtoMatch
from firewall.signalling import (
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

if TYPE_CHECKING:
    from firewall.processor.core import ProcessorCore

# Which dynamic rules each gateway kind may ask for (the POLICY check). FTP
# needs its data connections, RTP its control port; a relay, SMTP or the
# tunnel has no protocol reason to open a second flow.
RULE_MODES: dict[str, frozenset[RuleMode]] = {
    "ftp": frozenset({RuleMode.REDIRECT, RuleMode.ALLOW}),
    "rtp": frozenset({RuleMode.REDIRECT, RuleMode.ALLOW}),
}
MAX_KERNEL_OPS_IN_FLIGHT = 256  # tool runs queued; beyond this requests are refused LIMIT
# How long a used one-shot TCP ALLOW stays in the kernel, passing SYN
# retransmissions of its one connection (Linux resends a SYN after 1 s, then
# 3 s) and dropping any other connection's SYN.
USED_GRACE = 3.0

# A repeated (sender, request id) gets the first reply again; the gateway
# retries within a few query timeouts, so a minute is plenty.
REPLY_CACHE_SIZE = 4096
REPLY_CACHE_SECONDS = 60.0

TAG_PREFIX = "nfgate-dyn"  # kernel rule comments: "nfgate-dyn q<queue> k<serial>"

_PROTO_NAME = {TCP: "tcp", UDP: "udp"}


@dataclass(frozen=True, slots=True)
class KernelRule:
    """One exact rule in a dynamic chain; ``tag``, its comment, names it in the kernel."""

    tag: str
    chain: str  # DYN_REDIRECT, DYN_DNAT or DYN_ALLOW
    rule: Rule


@dataclass(frozen=True, slots=True)
class KernelOp:
    """Add or remove rules in one transaction, or (``poll``) read DYN_ALLOW's packet counters."""

    token: int
    add: bool
    rules: tuple[KernelRule, ...] = ()
    poll: bool = False


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
    owner: int  # flow id of the flow it belongs to
    gateway: AgEndpoint
    server: tuple[int, int]  # REDIRECT: where leg B goes; ALLOW: where the kernel's DNAT sends it (or dst)
    one_shot: bool
    expires: float  # monotonic seconds
    expires_ms: int  # the same moment, Unix ms, for RULE_ACK
    kernel: tuple[KernelRule, ...]
    reply_to: tuple[int, int] | None = None  # (sender, request id)
    acked: bool = False
    ended: RuleEndReason | None = None
    watched: bool = False  # a TCP ALLOW: its SYNs are queued to the processor (``allowed``)


@dataclass(slots=True, eq=False)
class Spent:
    """A one-shot TCP ALLOW after its first SYN: its kernel rules wait ``USED_GRACE`` before they go."""

    key: tuple[int, int, int, int]  # (proto, src, dst, dport), as the expectation index
    sport: int  # the source port of the one connection it let through
    owner: int
    kernel: tuple[KernelRule, ...]
    remove_at: float
    removing: bool = False


def exact_matches(proto: int, src: int, sport: int | None, dst: int, dport: int | PortRange | None) -> list[Any]:
    """Rule-model matches for one source host:port (0/None: any) to one destination host:port(s)."""
    m: list[Any] = [ProtoMatch(_PROTO_NAME[proto]), Addr("src", (ipaddress.IPv4Network(src),))]
    if sport:
        m.append(Port("src", (PortRange(sport, sport),)))
    m.append(Addr("dst", (ipaddress.IPv4Network(dst),)))
    if isinstance(dport, PortRange):
        m.append(Port("dst", (dport,)))
    elif dport:
        m.append(Port("dst", (PortRange(dport, dport),)))
    return m


class RuleBook:
    """The dynamic rules of one processor instance (module docstring)."""

    def __init__(self, core: ProcessorCore) -> None:
        self.core = core
        self.queue = core.queue
        self.kernel_ops: list[KernelOp] = []
        self.expect: dict[tuple[int, int, int, int], list[DynRule]] = {}
        self.spent: dict[tuple[int, int, int, int], list[Spent]] = {}
        self._bypass = core.config.processor.fail_mode == "open"
        self._snat_ports = core.config.processor.pools.snat_ports
        self._max_rules = core.config.processor.max_rules
        self._max_per_flow = core.config.processor.max_rules_per_flow
        self._kind = {g.name: g.kind for g in core.config.gateways}
        self._rules: dict[int, DynRule] = {}  # rule id -> live rule
        self._rules_of: dict[int, list[DynRule]] = {}  # flow id -> its live rules
        self._ops: dict[int, tuple[Any, ...]] = {}  # token -> what its completion means
        self._tokens = itertools.count(1)
        self._tags = itertools.count(1)
        self._serial = itertools.count(1)
        self._polling = False
        self._replies: OrderedDict[tuple[int, int], tuple[float, RuleAck | RuleRefused | None]] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    def __len__(self) -> int:
        return len(self._rules)

    # ---- requests ---------------------------------------------------------------------

    def request(self, got: Received, req: RuleRequest, source: tuple[str, int], now: float) -> None:
        core = self.core
        key = (got.sender, req.request_id)
        cached = self._replies.get(key)
        if cached is not None:
            core.counters["rules.repeated"] += 1
            if cached[1] is not None:  # None: the first is still being installed
                core.send(cached[1], source)
            return
        core.counters["rules.requests"] += 1
        made = self._check(req, now)
        if isinstance(made, RuleRefusal):
            self._reply(key, RuleRefused(req.request_id, made), source, now)
            return
        made.reply_to = key
        self._replies[key] = (now, None)
        self._add(made)
        self._kernel(True, made.kernel, ("ack", made, source))

    def _check(self, req: RuleRequest, now: float) -> DynRule | RuleRefusal:
        """The checks of docs/signalling.md, in its order: the rule, or the first refusal."""
        problem = rule_request_problem(req)
        if problem is not None:
            return problem
        core = self.core
        b = core.binding(req.flow_id) if flow_id_queue(req.flow_id) == self.queue else None
        if b is None:
            return RuleRefusal.UNKNOWN_FLOW
        local = list(core.local_addresses())
        if names_third_party(req, core.flow_info(req.flow_id, b), local):
            return RuleRefusal.THIRD_PARTY
        src, dst = int(req.src.address), int(req.dst.address)
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
        if req.mode not in RULE_MODES.get(self._kind[b.gateway.name], frozenset()):
            return RuleRefusal.POLICY
        if (
            len(self._rules_of.get(req.flow_id, ())) >= self._max_per_flow
            or len(self._rules) >= self._max_rules
            or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT
        ):
            return RuleRefusal.LIMIT
        return self._make(req.mode, req.proto, src, req.src.port, dst, req.dst.port, req.flow_id, b,
                          server, req.one_shot, req.ttl, now)

    @staticmethod
    def _server_for(b: Binding, dst: int, dport: int) -> tuple[int, int]:
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
    def _allow_target(b: Binding, src: int, dst: int) -> int | None:
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
        b: Binding, server: tuple[int, int], one_shot: bool, ttl: int, now: float,
    ) -> DynRule:
        core = self.core
        rule_id = make_flow_id(self.queue, next(self._serial))
        kernel: tuple[KernelRule, ...]
        if mode is RuleMode.ALLOW and server[0] != dst:
            # The router's address to the party it stands for, and the accept
            # for the translated tuple only. The nat rule comes before the
            # filter rule: with iptables each table is its own commit, and a
            # DNAT alone admits nothing.
            target = PortRange(dport, dport)
            kernel = (
                self._kernel_rule(DYN_DNAT, exact_matches(proto, src, sport, dst, dport),
                                  Dnat(ipaddress.IPv4Address(server[0]), target)),
                self._kernel_rule(DYN_ALLOW, exact_matches(proto, src, sport, server[0], dport)
                                  + [CtState(("new",)), CtDnat()], Accept()),
            )
        elif mode is RuleMode.ALLOW:
            matches = exact_matches(proto, src, sport, dst, dport) + [CtState(("new",))]
            kernel = (self._kernel_rule(DYN_ALLOW, matches, Accept()),)
        else:
            # The expected flow's first packet; conntrack carries the rest of
            # it, and its replies, through the binding it gets.
            kernel = (self._redirect(exact_matches(proto, src, sport, dst, dport)),)
        watched = mode is RuleMode.ALLOW and proto == TCP
        if watched:
            # Its SYNs to this instance, first of the unit (mangle: before the DNAT).
            kernel = (self._redirect(exact_matches(proto, src, sport, dst, dport) + [TcpSyn()]), *kernel)
        expires_ms = round((now + core.wall_offset + ttl) * 1000)
        return DynRule(rule_id, mode, proto, src, sport, dst, dport, owner, b.gateway, server,
                       one_shot, now + ttl, expires_ms, kernel, watched=watched)

    def _redirect(self, matches: list[Any]) -> KernelRule:
        return self._kernel_rule(DYN_REDIRECT, matches, Queue(self.queue, self._bypass))

    def _kernel_rule(self, chain: str, matches: list[Any], verdict: Any) -> KernelRule:
        tag = f"{TAG_PREFIX} q{self.queue} k{next(self._tags)}"
        return KernelRule(tag, chain, Rule(tuple(matches), (verdict,), tag, Family.V4))

    def _add(self, rule: DynRule) -> None:
        self._rules[rule.rule_id] = rule
        self._rules_of.setdefault(rule.owner, []).append(rule)
        if rule.mode is RuleMode.REDIRECT or rule.watched:
            self.expect.setdefault((rule.proto, rule.src, rule.dst, rule.dport), []).append(rule)

    def _reply(self, key: tuple[int, int], msg: RuleAck | RuleRefused, to: tuple[str, int], now: float) -> None:
        counters = self.core.counters
        if isinstance(msg, RuleRefused):
            counters[f"rules.refused.{msg.reason.name.lower()}"] += 1
        else:
            counters["rules.acked"] += 1
        self._replies[key] = (now, msg)
        self._replies.move_to_end(key)
        while len(self._replies) > REPLY_CACHE_SIZE:
            self._replies.popitem(last=False)
        self.core.send(msg, to)

    # ---- expectations -----------------------------------------------------------------

    def adjacent(self, fid: int, b: Binding, step: int, now: float, ttl: float) -> None:
        """The processor's own one-shot REDIRECT for the port ``step`` above this flow's."""
        (ca, _), (oa, op), (sa, sp) = b.client, b.original_dst, b.server
        if op + step > 0xFFFF or sp + step > 0xFFFF:
            return
        if len(self._rules) >= self._max_rules or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT:
            self.core.counters["rules.adjacent_skipped"] += 1
            return
        rule = self._make(RuleMode.REDIRECT, b.proto, ca, 0, oa, op + step, fid, b, (sa, sp + step),
                          True, int(ttl), now)
        rule.acked = True  # nobody waits for an ACK; the kernel applies the ops in order
        self._add(rule)
        self._kernel(True, rule.kernel)
        self.core.counters["rules.adjacent"] += 1

    def expected(self, proto: int, src: int, sport: int, dst: int, dport: int, now: float) -> DynRule | None:
        for rule in self.expect.get((proto, src, dst, dport), ()):
            if (rule.sport == 0 or rule.sport == sport) and rule.expires > now:
                return rule
        return None

    def allowed(self, rule: DynRule, sport: int, now: float) -> None:
        """The first SYN of a watched ALLOW's flow: it passes; a one-shot rule is used up (module docstring)."""
        self.core.counters["rules.allowed_flows"] += 1
        if not rule.one_shot:
            return
        self._retire(rule, RuleEndReason.USED, keep_kernel=True)
        key = (rule.proto, rule.src, rule.dst, rule.dport)
        self.spent.setdefault(key, []).append(Spent(key, sport, rule.owner, rule.kernel, now + USED_GRACE))

    def spent_verdict(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool | None:
        """For a SYN that a used one-shot ALLOW's rules queued: True if it is its connection's
        (a retransmission), False if it is another connection's; None if no such rule."""
        spent = self.spent.get((proto, src, dst, dport))
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

    def redirected(self, rule: DynRule, fid: int, b: Binding) -> None:
        """An expected flow got binding ``b`` (the kernel carries it from here); end a one-shot."""
        self.core.counters["rules.redirected_flows"] += 1
        if rule.one_shot:
            self._retire(rule, RuleEndReason.USED)

    def flow_ended(self, fid: int) -> None:
        for rule in self._rules_of.pop(fid, ()):
            self._retire(rule, RuleEndReason.FLOW_ENDED)
        for spent in [s for group in self.spent.values() for s in group if s.owner == fid]:
            self._unspend(spent)

    def _retire(self, rule: DynRule, reason: RuleEndReason | None, keep_kernel: bool = False) -> None:
        """End a live rule: out of the indexes and the kernel; RULE_END once acknowledged.

        ``reason`` None: it never started (the kernel refused it). ``keep_kernel``:
        its kernel rules stay, and a ``Spent`` takes them over.
        """
        if self._rules.pop(rule.rule_id, None) is None:
            return
        rule.ended = reason
        if reason is not None:
            self.core.counters[f"rules.ended.{reason.name.lower()}"] += 1
        siblings = self._rules_of.get(rule.owner)
        if siblings is not None and rule in siblings:
            siblings.remove(rule)
        if rule.mode is RuleMode.REDIRECT or rule.watched:
            key = (rule.proto, rule.src, rule.dst, rule.dport)
            waiting = self.expect[key]
            waiting.remove(rule)
            if not waiting:
                del self.expect[key]
        if not keep_kernel:
            self._kernel(False, rule.kernel)
        if reason is not None and rule.acked and rule.reply_to is not None:
            self.core.send(RuleEnd(rule.rule_id, reason), self.core.gateway_peers[rule.gateway.name])

    # ---- time and the kernel ----------------------------------------------------------

    def tick(self, now: float) -> None:
        for rule in [r for r in self._rules.values() if r.expires <= now]:
            self._retire(rule, RuleEndReason.EXPIRED)
        for spent in [s for group in self.spent.values() for s in group if s.remove_at <= now]:
            self._unspend(spent)
        while self._replies:
            key, (at, _) = next(iter(self._replies.items()))
            if at > now - REPLY_CACHE_SECONDS:
                break
            del self._replies[key]
        if not self._polling and any(self._polled(r) for r in self._rules.values()):
            self._polling = True
            token = next(self._tokens)
            self._ops[token] = ("poll",)
            self.kernel_ops.append(KernelOp(token, False, (), poll=True))

    @staticmethod
    def _polled(rule: DynRule) -> bool:
        """An acknowledged ALLOW whose use only its packet counter can show (UDP)."""
        return rule.mode is RuleMode.ALLOW and rule.acked and not rule.watched

    def _kernel(self, add: bool, rules: tuple[KernelRule, ...], purpose: tuple[Any, ...] = ("rules",)) -> None:
        token = next(self._tokens)
        self._ops[token] = purpose
        self.kernel_ops.append(KernelOp(token, add, rules))

    def kernel_done(self, token: int, ok: bool, now: float, counts: dict[str, int] | None = None) -> None:
        """A ``KernelOp`` finished; ``counts`` are DYN_ALLOW's packets by tag, for a poll.

        A polled (UDP) ALLOW's use is its accept rule's counter; whatever else
        is in its ``kernel`` tuple (a DNAT) is removed with it.
        """
        purpose = self._ops.pop(token, None)
        if purpose is None:
            return
        counters = self.core.counters
        counters["kernel.ops"] += 1
        if not ok:
            counters["kernel.failed"] += 1
        if purpose[0] == "poll":
            self._polling = False
            for rule in [r for r in self._rules.values() if self._polled(r)]:
                if ok and counts and any(counts.get(k.tag, 0) for k in rule.kernel):
                    counters["rules.allowed_flows"] += 1
                    if rule.one_shot:
                        self._retire(rule, RuleEndReason.USED)
        elif purpose[0] == "unspent":
            # Gone from the kernel (or never there): its SYNs no longer come here.
            spent = purpose[1]
            group = self.spent.get(spent.key, [])
            if spent in group:
                group.remove(spent)
                if not group:
                    del self.spent[spent.key]
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
                    self.core.send(RuleEnd(rule.rule_id, rule.ended), self.core.gateway_peers[rule.gateway.name])
