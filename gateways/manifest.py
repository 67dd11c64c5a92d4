"""The gateway's manifest: everything one gateway process needs to know, and nothing else.

``nfgate run`` (firewall.supervisor) writes one manifest per configured
gateway, as JSON, root-only, into its run directory, and starts the gateway
with ``python -m gateways --manifest PATH``. The manifest is the whole
contract between the router and a gateway process (docs/manifest.md): the
gateway never reads the router's config and never re-derives the
processor's internals (pool slicing, signalling ports) from it.

It holds:

- ``name``, ``kind``, ``source`` (the ``[[gateway]]``'s key path, for messages);
- ``worker``, ``workers``: which of the gateway's worker processes this is
  (each has its own manifest, ``listen`` and signalling port);
- ``listen``: where the gateway accepts the flows the processor redirects to it;
- ``signalling``: the layer's own endpoint, the key file, the query timeout
  and replay window;
- ``processor``: the whole firewall-side pool and, per router (one, or the
  two nodes of an HA pair), its address on the gateway link and per instance
  its NFQUEUE number, its signalling port and its slices of the pool (the
  addresses it allocates F from, so that F alone names the router and the
  instance that own a flow);
- ``traffic``: the gateway's selectors (what the kernel steers to it);
- ``netns``, ``config_dir`` (where kind-specific files live, e.g. the
  tunnel's certificates), ``run_dir`` (where it may put sockets);
- ``settings``: the kind's validated settings, as JSON values.

``version`` is ``MANIFEST_VERSION``; a gateway refuses any other, so a
gateway and a supervisor of different releases fail at start, in one line,
instead of misreading each other.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from firewall.errors import UsageError
from firewall.signalling import Endpoint

MANIFEST_VERSION = 3  # 2: worker, workers; 3: processor.nodes (a router pair, gateways on their own host)
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; anything larger is not one


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Address(_Frozen):
    """An IP endpoint as the manifest writes it."""

    address: ipaddress.IPv4Address
    port: int

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self.port)

    @classmethod
    def of(cls, endpoint: Endpoint) -> "Address":
        return cls(address=endpoint.address, port=endpoint.port)


class SignallingSpec(_Frozen):
    listen: Address
    key_file: Path
    query_timeout: float
    replay_window: float


class InstanceSpec(_Frozen):
    """One packet processor instance: its queue, where it listens, the F it allocates."""

    queue: int
    port: int
    slices: tuple[ipaddress.IPv4Network, ...]
    slices6: tuple[ipaddress.IPv6Network, ...] = ()  # its slices of pool6 (a gateway that takes IPv6)


class NodeSpec(_Frozen):
    """One router's processor: where its instances listen, and their slices of the pool."""

    name: str  # the [ha] node's name, or "router" for a router alone
    address: ipaddress.IPv4Address  # the router's address on the gateway link: every instance listens here
    instances: tuple[InstanceSpec, ...]


class ProcessorSpec(_Frozen):
    pool: ipaddress.IPv4Network  # the whole firewall-side pool (both nodes' halves with [ha])
    pool6: ipaddress.IPv6Network | None = None  # the IPv6 pool (a gateway that takes IPv6), sliced as pool is
    nodes: tuple[NodeSpec, ...]  # one router, or the pair's two nodes in node order (flow ids' node bit)


class PortSpan(_Frozen):
    first: int
    last: int

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


class Selector(_Frozen):
    """One ``[[gateway.traffic]]``: what the kernel steers to this gateway."""

    source: str
    proto: Literal["tcp", "udp"]
    from_zone: str
    to_zone: str
    terminates: bool  # to the router itself: the gateway is the flow's end
    ports: tuple[PortSpan, ...]


class Manifest(_Frozen):
    version: int
    name: str
    kind: str
    source: str
    worker: int = 0  # this process: worker i of the gateway's ``workers``
    workers: int = 1
    netns: str | None  # None: the gateways run on their own host (gateway_link.mode = "host")
    listen: Address
    listen6: ipaddress.IPv6Address | None = None  # a kind that takes IPv6 listens here too, on listen's port
    signalling: SignallingSpec
    processor: ProcessorSpec
    traffic: tuple[Selector, ...]
    config_dir: Path
    run_dir: Path
    settings: dict[str, Any]

    @property
    def process_name(self) -> str:
        """The gateway's name, with ``#i`` for worker i of several (logs, the supervisor's children)."""
        return self.name if self.workers == 1 else f"{self.name}#{self.worker}"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def load(path: str | Path) -> Manifest:
    """Read and check a manifest; UsageError (one line) if it cannot be used."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise UsageError(f"{path}: cannot read the gateway manifest ({err.strerror or err})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes: not a gateway manifest")
    return parse(data, path)


def parse(data: bytes | str, path: str | Path = "manifest") -> Manifest:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not a JSON gateway manifest ({err})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != MANIFEST_VERSION:
        raise UsageError(
            f"{path}: manifest version {version!r}, this gateway reads version {MANIFEST_VERSION} "
            "(the supervisor and the gateways come from different releases: restart nfgate run)"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UsageError(f"{path}: {where}: {first['msg']} ({err.error_count()} problem(s) in the manifest)") from None
