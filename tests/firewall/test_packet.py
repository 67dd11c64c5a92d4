"""firewall.packet: parse and in-place rewrite, checked against scapy.

scapy builds the packets and recomputes checksums from scratch; ``rewrite``
must agree with it byte for byte (RFC 1624 eqn. 3 gives the canonical value,
not just an equivalent one), change nothing but the tuple and the two
checksums, and ``parse`` must answer every malformed input with a reason.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.packet import Raw

from firewall import packet as pk
from firewall.packet import Drop, Packet, parse, rewrite

addrs = st.integers(0, 0xFFFFFFFF)
ports = st.integers(0, 0xFFFF)
tuples = st.tuples(addrs, ports, addrs, ports)


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


def _fresh(buf: bytes) -> tuple[int, int]:
    """Both checksums as scapy computes them from scratch for these bytes."""
    p = IP(buf)
    del p[IP].chksum
    del p[IP].payload.chksum
    q = IP(bytes(p))
    return q[IP].chksum, q[IP].payload.chksum


def _changed(l4: int, proto: int) -> set[int]:
    csum = l4 + (pk.TCP_CHECKSUM if proto == pk.TCP else pk.UDP_CHECKSUM)
    return {10, 11, *range(12, 20), *range(l4, l4 + 4), csum, csum + 1}


def _check_rewrite(packet: IP, new: tuple[int, int, int, int]) -> bytearray:
    original = bytes(packet)
    buf = bytearray(original)
    p = parse(buf)
    assert isinstance(p, Packet)
    rewrite(buf, p.l4, p.proto, *new)
    src, sport, dst, dport = new
    again = parse(buf)
    assert isinstance(again, Packet)
    assert (again.src, again.sport, again.dst, again.dport) == new
    ip_csum, l4_csum = struct.unpack_from("!H", buf, 10)[0], struct.unpack_from(
        "!H", buf, p.l4 + (16 if p.proto == pk.TCP else 6)
    )[0]
    assert (ip_csum, l4_csum) == _fresh(bytes(buf))
    keep = _changed(p.l4, p.proto)
    assert [b for i, b in enumerate(buf) if i not in keep] == [b for i, b in enumerate(original) if i not in keep]
    return buf


# ---- rewrite against scapy ------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tcp_packets(), tuples)
def test_tcp_rewrite_checksums_match_a_fresh_computation(packet: IP, new: tuple[int, int, int, int]) -> None:
    _check_rewrite(packet, new)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(udp_packets(), tuples)
def test_udp_rewrite_checksums_match_a_fresh_computation(packet: IP, new: tuple[int, int, int, int]) -> None:
    _check_rewrite(packet, new)


@settings(max_examples=200, deadline=None)
@given(st.one_of(tcp_packets(), udp_packets()), tuples)
def test_rewrite_there_and_back_restores_every_byte(packet: IP, new: tuple[int, int, int, int]) -> None:
    original = bytes(packet)
    buf = bytearray(original)
    p = parse(buf)
    assert isinstance(p, Packet)
    rewrite(buf, p.l4, p.proto, *new)
    rewrite(buf, p.l4, p.proto, p.src, p.sport, p.dst, p.dport)
    assert bytes(buf) == original


@settings(max_examples=100, deadline=None)
@given(udp_packets(), tuples)
def test_udp_checksum_zero_means_none_and_stays_zero(packet: IP, new: tuple[int, int, int, int]) -> None:
    packet[UDP].chksum = 0
    buf = bytearray(bytes(packet))
    p = parse(buf)
    assert isinstance(p, Packet)
    rewrite(buf, p.l4, p.proto, *new)
    assert buf[p.l4 + 6 : p.l4 + 8] == b"\x00\x00"
    assert IP(bytes(buf))[IP].chksum == _fresh(bytes(buf))[0]


def _find_port_giving_checksum(packet: IP, field: int) -> tuple[bytearray, Packet, int]:
    """Rewrite ``packet`` to a fixed tuple, trying destination ports until the
    transport checksum field reads ``field``."""
    original = bytes(packet)
    for dport in range(1, 0x10000):
        buf = bytearray(original)
        p = parse(buf)
        assert isinstance(p, Packet)
        rewrite(buf, p.l4, p.proto, 0x0A000001, 4242, 0xAC1FFE01, dport)
        off = p.l4 + (16 if p.proto == pk.TCP else 6)
        if struct.unpack_from("!H", buf, off)[0] == field:
            return buf, p, dport
    raise AssertionError("no port gives that checksum")


def test_udp_sum_of_zero_is_sent_as_ffff() -> None:
    packet = IP(src="192.0.2.1", dst="198.51.100.7") / UDP(sport=5060, dport=5060) / Raw(b"INVITE")
    buf, p, _ = _find_port_giving_checksum(packet, 0xFFFF)
    # scapy, from scratch, also turns the computed 0 into 0xFFFF (RFC 768).
    assert _fresh(bytes(buf))[1] == 0xFFFF
    # And an incoming 0xFFFF is a real checksum: it updates like any other.
    _check_rewrite(IP(bytes(buf)), (0x01020304, 1, 0x05060708, 2))


def test_tcp_checksum_of_zero_stays_zero() -> None:
    packet = IP(src="192.0.2.1", dst="198.51.100.7") / TCP(sport=40000, dport=25, flags="S")
    buf, p, _ = _find_port_giving_checksum(packet, 0)
    assert _fresh(bytes(buf))[1] == 0
    _check_rewrite(IP(bytes(buf)), (0x01020304, 1, 0x05060708, 2))


def test_bytes_after_the_total_length_are_left_alone() -> None:
    packet = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"x" * 10)
    buf = bytearray(bytes(packet) + b"\xee" * 7)
    p = parse(buf)
    assert isinstance(p, Packet) and p.length == len(buf) - 7
    rewrite(buf, p.l4, p.proto, 3, 4, 5, 6)
    assert buf[-7:] == b"\xee" * 7
    assert _fresh(bytes(buf[:-7])) == struct.unpack_from("!H", buf, 10) + struct.unpack_from("!H", buf, 26)


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


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(raw: bytes) -> None:
    got = parse(bytearray(raw))
    assert isinstance(got, (Packet, Drop))
    if isinstance(got, Packet):
        rewrite(bytearray(raw), got.l4, got.proto, 1, 2, 3, 4)


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
        rewrite(buf, got.l4, got.proto, 1, 2, 3, 4)


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
