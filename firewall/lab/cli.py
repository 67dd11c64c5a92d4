"""``nfgate lab``: build, inspect, use and remove a lab of network namespaces.

A thin layer over ``firewall.lab.netns``: it resolves names and prefixes,
checks for root, and prints. Errors are NfgateError subclasses, which
``firewall.cli`` turns into one line and an exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess

import click

from firewall.errors import KernelError, UsageError, require_root
from firewall.jsondoc import echo_json, json_errors
from firewall.lab import netns
from firewall.lab import state as lab_state
from firewall.lab.state import current_owner, invoking_shell
from firewall.lab.topology import list_topologies, load_topology, topologies_dir

_PREFIX_HELP = "Namespace prefix; namespaces are PREFIX-HOST. Default: nfg-TOPOLOGY."


@click.group("lab")
def lab() -> None:
    """Build and use a lab of network namespaces.

    Each host of a topology (vagrant/topologies/*.json) becomes a namespace
    PREFIX-HOST, linked by veth pairs; nothing appears in the root namespace.
    `lab up` records each lab (topology, prefix, owner) in
    /run/nfgate/labs/PREFIX.json, which status, exec and down read.

    \b
    Example:
      nfgate lab up basic
      nfgate lab exec ext -- ping -c1 203.0.113.1
      nfgate lab down basic
      nfgate lab up basic --prefix t1 && nfgate lab exec --prefix t1 ext -- ping -c1 203.0.113.1
    """


@lab.command("list")
def list_cmd() -> None:
    """List the topologies that `lab up` can build.

    \b
    Example:
      nfgate lab list
      NFGATE_TOPOLOGIES=./mine nfgate lab list
    """
    names = list_topologies()
    if not names:
        raise UsageError(f"no topologies in {topologies_dir()}")
    for name in names:
        topo = load_topology(name)
        click.echo(f"{name:<12} hosts: {', '.join(topo.host_names):<20} {topo.description}")


@lab.command("up")
@click.argument("topology", default="basic")
@click.option("--prefix", "-p", help=_PREFIX_HELP)
def up_cmd(topology: str, prefix: str | None) -> None:
    """Build TOPOLOGY (a name from `lab list`, or a path to a .json file).

    \b
    Example:
      nfgate lab up                  # basic, as nfg-basic-ext, -router, -lan
      nfgate lab up nat-tunnel
      nfgate lab up dual             # basic with IPv6 beside IPv4 on every link
      nfgate lab up basic --prefix t1
    """
    require_root("lab up")
    topo = load_topology(topology)
    # The lab belongs to the shell (or script) that ran this command (through sudo, if so),
    # not to this short-lived process.
    built = netns.Lab(topo, prefix, owner=current_owner(invoking_shell(os.getppid()))).up()
    hosts = ", ".join(f"{h} ({built.ns(h)})" for h in topo.host_names)
    click.echo(f"lab {built.prefix} up: {hosts}")
    first = topo.host_names[0]
    click.echo(f"try: nfgate lab exec --prefix {built.prefix} {first} -- ip -brief address")


@lab.command("down")
@click.argument("topology", default="basic")
@click.option("--prefix", "-p", help=_PREFIX_HELP)
def down_cmd(topology: str, prefix: str | None) -> None:
    """Remove a lab: kill what runs inside it and delete its namespaces.

    Removes every PREFIX-* namespace, so it also clears a half-built lab,
    and the lab's state file. Without --prefix: the one lab of TOPOLOGY that
    is up, whatever its prefix; else nfg-TOPOLOGY.

    \b
    Example:
      nfgate lab down                # the basic lab that is up (default nfg-basic-*)
      nfgate lab down nat-tunnel
      nfgate lab down --prefix t1
    """
    require_root("lab down")
    if prefix is None:
        prefix = _lab_of_topology(topology)
    removed = netns.cleanup(prefix)
    if removed:
        click.echo(f"lab {prefix} down: removed {', '.join(removed)}")
    else:
        click.echo(f"lab {prefix}: nothing to remove")


def _lab_of_topology(topology: str) -> str:
    """The prefix of the one lab of ``topology`` that is up, else its default prefix."""
    named = topology if "/" not in topology and not topology.endswith(".json") else load_topology(topology).name
    up = [s.prefix for s in lab_state.all_states() if s.topology == named and netns.lab_namespaces(s.prefix)]
    if len(up) > 1:
        raise UsageError(f"several {named} labs are up ({', '.join(up)}): pick one with --prefix")
    if up:
        return up[0]
    return netns.default_prefix(load_topology(topology))


@lab.command("status")
@click.option("--prefix", "-p", help="Show only this lab. Default: every lab that is up.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {schema_version, labs: {prefix: {topology, owner, owner_alive, hosts: {host: {...}}}}}.")
@json_errors
def status_cmd(prefix: str | None, as_json: bool) -> None:
    """Show the labs that are up: topology, owner, hosts, interfaces, addresses, routes.

    \b
    Example:
      nfgate lab status
      nfgate lab status --prefix nfg-basic --json
    """
    require_root("lab status")
    if prefix is not None:
        netns.check_prefix(prefix)
    labs = netns.status(prefix)
    if as_json:
        echo_json({"labs": labs})
        return
    if not labs:
        click.echo(f"no lab {prefix} is up" if prefix else "no lab is up")
        return
    for lab_prefix, lab_info in sorted(labs.items()):
        owner = lab_info["owner"]
        if owner is None:
            click.echo(f"lab {lab_prefix} (no state file: built by an older nfgate, or not by nfgate)")
        else:
            gone = "" if lab_info["owner_alive"] else ", gone"
            click.echo(f"lab {lab_prefix} (topology {lab_info['topology']}, owner {owner['user']} pid {owner['pid']}{gone})")
        for host, info in sorted(lab_info["hosts"].items()):
            click.echo(f"  {host} ({info['namespace']}{'' if info['present'] else ', missing'})")
            for iface in info["interfaces"]:
                if iface["ifname"] == "lo":
                    continue
                addrs = " ".join(iface["addresses"]) or "-"
                click.echo(f"    {iface['ifname']:<10} {iface['state']:<8} {addrs}")
            for route in info["routes"]:
                if route["via"] is None:
                    continue  # connected routes repeat the addresses above
                click.echo(f"    route {route['to']} via {route['via']} dev {route['dev']}")


@lab.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--prefix", "-p", help="The lab to use. Default: the only lab up that has HOST.")
@click.pass_context
def exec_cmd(ctx: click.Context, host: str, command: tuple[str, ...], prefix: str | None) -> None:
    """Run COMMAND inside HOST's namespace; exit with its exit code.

    Put `--` before COMMAND so that its options stay its own.

    \b
    Example:
      nfgate lab exec ext -- ping -c1 203.0.113.1
      nfgate lab exec --prefix t1 lan -- ip route
      nfgate lab exec router -- nft list ruleset
    """
    require_root("lab exec")
    # Option parsing stops at HOST, so click hands a `--` after it through.
    if command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("lab exec: no command after HOST (e.g. nfgate lab exec ext -- ip address)")
    name = _find_namespace(host, prefix)
    try:
        proc = subprocess.run(["ip", "netns", "exec", name, *command], check=False)
    except FileNotFoundError:
        raise KernelError("lab exec: the iproute2 'ip' tool is missing (apt-get install iproute2)") from None
    # A signal death is reported the way a shell does: 128 + the signal number.
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if proc.returncode < 0:
        click.echo(f"nfgate: {command[0]} killed by {signal.Signals(-proc.returncode).name}", err=True)
    ctx.exit(code)


def _find_namespace(host: str, prefix: str | None) -> str:
    """The namespace of HOST: in the given lab, or in the only lab up that has it."""
    if prefix is not None:
        netns.check_prefix(prefix)
        name = netns.namespace_name(prefix, host)
        if name not in netns.lab_namespaces(prefix):
            up = [netns.split_namespace(n)[1] for n in netns.lab_namespaces(prefix)]  # type: ignore[index]
            hint = f"its hosts: {', '.join(up)}" if up else f"is it up? nfgate lab up --prefix {prefix}"
            raise UsageError(f"lab {prefix} has no host {host!r} ({hint})")
        return name
    present = set(netns.pr_netns.listnetns())
    matches = [n for p in netns.known_labs() if (n := netns.namespace_name(p, host)) in present]
    if not matches:
        raise UsageError(f"no lab has a host {host!r} (is a lab up? nfgate lab status)")
    if len(matches) > 1:
        prefixes = ", ".join(netns.split_namespace(n)[0] for n in matches)  # type: ignore[index]
        raise UsageError(f"host {host!r} is in several labs ({prefixes}): pick one with --prefix")
    return matches[0]
