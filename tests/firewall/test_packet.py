"""firewall.packet: parse, checked against scapy.

scapy builds the packets; ``parse`` must read their fields, and answer every
malformed input with a reason.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.packet import Raw

from firewall import packet as pk
from firewall.packet import Drop, Packet, parse

addrs = st.integers(0, 0xFFFFFFFF)
ports = st.integers(0, 0xFFFF)


def _ip(a: int) -> str:
    return ".".join(str(b) for b in a.to_bytes(4, "big"))


@st.composite
def ip_headers(draw: st.DrawFn) -> IP:
    return IP(
        src=_ip(draw(addrs)),
        dst=_ip(draw(addrs)),
        tos=draw(st.integers(0, 255)),
        id=draw(st.integers(0, 0xFFFF)),
        flags=draw(st.sampled_from(["", "DF"])),
        ttl=draw(st.integers(1, 255)),
        options=[IPOption_NOP()] * (4 * draw(st.integers(0, 10))),
    )


@st.composite
def tcp_packets(draw: st.DrawFn) -> IP:
    seg = TCP(
        sport=draw(ports),
        dport=draw(ports),
        seq=draw(st.integers(0, 0xFFFFFFFF)),
        ack=draw(st.integers(0, 0xFFFFFFFF)),
        flags=draw(st.integers(0, 0xFF)),
        window=draw(st.integers(0, 0xFFFF)),
        urgptr=draw(st.integers(0, 0xFFFF)),
        options=[("NOP", None)] * (4 * draw(st.integers(0, 10))),
    )
    return draw(ip_headers()) / seg / Raw(draw(st.binary(max_size=80)))


@st.composite
def udp_packets(draw: st.DrawFn) -> IP:
    dgram = UDP(sport=draw(ports), dport=draw(ports))
    return draw(ip_headers()) / dgram / Raw(draw(st.binary(max_size=80)))


# ---- parse --------------------------------------------------------------------------


def test_parse_reads_the_fields() -> None:
    packet = IP(src="10.1.2.3", dst="192.0.2.9", options=[IPOption_NOP()] * 4) / TCP(
        sport=40001, dport=25, flags="SA"
    )
    p = parse(bytes(packet))
    assert p == Packet(
        proto=6,
        src=0x0A010203,
        sport=40001,
        dst=0xC0000209,
        dport=25,
        flags=pk.SYN | pk.ACK,
        l4=24,
        length=len(packet),
        more_fragments=False,
    )
    u = parse(bytes(IP(src="10.1.2.3", dst="192.0.2.9") / UDP(sport=53, dport=5353)))
    assert isinstance(u, Packet) and (u.proto, u.sport, u.dport, u.flags, u.l4) == (17, 53, 5353, 0, 20)


@settings(max_examples=50, deadline=None)
@given(st.one_of(tcp_packets(), udp_packets()))
def test_truncation_at_every_offset_gives_a_reason(packet: IP) -> None:
    raw = bytes(packet)
    assert isinstance(parse(raw), Packet)
    for cut in range(len(raw)):
        got = parse(bytearray(raw[:cut]))
        assert got is (Drop.TOO_SHORT if cut < 20 else Drop.TRUNCATED), cut


@settings(max_examples=50, deadline=None)
@given(st.one_of(tcp_packets(), udp_packets()))
def test_a_copy_cut_short_parses_once_its_headers_are_in(packet: IP) -> None:
    """NFQUEUE's copy of a packet above the copy range is its first bytes
    (issue 14 F): headers only are needed, and the total length is believed."""
    raw = bytes(packet)
    whole = parse(raw)
    assert isinstance(whole, Packet)
    headers = whole.l4 + (20 if whole.proto == pk.TCP else 8)
    for cut in range(len(raw)):
        got = parse(bytearray(raw[:cut]), whole=False)
        if cut < 20:
            assert got is Drop.TOO_SHORT
        elif cut < headers:
            assert got is Drop.TRUNCATED, cut
        else:
            assert got == whole, cut


def test_a_65507_byte_datagram_cut_at_netfilterqueues_copy_size_parses() -> None:
    big = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=53) / Raw(b"x" * 65507))
    assert len(big) == 65535
    assert parse(big[:4016]) is Drop.TRUNCATED
    got = parse(big[:4016], whole=False)
    assert isinstance(got, Packet) and (got.length, got.dport) == (65535, 53)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(raw: bytes) -> None:
    got = parse(bytearray(raw))
    assert isinstance(got, (Packet, Drop))
    if isinstance(got, Packet):
        assert got.l4 + (20 if got.proto == pk.TCP else 8) <= got.length <= len(raw)
    cut = parse(bytearray(raw), whole=False)
    assert isinstance(cut, (Packet, Drop))
    if isinstance(cut, Packet):
        assert cut.l4 + (20 if cut.proto == pk.TCP else 8) <= min(cut.length, len(raw))


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=20, max_size=80), st.sampled_from([6, 17]), st.integers(0, 15))
def test_garbage_behind_a_plausible_ipv4_header_never_raises(raw: bytes, proto: int, ihl: int) -> None:
    buf = bytearray(raw)
    buf[0] = 0x40 | ihl
    buf[9] = proto
    struct.pack_into("!H", buf, 2, min(len(buf), 0xFFFF))
    buf[6] = buf[7] = 0
    got = parse(buf)
    assert isinstance(got, (Packet, Drop))
    if isinstance(got, Packet):
        assert got.l4 == ihl * 4 and got.proto == proto


def _tcp(**ip: object) -> bytearray:
    return bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", **ip) / TCP(sport=1000, dport=25) / Raw(b"data")))


def _udp(**ip: object) -> bytearray:
    return bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", **ip) / UDP(sport=1000, dport=53) / Raw(b"data")))


def _set_total(buf: bytearray, total: int) -> bytearray:
    struct.pack_into("!H", buf, 2, total)
    return buf


def _edit(buf: bytearray, offset: int, value: int) -> bytearray:
    buf[offset] = value
    return buf


@pytest.mark.parametrize(
    "buf, reason",
    [
        (bytearray(), Drop.TOO_SHORT),
        (bytearray(19), Drop.TOO_SHORT),
        (_edit(_tcp(), 0, 0x65), Drop.NOT_IPV4),
        (_edit(_tcp(), 0, 0x44), Drop.BAD_IHL),
        (_edit(_tcp(), 0, 0x40), Drop.BAD_IHL),
        (_set_total(_tcp(), 19), Drop.BAD_TOTAL_LENGTH),
        (_set_total(_tcp(options=[IPOption_NOP()] * 8), 24), Drop.BAD_TOTAL_LENGTH),
        (_set_total(_tcp(), 500), Drop.TRUNCATED),
        (bytearray(bytes(IP(dst="10.0.0.2", frag=3, proto=6) / Raw(b"x" * 20))), Drop.FRAGMENT),
        (bytearray(bytes(IP(dst="10.0.0.2", flags="MF", frag=1, proto=17) / Raw(b"x" * 8))), Drop.FRAGMENT),
        (bytearray(bytes(IP(dst="10.0.0.2", proto=1) / Raw(b"\x08\x00" + b"\x00" * 6))), Drop.UNSUPPORTED_PROTOCOL),
        (bytearray(bytes(IP(dst="10.0.0.2", proto=6) / Raw(b"\x00" * 19))), Drop.L4_TRUNCATED),
        (bytearray(bytes(IP(dst="10.0.0.2", proto=17) / Raw(b"\x00" * 7))), Drop.L4_TRUNCATED),
        (_edit(_tcp(), 32, 0x40), Drop.BAD_TCP_OFFSET),
        (_edit(_tcp(), 32, 0x70), Drop.BAD_TCP_OFFSET),  # 28-byte header, 24 bytes of room
        (_edit(_udp(), 25, 7), Drop.BAD_UDP_LENGTH),
        (_edit(_udp(), 25, 13), Drop.BAD_UDP_LENGTH),
    ],
)
def test_malformed_packets_get_their_reason(buf: bytearray, reason: Drop) -> None:
    assert parse(buf) is reason


def test_tcp_data_offset_may_fill_the_datagram_exactly() -> None:
    buf = _edit(_tcp(), 32, 0x60)  # 24 bytes after the IPv4 header: a 6-word TCP header fits
    assert isinstance(parse(buf), Packet)


def test_a_first_fragment_parses_and_says_so() -> None:
    # Its UDP length counts the whole datagram, more than this fragment holds.
    frag = IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", proto=17) / Raw(
        struct.pack("!HHHH", 1000, 53, 1400, 0) + b"x" * 16
    )
    p = parse(bytes(frag))
    assert isinstance(p, Packet) and p.more_fragments and (p.sport, p.dport) == (1000, 53)
