"""A small, strict reader for parsed TOML that collects every problem at once.

The config loader walks the TOML document through ``Table`` objects. Each
``take`` records the key as known, converts and checks the value, and on a
problem appends ``(key path, reason)`` instead of raising, so that one run of
``nfgate check`` reports every error (DESIGN.md invariant 10). ``finish``
reports the keys nobody took: an unknown key is an error, never ignored,
because a misspelt ``fail_mode`` silently falling back to a default is how a
firewall ends up open.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MISSING: Any = object()


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path} (line {self.line})" if self.line else self.path
        return f"{where}: {self.reason}"


class Problems(list[Problem]):
    def add(self, path: str, reason: str) -> None:
        self.append(Problem(path, reason))


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Table:
    """One TOML table being read; remembers which keys were taken."""

    def __init__(self, data: Any, path: str, problems: Problems):
        self.path = path
        self.problems = problems
        if not isinstance(data, dict):
            problems.add(path or "(top level)", f"expected a table, got {_kind(data)}")
            data = {}
        self.data: dict[str, Any] = data
        self.taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data

    def take(
        self,
        key: str,
        convert: Callable[[Any, str, Problems], Any],
        default: Any = MISSING,
    ) -> Any:
        """Return the converted value, the default, or None after recording a problem."""
        self.taken.add(key)
        path = join(self.path, key)
        if key not in self.data:
            if default is MISSING:
                self.problems.add(path, "is required")
                return None
            return default
        return convert(self.data[key], path, self.problems)

    def table(self, key: str, required: bool = False) -> "Table":
        self.taken.add(key)
        path = join(self.path, key)
        if key not in self.data:
            if required:
                self.problems.add(path, "is required")
            return Table({}, path, self.problems)
        return Table(self.data[key], path, self.problems)

    def tables(self, key: str) -> list["Table"]:
        """An array of tables (``[[key]]``); absent means empty."""
        self.taken.add(key)
        path = join(self.path, key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.problems.add(path, f"expected an array of tables ([[{key}]]), got {_kind(value)}")
            return []
        return [Table(item, join(path, i), self.problems) for i, item in enumerate(value)]

    def finish(self) -> None:
        for key in self.data:
            if key not in self.taken:
                self.problems.add(join(self.path, key), "unknown key")


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# ---- converters: (value, path, problems) -> converted value or None ----------


def string(pattern: str | None = None, what: str = "") -> Callable[[Any, str, Problems], Any]:
    regex = re.compile(pattern) if pattern else None

    def convert(value: Any, path: str, problems: Problems) -> str | None:
        if not isinstance(value, str):
            problems.add(path, f"expected a string, got {_kind(value)}")
            return None
        if regex and not regex.fullmatch(value):
            problems.add(path, f"{value!r} is not {what or 'valid'}")
            return None
        return value

    return convert


def choice(*options: str) -> Callable[[Any, str, Problems], Any]:
    def convert(value: Any, path: str, problems: Problems) -> str | None:
        if value not in options:
            shown = ", ".join(repr(o) for o in options)
            problems.add(path, f"{value!r} is not one of {shown}")
            return None
        return value

    return convert


def boolean(value: Any, path: str, problems: Problems) -> bool | None:
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {_kind(value)}")
        return None
    return value


def integer(lo: int, hi: int) -> Callable[[Any, str, Problems], Any]:
    def convert(value: Any, path: str, problems: Problems) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"expected an integer, got {_kind(value)}")
            return None
        if not lo <= value <= hi:
            problems.add(path, f"{value} is out of range ({lo} to {hi})")
            return None
        return value

    return convert


def number(lo: float, hi: float) -> Callable[[Any, str, Problems], Any]:
    def convert(value: Any, path: str, problems: Problems) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(path, f"expected a number, got {_kind(value)}")
            return None
        if not lo <= value <= hi:
            problems.add(path, f"{value} is out of range ({lo} to {hi})")
            return None
        return float(value)

    return convert


def bitmask(value: Any, path: str, problems: Problems) -> int | None:
    """A 32-bit mark value, given as an integer or a "0x..." string."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            problems.add(path, f"{value!r} is not an integer (write 0x00010000 or 65536)")
            return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(path, f"expected an integer or a hex string, got {_kind(value)}")
        return None
    if not 0 < value <= 0xFFFFFFFF:
        problems.add(path, f"{value:#x} is not a non-zero 32-bit mark")
        return None
    return value


def listof(item: Callable[[Any, str, Problems], Any], allow_scalar: bool = False):
    def convert(value: Any, path: str, problems: Problems) -> tuple | None:
        if allow_scalar and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            problems.add(path, f"expected an array, got {_kind(value)}")
            return None
        out = [item(v, join(path, i), problems) for i, v in enumerate(value)]
        if any(v is None for v in out):
            return None
        return tuple(out)

    return convert


def network(value: Any, path: str, problems: Problems) -> IPNetwork | None:
    if not isinstance(value, str):
        problems.add(path, f"expected an address or prefix string, got {_kind(value)}")
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        problems.add(path, f"{value!r} is not an address or prefix ({err})")
        return None


def address(value: Any, path: str, problems: Problems) -> IPAddress | None:
    if not isinstance(value, str):
        problems.add(path, f"expected an address string, got {_kind(value)}")
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        problems.add(path, f"{value!r} is not an IP address")
        return None


def interface(value: Any, path: str, problems: Problems) -> ipaddress.IPv4Interface | None:
    """An IPv4 address with its prefix length, e.g. "172.31.255.1/30"."""
    if not isinstance(value, str) or "/" not in value:
        problems.add(path, f"expected an IPv4 address with prefix length like '10.0.0.1/30', got {value!r}")
        return None
    try:
        return ipaddress.IPv4Interface(value)
    except ValueError:
        problems.add(path, f"{value!r} is not an IPv4 address with prefix length")
        return None


IFNAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,14}"
ifname = string(IFNAME, "an interface name (1-15 characters: letters, digits, _ . -)")


def unique(items: Iterable[Any], path: str, what: str, problems: Problems) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            problems.add(path, f"{what} {item!s} appears twice")
        seen.add(item)
