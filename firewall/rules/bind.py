"""The binding table: the NAT maps through which the kernel carries every gateway flow.

DESIGN invariant 3, "Python decides, the kernel carries". The processor sees
the first packet of a gateway flow (queued in mangle prerouting, after
conntrack, ``ct state new`` only), allocates the seed's double-NAT binding,
and, before its verdict, writes the binding into two maps of this table:

- ``leg_dnat``: (proto, orig src, orig sport, orig dst, orig dport) to the
  new destination: the gateway G:g for leg A, the server S:s for leg B;
- ``leg_snat``: the same key to the new source: the firewall-side F:f for
  leg A, the client C:c (or the router's W:w through masquerade) for leg B.

Leg B's pair is written with leg A's, in the same transaction, so that leg
B's first packet needs no transaction of its own: its original tuple G:e ->
F:f is not known yet (e is the gateway's ephemeral port), but F:f is unique
to the binding, so

- ``legb_dnat``: (proto, G, F, f) to the server S:s;
- ``legb_snat``: the same key to the client C:c (or W:w),

looked up only for a packet that carries the ``rewritten`` mark, which the
processor gives leg B's first packet once it has checked it (from G, a SYN,
the binding's, one leg B at a time): nothing else that reaches F:f, from
any side, is translated by them.

The maps are keyed by the connection's *original* tuple (``ct original``):
at dstnat that is the packet's own tuple; at srcnat the packet already
carries the DNAT's destination, and two flows of one client port to two
servers would look alike. NAT statements run once per connection, on its
first packet, so conntrack then translates that packet and every later one
in both directions, and un-NATs ICMP errors about it. An element is only
needed until that first packet has passed both hooks: it carries a short
timeout (``processor.timeouts.nat_element``) and the kernel drops it.

The allow chain marks a flow that a dynamic rule allows (``allowed``) and
copies that bit to its connection's mark, so the packets that follow before
any reply are still accepted once a one-shot rule's elements are gone.
The dstnat chain also copies the processor's ``rewritten`` packet mark to the
connection's mark, so that ``nfgate`` finds its own connections in a
conntrack dump (after a restart) and in destroy events, whatever the
steering backend. Both chains run just before the ruleset's own NAT
(priority dstnat - 10, srcnat - 10), so a port forward or masquerade cannot
take a bound connection first; a first packet without an element falls
through to them.

IPv6 flows (of a gateway kind that takes them, ``Kind.ipv6``) have their
own table, ``table ip6 nfgate_bind6``, with the same maps keyed by the
IPv6 original tuple (``leg_dnat6``, ``leg_snat6``) and by (proto, G6, F6,
f) for leg B ahead (``legb_dnat6``, ``legb_snat6``), the same two chains,
and every processor instance's dynamic rules' sets and maps (IPv6 REDIRECT,
ALLOW, ORIGINATE, an offloaded IPv6 flow's ALLOW, the adjacent-port rule).

The table is native nftables with every backend: iptables-nft and
iptables-legacy steer the first packet with the xt NFQUEUE target, and
nf_tables' maps carry the NAT beside them (docs/datapath.md).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from firewall.config.model import Marks

FAMILY = "ip"
TABLE = "nfgate_bind"
DNAT_MAP = "leg_dnat"
SNAT_MAP = "leg_snat"
LEGB_DNAT_MAP = "legb_dnat"  # leg B by (proto, G, F, f), written at leg A's time
LEGB_SNAT_MAP = "legb_snat"
FAMILY6 = "ip6"
TABLE6 = "nfgate_bind6"
DNAT6_MAP = "leg_dnat6"  # the IPv6 table's maps, named apart so an op names its table
SNAT6_MAP = "leg_snat6"
LEGB_DNAT6_MAP = "legb_dnat6"  # leg B by (proto, G6, F6, f), written at leg A's time
LEGB_SNAT6_MAP = "legb_snat6"
PRIORITY_OFFSET = 10  # below the ruleset's own dstnat/srcnat chains

_KEY_TYPE = "inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service"
_ORIGINAL = "meta l4proto . ct original ip saddr . ct original proto-src . ct original ip daddr . ct original proto-dst"
_KEY_TYPE6 = "inet_proto . ipv6_addr . inet_service . ipv6_addr . inet_service"
_ORIGINAL6 = "meta l4proto . ct original ip6 saddr . ct original proto-src . ct original ip6 daddr . ct original proto-dst"
_LEGB_KEY_TYPE = "inet_proto . ipv4_addr . ipv4_addr . inet_service"
_LEGB_ORIGINAL = "meta l4proto . ct original ip saddr . ct original ip daddr . ct original proto-dst"
_LEGB_KEY_TYPE6 = "inet_proto . ipv6_addr . ipv6_addr . inet_service"
_LEGB_ORIGINAL6 = "meta l4proto . ct original ip6 saddr . ct original ip6 daddr . ct original proto-dst"
# nft derives the port fields' type from the protocol in the same rule, so
# each protocol gets its own rule (both share the maps).
_PROTOS = ("tcp", "udp")


# Dynamic rules (docs/datapath.md, "Dynamic rules"), per processor instance i,
# each in an exact-source-port flavour and an "_any" one (any source port):
# expect_i: the first packet of a flow a gateway asked for goes to instance i
#   (REDIRECT, and the watched first packet of an ALLOW);
# dnat_i: the router's address to the party it stands for (ALLOW: FTP keeps
#   the port; an offloaded flow goes to its port forward's S:s);
# allow_i / allow_dnat_i: the flow the kernel carries (after that DNAT).
# The IPv6 table has the same, for instance 0 (every IPv6 flow is its own):
# expect6_0, dnat6_0, allow6_0, allow_dnat6_0, each with its "_any".
_EXACT = "inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service"
_ANY = "inet_proto . ipv4_addr . ipv4_addr . inet_service"
_PACKET = "meta l4proto . ip saddr . th sport . ip daddr . th dport"
_PACKET_ANY = "meta l4proto . ip saddr . ip daddr . th dport"
_EXACT6 = "inet_proto . ipv6_addr . inet_service . ipv6_addr . inet_service"
_ANY6 = "inet_proto . ipv6_addr . ipv6_addr . inet_service"
_PACKET6 = "meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport"
_PACKET6_ANY = "meta l4proto . ip6 saddr . ip6 daddr . th dport"
DYN_KINDS = ("expect", "dnat", "allow", "allow_dnat")


def dyn_name(kind: str, instance: int, any_port: bool, six: bool = False) -> str:
    """A dynamic set's (or map's) name; ``six``: the IPv6 table's."""
    return f"{kind}{'6' if six else ''}_{instance}" + ("_any" if any_port else "")


def _dyn6(name: str) -> bool:
    """Whether ``name`` is one of the IPv6 table's dynamic sets or maps (any instance's)."""
    return any(name.startswith(f"{k}6_") for k in DYN_KINDS)


def _dynamic(kind: str, instances: int, six: bool = False):
    """(instance, packet key expression, set name) of every ``kind`` set, exact and ``_any``."""
    exact, any_port = (_PACKET6, _PACKET6_ANY) if six else (_PACKET, _PACKET_ANY)
    for i in range(instances):
        for wild in (False, True):
            yield i, any_port if wild else exact, dyn_name(kind, i, wild, six)


def _dynamic_sets(instances: int, six: bool) -> list[str]:
    """The declarations of every instance's dynamic sets and maps."""
    exact, any_port, addr = (_EXACT6, _ANY6, "ipv6_addr") if six else (_EXACT, _ANY, "ipv4_addr")
    lines = []
    for i in range(instances):
        for kind in DYN_KINDS:
            for wild in (False, True):
                value = f" : {addr} . inet_service" if kind == "dnat" else ""
                lines += [
                    f"\t{'map' if value else 'set'} {dyn_name(kind, i, wild, six)} {{",
                    f"\t\ttype {any_port if wild else exact}{value}",
                    f'\t\tcomment "dynamic rules of processor instance {i}"',
                    "\t}",
                    "",
                ]
    return lines


def _expect_chain(marks: Marks, instances: int, six: bool) -> list[str]:
    """The chain that gives a dynamic rule's first packet the ``expect`` bits of its instance."""
    lines = [
        "\tchain expect {",
        "\t\ttype filter hook prerouting priority mangle - 5; policy accept;",
        "\t\tct state established,related,invalid,untracked return",
        "\t\tct status confirmed return",
        '\t\tmeta l4proto tcp tcp flags & (fin | syn | rst | ack) != syn return comment "a TCP flow begins with a SYN"',
    ]
    for i, key, name in _dynamic("expect", instances, six):
        lines.append(f"\t\t{key} @{name} meta mark set meta mark & {~marks.expect & 0xFFFFFFFF:#010x} | {marks.expect_value(i):#010x}")
    return lines + ["\t}", ""]


def _dnat_rules(instances: int, six: bool) -> list[str]:
    """The dstnat chain's DNAT through every ``dnat`` map: the router's address to the party."""
    family = "ip6" if six else "ip"
    # A DNAT with a port needs the protocol in its rule.
    return [f"\t\tmeta l4proto {proto} dnat {family} to {key} map @{name}"
            for _, key, name in _dynamic("dnat", instances, six) for proto in _PROTOS]


def _allow_chain(marks: Marks, instances: int, six: bool) -> list[str]:
    """The chain that marks a new connection a dynamic rule lets the kernel carry ``allowed``."""
    lines = [
        "\tchain allow {",
        "\t\ttype filter hook forward priority filter - 5; policy accept;",
        "\t\tct state != new return",
    ]
    allowed = f"meta mark set meta mark | {marks.allowed:#010x}"
    # A UDP flow that no reply has answered yet (one-way media, an offloaded
    # RTP stream) stays "new" to conntrack, and a one-shot rule's elements go
    # soon after its first packet: the connection's mark keeps the accept.
    lines.append(f"\t\tct mark & {marks.allowed:#010x} == {marks.allowed:#010x} {allowed} "
                 'comment "later packets of an allowed flow before its first reply (one-way UDP)"')
    remember = f"ct mark set ct mark | {marks.allowed:#010x}"
    for _, key, name in _dynamic("allow", instances, six):
        lines.append(f"\t\t{key} @{name} {allowed} {remember}")
    for _, key, name in _dynamic("allow_dnat", instances, six):
        lines.append(f"\t\tct status dnat {key} @{name} {allowed} {remember}")
    return lines + ["\t}"]


def render(marks: Marks, instances: int) -> str:
    """The table as ``nft -f`` input that replaces any previous one atomically."""
    header = ["# nfgate binding table: the kernel carries gateway flows (firewall/rules/bind.py)."]
    return "\n".join(header + _table(marks, instances, False) + [""] + _table(marks, instances, True)) + "\n"


def render6(marks: Marks, instances: int) -> str:
    """The IPv6 table alone, as ``nft -f`` input (a reload that keeps an older IPv4 table)."""
    return "\n".join([""] + _table(marks, instances, True)) + "\n"


def _table(marks: Marks, instances: int, six: bool) -> list[str]:
    """One family's binding table: leg A's exact elements and leg B's ahead (by G, F, f), written
    at leg A's verdict (IPv6: leg B's exact ones at its own verdict once those ahead may be gone);
    and every instance's dynamic rules (a flow's are the instance's that bound it)."""
    mask, mark = marks.mask, marks.rewritten
    keep = ~mask & 0xFFFFFFFF
    family, table, ip, addr, w = (FAMILY6, TABLE6, "ip6", "ipv6_addr", "W6:w") if six else (FAMILY, TABLE, "ip", "ipv4_addr", "W:w")
    dnat, snat, legb_dnat, legb_snat = (DNAT6_MAP, SNAT6_MAP, LEGB_DNAT6_MAP, LEGB_SNAT6_MAP) if six else \
        (DNAT_MAP, SNAT_MAP, LEGB_DNAT_MAP, LEGB_SNAT_MAP)
    key, legb_key = (_KEY_TYPE6, _LEGB_KEY_TYPE6) if six else (_KEY_TYPE, _LEGB_KEY_TYPE)
    original, legb_original = (_ORIGINAL6, _LEGB_ORIGINAL6) if six else (_ORIGINAL, _LEGB_ORIGINAL)
    lines = [f"table {family} {table}", f"delete table {family} {table}", "", f"table {family} {table} {{"]
    for name, key_type, what in ((dnat, key, "original tuple -> leg A: G:g, leg B: S:s"),
                                 (snat, key, f"original tuple -> leg A: F:f, leg B: C:c or {w}"),
                                 (legb_dnat, legb_key, "leg B, written with leg A: proto . G . F . f -> S:s"),
                                 (legb_snat, legb_key, f"leg B, written with leg A: proto . G . F . f -> C:c or {w}")):
        lines += [f"\tmap {name} {{", f"\t\ttype {key_type} : {addr} . inet_service", "\t\tflags timeout",
                  f'\t\tcomment "{what}"', "\t}", ""]
    lines += _dynamic_sets(instances, six)
    lines += _expect_chain(marks, instances, six)
    bound = f"meta mark & {mask:#010x} == {mark:#010x}"
    lines += [
        "\tchain dstnat {",
        f"\t\ttype nat hook prerouting priority dstnat - {PRIORITY_OFFSET}; policy accept;",
        f"\t\t{bound} ct mark set ct mark & {keep:#010x} | {mark:#010x} "
        'comment "a bound gateway flow: found again in conntrack by this mark"',
    ]
    lines += [f"\t\tmeta l4proto {proto} dnat {ip} to {original} map @{dnat}" for proto in _PROTOS]
    lines += [f"\t\t{bound} meta l4proto {proto} dnat {ip} to {legb_original} map @{legb_dnat}" for proto in _PROTOS]
    lines += _dnat_rules(instances, six)
    lines += ["\t}", "", "\tchain srcnat {",
              f"\t\ttype nat hook postrouting priority srcnat - {PRIORITY_OFFSET}; policy accept;"]
    lines += [f"\t\tmeta l4proto {proto} snat {ip} to {original} map @{snat}" for proto in _PROTOS]
    lines += [f"\t\t{bound} meta l4proto {proto} snat {ip} to {legb_original} map @{legb_snat}" for proto in _PROTOS]
    return lines + ["\t}", ""] + _allow_chain(marks, instances, six) + ["}"]


def element(proto: str, key: tuple[int, ...], value: tuple[int, ...] | None, timeout: float | None) -> Any:
    """One set or map element in libnftables' JSON (the reference for the processor's own
    messages, as ``add_text``). ``key`` is (src, sport, dst, dport),
    or (src, dst, dport) for an any-port set; ``value`` an address, or an address and port."""
    ip: Any = ipaddress.IPv4Address if key[0] <= 0xFFFFFFFF else ipaddress.IPv6Address  # an IPv6 flow's: above 2**32
    if len(key) == 4:
        src, sport, dst, dport = key
        val: Any = {"concat": [proto, str(ip(src)), sport, str(ip(dst)), dport]}
    else:
        src, dst, dport = key
        val = {"concat": [proto, str(ip(src)), str(ip(dst)), dport]}
    elem: Any = {"elem": {"val": val, "timeout": max(1, round(timeout))}} if timeout is not None else val
    if value is None:
        return elem
    return [elem, {"concat": [str(ip(value[0])), value[1]]} if len(value) == 2 else str(ip(value[0]))]


_ntoa = socket.inet_ntoa
_PACK = struct.Struct("!I").pack
_V6 = frozenset((DNAT6_MAP, SNAT6_MAP, LEGB_DNAT6_MAP, LEGB_SNAT6_MAP))


def _ntoa6(addr: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, addr.to_bytes(16, "big"))


def add_text(ops: list[tuple[str, str, tuple[int, ...], tuple[int, int]]], timeout: float) -> str:
    """``nft`` commands adding binding elements (map, proto, key, (address, port)) with ``timeout``:
    one ``add element`` per map. A key is (src, sport, dst, dport), or (G, F, f) in a leg B map.

    The processor writes them as netlink messages (``firewall.processor.setelem``); this is
    what it wrote before, kept as the reference its elements are compared with (nft must
    list both alike, tests/firewall/test_processor_setelem.py) and timed against (the bench)."""
    t = max(1, round(timeout))
    by_map: dict[str, list[str]] = {}
    for name, proto, key, (va, vp) in ops:
        if name in _V6:  # a 128-bit key in the IPv6 table
            if len(key) == 4:
                src, sport, dst, dport = key
                k = f"{proto} . {_ntoa6(src)} . {sport} . {_ntoa6(dst)} . {dport}"
            else:
                g, f, fport = key
                k = f"{proto} . {_ntoa6(g)} . {_ntoa6(f)} . {fport}"
            by_map.setdefault(name, []).append(f"{k} timeout {t}s : {_ntoa6(va)} . {vp}")
            continue
        if len(key) == 4:
            src, sport, dst, dport = key
            k = f"{proto} . {_ntoa(_PACK(src))} . {sport} . {_ntoa(_PACK(dst))} . {dport}"
        else:
            g, f, fport = key
            k = f"{proto} . {_ntoa(_PACK(g))} . {_ntoa(_PACK(f))} . {fport}"
        by_map.setdefault(name, []).append(f"{k} timeout {t}s : {_ntoa(_PACK(va))} . {vp}")
    return "\n".join(f"add element {table_of(name)} {name} {{ {', '.join(elems)} }}" for name, elems in by_map.items())


def table_of(name: str) -> str:
    """``family table`` of a binding map: the IPv6 maps are in their own table."""
    return f"{FAMILY6} {TABLE6}" if name in _V6 else f"{FAMILY} {TABLE}"


def in_table6(name: str) -> bool:
    """Whether set or map ``name`` (a binding map or a dynamic rules' set) is in the IPv6 table."""
    return name in _V6 or _dyn6(name)


def elements(op: str, name: str, elems: list[Any]) -> dict[str, Any]:
    """A libnftables JSON command: ``op`` ("add" or "delete") ``elems`` in set or map ``name``."""
    family, table = (FAMILY6, TABLE6) if in_table6(name) else (FAMILY, TABLE)
    return {op: {"element": {"family": family, "table": table, "name": name, "elem": elems}}}
