"""Parse IPv6 TCP/UDP headers, extension headers walked: the first-packet path for IPv6.

What: ``parse6`` is ``firewall.packet.parse`` for IPv6. It reads the fixed
header, walks the extension headers (RFC 8200 section 4) to the TCP or UDP
header, and returns a ``Packet`` with the same fields (addresses as 128-bit
ints) or a ``Drop6`` reason. The processor calls it for every queued IPv6
packet: the first packets of the IPv6 flows of a gateway kind that takes
IPv6 (``firewall.processor.six``, docs/datapath.md "IPv6 gateway flows").

Why these rules:

- Same contract as ``parse`` (DESIGN invariants 8 and 10): bytes in, ints
  out, every length checked before it is read, so no input raises.
- Extension headers: Hop-by-Hop (0) only first (RFC 8200 section 4.3);
  Routing (43), Destination Options (60), Fragment (44) and AH (51, its
  length in 4-octet units, RFC 4302 section 2.2) are walked, at most
  ``MAX_EXTENSION_HEADERS`` of them; ESP (50) hides the transport header
  and No Next Header (59) has none: refused. A Routing header with segments
  left means the destination address is not the packet's last one (RFC
  8200 section 4.4): a selector would match the wrong server, so it is
  refused.
- The whole header chain must lie in the packet (RFC 7112), and the
  transport header must fit in it (RFC 1858's reasoning for IPv4).
- Fragments: nf_defrag_ipv6 reassembles at priority -400, before conntrack
  (-200) and the mangle table where queue rules sit, so a queued packet is
  whole and normally carries no Fragment header. What can still come is an
  atomic fragment (RFC 6946: offset 0, no more fragments), which is walked
  through; a first fragment (offset 0, more to come) parses and says so in
  ``more_fragments``; a later one has no ports: ``Drop6.FRAGMENT``.
- A jumbogram (payload length 0, RFC 2675) is refused: no link here carries
  one and NFQUEUE would not hand one over whole.

Not checked: checksums (conntrack verified TCP's and UDP's before the queue,
``nf_conntrack_checksum``; IPv6 has no header checksum).
"""

from __future__ import annotations

import enum
from struct import Struct

from firewall.packet import TCP, TCP_MIN_HEADER, UDP, UDP_HEADER, Packet

IPV6_HEADER = 40
MAX_EXTENSION_HEADERS = 8  # more is an evasion attempt, not a real packet (RFC 7045 section 2.1 lets us limit)

HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
ESP = 50
AH = 51
NO_NEXT_HEADER = 59
DESTINATION_OPTIONS = 60


class Drop6(enum.IntEnum):
    """Why ``parse6`` refused a packet; the caller drops it and counts the reason."""

    TOO_SHORT = 1  # fewer bytes than the fixed IPv6 header
    NOT_IPV6 = 2  # version field is not 6
    JUMBOGRAM = 3  # payload length 0 (RFC 2675)
    TRUNCATED = 4  # the payload length runs past the end of the buffer
    HEADER_TRUNCATED = 5  # an extension header runs past the packet (RFC 7112)
    BAD_HEADER_ORDER = 6  # Hop-by-Hop anywhere but first (RFC 8200 section 4.3)
    TOO_MANY_HEADERS = 7  # more than MAX_EXTENSION_HEADERS extension headers
    ROUTING_HEADER = 8  # a Routing header with segments left: the destination is not the last one
    FRAGMENT = 9  # a non-first fragment: no ports to match a flow on
    UNSUPPORTED_PROTOCOL = 10  # neither TCP nor UDP after the headers (ESP, No Next Header, others)
    L4_TRUNCATED = 11  # the TCP or UDP header does not fit in the packet
    BAD_TCP_OFFSET = 12  # TCP data offset below 5 or past the packet
    BAD_UDP_LENGTH = 13  # UDP length below 8 or past the packet


# version/class/flow, payload length, next header, (hop limit); then the addresses as two 64-bit halves each.
_fixed = Struct("!IHBx").unpack_from
_addr = Struct("!QQQQ").unpack_from
_ext = Struct("!BB").unpack_from  # next header, length
_routing = Struct("!BBxB").unpack_from  # next header, length, (type), segments left
_fragment = Struct("!BxH").unpack_from  # next header, offset (13 bits) / flags (M: bit 0)
_tcp_fields = Struct("!HH8xBB").unpack_from
_udp_fields = Struct("!HHH").unpack_from
_new_packet = tuple.__new__

_OPTIONS = frozenset((HOP_BY_HOP, DESTINATION_OPTIONS))


def parse6(buf: bytes | bytearray) -> Packet | Drop6:
    """Read an IPv6 TCP/UDP packet's headers, or say why it must be dropped.

    Never raises for any bytes-like input. ``Packet.l4`` is the offset of the
    transport header (after every extension header), ``length`` the packet's
    length by its header (40 + payload length); bytes after it are ignored.
    """
    n = len(buf)
    if n < IPV6_HEADER:
        return Drop6.TOO_SHORT
    vtf, payload, nh = _fixed(buf, 0)
    if vtf >> 28 != 6:
        return Drop6.NOT_IPV6
    if payload == 0:
        return Drop6.JUMBOGRAM
    total = IPV6_HEADER + payload
    if total > n:
        return Drop6.TRUNCATED
    s_hi, s_lo, d_hi, d_lo = _addr(buf, 8)
    off, more, seen = IPV6_HEADER, False, 0
    while nh not in (TCP, UDP):
        if seen == MAX_EXTENSION_HEADERS:
            return Drop6.TOO_MANY_HEADERS
        if nh == HOP_BY_HOP and seen:
            return Drop6.BAD_HEADER_ORDER
        if nh in _OPTIONS or nh == ROUTING or nh == AH:
            if off + 8 > total:
                return Drop6.HEADER_TRUNCATED
            nxt, hlen = _ext(buf, off)
            size = (hlen + 2) << 2 if nh == AH else (hlen + 1) << 3
            if off + size > total:
                return Drop6.HEADER_TRUNCATED
            if nh == ROUTING and _routing(buf, off)[2]:
                return Drop6.ROUTING_HEADER
        elif nh == FRAGMENT:
            if off + 8 > total:
                return Drop6.HEADER_TRUNCATED
            nxt, frag = _fragment(buf, off)
            if frag >> 3:
                return Drop6.FRAGMENT
            more = bool(frag & 1)
            size = 8
        else:
            return Drop6.UNSUPPORTED_PROTOCOL  # ESP, No Next Header, anything else
        nh, off, seen = nxt, off + size, seen + 1
    room = total - off
    if nh == TCP:
        if room < TCP_MIN_HEADER:
            return Drop6.L4_TRUNCATED
        sport, dport, offset, flags = _tcp_fields(buf, off)
        offset = (offset >> 4) << 2
        if offset < TCP_MIN_HEADER or offset > room:
            return Drop6.BAD_TCP_OFFSET
    else:
        if room < UDP_HEADER:
            return Drop6.L4_TRUNCATED
        sport, dport, ulen = _udp_fields(buf, off)
        # RFC 8200 section 8.1: UDP's length counts the transport payload; a
        # first fragment holds part of it.
        if ulen < UDP_HEADER or (ulen > room and not more):
            return Drop6.BAD_UDP_LENGTH
        flags = 0
    src, dst = (s_hi << 64) | s_lo, (d_hi << 64) | d_lo
    return _new_packet(Packet, (nh, src, sport, dst, dport, flags, off, total, more))
