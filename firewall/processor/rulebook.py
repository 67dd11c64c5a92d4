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
- REDIRECT: an expectation here, plus two kernel rules in ``dyn_redirect``
  that queue the expected flow and its replies to this instance (the static
  rules know neither port). The first packet gets a binding to the asking
  flow's gateway and two exact rules of its own, owned by that binding and
  removed when it ends; a one-shot expectation then ends (RULE_END USED) and
  its wider rules go. The kernel applies the operations in order, so the
  flow's own rules are in before the expectation's leave.
- ALLOW: one ``ct state new`` accept rule in ``dyn_allow``; the kernel
  carries the flow and conntrack its replies. Use is seen in the rule's
  packet counter, polled each tick while an acknowledged ALLOW exists, so a
  one-shot ALLOW ends within one tick of its first packet: inside that tick
  another new connection from the same exact source address to the same
  destination port could pass too. Polling keeps the kernel rule a plain
  accept, and costs one tool run a second only while such rules exist.
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
from firewall.rules.build import DYN_ALLOW, DYN_REDIRECT
from firewall.rules.model import Accept, Addr, CtState, Family, Port, Queue, Rule
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
    chain: str  # DYN_REDIRECT or DYN_ALLOW
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
    server: tuple[int, int]  # REDIRECT: where leg B goes
    one_shot: bool
    expires: float  # monotonic seconds
    expires_ms: int  # the same moment, Unix ms, for RULE_ACK
    kernel: tuple[KernelRule, ...]
    reply_to: tuple[int, int] | None = None  # (sender, request id)
    acked: bool = False
    ended: RuleEndReason | None = None


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
        self._bypass = core.config.processor.fail_mode == "open"
        self._snat_ports = core.config.processor.pools.snat_ports
        self._max_rules = core.config.processor.max_rules
        self._max_per_flow = core.config.processor.max_rules_per_flow
        self._kind = {g.name: g.kind for g in core.config.gateways}
        self._rules: dict[int, DynRule] = {}  # rule id -> live rule
        self._rules_of: dict[int, list[DynRule]] = {}  # flow id -> its live rules
        self._flow_kernel: dict[int, tuple[KernelRule, ...]] = {}  # flow id -> its own exact rules
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
        if names_third_party(req, core.flow_info(req.flow_id, b), core.local_addresses()):
            return RuleRefusal.THIRD_PARTY
        if req.mode not in RULE_MODES.get(self._kind[b.gateway.name], frozenset()):
            return RuleRefusal.POLICY
        if (
            len(self._rules_of.get(req.flow_id, ())) >= self._max_per_flow
            or len(self._rules) >= self._max_rules
            or self.in_flight >= MAX_KERNEL_OPS_IN_FLIGHT
        ):
            return RuleRefusal.LIMIT
        src, dst = int(req.src.address), int(req.dst.address)
        server = self._server_for(b, dst, req.dst.port)
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

    def _make(
        self, mode: RuleMode, proto: int, src: int, sport: int, dst: int, dport: int, owner: int,
        b: Binding, server: tuple[int, int], one_shot: bool, ttl: int, now: float,
    ) -> DynRule:
        core = self.core
        rule_id = make_flow_id(self.queue, next(self._serial))
        if mode is RuleMode.ALLOW:
            matches = exact_matches(proto, src, sport, dst, dport) + [CtState(("new",))]
            kernel: tuple[KernelRule, ...] = (self._kernel_rule(DYN_ALLOW, matches, Accept()),)
        else:
            # The expected flow, and its replies: from the server to the client
            # or, through masquerade, to the router's address in the SNAT range.
            reply_to: tuple[int, int | PortRange | None] = (src, sport or None)
            egress = core.snat_address(server[0])
            if egress is not None:
                reply_to = (egress, self._snat_ports)
            kernel = (
                self._redirect(exact_matches(proto, src, sport, dst, dport)),
                self._redirect(exact_matches(proto, server[0], server[1], *reply_to)),
            )
        expires_ms = round((now + core.wall_offset + ttl) * 1000)
        return DynRule(rule_id, mode, proto, src, sport, dst, dport, owner, b.gateway, server,
                       one_shot, now + ttl, expires_ms, kernel)

    def _redirect(self, matches: list[Any]) -> KernelRule:
        return self._kernel_rule(DYN_REDIRECT, matches, Queue(self.queue, self._bypass))

    def _kernel_rule(self, chain: str, matches: list[Any], verdict: Any) -> KernelRule:
        tag = f"{TAG_PREFIX} q{self.queue} k{next(self._tags)}"
        return KernelRule(tag, chain, Rule(tuple(matches), (verdict,), tag, Family.V4))

    def _add(self, rule: DynRule) -> None:
        self._rules[rule.rule_id] = rule
        self._rules_of.setdefault(rule.owner, []).append(rule)
        if rule.mode is RuleMode.REDIRECT:
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

    def redirected(self, rule: DynRule, fid: int, b: Binding) -> None:
        """An expected flow got binding ``b``: give it exact rules of its own, and end a one-shot."""
        proto, (ca, cp), (oa, op), (sa, sp), (va, vp) = b.proto, b.client, b.original_dst, b.server, b.visible_client
        mine = (
            self._redirect(exact_matches(proto, ca, cp, oa, op)),
            self._redirect(exact_matches(proto, sa, sp, va, vp)),
        )
        self._flow_kernel[fid] = mine
        self._kernel(True, mine)
        self.core.counters["rules.redirected_flows"] += 1
        if rule.one_shot:
            self._retire(rule, RuleEndReason.USED)

    def flow_ended(self, fid: int) -> None:
        for rule in self._rules_of.pop(fid, ()):
            self._retire(rule, RuleEndReason.FLOW_ENDED)
        mine = self._flow_kernel.pop(fid, None)
        if mine:
            self._kernel(False, mine)

    def _retire(self, rule: DynRule, reason: RuleEndReason | None) -> None:
        """End a live rule: out of the indexes and the kernel; RULE_END once acknowledged.

        ``reason`` None: it never started (the kernel refused it).
        """
        if self._rules.pop(rule.rule_id, None) is None:
            return
        rule.ended = reason
        if reason is not None:
            self.core.counters[f"rules.ended.{reason.name.lower()}"] += 1
        siblings = self._rules_of.get(rule.owner)
        if siblings is not None and rule in siblings:
            siblings.remove(rule)
        if rule.mode is RuleMode.REDIRECT:
            key = (rule.proto, rule.src, rule.dst, rule.dport)
            waiting = self.expect[key]
            waiting.remove(rule)
            if not waiting:
                del self.expect[key]
        self._kernel(False, rule.kernel)
        if reason is not None and rule.acked and rule.reply_to is not None:
            self.core.send(RuleEnd(rule.rule_id, reason), self.core.gateway_peers[rule.gateway.name])

    # ---- time and the kernel ----------------------------------------------------------

    def tick(self, now: float) -> None:
        for rule in [r for r in self._rules.values() if r.expires <= now]:
            self._retire(rule, RuleEndReason.EXPIRED)
        while self._replies:
            key, (at, _) = next(iter(self._replies.items()))
            if at > now - REPLY_CACHE_SECONDS:
                break
            del self._replies[key]
        if not self._polling and any(r.mode is RuleMode.ALLOW and r.acked for r in self._rules.values()):
            self._polling = True
            token = next(self._tokens)
            self._ops[token] = ("poll",)
            self.kernel_ops.append(KernelOp(token, False, (), poll=True))

    def _kernel(self, add: bool, rules: tuple[KernelRule, ...], purpose: tuple[Any, ...] = ("rules",)) -> None:
        token = next(self._tokens)
        self._ops[token] = purpose
        self.kernel_ops.append(KernelOp(token, add, rules))

    def kernel_done(self, token: int, ok: bool, now: float, counts: dict[str, int] | None = None) -> None:
        """A ``KernelOp`` finished; ``counts`` are DYN_ALLOW's packets by tag, for a poll."""
        purpose = self._ops.pop(token, None)
        if purpose is None:
            return
        counters = self.core.counters
        counters["kernel.ops"] += 1
        if not ok:
            counters["kernel.failed"] += 1
        if purpose[0] == "poll":
            self._polling = False
            for rule in [r for r in self._rules.values() if r.mode is RuleMode.ALLOW and r.acked]:
                if ok and counts and any(counts.get(k.tag, 0) for k in rule.kernel):
                    counters["rules.allowed_flows"] += 1
                    if rule.one_shot:
                        self._retire(rule, RuleEndReason.USED)
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
                self._reply(key, RuleAck(key[1], rule.rule_id, rule.expires_ms), source, now)
                if rule.ended is not None:  # used or expired while it was being installed
                    self.core.send(RuleEnd(rule.rule_id, rule.ended), self.core.gateway_peers[rule.gateway.name])
