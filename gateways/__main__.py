"""``python -m gateways --manifest PATH [--log-json] [--log-level L] [--control PATH]``: run one gateway.

The supervisor starts one such process per configured gateway, inside the
gateway network namespace, so that a crash takes down one gateway and
nothing else (DESIGN invariant 6):

    ip netns exec nfgate-gw python -m gateways --manifest /run/nfgate/gateway-nas-log.json

The manifest (gateways/manifest.py, docs/manifest.md) is all the process
reads: the supervisor writes it from the router's config. To run a gateway
by hand, write one with ``nfgate manifest NAME > FILE``.

The process raises its soft limit on open files to the hard one (a relayed
connection holds up to six descriptors: gateways/tcp_server.py), reads its
manifest, loads the signalling key
(``load_or_create_key``: the supervisor has created it already, and the
process only reads it), binds the layer's signalling socket and the
gateway's listener on the gateway address, logs ``ready``, and serves until
SIGTERM or SIGINT. Then it stops accepting, lets live connections finish for
up to ``SHUTDOWN_GRACE`` seconds, resets what is left, logs the counters in
a ``stats`` line and exits 0. SIGUSR1 logs the same ``stats`` line at any
time. With ``--control PATH`` it also answers ``{"cmd": "stats"}`` with the
same counters on a root-only unix socket (firewall/control.py), which the
supervisor reads for its Prometheus endpoint (firewall/metrics.py); and once
it serves it says ``READY=1`` to ``NOTIFY_SOCKET`` (firewall/sdnotify.py),
which is how ``nfgate run`` knows that the gateway serves.

``--ready-fd N``: once both sockets are bound, the process writes
``ready\n`` to descriptor N and keeps it open until it exits, so that the
one who started it (the supervisor, for a gateway of several workers)
learns of its readiness and of its death (end of file, also after SIGKILL)
at once, without polling.

Every event is one line on stderr (``--log-json``: one JSON object per line),
and so is any other line the process writes (firewall/eventlog.py).
A problem the operator can fix is one line and an exit code, never a
traceback (DESIGN invariant 10): 2 for a bad manifest or a kind that is not
built yet; 1 for a runtime failure (an unsafe key file, an
address that is not in this namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Coroutine, Protocol, TypeVar

from firewall import eventlog, sdnotify
from firewall.control import Command, ControlServer
from firewall.errors import EXIT_OK, NfgateError, UsageError
from firewall.signalling import Endpoint, load_or_create_key
from gateways import manifest as mf
from gateways.kinds import KINDS
from gateways.layer import EventLog, GatewayLayer
from gateways.layer.events import configure
from gateways.manifest import Manifest
from gateways.tcp_server import raise_file_limit

PROG = "python -m gateways"

# How long live connections may take to finish after SIGTERM before they are
# reset. The supervisor should wait longer than this before it sends SIGKILL.
SHUTDOWN_GRACE = 5.0

T = TypeVar("T")


class Relay(Protocol):
    """What ``serve`` needs of a gateway kind."""

    listen: Endpoint
    counters: Counter[str]

    @property
    def active(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self, grace: float) -> None: ...


RelayFactory = Callable[[GatewayLayer, Manifest, Endpoint, EventLog], Relay]  # a Kind's ``gateway``


class RuntimeFailure(NfgateError):
    """The gateway could not start or run."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Run one nfgate gateway in the current network namespace.")
    parser.add_argument("--manifest", required=True, help="the gateway's manifest (nfgate run writes it; nfgate manifest NAME prints one)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                        help="the least severe level logged")
    parser.add_argument("--control", type=Path, default=None,
                        help="serve {\"cmd\": \"stats\"} on this root-only unix socket (nfgate run gives one)")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write 'ready' to this inherited descriptor once listening, and keep it open until exit")
    return parser.parse_args(argv)


def _stats(layer: GatewayLayer, relay: Relay) -> dict[str, object]:
    relay_counters = {k: v for k, v in sorted(relay.counters.items()) if v}
    stats: dict[str, object] = {"active": relay.active, "layer": layer.counters, "relay": relay_counters}
    buffered = getattr(relay, "buffered", None)  # TCP kinds: bytes their relays hold now
    if buffered is not None:
        stats["buffered"] = buffered
    return stats


def announce_ready(fd: int | None) -> None:
    """``--ready-fd``: say ``ready`` on the descriptor; it stays open, so its end of file is our exit."""
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    except OSError:
        pass  # nobody listens: the supervisor went away; serving goes on


async def serve(manifest: Manifest, key: bytes, log: EventLog, factory: RelayFactory, control: Path | None = None,
                ready_fd: int | None = None) -> None:
    """Run the gateway ``manifest`` describes, made by ``factory``, until SIGTERM or SIGINT;
    with ``control``, answer ``stats`` there."""
    signalling = manifest.signalling.listen.endpoint
    listen = manifest.listen.endpoint
    layer = GatewayLayer.from_manifest(manifest, key, log)
    relay = factory(layer, manifest, listen, log)
    netns = manifest.netns
    for what, where, start in (("signalling", signalling, layer.start), (manifest.kind, listen, relay.start)):
        try:
            await start()
        except OSError as exc:
            await layer.close()
            raise RuntimeFailure(
                f"{what}: cannot bind {where}: {exc.strerror or exc} "
                f"(run it in the gateway namespace: nfgate exec -- {PROG} ... beside nfgate run, "
                f"or ip netns exec {netns} {PROG} ... where its mount is visible)"
            ) from None

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.emit("stats", **_stats(layer, relay)))
    server = None
    if control is not None:
        commands = {"stats": Command(lambda target, args: _stats(layer, relay), help="the counters of the stats line")}
        server = ControlServer(control, commands, None, warn=lambda event, **fields: log.warn(event, **fields))
        try:
            server.open()
        except OSError as exc:
            await layer.close()
            raise RuntimeFailure(f"control socket {control}: {exc.strerror or exc}") from None
        server.attach(loop)
    sdnotify.notify("READY=1")
    log.emit(
        "ready",
        kind=manifest.kind,
        listen=relay.listen,
        signalling=layer.listen,
        processor=",".join(str(layer.core.instances.endpoint(i)) for i in range(len(layer.core.instances))),
        open_files=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    announce_ready(ready_fd)
    try:
        await stop.wait()
        log.emit("stopping", active=relay.active, grace=SHUTDOWN_GRACE)
        await relay.close(SHUTDOWN_GRACE)
    finally:
        if server is not None:
            server.close()
        await layer.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        log.emit("stats", **_stats(layer, relay))


def run_on(event_loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the kind's event loop (``Kind.event_loop``): ``asyncio`` or ``uvloop``."""
    if event_loop == "uvloop":
        import uvloop  # only when a kind asks for it

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    eventlog.configure_process(PROG, args.log_json, level=level)
    configure(json_lines=args.log_json, level=level)
    raise_file_limit()
    try:
        manifest = mf.load(args.manifest)
        if manifest.kind not in KINDS:
            raise UsageError(f"gateway {manifest.name!r}: this version knows no kind {manifest.kind}")
        kind = KINDS[manifest.kind]
        if kind.standalone:
            # A kind that runs its whole process itself (the tunnel's control
            # server terminates the mediators' channels: tunnel/service.py).
            kind.entry()(manifest, log_json=args.log_json)
            return EXIT_OK
        key = load_or_create_key(manifest.signalling.key_file)
        run_on(kind.event_loop(kind.settings.model_validate(dict(manifest.settings))),
               serve(manifest, key, EventLog(manifest.process_name), kind.entry(), args.control, args.ready_fd))
    except NfgateError as err:
        logging.getLogger("nfgate.gateway").error("%s", err)
        return err.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
