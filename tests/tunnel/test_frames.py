"""The tunnel's frame codec and UDP datagram format (tunnel/frames.py, datagrams.py)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.datagrams import (
    Datagram, DatagramError, DatagramType, DropReason, encode_datagram,
    peek_key_id, verify_datagram,
)
from tunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from tunnel.frames import (
    FRAME_CLASSES, HEADER_SIZE, MIN_MAX_FRAME_SIZE, Ack, Bye, ClosePort, ConnectPort, Data,
    Err, EventAccepted, EventFin, EventRst, Frame, FrameDecoder, FrameType, Hello, InitErr,
    InitOk, Keepalive, KeepaliveAck, ListenPort, Opened, OpenPort, Proto, RedirectPort,
    SINCE_VERSION, STREAM_ID_BASE, CheckTarget, OpenConnect, OpenStream, UdpKey, WindowUpdate, data_chunk_size, encode_frame,
    encode_frame_parts,
)

V4 = IPv4Address("192.168.1.10")
V6 = IPv6Address("fd00::10")
KEY = bytes(range(32))

SAMPLES: list[Frame] = [
    Hello(
        (1, 2), "mediator-7", b"\x00token\xff", "web-help",
        (IPv4Interface("192.168.1.2/24"), IPv6Interface("fd00::2/64")),
        25000, 131072, request_id=1,
    ),
    Hello((1,), "", b"", "", (), 1000, MIN_MAX_FRAME_SIZE, request_id=0xFFFFFFFF),
    InitOk(1, 7, 131072, request_id=1),
    InitErr(ErrorCode.UNSUPPORTED_VERSION, "no common version", (1,), request_id=1),
    InitErr(ErrorCode.TIMEOUT, "no HELLO in time", (1, 3)),
    OpenPort(Proto.TCP, V4, 8080, False, request_id=2),
    OpenPort(Proto.UDP, V6, 0, True, request_id=3),
    RedirectPort(V4, 5004, True, request_id=4),
    ConnectPort(1, V4, 80, request_id=5),
    ConnectPort(9, V6, 443, request_id=5),
    ListenPort(1, request_id=6),
    ClosePort(1, request_id=7),
    UdpKey(7, KEY, request_id=8),
    OpenConnect(IPv4Address("192.168.1.2"), V4, 80, request_id=10),
    OpenConnect(IPv6Address("fd00::2"), V6, 443, request_id=11),
    OpenStream(STREAM_ID_BASE + 5, IPv4Address("192.168.1.2"), V4, 80, request_id=12),
    CheckTarget(Proto.TCP, V4, 80, request_id=12),
    CheckTarget(Proto.UDP, V6, 5060, request_id=13),
    Opened(1, 8080, request_id=2),
    Ack(request_id=5),
    Err(ErrorCode.PORT_IN_USE, 0, "8080 is taken", request_id=2),
    Err(ErrorCode.NOT_ALLOWED, 3, "send to 10.0.0.1:53 is not allowed"),
    Data(1, V4, 80, b"GET / HTTP/1.0\r\n\r\n"),
    Data(2, V6, 5353, b""),
    EventAccepted(1, 2, V4, 51000),
    EventAccepted(1, 3, V6, 51001),
    EventFin(2),
    EventRst(2),
    WindowUpdate(2, 65536),
    Keepalive(request_id=9),
    KeepaliveAck(request_id=9),
    Bye(ErrorCode.NORMAL, "bye"),
    Bye(ErrorCode.TIMEOUT, "\u00e9t\u00e9 \u2603"),
]
def version_of(frame: Frame) -> int:
    """The first version that has the frame's type (the codec's default, 1, for the rest)."""
    return SINCE_VERSION.get(frame.TYPE, 1)


STREAM = b"".join(encode_frame(f, version_of(f)) for f in SAMPLES)


def decode_all(data: bytes, decoder: FrameDecoder | None = None) -> list[Frame]:
    decoder = decoder or FrameDecoder()
    decoder.feed(data)
    return list(decoder)


def header(type_: int, length: int, *, version: int = 1, flags: int = 0, request_id: int = 0) -> bytes:
    return struct.pack("!BBHII", version, type_, flags, request_id, length)


# -- round trips ----------------------------------------------------------------


def test_samples_cover_every_frame_type() -> None:
    assert {f.TYPE for f in SAMPLES} == set(FrameType) == set(FRAME_CLASSES)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: Frame) -> None:
    raw = encode_frame(frame, version_of(frame))
    assert raw[0] == version_of(frame) and raw[1] == frame.TYPE
    assert int.from_bytes(raw[8:12], "big") == len(raw) - HEADER_SIZE
    assert decode_all(raw) == [frame]


def test_decoder_whole_stream() -> None:
    assert decode_all(STREAM) == SAMPLES


def test_decoder_byte_by_byte() -> None:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        frames += list(decoder)
    assert frames == SAMPLES
    assert decoder.buffered == 0


def test_decoder_split_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        decoder.feed(STREAM[:cut])
        frames = list(decoder)
        decoder.feed(STREAM[cut:])
        frames += list(decoder)
        assert frames == SAMPLES, cut


def test_incomplete_frame_waits() -> None:
    raw = encode_frame(SAMPLES[0])
    decoder = FrameDecoder()
    decoder.feed(raw[:-1])
    assert decoder.next_frame() is None
    decoder.feed(raw[-1:])
    assert decoder.next_frame() == SAMPLES[0]
    assert decoder.next_frame() is None


# -- max frame size -------------------------------------------------------------


def test_max_frame_size_at_the_limit_and_one_past() -> None:
    limit = MIN_MAX_FRAME_SIZE
    chunk = data_chunk_size(limit, V6)
    at_limit = encode_frame(Data(1, V6, 9, b"x" * chunk))
    assert len(at_limit) == limit
    assert decode_all(at_limit, FrameDecoder(limit)) == [Data(1, V6, 9, b"x" * chunk)]
    one_past = encode_frame(Data(1, V6, 9, b"x" * (chunk + 1)))
    decoder = FrameDecoder(limit)
    decoder.feed(one_past[:HEADER_SIZE])  # refused on the header, body unread
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_whole_udp_datagram_fits_the_smallest_limit() -> None:
    assert data_chunk_size(MIN_MAX_FRAME_SIZE, V6) == 65535
    assert data_chunk_size(MIN_MAX_FRAME_SIZE, V4) == 65535 + 12


# -- refusals ---------------------------------------------------------------------


def refused(data: bytes, decoder: FrameDecoder | None = None) -> ErrorCode:
    decoder = decoder or FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError) as info:
        list(decoder)
    return info.value.code


def test_unknown_frame_type() -> None:
    assert refused(header(0x7F, 0)) is ErrorCode.UNKNOWN_FRAME


def test_unsupported_version() -> None:
    assert refused(encode_frame(Keepalive(request_id=1), version=6)) is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("frame", [f for f in SAMPLES if f.TYPE in SINCE_VERSION], ids=lambda f: type(f).__name__)
def test_a_frame_type_does_not_exist_before_its_version(frame: Frame) -> None:
    """Version 2's requests (version 3's WINDOW_UPDATE) are UNKNOWN_FRAME in a
    session of an older version, and cannot be encoded in it."""
    since = SINCE_VERSION[frame.TYPE]
    new = encode_frame(frame, since)
    decoder = FrameDecoder()
    decoder.version = since - 1
    decoder.feed(bytes([since - 1]) + new[1:])
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.UNKNOWN_FRAME
    with pytest.raises(LocalProtocolError):
        encode_frame(frame, since - 1)


def test_negotiation_frames_are_read_in_any_version() -> None:
    hello = SAMPLES[0]
    init_err = SAMPLES[3]
    assert decode_all(encode_frame(hello, version=9) + encode_frame(init_err, version=200)) == [
        hello, init_err,
    ]


def test_negotiated_version_is_enforced() -> None:
    decoder = FrameDecoder(versions=(1, 2))
    assert decode_all(encode_frame(Keepalive(request_id=1), version=2), decoder)
    decoder.version = 1
    assert refused(encode_frame(Keepalive(request_id=1), version=2), decoder) is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "raw",
    [
        header(FrameType.ACK, 0, flags=1, request_id=1),  # reserved flags
        header(FrameType.ACK, 1, request_id=1) + b"\x00",  # trailing byte
        header(FrameType.KEEPALIVE, 0),  # request without an id
        header(FrameType.ACK, 0),  # reply without an id
        header(FrameType.EVENT_FIN, 4, request_id=3) + b"\x00\x00\x00\x01",  # unsolicited with id
        header(FrameType.LISTEN, 3, request_id=1) + b"\x00\x00\x01",  # truncated
        header(FrameType.OPEN_PORT, 8, request_id=1) + b"\x05\x00\x04\x01\x02\x03\x04\x00",
        header(FrameType.OPEN_PORT, 9, request_id=1) + b"\x06\x02\x04\x01\x02\x03\x04\x00\x50",
        header(FrameType.OPEN_PORT, 9, request_id=1) + b"\x06\x00\x05\x01\x02\x03\x04\x00\x50",
        header(FrameType.BYE, 5) + b"\x00\x00\x00\x01\xff",  # not UTF-8
        header(FrameType.BYE, 4) + b"\x03\xe7\x00\x00",  # unknown error code 999
        header(FrameType.HELLO, 1 + 1 + 4 + 4 + 6 + 1, request_id=1)
        + b"\x01\x00" + bytes(8) + bytes(6) + b"\x00",  # version 0
        header(FrameType.DATA, 10) + b"\x00\x00\x00\x01\x04\x0a\x00\x00\x01\x00",  # DATA: no room for its port
        header(FrameType.DATA, 22) + b"\x00\x00\x00\x01\x06" + bytes(15) + b"\x00\x50",  # DATA: short IPv6 address
        header(FrameType.DATA, 11) + b"\x00\x00\x00\x01\x05\x0a\x00\x00\x01\x00\x50",  # DATA: family 5
        header(FrameType.DATA, 4) + b"\x00\x00\x00\x01",  # DATA: no address at all
    ],
    ids=[
        "flags", "trailing", "request-no-id", "reply-no-id", "unsolicited-id", "truncated",
        "bad-proto", "bad-flag", "bad-family", "utf8", "error-code", "version-0",
        "data-no-port", "data-short-v6", "data-family", "data-no-address",
    ],
)
def test_bad_request(raw: bytes) -> None:
    assert refused(raw) is ErrorCode.BAD_REQUEST


def test_prefix_too_long() -> None:
    body = bytearray(encode_frame(SAMPLES[0])[HEADER_SIZE:])
    body[-1] = 129  # the IPv6 interface's prefix length
    assert refused(header(FrameType.HELLO, len(body), request_id=1) + body) is ErrorCode.BAD_REQUEST


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    decoder.feed(header(0x7F, 0) + encode_frame(Keepalive(request_id=1)))
    for _ in range(2):
        with pytest.raises(ProtocolError):
            decoder.next_frame()


def test_frames_before_an_error_are_delivered() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(EventFin(1)) + header(0x7F, 0))
    assert decoder.next_frame() == EventFin(1)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize(
    "frame",
    [
        OpenPort(Proto.TCP, V4, 70000, False, request_id=1),
        ConnectPort(-1, V4, 80, request_id=1),
        Keepalive(),
        EventFin(1, request_id=2),
        Data(1, "10.0.0.1", 80, b""),  # type: ignore[arg-type]
        Hello((0,), "", b"", "", (), 1, 1, request_id=1),
    ],
)
def test_encoder_refuses_bad_frames(frame: Frame) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(frame)


# -- fuzzing: bytes in, frames or ProtocolError out -----------------------------


def drain(decoder: FrameDecoder, chunks: list[bytes]) -> None:
    """Feed ``chunks``: every frame that comes out must re-encode faithfully."""
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for frame in decoder:
                assert decode_all(encode_frame(frame, version_of(frame))) == [frame]
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_arbitrary_bytes(chunks: list[bytes]) -> None:
    drain(FrameDecoder(MIN_MAX_FRAME_SIZE), chunks)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(sorted(FrameType)),
    st.integers(0, 3),
    st.binary(max_size=80),
    st.integers(0, 2),
)
def test_fuzz_valid_header_random_body(type_: FrameType, request_id: int, body: bytes, extra: int) -> None:
    raw = header(type_, len(body) + extra, request_id=request_id) + body + bytes(extra)
    decoder = FrameDecoder()
    try:
        decoder.feed(raw)
        for frame in decoder:  # what decodes re-encodes to the same bytes
            assert encode_frame(frame) == raw
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_samples(frame: Frame, position: int, value: int) -> None:
    raw = bytearray(encode_frame(frame, version_of(frame)))
    raw[position % len(raw)] = value
    drain(FrameDecoder(), [bytes(raw)])


# -- UDP datagrams ------------------------------------------------------------------


def dgram(seq: int = 0, **kw: object) -> Datagram:
    fields: dict[str, object] = dict(
        type=DatagramType.DATA, key_id=7, channel_id=3, seq=seq, from_server=False,
        address=V4, port=5004, data=b"rtp",
    )
    fields.update(kw)
    return Datagram(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "datagram",
    [
        dgram(),
        dgram(seq=2**64 - 1, address=V6, data=b"", from_server=True),
        dgram(type=DatagramType.KEEPALIVE, address=None, port=0, data=b""),
        dgram(type=DatagramType.KEEPALIVE_ACK, address=None, port=0, data=b"", from_server=True),
    ],
)
def test_datagram_round_trip(datagram: Datagram) -> None:
    raw = encode_datagram(datagram, KEY)
    assert peek_key_id(raw) == 7
    assert verify_datagram(raw, KEY, 7, from_server=datagram.from_server) == datagram


def drop(raw: bytes, *, key: bytes = KEY, key_id: int = 7, from_server: bool = False) -> DropReason:
    with pytest.raises(DatagramError) as info:
        verify_datagram(raw, key, key_id, from_server=from_server)
    return info.value.reason


def test_forged_tag_refused() -> None:
    raw = encode_datagram(dgram(), KEY)
    for i in range(len(raw)):
        forged = bytearray(raw)
        forged[i] ^= 0x01
        reason = drop(bytes(forged))
        if i >= 8:  # channel, seq, payload, tag: only the HMAC can tell
            assert reason is DropReason.BAD_TAG, i
        else:  # version, type, flags, reserved, key id
            assert reason in (DropReason.MALFORMED, DropReason.BAD_TAG, DropReason.UNKNOWN_KEY), i
    assert drop(raw, key=bytes(32)) is DropReason.BAD_TAG


def test_wrong_key_id_direction_and_malformed() -> None:
    raw = encode_datagram(dgram(), KEY)
    assert drop(raw, key_id=8) is DropReason.UNKNOWN_KEY
    assert drop(raw, from_server=True) is DropReason.DIRECTION  # a reflection
    assert drop(raw[:35]) is DropReason.MALFORMED
    assert drop(b"\x02" + raw[1:]) is DropReason.MALFORMED
    assert peek_key_id(raw[:35]) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_datagrams(raw: bytes) -> None:
    try:
        verify_datagram(raw, KEY, peek_key_id(raw) or 0, from_server=False)
    except DatagramError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.sampled_from(list(DatagramType)), st.booleans())
def test_fuzz_authenticated_bodies(body: bytes, type_: DatagramType, from_server: bool) -> None:
    """A peer holding the key can still send nonsense: only DatagramError."""
    import hashlib
    import hmac

    signed = struct.pack("!BBBBIIQ", 1, type_, int(from_server), 0, 7, 3, 1) + body
    raw = signed + hmac.new(KEY, signed, hashlib.sha256).digest()[:16]
    try:
        got = verify_datagram(raw, KEY, 7, from_server=from_server)
    except DatagramError:
        return
    assert encode_datagram(got, KEY) == raw


def test_addresses_are_ipaddress_values() -> None:
    frame = decode_all(encode_frame(Data(1, ip_address("::ffff:10.0.0.1"), 1, b"")))[0]
    assert isinstance(frame, Data) and frame.address == IPv6Address("::ffff:10.0.0.1")


# -- writing into the decoder's buffer (BufferedProtocol), and frames in pieces --


def into(decoder: FrameDecoder, data: bytes, sizehint: int | None = None) -> None:
    """What TLS does through ``get_buffer``: write as much as the view takes, ask again."""
    while data:
        view = decoder.get_buffer(len(data) if sizehint is None else sizehint)
        n = min(len(view), len(data))
        view[:n] = data[:n]
        view.release()
        decoder.buffer_updated(n)
        data = data[n:]


BULK = [Data(7, V6, 9, bytes(range(256)) * 400), Data(8, V4, 80, b"y" * 40), Data(9, V4, 80, b"z" * 70000)]
BULK_STREAM = b"".join(encode_frame(f, 4) for f in BULK) + STREAM


def test_decoder_written_into_at_every_offset() -> None:
    expected = BULK + SAMPLES
    for cut in range(0, len(BULK_STREAM) + 1, 97):
        decoder = FrameDecoder(versions=(1, 2, 3, 4))
        into(decoder, BULK_STREAM[:cut])
        frames = list(decoder)
        into(decoder, BULK_STREAM[cut:], sizehint=5000)
        frames += list(decoder)
        assert frames == expected, cut
        assert decoder.buffered == 0


def test_decoder_mixes_feed_and_buffer_and_gives_memory_back() -> None:
    decoder = FrameDecoder()
    raw = encode_frame(BULK[0], 4)
    into(decoder, raw[:1000])
    decoder.feed(raw[1000:])
    assert list(decoder) == [BULK[0]]
    assert decoder.capacity >= len(raw) - 1000
    decoder.get_buffer(100)  # empty, and a small read: the bulk buffer goes
    assert decoder.capacity <= 1024
    with pytest.raises(ValueError):
        decoder.buffer_updated(decoder.capacity + 1)


def test_data_frame_in_pieces_is_its_encoding_without_a_copy() -> None:
    payload = memoryview(b"p" * 100000)[10:]
    frame = Data(3, V4, 443, payload)
    head, body = encode_frame_parts(frame, 4)
    assert head + bytes(body) == encode_frame(frame, 4)
    assert body is payload
    for other in SAMPLES:
        assert b"".join(encode_frame_parts(other, version_of(other))) == encode_frame(other, version_of(other))
