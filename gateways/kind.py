"""What a gateway kind is: one declaration that the whole router reads.

A kind declares, in the module that implements it, one ``Kind``:

- ``name``: what ``[[gateway]] kind = ...`` says;
- ``protos``: the transport protocols its ``[[gateway.traffic]]`` selectors may name;
- ``terminates``: every selector must end at the router (``to = "router"``):
  the gateway is the flows' end, not a relay towards a server;
- ``settings``: the pydantic model of its ``[gateway.settings]``, defaults
  and one-line meanings written once (they are the JSON Schema's too);
- ``check``: problems of a whole ``[[gateway]]`` that no one field shows
  (the tunnel's service port must be steered to it), as (key path, reason);
- ``rule_modes``: the dynamic rules (RULE_REQUEST modes) it may ask the
  processor for; anything else is refused POLICY;
- ``adjacent_port``: given its settings, the step from a redirected flow's
  port N to the port the processor also opens for the same endpoints (RTP's
  RTCP on N + 1), or None;
- ``offload``: it may hand a verified UDP flow to the kernel (OFFLOAD_REQUEST);
- ``log_only``: given its settings, whether the processor lets its flows
  pass unbound and only tells the gateway of them (tcp-relay ``mode = "log-only"``);
- ``workers``: it may run as several worker processes (``[[gateway]] workers
  = N``), each with its own G:g and signalling port, the processor spreading
  new flows over the live ones (seed fig. 5b): its sessions are independent
  of each other, so a crash cuts one worker's sessions only;
- ``ipv6``: it takes IPv6 flows: its selectors queue IPv6 first packets as
  they do IPv4, the processor binds them on the IPv6 maps and sends family 6
  NEW_FLOW, and it listens on the blind track's IPv6 address too; a kind
  without it has its selectors' IPv6 dropped and counted (issue 17);
- ``event_loop``: given its settings, the event loop ``python -m gateways``
  runs it on: ``"asyncio"`` (the standard library's) or ``"uvloop"``
  (libuv: fewer instructions per connection and per wake-up);
- ``gateway``: its process entry point, ``"module:attribute"``, loaded only
  in the gateway process: a factory ``(layer, manifest, listen, log) ->
  relay`` run by ``python -m gateways`` on the shared deNAT/reNAT layer, or,
  with ``standalone``, a ``run(manifest, *, log_json)`` that runs the whole
  process itself (the tunnel).

``gateways.kinds`` registers every kind, one line each. The config (its
``[[gateway]]`` models and checks), the processor (rule policy, adjacent
ports, offload, log-only), the supervisor and ``python -m gateways`` read
the registry and nothing else about kinds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from firewall.signalling import RuleMode

# (key path, reason): one problem a kind's ``check`` reports about a [[gateway]].
Problem = tuple[str, str]


def _never(settings: Any) -> bool:
    return False


def _no_port(settings: Any) -> int | None:
    return None


def _asyncio(settings: Any) -> str:
    return "asyncio"


@dataclass(frozen=True)
class Kind:
    name: str
    protos: tuple[str, ...]
    settings: type[BaseModel]
    gateway: str
    standalone: bool = False
    terminates: bool = False
    check: Callable[[Any], Iterable[Problem]] | None = None
    rule_modes: frozenset[RuleMode] = frozenset()
    adjacent_port: Callable[[Any], int | None] = _no_port
    offload: bool = False
    log_only: Callable[[Any], bool] = _never
    workers: bool = False
    ipv6: bool = False
    event_loop: Callable[[Any], str] = _asyncio

    def __post_init__(self) -> None:
        if not self.protos or not set(self.protos) <= {"tcp", "udp"}:
            raise ValueError(f"kind {self.name}: protos must be tcp and/or udp, got {self.protos!r}")
        if ":" not in self.gateway:
            raise ValueError(f"kind {self.name}: gateway must be 'module:attribute', got {self.gateway!r}")

    def entry(self) -> Any:
        """The entry point, imported now (in the gateway process)."""
        module, _, attribute = self.gateway.partition(":")
        target: Any = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target


class Registry:
    """Every gateway kind, by name, in registration order."""

    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}

    def register(self, kind: Kind) -> Kind:
        if kind.name in self._kinds:
            raise ValueError(f"gateway kind {kind.name!r} is registered twice")
        self._kinds[kind.name] = kind
        return kind

    def __getitem__(self, name: str) -> Kind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self):
        return iter(self._kinds.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)
