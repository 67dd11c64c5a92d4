"""The ``nfgate`` command line: the one place that hosts every command group.

``nfgate lab`` (firewall/lab/cli.py) and ``nfgate tunnel`` (tunnel/cli.py)
are added here; they import nothing of this module, so that the packages
below the command line never import it back.

Exit codes: 0 ok, 1 runtime failure (kernel refused, missing privilege or
tool), 2 usage or config error. Errors are one line each, never a traceback.
"""

from __future__ import annotations

import json
import sys

import click

from firewall import backend as be
from firewall import manifests
from firewall.config import load
from firewall.config import schema as config_schema
from firewall.errors import NfgateError, UsageError, require_root
from firewall.lab.cli import lab
from firewall.rules import build, iptables, nft
from firewall.supervisor import Supervisor, query
from tunnel.cli import tunnel

DEFAULT_CONFIG = "/etc/nfgate/nfgate.toml"


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
    """


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


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def check(config_path: str, as_json: bool) -> None:
    """Validate the config and print a summary.

    Every problem is reported at once, each with its key path and line.

    \b
    Examples:
      nfgate check
      nfgate check -c examples/office.toml --json
    """
    config = load(config_path)
    rs = build(config)
    summary = {
        "config": config_path,
        "zones": {z.name: list(z.interfaces) for z in config.zones.values()},
        "policy": {"input": config.policy.input, "forward": config.policy.forward, "output": config.policy.output},
        "rules": len(config.rules),
        "port_forwards": len(config.nat.forwards),
        "masquerade": list(config.nat.masquerade),
        "queues": list(config.processor.queues),
        "fail_mode": config.processor.fail_mode,
        "gateways": [
            {"name": g.name, "kind": g.kind, "listen_port": g.listen_port, "selectors": len(g.traffic)}
            for g in config.gateways
        ],
        "chains": len(rs.chains),
        "kernel_rules": sum(len(c.rules) for c in rs.chains),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{config_path}: ok")
    for name, ifs in summary["zones"].items():
        click.echo(f"  zone {name}: {', '.join(ifs)}")
    p = summary["policy"]
    click.echo(f"  policy: input {p['input']}, forward {p['forward']}, output {p['output']}")
    click.echo(
        f"  {summary['rules']} rules, {summary['port_forwards']} port forwards, "
        f"masquerade on {', '.join(summary['masquerade']) or 'none'}"
    )
    for g in summary["gateways"]:
        click.echo(f"  gateway {g['name']} ({g['kind']}), port {g['listen_port']}, {g['selectors']} selectors")
    if config.gateways:
        click.echo(f"  processor: queues {summary['queues']}, fail {summary['fail_mode']}")
    click.echo(f"  renders to {summary['kernel_rules']} rules in {summary['chains']} chains")


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
def rules(config_path: str, fmt: str) -> None:
    """Print the ruleset nfgate would install, for review.

    The nft text replaces nfgate's table atomically when loaded with nft -f;
    the iptables text is for iptables-restore --noflush on a router that has
    no nfgate chains yet (nfgate apply handles re-applying).

    \b
    Examples:
      nfgate rules -c examples/home.toml
      nfgate rules -c examples/mail.toml --format iptables > mail.rules
    """
    rs = build(load(config_path))
    if fmt == "nft":
        click.echo(nft.render(rs), nl=False)
    else:
        click.echo(iptables.render(rs, 4 if fmt == "iptables" else 6), nl=False)


@main.command()
@config_option
@backend_option
@click.option("--dry-run", is_flag=True, help="Show what would be loaded; change nothing.")
def apply(config_path: str, backend: str, dry_run: bool) -> None:
    """Install the ruleset atomically, replacing nfgate's previous one.

    On a refusal the previous ruleset stays in place and the kernel's message
    is printed. Rules that nfgate did not install are never touched.

    \b
    Examples:
      sudo nfgate apply
      sudo nfgate apply --backend iptables --dry-run
      sudo ip netns exec router nfgate apply -c lab.toml
    """
    if not dry_run:
        require_root("apply")
    rs = build(load(config_path))
    choice = be.choose(backend, rs)
    click.echo(f"backend: {choice.backend} ({choice.reason})")
    report = be.apply(rs, choice.backend, dry_run=dry_run)
    for line in report.actions:
        click.echo(line)


@main.command()
@config_option
@click.argument("gateway")
def manifest(config_path: str, gateway: str) -> None:
    """Print the manifest nfgate run gives gateway GATEWAY (docs/manifest.md).

    A gateway process reads only its manifest. To run one by hand, in the
    gateway namespace:

    \b
      nfgate manifest -c /etc/nfgate/nfgate.toml nas-log > /run/nfgate/gateway-nas-log.json
      ip netns exec nfgate-gw python -m gateways --manifest /run/nfgate/gateway-nas-log.json
    """
    config = load(config_path)
    for gw in config.gateways:
        if gw.name == gateway:
            click.echo(manifests.manifest_for(config, gw).to_json(), nl=False)
            return
    known = ", ".join(g.name for g in config.gateways) or "none"
    raise UsageError(f"no gateway named {gateway!r} in {config_path} (configured: {known})")


@main.command()
def flush() -> None:
    """Remove everything nfgate installed, and nothing else.

    Finds nfgate's objects by name in every backend (table inet nfgate, chains
    NFGATE-* and the jumps to them), so it needs no config.

    \b
    Examples:
      sudo nfgate flush
      sudo ip netns exec router nfgate flush
    """
    require_root("flush")
    for line in be.flush():
        click.echo(line)


@main.command()
@config_option
@backend_option
def run(config_path: str, backend: str) -> None:
    """Run the firewall in the foreground: rules, processors, gateways.

    Creates the gateway namespace and its blind-track link, applies the
    rules, starts one packet processor per queue and one process per
    gateway, and restarts any that dies. SIGTERM or Ctrl-C stops them all
    and removes everything nfgate installed. scripts/nfgate.service runs it
    under systemd.

    \b
    Examples:
      sudo nfgate run
      sudo nfgate run -c /etc/nfgate/office.toml --backend iptables
    """
    require_root("run")
    Supervisor(load(config_path), config_path, backend).run()


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def status(config_path: str, as_json: bool) -> None:
    """Show the running firewall: processes, flows, pools, counters.

    Reads the supervisor's root-only control socket (supervisor.control_socket).

    \b
    Examples:
      sudo nfgate status
      sudo nfgate status --json | jq .processors
    """
    require_root("status")
    data = query(load(config_path), "status")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"backend: {data.get('backend')}")
    click.echo(f"{'process':<24} {'pid':>7} {'state':<11} {'restarts':>8} {'uptime':>9}")
    for p in data.get("processes", []):
        pid = p["pid"] if p["pid"] is not None else "-"
        click.echo(f"{p['name']:<24} {pid:>7} {p['state']:<11} {p['restarts']:>8} {p['uptime']:>8.1f}s")
    for name, stats in sorted(data.get("processors", {}).items()):
        click.echo(f"{name}:")
        for key, value in _flatten(stats):
            click.echo(f"  {key} = {value}")


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for key in sorted(obj):
            yield from _flatten(obj[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, obj


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the bindings as JSON.")
def flows(config_path: str, as_json: bool) -> None:
    """List the live gateway flows with their original and translated tuples.

    \b
    Examples:
      sudo nfgate flows
      sudo nfgate flows --json
    """
    require_root("flows")
    data = query(load(config_path), "flows")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("no gateway flows")
        return
    for flow in data:
        click.echo(" ".join(f"{k}={v}" for k, v in flow.items()))


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
main.add_command(tunnel)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
