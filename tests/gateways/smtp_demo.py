"""The smtp part of scripts/demo: a mail passing the gateway and a smuggling attempt refused.

    python -m tests.gateways.smtp_demo PREFIX

Runs in the demo's basic lab (already up under PREFIX): a private Postfix
in lan, `nfgate run` with the smtp gateways of tests/gateways/smtp_netns.py
in the router, swaks in ext sending one mail, then a raw client trying to
smuggle a second message with a bare-LF end of data. Prints one line per
check; exits 1 if one was unexpected.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from tests.gateways.smtp_netns import EXT, LAN, WAN, Postfix, SmtpRunning, client


def main(prefix: str) -> int:
    lab = Lab(load_topology("basic"), prefix)
    tmp = Path(tempfile.mkdtemp(prefix="nfgate-smtp-demo-"))
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"   {'ok' if ok else 'UNEXPECTED'}: {what}")
        failures += not ok

    pf = Postfix(lab, "lan", tmp, LAN, "example.com")
    run = None
    try:
        run = SmtpRunning(lab, tmp)
        swaks = lab.run("ext", ["swaks", "--server", WAN, "--from", "alice@example.org", "--to", "bob@example.com",
                                "--header", "Subject: hello through the gateway"], check=False, timeout=60)
        lines = swaks.stdout.strip().splitlines() or [swaks.stderr.strip()]
        queued = next((ln.strip() for ln in reversed(lines) if "queued" in ln), lines[-1].strip())
        check(swaks.returncode == 0, f"swaks from ext ({EXT}) -> router:25 -> smtp gateway -> Postfix in lan: {queued}")
        pf.wait_count(1)
        check(pf.count() == 1, "Postfix stored the mail")
        attack = (b"EHLO attacker\r\n", b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n",
                  b"Subject: real\r\n\r\nreal\n.\nMAIL FROM:<ceo@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                  b"Subject: SMUGGLED\r\n\r\nwire the money\r\n.\r\n")
        got = json.loads(client(lab, "ext", "raw", WAN, *(a.hex() for a in attack)).stdout)["received"]
        last = got.strip().splitlines()[-1]
        check(last.startswith("554 5.6.0 Bare CR or LF"), f"smuggling with a bare-LF end of data: the gateway said '{last}'")
        check(pf.count() == 1 and not any(b"SMUGGLED" in m for m in pf.messages()),
              "Postfix (whose defaults a bare LF smuggles past) stored no second message")
        refused = [ln for ln in run.text().splitlines() if "refused.content" in ln]
        if refused:
            print(f"   gateway log: {refused[0][:200]}")
    finally:
        if run is not None:
            run.stop()
        pf.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
