"""The Vagrant lab (vagrant/Vagrantfile, firewall/lab/vagrant.py) against the netns lab, from the same JSON.

No VM boots here (no usable KVM), so what can be proved is proved:

- the plan's VMs, NICs, addresses and links equal the topology's, as the
  netns lab builds it;
- ``vagrant validate`` accepts the Vagrantfile for every topology, and what it
  declared to Vagrant (dumped by the Vagrantfile itself) is the plan;
- each host's provisioning script, run for real in a bare netns host that
  looks like a fresh VM (a management NIC ``eth0`` of its own, the lab's NICs
  as ``eth1``... with the plan's MACs and no address), makes the same host
  the netns lab makes, and the router passes and drops traffic as the netns
  lab's router does under the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firewall.lab.netns import Lab, inspect_namespace
from firewall.lab.topology import BRIDGE, REPO, list_topologies, load_topology, parse_topology
from firewall.lab.vagrant import UDP_TUNNEL_BASE, main, plan
from tests.firewall.run_harness import Server, probe

TOPOLOGIES = list_topologies()
VAGRANTFILE_DIR = REPO / "vagrant"


def links_of(p: dict[str, Any]) -> dict[int, set[tuple[str, str, str]]]:
    """Link index -> the two (host, ifname, addresses) it joins, as the plan's networks pair them."""
    by_net: dict[str, list[tuple[str, dict]]] = {}
    for host in p["hosts"]:
        for nic in host["nics"]:
            by_net.setdefault(nic["vagrant"]["virtualbox__intnet"], []).append((host["name"], nic))
    out = {}
    for net, ends in by_net.items():
        assert len(ends) == 2, (net, ends)
        (ha, a), (hb, b) = ends
        # libvirt's UDP tunnel: each end sends to the port the other listens on.
        assert a["vagrant"]["libvirt__tunnel_port"] == b["vagrant"]["libvirt__tunnel_local_port"]
        assert b["vagrant"]["libvirt__tunnel_port"] == a["vagrant"]["libvirt__tunnel_local_port"]
        assert a["link"] == b["link"]
        out[a["link"]] = {(h, n["ifname"], " ".join(n["addresses"])) for h, n in ends}
    return out


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_the_plan_has_the_topologys_hosts_links_and_addresses(name: str) -> None:
    topo = load_topology(name)
    p = plan(topo)
    assert [h["name"] for h in p["hosts"]] == list(topo.host_names)
    assert [h["name"] for h in p["hosts"] if h["router"]] == [topo.router]
    want = {i: {(ep.host, ep.ifname, " ".join(str(a) for a in ep.addresses)) for ep in link.endpoints}
            for i, link in enumerate(topo.links)}
    assert links_of(p) == want
    macs = [nic["mac"] for h in p["hosts"] for nic in h["nics"]]
    assert len(set(macs)) == len(macs)
    ports = [nic["vagrant"]["libvirt__tunnel_local_port"] for h in p["hosts"] for nic in h["nics"]]
    assert len(set(ports)) == len(ports) and min(ports) == UDP_TUNNEL_BASE
    for host in p["hosts"]:
        for nic in host["nics"]:
            v = nic["vagrant"]
            assert v["auto_config"] is False  # the script configures the NIC, as it does in the netns test
            if topo.host(host["name"]).bridge:
                assert "ip" not in v and not nic["addresses"]  # a switch's port is unnumbered
            else:
                assert f"{v['ip']}/" in nic["addresses"][0]
            assert v["mac"] == nic["mac"].replace(":", "").upper()
        assert host["setup"] == (host["router"] and topo.config is not None)


def test_a_nic_without_an_address_is_refused_for_vagrant(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = json.loads((REPO / "vagrant" / "topologies" / "basic.json").read_text())
    doc["links"][0]["a"]["addresses"] = []
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(doc))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "links[0].a (ext:eth0) has no address, and a Vagrant private network needs one" in err
    assert main(["plan"]) == 2


# -- vagrant validate ---------------------------------------------------------------------------

def _no_vagrant() -> str | None:
    if shutil.which("vagrant") is None:
        return "vagrant is not installed (scripts/setup --test installs Debian's vagrant and vagrant-libvirt)"
    return None


@pytest.fixture(scope="module")
def vagrant_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vagrant-home")


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
@pytest.mark.parametrize("name", TOPOLOGIES)
def test_vagrant_validate_declares_the_plan(name: str, provider: str, vagrant_home: Path, tmp_path: Path) -> None:
    reason = _no_vagrant()
    if reason:
        pytest.skip(reason)
    argv = ["vagrant", "validate"]
    if provider == "virtualbox" and shutil.which("VBoxManage") is None:
        # Vagrant refuses to validate a provider that is not installed; the
        # provider-free part (networks, provisioners, synced folders) is still checked.
        argv.append("--ignore-provider")
    dump = tmp_path / "declared.json"
    env = {
        **os.environ, "VAGRANT_CWD": str(VAGRANTFILE_DIR), "VAGRANT_HOME": str(vagrant_home),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_DEFAULT_PROVIDER": provider,
        "NFGATE_TOPOLOGY": name, "NFGATE_VAGRANT_DUMP": str(dump), "NFGATE_PYTHON": sys.executable,
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Vagrantfile validated successfully." in res.stdout
    assert not (VAGRANTFILE_DIR / ".vagrant").exists()

    p = plan(load_topology(name))
    declared = json.loads(dump.read_text())
    assert declared["topology"] == name and declared["boxes"] == p["boxes"]
    assert list(declared["hosts"]) == [h["name"] for h in p["hosts"]]
    for host in p["hosts"]:
        seen = declared["hosts"][host["name"]]
        assert seen["networks"] == [{"type": "private_network", **nic["vagrant"]} for nic in host["nics"]]
        want = ([{"name": "setup", "inline": "/vagrant/scripts/setup"}] if host["setup"] else [])
        assert seen["provisioners"] == want + [{"name": "lab", "inline": host["script"]}]
        assert (seen["synced"] is not None) == host["setup"]


def test_a_broken_topology_stops_the_vagrantfile_with_its_reason(tmp_path: Path) -> None:
    reason = _no_vagrant()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "VAGRANT_CWD": str(VAGRANTFILE_DIR), "VAGRANT_HOME": str(tmp_path / "home"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "NFGATE_TOPOLOGY": "no-such-topology",
           "NFGATE_PYTHON": sys.executable, "VAGRANT_CHECKPOINT_DISABLE": "1"}
    res = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert "the plan of topology no-such-topology failed: nfgate: unknown topology 'no-such-topology'" in res.stderr


# -- the provisioning scripts, for real, in netns hosts that look like fresh VMs ----------------

VMHOST = "vmhost"


def bare_topology(p: dict[str, Any]) -> Any:
    """A topology that is what Vagrant hands the scripts: VMs with a management NIC
    ``eth0`` (to ``vmhost``, as libvirt's management network) and a default route
    by it, and the lab's NICs as ``eth1``... in plan order, joined as the plan's
    networks say, with no address."""
    hosts = {h["name"]: {} for h in p["hosts"]}
    hosts[VMHOST] = {}
    links = []
    kernel_name: dict[tuple[str, int], str] = {}
    for k, host in enumerate(p["hosts"]):
        links.append({"a": {"host": VMHOST, "ifname": f"vnet{k}", "addresses": [f"192.168.121.{4 * k + 1}/30"]},
                      "b": {"host": host["name"], "ifname": "eth0", "addresses": [f"192.168.121.{4 * k + 2}/30"]}})
        for n, nic in enumerate(host["nics"], start=1):
            kernel_name[(host["name"], nic["link"])] = f"eth{n}"
    ends: dict[int, list[str]] = {}
    for host in p["hosts"]:
        for nic in host["nics"]:
            ends.setdefault(nic["link"], []).append(host["name"])
    for link, (a, b) in sorted(ends.items()):
        links.append({"a": {"host": a, "ifname": kernel_name[(a, link)]},
                      "b": {"host": b, "ifname": kernel_name[(b, link)]}})
    # Each VM's default route leaves by its management NIC, as DHCP sets it.
    routes = [{"host": h["name"], "to": "default", "via": f"192.168.121.{4 * k + 1}"} for k, h in enumerate(p["hosts"])]
    return parse_topology({"name": f"{p['topology']}-vm", "router": p["router"], "hosts": hosts, "links": links,
                           "routes": routes})


def by_mac(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # A switch's bridge takes its first port's MAC: the port is the lab's NIC.
    return {i["mac"]: i for i in info["interfaces"] if i["ifname"] != BRIDGE}


def basic_traffic(lab: Lab) -> dict[str, Any]:
    """What the demo's config does in the basic lab: a port forward that keeps the client,
    masquerade out, and the router's SSH port closed to wan."""
    lan = Server(lab, "lan", 80)
    ext = Server(lab, "ext", 9000)
    ssh = Server(lab, "router", 22)
    got = {
        "forward": probe(lab, "ext", "203.0.113.1", 8080) and lan.next_peer(),
        "masquerade": probe(lab, "lan", "203.0.113.10", 9000) and ext.next_peer(),
        "ssh from wan": probe(lab, "ext", "203.0.113.1", 22, timeout=1.0),
        "ssh from lan": probe(lab, "lan", "192.168.1.1", 22),
    }
    for server in (lan, ext, ssh):
        server.proc.kill()
        server.proc.wait()
    return got


def nat_tunnel_traffic(lab: Lab) -> dict[str, Any]:
    """The nat-tunnel lab's NAT: priv reaches pub as the NAT's address; pub has no way in."""
    pub = Server(lab, "pub", 7007)
    got = {
        "masquerade": probe(lab, "priv", "198.51.100.10", 7007) and pub.next_peer(),
        "pub to priv": lab.ping("pub", "10.77.0.10", count=1, wait=0.5),
        "priv to pub, IPv6": lab.ping("priv", "2001:db8:51::10", count=2, wait=1.0),
        "pub to priv, IPv6": lab.ping("pub", "fd77::10", count=1, wait=0.5),
    }
    pub.proc.kill()
    pub.proc.wait()
    return got


def dual_traffic(lab: Lab) -> dict[str, Any]:
    """The dual lab, no config: the router forwards both families; ext has no route to the LAN's prefixes."""
    return {
        "lan to the router's far side, IPv4": lab.ping("lan", "203.0.113.1", count=2, wait=1.0),
        "lan to the router's far side, IPv6": lab.ping("lan", "2001:db8:2::1", count=2, wait=1.0),
        "ext to the router, IPv6": lab.ping("ext", "2001:db8:2::1", count=2, wait=1.0),
        "ext to lan's ULA": lab.ping("ext", "fd00:1::10", count=1, wait=0.5),
    }


def ha_traffic(lab: Lab) -> dict[str, Any]:
    """The ha lab's switches: each segment's host reaches both routers through its bridge,
    and the sync link joins the routers (no router holds a virtual address yet)."""
    return {
        "client-r1": lab.ping("client", "192.168.1.2"), "client-r2": lab.ping("client", "192.168.1.3"),
        "server-r2": lab.ping("server", "203.0.113.3"), "ag-r1": lab.ping("ag", "172.31.253.2"),
        "sync": lab.ping("r1", "172.31.252.2"), "client-vip": lab.ping("client", "192.168.1.1", count=1),
    }


TRAFFIC = {
    "ha": (ha_traffic, {"client-r1": True, "client-r2": True, "server-r2": True, "ag-r1": True, "sync": True,
                        "client-vip": False}),
    "basic": (basic_traffic, {"forward": "203.0.113.10", "masquerade": "203.0.113.1",
                              "ssh from wan": False, "ssh from lan": True}),
    "nat-tunnel": (nat_tunnel_traffic, {"masquerade": "198.51.100.1", "pub to priv": False,
                                        "priv to pub, IPv6": True, "pub to priv, IPv6": False}),
    "dual": (dual_traffic, {"lan to the router's far side, IPv4": True, "lan to the router's far side, IPv6": True,
                            "ext to the router, IPv6": True, "ext to lan's ULA": False}),
}


def nfgate_cmd() -> str:
    return f"{sys.executable} -m firewall.cli"


@pytest.mark.netns
@pytest.mark.parametrize("name", TOPOLOGIES)
def test_each_hosts_script_makes_the_netns_labs_host_and_the_router_passes_the_same_traffic(
    name: str, lab_factory: Any, tmp_path: Path,
) -> None:
    topo = load_topology(name)
    p = plan(topo)
    netns_lab = lab_factory(topo)
    if topo.config:
        # The netns lab's router under the same config, as scripts/demo applies it.
        netns_lab.run(topo.router, [*nfgate_cmd().split(), "apply", "-c", str(REPO / topo.config)])

    vm = lab_factory(bare_topology(p))
    for host in p["hosts"]:
        for n, nic in enumerate(host["nics"], start=1):
            vm.run(host["name"], ["ip", "link", "set", "dev", f"eth{n}", "address", nic["mac"]])
    env = {**os.environ, "NFGATE": nfgate_cmd(), "NFGATE_REPO": str(REPO), "NFGATE_ETC": str(tmp_path / "etc"),
           "PYTHONPATH": str(REPO)}
    logs = {}
    for host in p["hosts"]:
        res = vm.run(host["name"], ["bash", "-c", host["script"]], env=env, check=False, timeout=60)
        assert res.returncode == 0, f"{host['name']}: {res.stdout}{res.stderr}"
        logs[host["name"]] = res.stdout + res.stderr
        assert f"nfgate lab: {host['name']} of {name} is provisioned" in res.stdout

    for host in p["hosts"]:
        want = inspect_namespace(netns_lab.ns(host["name"]))
        got = inspect_namespace(vm.ns(host["name"]))
        want_if = {i["ifname"]: i for i in want["interfaces"]}
        got_mac = by_mac(got)
        renamed = {}
        for nic in host["nics"]:
            iface = got_mac[nic["mac"]]
            if nic["ifname"] == "eth0":
                # The VM's management NIC holds that name: the lab's NIC keeps its kernel name, and says so.
                assert iface["ifname"] != "eth0"
                assert f"nfgate lab: eth0 is this machine's own NIC; the lab's eth0 stays {iface['ifname']}" in logs[host["name"]]
            else:
                assert iface["ifname"] == nic["ifname"]
            renamed[iface["ifname"]] = nic["ifname"]
            assert iface["addresses"] == want_if[nic["ifname"]]["addresses"] == nic["addresses"]
            assert iface["state"] == "UP"
        # The routes of the lab's NICs (not the management NIC's), by the topology's names.
        got_routes = [{**r, "dev": renamed[r["dev"]]} for r in got["routes"] if r["dev"] in renamed]
        assert sorted(got_routes, key=str) == sorted(want["routes"], key=str)
        # The management NIC's default route is gone (replaced where the topology sets one).
        assert not [r for r in got["routes"] if r["to"] == "default" and r["dev"] not in renamed], got["routes"]
        for key in ("net/ipv4/ip_forward", *(k.replace(".", "/") for k, _ in topo.host(host["name"]).sysctls)):
            read = ["cat", f"/proc/sys/{key}"]
            assert vm.run(host["name"], read).stdout == netns_lab.run(host["name"], read).stdout, key

    check, expected = TRAFFIC[name]
    assert check(netns_lab) == expected
    assert check(vm) == expected
    if topo.config:
        # The management NIC became zone "vagrant", whose SSH the router accepts (wan's it drops).
        router = next(k for k, h in enumerate(p["hosts"]) if h["router"])
        ssh = Server(vm, topo.router, 22)
        try:
            assert probe(vm, VMHOST, f"192.168.121.{4 * router + 2}", 22)
        finally:
            ssh.proc.kill()
            ssh.proc.wait()
        written = (tmp_path / "etc" / "nfgate.toml").read_text()
        assert written.startswith((REPO / topo.config).read_text())
        assert '[zones.vagrant]\ninterfaces = ["eth0"]' in written
