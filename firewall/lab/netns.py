"""Build a topology as network namespaces on this machine, and tear it down.

Each host of a ``Topology`` becomes a namespace named ``<prefix>-<host>``.
Netlink work (veth pairs, addresses, routes) goes through pyroute2's
``IPRoute(netns=...)``, which opens a socket inside the namespace without
moving the caller; the steps themselves are ``firewall.namespaces``, which the
blind track (``firewall.gwlink``) shares. Everything else runs as ``ip netns exec NS argv...``:
sysctls, the topology's set-up commands, and whatever a test or an operator
asks for.

Why it is built this way:

- Each veth pair is created by a socket inside one end's namespace with the
  peer's namespace given at creation, so no lab interface ever appears in the
  root namespace (where it could collide with, or route, the host's traffic).
- ``up()`` either finishes or removes everything it made, so a failed build
  leaves nothing behind; ``cleanup(prefix)`` does the same for a lab left by a
  crash, the way ``mn -c`` does for Mininet.
- Nothing sleeps a fixed time: waiting for links or listeners polls
  (``firewall.lab.wait``).
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from firewall import namespaces
from firewall.errors import KernelError, NfgateError, PrivilegeError, UsageError
from firewall.lab import state as lab_state
from firewall.lab.state import LabState, Owner, current_owner
from firewall.lab.topology import BRIDGE, HOST_RE, Host, Topology
from firewall.lab.wait import wait_for

# Namespaces whose name starts with this "look like ours" when no prefix is given.
OWN_PREFIX = "nfg"
PREFIX_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
RT_TABLE_MAIN = 254
COMMAND_TIMEOUT = 30.0
LINK_UP_TIMEOUT = 5.0
KILL_TIMEOUT = 3.0
# Far above the small indexes a fresh namespace hands out (see _build).
VETH_INDEX_BASE = 1000


class LabCommandError(KernelError):
    """A command inside a lab namespace failed or timed out."""

    def __init__(self, message: str, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def default_prefix(topology: Topology) -> str:
    """``nfg-<topology name>``: short, and recognisable in ``ip netns list``."""
    return f"{OWN_PREFIX}-{topology.name}"


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise UsageError(
            f"lab prefix {prefix!r}: use 1-32 lowercase letters, digits and '-' (not at either end)"
        )
    return prefix


def namespace_name(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"


def split_namespace(name: str) -> tuple[str, str] | None:
    """``nfg-basic-ext`` -> ``("nfg-basic", "ext")``; None if it is not a lab name.

    Host names hold no '-', so the last '-' always separates prefix and host.
    """
    prefix, sep, host = name.rpartition("-")
    if not sep or not PREFIX_RE.match(prefix) or not HOST_RE.match(host):
        return None
    return prefix, host


def lab_namespaces(prefix: str | None = None) -> list[str]:
    """Namespaces of the lab with this prefix, or of every lab that looks like ours (``nfg*``)."""
    names = []
    for name in pr_netns.listnetns():
        parts = split_namespace(name)
        if parts is None:
            continue
        if prefix is None and parts[0].startswith(OWN_PREFIX):
            names.append(name)
        elif prefix is not None and parts[0] == prefix:
            names.append(name)
    return sorted(names)


def cleanup(prefix: str | None = None) -> list[str]:
    """Kill what runs inside a lab's namespaces and remove them and its state file;
    return the names removed.

    With no prefix, removes every namespace that looks like ours (``nfg*``).
    Idempotent and best effort: it goes on past a failure and reports the
    failures at the end as one KernelError.
    """
    if prefix is not None:
        check_prefix(prefix)
    names = lab_namespaces(prefix)
    removed = remove_namespaces(names)
    prefixes = {prefix} if prefix is not None else {split_namespace(n)[0] for n in names}  # type: ignore[index]
    for p in prefixes:
        lab_state.remove(p)
    return removed


def known_labs() -> dict[str, LabState | None]:
    """Every lab: those with a state file, and ``nfg*`` namespaces without one (None)."""
    labs: dict[str, LabState | None] = {s.prefix: s for s in lab_state.all_states()}
    for name in lab_namespaces():
        labs.setdefault(split_namespace(name)[0], None)  # type: ignore[index]
    return labs


def remove_namespaces(names: list[str]) -> list[str]:
    """Kill the processes inside the named namespaces, then remove them; return those removed."""
    if not names:
        return []
    # TERM first, so that a lab's programs may tidy up; KILL for the stubborn.
    # One stuck in the kernel (D state) keeps its namespace alive after the
    # name goes, but the name goes anyway.
    namespaces.stop_inside(names, (signal.SIGTERM, signal.SIGKILL), KILL_TIMEOUT)
    removed, failed = [], []
    for name in names:
        try:
            if namespaces.remove_namespace(name):
                removed.append(name)
        except OSError as err:
            failed.append(f"{name}: {err.strerror or err}")
    if failed:
        raise KernelError(f"lab cleanup: could not remove {'; '.join(failed)}")
    return removed


def inspect_namespace(name: str) -> dict[str, Any]:
    """Interfaces (state, addresses) and main-table routes inside one namespace."""
    try:
        ipr = namespaces.netlink(name)
    except OSError:
        # Gone (FileNotFoundError), or going while we looked: pyroute2 says
        # EINVAL "failed to open netns" for a name whose namespace is being removed.
        return {"present": False, "interfaces": [], "routes": []}
    with ipr:
        links = {link["index"]: link for link in ipr.link("dump")}
        interfaces = []
        for index, link in sorted(links.items()):
            addrs = [
                f"{a.get('address')}/{a['prefixlen']}"
                for a in ipr.addr("dump", index=index)
                if not (a["family"] == AF_INET6 and a.get("address", "").startswith("fe80:"))
            ]
            interfaces.append(
                {
                    "ifname": link.get("ifname"),
                    "state": link.get("operstate"),
                    "mac": link.get("address"),
                    "addresses": addrs,
                }
            )
        routes = []
        for family in (AF_INET, AF_INET6):
            for r in ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                oif = r.get("oif")
                dst = r.get("dst")
                to = "default" if r["dst_len"] == 0 else f"{dst}/{r['dst_len']}"
                if family == AF_INET6 and (to.startswith("fe80:") or to.startswith("ff00:")):
                    continue  # the kernel's own link-local and multicast routes
                routes.append(
                    {
                        "to": to,
                        "via": r.get("gateway"),
                        "dev": links[oif].get("ifname") if oif in links else None,
                    }
                )
    return {"present": True, "interfaces": interfaces, "routes": routes}


def status(prefix: str | None = None) -> dict[str, Any]:
    """What the kernel holds for one lab, or for every lab (``known_labs``).

    Returns ``{prefix: {"topology", "owner", "owner_alive", "hosts": {host:
    {"namespace", "present", "interfaces", "routes"}}}}``; ``topology`` and
    ``owner`` are None for a lab without a state file. It reads no topology
    file, so it also shows a lab whose file has changed since. A lab whose
    state file names hosts without a namespace shows them as not present.
    """
    prefixes = [prefix] if prefix is not None else sorted(known_labs())
    labs: dict[str, Any] = {}
    for p in prefixes:
        st = lab_state.read(p)
        names = set(lab_namespaces(p))
        if st is None and not names:
            continue
        if st is not None:
            names |= {namespace_name(p, h) for h in st.hosts}
        hosts = {}
        for name in sorted(names):
            hosts[split_namespace(name)[1]] = {"namespace": name, **inspect_namespace(name)}  # type: ignore[index]
        labs[p] = {
            "topology": st.topology if st else None,
            "owner": vars(st.owner) if st else None,
            "owner_alive": st.owner.alive() if st else None,
            "hosts": hosts,
        }
    return labs


# ICMP echo with a raw socket, run by this interpreter inside a namespace, so
# that the lab does not depend on iputils-ping being installed. Exit 0 on the
# first matching reply; every wait is bounded by a deadline.
_PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.getaddrinfo(dst, None)[0][0]
v6 = family == socket.AF_INET6
sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
for seq in range(1, count + 1):
    body = b"nfgate-lab-ping!"
    hdr = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq)
    if not v6:  # the kernel fills in the ICMPv6 checksum itself
        hdr = struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq)
    sock.sendto(hdr + body, (dst, 0))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, peer = sock.recvfrom(2048)
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
        if kind == (129 if v6 else 0) and rid == ident and rseq == seq:
            print("reply from %s seq=%d" % (peer[0], seq))
            sys.exit(0)
sys.exit(1)
"""


def _ip_netns_exec(ns: str, argv: Sequence[Any] | str) -> list[str]:
    if isinstance(argv, str):
        argv = shlex.split(argv)
    if not argv:
        raise UsageError("lab: empty command")
    return ["ip", "netns", "exec", ns, *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv)]


def _first_line(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[0] if lines else ""


class Lab:
    """One topology built as namespaces ``<prefix>-<host>``.

    ``lab = Lab(load_topology("basic"), "nfg-basic").up()`` builds it;
    ``lab.run("ext", ["ping", "-c1", "203.0.113.1"])`` runs a command in a host;
    ``lab.down()`` removes it. As a context manager it builds on entry and
    removes on exit.
    """

    def __init__(self, topology: Topology, prefix: str | None = None, owner: Owner | None = None) -> None:
        self.topology = topology
        self.prefix = check_prefix(prefix if prefix is not None else default_prefix(topology))
        self.owner = owner
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._step = ""

    def __repr__(self) -> str:
        return f"Lab({self.topology.name!r}, prefix={self.prefix!r})"

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- names --------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace name of a host; UsageError for a host the topology lacks."""
        self.topology.host(host)
        return namespace_name(self.prefix, host)

    @property
    def namespaces(self) -> list[str]:
        return [namespace_name(self.prefix, h) for h in self.topology.host_names]

    # -- building -----------------------------------------------------------

    def up(self) -> Lab:
        """Create every namespace, link, address, route, sysctl and command.

        On any failure, removes what it built and raises one KernelError (or
        UsageError/PrivilegeError) whose message names the step that failed.
        """
        present = lab_namespaces(self.prefix)
        if present:
            raise UsageError(
                f"lab {self.prefix} is already up ({', '.join(present)}); "
                f"remove it with: nfgate lab down --prefix {self.prefix}"
            )
        self._created = []
        self._step = f"writing the lab's state file {lab_state.path_of(self.prefix)}"
        try:
            # Before the first namespace, so that a crash half way leaves a record.
            lab_state.write(LabState(
                prefix=self.prefix,
                topology=self.topology.name,
                hosts=self.topology.host_names,
                owner=self.owner or current_owner(),
                source=str(self.topology.source) if self.topology.source else None,
            ))
            self._build()
        except BaseException as err:
            try:
                # Only what this call made: a namespace that appeared meanwhile
                # under the same prefix is someone else's.
                self._teardown(self._created)
            except NfgateError:
                pass  # the build error is the one worth reporting
            lab_state.remove(self.prefix)
            if isinstance(err, LabCommandError):
                raise LabCommandError(
                    f"lab {self.prefix} up: {self._step}: {err}", err.argv, err.returncode, err.stdout, err.stderr
                ) from err
            if isinstance(err, NfgateError) or not isinstance(err, Exception):
                raise
            raise self._translate(err) from err
        return self

    def _translate(self, err: Exception) -> NfgateError:
        where = f"lab {self.prefix} up: {self._step}"
        if isinstance(err, PermissionError) or (isinstance(err, OSError) and err.errno == errno.EPERM):
            return PrivilegeError(f"{where}: needs root (network namespaces, netlink)")
        if isinstance(err, NetlinkError):
            return KernelError(f"{where}: {err.args[1] if len(err.args) > 1 else err}")
        if isinstance(err, OSError):
            return KernelError(f"{where}: {err.strerror or err}")
        return KernelError(f"{where}: {err}")

    def _build(self) -> None:
        topo = self.topology
        for host in topo.host_names:
            self._step = f"creating namespace {self.ns(host)}"
            pr_netns.create(self.ns(host))
            self._created.append(self.ns(host))
        with ExitStack() as stack:
            ipr = {}
            for host in topo.host_names:
                self._step = f"opening netlink in {self.ns(host)}"
                ipr[host] = stack.enter_context(namespaces.netlink(self.ns(host)))
                namespaces.set_up(ipr[host], "lo")
            for host in topo.hosts:
                self._sysctls(host, early=True)
            for i, link in enumerate(topo.links):
                a, b = link.a, link.b
                self._step = f"links[{i}]: veth {a.host}:{a.ifname} <-> {b.host}:{b.ifname}"
                # Created from a's namespace with the peer placed in b's namespace
                # in the same request: neither end ever exists in the root namespace.
                # The explicit index keeps a's ifindex different from b's (both
                # would be 2 in fresh namespaces): when a veth's ifindex equals its
                # peer's, linkwatch treats carrier-on as non-urgent and delays it
                # (and the qdisc activation that lets packets pass) by up to 1 s.
                namespaces.add_veth(ipr[a.host], a.ifname, b.ifname, self.ns(b.host), index=VETH_INDEX_BASE + i)
            for i, link in enumerate(topo.links):
                for side, ep in (("a", link.a), ("b", link.b)):
                    self._step = f"links[{i}].{side}: addresses of {ep.host}:{ep.ifname}"
                    namespaces.configure(ipr[ep.host], ep)
            for host in topo.hosts:
                self._sysctls(host, early=False)
            for host in topo.hosts:
                if host.bridge:
                    self._step = f"hosts.{host.name}.bridge: {BRIDGE} of its interfaces"
                    namespaces.add_bridge(ipr[host.name], BRIDGE, [ep.ifname for ep in topo.endpoints(host.name)])
            for host in topo.host_names:
                self._step = f"waiting for the links of {host} to come up"
                self._wait_links_up(ipr[host], [ep.ifname for ep in topo.endpoints(host)])
            for i, route in enumerate(topo.routes):
                self._step = f"routes[{i}]: {route.to} in {route.host}"
                namespaces.add_route(ipr[route.host], route)
        for host in topo.hosts:
            for j, argv in enumerate(host.commands):
                self._step = f"commands.{host.name}[{j}]"
                self.run(host.name, argv, timeout=COMMAND_TIMEOUT)

    def _wait_links_up(self, ipr: IPRoute, ifnames: list[str]) -> None:
        # A veth carries packets only once linkwatch has seen both ends up and
        # activated its qdisc; until then the first ping of a test is dropped.
        def all_up() -> bool:
            states = {link.get("ifname"): link.get("operstate") for link in ipr.link("dump")}
            return all(states.get(name) == "UP" for name in ifnames)

        wait_for(all_up, timeout=LINK_UP_TIMEOUT, interval=0.05, what=f"{', '.join(ifnames)} to be UP")

    def _sysctls(self, host: Host, early: bool) -> None:
        """Write a host's sysctls: global ones before its links exist, per-interface ones after.

        ``net.ipv4.conf.default.*`` only affects interfaces created later, while
        ``net.ipv4.conf.eth0.*`` needs eth0 to exist, hence two passes.
        """
        ifnames = {ep.ifname for ep in self.topology.endpoints(host.name)}
        pairs: list[tuple[str, str]] = []
        if early:
            pairs.append(("net.ipv4.ip_forward", "1" if host.forwarding else "0"))
            if Path("/proc/sys/net/ipv6").is_dir():
                pairs.append(("net.ipv6.conf.all.forwarding", "1" if host.forwarding else "0"))
                # Duplicate address detection keeps link-local addresses
                # tentative for a second or two, and IPv6 forwarding fails
                # until it ends; every address in a lab is ours, so skip it.
                # A host's own sysctls come later and can turn it back on.
                pairs.append(("net.ipv6.conf.all.accept_dad", "0"))
                pairs.append(("net.ipv6.conf.default.accept_dad", "0"))
        for key, value in host.sysctls:
            parts = key.split(".")
            per_interface = len(parts) > 3 and parts[2] in ("conf", "neigh") and parts[3] in ifnames
            if per_interface != early:
                pairs.append((key, value))
        if not pairs:
            return
        self._step = f"hosts.{host.name}.sysctls ({', '.join(k for k, _ in pairs)})"
        argv = ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in pairs)]
        proc = self.run(host.name, argv, check=False)
        if proc.returncode == 0 and not proc.stderr.strip():
            return
        if any(k.startswith("net.netfilter.") for k, _ in pairs) and "cannot stat" in proc.stderr:
            # Conntrack registers its per-namespace sysctls only once it is
            # loaded; a modular kernel may not have it yet. Built in, this is a no-op.
            try:
                subprocess.run(["modprobe", "-q", "nf_conntrack"], capture_output=True, timeout=COMMAND_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                pass
            proc = self.run(host.name, argv, check=False)
            if proc.returncode == 0 and not proc.stderr.strip():
                return
        # procps sysctl exits 0 on some write errors (EINVAL), so stderr decides too.
        raise KernelError(f"lab {self.prefix} up: hosts.{host.name}.sysctls: {_first_line(proc.stderr)}")

    # -- using --------------------------------------------------------------

    def run(
        self,
        host: str,
        argv: Sequence[Any] | str,
        check: bool = True,
        timeout: float | None = COMMAND_TIMEOUT,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run a command in a host's namespace and wait for it.

        Output is captured as text unless ``stdout``/``stderr``/``text`` say
        otherwise. With ``check``, a non-zero exit raises LabCommandError
        carrying the exit code and output; a timeout always does.
        """
        cmd = _ip_netns_exec(self.ns(host), argv)
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        kw.setdefault("text", True)
        shown = shlex.join(cmd[4:])
        try:
            proc = subprocess.run(cmd, timeout=timeout, check=False, **kw)
        except subprocess.TimeoutExpired as err:
            raise LabCommandError(
                f"{host}: `{shown}` timed out after {timeout:g}s",
                cmd[4:],
                None,
                _text(err.stdout),
                _text(err.stderr),
            ) from None
        except FileNotFoundError:
            raise KernelError("lab: the iproute2 'ip' tool is missing (apt-get install iproute2)") from None
        if check and proc.returncode != 0:
            detail = _first_line(proc.stderr) or _first_line(proc.stdout)
            raise LabCommandError(
                f"{host}: `{shown}` exited {proc.returncode}" + (f": {detail}" if detail else ""),
                cmd[4:],
                proc.returncode,
                _text(proc.stdout),
                _text(proc.stderr),
            )
        return proc

    def popen(self, host: str, argv: Sequence[Any] | str, **kw: Any) -> subprocess.Popen:
        """Start a background process in a host's namespace; ``down()`` stops it.

        ``ip netns exec`` execs the command, so the Popen's pid is the
        command's own pid (unlike a backgrounded shell function).
        """
        proc = subprocess.Popen(_ip_netns_exec(self.ns(host), argv), **kw)
        self._procs.append(proc)
        return proc

    def ping(self, host: str, dst: Any, count: int = 3, wait: float = 1.0) -> bool:
        """True if ``dst`` answers an ICMP echo sent from ``host`` (up to ``count`` tries)."""
        argv = [sys.executable, "-c", _PING_SCRIPT, str(dst), str(count), str(wait)]
        return self.run(host, argv, check=False, timeout=count * wait + COMMAND_TIMEOUT).returncode == 0

    def iproute(self, host: str) -> IPRoute:
        """A pyroute2 IPRoute inside a host's namespace; close it (or use ``with``)."""
        return IPRoute(netns=self.ns(host), flags=0)

    def wait_listening(self, host: str, port: int, proto: str = "tcp", timeout: float = 5.0) -> None:
        """Poll until something in ``host`` listens on ``port`` (tcp or udp)."""
        if proto not in ("tcp", "udp"):
            raise UsageError(f"wait_listening: proto must be tcp or udp, not {proto!r}")
        argv = ["ss", "-Hln" + proto[0], "sport", "=", f":{port}"]
        wait_for(
            lambda: self.run(host, argv, check=False).stdout.strip(),
            timeout=timeout,
            interval=0.05,
            what=f"{proto}/{port} to listen in {host}",
        )

    def status(self) -> dict[str, Any]:
        """The topology's hosts and what the kernel holds for each of them."""
        hosts = {}
        for host in self.topology.host_names:
            name = self.ns(host)
            hosts[host] = {"namespace": name, **inspect_namespace(name)}
        return {
            "prefix": self.prefix,
            "topology": self.topology.name,
            "router": self.topology.router,
            "up": all(h["present"] for h in hosts.values()),
            "hosts": hosts,
        }

    # -- tearing down -------------------------------------------------------

    def down(self) -> list[str]:
        """Stop our background processes, remove every ``<prefix>-*`` namespace, then the state file.

        Idempotent; returns the namespaces it removed.
        """
        removed = self._teardown(lab_namespaces(self.prefix))
        lab_state.remove(self.prefix)
        return removed

    def _teardown(self, names: list[str]) -> list[str]:
        # Our background processes run inside the namespaces: remove_namespaces
        # signals them with the rest, after it has found every namespace (one of
        # them may remove another's name as it stops, as nfgate run does with its
        # gateway namespace, and what runs there must still be stopped).
        try:
            return remove_namespaces(names)
        finally:
            # Reap our children so none lingers as a zombie; cleanup() has
            # already killed anything that ignored TERM.
            for proc in self._procs:
                try:
                    proc.wait(timeout=KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    try:
                        proc.wait(timeout=KILL_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        pass  # stuck in the kernel (D state): nothing more we can do
            self._procs.clear()


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""
