"""The tunnel part of scripts/demo: a private web server published through the mediator, and a NAT that forgets.

    python -m tests.tunnel.tunnel_demo PREFIX

Builds the nat-tunnel lab under PREFIX (and removes it at the end): the
control server in pub, a web server and the mediator in priv behind the
masquerading nat. pub has no route to priv, so the page fetched from pub
came through the tunnel. Then `conntrack -F` in nat drops every mapping
(with nf_conntrack_tcp_loose off, the channel's next segments are no longer
translated): the mediator notices by its dead-peer rule, reconnects by
itself, and the same URL answers again, with nobody publishing anything
again (tests/tunnel/test_netns_reconnect.py is the test of it). Prints one
line per check; exits 1 if one was unexpected.
"""

from __future__ import annotations

import sys
import time

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from tests.tunnel.netns_harness import NAT_WAN, PRIV, PUB, TunnelLab, conntrack, curl

KEEPALIVE = 1.0
DEAD_AFTER = 3
RECOVERY_BOUND = KEEPALIVE * DEAD_AFTER + 1.0 + 6.0  # dead-peer time, backoff, handshake
PAGE = "hello from priv, through the tunnel\n"


def main(prefix: str) -> int:
    lab = Lab(load_topology("nat-tunnel"), prefix).up()
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"   {'ok' if ok else 'UNEXPECTED'}: {what}")
        failures += not ok

    tl = TunnelLab(lab)
    try:
        lab.run("nat", ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
        check(not lab.ping("pub", PRIV, count=1, wait=0.5), f"pub ({PUB}) has no way to priv ({PRIV}) but the tunnel")
        tl.start_server()
        www = tl.dir / "www"
        www.mkdir()
        (www / "index.html").write_text(PAGE)
        tl._start("priv", [sys.executable, "-m", "http.server", "8000", "--bind", PRIV, "--directory", www], "http")
        lab.wait_listening("priv", 8000)
        mediator = tl.start_mediator("m1", protocol={"keepalive_interval": KEEPALIVE, "dead_after": DEAD_AFTER})
        tl.publish("m1", f"{PRIV}:8000", 8080)
        first = tl.mediator("m1")
        print(f"   mediator m1 in priv connected out through nat, seen as {first['session'].get('peer', NAT_WAN)}; "
              f"published {PRIV}:8000 as {PUB}:8080")
        got = curl(lab, f"http://{PUB}:8080/")
        check(got.stdout == PAGE, f"curl in pub, http://{PUB}:8080/: '{got.stdout.strip() or got.stderr.strip()}'")

        entries = [ln for ln in conntrack(lab, "-L").splitlines() if "dport=7443" in ln]
        print(f"   nat's conntrack holds the mediator's channel: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}; "
              "conntrack -F in nat")
        conntrack(lab, "-F")
        flushed = time.monotonic()
        closed = mediator.wait_event("closed", timeout=RECOVERY_BOUND)
        print(f"   mediator: closed ({closed.get('code')}), by its own dead-peer rule: {closed.get('by_server') is False}")
        back = tl.wait_connects("m1", 2, timeout=RECOVERY_BOUND)
        recovered = time.monotonic() - flushed
        check(back["session"]["session"] != first["session"]["session"],
              f"the mediator reconnected by itself, a new session {recovered:.1f} s after the flush")
        got = curl(lab, f"http://{PUB}:8080/")
        check(got.stdout == PAGE, f"the same URL answers again, nothing published again: '{got.stdout.strip()}'")
    finally:
        tl.cleanup()
        lab.down()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
