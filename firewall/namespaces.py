"""Network namespaces and the veth links between them, on pyroute2.

The netlink steps that the lab (``firewall.lab.netns``) and the blind track
(``firewall.gwlink``) share, so that each has one implementation: a veth pair
made from one namespace with its peer placed in another, an endpoint's
addresses, a route, a sysctl inside a namespace, and the processes inside a
namespace found and stopped before it goes. Both describe what they build with
the topology data of ``firewall.lab.topology`` (``Endpoint``, ``Route``).

Why it is built this way:

- Netlink sockets are opened inside a namespace with ``IPRoute(netns=name)``
  (``netns=None``: the current one); the caller never changes namespace.
- ``/proc/sys/net`` shows the namespace of the thread that looks a key up, and
  ``setns`` moves only the calling thread. So a sysctl of another namespace is
  read or written by a short-lived thread that joins it and then ends: no
  thread of the caller ever leaves its namespace, even when a step fails half
  way. ``pyroute2.netns.pushns/popns`` would move the calling thread and back,
  and keep their stack in a module global that every thread shares; a child
  process would fork a possibly threaded caller for one file write.
- A process left inside a namespace keeps it, and its veths, alive after the
  name is gone, so the processes are found by their namespace (what
  ``ip netns pids`` does) and stopped first.
"""

from __future__ import annotations

import os
from ipaddress import ip_address
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from firewall.lab.topology import Endpoint, Route
from firewall.lab.wait import wait_for

T = TypeVar("T")

NETNS_DIR = Path(pr_netns.NETNS_RUN_DIR)


# -- namespaces ---------------------------------------------------------------


def netlink(netns: str | None) -> IPRoute:
    """A netlink socket inside a named namespace (None: the current one); close it.

    FileNotFoundError if the namespace does not exist: ``flags=0`` keeps
    pyroute2 from creating it. ``groups=0``: the caller makes requests and
    needs no multicast notifications queued up.
    """
    return IPRoute(netns=netns, flags=0, groups=0)


def _inodes(names: Iterable[str]) -> dict[tuple[int, int], str]:
    """Each named namespace's (device, inode), by which /proc tells who is inside."""
    inodes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except FileNotFoundError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    return inodes


def _pids(inodes: dict[tuple[int, int], str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {name: [] for name in inodes.values()}
    if not inodes:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            # Gone meanwhile, a zombie, or a kernel thread: none holds a namespace.
            continue
        name = inodes.get((st.st_dev, st.st_ino))
        if name is not None:
            found[name].append(int(entry.name))
    return found


def namespace_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes inside each named namespace (what ``ip netns pids`` reports)."""
    return _pids(_inodes(names))


def _signal(inodes: dict[tuple[int, int], str], sig: int) -> int:
    count = 0
    for pids in _pids(inodes).values():
        for pid in pids:
            try:
                os.kill(pid, sig)
                count += 1
            except ProcessLookupError:
                pass
    return count


def signal_inside(names: Sequence[str], sig: int) -> int:
    """Send ``sig`` to every process inside the named namespaces; return how many got it."""
    return _signal(_inodes(names), sig)


def stop_inside(names: Sequence[str], signals: Sequence[int], timeout: float) -> bool:
    """Stop what runs inside the namespaces: each signal in turn, until none is left.

    The namespaces are found by name once, at the start: a process inside
    may remove a name meanwhile (``nfgate run`` removes its gateway
    namespace as it stops), and what runs in that namespace must still get
    the next signal. Waits up to ``timeout`` after each signal. Returns False
    if a process is still there after the last one (stuck in the kernel, D
    state): its namespace then lives on until it dies, whatever happens to
    the name.
    """
    inodes = _inodes(names)
    for sig in signals:
        if not _signal(inodes, sig):
            return True
        try:
            wait_for(
                lambda: not any(_pids(inodes).values()),
                timeout=timeout,
                what=f"the processes in {', '.join(names)} to exit",
            )
            return True
        except TimeoutError:
            continue
    return not any(_pids(inodes).values())


def remove_namespace(name: str) -> bool:
    """Remove a namespace's name (its processes should be stopped first); False if absent."""
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def in_namespace(netns: str, job: Callable[[], T]) -> T:
    """Run ``job`` in a short-lived thread inside a named namespace; return or raise what it does."""

    def joined() -> T:
        pr_netns.setns(netns, flags=0)
        return job()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{netns}") as pool:
        return pool.submit(joined).result()


def sysctl(netns: str | None, key: str, value: str | None = None) -> str:
    """Read ``key`` (``net.ipv4.ip_forward``), or write ``value`` to it, in a namespace.

    ``netns`` None is the current namespace. Raises OSError as the kernel
    reports it (FileNotFoundError for a key this kernel or namespace lacks).
    """
    path = Path("/proc/sys", *key.split("."))

    def job() -> str:
        if value is None:
            return path.read_text().strip()
        path.write_text(value)
        return value

    return job() if netns is None else in_namespace(netns, job)


# -- links, addresses, routes -------------------------------------------------


def has_link(ipr: IPRoute, ifname: str) -> bool:
    return bool(ipr.link_lookup(ifname=ifname))


def delete_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete the link ``ifname``, whatever its kind (a veth takes its peer along); False if absent."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return False
    ipr.link("del", index=found[0])
    return True


def add_veth(ipr: IPRoute, ifname: str, peer_ifname: str, peer_netns: str, index: int | None = None) -> None:
    """A veth pair ``ifname`` here and ``peer_ifname`` in ``peer_netns``.

    The peer is placed in its namespace by the same request, so it never
    exists in the namespace of ``ipr`` (where it could collide with, or route,
    that namespace's traffic).
    """
    spec: dict[str, Any] = {"ifname": ifname, "kind": "veth", "peer": {"ifname": peer_ifname, "net_ns_fd": peer_netns}}
    if index is not None:
        spec["index"] = index
    ipr.link("add", **spec)


def set_up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def configure(ipr: IPRoute, endpoint: Endpoint) -> None:
    """Give an endpoint its addresses and bring it up."""
    index = ipr.link_lookup(ifname=endpoint.ifname)[0]
    for addr in endpoint.addresses:
        # IPv6 duplicate address detection would keep the address unusable
        # for a second or two; every address we set is ours.
        flags = IFA_F_NODAD if addr.version == 6 else 0
        ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen, flags=flags)
    ipr.link("set", index=index, state="up")


def local_addresses(netns: str | None = None) -> set[Any]:
    """Every address this namespace's interfaces hold, as ``ipaddress`` values."""
    with netlink(netns) as ipr:
        return {ip_address(a.get("address")) for a in ipr.addr("dump") if a.get("address")}


def add_bridge(ipr: IPRoute, name: str, ports: Sequence[str]) -> None:
    """A bridge joining ``ports``, up, that only switches: no STP, no forward delay
    (a port forwards at once) and no multicast snooping (VRRP's and conntrackd's
    multicast reach every port)."""
    ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
    index = ipr.link_lookup(ifname=name)[0]
    for port in ports:
        ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=index)
    ipr.link("set", index=index, state="up")


def add_route(ipr: IPRoute, route: Route) -> None:
    """Add a route of the main table (``route.host`` is the caller's business)."""
    spec: dict[str, Any] = {
        "family": AF_INET6 if route.to.version == 6 else AF_INET,
        "dst": str(route.to.network_address),
        "dst_len": route.to.prefixlen,
    }
    if route.via is not None:
        spec["gateway"] = str(route.via)
    if route.dev is not None:
        spec["oif"] = ipr.link_lookup(ifname=route.dev)[0]
    ipr.route("add", **spec)
