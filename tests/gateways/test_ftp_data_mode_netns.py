"""data_mode = "active" under `nfgate run` with real peers: passive clients reach active-only servers (issue 16, item 5).

vsftpd with ``pasv_enable=NO`` (it answers PASV and EPSV with 500) in lan
behind the port forward and in ext behind masquerade. Through the gateway
with ``data_mode = "active"``, curl in passive mode (EPSV and PASV) moves
files both ways, byte-identical: the gateway sends the server a PORT, and
joins the server's data connection with the client's, both redirected into
it. curl in active mode (PORT) is passed on as it is.

The fourth case, ``data_mode = "passive"``: vsftpd with ``port_enable=NO``
(it answers PORT and EPRT with 500); curl (PORT, EPRT) and lftp in active
mode move files both ways, byte-identical: the gateway sends the server a
PASV and opens both data connections itself (ORIGINATE rules). A PORT for a
third host or a low port is still refused, and a client that never accepts
its data connection ends it by timeout, leaving no rule behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.ftp_netns import EXT, EXT2, LAN, MB, WAN, FtpRunning, Vsftpd, curl, lftp, make_file, sha256

pytestmark = pytest.mark.netns

ACTIVE_ONLY = "pasv_enable=NO\n"
PASSIVE_ONLY = "port_enable=NO\naccept_timeout=8\n"  # accept_timeout: the never-accepting client's RETR
ATTACKS = str(Path(__file__).with_name("ftp_attacks.py"))
SIZE = 4 * MB


def _matrix(lab: Any, tmp_path: Path, inbound: Vsftpd, outbound: Vsftpd, refused: tuple[str, ...],
            modes: tuple[str, ...]) -> list[str]:
    """The servers refuse the ``refused`` data modes: without the gateway's translation such a
    client fails (here on the server's own host), one in the last of ``modes`` does not. Then
    every mode in ``modes`` gets and puts SIZE bytes through the gateway, in and out (the last
    mode is kept as it is); returns what failed."""
    make_file(inbound.pub / "probe.bin", 1024)
    for mode, works in [*((m, False) for m in refused), (modes[-1], True)]:
        probe = curl(lab, "lan", LAN, mode, get="probe.bin", out=tmp_path / "probe.bin", timeout=10)
        assert (probe.returncode == 0) is works, (mode, probe.stderr)
    up = tmp_path / "up.bin"
    up_digest = make_file(up, SIZE)
    failures = []
    for direction, host, server, ftpd in (("in", "ext", WAN, inbound), ("out", "lan", EXT, outbound)):
        digest = make_file(ftpd.pub / "big.bin", SIZE)
        for mode in modes:
            got = tmp_path / f"{direction}-{mode}.bin"
            res = curl(lab, host, server, mode, get="big.bin", out=got)
            if res.returncode != 0 or sha256(got) != digest:
                failures.append(f"{direction} {mode} get: {res.returncode} {res.stderr[-300:]}")
            res = curl(lab, host, server, mode, put=up)
            stored = ftpd.pub / up.name
            if res.returncode != 0 or not stored.exists() or sha256(stored) != up_digest:
                failures.append(f"{direction} {mode} put: {res.returncode} {res.stderr[-300:]}")
            stored.unlink(missing_ok=True)
    return failures


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
        failures = _matrix(lab, tmp_path, inbound, outbound, refused=("epsv", "pasv"), modes=("epsv", "pasv", "port"))
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


def _replies(lab: Any, host: str, server: str, *lines: str) -> list[str]:
    got = lab.run(host, [sys.executable, ATTACKS, "client", "replies", server, *lines], check=False, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    return json.loads(got.stdout)["replies"]


def test_active_clients_reach_passive_only_servers_in_both_directions(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    inbound = Vsftpd(lab, "lan", tmp_path, options=PASSIVE_ONLY)
    outbound = Vsftpd(lab, "ext", tmp_path, listen_address=EXT, options=PASSIVE_ONLY)
    run = FtpRunning(lab, tmp_path, "allow", settings='data_mode = "passive"\n')
    try:
        wait_for(lambda: "rules" in run.ask("status")["processors"]["processor-0"], timeout=10,
                 what="the processor to answer")
        # The servers refuse active mode: without the gateway's translation an active client fails
        # (here on the server's own host), a passive one does not.
        failures = _matrix(lab, tmp_path, inbound, outbound, refused=("port", "eprt"), modes=("port", "eprt", "epsv"))
        got = tmp_path / "lftp.bin"
        res = lftp(lab, "ext", WAN, f"get pub/big.bin -o {got}", passive=False)
        if res.returncode != 0 or sha256(got) != sha256(inbound.pub / "big.bin"):
            failures.append(f"in lftp active get: {res.returncode} {res.stderr[-300:]}")
        text = run.text()
        assert not failures, "\n".join(failures) + "\n" + text[-3000:]
        # PORT and EPRT, get and put, in each direction, and lftp's PORT: nine translated, each pair of
        # data connections opened by the gateway; the passive ones were not translated.
        assert text.count(" data.translated ") == 9, text[-3000:]
        assert text.count(" opened=True") == 9, text[-3000:]
        wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left")

        # Hostile clients: a PORT for a third host and one for a low port are refused as before.
        replies = _replies(lab, "ext", WAN, f"PORT {EXT2.replace('.', ',')},200,10", f"PORT {EXT.replace('.', ',')},0,21")
        assert [r[:4] for r in replies] == ["501 ", "501 "], replies
        # A client that never accepts its data connection (its host drops the SYN): the gateway
        # gives up after data_rule_ttl, and no rule is left behind.
        lab.run("ext", ["nft", "add table ip t; add chain ip t in { type filter hook input priority 0; }; "
                        "add rule ip t in tcp dport 40000 drop"])
        got = lab.run("ext", [sys.executable, ATTACKS, "client", "never-accept", WAN, EXT, "40000"], check=False, timeout=60)
        assert got.returncode == 0, got.stdout + got.stderr
        codes = json.loads(got.stdout)["codes"]
        # 200 once both rules are granted; the gateway waits for the client's side (connect_timeout,
        # at most half of data_rule_ttl: 5 s) and never opens the server's, so vsftpd fails the RETR
        # after its accept_timeout (425): nothing was delivered, and the server says so.
        assert codes[0] == "200" and codes[-1] == "425", codes
        assert "reason=connect_failed" in run.text() and f"client={EXT}:40000" in run.text(), run.text()[-2000:]
        assert "waited=client" in run.text(), run.text()[-2000:]
        # Its SYN left the router from S' (W), what the client addressed: conntrack's reply tuple
        # (the client's answer would come back to W) says so, and the gateway's own port was kept.
        (entry,) = [line for line in run.conntrack(40000) if "src=172.31.255.2 " in line]
        assert f"src={EXT} dst={WAN} sport=40000 " in entry, entry
        wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left")
    finally:
        run.stop()
        inbound.stop()
        outbound.stop()
