"""The operator's interface to a running control server: a root-only unix socket.

The seed's technician works on the public side: the server "sends open,
redirect and close port requests to the mediation system 2" on their behalf
(seed, "1. Open, redirect, and close port requests"). ``nfgate tunnel list |
open | redirect | connect | listen | close | publish | unpublish`` send one
JSON request per connection to this socket and print the one JSON answer.

Who may ask: the socket is created mode 0600 (umask set before ``bind``, so
there is no window), and each peer's credentials (SO_PEERCRED) are checked
again -- root, or the user the server runs as. Publishing a private service
on a public port is exactly what an attacker on the server host would want.

Commands are data (STYLE.md, after pyftpdlib's proto_cmds): each names its
arguments and their converters; one generic check runs before the handler,
and an unknown command or argument is refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel.events import EventLog
from tunnel.frames import Proto
from tunnel.publish import PublishSpec
from tunnel.server import OperatorError, TunnelServer

REQUEST_MAX = 65536  # one JSON line; the longest real request is a few hundred bytes
READ_TIMEOUT = 5.0  # a client that connects and says nothing is dropped
CLIENT_TIMEOUT = 60.0  # the CLI's wait: longer than any request_timeout a server uses


class _Bad(Exception):
    """A malformed request (the client's mistake)."""


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"{name} must be a non-empty string")
    return value


def _port(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise _Bad(f"{name} must be a port number ({low} to 65535)")
    return value


def _port_or_zero(value: Any, name: str) -> int:
    return _port(value, name, 0)


def _port_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise _Bad(f"{name} must be a port id (a positive integer)")
    return value


def _address(value: Any, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(_text(value, name))
    except ValueError:
        raise _Bad(f"{name}: {value!r} is not an IP address") from None


def _proto(value: Any, name: str) -> Proto:
    if value not in ("tcp", "udp"):
        raise _Bad(f"{name} must be 'tcp' or 'udp'")
    return Proto[value.upper()]


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{name} must be true or false")
    return value


Converter = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Command:
    args: dict[str, Converter]
    optional: dict[str, Any]
    run: Callable[[TunnelServer, dict[str, Any]], Awaitable[Any]]
    help: str


async def _list(server: TunnelServer, a: dict[str, Any]) -> Any:
    return server.describe()


COMMANDS: dict[str, Command] = {
    "list": Command({}, {}, _list, "mediators, sessions, ports and publications"),
    "open": Command(
        {"mediator": _text, "proto": _proto, "address": _address, "port": _port_or_zero},
        {"mandatory": False},
        lambda s, a: s.op_open(a["mediator"], a["proto"], a["address"], a["port"], a["mandatory"]),
        "OPEN_PORT on the mediator",
    ),
    "redirect": Command(
        {"mediator": _text, "address": _address, "port": _port_or_zero},
        {"mandatory": False},
        lambda s, a: s.op_redirect(a["mediator"], a["address"], a["port"], a["mandatory"]),
        "REDIRECT_PORT on the mediator",
    ),
    "connect": Command(
        {"mediator": _text, "port_id": _port_id, "address": _address, "port": _port},
        {},
        lambda s, a: s.op_connect(a["mediator"], a["port_id"], a["address"], a["port"]),
        "CONNECT an opened TCP port",
    ),
    "listen": Command(
        {"mediator": _text, "port_id": _port_id}, {},
        lambda s, a: s.op_listen(a["mediator"], a["port_id"]),
        "LISTEN on an opened TCP port",
    ),
    "close": Command(
        {"mediator": _text, "port_id": _port_id}, {},
        lambda s, a: s.op_close(a["mediator"], a["port_id"]),
        "CLOSE a port",
    ),
    "publish": Command(
        {"mediator": _text, "proto": _proto, "public": _port, "address": _address, "port": _port},
        {},
        lambda s, a: s.publish(PublishSpec(a["mediator"], a["proto"], a["public"], a["address"], a["port"])),
        "relay a public port to a private target",
    ),
    "unpublish": Command(
        {"mediator": _text, "proto": _proto, "public": _port}, {},
        lambda s, a: s.unpublish(a["mediator"], a["proto"], a["public"]),
        "stop a publication",
    ),
}
_OPTIONAL_CONVERTERS: dict[str, Converter] = {"mandatory": _flag}


def parse_request(request: Any) -> tuple[Command, dict[str, Any]]:
    """The command and its converted arguments; ``_Bad`` says what is wrong."""
    if not isinstance(request, dict):
        raise _Bad("a request is a JSON object")
    name = request.get("cmd")
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        raise _Bad(f"unknown command {name!r} (one of {', '.join(COMMANDS)})")
    known = {"cmd", *command.args, *command.optional}
    extra = sorted(set(request) - known)
    if extra:
        raise _Bad(f"{name}: unknown argument {extra[0]!r}")
    args: dict[str, Any] = {}
    for key, convert in command.args.items():
        if key not in request:
            raise _Bad(f"{name}: missing argument {key!r}")
        args[key] = convert(request[key], key)
    for key, default in command.optional.items():
        args[key] = _OPTIONAL_CONVERTERS[key](request[key], key) if key in request else default
    return command, args


class ControlSocket:
    """Serves the operator's requests on a root-only unix socket."""

    def __init__(self, server: TunnelServer, path: Path, log: EventLog | None = None) -> None:
        self.server = server
        self.path = path
        self.log = log or server.log
        self._unix: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()
        old = os.umask(0o177)  # mode 0600 from the first instant, not after a chmod
        try:
            self._unix = await asyncio.start_unix_server(self._serve, str(self.path), limit=REQUEST_MAX)
        finally:
            os.umask(old)

    def close(self) -> None:
        if self._unix is not None:
            self._unix.close()
            self._unix = None
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        sock = writer.get_extra_info("socket")
        uid = _peer_uid(sock) if sock is not None else None
        if uid not in (0, os.geteuid()):
            self.log.warn("control_refused", uid=uid)
            return {"ok": False, "error": "the tunnel control socket is root-only"}
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            command, args = parse_request(json.loads(line or b"null"))
        except (ValueError, asyncio.LimitOverrunError) as err:
            return {"ok": False, "error": f"bad request: {err}"}
        except TimeoutError:
            return {"ok": False, "error": "bad request: nothing sent"}
        except _Bad as err:
            return {"ok": False, "error": str(err)}
        try:
            result = await command.run(self.server, args)
        except OperatorError as err:
            return {"ok": False, "error": str(err), "code": err.code}
        return {"ok": True, "result": result}


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


class ControlError(Exception):
    """The server answered with an error (``code`` is the protocol's, if any)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def ask(path: Path, request: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> Any:
    """Send one request to the control socket; the result, or ``ControlError``.

    Raises FileNotFoundError / PermissionError / ConnectionRefusedError as
    they come, for the CLI to turn into one line.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"null")
    if not isinstance(answer, dict):
        raise ControlError("the server's answer is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "unknown error")), str(answer.get("code") or ""))
    return answer.get("result")
