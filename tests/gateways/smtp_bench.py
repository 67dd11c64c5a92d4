"""SMTP through the smtp gateway against the kernel alone and Debian's proxsmtpd, in one run.

    sudo .venv/bin/python -m tests.gateways.smtp_bench [--count 1000] [--anchor-count 1000] [--idle 1000] [--pairs 3] [--no-relay]

Not a test (nothing is asserted): figures for ``scripts/bench smtp`` and
docs/benchmarks.md. One basic lab, a private Postfix in lan (as the netns
tests run it), smtplib in ext sending ``count`` messages of about 2 KB to
bob@example.com, one connection per message (``each``) and all in one
session (``session``). Four paths, set up one after the other on the
router:

- ``direct``: no nfgate; iptables DNAT of wan:25 to lan:25, masquerade,
  forward accept: the kernel alone.
- ``proxsmtpd``: no firewall; Debian's proxsmtpd on the router as a plain
  relay (no filter command) on wan:10025 to lan:25 (PEERS.md: its
  transparent mode crashes on this kernel), ``anchor-count`` messages.
- ``gateway``: ``nfgate run`` with the smtp gateway (tests/gateways/
  smtp_netns.py's config).
- ``relay``: ``nfgate run`` with a ``tcp-relay`` gateway in its place (the
  same selector, processor and double NAT; bytes spliced in the kernel, no
  SMTP read): what any user-mode gateway of this datapath could reach at
  best with the same dialogue, the bound the smtp gateway is measured
  against beside the kernel alone (``--no-relay`` leaves it out); and, in
  the same run, the two stand-ins in the tcp-relay's place on its socket
  (tests/firewall/floor.py): a minimal Python relay (the floor of a relay
  in Python) and a compiled one (the floor of any user-mode relay here).

Then ``idle`` sessions are opened through the gateway and held; the
gateway's resident memory before and while they are held gives its memory
per session. Postfix would need a process per session, so a tiny greeter
(a 220, then silence) stands in for it in lan for this part.

Figures are messages per second; ratios are gateway / baseline (1.0: as
fast as the kernel alone). The gateway's and the relay's ratios to the
kernel are taken inside their own ``nfgate run``: its config also forwards
wan:2525 to lan:25 through the kernel alone (``PLAIN``, no gateway), and
``--pairs`` loads of each are alternated, ABBA (the machine's drift weighs
on both alike); the ratio is the pairs' median. The standalone ``direct``
figure (no nfgate at all) is kept for proxsmtpd's ratio. For the split of what the gateway path adds,
the CPU time (user and system) the smtp-in gateway and the processor spent
per message in each mode is printed too: in ``session`` mode the processor
sees no packet (an established flow costs it nothing, docs/datapath.md),
in ``each`` mode it handles both first packets of every connection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.firewall.floor import StandIns, cpu_seconds
from tests.firewall.relay_bench import alternated, median
from tests.firewall.run_harness import Running
from tests.gateways.smtp_netns import CONFIG, LAN, WAN, Postfix, client
from tests.scratch import scratch

DIRECT = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i wan0 -p tcp --dport 25 -j DNAT --to-destination 192.168.1.10:25
-A POSTROUTING -o wan0 -j MASQUERADE
COMMIT
*filter
:FORWARD ACCEPT [0:0]
COMMIT
"""

PROXSMTPD = """Listen: 203.0.113.1:10025
OutAddress: 192.168.1.10:25
MaxConnections: 2000
TimeOut: 180
User: nobody
"""

# The kernel's own path to Postfix inside an nfgate run: a port forward with no gateway.
PLAIN_PORT = 2525
PLAIN = f"""
[[nat.forward]]
name = "smtp-plain"
from = "wan"
proto = "tcp"
port = {PLAIN_PORT}
to = "192.168.1.10:25"
"""
GATEWAY_CONFIG = CONFIG.replace("\n[processor]\n", PLAIN + "\n[processor]\n", 1)

# smtp_netns's config with smtp-in a tcp-relay: the same traffic selector, nothing of SMTP.
RELAY_CONFIG = GATEWAY_CONFIG[:GATEWAY_CONFIG.index('[[gateway]]\nname = "smtp-in"')] + """[[gateway]]
name = "smtp-in"
kind = "tcp-relay"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 25

[gateway.settings]
max_connections = 2000
"""

GREETER = r"""
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
async def greet(r, w):
    w.write(b"220 greeter ESMTP\r\n")
    await r.read()
    w.close()
async def main():
    s = await asyncio.start_server(greet, sys.argv[1], 25, backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"""


def load(lab: Lab, server: str, mode: str, count: int, port: int = 25) -> float:
    """Messages per second for ``count`` messages from ext to ``server``."""
    host = server if port == 25 else f"{server}:{port}"
    result = client(lab, "ext", "load", host, "alice@example.org", "bob@example.com", mode, str(count), "2000",
                    timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["sent"] / out["seconds"]


def delivered(pf: Postfix, n: int) -> None:
    pf.wait_count(n, timeout=600)
    pf.clear()


def in_run(lab: Lab, run: Running, pf: Postfix, mode: str, count: int, pairs: int, pids: tuple[int, int]) -> dict[str, Any]:
    """``pairs`` loads through the gateway (wan:25) and through the kernel alone (wan:2525) in one
    ``nfgate run``, alternated ABBA; the gateway's and the processor's CPU ms per message
    through the gateway. After each gateway load, its connections' ends (conntrack's destroy
    events, the FLOW_ENDs, the gateway's closes) are let finish before the next load
    (``Running.settled``): they would otherwise be charged to the kernel's."""

    cpu = [0.0, 0.0]

    def through_gateway() -> float:
        before = cpu_seconds(pids[0]), cpu_seconds(pids[1])
        rate = load(lab, WAN, mode, count)
        cpu[0] += cpu_seconds(pids[0]) - before[0]
        cpu[1] += cpu_seconds(pids[1]) - before[1]
        delivered(pf, count)
        run.settled()
        return rate

    def through_kernel() -> float:
        rate = load(lab, WAN, mode, count, port=PLAIN_PORT)
        delivered(pf, count)
        return rate

    measured = alternated(through_gateway, through_kernel, pairs)
    ratios = sorted(a / b for a, b in measured)
    return {"gateway": median([a for a, _ in measured]), "kernel": median([b for _, b in measured]),
            "ratio": round(median(ratios), 3), "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3),
            "cpu_ms": round(cpu[0] * 1000 / (count * pairs), 3), "processor_cpu_ms": round(cpu[1] * 1000 / (count * pairs), 3)}


def keep(figures: dict[str, Any], path: str, mode: str, got: dict[str, Any]) -> None:
    """``in_run``'s figures for ``path`` (``gateway`` or ``relay``) in ``mode``, under the names printed."""
    figures[f"{path}_{mode}"] = got["gateway"]
    figures[f"{path}_kernel_{mode}"] = got["kernel"]
    figures[f"ratio_{path}_kernel_{mode}"] = got["ratio"]
    figures[f"ratio_{path}_kernel_{mode}_range"] = [got["ratio_min"], got["ratio_max"]]
    figures[f"{path}_cpu_ms_{mode}"] = got["cpu_ms"]
    figures[f"{'' if path == 'gateway' else path + '_'}processor_cpu_ms_{mode}"] = got["processor_cpu_ms"]


def pid_of(tmp: Path, *words: bytes) -> int:
    """The one process of this run (its command line names ``tmp``) whose command line has all ``words``."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(any(w in arg for arg in cmd) for w in (str(tmp).encode(), *words)):
                return int(proc.name)
    raise RuntimeError(f"no process of {tmp} with {words}")


def gateway_pid(tmp: Path) -> int:
    """The smtp-in gateway process: the one whose manifest is in this run's directory."""
    return pid_of(tmp, str(tmp / "run" / "gateway-smtp-in.json").encode(), b"gateways")


def processor_pid(tmp: Path) -> int:
    return pid_of(tmp, b"--instance", b"processor-0.sock")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--anchor-count", type=int, default=1000, help="messages through proxsmtpd (about 85 ms each)")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3, help="alternated loads through the gateway and the kernel, per mode")
    parser.add_argument("--no-relay", action="store_true", help="leave out the tcp-relay path (the bound)")
    args = parser.parse_args(argv)
    lab = Lab(load_topology("basic"), f"nfgb{int(time.time()) % 100000:05d}")
    with scratch("nfgate-smtp-bench-") as tmp:
        figures: dict[str, Any] = {}
        lab.up()
        pf = None
        try:
            lab.run("router", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            pf = Postfix(lab, "lan", tmp, LAN, "example.com")
            for mode in ("each", "session"):
                lab.run("router", ["iptables-restore"], input=DIRECT, text=True)
                figures[f"direct_{mode}"] = load(lab, WAN, mode, args.count)
                delivered(pf, args.count)
                lab.run("router", ["iptables", "-t", "nat", "-F"])
            conf = tmp / "proxsmtpd.conf"
            conf.write_text(PROXSMTPD)
            prox = lab.popen("router", ["proxsmtpd", "-d", "0", "-f", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
            try:
                lab.wait_listening("router", 10025)
                for mode in ("each", "session"):
                    figures[f"proxsmtpd_{mode}"] = load(lab, WAN, mode, args.anchor_count, port=10025)
                    delivered(pf, args.anchor_count)
            finally:
                prox.terminate()
                prox.wait()
            lab.run("router", ["iptables", "-F"])
            if not args.no_relay:
                (tmp / "relay").mkdir()
                relay = Running(lab, tmp / "relay", config=RELAY_CONFIG)
                try:
                    wait_for(lambda: "smtp-in" in relay.text() and " ready " in relay.text(), timeout=30, what="the relay")
                    pids = gateway_pid(tmp / "relay"), processor_pid(tmp / "relay")
                    for mode in ("each", "session"):
                        keep(figures, "relay", mode, in_run(lab, relay, pf, mode, args.count, args.pairs, pids))
                    # The stand-ins on the relay's socket (tests/firewall/floor.py): the floor of a
                    # relay in Python and of any user-mode relay on this datapath, same dialogue.
                    stand_ins = StandIns(pids[0], tmp / "relay")
                    try:
                        for name in ("python", "compiled"):
                            stand_ins.use(name)
                            relay.settled()
                            for mode in ("each", "session"):
                                keep(figures, name, mode, in_run(lab, relay, pf, mode, args.count, args.pairs,
                                                                 (stand_ins.pids[name], pids[1])))
                    finally:
                        stand_ins.close()
                finally:
                    relay.stop()
            run = Running(lab, tmp, config=GATEWAY_CONFIG, idle="300", extra="")
            try:
                wait_for(lambda: "smtp-in" in run.text() and " ready " in run.text(), timeout=30, what="the gateway")
                pids = gateway_pid(tmp), processor_pid(tmp)
                for mode in ("each", "session"):
                    keep(figures, "gateway", mode, in_run(lab, run, pf, mode, args.count, args.pairs, pids))
                pf.stop()
                pf = None
                greeter = lab.popen("lan", [sys.executable, "-c", GREETER, LAN])
                try:
                    lab.wait_listening("lan", 25)
                    pid = gateway_pid(tmp)
                    before = rss_kb(pid)
                    holder = lab.popen("ext", [sys.executable, str(Path(__file__).with_name("smtp_client.py")),
                                               "idle", WAN, str(args.idle), "20"], stdout=subprocess.PIPE, text=True)
                    line = wait_for(holder.stdout.readline, timeout=120, what="the idle sessions")
                    greeted = json.loads(line)["greeted"]
                    held = rss_kb(pid)
                    holder.wait(timeout=60)
                    figures["idle_sessions"] = greeted
                    figures["gateway_rss_kb_before"] = before
                    figures["gateway_rss_kb_held"] = held
                    figures["kb_per_session"] = round((held - before) / max(greeted, 1), 2)
                finally:
                    greeter.kill()
                    greeter.wait()
            finally:
                run.stop()
        finally:
            if pf is not None:
                pf.stop()
            lab.down()
    for mode in ("each", "session"):
        figures[f"ratio_gateway_direct_{mode}"] = round(figures[f"gateway_{mode}"] / figures[f"direct_{mode}"], 3)
        figures[f"ratio_proxsmtpd_direct_{mode}"] = round(figures[f"proxsmtpd_{mode}"] / figures[f"direct_{mode}"], 3)
    print(f"messages: {args.count} (proxsmtpd {args.anchor_count}), about 2 KB each; msgs/s")
    for mode in ("each", "session"):
        print(f"  {mode:8} in one nfgate run, {args.pairs} pairs alternated: gateway {figures[f'gateway_{mode}']:8.1f}"
              f"  kernel alone {figures[f'gateway_kernel_{mode}']:8.1f}  **gateway/kernel {figures[f'ratio_gateway_kernel_{mode}']:.2f}**"
              f" ({figures[f'ratio_gateway_kernel_{mode}_range'][0]:.2f}-{figures[f'ratio_gateway_kernel_{mode}_range'][1]:.2f})")
    for mode in ("each", "session"):
        print(f"  {mode:8} direct {figures[f'direct_{mode}']:8.1f}  gateway {figures[f'gateway_{mode}']:8.1f}"
              f"  proxsmtpd {figures[f'proxsmtpd_{mode}']:8.1f}  gateway/direct {figures[f'ratio_gateway_direct_{mode}']:.2f}"
              f"  proxsmtpd/direct {figures[f'ratio_proxsmtpd_direct_{mode}']:.2f}")
    if not args.no_relay:
        for mode in ("each", "session"):
            figures[f"ratio_relay_direct_{mode}"] = round(figures[f"relay_{mode}"] / figures[f"direct_{mode}"], 3)
            figures[f"ratio_gateway_relay_{mode}"] = round(figures[f"gateway_{mode}"] / figures[f"relay_{mode}"], 3)
            print(f"  {mode:8} tcp-relay {figures[f'relay_{mode}']:8.1f}  relay/direct {figures[f'ratio_relay_direct_{mode}']:.2f}"
                  f"  relay/kernel in its run {figures[f'ratio_relay_kernel_{mode}']:.2f}"
                  f"  gateway/relay {figures[f'ratio_gateway_relay_{mode}']:.2f}  CPU per message: relay"
                  f" {figures[f'relay_cpu_ms_{mode}']:.2f} ms, processor {figures[f'relay_processor_cpu_ms_{mode}']:.2f} ms")
        for name in ("python", "compiled"):
            for mode in ("each", "session"):
                print(f"  {mode:8} {name} stand-in {figures[f'{name}_{mode}']:8.1f}  {name}/kernel in its run"
                      f" {figures[f'ratio_{name}_kernel_{mode}']:.2f}"
                      f" ({figures[f'ratio_{name}_kernel_{mode}_range'][0]:.2f}-{figures[f'ratio_{name}_kernel_{mode}_range'][1]:.2f})"
                      f"  CPU per message: stand-in {figures[f'{name}_cpu_ms_{mode}']:.2f} ms,"
                      f" processor {figures[f'{name}_processor_cpu_ms_{mode}']:.2f} ms")
    for mode in ("each", "session"):
        added = 1000 / figures[f"gateway_{mode}"] - 1000 / figures[f"direct_{mode}"]
        print(f"  {mode:8} added {added:6.2f} ms per message; CPU per message: gateway {figures[f'gateway_cpu_ms_{mode}']:.2f} ms,"
              f" processor {figures[f'processor_cpu_ms_{mode}']:.2f} ms")
    print(f"  idle sessions held: {figures['idle_sessions']}; gateway RSS {figures['gateway_rss_kb_before']} KB -> "
          f"{figures['gateway_rss_kb_held']} KB: {figures['kb_per_session']} KB per session")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
