"""Endpoint pools: O(1) allocation of unique (address, port) pairs, sliced per instance.

What: an ``EndpointPool`` hands out (address, port) endpoints from the
product of a set of IPv4 addresses and a port range, and takes them back.
The processor keeps two: the firewall-side pool (F:f, the source the AG sees
on leg A and the target of its "swap" on leg B) and the SNAT pool (W:w, what
a server sees when leg B leaves through masquerade).

Why it is built this way:

- The seed's "Connection identification" section: the redirected 4-tuple
  must be unique per connection, and changing the source address and port as
  well as the destination lets "1000 * 1000 connections i.e. one million"
  be told apart. DESIGN invariant 2 turns that into: allocation is O(1) and
  the pool holds at least 1,000,000 concurrent bindings. A /28 times ports
  1024-65535 is 16 * 64512 = 1,032,192 endpoints.
- Nothing is materialised per endpoint. An endpoint is an index ``i`` into
  the slice; ``i % A`` picks the address and ``i // A`` the port, so
  consecutive allocations rotate over the addresses. In use is one bit per
  endpoint (128 KiB for a million). A cursor hands out never-used indexes
  first; released indexes go to a FIFO of 4-byte slots, so the memory is
  proportional to the endpoints released and not yet reused, and no Python
  object exists per free endpoint.
- Reuse order: never-used first, then the longest-released. A freed tuple
  may still sit in TIME_WAIT on the AG (leg A) or on the server (leg B, SNAT);
  handing it out as late as possible keeps a new SYN from meeting that old
  state.
- Several processor instances (one per NFQUEUE) each own a slice, so no two
  ever hand out the same endpoint and the kernel's steering rules can send
  each packet to the instance that holds its binding. ``buckets`` is the
  power of two >= instances (``firewall.config.bucket_count``); bucket ``b``
  belongs to instance ``b % instances``. A value's bucket depends on
  ``Slicing``: ``LOW_BITS`` takes ``value & (buckets - 1)``;
  ``CONTIGUOUS`` splits the range into ``buckets`` consecutive blocks (the
  last takes the remainder), as ``IPv4Network.subnets`` does. The pool and the steering rules must use the
  same scheme. Only one dimension is sliced: the address for the
  firewall-side pool (its prefix has many addresses), the port for SNAT
  (usually one wan address).

``SnatPools`` keeps one port-sliced SNAT pool per egress address, made on
first use, so that a router with several wan addresses SNATs each flow to
the address its route leaves by.

Exhaustion is an outcome, not an error: ``allocate`` returns ``None`` and
counts it in ``exhausted``; the caller drops the packet and counts it too.
Releasing an endpoint that is not allocated is a local bug and raises
``ValueError``: silently accepting it would let two flows share a tuple.
"""

from __future__ import annotations

import enum
import ipaddress
from array import array
from typing import Any, Iterable

from firewall.config import bucket_count
from firewall.config.model import PortRange

# An address list longer than this is a config mistake (a /16 of F addresses
# times 64k ports is four billion endpoints); it would also make the address
# tables the biggest thing in the pool.
MAX_ADDRESSES = 1 << 16

# Compact the free FIFO once this many slots at its head have been consumed
# and they are at least half of it: amortised O(1), bounded waste.
_COMPACT_AT = 4096


class SliceBy(enum.Enum):
    """Which dimension of the pool is split between instances."""

    ADDRESS = "address"
    PORT = "port"


class Slicing(enum.Enum):
    """How a value maps to a bucket; must match the kernel's steering rules."""

    LOW_BITS = "low-bits"
    CONTIGUOUS = "contiguous"


def _buckets_of(count: int, values: list[int], buckets: int, slicing: Slicing) -> list[int]:
    """The bucket of each of ``values`` (consecutive or sorted, ``count`` of them)."""
    if slicing is Slicing.LOW_BITS:
        mask = buckets - 1
        return [v & mask for v in values]
    # CONTIGUOUS: blocks of count // buckets by position, the last block takes
    # the rest (with fewer values than buckets, all of them).
    size = count // buckets
    if size == 0:
        return [buckets - 1] * count
    return [min(i // size, buckets - 1) for i in range(count)]


def address_slices(pool: ipaddress.IPv4Network | ipaddress.IPv6Network, instances: int) -> list[tuple[Any, ...]]:
    """The subnets of ``pool`` each instance allocates F from, by ``Slicing.CONTIGUOUS``.

    The pool is a network (a power of two of addresses) and ``bucket_count``
    is a power of two, so the contiguous blocks are exactly its subnets one
    level per halving down; block ``b`` belongs to instance ``b % instances``,
    as in ``EndpointPool``. The supervisor hands these to the gateways in
    their manifests (gateways/manifest.py), so nobody else derives them.
    """
    buckets = bucket_count(instances)
    if pool.num_addresses < buckets:
        raise ValueError(f"{pool} has fewer than {buckets} addresses for {instances} instances")
    blocks = list(pool.subnets(prefixlen_diff=buckets.bit_length() - 1))
    return [tuple(b for k, b in enumerate(blocks) if k % instances == i) for i in range(instances)]


class EndpointPool:
    """Unique (address, port) endpoints from ``addresses`` x ``ports``, this instance's slice only.

    ``addresses`` is a network (every address in it, network and broadcast
    included: the pool prefix is routed to the blind track, never on-link) or
    an iterable of addresses. ``ports`` is a ``range`` or a config
    ``PortRange``. Addresses and ports in and out are ints (hot path).
    """

    __slots__ = (
        "_addrs",
        "_addr_index",
        "_ports",
        "_port_index",
        "_a",
        "_capacity",
        "_fresh",
        "_free",
        "_head",
        "_bits",
        "_used",
        "exhausted",
        "instance",
        "instances",
    )

    def __init__(
        self,
        addresses: ipaddress.IPv4Network | ipaddress.IPv6Network | Iterable[ipaddress.IPv4Address],
        ports: range | PortRange,
        *,
        instance: int = 0,
        instances: int = 1,
        slice_by: SliceBy = SliceBy.ADDRESS,
        slicing: Slicing = Slicing.LOW_BITS,
    ) -> None:
        if instances < 1 or not 0 <= instance < instances:
            raise ValueError(f"instance {instance} of {instances}: need 0 <= instance < instances")
        if isinstance(ports, PortRange):
            ports = range(ports.first, ports.last + 1)
        if ports.step != 1 or not ports or ports.start < 1 or ports.stop > 65536:
            raise ValueError(f"ports {ports}: need a non-empty range within 1-65535")
        if isinstance(addresses, (ipaddress.IPv4Network, ipaddress.IPv6Network)):  # IPv6: the IPv6 pool
            if addresses.num_addresses > MAX_ADDRESSES:
                raise ValueError(f"{addresses}: more than {MAX_ADDRESSES} addresses")
            first = int(addresses.network_address)
            addrs = list(range(first, first + addresses.num_addresses))
        else:
            addrs = sorted({int(ipaddress.IPv4Address(a)) for a in addresses})
            if not addrs or len(addrs) > MAX_ADDRESSES:
                raise ValueError(f"need 1 to {MAX_ADDRESSES} addresses, got {len(addrs)}")
        port_list = list(ports)
        buckets = bucket_count(instances)
        if slice_by is SliceBy.ADDRESS:
            owned = _buckets_of(len(addrs), addrs, buckets, slicing)
            addrs = [a for a, b in zip(addrs, owned) if b % instances == instance]
        else:
            owned = _buckets_of(len(port_list), port_list, buckets, slicing)
            port_list = [p for p, b in zip(port_list, owned) if b % instances == instance]
        if not addrs or not port_list:
            raise ValueError(
                f"instance {instance} of {instances} owns no {slice_by.value} "
                f"({slicing.value} slicing into {buckets} buckets)"
            )
        self._addrs = addrs
        self._addr_index = {a: i for i, a in enumerate(addrs)}
        self._ports = array("H", port_list)
        index = array("i", [-1]) * 65536
        for i, p in enumerate(port_list):
            index[p] = i
        self._port_index = index
        self._a = len(addrs)
        self._capacity = len(addrs) * len(port_list)
        self._fresh = 0
        self._free = array("I")
        self._head = 0
        self._bits = bytearray((self._capacity + 7) >> 3)
        self._used = 0
        self.exhausted = 0
        self.instance = instance
        self.instances = instances

    # ---- the O(1) operations ------------------------------------------------------

    def allocate(self) -> tuple[int, int] | None:
        """A free endpoint (address, port) of this slice, or None when all are in use."""
        bits = self._bits
        while self._fresh < self._capacity:
            i = self._fresh
            self._fresh = i + 1
            if not bits[i >> 3] & (1 << (i & 7)):
                break  # not claimed after a restart
        else:
            free = self._free
            head = self._head
            while True:
                if head >= len(free):
                    self._head = head
                    self.exhausted += 1
                    return None
                i = free[head]
                head += 1
                if not bits[i >> 3] & (1 << (i & 7)):
                    break  # else reclaimed since its release: in use again
            if head >= _COMPACT_AT and head << 1 >= len(free):
                del free[:head]
                head = 0
            self._head = head
        self._bits[i >> 3] |= 1 << (i & 7)
        self._used += 1
        a = self._a
        return self._addrs[i % a], self._ports[i // a]

    def claim(self, addr: int, port: int) -> None:
        """Mark one endpoint of this slice in use without ``allocate``: a binding
        the kernel still carries when a processor starts. Only before anything
        was released (the endpoint must not sit in the free list; ``allocate``
        skips claimed ones among those it has never handed out). ValueError if
        it is not a free endpoint of this slice."""
        i = self._index(addr, port)
        if i < 0 or i < self._fresh or self._bits[i >> 3] & (1 << (i & 7)):
            raise ValueError(f"{ipaddress.IPv4Address(addr)}:{port} is not a never-used endpoint of this pool")
        self._bits[i >> 3] |= 1 << (i & 7)
        self._used += 1

    def reclaim(self, addr: int, port: int) -> bool:
        """Mark one endpoint of this slice in use again without ``allocate``, whether or not it
        was handed out and released before: a binding the kernel carries that this pool let go
        of (a router pair's node that takes over again, docs/ha.md). False if it is in use or
        not of this slice. A released endpoint stays in the free list, and ``allocate`` skips
        it there while it is in use."""
        i = self._index(addr, port)
        if i < 0 or self._bits[i >> 3] & (1 << (i & 7)):
            return False
        self._bits[i >> 3] |= 1 << (i & 7)
        self._used += 1
        return True

    def release(self, addr: int, port: int) -> None:
        """Give back an endpoint that ``allocate`` handed out; ValueError if it is not in use."""
        i = self._index(addr, port)
        if i < 0 or not self._bits[i >> 3] & (1 << (i & 7)):
            raise ValueError(f"{ipaddress.IPv4Address(addr)}:{port} is not allocated from this pool")
        self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        self._free.append(i)
        self._used -= 1

    # ---- queries --------------------------------------------------------------------

    def _index(self, addr: int, port: int) -> int:
        a = self._addr_index.get(addr)
        if a is None or not 0 <= port < 65536:
            return -1
        p = self._port_index[port]
        return -1 if p < 0 else p * self._a + a

    def owns(self, addr: int, port: int) -> bool:
        """Whether the endpoint is in this instance's slice (allocated or not)."""
        return self._index(addr, port) >= 0

    def in_use(self, addr: int, port: int) -> bool:
        """Whether the endpoint is currently allocated."""
        i = self._index(addr, port)
        return i >= 0 and bool(self._bits[i >> 3] & (1 << (i & 7)))

    @property
    def capacity(self) -> int:
        """How many endpoints this slice has."""
        return self._capacity

    @property
    def available(self) -> int:
        """How many endpoints ``allocate`` can still hand out."""
        return self._capacity - self._used

    def __len__(self) -> int:
        """How many endpoints are allocated."""
        return self._used

    def addresses(self) -> list[int]:
        """The addresses of this slice, ascending."""
        return list(self._addrs)

    def ports(self) -> list[int]:
        """The ports of this slice, ascending."""
        return self._ports.tolist()

    def __repr__(self) -> str:
        return (
            f"<EndpointPool instance {self.instance}/{self.instances}: "
            f"{self._a} addresses x {len(self._ports)} ports, {self._used} in use>"
        )


class SnatPools:
    """W:w for leg B through masquerade: one port-sliced pool per egress address
    (IPv4, or an IPv6 W6 for ``nat.masquerade6``: addresses above 2**32 are IPv6's).

    ``FlowTable`` draws from one SNAT pool; this stands in for it so that a
    router with several wan addresses SNATs each flow to the address its
    route leaves by: ``prefer(W)`` before ``FlowTable.open`` picks it. A pool
    appears on first use, so an address that changes (DHCP) gets a new one.
    Slices are port slices, contiguous, as the kernel's ``steer_snat`` rules
    cut them.
    """

    def __init__(self, ports: PortRange, instance: int, instances: int) -> None:
        self._ports = ports
        self._instance = instance
        self._instances = instances
        self._pools: dict[int, EndpointPool] = {}
        self._want: EndpointPool | None = None

    def prefer(self, addr: int) -> None:
        pool = self._pools.get(addr)
        if pool is None:
            pool = self._pools[addr] = EndpointPool(
                ipaddress.ip_network(addr), self._ports, instance=self._instance, instances=self._instances,
                slice_by=SliceBy.PORT, slicing=Slicing.CONTIGUOUS,
            )
        self._want = pool

    def allocate(self) -> tuple[int, int] | None:
        if self._want is None:
            raise ValueError("SnatPools.allocate before prefer(): no egress address chosen")
        return self._want.allocate()

    def release(self, addr: int, port: int) -> None:
        self._pools[addr].release(addr, port)

    def claim(self, addr: int, port: int) -> bool:
        """Mark W:w in use (a binding adopted at start); False if it cannot be this instance's."""
        self.prefer(addr)
        pool = self._want
        assert pool is not None
        if not pool.owns(addr, port) or pool.in_use(addr, port):
            return False
        pool.claim(addr, port)
        return True

    def stats(self) -> dict[str, dict[str, int]]:
        return {str(ipaddress.ip_address(a)): pool_stats(p) for a, p in self._pools.items()}


def pool_stats(pool: EndpointPool) -> dict[str, int]:
    return {"used": len(pool), "capacity": pool.capacity, "exhausted": pool.exhausted}
