"""Observability without a lab: the notify protocol, the metrics' totals and exposition,
the log formats (journald priority, JSON), and the CLI's readable and --json outputs."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from firewall import eventlog, sdnotify
from firewall.cli import flow_lines, main
from firewall.jsondoc import JSON_SCHEMA_VERSION
from firewall.signalling import Endpoint, Proto
from firewall.config import loads
from firewall.control import Command
from firewall.lab.wait import wait_for
from firewall.metrics import Metrics, Process, Totals, parse_listen
from firewall.supervisor import Child, Supervisor
from tests.firewall.test_control import selector_server
from tests.firewall.test_supervisor import CONFIG as SUPERVISED

# ---- sd_notify ----------------------------------------------------------------------------


def test_listener_names_the_sender_by_its_pid(tmp_path: Path) -> None:
    listener = sdnotify.Listener(tmp_path / "notify.sock")
    try:
        child = subprocess.run(
            [sys.executable, "-c", "from firewall import sdnotify; import os; print(os.getpid()); "
             "assert sdnotify.notify('READY=1\\nSTATUS=up')"],
            env={**os.environ, "NOTIFY_SOCKET": str(listener.path)}, capture_output=True, text=True, check=True,
        )
        got = listener.receive()
        assert got == [(int(child.stdout), {"READY": "1", "STATUS": "up"})]
        assert listener.receive() == []
        assert oct(listener.path.stat().st_mode & 0o777) == "0o600"
    finally:
        listener.close()
    assert not listener.path.exists()


def test_notify_without_a_socket_does_nothing_and_an_abstract_one_works() -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    name = f"nfgate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_watchdog_interval_is_half_the_period_for_this_process_only() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({}) is None


# ---- metrics ---------------------------------------------------------------------------


def test_totals_carry_what_earlier_instances_counted() -> None:
    totals = Totals()
    assert totals.observe("processor-0", 10, {"queued": 5}) == {"queued": 5}
    assert totals.observe("processor-0", 10, {"queued": 7, "drop.x": 1}) == {"queued": 7, "drop.x": 1}
    assert totals.carried("processor-0") == {"queued": 7, "drop.x": 1}  # dead, not yet back
    assert totals.observe("processor-0", 11, {"queued": 2}) == {"queued": 9, "drop.x": 1}
    # The same pid, counting from zero again (a pid reused): a new instance too.
    assert totals.observe("processor-0", 11, {"queued": 1}) == {"queued": 10, "drop.x": 1}
    assert totals.observe("gateway-a", 11, {"relay.x": 1}) == {"relay.x": 1}
    # A counter missing from one answer of the same instance keeps its value.
    assert totals.observe("gateway-a", 11, {}) == {"relay.x": 1}
    assert totals.observe("gateway-a", 11, {"relay.x": 2}) == {"relay.x": 2}


def test_parse_listen() -> None:
    assert parse_listen("") is None
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_listen("[::1]:9469") == ("::1", 9469)


class Stats:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer


STATS = {"stats": Command(lambda target, args: target.answer)}


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_expose_processor_and_gateway_counters_across_a_restart(tmp_path: Path) -> None:
    processor = Stats({
        "counters": {"queued": 4, "queue.overflow": 1, "queue.kernel.dropped_full": 2, "queue.kernel.waiting": 3},
        "flows": 2, "logged_flows": 0, "rules": 1, "flows_per_gateway": {"relay": 2},
        "pools": {"firewall_side": {"used": 2, "capacity": 100, "exhausted": 0},
                  "snat": {"203.0.113.1": {"used": 1, "capacity": 10, "exhausted": 1}}},
    })
    gateway = Stats({"active": 1, "layer": {"lookups.hit": 2}, "relay": {"connections.accepted": 3}, "buffered": 10})
    children = [Process("processor-0", "processor", 100, 0, tmp_path / "p.sock"),
                Process("gateway-relay", "gateway", 200, 0, tmp_path / "g.sock"),
                Process("gateway-tun", "gateway", None, 2, None)]
    metrics = Metrics(lambda: children, poll=60)
    with selector_server(tmp_path / "p.sock", STATS, processor), selector_server(tmp_path / "g.sock", STATS, gateway):
        got = samples(metrics)
        assert got[("nfgate_processor_events_total", (("counter", "queued"), ("processor", "processor-0")))] == 4
        assert ("nfgate_processor_events_total", (("counter", "queue.kernel.waiting"), ("processor", "processor-0"))) not in got
        assert got[("nfgate_processor_queue_waiting", (("processor", "processor-0"),))] == 3
        assert got[("nfgate_processor_queue_overflow_total", (("processor", "processor-0"),))] == 3
        assert got[("nfgate_bindings", (("gateway", "relay"), ("processor", "processor-0")))] == 2
        assert got[("nfgate_pool_used", (("address", "203.0.113.1"), ("pool", "snat"), ("processor", "processor-0")))] == 1
        assert got[("nfgate_pool_exhausted_total", (("address", "203.0.113.1"), ("pool", "snat"), ("processor", "processor-0")))] == 1
        assert got[("nfgate_gateway_events_total", (("counter", "relay.connections.accepted"), ("gateway", "relay")))] == 3
        assert got[("nfgate_gateway_active_connections", (("gateway", "relay"),))] == 1
        assert got[("nfgate_process_up", (("kind", "gateway"), ("process", "gateway-tun")))] == 0
        assert got[("nfgate_process_restarts_total", (("kind", "gateway"), ("process", "gateway-tun")))] == 2
        # The processor is restarted (another pid) and counts from zero: the totals go on.
        children[0] = Process("processor-0", "processor", 101, 1, tmp_path / "p.sock")
        processor.answer = {**processor.answer, "counters": {"queued": 1}}
        got = samples(metrics)
        assert got[("nfgate_processor_events_total", (("counter", "queued"), ("processor", "processor-0")))] == 5
        assert got[("nfgate_processor_queue_overflow_total", (("processor", "processor-0"),))] == 3
    # Nobody answers: the totals stay, and the process says its stats are missing.
    got = samples(metrics)
    assert got[("nfgate_processor_events_total", (("counter", "queued"), ("processor", "processor-0")))] == 5
    assert got[("nfgate_process_stats_ok", (("kind", "processor"), ("process", "processor-0")))] == 0


# ---- logs -----------------------------------------------------------------------------------


def emit_one(json_lines: bool, journal: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    out = tmp_path / "err"
    with open(out, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "0:0")
        eventlog.configure("nfgate.test.events", "gateway", json_lines, stream)
        log = eventlog.EventLog("gateway", "relay", logging.getLogger("nfgate.test.events"))
        log.warn("open", client="203.0.113.10:40000", original_dst="203.0.113.1:8443")
    return out.read_text()


def test_the_journal_gets_each_lines_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = emit_one(False, True, tmp_path, monkeypatch)
    assert text.startswith("<4>20") and " relay open client=203.0.113.10:40000 " in text
    assert emit_one(False, False, tmp_path, monkeypatch).startswith("20")
    line = emit_one(True, True, tmp_path, monkeypatch)
    assert line.startswith("<4>{")
    doc = json.loads(line[3:])
    assert doc["level"] == "warning" and isinstance(doc["ts"], float)
    assert (doc["src_ip"], doc["src_port"], doc["dest_ip"], doc["dest_port"]) == ("203.0.113.10", 40000, "203.0.113.1", 8443)


_FIELDS: dict[str, Any] = {
    "public": 8301, "client": Endpoint(ipaddress.ip_address("203.0.113.10"), 40000),  # as the gateways give it
    "original_dst": "203.0.113.1:8443", "reason": "a b",
    "quote": 'x"y', "eq": "a=b", "empty": "", "none": None, "flag": True, "ratio": 1.23456, "tab": "a\tb",
    "list": [1, "a b", ipaddress.ip_address("10.0.0.1")], "map": {"x": 1, "y": "a b"},
    "ip": ipaddress.ip_address("2001:db8::1"), "proto": Proto.TCP, "big": 2**70,
}


_GOLDEN = {
    False: '2025-12-06T05:46:40.122Z relay close public=8301 client=203.0.113.10:40000 original_dst=203.0.113.1:8443 '
           'reason="a b" quote="x\\"y" eq="a=b" empty="" none=None flag=True ratio=1.235 tab="a\\tb" '
           'list=[1,"a b","10.0.0.1"] map.x=1 map.y="a b" ip=2001:db8::1 proto=TCP big=1180591620717411303424\n',
    True: '{"ts":1765000000.123,"level":"warning","gateway":"relay","event":"close","public":8301,'
          '"client":"203.0.113.10:40000","original_dst":"203.0.113.1:8443","reason":"a b","quote":"x\\"y",'
          '"eq":"a=b","empty":"","none":null,"flag":true,"ratio":1.235,"tab":"a\\tb","list":[1,"a b","10.0.0.1"],'
          '"map":{"x":1,"y":"a b"},"ip":"2001:db8::1","proto":"TCP","big":1180591620717411303424,'
          '"src_ip":"203.0.113.10","src_port":40000,"dest_ip":"203.0.113.1","dest_port":8443}\n',
}


@pytest.mark.parametrize("json_lines", [False, True])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_an_event_written_directly_is_the_line_logging_writes(
    json_lines: bool, level: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A configured event logger's lines skip the logging module (half their
    cost); each must be the very line its handler writes for the record."""
    monkeypatch.setattr(eventlog.time, "time", lambda: 1765000000.123)
    direct, through = io.StringIO(), io.StringIO()
    handler = eventlog.configure("nfgate.test.direct", "gateway", json_lines, direct)
    logger = logging.getLogger("nfgate.test.direct")
    eventlog.EventLog("gateway", "relay", logger).emit("close", level, **_FIELDS)
    record = logger.makeRecord(logger.name, level, "", 0, "%s", ("close",), None, extra={
        "event": "close", "gateway": "relay", "fields": {k: eventlog.plain(v) for k, v in _FIELDS.items()}})
    record.created = 1765000000.123
    through.write(handler.format(record) + "\n")
    assert direct.getvalue() == through.getvalue()
    if level == logging.WARNING:
        assert direct.getvalue() == _GOLDEN[json_lines]  # as every nfgate line has been written so far


def test_another_handler_or_a_filter_on_an_event_logger_sees_every_record() -> None:
    """The direct write is for a logger whose only way out is the handler
    ``configure`` gave it, with its formatter: a handler added beside it (a
    test's, an operator's) gets the records, a filter is obeyed, and
    another formatter writes its own lines."""
    stream = io.StringIO()
    eventlog.configure("nfgate.test.beside", "gateway", False, stream)
    logger = logging.getLogger("nfgate.test.beside")
    log = eventlog.EventLog("gateway", "relay", logger)
    seen: list[logging.LogRecord] = []
    beside = logging.Handler()
    beside.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(beside)
    try:
        log.emit("open", client="203.0.113.10:40000")
    finally:
        logger.removeHandler(beside)
    assert [r.event for r in seen] == ["open"] and " relay open client=203.0.113.10:40000" in stream.getvalue()  # type: ignore[attr-defined]
    quiet = logging.Filter("nothing.of.ours")
    logger.addFilter(quiet)
    try:
        log.emit("dropped")
    finally:
        logger.removeFilter(quiet)
    log.emit("kept")
    assert "dropped" not in stream.getvalue() and stream.getvalue().count("\n") == 2
    logger.handlers[0].setFormatter(logging.Formatter("plain %(message)s"))  # an operator's own format
    log.emit("formatted")
    assert stream.getvalue().endswith("\nplain formatted\n")


def test_a_broken_log_stream_is_not_the_callers_error(capsys: pytest.CaptureFixture[str]) -> None:
    """stderr gone (EPIPE): as logging's own emit, the line is reported as a logging error, not raised."""

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    eventlog.configure("nfgate.test.broken", "gateway", False, Broken())
    eventlog.EventLog("gateway", "relay", logging.getLogger("nfgate.test.broken")).emit("open", port=1)
    assert "--- Logging error ---" in capsys.readouterr().err


def test_every_line_of_a_process_is_json_even_an_uncaught_exception() -> None:
    script = ("import logging, warnings\nfrom firewall import eventlog\n"
              "eventlog.configure_process('nfgate test', True)\n"
              "logging.getLogger('some.library').warning('careful')\n"
              "warnings.warn('old')\nraise RuntimeError('boom')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    docs = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [d["level"] for d in docs] == ["warning", "warning", "critical"]
    assert docs[0] == {**docs[0], "process": "nfgate test", "message": "careful"}
    assert "RuntimeError: boom" in docs[2]["exception"]


def test_text_lines_have_a_time_and_the_speaker() -> None:
    stream = io.StringIO()
    eventlog.configure_process("nfgate run", False, stream)
    try:
        logging.getLogger("nfgate.run").warning("%s", "reload refused")
    finally:
        eventlog.configure_process("nfgate run", False)
    assert stream.getvalue().endswith("Z nfgate run: warning: reload refused\n")
    time.strptime(stream.getvalue()[:19], "%Y-%m-%dT%H:%M:%S")


# ---- the CLI ------------------------------------------------------------------------------


def test_flows_are_shown_with_local_times_and_state_names() -> None:
    flow = {"proto": "tcp", "client": "203.0.113.10:40000", "original_dst": "203.0.113.1:8443",
            "server": "192.168.1.10:443", "firewall_side": "100.64.0.1:1024", "gateway": "relay",
            "ag": "172.31.255.2:20000", "ag_eport": 51000, "snat": None, "state": ["established", "confirmed"],
            "flow_id": 7, "queue": 0, "age": 3.25, "created": 1796511828.617,
            "leg_a_packets": 12, "leg_a_bytes": 2048, "leg_b_packets": 10, "leg_b_bytes": 100}
    head, detail = flow_lines(flow)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1796511828.617))
    assert head == "tcp 203.0.113.10:40000 -> 203.0.113.1:8443 (server 192.168.1.10:443)  gateway relay  established,confirmed"
    assert detail == (f"  firewall side 100.64.0.1:1024, gateway 172.31.255.2:20000 (from port 51000), snat -, "
                      f"since {when} (3.2 s), flow 7 on queue 0, leg a 12 packets 2.0 KiB, leg b 10 packets 100 B")
    assert "[" not in head + detail and "None" not in head + detail


def test_json_outputs_carry_the_schema_version_and_errors_are_json(tmp_path: Path) -> None:
    good = CliRunner().invoke(main, ["check", "--json", "-c", str(Path(__file__).parents[2] / "examples" / "home.toml")])
    assert good.exit_code == 0 and json.loads(good.output)["schema_version"] == JSON_SCHEMA_VERSION
    bad = tmp_path / "bad.toml"
    bad.write_text('[zones.lan]\ninterfaces = ["lan0"]\n[policy]\ninput = "maybe"\n')
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(bad)])
    doc = json.loads(result.stdout)
    assert result.exit_code == 2 and doc["exit_code"] == 2 and doc["schema_version"] == JSON_SCHEMA_VERSION
    assert doc["problems"] == [{"path": "policy.input", "reason": "'maybe' is not one of 'accept', 'drop'", "line": 4}]
    # A runtime failure too: nothing runs behind this control socket.
    cfg = tmp_path / "nfgate.toml"
    cfg.write_text(f'[zones.lan]\ninterfaces = ["lan0"]\n[supervisor]\ncontrol_socket = "{tmp_path}/run/control.sock"\n')
    for command in ("flows", "status"):
        result = CliRunner().invoke(main, [command, "--json", "-c", str(cfg)])
        if os.geteuid() != 0:
            assert json.loads(result.stdout)["error"].endswith("needs root (run it with sudo)")
            continue
        doc = json.loads(result.stdout)
        assert result.exit_code == 1 and "nfgate is not running here" in doc["error"], result.output


# ---- the supervisor's side of READY and the watchdog ------------------------------------------


def test_ready_goes_to_systemd_once_every_child_says_it_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "systemd.sock"))
    systemd.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "systemd.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    config = loads(SUPERVISED.format(gwns="x", tmp=tmp_path))
    gate = tmp_path / "go"
    # The "processor" says READY only when the test lets it; the "tunnel" never does (a standalone kind).
    script = ("import os, time\nfrom firewall import sdnotify\n"
              f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
              "sdnotify.notify('READY=1'); time.sleep(30)\n")
    children = [Child("processor-0", "processor", [sys.executable, "-c", script]),
                Child("gateway-tun", "gateway", ["sleep", "30"], notifies=False)]
    lines: list[str] = []
    sup = Supervisor(config, "c.toml", children=children, log=lines.append)
    sup.notify = sdnotify.Listener(tmp_path / "notify.sock")
    try:
        for child in children:
            sup._start(child, time.monotonic())
        sup._check_ready()
        assert not sup.announced and not children[0].ready and children[1].ready
        with pytest.raises(BlockingIOError):
            systemd.recv(100)
        gate.touch()
        wait_for(lambda: sup._on_notify() or sup.announced, timeout=10, interval=0.02, what="READY from the child")
        assert systemd.recv(200).decode().startswith("READY=1\nSTATUS=serving: processor-0, gateway-tun")
        assert "processor-0: serving" in lines
        # The watchdog: one ping, then none before half the period is over.
        sup._ping(100.0)
        assert systemd.recv(100) == b"WATCHDOG=1"
        sup._ping(101.0)
        with pytest.raises(BlockingIOError):
            systemd.recv(100)
        sup._ping(102.0)
        assert systemd.recv(100) == b"WATCHDOG=1"
    finally:
        for child in children:
            if child.proc is not None:
                child.proc.kill()
                child.proc.wait()
        sup.notify.close()
        systemd.close()
