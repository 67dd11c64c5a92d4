"""Running the tunnel's two roles: standalone, and as the ``tunnel`` gateway kind.

- ``run_server(config)``: ``nfgate tunnel server``, in the foreground until
  SIGTERM or SIGINT (``nfgate tunnel mediator`` is ``run_mediator`` in
  tunnel/mediator.py, so that a gateway process never loads the mediator).
- ``run_gateway(manifest)``: what ``python -m gateways`` calls for a
  ``[[gateway]]`` of kind ``tunnel``, with its manifest (gateways/manifest.py). Under ``nfgate run`` the processor
  steers the gateway's ``[[gateway.traffic]]`` (``to = "router"``) into the
  gateway's one port; the ``GatewayFrontend`` asks the deNAT/reNAT layer for
  each flow's original destination port and routes it: the service port to
  the channel (TLS), a published port to its publication. Its settings are
  ``[gateway.settings]`` (docs/config.md); its files live in
  ``tunnel/<gateway name>/`` next to the nfgate config
  (``/etc/nfgate/tunnel/<gateway name>/`` for the default config:
  server.crt, server.key, mediators.toml), its control socket next to the
  supervisor's, as ``tunnel-<gateway name>.sock``, its publications in
  ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``) or
  ``/var/lib/nfgate``, as ``tunnel-<gateway name>.json``.

A problem the operator can fix is an NfgateError with one line, never a
traceback (DESIGN.md invariant 10).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from firewall.errors import KernelError, UsageError
from firewall.fields import PortRange
from firewall.signalling import load_or_create_key
from gateways.manifest import Manifest
from gateways.tcp_server import raise_file_limit
from tunnel.aio import run_main, until_signalled
from tunnel.config import MediatorEntry, RateLimit, ServerConfig, load_mediators
from tunnel.events import EventLog, configure
from tunnel.gateway import GatewayFrontend, steered, unsteered
from tunnel.operator import ControlSocket
from tunnel.pacing import BackoffSettings
from tunnel.server import StandaloneFrontend, TunnelServer, service_text
from tunnel.settings import MediatorLimits, ServerSettings, TunnelGatewaySettings

STATE_DIR = Path("/var/lib/nfgate")
STATE_DIR_ENV = "STATE_DIRECTORY"  # what systemd's StateDirectory= sets


async def serve(server: TunnelServer, log: EventLog) -> None:
    """Start ``server`` and its control socket; serve until SIGTERM/SIGINT."""
    cfg = server.config
    files = raise_file_limit()
    try:
        await server.start()
    except OSError as err:
        where = service_text(cfg)
        raise KernelError(f"tunnel server: cannot listen on {where}: {err.strerror or err}") from None
    control = ControlSocket(server, cfg.control_socket)
    try:
        await control.start()
    except OSError as err:
        await server.close()
        raise KernelError(f"tunnel server: control socket {cfg.control_socket}: {err.strerror or err}") from None
    describe = getattr(server.frontend, "describe", None)
    where = {"service": service_text(cfg)}
    if describe:
        where.update((k, v) for k, v in describe().items() if k in ("service", "gateway", "listen"))
    log.emit(
        "ready", **where, mediators=len(server.mediators),
        control=str(cfg.control_socket), published=len(server.publications), open_files=files,
    )

    def stats() -> dict[str, Any]:
        out: dict[str, Any] = {"counters": dict(server.counters), "sessions": len(server.sessions)}
        if describe:
            out["frontend"] = describe()["counters"]
        return out

    try:
        await until_signalled(log, stats)
    finally:
        log.emit("stopping", sessions=len(server.sessions))
        control.close()
        await server.close()


def run_server(config: ServerConfig, log: EventLog | None = None) -> None:
    """``nfgate tunnel server``: the standalone control server, in the foreground."""
    log = log or EventLog("server")
    mediators = load_mediators(config.mediators_file, config)
    run_main(serve(TunnelServer(config, mediators, StandaloneFrontend(), log), log), config.event_loop)


# -- the gateway kind ---------------------------------------------------------------------


def gateway_files_dir(gateway: Manifest) -> Path:
    """Where gateway ``gateway`` keeps server.crt, server.key and mediators.toml.

    ``tunnel/<name>/`` next to the nfgate config (the manifest's
    ``config_dir``): ``/etc/nfgate/tunnel/<name>/`` for the default
    ``/etc/nfgate/nfgate.toml``, so a second config (a lab, a test, a staging
    router) brings its own keys and mediators along.
    """
    return gateway.config_dir / "tunnel" / gateway.name


def state_dir() -> Path:
    """Where the gateway kind keeps its publications: ``$STATE_DIRECTORY``
    (the first, when systemd's ``StateDirectory=`` names several) if it is
    absolute, else ``/var/lib/nfgate``."""
    first = os.environ.get(STATE_DIR_ENV, "").split(":")[0]
    return Path(first) if first.startswith("/") else STATE_DIR


def check_steering(gateway: Manifest, service_port: int) -> None:
    """Refuse (one line) a tunnel gateway that could never work as configured.

    Its selectors are what the kernel steers to it (docs/tunnel-protocol.md
    section 19): every one must end at the router (the server terminates the
    flows), and the service port must be among them for TCP (the channel) and
    UDP (the UDP channels).
    """
    for t in gateway.traffic:
        if not t.terminates:
            raise UsageError(
                f"{t.source}.to: a tunnel gateway terminates its traffic itself: "
                f'use to = "router", not {t.to_zone!r}'
            )
    missing = [p for p in ("tcp", "udp") if not steered(gateway, p, service_port)]
    if missing:
        lost = "mediators could not connect" if "tcp" in missing else "UDP channels could not reach it"
        raise UsageError(
            f"{gateway.source}: service_port {service_port} ({' and '.join(missing)}) is in no"
            f" [[gateway.traffic]] of {gateway.name}: {lost}; add it to a selector's ports"
        )


def warn_unsteered(
    gateway: Manifest, server_config: ServerConfig, mediators: Mapping[str, MediatorEntry], log: EventLog
) -> None:
    """One warning per publishable range that no selector brings here.

    A publication there would be refused (``GatewayFrontend.bind``); the
    operator sees why at start-up rather than at the first ``publish``.
    """
    ranges = set(server_config.publish_ports)
    for entry in mediators.values():
        ranges.update(entry.publish_ports)
    for rng in sorted(ranges):
        for proto in ("tcp", "udp"):
            gaps = unsteered(gateway, proto, rng.first, rng.last)
            if gaps:
                log.warn(
                    "publish_unsteered", proto=proto, publishable=str(rng), unsteered=",".join(gaps),
                    reason="no [[gateway.traffic]] brings these ports here: publishing them is refused",
                )


def gateway_server_config(gateway: Manifest) -> ServerConfig:
    """The control server's config for ``[[gateway]]`` ``gateway`` of kind tunnel."""
    s = TunnelGatewaySettings.model_validate(gateway.settings)  # the manifest's JSON values
    base = gateway_files_dir(gateway)
    first, last = s.publish_first, s.publish_last
    if first > last:
        raise UsageError(f"{gateway.source}.settings: publish_first {first} is above publish_last {last}")
    # G:g, and G6:g when the kind's IPv6 flows come (the manifest's listen6).
    addresses = (gateway.listen.address,) + ((gateway.listen6,) if gateway.listen6 is not None else ())
    return ServerConfig(
        listen=addresses,
        service_port=s.service_port,
        public_address=addresses,
        cert=base / "server.crt",
        key=base / "server.key",
        mediators_file=base / "mediators.toml",
        control_socket=gateway.run_dir / f"tunnel-{gateway.name}.sock",
        state_file=state_dir() / f"tunnel-{gateway.name}.json",
        protocol=ServerSettings(
            hello_timeout=s.hello_timeout,
            dead_after=s.dead_after,
            min_keepalive_interval=s.min_keepalive_interval,
            max_keepalive_interval=s.max_keepalive_interval,
            stream_window_max=s.stream_window_max,
            stream_window_budget=s.stream_window_budget,
        ),
        limits=MediatorLimits(max_ports=s.max_ports, max_connections=s.max_connections, max_pending=s.max_pending),
        rate=RateLimit(s.bytes_per_second, s.burst_bytes),
        publish_ports=(PortRange(first, last),) if first else (),
        request_timeout=s.request_timeout,
        udp_idle_timeout=s.udp_idle_timeout,
        max_channels=s.max_channels,
        tls_read_buffer=s.tls_read_buffer,
        tls_idle_read_buffer=s.tls_idle_read_buffer,
        channel_unsent=s.channel_unsent,
        udp_buffer=s.udp_buffer,
        event_loop=s.event_loop,
        republish=BackoffSettings(s.republish_initial, s.republish_max),
    )


def run_gateway(gateway: Manifest, *, log_json: bool = False, log: EventLog | None = None) -> None:
    """Run the control server as gateway ``gateway`` until SIGTERM or SIGINT.

    Called by ``python -m gateways`` for kind ``tunnel``, inside the gateway
    namespace: ``run_gateway(manifest, log_json=args.log_json)``.
    Blocks (it runs its own event loop) and returns after a clean stop.
    Raises NfgateError (one line) for what the operator can fix: a missing
    certificate, key or mediators file, a port that will not bind.
    """
    if gateway.kind != "tunnel":
        raise UsageError(f"gateway {gateway.name!r} is a {gateway.kind} gateway, not tunnel")
    if log is None:
        configure(json_lines=log_json)
        log = EventLog(f"tunnel:{gateway.name}")
    server_config = gateway_server_config(gateway)
    check_steering(gateway, server_config.service_port)
    mediators = load_mediators(server_config.mediators_file, server_config)
    warn_unsteered(gateway, server_config, mediators, log)
    key = load_or_create_key(gateway.signalling.key_file)
    frontend = GatewayFrontend(gateway, key)
    run_main(serve(TunnelServer(server_config, mediators, frontend, log), log), server_config.event_loop)


def parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``10.0.0.1:80`` or ``[fd00::1]:80`` (UsageError with the reason)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"{text!r}: expected ADDRESS:PORT, e.g. 192.168.1.10:80 or [fd00::1]:80")
    try:
        address = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        raise UsageError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{text!r}: {port!r} is not a port (0 to 65535)")
    return address, int(port)
