"""The seed's help-desk case and the relays, through a real masquerading NAT.

One control server in ``pub``, one mediator in ``priv`` behind ``nat``;
``pub`` has no route to 10.77.0.0/24, so everything that reaches ``priv``
went through the tunnel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from firewall.lab.netns import Lab
from tests.tunnel.netns_harness import PRIV, PUB, TunnelLab, curl

pytestmark = pytest.mark.netns

FILE_SIZE = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def tl(module_lab_factory) -> Iterator[TunnelLab]:
    lab: Lab = module_lab_factory("nat-tunnel")
    tl = TunnelLab(lab)
    try:
        tl.start_server()
        tl.start_mediator("m1")
        yield tl
    finally:
        tl.cleanup()


def test_pub_cannot_reach_priv_without_the_tunnel(tl: TunnelLab) -> None:
    assert not tl.lab.ping("pub", PRIV, count=1, wait=0.5)


def test_help_desk_http_download_is_intact(tl: TunnelLab) -> None:
    """The seed's help service: a technician in the public network reaches
    an HTTP server in the private one, which nobody configured a route for."""
    www = tl.dir / "www"
    www.mkdir()
    blob = bytes(range(256)) * (FILE_SIZE // 256)
    (www / "big.bin").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    http = tl._start("priv", ["python3", "-m", "http.server", "8000", "--bind", PRIV, "--directory", www], "http")
    tl.lab.wait_listening("priv", 8000)
    tl.publish("m1", f"{PRIV}:8000", 8080)
    out = tl.dir / "download.bin"
    result = curl(tl.lab, f"http://{PUB}:8080/big.bin", "-o", str(out), "-w", "%{size_download} %{time_total}")
    assert result.returncode == 0, result.stderr
    size, seconds = result.stdout.split()
    assert int(size) == FILE_SIZE
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    print(f"50 MB through the tunnel in {float(seconds):.2f} s")
    listing = tl.listing()
    (pub,) = [p for p in listing["published"] if p["public"] == 8080]
    assert pub["counters"]["bytes_out"] >= FILE_SIZE
    http.stop()


def test_udp_publish_goes_over_the_udp_channel(tl: TunnelLab) -> None:
    echo = tl.udp_echo(9000)
    tl.publish("m1", f"{PRIV}:9000", 9000, udp=True)
    before = tl.mediator("m1")["counters"]
    result = tl.run_peer("pub", "udp-client", PUB, 9000, 50, 2.0)
    assert result == {"sent": 50, "received": 50, "extra": 0}
    after = tl.mediator("m1")["counters"]
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "udp_via_channel_out", "udp_via_channel_in", "udp_via_frames_out", "udp_via_frames_in")}
    # Every datagram went over the UDP channel, none as a DATA frame on TCP.
    assert moved == {"udp_via_channel_out": 50, "udp_via_channel_in": 50, "udp_via_frames_out": 0, "udp_via_frames_in": 0}
    session = tl.mediator("m1")["session"]
    channels = [p for p in session["ports"] if p["state"] == "REDIRECTED"]
    assert channels and channels[0]["channel"].startswith("198.51.100.1:")  # the NAT's address, learnt from datagrams
    assert len(echo.wait(lambda d: d.get("rx") == 50, what="50 datagrams at the echo")) > 0


@pytest.mark.parametrize(
    ("case", "client_steps", "server_steps", "client_end", "server_end"),
    [
        # The public client half-closes; the private server still answers, then closes.
        ("client FIN", ["send:ping", "shut", "recv-eof"], ["recv-eof", "send:pong", "close"],
         {"got": "pong", "end": "eof"}, {"got": "ping", "end": "eof"}),
        # The private server half-closes first; the client still sends, then closes.
        ("server FIN", ["recv-eof", "send:bye", "close"], ["send:banner", "shut", "recv-eof"],
         {"got": "banner", "end": "eof"}, {"got": "bye", "end": "eof"}),
        # The private server resets: the public client sees the reset.
        ("server RST", ["send:ping", "recv-eof"], ["recv:4", "rst"],
         {"got": "", "end": "reset"}, {"got": "ping", "end": "reset-sent"}),
        # The public client resets: the private server sees the reset.
        ("client RST", ["send:ping", "recv:3", "rst"], ["recv:4", "send:ack", "recv-eof"],
         {"got": "ack", "end": "reset-sent"}, {"got": "ping", "end": "reset"}),
    ],
)
def test_fin_and_rst_are_relayed_both_ways(
    tl: TunnelLab, case: str, client_steps: list[str], server_steps: list[str],
    client_end: dict[str, str], server_end: dict[str, str],
) -> None:
    port = 9050 + ["client FIN", "server FIN", "server RST", "client RST"].index(case)
    server = tl.peer("priv", "tcp-serve", PRIV, port, *server_steps, name=f"tcp-serve-{port}")
    server.wait(lambda d: "listening" in d, what="the private server to listen")
    tl.publish("m1", f"{PRIV}:{port}", port)
    client = tl.run_peer("pub", "tcp-client", PUB, port, *client_steps)
    result = server.wait(lambda d: "end" in d, what="the private server's end")
    assert client == client_end, case
    assert result == server_end, case


def test_connect_outside_the_allow_list_is_refused_and_logged(tl: TunnelLab) -> None:
    opened = json.loads(tl.cli("open", "m1", f"{PRIV}:0", "--json").stdout)
    refused = tl.cli("connect", "m1", opened["port_id"], "10.77.0.1:22", check=False)
    assert refused.returncode == 1
    assert "NOT_ALLOWED" in refused.stderr and refused.stderr.count("\n") == 1
    mediator = next(p for p in tl.procs if p.name == "m1")
    line = mediator.wait_event("refused", op="connect", address="10.77.0.1", port=22)
    assert line["level"] == "warning"
    tl.cli("close", "m1", opened["port_id"])


def test_mandatory_port_already_in_use_is_an_error_code(tl: TunnelLab) -> None:
    busy = tl.peer("priv", "tcp-serve", PRIV, 9099, "recv-eof", name="busy")
    busy.wait(lambda d: "listening" in d, what="the port to be taken")
    taken = tl.cli("open", "m1", f"{PRIV}:9099", "--mandatory", check=False)
    assert taken.returncode == 1 and "PORT_IN_USE" in taken.stderr
    desired = json.loads(tl.cli("open", "m1", f"{PRIV}:9099", "--json").stdout)
    assert desired["port"] > 9099  # a desired port moves up to the first free one
    tl.cli("close", "m1", desired["port_id"])
    busy.stop()
