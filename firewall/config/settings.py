"""Per-kind gateway settings: the keys each gateway kind accepts, with defaults.

Each gateway kind declares its settings here as data: key, converter, default
and a one-line meaning (docs/config.md lists the same). A key a kind does not
declare is refused, like any unknown key. Kinds whose gateway comes with a
later issue declare their keys with that issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from firewall.config.reader import Problems, Table, integer, number


@dataclass(frozen=True)
class Setting:
    convert: Callable[[Any, str, Problems], Any]
    default: Any
    meaning: str


# Which transport protocols each kind's traffic selectors may name.
KIND_PROTOS: dict[str, tuple[str, ...]] = {
    "smtp": ("tcp",),
    "ftp": ("tcp",),
    "rtp": ("udp",),
    "tcp-relay": ("tcp",),
    "udp-relay": ("udp",),
    "tunnel": ("tcp", "udp"),
}

_RELAY_TCP = {
    "max_connections": Setting(integer(1, 1_000_000), 1024, "concurrent connections; more are refused (RST)"),
    "idle_timeout": Setting(number(1, 86400), 300.0, "seconds without data in either direction before closing"),
    "connect_timeout": Setting(number(0.1, 300), 10.0, "seconds to open leg B to the server"),
}
_RELAY_UDP = {
    "max_flows": Setting(integer(1, 1_000_000), 4096, "concurrent UDP flows; more are dropped"),
    "idle_timeout": Setting(number(1, 86400), 60.0, "seconds without a datagram before the flow ends"),
}

KIND_SETTINGS: dict[str, dict[str, Setting]] = {
    "smtp": {},
    "ftp": {},
    "rtp": {},
    "tcp-relay": _RELAY_TCP,
    "udp-relay": _RELAY_UDP,
    "tunnel": {},
}


def read_settings(kind: str, table: Table) -> Mapping[str, Any] | None:
    schema = KIND_SETTINGS[kind]
    values = {key: table.take(key, s.convert, s.default) for key, s in schema.items()}
    table.finish()
    if any(v is None for v in values.values()):
        return None
    return MappingProxyType(values)
