"""The datapath against its baselines, in one run on the basic lab.

    sudo .venv/bin/python -m tests.firewall.relay_bench [--seconds 5] [--connect-seconds 3] [--pairs 5] [--installs 200]
        [--fast-path]

Not a test (nothing is asserted): the figures for ``scripts/bench processor``
and docs/benchmarks.md. The basic lab (ext - router - lan) runs nfgate with
tests/firewall/run_harness.py's config: ext -> router:8443 is port-forwarded
to lan:443 through the tcp-relay (first packet queued, the rest carried by
conntrack into and out of the relay), ext -> router:8080 is port-forwarded to
lan:80 by the kernel alone, in the same ruleset. Each figure is measured with
its baseline back to back and printed with the ratio:

- no gateway: iperf3 lan -> ext, one TCP stream, with `nfgate run` up (the
  ruleset's masquerade and stateful filter) against the same stream through
  a twin basic lab with no rules at all, alternated ``--pairs`` times in
  ABBA order (median, min and max of the pairs' ratios). The two labs'
  paths are compared the same way before nfgate starts
  (``ratio_twin_paths_before_nfgate``: how alike they are), and
  ``ratio_no_gateway_corrected`` divides the first median by the second,
  the nfgate lab's own path taken out. Once against a minimal stateful
  ruleset (``STATEFUL``: conntrack, an established accept and a masquerade,
  nothing of nfgate's), which is what any stateful firewall pays;
- bulk: iperf3 ext -> lan, one TCP stream, ``seconds`` long (received
  bits/s), through the tcp-relay against the kernel's own port forward, and
  against a socat relay (``TCP-LISTEN,fork`` to the same server) in the same
  gateway namespace, reached by a plain DNAT;
- new connections/s: 8 client threads in ext against a threaded echo server,
  each connecting, sending 4 bytes, reading the echo and closing, for
  ``connect-seconds``, through the relay and through the kernel, alternated
  ``--pairs`` / 2 times (median and spread of the ratios); and the
  processor's CPU time (user + system, /proc) per relayed connection, a
  figure less at the mercy of a shared machine than the rate;
- the same new connections/s through tcp-relay's two stand-ins on its own
  socket (tests/firewall/floor.py): a minimal Python relay (the floor of a
  relay in Python) and a compiled one (the floor of any user-mode relay on
  this datapath), in turn with tcp-relay, each against the kernel after it,
  with each relay's own CPU per connection;
- IPv6 beside IPv4 (issue 17): on the dual lab, ext's traffic routed (no
  port forward) to lan's server through one tcp-relay selector, bulk and
  new connections/s over IPv6 and over IPv4 through the same relay, and
  the processor's CPU per relayed IPv6 connection;
- ``--fast-path``: the same with ``policy.fast_path = true``; ``fast_path_loaded``
  says whether the kernel took the flowtable (ours has none: then the
  figures are those without it);
- installs/s: binding elements written by the processor's ``NatWriter``
  (nf_tables netlink messages of its own, in-process), one transaction each
  and 100 per transaction, and dynamic rules (a translated ALLOW's three
  elements, one transaction) added and removed, in the lab router; and the
  CPU of one binding's transaction (four elements) through it and through
  libnftables' text commands (``bind.add_text``, the writer before).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nftables

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from firewall.processor.rulebook import KernelRule
from firewall.rules import bind
from tests.firewall.floor import NAMES as STAND_INS, StandIns
from tests.firewall.run_harness import CONFIG, Running

WAN, EXT, LAN, GW = "203.0.113.1", "203.0.113.10", "192.168.1.10", "172.31.255.2"
SOCAT_PORT, SOCAT_PUBLIC = 7000, 8081

ECHO = r"""
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(64)
        self.request.sendall(b"echo:" + data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.request_queue_size = 512
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
"""

# The fairer baseline for traffic without a gateway: conntrack loaded, every packet
# tracked and the flow masqueraded, as under any stateful firewall; no queue, no nfgate.
STATEFUL = """table inet nfbench {
    chain forward { type filter hook forward priority filter; policy accept; ct state established,related accept; }
    chain postrouting { type nat hook postrouting priority srcnat; ip daddr 203.0.113.0/24 masquerade; }
}
"""

CONNECTOR = r"""
import socket, sys, threading, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done = [0] * 8
stop = time.monotonic() + seconds
def worker(i):
    while time.monotonic() < stop:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"ping")
            s.recv(64)
        done[i] += 1
start = time.monotonic()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(done) / (time.monotonic() - start))
"""

# Runs inside the lab router: element writes and dynamic-rule operations per second.
INSTALLS = r"""
import json, sys, time
from firewall.processor.kernel import NatWriter
from firewall.processor.rulebook import KernelOp
from tests.firewall.relay_bench import binding_cpu, kernel_rule
n = int(sys.argv[1])
w = NatWriter(10)
ops = [("leg_dnat", "tcp", (0x0A000001, 1024 + i, 0x0A000002, 80), (0xAC1FFF02, 20000)) for i in range(2000)]
t = time.perf_counter()
for op in ops:
    assert w.write([op]) == [True]
single = len(ops) / (time.perf_counter() - t)
ops = [("leg_snat", "tcp", (0x0A000001, 1024 + i, 0x0A000002, 80), (0xAC1FFE00, 1024 + i)) for i in range(2000)]
t = time.perf_counter()
for k in range(0, len(ops), 100):
    assert all(w.write(ops[k:k + 100]))
batched = len(ops) / (time.perf_counter() - t)
t = time.perf_counter()
for i in range(n):
    unit = kernel_rule(i)
    assert w.apply(KernelOp(2 * i, True, unit)) and w.apply(KernelOp(2 * i + 1, False, unit))
rules_per_s = 2 * n / (time.perf_counter() - t)
print(json.dumps({"elements_single": single, "elements_batched": batched, "rule_ops": rules_per_s,
                  **binding_cpu(w, 2000)}))
"""


def binding_cpu(writer, n: int) -> dict[str, float]:
    """CPU ms (user, system) per transaction of one binding's four elements (leg A's and leg B's
    ahead, as the processor writes them): through ``writer`` (``NatWriter``, netlink messages of
    its own) and through libnftables' text commands (``bind.add_text``, the writer before)."""
    def ops(i: int, base: int) -> list:
        c, s, g, f = base + i, 0x0B000001, base - 1, 0x0D000001  # each run its own keys
        sport, fport = 1024 + i % 60000, 30000 + i % 30000
        return [(bind.DNAT_MAP, "tcp", (c, sport, s, 80), (g, 20000)), (bind.SNAT_MAP, "tcp", (c, sport, s, 80), (f, fport)),
                (bind.LEGB_DNAT_MAP, "tcp", (g, f, fport), (s, 80)), (bind.LEGB_SNAT_MAP, "tcp", (g, f, fport), (c, sport))]

    def cpu(write, base: int) -> tuple[float, float]:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(n):
            write(ops(i, base))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return 1e3 * (r1.ru_utime - r0.ru_utime) / n, 1e3 * (r1.ru_stime - r0.ru_stime) / n

    nft = nftables.Nftables()

    def old(o: list) -> None:
        assert nft.cmd(bind.add_text(o, 10))[0] == 0

    def new(o: list) -> None:
        assert all(writer.write(o))

    user, system = cpu(new, 0x0A100000)
    old_user, old_system = cpu(old, 0x0A200000)
    return {"binding_tx_user_ms": user, "binding_tx_sys_ms": system,
            "binding_tx_user_ms_libnftables": old_user, "binding_tx_sys_ms_libnftables": old_system}


def kernel_rule(i: int) -> tuple[KernelRule, ...]:
    """The elements of a translated ALLOW like an FTP data connection's, the ``i``-th of the run."""
    ext, wan, lan = (int(ipaddress.IPv4Address(a)) for a in (EXT, WAN, LAN))
    port = 30000 + i
    return (KernelRule("expect_0_any", ("tcp", ext, wan, port)), KernelRule("dnat_0_any", ("tcp", ext, wan, port), (lan, port)),
            KernelRule("allow_dnat_0_any", ("tcp", ext, lan, port)))


def iperf(lab, client: str, server: str, port: int, seconds: float) -> float:
    argv = ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J"]
    out = lab.run(client, argv, timeout=seconds + 30).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def connections(lab, port: int, seconds: float, host: str = WAN) -> float:
    out = lab.run("ext", [sys.executable, "-c", CONNECTOR, host, str(port), str(seconds)], timeout=seconds + 60)
    return float(out.stdout)


def processor_cpu(run: Running) -> tuple[float, int]:
    """(CPU seconds the processor has used, flows it has opened)."""
    status = wait_for(lambda: run.ask("status")["processors"]["processor-0"].get("pid") and
                      run.ask("status")["processors"]["processor-0"], timeout=10, what="the processor's stats")
    fields = Path(f"/proc/{status['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK"), int(status["counters"].get("flows.opened", 0))


def iperf_servers(lab, host: str, ports: tuple[int, ...]) -> list[subprocess.Popen]:
    procs = [lab.popen(host, ["iperf3", "-s", "-p", str(p)], stdout=subprocess.DEVNULL) for p in ports]
    for p in ports:
        lab.wait_listening(host, p)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def alternated(first, second, pairs: int) -> list[tuple[float, float]]:
    """``pairs`` measurements of each, in ABBA order (drift in the machine's load
    weighs on both alike): [(first's figure, second's figure), ...]."""
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        out.append((a, b))
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratios(pairs: list[tuple[float, float]]) -> dict[str, object]:
    r = [a / b for a, b in pairs]
    return {"median": round(median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


def plain_twin() -> Lab:
    """A second basic lab with no rules at all: the plain-forwarding baseline, measured in turn
    with the nfgate lab's gateway-free traffic while `nfgate run` is up there."""
    twin = Lab(load_topology("basic"), f"nfgp{int(time.time()) % 100000:05d}").up()
    twin.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", WAN])
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connect-seconds", type=float, default=3.0)
    parser.add_argument("--pairs", type=int, default=5,
                        help="alternated measurements of gateway-free traffic and its baseline (and of new connections)")
    parser.add_argument("--installs", type=int, default=200, help="dynamic rules added and removed")
    parser.add_argument("--fast-path", action="store_true",
                        help="run nfgate with policy.fast_path = true (a flowtable, where the kernel has them)")
    args = parser.parse_args()
    lab = Lab(load_topology("basic"), f"nfgr{int(time.time()) % 100000:05d}").up()
    twin = None
    try:
        twin = plain_twin()
        twin_servers = iperf_servers(twin, "ext", (5201,))
        # Plain forwarding, no rules: ext needs a route back to lan, which the lab leaves out on purpose.
        lab.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", WAN])
        # Tens of thousands of connections a minute from one client address: its ports in TIME-WAIT
        # would run out and slow whichever phase comes next (relay_ab.py found it). The client's
        # own namespace only.
        lab.run("ext", ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"])
        servers = iperf_servers(lab, "ext", (5201,))

        def in_lab() -> float:
            return iperf(lab, "lan", EXT, 5201, args.seconds)

        def in_twin() -> float:
            return iperf(twin, "lan", EXT, 5201, args.seconds)

        # The two labs before nfgate: how alike the two paths are.
        calibration = alternated(in_lab, in_twin, args.pairs)
        plain = median([b for _, b in calibration])
        lab.run("router", ["nft", "-f", "-"], input=STATEFUL, text=True)
        stateful = in_lab()
        lab.run("router", ["nft", "delete", "table", "inet", "nfbench"])
        with tempfile.TemporaryDirectory() as tmp:
            config = CONFIG.replace('ping_from = ["lan"]', 'ping_from = ["lan"]\nfast_path = true') if args.fast_path else CONFIG
            run = Running(lab, Path(tmp), config=config)
            try:
                fast_path = lab.run("router", ["nft", "list", "table", "inet", "nfgate_fast"], check=False).returncode == 0
                no_gateway = alternated(in_lab, in_twin, args.pairs)
                stop(servers + twin_servers)
                twin.down()
                twin = None
                servers = iperf_servers(lab, "lan", (443, 80))
                relay = iperf(lab, "ext", WAN, 8443, args.seconds)
                kernel = iperf(lab, "ext", WAN, 8080, args.seconds)
                socat = socat_relay(lab, run, args.seconds)
                stop(servers)
                for p in (443, 80):
                    lab.popen("lan", [sys.executable, "-c", ECHO, str(p)])
                    lab.wait_listening("lan", p)
                cpu = [0.0, 0]

                def relayed() -> float:
                    cpu0, flows0 = processor_cpu(run)
                    rate = connections(lab, 8443, args.connect_seconds)
                    # Their ends (destroy events, FLOW_ENDs) are theirs: counted, and not left
                    # to run in the kernel's turn.
                    run.settled()
                    cpu1, flows1 = processor_cpu(run)
                    cpu[0] += cpu1 - cpu0
                    cpu[1] += flows1 - flows0
                    return rate

                conns = alternated(relayed, lambda: connections(lab, 8080, args.connect_seconds), max(1, args.pairs // 2))
                floors = stand_in_figures(lab, run, Path(tmp), args.connect_seconds, max(2, args.pairs // 2))
                installs = json.loads(lab.run("router", [sys.executable, "-c", INSTALLS, str(args.installs)], timeout=600,
                                              cwd=str(Path(__file__).parents[2])).stdout)
            finally:
                run.stop()
    finally:
        if twin is not None:
            twin.down()
        lab.down()
    out = {
        # Asked for, and loaded: a kernel without flowtables (ours) leaves nfgate without one.
        "fast_path_asked": args.fast_path,
        "fast_path_loaded": fast_path,
        "load_average": os.getloadavg(),
        "no_gateway_with_nfgate_gbit": round(median([a for a, _ in no_gateway]) / 1e9, 2),
        "no_gateway_no_rules_gbit": round(median([b for _, b in no_gateway]) / 1e9, 2),
        "ratio_no_gateway": ratios(no_gateway),
        "ratio_twin_paths_before_nfgate": ratios(calibration),
        # The nfgate lab's own path against the twin's, taken out: the figure for the goal (>= 0.98).
        "ratio_no_gateway_corrected": round(ratios(no_gateway)["median"] / ratios(calibration)["median"], 3),
        "no_gateway_stateful_only_gbit": round(stateful / 1e9, 2),
        "ratio_stateful_to_no_rules": round(stateful / plain, 3),
        "tcp_bulk_relay_gbit": round(relay / 1e9, 2),
        "tcp_bulk_kernel_gbit": round(kernel / 1e9, 2),
        "ratio_bulk_relay_to_kernel": round(relay / kernel, 3),
        "tcp_bulk_socat_gbit": round(socat / 1e9, 2),
        "ratio_bulk_relay_to_socat": round(relay / socat, 3),
        "new_conn_relay_per_s": round(median([a for a, _ in conns])),
        "new_conn_kernel_per_s": round(median([b for _, b in conns])),
        "ratio_conn_relay_to_kernel": ratios(conns),
        "processor_cpu_ms_per_relayed_conn": round(1000 * cpu[0] / max(1, cpu[1]), 3),
        **floors,
        **ipv6_figures(args),
        "binding_elements_per_s_single": round(installs["elements_single"]),
        "binding_elements_per_s_batched_100": round(installs["elements_batched"]),
        "dynamic_rule_ops_per_s": round(installs["rule_ops"], 1),
        # One binding's four elements in one transaction: CPU ms (user + system), the writer against libnftables.
        "binding_tx_cpu_ms": round(installs["binding_tx_user_ms"] + installs["binding_tx_sys_ms"], 4),
        "binding_tx_cpu_ms_libnftables": round(installs["binding_tx_user_ms_libnftables"]
                                               + installs["binding_tx_sys_ms_libnftables"], 4),
    }
    print(json.dumps(out, indent=2))


LAN6, EXT6 = "fd00:1::10", "2001:db8:2::10"
ECHO6 = ECHO.replace('ThreadingTCPServer(("0.0.0.0"', 'ThreadingTCPServer(("::"').replace(
    "socketserver.ThreadingTCPServer.request_queue_size = 512",
    "socketserver.ThreadingTCPServer.request_queue_size = 512\nimport socket\nsocketserver.ThreadingTCPServer.address_family = socket.AF_INET6")


def ipv6_figures(args: argparse.Namespace) -> dict[str, float]:
    """The tcp-relay over IPv6 beside IPv4, routed ext -> lan on the dual lab, one relay for both."""
    from tests.firewall.test_ipv6_netns import RELAY6
    lab = Lab(load_topology("dual"), f"nfg6{int(time.time()) % 100000:05d}").up()
    try:
        lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
        lab.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", WAN])
        for host in ("ext", "router", "lan"):
            wait_for(lambda: not lab.run(host, ["ip", "-6", "addr", "show", "tentative"]).stdout.strip(),
                     timeout=5, what="DAD")
        with tempfile.TemporaryDirectory() as tmp:
            run = Running(lab, Path(tmp), config=RELAY6)
            try:
                servers = iperf_servers(lab, "lan", (9000,))
                bulk6 = iperf(lab, "ext", LAN6, 9000, args.seconds)
                bulk4 = iperf(lab, "ext", LAN, 9000, args.seconds)
                stop(servers)
                lab.popen("lan", [sys.executable, "-c", ECHO6, "9000"])
                lab.wait_listening("lan", 9000)
                cpu0, flows0 = processor_cpu(run)
                cps6 = connections(lab, 9000, args.connect_seconds, LAN6)
                cpu1, flows1 = processor_cpu(run)
                cps4 = connections(lab, 9000, args.connect_seconds, LAN)
            finally:
                run.stop()
    finally:
        lab.down()
    return {
        "tcp_bulk_relay_ipv6_gbit": round(bulk6 / 1e9, 2),
        "tcp_bulk_relay_ipv4_routed_gbit": round(bulk4 / 1e9, 2),
        "ratio_bulk_relay_ipv6_to_ipv4": round(bulk6 / bulk4, 3),
        "new_conn_relay_ipv6_per_s": round(cps6),
        "new_conn_relay_ipv4_routed_per_s": round(cps4),
        "ratio_conn_relay_ipv6_to_ipv4": round(cps6 / cps4, 3),
        "processor_cpu_ms_per_relayed_ipv6_conn": round(1000 * (cpu1 - cpu0) / max(1, flows1 - flows0), 3),
    }


def stand_in_figures(lab, run: Running, tmp: Path, seconds: float, rounds: int) -> dict[str, object]:
    """New connections/s through tcp-relay and through its two stand-ins (tests/firewall/floor.py:
    a minimal Python relay and a compiled one, on its socket), each against the kernel right
    after it, the three in turn for ``rounds`` rounds (ABC, CBA, ...); and each one's own CPU
    (user + system) per connection. What separates the gateway from the Python stand-in is its
    own work; the compiled stand-in's ratio is what any user-mode relay could reach here."""
    stand_ins = StandIns(run.processes()["gateway-relay"]["pid"], tmp)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in STAND_INS}
    cpu = {name: [0.0, 0.0] for name in STAND_INS}  # CPU seconds, connections
    try:
        for i in range(rounds):
            for name in STAND_INS if i % 2 == 0 else STAND_INS[::-1]:
                stand_ins.use(name)
                run.settled()  # the last one's ends, and the gateway's backlog of messages, before the count
                before = stand_ins.cpu(name)
                rate = connections(lab, 8443, seconds)
                run.settled()
                cpu[name][0] += stand_ins.cpu(name) - before
                cpu[name][1] += rate * seconds
                pairs[name].append((rate, connections(lab, 8080, seconds)))
    finally:
        stand_ins.close()
    out: dict[str, object] = {}
    for name in STAND_INS:
        label = {"gateway": "tcp_relay", "python": "python_stand_in", "compiled": "compiled_stand_in"}[name]
        out[f"ratio_conn_{label}_to_kernel"] = ratios(pairs[name])
        out[f"{label}_cpu_ms_per_conn"] = round(1000 * cpu[name][0] / max(1.0, cpu[name][1]), 3)
    return out


def socat_relay(lab, run: Running, seconds: float) -> float:
    """iperf3 ext -> W:8081 -> DNAT -> socat in the gateway namespace -> lan:443."""
    pid = run.processes()["gateway-relay"]["pid"]
    gwns = ["nsenter", "-t", str(pid), "-n"]
    socat = subprocess.Popen([*gwns, "socat", f"TCP-LISTEN:{SOCAT_PORT},fork,reuseaddr", f"TCP:{LAN}:443"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: f":{SOCAT_PORT} " in subprocess.run([*gwns, "ss", "-ltn"], capture_output=True, text=True).stdout,
                 timeout=5, what="socat to listen")
        # The bench's own way in and out of the gateway namespace, in the lab router only.
        lab.run("router", ["iptables", "-t", "nat", "-I", "PREROUTING", "-p", "tcp", "--dport", str(SOCAT_PUBLIC),
                           "-j", "DNAT", "--to-destination", f"{GW}:{SOCAT_PORT}"])
        for way in ("-i", "-o"):
            lab.run("router", ["iptables", "-I", "FORWARD", way, "nfg-gw0", "-j", "ACCEPT"])
        return iperf(lab, "ext", WAN, SOCAT_PUBLIC, seconds)
    finally:
        socat.terminate()
        socat.wait(timeout=10)


if __name__ == "__main__":
    main()
