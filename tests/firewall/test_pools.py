"""firewall.pools: unique endpoints, per-instance slices, exhaustion, reuse order, O(1)."""

from __future__ import annotations

import ipaddress
import time
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.config import bucket_count
from firewall.config.model import PortRange
from firewall.pools import EndpointPool, SliceBy, Slicing

NET = ipaddress.IPv4Network("172.31.254.0/28")
WAN = [ipaddress.IPv4Address("198.51.100.1")]


def _drain(pool: EndpointPool) -> list[tuple[int, int]]:
    out = []
    while (ep := pool.allocate()) is not None:
        out.append(ep)
    return out


def test_every_endpoint_once_then_exhaustion() -> None:
    pool = EndpointPool(NET, range(2000, 2010))
    got = _drain(pool)
    assert len(got) == len(set(got)) == pool.capacity == 16 * 10
    assert set(got) == set(product(range(int(NET[0]), int(NET[-1]) + 1), range(2000, 2010)))
    assert len(pool) == pool.capacity and pool.available == 0
    assert pool.allocate() is None and pool.allocate() is None
    assert pool.exhausted == 3  # _drain's last call, then these two


def test_consecutive_allocations_rotate_over_the_addresses() -> None:
    pool = EndpointPool(NET, range(2000, 2010))
    first = [pool.allocate() for _ in range(17)]
    assert [a for a, _ in first[:16]] == list(range(int(NET[0]), int(NET[-1]) + 1))
    assert {p for _, p in first[:16]} == {2000} and first[16] == (int(NET[0]), 2001)


def test_reuse_is_never_used_first_then_longest_released() -> None:
    pool = EndpointPool(WAN, range(3000, 3004), slice_by=SliceBy.PORT)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert a and b and c
    pool.release(*b)
    pool.release(*a)
    # 3003 has never been used: it goes before anything released.
    assert pool.allocate() == (int(WAN[0]), 3003)
    assert pool.allocate() == b
    pool.release(*c)
    assert pool.allocate() == a
    assert pool.allocate() == c
    assert pool.allocate() is None


def test_a_released_endpoint_reclaimed_is_skipped_until_released_again() -> None:
    """A pair's node that takes its own flows back (docs/ha.md, "Takeover") reclaims endpoints it
    released: the free list still names them, and allocate passes them by while they are in use."""
    pool = EndpointPool(WAN, range(3000, 3003), slice_by=SliceBy.PORT)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert a and b and c
    pool.release(*a)
    pool.release(*b)
    assert pool.reclaim(*a) and not pool.reclaim(*a) and not pool.reclaim(*c)  # in use: refused
    assert not pool.reclaim(int(WAN[0]), 4000)  # not of this pool
    assert len(pool) == 2
    assert pool.allocate() == b  # a is passed by
    assert pool.allocate() is None
    pool.release(*a)
    pool.reclaim(*a)
    pool.release(*a)  # in the free list twice now: handed out once
    assert pool.allocate() == a and pool.allocate() is None and len(pool) == 3
    # An endpoint never handed out is reclaimed as claim would.
    fresh = EndpointPool(WAN, range(3000, 3002), slice_by=SliceBy.PORT)
    assert fresh.reclaim(int(WAN[0]), 3000) and fresh.allocate() == (int(WAN[0]), 3001) and fresh.allocate() is None


def test_fifo_order_survives_compaction() -> None:
    pool = EndpointPool(WAN, range(1024, 1024 + 20000), slice_by=SliceBy.PORT)
    eps = _drain(pool)
    for ep in eps:
        pool.release(*ep)
    assert _drain(pool) == eps
    assert len(pool) == pool.capacity


def test_release_refuses_what_is_not_allocated() -> None:
    pool = EndpointPool(NET, range(2000, 2010))
    ep = pool.allocate()
    assert ep is not None and pool.in_use(*ep)
    pool.release(*ep)
    assert not pool.in_use(*ep)
    with pytest.raises(ValueError):
        pool.release(*ep)  # twice
    with pytest.raises(ValueError):
        pool.release(int(NET[0]), 2005)  # never handed out
    with pytest.raises(ValueError):
        pool.release(int(NET[0]) + 16, 2000)  # outside the prefix
    with pytest.raises(ValueError):
        pool.release(int(NET[0]), 70000)


def test_port_range_from_the_config() -> None:
    pool = EndpointPool(WAN, PortRange(61000, 61009), slice_by=SliceBy.PORT)
    assert pool.capacity == 10 and pool.ports() == list(range(61000, 61010))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"instance": 2, "instances": 2},
        {"instance": -1, "instances": 2},
        {"instances": 0},
    ],
)
def test_bad_instance_numbers(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EndpointPool(NET, range(2000, 2010), **kwargs)


def test_bad_ports_and_addresses() -> None:
    with pytest.raises(ValueError):
        EndpointPool(NET, range(2000, 2000))
    with pytest.raises(ValueError):
        EndpointPool(NET, range(0, 10))
    with pytest.raises(ValueError):
        EndpointPool(NET, range(1000, 2000, 2))
    with pytest.raises(ValueError):
        EndpointPool([], range(1000, 2000))
    with pytest.raises(ValueError):
        EndpointPool(ipaddress.IPv4Network("10.0.0.0/15"), range(1000, 2000))


def test_an_instance_with_an_empty_slice_is_refused() -> None:
    two = ipaddress.IPv4Network("172.31.254.0/31")
    with pytest.raises(ValueError, match="owns no address"):
        EndpointPool(two, range(2000, 2010), instance=3, instances=4)


# ---- slices -----------------------------------------------------------------------


def _space(slice_by: SliceBy) -> tuple[object, range]:
    if slice_by is SliceBy.ADDRESS:
        return NET, range(2000, 2006)
    return [ipaddress.IPv4Address("198.51.100.1"), ipaddress.IPv4Address("198.51.100.9")], range(61000, 61037)


@pytest.mark.parametrize("slicing", list(Slicing))
@pytest.mark.parametrize("slice_by", list(SliceBy))
@pytest.mark.parametrize("instances", [1, 2, 3, 4, 5, 8])
def test_slices_are_disjoint_and_complete(instances: int, slice_by: SliceBy, slicing: Slicing) -> None:
    addresses, ports = _space(slice_by)
    pools = [
        EndpointPool(addresses, ports, instance=i, instances=instances, slice_by=slice_by, slicing=slicing)
        for i in range(instances)
    ]
    handed = [set(_drain(p)) for p in pools]
    everything = set(product(pools[0].addresses() if slice_by is SliceBy.PORT else [int(a) for a in NET], ports))
    assert set().union(*handed) == everything
    assert sum(len(h) for h in handed) == len(everything)
    for i, p in enumerate(pools):
        assert all(p.owns(*ep) for ep in handed[i])
        assert not any(p.owns(*ep) for j, h in enumerate(handed) if j != i for ep in h)


@pytest.mark.parametrize("instances", [1, 2, 3, 4, 5, 7])
def test_low_bits_slicing_is_value_and_buckets_minus_one(instances: int) -> None:
    buckets = bucket_count(instances)
    for i in range(instances):
        f = EndpointPool(NET, range(2000, 2002), instance=i, instances=instances)
        assert all((a & (buckets - 1)) % instances == i for a in f.addresses())
        s = EndpointPool(WAN, range(61000, 61100), instance=i, instances=instances, slice_by=SliceBy.PORT)
        assert all((p & (buckets - 1)) % instances == i for p in s.ports())


@pytest.mark.parametrize("instances", [1, 2, 3, 4, 5, 7])
def test_contiguous_slicing_matches_the_steering_rules(instances: int) -> None:
    """firewall.rules.build steers leg B by subnets of the firewall-side pool;
    a CONTIGUOUS pool must own exactly what reaches it. SNAT port slices only
    keep the instances apart: contiguous, disjoint, together the whole range."""
    buckets = bucket_count(instances)
    net = ipaddress.IPv4Network("172.31.254.0/27")
    rng = PortRange(61000, 65535)
    subnets = list(net.subnets(new_prefix=net.prefixlen + (buckets - 1).bit_length()))
    seen: list[int] = []
    for i in range(instances):
        f = EndpointPool(net, range(1024, 1030), instance=i, instances=instances, slicing=Slicing.CONTIGUOUS)
        want = [int(a) for b, sn in enumerate(subnets) if b % instances == i for a in sn]
        assert f.addresses() == want
        s = EndpointPool(
            WAN, rng, instance=i, instances=instances, slice_by=SliceBy.PORT, slicing=Slicing.CONTIGUOUS
        )
        seen += s.ports()
    assert sorted(seen) == list(range(rng.first, rng.last + 1))


# ---- a model check ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(None), st.integers(0, 200)), max_size=300))
def test_random_allocate_release_keeps_endpoints_unique(ops: list[int | None]) -> None:
    pool = EndpointPool(ipaddress.IPv4Network("10.9.0.0/30"), range(5000, 5010))
    held: list[tuple[int, int]] = []
    for op in ops:
        if op is None or not held:
            ep = pool.allocate()
            if ep is None:
                assert len(held) == pool.capacity
            else:
                assert ep not in held and pool.in_use(*ep)
                held.append(ep)
        else:
            ep = held.pop(op % len(held))
            pool.release(*ep)
            assert not pool.in_use(*ep)
        assert len(pool) == len(held) and pool.available == pool.capacity - len(held)


# ---- a million ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_million_concurrent_endpoints_in_o1() -> None:
    """DESIGN invariant 2: at least 1,000,000 concurrent entries, O(1) each.
    A /28 times 1024-65535 holds 1,032,192."""
    pool = EndpointPool(NET, range(1024, 65536))
    assert pool.capacity >= 1_000_000
    allocate = pool.allocate
    start = time.perf_counter()
    got = [allocate() for _ in range(1_000_000)]
    took = time.perf_counter() - start
    assert len(pool) == 1_000_000
    assert len({a << 16 | p for a, p in got}) == 1_000_000  # type: ignore[index]
    # A generous bound: a few hundred ns each on the 2-core lab machines.
    assert took < 5.0, f"{took:.2f} s for a million allocations"
    start = time.perf_counter()
    for ep in got[:500_000]:
        pool.release(*ep)  # type: ignore[misc]
    again = [allocate() for _ in range(500_000)]
    took = time.perf_counter() - start
    fresh = pool.capacity - 1_000_000  # never used yet: handed out before any released one
    assert len(set(again[:fresh]) & set(got)) == 0
    assert again[fresh:] == got[: 500_000 - fresh]
    assert took < 5.0
