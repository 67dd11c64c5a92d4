"""Parse IPv4 TCP/UDP headers: the processor's per-packet code.

What: ``parse`` reads the few header fields the processor needs out of the
bytes NFQUEUE hands over and returns a ``Packet`` or a ``Drop`` reason. The
processor sees only the first packet of a connection and never rewrites it:
the kernel's NAT does (docs/datapath.md), checksums included.

Why this shape:

- DESIGN invariant 8: the hot path works on bytes. No scapy, no
  ``ipaddress`` objects; addresses and ports are plain ints, fields are read
  with precompiled ``struct.Struct`` methods bound at import time.
- DESIGN invariant 10: a malformed packet is dropped and counted, never a
  traceback. ``parse`` checks every length before it reads, so it cannot
  raise on any ``bytes``/``bytearray`` input; the caller counts the ``Drop``.

Fragments: a non-first fragment carries no ports, so it cannot be matched to
a flow: ``Drop.FRAGMENT``. A first fragment parses (its ports are there) and
says so in ``Packet.more_fragments``; the processor decides. Normally
neither reaches us: nf_defrag_ipv4 reassembles at priority -400, before
conntrack and the mangle table where the queue rules sit.

Not checked: the checksums. The kernel verified the IPv4 header's in
``ip_rcv``, and conntrack the TCP/UDP one (``nf_conntrack_checksum``) before
the queue: a packet with a bad one is ``invalid`` and never queued.
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

_new_packet = tuple.__new__  # builds the NamedTuple without its Python-level __new__


def parse(buf: bytes | bytearray, *, whole: bool = True) -> Packet | Drop:
    """Read an IPv4 TCP/UDP packet's headers, or say why it must be dropped.

    Never raises for any bytes-like input: every read is preceded by a
    length check. Bytes after the IPv4 total length are ignored.

    ``whole=False``: ``buf`` may be the first bytes of a longer packet, as
    NFQUEUE hands over a packet larger than the copy range (netfilterqueue
    caps it at 4016 bytes). The headers must then lie within ``buf``, and the
    total length is believed: the kernel checked it against the packet in
    ``ip_rcv``, and a verdict without a payload reinjects the whole packet.
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
    if total > n and (whole or n < l4 + (TCP_MIN_HEADER if proto == TCP else UDP_HEADER)):
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

