"""Render the rule model as nftables text: one ``table inet nfgate``.

The output starts by creating and deleting the table, then defines it whole,
so ``nft -f`` of it replaces nfgate's rules in one transaction whether or not
they were loaded before, and touches no other table. Every rule has a
counter and a comment naming the config entry it comes from. Order is the
model's order, so the text is deterministic (golden tests rely on it).
"""

from __future__ import annotations

import ipaddress

from firewall.rules import bind, fast
from firewall.rules.model import (
    Accept,
    Addr,
    AddrBits,
    Chain,
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
)
from firewall.rules.text import quote

TABLE = "nfgate"
FAMILY = "inet"

_PRIORITY = {
    (Kind.MANGLE, "prerouting"): "mangle",
    (Kind.NAT, "prerouting"): "dstnat",
    (Kind.NAT, "postrouting"): "srcnat",
    (Kind.FILTER, "input"): "filter",
    (Kind.FILTER, "forward"): "filter",
    (Kind.FILTER, "output"): "filter",
}


def render(rs: Ruleset) -> str:
    out = [
        "#!/usr/sbin/nft -f",
        f"# nfgate ruleset{' from ' + rs.source if rs.source else ''}.",
        "# Generated: change the config and run `nfgate apply`, do not edit.",
        "# The next two lines make this file replace the table atomically.",
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        "",
        f"table {FAMILY} {TABLE} {{",
    ]
    for zone, interfaces in rs.zones.items():
        elements = ", ".join(quote(i) for i in interfaces)
        out += [
            f"\tset zone_{zone} {{",
            "\t\ttype ifname",
            f'\t\tcomment "zones.{zone}.interfaces"',
            f"\t\telements = {{ {elements} }}",
            "\t}",
            "",
        ]
    for name, comment in rs.counters.items():
        out += [f"\tcounter {name} {{", f"\t\tcomment {quote(comment[:127])}", "\t}", ""]
    for chain in rs.chains:
        out += _chain(chain)
        out.append("")
    if out[-1] == "":
        out.pop()
    out.append("}")
    text = "\n".join(out) + "\n"
    if rs.bind is not None:
        text += "\n" + bind.render(*rs.bind)
    if rs.fast is not None:
        text += "\n" + fast.render(rs.fast)
    return text


def _chain(chain: Chain) -> list[str]:
    lines = [f"\tchain {chain.name} {{"]
    if chain.hook is not None:
        kind = "nat" if chain.kind is Kind.NAT else "filter"
        prio = _PRIORITY[(chain.kind, chain.hook.value)]
        lines.append(f"\t\ttype {kind} hook {chain.hook.value} priority {prio}; policy {chain.policy};")
    for rule in chain.rules:
        lines.append("\t\t" + render_rule(rule))
    lines.append("\t}")
    return lines


def render_rule(rule: Rule) -> str:
    proto = next((m.name for m in rule.matches if isinstance(m, Proto)), None)
    implied = any(isinstance(m, IcmpType) or isinstance(m, Port) and not m.original for m in rule.matches)
    parts: list[str] = []
    if rule.family is not Family.BOTH and proto not in ("icmp", "icmpv6"):
        parts.append(f"meta nfproto {rule.family.value}")
    for m in rule.matches:
        if isinstance(m, Proto) and implied:
            continue  # "tcp dport 25" and "icmp type ..." already say the protocol
        parts.append(_match(m, proto))
    parts.append(f"counter name {quote(rule.counter)}" if rule.counter else "counter")
    for s in rule.statements:
        parts.append(_statement(s, proto))
    parts.append(f"comment {quote(rule.comment[:127])}")
    return " ".join(parts)


def _match(m, proto: str | None) -> str:
    match m:
        case InZone(zone):
            return f"iifname @zone_{zone}"
        case OutZone(zone):
            return f"oifname @zone_{zone}"
        case InIface(name):
            return f"iifname {quote(name)}"
        case OutIface(name):
            return f"oifname {quote(name)}"
        case Proto(name):
            return f"meta l4proto {name}"
        case Addr(direction, nets, original):
            family = "ip" if nets[0].version == 4 else "ip6"
            ct = "ct original " if original else ""
            return f"{ct}{family} {direction[0]}addr {_set([_net(n) for n in nets])}"
        case AddrBits(direction, mask, value, 6):
            return (
                f"ip6 {direction[0]}addr & {ipaddress.IPv6Address(mask)}"
                f" == {ipaddress.IPv6Address(value)}"
            )
        case AddrBits(direction, mask, value):
            return (
                f"ip {direction[0]}addr & {ipaddress.IPv4Address(mask)}"
                f" == {ipaddress.IPv4Address(value)}"
            )
        case Port(direction, ranges, True):
            return f"ct original proto-{direction} {_set([str(r) for r in ranges])}"
        case Port(direction, ranges):
            return f"{proto} {direction[0]}port {_set([str(r) for r in ranges])}"
        case CtConfirmed():
            return "ct status confirmed"
        case CtState(states):
            return f"ct state {','.join(states)}"
        case CtDnat():
            return "ct status dnat"
        case DstLocal():
            return "fib daddr type local"
        case Mark(mask, value):
            return f"meta mark & {mask:#010x} == {value:#010x}"
        case CtMark(mask, value):
            return f"ct mark & {mask:#010x} == {value:#010x}"
        case IcmpType(types):
            return f"{proto} type {_set(list(types))}"
    raise TypeError(f"nft renderer: unknown match {m!r}")


def _statement(s, proto: str | None) -> str:
    match s:
        case Accept():
            return "accept"
        case Drop():
            return "drop"
        case Reject():
            return "reject with tcp reset" if proto == "tcp" else "reject"
        case Jump(chain):
            return f"jump {chain}"
        case Return():
            return "return"
        case Masquerade(ports):
            return "masquerade" if ports is None else f"masquerade to :{ports}"
        case Dnat(addr, ports) if addr.version == 6:
            return f"dnat ip6 to [{addr}]:{ports}" if ports else f"dnat ip6 to {addr}"
        case Dnat(addr, ports):
            return f"dnat ip to {addr}" + (f":{ports}" if ports else "")
        case Netmap(direction, prefix, to):
            nat, family = ("snat" if direction == "src" else "dnat"), ("ip" if prefix.version == 4 else "ip6")
            return f"{nat} {family} prefix to {family} {direction[0]}addr map {{ {prefix} : {to} }}"
        case Queue(num, bypass):
            return f"queue num {num}" + (" bypass" if bypass else "")
    raise TypeError(f"nft renderer: unknown statement {s!r}")


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _net(n) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
