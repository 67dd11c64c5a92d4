"""The FTP core's vocabulary: what goes in (``Parties``, ``Policy``) and what comes out (the outputs).

``FtpControl`` (``core``) is a sans-IO state machine; these are the plain
values it is built from and the commands it hands its adapter (``gateway``),
which carries them out in order:

- ``ToClient`` / ``ToServer``: bytes for a peer;
- ``RequestRule``: ask the processor for a dynamic rule for one data
  connection; its answer goes back in through ``FtpControl.rule_answered``;
- ``Opaque``: AUTH TLS succeeded; from now on relay bytes unchanged;
- ``Close``: close both connections (after sending what came before);
- ``Event``: something to count and log (a refusal, a rule).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Union

from firewall.signalling import Endpoint, RuleMode
from gateways.ftp.commands import allowed_commands
from gateways.ftp.kind import FtpSettings
from gateways.session import Close, Event


class DataChannel(enum.Enum):
    """How data connections cross the router (``data_channel`` setting)."""

    ALLOW = "allow"  # the kernel carries it (translated where the peer was told the router's address): full speed
    INSPECT = "inspect"  # always through the gateway: size limit and content hook


class DataMode(enum.Enum):
    """Which mode the server side of a data connection uses (``data_mode`` setting)."""

    KEEP = "keep"  # the client's choice, passed on
    ACTIVE = "active"  # a client's PASV/EPSV goes to the server as PORT; the gateway joins the two connections
    PASSIVE = "passive"  # a client's PORT/EPRT goes to the server as PASV; the gateway opens and joins the two


class Direction(enum.Enum):
    PASSIVE = "passive"  # the client connects to the server (PASV, EPSV)
    ACTIVE = "active"  # the server connects to the client (PORT, EPRT)


@dataclass(frozen=True)
class Parties:
    """Who is who in one control session, from signalling (never from the protocol)."""

    client: ipaddress.IPv4Address  # C, the client's real address
    server: ipaddress.IPv4Address  # S, the server's real address
    client_addressed: ipaddress.IPv4Address  # S', what the client connected to
    client_seen_as: ipaddress.IPv4Address | None  # C, or the router's SNAT address W; None: unknown


_DEFAULTS = FtpSettings()


@dataclass(frozen=True)
class Policy:
    """The core's settings: ``Policy.of`` an ``FtpSettings`` (``[gateway.settings]``);
    ``Policy()`` is what the default settings give."""

    data_channel: DataChannel = DataChannel(_DEFAULTS.data_channel)
    data_mode: DataMode = DataMode(_DEFAULTS.data_mode)
    translated_ports: tuple[int, int] = (_DEFAULTS.translated_ports.first, _DEFAULTS.translated_ports.last)
    auth_tls: bool = _DEFAULTS.auth_tls == "allow"  # False: AUTH is refused (534) and hidden from FEAT
    allowed: frozenset[str] = field(default_factory=allowed_commands)
    max_line_length: int = _DEFAULTS.max_line_length
    max_username_length: int = _DEFAULTS.max_username_length
    max_password_length: int = _DEFAULTS.max_password_length
    max_bad_commands: int = _DEFAULTS.max_bad_commands
    max_login_failures: int = _DEFAULTS.max_login_failures
    mask_private_addresses: bool = _DEFAULTS.mask_private_addresses

    @classmethod
    def of(cls, settings: FtpSettings) -> "Policy":
        return cls(
            data_channel=DataChannel(settings.data_channel),
            data_mode=DataMode(settings.data_mode),
            translated_ports=(settings.translated_ports.first, settings.translated_ports.last),
            auth_tls=settings.auth_tls == "allow",
            allowed=allowed_commands(settings.allow_commands, settings.deny_commands),
            max_line_length=settings.max_line_length,
            max_username_length=settings.max_username_length,
            max_password_length=settings.max_password_length,
            max_bad_commands=settings.max_bad_commands,
            max_login_failures=settings.max_login_failures,
            mask_private_addresses=settings.mask_private_addresses,
        )


# ---- outputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToClient:
    data: bytes


@dataclass(frozen=True)
class ToServer:
    data: bytes


@dataclass(frozen=True)
class RequestRule:
    """Ask for one data connection src -> dst; answer with ``rule_answered(token, granted)``.

    ``mode`` ALLOW: the kernel carries it. REDIRECT: it comes into the
    gateway (as a connection from src to dst), which relays it, and
    inspects it when ``inspect`` is set.
    """

    token: int
    direction: Direction
    src: Endpoint  # port 0: any
    dst: Endpoint  # also what the connecting peer is told (the PORT or 227 address and port)
    mode: RuleMode
    inspect: bool
    replaces: bool = True  # ends the session's earlier rules (RULE_END SUPERSEDED): only the latest may exist
    pair: int = 0  # a translated data connection's two rules share it: the gateway joins their connections


@dataclass(frozen=True)
class Opaque:
    """AUTH succeeded: relay bytes unchanged from now on, starting with these."""

    to_server: bytes
    to_client: bytes


Output = Union[ToClient, ToServer, RequestRule, Opaque, Close, Event]
