"""Field encodings shared by the tunnel's frames (tunnel/frames.py).

Integers are big-endian. An address is a family byte (4 or 6) and 4 or 16
bytes; an interface is an address and a prefix length; text and byte strings
are a u16 length and the bytes (text in UTF-8). A ``Reader`` raises only
``ProtocolError`` (the peer sent it); a ``Writer`` raises
``LocalProtocolError`` (our caller built it). ``endpoint_text`` is an
address and port as people read them (``[fd00::1]:80``).
"""

from __future__ import annotations

import enum
import ipaddress

from tunnel.errors import ErrorCode, LocalProtocolError, ProtocolError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class Proto(enum.IntEnum):
    """Transport of a port, as its IP protocol number."""

    TCP = 6
    UDP = 17


def endpoint_text(address: IPAddress, port: int) -> str:
    """``10.0.0.1:80``, ``[fd00::1]:80``: an IPv6 address in brackets (RFC 3986
    section 3.2.2), so that the port is not read as one more group. For logs,
    listings and messages; the wire carries the address's bytes."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


class Reader:
    """Reads body fields; any shortfall or bad value is the peer's fault."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def position(self) -> int:
        """Bytes read so far."""
        return self._pos

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "truncated frame body")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        # ``take``'s work in place: the field of nearly every frame.
        pos = self._pos
        end = pos + 4
        if end > len(self._data):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "truncated frame body")
        self._pos = end
        return int.from_bytes(self._data[pos:end], "big")

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"flag byte {value} is not 0 or 1")
        return value == 1

    def proto(self) -> Proto:
        value = self.u8()
        if value not in (Proto.TCP, Proto.UDP):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown transport {value}")
        return Proto(value)

    def code(self) -> ErrorCode:
        value = self.u16()
        if value not in ErrorCode._value2member_map_:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown error code {value}")
        return ErrorCode(value)

    def address(self) -> IPAddress:
        family = self.u8()
        if family == 4:
            return ipaddress.IPv4Address(self.take(4))
        if family == 6:
            return ipaddress.IPv6Address(self.take(16))
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown address family {family}")

    def interface(self) -> IPInterface:
        address = self.address()
        prefix = self.u8()
        if prefix > address.max_prefixlen:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"prefix length {prefix} too long")
        if isinstance(address, ipaddress.IPv4Address):
            return ipaddress.IPv4Interface((address, prefix))
        return ipaddress.IPv6Interface((address, prefix))

    def blob(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        raw = self.blob()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "text field is not UTF-8") from None

    def versions(self) -> tuple[int, ...]:
        versions = tuple(self.take(self.u8()))
        if 0 in versions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "version 0 does not exist")
        return versions

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "trailing bytes after the last field")


def check_range(name: str, value: int, bits: int) -> int:
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{name}={value} does not fit in {bits} bits")
    return value


class Writer:
    """Builds a body; a value that does not fit is our caller's bug."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    # The range checks are ``check_range``'s, written out: these run for
    # every field of every frame but DATA's.

    def u8(self, value: int, name: str = "u8") -> None:
        if not 0 <= value < 0x100:
            check_range(name, value, 8)
        self.parts.append(value.to_bytes(1, "big"))

    def u16(self, value: int, name: str = "u16") -> None:
        if not 0 <= value < 0x10000:
            check_range(name, value, 16)
        self.parts.append(value.to_bytes(2, "big"))

    def u32(self, value: int, name: str = "u32") -> None:
        if not 0 <= value < 0x100000000:
            check_range(name, value, 32)
        self.parts.append(value.to_bytes(4, "big"))

    def address(self, address: IPAddress) -> None:
        if isinstance(address, ipaddress.IPv4Address):
            self.parts.append(b"\x04" + address.packed)
        elif isinstance(address, ipaddress.IPv6Address):
            self.parts.append(b"\x06" + address.packed)
        else:
            raise LocalProtocolError(f"{address!r} is not an ipaddress object")

    def interface(self, interface: IPInterface) -> None:
        self.address(interface.ip)
        self.u8(interface.network.prefixlen)

    def blob(self, value: bytes, name: str = "bytes") -> None:
        self.u16(len(value), f"len({name})")
        self.parts.append(bytes(value))

    def text(self, value: str, name: str = "text") -> None:
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(f"{name} cannot be encoded as UTF-8") from None
        self.blob(encoded, name)

    def versions(self, versions: tuple[int, ...]) -> None:
        self.u8(len(versions), "len(versions)")
        for version in versions:
            if version == 0:
                raise LocalProtocolError("version 0 does not exist")
            self.u8(version, "version")

    def raw(self, value: bytes) -> None:
        self.parts.append(bytes(value))
