"""The signalling messages as values, and the rules about what they may say.

Every message is a frozen dataclass whose constructor checks its fields, so a
message that exists is one the codec can encode: a bad value is the caller's
bug and raises ``ValueError`` or ``TypeError`` at construction (STYLE.md,
"errors say whose fault they are"). The decoder builds messages through the
same constructors and turns those exceptions into a ``MALFORMED`` refusal.

Addresses are ``ipaddress`` values, IPv4 or IPv6; all the addresses of one
message are of one family (the wire's family byte says which, for the
whole body). Today's double NAT is NAT44 (DESIGN invariant 2), so the
processor sends IPv4 only; the IPv6 layout is there for the gateways that
will take IPv6 (issue 17). An IPv4 peer is an ``IPv4Address``, never an
IPv4-mapped IPv6 one, so one peer has one spelling.

Field names follow ``firewall.flows.Binding.record()``: ``client`` C:c,
``original_dst`` S':s' (what the client addressed: the router for a port
forward), ``server`` S:s, ``firewall_side`` F:f, ``ag`` G:g, ``snat`` W:w
(what the server sees as the client, when the processor SNATs leg B).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar, Iterable, Union

from firewall.fields import NAME as GATEWAY_NAME_PATTERN

U64_MAX = (1 << 64) - 1
PORT_MAX = 0xFFFF

# A gateway name travels in a fixed 32-byte field: the config's NAME pattern
# allows 1-32 characters of [A-Za-z0-9_.-], so every configured name fits.
GATEWAY_NAME_SIZE = 32
_GATEWAY_NAME = re.compile(GATEWAY_NAME_PATTERN)

# A flow id is the NFQUEUE number (u16 in the kernel's nfqnl_msg_config_cmd)
# above a per-instance serial, so ids from different processor instances
# never collide and a gateway can tell which instance a flow belongs to.
FLOW_ID_QUEUE_BITS = 16
FLOW_ID_SERIAL_BITS = 48
FLOW_ID_SERIAL_MAX = (1 << FLOW_ID_SERIAL_BITS) - 1
# A router pair's two nodes bind the same queue numbers: node k of the pair
# ([ha], docs/ha.md) counts its serials from k << FLOW_ID_NODE_BIT, so the top
# bit of the serial names the node and the two nodes' ids never collide either.
FLOW_ID_NODE_BIT = FLOW_ID_SERIAL_BITS - 1

# The longest a dynamic rule may wait for its flow. A rule is an opening in
# the filter; one that outlives the session that asked for it is a hole.
# FTP data connections and RTCP open within seconds of being announced; an
# hour covers a slow client and is still bounded. The wire field is a u16.
MAX_RULE_TTL = 3600
RULE_TTL_FIELD_MAX = 0xFFFF

# The pull half of the seed's hybrid scheme ("Out-of-band signalling"): a
# gateway that cannot place a connection waits ``query_timeout`` for the
# push, then sends a QUERY, and again every ``query_timeout``, at most this
# many times, before it gives the connection up. Bounded, so a flow whose
# binding is gone cannot hold a gateway slot for long.
MAX_QUERY_ATTEMPTS = 3


class Role(enum.Enum):
    """The two ends of signalling. Each message type is sent by exactly one."""

    PROCESSOR = "processor"
    GATEWAY = "gateway"  # the gateways' shared deNAT/reNAT layer


class MsgType(enum.IntEnum):
    """The type byte of the header."""

    NEW_FLOW = 1
    QUERY = 2
    ANSWER = 3
    NOT_FOUND = 4
    FLOW_END = 5
    RULE_REQUEST = 6
    RULE_ACK = 7
    RULE_REFUSED = 8
    RULE_END = 9
    OFFLOAD_REQUEST = 10


# Who sends what. A receiver refuses a type its peer never sends, so a
# message cannot be reflected back at the role that produced it.
SENDER_OF: dict[MsgType, Role] = {
    MsgType.NEW_FLOW: Role.PROCESSOR,
    MsgType.QUERY: Role.GATEWAY,
    MsgType.ANSWER: Role.PROCESSOR,
    MsgType.NOT_FOUND: Role.PROCESSOR,
    MsgType.FLOW_END: Role.PROCESSOR,
    MsgType.RULE_REQUEST: Role.GATEWAY,
    MsgType.RULE_ACK: Role.PROCESSOR,
    MsgType.RULE_REFUSED: Role.PROCESSOR,
    MsgType.RULE_END: Role.PROCESSOR,
    MsgType.OFFLOAD_REQUEST: Role.GATEWAY,
}


class Proto(enum.IntEnum):
    """Transport, as its IP protocol number (equal to ``firewall.packet.TCP``/``UDP``)."""

    TCP = 6
    UDP = 17


class Family(enum.IntEnum):
    """Address family of every address in one body."""

    IPV4 = 4
    IPV6 = 6


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def family_of(*endpoints: "Endpoint | None") -> Family:
    """The one family of these endpoints (None: absent, skipped); ValueError if they mix."""
    versions = {e.address.version for e in endpoints if e is not None}
    if len(versions) != 1:
        raise ValueError(f"the addresses of one message must be of one family, got IPv{sorted(versions)}")
    return Family(versions.pop())


class FlowEndReason(enum.IntEnum):
    FIN = 1  # FIN both ways on both legs
    RST = 2
    IDLE = 3  # the flow table's idle timeout
    POLICY = 4  # the processor ended it: config reload, operator, shutdown
    OFFLOADED = 5  # the gateway asked (OFFLOAD_REQUEST): the kernel carries the flow from its next packet


class RuleMode(enum.IntEnum):
    REDIRECT = 1  # the processor redirects the new flow into the asking gateway
    ALLOW = 2  # the kernel carries the new flow; no gateway sees it
    # The asking gateway opens the new flow itself, from its own address to dst,
    # and the processor makes it leave the router from src (a stand-in the
    # flow's binding names): FTP's data_mode "passive" (version 5)
    ORIGINATE = 3


class RuleRefusal(enum.IntEnum):
    """Why the processor refused a RULE_REQUEST (the RULE_REFUSED reason byte)."""

    NOT_EXACT = 1  # a wildcard address, or a destination port 0
    THIRD_PARTY = 2  # an address that is not a party of the requesting flow
    UNKNOWN_FLOW = 3  # the requesting flow id has no binding (any more)
    LIMIT = 4  # too many rules for this flow or in all
    BAD_TTL = 5  # ttl 0, or above the processor's maximum
    POLICY = 6  # the config does not allow this rule (e.g. ALLOW for this gateway), or offload for this kind
    NOT_UDP = 7  # OFFLOAD_REQUEST for a TCP flow: a terminated TCP relay cannot be spliced mid-stream
    OTHER_GATEWAY = 8  # OFFLOAD_REQUEST for a flow that belongs to another gateway


class RuleEndReason(enum.IntEnum):
    USED = 1  # a one-shot rule matched its flow
    EXPIRED = 2  # the ttl ran out
    FLOW_ENDED = 3  # the requesting flow ended, and its rules with it
    SUPERSEDED = 4  # a later request of the same flow, flagged ``replaces``, took its place


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an int in 0..2**64-1, got {value!r}")


def _coerce(obj: object, name: str, kind: type[enum.IntEnum]) -> None:
    """Turn a plain int (say ``flows.Binding.proto``) into its enum, or raise."""
    value = getattr(obj, name)
    if not isinstance(value, kind):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be a {kind.__name__}, got {value!r}")
        object.__setattr__(obj, name, kind(value))  # ValueError for an unknown number


def make_flow_id(queue: int, serial: int) -> int:
    """The flow id of the ``serial``-th flow of the instance bound to NFQUEUE ``queue``."""
    if not 0 <= queue < 1 << FLOW_ID_QUEUE_BITS:
        raise ValueError(f"queue {queue} is not a u16")
    if not 0 <= serial <= FLOW_ID_SERIAL_MAX:
        raise ValueError(f"serial {serial} does not fit in {FLOW_ID_SERIAL_BITS} bits")
    return queue << FLOW_ID_SERIAL_BITS | serial


def flow_id_queue(flow_id: int) -> int:
    """The NFQUEUE number of the processor instance that made ``flow_id``."""
    return flow_id >> FLOW_ID_SERIAL_BITS


def flow_id_node(flow_id: int) -> int:
    """Which node of a router pair made ``flow_id`` (0 for a router alone)."""
    return flow_id >> FLOW_ID_NODE_BIT & 1


def first_serial(node: int) -> int:
    """Where node ``node``'s processor instances start counting serials (``FLOW_ID_NODE_BIT``)."""
    return 1 + (node << FLOW_ID_NODE_BIT)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IPv4 or IPv6 address and a port."""

    address: Address
    port: int

    def __post_init__(self) -> None:
        if type(self.address) not in _ADDRESS_TYPES:
            raise TypeError(f"address must be an IPv4Address or IPv6Address, got {self.address!r}")
        # type(), not the .version property: Endpoints are made several times a connection.
        if type(self.address) is ipaddress.IPv6Address and self.address.ipv4_mapped is not None:
            raise ValueError(f"{self.address} is an IPv4 peer: give it as an IPv4Address")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= PORT_MAX:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")

    def __hash__(self) -> int:
        # Flow keys are hashed tens of times per connection. The generated
        # hash would call IPv4Address.__hash__, which hashes the hex string
        # of the address (three Python calls); the integer itself is as
        # good a key (an IPv4 and an IPv6 address of one integer merely
        # share a bucket: they are not equal).
        return hash((self.address._ip, self.port))

    def __str__(self) -> str:
        if type(self.address) is ipaddress.IPv6Address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """What a gateway needs to know about one redirected flow (NEW_FLOW and ANSWER).

    The gateway sees a connection F:f -> G:g; this gives it the tuple the
    client used (C:c -> S':s'), the server behind it (S:s), and, when the
    processor SNATs leg B (a masqueraded to-zone), the router's W:w that the
    server sees as the client (``snat``; None when the server sees C:c
    itself). An FTP gateway announces W in active mode from behind the
    masquerade, and the processor maps W back to C.
    """

    flow_id: int
    proto: Proto
    gateway: str
    client: Endpoint
    original_dst: Endpoint
    server: Endpoint
    firewall_side: Endpoint
    ag: Endpoint
    snat: Endpoint | None = None

    def __post_init__(self) -> None:
        _check_u64("flow_id", self.flow_id)
        _coerce(self, "proto", Proto)
        if not isinstance(self.gateway, str) or not _GATEWAY_NAME.fullmatch(self.gateway):
            raise ValueError(f"gateway name {self.gateway!r} is not 1-32 characters of [A-Za-z0-9_.-]")
        for name in ("client", "original_dst", "server", "firewall_side", "ag"):
            if not isinstance(getattr(self, name), Endpoint):
                raise TypeError(f"{name} must be an Endpoint")
        if self.snat is not None:
            if not isinstance(self.snat, Endpoint):
                raise TypeError("snat must be an Endpoint or None")
            # On the wire "none" is all zeros, so a real W:w has neither zero.
            if not _one_host(self.snat.address) or self.snat.port == 0:
                raise ValueError(f"snat {self.snat} is not one host and port")
        family_of(self.client, self.original_dst, self.server, self.firewall_side, self.ag, self.snat)

    @property
    def family(self) -> Family:
        return Family(self.client.address.version)


def _check_endpoints(obj: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(obj, name), Endpoint):
            raise TypeError(f"{name} must be an Endpoint")


@dataclass(frozen=True, slots=True)
class NewFlow:
    """Processor -> gateway, pushed (in ``copies`` copies) when a flow is redirected."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_FLOW
    flow: FlowInfo

    def __post_init__(self) -> None:
        if not isinstance(self.flow, FlowInfo):
            raise TypeError("flow must be a FlowInfo")


@dataclass(frozen=True, slots=True)
class _TupleQuestion:
    """The fields a QUERY asks with and a NOT_FOUND echoes."""

    query_id: int
    proto: Proto
    firewall_side: Endpoint
    ag: Endpoint

    def __post_init__(self) -> None:
        _check_u64("query_id", self.query_id)
        _coerce(self, "proto", Proto)
        _check_endpoints(self, "firewall_side", "ag")
        family_of(self.firewall_side, self.ag)


@dataclass(frozen=True, slots=True)
class Query(_TupleQuestion):
    """Gateway -> processor: who is the flow F:f -> G:g of ``proto``? (the seed's pull)"""

    TYPE: ClassVar[MsgType] = MsgType.QUERY


@dataclass(frozen=True, slots=True)
class Answer:
    """Processor -> gateway: the flow a QUERY asked about."""

    TYPE: ClassVar[MsgType] = MsgType.ANSWER
    query_id: int
    flow: FlowInfo

    def __post_init__(self) -> None:
        _check_u64("query_id", self.query_id)
        if not isinstance(self.flow, FlowInfo):
            raise TypeError("flow must be a FlowInfo")


@dataclass(frozen=True, slots=True)
class NotFound(_TupleQuestion):
    """Processor -> gateway: no binding for the queried tuple; echoes the query."""

    TYPE: ClassVar[MsgType] = MsgType.NOT_FOUND


@dataclass(frozen=True, slots=True)
class Counters:
    """The kernel's packets and bytes of one connection, each way (conntrack accounting).

    ``up`` is the client's direction (the original tuple), ``down`` the replies.
    """

    packets_up: int = 0
    bytes_up: int = 0
    packets_down: int = 0
    bytes_down: int = 0

    def __post_init__(self) -> None:
        for name in ("packets_up", "bytes_up", "packets_down", "bytes_down"):
            _check_u64(name, getattr(self, name))


NO_COUNTERS = Counters()


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """Processor -> gateway: the binding is gone; F:f may be reused for another flow.

    ``counters`` are conntrack's for a flow the kernel carried without a
    binding (a log-only gateway's); zeros otherwise.
    """

    TYPE: ClassVar[MsgType] = MsgType.FLOW_END
    flow_id: int
    reason: FlowEndReason
    counters: Counters = NO_COUNTERS

    def __post_init__(self) -> None:
        _check_u64("flow_id", self.flow_id)
        _coerce(self, "reason", FlowEndReason)
        if not isinstance(self.counters, Counters):
            raise TypeError("counters must be Counters")


@dataclass(frozen=True, slots=True)
class RuleRequest:
    """Gateway -> processor: open a dynamic rule for one new flow src -> dst.

    The seed's "Dynamic changes in packet processing": FTP's data connection,
    RTP's RTCP port. ``src.port`` 0 means any source port; everything else is
    exact (see ``rule_request_problem``).
    """

    TYPE: ClassVar[MsgType] = MsgType.RULE_REQUEST
    request_id: int
    flow_id: int
    proto: Proto
    src: Endpoint
    dst: Endpoint
    ttl: int
    mode: RuleMode
    one_shot: bool
    replaces: bool = False  # the flow's earlier rules still waiting for their flow end (SUPERSEDED)

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        _check_u64("flow_id", self.flow_id)
        _coerce(self, "proto", Proto)
        _coerce(self, "mode", RuleMode)
        _check_endpoints(self, "src", "dst")
        family_of(self.src, self.dst)
        if not isinstance(self.ttl, int) or isinstance(self.ttl, bool) or not 0 <= self.ttl <= RULE_TTL_FIELD_MAX:
            raise ValueError(f"ttl must be 0..{RULE_TTL_FIELD_MAX} seconds, got {self.ttl!r}")
        if not isinstance(self.one_shot, bool):
            raise TypeError(f"one_shot must be a bool, got {self.one_shot!r}")
        if not isinstance(self.replaces, bool):
            raise TypeError(f"replaces must be a bool, got {self.replaces!r}")


@dataclass(frozen=True, slots=True)
class RuleAck:
    """Processor -> gateway: the rule is in place until ``expires_ms`` (Unix ms)."""

    TYPE: ClassVar[MsgType] = MsgType.RULE_ACK
    request_id: int
    rule_id: int
    expires_ms: int

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        _check_u64("rule_id", self.rule_id)
        _check_u64("expires_ms", self.expires_ms)


@dataclass(frozen=True, slots=True)
class RuleRefused:
    """Processor -> gateway: no rule, and why."""

    TYPE: ClassVar[MsgType] = MsgType.RULE_REFUSED
    request_id: int
    reason: RuleRefusal

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        _coerce(self, "reason", RuleRefusal)


@dataclass(frozen=True, slots=True)
class RuleEnd:
    """Processor -> gateway: a rule it acknowledged is gone."""

    TYPE: ClassVar[MsgType] = MsgType.RULE_END
    rule_id: int
    reason: RuleEndReason

    def __post_init__(self) -> None:
        _check_u64("rule_id", self.rule_id)
        _coerce(self, "reason", RuleEndReason)


@dataclass(frozen=True, slots=True)
class OffloadRequest:
    """Gateway -> processor: let the kernel carry this flow end to end, without the gateway.

    Answered like a RULE_REQUEST: RULE_ACK (the exact one-shot ALLOW that
    takes the flow's next packet; RULE_END USED when it came), then FLOW_END
    OFFLOADED; or RULE_REFUSED.
    """

    TYPE: ClassVar[MsgType] = MsgType.OFFLOAD_REQUEST
    request_id: int
    flow_id: int

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        _check_u64("flow_id", self.flow_id)


Message = Union[NewFlow, Query, Answer, NotFound, FlowEnd, RuleRequest, RuleAck, RuleRefused, RuleEnd, OffloadRequest]
MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (NewFlow, Query, Answer, NotFound, FlowEnd, RuleRequest, RuleAck, RuleRefused, RuleEnd, OffloadRequest)
}


def _one_host(address: Address) -> bool:
    # 0.0.0.0 and :: mean "any", 255.255.255.255 and multicast mean "many":
    # none names one peer, so none may open a hole in the filter.
    return not (address.is_unspecified or address.is_multicast or address == _BROADCAST)


_BROADCAST = ipaddress.IPv4Address(0xFFFFFFFF)


def rule_request_problem(request: RuleRequest, *, max_ttl: int = MAX_RULE_TTL) -> RuleRefusal | None:
    """The refusal a request earns on its own, before the processor looks at its state.

    Exact means: both addresses name one host; the destination port is a
    real port; the source port is a real port or 0 for "any". The source port
    is the one the gateway cannot know in advance (an FTP server's active data
    connection may come from any port, a passive-mode client's always does);
    the destination is what the gateway read in the protocol (PORT, PASV,
    the RTP port + 1), so it is always known.
    """
    if not (_one_host(request.src.address) and _one_host(request.dst.address)) or request.dst.port == 0:
        return RuleRefusal.NOT_EXACT
    if not 1 <= request.ttl <= max_ttl:
        return RuleRefusal.BAD_TTL
    return None


def names_third_party(
    request: RuleRequest, flow: FlowInfo, local: Iterable[Address] = ()
) -> bool:
    """Whether the request names a host that is not a party of ``flow``.

    One end must be the client (or one of the router's ``local`` addresses,
    which stand in for it behind masquerade); the other must be the server
    (S, or S' that the client addressed). Either end may be the source. A
    request for anything else is an FTP-bounce style hole (RFC 2577 section 3)
    and is refused THIRD_PARTY.
    """
    client_side = {flow.client.address, *local}
    server_side = {flow.server.address, flow.original_dst.address}
    src, dst = request.src.address, request.dst.address
    return not ((src in client_side and dst in server_side) or (src in server_side and dst in client_side))
