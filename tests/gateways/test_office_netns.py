"""examples/office.toml runs under `nfgate run` (tests/gateways/office_netns.py), and a call's media crosses its rtp gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.office_netns import EXT, PHONE, RTP_PORT, OfficeRunning, prepare, send
from tests.gateways.rtp_netns import Sink

pytestmark = pytest.mark.netns

# The start-up of a UDP flow. A datagram that arrives before the first one's
# verdict keeps the young binding (processor passed.bound_young); before, it
# was bound anew and lost (flows.replaced). Two are still allowed for.
STARTUP_LOSS = 2


def call(lab: Any, run: OfficeRunning) -> None:
    """Half a second of media to a phone, then RTCP through the rule the gateway asked for."""
    sink = Sink(lab, RTP_PORT, RTP_PORT + 1)
    try:
        assert send(lab, 47000, RTP_PORT, "rtp*25@0x7") == 25
        # The gateway's rule for RTCP, exactly from the phone's peer's next port.
        wait_for(lambda: any("47001" in e for e in run.rules_for(RTP_PORT + 1)), timeout=5, interval=0.05,
                 what="the adjacent rule")
        # `nfgate flows --rules` lists it: the gateway's REDIRECT, owned by the RTP flow.
        (listed,) = [r for r in run.ask("rules") if r["dst"].endswith(f":{RTP_PORT + 1}")]
        assert (listed["kind"], listed["src"], listed["state"], listed["proto"]) == (
            "redirect", f"{EXT}:47001", "live", "udp"), listed
        assert listed["flow_id"] is not None and listed["gateway"] and listed["expires_in"] > 0
        assert send(lab, 47001, RTP_PORT + 1, "rr*2") == 2
        flows = run.ask("flows")
        got = sink.result()
    finally:
        sink.stop()
    assert 25 - STARTUP_LOSS <= len(got[RTP_PORT]) <= 25 and len(got[RTP_PORT + 1]) == 2, got
    mine = [f for f in flows if f["client"].startswith(f"{EXT}:4700")]
    assert sorted(f["original_dst"] for f in mine) == [f"{PHONE}:{RTP_PORT}", f"{PHONE}:{RTP_PORT + 1}"], flows
    counters = run.counters()
    assert counters["relayed.rtp"] == len(got[RTP_PORT]) and counters["relayed.rtcp"] == 2, counters


def test_office_as_shipped_runs_and_a_call_crosses_its_rtp_gateway(lab_factory: Callable[..., Any],
                                                                   tmp_path: Path) -> None:
    lab = lab_factory("basic")
    prepare(lab)
    run = OfficeRunning(lab, tmp_path)
    try:
        states = {name: p["state"] for name, p in run.processes().items()}
        assert states == {"processor-0": "running", "processor-1": "running", "gateway-ftp": "running",
                          "gateway-rtp": "running"}, states
        call(lab, run)
    finally:
        assert run.stop() == 0


def test_office_failing_closed_carries_a_call_through_its_rtp_gateway_with_its_rtcp_rule(
        lab_factory: Callable[..., Any], tmp_path: Path) -> None:
    lab = lab_factory("basic")
    prepare(lab)
    run = OfficeRunning(lab, tmp_path, fail_mode="closed")
    try:
        call(lab, run)
    finally:
        assert run.stop() == 0
