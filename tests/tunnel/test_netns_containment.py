"""Issue 14, on real peers through the lab's masquerading NAT.

- Request-then-RST clients flood a published port while a 100 MB download
  and a UDP echo run through the same mediator: the download is intact, the
  echo loses nothing, and the mediator's session is the same one before
  and after (containment: no outsider can drop the channel).
- With no keepalive setting at all, behind the lab's NAT (UDP mappings
  forgotten after 5 s, established TCP after 10 s), the mediator learns the
  UDP mapping lifetime (keepalive discovery), and after the issue's 60 s of
  idleness (IDLE, part of it on the learnt interval) a UDP redirect answers
  its first datagram and a TCP publication its next request. One test holds
  both idle in the same 60 s.

Bounded for CI: the flood lasts FLOOD seconds (the issue's 30 s reproduced
the failure within about 74 aborted requests, a second or two); the idle
period is polled on the NAT's conntrack table (the UDP channel's mapping
must stay at every poll), and the test ends as soon as it is over.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator

import pytest

from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for
from tests.tunnel.netns_harness import NAT_WAN, PRIV, PUB, SERVICE_PORT, TunnelLab, conntrack, curl

pytestmark = pytest.mark.netns

FLOOD = 8.0  # seconds of request-then-RST clients
FILE_SIZE = 100 * 1024 * 1024
IDLE = 60.0  # seconds idle: the figure for both the UDP redirect and the TCP publication
IDLE_BOUND = 90.0
REPLY = re.compile(rf"^udp\s.*src=\S+ dst={re.escape(NAT_WAN)} sport={SERVICE_PORT} dport=(\d+)", re.M)


@pytest.fixture
def tl(lab_factory) -> Iterator[TunnelLab]:
    lab: Lab = lab_factory("nat-tunnel")
    tl = TunnelLab(lab)
    try:
        # The publication's own idle timeout for a UDP flow (60 s by default,
        # the idle figure) is raised past the idle period: what is
        # tested is that the NAT's mapping is kept, on the same flow.
        tl.start_server(server={"udp_idle_timeout": 2 * IDLE})
        www = tl.dir / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from the private network\n" * 200)
        tl._start("priv", ["python3", "-m", "http.server", "8000", "--bind", PRIV, "--directory", www], "http")
        lab.wait_listening("priv", 8000)
        tl.udp_echo(9000)
        yield tl
    finally:
        tl.cleanup()


def test_rst_flood_neither_drops_the_channel_nor_a_download_nor_a_datagram(tl: TunnelLab) -> None:
    mediator = tl.start_mediator("m1")
    blob = bytes(range(256)) * (FILE_SIZE // 256)
    (tl.dir / "www" / "big.bin").write_bytes(blob)
    tl.publish("m1", f"{PRIV}:8000", 8080)
    tl.publish("m1", f"{PRIV}:9000", 9000, udp=True)
    session = tl.mediator("m1")["session"]["session"]
    flood = tl.peer("pub", "rst-flood", PUB, 8080, FLOOD, name="rst-flood")
    out = tl.dir / "download.bin"
    download = curl(tl.lab, f"http://{PUB}:8080/big.bin", "-o", str(out), timeout=120)
    # One at a time, each waiting for its echo (up to 1 s: late is not lost), while the flood goes on.
    echo = tl.run_peer("pub", "udp-client", PUB, 9000, 400, 1.0, 64, 40100, timeout=FLOOD * 4 + 30)
    result = flood.wait(lambda d: "connections" in d, timeout=FLOOD + 30, what="the flood to end")
    assert download.returncode == 0, download.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert echo["received"] == echo["sent"] and echo["extra"] == 0, echo
    assert result["connections"] > 100, result
    after = tl.mediator("m1")
    assert after["session"]["session"] == session and after["connects"] == 1
    assert not mediator.events("reconnect"), mediator.events("closed")
    print(f"{result['connections']} request-then-RST clients in {FLOOD:g} s; session {session} unchanged")


def test_no_keepalive_setting_survives_the_lab_nat_timeouts(tl: TunnelLab) -> None:
    mediator = tl.start_mediator("m1", protocol={"keepalive_interval": None})
    tl.publish("m1", f"{PRIV}:8000", 8081)
    tl.publish("m1", f"{PRIV}:9000", 9001, udp=True)
    assert curl(tl.lab, f"http://{PUB}:8081/index.html").stdout.startswith("hello from the private network")
    assert tl.run_peer("pub", "udp-client", PUB, 9001, 1, 2.0, 32, 40001)["received"] == 1
    session = tl.mediator("m1")["session"]
    assert session["keepalive"] <= 4.0  # the default, not a test's setting
    (channel,) = [p["channel"] for p in session["ports"] if p["state"] == "REDIRECTED"]
    nat_port = int(channel.rsplit(":", 1)[1])
    started = time.monotonic()
    learned_at: list[float] = []

    def idle_long_enough() -> bool:
        live = {int(m.group(1)) for m in REPLY.finditer(conntrack(tl.lab, "-L"))}
        assert nat_port in live, "the UDP channel's mapping expired"
        if not learned_at and mediator.events("keepalive_learned"):
            learned_at.append(time.monotonic())
        # The 60 s, far past the NAT's UDP (5 s) and TCP (10 s)
        # timeouts, and at least 6 s past the switch to the learnt interval
        # (keepalive discovery takes ~35 s here).
        now = time.monotonic()
        return now - started >= IDLE and bool(learned_at) and now - learned_at[0] >= 6.0

    wait_for(idle_long_enough, timeout=IDLE_BOUND, interval=0.5, what="an idle period past the NAT's timeouts")
    (learned,) = mediator.events("keepalive_learned")
    assert 1.0 <= learned["interval"] < 5.0 and learned["survived"] < 5.0 <= (learned["lost"] or 99), learned
    idle = time.monotonic() - started
    # The first datagram after the idle period is answered: the same client
    # port, so the same flow on the same UDP channel, which was kept.
    assert tl.run_peer("pub", "udp-client", PUB, 9001, 1, 2.0, 32, 40001)["received"] == 1
    assert curl(tl.lab, f"http://{PUB}:8081/index.html").stdout.startswith("hello from the private network")
    (flow,) = [p for p in tl.listing()["published"] if p["public"] == 9001]
    assert flow["counters"]["flows"] == 1, flow
    assert tl.mediator("m1")["connects"] == 1
    print(f"idle {idle:.1f} s; keepalive learned {learned['interval']:.1f} s")
