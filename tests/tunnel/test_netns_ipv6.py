"""The tunnel over IPv6 through a real masquerading NAT (NAT66), with real peers (issue 17).

The nat-tunnel lab is dual-stack: ``pub`` 198.51.100.10 and 2001:db8:51::10,
``priv`` 10.77.0.10 and fd77::10 behind ``nat``, which masquerades both
families. ``pub`` has no route to either of priv's prefixes, so whatever
reaches ``priv`` went through the tunnel. The server listens on both
families; mediator m1 finds it by a host name that resolves to its IPv6
address only (an ``/etc/netns/<namespace>/hosts`` file, which ``ip netns
exec`` mounts over ``/etc/hosts`` in that namespace), announces an address
of each family, and may reach fd77::10 only. m2 reaches the server over
IPv4 and announces only that address.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from firewall.lab.netns import Lab
from tests.tunnel.netns_harness import PRIV, PUB, TunnelLab, curl

pytestmark = pytest.mark.netns

PUB6, PRIV6, NAT_WAN6 = "2001:db8:51::10", "fd77::10", "2001:db8:51::1"
SERVER_NAME = "tunnel-server.test"  # resolves to PUB6 only, in priv
HTTP_PORT, HTTP_PUBLIC = 8000, 8080
ECHO_PORT, ECHO_PUBLIC = 9000, 9000
ALLOW6 = [
    {"to": f"{PRIV6}/128", "ports": ["8000", "9000-9100"], "proto": "any", "ops": ["connect", "send"]},
    {"to": f"{PRIV}/32", "ports": ["8000", "9000-9100"], "proto": "any", "ops": ["connect", "send"]},
]


@pytest.fixture(scope="module")
def tl(module_lab_factory) -> Iterator[TunnelLab]:
    lab: Lab = module_lab_factory("nat-tunnel")
    hosts = Path("/etc/netns") / lab.ns("priv")
    tl = TunnelLab(lab)
    try:
        hosts.mkdir(parents=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n{PUB6} {SERVER_NAME}\n")
        tl.start_server({"listen": [PUB, PUB6], "public_address": [PUB, PUB6]})
        tl.start_mediator("m1", server=SERVER_NAME, interfaces=[f"{PRIV}/24", f"{PRIV6}/64"], allow=ALLOW6)
        tl.start_mediator("m2", allow=ALLOW6)  # over IPv4, announcing 10.77.0.10/24 only
        yield tl
    finally:
        tl.cleanup()
        shutil.rmtree(hosts, ignore_errors=True)


def test_the_mediator_reaches_the_server_by_a_name_over_ipv6(tl: TunnelLab) -> None:
    assert not tl.lab.ping("pub", PRIV6, count=1, wait=0.5)
    m1 = tl.mediator("m1")["session"]
    # The server saw the channel come from the NAT's IPv6 address (NAT66).
    assert m1["peer"].startswith(f"[{NAT_WAN6}]:"), m1
    assert m1["interfaces"] == [f"{PRIV}/24", f"{PRIV6}/64"]
    assert tl.mediator("m2")["session"]["peer"].startswith("198.51.100.1:")
    shown = tl.cli("list").stdout
    assert f"service {PUB}:7443, [{PUB6}]:7443," in shown
    assert re.search(rf"mediator m1: connected, session \d+ from \[{re.escape(NAT_WAN6)}\]:\d+,", shown), shown
    mediator = next(p for p in tl.procs if p.name == "m1")
    assert mediator.events("ready")[0]["server"] == PUB6


def test_tcp_publish_to_an_ipv6_target_for_clients_of_both_families(tl: TunnelLab) -> None:
    www = tl.dir / "www6"
    www.mkdir()
    blob = os.urandom(2 << 20)
    (www / "blob.bin").write_bytes(blob)
    http = tl._start("priv", ["python3", "-m", "http.server", HTTP_PORT, "--bind", PRIV6, "--directory", www], "http6")
    tl.lab.wait_listening("priv", HTTP_PORT)
    tl.publish("m1", f"[{PRIV6}]:{HTTP_PORT}", HTTP_PUBLIC)
    for host in (f"[{PUB6}]", PUB):
        out = tl.dir / f"blob-{len(host)}.bin"
        result = curl(tl.lab, f"http://{host}:{HTTP_PUBLIC}/blob.bin", "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    # The target saw the mediator's IPv6 address, both times.
    lines = [ln for ln in http.output().splitlines() if '"GET /blob.bin' in ln]
    assert len(lines) == 2 and all(ln.startswith(f"{PRIV6} - - ") for ln in lines), lines
    (pub,) = [p for p in tl.listing()["published"] if p["public"] == HTTP_PUBLIC]
    assert pub["to"] == f"[{PRIV6}]:{HTTP_PORT}" and pub["counters"]["connections"] == 2
    http.stop()


def test_udp_redirect_to_an_ipv6_target_over_the_ipv6_udp_channel(tl: TunnelLab) -> None:
    echo = tl.peer("priv", "udp-echo", PRIV6, ECHO_PORT, name="udp-echo6")
    echo.wait(lambda d: "listening" in d, what="the UDP echo to bind")
    tl.publish("m1", f"[{PRIV6}]:{ECHO_PORT}", ECHO_PUBLIC, udp=True)
    before = tl.mediator("m1")["counters"]
    result = tl.run_peer("pub", "udp-client", PUB6, ECHO_PUBLIC, 30, 2.0)
    assert result == {"sent": 30, "received": 30, "extra": 0}
    after = tl.mediator("m1")["counters"]
    assert after["udp_via_channel_in"] - before.get("udp_via_channel_in", 0) == 30
    assert after.get("udp_via_frames_in", 0) == before.get("udp_via_frames_in", 0)
    # The channel's address is the NAT's IPv6 one, learnt from its datagrams;
    # the target saw the datagrams come from the mediator's IPv6 address.
    ports = tl.mediator("m1")["session"]["ports"]
    channels = [p["channel"] for p in ports if p["state"] == "REDIRECTED"]
    assert channels and all(c.startswith(f"[{NAT_WAN6}]:") for c in channels), ports
    got = echo.wait(lambda d: d.get("rx") == 30, what="30 datagrams at the echo")
    assert got["from"].startswith(f"[{PRIV6}]:"), got


def test_an_ipv6_target_outside_the_allow_list_is_refused_at_publish_time(tl: TunnelLab) -> None:
    refused = tl.cli("publish", "m1", "--to", "[fd77::20]:8000", "--public", 8081, check=False)
    assert refused.returncode == 1
    assert "refused by the mediator: NOT_ALLOWED: connect TCP [fd77::20]:8000 is not allowed" in refused.stderr
    mediator = next(p for p in tl.procs if p.name == "m1")
    mediator.wait_event("refused", op="connect", address="fd77::20", port=8000)
    assert all(p["public"] != 8081 for p in tl.listing()["published"])


def test_an_ipv4_only_mediator_meeting_an_ipv6_target_is_refused_cleanly(tl: TunnelLab) -> None:
    refused = tl.cli("publish", "m2", "--to", f"[{PRIV6}]:{HTTP_PORT}", "--public", 8082, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert (f"mediator m2 announced no IPv6 address (it announced {PRIV}/24), so it cannot reach {PRIV6}"
            in refused.stderr), refused.stderr
    assert all(p["public"] != 8082 for p in tl.listing()["published"])
