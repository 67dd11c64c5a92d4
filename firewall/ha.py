"""The router pair: keepalived and conntrackd files from ``[ha]``, and their state.

``render(config)`` writes nothing: it returns, per node, the text of
keepalived.conf, conntrackd.conf and notify.sh, each node's naming the other
as its peer, so that one config makes both (``nfgate ha render``). What the
files do and why is docs/ha.md; the facts behind them come from the proof
in the shared poc (ha-conntrackd), seen on this kernel:

- conntrackd runs FTFW over the sync link with ``DisableExternalCache On``:
  the peer's entries go straight into the kernel's table as they come, so a
  node that takes over already holds every flow's entry, both NAT bindings
  of both legs included. The stock recipe (an external cache committed by
  the notify script) races: keepalived adds the addresses and sends
  gratuitous ARP a few ms before the notify script commits, packets in that
  gap create fresh entries, and the live flows are reset at failback.
- The notify script never lets a stale internal cache turn a local flush
  into DESTROY messages for the peer: as backup it forgets its own cache
  *before* flushing the kernel table, then asks the master for a resync.
  It runs in keepalived's network namespace, so conntrack and conntrackd's
  client reach that namespace's table and daemon.
- Every path that two daemons on one host would share (conntrackd's lock,
  socket and log; keepalived's pid files; the notify state) is named by
  node, so the two nodes of a netns lab run side by side.
- keepalived's sync group moves all virtual addresses together, and each
  instance advertises by unicast to the peer's own address.
- A killed keepalived's VRRP child outlives it by about a second, holding
  its pid file: ``nfgate run`` starts keepalived again only once
  ``keepalived_leftovers`` is empty, and one ``nfgate run`` runs a node
  (``node_lock``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firewall.config import Config
from firewall.config.ha import GATEWAY_LINK, Ha
from firewall.errors import UsageError

KEEPALIVED = "keepalived.conf"
CONNTRACKD = "conntrackd.conf"
NOTIFY = "notify.sh"
# The notify script's record of the node's state: one JSON object per line.
STATE_FILE = "state-{node}.jsonl"
STATES = ("primary", "backup", "fault")
# How long `nfgate status` and a metrics scrape wait for conntrackd's statistics.
STATS_TIMEOUT = 1.0
# A notify's conntrackd commands each get this long (its commit is asynchronous, its resync quick).
NOTIFY_COMMAND_TIMEOUT = 20


@dataclass(frozen=True)
class Paths:
    """Where one node's files are: written by render, used by the daemons."""

    config_dir: Path
    run_dir: Path
    node: str

    @property
    def keepalived(self) -> Path:
        return self.config_dir / KEEPALIVED

    @property
    def conntrackd(self) -> Path:
        return self.config_dir / CONNTRACKD

    @property
    def notify(self) -> Path:
        return self.config_dir / NOTIFY

    def run(self, name: str) -> Path:
        return self.run_dir / f"{name}-{self.node}"

    @property
    def state(self) -> Path:
        return self.run_dir / STATE_FILE.format(node=self.node)


def paths(ha: Ha, node: str, config_dir: Path | None = None) -> Paths:
    return Paths((config_dir or ha.config_dir) / node, ha.run_dir, node)


def interface_of(config: Config, key: str) -> str:
    """The interface that carries ``ha.virtual.KEY``: the zone's first, or the gateway link's."""
    if key == GATEWAY_LINK:
        return config.gateway_link.router_if
    return config.zones[key].interfaces[0]


def _require(config: Config) -> Ha:
    if config.ha is None:
        raise UsageError("the config has no [ha] table (docs/ha.md)")
    return config.ha


def _advert(seconds: float) -> str:
    return f"{seconds:g}"


def keepalived_conf(config: Config, node: str, p: Paths) -> str:
    ha = _require(config)
    peer = ha.peer_of(node)
    me, other = ha.nodes[node], ha.nodes[peer]
    notify = shlex.quote(str(p.notify))
    names = {key: f"NFGATE_{key.upper()}" for key in ha.virtual}
    out = [
        f"# keepalived for node {node} of the nfgate pair (peer {peer}).",
        f"# Written by `nfgate ha render` from {config.path or 'the config'}: change [ha] there, not this.",
        "global_defs {",
        f"  router_id nfgate_{node}",
        "  script_user root",
        "  enable_script_security",
        # VRRPv3 takes sub-second adverts (centiseconds); v2 only whole seconds.
        "  vrrp_version 3",
        "  vrrp_garp_master_delay 2",
        "  vrrp_garp_master_repeat 3",
        "  vrrp_garp_lower_prio_repeat 1",
        "}",
        "vrrp_sync_group NFGATE {",
        "  group {",
        *(f"    {names[key]}" for key in ha.virtual),
        "  }",
        f'  notify_master "{notify} primary"',
        f'  notify_backup "{notify} backup"',
        f'  notify_fault "{notify} fault"',
        "}",
    ]
    for key, virtual in ha.virtual.items():
        ifname = interface_of(config, key)
        out += [
            f"vrrp_instance {names[key]} {{",
            # Both start as backup: the higher priority wins the election, and a
            # node that comes back waits preempt_delay before it takes over.
            "  state BACKUP",
            f"  interface {ifname}",
            f"  virtual_router_id {virtual.vrid}",
            f"  priority {me.priority}",
            f"  advert_int {_advert(ha.advert_interval)}",
            f"  preempt_delay {ha.preempt_delay:g}",
            f"  unicast_src_ip {me.addresses[key]}",
            "  unicast_peer {",
            f"    {other.addresses[key]}",
            "  }",
            "  virtual_ipaddress {",
            f"    {virtual.address} dev {ifname}",
            "  }",
            "}",
        ]
    return "\n".join(out) + "\n"


def conntrackd_conf(config: Config, node: str, p: Paths) -> str:
    ha = _require(config)
    peer = ha.peer_of(node)
    me, other = ha.nodes[node], ha.nodes[peer]
    # The routers' own flows (VRRP is not TCP/UDP; SSH to a node, the sync
    # itself) stay on their node: an entry for an address the peer lacks is noise there.
    ignore = ["127.0.0.1", str(me.sync_address), str(other.sync_address)]
    for n in (me, other):
        ignore += [str(a) for a in n.addresses.values()]
    buf = ha.socket_buffer
    return "\n".join([
        f"# conntrackd for node {node} of the nfgate pair (peer {peer}), FTFW over {ha.sync_interface}.",
        f"# Written by `nfgate ha render` from {config.path or 'the config'}: change [ha] there, not this.",
        "Sync {",
        "  Mode FTFW {",
        # The peer's entries go into the kernel table at once: nothing to commit at takeover.
        "    DisableExternalCache On",
        "  }",
        "  UDP {",
        f"    IPv4_address {me.sync_address}",
        f"    IPv4_Destination_Address {other.sync_address}",
        f"    Port {ha.sync_port}",
        f"    Interface {ha.sync_interface}",
        f"    SndSocketBuffer {buf}",
        f"    RcvSocketBuffer {buf}",
        "    Checksum on",
        "  }",
        "  Options {",
        "    TCPWindowTracking Off",
        "  }",
        "}",
        "General {",
        "  Systemd off",
        f"  HashSize {max(1024, ha.hash_limit // 8)}",
        f"  HashLimit {ha.hash_limit}",
        f"  LogFile {p.run('conntrackd')}.log",
        "  Syslog off",
        f"  LockFile {p.run('conntrackd')}.lock",
        "  UNIX {",
        f"    Path {p.run('conntrackd')}.ctl",
        "  }",
        "  NetlinkBufferSize 2097152",
        "  NetlinkBufferSizeMaxGrowth 8388608",
        "  NetlinkOverrunResync On",
        "  NetlinkEventsReliable Off",
        "  Filter From Userspace {",
        "    Protocol Accept {",
        "      TCP",
        "      UDP",
        "    }",
        "    Address Ignore {",
        *(f"      IPv4_address {a}" for a in dict.fromkeys(ignore)),
        "    }",
        "  }",
        "}",
    ]) + "\n"


_NOTIFY = r"""#!/bin/sh
# keepalived's notify script for node {node} of the nfgate pair: $1 is primary, backup or fault.
# Written by `nfgate ha render`: change [ha] in the config, not this. docs/ha.md says why
# each step is there; in short, conntrackd runs with DisableExternalCache On, so the peer's
# entries are already in this node's kernel table when it takes over, and nothing here
# may turn a local flush into DESTROY messages for the peer.
STATE=$1
CONF={conf}
STATEFILE={statefile}
LOG={log}
now() {{ date +%s.%N; }}
ctd() {{
  out=$(timeout {timeout} {conntrackd} -C "$CONF" "$@" 2>&1); rc=$?
  echo "$(now) conntrackd $* rc=$rc $(echo "$out" | head -c 300 | tr '\n' ' ')" >> "$LOG"
}}
echo "$(now) -> $STATE" >> "$LOG"
# Recorded first: nfgate's processors read it to know, before the flush below destroys
# this node's entries, that the peer carries those flows on (docs/ha.md, "The AG host").
printf '{{"state": "%s", "at": %s}}\n' "$STATE" "$(date +%s.%N)" >> "$STATEFILE"
case "$STATE" in
  primary)
    ctd -f      # forget the internal cache: it may hold entries of an older mastership
    ctd -R      # internal cache := the kernel table, which holds the peer's entries already
    ctd -B      # send them all to the peer
    ;;
  backup)
    ctd -f      # forget our own entries first, so the flush below sends the peer no DESTROYs
    {conntrack} -F >/dev/null 2>&1; echo "$(now) conntrack -F rc=$?" >> "$LOG"
    ctd -n      # ask the master for a resync: its entries go into our kernel table
    ;;
  fault)
    ctd -f
    ;;
esac
echo "$(now) <- $STATE done" >> "$LOG"
exit 0
"""


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def notify_script(config: Config, node: str, p: Paths) -> str:
    return _NOTIFY.format(
        node=node,
        conf=shlex.quote(str(p.conntrackd)),
        statefile=shlex.quote(str(p.state)),
        log=shlex.quote(str(p.run("notify")) + ".log"),
        timeout=NOTIFY_COMMAND_TIMEOUT,
        conntrackd=_tool("conntrackd"),
        conntrack=_tool("conntrack"),
    )


def render(config: Config, config_dir: Path | None = None) -> dict[str, dict[Path, str]]:
    """Per node: path -> text of its keepalived.conf, conntrackd.conf and notify.sh."""
    ha = _require(config)
    out = {}
    for node in ha.nodes:
        p = paths(ha, node, config_dir)
        out[node] = {
            p.keepalived: keepalived_conf(config, node, p),
            p.conntrackd: conntrackd_conf(config, node, p),
            p.notify: notify_script(config, node, p),
        }
    return out


def write(config: Config, config_dir: Path | None = None, nodes: tuple[str, ...] | None = None) -> list[Path]:
    """Write both nodes' files (root-only folders; the notify script executable), return their paths.

    keepalived's script security refuses a script that anyone but root may
    change, or that sits in a folder anyone but root may write."""
    written = []
    for node, files in render(config, config_dir).items():
        if nodes is not None and node not in nodes:
            continue
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755 if path.name == NOTIFY else 0o644)
            os.replace(tmp, path)
            written.append(path)
    return written


def daemons(config: Config, node: str, config_dir: Path | None = None) -> dict[str, list[str]]:
    """The argv of conntrackd and keepalived for ``node``, in the order they start, in the foreground.

    Run them in the node's network namespace; every file they use is named
    by node (``Paths``), so two nodes on one host do not meet."""
    ha = _require(config)
    p = paths(ha, node, config_dir)
    return {
        "conntrackd": [_tool("conntrackd"), "-C", str(p.conntrackd)],
        # -n: stay in the foreground; -P: VRRP alone; -l -D: log to the console, with details.
        "keepalived": [_tool("keepalived"), "-n", "-l", "-D", "-P", "-f", str(p.keepalived),
                       *(arg for flag, path in zip(("-p", "-r", "-c"), pid_files(p)) for arg in (flag, str(path)))],
    }


def pid_files(p: Paths) -> tuple[Path, ...]:
    """keepalived's pid files: its parent's, its VRRP child's and its checker child's (-p, -r, -c)."""
    return tuple(Path(f"{p.run(name)}.pid") for name in ("keepalived", "keepalived-vrrp", "keepalived-checkers"))


def stale_files(config: Config, node: str) -> list[Path]:
    """What conntrackd killed by SIGKILL leaves that would stop its successor (its lock and socket)."""
    p = paths(_require(config), node)
    return [Path(f"{p.run('conntrackd')}.lock"), Path(f"{p.run('conntrackd')}.ctl")]


def keepalived_stale_files(config: Config, node: str) -> list[Path]:
    """keepalived's pid files, removed before each start once ``keepalived_leftovers`` is empty: a
    start refuses ("daemon is already running", exit 0) while a file names a pid that exists, and a
    pid that exists may be a zombie (a VRRP child killed with its parent) or another process's now."""
    return list(pid_files(paths(_require(config), node)))


def runs_keepalived(cmdline: bytes, conf: Path) -> bool:
    """Whether ``/proc/PID/cmdline`` is a keepalived reading ``conf`` (2.2's children keep the parent's)."""
    argv = cmdline.rstrip(b"\0").split(b"\0")
    return os.path.basename(argv[0]).startswith(b"keepalived") and any(
        flag == b"-f" and value == os.fsencode(conf) for flag, value in zip(argv, argv[1:]))


def _live(pid: int) -> bytes | None:
    """The cmdline of ``pid`` if it runs (a zombie does not: its cmdline is empty), else None."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() or None
    except OSError:
        return None


def keepalived_leftovers(config: Config, node: str) -> list[int]:
    """The live keepalived processes of this node that its pid files name: what an earlier keepalived
    left. A parent killed with SIGKILL leaves its VRRP child, which its death signal tells to stop: it
    sends priority 0, removes the addresses and exits about a second later, holding its pid file till
    then, so a successor started meanwhile would refuse. Only this node's nfgate run starts them (its
    node lock, ``node_lock``), so what runs this node's keepalived.conf from these files is a leftover."""
    p = paths(_require(config), node)
    found: list[int] = []
    for path in pid_files(p):
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        cmdline = _live(pid) if pid > 0 and pid not in found else None
        if cmdline is not None and runs_keepalived(cmdline, p.keepalived):
            found.append(pid)
    return found


def node_lock(config: Config, node: str) -> Path:
    """The lock an ``nfgate run`` holds for its node: one runs a node's daemons, whatever its state directory."""
    return Path(f"{paths(_require(config), node).run('nfgate')}.lock")


def local_node(config: Config, addresses: set[Any]) -> str:
    """Which node this host is: the one whose sync address it holds."""
    ha = _require(config)
    mine = [name for name, node in ha.nodes.items() if node.sync_address in addresses]
    if len(mine) != 1:
        held = ", ".join(f"{n} {node.sync_address}" for n, node in ha.nodes.items())
        raise UsageError(f"[ha]: this host holds the sync address of {len(mine)} nodes ({held}): it must hold exactly one")
    return mine[0]


def record_state(config: Config, node: str, state: str) -> None:
    """Append ``state`` to the node's state file, as its notify script does (one JSON line)."""
    p = paths(_require(config), node)
    p.state.parent.mkdir(parents=True, exist_ok=True)
    with open(p.state, "a") as f:
        f.write(json.dumps({"state": state, "at": time.time()}) + "\n")


def read_events(config: Config, node: str) -> list[dict[str, Any]]:
    """Every transition the node's notify script recorded, oldest first (a line cut by a crash left out)."""
    p = paths(_require(config), node)
    try:
        lines = p.state.read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return events


def read_state(config: Config, node: str) -> dict[str, Any]:
    """This node's VRRP state as its notify script last recorded it, and when it last became primary."""
    state: dict[str, Any] = {"node": node, "vrrp": "unknown", "since": None, "last_failover": None, "transitions": 0}
    for event in read_events(config, node):
        state["transitions"] += 1
        state["vrrp"], state["since"] = event.get("state", "unknown"), event.get("at")
        if event.get("state") == "primary":
            state["last_failover"] = event.get("at")
    return state


def became_primary(before: str | None, new: list[str]) -> bool:
    """Whether a node whose last known state was ``before`` has become primary again, given the
    states recorded since (oldest first): it is primary now and was not at some point since
    ``before``. A failover and a failback between two reads are a takeover too (the node
    flushed its table when it stepped back), though its first and last states are the same."""
    if not new or new[-1] != "primary":
        return False
    return before != "primary" or any(state != "primary" for state in new[:-1])


def age(at: float | None, now: float | None = None) -> str:
    if at is None:
        return "never"
    return f"{(now or time.time()) - at:.0f} s ago"


# conntrackd -s: (key, pattern); the first match of each, in the order the sections come.
_SYNC_STATS = (
    ("entries", r"current active connections:\s+(\d+)"),
    ("injected", r"external inject:\s*\nconnections created:\s+(\d+)"),
    ("inject_failed", r"external inject:\s*\nconnections created:\s+\d+\s+failed:\s+(\d+)"),
    ("bytes_sent", r"(\d+) Bytes sent"),
    ("bytes_recv", r"(\d+) Bytes recv"),
    ("packets_sent", r"(\d+) Pckts sent"),
    ("packets_recv", r"(\d+) Pckts recv"),
    ("errors_send", r"(\d+) Error send"),
    ("errors_recv", r"(\d+) Error recv"),
    ("lost", r"(\d+) Lost msgs"),
)


def parse_sync_stats(text: str) -> dict[str, int]:
    """The numbers of ``conntrackd -s`` that say whether the sync keeps up (docs/ha.md, "Status")."""
    out = {}
    for key, pattern in _SYNC_STATS:
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1))
    return out


def sync_stats(config: Config, node: str) -> dict[str, Any]:
    """conntrackd's statistics for ``node`` (run in its namespace): ``{"running": False}`` if it does not answer."""
    p = paths(_require(config), node)
    try:
        proc = subprocess.run([_tool("conntrackd"), "-C", str(p.conntrackd), "-s"], capture_output=True, text=True,
                              timeout=STATS_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return {"running": False}
    if proc.returncode != 0:
        return {"running": False}
    return {"running": True, **parse_sync_stats(proc.stdout)}


def node_status(config: Config, node: str) -> dict[str, Any]:
    """What `nfgate status` and the metrics show of the pair: VRRP state, last failover, sync."""
    return {**read_state(config, node), "peer": _require(config).peer_of(node), "sync": sync_stats(config, node)}
