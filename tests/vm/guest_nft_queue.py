"""Guest side of tests/vm/test_nft_queue.py: nft ``queue`` into a Python netfilterqueue.

Runs as root inside Debian's stock kernel (booted by tests/vm/harness.py), which
has the nft ``queue`` expression our hosts' kernel lacks. For each ruleset the
host hands over (a "case"), it proves on a real kernel path that the ruleset's
queue steering hands a matching UDP datagram to a netfilterqueue process, and
leaves a datagram to another port alone:

    client netns  eth0 --veth-- <in>  router netns  <out> --veth-- eth0  server netns
    10.99.0.2                   10.99.0.1       10.99.1.1             10.99.1.2

Which datagram should be queued is not hard-coded: after ``nft -f``, the ruleset
is read back with ``nft -j``. For each ``udp dport`` rule in a prerouting or
forward base chain, a small evaluator runs that base chain, following jumps and
gotos, for a UDP datagram from the client to the server on that port, until one
reaches a ``queue`` verdict (``derive_probe``). That yields the input interface
name, the port and the queue number; a port the evaluator proves unqueued, and
no rule names, gives the negative. Expressions it cannot decide (fib, sets of
addresses, ct status...) make it pass over that rule rather than guess.

The router runs the queue listener: a process of its own (role ``listen``),
bound to every queue number the ruleset names. The client's and the server's
sockets are made in their namespaces by this process (``in_netns``), which saves
a Python start-up per datagram in software emulation. A probe table counts
both ports on the queue chain's hook, one priority step later: after the queue
verdict. Once the probe has counted a datagram, the listener (which records
before its verdict) has either recorded it or never will: no fixed waits.

Usage (the harness does this): ``python guest_nft_queue.py run OUT``, with
``OUT/cases.json`` and the ruleset files written by the host. It writes
``OUT/result.json`` (``{"kernel", "cases": {name: {...}}}``); each case has
``status`` "ran", "skipped" (with ``reason``: no queue path the evaluator can
model) or "error" (with ``error``: a step failed, e.g. ``nft -f`` refused the
ruleset). Exit status 0 when no case had an error. The host judges the rest.
The role ``listen`` is the helper process it starts in the router namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

ROUTER_IN_IP = "10.99.0.1"
ROUTER_OUT_IP = "10.99.1.1"
MODULES = ("nf_tables", "nft_queue", "nfnetlink_queue", "veth")
# What nfgate's rendered rulesets use besides. Loaded up front, in one modprobe:
# left to autoload, each missing module makes nf_tables abort and replay the whole
# ``nft -f`` transaction, which costs seconds per module in software emulation.
# Not required: a module missing here is still autoloaded (or refused) by nft.
PRELOAD = ("nf_conntrack", "nf_nat", "nft_ct", "nft_nat", "nft_chain_nat", "nft_masq", "nft_fib_inet",
           "nft_fib_ipv4", "nft_fib_ipv6", "nft_reject_inet", "nft_limit", "nft_log")
# Bounds for every wait in the guest (software emulation is slow; these are caps).
STEP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
HELPER_LIFETIME = 120.0
CLONE_NEWNET = 0x40000000


def log(msg: str) -> None:
    print(f"[guest {time.monotonic():8.2f}] {msg}", flush=True)


class StepError(Exception):
    """A set-up step failed; the message names the step and the reason."""


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in netns ``name`` (this single-threaded process); sockets made there stay there."""
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = STEP_TIMEOUT,
       input: str | None = None) -> str:
    """Run a command (in netns ``ns`` when given), return stdout; raise with its stderr on failure.

    The child inherits the namespace from this process (``in_netns``): cheaper
    than ``ip netns exec``, which also remounts /sys for every command.
    """
    with in_netns(ns) if ns else nullcontext():
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              input=input)
    if check and proc.returncode != 0:
        where = f" (netns {ns})" if ns else ""
        raise StepError(f"{' '.join(argv)}{where}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(what: str, predicate: Callable[[], object], timeout: float = STEP_TIMEOUT,
             alive: Callable[[], str | None] | None = None) -> object:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds.

    ``alive`` returns a reason when a helper the wait depends on has died, so a
    dead listener fails the step at once instead of at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and (reason := alive()):
            raise StepError(f"waiting for {what}: {reason}")
        if time.monotonic() >= deadline:
            raise StepError(f"waiting for {what}: not within {timeout:g}s")
        time.sleep(POLL_INTERVAL)


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSON-lines file a helper may still be appending to."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


from nft_eval import CLIENT_IP, CLIENT_SPORT, SERVER_IP, Probe, Ruleset, derive_probe  # noqa: E402  (beside this script in the guest)


# --- helper roles --------------------------------------------------------------

class _Stop:
    """Set by SIGTERM/SIGINT; helpers also stop at their own deadline."""

    def __init__(self, lifetime: float) -> None:
        self.flag = False
        self.deadline = time.monotonic() + lifetime
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.flag = True

    def __bool__(self) -> bool:
        return self.flag or time.monotonic() >= self.deadline


def parse_ipv4(data: bytes) -> dict:
    """Addresses, ports and payload of an IPv4 UDP/TCP packet, as delivered by the queue."""
    rec: dict = {"length": len(data)}
    if len(data) < 20 or data[0] >> 4 != 4:
        rec["error"] = "not IPv4"
        return rec
    ihl = (data[0] & 0x0F) * 4
    proto = data[9]
    rec.update(src=str(ipaddress.IPv4Address(data[12:16])), dst=str(ipaddress.IPv4Address(data[16:20])),
               proto=proto)
    l4 = data[ihl:]
    if proto == socket.IPPROTO_UDP and len(l4) >= 8:
        sport, dport, ulen = struct.unpack("!HHH", l4[:6])
        rec.update(sport=sport, dport=dport, payload=l4[8:ulen].decode("latin-1"))
    elif proto == socket.IPPROTO_TCP and len(l4) >= 20:
        sport, dport = struct.unpack("!HH", l4[:4])
        off = (l4[12] >> 4) * 4
        rec.update(sport=sport, dport=dport, tcp_flags=l4[13], payload=l4[off:].decode("latin-1"))
    return rec


def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index) if index else None
    except OSError:
        return None


def role_listen(args: argparse.Namespace) -> int:
    """Bind every queue in ``args.queues``; record each packet to queued.jsonl, then accept it."""
    from netfilterqueue import NetfilterQueue

    work = Path(args.work)
    stop = _Stop(args.lifetime)
    out = (work / "queued.jsonl").open("a", buffering=1)

    def on_packet_for(queue: int):
        def on_packet(pkt) -> None:
            rec = parse_ipv4(pkt.get_payload())
            rec.update(queue=queue, hook=pkt.hook, mark=pkt.get_mark(), indev=_ifname(pkt.indev))
            # Written before the verdict: whoever sees the packet after the
            # queue can rely on the record being there already.
            out.write(json.dumps(rec) + "\n")
            out.flush()
            pkt.accept()
        return on_packet

    queues = {}
    for num in args.queues:
        nfq = NetfilterQueue()
        nfq.bind(num, on_packet_for(num))
        queues[nfq.get_fd()] = nfq
    (work / "bound").write_text(f"{os.getpid()} {args.queues}\n")
    try:
        while not stop:
            ready, _, _ = select.select(list(queues), [], [], 0.2)
            for fd in ready:
                queues[fd].run(block=False)
    finally:
        for nfq in queues.values():
            nfq.unbind()
        out.close()
    return 0


# --- orchestration -----------------------------------------------------------

class Sink:
    """UDP sockets on the server's ``ports``; ``received()`` drains them and returns all so far."""

    def __init__(self, ns: str, ports: list[int]) -> None:
        self.records: list[dict] = []
        self.socks: list[tuple[socket.socket, int]] = []
        with in_netns(ns):
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.bind(("0.0.0.0", port))
                self.socks.append((s, port))

    def received(self) -> list[dict]:
        for s, port in self.socks:
            while True:
                try:
                    data, (src, sport) = s.recvfrom(65535)
                except BlockingIOError:
                    break
                self.records.append({"src": src, "sport": sport, "dport": port,
                                     "payload": data.decode("latin-1")})
        return self.records

    def close(self) -> None:
        for s, _ in self.socks:
            s.close()


def send_udp(ns: str, dst: str, port: int, sport: int, payload: str) -> dict:
    """Send one UDP datagram from ``ns``; return the 4-tuple it left with."""
    with in_netns(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.connect((dst, port))
        s.send(payload.encode("latin-1"))
        src, sport = s.getsockname()
    return {"src": src, "sport": sport, "dst": dst, "dport": port}


class Helper:
    """A helper role of this file, started directly in netns ``ns``: its PID is its own."""

    def __init__(self, name: str, ns: str, argv: list[str], work: Path) -> None:
        self.name = name
        self.log_path = work / f"{name}.log"
        self._log = self.log_path.open("w")
        with in_netns(ns):
            self.proc = subprocess.Popen(
                [sys.executable, __file__, *argv], stdout=self._log, stderr=subprocess.STDOUT,
            )

    def dead(self) -> str | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"{self.name} exited {rc}: {self.log_path.read_text().strip()[-800:]}"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


@dataclass(frozen=True)
class Namespaces:
    client: str
    router: str
    server: str

    def all(self) -> tuple[str, str, str]:
        return self.client, self.router, self.server


def setup_topology(ns: Namespaces, iif: str, oif: str) -> None:
    """The three namespaces' links, addresses and routes: one ``ip -batch`` per namespace."""
    # Created directly inside their namespaces: nothing appears in the root one.
    sh("ip", "-batch", "-", input=(
        f"link add eth0 netns {ns.client} type veth peer name {iif} netns {ns.router}\n"
        f"link add {oif} netns {ns.router} type veth peer name eth0 netns {ns.server}\n"))
    sh("ip", "-batch", "-", ns=ns.client, input=(
        f"link set lo up\naddr add {CLIENT_IP}/24 dev eth0\nlink set eth0 up\n"
        f"route add default via {ROUTER_IN_IP}\n"))
    sh("ip", "-batch", "-", ns=ns.router, input=(
        f"link set lo up\naddr add {ROUTER_IN_IP}/24 dev {iif}\nlink set {iif} up\n"
        f"addr add {ROUTER_OUT_IP}/24 dev {oif}\nlink set {oif} up\n"))
    sh("ip", "-batch", "-", ns=ns.server, input=(
        f"link set lo up\naddr add {SERVER_IP}/24 dev eth0\nlink set eth0 up\n"
        f"route add default via {ROUTER_OUT_IP}\n"))
    # /proc/sys/net belongs to the namespace of whoever opens it.
    with in_netns(ns.router), open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")


def selector_counter(ns: str, probe: Probe) -> int | None:
    """Packets counted by the base-chain rule that selects the probed port (None without a counter)."""
    listing = json.loads(sh("nft", "-j", "list", "chain", probe.family, probe.table, probe.chain, ns=ns))
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule["handle"] == probe.handle:
            return next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), None)
    raise StepError(f"rule {probe.chain}#{probe.handle} is gone from the router's ruleset")


def probe_counters(ns: str) -> dict[int, int]:
    """Packets per port counted by the probe table, {dport: packets}."""
    listing = json.loads(sh("nft", "-j", "list", "table", "inet", "nfgvm_probe", ns=ns))
    counts = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        ports = [e["match"]["right"] for e in rule["expr"]
                 if e.get("match", {}).get("left") == {"payload": {"protocol": "udp", "field": "dport"}}]
        packets = [e["counter"]["packets"] for e in rule["expr"] if "counter" in e]
        if ports and packets:
            counts[ports[0]] = packets[0]
    return counts


def run_case(index: int, case: dict, out: Path, result: dict) -> None:
    """One ruleset: namespaces, ruleset, probe, listener, two datagrams. Fills ``result``."""
    ns = Namespaces(f"nfgvm{index}-client", f"nfgvm{index}-router", f"nfgvm{index}-server")
    work = Path(tempfile.mkdtemp(prefix=f"nfgvm{index}-"))  # guest-local: helpers share files here
    helpers: list[Helper] = []
    sink: Sink | None = None
    steps: list[str] = result.setdefault("steps", [])
    timings: list = result.setdefault("timings", [])
    started = [time.monotonic()]

    def step(name: str) -> None:
        now = time.monotonic()
        if steps:
            timings.append([steps[-1], round(now - started[0], 2)])
        started[0] = now
        log(f"[{case['name']}] {name}")
        steps.append(name)

    try:
        for name in ns.all():
            sh("ip", "netns", "add", name)
        step(f"nft -f {case['ruleset_file']} ({case['source']})")
        sh("nft", "-f", str(out / case["ruleset_file"]), ns=ns.router)
        result["ruleset_listing"] = sh("nft", "list", "ruleset", ns=ns.router)
        rs = Ruleset(json.loads(sh("nft", "-j", "list", "ruleset", ns=ns.router)))
        found = derive_probe(rs)
        if isinstance(found, str):
            result.update(status="skipped", reason=found)
            log(f"[{case['name']}] skipped: {found}")
            return
        probe = found
        result["probe"] = asdict(probe)
        queues = rs.queue_numbers()
        result["bound_queues"] = queues

        step(f"topology: client -> {probe.iifname} router {probe.out_ifname} -> server")
        setup_topology(ns, probe.iifname, probe.out_ifname)
        # The probe table counts both ports on the queue chain's hook, one step
        # later: a datagram counted there has passed the queue rule's verdict.
        probe_nft = (
            "table inet nfgvm_probe {\n"
            f"  chain after_queue {{ type filter hook {probe.hook} priority {probe.prio + 1}; policy accept;\n"
            f"    udp dport {probe.port} counter\n"
            f"    udp dport {probe.nonmatch_port} counter\n"
            "  }\n}\n"
        )
        (work / "probe.nft").write_text(probe_nft)
        sh("nft", "-f", str(work / "probe.nft"), ns=ns.router)

        step(f"start sink in server netns, listener on queues {queues} in router netns")
        sink = Sink(ns.server, [probe.port, probe.nonmatch_port])
        listener = Helper("listener", ns.router, ["listen", "--work", str(work), "--lifetime",
                                                  str(HELPER_LIFETIME), "--queues", *map(str, queues)], work)
        helpers.append(listener)
        wait_for(f"the listener to bind queues {queues}", lambda: (work / "bound").exists(), alive=listener.dead)
        counters = {"before": selector_counter(ns.router, probe)}

        def send(port: int) -> dict:
            return send_udp(ns.client, SERVER_IP, port, CLIENT_SPORT, case["payload"])

        step(f"send matching datagram to {SERVER_IP}:{probe.port}")
        result["sent_match"] = send(probe.port)
        wait_for(f"the probe to count udp dport {probe.port}",
                 lambda: probe_counters(ns.router).get(probe.port, 0) >= 1, alive=listener.dead)
        counters["after_match"] = selector_counter(ns.router, probe)

        step(f"send non-matching datagram to {SERVER_IP}:{probe.nonmatch_port}")
        result["sent_nonmatch"] = send(probe.nonmatch_port)
        wait_for(f"the probe to count udp dport {probe.nonmatch_port}",
                 lambda: probe_counters(ns.router).get(probe.nonmatch_port, 0) >= 1, alive=listener.dead)
        counters["after_nonmatch"] = selector_counter(ns.router, probe)
        result["selector_counter"] = counters
        result["probe_counters"] = {str(k): v for k, v in probe_counters(ns.router).items()}

        step("wait for the sink to receive what the router forwarded")
        # Only a bound, not an expectation: a rendered ruleset may drop in
        # forward. The host asserts delivery for the hand-written ruleset only.
        try:
            wait_for("the sink to receive both datagrams",
                     lambda: {r["dport"] for r in sink.received()} >= {probe.port, probe.nonmatch_port},
                     timeout=5.0)
        except StepError as err:
            result["sink_note"] = str(err)
        step("done")
        result["status"] = "ran"
    except (StepError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as err:
        result.update(status="error", error=f"{steps[-1] if steps else 'netns'}: {err}")
        log(f"[{case['name']}] FAILED {result['error']}")
    finally:
        for h in helpers:
            result.setdefault("helper_rc", {})[h.name] = h.stop()
            result.setdefault("helper_log", {})[h.name] = h.log_path.read_text()[-2000:]
        result["queued"] = read_jsonl(work / "queued.jsonl")
        if sink is not None:
            result["sink"] = sink.received()
            sink.close()
        for name in ns.all():
            sh("ip", "netns", "del", name, check=False)


def run(out: Path) -> int:
    cases = json.loads((out / "cases.json").read_text())
    result: dict = {"kernel": os.uname().release, "cases": {}}
    rc = 0
    try:
        log("modprobe " + " ".join(MODULES))
        sh("modprobe", "-a", *MODULES)
        preload = subprocess.run(["modprobe", "-a", *PRELOAD], capture_output=True, text=True,
                                 timeout=STEP_TIMEOUT, check=False)
        if preload.returncode != 0:
            result["preload_note"] = preload.stderr.strip()
        for index, case in enumerate(cases):
            res = result["cases"][case["name"]] = {"params": case}
            if case.get("skip"):
                res.update(status="skipped", reason=case["skip"])
                continue
            run_case(index, case, out, res)
            rc |= res["status"] == "error"
    except (StepError, subprocess.TimeoutExpired) as err:
        result["error"] = str(err)
        log(f"FAILED {err}")
        rc = 1
    finally:
        result["modules"] = sorted(line.split()[0] for line in Path("/proc/modules").read_text().splitlines())
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    log("done: " + ", ".join(f"{k}={v.get('status')}" for k, v in result["cases"].items()))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("run")
    p.add_argument("out", type=Path)
    p = sub.add_parser("listen")
    p.add_argument("--work", required=True)
    p.add_argument("--queues", type=int, nargs="+", required=True)
    p.add_argument("--lifetime", type=float, default=HELPER_LIFETIME)
    args = ap.parse_args(argv)
    if args.role == "run":
        return run(args.out)
    return role_listen(args)


if __name__ == "__main__":
    sys.exit(main())
