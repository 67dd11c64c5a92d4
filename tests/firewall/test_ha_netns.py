"""The router pair in the ha lab (docs/ha.md): `nfgate run` on r1 and r2 with [ha],
keepalived and conntrackd under their supervision, a kernel-NAT flow through the
pair's virtual address across a hard failure, a failback and a kill -9 of keepalived.

What is proved here: the rendered files and the notify script carry a live
double-direction NAT flow (a port forward on the virtual address) intact across
each event, with the stall printed; new flows work after each; the pair's rules
let VRRP and the sync in; and the server's segment never sees the client's own
address (a packet NATed on one leg only). The AG host tests do the same with
tcp-relay and FTP flows through the gateways' own host (docs/ha.md, "The AG
host"), and with a 60 s RTP stream whose copies on the backup only the
master's UDP refresh keeps alive past 30 s (docs/ha.md, "UDP refresh").
Two more: keepalived killed with SIGKILL restarts at the first try and never
runs twice, and a node that takes its flows over again before its peer
(its processor stopped) pushed them keeps them at the gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firewall.control import ask
from firewall.lab.wait import wait_for
from tests.firewall.ha_harness import AG_PORTS, RELAYED_PORT, REPO, VIP, Pair, result, serve, stream, wait_master
from tests.gateways.ftp_netns import Vsftpd, make_file, sha256

pytestmark = pytest.mark.netns

# 100 MiB at 6 MiB/s: about 17 s, long enough for the three events below.
MB, RATE = 100, 6.0


def capture(lab, tmp: Path, also: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """tcpdump on the server's segment for the client's own address (and ``also``, more
    tcpdump terms): any packet is half-NATed."""
    path = tmp / "server-seg.pcap"
    err = open(tmp / "tcpdump.err", "w")
    proc = lab.popen("server", ["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(path), "host", "192.168.1.10", *also],
                     stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: "listening on" in (tmp / "tcpdump.err").read_text(), timeout=10, interval=0.05,
             what="tcpdump to listen")
    return proc, path


def short_flow(lab, mb: int = 2) -> dict:
    return result(stream(lab, mb, 50.0), timeout=90)


def test_a_flow_survives_failover_failback_and_kill9_of_keepalived(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0)
    try:
        serve(lab)
        dump, pcap = capture(lab, tmp_path)
        start = time.monotonic()
        flow = stream(lab, MB, RATE)
        events = []

        def at(name: str) -> None:
            events.append((round(time.monotonic() - start, 2), name))

        time.sleep(2.0)
        at("r1: all links down")
        pair.links("r1", "down")
        window = stream(lab, 1, 50.0)  # a flow set up in the failover window: carried or refused, never leaked
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        assert short_flow(lab)["ok"], "a new flow after the failover"
        window_result = result(window, timeout=90)

        at("r1: links up")
        pair.links("r1", "up")
        took = wait_master(pair, "r1", timeout=30)
        at(f"failback: r1 master after {took:.2f} s")
        assert short_flow(lab)["ok"], "a new flow after the failback"

        killed = pair.kill_keepalived("r1")
        at(f"kill -9 keepalived on r1 (pid {killed})")
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        took = wait_master(pair, "r1", timeout=30)
        at(f"r1's keepalived restarted by nfgate run; r1 master again after {took:.2f} s")

        got = result(flow, timeout=120)
        print(f"\nha: {MB} MiB at {RATE} MiB/s: ok={got['ok']} in {got['seconds']} s, longest stall {got['stall']} s")
        for t, name in events:
            print(f"  {t:7.2f} s  {name}")
        for t, gap in got["stalls"]:
            print(f"  stall of {gap:.3f} s at {t:.2f} s")
        print(f"  flow started in the failover window: {window_result}")
        assert got["ok"], got
        assert got["stall"] < 10, got
        dump.terminate()
        dump.wait(timeout=10)
        leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True).stdout
        assert leaked == "", f"half-NATed packets on the server's segment:\n{leaked[:2000]}"
        # The window's flow either finished intact or failed cleanly (no bytes beyond its own).
        assert window_result["ok"] or window_result["bytes"] < (1 << 20), window_result
        # Both nodes' supervisors saw keepalived die once (r1) and restarted it.
        r1 = {p["name"]: p for p in pair.status("r1")["processes"]}
        assert r1["keepalived"]["restarts"] >= 1 and r1["conntrackd"]["state"] == "running"
        # Status and metrics: each node's VRRP state, its last takeover, and the sync's counters.
        st1, st2 = pair.status("r1")["ha"], pair.status("r2")["ha"]
        assert (st1["vrrp"], st2["vrrp"], st1["peer"]) == ("primary", "backup", "r2")
        assert st1["last_failover"] > st2["last_failover"] > 0 and st1["transitions"] >= 6
        assert st1["sync"]["running"] and st2["sync"]["packets_recv"] > 0 and st2["sync"]["injected"] > 0
        text = lab.run("r1", [sys.executable, "-m", "firewall.cli", "status", "-c", str(pair.paths["r1"])],
                       cwd=str(REPO)).stdout
        assert "ha: node r1 (peer r2): vrrp primary" in text and "ha sync: " in text, text
        scraped = lab.run("r2", ["curl", "-s", "http://127.0.0.1:9469/metrics"]).stdout
        assert 'nfgate_ha_state{node="r2",state="backup"} 1.0' in scraped
        assert 'nfgate_ha_sync_up{node="r2"} 1.0' in scraped and "nfgate_ha_last_failover_timestamp_seconds" in scraped
    finally:
        pair.stop()


def test_keepalived_killed_with_sigkill_restarts_at_the_first_try_and_never_runs_twice(lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "nfgate run supervises both daemons": a kill -9 of keepalived's parent leaves its
    VRRP child giving the addresses up for about a second, holding its pid file; nfgate run's restart
    waits for it and holds at the first try (no "already running" exit). A kill -9 of the VRRP child
    is keepalived's to respawn. A second nfgate run for the node is refused, with the same config or a
    copy that has its own state directory. After each, one keepalived tree runs r1's config (a parent
    and its VRRP child, in r1's namespace), and r1 is master again."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=1.0)
    vrrp_pid_file = tmp_path / "ha" / "run" / "keepalived-vrrp-r1.pid"

    def one_tree() -> tuple[int, int]:
        """(parent, VRRP child) of the one keepalived tree of r1, as its supervisor and pid file name them."""
        tree = pair.keepalived_tree("r1")
        parent = next(p for p in pair.status("r1")["processes"] if p["name"] == "keepalived")["pid"]
        child = int(vrrp_pid_file.read_text())
        assert tree == {parent: tree.get(parent), child: parent}, (tree, parent, child)
        return parent, child

    try:
        parent, child = one_tree()
        pair.kill_keepalived("r1")
        wait_master(pair, "r2", timeout=15)  # the VRRP child sent priority 0
        wait_master(pair, "r1", timeout=30)
        log = pair.log("r1")
        assert log.count("keepalived: exited with") == 1 and "keepalived: exited with -9" in log, log[-3000:]
        assert "already running" not in log, log[-3000:]
        r1 = next(p for p in pair.status("r1")["processes"] if p["name"] == "keepalived")
        assert (r1["state"], r1["restarts"]) == ("running", 1), r1
        new_parent, new_child = one_tree()
        assert new_parent != parent and new_child != child

        transitions = len((tmp_path / "ha" / "run" / "state-r1.jsonl").read_text().splitlines())
        os.kill(new_child, signal.SIGKILL)  # keepalived respawns its VRRP child: backup (notified), then primary
        wait_for(lambda: pair.vrrp("r1") == "primary" and pair.master() == "r1" and len(
            (tmp_path / "ha" / "run" / "state-r1.jsonl").read_text().splitlines()) >= transitions + 2,
            timeout=30, interval=0.05, what="r1 master again after its VRRP child was killed")
        assert one_tree()[0] == new_parent
        assert next(p for p in pair.status("r1")["processes"] if p["name"] == "keepalived")["restarts"] == 1

        copy = tmp_path / "r1-copy.toml"  # the same node from another state directory
        copy.write_text(pair.paths["r1"].read_text().replace(f"{tmp_path}/r1/run/", f"{tmp_path}/r1-copy/run/"))
        for config, refusal in ((pair.paths["r1"], "already running"), (copy, "one nfgate run per node")):
            second = lab.run("r1", [sys.executable, "-m", "firewall.cli", "run", "-c", str(config), "--backend", "iptables"],
                             cwd=str(REPO), check=False, timeout=60)
            assert second.returncode != 0 and refusal in second.stderr, (second.returncode, second.stderr)
        assert one_tree() == (new_parent, int(vrrp_pid_file.read_text())) and pair.master() == "r1"
    finally:
        pair.stop()


def test_a_sync_link_failure_loses_only_the_flows_made_while_it_was_down(lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "Not covered": with the sync link down VRRP goes on, so the master stays;
    a flow made meanwhile has no copy on the backup and dies at a failover (dropped: no
    half-NATed packet), while a flow copied before the cut survives it."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0)
    try:
        serve(lab)
        dump, pcap = capture(lab, tmp_path)
        before = stream(lab, 40, 5.0)  # about 8 s
        time.sleep(1.0)
        for node in ("r1", "r2"):
            lab.run(node, ["ip", "link", "set", "sync0", "down"])
        during = stream(lab, 40, 5.0)
        time.sleep(1.5)
        assert pair.master() == "r1"  # VRRP runs on the shared segments: no failover for a sync-link cut
        for ifname in ("lan0", "wan0"):
            lab.run("r1", ["ip", "link", "set", ifname, "down"])
        wait_master(pair, "r2", timeout=15)
        got = result(before, timeout=60)
        print(f"\nha sync-link cut, then r1 down: the flow copied before the cut: ok={got['ok']}, stalls {got['stalls']}")
        assert got["ok"], got
        during.kill()
        out, _ = during.communicate(timeout=10)
        print(f"  the flow made while the sync link was down: {out.strip() or 'still waiting (killed)'}")
        assert '"ok": true' not in out
        dump.terminate()
        dump.wait(timeout=10)
        leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True).stdout
        assert leaked == "", leaked[:2000]
        # With every link back, r1 takes over again after a resync, and new flows work.
        for ifname in ("lan0", "wan0", "sync0"):
            lab.run("r1", ["ip", "link", "set", ifname, "up"])
        lab.run("r2", ["ip", "link", "set", "sync0", "up"])
        wait_master(pair, "r1", timeout=30)
        assert short_flow(lab)["ok"]
    finally:
        pair.stop()


SPLIT = ("add table bridge nfgsplit; add chain bridge nfgsplit cut {{ type filter hook forward priority 0; }}; "
         "add rule bridge nfgsplit cut ip protocol vrrp drop")


def test_split_brain_with_the_sync_link_up_keeps_flows_and_heals(lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "Split brain": the switches drop VRRP between the nodes, so both take the
    addresses; the sync link still copies each node's entries to the other, so a live flow goes
    on through whichever node the hosts' ARP points at, nothing leaks half NATed, and when VRRP
    passes again the lower priority steps back and r1 alone is master."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0)
    try:
        serve(lab)
        dump, pcap = capture(lab, tmp_path)
        flow = stream(lab, 30, 5.0)  # about 6 s
        time.sleep(1.0)
        for switch in ("swlan", "swext"):
            lab.run(switch, ["nft", SPLIT.format()])
        wait_for(lambda: pair.holds_vips("r1") and pair.holds_vips("r2") and pair.vrrp("r2") == "primary",
                 timeout=15, interval=0.05, what="both nodes to hold the addresses")
        assert short_flow(lab)["ok"], "a new flow during the split brain"
        for switch in ("swlan", "swext"):
            lab.run(switch, ["nft", "delete table bridge nfgsplit"])
        wait_master(pair, "r1", timeout=15)
        got = result(flow, timeout=60)
        print(f"\nha split brain (VRRP cut, sync up): ok={got['ok']}, longest stall {got['stall']} s")
        assert got["ok"], got
        assert pair.vrrp("r2") == "backup" and not pair.holds_vips("r2")
        assert short_flow(lab)["ok"], "a new flow after the split brain healed"
        dump.terminate()
        dump.wait(timeout=10)
        leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True).stdout
        assert leaked == "", leaked[:2000]
    finally:
        pair.stop()


def ftp_get(lab, tmp: Path, name: str, out: Path, rate: str = "") -> subprocess.Popen:
    """curl on the server downloads pub/NAME from the vsftpd on lan, through the ftp gateway on ag (EPSV)."""
    argv = ["curl", "-sS", "--max-time", "120", "--connect-timeout", "10", *(["--limit-rate", rate] if rate else []),
            "-o", str(out), f"ftp://203.0.113.1/pub/{name}"]
    return lab.popen("server", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class FtpSession:
    """One FTP control connection (ftplib on the server, tests/hapeer.py) through the ftp gateway on ag,
    kept open across the pair's events: each ``get`` is a new data connection, whose rule the
    gateway asks the control flow's owner of the moment for."""

    def __init__(self, lab) -> None:
        self.proc = lab.popen("server", [sys.executable, "-m", "tests.hapeer", "ftp", VIP["wan"][1]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def get(self, name: str) -> dict:
        """Download pub/NAME on the open session (ftplib's own 60 s socket timeouts bound the wait)."""
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the FTP session ended (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


def taken_over(pair: Pair, node: str, counter: str = "flows.taken_over") -> int:
    """How many bindings the node's processor took over as it became master (``takeovers``: how many times)."""
    return pair.status(node)["processors"]["processor-0"]["counters"].get(counter, 0)


def counter(pair: Pair, node: str, name: str) -> int:
    """One counter of the node's first processor."""
    return pair.status(node)["processors"]["processor-0"]["counters"].get(name, 0)


def test_gateway_flows_through_the_ag_host_survive_failover_kill9_and_failback(lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "The AG host": tcp-relay and the ftp gateway (allow mode) run on ag under
    `nfgate gateways`; r1 and r2 run processors only, each binding from its half of the pool.
    A 100 MiB relayed stream (both legs double-NATed by r1) and a 100 MiB FTP download (its
    control connection through the gateway, its data connection in the kernel by the rule the
    gateway asked r1 for) arrive intact across a hard failure of r1, the failback, and a
    kill -9 of r1's keepalived: the other node carries the legs and the data connection on the
    copied conntrack entries, and the gateways on ag never notice. New relayed flows and FTP
    sessions after each event are bound by the master of the moment, from its own half, and
    the gateways ask that node about them and for their data rules.

    The node that becomes master takes over the bindings of the flows it now carries (docs/ha.md,
    "Takeover"): an FTP session whose control connection r1 bound downloads a file before the
    hard failure of r1, another on the same control connection after it (its data rule granted
    by r2, which took the session over), and a third after the failback (granted by r1 again)."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0, ag=True)
    # The topology's AG host has the TCP timestamps gateway_link.tcp_timestamps asks (docs/ha.md).
    assert "tcp_timestamps" not in (tmp_path / "run-ag.log").read_text()
    ftpd = None
    try:
        serve(lab)
        ftpd = Vsftpd(lab, "client", tmp_path)
        big = make_file(ftpd.pub / "big.bin", MB << 20)
        small = make_file(ftpd.pub / "small.bin", 1 << 20)
        # A gateway flow half NATed would show the AG host's address or the pool's.
        dump, pcap = capture(lab, tmp_path, ("or", "net", "172.31.253.0/24", "or", "net", "172.31.254.0/28"))
        start = time.monotonic()
        flow = stream(lab, MB, RATE, port=RELAYED_PORT)
        download = ftp_get(lab, tmp_path, "big.bin", tmp_path / "big.got", rate=f"{int(RATE)}M")
        session = FtpSession(lab)
        transfers = [session.get("small.bin")]  # its data rule granted by r1
        events = []

        def at(name: str) -> None:
            events.append((round(time.monotonic() - start, 2), name))

        def new_flows(when: str) -> None:
            got = result(stream(lab, 2, 50.0, port=RELAYED_PORT), timeout=90)
            assert got["ok"], f"a new relayed flow {when}: {got}"
            out = tmp_path / "small.got"
            out.unlink(missing_ok=True)
            session = ftp_get(lab, tmp_path, "small.bin", out)
            text, _ = session.communicate(timeout=60)
            assert session.returncode == 0 and sha256(out) == small, f"a new FTP session {when}: {text}"

        time.sleep(2.0)
        at("r1: all links down")
        pair.links("r1", "down")
        window = stream(lab, 1, 50.0, port=RELAYED_PORT)  # set up in the failover window: carried or refused
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        wait_for(lambda: taken_over(pair, "r2") >= 3, timeout=10, interval=0.1,
                 what="r2 to take over r1's bindings (the relayed stream, the download's and the session's control)")
        at(f"r2 took over {taken_over(pair, 'r2')} bindings")
        transfers.append(session.get("small.bin"))  # the same session, after the failover: r2's rule
        new_flows("after the failover (bound by r2)")
        window_result = result(window, timeout=90)

        at("r1: links up")
        pair.links("r1", "up")
        took = wait_master(pair, "r1", timeout=30)
        at(f"failback: r1 master after {took:.2f} s")
        # Its second takeover (the first at the start): it takes the flows r2 bound and, unless it
        # kept them (its bindings outlive a flush whose entries the resync brings back), its own.
        wait_for(lambda: taken_over(pair, "r1", "takeovers") >= 2, timeout=10, interval=0.1, what="r1 to take over")
        at(f"r1 took over {taken_over(pair, 'r1')} bindings")
        transfers.append(session.get("small.bin"))  # and after the failback: r1's again
        new_flows("after the failback")

        killed = pair.kill_keepalived("r1")
        at(f"kill -9 keepalived on r1 (pid {killed})")
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        took = wait_master(pair, "r1", timeout=30)
        at(f"r1 master again after {took:.2f} s")

        got = result(flow, timeout=120)
        text, _ = download.communicate(timeout=120)
        fetched = time.monotonic() - start
        print(f"\nha, AG host: {MB} MiB through tcp-relay at {RATE} MiB/s: ok={got['ok']} in {got.get('seconds')} s, "
              f"longest stall {got['stall']} s; {MB} MiB by FTP (allow mode) at {RATE} MiB/s: curl exit "
              f"{download.returncode}, done {fetched:.1f} s after the start")
        for t, name in events:
            print(f"  {t:7.2f} s  {name}")
        for t, gap in got["stalls"]:
            print(f"  relay stall of {gap:.3f} s at {t:.2f} s")
        print(f"  relayed flow started in the failover window: {window_result}")
        print(f"  one FTP session's downloads before the failure, after the failover, after the failback: {transfers}")
        assert [(t["ok"], t["sha256"]) for t in transfers] == [(True, small)] * 3, transfers
        assert session.close() == 0
        assert got["ok"], got
        assert window_result["ok"] or window_result["bytes"] < (1 << 20), window_result
        assert got["stall"] < 10, got
        assert download.returncode == 0 and sha256(tmp_path / "big.got") == big, text
        dump.terminate()
        dump.wait(timeout=10)
        leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True).stdout
        assert leaked == "", f"half-NATed packets on the server's segment:\n{leaked[:2000]}"
        # Each node bound flows from its own half only, and the gateways asked each node about its own.
        r1, r2 = pair.status("r1")["processors"]["processor-0"], pair.status("r2")["processors"]["processor-0"]
        half = 8 * (65535 - 1024 + 1)  # a /29 of the default /28 pool, times its ports
        assert r1["pools"]["firewall_side"]["capacity"] == r2["pools"]["firewall_side"]["capacity"] == half
        assert r2["counters"]["verdict.bound"] >= 2, r2  # the flows after the failover
        on_ag = pair.status("ag")["processes"]
        assert sorted(p["name"] for p in on_ag) == ["gateway-ftp", "gateway-relay", "gateway-rtp"], on_ag
        assert all(p["restarts"] == 0 for p in on_ag), on_ag
        assert not any(p["kind"] == "gateway" for p in pair.status("r1")["processes"])
        assert "r2 172.31.253.3" in pair.log("ag"), pair.log("ag")[-2000:]
        # On the AG host: nfgate status and reload answer, a second nfgate gateways is refused,
        # and a gateway killed -9 is restarted.
        cli = [sys.executable, "-m", "firewall.cli"]
        shown = lab.run("ag", [*cli, "status", "-c", str(pair.paths["ag"])], cwd=str(REPO), timeout=30).stdout
        assert "gateway-relay" in shown and "gateway-ftp" in shown, shown
        reloaded = lab.run("ag", [*cli, "reload", "-c", str(pair.paths["ag"])], cwd=str(REPO), timeout=60).stdout
        assert "restarted: nothing" in reloaded, reloaded
        second = lab.run("ag", [*cli, "gateways", "-c", str(pair.paths["ag"])], check=False, cwd=str(REPO), timeout=30)
        assert second.returncode == 1 and "already running" in second.stderr, second
        relay = next(p for p in on_ag if p["name"] == "gateway-relay")
        os.kill(relay["pid"], signal.SIGKILL)
        wait_for(lambda: next(p for p in pair.status("ag")["processes"] if p["name"] == "gateway-relay")["restarts"] == 1,
                 timeout=15, interval=0.1, what="nfgate gateways to restart the relay")
        lab.wait_listening("ag", AG_PORTS[0], timeout=15)
        again = result(stream(lab, 2, 50.0, port=RELAYED_PORT), timeout=90)
        assert again["ok"], f"a relayed flow after the relay's restart: {again}"
    finally:
        if ftpd is not None:
            ftpd.stop()
        pair.stop()


def test_a_node_that_takes_its_flows_over_again_before_the_peer_pushed_them_keeps_them(
        lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "Takeover": a node that lets go of its flows as it steps back and takes them over
    again before the peer pushed them. A relayed stream bound by r1 moves to r2 (hard failure) and
    back (failback); a second one starts after the failback (r1's, never moved). Then r2's processor
    and conntrackd are stopped (SIGSTOP) and r1's keepalived killed: r2 becomes master but its
    processor pushes nothing; r1's new keepalived enters backup, its notify flushes r1's table and
    its resync finds no answer, so r1's processor lets both bindings go. r2's conntrackd goes on (its
    bulk send gives r1 the legs back), and r1, master again after the preempt delay, takes both over
    under the flow ids it had: the gateway replaces neither, and both streams arrive intact. Under
    new ids the gateway replaced the never-moved one (its connection reset: seen before the
    processor kept the ids) and moved the other (0ee3ed0; before it, that one was reset too)."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0, ag=True)
    stopped: list[int] = []
    relay_sock = tmp_path / "ag" / "run" / "gateway-relay.sock"

    def bindings(node: str) -> int:
        return pair.status(node)["processors"]["processor-0"]["flows"]

    def legs(node: str) -> int:
        out = lab.run(node, ["conntrack", "-L", "-p", "tcp", "--mark", "0x10000/0x10000"], check=False).stdout
        return sum(1 for line in out.splitlines() if line.startswith("tcp") and "ESTABLISHED" in line)

    try:
        serve(lab)
        start = time.monotonic()
        moved = stream(lab, 60, 4.0, port=RELAYED_PORT)
        events = []

        def at(name: str) -> None:
            events.append((round(time.monotonic() - start, 2), name))

        wait_for(lambda: bindings("r1") == 1, timeout=10, interval=0.05, what="r1 to bind the relayed stream")
        pair.links("r1", "down")
        wait_master(pair, "r2", timeout=15)
        wait_for(lambda: taken_over(pair, "r2") >= 1, timeout=10, interval=0.1, what="r2 to take the stream over")
        at("r2 took the stream over")
        pair.links("r1", "up")
        wait_master(pair, "r1", timeout=30)
        wait_for(lambda: taken_over(pair, "r1", "takeovers") >= 2, timeout=10, interval=0.1, what="r1 to take over")
        at("failback: r1 took the stream over")
        fresh = stream(lab, 32, 4.0, port=RELAYED_PORT)  # r1's own, never moved
        wait_for(lambda: bindings("r1") == 2, timeout=10, interval=0.05, what="r1 to bind the second stream")
        r2 = {p["name"]: p["pid"] for p in pair.status("r2")["processes"]}
        for name in ("processor-0", "conntrackd"):
            os.kill(r2[name], signal.SIGSTOP)
            stopped.append(r2[name])
        pair.kill_keepalived("r1")
        at("second stream bound by r1; r2's processor and conntrackd stopped; kill -9 keepalived on r1")
        wait_for(lambda: pair.vrrp("r1") == "backup" and bindings("r1") == 0, timeout=15, interval=0.05,
                 what="r1 in backup to let both bindings go")
        at("r1 backup, both bindings let go")
        os.kill(r2["conntrackd"], signal.SIGCONT)
        stopped.remove(r2["conntrackd"])
        wait_for(lambda: legs("r1") >= 4, timeout=10, interval=0.05, what="r2's bulk send to give r1 the legs back")
        at("r1 has the legs again")
        wait_master(pair, "r1", timeout=30)
        wait_for(lambda: taken_over(pair, "r1", "takeovers") >= 3 and bindings("r1") == 2, timeout=10,
                 interval=0.05, what="r1 to take both streams over again")
        at("r1 master, took both over again")
        os.kill(r2["processor-0"], signal.SIGCONT)
        stopped.remove(r2["processor-0"])
        got = [result(s, timeout=120) for s in (moved, fresh)]
        layer = ask(relay_sock, {"cmd": "stats"})["layer"]
        print(f"\nha, a node takes its flows over again before the peer pushed them: "
              f"{[(g['ok'], g['stall']) for g in got]}; gateway {layer}")
        for t, name in events:
            print(f"  {t:7.2f} s  {name}")
        assert all(g["ok"] for g in got), got
        assert layer.get("flows.replaced", 0) == 0, layer
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        pair.stop()


RTP_PEERS = str(REPO / "tests" / "gateways" / "rtp_peers.py")


def test_an_rtp_stream_through_the_ag_host_survives_failover_failback_and_kill9_with_its_rtcp(
        lab_factory, tmp_path: Path) -> None:
    """docs/ha.md, "Takeover" and "UDP refresh": 20 ms RTP from the server to 203.0.113.1:5004
    (forwarded to lan's client, through the rtp gateway on ag) for 60 s, across a hard failure of
    r1, the failback and a kill -9 of r1's keepalived. Its RTCP (5005) starts only after the
    failover and crosses only by the adjacent rule the gateway asks for on behalf of the RTP
    flow: r1's rule died with r1, and the gateway, which the takeover told that r2 carries the
    flow now, drops r1's rule and asks r2 at once. The stall is printed.

    The UDP timeouts are the kernel's defaults here (30 s for an unreplied flow), not the lab's
    fast 5 s, and the hard failure comes more than 30 s after the stream started: r2's copies of
    the stream's two legs, made when it started, live on only because r1 refreshed them
    (``ha.udp_refresh``). The failback and the kill -9 find copies the resync at the last
    takeover made, younger than 30 s: they need no refresh."""
    lab = lab_factory("ha")
    pair = Pair(lab, tmp_path, advert=0.3, preempt=3.0, ag=True,
                conntrack={"nf_conntrack_udp_timeout": 30, "nf_conntrack_udp_timeout_stream": 120})
    sink = None
    try:
        sink = lab.popen("client", [sys.executable, "-m", "tests.hapeer", "udpsink", "90", "3", "5004", "5005"],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        dump, pcap = capture(lab, tmp_path, ("or", "net", "172.31.253.0/24", "or", "net", "172.31.254.0/28"))
        start = time.monotonic()
        media = lab.popen("server", [sys.executable, RTP_PEERS, "send", "203.0.113.10", "40000", VIP["wan"][1], "5004",
                                     "rtp*3000"], stdout=subprocess.PIPE, text=True)
        events = []

        def at(name: str) -> None:
            events.append((round(time.monotonic() - start, 2), name))

        def copies() -> list[int]:
            """The timeouts of r2's copies of nfgate's UDP entries: the stream's two legs (no RTCP yet)."""
            out = lab.run("r2", ["conntrack", "-L", "-p", "udp", "--mark", "0x10000/0x10000"], check=False).stdout
            return [int(line.split()[2]) for line in out.splitlines() if line.startswith("udp")]

        # The copies conntrackd made when the stream started would be gone 30 s after it; refreshed, never.
        wait_for(lambda: time.monotonic() - start >= 31.0 and media.poll() is None, timeout=40, interval=0.5,
                 what="the stream to run 31 s")
        left = copies()
        at(f"r2's copies of the stream's legs: {left} s left")
        assert len(left) == 2 and min(left) > 5, f"r2's copies of the RTP flow's legs: {left}"
        # The backup refreshed nothing (it would copy its own entries back); the master did.
        assert counter(pair, "r2", "refresh.passes") == 0 and counter(pair, "r1", "refresh.updated") >= 2
        at("r1: all links down")
        pair.links("r1", "down")
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        wait_for(lambda: taken_over(pair, "r2") >= 1, timeout=10, interval=0.1, what="r2 to take the RTP flow over")
        at(f"r2 took over {taken_over(pair, 'r2')} bindings; RTCP starts")
        rtcp = lab.run("server", [sys.executable, RTP_PEERS, "send", "203.0.113.10", "40001", VIP["wan"][1], "5005",
                                  "rr*250"], timeout=60)  # 5 s: the rule the gateway asks r2 for lets it through
        at(f"RTCP sent: {rtcp.stdout.strip()}")
        at("r1: links up")
        pair.links("r1", "up")
        took = wait_master(pair, "r1", timeout=30)
        at(f"failback: r1 master after {took:.2f} s")
        killed = pair.kill_keepalived("r1")
        at(f"kill -9 keepalived on r1 (pid {killed})")
        took = wait_master(pair, "r2", timeout=15)
        at(f"r2 master after {took:.2f} s")
        took = wait_master(pair, "r1", timeout=30)
        at(f"r1's keepalived restarted by nfgate run; r1 master again after {took:.2f} s")
        refreshed = counter(pair, "r1", "refresh.updated")
        sent, _ = media.communicate(timeout=90)
        got = json.loads(sink.communicate(timeout=90)[0])
        layer = ask(tmp_path / "ag" / "run" / "gateway-rtp.sock", {"cmd": "stats"})["layer"]
        print(f"\nha, AG host: RTP at 50 datagrams/s through the rtp gateway: sent {sent.strip()}, received "
              f"{got['counts']}, longest stall {got['stall']} s; r1's processor refreshed {refreshed} entries; "
              f"the gateway moved its flows {layer.get('flows.moved', 0)} times, "
              f"{layer.get('flows.moved.same_node', 0)} of them taken over again by the node that held them")
        for t, name in events:
            print(f"  {t:7.2f} s  {name}")
        for t, gap in got["stalls"]:
            print(f"  RTP stall of {gap:.3f} s at {t:.2f} s")
        sent_n = json.loads(sent)["sent"]
        # Lost: what the stalls at the failovers held up (the sender does not retransmit), no more.
        assert got["counts"]["5004"] >= sent_n - 50 * (sum(gap for _, gap in got["stalls"]) + 1), got
        assert got["stall"] < 5, got
        # The move ended r1's rule at the gateway, which asked r2 at once: (nearly) all of it crossed.
        assert got["counts"]["5005"] >= 200, f"RTCP after the failover: {got}"
        # Each takeover moved the stream's flow at the gateway (at least r2's after the failure and r1's at
        # the end), none replaced it: a replacement closes the stream and opens a second leg B that the
        # live one's conntrack entry refuses (the same-node double takeover, docs/ha.md "Takeover").
        assert layer.get("flows.replaced", 0) == 0 and layer.get("flows.moved", 0) >= 2, layer
        # It crossed the rtp gateway (5005 is not forwarded): the RTCP flow joined the RTP flow's stream.
        joined = [line for line in pair.log("ag").splitlines() if " rtp stream.join " in line]
        assert any("role=rtcp" in line for line in joined), pair.log("ag")[-3000:]
        dump.terminate()
        dump.wait(timeout=10)
        leaked = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True).stdout
        assert leaked == "", f"half-NATed packets on the server's segment:\n{leaked[:2000]}"
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait()
        pair.stop()
