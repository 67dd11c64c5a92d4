"""The supervisor: restart with backoff, isolation, control socket, clean stop.

The processes it supervises are stand-ins here; the end-to-end tests of
`nfgate run` with the real processor and gateways live beside the processor's.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firewall import supervisor
from firewall.cli import main
from firewall.config import loads
from firewall.control import Command, ControlError, ask
from firewall.errors import KernelError
from firewall.lab.wait import wait_for
from firewall.processor import runner
from firewall.supervisor import Child, Supervisor, query
from tests.firewall.test_control import selector_server

HERE = Path(__file__).parent

CONFIG = """
[zones.wan]
interfaces = ["wan0"]
[zones.lan]
interfaces = ["lan0"]
[gateway_link]
netns = "{gwns}"
[signalling]
key_file = "{tmp}/signalling.key"
[supervisor]
control_socket = "{tmp}/control.sock"
restart_initial = 0.2
restart_max = 1.6
stable_after = 30
stop_timeout = 2
[[gateway]]
name = "relay"
kind = "tcp-relay"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 8443
"""


def test_backoff_doubles_and_resets() -> None:
    config = loads(CONFIG.format(gwns="x", tmp="/tmp"))
    child = Child("c", "gateway", ["true"], started=99.0)  # crashes one second after each start
    sup = Supervisor(config, "c.toml", children=[child], log=lambda line: None)
    delays = []
    for _ in range(6):
        sup._schedule(child, now=100.0)
        delays.append(round(child.next_start - 100.0, 2))
    assert delays == [0.2, 0.4, 0.8, 1.6, 1.6, 1.6]
    child.started = 0.0
    sup._schedule(child, now=100.0)  # it had run 100 s > stable_after: back to the shortest wait
    assert round(child.next_start - 100.0, 2) == 0.2


def test_a_start_waits_for_what_the_childs_earlier_run_left_then_kills_it_after_stop_timeout(tmp_path: Path) -> None:
    """keepalived's VRRP child outlives its killed parent by about a second and holds its pid file:
    the next start waits for such leftovers (not counted as a crash), polling, kills them after
    ``stop_timeout`` (2 s here), then removes the stale files and starts."""
    config = loads(CONFIG.format(gwns="x", tmp=tmp_path))
    stale = tmp_path / "old.pid"
    left = subprocess.Popen(["sleep", "60"])
    child = Child("daemon", "ha", ["sleep", "60"], notifies=False, stale=(stale,),
                  leftovers=lambda: [left.pid] if left.poll() is None else [])
    lines: list[str] = []
    sup = Supervisor(config, "c.toml", children=[child], log=lines.append)
    try:
        stale.write_text(f"{left.pid}\n")
        sup._start(child, 10.0)
        assert child.proc is None and child.next_start == pytest.approx(10.0 + supervisor.HOLD_POLL)
        assert stale.exists() and child.restarts == 0
        assert lines == [f"daemon: waiting for pid {left.pid} of its earlier run to exit"]
        sup._start(child, 11.9)  # not yet stop_timeout: still waiting, nothing killed, nothing logged again
        assert child.proc is None and left.poll() is None and len(lines) == 1
        sup._start(child, 12.0)
        assert "still there 2s on: killing" in lines[-1]
        assert left.wait(timeout=5) == -signal.SIGKILL
        sup._start(child, 12.05)
        assert child.running and child.next_start is None and child.held_until is None and not stale.exists()
    finally:
        for proc in (left, child.proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_start_goes_on_at_once_when_the_earlier_run_left_nothing(tmp_path: Path) -> None:
    config = loads(CONFIG.format(gwns="x", tmp=tmp_path))
    child = Child("daemon", "ha", ["true"], notifies=False, leftovers=lambda: [])
    sup = Supervisor(config, "c.toml", children=[child], log=lambda line: None)
    sup._start(child, 10.0)
    assert child.proc is not None and child.proc.wait(timeout=5) == 0


class Processor:
    """What the processor's command table calls on its ``Runner``."""

    def __init__(self, flows: list[dict[str, Any]]) -> None:
        self._flows = flows

    def stats(self) -> dict[str, Any]:
        return {"counters": {"queued": 3}, "flows": len(self._flows)}

    def flows(self, limit: int) -> list[dict[str, Any]]:
        return self._flows[:limit]

    def rules(self, limit: int) -> list[dict[str, Any]]:
        return [{"kind": "offload", "src": "203.0.113.10:5000"}][:limit]


BUSY = {"stats": Command(lambda p, a: _busy()), "flows": Command(lambda p, a: _busy())}


def _busy() -> Any:
    raise ControlError("busy")


def test_status_and_flows_gather_every_processors_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the supervisor's control socket, as `nfgate status` and `nfgate flows` ask."""
    monkeypatch.setattr("firewall.cli.require_root", lambda what: None)  # the socket's own mode is the guard here
    path = tmp_path / "nfgate.toml"
    path.write_text(CONFIG.format(gwns="x", tmp=tmp_path))
    config = loads(path.read_text())
    sleeper = subprocess.Popen(["sleep", "60"])
    names = ["processor-0", "processor-1", "processor-2", "processor-3"]
    children = [Child(name, "processor", [], tmp_path / f"{name}.sock", proc=sleeper) for name in names]
    children[3].proc = None  # never started
    sup = Supervisor(config, str(path), children=children, log=lambda line: None)
    flow = {"gateway": "relay", "proto": "tcp", "client": "203.0.113.10:40000"}
    try:
        with (
            selector_server(tmp_path / "processor-0.sock", runner.COMMANDS, Processor([flow])),
            selector_server(tmp_path / "processor-1.sock", BUSY),  # processor-2 has no socket
            selector_server(config.supervisor.control_socket, supervisor.COMMANDS, sup),
        ):
            status = query(config, "status")
            assert [p["name"] for p in status["processes"]] == names
            assert status["processors"]["processor-0"] == {"counters": {"queued": 3}, "flows": 1}
            assert status["processors"]["processor-1"] == {"error": "busy"}
            assert status["processors"]["processor-2"]["error"].startswith("no answer: ")
            assert status["processors"]["processor-3"] == {"error": "not running"}
            assert query(config, "flows") == [flow]
            with pytest.raises(KernelError, match="unknown command 'nonsense'"):
                query(config, "nonsense")
            shown = CliRunner().invoke(main, ["flows", "-c", str(path)])
            assert shown.output == ("tcp 203.0.113.10:40000 -> - (server -)  gateway relay  -\n"
                                    "  firewall side -, gateway -, snat -, since -, flow - on queue -\n")
            shown = CliRunner().invoke(main, ["flows", "--rules", "-c", str(path)])  # the dynamic rules' view
            assert shown.output == ("offload - 203.0.113.10:5000 -> -  gateway -  -\n"
                                    "  rule - on queue -, flow -, reusable\n")
            shown = CliRunner().invoke(main, ["status", "-c", str(path)])
            assert "processor-0:\n  counters.queued = 3\n  flows = 1\n" in shown.output
            assert "processor-3:\n  error = not running\n" in shown.output
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(KernelError, match="nfgate is not running here"):
        query(config, "status")


WORKER = """
import os, sys, time
fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
os.write(fd, b"ready\\n")
time.sleep(60)
"""


def test_a_workers_readiness_and_death_reach_the_processors_at_once(tmp_path: Path) -> None:
    """workers = 2: each worker says ready on its pipe and the processors are told the live set;
    a SIGKILL ends the pipe, and they are told within milliseconds, before any reaping."""
    config = loads(CONFIG.format(gwns="x", tmp=tmp_path).replace('kind = "tcp-relay"\n', 'kind = "tcp-relay"\nworkers = 2\n'))
    told: list[Any] = []
    table = {"workers": Command(lambda p, a: told.append(a["live"]) or a["live"], args={"live": runner._live})}
    sleeper = subprocess.Popen(["sleep", "60"])
    processor = Child("processor-0", "processor", [], tmp_path / "processor-0.sock", proc=sleeper)
    workers = [Child(f"gateway-relay#{i}", "gateway", [sys.executable, "-c", WORKER], gateway="relay", worker=i,
                     watched=True) for i in range(2)]
    sup = Supervisor(config, "c.toml", children=[processor, *workers], log=lambda line: None)
    sel = selectors.DefaultSelector()
    sup._sel = sel

    def pump() -> list[Any]:
        for key, _ in sel.select(0.01):
            key.data(key.fileobj)
        return told

    try:
        with selector_server(tmp_path / "processor-0.sock", table, None):
            for w in workers:
                sup._start(w, 0.0)
            wait_for(lambda: pump() and told[-1] == {"relay": [0, 1]}, timeout=10, interval=0.01, what="both ready")
            assert all(w.describe(0.0)["ready"] for w in workers)
            workers[1].proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: pump()[-1] == {"relay": [0]}, timeout=5, interval=0.001, what="worker 1 gone")
            assert time.monotonic() - killed < 0.1
            assert workers[1].ready is False and workers[1].ready_fd is None
    finally:
        for c in (*workers, processor):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        sel.close()


@pytest.mark.netns
def test_restart_isolation_and_clean_stop(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    gwns = f"{lab.prefix}-gw"
    path = tmp_path / "nfgate.toml"
    path.write_text(CONFIG.format(gwns=gwns, tmp=tmp_path))
    control = tmp_path / "control.sock"
    log = open(tmp_path / "run.log", "w")
    sup = lab.popen("router", [sys.executable, str(HERE / "supervised.py"), str(path), "2"], stdout=log, stderr=subprocess.STDOUT)

    def status():
        return ask(control, {"cmd": "status"})

    def pids():
        return {p["name"]: p["pid"] for p in status()["processes"]}

    first = wait_for(lambda: all(pids().values()) and pids(), timeout=10, what="both stand-ins running", ignore=(OSError, ValueError))
    assert oct(control.stat().st_mode & 0o777) == "0o600"
    assert Path("/run/netns", gwns).exists()
    assert "NFGATE-MANGLE-PREROUTING" in lab.run("router", ["iptables-nft-save"]).stdout

    os.kill(first["standin-0"], signal.SIGKILL)
    again = wait_for(
        lambda: (p := pids())["standin-0"] not in (None, first["standin-0"]) and p,
        timeout=2.0,
        interval=0.05,
        what="standin-0 restarted within 2 s",
        ignore=(OSError, ValueError),
    )
    assert again["standin-1"] == first["standin-1"]  # the sibling never noticed
    described = {p["name"]: p for p in status()["processes"]}
    assert described["standin-0"]["restarts"] == 1 and described["standin-0"]["last_exit"] == -9
    with pytest.raises(ControlError, match=r"unknown command 'nonsense' \(one of status, flows, rules, reload\)"):
        ask(control, {"cmd": "nonsense"})

    sup.terminate()
    assert sup.wait(timeout=15) == 0
    for pid in again.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not control.exists()
    assert not Path("/run/netns", gwns).exists()
    # The static rules stay; the steering is stopped (fail closed: dropped, never queued).
    saved = lab.run("router", ["iptables-nft-save"]).stdout
    assert "NFGATE-FORWARD" in saved and "NFQUEUE" not in saved, saved
