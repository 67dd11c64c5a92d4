"""docs/tunnel-protocol.md matches the code: examples, type and code tables, settings."""

from __future__ import annotations

import dataclasses
import re
from ipaddress import IPv4Address, IPv4Interface, IPv6Address
from pathlib import Path

import pytest

from tunnel.datagrams import Datagram, DatagramType, encode_datagram
from tunnel.errors import ErrorCode
from tunnel.frames import (
    ConnectPort, Data, Err, EventAccepted, FrameType, Hello, InitErr, InitOk, Keepalive,
    KeepaliveAck, OpenConnect, Opened, OpenPort, OpenStream, Proto, STREAM_ID_BASE, encode_frame,
)
from tunnel.settings import MediatorLimits, MediatorSettings, ServerSettings

DOC = (Path(__file__).parents[2] / "docs" / "tunnel-protocol.md").read_text()

ME = IPv4Address("192.168.1.2")
WEB = IPv4Address("192.168.1.10")
PHONE = IPv4Address("192.168.1.50")
KEY = bytes(range(32))

EXAMPLES = {
    "hello": encode_frame(
        Hello((1,), "mediator-7", b"s3cret", "web-help", (IPv4Interface("192.168.1.2/24"),),
              25000, 131072, request_id=1)
    ),
    "init_ok": encode_frame(InitOk(1, 7, 131072, request_id=1)),
    "init_err": encode_frame(
        InitErr(ErrorCode.UNSUPPORTED_VERSION, "no common version (offered 2)", (1,), request_id=1)
    ),
    "open_port": encode_frame(OpenPort(Proto.TCP, ME, 8080, False, request_id=2)),
    "opened": encode_frame(Opened(1, 8081, request_id=2)),
    "err": encode_frame(Err(ErrorCode.PORT_IN_USE, 0, "8080 is taken", request_id=3)),
    "connect": encode_frame(ConnectPort(1, WEB, 80, request_id=4)),
    "open_connect6": encode_frame(
        OpenConnect(IPv6Address("fd00:1::2"), IPv6Address("fd00:1::10"), 80, request_id=5), version=2
    ),
    "open_stream": encode_frame(OpenStream(STREAM_ID_BASE + 3, ME, WEB, 80, request_id=12), version=4),
    "data": encode_frame(Data(1, WEB, 80, b"GET / HTTP/1.0\r\n\r\n")),
    "event_accepted": encode_frame(EventAccepted(1, 2, PHONE, 51000)),
    "keepalive": encode_frame(Keepalive(request_id=9)),
    "keepalive_ack": encode_frame(KeepaliveAck(request_id=9)),
    "udp_data": encode_datagram(Datagram(DatagramType.DATA, 7, 1, 1, False, PHONE, 40000, b"rtp"), KEY),
    "udp_keepalive": encode_datagram(Datagram(DatagramType.KEEPALIVE, 7, 1, 0, False), KEY),
}


def documented_examples() -> dict[str, bytes]:
    found = {}
    for match in re.finditer(r"<!-- example: (\w+) -->\n```text\n(.*?)```", DOC, re.S):
        raw = b""
        for line in match.group(2).splitlines():
            offset, hex_bytes, _field = re.split(r"\s{2,}", line.strip(), maxsplit=2)
            assert int(offset) == len(raw), f"{match.group(1)}: offset {offset}"
            raw += bytes.fromhex(hex_bytes)
        found[match.group(1)] = raw
    return found


def test_every_example_is_the_codecs_output() -> None:
    assert documented_examples() == EXAMPLES


def test_every_frame_type_is_in_the_table() -> None:
    for frame_type in FrameType:
        assert f"| {frame_type:#04x} | {frame_type.name} |" in DOC, frame_type.name


def test_every_error_code_is_in_the_table() -> None:
    for code in ErrorCode:
        assert f"| {code.value} | {code.name} |" in DOC, code.name


@pytest.mark.parametrize("cls", [MediatorSettings, ServerSettings, MediatorLimits])
def test_every_setting_and_default_is_documented(cls: type) -> None:
    start = DOC.index(f"**`{cls.__name__}`")
    end = DOC.find("\n**", start + 1)
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", DOC[start : end if end > 0 else None], re.M))
    for field in dataclasses.fields(cls):
        assert field.name in rows, f"{cls.__name__}.{field.name} is not documented"
        shown = rows[field.name].strip().strip("`").removesuffix(" s")
        if isinstance(field.default, bool):
            assert shown == str(field.default).lower()
        elif isinstance(field.default, tuple):
            assert shown == repr(field.default)
        else:
            assert float(shown) == field.default, field.name
