"""The seed's "maintain channel": keepalives keep the NAT's mappings, and without them they go.

The nat host forgets a UDP mapping after 5 s and an established TCP one
after 10 s (vagrant/topologies/nat-tunnel.json). Two mediators share the
lab: m1 sends keepalives every 2 s, m2 every 600 s (in effect none, and it
does not learn the NAT's lifetime: keepalive discovery is off). Both
publish the same private HTTP and UDP echo services. After an idle period
longer than both timeouts -- measured, not slept: the test polls the NAT's
conntrack table until m2's mappings are gone, and checks at every poll that
m1's are still there -- m1's tunnel and its UDP channel still work and
m2's do not. The second half proves the test measures something.
"""

from __future__ import annotations

import re
import time

import pytest

from firewall.lab.wait import wait_for
from tests.tunnel.netns_harness import NAT_WAN, PRIV, PUB, SERVICE_PORT, TunnelLab, conntrack, curl

pytestmark = [pytest.mark.netns, pytest.mark.slow]

IDLE = 15.0  # seconds: several times the NAT's UDP timeout, 1.5 times its TCP one
IDLE_BOUND = 40.0
REPLY = re.compile(rf"^(tcp|udp)\s.*src=\S+ dst={re.escape(NAT_WAN)} sport={SERVICE_PORT} dport=(\d+)", re.M)


def test_keepalives_keep_the_tunnel_and_its_udp_channel_through_an_idle_nat(lab_factory) -> None:
    lab = lab_factory("nat-tunnel")
    tl = TunnelLab(lab)
    try:
        tl.start_server()
        (tl.dir / "www").mkdir()
        (tl.dir / "www" / "index.html").write_text("hello from the private network\n")
        tl._start("priv", ["python3", "-m", "http.server", "8000", "--bind", PRIV, "--directory", tl.dir / "www"], "http")
        lab.wait_listening("priv", 8000)
        tl.udp_echo(9000)
        tl.start_mediator("m1", protocol={"keepalive_interval": 2.0})
        # No discovery for m2 either: it would find the NAT's 5 s and keep its UDP channel.
        tl.start_mediator("m2", protocol={"keepalive_interval": 600.0, "keepalive_discovery": False})
        for identity, tcp, udp in (("m1", 8081, 9001), ("m2", 8082, 9002)):
            tl.publish(identity, f"{PRIV}:8000", tcp)
            tl.publish(identity, f"{PRIV}:9000", udp, udp=True)
        # Both work before the idle period; each UDP client keeps its source
        # port, so that afterwards it is the same flow on the same channel.
        for tcp, udp, lport in ((8081, 9001, 40001), (8082, 9002, 40002)):
            assert curl(lab, f"http://{PUB}:{tcp}/").stdout == "hello from the private network\n"
            assert tl.run_peer("pub", "udp-client", PUB, udp, 1, 2.0, 32, lport)["received"] == 1

        ports = {}
        for identity in ("m1", "m2"):
            session = tl.mediator(identity)["session"]
            (channel,) = [p["channel"] for p in session["ports"] if p["state"] == "REDIRECTED"]
            ports[identity] = {("tcp", int(session["peer"].rsplit(":", 1)[1])), ("udp", int(channel.rsplit(":", 1)[1]))}

        started = time.monotonic()

        def idle_long_enough() -> bool:
            live = {(m.group(1), int(m.group(2))) for m in REPLY.finditer(conntrack(lab, "-L"))}
            assert ports["m1"] <= live, f"m1's mappings expired despite keepalives: {ports['m1'] - live}"
            return not ports["m2"] & live and time.monotonic() - started >= IDLE

        wait_for(idle_long_enough, timeout=IDLE_BOUND, interval=0.5, what="the NAT to forget m2's mappings")
        print(f"idle for {time.monotonic() - started:.1f} s")

        # UDP first: m2's TCP channel must not be touched before its UDP channel is tried.
        assert tl.run_peer("pub", "udp-client", PUB, 9001, 1, 2.0, 32, 40001)["received"] == 1
        assert tl.run_peer("pub", "udp-client", PUB, 9002, 1, 2.0, 32, 40002)["received"] == 0
        assert curl(lab, f"http://{PUB}:8081/").stdout == "hello from the private network\n"
        broken = curl(lab, f"http://{PUB}:8082/", timeout=10)
        assert broken.returncode != 0, broken.stdout
    finally:
        tl.cleanup()
