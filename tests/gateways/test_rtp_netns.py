"""The rtp gateway under `nfgate run` with real peers in the basic lab (tests/gateways/rtp_netns.py).

ffmpeg streams PCMU over RTP from ext, with RTCP on the next port, to an
ffmpeg in lan that reads an SDP and decodes all of it; then hostile and
odd senders (tests/gateways/rtp_peers.py) against the same running
gateways: a third host on the stream's ports, broken headers, an SSRC change
under each setting, an rtcp-mux stream, and the adjacent rule's end after a
stream stops. One lab and one `nfgate run` serve the whole module; each test
has its own port pair, so no stream of one test latches another's.
"""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.rtp_netns import EXT, EXT2, LAN, OFFLOAD_AFTER, WAN, RtpRunning, Sink, send
from tests.gateways.rtp_netns import ffmpeg_stream as rtp_ffmpeg

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (apt-get install ffmpeg)"),
]

SECONDS = 6  # of audio streamed by ffmpeg


@pytest.fixture(scope="module")
def rig(module_lab_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    lab = module_lab_factory("basic")
    lab.run("ext", ["ip", "address", "add", f"{EXT2}/24", "dev", "eth0"])
    lab.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", WAN])  # for rtp-out: lan -> ext
    tmp = tmp_path_factory.mktemp("rtp")
    run = RtpRunning(lab, tmp)
    try:
        yield SimpleNamespace(lab=lab, tmp=tmp, run=run)
    finally:
        run.stop()


def sources(got: list[list[Any]]) -> set[str]:
    return {source.split(":")[0] for source, _, _ in got}


def ffmpeg_stream(rig: SimpleNamespace, port: int, *, sender: str = "ext", receiver: str = "lan",
                  seconds: int = SECONDS) -> None:
    """ffmpeg in ``sender`` streams ``seconds`` of PCMU with RTCP on port + 1 to an ffmpeg in ``receiver``
    (rtp_netns.ffmpeg_stream: the receiver decodes all of it)."""
    src, dst = (EXT, WAN) if sender == "ext" else (LAN, EXT)
    rtp_ffmpeg(rig.lab, rig.tmp, port, sender=sender, receiver=receiver, src=src, dst=dst, seconds=seconds)


def clean(counters: dict[str, int]) -> bool:
    return not any(k.startswith(("dropped.rtp", "dropped.rtcp", "dropped.not_latched")) for k in counters)


def test_ffmpeg_rtp_with_rtcp_crosses_the_gateway_and_decodes_whole(rig: SimpleNamespace) -> None:
    run = rig.run
    ffmpeg_stream(rig, 5004)
    counters = run.counters()
    # ffmpeg sends a sender report to port + 1 first, then about every 5 s: validated on the way.
    assert counters.get("relayed.rtcp", 0) >= 1, counters
    assert counters.get("relayed.rtp", 0) >= SECONDS * 50, counters
    assert clean(counters), counters
    # Whichever flow came first, the gateway asked for the other port, exactly: the sender's other port.
    granted = run.events("rule.granted")
    assert any(f"dst={WAN}:500{n}" in line and f"src={EXT}:" in line for line in granted for n in (4, 5)), granted


def test_ffmpeg_the_other_way_lan_to_ext(rig: SimpleNamespace) -> None:
    ffmpeg_stream(rig, 5060, sender="lan", receiver="ext", seconds=4)
    counters = rig.run.counters("rtp-out")
    assert counters.get("relayed.rtp", 0) >= 4 * 50 and counters.get("relayed.rtcp", 0) >= 1, counters
    assert clean(counters), counters


def test_ffmpeg_with_the_processors_adjacent_rule(rig: SimpleNamespace) -> None:
    ffmpeg_stream(rig, 5070, seconds=4)
    counters = rig.run.counters("rtp-proc")
    assert counters.get("relayed.rtp", 0) >= 4 * 50 and counters.get("relayed.rtcp", 0) >= 1, counters
    assert clean(counters), counters
    assert "rules.requested" not in counters and not rig.run.events("rule.granted", "rtp-proc")


def test_ffmpeg_offloaded_after_validation_still_decodes_whole(rig: SimpleNamespace) -> None:
    """A one-way stream (no reply ever) that the kernel carries after its first second."""
    run = rig.run
    ffmpeg_stream(rig, 5050)
    counters = run.counters("rtp-off")
    offloaded = [line for line in run.events("offloaded", "rtp-off") if "stream=203.0.113.1:5050" in line]
    assert any("role=rtp" in line for line in offloaded), (offloaded, counters)
    # The gateway relayed the stream until it was validated; the kernel carried the rest.
    assert OFFLOAD_AFTER <= counters.get("relayed.rtp", 0) < SECONDS * 50 - 100, counters
    assert clean(counters), counters


def test_a_third_host_and_broken_headers_get_nothing_through(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    before = run.counters()
    sink = Sink(lab, 5010, 5011)
    try:
        assert send(lab, EXT, 41000, 5010, "rtp*25@0x1") == 25  # the stream, latched to EXT:41000
        # The third host, on the RTP port (same SSRC, as an injector would) and on the RTCP port.
        assert send(lab, EXT2, 41000, 5010, "rtp*10@0x1") == 10
        assert send(lab, EXT2, 41001, 5011, "rr*5") == 5
        # The latched sender's broken datagrams, then its real RTCP on the next port, then more media.
        assert send(lab, EXT, 41000, 5010, "v1*3 trunc*3 rtp*25@0x1") == 31
        assert send(lab, EXT, 41001, 5011, "rr*3") == 3
        got = sink.result()
    finally:
        sink.stop()
    assert len(got[5010]) == 50 and sources(got[5010]) == {EXT}, got[5010][-5:]
    assert [kind for _, kind, _ in got[5011]] == ["rtcp"] * 3 and sources(got[5011]) == {EXT}, got[5011]
    after = run.counters()

    def more(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    assert more("dropped.not_latched") == 15, after
    assert more("dropped.rtp.version") == 3 and more("dropped.rtp.truncated") == 3, after
    refused = [line for line in run.events("refused") if "stream=203.0.113.1:5010" in line]
    assert len(refused) == 2 and all(f"client={EXT2}:" in line and "reason=other_address" in line for line in refused)


def test_an_ssrc_change_is_dropped_or_taken_as_set(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    sink = Sink(lab, 5020, 5040)
    try:
        plan = "rtp*10@0xA rtp*10@0xB rtp*5@0xA"
        assert send(lab, EXT, 42000, 5020, plan) == 25  # ssrc_change = "drop"
        assert send(lab, EXT, 42000, 5040, plan) == 25  # ssrc_change = "allow"
        got = sink.result()
    finally:
        sink.stop()
    assert [ssrc for _, _, ssrc in got[5020]] == [0xA] * 15
    assert [ssrc for _, _, ssrc in got[5040]] == [0xA] * 10 + [0xB] * 10 + [0xA] * 5
    assert run.counters()["dropped.ssrc_changed"] == 10
    assert run.counters("rtp-allow")["ssrc.changed"] == 2
    assert len(run.events("ssrc.changed", "rtp-allow")) == 2


def test_the_adjacent_rule_lives_while_media_flows_and_goes_after_the_no_media_timeout(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    sink = Sink(lab, 5020, idle=1.0)
    try:
        assert send(lab, EXT, 42100, 5020, "rtp*10@0xA") == 10  # a stream with no RTCP yet (after the SSRC test's end)
        # The gateway's rule for RTCP: exactly from the sender's next port to the next port.
        wait_for(lambda: any("42101" in e for e in run.rules_for(5021)), timeout=5, interval=0.05,
                 what="the adjacent rule in the kernel")
        # Longer than adjacent_rule_ttl: the rule is asked for again while the media goes on.
        assert send(lab, EXT, 42100, 5020, "rtp*200@0xA") == 200
        assert any("42101" in e for e in run.rules_for(5021)), run.rules_for(5021)
        sink.result()
    finally:
        sink.stop()
    wait_for(lambda: any("stream=203.0.113.1:5020" in line and "reason=no_media" in line
                         for line in run.events("stream.close")), timeout=10, interval=0.1, what="the no-media end")
    wait_for(lambda: not run.rules_for(5021), timeout=10, interval=0.2, what="the adjacent rule to go")
    asked = [line for line in run.events("rule.granted") if f"dst={WAN}:5021" in line and "src=203.0.113.10:42101" in line]
    assert len(asked) >= 2, asked  # renewed at least once while the stream lived


def test_an_rtcp_mux_stream_crosses_on_one_port_and_needs_no_second_rule(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    sink = Sink(lab, 5030, 5031)
    try:
        assert send(lab, EXT, 43000, 5030, "rr*1 rtp*10@0x5 rr*2 rtp*5@0x5") == 18
        got = sink.result()
    finally:
        sink.stop()
    assert [kind for _, kind, _ in got[5030]] == ["rtcp"] + ["rtp"] * 10 + ["rtcp"] * 2 + ["rtp"] * 5
    assert got[5031] == []
    assert any("stream=203.0.113.1:5030" in line for line in run.events("rtcp_mux"))
    assert not [line for line in run.events("rule.granted") if f"dst={WAN}:5031" in line]


def test_ffmpeg_lan_to_ext_offloaded_still_decodes_whole(rig: SimpleNamespace) -> None:
    """Routed, one-way: the kernel's forward chain must accept the offloaded flow's later packets itself."""
    run = rig.run
    ffmpeg_stream(rig, 5062, sender="lan", receiver="ext")
    counters = run.counters("rtp-out-off")
    assert any("role=rtp" in line for line in run.events("offloaded", "rtp-out-off")), counters
    assert OFFLOAD_AFTER <= counters.get("relayed.rtp", 0) < SECONDS * 50 - 100, counters
    assert clean(counters), counters


def test_a_third_host_gets_nothing_through_after_the_offload_and_the_stream_goes_on(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    before = run.counters("rtp-off")
    sink = Sink(lab, 5052)
    try:
        assert send(lab, EXT, 44000, 5052, f"rtp*{OFFLOAD_AFTER + 10}@0x1") == OFFLOAD_AFTER + 10
        wait_for(lambda: any("stream=203.0.113.1:5052" in line for line in run.events("offloaded", "rtp-off")),
                 timeout=10, interval=0.1, what="the offload")
        assert send(lab, EXT2, 44000, 5052, "rtp*10@0x1") == 10  # the third host, same ports and SSRC
        # More than the processor's grace for a used rule's elements (3 s): one-way, never answered.
        assert send(lab, EXT, 44000, 5052, "rtp*250@0x1") == 250
        got = sink.result()
    finally:
        sink.stop()
    assert len(got[5052]) == OFFLOAD_AFTER + 10 + 250 and sources(got[5052]) == {EXT}, got[5052][-3:]
    after = run.counters("rtp-off")
    assert after.get("dropped.not_latched", 0) - before.get("dropped.not_latched", 0) == 10, after
    assert after.get("relayed.rtp", 0) - before.get("relayed.rtp", 0) < OFFLOAD_AFTER + 10 + 50, after


def test_the_kernels_udp_timeout_ends_an_offloaded_stream_with_its_counters(rig: SimpleNamespace) -> None:
    lab, run = rig.lab, rig.run
    sink = Sink(lab, 5054)
    try:
        assert send(lab, EXT, 45000, 5054, f"rtp*{OFFLOAD_AFTER + 50}@0x1") == OFFLOAD_AFTER + 50
        sink.result()
    finally:
        sink.stop()
    assert any("stream=203.0.113.1:5054" in line for line in run.events("offloaded", "rtp-off"))
    # The lab's conntrack forgets an unanswered UDP flow after 5 s (tests/conntrack.py).
    closed = wait_for(lambda: [line for line in run.events("stream.close", "rtp-off")
                               if "stream=203.0.113.1:5054" in line], timeout=15, interval=0.2,
                      what="the end of the offloaded stream")
    assert "reason=kernel_end" in closed[0], closed
    # The kernel's counters joined the gateway's: more than the gateway relayed before the offload.
    assert int(re.search(r"datagrams_up=(\d+)", closed[0]).group(1)) > OFFLOAD_AFTER + 10, closed
