"""firewall.packet6: parse6, checked against scapy; extension headers walked, fragments and evasions refused."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from firewall import packet as pk
from firewall.packet import Packet
from firewall.packet6 import MAX_EXTENSION_HEADERS, Drop6, parse6

C, S = "2001:db8:2::10", "fd00:1::10"
CI, SI = int(ipaddress.IPv6Address(C)), int(ipaddress.IPv6Address(S))


def ip6(*layers) -> IPv6:
    out = IPv6(src=C, dst=S)
    for layer in layers:
        out = out / layer
    return out


def test_reads_a_plain_syn() -> None:
    packet = ip6(TCP(sport=40001, dport=25, flags="S"))
    assert parse6(bytes(packet)) == Packet(pk.TCP, CI, 40001, SI, 25, pk.SYN, 40, len(packet), False)


@pytest.mark.parametrize("headers, l4", [
    ([IPv6ExtHdrHopByHop()], 48),
    ([IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=[], segleft=0)], 64),
    ([IPv6ExtHdrFragment(offset=0, m=0, id=7)], 48),  # an atomic fragment (RFC 6946)
    ([AH(nh=17, payloadlen=4, spi=1, icv=b"\0" * 12)], 64),
    ([IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=0), IPv6ExtHdrDestOpt()], 64),
])
def test_walks_extension_headers_to_the_transport_header(headers, l4: int) -> None:
    packet = ip6(*headers, UDP(sport=5060, dport=5353) / Raw(b"x" * 12))
    got = parse6(bytes(packet))
    assert isinstance(got, Packet), got
    assert (got.proto, got.sport, got.dport, got.l4, got.length) == (pk.UDP, 5060, 5353, l4, len(packet))


def test_a_first_fragment_parses_and_says_so_a_later_one_is_refused() -> None:
    whole = ip6(IPv6ExtHdrFragment(offset=0, m=1, id=9), UDP(sport=1, dport=2, len=1200) / Raw(b"y" * 40))
    got = parse6(bytes(whole))
    assert isinstance(got, Packet) and got.more_fragments and got.dport == 2
    later = ip6(IPv6ExtHdrFragment(offset=100, m=0, id=9), Raw(b"z" * 40))
    assert parse6(bytes(later)) is Drop6.FRAGMENT


@pytest.mark.parametrize("packet, reason", [
    (ip6(IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), TCP()), Drop6.BAD_HEADER_ORDER),
    (ip6(*[IPv6ExtHdrDestOpt()] * (MAX_EXTENSION_HEADERS + 1), TCP()), Drop6.TOO_MANY_HEADERS),
    (ip6(IPv6ExtHdrRouting(addresses=["2001:db8::99"], segleft=1), TCP()), Drop6.ROUTING_HEADER),
    (IPv6(src=C, dst=S, nh=50) / Raw(b"\0" * 24), Drop6.UNSUPPORTED_PROTOCOL),  # ESP
    (IPv6(src=C, dst=S, nh=59) / Raw(b"\0" * 8), Drop6.UNSUPPORTED_PROTOCOL),  # No Next Header
    (ip6(Raw(b"\x3a" + b"\0" * 7)), Drop6.UNSUPPORTED_PROTOCOL),  # ICMPv6
    (IPv6(src=C, dst=S, nh=6) / Raw(b"\0" * 19), Drop6.L4_TRUNCATED),
    (IPv6(src=C, dst=S, nh=17) / Raw(b"\0" * 7), Drop6.L4_TRUNCATED),
    (ip6(TCP(dataofs=4)), Drop6.BAD_TCP_OFFSET),
    (ip6(TCP(dataofs=15)), Drop6.BAD_TCP_OFFSET),
    (ip6(UDP(len=7)), Drop6.BAD_UDP_LENGTH),
    (ip6(UDP(len=200)), Drop6.BAD_UDP_LENGTH),
])
def test_refuses_what_a_selector_could_be_fooled_by(packet, reason: Drop6) -> None:
    assert parse6(bytes(packet)) is reason


def test_lengths_are_checked_before_reading() -> None:
    syn = bytes(ip6(IPv6ExtHdrHopByHop(), TCP(flags="S")))
    assert parse6(syn[:39]) is Drop6.TOO_SHORT
    assert parse6(b"\x40" + syn[1:]) is Drop6.NOT_IPV6
    assert parse6(syn[:4] + b"\0\0" + syn[6:]) is Drop6.JUMBOGRAM
    assert parse6(syn[:-1]) is Drop6.TRUNCATED
    # The payload length cuts the chain inside the Hop-by-Hop header (RFC 7112).
    assert parse6(syn[:4] + (4).to_bytes(2, "big") + syn[6:]) is Drop6.HEADER_TRUNCATED
    # A header length that runs past the packet.
    long_hbh = bytearray(syn)
    long_hbh[41] = 200
    assert parse6(bytes(long_hbh)) is Drop6.HEADER_TRUNCATED
    # Trailing bytes past the payload length are not the packet's.
    assert isinstance(parse6(syn + b"\xff" * 9), Packet)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=160))
def test_never_raises(data: bytes) -> None:
    assert isinstance(parse6(data), (Packet, Drop6))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=34, max_size=120), st.integers(0, 0xFF))
def test_never_raises_behind_a_valid_fixed_header(rest: bytes, nh: int) -> None:
    head = bytes(IPv6(src=C, dst=S, nh=nh, plen=len(rest)))[:40]
    assert isinstance(parse6(head + rest), (Packet, Drop6))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 128) - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 0xFF), st.binary(max_size=64))
def test_reads_what_scapy_wrote(src: int, dst: int, sport: int, dport: int, flags: int, payload: bytes) -> None:
    packet = IPv6(src=str(ipaddress.IPv6Address(src)), dst=str(ipaddress.IPv6Address(dst))) / IPv6ExtHdrDestOpt() / \
        TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)
    assert parse6(bytes(packet)) == Packet(pk.TCP, src, sport, dst, dport, flags, 48, len(packet), False)
