"""Issue 14 D on real peers: per-connection windows (protocol version 3).

- A public client that requests a 100 MB file and never reads it while
  another downloads 100 MB through the same mediator: the other download
  completes, intact, while the stalled one is still stalled (without
  windows the whole channel waited for the stalled reader), and a new UDP
  flow started meanwhile loses nothing at 1000 datagrams/s.
- The issue's fairness figure, "the other's throughput is within 20 % of its
  solo figure", as a ratio of one run's own figures: solo downloads
  alternate with downloads beside a stalled reader, and the fastest
  shared one takes at most 1/0.8 of the fastest solo one's time: at least
  MIN_REPS pairs, more (up to MAX_REPS) while the ratio is short of it, as
  timeit takes more runs when its figures are unsettled. A stalled reader
  that held the others up would slow every shared download, so more pairs
  never hide it; they only let a quieter moment of the machine show. Why the
  fastest of each and not one pair: the machine is shared (CI, other
  tests), and its load only ever adds time to a download, never takes it
  away, so the fastest of a few runs is the least disturbed figure of each
  kind (timeit's rule), and alternating the two kinds exposes both to the
  same load. A single pair, or a figure from another run, moves by tens of
  percent here for reasons that are not the tunnel's. A shared download
  faster than the solo one is no unfairness, so only the lower bound is
  asserted. The download's speed itself is never asserted (the bench's).
- 500 concurrent slow downloads through one mediator all complete, and the
  server's memory stays bounded (each costs at most a window of buffer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from firewall.lab.netns import Lab
from firewall.lab.wait import wait_for
from tests.tunnel.netns_harness import PRIV, PUB, TunnelLab, curl

pytestmark = pytest.mark.netns

BIG = 100 * 1024 * 1024
SLOW_SIZE = 384 * 1024  # more than a window (256 KiB)
SLOW_N = 500
STALL = 40.0  # seconds the stalled reader holds at most: far longer than a download takes
MIN_REPS, MAX_REPS = 3, 8  # pairs of solo and shared downloads, alternated
FAIR = 0.8  # the "within 20 % of its solo figure": shared throughput / solo throughput
WINDOW = 256 * 1024


HTTP_SERVER = """
import functools, http.server, sys
http.server.ThreadingHTTPServer.request_queue_size = 1024
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"""


@pytest.fixture
def tl(lab_factory) -> Iterator[TunnelLab]:
    lab: Lab = lab_factory("nat-tunnel")
    tl = TunnelLab(lab)
    try:
        tl.start_server(server={"request_timeout": 10.0})
        www = tl.dir / "www"
        www.mkdir()
        # http.server with a listen backlog for 500 at once (its own is 5).
        tl._start("priv", ["python3", "-c", HTTP_SERVER, PRIV, "8000", www], "http")
        lab.wait_listening("priv", 8000)
        yield tl
    finally:
        tl.cleanup()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_stalled_reader_holds_up_only_its_own_connection(tl: TunnelLab) -> None:
    blob = bytes(range(256)) * (BIG // 256)
    digest = hashlib.sha256(blob).digest()
    (tl.dir / "www" / "big.bin").write_bytes(blob)
    tl.udp_echo(9000)
    tl.start_mediator("m1")
    tl.publish("m1", f"{PRIV}:8000", 8080)
    tl.publish("m1", f"{PRIV}:9000", 9000, udp=True)
    assert tl.mediator("m1")["session"]["version"] == 5  # windows (version 3 on), streams (4), growing (5)
    out = tl.dir / "download.bin"

    def publication() -> dict:
        (pub,) = [p for p in tl.listing()["published"] if p["public"] == 8080]
        return pub

    def download() -> float:
        """One 100 MB download, intact; its time in seconds (curl's own)."""
        run = curl(tl.lab, f"http://{PUB}:8080/big.bin", "-o", str(out), "-w", "%{time_total}", timeout=120)
        assert run.returncode == 0, run.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == digest
        return float(run.stdout)

    assert tl.server is not None
    rss_before = rss_kib(tl.server.popen.pid)
    solo: list[float] = []
    shared: list[float] = []
    echo: dict = {}
    for rep in range(MAX_REPS):
        wait_for(lambda: publication()["active"] == 0, timeout=15, interval=0.1, what="the last connection to end")
        solo.append(download())
        if rep == 0:
            # Version 5: curl kept up, so its connection's window grew (towards the
            # public client, on the server); the budget is free again once it ended.
            wait_for(lambda: tl.mediator("m1")["session"]["windows"]["grown_bytes"] == 0, timeout=15, interval=0.1,
                     what="the grown window's budget to be free again")
            assert tl.mediator("m1")["session"]["windows"]["grown"] >= 1
        moved = publication()["counters"].get("bytes_out", 0)
        stalled = tl.peer("pub", "tcp-client", PUB, 8080, "send:GET /big.bin HTTP/1.0\r\n\r\n", f"hold:{STALL}",
                          name=f"stalled{rep}")
        # The stalled client's window fills (its socket buffers first): wait until its relay has moved a window.
        wait_for(lambda: publication()["counters"].get("bytes_out", 0) >= moved + WINDOW, timeout=15, interval=0.1,
                 what="the stalled reader's window to fill")
        udp = tl.peer("pub", "udp-rate", PUB, 9000, 1000, 5.0, 64, name="udp") if rep == 0 else None
        shared.append(download())
        # It finished while the stalled reader was still holding its connection.
        assert stalled.popen.poll() is None and not stalled.snapshot(), stalled.output()
        if udp is not None:
            echo = udp.wait(lambda d: "sent" in d, timeout=30, what="the UDP flow to end")
            if not (echo["sent"] >= 4000 and echo["received"] == echo["sent"]):
                # Where they went, for whoever reads the failure: the server's
                # drops by cause, and the mediator's counters.
                (flows,) = [p for p in tl.listing()["published"] if p["public"] == 9000]
                raise AssertionError(f"UDP echo {echo}; publication {flows['counters']}; mediator {tl.mediator('m1')}")
        stalled.stop()
        if rep + 1 >= MIN_REPS and min(solo) / min(shared) >= FAIR:
            break
    grown = rss_kib(tl.server.popen.pid) - rss_before
    # A stalled reader costs the server at most its window (plus the other download's).
    assert grown < 64 * 1024, f"server grew {grown} KiB"
    ratio = min(solo) / min(shared)  # throughput beside the stalled reader / throughput alone
    print(f"100 MB solo {', '.join(f'{t:.2f}' for t in solo)} s, beside a stalled reader "
          f"{', '.join(f'{t:.2f}' for t in shared)} s (fastest: ratio {ratio:.2f}); UDP {echo}; server +{grown} KiB")
    assert ratio >= FAIR, f"beside a stalled reader {ratio:.2f} of the solo throughput (solo {solo}, shared {shared})"
    assert tl.mediator("m1")["connects"] == 1


def test_500_concurrent_slow_downloads_all_complete(tl: TunnelLab) -> None:
    (tl.dir / "www" / "slow.bin").write_bytes(b"s" * SLOW_SIZE)
    tl.start_mediator("m1")
    tl.publish("m1", f"{PRIV}:8000", 8080)
    assert tl.server is not None
    rss_before = rss_kib(tl.server.popen.pid)
    result = tl.run_peer("pub", "slow-downloads", PUB, 8080, SLOW_N, "/slow.bin", SLOW_SIZE, 8192, 0.05,
                         timeout=150)
    grown = rss_kib(tl.server.popen.pid) - rss_before
    print(f"{SLOW_N} slow downloads of {SLOW_SIZE >> 10} KiB: {result}; server +{grown} KiB")
    assert result["complete"] == SLOW_N, result
    (pub,) = [p for p in tl.listing()["published"] if p["public"] == 8080]
    assert pub["counters"].get("refused", 0) == 0, pub
    assert tl.mediator("m1")["connects"] == 1
