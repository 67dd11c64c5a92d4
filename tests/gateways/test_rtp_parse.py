"""The RTP and RTCP checks (gateways/rtp/parse.py): each rule at its limit and one past it, then Hypothesis."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateways.rtp.parse import Problem, is_rtcp, parse_rtcp, parse_rtp, payload_type_mask
from tests.gateways.rtp_packets import app, bye, fb, rr, rtcp_packet, rtp, sdes, sr

DEFAULT_PT = payload_type_mask(("0-63", "96-127"))
ALL_PT = payload_type_mask(("0-127",))


# ---- RTP ------------------------------------------------------------------------------------------


def test_a_plain_rtp_datagram_gives_its_ssrc_and_payload_type() -> None:
    assert parse_rtp(rtp(ssrc=0xCAFE, pt=8), DEFAULT_PT) == (0xCAFE, 8)


def test_the_fixed_header_is_twelve_bytes() -> None:
    assert parse_rtp(rtp(payload=b""), DEFAULT_PT) == (0x11223344, 0)
    assert parse_rtp(rtp(payload=b"")[:11], DEFAULT_PT) is Problem.RTP_TRUNCATED
    assert parse_rtp(b"", DEFAULT_PT) is Problem.RTP_TRUNCATED


@pytest.mark.parametrize("version", [0, 1, 3])
def test_only_version_2(version: int) -> None:
    assert parse_rtp(rtp(version=version), DEFAULT_PT) is Problem.RTP_VERSION


def test_the_csrc_list_must_be_within_the_datagram() -> None:
    full = rtp(csrc=(1, 2, 3), payload=b"")
    assert parse_rtp(full, DEFAULT_PT) == (0x11223344, 0)  # exactly at the end
    assert parse_rtp(full[:-1], DEFAULT_PT) is Problem.RTP_CSRC
    assert parse_rtp(rtp(cc=15, payload=b"x" * 59), DEFAULT_PT) is Problem.RTP_CSRC
    assert parse_rtp(rtp(cc=15, payload=b"x" * 60), DEFAULT_PT) == (0x11223344, 0)


def test_the_extension_header_and_its_length_must_be_within_the_datagram() -> None:
    full = rtp(extension=b"\x10\x01\x02\x03" * 2, payload=b"")
    assert parse_rtp(full, DEFAULT_PT) == (0x11223344, 0)
    assert parse_rtp(full[:-1], DEFAULT_PT) is Problem.RTP_EXTENSION  # one byte of the extension missing
    assert parse_rtp(full[:14], DEFAULT_PT) is Problem.RTP_EXTENSION  # the extension header itself cut


def test_the_padding_count_must_be_at_least_one_and_leave_the_header() -> None:
    assert parse_rtp(rtp(padding=4), DEFAULT_PT) == (0x11223344, 0)
    assert parse_rtp(rtp(padding=4, pad_count=0), DEFAULT_PT) is Problem.RTP_PADDING
    # All of the datagram after the header may be padding, not one octet more.
    assert parse_rtp(rtp(payload=b"", padding=4, pad_count=4), DEFAULT_PT) == (0x11223344, 0)
    assert parse_rtp(rtp(payload=b"", padding=4, pad_count=5), DEFAULT_PT) is Problem.RTP_PADDING
    with_csrc = rtp(csrc=(9,), payload=b"", padding=4, pad_count=4)
    assert parse_rtp(with_csrc, DEFAULT_PT) == (0x11223344, 0)
    assert parse_rtp(rtp(csrc=(9,), payload=b"", padding=4, pad_count=5), DEFAULT_PT) is Problem.RTP_PADDING


def test_payload_types_outside_the_set_are_refused() -> None:
    for pt in (0, 63, 96, 127):
        assert parse_rtp(rtp(pt=pt), DEFAULT_PT) == (0x11223344, pt)
    for pt in (64, 72, 95):
        assert parse_rtp(rtp(pt=pt), DEFAULT_PT) is Problem.RTP_PAYLOAD_TYPE
    only = payload_type_mask(("0", "8"))
    assert parse_rtp(rtp(pt=8), only) == (0x11223344, 8)
    assert parse_rtp(rtp(pt=9), only) is Problem.RTP_PAYLOAD_TYPE


def test_payload_type_ranges() -> None:
    assert payload_type_mask(("0",)) == 1
    assert payload_type_mask(("96-127",)) == ((1 << 32) - 1) << 96
    for bad in ("128", "5-4", "-1"):
        with pytest.raises(ValueError):
            payload_type_mask((bad,))


def test_rfc_5761_demultiplexing_by_the_second_octet() -> None:
    assert is_rtcp(sr()) and is_rtcp(rr())
    assert is_rtcp(bytes([0x80, 192])) and is_rtcp(bytes([0x80, 223]))
    assert not is_rtcp(bytes([0x80, 191])) and not is_rtcp(bytes([0x80, 224]))
    assert not is_rtcp(rtp(pt=0, marker=True)) and not is_rtcp(rtp(pt=127))
    assert not is_rtcp(b"\x80")


# ---- RTCP -----------------------------------------------------------------------------------------


def test_a_compound_packet_gives_the_first_sender_ssrc() -> None:
    compound = sr(0xAA, blocks=(0xBB,)) + sdes(0xAA) + bye(0xAA) + app(0xAA)
    assert parse_rtcp(compound, False) == 0xAA
    assert parse_rtcp(rr(0xCC) + sdes(0xCC), False) == 0xCC
    assert parse_rtcp(rr(0xCC), False) == 0xCC


@pytest.mark.parametrize("version", [0, 1, 3])
def test_rtcp_only_version_2_in_every_packet(version: int) -> None:
    assert parse_rtcp(rr(version=version), False) is Problem.RTCP_VERSION
    assert parse_rtcp(rr() + sdes(version=version), False) is Problem.RTCP_VERSION


def test_the_first_packet_is_sr_or_rr() -> None:
    assert parse_rtcp(sdes() + rr(), False) is Problem.RTCP_FIRST
    assert parse_rtcp(bye(1) + rr(), False) is Problem.RTCP_FIRST
    assert parse_rtcp(fb(), True) is Problem.RTCP_FIRST  # reduced-size RTCP (RFC 5506) is not taken


def test_the_lengths_must_fill_the_datagram_exactly() -> None:
    compound = rr() + sdes()
    assert parse_rtcp(compound + b"\x81\xca\x00\x05", False) is Problem.RTCP_LENGTH  # an SDES header, no body
    assert parse_rtcp(compound + b"\x80", False) is Problem.RTCP_LENGTH
    assert parse_rtcp(compound[:-4], False) is Problem.RTCP_LENGTH  # the last packet cut short
    assert parse_rtcp(rr(length=2), False) is Problem.RTCP_LENGTH  # says 12 bytes, has 8
    assert parse_rtcp(rr(length=0) + b"\0" * 4, False) is Problem.RTCP_SHORT  # says 4: no room for the SSRC
    assert parse_rtcp(b"\x80\xc9\x00", False) is Problem.RTCP_TRUNCATED


def test_packet_types_200_to_204_and_feedback_by_setting() -> None:
    assert parse_rtcp(rr() + fb(205), True) == 0x55667788
    assert parse_rtcp(rr() + fb(206), True) == 0x55667788
    assert parse_rtcp(rr() + fb(205), False) is Problem.RTCP_PACKET_TYPE
    assert parse_rtcp(rr() + fb(206), False) is Problem.RTCP_PACKET_TYPE
    for ptype in (199, 207, 195):
        assert parse_rtcp(rr() + rtcp_packet(ptype, 0, b"\0" * 8), True) is Problem.RTCP_PACKET_TYPE


def test_padding_only_on_the_last_packet_and_within_it() -> None:
    assert parse_rtcp(rr() + sdes(padding=4), False) == 0x55667788
    assert parse_rtcp(rr(padding=4) + sdes(), False) is Problem.RTCP_PADDING
    zero = bytearray(rr() + sdes(padding=4))
    zero[-1] = 0
    assert parse_rtcp(bytes(zero), False) is Problem.RTCP_PADDING
    # RR with no blocks: 8 bytes, and 4 of padding make 12; a count of 9 reaches into the header,
    # a count of 8 leaves the header but eats the SSRC.
    over = bytearray(rr(padding=4))
    over[-1] = 9
    assert parse_rtcp(bytes(over), False) is Problem.RTCP_PADDING
    over[-1] = 8
    assert parse_rtcp(bytes(over), False) is Problem.RTCP_SHORT
    at = bytearray(rr(padding=4))
    at[-1] = 4
    assert parse_rtcp(bytes(at), False) == 0x55667788


def test_each_type_is_as_long_as_its_fixed_part_and_its_counted_items() -> None:
    assert parse_rtcp(sr(blocks=(1, 2)), False) == 0x11223344
    cut = rtcp_packet(200, 2, sr(blocks=(1, 2))[4:-4])  # one block short of its count
    assert parse_rtcp(cut, False) is Problem.RTCP_SHORT
    assert parse_rtcp(rtcp_packet(201, 1, struct.pack("!I", 5) + b"\0" * 20), False) is Problem.RTCP_SHORT
    assert parse_rtcp(rtcp_packet(201, 1, struct.pack("!I", 5) + b"\0" * 24), False) == 5
    assert parse_rtcp(rr() + rtcp_packet(203, 2, b"\0" * 4), False) is Problem.RTCP_SHORT
    assert parse_rtcp(rr() + rtcp_packet(203, 2, b"\0" * 8), False) == 0x55667788
    assert parse_rtcp(rr() + rtcp_packet(204, 0, b"\0" * 4), False) is Problem.RTCP_SHORT
    assert parse_rtcp(rr() + rtcp_packet(205, 1, b"\0" * 4), True) is Problem.RTCP_SHORT


# ---- Hypothesis ------------------------------------------------------------------------------------

_ssrc = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, (1 << 128) - 1))
def test_rtp_never_raises_on_any_bytes(data: bytes, mask: int) -> None:
    got = parse_rtp(data, mask)
    assert isinstance(got, Problem) or (len(data) >= 12 and data[0] >> 6 == 2 and mask >> got[1] & 1)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_rtcp_never_raises_on_any_bytes(data: bytes, feedback: bool) -> None:
    got = parse_rtcp(data, feedback)
    assert isinstance(got, (int, Problem))
    if not isinstance(got, Problem):
        assert len(data) % 4 == 0 and data[1] in (200, 201)


@settings(max_examples=500, deadline=None)
@given(
    seq=st.integers(0, 0xFFFF), ssrc=_ssrc, pt=st.sampled_from([0, 8, 9, 18, 96, 111, 127]),
    csrc=st.lists(_ssrc, max_size=15).map(tuple), ext=st.none() | st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]),
    payload=st.binary(max_size=300), padding=st.integers(0, 255), marker=st.booleans(),
)
def test_every_well_formed_rtp_datagram_is_valid_and_every_cut_one_is_not(
    seq: int, ssrc: int, pt: int, csrc: tuple[int, ...], ext: bytes | None, payload: bytes, padding: int, marker: bool,
) -> None:
    data = rtp(seq, ssrc=ssrc, pt=pt, csrc=csrc, extension=ext, payload=payload, padding=padding, marker=marker)
    assert parse_rtp(data, DEFAULT_PT) == (ssrc, pt)
    header = 12 + 4 * len(csrc) + (4 + len(ext) if ext is not None else 0)
    for cut in range(1, header + 1):  # any cut into the header is caught
        assert isinstance(parse_rtp(data[: header - cut], DEFAULT_PT), Problem)


_rtcp_packet = st.one_of(
    st.builds(sdes, _ssrc, st.binary(max_size=20)),
    st.builds(lambda s: bye(*s), st.lists(_ssrc, max_size=31)),
    st.builds(app, _ssrc, st.just(b"NAME"), st.binary(max_size=20).map(lambda b: b[: len(b) // 4 * 4])),
    st.builds(fb, st.sampled_from([205, 206]), st.integers(0, 31), _ssrc, _ssrc,
              st.binary(max_size=20).map(lambda b: b[: len(b) // 4 * 4])),
)


@settings(max_examples=500, deadline=None)
@given(
    first=st.one_of(st.builds(sr, _ssrc, st.lists(_ssrc, max_size=31).map(tuple)),
                    st.builds(rr, _ssrc, st.lists(_ssrc, max_size=31).map(tuple))),
    rest=st.lists(_rtcp_packet, max_size=4),
    data=st.data(),
)
def test_every_well_formed_compound_is_valid_and_every_cut_or_extension_is_not(
    first: bytes, rest: list[bytes], data: st.DataObject
) -> None:
    compound = first + b"".join(rest)
    ssrc = struct.unpack_from("!I", compound, 4)[0]
    assert parse_rtcp(compound, True) == ssrc
    boundaries = set(itertools.accumulate(len(p) for p in [first, *rest]))
    cut = data.draw(st.integers(1, len(compound)))
    # A cut between two packets leaves a shorter compound that is still valid; any other is not.
    assert isinstance(parse_rtcp(compound[:-cut], True), Problem) is (len(compound) - cut not in boundaries)
    tail = data.draw(st.binary(min_size=1, max_size=12))
    got = parse_rtcp(compound + tail, True)
    if not isinstance(got, Problem):  # the tail happens to be a well-formed packet of an allowed type
        assert len(tail) % 4 == 0 and tail[0] >> 6 == 2
