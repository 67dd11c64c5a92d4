"""Verdict hooks the cores call: the mediator's allow-list, the server's login.

Policy is separate from protocol (STYLE.md, after aiosmtpd handlers): a core
asks a hook for a verdict, and a missing hook means the safe default --
refuse. The seed wants the tunnel to simplify "the security strategy applied
at the boundary of the private network, without compromising it" (seed,
statement of the problem); the owner's allow-list is how the mediator keeps
that promise when the server asks it to reach into the private network.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from tunnel.frames import Hello, IPAddress, Proto

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Op(enum.Enum):
    """What the server asks the mediator to do with an address and port."""

    OPEN = "open"  # bind a local port (address is one of the mediator's)
    REDIRECT = "redirect"  # bind a local UDP port and relay it over UDP
    CONNECT = "connect"  # connect to a private host
    LISTEN = "listen"  # accept connections on a local port
    SEND = "send"  # send a UDP datagram to a private host

    # A verdict cache key: identity is a member's hash (Enum's own is Python code).
    __hash__ = object.__hash__


class Policy(Protocol):
    """The mediator's allow-list hook."""

    def check(self, op: Op, address: IPAddress, port: int, proto: Proto) -> bool:
        """True if the owner allows ``op`` on address:port over ``proto``."""
        ...


class Authenticator(Protocol):
    """The server's login hook: does this HELLO identify a known mediator?"""

    def authenticate(self, hello: Hello) -> bool:
        """True if identity, token and service are acceptable."""
        ...


def _plain(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` is a.b.c.d (STYLE.md: compare values, not strings)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Rule:
    """Allow ``ops`` over ``protos`` to ``network`` ports first..last."""

    network: IPNetwork
    first_port: int = 1
    last_port: int = 65535
    protos: frozenset[Proto] = frozenset({Proto.TCP, Proto.UDP})
    ops: frozenset[Op] = frozenset(Op)

    def matches(self, op: Op, address: IPAddress, port: int, proto: Proto) -> bool:
        return self.first_port <= port <= self.last_port and self.covers(op, address, proto)

    def covers(self, op: Op, address: IPAddress, proto: Proto) -> bool:
        """``matches`` for some port (then its ports are ``first_port``..``last_port``)."""
        return (
            op in self.ops
            and proto in self.protos
            and address.version == self.network.version
            and address in self.network
        )


# (op, address, proto) an allow-list remembers the port ranges of (each about
# 200 bytes); all are forgotten when full.
VERDICTS = 4096


class AllowList:
    """A ``Policy`` from rules: allowed if any rule matches, else refused.

    The rules never change, so for each op, address and protocol asked
    about, the port ranges the rules allow there are remembered (up to
    ``VERDICTS`` of them): a new public connection asks twice (its target,
    and the client port it binds, a new one each time), a redirected UDP
    flow once per datagram, and a remembered answer is one dictionary
    look-up and a range test instead of every rule's network test."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._ranges: dict[tuple[Op, IPAddress, Proto], tuple[tuple[int, int], ...]] = {}

    def check(self, op: Op, address: IPAddress, port: int, proto: Proto) -> bool:
        ranges = self._ranges.get((op, address, proto))  # a redirected flow asks once a datagram
        if ranges is None:
            ranges = self._ranges_of(op, address, proto)
        for first, last in ranges:
            if first <= port <= last:
                return True
        return False

    def allows_all(self, op: Op, address: IPAddress, first: int, last: int, proto: Proto) -> bool:
        """Whether ``check`` allows every port from ``first`` to ``last``."""
        for low, high in sorted(self._ranges_of(op, address, proto)):
            if low > first:
                return False
            first = max(first, high + 1)
            if first > last:
                return True
        return False

    def _ranges_of(self, op: Op, address: IPAddress, proto: Proto) -> tuple[tuple[int, int], ...]:
        key = (op, address, proto)
        ranges = self._ranges.get(key)
        if ranges is None:
            plain = _plain(address)
            ranges = tuple((rule.first_port, rule.last_port) for rule in self.rules if rule.covers(op, plain, proto))
            if len(self._ranges) >= VERDICTS:
                self._ranges.clear()
            self._ranges[key] = ranges
        return ranges


class TokenAuthenticator:
    """An ``Authenticator`` from identity -> token, compared in constant time."""

    def __init__(self, tokens: Mapping[str, bytes]) -> None:
        self.tokens = dict(tokens)

    def authenticate(self, hello: Hello) -> bool:
        expected = self.tokens.get(hello.identity)
        return expected is not None and hmac.compare_digest(expected, hello.token)
