"""Parse and rewrite IPv4 TCP/UDP headers in place: the processor's per-packet code.

What: ``parse`` reads the few header fields the flow table needs out of a
``bytearray`` (what NFQUEUE hands over) and returns a ``Packet`` or a ``Drop``
reason; ``rewrite`` replaces the whole address/port 4-tuple at once and fixes
the IPv4 header checksum and the TCP/UDP checksum incrementally.

Why this shape:

- DESIGN invariant 8: the hot path works on bytes. No scapy, no
  ``ipaddress`` objects; addresses and ports are plain ints, fields are read
  with precompiled ``struct.Struct`` methods bound at import time, and the
  rewrite is a handful of C calls plus a few integer operations.
- DESIGN invariant 10: a malformed packet is dropped and counted, never a
  traceback. ``parse`` checks every length before it reads, so it cannot
  raise on any ``bytes``/``bytearray`` input; the caller counts the ``Drop``.
- The seed's "Packet restoration" section: the processor NATs each packet of
  a redirected flow twice (into the AG, then back out), so both checksums
  change on every packet and must be patched, not recomputed over the payload.

Checksums (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m'), in one's complement
arithmetic over 16-bit words. One's complement addition is addition modulo
0xFFFF, and 2**16 == 1 (mod 0xFFFF), so a 32-bit address contributes
``addr % 0xFFFF`` just as its two 16-bit halves do, and ``~m`` is ``-m``.
Summing every changed word therefore collapses to one integer delta,
``(new_src - old_src) + (new_dst - old_dst) [+ port deltas]``, taken modulo
0xFFFF once. Working on the complemented sum, as eqn. 3 does, rather than on
HC directly (RFC 1141's form, which RFC 1624 corrects) matters because of the
two zeros of one's complement: a header's sum is never +0, so a fresh
checksum is never 0xFFFF; writing ``0xFFFE - ((0xFFFE - HC + delta) % 0xFFFF)``
keeps the sum in 1..0xFFFF and the checksum in 0..0xFFFE, exactly what a
full recomputation gives (the property the tests check against scapy). As with any
incremental update, a checksum that arrived wrong stays wrong by the same
amount, so the receiver still detects the damage.

UDP (RFC 768): a checksum of 0 means "not computed" and stays 0; a computed
result of 0 is sent as 0xFFFF. TCP has no such escape.

Fragments: a non-first fragment carries no ports, so it cannot be matched to
a flow: ``Drop.FRAGMENT``. A first fragment parses (its ports are there) and
says so in ``Packet.more_fragments``; the processor decides. Normally
neither reaches us: nf_defrag_ipv4 reassembles at priority -400, before the
raw table (-300) where the queue rules sit.

Not checked: the IPv4 header checksum. The kernel verified it in ``ip_rcv``
before any netfilter hook, and NFQUEUE (without ``NFQA_CFG_F_GSO``) completes
partial TCP/UDP checksums (``skb_checksum_help``) before copying a packet out,
so what we receive carries full, correct checksums to update.
"""

from __future__ import annotations

import enum
from struct import Struct
from typing import NamedTuple

TCP = 6
UDP = 17

# TCP flag bits (RFC 9293 section 3.1).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

IPV4_MIN_HEADER = 20
TCP_MIN_HEADER = 20
UDP_HEADER = 8

# Offsets inside the transport header of the checksum field.
TCP_CHECKSUM = 16
UDP_CHECKSUM = 6


class Drop(enum.IntEnum):
    """Why ``parse`` refused a packet. The caller drops it and counts the reason."""

    TOO_SHORT = 1  # fewer bytes than a minimal IPv4 header
    NOT_IPV4 = 2  # version field is not 4
    BAD_IHL = 3  # IHL below 5 words
    BAD_TOTAL_LENGTH = 4  # total length shorter than the IPv4 header
    TRUNCATED = 5  # total length runs past the end of the buffer
    FRAGMENT = 6  # a non-first fragment: no ports to match a flow on
    UNSUPPORTED_PROTOCOL = 7  # neither TCP nor UDP
    L4_TRUNCATED = 8  # the TCP or UDP header does not fit in the datagram
    BAD_TCP_OFFSET = 9  # TCP data offset below 5 or past the datagram
    BAD_UDP_LENGTH = 10  # UDP length below 8 or past the datagram


class Packet(NamedTuple):
    """The header fields of one IPv4 TCP/UDP packet, as ints.

    ``l4`` is the offset of the transport header (IHL * 4); ``flags`` the TCP
    flag byte (0 for UDP); ``length`` the IPv4 total length.
    """

    proto: int
    src: int
    sport: int
    dst: int
    dport: int
    flags: int
    l4: int
    length: int
    more_fragments: bool


# Precompiled layouts; the bound methods save an attribute lookup per call.
# IPv4: version/IHL, (TOS), total length, (id), flags/fragment offset, (TTL),
# protocol, (checksum), source, destination.
_ip_fields = Struct("!BxHxxHxBxxII").unpack_from
# TCP: ports, (seq, ack), data offset, flags.   UDP: ports, length.
_tcp_fields = Struct("!HH8xBB").unpack_from
_udp_fields = Struct("!HHH").unpack_from
_IP_CSUM_ADDRS = Struct("!HII")  # header checksum, source, destination at offset 10
_csum_addrs_get = _IP_CSUM_ADDRS.unpack_from
_csum_addrs_put = _IP_CSUM_ADDRS.pack_into
# TCP ports and checksum in one read (pad bytes are skipped on unpack, but
# written as zeros on pack, so the writes are two: ports, then checksum).
_tcp_ports_csum_get = Struct("!HH12xH").unpack_from
_ports_put = Struct("!HH").pack_into
_u16_put = Struct("!H").pack_into
# The whole UDP header: ports, length, checksum, read and written in one call each.
_UDP = Struct("!HHHH")
_udp_get = _UDP.unpack_from
_udp_put = _UDP.pack_into

_new_packet = tuple.__new__  # builds the NamedTuple without its Python-level __new__


def parse(buf: bytes | bytearray) -> Packet | Drop:
    """Read an IPv4 TCP/UDP packet's headers, or say why it must be dropped.

    Never raises for any bytes-like input: every read is preceded by a
    length check. Bytes after the IPv4 total length are ignored.
    """
    n = len(buf)
    if n < IPV4_MIN_HEADER:
        return Drop.TOO_SHORT
    vihl, total, frag, proto, src, dst = _ip_fields(buf, 0)
    if vihl >> 4 != 4:
        return Drop.NOT_IPV4
    l4 = (vihl & 0x0F) << 2
    if l4 < IPV4_MIN_HEADER:
        return Drop.BAD_IHL
    if total < l4:
        return Drop.BAD_TOTAL_LENGTH
    if total > n:
        return Drop.TRUNCATED
    if frag & 0x1FFF:
        return Drop.FRAGMENT
    more = frag & 0x2000 != 0
    room = total - l4
    if proto == TCP:
        # RFC 1858: a first fragment too short for the whole TCP header is an
        # attack on filters, so the room check applies to fragments as well.
        if room < TCP_MIN_HEADER:
            return Drop.L4_TRUNCATED
        sport, dport, offset, flags = _tcp_fields(buf, l4)
        offset = (offset >> 4) << 2
        if offset < TCP_MIN_HEADER or offset > room:
            return Drop.BAD_TCP_OFFSET
    elif proto == UDP:
        if room < UDP_HEADER:
            return Drop.L4_TRUNCATED
        sport, dport, ulen = _udp_fields(buf, l4)
        # A first fragment holds only part of the datagram that ulen counts.
        if ulen < UDP_HEADER or (ulen > room and not more):
            return Drop.BAD_UDP_LENGTH
        flags = 0
    else:
        return Drop.UNSUPPORTED_PROTOCOL
    return _new_packet(Packet, (proto, src, sport, dst, dport, flags, l4, total, more))


def rewrite(buf: bytearray, l4: int, proto: int, src: int, sport: int, dst: int, dport: int) -> None:
    """Replace the 4-tuple of a parsed TCP/UDP packet in place, fixing both checksums.

    ``l4`` and ``proto`` come from the ``Packet`` that ``parse`` returned for
    this buffer. The old values are read back from the buffer, so the call is
    correct even if the buffer was rewritten since it was parsed.
    RFC 1624 eqn. 3 for both checksums; see the module docstring.
    """
    hc, osrc, odst = _csum_addrs_get(buf, 10)
    # The pseudo-header (RFC 9293 3.1, RFC 768) holds the addresses, so the
    # address delta goes into the transport checksum too.
    delta = src - osrc + dst - odst
    _csum_addrs_put(buf, 10, 0xFFFE - (0xFFFE - hc + delta) % 0xFFFF, src, dst)
    if proto == TCP:
        osport, odport, lc = _tcp_ports_csum_get(buf, l4)
        _ports_put(buf, l4, sport, dport)
        _u16_put(buf, l4 + TCP_CHECKSUM, 0xFFFE - (0xFFFE - lc + delta + sport - osport + dport - odport) % 0xFFFF)
    else:
        osport, odport, ulen, lc = _udp_get(buf, l4)
        if lc:
            lc = 0xFFFE - (0xFFFE - lc + delta + sport - osport + dport - odport) % 0xFFFF or 0xFFFF
        _udp_put(buf, l4, sport, dport, ulen, lc)
