"""Every limit and timer of the tunnel protocol, as named settings.

Each value is a field with its default and the reason for it. The cores take
these dataclasses; the config layer (tunnel/config.py, and
``TunnelGatewaySettings``, the tunnel gateway's ``[gateway.settings]``) maps
the TOML onto them, so a core never reads the config (STYLE.md, "Policy is
separate").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from firewall.fields import Frozen, Int, Number
from tunnel.datagrams import DEFAULT_REPLAY_WINDOW
from tunnel.frames import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE, SUPPORTED_VERSIONS
from tunnel.window import MAX_STREAM_WINDOW, STREAM_WINDOW

# Seed, "3. Maintain channel": the client sends a maintain channel packet
# "before the end of the TTL of the channel in question". RFC 4787 REQ-5 asks
# NATs to keep a UDP mapping for 2 minutes, but many home NATs drop it after
# 30 s, carrier-grade NATs sooner, and our own lab's NAT after 5 s (UDP) and
# 10 s (TCP established): 25 s failed there, silently (issue 14 E). Until the
# mediator learns the path's lifetime, the default is a floor that holds
# behind all of these: 2 s, at 12 bytes per interval on the TCP channel and
# 36 per UDP channel. The server's ``min_keepalive_interval`` (1 s) is the
# floor a mediator may announce, ``max_keepalive_interval`` (600 s) the ceiling.
DEFAULT_KEEPALIVE_INTERVAL = 2.0
# Declared dead after this many intervals without a frame. A busy channel
# delays answers (issue 14 B: a late ACK is no error), so a margin of several
# intervals: a peer that has vanished is noticed in 10 s at the default.
DEFAULT_DEAD_AFTER = 5
# Concurrent ports per mediator: "in the hundreds", bounded by memory
# (about 2.5 KB of Python state per idle relayed connection on the server,
# plus the kernel's socket buffers; docs/benchmarks.md) and by the mediator's
# file descriptors, whose soft limit both roles raise to the hard one.
DEFAULT_MAX_PORTS = 1024
# The event loops a tunnel process may run on (tunnel/aio.py, ``run_main``).
EventLoop = Literal["uvloop", "asyncio"]
# Version 5: how far a receiver grows one connection's window (tunnel/window.py)
# and what one channel's grown windows may add up to. 4 MiB carries one
# connection at about 670 Mbit/s across a 50 ms path (256 KiB: 42 Mbit/s),
# as OpenSSH's 2 MiB channel windows and browsers' HTTP/2 stream windows
# (6 MiB) do; the budget lets 8 connections of a channel grow that far at
# once, and bounds what slow readers can make one end hold to
# connections x 256 KiB + 32 MiB.
DEFAULT_STREAM_WINDOW_MAX = 4 << 20
DEFAULT_STREAM_WINDOW_BUDGET = 32 << 20


def _check_windows(stream_window_max: int, stream_window_budget: int) -> None:
    if not STREAM_WINDOW <= stream_window_max <= MAX_STREAM_WINDOW:
        raise ValueError(f"stream_window_max must be {STREAM_WINDOW} to {MAX_STREAM_WINDOW} bytes")
    if stream_window_budget < 0:
        raise ValueError("stream_window_budget must not be negative")


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
    max_ports: int = 4 * DEFAULT_MAX_PORTS
    """Live port and connection ids at once; protects the mediator's host.
    Above the server's default ``max_ports``, so the server's limit binds first."""
    max_pending: int = 256
    """Server requests waiting for a socket result at once (open, connect...)."""
    replay_window: int = DEFAULT_REPLAY_WINDOW
    """Width of the anti-replay window of each UDP channel."""
    keepalive_discovery: bool = True
    """Version 3: learn the NAT's idle UDP mapping lifetime on a spare socket
    (tunnel/lifetime.py) and keep the UDP channels alive at 0.8 of it."""
    keepalive_floor: float = 1.0
    """Shortest UDP channel keepalive interval discovery may choose (the
    server's ``min_keepalive_interval``)."""
    keepalive_ceiling: float = 120.0
    """Longest idle wait discovery probes (RFC 4787 REQ-5's 2 minutes); the
    interval is at most 0.8 of it."""
    stream_window_max: int = DEFAULT_STREAM_WINDOW_MAX
    """Version 5: the largest window the mediator grows a connection's to
    (what the server may have in flight towards one private host);
    ``STREAM_WINDOW`` keeps every window at 256 KiB."""
    stream_window_budget: int = DEFAULT_STREAM_WINDOW_BUDGET
    """Version 5: what the channel's grown windows may add up to, beyond
    256 KiB each: bounds what slow private hosts make the mediator hold."""

    def __post_init__(self) -> None:
        _check_common(self.versions, self.max_frame_size, self.dead_after)
        if not 0 < self.keepalive_floor <= self.keepalive_ceiling <= 3600:
            raise ValueError("need 0 < keepalive_floor <= keepalive_ceiling <= 3600")
        if not 0 < self.keepalive_interval < 2**32 / 1000:
            raise ValueError("keepalive_interval must be positive and fit in u32 milliseconds")
        if self.init_timeout <= 0 or self.max_ports < 1 or self.max_pending < 1:
            raise ValueError("init_timeout, max_ports and max_pending must be positive")
        if self.replay_window < 1:
            raise ValueError("replay_window must be at least 1")
        _check_windows(self.stream_window_max, self.stream_window_budget)


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
    stream_window_max: int = DEFAULT_STREAM_WINDOW_MAX
    """Version 5: the largest window the server grows a connection's to
    (what a mediator may have in flight towards one public client);
    ``STREAM_WINDOW`` keeps every window at 256 KiB."""
    stream_window_budget: int = DEFAULT_STREAM_WINDOW_BUDGET
    """Version 5: what one mediator's grown windows may add up to, beyond
    256 KiB each: bounds what slow public clients make the server hold."""

    def __post_init__(self) -> None:
        _check_common(self.versions, self.max_frame_size, self.dead_after)
        if not 0 < self.min_keepalive_interval <= self.max_keepalive_interval:
            raise ValueError("need 0 < min_keepalive_interval <= max_keepalive_interval")
        if self.hello_timeout <= 0 or self.replay_window < 1:
            raise ValueError("hello_timeout and replay_window must be positive")
        _check_windows(self.stream_window_max, self.stream_window_budget)


@dataclass(frozen=True)
class MediatorLimits:
    """What the server lets one mediator have at once.

    The server publishes services through the mediator; these bound how much
    of the mediator's host (ports, sockets) one session can use, and how
    many requests it can pile up. Requests in flight count, so pipelining
    cannot overshoot.
    """

    max_ports: int = DEFAULT_MAX_PORTS
    """Ports opened or redirected (OPEN_PORT + REDIRECT_PORT). Each public
    TCP connection of a publication takes one, so this is also how many
    clients a published service may have at once (issue 14 E: 16 reset the
    17th). A relayed connection costs the mediator one socket and the
    stream's window of buffer at most (docs/benchmarks.md has the figure)."""
    max_connections: int = DEFAULT_MAX_PORTS
    """TCP connections: connected ports plus accepted connections."""
    max_pending: int = 256
    """Requests sent and not yet answered: a burst of new public connections
    waits on these (one request each, section 17)."""

    def __post_init__(self) -> None:
        if self.max_ports < 0 or self.max_connections < 0 or self.max_pending < 1:
            raise ValueError("limits must be non-negative (max_pending at least 1)")


class TunnelGatewaySettings(Frozen):
    """The tunnel kind's ``[gateway.settings]``: the control server run as a
    gateway (docs/config.md; ``tunnel.service`` maps them onto ``ServerConfig``)."""

    service_port: Int(1, 65535) = Field(7443, description="the port mediators connect to (TCP channel and UDP channels)")
    publish_first: Int(0, 65535) = Field(0, description="first public port a mediator may publish by default (0: none)")
    publish_last: Int(0, 65535) = Field(0, description="last public port a mediator may publish by default")
    max_ports: Int(0, 65535) = Field(DEFAULT_MAX_PORTS, description="ports one mediator may have open (opened plus redirected)")
    max_connections: Int(0, 1_000_000) = Field(DEFAULT_MAX_PORTS, description="TCP connections one mediator may relay at once")
    max_pending: Int(1, 65535) = Field(256, description="requests to one mediator waiting for an answer")
    bytes_per_second: Number(0, 1e12) = Field(0, description="relay rate per mediator, both directions together (0: no cap)")
    burst_bytes: Number(65536, 1e12) = Field(
        4_194_304, description="bytes a mediator may relay at full speed before the rate applies")
    hello_timeout: Number(0.1, 600) = Field(10.0, description="seconds a new channel may take to send HELLO")
    dead_after: Int(1, 100) = Field(DEFAULT_DEAD_AFTER, description="keepalive intervals without a frame before a mediator is dead")
    min_keepalive_interval: Number(0.1, 3600) = Field(
        1.0, description="shortest keepalive interval a mediator may announce")
    max_keepalive_interval: Number(0.1, 86400) = Field(
        600.0, description="longest keepalive interval a mediator may announce")
    request_timeout: Number(0.1, 600) = Field(
        10.0, description="seconds to wait for a mediator's answer (and for a reconnect)")
    udp_idle_timeout: Number(1, 86400) = Field(
        60.0, description="seconds without a datagram before a published UDP flow ends")
    max_channels: Int(1, 1_000_000) = Field(4096, description="TCP channels at once, authenticated or not")
    tls_read_buffer: Int(16384, 1 << 20) = Field(262144, description="bytes of read buffer of a busy TLS channel")
    tls_idle_read_buffer: Int(1024, 1 << 20) = Field(
        4096, description="bytes of read buffer a TLS channel keeps while idle")
    channel_unsent: Int(16384, 1 << 26) = Field(
        131072, description="unsent bytes the kernel keeps queued on a TCP channel (a request's answer waits behind no more)")
    udp_buffer: Int(65536, 1 << 28) = Field(
        2 << 20, description="receive buffer of each UDP socket of the tunnel (a burst while the process is busy)")
    event_loop: EventLoop = Field(
        "uvloop", description="the event loop the gateway runs on: uvloop (faster per relayed event) or asyncio")
    republish_initial: Number(0.01, 3600) = Field(1.0, description="first retry delay of a publication that could not start")
    republish_max: Number(0.01, 86400) = Field(60.0, description="longest retry delay of such a publication")
    stream_window_max: Int(STREAM_WINDOW, MAX_STREAM_WINDOW) = Field(
        DEFAULT_STREAM_WINDOW_MAX, description="largest window a relayed connection's may grow to (protocol version 5)")
    stream_window_budget: Int(0, 1 << 34) = Field(
        DEFAULT_STREAM_WINDOW_BUDGET, description="what one mediator's grown windows may add up to, beyond 256 KiB each")
