"""The field types every nfgate TOML file shares, for its pydantic models.

Each type is ``Annotated`` with one check that raises today's one-line
reason (``'x' is not an IP address``, ``70000 is out of range (0 to
65535)``) and the JSON Schema an editor checks the same value with. A check
never coerces across TOML types: ``port = "25"`` is a string, not a port,
except where a string form is documented (port ranges, hex marks).

Neutral ground: only pydantic, the standard library and
``firewall.problems``, so the gateways and the tunnel declare their settings
with these types without importing the router's config.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainValidator, ValidationInfo, WithJsonSchema, model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from firewall.problems import Problem, kind_of

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ROUTER = "router"  # the pseudo-zone for the firewall itself (input/output)
NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}"  # a gateway or rule name; signalling carries it in 32 bytes
IFNAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,14}"


class Frozen(BaseModel):
    """A validated TOML table: immutable, and an unknown key is an error, never
    ignored (a misspelt ``fail_mode`` silently falling back to a default is how
    a firewall ends up open)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def fail(reason: str) -> NoReturn:
    """Refuse a value with ``reason`` (its key path comes from where it stands)."""
    raise PydanticCustomError("nfgate", "{reason}", {"reason": reason})


def report(info: ValidationInfo, path: str, reason: str) -> None:
    """A check across fields: into the context's problems (every one at
    once); without a context (a model built in code) it refuses at once."""
    sink = (info.context or {}).get("problems")
    if sink is None:
        fail(f"{path}: {reason}")
    sink.append(Problem(path, reason))


def typed(check: Any, schema: dict[str, Any], py: Any = Any) -> Any:
    """``py`` checked by ``check`` (which raises with ``fail``), shown as ``schema``."""
    return Annotated[py, PlainValidator(check), WithJsonSchema(schema)]


def Int(lo: int, hi: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {kind_of(value)}")
        if not lo <= value <= hi:
            fail(f"{value} is out of range ({lo} to {hi})")
        return value

    return typed(check, {"type": "integer", "minimum": lo, "maximum": hi}, int)


def Number(lo: float, hi: float) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"expected a number, got {kind_of(value)}")
        if not lo <= value <= hi:
            fail(f"{value} is out of range ({lo} to {hi})")
        return float(value)

    return typed(check, {"type": "number", "minimum": lo, "maximum": hi}, float)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        fail(f"expected true or false, got {kind_of(value)}")
    return value


Bool = typed(_boolean, {"type": "boolean"}, bool)


def Choice(*options: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            fail(f"{value!r} is not one of {', '.join(repr(o) for o in options)}")
        return value

    return typed(check, {"enum": list(options)}, str)


def _string(pattern: str | None, what: str) -> Any:
    regex = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str):
            fail(f"expected a string, got {kind_of(value)}")
        if regex and not regex.fullmatch(value):
            fail(f"{value!r} is not {what or 'valid'}")
        return value

    return check


def String(pattern: str | None = None, what: str = "") -> Any:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = f"^(?:{pattern})$"
    return typed(_string(pattern, what), schema, str)


_absolute = _string(r"/.+", "an absolute path")


def absolute_path(value: Any) -> Path:
    return Path(_absolute(value))


AbsPath = typed(absolute_path, {"type": "string", "pattern": "^/"}, Path)
IfName = String(IFNAME, "an interface name (1-15 characters: letters, digits, _ . -)")
Name = String(NAME, "a name (letters, digits, _ . -)")


def _network(value: Any) -> IPNetwork:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if not isinstance(value, str):
        fail(f"expected an address or prefix string, got {kind_of(value)}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        fail(f"{value!r} is not an address or prefix ({err})")


def _address(value: Any) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value  # already checked: one bare item of a ListOf(Address, allow_scalar=True)
    if not isinstance(value, str):
        fail(f"expected an address string, got {kind_of(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        fail(f"{value!r} is not an IP address")


def interface(parse: Any, expected: str, what: str) -> Any:
    """An address with its prefix length ("172.31.255.1/30"), read by ``parse``."""

    def check(value: Any) -> Any:
        if not isinstance(value, str) or "/" not in value:
            fail(f"expected {expected}, got {value!r}")
        try:
            return parse(value)
        except ValueError:
            fail(f"{value!r} is not {what}")

    return check


def ordered(low: str, high: str, table: str) -> Any:
    """A model check: key ``high`` of ``[table]`` is at least key ``low``."""

    def check(self: Any, info: ValidationInfo) -> Any:
        if getattr(self, low) > getattr(self, high):
            report(info, f"{table}.{high}", f"must be at least {low}")
        return self

    return model_validator(mode="after")(check)


Network = typed(_network, {"type": "string", "description": "an address or prefix, e.g. 10.0.0.0/8"}, IPNetwork)
Address = typed(_address, {"type": "string", "description": "an IPv4 or IPv6 address"}, IPAddress)
IPv4Iface = typed(
    interface(ipaddress.IPv4Interface, "an IPv4 address with prefix length like '10.0.0.1/30'",
              "an IPv4 address with prefix length"),
    {"type": "string", "pattern": "/"},
    ipaddress.IPv4Interface,
)
IPv6Iface = typed(
    interface(ipaddress.IPv6Interface, "an IPv6 address with prefix length like 'fd00::1/64'",
              "an IPv6 address with prefix length"),
    {"type": "string", "pattern": "/"},
    ipaddress.IPv6Interface,
)


def bitmask(value: Any) -> int:
    """A 32-bit mark value, given as an integer or a "0x..." string."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            fail(f"{value!r} is not an integer (write 0x00010000 or 65536)")
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"expected an integer or a hex string, got {kind_of(value)}")
    if not 0 < value <= 0xFFFFFFFF:
        fail(f"{value:#x} is not a non-zero 32-bit mark")
    return value


Bitmask = typed(
    bitmask,
    {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF},
               {"type": "string", "pattern": "^(0[xX][0-9a-fA-F]+|[0-9]+)$"}]},
    int,
)


def _array(scalar: Any) -> Any:
    def check(value: Any) -> Any:
        if scalar is not None and not isinstance(value, (list, tuple)):
            return [scalar(value)]  # its problem at the key, not at [0]
        if not isinstance(value, (list, tuple)):
            fail(f"expected an array, got {kind_of(value)}")
        return value

    return BeforeValidator(check)


class _ScalarOrArray:
    """JSON Schema of a list that also takes one bare item."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        return {"anyOf": [schema.get("items", {}), schema]}


def ListOf(item: Any, allow_scalar: bool = False) -> Any:
    """An array of ``item`` (each problem at its index); with ``allow_scalar``
    one bare item too (``saddr = "10.0.0.0/8"``)."""
    if allow_scalar:
        (plain,) = [m for m in item.__metadata__ if isinstance(m, PlainValidator)]
        return Annotated[tuple[item, ...], _array(plain.func), _ScalarOrArray()]
    return Annotated[tuple[item, ...], _array(None)]


def Tables(item: Any, key: str) -> Any:
    """An array of tables (``[[key]]``); absent means empty."""

    def check(value: Any) -> Any:
        if not isinstance(value, list):
            fail(f"expected an array of tables ([[{key}]]), got {kind_of(value)}")
        return value

    return Annotated[tuple[item, ...], BeforeValidator(check)]


def unique(items: Any, what: str) -> Any:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            fail(f"{what} {item!s} appears twice")
        seen.add(item)
    return items


def Removed(reason: str) -> Any:
    """A key that once was a setting: refused with what to do instead, which
    says more than "unknown key". Not in the JSON Schema."""

    def check(value: Any) -> None:
        fail(reason)

    return SkipJsonSchema[Annotated[Any, PlainValidator(check)]]


# ---- ports -----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __len__(self) -> int:
        return self.last - self.first + 1

    def overlaps(self, other: "PortRange") -> bool:
        return self.first <= other.last and other.first <= self.last


def port_range(item: Any) -> PortRange:
    """25, "25" or "1000-2000"."""
    if isinstance(item, PortRange):
        return item
    if isinstance(item, int) and not isinstance(item, bool):
        first = last = item
    elif isinstance(item, str):
        lo, sep, hi = item.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            fail(f"{item!r} is not a port or a range like '1000-2000'")
    else:
        fail(f"expected a port number or a 'first-last' string, got {item!r}")
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        fail(f"{item!r}: ports are 1 to 65535")
    if first > last:
        fail(f"{item!r}: the range runs backwards")
    return PortRange(first, last)


def _disjoint(ranges: tuple[PortRange, ...]) -> tuple[PortRange, ...]:
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            if a.overlaps(b):
                fail(f"port ranges {a} and {b} overlap")
    return tuple(sorted(ranges))


SinglePortRange = typed(
    port_range,
    {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
               {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"}]},
    PortRange,
)
# 25, "25", "1000-2000", or an array of those; sorted, none overlapping.
Ports = Annotated[ListOf(SinglePortRange, allow_scalar=True), AfterValidator(_disjoint)]
