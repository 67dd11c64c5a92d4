"""The rtp part of scripts/demo: examples/office.toml in the lab, a stream to a phone and its RTCP rule.

    python -m tests.gateways.rtp_demo PREFIX

Runs in the demo's basic lab (already up under PREFIX, nothing else
running in it): the office's phone network is added (tests/gateways/
office_netns.py), `nfgate run` starts with the example config, ext sends
half a second of RTP to a phone; the rtp gateway's adjacent rule for RTCP
is shown as the kernel holds it, then the RTCP that used it, and `nfgate
flows` with both flows of the stream. Prints one line per check; exits 1 if
one was unexpected.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.gateways.office_netns import EXT, PHONE, RTP_PORT, OfficeRunning, prepare, send
from tests.gateways.rtp_netns import Sink


def main(prefix: str) -> int:
    lab = Lab(load_topology("basic"), prefix)
    tmp = Path(tempfile.mkdtemp(prefix="nfgate-rtp-demo-"))
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"   {'ok' if ok else 'UNEXPECTED'}: {what}")
        failures += not ok

    prepare(lab)
    run = OfficeRunning(lab, tmp)
    try:
        sink = Sink(lab, RTP_PORT, RTP_PORT + 1)
        try:
            send(lab, 47000, RTP_PORT, "rtp*25@0x7")
            rules = wait_for(lambda: run.rules_for(RTP_PORT + 1), timeout=5, interval=0.05, what="the RTCP rule")
            print("   the rtp gateway's RTCP rule, as the binding table holds it:")
            for rule in rules:
                print(f"     {rule}")
            check(any("47001" in r for r in rules),
                  f"RTCP rule for exactly {EXT}:47001 -> {RTP_PORT + 1}")
            listed = [r for r in run.ask("rules") if r["dst"] == f"{PHONE}:{RTP_PORT + 1}"]
            print("   nfgate flows --rules:")
            for r in listed:
                print(f"     {r['kind']} {r['proto']} {r['src']} -> {r['dst']}  gateway {r['gateway']}  {r['state']}, "
                      f"expires in {r['expires_in']:.1f} s")
            check(any(r["src"] == f"{EXT}:47001" for r in listed),
                  "nfgate flows --rules lists the RTCP rule with its exact source")
            send(lab, 47001, RTP_PORT + 1, "rr*2")
            flows = run.ask("flows")
            got = sink.result()
        finally:
            sink.stop()
        print("   nfgate flows:")
        mine = [f for f in flows if f["client"].startswith(f"{EXT}:4700")]
        for f in mine:
            print(f"     flow={f['flow_id']:#x} gateway={f['gateway']} client={f['client']} "
                  f"original_dst={f['original_dst']} server={f['server']} via={f['firewall_side']}")
        check(sorted(f["original_dst"] for f in mine) == [f"{PHONE}:{RTP_PORT}", f"{PHONE}:{RTP_PORT + 1}"],
              "the stream's RTP flow and the RTCP flow its rule brought, both through the rtp gateway")
        check(len(got[RTP_PORT]) >= 23 and len(got[RTP_PORT + 1]) == 2,
              f"the phone got {len(got[RTP_PORT])} RTP and {len(got[RTP_PORT + 1])} RTCP datagrams (25 and 2 sent)")
        for line in run.events("rule.granted")[:1] + run.events("stream.join")[:1]:
            print(f"   gateway log: {line.split(' ', 1)[1]}")
    finally:
        code = run.stop()
        check(code == 0, "nfgate run (examples/office.toml) stopped cleanly")
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
