"""Keepalive discovery (tunnel/lifetime.py): against NATs of every lifetime."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.lifetime import KEEP_FRACTION, PROBE_GRACE, Probe

FLOOR, CEILING = 1.0, 120.0


def discover(lifetime: float, floor: float = FLOOR, ceiling: float = CEILING) -> tuple[Probe, float]:
    """Run a discovery behind a NAT that forgets a mapping idle for ``lifetime`` s; (probe, seconds taken)."""
    now = 0.0
    probe = Probe(floor, ceiling, now)
    for _ in range(100):
        wait_ms = probe.due(now)
        assert wait_ms is not None
        if wait_ms / 1000 < lifetime:
            now += wait_ms / 1000 + 0.01
            probe.answered(wait_ms, now)
        else:
            deadline = probe.deadline()
            assert deadline is not None
            now = deadline
            probe.tick(now)
        if probe.result is not None:
            return probe, now
    raise AssertionError("no result in 100 probes")


@settings(max_examples=300, deadline=None)
@given(st.floats(0.2, 400.0))
def test_the_interval_keeps_the_mapping_and_stays_within_floor_and_ceiling(lifetime: float) -> None:
    probe, _ = discover(lifetime)
    assert probe.result is not None and FLOOR <= probe.result <= CEILING
    if lifetime > FLOOR / KEEP_FRACTION:
        assert probe.result < lifetime  # a keepalive always comes before the NAT forgets
    if CEILING < lifetime:
        assert probe.result == KEEP_FRACTION * CEILING  # the ceiling bounds the waits probed
    assert probe.probes <= 12 and probe.deadline() is None and probe.due(1e9) is None


@pytest.mark.parametrize(("lifetime", "low", "high"), [(5.0, 3.0, 4.0), (30.0, 19.0, 24.0), (180.0, 96.0, 96.0)])
def test_the_labs_and_common_nats(lifetime: float, low: float, high: float) -> None:
    probe, took = discover(lifetime)
    assert probe.result is not None and low <= probe.result <= high, probe.result
    print(f"lifetime {lifetime:g} s: interval {probe.result:.2f} s after {probe.probes} probes, {took:.0f} s")


def test_a_late_or_stale_answer_does_not_count() -> None:
    probe = Probe(FLOOR, CEILING, 0.0)
    assert probe.due(0.0) == 2000
    assert probe.due(0.5) is None  # one at a time
    probe.answered(4000, 1.0)  # not the pending one's wait
    assert probe.survived == 0.0
    probe.tick(2.0 + PROBE_GRACE - 0.01)
    assert probe.lost is None
    probe.tick(2.0 + PROBE_GRACE)
    assert probe.lost == 2.0
    probe.answered(2000, 3.5)  # too late: already counted as lost
    assert probe.survived == 0.0


# -- both cores: PROBE on channel 0, answered after its wait ---------------------------------

from tests.tunnel.test_server_core import NAT, Pair  # noqa: E402
from tunnel.commands import KeepaliveLearned, SendDatagram, SendProbe  # noqa: E402
from tunnel.datagrams import Datagram, DatagramType, DropReason, encode_datagram  # noqa: E402


def probe_of(outputs: list[object]) -> SendProbe:
    (probe,) = [o for o in outputs if isinstance(o, SendProbe)]
    return probe


def test_both_cores_discover_a_five_second_nat() -> None:
    """The lab's NAT forgets an idle UDP mapping after 5 s: the mediator's
    channels end up keeping alive every 3.6 s (0.8 of the 4.5 s that survived)."""
    pair = Pair()
    pair.start()
    core, server = pair.mediator, pair.server
    assert core.channel_interval == 25.0  # the configured one until discovery ends
    now = 0.0
    out = core.tick(now)
    learned: list[object] = []
    for _ in range(20):
        learned += [o for o in out if isinstance(o, KeepaliveLearned)]
        if learned:
            break
        probes = [o for o in out if isinstance(o, SendProbe)]
        if not probes:
            deadline = core.next_deadline()
            assert deadline is not None and deadline > now
            now = deadline
            out = core.tick(now)
            continue
        assert server.receive_datagram(probes[0].data, (NAT, 40001), now) == []
        due = server.next_deadline()
        assert due is not None
        [ack] = server.tick(due)
        assert isinstance(ack, SendDatagram) and (ack.address, ack.port) == (NAT, 40001)
        if due - now < 5.0:  # the NAT still has the mapping: the answer arrives (and the next probe goes)
            now = due
            out = core.receive_datagram(ack.data, now)
        else:  # lost on the way: the mediator's grace runs out
            now = due + 1.0
            out = core.tick(now)
    assert learned == [KeepaliveLearned(3.6, 4.5, 5.0, 6)]  # 2, 4, 8, 6, 5 s, then 4.5 s
    assert core.channel_interval == 3.6


def test_the_server_answers_one_probe_at_a_time_and_never_later_than_its_ceiling() -> None:
    pair = Pair()
    pair.start()
    server = pair.server
    key = server._key
    assert key is not None

    def probe(seq: int, wait_ms: int) -> bytes:
        return encode_datagram(Datagram(DatagramType.PROBE, server.key_id, 0, seq, False, wait_ms=wait_ms), key)

    server.receive_datagram(probe(0, 600_001), (NAT, 1), 0.0)  # past max_keepalive_interval (600 s)
    assert server.dropped[DropReason.MALFORMED] == 1
    server.receive_datagram(probe(1, 4000), (NAT, 1), 0.0)
    server.receive_datagram(probe(2, 2000), (NAT, 2), 0.5)  # replaces the first
    server.receive_datagram(probe(2, 2000), (NAT, 2), 0.6)  # a replay
    assert server.dropped[DropReason.REPLAY] == 1
    assert server.next_deadline() == 2.5
    [ack] = server.tick(2.5)
    assert isinstance(ack, SendDatagram) and ack.port == 2
    assert server.tick(4.0) == []


def test_a_version_2_session_has_no_discovery() -> None:
    pair = Pair(versions=(1, 2))
    pair.start()
    assert pair.mediator.discovery is None
    assert not [o for o in pair.mediator.tick(1.0) if isinstance(o, SendProbe)]
