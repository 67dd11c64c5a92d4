"""The ftp gateway over IPv6 in the dual lab, with real peers (issue 17; RFC 2428).

ext (2001:db8:2::10) - router - lan (fd00:1::10), IPv6 routed both ways (ext
is given a route to lan's ULA through the router: no NAT66, but for the last
two tests, which have nat.masquerade6 and no such route). vsftpd listens on
IPv6 in lan (inbound sessions) and in ext (outbound); curl and lftp in both data modes RFC 2428 has (EPSV,
EPRT), get and put, through the gateway; the router drops what no rule
passes, so every data connection crossed by the dynamic rule the gateway
asked for, in the IPv6 binding table. vsftpd's log shows the client's own
IPv6 address. Then the hostile cases: PORT, PASV and an EPRT of the other
family refused by the gateway, an EPRT naming a third host refused, a data
connection from another address or a second one from another port dropped.
A second `nfgate run` covers inspect mode (REDIRECT) with both data_mode
translations (paired REDIRECTs, ORIGINATEs). Then an outbound session behind
masquerade6, and an inbound one through an IPv6 port forward (ext -> the
router's 2001:db8:2::1:21 -> lan's fd00:1::10:21) into the gateway, with
mask_private_addresses on lan's greeting.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.test_ipv6_netns import ZONES6, no_tentative_addresses
from tests.gateways.ftp_netns import MB, FtpRunning, Vsftpd, curl, lftp, make_file, sha256
from tests.labconfig import RUN

pytestmark = pytest.mark.netns

EXT6, EXT6_2, LAN6, ROUTER6 = "2001:db8:2::10", "2001:db8:2::11", "fd00:1::10", "2001:db8:2::1"
ATTACKS = str(Path(__file__).with_name("ftp_attacks.py"))
SIZE = 2 * MB

RULES = """
[[rule]]
name = "ftp-in"
from = "wan"
to = "lan"
proto = "tcp"
ports = 21

[[rule]]
name = "ftp-out"
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[processor]
queues = [0]
fail_mode = "closed"
""" + RUN

CONFIG6 = ZONES6 + RULES + """
[[gateway]]
name = "ftp"
kind = "ftp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[gateway.settings]
data_channel = "{data_channel}"
data_rule_ttl = 10
"""

# Inspect mode with both translations: inbound sessions with data_mode active (a client's EPSV
# reaches the server as EPRT: two REDIRECTs joined), outbound with data_mode passive (a client's
# EPRT reaches it as EPSV: two ORIGINATEs the gateway opens).
MODES6 = ZONES6 + RULES + """
[[gateway]]
name = "ftpin"
kind = "ftp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21

[gateway.settings]
data_channel = "{data_channel}"
data_mode = "active"
data_rule_ttl = 10

[[gateway]]
name = "ftpout"
kind = "ftp"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[gateway.settings]
data_channel = "{data_channel}"
data_mode = "passive"
data_rule_ttl = 10
"""


def vsftpd6(lab: Any, host: str, tmp: Path, banner: str = "") -> Vsftpd:
    """vsftpd on IPv6 (listen_ipv6 takes the place of listen), logging each client's address."""
    return Vsftpd(lab, host, tmp, banner=banner, options=f"listen=NO\nlisten_ipv6=YES\nxferlog_enable=YES\n"
                                          f"vsftpd_log_file={tmp / f'xfer-{host}.log'}\n")


def rig6(lab: Any, tmp: Path, config: str, data_channel: str, workers: int = 1, banner: str = "") -> SimpleNamespace:
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    # A third host on the wan side; deprecated, so that ext never picks it as a source itself.
    lab.run("ext", ["ip", "-6", "address", "add", f"{EXT6_2}/64", "dev", "eth0", "nodad", "preferred_lft", "0"])
    r = SimpleNamespace(lab=lab, tmp=tmp, inbound=vsftpd6(lab, "lan", tmp, banner), outbound=None, run=None)
    try:
        r.outbound = vsftpd6(lab, "ext", tmp)
        r.run = FtpRunning(lab, tmp, data_channel, config=config, workers=workers)
        wait_for(lambda: "rules" in r.run.ask("status")["processors"]["processor-0"], timeout=10,
                 what="the processor to answer")
    except BaseException:
        unrig6(r)
        raise
    return r


def unrig6(r: SimpleNamespace) -> None:
    for part in (r.run, r.inbound, r.outbound):
        if part is not None:
            part.stop()


@pytest.fixture(scope="module")
def allow6(module_lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    r = rig6(module_lab_factory("dual"), tmp_path_factory.mktemp("ftp6"), CONFIG6, "allow")
    try:
        yield r
    finally:
        unrig6(r)


def transfers(r: SimpleNamespace, cases: list[tuple[str, str, str]], inbound_server: str = LAN6,
              outbound: bool = True) -> list[str]:
    """(tool, mode, get|put) in both directions over IPv6 (or inbound only), SIZE bytes each; what failed.
    ``inbound_server``: the address ext's clients connect to (the router's, through a forward)."""
    up = r.tmp / "up.bin"
    up_digest = make_file(up, SIZE)
    failures = []
    directions = [("in", "ext", inbound_server, r.inbound)] + ([("out", "lan", EXT6, r.outbound)] if outbound else [])
    for direction, host, server, ftpd in directions:
        digest = make_file(ftpd.pub / "big.bin", SIZE)
        for tool, mode, op in cases:
            tag = f"{direction}-{tool}-{mode}-{op}"
            got, stored = r.tmp / f"{tag}.bin", ftpd.pub / f"{tag}.bin"
            if tool == "curl":
                res = curl(r.lab, host, f"[{server}]", mode, get="big.bin", out=got) if op == "get" else curl(
                    r.lab, host, f"[{server}]", mode, put=up)
                stored = ftpd.pub / up.name
            else:
                cmd = f"get pub/big.bin -o {got}" if op == "get" else f"put {up} -o pub/{stored.name}"
                res = lftp(r.lab, host, f"[{server}]", cmd, passive=mode == "passive")
            ok = (got.exists() and sha256(got) == digest) if op == "get" else (stored.exists() and sha256(stored) == up_digest)
            got.unlink(missing_ok=True)
            stored.unlink(missing_ok=True)
            if res.returncode != 0 or not ok:
                failures.append(f"{tag}: exit {res.returncode}, intact {ok}: {res.stdout[-300:]} {res.stderr[-300:]}")
    return failures


def test_curl_and_lftp_over_ipv6_with_epsv_and_eprt_in_both_directions(allow6: SimpleNamespace) -> None:
    """Allow mode: every data connection is an ALLOW in the IPv6 table, which the kernel carries;
    the servers see the clients' own IPv6 addresses; nothing is left after the sessions."""
    run = allow6.run
    cases = [("curl", mode, op) for mode in ("epsv", "eprt") for op in ("get", "put")] + \
        [("lftp", mode, op) for mode in ("passive", "active") for op in ("get", "put")]
    failures = transfers(allow6, cases)
    assert not failures, "\n".join(failures) + "\n" + run.text()[-3000:]
    granted = run.granted()
    assert {g["mode"] for g in granted} == {"ALLOW"} and len(granted) == 2 * len(cases), granted
    assert any(g["direction"] == "passive" and g["dst"].startswith(f"[{LAN6}]:") for g in granted), granted
    assert any(g["direction"] == "active" and g["dst"].startswith(f"[{EXT6}]:") for g in granted), granted
    counters = run.ask("status")["processors"]["processor-0"]["counters"]
    assert counters["rules.allowed_flows"] == 2 * len(cases) and counters["flows.ipv6.opened"] == 2 * len(cases)
    # vsftpd's log: the client's own IPv6 address, in each direction.
    for host, client in (("lan", EXT6), ("ext", LAN6)):
        log = (allow6.tmp / f"xfer-{host}.log").read_text()
        assert f'CONNECT: Client "{client}"' in log, log[-2000:]
        assert re.search(rf'OK (DOWNLOAD|UPLOAD): Client "{re.escape(client)}"', log), log[-2000:]
    wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left in the processor or either table")


def attack(r: SimpleNamespace, host: str, case: str, server: str, *args: str) -> dict[str, Any]:
    got = r.lab.run(host, [sys.executable, ATTACKS, "client", case, server, *args], check=False, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    return json.loads(got.stdout)


def test_ipv4_data_commands_and_a_bounce_are_refused_over_ipv6(allow6: SimpleNamespace) -> None:
    """PORT, PASV and EPRT |1| cannot name an IPv6 data address: the gateway answers 522 itself; an
    EPRT naming a third host (or the server) is the bounce, 501. None reaches the processor."""
    run = allow6.run
    before = run.ask("status")["processors"]["processor-0"]["counters"].get("rules.requests", 0)
    got = attack(allow6, "ext", "replies", LAN6, "PORT 203,0,113,10,195,80", "PASV", "EPRT |1|203.0.113.10|50000|",
                 "EPSV 1", f"EPRT |2|{EXT6_2}|50000|", f"EPRT |2|{LAN6}|50000|", "NOOP")
    codes = [reply[:3] for reply in got["replies"]]
    assert codes == ["522", "522", "522", "522", "501", "501", "200"], got
    assert run.ask("status")["processors"]["processor-0"]["counters"].get("rules.requests", 0) == before
    text = run.text()
    assert "refused.family" in text and "refused.bounce" in text
    wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left")


def test_a_data_connection_from_elsewhere_is_dropped_over_ipv6(allow6: SimpleNamespace) -> None:
    """The EPSV rule is exact and one-shot: a connection from another address of the client's host is
    dropped, the client's own gets the file; a second connection from another port is dropped."""
    digest = make_file(allow6.inbound.pub / "small.bin", 256 * 1024)
    got = attack(allow6, "ext", "third-host", LAN6, EXT6, EXT6_2)
    assert got["pasv"].startswith("229 ") and got["intruder_connected"] is False, got
    assert got["client_connected"] is True and got["sha256"] == digest, got
    got = attack(allow6, "ext", "second-connection", LAN6, EXT6)
    assert got["client_connected"] is True and got["intruder_connected"] is False, got
    assert got["sha256"] == digest and got["done"].startswith("226"), got
    assert run_counter(allow6, "drop.rule_used") >= 1
    wait_for(allow6.run.clean, timeout=20, interval=0.2, what="no FTP rule left")


def run_counter(r: SimpleNamespace, name: str) -> int:
    return int(r.run.ask("status")["processors"]["processor-0"]["counters"].get(name, 0))


def test_inspect_mode_and_data_mode_translations_over_ipv6(lab_factory: Any, tmp_path: Path) -> None:
    """Inspect: every data connection through the gateway. Inbound (data_mode active): curl's EPSV
    reaches lan's vsftpd as EPRT |2| and the two connections meet in the gateway; curl's EPRT is a
    REDIRECT with its own leg B. Outbound (data_mode passive): curl's EPRT reaches ext's vsftpd as
    EPSV and the gateway opens both connections (ORIGINATE from G6); curl's EPSV is a REDIRECT.
    Two workers each: a REDIRECT comes back to the worker (its G6 listener) that asked for it."""
    r = rig6(lab_factory("dual"), tmp_path, MODES6, "inspect", workers=2)
    try:
        cases = [("curl", mode, op) for mode in ("epsv", "eprt") for op in ("get", "put")]
        failures = transfers(r, cases)
        text = r.run.text()
        assert not failures, "\n".join(failures) + "\n" + text[-3000:]
        assert "mode=ALLOW" not in text
        assert text.count(" data.translated ") == 4, text[-3000:]  # inbound EPSV, outbound EPRT; get and put
        assert text.count(" translated=True") == 2 and text.count(" opened=True") == 2, text[-3000:]
        assert text.count(" data reason=done ") == 8, text[-3000:]
        for worker in ("ftpin#0", "ftpin#1", "ftpout#0", "ftpout#1"):  # sessions spread over both workers
            assert f"{worker} open session=" in text, text[-3000:]
        counters = r.run.ask("status")["processors"]["processor-0"]["counters"]
        assert counters["rules.redirected_flows"] >= 4 and counters["rules.originated_flows"] == 4, counters
        # Each transfer vsftpd logged is the client's own address's; in passive mode vsftpd takes a
        # data connection only from its control connection's peer (pasv_promiscuous is off), so the
        # ones the gateway opened left the router as the client.
        for host, client in (("lan", EXT6), ("ext", LAN6)):
            log = (tmp_path / f"xfer-{host}.log").read_text()
            assert len(re.findall(rf'OK (?:DOWNLOAD|UPLOAD): Client "{re.escape(client)}"', log)) == 4, log[-2000:]
        wait_for(r.run.clean, timeout=20, interval=0.2, what="no FTP rule left")
    finally:
        unrig6(r)


def test_outbound_ftp_over_ipv6_behind_masquerade6(lab_factory: Any, tmp_path: Path) -> None:
    """nat.masquerade6 on wan, and ext has no route to lan's ULA: the session's leg B leaves from
    the router's W6, so ext's vsftpd sees W6; lftp's EPSV download is an ALLOW to ext, curl's EPRT
    reaches vsftpd naming W6, and its data connection to W6:p is an ALLOW translated to the client."""
    r = rig6(lab_factory("dual"), tmp_path, CONFIG6 + '\n[nat]\nmasquerade6 = ["wan"]\n', "allow")
    try:
        r.lab.run("ext", ["ip", "-6", "route", "del", "fd00:1::/64", "via", "2001:db8:2::1"])
        digest = make_file(r.outbound.pub / "big.bin", SIZE)
        got = tmp_path / "got.bin"
        for tool in ("lftp", "curl"):
            res = lftp(r.lab, "lan", f"[{EXT6}]", f"get pub/big.bin -o {got}") if tool == "lftp" else \
                curl(r.lab, "lan", f"[{EXT6}]", "eprt", get="big.bin", out=got)
            assert res.returncode == 0 and sha256(got) == digest, f"{tool}: {res.stdout[-300:]} {res.stderr[-300:]}"
            got.unlink()
        log = (tmp_path / "xfer-ext.log").read_text()
        assert 'CONNECT: Client "2001:db8:2::1"' in log and LAN6 not in log, log[-2000:]
        granted = r.run.granted()
        assert any(g["direction"] == "active" and g["dst"].startswith("[2001:db8:2::1]:") for g in granted), granted
        counters = r.run.ask("status")["processors"]["processor-0"]["counters"]
        assert counters["rules.translated"] >= 1 and counters["rules.allowed_flows"] == 2, counters
    finally:
        unrig6(r)


# The classic inbound deployment over IPv6: ext addresses the router, whose forward takes port 21 to
# lan's vsftpd, through the gateway; lan's ULA leaves as the router's W6 (so does an active data
# connection, as IPv4's behind masquerade). lan's greeting names its ULA and a lan neighbour's.
FORWARD6 = """
[nat]
masquerade6 = ["wan"]

[[nat.forward]]
name = "ftp6"
from = "wan"
proto = "tcp"
port = 21
to = "[fd00:1::10]:21"
"""
LAN_BANNER6 = "Welcome to fd00:1::10 (lan; printer at fd00:1::99, fe80::1)\n"


def test_an_ipv6_port_forward_into_the_gateway(lab_factory: Any, tmp_path: Path) -> None:
    """ext -> the router's 2001:db8:2::1:21 -> [fd00:1::10]:21, and ext has no route to lan's ULA: curl
    (EPSV, EPRT) and lftp (passive) get and put intact; vsftpd logs ext's own address; an EPSV's data
    connection goes to the router's address and is the ALLOW's, translated to lan (one-shot); an EPRT's
    comes from the router's W6 (masquerade6); the
    greeting the client reads names the router and ``::`` where lan wrote its private addresses."""
    r = rig6(lab_factory("dual"), tmp_path, CONFIG6 + FORWARD6, "allow", banner=LAN_BANNER6)
    try:
        r.lab.run("ext", ["ip", "-6", "route", "del", "fd00:1::/64", "via", ROUTER6])
        cases = [("curl", mode, op) for mode in ("epsv", "eprt") for op in ("get", "put")] + \
            [("lftp", mode, op) for mode in ("passive", "active") for op in ("get", "put")]
        failures = transfers(r, cases, inbound_server=ROUTER6, outbound=False)
        assert not failures, "\n".join(failures) + "\n" + r.run.text()[-3000:]
        log = (tmp_path / "xfer-lan.log").read_text()
        assert f'CONNECT: Client "{EXT6}"' in log and f'Client "{ROUTER6}"' not in log, log[-2000:]
        assert len(re.findall(rf'OK (?:DOWNLOAD|UPLOAD): Client "{re.escape(EXT6)}"', log)) == len(cases), log[-2000:]
        # EPSV names a port only: the client connects to the router's address, which the ALLOW takes to lan.
        digest = make_file(r.inbound.pub / "small.bin", 256 * 1024)
        got = attack(r, "ext", "second-connection", ROUTER6, EXT6)
        assert got["pasv"].startswith("229 ") and got["client_connected"] is True, got
        assert got["intruder_connected"] is False and got["sha256"] == digest, got
        granted = r.run.granted()
        assert {g["mode"] for g in granted} == {"ALLOW"} and len(granted) == len(cases) + 1, granted
        port = got["pasv"][got["pasv"].index("(") + 1 : got["pasv"].index(")")].strip("|")
        assert granted[-1]["dst"] == f"[{ROUTER6}]:{port}", granted  # the port the 229 named, on the router
        assert all(g["dst"].startswith(f"[{ROUTER6}]:") for g in granted if g["direction"] == "passive"), granted
        counters = r.run.ask("status")["processors"]["processor-0"]["counters"]
        assert counters["rules.allowed_flows"] == len(cases) + 1 and counters["rules.translated"] == 5, counters
        # mask_private_addresses (on by default): nothing of lan's addressing reaches the wan client.
        got = attack(r, "ext", "greeting", ROUTER6)
        text = "\n".join(got["greeting"] + got["stat"])
        assert got["greeting"][0] == f"220-Welcome to {ROUTER6} (lan; printer at ::, ::)", got
        assert "fd00:" not in text and "fe80:" not in text, got
        assert got["pasv"].startswith("522 "), got
        wait_for(r.run.clean, timeout=20, interval=0.2, what="no FTP rule left")
    finally:
        unrig6(r)
