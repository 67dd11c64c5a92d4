"""`nfgate run` as systemd and Prometheus see it, in the basic lab: READY only once
every process serves, the metrics a relayed connection moves (totals that outlive
a processor's restart), and `[log] format = "json"` for every line of every process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import CONFIG, Running, Server, probe

pytestmark = pytest.mark.netns

OBSERVED = CONFIG + """
[log]
format = "json"

[metrics]
listen = "127.0.0.1:9469"
poll = 0.5
"""

FETCH = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9469/metrics', timeout=5).read().decode())"


def scrape(lab) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the router's /metrics, parsed by prometheus-client's own parser."""
    text = lab.run("router", [sys.executable, "-c", FETCH], timeout=20).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_ready_metrics_and_json_logs(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    tls = Server(lab, "lan", 443)
    # systemd's end of the notify protocol: a unix datagram socket nfgate run is pointed at.
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "systemd-notify.sock"))
    systemd.settimeout(30)
    run = Running(lab, tmp_path, config=OBSERVED, wrap=("env", f"NOTIFY_SOCKET={tmp_path / 'systemd-notify.sock'}"))
    try:
        assert systemd.recv(4096).decode().startswith("READY=1")
        # READY came after the processor's queue was bound and every gateway served.
        lines = [json.loads(line) for line in run.text().splitlines()]
        ready_at = next(i for i, d in enumerate(lines) if d.get("message", "").startswith("ready: every process serves"))
        bound_at = next(i for i, d in enumerate(lines) if "queue 0: signalling" in d.get("message", ""))
        served = [i for i, d in enumerate(lines) if d.get("event") == "ready"]
        assert len(served) == 2 and max([bound_at, *served]) < ready_at, lines

        before = scrape(lab)
        assert value(before, "nfgate_process_up", process="processor-0", kind="processor") == 1
        assert value(before, "nfgate_process_up", process="gateway-relay", kind="gateway") == 1
        assert value(before, "nfgate_process_stats_ok", process="gateway-relay", kind="gateway") == 1
        assert ("nfgate_processor_queue_overflow_total", (("processor", "processor-0"),)) in before
        assert ("nfgate_pool_capacity", (("address", ""), ("pool", "firewall_side"), ("processor", "processor-0"))) in before

        # One relayed connection moves the processor's and the relay's counters, and no other gateway's.
        assert probe(lab, "ext", "203.0.113.1", 8443)
        assert tls.next_peer() == "203.0.113.10"
        after = scrape(lab)
        events = "nfgate_processor_events_total"
        moved = {c: value(after, events, processor="processor-0", counter=c) - value(before, events, processor="processor-0", counter=c)
                 for c in ("flows.opened", "verdict.bound")}
        # One flow, two legs bound (client -> gateway, gateway -> server).
        assert moved == {"flows.opened": 1, "verdict.bound": 2}, moved
        accepted = dict(gateway="relay", counter="relay.connections.accepted")
        assert value(after, "nfgate_gateway_events_total", **accepted) == value(before, "nfgate_gateway_events_total", **accepted) + 1
        assert value(after, "nfgate_gateway_events_total", gateway="dns", counter="relay.connections.accepted") == 0
        assert value(after, "nfgate_gateway_events_total", gateway="relay", counter="relay.bytes.up") > 0

        # SIGKILL the processor: restarted, and its totals go on from where they were.
        pid = run.processes()["processor-0"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (p := run.processes()["processor-0"])["state"] == "running" and p["pid"] != pid,
                 timeout=10, interval=0.05, what="the processor back", ignore=(OSError, ValueError))
        assert wait_for(lambda: probe(lab, "ext", "203.0.113.1", 8443, timeout=1.0), timeout=10, what="8443 again")
        again = scrape(lab)
        assert value(again, "nfgate_process_restarts_total", process="processor-0", kind="processor") == 1
        opened = dict(processor="processor-0", counter="flows.opened")
        # The new instance's own count on top of the last one's. Not simply one more: a probe
        # that timed out while the processor came back may have had its SYN bound too (seen
        # in a CI run on a loaded machine: 3 against 2).
        own = run.ask("status")["processors"]["processor-0"]["counters"].get("flows.opened", 0)
        assert own >= 1
        assert value(again, events, **opened) == value(after, events, **opened) + own
    finally:
        assert run.stop() == 0
        systemd.close()

    # Every line that nfgate run and its children wrote is one JSON object with a time and a level;
    # the relay's open and close name the flow's original tuple as eve.json does.
    docs = [json.loads(line) for line in run.text().splitlines()]
    assert docs and all(isinstance(d.get("ts"), float) and d.get("level") in ("debug", "info", "warning", "error", "critical")
                        for d in docs)
    opened = [d for d in docs if d.get("gateway") == "relay" and d.get("event") == "open"]
    assert opened and all(d["src_ip"] == "203.0.113.10" and d["dest_ip"] == "203.0.113.1" and d["dest_port"] == 8443
                          for d in opened), opened
    assert {d.get("process") for d in docs} >= {"nfgate run", "nfgate processor"}
