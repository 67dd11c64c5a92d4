"""RTP through the rtp gateway against the kernel's own forwarding, in one run.

    sudo .venv/bin/python -m tests.gateways.rtp_bench [--steps 250,500,1000,2000]

Not a test (nothing is asserted): figures for ``scripts/bench rtp`` and
docs/benchmarks.md. One basic lab and one ``nfgate run`` (``CONFIG``): the
router forwards wan udp 19000-37999 to lan, keeping the ports; three ranges
of it take three paths:

- ``kernel``: 30000-37999, no selector: the kernel alone (the port forward);
- ``gateway``: 20000-23999, the ``rtp-bench`` gateway, ``offload = "never"``;
- ``offload``: 24000-27999, ``rtp-bench-off``, ``offload = "after-validation"``
  after 25 RTP datagrams (half a second of 20 ms audio).

The sender is tests/gateways/rtp_load.py in ext, the receiver the same in
lan, where an nft redirect brings every port of the range to its one
socket. Figures:

1. ``blast``: one stream as fast as one Python socket sends, 3 s (after a
   second at 50 pps that sets it up), through the kernel and through the
   gateway: datagrams per second received.
2. ``latency``: one 50 pps stream for 10 s through each path: one-way
   latency p50/p99 and RFC 3550 jitter; the gateway's added latency is the
   difference with the kernel's, taken side by side.
3. ``capacity``: N concurrent 50 pps streams through each gateway and the
   kernel, N growing until the steady loss reaches 0.1 %. A step starts its
   streams at ``NEW_STREAMS_PER_SECOND`` (a fresh source port per step) and
   runs them all together for ``STEADY_SECONDS`` more seconds once the last
   one has run for a second: ``steady`` is that window (loss, and the
   latency and jitter figures), what a call that runs for minutes sees;
   ``loss`` counts every datagram, start-ups included (the processor's
   binding, the gateway's lookup, the offload's hand-over).
4. ``rtpengine`` (when Debian's ``rtpengine-daemon`` is installed), after
   nfgate has stopped: rtpengine in userspace mode (PEERS.md) in the router's
   namespace, one call per stream set up over ng (tests/gateways/
   rtpengine_ng.py), the same latency stream and capacity steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running
from tests.gateways.rtp_netns import base_config
from tests.scratch import scratch

EXT = "203.0.113.10"
WAN = "203.0.113.1"
LOAD = str(Path(__file__).with_name("rtp_load.py"))
NG = str(Path(__file__).with_name("rtpengine_ng.py"))
RTPENGINE = ["rtpengine", "--config-file=none", "--foreground", "--log-stderr", "--log-level=4", "--table=-1",
             "--interface=pub/203.0.113.1", "--interface=priv/192.168.1.1", "--listen-ng=127.0.0.1:2223",
             "--port-min=40000", "--port-max=59999", "--timeout=60", "--delete-delay=0"]
SINK_PORT = 18999
KERNEL, GATEWAY, OFFLOAD = 30000, 20000, 24000
OFFLOAD_AFTER = 25

GATEWAY_CONFIG = """
[[gateway]]
name = "{name}"
kind = "rtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = "{ports}"

[gateway.settings]
no_media_timeout = 3
max_packet_rate = 1000000
max_packet_burst = 1000000
max_flows = 20000
offload = "{offload}"
offload_after_packets = {after}
offload_hold = 1
"""

CONFIG = base_config("19000-37999", "max_rules = 20000\n") + GATEWAY_CONFIG.format(name="rtp-bench", ports="20000-23999", offload="never", after=OFFLOAD_AFTER) \
    + GATEWAY_CONFIG.format(name="rtp-bench-off", ports="24000-27999", offload="after-validation", after=OFFLOAD_AFTER)

REDIRECT = f"""table ip bench {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        udp dport 19000-37999 redirect to :{SINK_PORT}
    }}
}}
"""

_next_sport = 10000  # source ports 10000-29999, below ext's ephemeral range
NEW_STREAMS_PER_SECOND = 50  # how fast the capacity steps start their streams (the processor's binding rate)
STEADY_SECONDS = 5  # measured once every stream of a step has run for a second


def next_ports(n: int) -> int:
    """The first of ``2n`` source ports no earlier run of this bench used (while they last: then again)."""
    global _next_sport
    if _next_sport + 2 * n > 30000:
        _next_sport = 10000
    first, _next_sport = _next_sport, _next_sport + 2 * n
    return first


def measure(lab: Lab, argv: list[str], sport: int, n: int, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the receiver in lan, run the sender in ext (from ``sport`` on); both their figures."""
    sink = lab.popen("lan", [sys.executable, "-u", LOAD, "recv", str(SINK_PORT), str(sport), str(n), str(seconds + 30),
                             "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        sent = lab.run("ext", [sys.executable, LOAD, *argv], timeout=seconds + 120)
        out, _ = sink.communicate(timeout=seconds + 60)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    return json.loads(sent.stdout), json.loads(out)


def blast(lab: Lab, port: int) -> float:
    sport = next_ports(1)
    sent, got = measure(lab, ["blast", EXT, str(sport), WAN, str(port), "3"], sport, 1, 3)
    return round(got["received_steady"] / 3)


def stream(lab: Lab, base: int, n: int, ramp: float, seconds: float = STEADY_SECONDS + 1,
           rtpengine: Path | None = None) -> dict[str, Any]:
    sport = next_ports(n)
    argv = ["send", EXT, str(sport), WAN, str(base), str(n), str(ramp), str(seconds)]
    if rtpengine is not None:
        # rtpengine's calls for these streams: the caller sends to the ports its answers gave.
        tag = f"c{sport}"
        ports = lab.run("router", [sys.executable, NG, "calls", str(n), str(sport), str(KERNEL), tag], timeout=300)
        portfile = rtpengine / f"{tag}.json"
        portfile.write_text(ports.stdout)
        argv.append(str(portfile))
    sent, got = measure(lab, argv, sport, 0 if rtpengine is not None else n, ramp + seconds)
    if rtpengine is not None:
        lab.run("router", [sys.executable, NG, "delete", str(n), tag], timeout=300)
    got["sent"], got["sent_steady"] = sent["sent"], sent["sent_steady"]
    got["loss_pct"] = round(100 * (1 - got["received"] / max(sent["sent"], 1)), 3)
    got["steady_loss_pct"] = round(100 * (1 - got["received_steady"] / max(sent["sent_steady"], 1)), 3)
    return got


def capacity(lab: Lab, figures: dict[str, Any], name: str, base: int, ns: list[int],
             rtpengine: Path | None = None) -> None:
    rows = figures[f"capacity_{name}"] = []
    for n in ns:
        got = stream(lab, base, n, ramp=n / NEW_STREAMS_PER_SECOND, rtpengine=rtpengine)
        rows.append({"streams": n, **{key: got[key] for key in (
            "loss_pct", "steady_loss_pct", "latency_ms_p50", "latency_ms_p99", "jitter_ms", "sent")}})
        print(f"  {name:9} {n:5} streams: loss {got['loss_pct']:.3f} % (steady {got['steady_loss_pct']:.3f} %)"
              f"  p50 {got['latency_ms_p50']:.3f} ms  p99 {got['latency_ms_p99']:.3f} ms"
              f"  jitter {got['jitter_ms']} ms", flush=True)
        time.sleep(4)  # the step's streams end (no_media_timeout, offload_hold) before the next
        if got["steady_loss_pct"] >= 0.1:
            break
    figures[f"max_streams_{name}"] = max((r["streams"] for r in rows if r["loss_pct"] < 0.1), default=0)
    figures[f"max_streams_steady_{name}"] = max((r["streams"] for r in rows if r["steady_loss_pct"] < 0.1), default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="250,500,1000,2000")
    parser.add_argument("--paths", default="gateway,offload,kernel,rtpengine",
                        help="the capacity steps' paths to run (the blast and latency figures always run)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    paths = set(args.paths.split(","))
    lab = Lab(load_topology("basic"), f"nfgr{int(time.time()) % 100000:05d}")
    with scratch("nfgate-rtp-bench-") as tmp:
        figures: dict[str, Any] = {}
        lab.up()
        try:
            lab.run("lan", ["nft", "-f", "-"], input=REDIRECT, text=True)
            run = Running(lab, tmp, config=CONFIG)
            try:
                wait_for(lambda: run.text().count(" ready ") >= 2, timeout=30, what="the gateways")
                figures["blast_pps_kernel"] = blast(lab, KERNEL)
                figures["blast_pps_gateway"] = blast(lab, GATEWAY)
                figures["blast_ratio"] = round(figures["blast_pps_gateway"] / figures["blast_pps_kernel"], 3)
                for name, base in (("kernel", KERNEL + 2), ("gateway", GATEWAY + 2)):
                    got = stream(lab, base, 1, ramp=0, seconds=10)
                    figures[f"latency_{name}"] = {k: got[k] for k in ("latency_ms_p50", "latency_ms_p99", "jitter_ms",
                                                                      "loss_pct")}
                k, g = figures["latency_kernel"], figures["latency_gateway"]
                figures["added_ms_p50"] = round(g["latency_ms_p50"] - k["latency_ms_p50"], 4)
                figures["added_ms_p99"] = round(g["latency_ms_p99"] - k["latency_ms_p99"], 4)
                for name, base, ns in (("gateway", GATEWAY + 100, steps), ("offload", OFFLOAD, steps),
                                       ("kernel", KERNEL + 100, steps[-1:])):  # the kernel: is the generator the limit?
                    if name not in paths:
                        continue
                    capacity(lab, figures, name, base, ns)
                    # What the processor did meanwhile: where a collapse comes from.
                    status = run.ask("status")["processors"]["processor-0"]
                    counters = status.get("counters") or status  # a busy processor answers with its error
                    figures[f"processor_{name}"] = {k: v for k, v in counters.items()
                                                    if v and not str(k).startswith("control")}
                figures["gateway_stats"] = [line for line in run.text().splitlines() if " stats " in line]
            finally:
                run.stop()
                figures["gateway_stats"] = [line[:2000] for line in run.text().splitlines() if " stats " in line]
            if shutil.which("rtpengine") is not None and "rtpengine" in paths:
                # The anchor, with nfgate stopped and its rules flushed (`nfgate run` leaves the static
                # rules in place when it stops, and their input policy drops what reaches the router itself).
                lab.run("router", [sys.executable, "-m", "firewall.cli", "flush"], cwd=Path(__file__).parents[2])
                log = open(tmp / "rtpengine.log", "w")
                engine = lab.popen("router", RTPENGINE, stdout=log, stderr=subprocess.STDOUT)
                try:
                    lab.wait_listening("router", 2223, "udp", timeout=10)
                    got = stream(lab, KERNEL + 2, 1, ramp=0, seconds=10, rtpengine=tmp)
                    figures["latency_rtpengine"] = {k: got[k] for k in ("latency_ms_p50", "latency_ms_p99", "jitter_ms",
                                                                        "loss_pct")}
                    capacity(lab, figures, "rtpengine", KERNEL + 100, steps, rtpengine=tmp)
                finally:
                    engine.terminate()
                    engine.wait(timeout=10)
                    log.close()
        finally:
            lab.down()
    print(f"blast, one stream: kernel {figures['blast_pps_kernel']} pps, gateway {figures['blast_pps_gateway']} pps,"
          f" gateway/kernel {figures['blast_ratio']}")
    shown = ("kernel", "gateway", "rtpengine") if "latency_rtpengine" in figures else ("kernel", "gateway")
    for name in shown:
        f = figures[f"latency_{name}"]
        print(f"50 pps stream, {name:8}: p50 {f['latency_ms_p50']:.3f} ms  p99 {f['latency_ms_p99']:.3f} ms"
              f"  jitter {f['jitter_ms']} ms  loss {f['loss_pct']} %")
    print(f"added by the gateway: p50 {figures['added_ms_p50']:.3f} ms, p99 {figures['added_ms_p99']:.3f} ms")
    for name in ("gateway", "offload", "kernel", "rtpengine"):
        if f"max_streams_{name}" not in figures:
            continue
        print(f"largest N with < 0.1 % loss, {name:8}: {figures[f'max_streams_{name}']} "
              f"(steady state: {figures[f'max_streams_steady_{name}']}) of {steps}")
    print(f"new streams started at {NEW_STREAMS_PER_SECOND}/s; steady: {STEADY_SECONDS} s with every stream up")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
