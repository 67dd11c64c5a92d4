"""The standalone TOML files of the tunnel: server, mediators, mediator.

``nfgate tunnel server --config FILE`` and ``nfgate tunnel mediator --config
FILE`` read these; docs/tunnel-protocol.md section 16 is their reference.
They are read with firewall/config/reader.py's ``Table``, so every problem is
reported at once with its key path and line, and an unknown key is an error
(a misspelt ``keepalive_interval`` silently falling back to its default is how
a NAT mapping ends up timing out).

Secrets (tokens) live in files that only root can read: the mediators file on
the server, and ``token_file`` (or the config itself, for an inline token) on
the mediator. A token someone else can read lets them become that mediator.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firewall.config import ConfigError, PortRange, ports, single_range
from firewall.config.locate import locate
from firewall.config.reader import (
    Problem, Problems, Table, address, boolean, choice, integer, listof, network, number, string,
)
from firewall.errors import UsageError
from tunnel.frames import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE, IPAddress, IPInterface, Proto
from tunnel.pacing import BackoffSettings
from tunnel.policy import Op, Rule
from tunnel.settings import (
    DEFAULT_DEAD_AFTER, DEFAULT_KEEPALIVE_INTERVAL, MediatorLimits, MediatorSettings, ServerSettings,
)
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

    bytes_per_second: float = 125_000_000.0
    """1 Gbit/s: far above a home uplink, so the default bounds only abuse."""
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


@dataclass(frozen=True)
class ServerConfig:
    """Everything the control server needs (standalone or as a gateway)."""

    listen: IPAddress = ipaddress.IPv4Address("0.0.0.0")
    service_port: int = DEFAULT_SERVICE_PORT
    public_address: IPAddress = ipaddress.IPv4Address("0.0.0.0")
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
    udp_queue: int = 64
    """Datagrams a UDP flow holds while its redirect is being opened."""
    max_channels: int = 4096
    """TCP channels at once, authenticated or not (bounds a flood)."""
    tls_read_buffer: int = 65536
    """Bytes of the read buffer each TLS channel holds for its whole life.
    asyncio's default is 256 KiB, most of an idle mediator's cost on the
    server; 64 KiB costs about a fifth of the throughput of one busy
    channel (docs/tunnel-protocol.md section 21)."""
    republish: BackoffSettings = field(default_factory=BackoffSettings)
    """Retries of a publish whose public port could not be bound."""


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


def _read_toml(path: Path, what: str) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what} file") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the {what} file (permission denied)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read the {what} file ({err})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [Problem("(toml)", str(err))]) from None


def _finish(path: Path, text: str, problems: Problems) -> None:
    if problems:
        raise ConfigError(path, [Problem(p.path, p.reason, locate(text, p.path)) for p in problems])


def _path(value: Any, where: str, problems: Problems) -> Path | None:
    text = string(r"/.+", "an absolute path")(value, where, problems)
    return Path(text) if text is not None else None


def _optional_path(value: Any, where: str, problems: Problems) -> Path | None | str:
    if value == "":
        return ""
    return _path(value, where, problems)


def _protocol_server(t: Table) -> ServerSettings | None:
    d = ServerSettings()
    values = dict(
        hello_timeout=t.take("hello_timeout", number(0.1, 600), d.hello_timeout),
        dead_after=t.take("dead_after", integer(1, 100), d.dead_after),
        min_keepalive_interval=t.take("min_keepalive_interval", number(0.1, 3600), d.min_keepalive_interval),
        max_keepalive_interval=t.take("max_keepalive_interval", number(0.1, 86400), d.max_keepalive_interval),
        max_frame_size=t.take("max_frame_size", integer(MIN_MAX_FRAME_SIZE, 16 << 20), d.max_frame_size),
        replay_window=t.take("replay_window", integer(1, 1 << 16), d.replay_window),
        udp_channels=t.take("udp_channels", boolean, d.udp_channels),
    )
    t.finish()
    if None in values.values():
        return None
    try:
        return ServerSettings(**values)
    except ValueError as err:
        t.problems.add(t.path, str(err))
        return None


def _limits(t: Table, base: MediatorLimits, base_rate: RateLimit) -> tuple[MediatorLimits, RateLimit] | None:
    values = dict(
        max_ports=t.take("max_ports", integer(0, 65535), base.max_ports),
        max_connections=t.take("max_connections", integer(0, 1_000_000), base.max_connections),
        max_pending=t.take("max_pending", integer(1, 65535), base.max_pending),
    )
    rate = dict(
        bytes_per_second=t.take("bytes_per_second", number(1024, 1e12), base_rate.bytes_per_second),
        burst_bytes=t.take("burst_bytes", number(65536, 1e12), base_rate.burst_bytes),
    )
    if None in values.values() or None in rate.values():
        return None
    return MediatorLimits(**values), RateLimit(**rate)


def load_server(path: str | Path) -> ServerConfig:
    """Read and check a standalone server TOML (``ConfigError`` lists every problem)."""
    path = Path(path)
    doc, text = _read_toml(path, "tunnel server config")
    problems = Problems()
    top = Table(doc, "", problems)
    s = top.table("server")
    d = ServerConfig()
    state = s.take("state_file", _optional_path, "")
    values: dict[str, Any] = dict(
        listen=s.take("listen", address, d.listen),
        service_port=s.take("service_port", integer(1, 65535), d.service_port),
        public_address=s.take("public_address", address, d.public_address),
        cert=s.take("cert", _path, d.cert),
        key=s.take("key", _path, d.key),
        mediators_file=s.take("mediators", _path, d.mediators_file),
        control_socket=s.take("control_socket", _path, d.control_socket),
        request_timeout=s.take("request_timeout", number(0.1, 600), d.request_timeout),
        handshake_timeout=s.take("handshake_timeout", number(0.1, 600), d.handshake_timeout),
        udp_idle_timeout=s.take("udp_idle_timeout", number(1, 86400), d.udp_idle_timeout),
        channel_wait=s.take("channel_wait", number(0, 60), d.channel_wait),
        udp_queue=s.take("udp_queue", integer(1, 65536), d.udp_queue),
        max_channels=s.take("max_channels", integer(1, 1_000_000), d.max_channels),
        tls_read_buffer=s.take("tls_read_buffer", integer(16384, 1 << 20), d.tls_read_buffer),
    )
    initial = s.take("republish_initial", number(0.01, 3600), d.republish.initial)
    maximum = s.take("republish_max", number(0.01, 86400), d.republish.maximum)
    s.finish()
    protocol = _protocol_server(top.table("protocol"))
    lt = top.table("limits")
    limits = _limits(lt, d.limits, d.rate)
    publish = lt.take("publish_ports", _ports_or_empty, ())
    lt.finish()
    top.finish()
    if initial is not None and maximum is not None and initial > maximum:
        problems.add("server.republish_max", "must be at least republish_initial")
    _finish(path, text, problems)
    assert protocol is not None and limits is not None and state is not None
    return ServerConfig(
        **values,
        state_file=None if state == "" else state,
        protocol=protocol,
        limits=limits[0],
        rate=limits[1],
        publish_ports=publish,
        republish=BackoffSettings(initial=initial, maximum=maximum),
    )


def _ports_or_empty(value: Any, where: str, problems: Problems) -> tuple[PortRange, ...] | None:
    if value == []:
        return ()
    return ports(value, where, problems)


def _token(value: Any, where: str, problems: Problems) -> bytes | None:
    text = string()(value, where, problems)
    if text is None:
        return None
    token: bytes = text.encode()
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        problems.add(where, f"a token is {MIN_TOKEN} to {MAX_TOKEN} bytes (make one with: nfgate tunnel token)")
        return None
    return token


def load_mediators(path: str | Path, config: ServerConfig) -> dict[str, MediatorEntry]:
    """The mediators file: identity -> token, publishable ports, limits.

    Refused unless only root can read it (it holds every mediator's token).
    """
    path = Path(path)
    unsafe = _secret_file_problem(path)
    if unsafe is not None:
        raise UsageError(f"mediators file {path}: {unsafe}")
    doc, text = _read_toml(path, "mediators")
    problems = Problems()
    top = Table(doc, "", problems)
    table = top.table("mediator")
    entries: dict[str, MediatorEntry] = {}
    for identity in list(table.data):
        where = f"mediator.{identity}"
        t = table.table(identity)
        if string(IDENTITY)(identity, where, Problems()) is None:
            problems.add(where, f"{identity!r} is not an identity (1-64 of letters, digits, _ . -)")
        token = t.take("token", _token)
        publish = t.take("publish_ports", _ports_or_empty, config.publish_ports)
        cert = t.take("client_cert", _path, None)
        limits = _limits(t, config.limits, config.rate)
        t.finish()
        if token is None or publish is None or limits is None:
            continue
        entries[identity] = MediatorEntry(identity, token, publish, limits[0], limits[1], cert)
    top.finish()
    _finish(path, text, problems)
    return entries


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
    reconnect: BackoffSettings = field(default_factory=BackoffSettings)


_PROTO_NAMES: dict[str, frozenset[Proto]] = {
    "tcp": frozenset({Proto.TCP}),
    "udp": frozenset({Proto.UDP}),
    "any": frozenset({Proto.TCP, Proto.UDP}),
}


def _allow_rules(t: Table) -> tuple[Rule, ...] | None:
    """One [[allow]] entry: a rule per port range."""
    net = t.take("to", network)
    port_ranges = t.take("ports", ports, (PortRange(1, 65535),))
    proto = t.take("proto", choice(*_PROTO_NAMES), "any")
    ops = t.take("ops", listof(choice(*OP_NAMES)), ("connect", "send"))
    t.finish()
    if None in (net, port_ranges, proto, ops):
        return None
    if not ops:
        t.problems.add(f"{t.path}.ops", "list at least one of " + ", ".join(OP_NAMES))
        return None
    return tuple(
        Rule(net, r.first, r.last, _PROTO_NAMES[proto], frozenset(OP_NAMES[o] for o in ops)) for r in port_ranges
    )


def _interface_any(value: Any, where: str, problems: Problems) -> IPInterface | None:
    if not isinstance(value, str) or "/" not in value:
        problems.add(where, f"expected an address with its prefix length like '10.77.0.10/24', got {value!r}")
        return None
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        problems.add(where, f"{value!r} is not an address with prefix length")
        return None


def _pin(value: Any, where: str, problems: Problems) -> bytes | None:
    text = string()(value, where, problems)
    if text is None:
        return None
    try:
        return parse_pin(text)
    except ValueError as err:
        problems.add(where, f"{err} (print it with: nfgate tunnel pin SERVER.crt)")
        return None


def _protocol_mediator(t: Table) -> MediatorSettings | None:
    d = MediatorSettings()
    values = dict(
        keepalive_interval=t.take("keepalive_interval", number(0.1, 86400), DEFAULT_KEEPALIVE_INTERVAL),
        dead_after=t.take("dead_after", integer(1, 100), DEFAULT_DEAD_AFTER),
        init_timeout=t.take("init_timeout", number(0.1, 600), d.init_timeout),
        max_frame_size=t.take("max_frame_size", integer(MIN_MAX_FRAME_SIZE, 16 << 20), DEFAULT_MAX_FRAME_SIZE),
        max_ports=t.take("max_ports", integer(1, 1 << 20), d.max_ports),
        max_pending=t.take("max_pending", integer(1, 65535), d.max_pending),
        replay_window=t.take("replay_window", integer(1, 1 << 16), d.replay_window),
    )
    t.finish()
    if None in values.values():
        return None
    return MediatorSettings(**values)


def _read_token_file(path: Path, where: str, problems: Problems) -> bytes | None:
    unsafe = _secret_file_problem(path)
    if unsafe is not None:
        problems.add(where, f"{path}: {unsafe}")
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        problems.add(where, f"{path}: cannot read it ({err})")
        return None
    return _token(text, where, problems)


def load_mediator(path: str | Path) -> MediatorConfig:
    """Read and check a mediator TOML (``ConfigError`` lists every problem)."""
    path = Path(path)
    doc, text = _read_toml(path, "tunnel mediator config")
    problems = Problems()
    top = Table(doc, "", problems)
    m = top.table("mediator", required=True)
    identity = m.take("identity", string(IDENTITY, "an identity (1-64 of letters, digits, _ . -)"))
    token: bytes | None = None
    if m.has("token") and m.has("token_file"):
        problems.add("mediator.token", "give token or token_file, not both")
    elif m.has("token"):
        token = m.take("token", _token)
        unsafe = _secret_file_problem(path)
        if unsafe is not None and token is not None:
            problems.add("mediator.token", f"an inline token needs a root-only config: {unsafe}")
    else:
        token_path = m.take("token_file", _path)
        if token_path is not None:
            token = _read_token_file(token_path, "mediator.token_file", problems)
    m.taken.update({"token", "token_file"})
    d_ports = DEFAULT_CLIENT_PORTS
    client_ports = m.take("client_ports", _client_ports, d_ports)
    values: dict[str, Any] = dict(
        server=m.take("server", string(r"[A-Za-z0-9_.:\-]{1,253}", "a host name or address")),
        pin=m.take("server_pin", _pin),
        service_port=m.take("service_port", integer(1, 65535), DEFAULT_SERVICE_PORT),
        service=m.take("service", string(r".{0,255}", "at most 255 characters"), ""),
        interfaces=m.take("interfaces", listof(_interface_any), ()),
        client_cert=m.take("client_cert", _path, None),
        client_key=m.take("client_key", _path, None),
        connect_timeout=m.take("connect_timeout", number(0.1, 600), 10.0),
        channel_timeout=m.take("channel_timeout", number(0.1, 600), 10.0),
        max_port_probes=m.take("max_port_probes", integer(1, 65535), 1024),
    )
    b = BackoffSettings()
    initial = m.take("reconnect_initial", number(0.01, 3600), b.initial)
    maximum = m.take("reconnect_max", number(0.01, 86400), b.maximum)
    stable = m.take("reconnect_stable", number(0, 86400), b.stable_after)
    m.finish()
    protocol = _protocol_mediator(top.table("protocol"))
    rules: list[Rule] = []
    for t in top.tables("allow"):
        made = _allow_rules(t)
        if made is not None:
            rules.extend(made)
    top.finish()
    if (values["client_cert"] is None) != (values["client_key"] is None):
        problems.add("mediator.client_key", "client_cert and client_key go together")
    if initial is not None and maximum is not None and initial > maximum:
        problems.add("mediator.reconnect_max", "must be at least reconnect_initial")
    _finish(path, text, problems)
    assert identity is not None and token is not None and protocol is not None
    return MediatorConfig(
        identity=identity,
        token=token,
        protocol=protocol,
        allow=tuple(rules),
        client_ports=None if client_ports == "" else client_ports,
        reconnect=BackoffSettings(initial=initial, maximum=maximum, stable_after=stable),
        **values,
    )


def _client_ports(value: Any, where: str, problems: Problems) -> PortRange | str | None:
    if value == "":
        return ""
    return single_range(value, where, problems)

