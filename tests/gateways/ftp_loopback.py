"""Loopback pieces for the FTP gateway tests: a scripted FTP server and a line client.

The kernel's part is played as in ``loopback``: a "client" socket bound to
F:f connects to the gateway, and the "server" listens on the same F:f, where
leg B arrives. ``MiniFtp`` answers just enough of RFC 959 for the gateway to
act on (greeting, login, PASV/EPSV/PORT/EPRT, transfers) and records every
line it received.
"""

from __future__ import annotations

import asyncio
import ipaddress

from firewall.signalling import Endpoint
from gateways.ftp.parse import format_port

PASV_PORT = 50000


class MiniFtp:
    """A scripted FTP server for one or more control connections."""

    def __init__(self, address: ipaddress.IPv4Address, *, greeting: bytes = b"220 mini ready\r\n",
                 pasv_reply: bytes | None = None) -> None:
        self.address = address  # what it names in 227 (its own, as the signalling says)
        self.greeting = greeting
        self.pasv_reply = pasv_reply
        self.lines: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.greeting)
            while line := await reader.readline():
                line = line.rstrip(b"\r\n")
                self.lines.append(line)
                verb = line.split(b" ", 1)[0].upper()
                writer.write(self.reply(verb))
                await writer.drain()
                if verb == b"QUIT":
                    break
        except OSError:
            pass
        finally:
            writer.close()

    def reply(self, verb: bytes) -> bytes:
        if verb == b"USER":
            return b"331 Please specify the password.\r\n"
        if verb == b"PASS":
            return b"230 Login successful.\r\n"
        if verb == b"PASV":
            if self.pasv_reply is not None:
                return self.pasv_reply
            at = format_port(Endpoint(self.address, PASV_PORT))
            return f"227 Entering Passive Mode ({at}).\r\n".encode()
        if verb == b"EPSV":
            return b"229 Entering Extended Passive Mode (|||%d|)\r\n" % PASV_PORT
        if verb in (b"PORT", b"EPRT"):
            return b"200 PORT command successful.\r\n"
        if verb == b"FEAT":
            return b"211-Features:\r\n AUTH TLS\r\n EPSV\r\n PBSZ\r\n PROT\r\n211 End\r\n"
        if verb == b"QUIT":
            return b"221 Goodbye.\r\n"
        return b"200 ok\r\n"


class LineClient:
    """The FTP client's side of a control connection: send a line, read one reply line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def line(self, timeout: float = 5.0) -> bytes:
        return (await asyncio.wait_for(self.reader.readline(), timeout)).rstrip(b"\r\n")

    async def send(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.line()

    async def reply(self, line: bytes) -> bytes:
        """Send ``line`` and read a whole reply, multi-line included; returns its last line."""
        first = await self.send(line)
        if first[3:4] != b"-":
            return first
        while True:
            last = await self.line()
            if last.startswith(first[:3] + b" "):
                return last
