"""Which packet processor instance owns a flow, and where it listens for signalling.

With several NFQUEUEs the processor runs one instance per queue, and each
instance holds only the bindings of its own flows (docs/datapath.md, "Queue
numbers and steering"). With a router pair and the gateways on their own
host (docs/ha.md, "The AG host") there are two routers' processors, and each
holds only the flows its router bound. A QUERY or a RULE_REQUEST sent to the
wrong one would be answered NOT_FOUND or UNKNOWN_FLOW, or by nobody, so the
layer must address the owner:

- The manifest (gateways/manifest.py) lists each router (``nodes``: one, or
  the pair's two in node order) with its address on the gateway link, and
  per router its instances: NFQUEUE number, signalling port, and the slices
  of the firewall-side pool it allocates F from. The supervisor computes the
  slices once (``firewall.pools.address_slices`` of the router's part of the
  pool, the scheme the processor's pools and the kernel's steering rules
  use); the gateway only reads them. So F alone names the router and the
  instance that own a flow the layer has never heard of: the router that
  sent it.
- A flow the layer already knows also carries its instance in its flow id:
  the NFQUEUE number in the top 16 bits (``flow_id_queue``), the node of a
  pair in the serial's top bit (``flow_id_node``). After a takeover the
  flow has the new owner's flow id (gateways.layer.core, "Takeover").
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from firewall.signalling import Endpoint, FlowInfo, flow_id_node, flow_id_queue
from gateways.manifest import NodeSpec, ProcessorSpec


class ProcessorInstances:
    """The signalling endpoints of every router's processor instances, and the owner of each flow."""

    __slots__ = ("endpoints", "pool", "pool6", "_slices", "_slices6", "_index_of")

    def __init__(self, pool: ipaddress.IPv4Network, nodes: Sequence[NodeSpec],
                 pool6: ipaddress.IPv6Network | None = None) -> None:
        if not nodes or any(not node.instances for node in nodes):
            raise ValueError("the processor has at least one instance on each router")
        endpoints: list[Endpoint] = []
        index_of: dict[tuple[int, int], int] = {}
        owned: list[tuple[ipaddress.IPv4Network, int]] = []
        owned6: list[tuple[ipaddress.IPv6Network, int]] = []
        for n, node in enumerate(nodes):
            for inst in node.instances:
                index = len(endpoints)
                endpoints.append(Endpoint(node.address, inst.port))
                index_of[(n, inst.queue)] = index
                owned += [(net, index) for net in inst.slices]
                owned6 += [(net, index) for net in inst.slices6]
                if not inst.slices:
                    # firewall.config refuses a pool too small for its instances: an
                    # instance with no slice could allocate nothing.
                    raise ValueError("an instance has no slice of the firewall-side pool")
        if any(not net.subnet_of(pool) for net, _ in owned):
            raise ValueError(f"an instance's slice is outside the firewall-side pool {pool}")
        if any(a.overlaps(b) for k, (a, _) in enumerate(owned) for b, _ in owned[k + 1:]):
            raise ValueError("two instances' pool slices overlap")
        self.endpoints = tuple(endpoints)
        self.pool = pool
        self.pool6 = pool6  # IPv6 flows: each instance's from its slices6 of it (firewall.processor.six)
        self._slices = sorted(owned, key=lambda item: item[0])
        self._slices6 = owned6
        self._index_of = index_of

    @classmethod
    def from_spec(cls, spec: ProcessorSpec) -> "ProcessorInstances":
        return cls(spec.pool, spec.nodes, spec.pool6)

    def __len__(self) -> int:
        return len(self.endpoints)

    def endpoint(self, index: int) -> Endpoint:
        """Where instance ``index`` (counting every router's, in manifest order) listens."""
        if not 0 <= index < len(self.endpoints):
            raise IndexError(f"no processor instance {index} (there are {len(self.endpoints)})")
        return self.endpoints[index]

    def in_pool(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``address`` can be a firewall-side address F at all."""
        if address.version == 6:
            return self.pool6 is not None and address in self.pool6
        return address in self.pool

    def index_for_firewall_side(self, address: ipaddress.IPv4Address) -> int:
        """The instance whose pool slice holds F; ValueError if no slice does."""
        if address.version == 6 and self.pool6 is not None and address in self.pool6:
            # A manifest without IPv6 slices (one instance, or an older supervisor): instance 0's.
            return next((index for net, index in self._slices6 if address in net), 0)
        for net, index in self._slices:
            if address in net:
                return index
        raise ValueError(f"{address} is not in the firewall-side pool {self.pool}")

    def for_firewall_side(self, address: ipaddress.IPv4Address) -> Endpoint:
        """Where to ask about a flow from F that the layer does not know."""
        return self.endpoint(self.index_for_firewall_side(address))

    def for_flow(self, flow: FlowInfo) -> Endpoint:
        """Where to send a rule request for a known flow: the instance that made its flow id.

        A flow id whose node and queue are not in the manifest (a config that
        changed under a running gateway) falls back to the pool slice of F,
        which names the same instance whenever the manifest is the one the
        processor runs, and then to instance 0, which answers UNKNOWN_FLOW
        rather than nothing.
        """
        index = self._index_of.get((flow_id_node(flow.flow_id), flow_id_queue(flow.flow_id)))
        if index is None:
            try:
                index = self.index_for_firewall_side(flow.firewall_side.address)
            except ValueError:
                index = 0
        return self.endpoint(index)
