"""FTP under `nfgate run` in the basic lab, with real peers: for tests/gateways/test_ftp_netns.py and the bench.

ext (203.0.113.10, wan side) - router (wan0 203.0.113.1, lan0 192.168.1.1) -
lan (192.168.1.10). The router's policy drops everything it was not told to
pass: no static rule lets lan reach wan or wan reach lan, so a data
connection crosses only by the dynamic rule the ftp gateway asked for.

- inbound: wan tcp 21 is port-forwarded to lan:21, through the ftp gateway
  (selector wan -> lan tcp 21); vsftpd runs in lan.
- outbound: lan -> wan tcp 21 through the same gateway, with masquerade;
  vsftpd runs in ext. The processor SNATs the control flow to the router's
  wan address and says so in NEW_FLOW (``snat``), so active mode works from
  behind the masquerade.

``Vsftpd`` runs a private vsftpd (PEERS.md: ``seccomp_sandbox=NO``,
``listen=YES``, ``background=NO``) with anonymous download and upload in
``<root>/pub``. ``curl``, ``lftp`` and ``ftplib`` run the clients the issue
names, each in one mode, and return the exit status and output.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.bindtable import dynamic_elements
from tests.firewall.run_harness import Running
from tests.labconfig import RUN, ZONES

EXT = "203.0.113.10"
EXT2 = "203.0.113.11"  # a third host on the wan side
WAN = "203.0.113.1"
LAN = "192.168.1.10"
LAN2 = "192.168.1.11"  # a third host on the lan side

CONFIG = ZONES + """
[nat]
masquerade = ["wan"]

[[nat.forward]]
name = "ftp-in"
from = "wan"
proto = "tcp"
port = 21
to = "192.168.1.10:21"

# The filter decides what reaches a gateway (docs/datapath.md): lan may use
# FTP servers outside, and the ftp gateway checks the sessions.
[[rule]]
name = "ftp-out"
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[processor]
queues = [0]
fail_mode = "closed"

""" + RUN + """
[[gateway]]
name = "ftp"
kind = "ftp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 21

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 21

[gateway.settings]
data_channel = "{data_channel}"
data_rule_ttl = 10
"""

VSFTPD = """
listen=YES
listen_ipv6=NO
background=NO
seccomp_sandbox=NO
anonymous_enable=YES
local_enable=NO
no_anon_password=YES
anon_root={root}
write_enable=YES
anon_upload_enable=YES
anon_other_write_enable=YES
anon_umask=022
connect_from_port_20=YES
pasv_min_port=50000
pasv_max_port=50999
secure_chroot_dir={empty}
xferlog_enable=NO
dual_log_enable=NO
max_per_ip=0
max_clients=0
"""

MB = 1 << 20

# The lan server's greeting names its private address, a lan neighbour's, and
# carries a 227 (RFC 959 section 4.2: text lines of a multi-line reply that
# look like another reply are the leak of issue 16's item 1).
LAN_BANNER = """Welcome to 192.168.1.10 (lan; printer at 10.20.30.40)
227 Entering Passive Mode (192,168,1,10,195,80).
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class Vsftpd:
    """A private vsftpd in a lab host; anonymous, files in ``root/pub`` (writable by user ftp)."""

    def __init__(self, lab: Any, host: str, tmp: Path, listen_address: str | None = None, banner: str = "",
                 options: str = "") -> None:
        self.root = tmp / f"ftp-{host}"
        self.pub = self.root / "pub"
        empty = tmp / f"ftp-{host}-empty"
        for d in (self.root, self.pub, empty):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o755)
        os.chmod(self.root, 0o555)  # vsftpd refuses an anonymous root the ftp user can write
        os.chmod(self.pub, 0o777)
        conf = tmp / f"vsftpd-{host}.conf"
        extra = (f"listen_address={listen_address}\n" if listen_address else "") + options
        if banner:  # a multi-line greeting (vsftpd's banner_file), e.g. one that names private addresses
            (tmp / f"banner-{host}.txt").write_text(banner)
            extra += f"banner_file={tmp / f'banner-{host}.txt'}\n"
        conf.write_text(VSFTPD.format(root=self.root, empty=empty) + extra)
        self.log = open(tmp / f"vsftpd-{host}.log", "w")
        self.proc = lab.popen(host, ["vsftpd", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        lab.wait_listening(host, 21)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class FtpRunning(Running):
    """`nfgate run` with the ftp gateway in the lab router; its log and control socket."""

    def __init__(self, lab: Any, tmp: Path, data_channel: str = "allow", queues: str = "[0]", workers: int = 1,
                 settings: str = "", config: str = CONFIG) -> None:
        config = config.replace("queues = [0]", f"queues = {queues}") + settings
        config = config.replace('kind = "ftp"\n', f'kind = "ftp"\nworkers = {workers}\n')
        super().__init__(lab, tmp, config=config, data_channel=data_channel)

    def processor_rules(self) -> int:
        """Dynamic rules every processor instance holds."""
        return sum(int(p["rules"]) for p in self.ask("status")["processors"].values())

    def queued(self) -> int:
        """Packets the kernel has queued to the processor so far."""
        return int(self.ask("status")["processors"]["processor-0"]["counters"].get("queued", 0))

    def granted(self) -> list[dict[str, str]]:
        """The gateway's ``rule.granted`` log lines, as their fields (direction, src, dst, mode)."""
        out = []
        for line in self.text().splitlines():
            if " rule.granted " in line:
                out.append(dict(part.split("=", 1) for part in line.split() if "=" in part))
        return out

    def conntrack(self, port: int) -> list[str]:
        """The router's conntrack entries of TCP connections with ``port`` as a port, one a line."""
        out = self.lab.run("router", ["conntrack", "-L", "-p", "tcp"], check=False).stdout
        return [line for line in out.splitlines() if f"port={port} " in line]

    def kernel_rules(self) -> list[str]:
        """The dynamic rules' elements in the binding table."""
        return dynamic_elements(self.lab)

    def clean(self) -> bool:
        """No FTP rule or expectation left: none in the processor, none in the kernel."""
        return self.processor_rules() == 0 and not self.kernel_rules()


# ---- clients -----------------------------------------------------------------------------------

CURL_MODES = {
    "epsv": [],
    "pasv": ["--disable-epsv"],
    "eprt": ["-P", "-"],
    "port": ["-P", "-", "--disable-eprt"],
}


def curl(lab: Any, host: str, server: str, mode: str, *, get: str | None = None, out: Path | None = None,
         put: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # -g: no URL globbing, so an IPv6 server's [address] is an address
    argv = ["curl", "-sS", "-g", "--max-time", str(int(timeout)), "--connect-timeout", "10", *CURL_MODES[mode]]
    if get is not None:
        assert out is not None
        argv += ["-o", str(out), f"ftp://{server}/pub/{get}"]
    else:
        assert put is not None
        argv += ["-T", str(put), f"ftp://{server}/pub/"]
    return lab.run(host, argv, check=False, timeout=timeout + 10)


def lftp(lab: Any, host: str, server: str, commands: str, *, passive: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    settings = (
        f"set ftp:passive-mode {'on' if passive else 'off'}; set net:max-retries 1; set net:timeout 10; "
        "set net:reconnect-interval-base 1; set xfer:clobber on; set cmd:fail-exit yes; "
    )
    argv = ["lftp", "-u", "anonymous,", "-e", settings + commands + "; bye", f"ftp://{server}"]
    return lab.run(host, argv, check=False, timeout=timeout)


FTPLIB = r"""
import ftplib, sys
server, mode, op, remote, local = sys.argv[1:6]
ftp = ftplib.FTP(server, timeout=20)
ftp.login()
ftp.set_pasv(mode == "pasv")
if op == "get":
    with open(local, "wb") as f:
        ftp.retrbinary("RETR pub/" + remote, f.write, blocksize=1 << 20)
else:
    with open(local, "rb") as f:
        ftp.storbinary("STOR pub/" + remote, f, blocksize=1 << 20)
ftp.quit()
"""


def ftplib_transfer(lab: Any, host: str, server: str, mode: str, op: str, remote: str, local: Path,
                    timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", FTPLIB, server, mode, op, remote, str(local)]
    return lab.run(host, argv, check=False, timeout=timeout)
