"""FTP downloads through the ftp gateway against the kernel's FTP helper and Debian's ftp-proxy, in one run.

    sudo .venv/bin/python -m tests.firewall.ftp_bench [--size-mb 50] [--repeat 3]

Not a test (nothing is asserted): figures for ``scripts/bench ftp`` and
docs/benchmarks.md. One basic lab, vsftpd in lan (reached from ext through
the router's port forward: inbound) and in ext (reached from lan through the
router's masquerade: outbound), curl downloading a ``size-mb`` file in
passive (PASV) and active (PORT) mode. ftp-proxy answers 500 to EPSV and
EPRT (PEERS.md), so every path is measured with PASV and PORT. Four paths,
each set up alone on the router, one after the other:

- ``kernel_helper``: no nfgate; iptables with ``CT --helper ftp`` in raw
  PREROUTING, DNAT for the port forward, masquerade, a DROP forward policy
  that admits new port-21 connections and what conntrack calls RELATED.
- ``ftp_proxy``: no firewall; Debian's ftp-proxy on the router, one
  instance per direction (on the wan address to the lan server, on the lan
  address to the ext server), its per-minute fork limit raised.
- ``nfgate_allow``: ``nfgate run`` with the ftp gateway (tests/gateways/
  ftp_netns.py's config), ``data_channel = "allow"``.
- ``nfgate_inspect``: the same with ``data_channel = "inspect"``.

Each download is checked against the file's sha256; the figure is the median
of ``repeat`` downloads of curl's own ``time_total``. Ratios are throughput
ratios, nfgate / baseline (above 1: nfgate faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from firewall.lab.netns import Lab
from firewall.lab.topology import load_topology
from firewall.lab.wait import wait_for
from tests.gateways.ftp_netns import EXT, LAN, MB, WAN, FtpRunning, Vsftpd, make_file, sha256

KERNEL_HELPER = """*raw
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp --dport 21 -j CT --helper ftp
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i wan0 -p tcp --dport 21 -j DNAT --to-destination 192.168.1.10:21
-A POSTROUTING -o wan0 -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -p tcp --dport 21 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""

FTP_PROXY = """[-Global-]
Listen {listen}
Port 21
DestinationAddress {destination}
DestinationPort 21
DestinationTransferMode client
ServerType standalone
MaxClients 512
ForkLimit 100000
TimeOut 60
LogDestination {log}
LogLevel WRN
PidFile {pid}
"""

# (name, curl client host, URL host, curl mode options)
CASES = [
    ("inbound_pasv", "ext", WAN, ["--disable-epsv"]),
    ("inbound_port", "ext", WAN, ["-P", "-", "--disable-eprt"]),
    ("outbound_pasv", "lan", EXT, ["--disable-epsv"]),
    ("outbound_port", "lan", EXT, ["-P", "-", "--disable-eprt"]),
]


def download(lab: Lab, host: str, server: str, mode: list[str], out: Path, digest: str) -> float:
    """One curl download; its time_total in seconds. RuntimeError if it failed or the bytes differ."""
    argv = ["curl", "-sS", "--max-time", "120", "-o", str(out), "-w", "%{time_total}", *mode, f"ftp://{server}/pub/big.bin"]
    res = lab.run(host, argv, check=False, timeout=150)
    try:
        if res.returncode != 0 or sha256(out) != digest:
            raise RuntimeError(f"curl {' '.join(mode)} from {host} to {server}: exit {res.returncode}: {res.stderr.strip()}")
    finally:
        out.unlink(missing_ok=True)
    return float(res.stdout)


def measure(lab: Lab, tmp: Path, digests: dict[str, str], repeat: int, *, via: dict[str, str] | None = None) -> dict[str, float]:
    """Median seconds per case; ``via`` maps a case's server address to the proxy's address."""
    out: dict[str, float] = {}
    for name, host, server, mode in CASES:
        target = (via or {}).get(server, server)
        digest = digests["in" if name.startswith("inbound") else "out"]
        out[name] = statistics.median(download(lab, host, target, mode, tmp / f"{name}.bin", digest) for _ in range(repeat))
    return out


def kernel_helper(lab: Lab, tmp: Path, digests: dict[str, str], repeat: int) -> dict[str, float]:
    lab.run("router", ["iptables-nft-restore"], input=KERNEL_HELPER)
    try:
        return measure(lab, tmp, digests, repeat)
    finally:
        lab.run("router", ["nft", "flush", "ruleset"])


def ftp_proxy(lab: Lab, tmp: Path, digests: dict[str, str], repeat: int) -> dict[str, float]:
    procs = []
    try:
        for name, listen, destination in (("in", WAN, LAN), ("out", "192.168.1.1", EXT)):
            conf = tmp / f"ftp-proxy-{name}.conf"
            conf.write_text(FTP_PROXY.format(listen=listen, destination=destination, log=tmp / f"ftp-proxy-{name}.log",
                                             pid=tmp / f"ftp-proxy-{name}.pid"))
            procs.append(lab.popen("router", ["ftp-proxy", "-d", "-n", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
        lab.wait_listening("router", 21)
        wait_for(lambda: lab.run("router", ["ss", "-Hltn", "sport", "=", ":21"]).stdout.count("\n") >= 2, timeout=10,
                 interval=0.05, what="both ftp-proxy instances to listen")
        # The lan client reaches the ext server through the proxy's lan address.
        return measure(lab, tmp, digests, repeat, via={EXT: "192.168.1.1"})
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def nfgate(mode: str) -> Callable[[Lab, Path, dict[str, str], int], dict[str, float]]:
    def path(lab: Lab, tmp: Path, digests: dict[str, str], repeat: int) -> dict[str, float]:
        run_dir = tmp / f"nfgate-{mode}"
        run_dir.mkdir()
        run = FtpRunning(lab, run_dir, mode)
        try:
            wait_for(lambda: "rules" in run.ask("status")["processors"]["processor-0"], timeout=10, what="the processor")
            return measure(lab, tmp, digests, repeat)
        finally:
            run.stop()

    return path


PATHS = {
    "kernel_helper": kernel_helper,
    "ftp_proxy": ftp_proxy,
    "nfgate_allow": nfgate("allow"),
    "nfgate_inspect": nfgate("inspect"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * MB
    prefix = f"nfgf{int(time.time()) % 100000:05d}"
    lab = Lab(load_topology("basic"), prefix).up()
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            os.chmod(tmp, 0o755)
            servers = [Vsftpd(lab, "lan", tmp), Vsftpd(lab, "ext", tmp, listen_address=EXT)]
            try:
                digests = {"in": make_file(servers[0].pub / "big.bin", size), "out": make_file(servers[1].pub / "big.bin", size)}
                for name, path in PATHS.items():
                    results[name] = path(lab, tmp, digests, args.repeat)
            finally:
                for s in servers:
                    s.stop()
    finally:
        lab.down()
    report: dict[str, Any] = {"size_mb": args.size_mb, "repeat": args.repeat, "seconds": {}, "mb_per_s": {}}
    for name, cases in results.items():
        report["seconds"][name] = {case: round(t, 4) for case, t in cases.items()}
        report["mb_per_s"][name] = {case: round(args.size_mb / t, 1) for case, t in cases.items()}
    for ours in ("nfgate_allow", "nfgate_inspect"):
        for base in ("kernel_helper", "ftp_proxy"):
            report[f"ratio_{ours}_to_{base}"] = {
                case: round(results[base][case] / results[ours][case], 3) for case in results[ours]
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
