"""The control server as gateway kind ``tunnel`` under ``nfgate run``, end to end.

The nat-tunnel lab, with ``pub`` as the router (tests/tunnel/gwmode_harness.py):
``nfgate run`` there steers the service port and the publishable range, TCP
and UDP, from wan to the tunnel gateway in the gateway namespace; the
mediator in ``priv`` reaches it through ``nat``'s masquerade and then the
processor's double NAT; ``nat`` itself is the public client. Nothing here
has a route to 10.77.0.0/24, so whatever reaches ``priv`` went through the
tunnel, and whatever reaches the server went through the processor.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for
from tests.conntrack import fast_conntrack
from tests.tunnel.gwmode_harness import GATEWAY, UNSTEERED, GatewayModeLab
from tests.tunnel.netns_harness import NAT_WAN, PRIV, PUB, SERVICE_PORT

pytestmark = pytest.mark.netns

FILE_SIZE = 12 * 1024 * 1024
HTTP_PORT, HTTP_PUBLIC = 8000, 8080
ECHO_PORT, ECHO_PUBLIC = 9000, 8053
ELSEWHERE = "203.0.113.5/32"  # routed by pub, back out of eth0: not the router's
UDP_CLIENT_PORT = 40053  # one public UDP client, before and after the restart
FIREWALL_SIDE = ipaddress.ip_network("172.31.254.0/28")  # processor.pools.firewall_side (default)
GATEWAY_ADDRESS = "172.31.255.2"  # gateway_link.gateway_address (default)
GATEWAY_ADDRESS6 = "fd6e:6667:6174:ff::2"  # gateway_link.gateway_address6 (default)
FIREWALL_SIDE6 = ipaddress.ip_network("fd6e:6667:6174:fe::/124")  # processor.pools.firewall_side6 (default)
PUB6, PRIV6, NAT_WAN6 = "2001:db8:51::10", "fd77::10", "2001:db8:51::1"
RECOVERY_BOUND = 10.0  # seconds from SIGKILL to a working publication again


# One processor, and two: then the channel's and the public clients' packets
# are steered by their address and the gateway's answers by pool slice, and
# the layer must ask the instance that owns each flow.
@pytest.fixture(scope="module", params=["[0]", "[0, 1]"], ids=["1 queue", "2 queues"])
def gm(request: pytest.FixtureRequest, module_lab_factory) -> Iterator[GatewayModeLab]:
    lab: Lab = module_lab_factory("nat-tunnel")
    gm = GatewayModeLab(lab, queues=request.param)
    try:
        gm.start()
        gm.tl.start_mediator("m1")
        yield gm
    finally:
        gm.cleanup()


def _session(gm: GatewayModeLab) -> dict:
    return gm.tl.wait_connects("m1", 1, timeout=15)["session"]


def test_mediator_connects_through_the_processors_double_nat(gm: GatewayModeLab) -> None:
    session = _session(gm)
    # The server saw the flow's real client (the NAT's address), which the
    # deNAT/reNAT layer told it: the socket itself came from the pool.
    assert session["peer"].startswith(f"{NAT_WAN}:"), session
    flows = gm.ask("flows")
    channel = [f for f in flows if f["proto"] == "tcp" and f["original_dst"] == f"{PUB}:{SERVICE_PORT}"]
    assert len(channel) == 1, flows
    (flow,) = channel
    assert flow["client"] == session["peer"]
    assert ipaddress.ip_address(flow["firewall_side"].split(":")[0]) in FIREWALL_SIDE
    assert (flow["gateway"], flow["ag"]) == (GATEWAY, f"{GATEWAY_ADDRESS}:{gm.listen_port}"), flow
    # Addressed to the router itself, yet never delivered there (policy.input
    # is drop): rewritten in raw, it was forwarded into the gateway namespace.
    listing = gm.tl.listing()
    # The kind takes IPv6: G6:g too (the blind track's IPv6 address, the same port).
    arrive = f"{GATEWAY_ADDRESS}:{gm.listen_port}, [{GATEWAY_ADDRESS6}]:{gm.listen_port}"
    assert listing["frontend"]["listen"] == arrive
    assert listing["frontend"]["counters"] == {}  # nothing unknown, unrouted or failed
    shown = gm.tl.cli("list").stdout
    assert f"gateway {GATEWAY}: steered flows arrive at {arrive}; nothing refused" in shown


def test_published_http_download_is_intact(gm: GatewayModeLab) -> None:
    www = gm.dir / "www"
    www.mkdir()
    blob = os.urandom(FILE_SIZE)
    (www / "big.bin").write_bytes(blob)
    gm.tl._start("priv", ["python3", "-m", "http.server", str(HTTP_PORT), "--bind", PRIV, "--directory", www], "http")
    gm.lab.wait_listening("priv", HTTP_PORT)
    gm.tl.publish("m1", f"{PRIV}:{HTTP_PORT}", HTTP_PUBLIC)
    out = gm.dir / "download.bin"
    result = gm.curl(f"http://{PUB}:{HTTP_PUBLIC}/big.bin", "-o", str(out), "-w", "%{size_download} %{time_total}")
    assert result.returncode == 0, result.stderr + gm.text()[-2000:]
    size, seconds = result.stdout.split()
    assert int(size) == FILE_SIZE
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    print(f"{FILE_SIZE >> 20} MB from priv to nat through nfgate run's tunnel gateway in {float(seconds):.2f} s")
    (pub,) = [p for p in gm.tl.listing()["published"] if p["public"] == HTTP_PUBLIC]
    assert pub["counters"]["bytes_out"] >= FILE_SIZE
    # The server logs the public client's real address, learnt from the
    # deNAT/reNAT layer (its socket's peer is a firewall-side endpoint).
    assert re.search(rf"connection public={HTTP_PUBLIC} client={re.escape(NAT_WAN)}:\d+ ", gm.text()), gm.text()[-2000:]


def test_publishing_a_port_no_selector_brings_is_refused(gm: GatewayModeLab) -> None:
    # m1's mediators entry allows UNSTEERED, but no [[gateway.traffic]] brings
    # it: the gateway said so when it started, and refuses to publish it.
    assert re.search(rf"publish_unsteered .*proto=tcp publishable={UNSTEERED} unsteered={UNSTEERED}", gm.text())
    refused = gm.tl.cli("publish", "m1", "--to", f"{PRIV}:{HTTP_PORT}", "--public", UNSTEERED, check=False)
    assert refused.returncode == 1, refused.stdout
    assert f"tcp port {UNSTEERED} is not in any [[gateway.traffic]] of {GATEWAY}" in refused.stderr, refused.stderr


def test_udp_publish_goes_over_the_udp_channel(gm: GatewayModeLab) -> None:
    echo = gm.tl.udp_echo(ECHO_PORT)
    gm.tl.publish("m1", f"{PRIV}:{ECHO_PORT}", ECHO_PUBLIC, udp=True)
    before = gm.tl.mediator("m1")["counters"]
    result = gm.tl.run_peer("nat", "udp-client", PUB, ECHO_PUBLIC, 30, 2.0, 32, UDP_CLIENT_PORT)
    assert result == {"sent": 30, "received": 30, "extra": 0}
    after = gm.tl.mediator("m1")["counters"]
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "udp_via_channel_out", "udp_via_channel_in", "udp_via_frames_out", "udp_via_frames_in")}
    assert moved == {"udp_via_channel_out": 30, "udp_via_channel_in": 30, "udp_via_frames_out": 0, "udp_via_frames_in": 0}
    # The UDP channel's address as the server sees it is a firewall-side
    # endpoint: its datagrams, too, went through the double NAT.
    channels = [p for p in gm.tl.mediator("m1")["session"]["ports"] if p["state"] == "REDIRECTED"]
    assert channels, gm.tl.mediator("m1")
    assert ipaddress.ip_address(channels[0]["channel"].rpartition(":")[0]) in FIREWALL_SIDE
    assert echo.wait(lambda d: d.get("rx") == 30, what="30 datagrams at the echo")


def test_udp_datagrams_up_to_65507_bytes_cross_the_gateway(gm: GatewayModeLab) -> None:
    """Issue 14 F: datagrams of 4000 bytes and more were dropped as
    drop.malformed.truncated (netfilterqueue copies at most 4016 bytes of a
    queued packet). Each size is a new flow, so its first, queued packet is
    the large one; 65507 bytes do not fit in a UDP channel datagram and
    cross the TCP channel instead."""
    if not any(p.name == f"udp-echo-{ECHO_PORT}" for p in gm.tl.procs):
        gm.tl.udp_echo(ECHO_PORT)
    if not any(p["public"] == ECHO_PUBLIC for p in gm.tl.listing()["published"]):
        gm.tl.publish("m1", f"{PRIV}:{ECHO_PORT}", ECHO_PUBLIC, udp=True)
    before = gm.tl.mediator("m1")["counters"]
    for lport, size in ((40060, 4000), (40061, 8000), (40062, 65507)):
        result = gm.tl.run_peer("nat", "udp-client", PUB, ECHO_PUBLIC, 3, 3.0, size, lport)
        assert result == {"sent": 3, "received": 3, "extra": 0}, (size, result)
    after = gm.tl.mediator("m1")["counters"]
    # The 65507-byte ones, both ways, as DATA frames; the others over the channel.
    assert after.get("udp_via_frames_out", 0) - before.get("udp_via_frames_out", 0) == 3
    assert after.get("udp_via_frames_in", 0) - before.get("udp_via_frames_in", 0) == 3
    for name, stats in gm.ask("status")["processors"].items():
        malformed = {k: v for k, v in stats["counters"].items() if k.startswith("drop.malformed")}
        assert malformed == {}, (name, malformed)


def test_ipv6_mediator_and_public_clients_through_the_double_nat(gm: GatewayModeLab) -> None:
    """Issue 17: the kind takes IPv6. m2 reaches the server at pub's IPv6
    address through nat's NAT66 and the processor's IPv6 binding into G6:g;
    an IPv6 public client (nat) gets an IPv6 private target, TCP and UDP."""
    allow = [{"to": f"{PRIV6}/128", "ports": ["8001", "9001"], "proto": "any", "ops": ["connect", "send"]}]
    m2 = gm.tl.start_mediator("m2", server=PUB6, interfaces=[f"{PRIV}/24", f"{PRIV6}/64"], allow=allow)
    session = gm.tl.wait_connects("m2", 1, timeout=15)["session"]
    assert session["peer"].startswith(f"[{NAT_WAN6}]:"), session  # the real client, from the layer
    (flow,) = [f for f in gm.ask("flows") if f["proto"] == "tcp" and f["original_dst"] == f"[{PUB6}]:{SERVICE_PORT}"]
    assert flow["client"] == session["peer"] and flow["state"][0] == "ipv6", flow
    assert flow["ag"] == f"[{GATEWAY_ADDRESS6}]:{gm.listen_port}", flow
    assert ipaddress.ip_address(flow["firewall_side"].rpartition(":")[0].strip("[]")) in FIREWALL_SIDE6

    www = gm.dir / "www6"
    www.mkdir()
    blob = os.urandom(1 << 20)
    (www / "six.bin").write_bytes(blob)
    http = gm.tl._start("priv", ["python3", "-m", "http.server", "8001", "--bind", PRIV6, "--directory", www], "http6")
    gm.lab.wait_listening("priv", 8001)
    gm.tl.publish("m2", f"[{PRIV6}]:8001", 8081)
    out = gm.dir / "six.bin"
    result = gm.curl(f"http://[{PUB6}]:8081/six.bin", "-o", str(out))
    assert result.returncode == 0, result.stderr + gm.text()[-2000:]
    assert out.read_bytes() == blob
    assert re.search(rf"connection public=8081 client=\[{re.escape(NAT_WAN6)}\]:\d+ to=\[{PRIV6}\]:8001 ", gm.text())

    echo = gm.tl.peer("priv", "udp-echo", PRIV6, 9001, name="udp-echo6")
    echo.wait(lambda d: "listening" in d, what="the IPv6 UDP echo to bind")
    gm.tl.publish("m2", f"[{PRIV6}]:9001", 8054, udp=True)
    assert gm.tl.run_peer("nat", "udp-client", PUB6, 8054, 10, 2.0) == {"sent": 10, "received": 10, "extra": 0}
    counters = gm.tl.mediator("m2")["counters"]
    assert counters["udp_via_channel_in"] == 10 and counters.get("udp_via_frames_in", 0) == 0, counters
    for name, stats in gm.ask("status")["processors"].items():
        assert not {k: v for k, v in stats["counters"].items() if "ipv6" in k and k.startswith(("drop", "passed"))}

    # Leave the module as it was: m1's two publications, m1 alone.
    for proto, public in (("tcp", 8081), ("udp", 8054)):
        gm.tl.cli("unpublish", "m2", "--public", public, *(["--udp"] if proto == "udp" else []))
    for proc in (m2, http, echo):
        proc.stop()


def test_nfgate_status_shows_the_tunnel_gateway(gm: GatewayModeLab) -> None:
    text = gm.nfgate("status").stdout
    line = next((ln for ln in text.splitlines() if ln.startswith(f"gateway-{GATEWAY} ")), "")
    assert line.split()[2:3] == ["running"], text
    assert int(line.split()[1]) == gm.gateway_pid()


@pytest.fixture
def udp_outlives_recovery(gm: GatewayModeLab) -> Iterator[None]:
    """The public UDP client's binding must outlive a restart however long a
    loaded machine takes: conntrack's UDP timeout above the recovery bound
    for one test, then the module's short ones again."""
    longer = int(RECOVERY_BOUND) + 30
    fast_conntrack(gm.lab, "pub", nf_conntrack_udp_timeout=longer, nf_conntrack_udp_timeout_stream=longer)
    yield
    fast_conntrack(gm.lab, "pub")


@pytest.mark.usefixtures("udp_outlives_recovery")
def test_sigkill_restart_mediator_reconnects_and_publications_come_back(gm: GatewayModeLab) -> None:
    state = gm.state / f"tunnel-{GATEWAY}.json"
    saved = {(p["proto"], p["public"]) for p in json.loads(state.read_text())}
    assert saved == {("tcp", HTTP_PUBLIC), ("udp", ECHO_PUBLIC)}
    mediator = next(p for p in gm.tl.procs if p.name == "m1")
    sessions = len(mediator.events("ready"))
    # One exchange now, so the binding is fresh when the kill comes.
    assert gm.tl.run_peer("nat", "udp-client", PUB, ECHO_PUBLIC, 1, 2.0, 32, UDP_CLIENT_PORT)["received"] == 1
    before = gm.processes()
    old = before[f"gateway-{GATEWAY}"]
    killed, killed_wall = time.monotonic(), time.time()
    os.kill(old["pid"], signal.SIGKILL)

    procs = gm.wait_running(RECOVERY_BOUND, not_pid=old["pid"])
    assert procs[f"gateway-{GATEWAY}"]["restarts"] == old["restarts"] + 1
    processors = {n: p["pid"] for n, p in procs.items() if n.startswith("processor-")}
    assert processors == {n: p["pid"] for n, p in before.items() if n.startswith("processor-")}  # never noticed

    def back() -> dict | None:
        listing = gm.tl.listing()
        m1 = next(m for m in listing["mediators"] if m["identity"] == "m1")
        published = {(p["proto"], p["public"]): p["state"] for p in listing["published"]}
        if m1["state"] == "connected" and published == {("tcp", HTTP_PUBLIC): "published", ("udp", ECHO_PUBLIC): "published"}:
            return m1
        return None

    m1 = wait_for(back, timeout=RECOVERY_BOUND, interval=0.1, what="the mediator and its publications back",
                  ignore=(AssertionError,))
    recovered = time.monotonic() - killed
    assert m1["connects"] == 1  # a fresh server process: its first session of m1
    # The same mediator process saw its channel go and made a new one by itself.
    assert mediator.popen.poll() is None
    wait_for(lambda: len(mediator.events("ready")) == sessions + 1 and mediator.events("reconnect"),
             timeout=5, what="the mediator to log its reconnect and its new session")
    result = gm.curl(f"http://{PUB}:{HTTP_PUBLIC}/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
    assert result.returncode == 0 and int(result.stdout) == FILE_SIZE, result.stderr
    # The same public UDP client as before the kill: the processor still holds
    # its binding, which the new process never got a NEW_FLOW for, so the
    # deNAT/reNAT layer finds it with a query.
    assert gm.tl.run_peer("nat", "udp-client", PUB, ECHO_PUBLIC, 5, 2.0, 32, UDP_CLIENT_PORT) == {
        "sent": 5, "received": 5, "extra": 0}
    (flow,) = [f for f in gm.ask("flows") if f["proto"] == "udp" and f["client"] == f"{NAT_WAN}:{UDP_CLIENT_PORT}"]
    assert flow["created"] < killed_wall, flow  # the binding is older than the process that served it
    counters = gm.tl.mediator("m1")["counters"]
    assert (counters.get("udp_via_channel_out"), counters.get("udp_via_frames_out", 0)) == (5, 0), counters
    print(f"tunnel gateway SIGKILLed: mediator and publications back after {recovered:.2f} s")


def test_routed_traffic_on_a_steered_port_stays_in_the_kernel(gm: GatewayModeLab) -> None:
    """Only packets for the router's own addresses are queued for the tunnel:
    a datagram to a steered port of an address pub routes elsewhere goes
    from raw straight to the forward chain (here: its drop policy)."""
    if not gm.lab.run("nat", ["ip", "route", "show", ELSEWHERE]).stdout.strip():
        gm.lab.run("nat", ["ip", "route", "add", ELSEWHERE, "via", PUB])
        gm.lab.run("pub", ["ip", "route", "add", ELSEWHERE, "via", NAT_WAN])
    dropped = gm.forward_dropped()
    result = gm.tl.run_peer("nat", "udp-client", ELSEWHERE.split("/")[0], ECHO_PUBLIC, 3, 0.2)
    assert result["sent"] == 3 and result["received"] == 0
    wait_for(lambda: gm.forward_dropped() >= dropped + 3, timeout=5, what="3 datagrams at the forward policy")
    for name, stats in gm.ask("status")["processors"].items():
        passed = {k: v for k, v in stats["counters"].items() if k.startswith("passed.")}
        assert passed == {}, (name, passed)  # never queued, so never handed back


def test_clean_stop(gm: GatewayModeLab) -> None:
    assert gm.stop() == 0, gm.text()[-2000:]
    assert not os.path.exists(f"/run/netns/{gm.gwns}")
    # The static rules stay; the steering is stopped (fail closed: dropped, never queued).
    saved = gm.lab.run("pub", ["iptables-nft-save"]).stdout
    assert "NFGATE-INPUT" in saved and "NFQUEUE" not in saved, saved
    assert not gm.tl.socket.exists()
