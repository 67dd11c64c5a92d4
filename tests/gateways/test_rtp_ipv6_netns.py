"""The rtp gateway over IPv6 in the dual lab (issue 17), with ffmpeg (tests/gateways/rtp_netns.py).

ext (2001:db8:2::10) routes lan's ULA through the router; ffmpeg in ext
streams PCMU with RTCP on the next port to an ffmpeg in lan (fd00:1::10)
that reads an SDP. The filter and the selector name the RTP port 5004 alone:
RTCP on 5005 reaches the gateway only by the processor's own adjacent rule
(``adjacent = "processor"``); the forward policy ``drop`` stops the rest. The
gateway validates the stream, then the kernel carries it (offload over
IPv6): the processor's queue stays still while the stream goes on. Hostile:
the client from another source port to the offloaded tuple's port, and a
flood of new sources, which stops at the IPv6 pool (2 addresses x 5 ports).
A second gateway (``adjacent = "gateway"``) asks for RTCP's port itself.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.test_ipv6_netns import ZONES6, no_tentative_addresses, seen
from tests.gateways.rtp_netns import OFFLOAD_AFTER, PEERS, RtpRunning, ffmpeg_stream, gateway, send
from tests.labconfig import RUN

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (apt-get install ffmpeg)"),
]

EXT6, WAN6, LAN6 = "2001:db8:2::10", "2001:db8:2::1", "fd00:1::10"
SECONDS = 7  # of audio: ffmpeg's second sender report (RTCP) comes about 5 s in
POOL = 10  # firewall_side6 /127 x ports 40000-40004
HOSTILE_PORT = 41999

CONFIG = ZONES6 + """
[[rule]]
name = "media-in"
from = "wan"
to = "lan"
proto = "udp"
ports = ["5004", "5010"]

[processor]
queues = [0]
adjacent_ttl = 10

[processor.pools]
ports = "40000-40004"
firewall_side6 = "fd6e:6667:6174:fe::/127"
""" + RUN + gateway("rtp6", '"5004"', adjacent="processor",
                    extra=f'offload = "after-validation"\noffload_after_packets = {OFFLOAD_AFTER}') \
    + gateway("rtp6-gw", '"5010"')

# lan counts what reaches it: the media port, and anything from the hostile source port.
CAPTURE = f"""
table inet seen {{
\tcounter media {{ }}
\tcounter hostile {{ }}
\tchain pre {{
\t\ttype filter hook prerouting priority raw - 10; policy accept;
\t\tmeta nfproto ipv6 udp dport 5004 counter name "media"
\t\tmeta nfproto ipv6 udp sport {HOSTILE_PORT} counter name "hostile"
\t}}
}}
"""


def test_ffmpeg_over_ipv6_with_rtcp_by_the_adjacent_rule_offloaded_and_hostile_peers(
        lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", WAN6])
    lab.run("lan", ["nft", "-f", "-"], input=CAPTURE)
    run = RtpRunning(lab, tmp_path, CONFIG)
    lab.run("ext", ["ping", "-c", "1", "-W", "1", WAN6], check=False)  # resolve the router first

    def processor() -> dict[str, Any]:
        return run.ask("status")["processors"]["processor-0"]

    def counter(name: str) -> int:
        return processor()["counters"].get(name, 0)

    stream = f"stream=[{LAN6}]:5004"
    window: dict[str, int] = {}

    def while_streaming() -> None:
        # Validated after OFFLOAD_AFTER datagrams (1 s): the kernel carries the RTP flow.
        wait_for(lambda: any(stream in line and "role=rtp" in line for line in run.events("offloaded", "rtp6")),
                 timeout=15, interval=0.1, what="the IPv6 stream's offload")
        wait_for(lambda: counter("passed.offloaded") >= 1, timeout=5, interval=0.05,
                 what="the offload's ALLOW to take the next datagram")
        # The client from another source port to the same port: a new flow into the gateway, whose
        # latch refuses it (the kernel carries only the offloaded 5-tuple).
        send(lab, EXT6, HOSTILE_PORT, 5004, "rtp*3", dst=LAN6)
        wait_for(lambda: run.events("refused", "rtp6"), timeout=5, interval=0.05, what="the latch's refusal")
        # From here the stream goes on, and the processor's queue stays still: 100 datagrams
        # (2 s) reach lan while at most RTCP's first packet and its leg B are queued.
        window["queued"], window["media"] = counter("queued"), seen(lab, "media", "lan")
        wait_for(lambda: seen(lab, "media", "lan") >= window["media"] + 100, timeout=10, interval=0.1,
                 what="the stream to go on")
        window["queued_after"] = counter("queued")

    ffmpeg_stream(lab, tmp_path, 5004, sender="ext", receiver="lan", src=EXT6, dst=LAN6, seconds=SECONDS,
                  during=while_streaming)

    assert window["queued_after"] - window["queued"] <= 2, window
    gw = run.counters("rtp6")
    # The gateway relayed the stream until it was validated; the kernel carried the rest.
    assert OFFLOAD_AFTER <= gw.get("relayed.rtp", 0) < SECONDS * 50 - 100, gw
    # RTCP crossed the gateway through the processor's adjacent rule (its port is no selector's).
    assert gw.get("relayed.rtcp", 0) >= 1, gw
    assert counter("rules.adjacent") >= 1 and counter("rules.redirected_flows") >= 1, processor()["counters"]
    assert counter("flows.offloaded") >= 1 and counter("flows.ipv6.opened") >= 2
    # The hostile port's datagrams never reached lan; the gateway dropped them, unlatched.
    assert seen(lab, "hostile", "lan") == 0
    assert gw.get("dropped.not_latched", 0) >= 1, gw
    assert any("reason=role_taken" in line for line in run.events("refused", "rtp6")), run.events("refused", "rtp6")

    # The gateway's own adjacent rule over IPv6 (adjacent = "gateway", RULE_REQUEST family 6):
    # RTCP from the next port reaches rtp6-gw's 5011, which neither the filter nor a selector names.
    send(lab, EXT6, 43000, 5010, "rtp*3", dst=LAN6)
    wait_for(lambda: run.events("rule.granted", "rtp6-gw"), timeout=5, interval=0.05, what="the gateway's RTCP rule")
    granted = run.events("rule.granted", "rtp6-gw")
    assert any(f"src=[{EXT6}]:43001" in line and f"dst=[{LAN6}]:5011" in line for line in granted), granted
    send(lab, EXT6, 43001, 5011, "rr*1", dst=LAN6)
    wait_for(lambda: run.counters("rtp6-gw").get("relayed.rtcp", 0) >= 1, timeout=5, interval=0.1,
             what="RTCP through the gateway's rule")

    # A flood of new sources on the RTP port: never more bindings than the IPv6 pool has.
    before = processor()
    lab.run("ext", [sys.executable, PEERS, "flood", LAN6, "5004", "40"])
    wait_for(lambda: counter("queued") - before["counters"]["queued"] >= 40, timeout=10, interval=0.1,
             what="the flood to be queued")
    after = processor()["counters"]
    opened = after["flows.ipv6.opened"] - before["counters"]["flows.ipv6.opened"]
    refused = after.get("drop.refused.pool_exhausted", 0) - before["counters"].get("drop.refused.pool_exhausted", 0)
    assert opened + refused == 40 and refused >= 40 - POOL, (opened, refused)
    assert processor()["flows_ipv6"] <= POOL
    assert run.stop() == 0
