"""The fast path (``policy.fast_path``): an nftables flowtable for established gateway-free flows.

What OpenWrt calls software flow offloading. Once a forwarded TCP or UDP
connection is established and the filter has accepted its packet, the
``fast`` chain adds it to the flowtable; from then on its packets are
caught at the ingress hook of the zones' interfaces, NATed and sent on by
the flowtable, skipping prerouting, forward and postrouting. The filter
already accepts every established packet (``policy.established_related``,
which the fast path needs), so what passes does not change; what changes is
what sees the later packets (docs/config.md, ``[policy]``).

The table is its own, ``table inet nfgate_fast``, whatever the backend of
the filter: its chain runs on the forward hook after every filter chain
(priority filter + 10, after nfgate's own at filter and iptables' at 0), so
only a packet that all of them accepted is offloaded. nfgate's own flows stay
off it (docs/datapath.md, "The fast path"): every one of them carries one of
nfgate's connection-mark bits (``rewritten``: both legs of a bound flow, a
log-only flow, an offloaded gateway flow; ``allowed``: a dynamic rule's
flow), so the processor's conntrack accounting, destroy events and
bindings see them as without the fast path. The kernel itself never
offloads a connection with a conntrack helper (FTP's control connection)
or one being torn down (a TCP FIN or RST).

A flowtable's devices must exist when it is loaded (Debian's 6.1 kernel
refuses the table otherwise), so the backend loads it with the zone
interfaces that exist at apply time; the rendering here names them all.
"""

from __future__ import annotations

from firewall.rules.model import FastPath
from firewall.rules.text import quote

TABLE = "nfgate_fast"
FAMILY = "inet"
FLOWTABLE = "ft"
# After every filter chain on the forward hook (nfgate's nft chains and iptables' at filter, 0).
PRIORITY = "filter + 10"


def render(fast: FastPath, devices: tuple[str, ...] | None = None) -> str:
    """The table as ``nft -f`` input that replaces any previous one atomically;
    ``devices``: the interfaces to attach (default: every zone interface)."""
    names = fast.devices if devices is None else devices
    exclude = ""
    if fast.exclude:
        exclude = f"ct mark & {fast.exclude:#010x} == 0x00000000 "
    lines = [
        "# nfgate fast path (policy.fast_path): established gateway-free flows skip the forward chain.",
        "# nfgate apply loads it with the interfaces that exist; nft -f of this text needs them all.",
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        "",
        f"table {FAMILY} {TABLE} {{",
        f"\tflowtable {FLOWTABLE} {{",
        "\t\thook ingress priority filter",
        f"\t\tdevices = {{ {', '.join(quote(d) for d in names)} }}",
        "\t\tcounter",
        "\t}",
        "",
        "\tchain fast {",
        f"\t\ttype filter hook forward priority {PRIORITY}; policy accept;",
        f"\t\tct state established meta l4proto {{ tcp, udp }} {exclude}counter flow add @{FLOWTABLE} "
        'comment "policy.fast_path: an established flow the filter accepted, not one of nfgate\'s own"',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"
