"""The rule model: what nfgate installs, independent of nftables or iptables.

A ``Ruleset`` is a list of chains. A base chain names its hook and its kind
(``mangle``, ``nat`` or ``filter``), which fixes the priority in nftables and the
table in iptables. Each ``Rule`` is a tuple of matches and a tuple of
statements, the last of which may end evaluation. Both renderers read only
this model, so the two renderings cannot drift apart in meaning; the renderer
tests hold them to that.

Rules carry a ``comment`` naming the config entry they come from, so an
operator reading ``nft list ruleset`` or ``iptables-save`` can find the line
that made a rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

from firewall.config.model import Marks, PortRange

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Family(Enum):
    """Which IP versions a rule applies to. ``BOTH`` renders once in nft's inet
    table and twice for iptables (iptables-restore and ip6tables-restore)."""

    BOTH = "both"
    V4 = "ipv4"
    V6 = "ipv6"

    def includes(self, version: int) -> bool:
        return self is Family.BOTH or (self is Family.V4) == (version == 4)


class Hook(Enum):
    PREROUTING = "prerouting"
    INPUT = "input"
    FORWARD = "forward"
    OUTPUT = "output"
    POSTROUTING = "postrouting"


class Kind(Enum):
    """nft chain type and priority; iptables table."""

    MANGLE = "mangle"
    NAT = "nat"
    FILTER = "filter"


# ---- matches -----------------------------------------------------------------


@dataclass(frozen=True)
class InZone:
    zone: str


@dataclass(frozen=True)
class OutZone:
    zone: str


@dataclass(frozen=True)
class InIface:
    name: str


@dataclass(frozen=True)
class OutIface:
    name: str


@dataclass(frozen=True)
class Proto:
    name: str  # tcp, udp, icmp, icmpv6


@dataclass(frozen=True)
class Addr:
    """Source ('src') or destination ('dst') within any of the networks.
    All networks are of one IP version; the builder splits mixed lists."""

    direction: str
    nets: tuple[IPNetwork, ...]
    # The connection's original address (conntrack's, before any DNAT) rather
    # than the packet's: what a selector names, seen after a port forward.
    original: bool = False


@dataclass(frozen=True)
class AddrBits:
    """(address & mask) == value: steers a flow to the processor instance that
    owns it by the low bits of one of its addresses."""

    direction: str
    mask: int
    value: int
    version: int = 4  # an IPv6 flow's: the low bits of its 128-bit address


@dataclass(frozen=True)
class Port:
    direction: str  # 'src' or 'dst'
    ranges: tuple[PortRange, ...]
    # The connection's original port (conntrack's, before any DNAT) rather
    # than the packet's: what a selector names, seen after a port forward.
    original: bool = False


@dataclass(frozen=True)
class CtState:
    states: tuple[str, ...]  # established, related, invalid, new, untracked


@dataclass(frozen=True)
class CtDnat:
    """The connection was destination-NATed (a port forward)."""


@dataclass(frozen=True)
class CtConfirmed:
    """The connection is in conntrack's table: a packet of it already went
    through. Until its reply comes, conntrack still calls it ``new``."""


@dataclass(frozen=True)
class DstLocal:
    """The destination is one of the router's own addresses (port forwards)."""


@dataclass(frozen=True)
class Mark:
    mask: int
    value: int


@dataclass(frozen=True)
class CtMark:
    """The connection's mark (the binding table copies a bound flow's ``rewritten`` bit into it)."""

    mask: int
    value: int


@dataclass(frozen=True)
class IcmpType:
    types: tuple[str, ...]  # nft names; the iptables renderer maps them


Match = (
    InZone | OutZone | InIface | OutIface | Proto | Addr | AddrBits | Port | CtState | CtDnat | CtConfirmed | DstLocal | Mark
    | CtMark | IcmpType
)


# ---- statements ----------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Reject:
    pass


@dataclass(frozen=True)
class Jump:
    chain: str


@dataclass(frozen=True)
class Return:
    """Back to the calling chain (in a base chain: its policy). Unlike an accept,
    it leaves the rest of the built-in iptables chain, the operator's, alone."""


@dataclass(frozen=True)
class Masquerade:
    ports: PortRange | None = None  # needs a tcp/udp Proto match when set


@dataclass(frozen=True)
class Dnat:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    ports: PortRange | None = None


@dataclass(frozen=True)
class Netmap:
    """Prefix translation through conntrack (NPTv6, docs/config.md ``[[nat.npt6]]``):
    the source (``direction`` 'src', in srcnat) or destination ('dst', in dstnat)
    address in ``prefix`` gets ``to``'s prefix and keeps its host bits."""

    direction: str
    prefix: IPNetwork
    to: IPNetwork


@dataclass(frozen=True)
class Queue:
    num: int
    bypass: bool


Statement = Accept | Drop | Reject | Jump | Return | Masquerade | Dnat | Netmap | Queue
TERMINAL = (Accept, Drop, Reject, Jump, Return, Masquerade, Dnat, Netmap, Queue)


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    statements: tuple[Statement, ...]
    comment: str
    family: Family = Family.BOTH
    # A named counter (``Ruleset.counters``) instead of the rule's own
    # anonymous one: what ``nfgate status`` reads back by name.
    counter: str = ""


@dataclass
class Chain:
    name: str  # nft name, lower_snake; iptables gets NFGATE-UPPER-KEBAB
    kind: Kind
    hook: Hook | None = None  # None: a regular chain reached by Jump
    policy: str = "accept"  # base chains only
    rules: list[Rule] = field(default_factory=list)

    def add(self, matches, statements, comment: str, family: Family = Family.BOTH, counter: str = "") -> None:
        self.rules.append(Rule(tuple(matches), tuple(statements), comment, family, counter))


@dataclass(frozen=True)
class FastPath:
    """``policy.fast_path``: the flowtable that carries established gateway-free flows
    (``firewall.rules.fast``), its own nft table with every backend but iptables-legacy."""

    devices: tuple[str, ...]  # the zones' interfaces; the backend loads those that exist
    # Connection-mark bits of nfgate's own flows (gateway flows, log-only, offloaded, dynamic
    # rules), which stay off the fast path: 0 without gateways.
    exclude: int = 0


@dataclass
class Ruleset:
    zones: dict[str, tuple[str, ...]]  # zone -> interfaces (nft named sets)
    chains: list[Chain]
    source: str = ""  # the config file, for the header comment
    # (marks, processor instances): with gateways, the binding table
    # (firewall.rules.bind) goes with the ruleset, whatever the backend.
    bind: tuple[Marks, int] | None = None
    # Named counters (name -> what it counts), declared in nft's table; in
    # iptables the counter is the rules whose comment starts with its name.
    counters: dict[str, str] = field(default_factory=dict)
    fast: FastPath | None = None

    def chain(self, name: str) -> Chain:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise KeyError(name)

    def has_queue(self) -> bool:
        return any(isinstance(s, Queue) for c in self.chains for r in c.rules for s in r.statements)


def iptables_chain_name(name: str) -> str:
    return "NFGATE-" + name.upper().replace("_", "-")
