"""Which packet processor instance owns a flow, and where it listens for signalling.

With several NFQUEUEs the processor runs one instance per queue, and each
instance holds only the bindings of its own flows (docs/datapath.md, "Queue
numbers and steering"). A QUERY or a RULE_REQUEST sent to the wrong instance
would be answered NOT_FOUND or UNKNOWN_FLOW, so the layer must address the
owner:

- Instance *i* is the *i*-th entry of ``processor.queues`` and listens on
  ``gateway_link.router_address``, port ``signalling.port + i``
  (``firewall.rules.build.signalling_ports``).
- Each instance allocates F only from its slice of the firewall-side pool,
  the same slice the kernel's ``steer_pool`` rules send to its queue: the
  pool split into ``bucket_count(instances)`` contiguous subnets, subnet *b*
  belonging to instance *b* mod *instances* (``firewall.pools.Slicing.CONTIGUOUS``).
  So F alone names the owner of a flow the layer has never heard of.
- A flow the layer already knows also carries its instance in the top 16
  bits of its flow id (``flow_id_queue``): the NFQUEUE number.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from firewall.config import Config, bucket_count
from firewall.signalling import Endpoint, FlowInfo, flow_id_queue


class ProcessorInstances:
    """The signalling endpoints of the processor's instances, and the owner of each flow."""

    __slots__ = ("router_address", "base_port", "queues", "pool", "_buckets", "_block", "_index_of_queue")

    def __init__(
        self,
        router_address: ipaddress.IPv4Address,
        base_port: int,
        queues: Sequence[int],
        pool: ipaddress.IPv4Network,
    ) -> None:
        if not queues:
            raise ValueError("the processor has at least one queue")
        if not 1 <= base_port <= 65536 - len(queues):
            raise ValueError(f"signalling ports {base_port}..{base_port + len(queues) - 1} are not all ports")
        buckets = bucket_count(len(queues))
        if pool.num_addresses < buckets:
            # firewall.config refuses this too (_check_buckets): an instance
            # with no slice could allocate nothing.
            raise ValueError(f"{pool} has fewer than {buckets} addresses for {len(queues)} queues")
        self.router_address = router_address
        self.base_port = base_port
        self.queues = tuple(queues)
        self.pool = pool
        self._buckets = buckets
        # A power-of-two pool split into a power of two of buckets: every
        # block has the same size, as IPv4Network.subnets makes them.
        self._block = pool.num_addresses // buckets
        self._index_of_queue = {q: i for i, q in enumerate(self.queues)}

    @classmethod
    def from_config(cls, config: Config) -> "ProcessorInstances":
        return cls(
            config.gateway_link.router_address.ip,
            config.signalling.port,
            config.processor.queues,
            config.processor.pools.firewall_side,
        )

    def __len__(self) -> int:
        return len(self.queues)

    def endpoint(self, index: int) -> Endpoint:
        """Where instance ``index`` listens."""
        if not 0 <= index < len(self.queues):
            raise IndexError(f"no processor instance {index} (there are {len(self.queues)})")
        return Endpoint(self.router_address, self.base_port + index)

    def in_pool(self, address: ipaddress.IPv4Address) -> bool:
        """Whether ``address`` can be a firewall-side address F at all."""
        return address in self.pool

    def index_for_firewall_side(self, address: ipaddress.IPv4Address) -> int:
        """The instance whose pool slice holds F; ValueError if F is outside the pool."""
        if address not in self.pool:
            raise ValueError(f"{address} is not in the firewall-side pool {self.pool}")
        bucket = (int(address) - int(self.pool.network_address)) // self._block
        return bucket % len(self.queues)

    def for_firewall_side(self, address: ipaddress.IPv4Address) -> Endpoint:
        """Where to ask about a flow from F that the layer does not know."""
        return self.endpoint(self.index_for_firewall_side(address))

    def for_flow(self, flow: FlowInfo) -> Endpoint:
        """Where to send a rule request for a known flow: the instance that made its flow id.

        A flow id whose queue is not configured (a config that changed under
        a running gateway) falls back to the pool slice of F, which names the
        same instance whenever the config is the one the processor runs, and
        then to instance 0, which answers UNKNOWN_FLOW rather than nothing.
        """
        index = self._index_of_queue.get(flow_id_queue(flow.flow_id))
        if index is None:
            address = flow.firewall_side.address
            index = self.index_for_firewall_side(address) if address in self.pool else 0
        return self.endpoint(index)


def layer_endpoint(config: Config, gateway: str) -> Endpoint:
    """Where the layer of gateway ``gateway`` listens: the gateway address, port ``signalling.port + k``.

    ``k`` is the gateway's index in the config. Each gateway is its own
    process (DESIGN invariant 6), and a unicast UDP port delivers each
    datagram to one socket only, so two gateway processes cannot share one
    signalling port; the gateways' ports mirror the instances' (router
    address, ``signalling.port + i``). With one gateway this is
    ``signalling.port`` itself. The processor pushes a flow's NEW_FLOW and
    FLOW_END to the port of the gateway it names, and answers a QUERY or a
    RULE_REQUEST to the address and port it came from, which is this one.
    """
    return Endpoint(config.gateway_link.gateway_address.ip, config.gateway_signalling_port(gateway))
