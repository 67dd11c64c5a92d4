"""The deNAT/reNAT layer that every gateway shares (the seed's "Signalling in general").

The seed places "a simple deNATting / reNATting layer" between each
application gateway and the packet processor: it is the processor's peer for
signalling, it tells the gateway the original addresses of what it receives,
and it sends the gateway's output back towards the processor by swapping
source and destination ("Packet restoration"). In nfgate the processor
rewrites packets in the kernel path, so the layer works at the socket level:
it maps an accepted connection F:f -> G:g to its original tuple, and leg B
is a socket connected to F:f, which the processor restores.

Modules:

- ``core``: ``LayerCore``, sans-IO: the flow table, the hybrid push/pull
  lookups, rule requests and their retries, FLOW_END and RULE_END, counters.
- ``outputs``: what the core asks its caller to do, as data (``Send``,
  ``FlowKnown``, ``FlowGone``, ...), and ``EndCause``.
- ``instances``: ``ProcessorInstances``: where each processor instance of
  each router (one, or a pair's two nodes) listens, and which one owns a
  flow (pool slice of F, or the flow id's queue and node).
- ``endpoint``: ``GatewayLayer``, the asyncio adapter: the signalling
  socket, timers, ``attach``/``lookup``, leg B (``connect_tcp``,
  ``open_tcp``, ``open_udp``), ``request_rule``; the errors a gateway
  handles (``FlowUnknown``, ``RuleRefusedError``, ``RuleNoAnswer``).
- ``events``: ``EventLog``, one log line per event, as text or JSON lines.
"""

from __future__ import annotations

from gateways.layer.core import (
    MAX_PENDING_RULES,
    MAX_RULE_ATTEMPTS,
    MAX_UNCLAIMED_FLOWS,
    UNCLAIMED_FLOW_TTL,
    LayerCore,
)
from gateways.layer.endpoint import (
    FlowUnknown,
    GatewayLayer,
    Hold,
    RuleError,
    RuleNoAnswer,
    RuleRefusedError,
)
from gateways.layer.events import EventLog
from gateways.layer.instances import ProcessorInstances
from gateways.layer.outputs import EndCause, FlowKey, flow_key

__all__ = [
    "MAX_PENDING_RULES", "MAX_RULE_ATTEMPTS", "MAX_UNCLAIMED_FLOWS", "UNCLAIMED_FLOW_TTL",
    "EndCause", "EventLog", "FlowKey", "FlowUnknown", "GatewayLayer", "Hold", "LayerCore",
    "ProcessorInstances", "RuleError", "RuleNoAnswer", "RuleRefusedError", "flow_key",
]
