"""Render the rule model for iptables-restore --noflush (IPv4) and ip6tables-restore.

nfgate's chains are named ``NFGATE-*`` and live in the mangle, nat and filter
tables; the built-in chains only get one jump to each of nfgate's base chains,
at position 1. Nothing else in a built-in chain is touched, and no built-in
policy is changed: nfgate's "policy drop" is the last rule of its own chain.

iptables has no interface sets and no anonymous address sets, so a rule that
names a zone or several addresses becomes one line per interface and address
(the model's meaning, spelled out). ``TableText`` keeps the parts apart so the
backend can add the jumps only where they are missing and delete stale chains
in the same transaction (firewall.backend).
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field

from firewall.rules import fast
from firewall.rules.model import (
    Accept,
    Addr,
    AddrBits,
    CtConfirmed,
    CtMark,
    CtDnat,
    CtState,
    Dnat,
    Drop,
    DstLocal,
    Family,
    IcmpType,
    InIface,
    InZone,
    Jump,
    Kind,
    Mark,
    Masquerade,
    Netmap,
    Return,
    OutIface,
    OutZone,
    Port,
    Proto,
    Queue,
    Reject,
    Rule,
    Ruleset,
    iptables_chain_name,
)

TABLE_ORDER = ("mangle", "nat", "filter")
MULTIPORT_MAX = 15  # xt_multiport: at most 15 ports, a range counting as two

# nft's ICMPv6 type names -> ip6tables' names
_ICMPV6 = {
    "nd-router-solicit": "router-solicitation",
    "nd-router-advert": "router-advertisement",
    "nd-neighbor-solicit": "neighbour-solicitation",
    "nd-neighbor-advert": "neighbour-advertisement",
}
_BUILTIN = {
    ("mangle", "prerouting"): "PREROUTING",
    ("nat", "prerouting"): "PREROUTING",
    ("nat", "postrouting"): "POSTROUTING",
    ("filter", "input"): "INPUT",
    ("filter", "forward"): "FORWARD",
    ("filter", "output"): "OUTPUT",
}


@dataclass
class TableText:
    name: str
    chains: list[str] = field(default_factory=list)  # NFGATE-* chains, declared in this order
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (built-in chain, NFGATE chain)
    rules: list[str] = field(default_factory=list)  # "-A NFGATE-X ..." lines

    def text(
        self,
        present_jumps: set[tuple[str, str]] = frozenset(),
        delete: list[str] = (),
        drop_jumps: list[tuple[str, str]] = (),
    ) -> str:
        """The restore block. ``present_jumps`` are left alone; ``drop_jumps``
        (one line per occurrence) and the chains in ``delete`` are removed."""
        lines = [f"*{self.name}"]
        lines += [f"-D {builtin} -j {chain}" for builtin, chain in drop_jumps]
        lines += [f":{c} - [0:0]" for c in self.chains]
        lines += [f":{c} - [0:0]" for c in delete]  # flushing them first frees their references
        lines += self.rules
        # Insert in reverse so that the first base chain ends up first in each built-in.
        for builtin, chain in reversed(self.jumps):
            if (builtin, chain) not in present_jumps:
                lines.append(f"-I {builtin} 1 -j {chain}")
        lines += [f"-X {c}" for c in delete]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def render_tables(rs: Ruleset, version: int) -> list[TableText]:
    """The tables for one IP version; a table with no rule for it is left out."""
    family = Family.V4 if version == 4 else Family.V6
    tables: dict[str, TableText] = {}
    for chain in rs.chains:
        rules = [r for r in chain.rules if r.family in (Family.BOTH, family)]
        table = tables.setdefault(chain.kind.value, TableText(chain.kind.value))
        name = iptables_chain_name(chain.name)
        table.chains.append(name)
        if chain.hook is not None:
            table.jumps.append((_BUILTIN[(chain.kind.value, chain.hook.value)], name))
        for rule in rules:
            table.rules += _rule_lines(name, rule, rs, version, chain.kind)
    return [tables[t] for t in TABLE_ORDER if t in tables and tables[t].rules]


def render(rs: Ruleset, version: int = 4) -> str:
    """The whole rendering for ops review and for ``iptables-restore --noflush`` on a
    fresh system (``nfgate apply`` instead inserts only the jumps that are missing)."""
    tool = "iptables-restore" if version == 4 else "ip6tables-restore"
    head = [
        f"# nfgate ruleset for {tool} --noflush{' from ' + rs.source if rs.source else ''}.",
        "# Generated: change the config and run `nfgate apply`, do not edit.",
    ]
    if rs.fast is not None:
        head.append(f"# policy.fast_path: nft's table {fast.FAMILY} {fast.TABLE} goes beside these "
                    "(nfgate rules --format nft shows it; none with iptables-legacy).")
    return "\n".join(head) + "\n" + "".join(t.text() for t in render_tables(rs, version))


def _rule_lines(chain: str, rule: Rule, rs: Ruleset, version: int, kind: Kind) -> list[str]:
    proto = next((m.name for m in rule.matches if isinstance(m, Proto)), None)
    # Each alternative (interface, address, ICMP type, port chunk) becomes its own line.
    options: list[list[str]] = []
    for m in rule.matches:
        options.append(_match(m, proto, rs, version))
    text = f"{rule.counter}: {rule.comment}" if rule.counter else rule.comment
    comment = f'-m comment --comment "{text[:255]}"'
    targets = _targets(rule, proto, version)
    lines = []
    for combo in itertools.product(*options):
        body = " ".join(p for p in combo if p)
        for target in targets:
            lines.append(" ".join(x for x in (f"-A {chain}", body, comment, f"-j {target}") if x))
    return lines


def _match(m, proto: str | None, rs: Ruleset, version: int) -> list[str]:
    p = "ipv6-icmp" if proto == "icmpv6" else proto
    match m:
        case InZone(zone):
            return [f"-i {i}" for i in rs.zones[zone]]
        case OutZone(zone):
            return [f"-o {i}" for i in rs.zones[zone]]
        case InIface(name):
            return [f"-i {name}"]
        case OutIface(name):
            return [f"-o {name}"]
        case Proto():
            return [f"-p {p}"]
        case Addr(direction, nets, True):
            # conntrack's match takes one address or prefix at a time.
            flag = "--ctorigdst" if direction == "dst" else "--ctorigsrc"
            return [f"-m conntrack {flag} {_net(n)}" for n in nets]
        case Addr(direction, nets):
            flag = "-s" if direction == "src" else "-d"
            return [f"{flag} {_net(n)}" for n in nets]
        case AddrBits(direction, mask, value, version):
            flag = "-s" if direction == "src" else "-d"
            ip = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            return [f"{flag} {ip(value)}/{ip(mask)}"]
        case Port(direction, ranges, True):
            # conntrack's match takes one port or range at a time.
            flag = "--ctorigdstport" if direction == "dst" else "--ctorigsrcport"
            return [f"-m conntrack {flag} {r.first}" + (f":{r.last}" if r.last != r.first else "") for r in ranges]
        case Port(direction, ranges):
            return _ports(direction, ranges)
        case CtConfirmed():
            return ["-m conntrack --ctstatus CONFIRMED"]
        case CtState(states):
            return [f"-m conntrack --ctstate {','.join(s.upper() for s in states)}"]
        case CtDnat():
            return ["-m conntrack --ctstate DNAT"]
        case DstLocal():
            return ["-m addrtype --dst-type LOCAL"]
        case Mark(mask, value):
            return [f"-m mark --mark {value:#x}/{mask:#x}"]
        case CtMark(mask, value):
            return [f"-m connmark --mark {value:#x}/{mask:#x}"]
        case IcmpType(types):
            if proto == "icmp":
                return [f"--icmp-type {t}" for t in types]
            return [f"--icmpv6-type {_ICMPV6.get(t, t)}" for t in types]
    raise TypeError(f"iptables renderer: unknown match {m!r}")


def _ports(direction: str, ranges) -> list[str]:
    d = direction[0]
    if len(ranges) == 1:
        r = ranges[0]
        return [f"--{d}port {r.first}" if r.first == r.last else f"--{d}port {r.first}:{r.last}"]
    chunks: list[list[str]] = [[]]
    used = 0
    for r in ranges:
        item, cost = (str(r.first), 1) if r.first == r.last else (f"{r.first}:{r.last}", 2)
        if used + cost > MULTIPORT_MAX:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += cost
    return [f"-m multiport --{d}ports {','.join(c)}" for c in chunks]


def _targets(rule: Rule, proto: str | None, version: int) -> list[str]:
    """The rule's targets, one per iptables line."""
    out = []
    for s in rule.statements:
        match s:
            case Return():
                out.append("RETURN")
            case Accept():
                out.append("ACCEPT")
            case Drop():
                out.append("DROP")
            case Reject():
                if proto == "tcp":
                    out.append("REJECT --reject-with tcp-reset")
                else:
                    out.append("REJECT")
            case Jump(chain):
                out.append(iptables_chain_name(chain))
            case Masquerade(ports):
                out.append("MASQUERADE" + (f" --to-ports {ports.first}-{ports.last}" if ports else ""))
            case Dnat(addr, ports):
                to = f"[{addr}]" if addr.version == 6 and ports else str(addr)
                if ports:
                    to += f":{ports.first}" if ports.first == ports.last else f":{ports.first}-{ports.last}"
                out.append(f"DNAT --to-destination {to}")
            case Netmap(_, _, to):
                out.append(f"NETMAP --to {to}")
            case Queue(num, bypass):
                out.append(f"NFQUEUE --queue-num {num}" + (" --queue-bypass" if bypass else ""))
            case _:
                raise TypeError(f"iptables renderer: unknown statement {s!r}")
    return out


def _net(n) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
