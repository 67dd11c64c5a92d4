"""The deNAT/reNAT layer's signalling logic, sans-IO: datagrams and ``now`` in, outputs out.

Theory of operation
-------------------

The seed ("Signalling in general") puts "a simple deNATting / reNATting
layer" next to each application gateway: it is "the peer entity of the
packet processor part regarding signalling", so that the gateway proper can
process a connection "as if it had received it directly from its original
source". A gateway accepts a connection from F:f on G:g; ``LayerCore`` says
which original tuple that is (``FlowInfo``: client C:c, original
destination S':s', server S:s, and ``snat``, the router's W:w that the
server sees as the client when the processor SNATs leg B, or None), and
the gateway opens leg B by connecting back to F:f, the seed's "switching"
of source and destination ("Packet restoration"), which the processor then
restores.

How a flow becomes known: the seed's hybrid scheme ("Out-of-band
signalling"): "the transmitting party sends one or more signalling messages
spontaneously, and the receiving party only sends an inquiry if it still did
not receive any signalling message within a certain time".

1. ``receive(datagram, now)``: every datagram goes through the ``Guard``
   first (MAC, freshness, replay, copies); a refusal is counted by reason and
   nothing else happens, and nothing is ever answered (docs/signalling.md,
   "a receiver never answers a datagram it refused").
2. NEW_FLOW enters the flow table under (proto, F:f, G:g). A newer binding
   on the same tuple replaces the old one: F:f went back to the pool and was
   handed out again.
3. ``lookup(key, now)``: a table hit answers at once (``FlowKnown``).
   A miss waits ``query_timeout`` for the push, then sends QUERY to the
   instance that owns F, and again every ``query_timeout`` with the same
   query id, ``MAX_QUERY_ATTEMPTS`` times; then gives up (``FlowNotKnown``),
   and the gateway closes the connection. NOT_FOUND gives up at once: the
   owner answered from its table, and its binding is made before the first
   packet of the flow is reinjected, so no push can still be on its way.
4. FLOW_END removes the flow; if a connection holds it (``claim``), the
   output ``FlowGone`` tells the gateway to close it.
5. ``request_rule(...)``: RULE_REQUEST to the flow's instance, resent with
   the same request id every ``query_timeout`` until RULE_ACK or
   RULE_REFUSED, at most ``MAX_RULE_ATTEMPTS`` sends (the processor answers a
   repeated request id with its first reply). RULE_END of an acknowledged
   rule comes out as ``RuleGone``.
6. ``request_offload(flow, now)``: OFFLOAD_REQUEST, resent and answered like
   a rule request (RULE_ACK or RULE_REFUSED); then FLOW_END OFFLOADED ends
   the flow like any FLOW_END.
7. A NEW_FLOW without F:f (all zeros) is a flow the kernel carries with no
   binding (a log-only gateway's): it is kept by flow id, apart from the
   table, until its FLOW_END, which comes out as ``LoggedFlowEnded`` with
   conntrack's counters.
8. ``tick(now)`` runs the timers; ``next_deadline()`` says when it is due.

Memory is bounded whatever the processor sends: flows held by a connection
are bounded by the gateway's own connection limit; the others expire
``unclaimed_ttl`` after they were learnt or released, and beyond
``MAX_UNCLAIMED_FLOWS`` the oldest is evicted (a later connection for it
pulls it again). Pending queries are bounded by the connections waiting;
pending rule requests by ``MAX_PENDING_RULES``; acknowledged rules by
``MAX_TRACKED_RULES``.

Takeover (docs/ha.md): when a router pair's node becomes master it takes
over the bindings of the flows it now carries and pushes each (NEW_FLOW)
under its own flow id. A NEW_FLOW or ANSWER for a known tuple that differs
from the known flow only in its flow id, and whose flow id is the other
node's (the node bit), moves the flow; so does one from the same node for a
flow that has moved before (that node took it over, let go of it when it
stepped back, and took it over again under a new id: the stepping back may
be too short for the peer to push it). The entry keeps its claims, takes the
new flow id and sender, and remembers up to ``MAX_MOVED_FROM`` earlier ids,
so that a connection holding the flow under an earlier id still claims,
releases, and sends rule requests (to the new owner, under the new id; a
pending request is re-aimed at its next resend) and sees its end. The
rules the node it left granted for it end at once (``RuleGone`` EXPIRED):
no RULE_END may come for them, and a gateway that keeps a rule (the rtp
gateway's adjacent rule) then asks the new owner at once.

A processor instance that restarts gets a new sender id, and its flow ids
start again: when flows of an instance's queue (on a router pair, of that
node's queue: the flow id's node bit) arrive from a new sender, at a newer
timestamp than anything from the old one, every flow of that instance
from the old sender is dropped (its binding died with the process), and
messages the old sender sent later are ignored (docs/signalling.md, "Flow
ids").

All times are the wall clock (``time.time()``): the Guard and the Encoder
need it for the timestamps both ends compare. A clock stepped backwards
would push a retry far into the future, so a retry that is further away than
it could ever have been scheduled is treated as due.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from dataclasses import replace

from firewall.signalling import (
    MAX_QUERY_ATTEMPTS,
    Answer,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowInfo,
    Guard,
    NewFlow,
    NotFound,
    OffloadRequest,
    Proto,
    Query,
    Received,
    Refusal,
    Role,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    flow_id_node,
    flow_id_queue,
    rule_request_problem,
)
from gateways.layer.instances import ProcessorInstances
from gateways.layer.outputs import (
    EndCause,
    FlowGone,
    FlowKey,
    FlowKnown,
    FlowNotKnown,
    LoggedFlowEnded,
    Output,
    RuleAnswered,
    RuleGone,
    RuleUnanswered,
    Send,
    flow_key,
)

# How long a flow that no connection holds stays in the table: from its push
# (or answer) until a connection claims it, and from the release of the last
# claim. The push races ahead of the flow's first packet, so a connection
# normally claims it within milliseconds; a minute also covers a client whose
# first packet was lost and retransmitted, and a UDP flow that a relay let
# idle out while the processor's binding lives on (processor.timeouts.udp_idle,
# 60 s by default). A flow that expires is not lost: a later connection pulls it.
UNCLAIMED_FLOW_TTL = 60.0

# The most unclaimed flows kept. Each costs about 1.5 KiB (a FlowInfo and
# its five endpoints), so 64 Ki of them stay under 100 MiB; a burst of
# pushes larger than that evicts the oldest, which their connections then
# pull (one query_timeout later).
MAX_UNCLAIMED_FLOWS = 65536

# The same bound on resends as for queries: a request the processor does not
# answer in three tries is not going to be answered in time to be useful to
# a protocol that is waiting for it (an FTP client waiting for a 227 reply).
MAX_RULE_ATTEMPTS = MAX_QUERY_ATTEMPTS

# Rule requests in flight at once, over all of this gateway's connections.
# Each connection has at most a few outstanding; more is a gateway bug or a
# client driving one into a loop, and is refused locally as LIMIT.
MAX_PENDING_RULES = 1024

# Acknowledged rules remembered for their RULE_END. A rule is forgotten at
# its RULE_END, or RULE_END_GRACE after it expired if that RULE_END was lost.
MAX_TRACKED_RULES = 65536
RULE_END_GRACE = 5.0

_U64 = 1 << 64

# Earlier flow ids a moved flow keeps (module docstring, "Takeover"): one per
# failover or failback it lived through, the oldest forgotten beyond this.
MAX_MOVED_FROM = 8


# ---- state ----------------------------------------------------------------------------


class _Entry:
    __slots__ = ("flow", "sender", "claims", "moved_from")

    def __init__(self, flow: FlowInfo, sender: int) -> None:
        self.flow = flow
        self.sender = sender
        self.claims = 0
        self.moved_from: tuple[int, ...] = ()

    def holds(self, flow: FlowInfo) -> bool:
        """Whether ``flow`` is this entry's flow, under its flow id now or an earlier one."""
        return flow.flow_id == self.flow.flow_id or flow.flow_id in self.moved_from


def _moved(old: _Entry, new: FlowInfo) -> bool:
    """Whether ``new`` is ``old``'s flow taken over: by the other node of a pair, or again by a node
    that had taken it over before (module docstring, "Takeover")."""
    if replace(old.flow, flow_id=new.flow_id) != new:
        return False
    return flow_id_node(old.flow.flow_id) != flow_id_node(new.flow_id) or bool(old.moved_from)


class _Lookup:
    __slots__ = ("to", "query_id", "attempts", "deadline")

    def __init__(self, to: Endpoint, deadline: float) -> None:
        self.to = to
        self.query_id: int | None = None
        self.attempts = 0
        self.deadline = deadline


class _RuleWait:
    __slots__ = ("message", "to", "attempts", "deadline")

    def __init__(self, message: RuleRequest | OffloadRequest, to: Endpoint, deadline: float) -> None:
        self.message = message
        self.to = to
        self.attempts = 1
        self.deadline = deadline


class _Rule:
    __slots__ = ("request_id", "forget_at", "flow_id")

    def __init__(self, request_id: int, forget_at: float, flow_id: int) -> None:
        self.request_id = request_id
        self.forget_at = forget_at
        self.flow_id = flow_id  # the flow it was asked for on behalf of (the id it was asked under)


_LOOKUP = 0
_RULE = 1


def _instance_of(flow_id: int) -> tuple[int, int]:
    """The processor instance that made ``flow_id``: its queue and its router's node bit."""
    return flow_id_queue(flow_id), flow_id_node(flow_id)


class LayerCore:
    """The flow table, the pulls and the rule requests of one gateway process."""

    def __init__(
        self,
        key: bytes,
        instances: ProcessorInstances,
        *,
        now: float,
        gateway: str | None = None,
        query_timeout: float,
        replay_window: float,
        unclaimed_ttl: float = UNCLAIMED_FLOW_TTL,
        max_unclaimed: int = MAX_UNCLAIMED_FLOWS,
        sender_id: int | None = None,
    ) -> None:
        if not query_timeout > 0 or not unclaimed_ttl > 0 or max_unclaimed < 1:
            raise ValueError("query_timeout and unclaimed_ttl must be positive, max_unclaimed at least 1")
        # The Guard first: its horizon is its creation, and anything sent
        # before it existed is refused (firewall.signalling.guard).
        self._guard = Guard(key, Role.GATEWAY, now=now, replay_window=replay_window)
        self._encoder = Encoder(key, Role.GATEWAY, sender_id=sender_id)
        self.instances = instances
        self.gateway = gateway
        self.query_timeout = query_timeout
        self.unclaimed_ttl = unclaimed_ttl
        self.max_unclaimed = max_unclaimed
        self.counters: Counter[str] = Counter()

        self._flows: dict[FlowKey, _Entry] = {}
        self._by_id: dict[int, FlowKey] = {}
        self._by_moved: dict[int, FlowKey] = {}  # an earlier flow id of a moved flow -> its key
        self._unclaimed: OrderedDict[FlowKey, float] = OrderedDict()  # key -> expiry, oldest first
        self._queue_sender: dict[tuple[int, int], tuple[int, int]] = {}  # (queue, node) -> (sender, newest timestamp ms)
        self._logged: OrderedDict[int, _Entry] = OrderedDict()  # flow id -> a flow without a binding

        self._lookups: dict[FlowKey, _Lookup] = {}
        self._query_keys: dict[int, FlowKey] = {}
        self._rule_waits: dict[int, _RuleWait] = {}
        self._rules: dict[tuple[int, int], _Rule] = {}  # (sender, rule id)
        self._rules_of: dict[int, set[tuple[int, int]]] = {}  # flow id -> its acknowledged rules' (sender, rule id)
        self._rule_forget: list[tuple[float, int, int]] = []  # (forget_at, sender, rule id)
        self._timers: list[tuple[float, int, int, object]] = []  # (deadline, tiebreak, kind, ident)
        self._tiebreak = 0
        self._next_id = 1  # query and request ids share one counter: unique per process

    @property
    def sender_id(self) -> int:
        return self._encoder.sender_id

    # ---- the gateway's calls ----------------------------------------------------------

    def lookup(self, key: FlowKey, now: float) -> list[Output]:
        """Start (or join) finding ``key``; the result comes out now or from a later call."""
        entry = self._flows.get(key)
        if entry is not None:
            self.counters["lookups.hit"] += 1
            return [FlowKnown(key, entry.flow)]
        if key in self._lookups:
            return []
        if not self.instances.in_pool(key[1].address):
            # Not redirected by the processor: something in the gateway
            # namespace, or a misconfigured pool. Nobody could answer a query.
            self.counters["lookups.failed.outside_pool"] += 1
            self.counters["flows.unknown"] += 1
            return [FlowNotKnown(key, f"{key[1].address} is not in the firewall-side pool {self.instances.pool}")]
        lookup = _Lookup(self.instances.for_firewall_side(key[1].address), now + self.query_timeout)
        self._lookups[key] = lookup
        self._arm(lookup.deadline, _LOOKUP, key)
        self.counters["lookups.missed"] += 1
        return []

    def abandon(self, key: FlowKey) -> None:
        """Nobody waits for ``key`` any more (its connection went away first)."""
        if self._drop_lookup(key) is not None:
            self.counters["lookups.abandoned"] += 1

    def claim(self, flow: FlowInfo) -> bool:
        """A connection holds ``flow``: keep it until released. False if it is gone already."""
        key = flow_key(flow)
        entry = self._flows.get(key)
        if entry is None or not entry.holds(flow):
            return False
        entry.claims += 1
        self._unclaimed.pop(key, None)
        return True

    def release(self, flow: FlowInfo, now: float) -> None:
        """A connection no longer holds ``flow``; the last release starts its expiry."""
        key = flow_key(flow)
        entry = self._flows.get(key)
        if entry is None or not entry.holds(flow) or entry.claims == 0:
            return
        entry.claims -= 1
        if entry.claims == 0:
            self._park(key, now)

    def request_rule(
        self,
        flow: FlowInfo,
        proto: Proto,
        src: Endpoint,
        dst: Endpoint,
        ttl: int,
        mode: RuleMode,
        one_shot: bool,
        now: float,
        replaces: bool = False,
    ) -> tuple[int, list[Output]]:
        """Ask for a dynamic rule; returns the request id and what to do now.

        Bad field values (a ttl beyond the wire's u16, a port out of range)
        are the caller's bug and raise ValueError; a request the processor
        would refuse on its own terms is refused here without asking.
        """
        request_id = self._new_id()
        flow = self._current(flow)
        message = RuleRequest(request_id, flow.flow_id, proto, src, dst, ttl, mode, one_shot, replaces)
        problem = rule_request_problem(message)
        if problem is None and len(self._rule_waits) >= MAX_PENDING_RULES:
            problem = RuleRefusal.LIMIT
        if problem is not None:
            self.counters[f"rules.refused_local.{problem.name}"] += 1
            return request_id, [RuleAnswered(request_id, RuleRefused(request_id, problem), local=True)]
        wait = _RuleWait(message, self.instances.for_flow(flow), now + self.query_timeout)
        self._rule_waits[request_id] = wait
        self._arm(wait.deadline, _RULE, request_id)
        self.counters["rules.requested"] += 1
        return request_id, [self._send(wait.to, message, now, "rules.sent")]

    def request_offload(self, flow: FlowInfo, now: float) -> tuple[int, list[Output]]:
        """Ask the flow's processor instance to hand the flow to the kernel; the request id and what to do now."""
        request_id = self._new_id()
        flow = self._current(flow)
        message = OffloadRequest(request_id, flow.flow_id)
        if len(self._rule_waits) >= MAX_PENDING_RULES:
            self.counters["offload.refused_local.LIMIT"] += 1
            return request_id, [RuleAnswered(request_id, RuleRefused(request_id, RuleRefusal.LIMIT), local=True)]
        wait = _RuleWait(message, self.instances.for_flow(flow), now + self.query_timeout)
        self._rule_waits[request_id] = wait
        self._arm(wait.deadline, _RULE, request_id)
        self.counters["offload.requested"] += 1
        return request_id, [self._send(wait.to, message, now, "offload.sent")]

    def cancel_rule(self, request_id: int) -> None:
        """Nobody waits for the answer to ``request_id`` any more."""
        if self._rule_waits.pop(request_id, None) is not None:
            self.counters["rules.abandoned"] += 1

    # ---- datagrams ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Output]:
        """One datagram from the socket. Never raises, whatever the bytes."""
        result = self._guard.check(data, now)
        if isinstance(result, Refusal):
            if result is Refusal.DUPLICATE:
                self.counters["signalling.duplicate"] += 1  # a redundant copy, folded
            else:
                self.counters[f"signalling.refused.{result.name}"] += 1
            return []
        self.counters["signalling.accepted"] += 1
        message = result.message
        if isinstance(message, NewFlow):
            return self._on_new_flow(result, message, now)
        if isinstance(message, Answer):
            return self._on_answer(result, message, now)
        if isinstance(message, NotFound):
            return self._on_not_found(message)
        if isinstance(message, FlowEnd):
            return self._on_flow_end(result, message)
        if isinstance(message, RuleAck):
            return self._on_rule_ack(result, message, now)
        if isinstance(message, RuleRefused):
            return self._on_rule_refused(message)
        if isinstance(message, RuleEnd):
            return self._on_rule_end(result, message)
        # The Guard of a gateway refuses the processor-bound types
        # (WRONG_DIRECTION), so nothing else can get here.
        raise AssertionError(f"the gateway's Guard accepted a {type(message).__name__}")

    def _on_new_flow(self, received: Received, message: NewFlow, now: float) -> list[Output]:
        flow = message.flow
        if self.gateway is not None and flow.gateway != self.gateway:
            self.counters["pushes.foreign"] += 1
            return []
        out = self._note_sender(received, flow.flow_id)
        if out is None:
            return []
        self.counters["pushes.received"] += 1
        if flow.firewall_side.port == 0:
            return out + self._learn_logged(flow, received.sender)
        return out + self._learn(flow, received.sender, now, "push")

    def _learn_logged(self, flow: FlowInfo, sender: int) -> list[Output]:
        """A flow the kernel carries with no binding: kept by flow id until its FLOW_END."""
        if flow.flow_id in self._logged:
            self.counters["pushes.repeated"] += 1
            return []
        self._logged[flow.flow_id] = _Entry(flow, sender)
        self.counters["flows.logged"] += 1
        out: list[Output] = []
        while len(self._logged) > self.max_unclaimed:
            _, oldest = self._logged.popitem(last=False)
            self.counters["flows.evicted"] += 1
            out.append(LoggedFlowEnded(oldest.flow, EndCause.IDLE, None))
        return out

    def _on_answer(self, received: Received, message: Answer, now: float) -> list[Output]:
        key = self._query_keys.get(message.query_id)
        flow = message.flow
        if key is None:
            self.counters["answers.ignored"] += 1  # late: a push or an earlier answer won
            return []
        if flow_key(flow) != key or (self.gateway is not None and flow.gateway != self.gateway):
            self.counters["answers.mismatched"] += 1  # not what we asked; keep waiting
            return []
        out = self._note_sender(received, flow.flow_id)
        if out is None:
            return []
        self.counters["answers.received"] += 1
        return out + self._learn(flow, received.sender, now, "answer")

    def _on_not_found(self, message: NotFound) -> list[Output]:
        key = self._query_keys.get(message.query_id)
        if key is None or (message.proto, message.firewall_side, message.ag) != key:
            self.counters["not_found.ignored"] += 1
            return []
        self.counters["not_found.received"] += 1
        self._drop_lookup(key)
        self.counters["lookups.failed.not_found"] += 1
        self.counters["flows.unknown"] += 1
        return [FlowNotKnown(key, "the processor has no binding for it (NOT_FOUND)")]

    def _on_flow_end(self, received: Received, message: FlowEnd) -> list[Output]:
        out = self._note_sender(received, message.flow_id)
        if out is None:
            return []
        logged = self._logged.get(message.flow_id)
        if logged is not None and logged.sender == received.sender:
            del self._logged[message.flow_id]
            self.counters[f"flows.ended.{message.reason.name}"] += 1
            return out + [LoggedFlowEnded(logged.flow, EndCause.of(message.reason), message.counters)]
        key = self._by_id.get(message.flow_id)
        entry = self._flows.get(key) if key is not None else None
        if entry is None or entry.sender != received.sender:
            self.counters["flows.end_unknown"] += 1
            return out
        self.counters[f"flows.ended.{message.reason.name}"] += 1
        return out + self._remove(key, EndCause.of(message.reason))

    def _on_rule_ack(self, received: Received, message: RuleAck, now: float) -> list[Output]:
        wait = self._rule_waits.pop(message.request_id, None)
        if wait is None:
            self.counters["rules.reply_ignored"] += 1  # an answer to a resend, or too late
            return []
        self.counters["rules.acked"] += 1
        ident = (received.sender, message.rule_id)
        if ident not in self._rules and len(self._rules) >= MAX_TRACKED_RULES:
            self.counters["rules.untracked"] += 1  # its RULE_END will be counted unknown
        else:
            forget_at = max(message.expires_ms / 1000.0, now) + RULE_END_GRACE
            self._drop_rule(ident)
            self._rules[ident] = _Rule(message.request_id, forget_at, wait.message.flow_id)
            self._rules_of.setdefault(wait.message.flow_id, set()).add(ident)
            heapq.heappush(self._rule_forget, (forget_at, *ident))
        return [RuleAnswered(message.request_id, message)]

    def _drop_rule(self, ident: tuple[int, int]) -> _Rule | None:
        """Stop tracking an acknowledged rule; it, or None if it was not tracked."""
        rule = self._rules.pop(ident, None)
        if rule is not None:
            idents = self._rules_of.get(rule.flow_id)
            if idents is not None:
                idents.discard(ident)
                if not idents:
                    del self._rules_of[rule.flow_id]
        return rule

    def _rules_left_behind(self, flow_id: int, sender: int) -> list[Output]:
        """A flow moved to the other node: the rules the node it left granted for it are no use
        (the failed node's died with it; the one that stepped back carries no traffic), and no
        RULE_END may ever come for them: they end now, so that a gateway asks the new owner."""
        out: list[Output] = []
        for ident in [i for i in self._rules_of.get(flow_id, ()) if i[0] == sender]:
            rule = self._drop_rule(ident)
            if rule is not None:
                self.counters["rules.left_behind"] += 1
                out.append(RuleGone(rule.request_id, ident[1], RuleEndReason.EXPIRED))
        return out

    def _on_rule_refused(self, message: RuleRefused) -> list[Output]:
        if self._rule_waits.pop(message.request_id, None) is None:
            self.counters["rules.reply_ignored"] += 1
            return []
        self.counters[f"rules.refused.{message.reason.name}"] += 1
        return [RuleAnswered(message.request_id, message)]

    def _on_rule_end(self, received: Received, message: RuleEnd) -> list[Output]:
        rule = self._drop_rule((received.sender, message.rule_id))
        if rule is None:
            self.counters["rules.end_unknown"] += 1
            return []
        self.counters[f"rules.ended.{message.reason.name}"] += 1
        return [RuleGone(rule.request_id, message.rule_id, message.reason)]

    # ---- timers ---------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When ``tick`` has work next (wall clock), or None if nothing waits.

        Never later than one interval from ``now``: after the clock stepped
        back, that is when ``tick`` finds the stranded timers (module docstring).
        """
        while self._timers and not self._live(self._timers[0]):
            heapq.heappop(self._timers)
        candidates = []
        if self._timers:
            candidates.append(min(self._timers[0][0], now + self.query_timeout))
        if self._unclaimed:
            candidates.append(min(next(iter(self._unclaimed.values())), now + self.unclaimed_ttl))
        while self._rule_forget and not self._forget_live(self._rule_forget[0]):
            heapq.heappop(self._rule_forget)
        if self._rule_forget:
            candidates.append(self._rule_forget[0][0])
        return min(candidates) if candidates else None

    def tick(self, now: float) -> list[Output]:
        """Run every timer that is due at ``now``."""
        out: list[Output] = []
        # The longest a retry is ever scheduled ahead; anything further is a
        # clock that stepped back (module docstring).
        horizon = now + self.query_timeout
        while self._timers and (self._timers[0][0] <= now or self._timers[0][0] > horizon):
            timer = heapq.heappop(self._timers)
            if not self._live(timer):
                continue
            _, _, kind, ident = timer
            if kind == _LOOKUP:
                out += self._lookup_due(ident, now)  # type: ignore[arg-type]
            else:
                out += self._rule_due(ident, now)  # type: ignore[arg-type]
        while self._unclaimed:
            key, expiry = next(iter(self._unclaimed.items()))
            if now < expiry <= now + self.unclaimed_ttl:
                break
            self.counters["flows.expired"] += 1
            out += self._remove(key, EndCause.IDLE)
        while self._rule_forget and self._rule_forget[0][0] <= now:
            _, sender, rule_id = heapq.heappop(self._rule_forget)
            rule = self._rules.get((sender, rule_id))
            if rule is not None and rule.forget_at <= now:
                self._drop_rule((sender, rule_id))
                self.counters["rules.forgotten"] += 1
                out.append(RuleGone(rule.request_id, rule_id, RuleEndReason.EXPIRED))
        return out

    def _lookup_due(self, key: FlowKey, now: float) -> list[Output]:
        lookup = self._lookups[key]
        if lookup.attempts >= MAX_QUERY_ATTEMPTS:
            self._drop_lookup(key)
            self.counters["lookups.failed.no_answer"] += 1
            self.counters["flows.unknown"] += 1
            return [FlowNotKnown(key, f"no push, and no answer to {lookup.attempts} queries")]
        if lookup.query_id is None:
            lookup.query_id = self._new_id()
            self._query_keys[lookup.query_id] = key
        lookup.attempts += 1
        lookup.deadline = now + self.query_timeout
        self._arm(lookup.deadline, _LOOKUP, key)
        proto, fw, ag = key
        return [self._send(lookup.to, Query(lookup.query_id, proto, fw, ag), now, "queries.sent")]

    def _rule_due(self, request_id: int, now: float) -> list[Output]:
        wait = self._rule_waits[request_id]
        if wait.attempts >= MAX_RULE_ATTEMPTS:
            del self._rule_waits[request_id]
            self.counters["rules.unanswered"] += 1
            return [RuleUnanswered(request_id)]
        key = self._by_moved.get(wait.message.flow_id)
        entry = self._flows.get(key) if key is not None else None
        if entry is not None and wait.message.flow_id in entry.moved_from:
            # Its flow moved to the other node since it was sent: ask that one.
            wait.message = replace(wait.message, flow_id=entry.flow.flow_id)
            wait.to = self.instances.for_flow(entry.flow)
            self.counters["rules.moved"] += 1
        wait.attempts += 1
        wait.deadline = now + self.query_timeout
        self._arm(wait.deadline, _RULE, request_id)
        # Same request id, new sequence number: the processor answers a
        # repeated id with its first reply instead of making a second rule.
        counter = "offload.sent" if isinstance(wait.message, OffloadRequest) else "rules.sent"
        return [self._send(wait.to, wait.message, now, counter)]

    # ---- internals ------------------------------------------------------------------------

    def _send(self, to: Endpoint, message: Query | RuleRequest | OffloadRequest, now: float, counter: str) -> Send:
        self.counters[counter] += 1
        return Send(to, self._encoder.encode(message, now))

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id = ident + 1 if ident + 1 < _U64 else 1
        return ident

    def _arm(self, deadline: float, kind: int, ident: object) -> None:
        self._tiebreak += 1
        heapq.heappush(self._timers, (deadline, self._tiebreak, kind, ident))

    def _live(self, timer: tuple[float, int, int, object]) -> bool:
        deadline, _, kind, ident = timer
        pending = self._lookups.get(ident) if kind == _LOOKUP else self._rule_waits.get(ident)  # type: ignore[call-overload]
        return pending is not None and pending.deadline == deadline

    def _forget_live(self, item: tuple[float, int, int]) -> bool:
        rule = self._rules.get((item[1], item[2]))
        return rule is not None and rule.forget_at == item[0]

    def _note_sender(self, received: Received, flow_id: int) -> list[Output] | None:
        """Track which sender speaks for each instance (a router's queue); None if ``received``
        is from a dead instance. A pair's two nodes bind the same queues: the node bit tells them apart."""
        queue = _instance_of(flow_id)
        known = self._queue_sender.get(queue)
        if known is None or known[0] == received.sender:
            newest = received.timestamp_ms if known is None else max(known[1], received.timestamp_ms)
            self._queue_sender[queue] = (received.sender, newest)
            return []
        if received.timestamp_ms <= known[1]:
            self.counters["signalling.old_instance"] += 1
            return None
        # A new process for this queue: the old one's bindings are gone.
        self._queue_sender[queue] = (received.sender, received.timestamp_ms)
        self.counters["instances.restarted"] += 1
        out: list[Output] = []
        for key, entry in list(self._flows.items()):
            if entry.sender != received.sender and _instance_of(entry.flow.flow_id) == queue:
                self.counters["flows.restarted"] += 1
                out += self._remove(key, EndCause.RESTARTED)
        for flow_id, entry in list(self._logged.items()):
            if entry.sender != received.sender and _instance_of(flow_id) == queue:
                # The kernel still carries it; nobody will report its end.
                del self._logged[flow_id]
                self.counters["flows.restarted"] += 1
                out.append(LoggedFlowEnded(entry.flow, EndCause.RESTARTED, None))
        return out

    def _current(self, flow: FlowInfo) -> FlowInfo:
        """``flow`` as its owner knows it now: under its newest flow id if it moved."""
        entry = self._flows.get(flow_key(flow))
        return entry.flow if entry is not None and flow.flow_id in entry.moved_from else flow

    def _learn(self, flow: FlowInfo, sender: int, now: float, via: str) -> list[Output]:
        key = flow_key(flow)
        out: list[Output] = []
        old = self._flows.get(key)
        if old is not None:
            if old.flow == flow and old.sender == sender:
                self.counters["pushes.repeated" if via == "push" else "answers.repeated"] += 1
                return out
            if _moved(old, flow) and flow.flow_id not in self._by_id:
                self.counters["flows.moved"] += 1
                if flow_id_node(old.flow.flow_id) == flow_id_node(flow.flow_id):
                    self.counters["flows.moved.same_node"] += 1  # taken over again by the node that held it
                out += self._rules_left_behind(old.flow.flow_id, old.sender)
                if self._by_id.get(old.flow.flow_id) == key:
                    del self._by_id[old.flow.flow_id]
                for fid in old.moved_from:
                    if self._by_moved.get(fid) == key:
                        del self._by_moved[fid]
                # Back to an earlier id (a node that never let go of it takes it back): current again.
                old.moved_from = tuple(f for f in (*old.moved_from, old.flow.flow_id) if f != flow.flow_id)[-MAX_MOVED_FROM:]
                for fid in old.moved_from:
                    self._by_moved[fid] = key
                old.flow, old.sender = flow, sender
                self._by_id[flow.flow_id] = key
                if not old.claims:
                    self._park(key, now)
                return out
            self.counters["flows.replaced"] += 1
            out += self._remove(key, EndCause.REPLACED)
        stale_key = self._by_id.get(flow.flow_id)
        if stale_key is not None and stale_key != key:
            # One instance never gives one flow id two tuples; if it did,
            # the older entry could no longer be ended by FLOW_END.
            self.counters["flows.replaced"] += 1
            out += self._remove(stale_key, EndCause.REPLACED)
        self._flows[key] = _Entry(flow, sender)
        self._by_id[flow.flow_id] = key
        self._park(key, now)
        if self._drop_lookup(key) is not None:
            self.counters[f"lookups.resolved_by_{via}"] += 1
            out.append(FlowKnown(key, flow))
        return out

    def _drop_lookup(self, key: FlowKey) -> _Lookup | None:
        lookup = self._lookups.pop(key, None)
        if lookup is not None and lookup.query_id is not None:
            del self._query_keys[lookup.query_id]
        return lookup

    def _park(self, key: FlowKey, now: float) -> None:
        """Start the expiry of an unclaimed flow; evict the oldest beyond the bound."""
        self._unclaimed[key] = now + self.unclaimed_ttl
        self._unclaimed.move_to_end(key)
        while len(self._unclaimed) > self.max_unclaimed:
            oldest = next(iter(self._unclaimed))
            self.counters["flows.evicted"] += 1
            self._remove(oldest, EndCause.IDLE)

    def _remove(self, key: FlowKey, cause: EndCause) -> list[Output]:
        entry = self._flows.pop(key)
        self._unclaimed.pop(key, None)
        if self._by_id.get(entry.flow.flow_id) == key:
            del self._by_id[entry.flow.flow_id]
        for fid in entry.moved_from:
            if self._by_moved.get(fid) == key:
                del self._by_moved[fid]
        return [FlowGone(entry.flow, cause, entry.moved_from)] if entry.claims else []

    # ---- introspection --------------------------------------------------------------------

    def known(self, key: FlowKey) -> FlowInfo | None:
        entry = self._flows.get(key)
        return entry.flow if entry is not None else None

    @property
    def flows(self) -> int:
        return len(self._flows)

    @property
    def pending(self) -> int:
        """Lookups and rule requests waiting for an answer."""
        return len(self._lookups) + len(self._rule_waits)
