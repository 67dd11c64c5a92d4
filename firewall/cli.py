"""The ``nfgate`` command line: the one place that hosts every command group.

``nfgate lab`` (firewall/lab/cli.py) and ``nfgate tunnel`` (tunnel/cli.py)
are added here; they import nothing of this module, so that the packages
below the command line never import it back.

Exit codes: 0 ok, 1 runtime failure (kernel refused, missing privilege or
tool), 2 usage or config error. Errors are one line each, never a traceback.

Every ``--json`` output, here and in the lab and tunnel groups, has the one
shape firewall/jsondoc.py gives it: ``schema_version`` always, and a JSON
error document when the command fails.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import click

from firewall import backend as be
from firewall import confirm as confirming
from firewall import eventlog, manifests, state
from firewall.config import Config, load
from firewall.config import schema as config_schema
from firewall.errors import EXIT_USAGE, KernelError, NfgateError, UsageError, require_root
from firewall.ha import age as ha_age
from firewall.ha import local_node as ha_local_node
from firewall.ha_cli import ha_group
from firewall.hazards import hazards
from firewall.jsondoc import echo_json, json_errors
from firewall.lab import topology
from firewall.lab.cli import lab
from firewall.namespaces import local_addresses
from firewall.rules import build, iptables, nft
from firewall.rules.build import ipv6_counter
from gateways.kinds import KINDS
from firewall.supervisor import GATEWAYS, Supervisor, query
from tunnel.cli import tunnel

DEFAULT_CONFIG = "/etc/nfgate/nfgate.toml"
# Where `pip install` puts the lab's topologies (pyproject's data-files): a
# checkout has them in vagrant/topologies, an installed nfgate only here.
INSTALLED_TOPOLOGIES = Path(sysconfig.get_path("data")) / "share" / "nfgate" / "topologies"


class NfgateGroup(click.Group):
    """Turns NfgateError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NfgateError as err:
            click.echo(f"nfgate: {err}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=NfgateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nfgate")
def main() -> None:
    """nfgate: a router firewall whose gateways check what packet filters cannot.

    Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.
    Shell completion (bash): eval "$(_NFGATE_COMPLETE=bash_source nfgate)".
    """
    if topology.ENV_DIR not in os.environ and not topology.topologies_dir().is_dir():
        os.environ[topology.ENV_DIR] = str(INSTALLED_TOPOLOGIES)


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The nfgate TOML config.",
)


backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "nft", "iptables", "iptables-legacy"]),
    default="auto",
    show_default=True,
    help="auto: nft, unless the ruleset queues and the kernel lacks nft's queue expression.",
)


def _environment(config: Config, config_path: str) -> None:
    """What the config may not name on this machine (``state.foreign_netns``): an error, as the config's own."""
    foreign = state.foreign_netns(config)
    if foreign is not None:
        raise UsageError(f"{config_path}: 1 problem\n  gateway_link.netns: {foreign}")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--strict", is_flag=True, help="Exit 2 on warnings too.")
@json_errors
def check(config_path: str, as_json: bool, strict: bool) -> None:
    """Validate the config and print a summary, with warnings for dangerous configs.

    Every problem is reported at once, each with its key path and line.
    Warnings (a lockout, a selector wider than its rules, IPv6 a rule
    accepts but no gateway takes: nfgate drops it, counted) leave the exit
    code 0, unless --strict. Each gateway's line names the counters of the
    IPv6 its selectors drop.

    \b
    Examples:
      nfgate check
      nfgate check --strict
      nfgate check -c examples/office.toml --json
    """
    config = load(config_path)
    _environment(config, config_path)
    warnings = [str(h) for h in hazards(config)]
    rs = build(config)
    summary = {
        "config": config_path,
        "zones": {z.name: list(z.interfaces) for z in config.zones.values()},
        "policy": {"input": config.policy.input, "forward": config.policy.forward, "output": config.policy.output},
        "rules": len(config.rules),
        "port_forwards": len(config.nat.forward),
        "masquerade": list(config.nat.masquerade),
        "masquerade6": list(config.nat.masquerade6),
        "queues": list(config.processor.queues),
        "fail_mode": config.processor.fail_mode,
        "ipv6_kinds": [k.name for k in KINDS if k.ipv6],
        "gateways": [
            {"name": g.name, "kind": g.kind, "listen_port": g.listen_port, "workers": g.workers,
             "selectors": len(g.traffic),
             "ipv6_dropped": [ipv6_counter(k, i) for i, t in enumerate(g.traffic) if not g.takes_ipv6(t)],
             "ipv6_relayed": [t.source for t in g.traffic if g.takes_ipv6(t)]}
            for k, g in enumerate(config.gateways)
        ],
        "chains": len(rs.chains),
        "kernel_rules": sum(len(c.rules) for c in rs.chains),
        "warnings": warnings,
    }
    if as_json:
        echo_json(summary)
        if strict and warnings:
            sys.exit(EXIT_USAGE)
        return
    click.echo(f"{config_path}: ok")
    for name, ifs in summary["zones"].items():
        click.echo(f"  zone {name}: {', '.join(ifs)}")
    p = summary["policy"]
    click.echo(f"  policy: input {p['input']}, forward {p['forward']}, output {p['output']}")
    click.echo(
        f"  {summary['rules']} rules, {summary['port_forwards']} port forwards, "
        f"masquerade on {', '.join(summary['masquerade']) or 'none'}"
        + (f", IPv6 masquerade (NAT66) on {', '.join(summary['masquerade6'])}" if summary["masquerade6"] else "")
    )
    host = config.gateway_link.mode == "host"
    for g in summary["gateways"]:
        ports = (f"port {g['listen_port']}" if g["workers"] == 1
                 else f"{g['workers']} workers, ports {g['listen_port']}-{g['listen_port'] + g['workers'] - 1}")
        click.echo(f"  gateway {g['name']} ({g['kind']}), {ports}, {g['selectors']} selectors")
        if g["ipv6_relayed"]:
            click.echo(f"    IPv6 on its selectors' ports: through the gateway for {', '.join(g['ipv6_relayed'])}")
        if g["ipv6_dropped"]:
            click.echo(f"    IPv6 on its selectors' ports: dropped, counted as {', '.join(g['ipv6_dropped'])} "
                       f"({_ipv6_why(g['kind'], host, summary['ipv6_kinds'])})")
    if config.gateways:
        click.echo(f"  processor: queues {summary['queues']}, fail {summary['fail_mode']}")
    if config.gateways and host:
        link = config.gateway_link
        click.echo(f"  gateways on their own host {link.gateway_address.ip} over {link.router_if} (nfgate gateways there)")
    if config.ha is not None and config.gateways:
        halves = ", ".join(f"{n} {config.for_node(n).own_pool}" for n in sorted(config.ha.nodes))
        click.echo(f"  firewall-side pool by node: {halves}")
    click.echo(f"  renders to {summary['kernel_rules']} rules in {summary['chains']} chains")
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    if strict and warnings:
        click.echo(f"nfgate: {len(warnings)} warning{'s' if len(warnings) != 1 else ''} (--strict)", err=True)
        sys.exit(EXIT_USAGE)


@main.command()
@config_option
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["nft", "iptables", "ip6tables"]),
    default="nft",
    show_default=True,
    help="nft: for nft -f; iptables / ip6tables: for *tables-restore --noflush.",
)
@click.option("--node", default=None, help="With [ha]: the ruleset of this node (default: the node this host is).")
def rules(config_path: str, fmt: str, node: str | None) -> None:
    """Print the ruleset nfgate would install, for review.

    The nft text replaces nfgate's table atomically when loaded with nft -f;
    the iptables text is for iptables-restore --noflush on a router that has
    no nfgate chains yet (nfgate apply handles re-applying). With [ha] each
    node's differs (its half of the pool, its address on a host gateway
    link): --node picks one; on a host that is neither node, the pair's
    whole pool is shown.

    \b
    Examples:
      nfgate rules -c examples/home.toml
      nfgate rules -c examples/mail.toml --format iptables > mail.rules
      nfgate rules -c pair.toml --node r2
    """
    rs = build(node_view(load(config_path), node, strict=False))
    if fmt == "nft":
        click.echo(nft.render(rs), nl=False)
    else:
        click.echo(iptables.render(rs, 4 if fmt == "iptables" else 6), nl=False)


@main.command()
@config_option
@backend_option
@click.option("--dry-run", is_flag=True, help="Show what would be loaded; change nothing.")
@click.option("--confirm", "confirm_after", type=click.FloatRange(1, 3600), default=None, metavar="SECONDS",
              help="Roll back to the previous ruleset unless `nfgate confirm` comes within SECONDS.")
def apply(config_path: str, backend: str, dry_run: bool, confirm_after: float | None) -> None:
    """Install the ruleset atomically, replacing nfgate's previous one.

    On a refusal the previous ruleset stays in place and the kernel's message
    is printed. Rules that nfgate did not install are never touched. While
    nfgate run is up, use nfgate reload instead. With --confirm, a timer
    puts the previous ruleset back after SECONDS unless nfgate confirm comes
    first: for changes made over SSH.

    \b
    Examples:
      sudo nfgate apply
      sudo nfgate apply --confirm 60 && sudo nfgate confirm
      sudo nfgate apply --backend iptables --dry-run
      sudo ip netns exec router nfgate apply -c lab.toml
    """
    if not dry_run:
        require_root("apply")
    config = load(config_path)
    for line in hazards(config):
        click.echo(f"warning: {line}", err=True)
    rs = build(node_view(config, strict=not dry_run))
    choice = be.choose(backend, rs)
    click.echo(f"backend: {choice.backend} ({choice.reason})")
    if dry_run:
        for line in be.apply(rs, choice.backend, dry_run=True).actions:
            click.echo(line)
        return
    pid = state.running_pid(config)
    if pid is not None:
        raise UsageError(f"nfgate run is up here (pid {pid}): use nfgate reload, which keeps its bindings")
    previous = None
    if confirm_after is not None:
        if confirming.pending(config) is not None:
            raise UsageError("an apply --confirm is pending: nfgate confirm it, or wait for its rollback")
        previous = state.applied(config)
        if previous is None and be.installed():
            raise UsageError("--confirm needs the ruleset to roll back to, and nfgate has no record of the one "
                             "installed: apply it once without --confirm")
    report = be.apply(rs, choice.backend)
    for line in report.actions:
        click.echo(line)
    state.record_applied(config, config.path.read_text() if config.path else "", choice.backend)
    if confirm_after is not None:
        deadline, timer = confirming.arm(config, confirm_after, previous)
        when = time.strftime("%H:%M:%S", time.localtime(deadline))
        to = "the previous ruleset" if previous else "no rules (nfgate flush)"
        click.echo(f"rolls back to {to} at {when} unless `nfgate confirm` comes first (timer pid {timer})")


@main.command("confirm")
@config_option
def confirm_command(config_path: str) -> None:
    """Keep the ruleset of a pending nfgate apply --confirm.

    \b
    Examples:
      sudo nfgate confirm
    """
    require_root("confirm")
    click.echo(confirming.confirm(load(config_path)))


@main.command()
@config_option
@click.argument("gateway")
def manifest(config_path: str, gateway: str) -> None:
    """Print the manifest nfgate run gives gateway GATEWAY (docs/manifest.md).

    A gateway of several workers has one per worker: NAME#0, NAME#1, ...
    (NAME alone is worker 0).

    A gateway process reads only its manifest. To run one by hand, in the
    gateway namespace:

    \b
      nfgate manifest -c /etc/nfgate/nfgate.toml nas-log > /run/nfgate/gateway-nas-log.json
      nfgate exec -- python -m gateways --manifest /run/nfgate/gateway-nas-log.json
    """
    config = load(config_path)
    for gw in config.gateways:
        for worker, name in enumerate(manifests.process_names(gw)):
            if gateway in (name, gw.name if worker == 0 else None):
                click.echo(manifests.manifest_for(config, gw, worker).to_json(), nl=False)
                return
    known = ", ".join(n for g in config.gateways for n in manifests.process_names(g)) or "none"
    raise UsageError(f"no gateway named {gateway!r} in {config_path} (configured: {known})")


@main.command()
def flush() -> None:
    """Remove everything nfgate installed, and nothing else: the router is open after it.

    Finds nfgate's objects by name in every backend (table inet nfgate, chains
    NFGATE-* and the jumps to them), so it needs no config. It is the only
    command that removes the static rules: nfgate run leaves them in place
    when it stops.

    \b
    Examples:
      sudo nfgate flush
      sudo ip netns exec router nfgate flush
    """
    require_root("flush")
    lines = be.flush()
    for line in lines:
        click.echo(line)
    if lines != ["nothing of nfgate's was installed"]:
        click.echo("flushed: every nfgate rule is gone, the filter and NAT too; the kernel's own chain policies apply")


@main.command()
@config_option
@backend_option
def run(config_path: str, backend: str) -> None:
    """Run the firewall in the foreground: rules, processors, gateways.

    Creates the gateway namespace and its blind-track link, applies the
    rules, starts one packet processor per queue and one process per
    gateway, and restarts any that dies. One instance at a time: a second
    one refuses and names the first one's pid. SIGHUP reloads the config
    (as nfgate reload). SIGTERM or Ctrl-C stops the processes and removes
    the blind track; the static rules stay, the steering stops per
    processor.fail_mode (nfgate flush removes everything).
    scripts/nfgate.service runs it under systemd.

    \b
    Examples:
      sudo nfgate run
      sudo nfgate run -c /etc/nfgate/office.toml --backend iptables
    """
    require_root("run")
    config = load(config_path)
    eventlog.configure_process("nfgate run", config.log.format == "json", level=getattr(logging, config.log.level.upper()))
    Supervisor(config, config_path, backend).run()


def _ipv6_why(kind: str, host: bool, ipv6_kinds: list[str]) -> str:
    """Why a gateway's selectors drop their IPv6 (``Gateway.takes_ipv6``), for nfgate check."""
    if not KINDS[kind].ipv6:
        return f"a {kind} gateway takes IPv4 only; kinds that take IPv6: {', '.join(ipv6_kinds)}"
    if host:
        return "the gateways' own host takes IPv4 only"
    return "a selector whose addresses are IPv4 only"


def node_view(config: Config, node: str | None = None, strict: bool = True) -> Config:
    """With [ha], the config as ``node`` (by default this host's node) runs it (``Config.for_node``).

    Not strict (review, a dry run), a host that is neither node gets the config as a whole."""
    if config.ha is None:
        return config
    if node is not None:
        if node not in config.ha.nodes:
            raise UsageError(f"--node {node}: [ha] has nodes {', '.join(sorted(config.ha.nodes))}")
        return config.for_node(node)
    try:
        return config.for_node(ha_local_node(config, local_addresses()))
    except UsageError:
        if strict:
            raise
        return config


@main.command()
@config_option
def gateways(config_path: str) -> None:
    """Run the gateways on their own host (the AG host), in the foreground.

    For gateway_link.mode = "host" (docs/ha.md, "The AG host"): the routers'
    nfgate run starts no gateway; this command, on the host at
    gateway_address, writes each gateway's manifest from the same config and
    starts one process per gateway worker, restarts any that dies, says
    READY=1 to systemd once all listen, and answers nfgate status and
    nfgate reload on its own supervisor.control_socket. It touches no rule
    and no link. Route processor.pools.firewall_side via the router's
    address on the link (a pair's virtual address) before starting it.

    \b
    Examples:
      sudo nfgate gateways -c /etc/nfgate/nfgate.toml
    """
    require_root("gateways")
    config = load(config_path)
    if config.gateway_link.mode != "host":
        raise UsageError(f"{config_path}: gateway_link.mode is \"namespace\": nfgate run starts the gateways in "
                         "the router's own namespace; nfgate gateways is for mode = \"host\"")
    if not config.gateways:
        raise UsageError(f"{config_path}: no [[gateway]] configured")
    eventlog.configure_process("nfgate gateways", config.log.format == "json", level=getattr(logging, config.log.level.upper()))
    Supervisor(config, config_path, role=GATEWAYS).run()


@main.command()
@config_option
def reload(config_path: str) -> None:
    """Apply the config file again under the running nfgate run, without cuts.

    Refuses a bad config (every problem with its key path) and keeps the old
    rules. Else applies the rules atomically, keeps the bindings and dynamic
    rules, restarts only the gateways whose settings changed (and the
    processors only if theirs did), and keeps their live flows. SIGHUP to
    nfgate run does the same (systemctl reload nfgate).

    \b
    Examples:
      sudo nfgate reload
    """
    require_root("reload")
    config = load(config_path)
    for line in hazards(config):
        click.echo(f"warning: {line}", err=True)
    # Each child may take stop_timeout to stop, twice (SIGTERM, SIGKILL), and each tool call its own.
    # At most: the pair's two daemons, the processors, every gateway worker (on a router or the AG host).
    children = 2 + len(config.processor.queues) + sum(g.workers for g in config.gateways)
    timeout = config.supervisor.stop_timeout * 2 * (children + 1) + 4 * be.TOOL_TIMEOUT
    result = query(config, "reload", timeout, refused=UsageError)
    for line in result.get("actions", []):
        click.echo(line)
    for key in ("restarted", "started", "stopped"):
        click.echo(f"{key}: {', '.join(result.get(key) or []) or 'nothing'}")


@main.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@config_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(config_path: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the gateway namespace of the running nfgate run.

    Exits with COMMAND's exit code. Put `--` before COMMAND so that its
    options stay its own. nfgate run mounts the gateway namespace
    (gateway_link.netns) in its own mount namespace (under systemd, the
    unit's), so `ip netns list` names it but `ip netns exec` cannot enter it
    from a shell; this enters it through a running gateway process, as
    `nsenter -t PID -n` with a pid from nfgate status would.

    \b
    Examples:
      sudo nfgate exec -- ss -tnp
      sudo nfgate exec -- tcpdump -ni nfg-gw1
    """
    require_root("exec")
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("exec: no command (e.g. nfgate exec -- ss -tn)")
    config = load(config_path)
    if config.gateway_link.mode == "host":
        raise UsageError(f"{config_path}: gateway_link.mode is \"host\": the gateways run on the AG host "
                         f"({config.gateway_link.gateway_address.ip}) in its own namespace; run the command there")
    if not config.gateways:
        raise UsageError(f"{config_path}: no [[gateway]] configured, so no gateway namespace")
    names = {f"gateway-{n}" for g in config.gateways for n in manifests.process_names(g)}
    pids = [p["pid"] for p in query(config, "status").get("processes", [])
            if p["name"] in names and p.get("pid") and p.get("state") == "running"]
    own = os.stat("/proc/self/ns/net").st_ino
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != own:
                path = f"/proc/{pid}/ns/net"
                break
        except OSError:
            continue  # gone meanwhile: the next one
    else:
        raise KernelError(f"exec: no gateway of nfgate run is running in {config.gateway_link.netns} now "
                          "(nfgate status shows them)")
    try:
        os.execvp("nsenter", ["nsenter", f"--net={path}", "--", *command])
    except FileNotFoundError:
        raise KernelError("exec: util-linux's nsenter is missing (apt-get install util-linux)") from None


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@json_errors
def status(config_path: str, as_json: bool) -> None:
    """Show the running firewall: processes, flows, pools, counters.

    Reads the supervisor's root-only control socket (supervisor.control_socket),
    and the kernel's counters of the IPv6 each selector drops (ipv6_dropped).

    \b
    Examples:
      sudo nfgate status
      sudo nfgate status --json | jq .processors
    """
    require_root("status")
    config = load(config_path)
    data = query(config, "status")
    # The kernel's own counters of what the ruleset drops by name (the IPv6
    # a gateway cannot take): read here, from the rules nfgate run applied.
    named = build(config).counters
    counts = be.named_counters(data.get("backend", ""), named) if named else {}
    data["ipv6_dropped"] = {name: {"packets": p, "bytes": b, "what": named[name]} for name, (p, b) in counts.items()}
    if as_json:
        echo_json(data)
        return
    click.echo(f"backend: {data.get('backend')}")
    click.echo(f"{'process':<24} {'pid':>7} {'state':<11} {'serving':<7} {'restarts':>8} {'uptime':>9}")
    for p in data.get("processes", []):
        pid = p["pid"] if p["pid"] is not None else "-"
        serving = "yes" if p.get("ready") else "no"  # READY=1 given: a processor has bound its queues
        click.echo(f"{p['name']:<24} {pid:>7} {p['state']:<11} {serving:<7} {p['restarts']:>8} {p['uptime']:>8.1f}s")
    for name, stats in sorted(data.get("processors", {}).items()):
        click.echo(f"{name}:")
        for key, value in _flatten(stats):
            click.echo(f"  {key} = {value}")
    if data.get("ha"):
        h = data["ha"]
        sync = h["sync"]
        click.echo(f"ha: node {h['node']} (peer {h['peer']}): vrrp {h['vrrp']} since {ha_age(h['since'])}, "
                   f"last became primary {ha_age(h['last_failover'])}, {h['transitions']} transitions")
        if sync.get("running"):
            click.echo(f"ha sync: {sync.get('entries', '?')} entries; sent {sync.get('packets_sent', '?')} "
                       f"received {sync.get('packets_recv', '?')} messages; injected {sync.get('injected', '?')} "
                       f"(failed {sync.get('inject_failed', '?')}); lost {sync.get('lost', '?')}, "
                       f"errors {sync.get('errors_send', 0) + sync.get('errors_recv', 0)}")
        else:
            click.echo("ha sync: conntrackd does not answer")
    if data["ipv6_dropped"]:
        click.echo("ipv6_dropped (IPv6 on a selector's ports that did not pass its gateway):")
        for name, c in data["ipv6_dropped"].items():
            click.echo(f"  {name} = {c['packets']} packets, {c['bytes']} bytes: {c['what']}")


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for key in sorted(obj):
            yield from _flatten(obj[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, obj


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the bindings (or rules) as JSON: {schema_version, items}.")
@click.option("--rules", "rules", is_flag=True,
              help="List the dynamic rules instead: gateways' requests (FTP data), adjacent ports (RTCP), offloads.")
@json_errors
def flows(config_path: str, as_json: bool, rules: bool) -> None:
    """List the live gateway flows with their original and translated tuples.

    Each flow takes two lines: the client, the address it asked for and the
    server, with the gateway and the state; then the blind-track endpoints,
    the SNAT address, when it started and each leg's counters.

    \b
    Examples:
      sudo nfgate flows
      sudo nfgate flows --json
      sudo nfgate flows --rules
    """
    require_root("flows")
    data = query(load(config_path), "rules" if rules else "flows")
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no dynamic rules" if rules else "no gateway flows")
        return
    for item in data:
        for line in (rule_lines(item) if rules else flow_lines(item)):
            click.echo(line)


def rule_lines(rule: dict[str, Any]) -> list[str]:
    """One dynamic rule of {"cmd": "rules"} for a person: what it lets in, for whom, until when."""
    def at(key: str) -> Any:
        return "-" if rule.get(key) is None else rule[key]

    head = f"{at('kind')} {at('proto')} {at('src')} -> {at('dst')}"
    if rule.get("to") is not None:
        head += f" (to {rule['to']})"
    head += f"  gateway {at('gateway')}  {at('state')}"
    detail = [f"rule {at('rule_id')} on queue {at('queue')}", f"flow {at('flow_id')}",
              "one-shot" if rule.get("one_shot") else "reusable"]
    if isinstance(rule.get("expires_in"), (int, float)):
        detail.append(f"expires in {rule['expires_in']:.1f} s")
    if "holds_leg_b" in rule:
        detail.append("holds leg b" if rule["holds_leg_b"] else "leg b released")
    return [head, "  " + ", ".join(detail)]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def flow_lines(flow: dict[str, Any]) -> list[str]:
    """One flow of {"cmd": "flows"} for a person: two lines, local times, no Python reprs."""
    def at(key: str) -> Any:
        return "-" if flow.get(key) is None else flow[key]

    state = ",".join(flow.get("state") or []) or "-"
    head = f"{at('proto')} {at('client')} -> {at('original_dst')} (server {at('server')})  gateway {at('gateway')}  {state}"
    created = flow.get("created")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if isinstance(created, (int, float)) else "-"
    ag = at("ag") if flow.get("ag_eport") is None else f"{flow.get('ag')} (from port {flow['ag_eport']})"
    detail = [f"firewall side {at('firewall_side')}", f"gateway {ag}", f"snat {at('snat')}", f"since {since}"]
    if isinstance(flow.get("age"), (int, float)):
        detail[-1] += f" ({flow['age']:.1f} s)"
    detail.append(f"flow {at('flow_id')} on queue {at('queue')}")
    for leg in ("leg_a", "leg_b"):
        if f"{leg}_packets" in flow:
            detail.append(f"{leg.replace('_', ' ')} {flow[f'{leg}_packets']} packets {_size(flow[f'{leg}_bytes'])}")
    return [head, "  " + ", ".join(detail)]


@main.group("config")
def config_group() -> None:
    """The config file itself: its JSON Schema, for editors and CI."""


@config_group.command()
def schema() -> None:
    """Print the JSON Schema (Draft 2020-12) of nfgate.toml.

    It names every key with its type, bounds, default and meaning, as the
    TOML writes them; editors check and complete the file with it
    (docs/config.md, "Editing with the schema"). `nfgate check` still has
    the last word: the checks across keys (zones, overlaps) are not in it.

    \b
    Examples:
      nfgate config schema > nfgate.schema.json
    """
    click.echo(json.dumps(config_schema(), indent=2))


main.add_command(lab)
main.add_command(ha_group)
main.add_command(tunnel)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
