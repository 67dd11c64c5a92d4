"""Drive ``FtpControl`` with scripted dialogues, for the core tests (no sockets).

A dialogue is a list of steps: ``("server", bytes)`` or ``("client", bytes)``.
``run`` feeds each step to the core, cut into pieces by a chunker (whole, byte
by byte, split at one offset), answers every ``RequestRule`` at once (granted
unless told otherwise), and returns the ``Transcript``: everything each peer
received, the rules asked for, the closes, and the events. A dialogue fed in
any chunking must give the same transcript.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from gateways.ftp.core import (
    Close,
    Event,
    FtpControl,
    Opaque,
    Output,
    Parties,
    Policy,
    RequestRule,
    ToClient,
    ToServer,
)

A = ipaddress.IPv4Address

# Inbound: a wan client C reaches the lan server S through the port forward W:21 -> S:21.
C_EXT = A("203.0.113.10")
W = A("203.0.113.1")
S_LAN = A("192.168.1.10")
INBOUND = Parties(client=C_EXT, server=S_LAN, client_addressed=W, client_seen_as=C_EXT)
# Outbound: a lan client behind masquerade reaches a wan server; the server sees W.
C_LAN = A("192.168.1.10")
S_EXT = A("203.0.113.10")
OUTBOUND = Parties(client=C_LAN, server=S_EXT, client_addressed=S_EXT, client_seen_as=W)

LOGIN = [
    ("server", b"220 (vsFTPd 3.0.3)\r\n"),
    ("client", b"USER ftp\r\n"),
    ("server", b"331 Please specify the password.\r\n"),
    ("client", b"PASS secret\r\n"),
    ("server", b"230 Login successful.\r\n"),
]

Step = tuple[str, bytes]
Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def split_at(offset: int) -> Chunker:
    def chunks(data: bytes) -> Iterator[bytes]:
        k = min(offset, len(data))
        if k:
            yield data[:k]
        if data[k:]:
            yield data[k:]

    return chunks


@dataclass
class Transcript:
    to_client: bytes = b""
    to_server: bytes = b""
    rules: list[RequestRule] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    opaque: list[Opaque] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def client_lines(self) -> list[bytes]:
        return [line for line in self.to_client.split(b"\r\n") if line]

    def same_as(self, other: "Transcript") -> bool:
        """Equal in everything but the rule tokens' numbering and the events' order."""
        strip = lambda rules: [(r.direction, r.src, r.dst, r.mode, r.inspect) for r in rules]  # noqa: E731
        return (
            self.to_client == other.to_client
            and self.to_server == other.to_server
            and strip(self.rules) == strip(other.rules)
            and self.closes == other.closes
            and self.opaque == other.opaque
            and sorted(self.names()) == sorted(other.names())
        )


class Driver:
    """One core and its transcript; answers rule requests with ``grant``."""

    def __init__(self, parties: Parties = INBOUND, policy: Policy = Policy(), grant: Callable[[RequestRule], bool] = lambda r: True):
        self.core = FtpControl(parties, policy)
        self.grant = grant
        self.t = Transcript()

    def take(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, ToClient):
                self.t.to_client += out.data
            elif isinstance(out, ToServer):
                self.t.to_server += out.data
            elif isinstance(out, RequestRule):
                self.t.rules.append(out)
                self.take(self.core.rule_answered(out.token, self.grant(out)))
            elif isinstance(out, Close):
                self.t.closes.append(out.reason)
            elif isinstance(out, Opaque):
                self.t.opaque.append(out)
            elif isinstance(out, Event):
                self.t.events.append(out)
            else:  # pragma: no cover
                raise AssertionError(out)

    def client(self, data: bytes) -> None:
        self.take(self.core.client_data(data))

    def server(self, data: bytes) -> None:
        self.take(self.core.server_data(data))


def run(
    steps: list[Step],
    *,
    parties: Parties = INBOUND,
    policy: Policy = Policy(),
    chunker: Chunker = whole,
    grant: Callable[[RequestRule], bool] = lambda r: True,
) -> Transcript:
    d = Driver(parties, policy, grant)
    for side, data in steps:
        for piece in chunker(data):
            (d.client if side == "client" else d.server)(piece)
    return d.t


def every_chunking(steps: list[Step]) -> Iterator[tuple[str, Chunker]]:
    """Whole, byte by byte, and split at every offset of the longest step."""
    yield "whole", whole
    yield "bytewise", bytewise
    for k in range(1, max(len(data) for _, data in steps)):
        yield f"split@{k}", split_at(k)
