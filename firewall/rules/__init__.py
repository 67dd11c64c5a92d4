"""One rule model, two renderers.

- ``model``: chains, rules, matches and statements, independent of the kernel API.
- ``build``: config -> model; the datapath layout lives here (docs/datapath.md).
- ``nft``: the model as ``table inet nfgate`` text for ``nft -f``.
- ``iptables``: the model as iptables-restore / ip6tables-restore input.
"""

from firewall.rules.build import build

__all__ = ["build"]
