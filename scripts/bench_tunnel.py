#!/usr/bin/env python3
"""Measure the NAT-traversal tunnel against its baselines, in the nat-tunnel lab.

What it prints (medians are not taken: one run of each, side by side, so
compare only figures of one run -- PEERS.md, "Anchor figures"):

- **TCP throughput** (iperf3, one stream) from ``pub`` to an iperf3 server
  in ``priv`` (``--reverse``: from that server to ``pub``, a download): through the tunnel (``nfgate tunnel publish``), through
  OpenSSH's ``ssh -R`` (the usual way to reach into a NATed network), and
  through a plain ``socat`` relay on the NAT host (a user-space relay with
  no tunnel, the floor of relaying cost); and the CPU seconds each relay's
  processes spent per GB carried (from /proc: server and mediator; sshd
  with its children and ssh; socat with its children).
- **HTTP request latency**, p50 and p99 over sequential requests, each on a
  new connection (so each one costs the tunnel an OPEN_STREAM), through the
  same paths, to ``python -m http.server`` in ``priv``, with the CPU
  milliseconds each relay's processes spent per request.
- Both of the above also through **two Python floors**
  (tests/tunnel/floor_tunnel.py): a tunnel that only relays (one TLS 1.3
  channel, a 7-byte frame header, no flow control, limits, logging or
  policy), once on a bare epoll loop and once on asyncio's protocols and
  uvloop as the tunnel is built. What the tunnel costs above them is its
  own work; what they cost above ``ssh -R`` is Python's.
- **UDP through redirect** (``publish --udp``, datagrams over the UDP
  channel): echoed datagrams per second and loss at paced send rates, and
  flat out.
- **Server memory with N idle mediators** (default 1000): the control
  server's RSS before and after N mediators (one process in ``priv``, one
  asyncio loop) have connected, and the difference per mediator.

The server's bytes/s limit is raised out of the way. Needs root (network
namespaces), iperf3, socat, OpenSSH. Run:
``sudo .venv/bin/python scripts/bench_tunnel.py [--seconds 5] [--mediators 1000] [--json]
[--only tcp,http,udp,memory] [--requests 500] [--reverse]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from firewall.lab.netns import Lab, LabCommandError  # noqa: E402
from firewall.lab.topology import load_topology  # noqa: E402
from firewall.lab.wait import wait_for  # noqa: E402

PUB, PRIV, NAT_WAN = "198.51.100.10", "10.77.0.10", "198.51.100.1"
SERVICE_PORT = 7443
PY = sys.executable
START = 15.0  # seconds any process may take to be ready

HTTP_CLIENT = r"""
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/small.txt")
    r = c.getresponse(); r.read(); c.close()
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
print(json.dumps({"n": n, "p50": lat[n // 2], "p99": lat[min(n - 1, int(n * 0.99))], "max": lat[-1]}))
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""

UDP_CLIENT = r"""
import json, socket, sys, time
host, port, rate, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.connect((host, port)); s.setblocking(False)
payload = b"x" * size
sent = received = 0
start = time.monotonic(); end = start + seconds
while (now := time.monotonic()) < end:
    due = int((now - start) * rate) if rate > 0 else sent + 32
    while sent < due:
        try:
            s.send(payload); sent += 1
        except (BlockingIOError, ConnectionRefusedError):
            break
    while True:
        try:
            s.recv(65535); received += 1
        except (BlockingIOError, ConnectionRefusedError):
            break
s.setblocking(True); drain = time.monotonic() + 1.0
while (left := drain - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        s.recv(65535); received += 1
    except (TimeoutError, ConnectionRefusedError):
        break
print(json.dumps({"sent": sent, "received": received, "seconds": seconds}))
"""

IDLE_MEDIATORS = r"""
import asyncio, ipaddress, json, logging, sys
from tunnel import tls
from tunnel.config import MediatorConfig
from tunnel.events import EventLog
from tunnel.mediator import Mediator
from tunnel.settings import MediatorSettings
n, server, port, pin, prefix = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
logging.getLogger("nfgate.tunnel").setLevel(logging.ERROR)
async def main():
    stop = asyncio.Event()
    mediators = []
    for i in range(n):
        config = MediatorConfig(
            identity=f"idle{i}", token=f"{prefix}{i:06d}".encode(), server=server, pin=tls.parse_pin(pin),
            service_port=port, interfaces=(ipaddress.ip_interface("10.77.0.10/24"),),
            protocol=MediatorSettings(keepalive_interval=4.0),  # under the lab NAT's 5 s
        )
        m = Mediator(config, EventLog("m"))
        mediators.append(m)
        asyncio.get_running_loop().create_task(m.run(stop))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # pace the handshakes a little
    for _ in range(1200):
        if all(m.session_id for m in mediators):
            break
        await asyncio.sleep(0.1)
    print(json.dumps({"ready": sum(1 for m in mediators if m.session_id)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
asyncio.run(main())
"""


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of ``pids`` so far, with their children that
    have ended (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def with_children(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in found} - found
        found |= below
        grew = bool(below)
    return sorted(found)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


IPERF_BUSY_TRIES = 10  # runs of a path whose iperf3 server is still busy with the last one, a second apart


class Bench:
    def __init__(self, seconds: float, mediators: int, reverse: bool = False) -> None:
        self.seconds = seconds
        self.reverse = reverse  # iperf3 -R: the target sends, the public client receives
        self.idle = mediators
        self.dir = Path(tempfile.mkdtemp(prefix="nfgbench-"))
        self.lab = Lab(load_topology("nat-tunnel"), f"nfgbt{secrets.token_hex(2)}")
        self.procs: list[subprocess.Popen[Any]] = []
        self.results: dict[str, Any] = {}

    # -- plumbing ---------------------------------------------------------------------

    def popen(self, host: str, argv: list[Any], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = self.lab.popen(host, [str(a) for a in argv], cwd=TOP, **kw)
        self.procs.append(proc)
        return proc

    def run_json(self, host: str, argv: list[Any], timeout: float) -> dict[str, Any]:
        proc = self.lab.run(host, [str(a) for a in argv], timeout=timeout, cwd=TOP, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{host}: {argv[0]} {argv[1] if len(argv) > 1 else ''} exited {proc.returncode}: {tail[0]}")
        out = proc.stdout.strip()
        try:
            return json.loads(out)  # iperf3 -J: one document over many lines
        except ValueError:
            return json.loads(out.splitlines()[-1])

    def cli(self, *args: Any) -> str:
        env = {**os.environ, "NFGATE_TUNNEL_SOCKET": str(self.dir / "control.sock")}
        return subprocess.run([PY, "-m", "tunnel.cli", *map(str, args)], check=True, capture_output=True,
                              text=True, cwd=TOP, env=env, timeout=60).stdout

    def m1(self) -> dict[str, Any]:
        listing = json.loads(self.cli("list", "--json"))
        return next(m for m in listing["mediators"] if m["identity"] == "m1")

    def listening(self, host: str, port: int, proto: str = "tcp") -> None:
        self.lab.wait_listening(host, port, proto, timeout=START)

    # -- set-up -------------------------------------------------------------------------

    def setup(self) -> None:
        self.lab.up()
        d = self.dir
        self.pin = self.cli("keygen", "--cert", d / "server.crt", "--key", d / "server.key").strip()
        self.prefix = secrets.token_hex(8)
        entries = ['[mediator.m1]\ntoken = "bench-token-m1-0123456789"\npublish_ports = ["8000-9999"]\n']
        entries += [f'[mediator.idle{i}]\ntoken = "{self.prefix}{i:06d}"\n' for i in range(self.idle)]
        (d / "mediators.toml").write_text("".join(entries))
        os.chmod(d / "mediators.toml", 0o600)
        (d / "server.toml").write_text(
            f'[server]\nlisten = "{PUB}"\nservice_port = {SERVICE_PORT}\npublic_address = "{PUB}"\n'
            f'cert = "{d}/server.crt"\nkey = "{d}/server.key"\nmediators = "{d}/mediators.toml"\n'
            f'control_socket = "{d}/control.sock"\nmax_channels = {self.idle + 100}\n'
            f"[limits]\nbytes_per_second = 1e12\nburst_bytes = 1e12\nmax_connections = 4096\nmax_ports = 4096\n"
        )
        (d / "token").write_text("bench-token-m1-0123456789\n")
        os.chmod(d / "token", 0o600)
        (d / "mediator.toml").write_text(
            f'[mediator]\nidentity = "m1"\ntoken_file = "{d}/token"\nserver = "{PUB}"\n'
            f'service_port = {SERVICE_PORT}\nserver_pin = "{self.pin}"\n'
            # Below the lab NAT's 10 s TCP and 5 s UDP mapping timeouts.
            "[protocol]\nkeepalive_interval = 2\n"
            f'[[allow]]\nto = "{PRIV}/32"\nports = [5201, 8000, 9000]\nproto = "any"\nops = ["connect", "send"]\n'
        )
        self.server = self.popen("pub", [PY, "-m", "tunnel.cli", "server", "-c", d / "server.toml"])
        wait_for(lambda: (d / "control.sock").exists(), timeout=START, what="the tunnel server")
        self.mediator = self.popen("priv", [PY, "-m", "tunnel.cli", "mediator", "-c", d / "mediator.toml"])
        wait_for(lambda: self.m1()["state"] == "connected", timeout=START, interval=0.1, what="m1 to connect")
        www = d / "www"
        www.mkdir()
        (www / "small.txt").write_text("ok\n" * 100)
        self.popen("priv", ["iperf3", "-s", "-B", PRIV, "-p", 5201])
        self.popen("priv", [PY, "-m", "http.server", 8000, "--bind", PRIV, "--directory", www])
        self.popen("priv", [PY, "-c", UDP_ECHO, PRIV, 9000])
        for port in (5201, 8000):
            self.listening("priv", port)
        self.listening("priv", 9000, "udp")
        # The tunnel's paths.
        self.cli("publish", "m1", "--to", f"{PRIV}:5201", "--public", 8201)
        self.cli("publish", "m1", "--to", f"{PRIV}:8000", "--public", 8301)
        self.cli("publish", "m1", "--to", f"{PRIV}:9000", "--public", 9001, "--udp")
        # socat on the NAT host: a plain user-space relay, no tunnel.
        self.socat = []
        for public, target in ((8203, 5201), (8303, 8000)):
            self.socat.append(self.popen("nat", ["socat", f"TCP-LISTEN:{public},bind={NAT_WAN},fork,reuseaddr", f"TCP:{PRIV}:{target}"]))
            self.listening("nat", public)
        self.setup_ssh()
        self.setup_floor()

    def setup_floor(self) -> None:
        """The Python floors (tests/tunnel/floor_tunnel.py): one channel per target, no tunnel logic;
        one on a bare epoll loop, one on asyncio's protocols and uvloop as the tunnel is."""
        d = self.dir
        self.floor: dict[int, list[subprocess.Popen[Any]]] = {}
        for loop, channel, public, target in (("epoll", 7445, 8204, 5201), ("epoll", 7446, 8304, 8000),
                                              ("uvloop", 7447, 8205, 5201), ("uvloop", 7448, 8305, 8000)):
            floor = [PY, "-m", "tests.tunnel.floor_tunnel", "--loop", loop]
            server = self.popen("pub", [*floor, "server", "--channel", f"{PUB}:{channel}", "--public", f"{PUB}:{public}",
                                        "--cert", d / "server.crt", "--key", d / "server.key"])
            self.listening("pub", channel)
            mediator = self.popen("priv", [*floor, "mediator", "--server", f"{PUB}:{channel}",
                                           "--target", f"{PRIV}:{target}"])
            wait_for(lambda: self.lab.run("pub", ["ss", "-Htn", "state", "established", f"sport = :{channel}"],
                                          check=False).stdout.strip() != "",
                     timeout=START, interval=0.1, what=f"the {loop} floor's channel")
            self.listening("pub", public)
            self.floor[public] = [server, mediator]

    def setup_ssh(self) -> None:
        d = self.dir / "ssh"
        d.mkdir()
        for name in ("hostkey", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        shutil.copy(d / "id.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 2222\nListenAddress {PUB}\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\nGatewayPorts clientspecified\nAllowTcpForwarding yes\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd = self.popen("pub", ["/usr/sbin/sshd", "-D", "-e", "-f", d / "sshd_config"])
        self.listening("pub", 2222)
        self.ssh = self.popen("priv", [
            "ssh", "-N", "-i", d / "id", "-p", 2222, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            # Below the lab NAT's 10 s TCP mapping timeout, as the tunnel's keepalive_interval is.
            "-o", "ServerAliveInterval=2",
            "-R", f"{PUB}:8202:{PRIV}:5201", "-R", f"{PUB}:8302:{PRIV}:8000", f"root@{PUB}",
        ])
        for port in (8202, 8302):
            self.listening("pub", port)

    # -- measurements ---------------------------------------------------------------------

    def iperf(self, host: str, port: int, relay: Any) -> tuple[float, float]:
        """Gbit/s through host:port, and the CPU seconds per GB of the processes
        ``relay()`` names (asked before and after: a relay may fork for the connection)."""
        for _ in range(IPERF_BUSY_TRIES):
            before = relay()
            cpu = cpu_seconds(before)
            try:
                doc = self.run_json("pub", ["iperf3", "-c", host, "-p", port, "-t", self.seconds, "-J",
                                            *(["-R"] if self.reverse else [])],
                                    timeout=self.seconds + 30)
            except (LabCommandError, RuntimeError) as err:
                # A path that stalls (a floor's download has no flow control) must not
                # lose the others' figures.
                doc = {"error": str(err)}
            cpu = cpu_seconds(sorted(set(before) | set(relay()))) - cpu
            if "busy" not in doc.get("error", ""):
                break
            # The iperf3 server has not yet seen the last path's test end
            # (once after ssh -R, whose channel close lags): it refused at once.
            time.sleep(1.0)
        if "error" in doc:
            # One failed run (seen through ssh -R under load) must not lose the run's other figures.
            self.results.setdefault("errors", []).append(f"iperf3 to {host}:{port}: {doc['error']}")
            return float("nan"), float("nan")
        received = doc["end"]["sum_received"]
        return received["bits_per_second"] / 1e9, cpu / (received["bytes"] / 1e9)

    def throughput(self) -> None:
        paths = {name: (host, port, lambda pids=pids, port=port: pids(port))
                 for name, (host, port, _, pids) in self.relays().items()}
        results = {name: self.iperf(host, port, pids) for name, (host, port, pids) in paths.items()}
        self.results["tcp_reverse"] = self.reverse
        self.results["tcp_gbit_s"] = {name: r[0] for name, r in results.items()}
        self.results["tcp_cpu_s_per_gb"] = {name: r[1] for name, r in results.items()}

    def relays(self) -> dict[str, tuple[str, int, int, Any]]:
        """Each path's host, iperf3 port, HTTP port, and the processes relaying a port."""
        return {
            "tunnel": (PUB, 8201, 8301, lambda port: [self.server.pid, self.mediator.pid]),
            "ssh -R": (PUB, 8202, 8302, lambda port: [*with_children(self.sshd.pid), self.ssh.pid]),
            "socat relay": (NAT_WAN, 8203, 8303,
                            lambda port: with_children(self.socat[0 if port == 8203 else 1].pid)),
            "floor epoll": (PUB, 8204, 8304, lambda port: [p.pid for p in self.floor[port]]),
            "floor uvloop": (PUB, 8205, 8305, lambda port: [p.pid for p in self.floor[port]]),
        }

    def latency(self, n: int = 500) -> None:
        results = {}
        for name, (host, _, port, pids) in self.relays().items():
            relay = lambda: pids(port)  # noqa: E731
            before = relay()
            cpu = cpu_seconds(before)
            try:
                results[name] = self.run_json("pub", [PY, "-c", HTTP_CLIENT, host, port, n], timeout=120)
            except RuntimeError as e:
                # One failed path must not lose the run's other figures.
                self.results.setdefault("errors", []).append(f"HTTP through {name}: {e}")
                continue
            results[name]["relay_cpu_ms"] = (cpu_seconds(sorted(set(before) | set(relay()))) - cpu) * 1000 / n
        self.results["http_ms"] = results

    def udp(self) -> None:
        rows = {}
        for rate in (1000, 5000, 10000, 20000, 0):
            doc = self.run_json("pub", [PY, "-c", UDP_CLIENT, PUB, 9001, rate, min(self.seconds, 3.0), 64],
                                timeout=60)
            name = f"{rate} pps" if rate else "flat out"
            rows[name] = {
                "sent_pps": doc["sent"] / doc["seconds"],
                "echoed_pps": doc["received"] / doc["seconds"],
                "loss_pct": 100.0 * (1 - doc["received"] / doc["sent"]) if doc["sent"] else 0.0,
            }
        counters = self.m1()["counters"]
        rows["carried"] = {k: counters.get(k, 0) for k in (
            "udp_via_channel_out", "udp_via_channel_in", "udp_via_frames_out", "udp_via_frames_in")}
        self.results["udp_redirect"] = rows

    def memory(self) -> None:
        before = rss_kib(self.server.pid)
        helper = self.popen("priv", [PY, "-c", IDLE_MEDIATORS, self.idle, PUB, SERVICE_PORT, self.pin, self.prefix],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        assert helper.stdout is not None
        line = helper.stdout.readline()
        ready = json.loads(line)["ready"] if line else 0
        elapsed = time.monotonic() - started
        wait_for(lambda: json.loads(self.cli("list", "--json"))["channels"] >= self.idle + 1, timeout=60,
                 interval=0.5, what="the server to count every channel")
        after = rss_kib(self.server.pid)
        self.results["idle_mediators"] = {
            "mediators": self.idle, "connected": ready, "connect_all_s": elapsed,
            "server_rss_before_mib": before / 1024, "server_rss_after_mib": after / 1024,
            "per_mediator_kib": (after - before) / max(1, ready),
            "mediators_process_rss_mib": rss_kib(helper.pid) / 1024,
        }
        assert helper.stdin is not None
        helper.stdin.close()

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        try:
            self.lab.down()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "tcp_gbit_s" in results:
        direction = "downloads, iperf3 -R" if results.get("tcp_reverse") else "uploads"
        lines.append(f"TCP throughput, iperf3, one stream, {direction} (Gbit/s):")
        cpu = results.get("tcp_cpu_s_per_gb", {})
        lines += [f"  {k:<12} {v:6.2f}   relay CPU {cpu.get(k, float('nan')):5.2f} s/GB"
                  for k, v in results["tcp_gbit_s"].items()]
    if "http_ms" in results:
        lines.append("HTTP request latency, new connection each (ms):")
        lines += [f"  {k:<12} p50 {v['p50']:6.2f}  p99 {v['p99']:6.2f}  max {v['max']:6.2f}  (n={v['n']})  "
                  f"relay CPU {v['relay_cpu_ms']:.2f} ms a request" for k, v in results["http_ms"].items()]
    ratios = []
    for name in ("tunnel", "floor epoll", "floor uvloop"):
        tcp, http = results.get("tcp_gbit_s", {}), results.get("http_ms", {})
        parts = []
        if name in tcp and "ssh -R" in tcp:
            parts.append(f"TCP {tcp[name] / tcp['ssh -R']:.2f} (goal >= 1.2)" if name == "tunnel"
                         else f"TCP {tcp[name] / tcp['ssh -R']:.2f}")
        if name in http and "ssh -R" in http:
            parts.append(f"HTTP p50 {http[name]['p50'] / http['ssh -R']['p50']:.2f}" + (" (goal <= 1.0)" if name == "tunnel" else ""))
        if parts:
            ratios.append(f"  {name:<12} " + ", ".join(parts))
    if ratios:
        lines += ["Against ssh -R in this run:", *ratios]
    if "udp_redirect" in results:
        lines.append("UDP through redirect, 64-byte datagrams echoed:")
        for k, v in results["udp_redirect"].items():
            if k == "carried":
                lines.append(f"  carried: {v}")
            else:
                lines.append(f"  {k:<10} sent {v['sent_pps']:8.0f}/s  echoed {v['echoed_pps']:8.0f}/s  loss {v['loss_pct']:5.1f}%")
    if "idle_mediators" in results:
        m = results["idle_mediators"]
        lines.append(
            f"Idle mediators: {m['connected']}/{m['mediators']} connected in {m['connect_all_s']:.1f} s; server RSS "
            f"{m['server_rss_before_mib']:.1f} -> {m['server_rss_after_mib']:.1f} MiB "
            f"({m['per_mediator_kib']:.1f} KiB per mediator); mediators' process {m['mediators_process_rss_mib']:.1f} MiB"
        )
    lines += [f"Error: {e}" for e in results.get("errors", [])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--mediators", type=int, default=1000, help="idle mediators for the memory figure")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--only", default="tcp,http,udp,memory",
                        help="comma-separated parts to run: tcp, http, udp, memory (default: all)")
    parser.add_argument("--requests", type=int, default=500, help="HTTP requests per path")
    parser.add_argument("--reverse", action="store_true", help="TCP: downloads (iperf3 -R), not uploads")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if not parts <= {"tcp", "http", "udp", "memory"}:
        parser.error(f"--only: unknown part in {args.only!r}")
    if os.geteuid() != 0:
        print("bench_tunnel: needs root (network namespaces)", file=sys.stderr)
        return 1
    for tool in ("iperf3", "socat", "ssh", "ssh-keygen", "curl"):
        if shutil.which(tool) is None:
            print(f"bench_tunnel: {tool} is missing (scripts/setup installs it)", file=sys.stderr)
            return 1
    bench = Bench(args.seconds, args.mediators, args.reverse)
    try:
        bench.setup()
        for part, run in (("tcp", bench.throughput), ("http", lambda: bench.latency(args.requests)),
                          ("udp", bench.udp), ("memory", bench.memory)):
            if part in parts:
                run()
    finally:
        bench.teardown()
    print(json.dumps(bench.results, indent=2) if args.json else report(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
