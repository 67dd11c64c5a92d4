"""The packet processor: one process per NFQUEUE that double-NATs gateway flows.

The seed's "packet processor part" (figs. 6a-6c): the kernel queues only the
first packet of each connection that can belong to a gateway flow (DESIGN
invariant 1); this picks out the new flow's gateway, gives it a unique
firewall-side endpoint, tells the gateways' deNAT/reNAT layer over
authenticated UDP (invariant 5), and writes the double NAT (invariant 2)
into the binding table's maps, so that conntrack carries that packet and
every later one in both directions (invariants 3, 4). docs/datapath.md is
the walk-through; docs/signalling.md the wire protocol.

Modules:

- ``core``: ``ProcessorCore``, the pure per-packet and per-message decisions:
  bytes and times in, verdicts with their NAT map elements out, and the
  datagrams and kernel operations its entry points ask for (``Outputs``,
  handed over by ``take``); conntrack's destroy events in, bindings ended.
  Route lookups, interface names and conntrack look-ups are injected
  callables.
- ``policy``: the config's gateway selectors and port forwards, matched on
  a first packet's ints.
- ``spread``: which worker of a gateway of several (``workers = N``) takes
  a new flow: round robin over the live ones, as the supervisor says.
- ``logged``: the log-only gateways' flows (no binding; their end reported
  with conntrack's counters), adopted again after a restart.
- ``rulebook``: ``RuleBook``, the pure state of dynamic rules (gateway rule
  requests, the processor's own adjacent-port expectations). It knows
  nothing of the core: it is given plain values and look-ups and returns
  its commands as data (``Send``, ``KernelOp`` of ``KernelRule``s,
  ``Offloaded``), which the core carries out.
- ``kernel``: in-process kernel interfaces: ``NatWriter`` (binding and
  dynamic-rule elements as nf_tables netlink messages of ``setelem``), ``Conntrack`` (look-ups, filtered dumps,
  reaping, destroy events over ctnetlink, read and mostly built with ``struct``) and the
  kernel's queue counters.
- ``setelem``: nf_tables set and map elements as netlink messages packed with
  ``struct`` (a transaction is one ``sendmsg``), what ``NatWriter`` sends.
- ``refresh``: with ``[ha]``, the master's refresh of its UDP connections'
  copies on the backup (docs/ha.md, "UDP refresh"): a filtered dump, each
  entry's own timeout written back as an update conntrackd copies, a chunk
  per wake-up of the loop.
- ``runner``: ``Runner``, the single-threaded ``selectors`` loop over the
  NFQUEUE, conntrack's destroy events, the signalling socket, the control
  socket and a 1 s tick.
- ``__main__``: ``python -m firewall.processor --config PATH --instance I``.

The control socket (``/run/nfgate/processor-<queue>.sock``, mode 0600) is
nfgate's one control socket (``firewall.control``, whose docstring gives the
wire format): ``{"cmd": "stats"}`` (counters, pool use, flows per gateway)
or ``{"cmd": "flows", "limit": N}`` (live bindings; N up to
``runner.FLOWS_LIMIT_MAX``, ``runner.FLOWS_LIMIT`` if not given), or
``{"cmd": "rules", "limit": N}`` (the dynamic rules, ``RuleBook.listing``). The
supervisor asks it for ``nfgate status`` and ``nfgate flows``, and tells it
``{"cmd": "workers", "live": {gateway: [i, ...]}}`` (``spread``).
"""
