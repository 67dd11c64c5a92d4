"""The ftp part of scripts/demo: vsftpd behind the ftp gateway, passive and active, and a bounce refused.

    python -m tests.gateways.ftp_demo PREFIX

Runs in the demo's basic lab (already up under PREFIX, nothing else running
in it): vsftpd in lan behind the router's port forward, `nfgate run` with
the ftp gateway of tests/gateways/ftp_netns.py (the router drops whatever
no rule passes, so each data connection crosses by the one-shot rule the
gateway asked for), curl in ext downloading 20 MB in passive (PASV) and
active (PORT) mode, each checked by sha256. During a third, slowed-down
download `nfgate status` and `nfgate flows` show the live flow. Then a
client asks for a data connection to a third host (the FTP bounce, RFC 2577
section 3) and the gateway's refusal is shown. Prints one line per check;
exits 1 if one was unexpected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.gateways.ftp_netns import EXT, LAN, MB, WAN, FtpRunning, Vsftpd, curl, make_file, sha256

ATTACKS = str(Path(__file__).with_name("ftp_attacks.py"))
SIZE = 20 * MB
SLOW_RATE = "8M"  # bytes per second: 20 MB in some 2.5 s, long enough to look at the live flow
BOUNCE_TO = "198,51,100,99,195,80"  # 198.51.100.99:50000, a host that is not the client


def nfgate(lab: Lab, run: FtpRunning, *args: str) -> str:
    argv = [sys.executable, "-m", "firewall.cli", *args, "-c", str(run.path)]
    return lab.run("router", argv, check=False).stdout


def main(prefix: str) -> int:
    lab = Lab(load_topology("basic"), prefix)
    tmp = Path(tempfile.mkdtemp(prefix="nfgate-ftp-demo-"))
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"   {'ok' if ok else 'UNEXPECTED'}: {what}")
        failures += not ok

    ftpd = Vsftpd(lab, "lan", tmp)
    run = None
    try:
        run = FtpRunning(lab, tmp, "allow")
        digest = make_file(ftpd.pub / "big.bin", SIZE)
        print(f"   vsftpd in lan ({LAN}) serves big.bin, 20 MB, sha256 {digest[:16]}...")
        for mode, name in (("pasv", "passive (PASV)"), ("port", "active (PORT)")):
            out = tmp / f"{mode}.bin"
            res = curl(lab, "ext", WAN, mode, get="big.bin", out=out)
            got = sha256(out) if out.exists() else "nothing"
            check(res.returncode == 0 and got == digest,
                  f"curl in ext, {name}, ftp://{WAN}/pub/big.bin: sha256 {got[:16]}... "
                  f"{'matches' if got == digest else 'DIFFERS'}")
            out.unlink(missing_ok=True)
        granted = run.granted()
        for g in granted[-2:]:
            print(f"   gateway log: rule.granted direction={g.get('direction')} src={g.get('src')} "
                  f"dst={g.get('dst')} mode={g.get('mode')}")
        check(sorted(g.get("direction") for g in granted[-2:]) == ["active", "passive"],
              "one exact, one-shot data rule per transfer, asked for by the gateway")

        # A slowed-down download, to look at the firewall while the flow is live.
        slow = lab.popen("ext", ["curl", "-sS", "--max-time", "60", "--limit-rate", SLOW_RATE, "-o",
                                 str(tmp / "slow.bin"), f"ftp://{WAN}/pub/big.bin"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            flows = wait_for(lambda: [ln for ln in nfgate(lab, run, "flows").splitlines() if EXT in ln],
                             timeout=10, interval=0.1, what="the FTP flow in nfgate flows")
            print("   nfgate status, during a download:")
            for line in nfgate(lab, run, "status").splitlines()[:6]:
                print(f"     {line}")
            # The newest binding is the watched session's; the two before may linger until conntrack ends them.
            print("   nfgate flows, during a download (the newest):")
            print(f"     {flows[-1]}")
            check(any(f"{LAN}:21" in ln for ln in flows),
                  f"the control connection's binding: client {EXT}, server {LAN}:21 behind the port forward")
            slow.wait(timeout=60)
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
        check(slow.returncode == 0 and sha256(tmp / "slow.bin") == digest, "the watched download is intact too")

        got = json.loads(lab.run("ext", [sys.executable, ATTACKS, "client", "replies", WAN, f"PORT {BOUNCE_TO}"],
                                 timeout=60).stdout)
        reply = got["replies"][0]
        check(reply.startswith("501"), f"bounce: PORT {BOUNCE_TO} (198.51.100.99, not the client): "
                                       f"the gateway said '{reply.strip()}'")
        refused = [ln for ln in run.text().splitlines() if "refused.bounce" in ln]
        if refused:
            print(f"   gateway log: {refused[-1][:200]}")
        check(bool(refused), "the gateway logged the bounce, and opened nothing for it")
    finally:
        if run is not None:
            run.stop()
        ftpd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
