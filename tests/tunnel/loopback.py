"""A control server and mediators in one event loop, on 127.0.0.1: fast, no netns.

The adapters are tested end to end here (TLS, pin, tokens, relays, the
control socket); the netns tests add what needs a real NAT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firewall.control import ask
from tunnel import keygen, tls
from tunnel.config import MediatorConfig, ServerConfig, load_mediators
from tunnel.events import EventLog
from tunnel.mediator import Mediator
from tunnel.operator import ControlSocket
from tunnel.pacing import BackoffSettings
from tunnel.policy import Op, Rule
from tunnel.server import StandaloneFrontend, TunnelServer

LOCAL = ipaddress.ip_address("127.0.0.1")
TOKEN = "t0ken-for-the-loopback-tests-0123"
FAST_RECONNECT = BackoffSettings(initial=0.05, maximum=0.2, stable_after=5.0)
WAIT = 10.0  # seconds any single step of a loopback test may take


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the service port needs both)."""
    for _ in range(100):
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(type=socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free port")


def write_files(directory: Path, mediators: str | None = None) -> str:
    """Server key, certificate and mediators file; returns the pin."""
    pin = keygen.write_identity(directory / "server.crt", directory / "server.key", "loopback", force=True)
    path = directory / "mediators.toml"
    path.write_text(
        mediators
        if mediators is not None
        else f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["1024-65535"]\n'
        f'[mediator.m2]\ntoken = "{TOKEN}-two"\npublish_ports = ["1024-65535"]\n'
    )
    os.chmod(path, 0o600)
    return pin


@dataclass
class Loopback:
    directory: Path
    config: ServerConfig
    server: TunnelServer
    control: ControlSocket
    pin: str
    mediators: list[tuple[Mediator, asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)

    def mediator_config(self, **changes: Any) -> MediatorConfig:
        base = MediatorConfig(
            identity="m1", token=TOKEN.encode(), server="127.0.0.1", pin=tls.parse_pin(self.pin),
            service_port=self.config.service_port, interfaces=(ipaddress.ip_interface("127.0.0.1/8"),),
            allow=(Rule(ipaddress.ip_network("127.0.0.0/8"), ops=frozenset({Op.CONNECT, Op.SEND})),),
            reconnect=FAST_RECONNECT,
        )
        return dataclasses.replace(base, **changes)

    def start_mediator(self, **changes: Any) -> Mediator:
        mediator = Mediator(self.mediator_config(**changes), EventLog("mediator"))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(mediator.run(stop))
        self.mediators.append((mediator, stop, task))
        return mediator

    async def stop_mediator(self, mediator: Mediator) -> None:
        for entry in list(self.mediators):
            if entry[0] is mediator:
                entry[1].set()
                await asyncio.wait_for(entry[2], WAIT)
                self.mediators.remove(entry)

    async def session(self, identity: str = "m1", timeout: float = WAIT) -> Any:
        session = await self.server.wait_session(identity, timeout)
        assert session is not None, f"{identity} did not connect"
        return session

    async def ask(self, **request: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, ask, self.config.control_socket, request, WAIT)


@asynccontextmanager
async def loopback(directory: Path, mediators: str | None = None, **changes: Any) -> AsyncIterator[Loopback]:
    pin = write_files(directory, mediators)
    config = dataclasses.replace(
        ServerConfig(
            listen=LOCAL, service_port=free_port(), public_address=LOCAL, cert=directory / "server.crt",
            key=directory / "server.key", mediators_file=directory / "mediators.toml",
            control_socket=directory / "control.sock", request_timeout=3.0,
        ),
        **changes,
    )
    server = TunnelServer(config, load_mediators(config.mediators_file, config), StandaloneFrontend(), EventLog("server"))
    await server.start()
    control = ControlSocket(server, config.control_socket)
    await control.start()
    lb = Loopback(directory, config, server, control, pin)
    try:
        yield lb
    finally:
        for _, stop, task in lb.mediators:
            stop.set()
        for _, _, task in lb.mediators:
            try:
                await asyncio.wait_for(task, WAIT)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        control.close()
        await server.close()


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    """A TCP echo that half-closes when its client does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class UdpEcho(asyncio.DatagramProtocol):
    """Answers each datagram with its bytes and counts them."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


async def udp_echo() -> tuple[UdpEcho, int]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    return protocol, transport.get_extra_info("sockname")[1]


async def until(predicate: Any, timeout: float = WAIT, what: str = "a condition") -> Any:
    """Poll ``predicate`` on the loop (never a fixed sleep), bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


class ThreadedEcho:
    """An echo target on 127.0.0.1 in threads (for relays in other processes
    than this loop): echoes until EOF, then closes; ``timeout`` bounds each
    connection's silence."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass
