"""The gateways' manifests, written from the router's config (gateways/manifest.py is the format).

``manifest_for(config, gateway, worker)`` is everything worker ``worker`` of
gateway ``gateway`` is told; ``write_all(config, directory)`` writes one
root-only file per worker process, ``gateway-<name>.json`` (or
``gateway-<name>#<i>.json`` for each of several workers), each replaced
atomically, and returns their paths.
The supervisor calls it before it starts the gateways; ``nfgate manifest
NAME`` prints one, for running a gateway by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from firewall.config import Config
from firewall.config.model import ROUTER, Gateway
from firewall.pools import address_slices
from gateways.manifest import (
    MANIFEST_VERSION,
    Address,
    InstanceSpec,
    Manifest,
    NodeSpec,
    PortSpan,
    ProcessorSpec,
    Selector,
    SignallingSpec,
)

DEFAULT_CONFIG_DIR = Path("/etc/nfgate")


def process_names(gateway: Gateway) -> list[str]:
    """The names of a gateway's processes: its name, or ``name#i`` for each of several workers."""
    return [gateway.name] if gateway.workers == 1 else [f"{gateway.name}#{i}" for i in range(gateway.workers)]


def nodes(config: Config, six: bool = False) -> tuple[NodeSpec, ...]:
    """Each router's processor: the router alone, or with [ha] both nodes in node order, each
    with its address on the gateway link and its instances' slices of its half of the pool;
    ``six`` (the gateway takes IPv6, which never crosses to an AG host): their slices of the
    IPv6 pool too."""
    proc = config.processor
    slices6 = address_slices(proc.pools.firewall_side6, len(proc.queues)) if six else [()] * len(proc.queues)
    views = [config] if config.ha is None else sorted((config.for_node(n) for n in config.ha.nodes), key=lambda v: v.node_index)
    out = []
    for view in views:
        slices = address_slices(view.own_pool, len(proc.queues))
        out.append(NodeSpec(
            name=view.node or "router",
            address=view.gateway_link.router_address.ip,
            instances=tuple(
                InstanceSpec(queue=q, port=config.processor_signalling_port(i), slices=slices[i], slices6=slices6[i])
                for i, q in enumerate(proc.queues)
            ),
        ))
    return tuple(out)


def manifest_for(config: Config, gateway: Gateway, worker: int = 0) -> Manifest:
    link, sig, proc = config.gateway_link, config.signalling, config.processor
    six = any(gateway.takes_ipv6(t) for t in gateway.traffic)
    return Manifest(
        version=MANIFEST_VERSION,
        name=gateway.name,
        kind=gateway.kind,
        source=gateway.source,
        worker=worker,
        workers=gateway.workers,
        netns=link.netns if link.mode == "namespace" else None,
        listen=Address(address=link.gateway_address.ip, port=gateway.listen_ports[worker]),
        listen6=link.gateway_address6.ip if six else None,
        signalling=SignallingSpec(
            listen=Address(address=link.gateway_address.ip, port=config.gateway_signalling_port(gateway.name, worker)),
            key_file=sig.key_file,
            query_timeout=sig.query_timeout,
            replay_window=sig.replay_window,
        ),
        processor=ProcessorSpec(
            pool=proc.pools.firewall_side,
            pool6=proc.pools.firewall_side6 if six else None,
            nodes=nodes(config, six),
        ),
        traffic=tuple(
            Selector(
                source=t.source, proto=t.proto, from_zone=t.from_zone, to_zone=t.to_zone,
                terminates=t.to_zone == ROUTER, ports=tuple(PortSpan(first=r.first, last=r.last) for r in t.ports),
            )
            for t in gateway.traffic
        ),
        config_dir=Path(os.path.abspath(config.path)).parent if config.path is not None else DEFAULT_CONFIG_DIR,
        run_dir=config.supervisor.control_socket.parent,
        settings=_json_settings(gateway),
    )


def _json_settings(gateway: Gateway) -> dict:
    """The kind's settings model as JSON values; the gateway validates them with the same model."""
    return gateway.settings.model_dump(mode="json")


def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"gateway-{name}.json"


def write(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` to ``path``, root-only, replacing any old one atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    os.replace(tmp, path)


def write_all(config: Config, directory: Path) -> dict[str, Path]:
    """One manifest per gateway process, by process name (``process_names``)."""
    paths = {}
    for gateway in config.gateways:
        for worker, name in enumerate(process_names(gateway)):
            path = manifest_path(directory, name)
            write(manifest_for(config, gateway, worker), path)
            paths[name] = path
    return paths
