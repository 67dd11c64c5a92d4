"""SMTP under `nfgate run` in the basic lab, with real peers: for tests/gateways/test_smtp_netns.py and the bench.

ext (203.0.113.10, wan side) - router (wan0 203.0.113.1, lan0 192.168.1.1) -
lan (192.168.1.10). The router's policy drops what no rule passes.

- inbound: wan tcp 25 is port-forwarded to lan:25 through the gateway
  ``smtp-in`` (recipients in example.com only); a private Postfix runs in lan.
- outbound: lan -> wan tcp 25 through ``smtp-out`` with masquerade (senders
  in example.com, any recipient); a private Postfix runs in ext for
  example.net.

``Postfix`` is a private instance (PEERS.md; ``protocols = "all"`` and an
``address`` such as ``"192.168.1.10, [fd00:1::10]"`` for IPv6 too): its own config, queue, data
and mail directories under the test's tmp, ``chroot = n``, the master in
the foreground under ``lab.popen`` (so the lab's teardown stops it even if
the test fails), log to a file, mail into a Maildir through the virtual
agent. Postfix's defaults are kept, its lax end-of-data included
(PEERS.md: 3.7 takes a bare LF as a line end), so what the tests prove is
the gateway's protection, not Postfix's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running
from tests.labconfig import RUN, ZONES

EXT = "203.0.113.10"
WAN = "203.0.113.1"
LAN = "192.168.1.10"

CONFIG = ZONES + """
[nat]
masquerade = ["wan"]

[[nat.forward]]
name = "smtp"
from = "wan"
proto = "tcp"
port = 25
to = "192.168.1.10:25"

# The filter decides what reaches a gateway (docs/datapath.md): lan may send
# mail out, and smtp-out checks it on the way.
[[rule]]
name = "mail-out"
from = "lan"
to = "wan"
proto = "tcp"
ports = 25

[processor]
queues = [0]
fail_mode = "closed"

""" + RUN + """
[[gateway]]
name = "smtp-in"
kind = "smtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 25

[gateway.settings]
recipient_domains = ["example.com"]
max_message_size = 20971520
idle_timeout = {idle}
max_sessions = 2000
max_sessions_per_client = 2000
{extra}

[[gateway]]
name = "smtp-out"
kind = "smtp"

[[gateway.traffic]]
from = "lan"
to = "wan"
proto = "tcp"
ports = 25

[gateway.settings]
sender_domains = ["example.com"]
recipient_domains = ["*"]
"""

MAIN_CF = """
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = {domain}
myorigin = $mydomain
mydestination =
inet_interfaces = {address}
inet_protocols = {protocols}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:inbox/
virtual_minimum_uid = 100
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
message_size_limit = 52428800
virtual_mailbox_limit = 0
maillog_file = {log}
maillog_file_prefixes = {root}
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
smtp_dns_support_level = disabled
default_process_limit = 20
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
in_flow_delay = 0
smtpd_peername_lookup = no
"""


class Postfix:
    """A private Postfix in a lab host, receiving ``domain`` into ``inbox`` (a Maildir)."""

    def __init__(self, lab: Any, host: str, tmp: Path, address: str, domain: str, extra: str = "",
                 protocols: str = "ipv4") -> None:
        self.lab, self.host = lab, host
        # Postfix's daemons run as user postfix and must reach these
        # directories: pytest's tmp (mode 0700 up the tree) will not do.
        root = self.root = Path(tempfile.mkdtemp(prefix=f"nfgate-postfix-{host}-"))
        self.conf, queue, data, mail = root / "etc", root / "queue", root / "data", root / "mail"
        for d in (self.conf, queue, data, mail):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        pw = pwd.getpwnam("postfix")
        for d in (data, mail):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        self.inbox = mail / "inbox"
        self.log = root / "maillog"
        (self.conf / "main.cf").write_text(MAIN_CF.format(
            queue=queue, data=data, mail=mail, hostname=f"mx.{domain}", domain=domain, address=address, protocols=protocols,
            uid=pw.pw_uid, gid=pw.pw_gid, log=self.log, root=root) + extra.format(root=root))
        master = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                fields[4] = "n"  # no chroot: nothing to copy into the queue directory
                line = " ".join(fields)
            master.append(line)
        (self.conf / "master.cf").write_text("\n".join(master) + "\n")
        self.out = root / "master.out"  # Postfix says config errors only here (no terminal, no syslog)
        with open(self.out, "wb") as out:
            self.proc = lab.popen(host, ["postfix", "-c", str(self.conf), "start-fg"], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.proc.poll() is not None or self._listening(), timeout=30, interval=0.1,
                     what=f"Postfix to listen in {host}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"postfix exited: {self.out.read_text()[-2000:]} {self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        return bool(self.lab.run(self.host, ["ss", "-Hlnt", "sport", "=", ":25"], check=False).stdout.strip())

    def _log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""

    def messages(self) -> list[bytes]:
        """The stored messages, oldest first."""
        new = self.inbox / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def count(self) -> int:
        new = self.inbox / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def wait_count(self, n: int, timeout: float = 30) -> None:
        wait_for(lambda: self.count() >= n, timeout=timeout, interval=0.05, what=f"{n} messages in {self.inbox}")

    def clear(self) -> None:
        shutil.rmtree(self.inbox, ignore_errors=True)

    def stop(self) -> None:
        """Stop the instance and remove its directories."""
        if self.proc.poll() is None:
            self.lab.run(self.host, ["postfix", "-c", str(self.conf), "stop"], check=False, timeout=30)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def stored_body(stored: bytes) -> bytes:
    """A stored message without the trace headers the MTAs added in front
    (Return-Path, Delivered-To, X-Original-To, Received and their continuation lines), line ends as sent."""
    lines = stored.split(b"\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line[:1] in (b" ", b"\t") or line.split(b":", 1)[0].lower() in (b"return-path", b"delivered-to", b"x-original-to", b"received"):
            i += 1
            continue
        break
    return b"\r\n".join(lines[i:])


class SmtpRunning(Running):
    """`nfgate run` with the two smtp gateways in the lab router."""

    def __init__(self, lab: Any, tmp: Path, idle: int = 300, extra: str = "") -> None:
        super().__init__(lab, tmp, config=CONFIG, idle=str(idle), extra=extra)

    def gateway_log(self) -> str:
        return self.text()


SMTPLIB = str(Path(__file__).with_name("smtp_client.py"))


def client(lab: Any, host: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """tests/gateways/smtp_client.py in a lab host."""
    return lab.run(host, [sys.executable, SMTPLIB, *args], check=False, timeout=timeout)
