"""The binding table: the NAT maps through which the kernel carries every gateway flow.

DESIGN invariant 3, "Python decides, the kernel carries". The processor sees
the first packet of a gateway flow (queued in mangle prerouting, after
conntrack, ``ct state new`` only), allocates the seed's double-NAT binding,
and, before its verdict, writes the binding into two maps of this table:

- ``leg_dnat``: (proto, orig src, orig sport, orig dst, orig dport) to the
  new destination: the gateway G:g for leg A, the server S:s for leg B;
- ``leg_snat``: the same key to the new source: the firewall-side F:f for
  leg A, the client C:c (or the router's W:w through masquerade) for leg B.

Both maps are keyed by the connection's *original* tuple (``ct original``):
at dstnat that is the packet's own tuple; at srcnat the packet already
carries the DNAT's destination, and two flows of one client port to two
servers would look alike. NAT statements run once per connection, on its
first packet, so conntrack then translates that packet and every later one
in both directions, and un-NATs ICMP errors about it. An element is only
needed until that first packet has passed both hooks: it carries a short
timeout (``processor.timeouts.nat_element``) and the kernel drops it.

The dstnat chain also copies the processor's ``rewritten`` packet mark to the
connection's mark, so that ``nfgate`` finds its own connections in a
conntrack dump (after a restart) and in destroy events, whatever the
steering backend. Both chains run just before the ruleset's own NAT
(priority dstnat - 10, srcnat - 10), so a port forward or masquerade cannot
take a bound connection first; a first packet without an element falls
through to them.

The table is native nftables with every backend: iptables-nft and
iptables-legacy steer the first packet with the xt NFQUEUE target, and
nf_tables' maps carry the NAT beside them (docs/datapath.md).
"""

from __future__ import annotations

import ipaddress
from typing import Any

FAMILY = "ip"
TABLE = "nfgate_bind"
DNAT_MAP = "leg_dnat"
SNAT_MAP = "leg_snat"
PRIORITY_OFFSET = 10  # below the ruleset's own dstnat/srcnat chains

_KEY_TYPE = "inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service"
_ORIGINAL = "meta l4proto . ct original ip saddr . ct original proto-src . ct original ip daddr . ct original proto-dst"
# nft derives the port fields' type from the protocol in the same rule, so
# each protocol gets its own rule (both share the maps).
_PROTOS = ("tcp", "udp")


def render(mask: int, mark: int) -> str:
    """The table as ``nft -f`` input that replaces any previous one atomically."""
    keep = ~mask & 0xFFFFFFFF
    lines = [
        "# nfgate binding table: the kernel carries gateway flows (firewall/rules/bind.py).",
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        "",
        f"table {FAMILY} {TABLE} {{",
    ]
    for name, what in ((DNAT_MAP, "leg A: G:g, leg B: S:s"), (SNAT_MAP, "leg A: F:f, leg B: C:c or W:w")):
        lines += [
            f"\tmap {name} {{",
            f"\t\ttype {_KEY_TYPE} : ipv4_addr . inet_service",
            "\t\tflags timeout",
            f'\t\tcomment "original tuple -> {what}"',
            "\t}",
            "",
        ]
    lines += [
        "\tchain dstnat {",
        f"\t\ttype nat hook prerouting priority dstnat - {PRIORITY_OFFSET}; policy accept;",
        f"\t\tmeta mark & {mask:#010x} == {mark:#010x} ct mark set ct mark & {keep:#010x} | {mark:#010x} "
        'comment "a bound gateway flow: found again in conntrack by this mark"',
    ]
    for proto in _PROTOS:
        lines.append(f"\t\tmeta l4proto {proto} dnat ip to {_ORIGINAL} map @{DNAT_MAP}")
    lines += [
        "\t}",
        "",
        "\tchain srcnat {",
        f"\t\ttype nat hook postrouting priority srcnat - {PRIORITY_OFFSET}; policy accept;",
    ]
    for proto in _PROTOS:
        lines.append(f"\t\tmeta l4proto {proto} snat ip to {_ORIGINAL} map @{SNAT_MAP}")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def element(proto: str, key: tuple[int, int, int, int], value: tuple[int, int], timeout: float) -> list[Any]:
    """One map element in libnftables' JSON: ``[{"elem": {"val": KEY, "timeout": s}}, VALUE]``."""
    src, sport, dst, dport = key
    ip = ipaddress.IPv4Address
    return [
        {"elem": {"val": {"concat": [proto, str(ip(src)), sport, str(ip(dst)), dport]}, "timeout": max(1, round(timeout))}},
        {"concat": [str(ip(value[0])), value[1]]},
    ]


def add_elements(name: str, elements: list[Any]) -> dict[str, Any]:
    """A libnftables JSON command adding (or refreshing) ``elements`` in map ``name``."""
    return {"add": {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elements}}}
