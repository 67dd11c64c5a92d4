"""``python -m gateways --config PATH --gateway NAME [--log-json]``: run one gateway.

The supervisor starts one such process per configured gateway, inside the
gateway network namespace, so that a crash takes down one gateway and
nothing else (DESIGN invariant 6):

    ip netns exec nfgate-gw python -m gateways --config /etc/nfgate/nfgate.toml --gateway nas-log

The process raises its soft limit on open files to the hard one (a relayed
connection holds up to six descriptors: gateways/tcp_server.py), loads the
config, finds its gateway, loads the signalling key
(``load_or_create_key``: the supervisor has created it already, and the
process only reads it), binds the layer's signalling socket and the
gateway's listener on the gateway address, logs ``ready``, and serves until
SIGTERM or SIGINT. Then it stops accepting, lets live connections finish for
up to ``SHUTDOWN_GRACE`` seconds, resets what is left, logs the counters in
a ``stats`` line and exits 0. SIGUSR1 logs the same ``stats`` line at any
time.

Every event is one line on stderr (``--log-json``: one JSON object per line).
A problem the operator can fix is one line and an exit code, never a
traceback (DESIGN invariant 10): 2 for a bad config, an unknown gateway or a
kind that is not built yet; 1 for a runtime failure (an unsafe key file, an
address that is not in this namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
from collections import Counter
from typing import Callable, Protocol

from firewall.config import Config, load
from firewall.config.model import Gateway
from firewall.errors import EXIT_OK, NfgateError, UsageError
from firewall.signalling import Endpoint, load_or_create_key
from gateways.ftp import FtpGateway
from gateways.layer import EventLog, GatewayLayer, ProcessorInstances
from gateways.layer.events import configure
from gateways.layer.instances import layer_endpoint
from gateways.tcp_relay import TcpRelay
from gateways.tcp_server import raise_file_limit
from gateways.udp_relay import UdpRelay
from tunnel.service import run_gateway

PROG = "python -m gateways"

# How long live connections may take to finish after SIGTERM before they are
# reset. The supervisor should wait longer than this before it sends SIGKILL.
SHUTDOWN_GRACE = 5.0


class Relay(Protocol):
    """What ``serve`` needs of a gateway kind."""

    listen: Endpoint
    counters: Counter[str]

    @property
    def active(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self, grace: float) -> None: ...


RelayFactory = Callable[[GatewayLayer, Gateway, Endpoint, EventLog], Relay]

KINDS: dict[str, RelayFactory] = {
    "tcp-relay": lambda layer, gw, listen, log: TcpRelay(
        layer, listen=listen, settings=gw.settings, log=log
    ),
    "udp-relay": lambda layer, gw, listen, log: UdpRelay(
        layer, listen=listen, settings=gw.settings, log=log
    ),
    # FTP with dynamic data-port rules (issue 4): gateways/ftp/, docs/ftp.md.
    "ftp": FtpGateway.for_gateway,
}


class RuntimeFailure(NfgateError):
    """The gateway could not start or run."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Run one nfgate gateway in the current network namespace.")
    parser.add_argument("--config", required=True, help="the nfgate TOML config")
    parser.add_argument("--gateway", required=True, help="the name of the [[gateway]] to run")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    return parser.parse_args(argv)


def find_gateway(config: Config, name: str) -> Gateway:
    for gateway in config.gateways:
        if gateway.name == name:
            return gateway
    known = ", ".join(g.name for g in config.gateways) or "none"
    raise UsageError(f"no gateway named {name!r} in {config.path} (configured: {known})")


def _stats(layer: GatewayLayer, relay: Relay) -> dict[str, object]:
    relay_counters = {k: v for k, v in sorted(relay.counters.items()) if v}
    stats: dict[str, object] = {"active": relay.active, "layer": layer.counters, "relay": relay_counters}
    buffered = getattr(relay, "buffered", None)  # TCP kinds: bytes their relays hold now
    if buffered is not None:
        stats["buffered"] = buffered
    return stats


async def serve(config: Config, gateway: Gateway, key: bytes, log: EventLog) -> None:
    """Run ``gateway`` until SIGTERM or SIGINT."""
    factory = KINDS[gateway.kind]
    try:
        signalling = layer_endpoint(config, gateway.name)
    except ValueError:
        raise UsageError(
            f"signalling.port {config.signalling.port} + gateway index leaves the port range; lower signalling.port"
        ) from None
    listen = Endpoint(config.gateway_link.gateway_address.ip, gateway.listen_port)
    layer = GatewayLayer(
        key,
        listen=signalling,
        instances=ProcessorInstances.from_config(config),
        gateway=gateway.name,
        query_timeout=config.signalling.query_timeout,
        replay_window=config.signalling.replay_window,
        log=log,
    )
    relay = factory(layer, gateway, listen, log)
    netns = config.gateway_link.netns
    for what, where, start in (("signalling", signalling, layer.start), (gateway.kind, listen, relay.start)):
        try:
            await start()
        except OSError as exc:
            await layer.close()
            raise RuntimeFailure(
                f"{what}: cannot bind {where}: {exc.strerror or exc} "
                f"(run it in the gateway namespace: ip netns exec {netns} {PROG} ...)"
            ) from None

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.emit("stats", **_stats(layer, relay)))
    log.emit(
        "ready",
        kind=gateway.kind,
        listen=relay.listen,
        signalling=layer.listen,
        processor=f"{config.gateway_link.router_address.ip}:{config.signalling.port}+{len(config.processor.queues)}",
        open_files=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    try:
        await stop.wait()
        log.emit("stopping", active=relay.active, grace=SHUTDOWN_GRACE)
        await relay.close(SHUTDOWN_GRACE)
    finally:
        await layer.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        log.emit("stats", **_stats(layer, relay))


def runnable(kind: str) -> bool:
    """Whether this version can run a gateway of ``kind`` (the supervisor asks
    before it starts anything, so a config naming a kind not built yet fails
    once, in one line, instead of restarting forever)."""
    return kind == "tunnel" or kind in KINDS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure(json_lines=args.log_json)
    raise_file_limit()
    try:
        config = load(args.config)
        gateway = find_gateway(config, args.gateway)
        if gateway.kind == "tunnel":
            # The tunnel's control server is a gateway of its own kind: it
            # terminates the mediators' channels itself (tunnel/service.py).
            run_gateway(config, gateway, log_json=args.log_json)
            return EXIT_OK
        if gateway.kind not in KINDS:
            raise UsageError(f"gateway {gateway.name!r}: kind {gateway.kind} is not built yet")
        key = load_or_create_key(config.signalling.key_file)
        asyncio.run(serve(config, gateway, key, EventLog(gateway.name)))
    except NfgateError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
