"""``nfgate ha``: the router pair's files and state (docs/ha.md).

A thin layer over ``firewall.ha``; ``firewall.cli`` adds the group.
"""

from __future__ import annotations

from pathlib import Path

import click

from firewall import ha
from firewall.config import load
from firewall.jsondoc import echo_json, json_errors

DEFAULT_CONFIG = "/etc/nfgate/nfgate.toml"

config_option = click.option(
    "-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The nfgate TOML config.",
)


@click.group("ha")
def ha_group() -> None:
    """The HA router pair: keepalived (VRRP) and conntrackd, from [ha].

    \b
    Example:
      nfgate ha render                       # both nodes' files into ha.config_dir/NODE/
      nfgate ha render --out ./ha-files      # elsewhere, to copy to the nodes
      nfgate ha state --node r1
    """


@ha_group.command("render")
@config_option
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write into OUT/NODE/ instead of ha.config_dir/NODE/.")
def render_cmd(config_path: str, out: Path | None) -> None:
    """Write keepalived.conf, conntrackd.conf and notify.sh for both nodes.

    Each node's files name the other as its peer; the daemons' sockets,
    locks, logs and pid files are named by node under ha.run_dir. `nfgate
    run` starts both daemons from these files on the node whose sync
    address the host holds.
    """
    config = load(config_path)
    for path in ha.write(config, out.resolve() if out else None):
        click.echo(str(path))


@ha_group.command("state")
@config_option
@click.option("--node", required=True, help="The node, a key of [ha.nodes].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {schema_version, node, vrrp, since, last_failover, transitions}.")
@json_errors
def state_cmd(config_path: str, node: str, as_json: bool) -> None:
    """Show a node's VRRP state as its notify script last recorded it."""
    config = load(config_path)
    st = ha.read_state(config, node)
    if as_json:
        echo_json(st)
        return
    click.echo(f"{node}: {st['vrrp']} (since {ha.age(st['since'])}), last became primary {ha.age(st['last_failover'])}")
