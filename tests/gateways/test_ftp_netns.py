"""The ftp gateway under `nfgate run` with real peers in the basic lab (tests/gateways/ftp_netns.py).

vsftpd in lan behind the port forward (inbound) and in ext (outbound, the
client behind masquerade); curl, lftp and Python's ftplib as clients, in
every mode they have; then the attacks of the issue against the running
gateway. The router's policy drops what no rule passes, so every data
connection that works crossed by the dynamic rule the gateway asked for.
In allow mode every data connection is carried by the kernel, translated by
the processor's dynamic DNAT where the peer was told the router's address:
the processor's queue sees none of its packets, and conntrack tracks it.
After each test no FTP rule is left, in the processor or in the kernel
(filter, DNAT, or the processor's expectations).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.ftp_netns import (
    CURL_MODES,
    EXT,
    EXT2,
    LAN,
    LAN_BANNER,
    MB,
    WAN,
    FtpRunning,
    Vsftpd,
    curl,
    ftplib_transfer,
    lftp,
    make_file,
    sha256,
)

pytestmark = pytest.mark.netns

ATTACKS = str(Path(__file__).with_name("ftp_attacks.py"))
BIG = 50 * MB  # the size for the client matrix
SMALL = 256 * 1024


def requests(run: FtpRunning) -> int:
    """Rule requests the processor has received so far."""
    return int(run.ask("status")["processors"]["processor-0"]["counters"].get("rules.requests", 0))


def attack(lab: Any, host: str, case: str, server: str, *args: str) -> dict[str, Any]:
    result = lab.run(host, [sys.executable, ATTACKS, "client", case, server, *args], check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def clean(run: FtpRunning) -> None:
    wait_for(run.clean, timeout=20, interval=0.2, what="no FTP rule left in the processor or the kernel")


def rig(lab: Any, tmp: Path, data_channel: str) -> SimpleNamespace:
    lab.run("ext", ["ip", "address", "add", f"{EXT2}/24", "dev", "eth0"])
    inbound = Vsftpd(lab, "lan", tmp, banner=LAN_BANNER)
    outbound = Vsftpd(lab, "ext", tmp, listen_address=EXT)  # EXT2:21 stays free for the fake servers
    up = tmp / "upload.bin"
    r = SimpleNamespace(lab=lab, tmp=tmp, inbound=inbound, outbound=outbound, up=up, run=None)
    try:
        r.run = FtpRunning(lab, tmp, data_channel)
        wait_for(lambda: "rules" in r.run.ask("status")["processors"]["processor-0"], timeout=10,
                 what="the processor to answer")
    except BaseException:
        inbound.stop()
        outbound.stop()
        raise
    return r


def unrig(r: SimpleNamespace) -> None:
    if r.run is not None:
        r.run.stop()
    r.inbound.stop()
    r.outbound.stop()


@pytest.fixture(scope="module")
def allow(module_lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One lab and one `nfgate run` (data_channel = "allow") for the module's tests."""
    r = rig(module_lab_factory("basic"), tmp_path_factory.mktemp("ftp"), "allow")
    try:
        yield r
    finally:
        unrig(r)


# A relayed 50 MB transfer puts tens of thousands of segments through the queue (every
# data packet, on both legs); a session whose data the kernel carries queues only its
# control dialogue and the data connection's SYN: 43-84 packets here (lftp says most),
# whatever the size of the file.
CONTROL_ONLY = 300


def matrix(r: SimpleNamespace, size: int, cases: list[tuple[str, str, str]],
           queued: dict[str, int] | None = None) -> list[str]:
    """Run (client, mode, get|put) in both directions; return what failed, with its output.
    ``queued``, if given, gets the packets each run put through the processor's queue."""
    digests = {
        "in": make_file(r.inbound.pub / "big.bin", size),
        "out": make_file(r.outbound.pub / "big.bin", size),
    }
    up_digest = make_file(r.up, size)
    failures = []
    for direction, host, server, ftpd in (("in", "ext", WAN, r.inbound), ("out", "lan", EXT, r.outbound)):
        for tool, mode, op in cases:
            tag = f"{direction}-{tool}-{mode}-{op}"
            local = r.tmp / f"{tag}.bin"
            remote = ftpd.pub / f"{tag}.bin"
            before = r.run.queued()
            if tool == "curl":
                res = curl(r.lab, host, server, mode, get="big.bin", out=local) if op == "get" else curl(
                    r.lab, host, server, mode, put=r.up)
                remote = ftpd.pub / r.up.name
            elif tool == "ftplib":
                res = ftplib_transfer(r.lab, host, server, mode, op, "big.bin" if op == "get" else remote.name,
                                      local if op == "get" else r.up)
            else:
                cmd = f"get pub/big.bin -o {local}" if op == "get" else f"put {r.up} -o pub/{remote.name}"
                res = lftp(r.lab, host, server, cmd, passive=mode == "passive")
            if op == "get":
                ok = local.exists() and sha256(local) == digests[direction]
                local.unlink(missing_ok=True)
            else:
                ok = remote.exists() and sha256(remote) == up_digest
                remote.unlink(missing_ok=True)
            if queued is not None:
                queued[tag] = r.run.queued() - before
            if res.returncode != 0 or not ok:
                failures.append(f"{tag}: exit {res.returncode}, intact {ok}: {res.stdout[-300:]} {res.stderr[-300:]}")
    return failures


CLIENTS = (
    [("curl", mode, op) for mode in CURL_MODES for op in ("get", "put")]
    + [("lftp", mode, op) for mode in ("passive", "active") for op in ("get", "put")]
    + [("ftplib", mode, op) for mode in ("pasv", "port") for op in ("get", "put")]
)


def test_every_client_and_mode_moves_50_mb_intact_in_both_nat_directions(allow: SimpleNamespace) -> None:
    """curl (EPSV, PASV, EPRT, PORT), lftp (passive, active) and ftplib (PASV, PORT) download and upload
    50 MB through the gateway, inbound behind the port forward and outbound behind masquerade; in allow
    mode the kernel carries every data connection, so the processor's queue sees only the control dialogues."""
    run = allow.run
    queued: dict[str, int] = {}
    failures = matrix(allow, BIG, CLIENTS, queued)
    assert not failures, "\n".join(failures) + "\n" + run.text()[-3000:]
    text = run.text()
    # Inbound passive needed the router's address in the 227; outbound active the router's
    # SNAT address (NEW_FLOW's snat) in the PORT: both ALLOW now, translated by the processor.
    assert "direction=passive src=203.0.113.10:0 dst=203.0.113.1:" in text
    assert "direction=active src=203.0.113.10:0 dst=203.0.113.1:" in text
    modes = {g["mode"] for g in run.granted()}
    assert modes == {"ALLOW"}, modes
    assert " data reason=" not in text  # the gateway relayed no data connection
    assert all(n < CONTROL_ONLY for n in queued.values()), queued
    clean(run)


def tracked(run: FtpRunning, port: int) -> list[tuple[list[str], list[str]]]:
    """(original, reply) of each conntrack entry with ``port``, as [src, dst, sport, dport] each."""
    out = []
    for entry in run.conntrack(port):
        fields = [f.split("=", 1)[1] for f in entry.split() if f.split("=", 1)[0] in ("src", "dst", "sport", "dport")]
        out.append((fields[:4], fields[4:8]))
    return out


# (direction, curl mode, the connecting peer, the address it was told, where the kernel delivers it)
FOUR_CASES = [
    ("in", "pasv", EXT, WAN, LAN),  # the client was told W (the port forward): DNAT to the lan server
    ("in", "port", LAN, EXT, EXT),  # the lan server connects out to the client: masquerade only
    ("out", "pasv", LAN, EXT, EXT),  # the lan client connects out to the server: masquerade only
    ("out", "port", EXT, WAN, LAN),  # the server was told W (the SNAT address): DNAT to the lan client
]


@pytest.mark.parametrize("direction, mode, peer, told, delivered", FOUR_CASES,
                         ids=[f"{c[0]}bound-{c[1]}" for c in FOUR_CASES])
def test_allow_mode_data_connections_are_the_kernels(allow: SimpleNamespace, direction: str, mode: str, peer: str,
                                                    told: str, delivered: str) -> None:
    """Each of the four cases: a 50 MB download queues no more packets than a 256 KiB one (only the
    control dialogue is the processor's), conntrack tracks the data connection, with the DNAT where
    the peer was told the router's address, and no rule is left after the session."""
    run = allow.run
    host, server, ftpd = ("ext", WAN, allow.inbound) if direction == "in" else ("lan", EXT, allow.outbound)
    queued = {}
    for name, size in (("small", SMALL), ("big", BIG)):
        digest = make_file(ftpd.pub / f"{name}.bin", size)
        local = allow.tmp / f"{direction}-{mode}-{name}.bin"
        before = run.queued()
        res = curl(allow.lab, host, server, mode, get=f"{name}.bin", out=local)
        queued[name] = run.queued() - before
        assert res.returncode == 0 and sha256(local) == digest, res.stderr
        local.unlink()
    grant = run.granted()[-1]
    assert grant["mode"] == "ALLOW" and grant["dst"].rsplit(":", 1)[0] == told, grant
    port = int(grant["dst"].rsplit(":", 1)[1])
    assert queued["big"] - queued["small"] < 20, queued  # 50 MB is some 36,000 segments; here 0 or 1 more
    # The data connection as conntrack has it (in TIME_WAIT after the transfer): the peer to the
    # address it was told, answered from where the kernel delivered it (the DNAT, or none).
    entries = tracked(run, port)
    assert any(o[0] == peer and o[1] == told and o[3] == str(port) and r[0] == delivered and r[2] == str(port)
               for o, r in entries), entries
    clean(run)


def test_227_is_rewritten_for_ftplib(allow: SimpleNamespace) -> None:
    """ftplib uses the 227's address (curl does not, PEERS.md): the lan server's address never reaches it."""
    make_file(allow.inbound.pub / "small.bin", SMALL)
    got = attack(allow.lab, "ext", "replies", WAN, "PASV")
    assert got["replies"][0].startswith("227 Entering Passive Mode (203,0,113,1,")
    clean(allow.run)


def test_bounce_privileged_and_malformed_ports_are_refused(allow: SimpleNamespace) -> None:
    run = allow.run
    before = requests(run)
    got = attack(allow.lab, "ext", "replies", WAN,
                 "PORT 198,51,100,99,195,80",  # a third host: the bounce (RFC 2577 section 3)
                 "EPRT |1|192.168.1.10|50000|",  # the server itself
                 "PORT 203,0,113,10,0,25",  # a privileged port
                 "PORT 203,0,113,10,300,1",  # a value past 255
                 "EPRT |2|::1|50000|",  # family mismatch: policy (the session is IPv4), not counted
                 "PORT 203,0,113,10,195",  # five fields: the 5th bad command
                 "PORT x")  # the 6th, one past max_bad_commands
    codes = [reply[:3] for reply in got["replies"]]
    assert codes == ["501", "501", "501", "501", "522", "501", "421"], got
    assert requests(run) == before
    assert "refused.bounce" in run.text() and "refused.privileged_port" in run.text()
    clean(run)


def test_private_addresses_never_reach_the_wan_client(allow: SimpleNamespace) -> None:
    """Item 1 of issue 16: vsftpd's multi-line greeting names the lan server, a lan neighbour and carries
    a 227 with the server's address; the wan client reads the router's address, 0.0.0.0, and an
    indented 227 that no client takes for a reply; nothing private, in the greeting, STAT or PASV."""
    got = attack(allow.lab, "ext", "greeting", WAN)
    text = "\n".join(got["greeting"] + got["stat"] + [got["pasv"]])
    for private in ("192.168.1.10", "192,168,1,10", "10.20.30.40"):
        assert private not in text, got
    assert "10.20.30.40" in LAN_BANNER
    assert got["greeting"][:2] == ["220-Welcome to 203.0.113.1 (lan; printer at 0.0.0.0)",
                                   "220-227 Entering Passive Mode (203,0,113,1,195,80)."], got
    assert got["pasv"].startswith("227 Entering Passive Mode (203,0,113,1,"), got
    clean(allow.run)


def test_a_second_pasv_withdraws_the_first_ones_rule(allow: SimpleNamespace) -> None:
    """Item 2: after a second PASV only its port is open; the first one's rule is gone from the
    processor and the kernel (RULE_END SUPERSEDED), so its SYN is dropped by the router, where
    before it reached vsftpd (which had closed that port: a reset)."""
    run = allow.run
    digest = make_file(allow.inbound.pub / "small.bin", SMALL)
    before = run.ask("status")["processors"]["processor-0"]["counters"].get("rules.ended.superseded", 0)
    got = attack(allow.lab, "ext", "two-pasv", WAN, EXT)
    assert got["first"].startswith("227 ") and got["second"].startswith("227 ") and got["first"] != got["second"], got
    assert got["old_port"] == "dropped", got
    assert got["new_port"] == "connected" and got["sha256"] == digest and got["done"].startswith("226"), got
    counters = run.ask("status")["processors"]["processor-0"]["counters"]
    assert counters.get("rules.ended.superseded", 0) == before + 1, counters
    clean(run)


def test_commands_refused_by_policy_are_not_bad_commands(allow: SimpleNamespace) -> None:
    """Item 4: seven SITE commands (refused: not in the allow-list) leave the session open; six
    unknown verbs close it at the one past max_bad_commands (5)."""
    got = attack(allow.lab, "ext", "replies", WAN, *(["SITE CHMOD 600 pub/x"] * 7), "NOOP", *(["XYZZ"] * 6))
    codes = [reply[:3] for reply in got["replies"]]
    assert codes == ["502"] * 7 + ["200"] + ["500"] * 5 + ["421"], got
    clean(allow.run)


def test_a_port_line_split_across_segments_still_works(allow: SimpleNamespace) -> None:
    digest = make_file(allow.inbound.pub / "small.bin", SMALL)
    got = attack(allow.lab, "ext", "split-port", WAN, EXT)
    assert got["port"].startswith("200") and got["retr"].startswith("150") and got["done"].startswith("226"), got
    assert got["sha256"] == digest
    assert got["data_peer"] == WAN  # through the kernel's masquerade, by the ALLOW rule
    clean(allow.run)


def test_a_data_connection_from_a_third_host_is_refused(allow: SimpleNamespace) -> None:
    digest = make_file(allow.inbound.pub / "small.bin", SMALL)
    got = attack(allow.lab, "ext", "third-host", WAN, EXT, EXT2)
    assert got["intruder_connected"] is False, got
    assert got["client_connected"] is True and got["sha256"] == digest, got
    clean(allow.run)


def test_a_second_connection_on_a_one_shot_rule_is_refused(allow: SimpleNamespace) -> None:
    digest = make_file(allow.inbound.pub / "small.bin", SMALL)
    got = attack(allow.lab, "ext", "second-connection", WAN, EXT)
    assert got["client_connected"] is True and got["intruder_connected"] is False, got
    assert got["sha256"] == digest and got["done"].startswith("226"), got
    clean(allow.run)


def fake_server(r: SimpleNamespace, mode: str) -> subprocess.Popen:
    proc = r.lab.popen("ext", [sys.executable, "-u", ATTACKS, "server", mode, EXT2], stdout=subprocess.PIPE, text=True)
    assert wait_for(proc.stdout.readline, timeout=10, what="the fake server") == "ready\n"
    return proc


def test_227_with_a_foreign_address_is_not_acted_on(allow: SimpleNamespace) -> None:
    run = allow.run
    proc = fake_server(allow, "foreign-227")
    try:
        before = requests(run)
        got = attack(allow.lab, "lan", "pasv", EXT2)
        assert got["pasv"].startswith("425 "), got
        assert got["after"].startswith("200"), got  # the session goes on
        assert requests(run) == before
        assert "refused.foreign_227" in run.text()
    finally:
        proc.kill()
        proc.wait()
    clean(run)


def test_a_227_that_answers_another_command_loses_its_code(allow: SimpleNamespace) -> None:
    """Item 3: a server that answers NOOP with a 227 (naming a private address): the client reads a
    451, which no client can take for a PASV answer, and no rule is asked for."""
    run = allow.run
    proc = fake_server(allow, "noop-227")
    try:
        before = requests(run)
        got = attack(allow.lab, "lan", "replies", EXT2, "NOOP", "NOOP")
        assert got["replies"] == ["451 Reply not expected here; dropped by the firewall."] * 2, got
        assert requests(run) == before
        assert "refused.unsolicited_reply" in run.text()
    finally:
        proc.kill()
        proc.wait()
    clean(run)


def test_commands_before_the_greeting_open_nothing(allow: SimpleNamespace) -> None:
    run = allow.run
    proc = fake_server(allow, "hold-greeting")
    try:
        before = requests(run)
        got = attack(allow.lab, "lan", "before-greeting", EXT2, "192.168.1.10")
        assert got["received"] == "421 Wait for the server's greeting; closing.\r\n", got
        # The server never saw the PORT: the gateway closed before passing anything on.
        report = json.loads(wait_for(proc.stdout.readline, timeout=10, what="the fake server's report"))
        assert report["early"] == ""
        assert requests(run) == before
    finally:
        proc.kill()
        proc.wait()
    clean(run)


def test_inspect_mode_in_both_directions(lab_factory: Any, tmp_path: Path) -> None:
    """data_channel = "inspect": every data connection goes through the gateway, in every mode."""
    r = rig(lab_factory("basic"), tmp_path, "inspect")
    try:
        cases = [("curl", "epsv", "get"), ("curl", "eprt", "put"), ("curl", "pasv", "put"), ("curl", "port", "get"),
                 ("lftp", "passive", "put"), ("lftp", "active", "get"), ("ftplib", "pasv", "get"), ("ftplib", "port", "put")]
        failures = matrix(r, 8 * MB, cases)
        assert not failures, "\n".join(failures) + "\n" + r.run.text()[-3000:]
        text = r.run.text()
        assert "mode=ALLOW" not in text
        assert text.count(" data reason=done ") == 2 * len(cases), text[-3000:]
        assert "inspect=True" in text and "inspect=False" not in text
        clean(r.run)
    finally:
        unrig(r)


def test_two_processor_instances_each_steer_their_own_data_connections(lab_factory: Any, tmp_path: Path) -> None:
    """processor.queues = [0, 1]: a client whose address ends in 0 is instance 0's, one ending in
    1 instance 1's; each instance's data-connection rules bring the first packet to itself (the
    expect mark bits name it), passive and active, and leave nothing behind."""
    lab = lab_factory("basic")
    lab.run("ext", ["ip", "address", "add", f"{EXT2}/24", "dev", "eth0"])
    inbound = Vsftpd(lab, "lan", tmp_path)
    run = FtpRunning(lab, tmp_path, "allow", queues="[0, 1]")
    try:
        wait_for(lambda: all("counters" in p for p in run.ask("status")["processors"].values()), timeout=10,
                 what="both processors to answer")
        digest = make_file(inbound.pub / "small.bin", SMALL)
        for source in (EXT, EXT2):
            for mode in ("epsv", "port"):
                out = tmp_path / f"{source}-{mode}.bin"
                argv = ["curl", "-sS", "--max-time", "30", "--interface", source, *CURL_MODES[mode], "-o", str(out),
                        f"ftp://{WAN}/pub/small.bin"]
                res = lab.run("ext", argv, check=False, timeout=45)
                assert res.returncode == 0 and sha256(out) == digest, (source, mode, res.stderr, run.text()[-2000:])
        processors = run.ask("status")["processors"]
        for name in ("processor-0", "processor-1"):
            counters = processors[name]["counters"]
            assert counters.get("rules.acked", 0) == 2 and counters.get("rules.allowed_flows", 0) == 2, (name, counters)
        clean(run)
    finally:
        run.stop()
        inbound.stop()
