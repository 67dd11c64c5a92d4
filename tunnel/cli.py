"""``nfgate tunnel``: run the tunnel's roles, make its keys, and operate it.

``nfgate``'s command line (firewall/cli.py, the one place that hosts every
group) adds this group as ``nfgate tunnel``; ``python -m tunnel.cli ...``
runs it on its own.

Exit codes as for ``nfgate``: 0 ok, 1 runtime failure (the mediator or the
kernel refused, a missing privilege), 2 usage or config error. Errors are
one line each (a config error lists each problem on its own line), never a
traceback (DESIGN.md invariant 10).
"""

from __future__ import annotations

import ipaddress
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from firewall.control import ControlError, ask
from firewall.errors import EXIT_USAGE, KernelError, NfgateError, PrivilegeError, UsageError, require_root
from firewall.jsondoc import echo_json, json_errors
from tunnel.config import load_mediator, load_server
from tunnel.events import configure
from tunnel.keygen import write_identity
from tunnel.mediator import run_mediator
from tunnel.service import parse_endpoint, run_server
from tunnel.tls import file_pin
from tunnel.wire import endpoint_text

DEFAULT_SOCKET = "/run/nfgate/tunnel.sock"
SOCKET_ENV = "NFGATE_TUNNEL_SOCKET"
TOKEN_BYTES = 32  # 256 bits, printed URL-safe (43 characters)
ASK_TIMEOUT = 60.0  # seconds to wait for an answer: longer than any request_timeout a server uses


class _TunnelGroup(click.Group):
    """One line on stderr and the error's exit code, as ``nfgate`` itself does."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NfgateError as err:
            click.echo(f"nfgate: {err}", err=True)
            ctx.exit(err.exit_code)


@click.group("tunnel", cls=_TunnelGroup, context_settings={"help_option_names": ["-h", "--help"]})
def tunnel() -> None:
    """The NAT-traversal tunnel: mediator, control server, operator commands.

    A mediator inside a private network keeps a TLS channel to the control
    server's service port; the server's operator then opens, connects and
    publishes private ports through it.

    \b
    Examples:
      nfgate tunnel keygen
      nfgate tunnel server --config /etc/nfgate/tunnel-server.toml
      nfgate tunnel mediator --config /etc/nfgate/tunnel-mediator.toml
      nfgate tunnel publish help-desk-1 --to 192.168.1.10:80 --public 8080
    """


log_json_option = click.option("--log-json", is_flag=True, help="Log one JSON object per line.")


@tunnel.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The server TOML.")
@log_json_option
def server(config_path: str, log_json: bool) -> None:
    """Run the control server in the foreground (standalone).

    Listens on the service port (TLS over TCP, and UDP for the channels) and
    on a root-only control socket for the commands below. SIGTERM or Ctrl-C
    stops it; SIGUSR1 logs its counters.

    \b
    Examples:
      sudo nfgate tunnel server --config /etc/nfgate/tunnel-server.toml
      sudo nfgate tunnel server -c server.toml --log-json
    """
    configure(log_json)
    run_server(load_server(config_path))


@tunnel.command()
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The mediator TOML."
)
@log_json_option
def mediator(config_path: str, log_json: bool) -> None:
    """Run the mediation system in the foreground.

    Connects to the server, checks its certificate against the pin, and
    serves it within the [[allow]] rules; reconnects by itself, with backoff.

    \b
    Examples:
      sudo nfgate tunnel mediator --config /etc/nfgate/tunnel-mediator.toml
    """
    configure(log_json)
    run_mediator(load_mediator(config_path))


@tunnel.command()
@click.option("--cert", default="/etc/nfgate/tunnel/server.crt", show_default=True, type=click.Path(dir_okay=False))
@click.option("--key", default="/etc/nfgate/tunnel/server.key", show_default=True, type=click.Path(dir_okay=False))
@click.option("--name", default="nfgate-tunnel", show_default=True, help="The certificate's common name.")
@click.option("--days", default=3650, show_default=True, type=int, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace existing files (every mediator must be re-pinned).")
def keygen(cert: str, key: str, name: str, days: int, force: bool) -> None:
    """Make the server's key and self-signed certificate; print the pin.

    Put the printed pin in each mediator's config as server_pin. The same
    command makes a mediator's optional client certificate.

    \b
    Examples:
      sudo nfgate tunnel keygen
      nfgate tunnel keygen --cert m1.crt --key m1.key --name help-desk-1
    """
    click.echo(write_identity(Path(cert), Path(key), name, days, force))


@tunnel.command()
@click.argument("cert", type=click.Path(dir_okay=False))
def pin(cert: str) -> None:
    """Print the pin (sha256:...) of a certificate.

    \b
    Example:
      nfgate tunnel pin /etc/nfgate/tunnel/server.crt
    """
    click.echo(file_pin(Path(cert)))


@tunnel.command()
def token() -> None:
    """Print a new random mediator token (256 bits).

    \b
    Example:
      nfgate tunnel token > /etc/nfgate/tunnel/token && chmod 600 /etc/nfgate/tunnel/token
    """
    click.echo(secrets.token_urlsafe(TOKEN_BYTES))


# -- operator commands ---------------------------------------------------------------------

socket_option = click.option(
    "--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, envvar=SOCKET_ENV,
    type=click.Path(dir_okay=False), help=f"The server's control socket (or ${SOCKET_ENV}).",
)


def json_option(command: Any) -> Any:
    """``--json``: the answer, or the failure, as one JSON document (firewall/jsondoc.py)."""
    return click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")(json_errors(command))


def _ask(socket_path: str, request: dict[str, Any]) -> Any:
    require_root(f"tunnel {request['cmd']}")
    path = Path(socket_path)
    try:
        return ask(path, request, ASK_TIMEOUT)
    except FileNotFoundError:
        raise KernelError(f"no tunnel server is running here (no control socket {path})") from None
    except ConnectionRefusedError:
        raise KernelError(f"the tunnel server is not answering on {path} (stale socket?)") from None
    except PermissionError:
        raise PrivilegeError(f"{path}: permission denied (the control socket is root-only)") from None
    except ControlError as err:
        raise KernelError(f"{request['cmd']}: {err}") from None
    except (OSError, ValueError) as err:
        raise KernelError(f"cannot talk to the tunnel server on {path}: {err}") from None


def _endpoint(text: str) -> tuple[str, int]:
    address, port = parse_endpoint(text)
    return str(address), port


def _shown(address: str, port: int) -> str:
    return endpoint_text(ipaddress.ip_address(address), port)


def _print(result: Any, as_json: bool, text: str) -> None:
    if as_json:
        echo_json(result)
    else:
        click.echo(text)


@tunnel.command("list")
@socket_option
@json_option
def list_cmd(socket_path: str, as_json: bool) -> None:
    """Show mediators (state, session, ports, counters) and publications.

    \b
    Examples:
      sudo nfgate tunnel list
      sudo nfgate tunnel list --json | jq '.mediators[].counters'
    """
    data = _ask(socket_path, {"cmd": "list"})
    if as_json:
        echo_json(data)
        return
    click.echo(f"service {data['service']}, {data['channels']} channels, up {data['uptime']:.0f} s")
    frontend = data.get("frontend")
    if frontend:  # the tunnel gateway kind under nfgate run
        counted = ", ".join(f"{k} {v}" for k, v in frontend["counters"].items()) or "nothing refused"
        click.echo(f"gateway {frontend['gateway']}: steered flows arrive at {frontend['listen']}; {counted}")
    for m in data["mediators"]:
        session = m["session"]
        where = f"session {session['session']} from {session['peer']}" if session else "-"
        grown = session.get("windows", {}) if session else {}
        windows = f", windows grown {grown['grown']} ({grown['grown_bytes'] >> 10} KiB held)" if grown.get("grown") else ""
        click.echo(f"mediator {m['identity']}: {m['state']}, {where}, connects {m['connects']}{windows}")
        for port in session["ports"] if session else []:
            channel = f" channel {port['channel']}" if "channel" in port else ""
            click.echo(f"  port {port['id']}: {port['proto']} {port['state']} ({port['owner']}){channel}")
    if not data["published"]:
        click.echo("nothing published")
    for p in data["published"]:
        click.echo(
            f"published {p['proto']} {p['public']} -> {p['mediator']} {p['to']}: {p['state']}, active {p['active']}"
        )


@tunnel.command("open")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.argument("where", metavar="ADDRESS:PORT")
@click.option("--udp", is_flag=True, help="A UDP port (default TCP).")
@click.option("--mandatory", is_flag=True, help="That port or an error (default: the first free one from it up).")
@socket_option
@json_option
def open_cmd(mediator_id: str, where: str, udp: bool, mandatory: bool, socket_path: str, as_json: bool) -> None:
    """Ask the mediator to open a port on one of its addresses (port 0: any).

    \b
    Examples:
      sudo nfgate tunnel open help-desk-1 192.168.1.2:0
      sudo nfgate tunnel open help-desk-1 192.168.1.2:8080 --mandatory
    """
    address, port = _endpoint(where)
    request = {"cmd": "open", "mediator": mediator_id, "proto": "udp" if udp else "tcp",
               "address": address, "port": port, "mandatory": mandatory}
    result = _ask(socket_path, request)
    _print(result, as_json, f"port id {result['port_id']}: {_shown(address, result['port'])}")


@tunnel.command("redirect")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.argument("where", metavar="ADDRESS:PORT")
@click.option("--mandatory", is_flag=True, help="That port or an error.")
@socket_option
@json_option
def redirect_cmd(mediator_id: str, where: str, mandatory: bool, socket_path: str, as_json: bool) -> None:
    """Ask the mediator to redirect a UDP port over a UDP channel.

    \b
    Example:
      sudo nfgate tunnel redirect help-desk-1 192.168.1.2:5060 --mandatory
    """
    address, port = _endpoint(where)
    request = {"cmd": "redirect", "mediator": mediator_id, "address": address, "port": port, "mandatory": mandatory}
    result = _ask(socket_path, request)
    _print(result, as_json, f"port id {result['port_id']}: {_shown(address, result['port'])} (udp, redirected)")


@tunnel.command("connect")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.argument("port_id", type=click.IntRange(1, 2**32 - 1))
@click.argument("target", metavar="ADDRESS:PORT")
@socket_option
@json_option
def connect_cmd(mediator_id: str, port_id: int, target: str, socket_path: str, as_json: bool) -> None:
    """Connect an opened TCP port to a private host (the owner's allow-list decides).

    \b
    Example:
      sudo nfgate tunnel connect help-desk-1 3 192.168.1.10:80
    """
    address, port = _endpoint(target)
    result = _ask(socket_path, {"cmd": "connect", "mediator": mediator_id, "port_id": port_id,
                                "address": address, "port": port})
    _print(result, as_json, f"port id {port_id}: connected to {_shown(address, port)}")


@tunnel.command("listen")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.argument("port_id", type=click.IntRange(1, 2**32 - 1))
@socket_option
@json_option
def listen_cmd(mediator_id: str, port_id: int, socket_path: str, as_json: bool) -> None:
    """Make an opened TCP port a server port (seed: "make server port").

    \b
    Example:
      sudo nfgate tunnel listen help-desk-1 3
    """
    result = _ask(socket_path, {"cmd": "listen", "mediator": mediator_id, "port_id": port_id})
    _print(result, as_json, f"port id {port_id}: listening")


@tunnel.command("close")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.argument("port_id", type=click.IntRange(1, 2**32 - 1))
@socket_option
@json_option
def close_cmd(mediator_id: str, port_id: int, socket_path: str, as_json: bool) -> None:
    """Close a port or connection on the mediator.

    \b
    Example:
      sudo nfgate tunnel close help-desk-1 3
    """
    result = _ask(socket_path, {"cmd": "close", "mediator": mediator_id, "port_id": port_id})
    _print(result, as_json, f"port id {port_id}: closed")


@tunnel.command("publish")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.option("--to", "target", required=True, metavar="ADDRESS:PORT", help="The private service.")
@click.option("--public", "public", required=True, type=click.IntRange(1, 65535), help="The server's public port.")
@click.option("--udp", is_flag=True, help="Relay UDP datagrams (over the UDP channel) instead of TCP.")
@socket_option
@json_option
def publish_cmd(mediator_id: str, target: str, public: int, udp: bool, socket_path: str, as_json: bool) -> None:
    """Serve a private service on a public port of the server, through the tunnel.

    The port must be in the mediator's publish_ports, and the target within
    the mediator owner's [[allow]] rules. It stays published across the
    mediator's reconnects.

    \b
    Examples:
      sudo nfgate tunnel publish help-desk-1 --to 192.168.1.10:80 --public 8080
      sudo nfgate tunnel publish help-desk-1 --to 192.168.1.20:5060 --public 5060 --udp
    """
    address, port = _endpoint(target)
    if port == 0:
        raise UsageError(f"--to {target}: the target needs a port")
    result = _ask(socket_path, {"cmd": "publish", "mediator": mediator_id, "proto": "udp" if udp else "tcp",
                                "public": public, "address": address, "port": port})
    _print(result, as_json, f"published {result['proto']} {public} -> {mediator_id} {result['to']}")


@tunnel.command("unpublish")
@click.argument("mediator_id", metavar="MEDIATOR")
@click.option("--public", "public", required=True, type=click.IntRange(1, 65535), help="The public port.")
@click.option("--udp", is_flag=True, help="The UDP publication of that port.")
@socket_option
@json_option
def unpublish_cmd(mediator_id: str, public: int, udp: bool, socket_path: str, as_json: bool) -> None:
    """Stop a publication; its live connections are reset.

    \b
    Example:
      sudo nfgate tunnel unpublish help-desk-1 --public 8080
    """
    result = _ask(socket_path, {"cmd": "unpublish", "mediator": mediator_id, "proto": "udp" if udp else "tcp",
                                "public": public})
    _print(result, as_json, f"unpublished {result['proto']} {public}")


def main() -> int:
    """``python -m tunnel.cli``: the group on its own, with nfgate's exit codes."""
    try:
        tunnel.main(prog_name="nfgate tunnel", standalone_mode=True)
    except SystemExit as exit_:
        return int(exit_.code or 0) if isinstance(exit_.code, int) else EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
