"""Which packet processor instance owns a flow, and where it listens for signalling.

With several NFQUEUEs the processor runs one instance per queue, and each
instance holds only the bindings of its own flows (docs/datapath.md, "Queue
numbers and steering"). A QUERY or a RULE_REQUEST sent to the wrong instance
would be answered NOT_FOUND or UNKNOWN_FLOW, so the layer must address the
owner:

- Instance *i* is the *i*-th processor instance of the manifest
  (gateways/manifest.py): its NFQUEUE number, its signalling endpoint (the
  router end of the blind track, one port per instance), and the slices of
  the firewall-side pool it allocates F from. The supervisor computes the
  slices once (``firewall.pools.address_slices``, the scheme the processor's
  pools and the kernel's steering rules use); the gateway only reads them.
  So F alone names the owner of a flow the layer has never heard of.
- A flow the layer already knows also carries its instance in the top 16
  bits of its flow id (``flow_id_queue``): the NFQUEUE number.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from firewall.signalling import Endpoint, FlowInfo, flow_id_queue
from gateways.manifest import InstanceSpec, ProcessorSpec


class ProcessorInstances:
    """The signalling endpoints of the processor's instances, and the owner of each flow."""

    __slots__ = ("router_address", "queues", "ports", "pool", "pool6", "_slices", "_slices6", "_index_of_queue")

    def __init__(self, router_address: ipaddress.IPv4Address, pool: ipaddress.IPv4Network,
                 instances: Sequence[InstanceSpec], pool6: ipaddress.IPv6Network | None = None) -> None:
        if not instances:
            raise ValueError("the processor has at least one instance")
        owned = [(net, i) for i, inst in enumerate(instances) for net in inst.slices]
        if any(not net.subnet_of(pool) for net, _ in owned):
            raise ValueError(f"an instance's slice is outside the firewall-side pool {pool}")
        if any(a.overlaps(b) for k, (a, _) in enumerate(owned) for b, _ in owned[k + 1:]):
            raise ValueError("two instances' pool slices overlap")
        if any(not inst.slices for inst in instances):
            # firewall.config refuses a pool too small for its instances: an
            # instance with no slice could allocate nothing.
            raise ValueError("an instance has no slice of the firewall-side pool")
        self.router_address = router_address
        self.queues = tuple(inst.queue for inst in instances)
        self.ports = tuple(inst.port for inst in instances)
        self.pool = pool
        self.pool6 = pool6  # IPv6 flows: each instance's from its slices6 of it (firewall.processor.six)
        self._slices = sorted(owned, key=lambda item: item[0])
        self._slices6 = [(net, i) for i, inst in enumerate(instances) for net in inst.slices6]
        self._index_of_queue = {q: i for i, q in enumerate(self.queues)}

    @classmethod
    def from_spec(cls, spec: ProcessorSpec) -> "ProcessorInstances":
        return cls(spec.address, spec.pool, spec.instances, spec.pool6)

    def __len__(self) -> int:
        return len(self.queues)

    def endpoint(self, index: int) -> Endpoint:
        """Where instance ``index`` listens."""
        if not 0 <= index < len(self.queues):
            raise IndexError(f"no processor instance {index} (there are {len(self.queues)})")
        return Endpoint(self.router_address, self.ports[index])

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

        A flow id whose queue is not in the manifest (a config that changed
        under a running gateway) falls back to the pool slice of F, which
        names the same instance whenever the manifest is the one the
        processor runs, and then to instance 0, which answers UNKNOWN_FLOW
        rather than nothing.
        """
        index = self._index_of_queue.get(flow_id_queue(flow.flow_id))
        if index is None:
            try:
                index = self.index_for_firewall_side(flow.firewall_side.address)
            except ValueError:
                index = 0
        return self.endpoint(index)
