"""The floor of a Python tunnel: a stand-in that only relays, for scripts/bench_tunnel.py.

    python -m tests.tunnel.floor_tunnel server --channel HOST:PORT --public HOST:PORT --cert C --key K
    python -m tests.tunnel.floor_tunnel mediator --server HOST:PORT --target HOST:PORT

Not the tunnel, and not a test: the least a tunnel written in Python must
do per crossing, measured beside ``ssh -R`` in the same lab run. One TLS
1.3 channel from the mediator to the server (the tunnel's own contexts,
tunnel/tls.py; no pin, token or allow-list); the server accepts public
connections on one port and the mediator connects each to one target.
A frame is a 7-byte header (kind, stream id, length) and its bytes; a new
connection's first bytes ride in its OPEN (one crossing, as the tunnel's
version 4 does). No flow control, limits, logging or
signalling (the kernel's TCP keepalive holds the NAT's mapping), and no asyncio: one epoll loop over non-blocking sockets,
the channel an ``ssl.SSLSocket`` (OpenSSL reads and writes the socket
itself: no memory BIOs). Whatever the tunnel costs above this figure is
its own work; what this costs above ``ssh -R`` is Python's.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import select
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from tunnel import tls

HEADER = struct.Struct("!BIH")
OPEN, DATA, FIN = 1, 2, 3
READ = 262144
CHUNK = 65535  # a frame's bytes at most (the header's length field)
IN, OUT = select.EPOLLIN, select.EPOLLOUT


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def parse(inbox: bytearray, on_frame: Callable[[int, int, bytes], None]) -> None:
    """Hand each whole frame in ``inbox`` to ``on_frame`` and drop it from ``inbox``."""
    at = 0
    while len(inbox) - at >= HEADER.size:
        kind, sid, size = HEADER.unpack_from(inbox, at)
        end = at + HEADER.size + size
        if end > len(inbox):
            break
        on_frame(kind, sid, bytes(inbox[at + HEADER.size:end]))
        at = end
    del inbox[:at]


class Stream:
    __slots__ = ("sid", "sock", "out", "fin_out", "fin_in", "connecting", "mask")

    def __init__(self, sid: int, sock: socket.socket, connecting: bool = False) -> None:
        self.sid = sid
        self.sock = sock
        self.out = bytearray()  # bytes for the local socket, not yet sent
        self.fin_out = False  # the channel said FIN: shut our write side once out is empty
        self.fin_in = False  # the local socket said EOF
        self.connecting = connecting
        self.mask = OUT if connecting else IN


class Relay:
    """One channel and its streams, on one epoll."""

    def __init__(self, channel: ssl.SSLSocket, target: tuple[str, int] | None) -> None:
        self.channel = channel
        self.target = target
        self.poll = select.epoll()
        self.streams: dict[int, Stream] = {}
        self.by_fd: dict[int, Stream] = {}
        self.wire = bytearray()  # frames not yet written to the channel
        self.inbox = bytearray()  # channel bytes not yet parsed
        channel.setblocking(False)
        self.poll.register(channel.fileno(), IN)
        self.channel_mask = IN
        self.listener: socket.socket | None = None
        self.next_sid = 1

    # -- the channel ---------------------------------------------------------------

    def frame(self, kind: int, sid: int, data: bytes = b"") -> None:
        view = memoryview(data)
        while True:
            piece = view[:CHUNK]
            self.wire += HEADER.pack(kind, sid, len(piece))
            self.wire += piece
            view = view[CHUNK:]
            if not view:
                return
            kind = DATA

    def flush(self) -> None:
        while self.wire:
            try:
                sent = self.channel.send(self.wire)
            except (ssl.SSLWantWriteError, BlockingIOError):
                if self.channel_mask != IN | OUT:
                    self.channel_mask = IN | OUT
                    self.poll.modify(self.channel.fileno(), IN | OUT)
                return
            del self.wire[:sent]
        if self.channel_mask != IN:
            self.channel_mask = IN
            self.poll.modify(self.channel.fileno(), IN)

    def channel_readable(self) -> None:
        while True:
            try:
                data = self.channel.recv(READ)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not data:
                raise SystemExit("channel closed")
            self.inbox += data
        parse(self.inbox, self.on_frame)

    def on_frame(self, kind: int, sid: int, data: bytes) -> None:
        if kind == OPEN:
            assert self.target is not None
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(self.target)
            stream = Stream(sid, sock, connecting=True)
            self.streams[sid] = stream
            self.by_fd[sock.fileno()] = stream
            stream.out += data
            self.poll.register(sock.fileno(), OUT)
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
        if kind == DATA:
            stream.out += data
        else:
            stream.fin_out = True
        if not stream.connecting:
            self.drain(stream)

    # -- local sockets -------------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            try:
                first = sock.recv(READ)  # the request often came with the handshake's last ACK
            except BlockingIOError:
                first = b""
            except OSError:
                sock.close()  # reset already: no stream
                continue
            sid = self.next_sid
            self.next_sid += 1
            stream = Stream(sid, sock)
            self.streams[sid] = stream
            self.by_fd[sock.fileno()] = stream
            self.frame(OPEN, sid, first)
            self.poll.register(sock.fileno(), IN)

    def drain(self, stream: Stream) -> None:
        sock = stream.sock
        while stream.out:
            try:
                sent = sock.send(stream.out)
            except BlockingIOError:
                self.want(stream, (0 if stream.fin_in else IN) | OUT)
                return
            except OSError:
                stream.out.clear()
                stream.fin_in = stream.fin_out = True
                break
            del stream.out[:sent]
        if stream.fin_out:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.settle(stream)

    def settle(self, stream: Stream) -> None:
        if stream.fin_in and stream.fin_out and not stream.out:
            self.close(stream)
        else:
            self.want(stream, 0 if stream.fin_in else IN)

    def want(self, stream: Stream, mask: int) -> None:
        if stream.mask != mask:
            stream.mask = mask
            self.poll.modify(stream.sock.fileno(), mask)

    def close(self, stream: Stream) -> None:
        fd = stream.sock.fileno()
        self.poll.unregister(fd)
        del self.by_fd[fd]
        del self.streams[stream.sid]
        stream.sock.close()

    def local_event(self, stream: Stream, events: int) -> None:
        if stream.connecting:
            stream.connecting = False
            if stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.frame(FIN, stream.sid)
                stream.fin_in = stream.fin_out = True
                stream.out.clear()
                self.close(stream)
                return
            self.drain(stream)
            return
        if events & OUT:
            self.drain(stream)
            if stream.sid not in self.streams:
                return
        if events & (IN | select.EPOLLHUP | select.EPOLLERR) and not stream.fin_in:
            try:
                data = stream.sock.recv(READ)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self.frame(DATA, stream.sid, data)
                return
            stream.fin_in = True
            self.frame(FIN, stream.sid)
            self.settle(stream)

    def run(self) -> None:
        channel_fd = self.channel.fileno()
        listen_fd = self.listener.fileno() if self.listener else -1
        while True:
            for fd, events in self.poll.poll():
                if fd == channel_fd:
                    if events & OUT:
                        self.flush()
                    if events & IN:
                        self.channel_readable()
                elif fd == listen_fd:
                    self.accept()
                else:
                    stream = self.by_fd.get(fd)
                    if stream is not None:
                        self.local_event(stream, events)
            if self.wire:
                self.flush()


# -- the same on asyncio's protocols (uvloop), as the tunnel is built -----------------


class _Channel(asyncio.Protocol):
    """The TLS channel's end: frames in, frames out (one write each)."""

    def __init__(self, target: tuple[str, int] | None) -> None:
        self.target = target
        self.streams: dict[int, _Local] = {}
        self.inbox = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.up = asyncio.get_running_loop().create_future()  # the TLS handshake is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TLS transport is no asyncio.Transport
        if not self.up.done():
            self.up.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, kind: int, sid: int, data: bytes = b"") -> None:
        assert self.transport is not None
        view = memoryview(data)
        while True:
            piece = view[:CHUNK]
            self.transport.write(HEADER.pack(kind, sid, len(piece)) + piece)
            view = view[CHUNK:]
            if not view:
                return
            kind = DATA

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        parse(self.inbox, self.on_frame)

    def on_frame(self, kind: int, sid: int, data: bytes) -> None:
        if kind == OPEN:
            assert self.target is not None
            local = _Local(self, sid)
            self.streams[sid] = local
            local.pending += data
            asyncio.get_running_loop().create_task(self.connect(local))
            return
        local = self.streams.get(sid)
        if local is None:
            return
        if kind == DATA:
            if local.transport is None:
                local.pending += data
            else:
                local.transport.write(data)
        elif local.transport is None:
            local.fin_pending = True
        else:
            local.fin_out()

    async def connect(self, local: _Local) -> None:
        assert self.target is not None
        try:
            await asyncio.get_running_loop().create_connection(lambda: local, *self.target)
        except OSError:
            self.streams.pop(local.sid, None)
            self.send(FIN, local.sid)


class _Local(asyncio.Protocol):
    """A public connection (server) or a target connection (mediator)."""

    def __init__(self, channel: _Channel, sid: int) -> None:
        self.channel = channel
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.fin_pending = False
        self.eof_in = self.eof_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TLS transport is no asyncio.Transport
        if self.channel.target is None:  # a public connection: its first bytes ride in the OPEN
            first = b""
            try:
                first = os.read(transport.get_extra_info("socket").fileno(), READ)
            except BlockingIOError:
                pass
            except OSError:
                transport.abort()  # reset already: connection_lost ends the stream
            self.channel.send(OPEN, self.sid, first)
        if self.pending:
            transport.write(bytes(self.pending))
            self.pending.clear()
        if self.fin_pending:
            self.fin_out()

    def data_received(self, data: bytes) -> None:
        self.channel.send(DATA, self.sid, data)

    def eof_received(self) -> bool:
        self.eof_in = True
        self.channel.send(FIN, self.sid)
        self.settle()
        return True

    def fin_out(self) -> None:
        assert self.transport is not None
        self.eof_out = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.settle()

    def settle(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel.streams.pop(self.sid, None) is not None and not self.eof_in:
            self.channel.send(FIN, self.sid)


def channel_socket(args: argparse.Namespace) -> tuple[socket.socket, ssl.SSLContext]:
    """The mediator's TCP connection to the server, and the TLS context for it (no pin: a bench)."""
    context = tls.client_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(address(args.server))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The kernel's keepalive holds the lab NAT's mapping (10 s for an established TCP one) at no Python cost.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    return raw, context


async def serve_aio(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    context = tls.server_context(Path(args.cert), Path(args.key))
    accepted: asyncio.Future[_Channel] = loop.create_future()

    def channel_factory() -> _Channel:
        channel = _Channel(None)
        if not accepted.done():
            accepted.set_result(channel)
        return channel

    host, port = address(args.channel)
    await loop.create_server(channel_factory, host, port, ssl=context)
    next_sid = 0

    def public_factory() -> _Local:
        nonlocal next_sid
        next_sid += 1
        local = _Local(channel, next_sid)
        channel.streams[next_sid] = local
        return local

    print("ready", flush=True)
    channel = await accepted
    await channel.up  # public clients only once frames can go
    host, port = address(args.public)
    await loop.create_server(public_factory, host, port, backlog=1024)
    await channel.closed


async def mediate_aio(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    raw, context = channel_socket(args)
    raw.setblocking(False)
    _, channel = await loop.create_connection(lambda: _Channel(address(args.target)), sock=raw, ssl=context,
                                              server_hostname="")
    print("connected", flush=True)
    await channel.closed


def serve(args: argparse.Namespace) -> None:
    context = tls.server_context(Path(args.cert), Path(args.key))
    channel_listener = socket.create_server(address(args.channel), reuse_port=False)
    public = socket.create_server(address(args.public), backlog=1024)
    print("ready", flush=True)
    raw, _ = channel_listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    channel = context.wrap_socket(raw, server_side=True)
    channel_listener.close()
    relay = Relay(channel, None)
    public.setblocking(False)
    relay.listener = public
    relay.poll.register(public.fileno(), IN)
    relay.run()


def mediate(args: argparse.Namespace) -> None:
    raw, context = channel_socket(args)
    channel = context.wrap_socket(raw)
    print("connected", flush=True)
    Relay(channel, address(args.target)).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--channel", required=True)
    s.add_argument("--public", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    m = sub.add_parser("mediator")
    m.add_argument("--server", required=True)
    m.add_argument("--target", required=True)
    parser.add_argument("--loop", choices=("epoll", "uvloop"), default="epoll",
                        help="a bare epoll loop (default) or asyncio's protocols on uvloop, as the tunnel")
    args = parser.parse_args()
    # SIGTERM ends it as an exit (a profiler under which it runs writes its figures).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.loop == "epoll":
        (serve if args.mode == "server" else mediate)(args)
    else:
        import uvloop

        uvloop.run((serve_aio if args.mode == "server" else mediate_aio)(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
