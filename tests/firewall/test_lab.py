"""The netns lab: real namespaces, veths and NAT, and `nfgate lab` on top of them.

Every lab is built by ``lab_factory`` (or, for the CLI, under a prefix that a
finalizer removes) with its own ``nfgt*`` prefix. Traffic only goes between
the lab's own namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest
from click.testing import CliRunner

from firewall import namespaces
from firewall.errors import KernelError, UsageError
from firewall.lab import netns
from firewall.lab import state as lab_state
from firewall.lab.cli import lab as lab_group
from firewall.lab.netns import Lab, LabCommandError, lab_namespaces
from firewall.lab.topology import REPO, Route, load_topology, parse_topology

RTMGRP_LINK = 1
RTM_NEWLINK = 16
IFLA_IFNAME = 3


def basic_doc() -> dict:
    return json.loads((REPO / "vagrant" / "topologies" / "basic.json").read_text())


class RootLinkWatch:
    """Records every RTM_NEWLINK the root namespace announces while it is open.

    A raw rtnetlink socket bound before the lab is built, so that an interface
    that appears in the root namespace even for a moment is seen.
    """

    def __init__(self) -> None:
        self.before = set(socket.if_nameindex())
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def announced(self) -> list[tuple[int, str]]:
        found = []
        for _ in range(10_000):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return found
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if kind == RTM_NEWLINK:
                    index = struct.unpack_from("=BxHiII", data, off + 16)[2]
                    name, attr = "", off + 32
                    while attr + 4 <= off + length:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if alen < 4:
                            break
                        if atype == IFLA_IFNAME:
                            name = data[attr + 4 : attr + alen].split(b"\0", 1)[0].decode()
                        attr += (alen + 3) & ~3
                    found.append((index, name))
                off += (length + 3) & ~3
        raise AssertionError("root link watch: more netlink messages than any lab makes")

    def new_interfaces_named(self, names: set[str]) -> list[tuple[int, str]]:
        """Interfaces with one of ``names`` that were not in the root namespace before."""
        seen = self.announced() + list(socket.if_nameindex())
        return sorted({(i, n) for i, n in seen if n in names and (i, n) not in self.before})


@pytest.fixture
def root_watch():
    watch = RootLinkWatch()
    yield watch
    watch.close()


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """One line from a child's stdout, or fail after ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args!r} within {timeout}s"
    return proc.stdout.readline().strip()


# Answers each UDP datagram and TCP connection with the peer's "address:port",
# so that a test sees the source address after NAT. Bounded in time and count.
ECHO_SERVER = r"""
import select, socket, sys, time
port = int(sys.argv[1])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(8)
print("ready", flush=True)
deadline = time.monotonic() + 30
for _ in range(16):
    left = deadline - time.monotonic()
    if left <= 0:
        break
    readable, _, _ = select.select([udp, tcp], [], [], left)
    if udp in readable:
        data, peer = udp.recvfrom(2048)
        udp.sendto(("%s:%d" % peer).encode(), peer)
    if tcp in readable:
        conn, peer = tcp.accept()
        conn.sendall(("%s:%d" % peer).encode())
        conn.close()
"""

ECHO_CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for _ in range(3):
        s.sendto(b"who am i", (host, port))
        try:
            print(s.recv(2048).decode())
            break
        except socket.timeout:
            continue
    else:
        sys.exit("no udp reply")
else:
    with socket.create_connection((host, port), timeout=3) as s:
        print(s.recv(2048).decode())
"""


# -- basic -------------------------------------------------------------------


@pytest.mark.netns
def test_basic_lab_is_built_as_described(lab_factory, root_watch):
    lab = lab_factory("basic")
    topo = lab.topology
    assert lab_namespaces(lab.prefix) == sorted(lab.namespaces)

    assert lab.ping("ext", "203.0.113.1")
    assert lab.ping("lan", "192.168.1.1")
    assert lab.ping("router", "192.168.1.10")

    status = lab.status()
    assert status["up"] and status["router"] == "router"
    for host in topo.host_names:
        ifaces = {i["ifname"]: i for i in status["hosts"][host]["interfaces"]}
        for ep in topo.endpoints(host):
            assert ifaces[ep.ifname]["state"] == "UP"
            assert [str(a) for a in ep.addresses] == ifaces[ep.ifname]["addresses"]
    assert {"to": "default", "via": "192.168.1.1", "dev": "eth0"} in status["hosts"]["lan"]["routes"]
    # ext must know nothing of the LAN: only NAT can get it there.
    ext_routes = status["hosts"]["ext"]["routes"]
    assert not any(r["to"] == "default" or ip_address("192.168.1.10") in ip_network(r["to"]) for r in ext_routes)
    unreachable = lab.run("ext", ["ip", "route", "get", "192.168.1.10"], check=False)
    assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr

    assert lab.run("router", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert lab.run("ext", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"

    ours = {ep.ifname for link in topo.links for ep in link.endpoints}
    assert root_watch.new_interfaces_named(ours) == []


@pytest.mark.netns
def test_a_namespace_whose_name_goes_during_down_still_has_its_processes_killed(lab_factory, monkeypatch):
    """As `nfgate run` does on SIGTERM: a process in one of the lab's namespaces removes
    another lab namespace's name (its gateway namespace) and exits. What runs in that
    namespace, deaf to SIGTERM, must still get the SIGKILL: it is found by the namespace
    itself, not by the name, which is gone by then."""
    monkeypatch.setattr(netns, "KILL_TIMEOUT", 0.5)
    lab = lab_factory("basic")
    gw = f"{lab.prefix}-gw"
    subprocess.run(["ip", "netns", "add", gw], check=True)
    remover = lab.popen("router", [sys.executable, "-c",
                                   "import signal, subprocess, sys, time\n"
                                   "def bye(*_):\n"
                                   f"    subprocess.run(['ip', 'netns', 'delete', '{gw}'])\n"
                                   "    sys.exit(0)\n"
                                   "signal.signal(signal.SIGTERM, bye)\n"
                                   "print('ready', flush=True)\n"
                                   "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    stubborn = subprocess.Popen(
        ["ip", "netns", "exec", gw, sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(remover) == "ready" and read_line(stubborn) == "ready"
        assert gw in lab_namespaces(lab.prefix)
        lab.down()
        assert remover.wait(timeout=5) == 0  # it removed the name itself, on SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert lab_namespaces(lab.prefix) == []
    finally:
        for proc in (remover, stubborn):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        namespaces.remove_namespace(gw)


@pytest.mark.netns
def test_down_kills_what_runs_inside_and_removes_everything(lab_factory, root_watch, monkeypatch):
    monkeypatch.setattr(netns, "KILL_TIMEOUT", 0.5)
    lab = lab_factory("basic")
    tracked = lab.popen("lan", ["sleep", "60"])
    # Started behind the Lab's back and deaf to SIGTERM: cleanup must find it
    # by its namespace and escalate to SIGKILL.
    stubborn = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("ext"), sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(stubborn) == "ready"
        assert namespaces.namespace_pids([lab.ns("ext")])[lab.ns("ext")] == [stubborn.pid]

        assert lab.down() == sorted(lab.namespaces)
        assert lab_namespaces(lab.prefix) == []
        assert tracked.poll() == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert lab.down() == []  # idempotent
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()
    ours = {ep.ifname for link in lab.topology.links for ep in link.endpoints}
    assert root_watch.new_interfaces_named(ours) == []


@pytest.mark.netns
def test_cleanup_removes_a_lab_left_behind(lab_factory):
    lab = lab_factory("basic")
    assert sorted(netns.status(lab.prefix)[lab.prefix]["hosts"]) == ["ext", "lan", "router"]
    assert lab_state.read(lab.prefix) is not None
    assert netns.cleanup(lab.prefix) == sorted(lab.namespaces)
    assert netns.status(lab.prefix) == {}
    assert lab_state.read(lab.prefix) is None
    assert netns.cleanup(lab.prefix) == []


@pytest.fixture(scope="module")
def shared_basic(module_lab_factory):
    """One basic lab for the read-only tests of this module."""
    return module_lab_factory("basic")


@pytest.mark.netns
def test_up_refuses_a_prefix_that_is_taken(shared_basic):
    lab = shared_basic
    with pytest.raises(UsageError, match=f"lab {lab.prefix} is already up"):
        Lab(lab.topology, lab.prefix).up()
    assert lab.ping("ext", "203.0.113.1")  # the first lab is untouched


# -- nat-tunnel --------------------------------------------------------------


@pytest.mark.netns
def test_nat_tunnel_priv_reaches_pub_as_the_nat(lab_factory):
    lab = lab_factory("nat-tunnel")
    topo = lab.topology
    nat_wan = topo.address("nat", "wan0").ip
    pub = topo.address("pub").ip
    # pub has no way back to the private network except the NAT's mapping.
    assert lab.run("pub", ["ip", "route", "get", str(topo.address("priv").ip)], check=False).returncode != 0

    server = lab.popen("pub", [sys.executable, "-c", ECHO_SERVER, "7007"], stdout=subprocess.PIPE, text=True)
    assert read_line(server) == "ready"
    for proto in ("udp", "tcp"):
        seen = lab.run("priv", [sys.executable, "-c", ECHO_CLIENT, proto, str(pub), "7007"]).stdout.strip()
        host, _, port = seen.rpartition(":")
        assert ip_address(host) == nat_wan, f"{proto}: pub saw {seen}"
        assert 0 < int(port) < 65536


@pytest.mark.netns
def test_nat_tunnel_conntrack_timeouts_are_short(lab_factory):
    lab = lab_factory("nat-tunnel")
    for key, want in lab.topology.host("nat").sysctls:
        path = "/proc/sys/" + key.replace(".", "/")
        assert lab.run("nat", ["cat", path]).stdout.strip() == want, key
    # Only the nat namespace changed: pub keeps the kernel's default.
    assert lab.run("pub", ["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"]).stdout.strip() != "5"

    if shutil.which("conntrack") is None:
        pytest.skip("conntrack tool missing: cannot look at the live entry")
    server = lab.popen("pub", [sys.executable, "-c", ECHO_SERVER, "7008"], stdout=subprocess.PIPE, text=True)
    assert read_line(server) == "ready"
    lab.run("priv", [sys.executable, "-c", ECHO_CLIENT, "udp", str(lab.topology.address("pub").ip), "7008"])
    entries = lab.run("nat", ["conntrack", "-L", "-p", "udp"]).stdout.splitlines()
    (entry,) = [e for e in entries if "dport=7008" in e]
    # "udp 17 <seconds left> src=..."; a default kernel would show 30 here.
    assert int(entry.split()[2]) <= 5, entry


# -- more than the shipped topologies ----------------------------------------


@pytest.mark.netns
def test_ipv6_and_per_interface_sysctls(lab_factory):
    doc = basic_doc()
    doc["links"][1]["a"]["addresses"].append("fd00:1::1/64")
    doc["links"][1]["b"]["addresses"].append("fd00:1::10/64")
    doc["links"][0]["a"]["addresses"].append("fd00:2::10/64")
    doc["links"][0]["b"]["addresses"].append("fd00:2::1/64")
    doc["routes"].append({"host": "lan", "to": "default", "via": "fd00:1::1"})
    doc["routes"].append({"host": "ext", "to": "fd00:1::/64", "via": "fd00:2::1"})
    doc["hosts"]["lan"]["sysctls"] = {"net.ipv4.conf.eth0.rp_filter": 2, "net.ipv4.conf.default.rp_filter": 0}
    lab = lab_factory(parse_topology(doc, default_name="basic6"))

    # Forwarded both ways over IPv6, with no wait for duplicate address detection.
    assert lab.ping("lan", "fd00:2::10")
    assert lab.run("lan", ["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]).stdout.strip() == "2"
    assert lab.run("lan", ["cat", "/proc/sys/net/ipv4/conf/default/rp_filter"]).stdout.strip() == "0"
    assert lab.run("router", ["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).stdout.strip() == "1"


def _with_addresses(topo, link: int, side: str, addresses):
    links = list(topo.links)
    end = dataclasses.replace(getattr(links[link], side), addresses=tuple(ip_interface(a) for a in addresses))
    links[link] = dataclasses.replace(links[link], **{side: end})
    return dataclasses.replace(topo, links=tuple(links))


def _broken(kind: str):
    topo = load_topology("basic")
    if kind == "failing command":
        return parse_topology({**basic_doc(), "commands": {"router": ["true", ["false"]]}}), "commands.router[1]"
    if kind == "missing program":
        return parse_topology({**basic_doc(), "commands": {"lan": [["nfgate-no-such-program"]]}}), "commands.lan[0]"
    if kind == "unknown sysctl":
        doc = basic_doc()
        doc["hosts"]["router"]["sysctls"] = {"net.ipv4.no_such_knob": 1}
        return parse_topology(doc), "hosts.router.sysctls"
    if kind == "duplicate address":
        # The loader rejects this; a Topology built by hand reaches the kernel.
        return _with_addresses(topo, 1, "b", ["192.168.1.10/24", "192.168.1.10/24"]), "links[1].b: addresses"
    if kind == "unreachable gateway":
        route = Route(host="ext", to=ip_network("10.0.0.0/8"), via=ip_address("10.99.0.1"))
        return dataclasses.replace(topo, routes=topo.routes + (route,)), "routes[1]"
    raise AssertionError(kind)


@pytest.mark.netns
@pytest.mark.parametrize(
    "kind", ["failing command", "missing program", "unknown sysctl", "duplicate address", "unreachable gateway"]
)
def test_a_failed_up_leaves_nothing_behind(lab_factory, lab_prefix, root_watch, kind):
    topo, where = _broken(kind)
    prefix = lab_prefix
    with pytest.raises(KernelError) as info:
        lab_factory(topo, prefix=prefix)
    message = str(info.value)
    assert "\n" not in message and where in message and prefix in message, message
    assert lab_namespaces(prefix) == []
    assert lab_state.read(prefix) is None
    ours = {ep.ifname for link in topo.links for ep in link.endpoints}
    assert root_watch.new_interfaces_named(ours) == []


@pytest.mark.netns
def test_run_popen_and_wait_listening(lab_factory):
    lab = lab_factory("basic")
    with pytest.raises(LabCommandError) as info:
        lab.run("ext", ["sh", "-c", "echo out; echo oops >&2; exit 3"])
    err = info.value
    assert (err.returncode, err.stdout, err.stderr) == (3, "out\n", "oops\n")
    assert "exited 3: oops" in str(err)
    assert lab.run("ext", "sh -c 'exit 4'", check=False).returncode == 4
    with pytest.raises(LabCommandError, match="timed out after 0.2s"):
        lab.run("ext", ["sleep", "5"], timeout=0.2)
    with pytest.raises(UsageError, match="no host 'nope'"):
        lab.run("nope", ["true"])

    server = lab.popen("lan", [sys.executable, "-m", "http.server", "-b", "192.168.1.10", "8080"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_listening("lan", 8080, timeout=10)
    got = lab.run("router", [sys.executable, "-c",
                             "import urllib.request; print(urllib.request.urlopen('http://192.168.1.10:8080/', timeout=5).status)"])
    assert got.stdout.strip() == "200"
    assert server.poll() is None
    with pytest.raises(TimeoutError, match="udp/9 to listen in lan"):
        lab.wait_listening("lan", 9, proto="udp", timeout=0.2)
    with lab.iproute("lan") as ipr:
        assert ipr.link_lookup(ifname="eth0")


# -- the CLI -----------------------------------------------------------------


@pytest.mark.netns
def test_cli_builds_the_dual_lab(lab_prefix):
    """`nfgate lab up dual`: basic with IPv6 beside IPv4 on every link, usable at once (no DAD wait)."""
    p = lab_prefix
    up = nfgate("lab", "up", "dual", "--prefix", p)
    assert up.returncode == 0, up.stderr
    labs = json.loads(nfgate("lab", "status", "--json", "--prefix", p).stdout)["labs"]
    hosts = labs[p]["hosts"]
    ifaces = {(h, i["ifname"]): i["addresses"] for h, host in hosts.items() for i in host["interfaces"]}
    assert ifaces[("router", "wan0")] == ["203.0.113.1/24", "2001:db8:2::1/64"]
    assert ifaces[("lan", "eth0")] == ["192.168.1.10/24", "fd00:1::10/64"]
    assert {"to": "default", "via": "fd00:1::1", "dev": "eth0"} in hosts["lan"]["routes"]
    lab = Lab(load_topology("dual"), p)
    for host in ("ext", "router", "lan"):
        assert lab.run(host, ["ip", "-6", "addr", "show", "tentative"]).stdout.strip() == "", host
    assert lab.ping("lan", "fd00:1::1", count=1) and lab.ping("ext", "2001:db8:2::1", count=1)
    assert lab.ping("router", "2001:db8:2::10", count=1) and lab.ping("router", "fd00:1::10", count=1)
    # As with IPv4, ext has no route to the LAN's (ULA) prefix: only NAT66 gets there.
    unreachable = lab.run("ext", ["ip", "-6", "route", "get", "fd00:1::10"], check=False)
    assert unreachable.returncode != 0, unreachable.stdout
    assert nfgate("lab", "down", "--prefix", p).returncode == 0


def _nfgate() -> list[str]:
    script = Path(sys.executable).with_name("nfgate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from firewall.cli import main; sys.exit(main())"]


def nfgate(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*_nfgate(), *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.netns
def test_cli_up_status_exec_down(lab_prefix):
    p = lab_prefix
    up = nfgate("lab", "up", "basic", "--prefix", p)
    assert up.returncode == 0, up.stderr
    assert f"lab {p} up: ext ({p}-ext), router ({p}-router), lan ({p}-lan)" in up.stdout

    again = nfgate("lab", "up", "basic", "--prefix", p)
    assert again.returncode == 2 and again.stderr.startswith(f"nfgate: lab {p} is already up")

    status = nfgate("lab", "status", "--json", "--prefix", p)
    assert status.returncode == 0, status.stderr
    labs = json.loads(status.stdout)["labs"]
    assert list(labs) == [p] and sorted(labs[p]["hosts"]) == ["ext", "lan", "router"]
    assert labs[p]["topology"] == "basic" and labs[p]["owner"]["pid"] == os.getpid() and labs[p]["owner_alive"]
    wan0 = next(i for i in labs[p]["hosts"]["router"]["interfaces"] if i["ifname"] == "wan0")
    assert wan0["addresses"] == ["203.0.113.1/24"] and wan0["state"] == "UP"
    human = nfgate("lab", "status", "--prefix", p)
    assert "route default via 192.168.1.1 dev eth0" in human.stdout

    assert nfgate("lab", "exec", "--prefix", p, "ext", "--", "sh", "-c", "exit 7").returncode == 7
    fwd = nfgate("lab", "exec", "--prefix", p, "router", "--", "cat", "/proc/sys/net/ipv4/ip_forward")
    assert (fwd.returncode, fwd.stdout.strip()) == (0, "1")
    addr = nfgate("lab", "exec", "-p", p, "ext", "ip", "-o", "-4", "address", "show", "dev", "eth0")
    assert "203.0.113.10/24" in addr.stdout

    for bad in (["lab", "exec", "-p", p, "nope", "--", "true"], ["lab", "up", "nope", "--prefix", p]):
        res = nfgate(*bad)
        assert res.returncode == 2, res
        assert res.stderr.startswith("nfgate: ") and len(res.stderr.splitlines()) == 1, res.stderr

    down = nfgate("lab", "down", "--prefix", p)
    assert down.returncode == 0 and f"lab {p} down: removed {p}-ext, {p}-lan, {p}-router" in down.stdout
    assert lab_namespaces(p) == []
    assert json.loads(nfgate("lab", "status", "--json", "--prefix", p).stdout) == {"schema_version": 1, "labs": {}}
    assert "nothing to remove" in nfgate("lab", "down", "--prefix", p).stdout


@pytest.fixture
def any_prefix(request):
    """A prefix that does not look like nfgate's (``t`` + hex, as the README's ``t1``), removed at teardown."""
    prefix = f"t{secrets.token_hex(3)}"
    request.addfinalizer(lambda: netns.cleanup(prefix))
    return prefix


@pytest.mark.netns
def test_a_lab_is_found_by_its_state_file_whatever_its_prefix(any_prefix, tmp_path):
    p = any_prefix
    # The README's own example, word for word but the prefix.
    res = subprocess.run(f"{' '.join(_nfgate())} lab up basic --prefix {p} && "
                         f"{' '.join(_nfgate())} lab exec --prefix {p} ext -- ping -c1 203.0.113.1",
                         shell=True, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 received" in res.stdout
    state = json.loads((lab_state.state_dir() / f"{p}.json").read_text())
    assert (state["prefix"], state["topology"], state["hosts"]) == (p, "basic", ["ext", "router", "lan"])
    assert state["owner"]["pid"] == os.getpid()  # this session's, through $NFGATE_LAB_OWNER_PID

    listed = json.loads(nfgate("lab", "status", "--json").stdout)["labs"]
    assert listed[p]["topology"] == "basic" and sorted(listed[p]["hosts"]) == ["ext", "lan", "router"]
    assert f"lab {p} (topology basic, owner " in nfgate("lab", "status").stdout

    # A topology whose host no other lab has: exec finds it without --prefix, down without --prefix.
    host = f"solo{secrets.token_hex(2)}"
    doc = {"name": host, "router": host, "hosts": {host: {}, "peer": {}},
           "links": [{"a": {"host": host, "ifname": "eth0", "addresses": ["10.99.0.1/24"]},
                      "b": {"host": "peer", "ifname": "eth0", "addresses": ["10.99.0.2/24"]}}]}
    path = tmp_path / f"{host}.json"
    path.write_text(json.dumps(doc))
    solo = f"{p}x"
    try:
        assert nfgate("lab", "up", str(path), "--prefix", solo).returncode == 0
        got = nfgate("lab", "exec", host, "--", "ip", "-o", "-4", "address", "show", "dev", "eth0")
        assert got.returncode == 0 and "10.99.0.1/24" in got.stdout, got.stderr
        down = nfgate("lab", "down", str(path))
        assert down.returncode == 0 and f"lab {solo} down: removed {', '.join(sorted([f'{solo}-{host}', f'{solo}-peer']))}" in down.stdout, down
        assert lab_state.read(solo) is None
    finally:
        netns.cleanup(solo)

    down = nfgate("lab", "down", "--prefix", p)
    assert down.returncode == 0 and lab_state.read(p) is None and lab_namespaces(p) == []


@pytest.mark.netns
def test_down_without_prefix_refuses_to_guess_between_two_labs(lab_prefix, any_prefix):
    for p in (lab_prefix, any_prefix):
        assert nfgate("lab", "up", "nat-tunnel", "--prefix", p).returncode == 0
    res = nfgate("lab", "down", "nat-tunnel")
    assert res.returncode == 2 and "several nat-tunnel labs are up" in res.stderr and "pick one with --prefix" in res.stderr
    assert lab_namespaces(lab_prefix) and lab_namespaces(any_prefix)


@pytest.mark.netns
def test_cli_refuses_without_root(lab_prefix):
    res = nfgate("lab", "up", "basic", "--prefix", lab_prefix, user=65534, group=65534, cwd="/")
    if "Permission denied" in res.stderr and "nfgate:" not in res.stderr:
        pytest.skip("the venv is not readable by nobody here")
    assert res.returncode == 1
    assert res.stderr.startswith("nfgate: ") and "lab up: needs root" in res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert lab_namespaces(lab_prefix) == []


def test_cli_list_and_help_need_no_lab():
    runner = CliRunner()
    listed = runner.invoke(lab_group, ["list"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()][:3] == ["basic", "dual", "ha"]
    for command in ("up", "down", "status", "exec", "list"):
        helped = runner.invoke(lab_group, [command, "--help"])
        assert helped.exit_code == 0 and "Example:" in helped.output, command


@pytest.mark.netns
def test_netns_tests_are_skipped_with_a_reason_when_not_root():
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{Path(__file__)}::test_basic_lab_is_built_as_described"],
        capture_output=True, text=True, timeout=120, user=65534, group=65534, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if "Permission denied" in res.stderr:
        pytest.skip("the venv or the tree is not readable by nobody here")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout
    assert "netns test: needs root to build network namespaces" in res.stdout


def test_a_lab_built_through_sudo_belongs_to_the_shell_that_ran_sudo(tmp_path):
    """`sudo nfgate lab up`: nfgate's parent is sudo, which exits at once; the owner is sudo's parent."""
    fake_sudo = tmp_path / "sudo"
    shutil.copy("/bin/sleep", fake_sudo)  # a process whose name is sudo, child of this one
    proc = subprocess.Popen([str(fake_sudo), "30"])
    try:
        assert lab_state.invoking_shell(proc.pid) == os.getpid()
        assert lab_state.invoking_shell(os.getpid()) == os.getpid()  # not an elevator: itself
        assert lab_state.invoking_shell(2 ** 22 + 1) == 2 ** 22 + 1  # no such process: as given
    finally:
        proc.kill()
        proc.wait()
