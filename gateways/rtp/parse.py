"""RTP and RTCP datagrams: the checks of RFC 3550 section 5.1, 6.4 and appendix A, and RFC 5761's demultiplexing.

Pure functions over one UDP payload; nothing is copied. Each returns what
the core needs (the SSRC, the payload type) or a ``Problem``, whose name is
the counter a dropped datagram is counted under. Nothing here raises for any
bytes (the Hypothesis tests feed it arbitrary ones).

RTP (section 5.1, appendix A.1): version 2; the fixed header, the CSRC list
(CC entries) and, with X set, the extension header and its length all within
the datagram; with P set, a padding count of at least 1 that leaves the
header in place; a payload type in the allowed set. A.1's sequence-number
probation is a receiver's business (it decides when a source is valid for
reception statistics); a relay passes the probation packets on.

RTCP (section 6.1, 6.4, appendix A.2): a compound datagram is a run of
packets, each version 2, each ``(length + 1) * 4`` bytes, which together
fill the datagram exactly; the first is SR or RR; only the last may be
padded (and its padding count fits in it); every type is in the allowed set
(200-204, with 205/206 when feedback is allowed: RFC 4585); each packet is
at least as long as its type's fixed part with its report blocks or sources
(SR 6.4.1, RR 6.4.2, BYE 6.6, APP 6.7, RTPFB/PSFB RFC 4585 section 6.1).

RFC 5761 section 4: on a port that carries both, a datagram whose second
octet is 192-223 is RTCP (those would be RTP payload types 64-95 with the
marker bit set, which a multiplexing sender must not use).
"""

from __future__ import annotations

import enum
import struct

RTP_VERSION = 2
RTP_HEADER = 12  # RFC 3550 5.1: the fixed header
RTCP_HEADER = 4

SR, RR, SDES, BYE, APP, RTPFB, PSFB = 200, 201, 202, 203, 204, 205, 206
BASE_TYPES = frozenset({SR, RR, SDES, BYE, APP})
FEEDBACK_TYPES = frozenset({RTPFB, PSFB})

# The fixed part of each RTCP packet type, in bytes, header included, and the
# size of one item it counts in its 5-bit count field (report blocks, sources).
_SR_FIXED, _RR_FIXED, _REPORT_BLOCK = 28, 8, 24
_APP_FIXED = 12  # header, SSRC, 4-octet name (6.7)
_FB_FIXED = 12  # header, sender SSRC, media SSRC (RFC 4585 6.1)

_RTP = struct.Struct("!BBHII")
_RTCP = struct.Struct("!BBH")
_SSRC = struct.Struct("!I")


class Problem(enum.Enum):
    """Why a datagram is not valid RTP or RTCP; the value is its counter's name."""

    RTP_TRUNCATED = "rtp.truncated"
    RTP_VERSION = "rtp.version"
    RTP_CSRC = "rtp.csrc_beyond_end"
    RTP_EXTENSION = "rtp.extension_beyond_end"
    RTP_PADDING = "rtp.bad_padding"
    RTP_PAYLOAD_TYPE = "rtp.payload_type"
    RTCP_TRUNCATED = "rtcp.truncated"
    RTCP_VERSION = "rtcp.version"
    RTCP_LENGTH = "rtcp.length"
    RTCP_FIRST = "rtcp.first_not_sr_rr"
    RTCP_PACKET_TYPE = "rtcp.packet_type"
    RTCP_PADDING = "rtcp.bad_padding"
    RTCP_SHORT = "rtcp.short_packet"


def payload_type_mask(ranges: tuple[str, ...] | list[str]) -> int:
    """A 128-bit mask of payload types from items like ``"0"`` or ``"96-127"``. ValueError if one is not."""
    mask = 0
    for item in ranges:
        first, _, last = item.partition("-")
        lo, hi = int(first), int(last or first)
        if not 0 <= lo <= hi <= 127:
            raise ValueError(f"{item!r}: payload types are 0-127, first <= last")
        mask |= ((1 << (hi - lo + 1)) - 1) << lo
    return mask


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 section 4: whether a datagram on a multiplexed port is RTCP."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def parse_rtp(data: bytes, payload_types: int) -> tuple[int, int] | Problem:
    """(SSRC, payload type) of a valid RTP datagram, else the ``Problem``.

    ``payload_types``: the allowed set as a mask (``payload_type_mask``).
    """
    size = len(data)
    if size < RTP_HEADER:
        return Problem.RTP_TRUNCATED
    first, second, _seq, _ts, ssrc = _RTP.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        return Problem.RTP_VERSION
    header = RTP_HEADER + 4 * (first & 0x0F)
    if header > size:
        return Problem.RTP_CSRC
    if first & 0x10:
        if header + 4 > size:
            return Problem.RTP_EXTENSION
        header += 4 + 4 * ((data[header + 2] << 8) | data[header + 3])
        if header > size:
            return Problem.RTP_EXTENSION
    if first & 0x20:
        # A.1: "the last octet of the packet must contain a valid octet count,
        # in particular, less than the total packet length minus the header size".
        pad = data[size - 1]
        if pad == 0 or pad > size - header:
            return Problem.RTP_PADDING
    pt = second & 0x7F
    if not payload_types >> pt & 1:
        return Problem.RTP_PAYLOAD_TYPE
    return ssrc, pt


def parse_rtcp(data: bytes, feedback: bool) -> int | Problem:
    """The sender SSRC of the first packet of a valid compound RTCP datagram, else the ``Problem``.

    ``feedback``: RFC 4585's RTPFB and PSFB (205, 206) are allowed.
    """
    size = len(data)
    if size < _RR_FIXED:
        return Problem.RTCP_TRUNCATED
    pos = 0
    while pos < size:
        if pos + RTCP_HEADER > size:
            return Problem.RTCP_LENGTH
        first, ptype, words = _RTCP.unpack_from(data, pos)
        if first >> 6 != RTP_VERSION:
            return Problem.RTCP_VERSION
        end = pos + (words + 1) * 4
        if end > size:
            return Problem.RTCP_LENGTH
        if pos == 0 and ptype != SR and ptype != RR:
            return Problem.RTCP_FIRST
        if ptype not in BASE_TYPES and not (feedback and ptype in FEEDBACK_TYPES):
            return Problem.RTCP_PACKET_TYPE
        length = end - pos
        if first & 0x20:
            # A.2: padding only on the last packet, and the count fits in it.
            pad = data[end - 1]
            if end != size or pad == 0 or pad > length - RTCP_HEADER:
                return Problem.RTCP_PADDING
            length -= pad
        count = first & 0x1F
        if ptype == SR:
            need = _SR_FIXED + count * _REPORT_BLOCK
        elif ptype == RR:
            need = _RR_FIXED + count * _REPORT_BLOCK
        elif ptype == BYE:
            need = RTCP_HEADER + 4 * count
        elif ptype == APP:
            need = _APP_FIXED
        elif ptype == SDES:
            need = RTCP_HEADER  # chunks are the receiver's to read; the length checks bound them
        else:
            need = _FB_FIXED
        if length < need:
            return Problem.RTCP_SHORT
        pos = end
    return _SSRC.unpack_from(data, 4)[0]
