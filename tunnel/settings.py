"""Every limit and timer of the tunnel protocol, as named settings.

Each value is a field with its default and the reason for it. The cores take
these dataclasses; the config layer (a later part) maps the TOML onto them,
so a core never reads the config (STYLE.md, "Policy is separate").
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.datagrams import DEFAULT_REPLAY_WINDOW
from tunnel.frames import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE, SUPPORTED_VERSIONS

# Seed, "3. Maintain channel": the client sends a maintain channel packet
# "before the end of the TTL of the channel in question". RFC 4787 REQ-5 asks
# NATs to keep a UDP mapping for 2 minutes, but many home NATs drop it after
# 30 s; 25 s stays under that (it is also WireGuard's persistent keepalive).
DEFAULT_KEEPALIVE_INTERVAL = 25.0
# Declared dead after this many intervals without a frame: one lost keepalive
# (or its ACK) is tolerated, a peer that has vanished is noticed in 75 s.
DEFAULT_DEAD_AFTER = 3


def _check_common(versions: tuple[int, ...], max_frame_size: int, dead_after: int) -> None:
    if not versions or any(not 0 < v < 256 for v in versions):
        raise ValueError(f"versions {versions!r}: need one or more of 1..255")
    if max_frame_size < MIN_MAX_FRAME_SIZE:
        raise ValueError(
            f"max_frame_size {max_frame_size} < {MIN_MAX_FRAME_SIZE}: a whole UDP datagram must fit"
        )
    if dead_after < 1:
        raise ValueError("dead_after must be at least 1 interval")


@dataclass(frozen=True)
class MediatorSettings:
    """The mediation system's settings (the private side of the tunnel)."""

    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    """Protocol versions offered in HELLO; the server picks the highest common."""
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    """Seconds between KEEPALIVEs on the TCP channel and on each UDP channel.
    Must stay below the NAT's mapping TTL (seed, "Maintain channel")."""
    dead_after: int = DEFAULT_DEAD_AFTER
    """The server is dead after this many intervals without a frame."""
    init_timeout: float = 10.0
    """Seconds to wait for INIT_OK/INIT_ERR after HELLO."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame (header + body) accepted from the server."""
    max_ports: int = 1024
    """Live port and connection ids at once; protects the mediator's host."""
    max_pending: int = 64
    """Server requests waiting for a socket result at once (open, connect...)."""
    replay_window: int = DEFAULT_REPLAY_WINDOW
    """Width of the anti-replay window of each UDP channel."""

    def __post_init__(self) -> None:
        _check_common(self.versions, self.max_frame_size, self.dead_after)
        if not 0 < self.keepalive_interval < 2**32 / 1000:
            raise ValueError("keepalive_interval must be positive and fit in u32 milliseconds")
        if self.init_timeout <= 0 or self.max_ports < 1 or self.max_pending < 1:
            raise ValueError("init_timeout, max_ports and max_pending must be positive")
        if self.replay_window < 1:
            raise ValueError("replay_window must be at least 1")


@dataclass(frozen=True)
class ServerSettings:
    """The control server's settings, the same for every mediator."""

    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    """Protocol versions the server speaks."""
    hello_timeout: float = 10.0
    """Seconds a new channel may take to send HELLO."""
    dead_after: int = DEFAULT_DEAD_AFTER
    """A mediator is dead after this many of *its* keepalive intervals
    without a frame."""
    min_keepalive_interval: float = 1.0
    """Shortest keepalive interval a mediator may announce (load bound)."""
    max_keepalive_interval: float = 600.0
    """Longest one: dead-peer detection must still happen within the hour."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame (header + body) accepted from a mediator."""
    replay_window: int = DEFAULT_REPLAY_WINDOW
    """Width of the anti-replay window of each UDP channel."""
    udp_channels: bool = True
    """Send UDP_KEY on READY, so that REDIRECT_PORT can be used."""

    def __post_init__(self) -> None:
        _check_common(self.versions, self.max_frame_size, self.dead_after)
        if not 0 < self.min_keepalive_interval <= self.max_keepalive_interval:
            raise ValueError("need 0 < min_keepalive_interval <= max_keepalive_interval")
        if self.hello_timeout <= 0 or self.replay_window < 1:
            raise ValueError("hello_timeout and replay_window must be positive")


@dataclass(frozen=True)
class MediatorLimits:
    """What the server lets one mediator have at once.

    The server publishes services through the mediator; these bound how much
    of the mediator's host (ports, sockets) one session can use, and how
    many requests it can pile up. Requests in flight count, so pipelining
    cannot overshoot.
    """

    max_ports: int = 16
    """Ports opened or redirected (OPEN_PORT + REDIRECT_PORT)."""
    max_connections: int = 64
    """TCP connections: connected ports plus accepted connections."""
    max_pending: int = 32
    """Requests sent and not yet answered."""

    def __post_init__(self) -> None:
        if self.max_ports < 0 or self.max_connections < 0 or self.max_pending < 1:
            raise ValueError("limits must be non-negative (max_pending at least 1)")
