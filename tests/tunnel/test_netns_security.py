"""Refusals through the real NAT: wrong token, wrong pin, replayed and forged datagrams."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import pytest

from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for
from tests.tunnel.netns_harness import HERE, PRIV, PUB, SERVICE_PORT, TunnelLab

pytestmark = pytest.mark.netns

TYPE_DATA = 1  # tunnel/datagrams.py DatagramType.DATA
REPLAYS = 3


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


def test_wrong_token_is_refused(tl: TunnelLab) -> None:
    wrong = tl.start_mediator("m2", token="not-the-token-of-m2-at-all", wait_ready=False)
    closed = wrong.wait_event("closed", code="AUTH_FAILED")
    assert closed["by_server"] is True
    assert tl.server is not None
    end = tl.server.wait_event("session_end", mediator=None, code="AUTH_FAILED")
    assert "wrong token" in end["reason"]
    assert tl.mediator("m2")["connects"] == 0
    wrong.stop()


def test_server_certificate_not_matching_the_pin_is_refused(tl: TunnelLab) -> None:
    other = tl.cli("keygen", "--cert", tl.dir / "other.crt", "--key", tl.dir / "other.key").stdout.strip()
    assert other != tl.pin
    assert tl.server is not None
    ends_before = len(tl.server.events("session_end"))
    wrong = tl.start_mediator("m2", pin=other, wait_ready=False)
    refusals = lambda: [  # noqa: E731
        d for d in wrong.snapshot() if d.get("event") == "channel_failed" and "does not match the pin" in d["reason"]
    ]
    wait_for(lambda: len(refusals()) >= 2, timeout=10, interval=0.05, what="two refused handshakes")
    assert tl.pin in refusals()[0]["reason"] and other in refusals()[0]["reason"]  # seen vs wanted
    wrong.stop()
    # The token never left: each channel ended before HELLO, so the server
    # closed it for a missing HELLO at most, never for a wrong token.
    ends = tl.server.events("session_end")[ends_before:]
    assert all(e["code"] in (None, "TIMEOUT") for e in ends), ends
    assert tl.mediator("m2")["connects"] == 0


def _inject(tl: TunnelLab, host: str, sport: int, dport: int) -> tuple[object, object]:
    injector = tl._start(host, [sys.executable, HERE / "inject.py", "eth0", sport, dport, TYPE_DATA, REPLAYS], "inject")
    injector.wait(lambda d: d.get("sniffing") is True, what="the injector to sniff")
    return injector, None


def test_replayed_and_forged_datagrams_are_dropped_by_the_server(tl: TunnelLab) -> None:
    echo = tl.udp_echo(9010)
    tl.publish("m1", f"{PRIV}:9010", 9010, udp=True)
    # Warm the flow up so its UDP channel exists before the capture.
    assert tl.run_peer("pub", "udp-client", PUB, 9010, 1, 2.0)["received"] == 1
    before = tl.mediator("m1")
    injector, _ = _inject(tl, "pub", 0, SERVICE_PORT)  # mediator -> server DATA, seen in pub
    result = tl.run_peer("pub", "udp-client", PUB, 9010, 1, 2.0)
    report = injector.wait(lambda d: "replayed" in d, what="the injection")
    assert report["replayed"] == REPLAYS
    # Accepted replays would have reached the public client again: it got one answer only.
    assert result == {"sent": 1, "received": 1, "extra": 0}
    after = tl.mediator("m1")
    dropped = after["session"]["dropped"]
    assert dropped.get("replay", 0) - before["session"]["dropped"].get("replay", 0) == REPLAYS
    assert dropped.get("bad tag", 0) - before["session"]["dropped"].get("bad tag", 0) == 1
    assert tl.listing()["counters"].get("datagrams_unknown_key", 0) >= 1
    assert echo.wait(lambda d: d.get("rx") == 2)  # the echo saw exactly the two real datagrams
    assert not [d for d in echo.snapshot() if d.get("rx", 0) > 2]


def test_replayed_and_forged_datagrams_are_dropped_by_the_mediator(tl: TunnelLab) -> None:
    echo = tl.udp_echo(9011)
    tl.publish("m1", f"{PRIV}:9011", 9011, udp=True)
    assert tl.run_peer("pub", "udp-client", PUB, 9011, 1, 2.0)["received"] == 1
    injector, _ = _inject(tl, "priv", SERVICE_PORT, 0)  # server -> mediator DATA, seen in priv
    result = tl.run_peer("pub", "udp-client", PUB, 9011, 1, 2.0)
    assert injector.wait(lambda d: "replayed" in d, what="the injection")["replayed"] == REPLAYS
    assert result == {"sent": 1, "received": 1, "extra": 0}
    mediator = next(p for p in tl.procs if p.name == "m1")
    mediator.popen.send_signal(signal.SIGUSR1)
    stats = mediator.wait(lambda d: d.get("event") == "stats" and d.get("dropped", {}).get("replay", 0) >= REPLAYS,
                          what="the mediator's drop counters")
    assert stats["dropped"].get("bad tag", 0) >= 1 and stats["dropped"].get("unknown key", 0) >= 1
    echo.wait(lambda d: d.get("rx") == 2)
    assert not [d for d in echo.snapshot() if d.get("rx", 0) > 2], json.dumps(echo.snapshot())
