"""A NAT that forgets everything breaks the tunnel; the mediator comes back by itself.

``conntrack -F`` in nat drops every mapping. With ``nf_conntrack_tcp_loose``
off -- as in NATs that do not adopt mid-stream TCP -- the channel's next
segments are not translated any more, so the TCP channel is dead for sure.
The mediator notices by its dead-peer rule (no frame for ``dead_after``
keepalive intervals), reconnects with backoff, and the server, which keeps
the publications, serves them again: HTTP and the UDP flow, whose redirect
and UDP channel are re-established on the new session.
"""

from __future__ import annotations

import time

import pytest

from tests.tunnel.netns_harness import PRIV, PUB, TunnelLab, conntrack, curl

pytestmark = [pytest.mark.netns, pytest.mark.slow]

KEEPALIVE = 1.0
DEAD_AFTER = 3
# Dead-peer time, plus the reconnect backoff's maximum, plus a margin for
# the handshake and the first publication request.
RECOVERY_BOUND = KEEPALIVE * DEAD_AFTER + 1.0 + 6.0


def test_conntrack_flush_breaks_the_tunnel_and_the_mediator_reconnects(lab_factory) -> None:
    lab = lab_factory("nat-tunnel")
    lab.run("nat", ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
    tl = TunnelLab(lab)
    try:
        tl.start_server()
        (tl.dir / "www").mkdir()
        (tl.dir / "www" / "index.html").write_text("still here\n")
        tl._start("priv", ["python3", "-m", "http.server", "8000", "--bind", PRIV, "--directory", tl.dir / "www"], "http")
        lab.wait_listening("priv", 8000)
        echo = tl.udp_echo(9000)
        mediator = tl.start_mediator("m1", protocol={"keepalive_interval": KEEPALIVE, "dead_after": DEAD_AFTER})
        tl.publish("m1", f"{PRIV}:8000", 8080)
        tl.publish("m1", f"{PRIV}:9000", 9000, udp=True)
        assert curl(lab, f"http://{PUB}:8080/").stdout == "still here\n"
        assert tl.run_peer("pub", "udp-client", PUB, 9000, 1, 2.0, 32, 40009)["received"] == 1
        first = tl.mediator("m1")["session"]["session"]

        conntrack(lab, "-F")
        flushed = time.monotonic()
        closed = mediator.wait_event("closed", timeout=RECOVERY_BOUND, code="TIMEOUT")
        assert closed["by_server"] is False  # the mediator's own dead-peer rule fired
        back = tl.wait_connects("m1", 2, timeout=RECOVERY_BOUND)
        assert back["session"]["session"] != first
        # The publications are the server's: nobody re-publishes anything.
        assert curl(lab, f"http://{PUB}:8080/").stdout == "still here\n"
        # The live UDP flow got a new redirect and UDP channel on the new session.
        assert tl.run_peer("pub", "udp-client", PUB, 9000, 1, 2.0, 32, 40009)["received"] == 1
        recovered = time.monotonic() - flushed
        print(f"recovered {recovered:.1f} s after the flush")
        assert recovered < RECOVERY_BOUND
        session = tl.mediator("m1")["session"]
        assert [p for p in session["ports"] if p["state"] == "REDIRECTED" and "channel" in p]
        assert echo.snapshot()[-1]["rx"] == 2
    finally:
        tl.cleanup()
