"""nfgate's router side.

- ``config``: load and validate the TOML config (every error with its key path).
- ``rules``: one typed rule model built from the config, rendered as nftables
  text or as iptables-restore input.
- ``backend``: detect what the kernel supports, apply a ruleset atomically,
  flush exactly what nfgate installed.
- ``signalling``: the authenticated UDP protocol between the processor and
  the gateways' deNAT/reNAT layer (docs/signalling.md).
- ``lab``: topologies as data, built as network namespaces with pyroute2.
- ``cli``: the ``nfgate`` command.
"""
