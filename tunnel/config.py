"""The standalone TOML files of the tunnel: server, mediators, mediator.

``nfgate tunnel server --config FILE`` and ``nfgate tunnel mediator --config
FILE`` read these; docs/tunnel-protocol.md section 16 is their reference.
Each file is validated by pydantic models with nfgate's shared field types
(``firewall.fields``), so every problem is reported at once with its key path
and line, and an unknown key is an error (a misspelt ``keepalive_interval``
silently falling back to its default is how a NAT mapping ends up timing
out). What the cores take stays the dataclasses below; the models' defaults
are theirs.

Secrets (tokens) live in files that only root can read: the mediators file on
the server, and ``token_file`` (or the config itself, for an inline token) on
the mediator. A token someone else can read lets them become that mediator.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from firewall.errors import UsageError
from firewall.fields import (
    AbsPath, Address, Bool, Choice, Frozen, Int, ListOf, Network, Number, PortRange, Ports,
    String, Tables, absolute_path, fail, interface, ordered, port_range, report, typed,
)
from firewall.problems import ConfigError, Problem, kind_of, located, parse_toml, validate
from tunnel.aio import CHANNEL_UNSENT, UDP_BUFFER
from tunnel.frames import MIN_MAX_FRAME_SIZE, IPAddress, IPInterface, Proto
from tunnel.pacing import BackoffSettings
from tunnel.policy import Op, Rule
from tunnel.settings import EventLoop, MediatorLimits, MediatorSettings, ServerSettings
from tunnel.window import MAX_STREAM_WINDOW, STREAM_WINDOW
from tunnel.tls import parse_pin

TUNNEL_DIR = Path("/etc/nfgate/tunnel")
DEFAULT_SERVICE_PORT = 7443
IDENTITY = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
MAX_TOKEN = 1024  # bytes; HELLO carries it in a u16-length field
MIN_TOKEN = 16  # bytes: a guessable token is no authentication
# Linux's default ip_local_port_range: the ports a client socket gets anyway.
DEFAULT_CLIENT_PORTS = PortRange(32768, 60999)
OP_NAMES = {op.value: op for op in Op}


# -- the server -----------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """The server relay's bytes/s for one mediator, both directions together."""

    bytes_per_second: float = 0.0
    """0: no cap (issue 14 E: a default cap is a ceiling nobody asked for).
    Set it to bound what one mediator may take of the server's uplink."""
    burst_bytes: float = 4_194_304.0
    """What may pass at full speed before the rate applies (4 MiB)."""


@dataclass(frozen=True)
class MediatorEntry:
    """One mediator the server knows: its secret and what it may have."""

    identity: str
    token: bytes = field(repr=False)
    publish_ports: tuple[PortRange, ...]
    limits: MediatorLimits
    rate: RateLimit
    client_cert: Path | None = None

    def may_publish(self, port: int) -> bool:
        return any(r.first <= port <= r.last for r in self.publish_ports)


def one_per_family(addresses: Any) -> tuple[IPAddress, ...]:
    """An address, or a list of at most one IPv4 and one IPv6 address, as a
    tuple; ValueError says why not. One per family: the server answers a UDP
    channel from its one socket of the mediator's family."""
    if not isinstance(addresses, (tuple, list)):
        addresses = (addresses,)
    addresses = tuple(addresses)
    if not addresses:
        raise ValueError("give at least one address")
    for version in (4, 6):
        same = [str(a) for a in addresses if a.version == version]
        if len(same) > 1:
            raise ValueError(f"at most one IPv{version} address, got {', '.join(same)}")
    return addresses


@dataclass(frozen=True)
class ServerConfig:
    """Everything the control server needs (standalone or as a gateway)."""

    listen: tuple[IPAddress, ...] = (ipaddress.IPv4Address("0.0.0.0"),)
    """The service port's addresses: one, or one IPv4 and one IPv6 (each its
    own sockets; an IPv6 one is IPv6 only). One address alone may be given
    bare."""
    service_port: int = DEFAULT_SERVICE_PORT
    public_address: tuple[IPAddress, ...] = (ipaddress.IPv4Address("0.0.0.0"),)
    """Where publications listen, as ``listen``."""
    cert: Path = TUNNEL_DIR / "server.crt"
    key: Path = TUNNEL_DIR / "server.key"
    mediators_file: Path = TUNNEL_DIR / "mediators.toml"
    control_socket: Path = Path("/run/nfgate/tunnel.sock")
    state_file: Path | None = None
    protocol: ServerSettings = field(default_factory=ServerSettings)
    limits: MediatorLimits = field(default_factory=MediatorLimits)
    rate: RateLimit = field(default_factory=RateLimit)
    publish_ports: tuple[PortRange, ...] = ()
    request_timeout: float = 10.0
    """Seconds to wait for a mediator's answer to a request."""
    handshake_timeout: float = 10.0
    """Seconds a new connection may take for its TLS handshake."""
    udp_idle_timeout: float = 60.0
    """A published UDP flow ends after this long without a datagram."""
    channel_wait: float = 1.0
    """How long a new UDP flow waits for its UDP channel before it falls back
    to DATA frames on the TCP channel."""
    udp_queue: int = 4096
    """Datagrams a UDP flow holds while its redirect is being opened."""
    udp_queue_bytes: int = 262144
    """Bytes of datagrams it holds meanwhile: a redirect opened behind bulk
    TCP on a busy channel can take a second or two, and at 1000 datagrams/s a
    new flow must lose none of them (issue 14 D), yet a flood of spoofed
    sources must not cost more than this per flow."""
    max_channels: int = 4096
    """TCP channels at once, authenticated or not (bounds a flood)."""
    tls_read_buffer: int = 262144
    """Bytes of read buffer of a busy TLS channel (asyncio's default): large
    reads, fewer trips through the loop (docs/tunnel-protocol.md section 21)."""
    tls_idle_read_buffer: int = 4096
    """Bytes of read buffer a TLS channel starts with and keeps while it is
    idle (keepalives, requests): most of an idle mediator's cost on the
    server was this buffer. A read of half of it or more makes the channel
    busy, for good."""
    channel_unsent: int = CHANNEL_UNSENT
    """Unsent bytes the kernel keeps queued on a TCP channel (tunnel/aio.py,
    ``CHANNEL_UNSENT``): a bound keeps a request's answer from waiting behind
    megabytes of bulk."""
    udp_buffer: int = UDP_BUFFER
    """Receive buffer of each UDP socket of the tunnel (tunnel/aio.py,
    ``UDP_BUFFER``): room for a burst while the process is busy."""
    event_loop: EventLoop = "uvloop"
    """The event loop the process runs on (tunnel/aio.py, ``run_main``):
    uvloop (libuv, its own TLS) takes about a third less time per relayed
    event than asyncio's own; ``asyncio`` is the standard library's."""
    republish: BackoffSettings = field(default_factory=lambda: BackoffSettings(maximum=60.0))
    """Retries of a publish whose public port could not be bound."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "listen", one_per_family(self.listen))
        object.__setattr__(self, "public_address", one_per_family(self.public_address))


# -- the mediator --------------------------------------------------------------------


@dataclass(frozen=True)
class MediatorConfig:
    """Everything the mediation system needs."""

    identity: str
    token: bytes = field(repr=False)
    server: str
    pin: bytes
    service_port: int = DEFAULT_SERVICE_PORT
    service: str = ""
    interfaces: tuple[IPInterface, ...] = ()
    client_cert: Path | None = None
    client_key: Path | None = None
    protocol: MediatorSettings = field(default_factory=MediatorSettings)
    allow: tuple[Rule, ...] = ()
    client_ports: PortRange | None = DEFAULT_CLIENT_PORTS
    """Ports the server may open (and redirect) on the mediator's own
    addresses without an [[allow]] rule: what a client socket gets anyway.
    Reaching a private host still needs a rule (connect, send)."""
    connect_timeout: float = 10.0
    """Seconds for a CONNECT to a private host before CONNECT_FAILED."""
    channel_timeout: float = 10.0
    """Seconds for the TCP connect and TLS handshake to the server."""
    max_port_probes: int = 1024
    """Ports tried upward from a "desired" number before NO_FREE_PORT."""
    channel_unsent: int = CHANNEL_UNSENT
    """Unsent bytes the kernel keeps queued on the TCP channel (as the server's)."""
    udp_buffer: int = UDP_BUFFER
    """Receive buffer of each UDP socket of the mediator (as the server's)."""
    warm_connections: int = 1
    """Connections made ahead to each target of an OPEN_CONNECT, for the next
    public client (tunnel/warm.py); 0: none."""
    warm_idle: float = 5.0
    """Seconds such a connection waits before it is closed unused."""
    opened_hold: float = 0.005
    """Seconds a stream's OPENED (version 4) may wait for the channel's next
    write, usually the target's first bytes, to leave in the same TLS record; 0: at once."""
    event_loop: EventLoop = "uvloop"
    """The event loop the process runs on (as the server's)."""
    reconnect: BackoffSettings = field(default_factory=BackoffSettings)


_PROTO_NAMES: dict[str, frozenset[Proto]] = {
    "tcp": frozenset({Proto.TCP}),
    "udp": frozenset({Proto.UDP}),
    "any": frozenset({Proto.TCP, Proto.UDP}),
}


def _secret_file_problem(path: Path) -> str | None:
    """Why ``path`` is unsafe for secrets, or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root; chown root {path}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"mode {mode:04o} gives group or others access to its secrets; chmod 600 {path}"
    return None


def _read(path: Path, what: str) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what} file") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the {what} file (permission denied)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read the {what} file ({err})") from None
    return parse_toml(text, path), text


def _checked(path: Path, text: str, model: type[Frozen], doc: Any) -> Any:
    value, problems = validate(model, doc, {})
    if problems:
        raise ConfigError(path, located(text, problems))
    return value


# ---- field types ----------------------------------------------------------------------


def _token_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {kind_of(value)}"
    if not MIN_TOKEN <= len(value.encode()) <= MAX_TOKEN:
        return f"a token is {MIN_TOKEN} to {MAX_TOKEN} bytes (make one with: nfgate tunnel token)"
    return None


def _token(value: Any) -> bytes:
    problem = _token_problem(value)
    if problem:
        fail(problem)
    return value.encode()


def _pin(value: Any) -> bytes:
    if not isinstance(value, str):
        fail(f"expected a string, got {kind_of(value)}")
    try:
        return parse_pin(value)
    except ValueError as err:
        fail(f"{err} (print it with: nfgate tunnel pin SERVER.crt)")


def _or_none(check: Any) -> Any:
    """``""`` for none, else ``check``'s value."""
    return lambda value: None if value == "" else check(value)


Token = typed(_token, {"type": "string"}, bytes)
Pin = typed(_pin, {"type": "string"}, bytes)
InterfaceAny = typed(
    interface(ipaddress.ip_interface, "an address with its prefix length like '10.77.0.10/24'",
              "an address with prefix length"),
    {"type": "string"},
    IPInterface,
)
OptionalPath = typed(_or_none(absolute_path), {"type": "string"}, Path)
ClientPorts = typed(_or_none(port_range), {"type": ["string", "integer"]}, PortRange)
Identity = String(IDENTITY, "an identity (1-64 of letters, digits, _ . -)")
Host = String(r"[A-Za-z0-9_.:\-]{1,253}", "a host name or address")
Service = String(r".{0,255}", "at most 255 characters")
ProtoName = Choice(*("tcp", "udp", "any"))
OpNames = Annotated[ListOf(Choice(*OP_NAMES)), AfterValidator(lambda ops: ops or fail("list at least one of " + ", ".join(OP_NAMES)))]


def _per_family(addresses: tuple[IPAddress, ...]) -> tuple[IPAddress, ...]:
    try:
        return one_per_family(addresses)
    except ValueError as err:
        fail(str(err))


# ``listen``, ``public_address``: "0.0.0.0", or ["198.51.100.10", "2001:db8::10"].
Addresses = Annotated[ListOf(Address, allow_scalar=True), AfterValidator(_per_family)]


# ---- the server -----------------------------------------------------------------------

_SERVER = ServerConfig()
_PROTOCOL = ServerSettings()
_LIMITS = MediatorLimits()
_RATE = RateLimit()


class _ServerTable(Frozen):
    listen: Addresses = _SERVER.listen
    service_port: Int(1, 65535) = _SERVER.service_port
    public_address: Addresses = _SERVER.public_address
    cert: AbsPath = _SERVER.cert
    key: AbsPath = _SERVER.key
    mediators: AbsPath = _SERVER.mediators_file
    control_socket: AbsPath = _SERVER.control_socket
    state_file: OptionalPath = _SERVER.state_file
    request_timeout: Number(0.1, 600) = _SERVER.request_timeout
    handshake_timeout: Number(0.1, 600) = _SERVER.handshake_timeout
    udp_idle_timeout: Number(1, 86400) = _SERVER.udp_idle_timeout
    channel_wait: Number(0, 60) = _SERVER.channel_wait
    udp_queue: Int(1, 65536) = _SERVER.udp_queue
    udp_queue_bytes: Int(1500, 1 << 26) = _SERVER.udp_queue_bytes
    max_channels: Int(1, 1_000_000) = _SERVER.max_channels
    tls_read_buffer: Int(16384, 1 << 20) = _SERVER.tls_read_buffer
    tls_idle_read_buffer: Int(1024, 1 << 20) = _SERVER.tls_idle_read_buffer
    channel_unsent: Int(16384, 1 << 26) = _SERVER.channel_unsent
    udp_buffer: Int(65536, 1 << 28) = _SERVER.udp_buffer
    event_loop: EventLoop = _SERVER.event_loop
    republish_initial: Number(0.01, 3600) = _SERVER.republish.initial
    republish_max: Number(0.01, 86400) = _SERVER.republish.maximum

    _republish = ordered("republish_initial", "republish_max", "server")


class _ServerProtocol(Frozen):
    hello_timeout: Number(0.1, 600) = _PROTOCOL.hello_timeout
    dead_after: Int(1, 100) = _PROTOCOL.dead_after
    min_keepalive_interval: Number(0.1, 3600) = _PROTOCOL.min_keepalive_interval
    max_keepalive_interval: Number(0.1, 86400) = _PROTOCOL.max_keepalive_interval
    max_frame_size: Int(MIN_MAX_FRAME_SIZE, 16 << 20) = _PROTOCOL.max_frame_size
    replay_window: Int(1, 1 << 16) = _PROTOCOL.replay_window
    udp_channels: Bool = _PROTOCOL.udp_channels
    stream_window_max: Int(STREAM_WINDOW, MAX_STREAM_WINDOW) = _PROTOCOL.stream_window_max
    stream_window_budget: Int(0, 1 << 34) = _PROTOCOL.stream_window_budget

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "_ServerProtocol":
        try:
            ServerSettings(**self.model_dump())
        except ValueError as err:
            report(info, "protocol", str(err))
        return self


class _Limits(Frozen):
    """What one mediator may have; in the mediators file, unset means the server's."""

    max_ports: Int(0, 65535) = _LIMITS.max_ports
    max_connections: Int(0, 1_000_000) = _LIMITS.max_connections
    max_pending: Int(1, 65535) = _LIMITS.max_pending
    bytes_per_second: Number(0, 1e12) = _RATE.bytes_per_second
    burst_bytes: Number(65536, 1e12) = _RATE.burst_bytes

    def limits(self, base: "_Limits") -> tuple[MediatorLimits, RateLimit]:
        """Each key given here, or ``base``'s."""
        def v(key: str) -> Any:
            return getattr(self if key in self.model_fields_set else base, key)

        return (MediatorLimits(v("max_ports"), v("max_connections"), v("max_pending")),
                RateLimit(v("bytes_per_second"), v("burst_bytes")))


class _ServerLimits(_Limits):
    publish_ports: Ports = ()


class _ServerFile(Frozen):
    server: _ServerTable = Field(default_factory=_ServerTable)
    protocol: _ServerProtocol = Field(default_factory=_ServerProtocol)
    limits: _ServerLimits = Field(default_factory=_ServerLimits)


def load_server(path: str | Path) -> ServerConfig:
    """Read and check a standalone server TOML (``ConfigError`` lists every problem)."""
    path = Path(path)
    doc, text = _read(path, "tunnel server config")
    f: _ServerFile = _checked(path, text, _ServerFile, doc)
    s = f.server
    limits, rate = f.limits.limits(f.limits)
    return ServerConfig(
        listen=s.listen, service_port=s.service_port, public_address=s.public_address, cert=s.cert, key=s.key,
        mediators_file=s.mediators, control_socket=s.control_socket, state_file=s.state_file,
        protocol=ServerSettings(**f.protocol.model_dump()),
        limits=limits,
        rate=rate,
        publish_ports=f.limits.publish_ports,
        request_timeout=s.request_timeout, handshake_timeout=s.handshake_timeout,
        udp_idle_timeout=s.udp_idle_timeout, channel_wait=s.channel_wait, udp_queue=s.udp_queue,
        udp_queue_bytes=s.udp_queue_bytes,
        max_channels=s.max_channels, tls_read_buffer=s.tls_read_buffer,
        tls_idle_read_buffer=s.tls_idle_read_buffer,
        channel_unsent=s.channel_unsent, udp_buffer=s.udp_buffer, event_loop=s.event_loop,
        republish=BackoffSettings(initial=s.republish_initial, maximum=s.republish_max),
    )


# ---- the mediators file ---------------------------------------------------------------


class _MediatorEntry(_Limits):
    token: Token
    publish_ports: Ports = ()
    client_cert: AbsPath = None


class _MediatorsFile(Frozen):
    mediator: dict[Identity, _MediatorEntry] = {}


def load_mediators(path: str | Path, config: ServerConfig) -> dict[str, MediatorEntry]:
    """The mediators file: identity -> token, publishable ports, limits.

    Refused unless only root can read it (it holds every mediator's token).
    """
    path = Path(path)
    unsafe = _secret_file_problem(path)
    if unsafe is not None:
        raise UsageError(f"mediators file {path}: {unsafe}")
    doc, text = _read(path, "mediators")
    f: _MediatorsFile = _checked(path, text, _MediatorsFile, doc)
    base = _Limits(max_ports=config.limits.max_ports, max_connections=config.limits.max_connections,
                   max_pending=config.limits.max_pending, bytes_per_second=config.rate.bytes_per_second,
                   burst_bytes=config.rate.burst_bytes)
    entries = {}
    for identity, e in f.mediator.items():
        publish = e.publish_ports if "publish_ports" in e.model_fields_set else config.publish_ports
        limits, rate = e.limits(base)
        entries[identity] = MediatorEntry(identity, e.token, publish, limits, rate, e.client_cert)
    return entries


# ---- the mediator ---------------------------------------------------------------------

_MEDIATOR = MediatorSettings()
_BACKOFF = BackoffSettings()


class _MediatorTable(Frozen):
    identity: Identity
    token: Token = None
    token_file: AbsPath = None
    server: Host
    server_pin: Pin
    service_port: Int(1, 65535) = DEFAULT_SERVICE_PORT
    service: Service = ""
    interfaces: ListOf(InterfaceAny) = ()
    client_cert: AbsPath = None
    client_key: AbsPath = None
    client_ports: ClientPorts = DEFAULT_CLIENT_PORTS
    connect_timeout: Number(0.1, 600) = 10.0
    channel_timeout: Number(0.1, 600) = 10.0
    max_port_probes: Int(1, 65535) = 1024
    channel_unsent: Int(16384, 1 << 26) = CHANNEL_UNSENT
    udp_buffer: Int(65536, 1 << 28) = UDP_BUFFER
    warm_connections: Int(0, 64) = 1
    warm_idle: Number(0.1, 600) = 5.0
    opened_hold: Number(0, 1) = 0.005
    event_loop: EventLoop = "uvloop"
    reconnect_initial: Number(0.01, 3600) = _BACKOFF.initial
    reconnect_max: Number(0.01, 86400) = _BACKOFF.maximum
    reconnect_stable: Number(0, 86400) = _BACKOFF.stable_after

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any, info: ValidationInfo) -> Any:
        """Keys that go one without the other, or together, whatever their values."""
        if isinstance(data, dict):
            if "token" in data and "token_file" in data:
                report(info, "mediator.token", "give token or token_file, not both")
            elif "token" not in data and "token_file" not in data:
                report(info, "mediator.token_file", "is required")
            if ("client_cert" in data) != ("client_key" in data):
                report(info, "mediator.client_key", "client_cert and client_key go together")
        return data

    _reconnect = ordered("reconnect_initial", "reconnect_max", "mediator")


class _MediatorProtocol(Frozen):
    keepalive_interval: Number(0.1, 86400) = _MEDIATOR.keepalive_interval
    dead_after: Int(1, 100) = _MEDIATOR.dead_after
    init_timeout: Number(0.1, 600) = _MEDIATOR.init_timeout
    max_frame_size: Int(MIN_MAX_FRAME_SIZE, 16 << 20) = _MEDIATOR.max_frame_size
    max_ports: Int(1, 1 << 20) = _MEDIATOR.max_ports
    max_pending: Int(1, 65535) = _MEDIATOR.max_pending
    replay_window: Int(1, 1 << 16) = _MEDIATOR.replay_window
    keepalive_discovery: bool = _MEDIATOR.keepalive_discovery
    keepalive_floor: Number(0.1, 3600) = _MEDIATOR.keepalive_floor
    keepalive_ceiling: Number(0.1, 3600) = _MEDIATOR.keepalive_ceiling
    stream_window_max: Int(STREAM_WINDOW, MAX_STREAM_WINDOW) = _MEDIATOR.stream_window_max
    stream_window_budget: Int(0, 1 << 34) = _MEDIATOR.stream_window_budget


class _Allow(Frozen):
    """One [[allow]] entry: a rule per port range."""

    to: Network
    ports: Ports = (PortRange(1, 65535),)
    proto: ProtoName = "any"
    ops: OpNames = ("connect", "send")

    def rules(self) -> tuple[Rule, ...]:
        ops = frozenset(OP_NAMES[o] for o in self.ops)
        return tuple(Rule(self.to, r.first, r.last, _PROTO_NAMES[self.proto], ops) for r in self.ports)


class _MediatorFile(Frozen):
    mediator: _MediatorTable
    protocol: _MediatorProtocol = Field(default_factory=_MediatorProtocol)
    allow: Tables(_Allow, "allow") = ()


def _read_token_file(path: Path) -> bytes | str:
    """The token, or why not."""
    unsafe = _secret_file_problem(path)
    if unsafe is not None:
        return f"{path}: {unsafe}"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"{path}: cannot read it ({err})"
    return _token_problem(text) or text.encode()


def load_mediator(path: str | Path) -> MediatorConfig:
    """Read and check a mediator TOML (``ConfigError`` lists every problem)."""
    path = Path(path)
    doc, text = _read(path, "tunnel mediator config")
    f: _MediatorFile = _checked(path, text, _MediatorFile, doc)
    m = f.mediator
    if m.token is not None:
        unsafe = _secret_file_problem(path)
        if unsafe is not None:
            raise ConfigError(path, located(text, [Problem("mediator.token", f"an inline token needs a root-only config: {unsafe}")]))
        token = m.token
    else:
        read = _read_token_file(m.token_file)
        if isinstance(read, str):
            raise ConfigError(path, located(text, [Problem("mediator.token_file", read)]))
        token = read
    return MediatorConfig(
        identity=m.identity,
        token=token,
        server=m.server,
        pin=m.server_pin,
        service_port=m.service_port,
        service=m.service,
        interfaces=m.interfaces,
        client_cert=m.client_cert,
        client_key=m.client_key,
        protocol=MediatorSettings(**f.protocol.model_dump()),
        allow=tuple(rule for entry in f.allow for rule in entry.rules()),
        client_ports=m.client_ports,
        connect_timeout=m.connect_timeout,
        channel_timeout=m.channel_timeout,
        max_port_probes=m.max_port_probes,
        channel_unsent=m.channel_unsent,
        udp_buffer=m.udp_buffer,
        warm_connections=m.warm_connections,
        warm_idle=m.warm_idle,
        opened_hold=m.opened_hold,
        event_loop=m.event_loop,
        reconnect=BackoffSettings(initial=m.reconnect_initial, maximum=m.reconnect_max, stable_after=m.reconnect_stable),
    )
