"""data_mode = "active" under `nfgate run` with real peers: passive clients reach active-only servers (issue 16, item 5).

vsftpd with ``pasv_enable=NO`` (it answers PASV and EPSV with 500) in lan
behind the port forward and in ext behind masquerade. Through the gateway
with ``data_mode = "active"``, curl in passive mode (EPSV and PASV) moves
files both ways, byte-identical: the gateway sends the server a PORT, and
joins the server's data connection with the client's, both redirected into
it. curl in active mode (PORT) is passed on as it is. The fourth case, an
active client and a passive-only server, is not offered: docs/ftp.md says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.ftp_netns import EXT, LAN, MB, WAN, FtpRunning, Vsftpd, curl, make_file, sha256

pytestmark = pytest.mark.netns

ACTIVE_ONLY = "pasv_enable=NO\n"
SIZE = 4 * MB


def test_passive_clients_reach_active_only_servers_in_both_directions(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    inbound = Vsftpd(lab, "lan", tmp_path, options=ACTIVE_ONLY)
    outbound = Vsftpd(lab, "ext", tmp_path, listen_address=EXT, options=ACTIVE_ONLY)
    run = FtpRunning(lab, tmp_path, "allow", settings='data_mode = "active"\n')
    try:
        wait_for(lambda: "rules" in run.ask("status")["processors"]["processor-0"], timeout=10,
                 what="the processor to answer")
        # The servers refuse passive mode: without the gateway's translation a passive client fails
        # (here on the server's own host), an active one does not.
        make_file(inbound.pub / "probe.bin", 1024)
        for mode, works in (("epsv", False), ("pasv", False), ("port", True)):
            probe = curl(lab, "lan", LAN, mode, get="probe.bin", out=tmp_path / "probe.bin", timeout=10)
            assert (probe.returncode == 0) is works, (mode, probe.stderr)
        up = tmp_path / "up.bin"
        up_digest = make_file(up, SIZE)
        failures = []
        for direction, host, server, ftpd in (("in", "ext", WAN, inbound), ("out", "lan", EXT, outbound)):
            digest = make_file(ftpd.pub / "big.bin", SIZE)
            for mode in ("epsv", "pasv", "port"):  # the last: an active client, kept as it is
                got = tmp_path / f"{direction}-{mode}.bin"
                res = curl(lab, host, server, mode, get="big.bin", out=got)
                if res.returncode != 0 or sha256(got) != digest:
                    failures.append(f"{direction} {mode} get: {res.returncode} {res.stderr[-300:]}")
                res = curl(lab, host, server, mode, put=up)
                stored = ftpd.pub / up.name
                if res.returncode != 0 or not stored.exists() or sha256(stored) != up_digest:
                    failures.append(f"{direction} {mode} put: {res.returncode} {res.stderr[-300:]}")
                stored.unlink(missing_ok=True)
        text = run.text()
        assert not failures, "\n".join(failures) + "\n" + text[-3000:]
        # Four passive sessions translated (EPSV and PASV, get and put) in each direction, each data
        # connection joined in the gateway; the active ones were not.
        assert text.count(" data.translated ") == 8, text[-3000:]
        assert text.count(" translated=True") == 8, text[-3000:]
        wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left")
    finally:
        run.stop()
        inbound.stop()
        outbound.stop()
