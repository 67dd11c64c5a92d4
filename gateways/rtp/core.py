"""The RTP gateway's decisions: sans-IO, one call per datagram, outputs as data.

Theory of operation (docs/rtp.md walks a call through it). The processor
double-NATs each UDP flow it redirects into the gateway (docs/datapath.md)
and tells the layer its original tuple: client C:c, original destination
S':p, server S. ``RtpCore`` gets that tuple when a flow is attached
(``flow_opened``), every datagram of it in either direction (``datagram``:
``None`` to relay it, else the reason to drop it, counted), the processor's
FLOW_END (``flow_gone``), the answers and ends of the rules it asked for,
and the clock (``tick``). What it wants done beyond a verdict it appends to
``outbox``: ``RequestRule``, ``EndFlow``, ``Event``.

- A **stream** is the media of one destination port pair S':N/N+1 (N even,
  RFC 3550 section 11): RTP on N, RTCP on N+1, or both on N (rtcp-mux, RFC
  5761: told apart by the second octet). A flow's role is its original
  destination port's parity.
- **Validation** (``parse``): every datagram is checked before anything
  else happens to it: RTP header, RTCP compound, payload type, feedback.
- **Latching.** A flow joins a stream only by a valid datagram from its
  client. The first such flow creates the stream and latches it to its
  client's address (and port: the other flow of the stream must come from
  the port next to it, ``rtcp_source_port``). While the stream lives, a flow
  from any other address, or a second flow for a role already held, is
  refused: its datagrams are dropped (``not_latched``), however valid. Each
  flow's endpoints are the processor's (signalling): conntrack delivers a
  flow's datagrams only from its own 5-tuple, so the latch is never
  re-learned from whoever sends (the RTP Bleed class: a relay that takes
  the source of the latest packet as the peer's new address).
- **SSRC**: the first RTP SSRC of each direction is the stream's; another
  one is dropped, or taken over and counted (``ssrc_change``).
- **Limits**: per stream and direction a token bucket of datagrams
  (``max_packet_rate``, ``max_packet_burst``); after ``no_media_timeout``
  without a valid RTP datagram either way the stream ends: its flows are
  ended (``EndFlow``; their datagrams are dropped until the processor ends
  the binding) and no rule is asked for it again.
- **Adjacent port** (``adjacent = "gateway"``): a stream that holds only
  one of its two flows, and has shown no rtcp-mux, asks for a one-shot
  REDIRECT rule for the other (C -> S':N+1 for RTP first, C -> S':N for
  RTCP first), on behalf of the flow it holds, so that the other flow also
  crosses the gateway; when the rule expires unused and the stream still
  lives, it asks again; a refused rule is not asked again. The processor
  ends it with the owner flow (RULE_END FLOW_ENDED). With ``adjacent =
  "processor"`` the core asks for nothing.
- **Offload** (``offload = "after-validation"``): a stream is validated
  once it has relayed ``offload_after_packets`` valid RTP datagrams, or
  ``offload_after_seconds`` after it opened with at least one; then each of
  its flows, and each flow that joins it later after its first valid
  datagram, is handed to the kernel (``Offload``: OFFLOAD_REQUEST, exact
  5-tuple). The processor's FLOW_END OFFLOADED moves the flow from the
  stream's flows to its ``kernel`` ones (``flow_gone(offloaded=True)``). A
  stream that the kernel carries keeps its latch, asks for no rule and has
  no no-media timeout of its own: the kernel's UDP timeout is its no-media
  timeout. It ends when the processor reports the end of its kernel
  connections with conntrack's counters (``kernel_ended``; their packets
  and bytes join the stream's), when the latched client's flow comes back
  through the gateway on the same tuple (the kernel's connection is gone,
  so the flow takes its role again), or, unreported, ``offload_hold``
  seconds after its offload.
- **IPv6**: a family 6 flow is the same (its addresses are values of its
  family; a stream's key is S' and N either way); only the headers that
  conntrack's bytes count differ (``UDP_IP_HEADERS``), and the log names
  an IPv6 stream ``[S']:N``.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from firewall.signalling import Counters, Endpoint, FlowInfo, RuleEndReason
from gateways.rtp.parse import Problem, is_rtcp, parse_rtcp, parse_rtp
from gateways.rtp.settings import Policy

UP, DOWN = 0, 1  # client -> server (leg A in), server -> client (leg B in)
MAX_PORT = 0xFFFF

Address = ipaddress.IPv4Address | ipaddress.IPv6Address  # a flow's family: IPv6 flows are family 6 (issue 17)
StreamKey = tuple[Address, int]  # (S', N even)


class Role(enum.Enum):
    RTP = "rtp"
    RTCP = "rtcp"

    def other(self) -> "Role":
        return Role.RTCP if self is Role.RTP else Role.RTP


@dataclass(frozen=True, slots=True)
class RequestRule:
    """Ask the processor for a one-shot REDIRECT of the UDP flow src -> dst, owned by ``owner``."""

    token: int
    owner: FlowInfo
    src: Endpoint  # port 0: any
    dst: Endpoint
    ttl: int


@dataclass(frozen=True, slots=True)
class EndFlow:
    """Stop relaying the flow from F:f (its stream ended); its datagrams are dropped from now on."""

    fw: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    """Something worth a log line."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Offload:
    """Ask the processor to hand the flow from F:f to the kernel (OFFLOAD_REQUEST)."""

    fw: Endpoint


Output = RequestRule | EndFlow | Event | Offload

# An offloaded flow's conntrack bytes count its IP and UDP headers, the
# gateway's the datagram only: RFC 791 and RFC 768, 20 + 8 bytes (no options);
# over IPv6, RFC 8200's fixed 40 + 8 (no extension headers).
UDP_IP_HEADERS = {4: 28, 6: 48}


class _Bucket:
    """A token bucket of datagrams: ``burst`` at most, ``rate`` per second."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float, rate: float, burst: int) -> bool:
        tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class Stream:
    """The media of one destination port pair, latched to one client."""

    __slots__ = ("key", "client", "flows", "ports", "ssrc", "buckets", "mux", "started", "last_media",
                 "rule", "rule_failed", "ended", "datagrams", "octets", "media", "validated", "kernel",
                 "offloaded_at")

    def __init__(self, key: StreamKey, client: Address, burst: int, now: float) -> None:
        self.key = key
        self.client = client
        self.flows: dict[Role, _Flow] = {}
        self.ports: dict[Role, int] = {}  # the client's port per role, kept after its flow ends
        self.ssrc: list[int | None] = [None, None]
        self.buckets = (_Bucket(burst, now), _Bucket(burst, now))
        self.mux = False
        self.started = now
        self.last_media = now
        self.rule: int | None = None  # token of the rule asked for or granted, until its end
        self.rule_failed = False
        self.ended = False
        self.datagrams = [0, 0]
        self.octets = [0, 0]
        self.media = 0  # valid RTP datagrams relayed, both ways
        self.validated = False  # offload: its flows go to the kernel
        self.kernel: dict[Role, FlowInfo] = {}  # the flows the kernel carries, until their end is reported
        self.offloaded_at: float | None = None


class _Flow:
    __slots__ = ("info", "role", "stream", "ended", "refused", "offload")

    def __init__(self, info: FlowInfo, role: Role) -> None:
        self.info = info
        self.role = role
        self.stream: Stream | None = None
        self.ended: str | None = None  # why it relays no more
        self.refused = False  # a datagram of it was refused by the latch (logged once)
        self.offload: str | None = None  # "asked", "refused": handed to the kernel once at most


class RtpCore:
    """Streams, latching, limits and adjacent-port rules of one rtp gateway (module docstring)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.flows: dict[Endpoint, _Flow] = {}
        self.streams: dict[StreamKey, Stream] = {}
        self.outbox: list[Output] = []
        self.counters: Counter[str] = Counter()
        self._tokens = itertools.count(1)
        self._rules: dict[int, Stream] = {}

    # ---- flows ---------------------------------------------------------------------------

    def flow_opened(self, info: FlowInfo) -> None:
        """The layer knows the flow from F:f: its datagrams may now be judged."""
        role = Role.RTCP if info.original_dst.port & 1 else Role.RTP
        self.flows[info.firewall_side] = _Flow(info, role)

    def flow_gone(self, fw: Endpoint, now: float, offloaded: bool = False) -> None:
        """The processor ended the flow's binding (FLOW_END; ``offloaded``: the kernel carries
        it from now on), or the gateway forgets it."""
        flow = self.flows.pop(fw, None)
        if flow is None or flow.stream is None:
            return
        stream = flow.stream
        if stream.flows.get(flow.role) is flow:
            del stream.flows[flow.role]
        if stream.ended:
            return
        if offloaded:
            stream.kernel[flow.role] = flow.info
            if stream.offloaded_at is None:
                stream.offloaded_at = now
                self.counters["streams.offloaded"] += 1
            self.counters["offload.flows"] += 1
            self._event("offloaded", stream, flow=f"{flow.info.flow_id:#x}", role=flow.role.value,
                        datagrams_up=stream.datagrams[UP], datagrams_down=stream.datagrams[DOWN])
            return
        if stream.kernel:
            return  # the kernel carries the rest: its reported end, or offload_hold, ends the stream
        if flow.role is Role.RTP or not stream.flows:
            self._end(stream, "flow_end", now)
        else:
            self._rule_step(stream)  # RTCP's binding ended while RTP goes on: open its port again

    # ---- datagrams -----------------------------------------------------------------------

    def datagram(self, fw: Endpoint, up: bool, data: bytes, now: float) -> str | None:
        """None: relay it; else the reason it is dropped (counted as ``dropped.<reason>``)."""
        flow = self.flows.get(fw)
        if flow is None:
            return self._drop("unknown_flow")
        if flow.ended is not None:
            return self._drop("stream_ended")
        policy = self.policy
        if flow.role is Role.RTP and not is_rtcp(data):
            rtcp = False
            got: Any = parse_rtp(data, policy.payload_types)
        else:
            rtcp = True
            got = parse_rtcp(data, policy.rtcp_feedback)
        if isinstance(got, Problem):
            return self._drop(got.value)
        stream = flow.stream
        joined = stream is None
        if stream is None:
            stream = self._latch(flow, up, now)
            if stream is None:
                return self._drop("not_latched")
        d = UP if up else DOWN
        if not stream.buckets[d].take(now, policy.max_packet_rate, policy.max_packet_burst):
            return self._drop("rate")
        if not rtcp:
            ssrc = got[0]
            known = stream.ssrc[d]
            if known != ssrc:
                if known is not None:
                    if not policy.ssrc_change:
                        return self._drop("ssrc_changed")
                    self.counters["ssrc.changed"] += 1
                    self._event("ssrc.changed", stream, direction="up" if up else "down",
                                old=f"{known:#010x}", new=f"{ssrc:#010x}")
                stream.ssrc[d] = ssrc
            stream.last_media = now
            stream.media += 1
            self.counters["relayed.rtp"] += 1
        else:
            if flow.role is Role.RTP and not stream.mux:
                stream.mux = True
                self.counters["streams.rtcp_mux"] += 1
                self._event("rtcp_mux", stream)
            self.counters["relayed.rtcp"] += 1
        stream.datagrams[d] += 1
        stream.octets[d] += len(data)
        if joined:
            # Asked for once this datagram is judged: if it was RTCP on the
            # RTP port, the stream is multiplexed and needs no second rule.
            self._rule_step(stream)
        if policy.offload and flow.offload is None:
            self._offload_step(stream, now)
        return None

    def _drop(self, reason: str) -> str:
        self.counters[f"dropped.{reason}"] += 1
        return reason

    def _latch(self, flow: _Flow, up: bool, now: float) -> Stream | None:
        """The stream a flow's first valid datagram puts it in, or None (refused)."""
        info = flow.info
        if not up:
            return None  # the server speaks first on a flow no stream holds: nothing to answer
        key = (info.original_dst.address, info.original_dst.port & ~1)
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(key, info.client.address, self.policy.max_packet_burst, now)
            self.streams[key] = stream
            self._join(stream, flow)
            self.counters["streams.opened"] += 1
            self._event("stream.open", stream, flow=f"{info.flow_id:#x}", first=flow.role.value,
                        client=info.client, server=info.server)
            return stream
        why = self._refusal(stream, flow)
        if why is not None:
            if not flow.refused:
                flow.refused = True
                self.counters["flows.refused"] += 1
                self._event("refused", stream, reason=why, flow=f"{info.flow_id:#x}", client=info.client,
                            latched=stream.client)
            return None
        self._join(stream, flow)
        self._event("stream.join", stream, flow=f"{info.flow_id:#x}", role=flow.role.value, client=info.client)
        return stream

    def _refusal(self, stream: Stream, flow: _Flow) -> str | None:
        info = flow.info
        if info.client.address != stream.client:
            return "other_address"
        if flow.role in stream.flows:
            return "role_taken"
        carried = stream.kernel.get(flow.role)
        if carried is not None:
            if carried.client != info.client:
                return "role_taken"
            # Its tuple reached the gateway again, so the kernel's connection is gone: the flow is back.
            del stream.kernel[flow.role]
            self.counters["offload.returned"] += 1
        if self.policy.rtcp_plus_one:
            other = stream.ports.get(flow.role.other())
            step = 1 if flow.role is Role.RTCP else -1
            if other is not None and info.client.port != other + step:
                return "other_port"
        return None

    @staticmethod
    def _join(stream: Stream, flow: _Flow) -> None:
        flow.stream = stream
        stream.flows[flow.role] = flow
        stream.ports[flow.role] = flow.info.client.port

    # ---- adjacent-port rules ---------------------------------------------------------------

    def _rule_step(self, stream: Stream) -> None:
        policy = self.policy
        if (not policy.adjacent_by_gateway or stream.ended or stream.mux or stream.rule is not None
                or stream.rule_failed or len(stream.flows) != 1 or stream.kernel):
            return
        (role, owner), = stream.flows.items()
        address, base = stream.key
        cport = owner.info.client.port
        if role is Role.RTP:
            dport, sport = base + 1, cport + 1
        else:
            dport, sport = base, cport - 1
        if not policy.rtcp_plus_one:
            sport = 0
        elif not 0 < sport <= MAX_PORT:
            self.counters["rules.no_source_port"] += 1
            return
        token = next(self._tokens)
        stream.rule = token
        self._rules[token] = stream
        self.counters["rules.requested"] += 1
        self.outbox.append(RequestRule(token, owner.info, Endpoint(stream.client, sport), Endpoint(address, dport),
                                       policy.adjacent_rule_ttl))

    def rule_answered(self, token: int, granted: bool, why: str = "") -> None:
        """The processor granted the rule, or it was refused or went unanswered (not asked again)."""
        stream = self._rules.get(token)
        if stream is None:
            return
        if granted:
            self.counters["rules.granted"] += 1
            return
        del self._rules[token]
        self.counters["rules.not_granted"] += 1
        if stream.rule == token:
            stream.rule = None
            stream.rule_failed = True
            self._event("rule.not_granted", stream, why=why)

    def rule_ended(self, token: int, reason: RuleEndReason) -> None:
        """RULE_END: used, expired, or gone with its owner flow."""
        stream = self._rules.pop(token, None)
        if stream is None:
            return
        self.counters[f"rules.ended.{reason.name.lower()}"] += 1
        if stream.rule == token:
            stream.rule = None
            if reason is not RuleEndReason.USED:  # used: its flow is on its way
                self._rule_step(stream)

    # ---- offload ------------------------------------------------------------------------------

    def _offload_step(self, stream: Stream, now: float) -> None:
        """Validated now (or before): hand each of the stream's flows not yet asked for to the kernel."""
        if not stream.validated:
            policy = self.policy
            if not (stream.media >= policy.offload_after_packets
                    or (stream.media and now - stream.started >= policy.offload_after_seconds)):
                return
            stream.validated = True
            self.counters["streams.validated"] += 1
        for flow in stream.flows.values():
            if flow.offload is None:
                flow.offload = "asked"
                self.counters["offload.requested"] += 1
                self.outbox.append(Offload(flow.info.firewall_side))

    def offload_answered(self, fw: Endpoint, granted: bool, why: str = "") -> None:
        """The processor's answer to ``Offload``: granted (FLOW_END OFFLOADED follows), or
        refused or unanswered: the flow goes on through the gateway and is not asked for again."""
        flow = self.flows.get(fw)
        if granted:
            self.counters["offload.acked"] += 1
            return
        self.counters["offload.refused"] += 1
        if flow is not None:
            flow.offload = "refused"
            if flow.stream is not None:
                self._event("offload.refused", flow.stream, flow=f"{flow.info.flow_id:#x}", why=why)

    def kernel_ended(self, client: Endpoint, original_dst: Endpoint, counters: Counters | None, now: float) -> bool:
        """The processor reports the end of a connection the kernel carried for this gateway
        (conntrack destroyed it: for UDP, its timeout after the last datagram). True if it was
        one of an offloaded stream's; its counters join the stream's."""
        stream = self.streams.get((original_dst.address, original_dst.port & ~1))
        role = Role.RTCP if original_dst.port & 1 else Role.RTP
        if stream is None or stream.kernel.get(role) is None or stream.kernel[role].client != client:
            return False
        del stream.kernel[role]
        self.counters["offload.ended"] += 1
        if counters is not None:
            headers = UDP_IP_HEADERS[client.address.version]
            stream.datagrams[UP] += counters.packets_up
            stream.datagrams[DOWN] += counters.packets_down
            stream.octets[UP] += max(0, counters.bytes_up - headers * counters.packets_up)
            stream.octets[DOWN] += max(0, counters.bytes_down - headers * counters.packets_down)
        if role is Role.RTP or not (stream.kernel or stream.flows):
            self._end(stream, "kernel_end", now)
        return True

    # ---- time --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """End the streams whose media stopped ``no_media_timeout`` ago (the kernel's timeout
        for those whose RTP it carries), validate streams by age, and end offloaded streams
        whose end was never reported ``offload_hold`` after their offload."""
        policy = self.policy
        limit = now - policy.no_media_timeout
        for stream in list(self.streams.values()):
            if stream.kernel:
                assert stream.offloaded_at is not None
                if Role.RTP in stream.kernel or not stream.flows:
                    if now - stream.offloaded_at >= policy.offload_hold:
                        self._end(stream, "offload_hold", now)
                    continue
            if stream.last_media <= limit:
                self._end(stream, "no_media", now)
            elif policy.offload and not stream.validated:
                self._offload_step(stream, now)

    def shutdown(self, now: float) -> None:
        for stream in list(self.streams.values()):
            self._end(stream, "shutdown", now)

    def _end(self, stream: Stream, reason: str, now: float) -> None:
        if stream.ended:
            return
        stream.ended = True
        if self.streams.get(stream.key) is stream:
            del self.streams[stream.key]
        for flow in stream.flows.values():
            flow.ended = reason
            self.outbox.append(EndFlow(flow.info.firewall_side, reason))
        self.counters[f"streams.ended.{reason}"] += 1
        self._event("stream.close", stream, reason=reason, duration=round(now - stream.started, 3),
                    datagrams_up=stream.datagrams[UP], datagrams_down=stream.datagrams[DOWN],
                    bytes_up=stream.octets[UP], bytes_down=stream.octets[DOWN], rtcp_mux=stream.mux,
                    offloaded=stream.offloaded_at is not None)

    def _event(self, name: str, stream: Stream, **fields: Any) -> None:
        address, base = stream.key
        where = f"[{address}]" if address.version == 6 else f"{address}"
        self.outbox.append(Event(name, {"stream": f"{where}:{base}", **fields}))
