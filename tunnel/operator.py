"""The operator's interface to a running control server: its commands on a root-only unix socket.

The seed's technician works on the public side: the server "sends open,
redirect and close port requests to the mediation system 2" on their behalf
(seed, "1. Open, redirect, and close port requests"). ``nfgate tunnel list |
open | redirect | connect | listen | close | publish | unpublish`` send one
JSON request per connection to this socket and print the one JSON answer.

The socket, its wire format and who may ask (root, or the user the server
runs as: publishing a private service on a public port is exactly what an
attacker on the server host would want) are nfgate's one control socket,
``firewall.control``. This module is the tunnel's table of commands: each
names its arguments and their converters (pydantic types, strictly
validated, each refusal one line naming the argument); one generic check
runs before the handler, and an unknown command or argument is refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError

from firewall.control import BadRequest, Command, ControlServer, Converter, flag, text
from tunnel.events import EventLog
from tunnel.frames import Proto
from tunnel.publish import PublishSpec
from tunnel.server import TunnelServer


def _checked(kind: Any, reason: str) -> Converter:
    """A converter that validates with pydantic (strictly: no string is a
    port, no boolean a number) and refuses with ``reason``, formatted with the
    argument's ``name`` and ``value``."""
    adapter = TypeAdapter(kind)

    def convert(value: Any, name: str) -> Any:
        try:
            return adapter.validate_python(value, strict=True)
        except ValidationError:
            raise BadRequest(reason.format(name=name, value=value)) from None

    return convert


_port = _checked(Annotated[int, Field(ge=1, le=65535)], "{name} must be a port number (1 to 65535)")
_port_or_zero = _checked(Annotated[int, Field(ge=0, le=65535)], "{name} must be a port number (0 to 65535)")
_port_id = _checked(Annotated[int, Field(gt=0, lt=2**32)], "{name} must be a port id (a positive integer)")
_proto_name = _checked(Literal["tcp", "udp"], "{name} must be 'tcp' or 'udp'")
_ip = _checked(Annotated[str, AfterValidator(ipaddress.ip_address)], "{name}: {value!r} is not an IP address")


def _address(value: Any, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address; an IPv4-mapped IPv6 one (``::ffff:10.0.0.1``) is that IPv4
    host, which the mediator reaches from its IPv4 address (STYLE.md: values,
    not strings)."""
    address = _ip(text(value, name), name)
    return address.ipv4_mapped or address if address.version == 6 else address


def _proto(value: Any, name: str) -> Proto:
    return Proto[_proto_name(value, name).upper()]


MANDATORY = {"mandatory": (flag, False)}

COMMANDS: dict[str, Command[TunnelServer]] = {
    "list": Command(lambda s, a: s.describe(), help="mediators, sessions, ports and publications"),
    "open": Command(
        lambda s, a: s.op_open(a["mediator"], a["proto"], a["address"], a["port"], a["mandatory"]),
        {"mediator": text, "proto": _proto, "address": _address, "port": _port_or_zero},
        MANDATORY,
        "OPEN_PORT on the mediator",
    ),
    "redirect": Command(
        lambda s, a: s.op_redirect(a["mediator"], a["address"], a["port"], a["mandatory"]),
        {"mediator": text, "address": _address, "port": _port_or_zero},
        MANDATORY,
        "REDIRECT_PORT on the mediator",
    ),
    "connect": Command(
        lambda s, a: s.op_connect(a["mediator"], a["port_id"], a["address"], a["port"]),
        {"mediator": text, "port_id": _port_id, "address": _address, "port": _port},
        help="CONNECT an opened TCP port",
    ),
    "listen": Command(
        lambda s, a: s.op_listen(a["mediator"], a["port_id"]),
        {"mediator": text, "port_id": _port_id},
        help="LISTEN on an opened TCP port",
    ),
    "close": Command(
        lambda s, a: s.op_close(a["mediator"], a["port_id"]),
        {"mediator": text, "port_id": _port_id},
        help="CLOSE a port",
    ),
    "publish": Command(
        lambda s, a: s.publish(PublishSpec(a["mediator"], a["proto"], a["public"], a["address"], a["port"])),
        {"mediator": text, "proto": _proto, "public": _port, "address": _address, "port": _port},
        help="relay a public port to a private target",
    ),
    "unpublish": Command(
        lambda s, a: s.unpublish(a["mediator"], a["proto"], a["public"]),
        {"mediator": text, "proto": _proto, "public": _port},
        help="stop a publication",
    ),
}


class ControlSocket:
    """The tunnel's commands on nfgate's control socket, served on the running asyncio loop."""

    def __init__(self, server: TunnelServer, path: Path, log: EventLog | None = None) -> None:
        self.server = server
        self.path = path
        self.log = log or server.log
        self.control = ControlServer(path, COMMANDS, server, warn=self.log.warn)

    async def start(self) -> None:
        """Bind the socket (OSError as it comes) and serve."""
        self.control.open()
        self.control.attach(asyncio.get_running_loop())

    def close(self) -> None:
        self.control.close()
