"""The Vagrant lab's plan: what ``vagrant/Vagrantfile`` builds, from the same topology as the netns lab.

``plan(topology)`` turns a ``Topology`` into plain JSON data: one VM per
host, one private network per link end, and each host's provisioning script.
The Vagrantfile runs ``python3 -m firewall.lab.vagrant plan NAME`` and passes
what it reads to Vagrant unchanged, so the planning is written once, here,
in the code the netns lab and its tests already use, and a test can compare
it with the netns lab without booting a VM (there is no usable KVM on the
build machines).

Why it is built this way:

- A VM has a NIC of its own (Vagrant's management NIC, over which it runs
  SSH), and the kernel names the lab's NICs ``eth1``, ``ens6``... in an order
  the topology does not control. So every lab NIC gets a fixed MAC from the
  plan, and the provisioning script finds it by that MAC and renames it to
  the topology's interface name (``wan0``, which the nfgate config names).
  When that name is the management NIC's own (``eth0`` on a Debian box), the
  lab NIC keeps its kernel name and the routes use it: renaming the NIC
  Vagrant reaches the VM by would cut Vagrant off.
- Vagrant does not configure the lab NICs (``auto_config: false``): the
  script sets the addresses, sysctls, routes and the topology's commands,
  and removes a default route the topology does not give the host (the
  management NIC's), so that, as in the netns lab, ext has no way to the LAN
  but through the router,
  the same steps ``nfgate lab up`` takes for a namespace. That is what lets a
  test run each host's script for real inside a netns lab's host.
- Links are point to point, as the netns lab's veth pairs are: under libvirt
  a UDP tunnel between the two VMs' NICs (no host bridge, so the host holds
  no address on the lab's networks); under VirtualBox an internal network
  per link.
- The router of a topology that names a ``config`` runs ``scripts/setup``
  from the synced folder and applies that config, as ``scripts/demo`` does in
  the netns lab. The VM's management NIC is then added as zone ``vagrant``
  with SSH allowed, or the config's ``input = "drop"`` would lock Vagrant out.

This module imports only the standard library and the topology loader, so
the host's ``python3`` runs it without the project's venv.
"""

from __future__ import annotations

import json
import shlex
import sys
from ipaddress import IPv4Interface
from typing import Any

from firewall.errors import UsageError
from firewall.lab.topology import BRIDGE, Endpoint, Topology, load_topology

# Locally administered unicast MACs, "02:6e:66" ("nf"), then the link index
# and 0a or 0b for the link's end; a topology has at most 256 links.
MAC_PREFIX = "02:6e:66:00"
MAX_LINKS = 256
# libvirt's UDP tunnels: link i's end a listens on BASE + 2i, end b on BASE + 2i + 1.
UDP_TUNNEL_BASE = 41000
UDP_TUNNEL_IP = "127.0.0.1"
# Where the router VM finds the repository (Vagrant's synced folder).
GUEST_REPO = "/vagrant"
# The names Vagrant gives the boxes per provider; NFGATE_BOX_<PROVIDER> overrides them.
BOXES = {"libvirt": "debian/bookworm64", "virtualbox": "bento/debian-12"}
MGMT_ZONE = "vagrant"


def mac(link: int, side: str) -> str:
    return f"{MAC_PREFIX}:{link:02x}:{'0a' if side == 'a' else '0b'}"


def _vagrant_network(topo: Topology, link: int, side: str, ep: Endpoint) -> dict[str, Any]:
    """The options of one ``config.vm.network :private_network`` call."""
    local = UDP_TUNNEL_BASE + 2 * link + (0 if side == "a" else 1)
    remote = UDP_TUNNEL_BASE + 2 * link + (1 if side == "a" else 0)
    tunnel = {
        "auto_config": False,
        # VirtualBox wants 12 hex digits; vagrant-libvirt puts the colons back.
        "mac": mac(link, side).replace(":", "").upper(),
        "libvirt__tunnel_type": "udp",
        "libvirt__tunnel_local_ip": UDP_TUNNEL_IP,
        "libvirt__tunnel_local_port": local,
        "libvirt__tunnel_ip": UDP_TUNNEL_IP,
        "libvirt__tunnel_port": remote,
        "virtualbox__intnet": f"nfgate-{topo.name}-{link}",
    }
    if topo.host(ep.host).bridge:
        # A switch VM's port: unnumbered, as in the netns lab (the script bridges it).
        return tunnel
    if not ep.addresses:
        raise UsageError(
            f"topology {topo.name}: links[{link}].{side} ({ep.host}:{ep.ifname}) has no address, "
            "and a Vagrant private network needs one"
        )
    first = next((a for a in ep.addresses if a.version == 4), ep.addresses[0])
    return {
        "ip": str(first.ip),
        # Vagrant takes a dotted mask for IPv4 and a prefix length for IPv6.
        "netmask": str(first.netmask) if isinstance(first, IPv4Interface) else first.network.prefixlen,
        **tunnel,
    }


def plan(topo: Topology) -> dict[str, Any]:
    """One VM per host, its lab NICs, and its provisioning script, as JSON-ready data."""
    if len(topo.links) > MAX_LINKS:
        raise UsageError(f"topology {topo.name}: more than {MAX_LINKS} links for the Vagrant lab's MACs")
    hosts = []
    for host in topo.host_names:
        nics = []
        for i, link in enumerate(topo.links):
            for side, ep, peer in (("a", link.a, link.b), ("b", link.b, link.a)):
                if ep.host != host:
                    continue
                nics.append({
                    "link": i,
                    "side": side,
                    "ifname": ep.ifname,
                    "mac": mac(i, side),
                    "addresses": [str(a) for a in ep.addresses],
                    "peer": {"host": peer.host, "ifname": peer.ifname},
                    "vagrant": _vagrant_network(topo, i, side, ep),
                })
        router = host == topo.router
        hosts.append({
            "name": host,
            "router": router,
            "setup": router and topo.config is not None,
            "nics": nics,
            "script": provision_script(topo, host),
        })
    return {
        "topology": topo.name,
        "router": topo.router,
        "config": topo.config,
        "boxes": BOXES,
        "hosts": hosts,
    }


def _var(ifname: str) -> str:
    """The shell variable holding the device name of a lab NIC (``wan0`` -> ``nic_wan0``)."""
    return "nic_" + ifname.replace("-", "_")


_PREAMBLE = r"""#!/usr/bin/env bash
# Host {host} of the nfgate lab topology {topology}, for vagrant/Vagrantfile.
# Generated from {source} by firewall/lab/vagrant.py: change the topology, not this.
# It takes the steps `nfgate lab up` takes for this host's namespace: the lab's
# NICs (found by the MACs the Vagrantfile gave them) get the topology's names,
# then sysctls, addresses, routes and the topology's commands{router_note}.
set -euo pipefail

lab_nic() {{  # MAC NAME: print the device with MAC, renamed to NAME unless that name is taken
  local mac=$1 want=$2 dev="" d
  for d in /sys/class/net/*; do
    if [[ $(cat "$d/address") == "$mac" ]]; then dev=${{d##*/}}; fi
  done
  if [[ -z $dev ]]; then
    echo "nfgate lab: no NIC has MAC $mac (the lab's $want)" >&2
    return 1
  fi
  if [[ $dev != "$want" ]]; then
    if [[ -e /sys/class/net/$want ]]; then
      echo "nfgate lab: $want is this machine's own NIC; the lab's $want stays $dev" >&2
    else
      ip link set dev "$dev" down
      ip link set dev "$dev" name "$want"
      dev=$want
    fi
  fi
  echo "$dev"
}}
"""


def provision_script(topo: Topology, host: str) -> str:
    """The bash script that makes a machine (a VM, or a bare netns host) into ``host`` of ``topo``."""
    h = topo.host(host)
    eps = [(i, side, ep) for i, link in enumerate(topo.links) for side, ep in (("a", link.a), ("b", link.b))
           if ep.host == host]
    router = host == topo.router and topo.config is not None
    source = topo.source.name if topo.source else f"{topo.name}.json"
    out = [_PREAMBLE.format(
        host=host, topology=topo.name, source=f"vagrant/topologies/{source}",
        router_note=", then nfgate's rules from the synced folder" if router else "",
    )]
    out.append("# The lab's NICs, by MAC.")
    for i, side, ep in eps:
        out.append(f"{_var(ep.ifname)}=$(lab_nic {mac(i, side)} {shlex.quote(ep.ifname)})")
    names = {ep.ifname for _, _, ep in eps}
    fwd = "1" if h.forwarding else "0"
    out.append("\n# Sysctls: forwarding as the topology says, no duplicate address detection (as the netns lab).")
    sysctls = [f"net.ipv4.ip_forward={fwd}"]
    out.append(f"sysctl -q -w {' '.join(sysctls)}")
    out.append("if [[ -d /proc/sys/net/ipv6 ]]; then")
    out.append(f"  sysctl -q -w net.ipv6.conf.all.forwarding={fwd} net.ipv6.conf.all.accept_dad=0 "
               "net.ipv6.conf.default.accept_dad=0")
    out.append("fi")
    if any(key.startswith("net.netfilter.") for key, _ in h.sysctls):
        # Conntrack's sysctls exist once the module is loaded (built in, this is a no-op).
        out.append("modprobe -q nf_conntrack || true")
    for key, value in h.sysctls:
        parts = key.split(".")
        if len(parts) > 3 and parts[2] in ("conf", "neigh") and parts[3] in names:
            # A per-interface key names the topology's interface: use the device it became.
            parts[3] = "${" + _var(parts[3]) + "}"
            out.append(f'sysctl -q -w "{".".join(parts)}={value}"')
        else:
            out.append(f"sysctl -q -w {shlex.quote(f'{key}={value}')}")
    out.append("\n# Addresses, and the links up.")
    for _, _, ep in eps:
        dev = '"$' + _var(ep.ifname) + '"'
        for addr in ep.addresses:
            extra = " nodad" if addr.version == 6 else ""
            out.append(f"ip -{addr.version} address replace {addr} dev {dev}{extra}")
        out.append(f"ip link set dev {dev} up")
    routes = topo.routes_of(host)
    out.append("\n# Routes. A default route the topology does not give this host (the management\n"
               "# NIC's, from DHCP) goes: else traffic the lab must route, or drop, would leave by it.\n"
               "# Vagrant's SSH reaches the VM on the management NIC's own network, without it.")
    for version in (4, 6):
        if not any(r.is_default and r.to.version == version for r in routes):
            out.append(f"for _ in 1 2 3 4 5 6 7 8; do ip -{version} route del default 2>/dev/null || break; done")
    for route in routes:
        to = "default" if route.is_default else str(route.to)
        argv = f"ip -{route.to.version} route replace {to}"
        if route.via is not None:
            argv += f" via {route.via}"
        if route.dev is not None:
            argv += ' dev "$' + _var(route.dev) + '"'
        out.append(argv)
    if h.bridge:
        out.append(f"\n# A switch: {BRIDGE} joins the lab's NICs (no STP, no forward delay, no snooping).")
        out.append(f"ip link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0")
        for _, _, ep in eps:
            out.append(f'ip link set dev "${_var(ep.ifname)}" master {BRIDGE}')
        out.append(f"ip link set dev {BRIDGE} up")
    if h.commands:
        out.append("\n# The topology's commands.")
    for argv in h.commands:
        out.append(shlex.join(argv))
    if router:
        out.append(_router_tail(topo, eps).rstrip("\n"))
    out.append(f'\necho "nfgate lab: {host} of {topo.name} is provisioned"')
    return "\n".join(out) + "\n"


def _router_tail(topo: Topology, eps: list[tuple[int, str, Endpoint]]) -> str:
    lab_macs = " ".join(mac(i, side) for i, side, _ in eps)
    return f"""
# nfgate's rules, from the synced folder: the config the netns lab's router applies.
# NFGATE (the command), NFGATE_REPO and NFGATE_ETC let a test run this elsewhere.
repo=${{NFGATE_REPO:-{GUEST_REPO}}}
read -r -a nfgate <<< "${{NFGATE:-$repo/.venv/bin/nfgate}}"
config=$repo/{shlex.quote(topo.config or '')}
own=()  # this machine's NICs that are not the lab's: Vagrant's management NIC
for d in /sys/class/net/*; do
  case " {lab_macs} " in
    *" $(cat "$d/address") "*) ;;
    *) [[ ${{d##*/}} == lo ]] || own+=("${{d##*/}}") ;;
  esac
done
if ((${{#own[@]}})); then
  etc=${{NFGATE_ETC:-/etc/nfgate}}
  mkdir -p "$etc"
  {{
    cat "$config"
    printf '\\n# Added by the Vagrant provisioning: the VM'"'"'s own NICs, whose SSH Vagrant needs.\\n'
    printf '[zones.{MGMT_ZONE}]\\ninterfaces = [%s]\\n\\n' "$(printf '"%s", ' "${{own[@]}}" | sed 's/, $//')"
    printf '[[rule]]\\nname = "vagrant-ssh"\\nfrom = "{MGMT_ZONE}"\\nto = "router"\\nproto = "tcp"\\nports = 22\\n'
  }} > "$etc/nfgate.toml"
  config=$etc/nfgate.toml
  echo "nfgate lab: zone {MGMT_ZONE} = ${{own[*]}} (SSH allowed) added in $config"
fi
"${{nfgate[@]}}" apply -c "$config"
"""


def main(argv: list[str]) -> int:
    usage = "usage: python3 -m firewall.lab.vagrant plan TOPOLOGY | script TOPOLOGY HOST"
    try:
        if len(argv) == 2 and argv[0] == "plan":
            json.dump(plan(load_topology(argv[1])), sys.stdout, indent=1)
            sys.stdout.write("\n")
        elif len(argv) == 3 and argv[0] == "script":
            sys.stdout.write(provision_script(load_topology(argv[1]), argv[2]))
        else:
            print(usage, file=sys.stderr)
            return 2
    except UsageError as err:
        print(f"nfgate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
