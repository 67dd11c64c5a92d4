"""The packet processor: one process per NFQUEUE that double-NATs gateway flows.

The seed's "packet processor part" (figs. 6a-6c): the kernel queues only the
packets that can belong to a gateway flow (DESIGN invariant 1); this picks
out each new flow's gateway, gives it a unique firewall-side endpoint, tells
the gateways' deNAT/reNAT layer over authenticated UDP (invariant 5),
rewrites the packet into the gateway and restores what comes back
(invariant 2), marked so that conntrack never sees it and it never loops
(invariants 3, 4). docs/datapath.md is the walk-through; docs/signalling.md
the wire protocol.

Modules:

- ``core``: ``ProcessorCore``, the pure per-packet and per-message decisions:
  bytes and times in, verdicts, datagrams and kernel operations out. Route
  lookups and interface names are injected callables.
- ``rulebook``: ``RuleBook``, the pure state of dynamic rules (gateway rule
  requests, the processor's own adjacent-port expectations), and the
  ``KernelRule``/``KernelOp`` values it asks the kernel for.
- ``dynamic``: ``KernelRules``, which detects the applied backend (nft,
  iptables-nft, iptables-legacy) and carries the kernel operations out with
  its tools, without blocking the loop.
- ``runner``: ``Runner``, the single-threaded ``selectors`` loop over the
  NFQUEUE, the signalling socket, the control socket and a 1 s tick.
- ``__main__``: ``python -m firewall.processor --config PATH --instance I``.

The control socket (``/run/nfgate/processor-<queue>.sock``, mode 0600)
takes one JSON object per connection: ``{"cmd": "stats"}`` (counters, pool
use, flows per gateway) or ``{"cmd": "flows", "limit": N}`` (live bindings).
"""
