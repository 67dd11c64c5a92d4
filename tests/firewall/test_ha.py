"""[ha]: the config's checks, the files `nfgate ha render` writes for both nodes, and the pair's rules."""

from __future__ import annotations

import os
import subprocess
from ipaddress import ip_address
from pathlib import Path

import pytest
from click.testing import CliRunner

from firewall import config, ha
from firewall.cli import main
from firewall.errors import UsageError
from firewall.rules import build, nft

BASE = """
[zones.lan]
interfaces = ["lan0"]
[zones.wan]
interfaces = ["wan0"]
[ha]
sync_interface = "sync0"
advert_interval = 0.3
preempt_delay = 5
config_dir = "{tmp}/ha"
run_dir = "{tmp}/run"
[ha.nodes.r1]
priority = 150
sync_address = "172.31.252.1"
addresses = {{ lan = "192.168.1.2", wan = "203.0.113.2" }}
[ha.nodes.r2]
priority = 100
sync_address = "172.31.252.2"
addresses = {{ lan = "192.168.1.3", wan = "203.0.113.3" }}
[ha.virtual.lan]
address = "192.168.1.1/24"
vrid = 51
[ha.virtual.wan]
address = "203.0.113.1/24"
vrid = 52
"""


def load(tmp: Path, text: str = BASE) -> config.Config:
    return config.loads(text.format(tmp=tmp))


def problems(tmp: Path, old: str, new: str) -> list[str]:
    text = BASE.replace(old, new, 1)
    assert text != BASE
    with pytest.raises(config.ConfigError) as info:
        load(tmp, text)
    return [f"{p.path}: {p.reason}" for p in info.value.problems]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('"203.0.113.3" }', '"10.0.0.3" }', "ha.nodes.r2.addresses.wan: 10.0.0.3 is not in 203.0.113.0/24"),
    ("vrid = 52", "vrid = 51", "ha.virtual.wan.vrid: 51 is already ha.virtual.lan's"),
    ("priority = 100", "priority = 150", "ha.nodes: the two nodes need different priorities"),
    ("[ha.virtual.wan]", "[ha.virtual.dmz]", "ha.virtual.dmz: 'dmz' is neither a zone"),
    ('sync_interface = "sync0"', 'sync_interface = "lan0"', "ha.sync_interface: 'lan0' is in zone 'lan'"),
    ('sync_address = "172.31.252.2"', 'sync_address = "fd00::2"', "fd00::2 is not an IPv4 address"),
    ("advert_interval = 0.3", "advert_interval = 0", "ha.advert_interval: 0 is out of range"),
    ("[ha.nodes.r2]", "[ha.nodes.R2]", "ha.nodes.R2: node names are"),
    ("preempt_delay = 5", "preempt_delay = 5\nudp_refresh = 0.5", "ha.udp_refresh: 0.5 s is below 1 s"),
    ("preempt_delay = 5", "preempt_delay = 5\nudp_refresh = 3601", "ha.udp_refresh: 3601 is out of range"),
])
def test_each_mistake_is_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    found = problems(tmp_path, old, new)
    assert any(expected in p for p in found), found


def test_the_udp_refresh_is_on_by_default_and_0_or_1_turn_it_off_or_on(tmp_path: Path) -> None:
    assert load(tmp_path).ha.udp_refresh == 10.0  # type: ignore[union-attr]
    for text, value in (("0", 0.0), ("1", 1.0)):
        cfg = load(tmp_path, BASE.replace("preempt_delay = 5", f"preempt_delay = 5\nudp_refresh = {text}", 1))
        assert cfg.ha.udp_refresh == value  # type: ignore[union-attr]


def test_a_pair_without_gateways_starts_its_daemons_and_no_processor(tmp_path: Path, monkeypatch) -> None:
    """Nothing is queued without a [[gateway]], and a processor would refuse to start (and be restarted forever)."""
    from firewall import supervisor
    monkeypatch.setattr(supervisor, "local_node", lambda c: "r1")
    assert [c.name for c in supervisor.children_for(load(tmp_path), "x.toml")] == ["conntrackd", "keepalived"]


def test_a_killed_keepalived_leaves_the_node_recorded_as_fault_not_primary(tmp_path: Path, monkeypatch) -> None:
    """kill -9 of keepalived runs no notify script while its VRRP process gives the addresses up: the
    supervisor records fault (keepalived's exit hook), so the processors stop acting as master until
    the next transition."""
    import subprocess as sp

    from firewall import supervisor
    monkeypatch.setattr(supervisor, "local_node", lambda c: "r1")
    cfg = load(tmp_path)
    ha.record_state(cfg, "r1", "primary")
    assert ha.read_state(cfg, "r1")["vrrp"] == "primary"
    children = supervisor.ha_children(cfg, "r1")
    assert [c.name for c in children] == ["conntrackd", "keepalived"] and children[0].on_exit is None
    lines: list[str] = []
    sup = supervisor.Supervisor(cfg, "x.toml", children=children, log=lines.append)
    children[0].proc = sp.Popen(["true"])
    children[0].proc.wait()
    sup._reap(now=1.0)
    assert ha.read_state(cfg, "r1")["vrrp"] == "primary"  # conntrackd's death changes nothing of VRRP
    children[1].proc = sp.Popen(["true"])
    children[1].proc.wait()
    sup._reap(now=2.0)
    state = ha.read_state(cfg, "r1")
    assert state["vrrp"] == "fault" and state["transitions"] == 2, state
    assert "keepalived: gone: node recorded as fault until its next transition" in lines


def test_keepalived_is_known_by_its_name_and_its_config_file() -> None:
    conf = Path("/run/ha/r1/keepalived.conf")
    argv = [b"/usr/sbin/keepalived", b"-n", b"-P", b"-f", bytes(conf), b"-p", b"/run/x.pid"]
    assert ha.runs_keepalived(b"\0".join(argv) + b"\0", conf)
    assert not ha.runs_keepalived(b"\0".join(argv) + b"\0", Path("/run/ha/r2/keepalived.conf"))  # the other node's
    assert not ha.runs_keepalived(b"\0".join([b"/usr/bin/python3", *argv[1:]]) + b"\0", conf)  # a reused pid
    assert not ha.runs_keepalived(b"\0".join([argv[0], bytes(conf)]) + b"\0", conf)  # no -f before it
    assert not ha.runs_keepalived(b"", conf)


def test_keepalived_leftovers_are_the_live_processes_its_pid_files_name_that_run_the_nodes_config(tmp_path: Path) -> None:
    """What a killed keepalived left (its VRRP child) holds the start of the next back; a pid file
    naming a zombie, a process that reused the pid, or the other node's keepalived does not."""
    import subprocess as sp
    import sys

    cfg = load(tmp_path)
    p = ha.paths(cfg.ha, "r1")  # type: ignore[arg-type]
    parent, vrrp, checkers = ha.pid_files(p)
    assert ha.daemons(cfg, "r1")["keepalived"][-6:] == ["-p", str(parent), "-r", str(vrrp), "-c", str(checkers)]
    assert ha.keepalived_stale_files(cfg, "r1") == [parent, vrrp, checkers]
    p.run_dir.mkdir(parents=True)
    fake = tmp_path / "bin" / "keepalived"  # a process whose argv[0] is keepalived, as its children's are
    fake.parent.mkdir()
    fake.symlink_to(sys.executable)
    sleep = "import time; time.sleep(60)"
    mine = sp.Popen([str(fake), "-c", sleep, "-f", str(p.keepalived)])
    other = sp.Popen([str(fake), "-c", sleep, "-f", str(ha.paths(cfg.ha, "r2").keepalived)])  # type: ignore[arg-type]
    zombie = sp.Popen([str(fake), "-c", "pass", "-f", str(p.keepalived)])
    try:
        assert ha.keepalived_leftovers(cfg, "r1") == []  # no pid file
        parent.write_text("garbage\n")
        vrrp.write_text(f"{mine.pid}\n")
        checkers.write_text(f"{mine.pid}\n")  # named twice, counted once
        assert ha.keepalived_leftovers(cfg, "r1") == [mine.pid]
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        for pid in (other.pid, os.getpid(), zombie.pid):
            parent.write_text(f"{pid}\n")
            assert ha.keepalived_leftovers(cfg, "r1") == [mine.pid], pid
        mine.kill()
        mine.wait()
        assert ha.keepalived_leftovers(cfg, "r1") == []
    finally:
        for proc in (mine, other, zombie):
            proc.kill()
            proc.wait()


def test_a_second_nfgate_run_for_the_same_node_is_refused_whatever_its_state_directory(tmp_path: Path, monkeypatch) -> None:
    """Two supervisors of one node would each start keepalived and conntrackd (and remove the
    other's pid files and lock as stale): the node lock in ``ha.run_dir`` refuses the second."""
    from firewall import state, supervisor
    cfg = load(tmp_path)
    second = cfg.model_copy(update={"supervisor": cfg.supervisor.model_copy(
        update={"control_socket": tmp_path / "elsewhere" / "control.sock"})})
    monkeypatch.setattr(supervisor, "local_node", lambda c: "r1")
    first = supervisor.Supervisor(cfg, "x.toml", children=[], log=lambda line: None)
    first.claim()
    try:
        with pytest.raises(state.NodeTaken, match=f"pid {os.getpid()}.*one nfgate run per node"):
            supervisor.Supervisor(second, "y.toml", children=[], log=lambda line: None).claim()
        assert state.running_pid(second) is None  # the refused one let its own run lock go
        monkeypatch.setattr(supervisor, "local_node", lambda c: "r2")
        other = supervisor.Supervisor(second, "y.toml", children=[], log=lambda line: None)
        other.claim()  # the other node, as in the lab: both on one host
        other._release()
    finally:
        first._release()
    assert ha.node_lock(cfg, "r1") == tmp_path / "run" / "nfgate-r1.lock"


def test_a_reload_cannot_move_the_run_dir_that_holds_the_node_lock(tmp_path: Path, monkeypatch) -> None:
    from firewall import supervisor
    monkeypatch.setattr(supervisor, "local_node", lambda c: "r1")
    path = tmp_path / "nfgate.toml"
    path.write_text(BASE.format(tmp=tmp_path))
    sup = supervisor.Supervisor(config.load(str(path)), str(path), children=[], log=lambda line: None)
    path.write_text(BASE.format(tmp=tmp_path).replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{tmp_path}/run2"'))
    with pytest.raises(UsageError, match="ha.run_dir changed"):
        sup.reload()


def test_refreshing_every_udp_copy_without_gateways_is_a_hazard(tmp_path: Path) -> None:
    from firewall.hazards import hazards
    cfg = load(tmp_path, BASE.replace("preempt_delay = 5", "preempt_delay = 5\nudp_refresh_all = true", 1))
    found = [h for h in hazards(cfg) if h.path == "ha.udp_refresh_all"]
    assert len(found) == 1 and "runs no processor" in str(found[0]), hazards(cfg)
    assert not [h for h in hazards(load(tmp_path)) if h.path == "ha.udp_refresh_all"]


def test_a_pair_has_two_nodes(tmp_path: Path) -> None:
    text = BASE[: BASE.index("[ha.nodes.r2]")] + BASE[BASE.index("[ha.virtual.lan]"):]
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, text)
    assert any("an HA pair has two nodes, not 1" in p.reason for p in info.value.problems)


def test_each_nodes_files_name_the_other_as_its_peer(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    files = ha.render(cfg)
    assert set(files) == {"r1", "r2"}
    ka = files["r1"][tmp_path / "ha" / "r1" / "keepalived.conf"]
    assert "unicast_src_ip 192.168.1.2\n  unicast_peer {\n    192.168.1.3\n  }" in ka
    assert "virtual_ipaddress {\n    203.0.113.1/24 dev wan0\n  }" in ka
    assert "priority 150" in ka and "advert_int 0.3" in ka and "preempt_delay 5" in ka and "vrrp_version 3" in ka
    assert f'notify_master "{tmp_path}/ha/r1/notify.sh primary"' in ka
    assert ka.count("state BACKUP") == 2  # both start as backup: priority elects, preempt_delay guards the return
    ct = files["r2"][tmp_path / "ha" / "r2" / "conntrackd.conf"]
    assert "IPv4_address 172.31.252.2\n    IPv4_Destination_Address 172.31.252.1" in ct
    assert "DisableExternalCache On" in ct and "Interface sync0" in ct
    for path in ("conntrackd-r2.lock", "conntrackd-r2.ctl", "conntrackd-r2.log"):
        assert f"{tmp_path}/run/{path}" in ct
    # The virtual addresses are not ignored: flows on them are the ones to copy.
    assert "IPv4_address 203.0.113.1\n" not in ct and "IPv4_address 203.0.113.3\n" in ct


def test_the_notify_script_forgets_its_cache_before_it_flushes_the_kernel_table(tmp_path: Path) -> None:
    script = ha.render(load(tmp_path))["r1"][tmp_path / "ha" / "r1" / "notify.sh"]
    backup = script[script.index("  backup)"): script.index("  fault)")]
    assert backup.index("ctd -f") < backup.index(" -F ") < backup.index("ctd -n")
    primary = script[script.index("  primary)"): script.index("  backup)")]
    assert primary.index("ctd -f") < primary.index("ctd -R") < primary.index("ctd -B")
    assert "ctd -c" not in script  # no commit: the entries are in the kernel already
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0


def test_the_notify_script_records_each_state(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    ha.write(cfg)
    (tmp_path / "run").mkdir()
    # conntrackd is not running here: its commands fail, and the state is recorded all the same.
    for state in ("backup", "primary"):
        subprocess.run([str(tmp_path / "ha" / "r1" / "notify.sh"), state], check=True, timeout=60)
    got = ha.read_state(cfg, "r1")
    assert got["vrrp"] == "primary" and got["transitions"] == 2 and got["last_failover"] == got["since"]
    assert ha.read_state(cfg, "r2")["vrrp"] == "unknown"


def test_render_writes_both_nodes_and_the_notify_script_is_executable(tmp_path: Path) -> None:
    path = tmp_path / "nfgate.toml"
    path.write_text(BASE.format(tmp=tmp_path))
    out = CliRunner().invoke(main, ["ha", "render", "-c", str(path), "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert len(out.output.split()) == 6
    notify = tmp_path / "out" / "r2" / "notify.sh"
    assert notify.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "r1" / "keepalived.conf").stat().st_mode & 0o777 == 0o644


def test_a_node_is_the_one_whose_sync_address_the_host_holds(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert ha.local_node(cfg, {ip_address("172.31.252.2"), ip_address("127.0.0.1")}) == "r2"
    with pytest.raises(UsageError, match="sync address of 0 nodes"):
        ha.local_node(cfg, {ip_address("127.0.0.1")})
    with pytest.raises(UsageError, match="sync address of 2 nodes"):
        ha.local_node(cfg, {ip_address("172.31.252.1"), ip_address("172.31.252.2")})


def test_the_rules_let_vrrp_and_the_sync_in(tmp_path: Path) -> None:
    text = nft.render(build(load(tmp_path)))
    assert 'iifname "lan0" meta l4proto vrrp ip saddr { 192.168.1.2, 192.168.1.3 } counter accept' in text
    assert 'iifname "sync0" ip saddr { 172.31.252.1, 172.31.252.2 } udp dport 3780 counter accept' in text
    assert "vrrp" not in nft.render(build(config.loads(BASE[: BASE.index("[ha]")])))


STATS = """cache internal:
current active connections:\t           3
connections created:\t\t           7\tfailed:\t           0

external inject:
connections created:\t\t          12\tfailed:\t           1
connections updated:\t\t           2\tfailed:\t           0

UDP traffic (active device=sync0):
                 116 Bytes sent                  2048 Bytes recv
                   5 Pckts sent                    40 Pckts recv
                   0 Error send                     2 Error recv

message tracking:
                   0 Malformed msgs                    4 Lost msgs
"""


def test_conntrackds_statistics_are_read_by_section() -> None:
    assert ha.parse_sync_stats(STATS) == {
        "entries": 3, "injected": 12, "inject_failed": 1, "bytes_sent": 116, "bytes_recv": 2048,
        "packets_sent": 5, "packets_recv": 40, "errors_send": 0, "errors_recv": 2, "lost": 4,
    }


def test_the_metrics_show_the_state_the_last_failover_and_the_sync() -> None:
    from firewall.metrics import ha_metrics

    status = {"node": "r1", "vrrp": "backup", "transitions": 3, "last_failover": 1700000000.5,
              "sync": {"running": True, **ha.parse_sync_stats(STATS)}}
    got = {(m.name, tuple(sorted(s.labels.items()))): s.value for m in ha_metrics(status) for s in m.samples}
    assert got[("nfgate_ha_state", (("node", "r1"), ("state", "backup")))] == 1
    assert got[("nfgate_ha_state", (("node", "r1"), ("state", "primary")))] == 0
    assert got[("nfgate_ha_last_failover_timestamp_seconds", (("node", "r1"),))] == 1700000000.5
    assert got[("nfgate_ha_sync", (("counter", "lost"), ("node", "r1")))] == 4
    assert got[("nfgate_ha_sync_up", (("node", "r1"),))] == 1
    assert ha_metrics(None) == []


def test_check_warns_of_flows_that_cannot_move(tmp_path: Path) -> None:
    from firewall.hazards import hazards

    assert hazards(load(tmp_path)) == [h for h in hazards(load(tmp_path)) if h.path == "policy.input"]
    text = BASE.replace("[ha]\n", "[nat]\nmasquerade = [\"wan\"]\n[policy]\ndrop_invalid = false\n[ha]\n", 1)
    found = {h.path: h.message for h in hazards(load(tmp_path, text))}
    assert "cannot survive a failover" in found["nat.masquerade"]
    assert "wrongly NATed" in found["policy.drop_invalid"]


@pytest.mark.parametrize("before, new, became", [
    (None, ["primary"], True),  # the first read: master from the start
    ("backup", ["primary"], True),
    ("primary", ["backup", "primary"], True),  # a failover and a failback between two reads
    ("primary", ["fault", "backup", "primary"], True),
    ("primary", ["primary"], False),  # recorded again, never left
    ("primary", [], False),
    ("backup", ["primary", "backup"], False),  # master for a moment, backup now: nothing to take over
    ("primary", ["backup"], False),
])
def test_a_takeover_is_seen_even_when_the_node_left_and_came_back_between_two_reads(before, new, became) -> None:
    assert ha.became_primary(before, new) is became


def test_read_events_keeps_every_transition_and_skips_a_cut_line(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    for state in ("backup", "primary", "backup", "primary"):
        ha.record_state(cfg, "r1", state)
    with open(ha.paths(cfg.ha, "r1").state, "a") as f:
        f.write('{"state": "fau')  # a crash in the middle of a line
    assert [e["state"] for e in ha.read_events(cfg, "r1")] == ["backup", "primary", "backup", "primary"]
    assert ha.read_events(cfg, "r2") == []
