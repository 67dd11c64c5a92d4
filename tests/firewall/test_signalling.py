"""Signalling: codec round trips, the Guard's refusals in order, the key file, and the doc's bytes."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.config import NAME
from firewall.errors import NfgateError
from firewall.signalling import (
    KEY_SIZE,
    MAX_DATAGRAM,
    MAX_MESSAGE_SIZE,
    Answer,
    Counters,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Guard,
    KeyFileError,
    Message,
    MsgType,
    NewFlow,
    NotFound,
    OffloadRequest,
    Proto,
    Query,
    Received,
    Refusal,
    Role,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    flow_id_queue,
    load_or_create_key,
    make_flow_id,
    names_third_party,
    rule_request_problem,
)
from firewall.signalling import examples
from firewall.signalling.codec import (
    BODY,
    DATAGRAM_SIZE,
    HEADER,
    HEADER_SIZE,
    MAC_SIZE,
    MAX_COPIES,
    MIN_MESSAGE_SIZE,
    VERSION,
    Mac,
)
from firewall.signalling.messages import GATEWAY_NAME_SIZE, SENDER_OF

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
T0 = 1_700_000_000.0
WINDOW = 5.0
ip = ipaddress.IPv4Address
IPv4 = ipaddress.IPv4Address

FLOW = examples.SMTP_FLOW
MESSAGES: list[Message] = [m for _, m in examples.EXAMPLES]


def receiver_of(message: Message) -> Role:
    return Role.GATEWAY if SENDER_OF[message.TYPE] is Role.PROCESSOR else Role.PROCESSOR


def encoder_for(message: Message, *, sender_id: int = 0x1111, first_seq: int = 0, key: bytes = KEY) -> Encoder:
    return Encoder(key, SENDER_OF[message.TYPE], sender_id=sender_id, first_seq=first_seq)


def guard_for(message: Message, **kw: object) -> Guard:
    # Created before T0: a Guard refuses what was sent before it existed.
    return Guard(KEY, receiver_of(message), now=T0 - 1, replay_window=WINDOW, **kw)  # type: ignore[arg-type]


def forge(
    msg_type: MsgType, body: bytes, *, sender: int = 0x2222, seq: int = 0, ts: float = T0, copy: int = 0
) -> bytes:
    """A datagram with a valid MAC around any body: what only a key holder could send."""
    data = HEADER.pack(VERSION, msg_type, copy, sender, seq, int(ts * 1000)) + body
    return data + Mac(KEY).tag(data)


# ---- messages ------------------------------------------------------------------------


def test_every_type_has_an_example_and_layout() -> None:
    assert {m.TYPE for m in MESSAGES} == set(MsgType) == set(BODY) == set(SENDER_OF)


def test_largest_message_fits_one_datagram() -> None:
    assert MAX_MESSAGE_SIZE == max(DATAGRAM_SIZE.values()) <= MAX_DATAGRAM == 1472


def test_messages_check_their_fields() -> None:
    with pytest.raises(TypeError):
        Endpoint("10.0.0.1", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Endpoint(ipaddress.IPv6Address("::ffff:10.0.0.1"), 1)  # an IPv4 peer has one spelling: IPv4Address
    with pytest.raises(ValueError):
        Endpoint(ip("10.0.0.1"), 65536)
    with pytest.raises(ValueError):
        FlowEnd(-1, FlowEndReason.FIN)
    with pytest.raises(ValueError):
        FlowEnd(1 << 64, FlowEndReason.FIN)
    with pytest.raises(ValueError):
        FlowEnd(1, 9)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RuleRequest(1, 1, Proto.TCP, FLOW.client, FLOW.server, 65536, RuleMode.ALLOW, False)
    with pytest.raises(TypeError):
        RuleRequest(1, 1, Proto.TCP, FLOW.client, FLOW.server, 5, RuleMode.ALLOW, 1)  # type: ignore[arg-type]


def test_plain_ints_become_enums() -> None:
    # firewall.flows keeps proto as a plain int.
    q = Query(1, 6, FLOW.firewall_side, FLOW.ag)  # type: ignore[arg-type]
    assert q.proto is Proto.TCP
    with pytest.raises(ValueError):
        Query(1, 1, FLOW.firewall_side, FLOW.ag)  # type: ignore[arg-type]


def test_gateway_names_are_the_configs_names() -> None:
    longest = "g" * GATEWAY_NAME_SIZE
    assert re.fullmatch(NAME, longest) and not re.fullmatch(NAME, longest + "g")
    flow = FlowInfo(**{**_fields(FLOW), "gateway": longest})
    assert _round_trip(NewFlow(flow)) == NewFlow(flow)
    for bad in ("", longest + "g", "a b", "smtp\0in", "é"):
        with pytest.raises(ValueError):
            FlowInfo(**{**_fields(FLOW), "gateway": bad})


def test_snat_is_a_whole_endpoint_or_none() -> None:
    ftp = examples.FTP_FLOW
    assert ftp.snat is not None and FLOW.snat is None
    assert _round_trip(NewFlow(ftp)) == NewFlow(ftp) and _round_trip(Answer(3, FLOW)) == Answer(3, FLOW)
    # On the wire "none" is all zeros, so neither zero can be part of a real W:w.
    for bad in (Endpoint(ip("0.0.0.0"), 0), Endpoint(ip("203.0.113.1"), 0), Endpoint(ip("0.0.0.0"), 61000),
                Endpoint(ip("255.255.255.255"), 61000)):
        with pytest.raises(ValueError):
            FlowInfo(**{**_fields(ftp), "snat": bad})
    with pytest.raises(TypeError):
        FlowInfo(**{**_fields(ftp), "snat": ("203.0.113.1", 61000)})


def test_flow_ids_carry_the_queue() -> None:
    fid = make_flow_id(65535, (1 << 48) - 1)
    assert fid == (1 << 64) - 1 and flow_id_queue(fid) == 65535
    assert flow_id_queue(make_flow_id(3, 12345)) == 3
    with pytest.raises(ValueError):
        make_flow_id(65536, 0)
    with pytest.raises(ValueError):
        make_flow_id(0, 1 << 48)


def _fields(flow: FlowInfo) -> dict[str, object]:
    return {f: getattr(flow, f) for f in FlowInfo.__dataclass_fields__}


# ---- codec round trips ---------------------------------------------------------------


def _round_trip(message: Message) -> Message:
    data = encoder_for(message).encode(message, T0)
    assert len(data) == DATAGRAM_SIZE[message.TYPE]
    got = guard_for(message).check(data, T0)
    assert isinstance(got, Received), got
    return got.message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE.name)
def test_round_trip_every_type(message: Message) -> None:
    assert _round_trip(message) == message


addresses = st.integers(0, (1 << 32) - 1).map(ipaddress.IPv4Address)
endpoints = st.builds(Endpoint, addresses, st.integers(0, 65535))
u64 = st.integers(0, (1 << 64) - 1)
names = st.from_regex(NAME, fullmatch=True)
hosts = addresses.filter(lambda a: not (a.is_unspecified or a.is_multicast or int(a) == 0xFFFFFFFF))
snats = st.none() | st.builds(Endpoint, hosts, st.integers(1, 65535))
flows = st.builds(FlowInfo, u64, st.sampled_from(Proto), names, endpoints, endpoints, endpoints, endpoints, endpoints, snats)
any_message = st.one_of(
    st.builds(NewFlow, flows),
    st.builds(Query, u64, st.sampled_from(Proto), endpoints, endpoints),
    st.builds(Answer, u64, flows),
    st.builds(NotFound, u64, st.sampled_from(Proto), endpoints, endpoints),
    st.builds(FlowEnd, u64, st.sampled_from(FlowEndReason), st.builds(Counters, u64, u64, u64, u64)),
    st.builds(
        RuleRequest, u64, u64, st.sampled_from(Proto), endpoints, endpoints,
        st.integers(0, 65535), st.sampled_from(RuleMode), st.booleans(),
    ),
    st.builds(RuleAck, u64, u64, u64),
    st.builds(RuleRefused, u64, st.sampled_from(RuleRefusal)),
    st.builds(RuleEnd, u64, st.sampled_from(RuleEndReason)),
    st.builds(OffloadRequest, u64, u64),
)


@given(any_message, u64, u64)
def test_round_trip_any_message(message: Message, sender: int, seq: int) -> None:
    data = encoder_for(message, sender_id=sender, first_seq=seq).encode(message, T0)
    got = guard_for(message).check(data, T0)
    assert got == Received(sender, seq, int(T0 * 1000), 0, message)


def test_encoder_refuses_what_its_role_does_not_send() -> None:
    with pytest.raises(ValueError):
        Encoder(KEY, Role.GATEWAY).encode(NewFlow(FLOW), T0)
    with pytest.raises(ValueError):
        Encoder(KEY, Role.PROCESSOR).encode(MESSAGES[1], T0)  # a QUERY


def test_encoder_counts_sequence_numbers_and_picks_random_senders() -> None:
    enc = Encoder(KEY, Role.PROCESSOR, first_seq=7)
    enc.encode(FlowEnd(1, FlowEndReason.IDLE), T0)
    enc.encode_copies(NewFlow(FLOW), T0, 3)
    assert enc.next_seq == 9
    assert Encoder(KEY, Role.PROCESSOR).sender_id != Encoder(KEY, Role.PROCESSOR).sender_id
    with pytest.raises(ValueError):
        enc.encode_copies(NewFlow(FLOW), T0, MAX_COPIES + 1)
    with pytest.raises(ValueError):
        Encoder(KEY[:16], Role.PROCESSOR)


# ---- refusals before the MAC ---------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE.name)
def test_truncation_at_every_offset(message: Message) -> None:
    data = encoder_for(message).encode(message, T0)
    guard = guard_for(message)
    for n in range(len(data)):
        assert guard.check(data[:n], T0) in (Refusal.TOO_SHORT, Refusal.MALFORMED), n
    assert guard.check(data + b"\0", T0) is Refusal.MALFORMED
    assert isinstance(guard.check(data, T0), Received)  # none of that touched the state


def test_header_checks() -> None:
    data = bytearray(encoder_for(NewFlow(FLOW)).encode(NewFlow(FLOW), T0))
    guard = guard_for(NewFlow(FLOW))
    assert guard.check(bytes(MIN_MESSAGE_SIZE - 1), T0) is Refusal.TOO_SHORT
    assert VERSION == 5  # 5: RULE_REQUEST mode 3, ORIGINATE (docs/signalling.md, "Versions")
    for version in (VERSION - 1, VERSION + 1):
        assert guard.check(bytes([version]) + bytes(data[1:]), T0) is Refusal.BAD_VERSION
    assert guard.check(bytes(data[:1]) + bytes([0]) + bytes(data[2:]), T0) is Refusal.UNKNOWN_TYPE
    assert guard.check(bytes(data[:1]) + bytes([200]) + bytes(data[2:]), T0) is Refusal.UNKNOWN_TYPE
    data[2] = MAX_COPIES
    assert guard.check(bytes(data), T0) is Refusal.MALFORMED


def test_wrong_direction_refused() -> None:
    # A processor's own NEW_FLOW reflected back at a processor.
    data = encoder_for(NewFlow(FLOW)).encode(NewFlow(FLOW), T0)
    assert Guard(KEY, Role.PROCESSOR, now=T0 - 1).check(data, T0) is Refusal.WRONG_DIRECTION
    query = MESSAGES[1]
    data = encoder_for(query).encode(query, T0)
    assert Guard(KEY, Role.GATEWAY, now=T0 - 1).check(data, T0) is Refusal.WRONG_DIRECTION


# ---- MAC -----------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE.name)
def test_wrong_key_is_bad_mac(message: Message) -> None:
    data = encoder_for(message, key=OTHER_KEY).encode(message, T0)
    assert guard_for(message).check(data, T0) is Refusal.BAD_MAC


@given(st.sampled_from(MESSAGES), st.data())
def test_any_flipped_bit_is_refused(message: Message, data: st.DataObject) -> None:
    datagram = bytearray(encoder_for(message).encode(message, T0))
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 1 << bit % 8
    assert isinstance(guard_for(message).check(bytes(datagram), T0), Refusal)


# ---- freshness and replay ------------------------------------------------------------


@pytest.mark.parametrize("skew", [WINDOW + 0.002, -(WINDOW + 0.002)])
def test_stale_both_ways(skew: float) -> None:
    message = NewFlow(FLOW)
    data = encoder_for(message).encode(message, T0 + skew)
    assert guard_for(message).check(data, T0) is Refusal.STALE


@pytest.mark.parametrize("skew", [WINDOW, -WINDOW])
def test_inside_the_window_is_fresh(skew: float) -> None:
    message = NewFlow(FLOW)
    data = encoder_for(message).encode(message, T0 + skew)
    guard = Guard(KEY, Role.GATEWAY, now=T0 - 2 * WINDOW, replay_window=WINDOW)
    assert isinstance(guard.check(data, T0), Received)


def test_replay_of_an_accepted_message() -> None:
    message = FlowEnd(FLOW.flow_id, FlowEndReason.RST)
    data = encoder_for(message).encode(message, T0)
    guard = guard_for(message)
    assert isinstance(guard.check(data, T0), Received)
    assert guard.check(data, T0 + 1) is Refusal.REPLAY
    assert guard.check(data, T0 + WINDOW + 1) is Refusal.STALE


def test_copies_first_accepted_rest_duplicate() -> None:
    message = NewFlow(FLOW)
    copies = encoder_for(message).encode_copies(message, T0, 3)
    assert len(set(copies)) == 3
    guard = guard_for(message)
    # Any arrival order: the first in wins.
    first = guard.check(copies[2], T0)
    assert isinstance(first, Received) and first.message == message and first.copy == 2
    assert guard.check(copies[0], T0) is Refusal.DUPLICATE
    assert guard.check(copies[1], T0) is Refusal.DUPLICATE
    # The same bytes again are no copy: an honest sender never repeats bytes.
    for data in copies:
        assert guard.check(data, T0) is Refusal.REPLAY


def test_the_most_copies_all_fold() -> None:
    message = NewFlow(FLOW)
    copies = encoder_for(message).encode_copies(message, T0, MAX_COPIES)
    guard = guard_for(message)
    results = [guard.check(data, T0) for data in reversed(copies)]
    assert isinstance(results[0], Received)
    assert results[1:] == [Refusal.DUPLICATE] * (MAX_COPIES - 1)


def test_copies_after_the_first_skip_the_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    message = NewFlow(FLOW)
    copies = encoder_for(message).encode_copies(message, T0, 3)
    guard = guard_for(message)
    verified = []
    real = Mac.verify
    monkeypatch.setattr(Mac, "verify", lambda mac, data, tag: verified.append(data) or real(mac, data, tag))
    assert isinstance(guard.check(copies[0], T0), Received)
    assert guard.check(copies[1], T0) is Refusal.DUPLICATE
    assert guard.check(copies[2], T0) is Refusal.DUPLICATE
    assert len(verified) == 1


def test_a_forged_copy_is_never_accepted() -> None:
    message = NewFlow(FLOW)
    first, second = encoder_for(message).encode_copies(message, T0, 2)
    guard = guard_for(message)
    assert isinstance(guard.check(first, T0), Received)
    # The accepted content under another copy byte and a made-up MAC: folded
    # as a copy, believed in nothing.
    forged = bytearray(second)
    forged[-MAC_SIZE:] = bytes(MAC_SIZE)
    assert guard.check(bytes(forged), T0) is Refusal.DUPLICATE
    assert guard.check(second, T0) is Refusal.REPLAY
    # Other content under the accepted sequence number still needs the MAC.
    altered = bytearray(second)
    altered[HEADER_SIZE] ^= 1
    assert guard.check(bytes(altered), T0) is Refusal.BAD_MAC
    # A copy arriving after the replay window is stale, not folded.
    third = encoder_for(message).encode_copies(message, T0, 3)[2]
    assert guard.check(third, T0 + WINDOW + 1) is Refusal.STALE


def test_buffers_other_than_bytes_are_accepted() -> None:
    message = NewFlow(FLOW)
    data = encoder_for(message).encode(message, T0)
    assert isinstance(guard_for(message).check(memoryview(bytearray(data)), T0), Received)


def test_other_content_under_a_used_sequence_number_is_replay() -> None:
    a = FlowEnd(1, FlowEndReason.FIN)
    b = FlowEnd(2, FlowEndReason.FIN)
    guard = guard_for(a)
    assert isinstance(guard.check(encoder_for(a).encode(a, T0), T0), Received)
    # A key holder reusing sender and seq for different content, even as a "copy".
    data_b = encoder_for(b).encode_copies(b, T0, 2)
    assert guard.check(data_b[1], T0) is Refusal.REPLAY
    assert guard.check(data_b[0], T0) is Refusal.REPLAY


def test_sequence_window_slides() -> None:
    window = 8
    message = FlowEnd(1, FlowEndReason.IDLE)
    guard = guard_for(message, seq_window=window)
    enc = encoder_for(message)
    held_back = [enc.encode(message, T0) for _ in range(3)]  # seq 0, 1, 2: delayed in flight
    for _ in range(window):  # seq 3 .. 10
        assert isinstance(guard.check(enc.encode(message, T0), T0), Received)
    # Newest is 10: 3 and above are inside the window, 0..2 are not.
    assert guard.check(held_back[2], T0) is Refusal.REPLAY  # seq 2 = 10 - 8
    assert guard.check(held_back[0], T0) is Refusal.REPLAY
    late = encoder_for(message, first_seq=3 + window).encode(message, T0)  # seq 11
    out_of_order = encoder_for(message, first_seq=2 + window + 5).encode(message, T0)  # seq 15
    assert isinstance(guard.check(out_of_order, T0), Received)
    assert isinstance(guard.check(late, T0), Received)  # 11 > 15 - 8: late but in the window


def test_a_jump_to_the_last_sequence_number_leaves_the_window_working() -> None:
    message = FlowEnd(1, FlowEndReason.IDLE)
    guard = guard_for(message)
    first = encoder_for(message, first_seq=1).encode(message, T0)
    last = encoder_for(message, first_seq=2**64 - 1).encode(message, T0)
    assert isinstance(guard.check(first, T0), Received)
    assert isinstance(guard.check(last, T0), Received)
    assert guard.check(last, T0) is Refusal.REPLAY
    assert guard.check(first, T0) is Refusal.REPLAY  # far behind the window now


def test_sender_table_is_bounded_and_eviction_is_safe() -> None:
    message = FlowEnd(1, FlowEndReason.FIN)
    guard = guard_for(message, max_senders=4)
    sent = []
    for sender in range(10):
        data = encoder_for(message, sender_id=sender).encode(message, T0 + sender / 1000)
        sent.append(data)
        assert isinstance(guard.check(data, T0), Received)
        assert guard.senders <= 4
    assert guard.senders == 4
    # Sender 0 was evicted while its message is still fresh: no second chance.
    assert guard.check(sent[0], T0) is Refusal.REPLAY
    # A new sender with a newer clock is welcome.
    fresh = encoder_for(message, sender_id=99).encode(message, T0 + 0.5)
    assert isinstance(guard.check(fresh, T0 + 0.5), Received)


def test_idle_senders_are_forgotten_and_stay_refused() -> None:
    message = FlowEnd(1, FlowEndReason.FIN)
    guard = guard_for(message)
    old = encoder_for(message, sender_id=1).encode(message, T0)
    assert isinstance(guard.check(old, T0), Received)
    later = encoder_for(message, sender_id=2).encode(message, T0 + WINDOW + 1)
    assert isinstance(guard.check(later, T0 + WINDOW + 1), Received)
    assert guard.senders == 1  # sender 1 had nothing fresh left
    # Even if the receiver's clock steps back, sender 1's message does not return.
    assert guard.check(old, T0) is Refusal.REPLAY


def test_a_restarted_receiver_refuses_what_was_sent_before_it() -> None:
    message = NewFlow(FLOW)
    data = encoder_for(message).encode(message, T0)
    assert Guard(KEY, Role.GATEWAY, now=T0 + 1).check(data, T0 + 1) is Refusal.REPLAY
    assert isinstance(Guard(KEY, Role.GATEWAY, now=T0).check(data, T0), Received)


# ---- body checks after the MAC -------------------------------------------------------


def _body(message: Message) -> bytearray:
    return bytearray(encoder_for(message).encode(message, T0)[HEADER_SIZE:-MAC_SIZE])


@pytest.mark.parametrize(
    "msg_type, offset, value",
    [
        (MsgType.NEW_FLOW, 8, 1),  # proto 1
        (MsgType.NEW_FLOW, 9, 6),  # family 6 with IPv4-mapped addresses
        (MsgType.NEW_FLOW, 9, 5),  # no family 5
        (MsgType.NEW_FLOW, 42 + 10, 0),  # the client ::ff:c633:6407 in a family 4 body: not IPv4-mapped
        (MsgType.NEW_FLOW, 10, ord(" ")),  # a space in the gateway name
        (MsgType.NEW_FLOW, 10, 0),  # empty gateway name
        (MsgType.NEW_FLOW, 10 + 31, ord("x")),  # "smtp-in", NULs, then x
        (MsgType.NEW_FLOW, 10 + 2, 0xE9),  # not ASCII
        (MsgType.NEW_FLOW, 132 + 15, 1),  # snat ::1:0 in a family 4 body: not IPv4-mapped
        (MsgType.NEW_FLOW, 148 + 1, 1),  # snat (none):1: a port without an address
        (MsgType.FLOW_END, 8, 0),  # reason 0
        (MsgType.FLOW_END, 8, 6),  # reason 6: none yet
        (MsgType.RULE_REQUEST, 18, 4),  # mode 4 (3 is ORIGINATE, version 5)
        (MsgType.RULE_REQUEST, 19, 4),  # a reserved flag bit (bit 2; 0 and 1 are one-shot and replaces)
        (MsgType.RULE_REFUSED, 8, 99),
        (MsgType.RULE_REFUSED, 8, 9),  # one past OTHER_GATEWAY
        (MsgType.RULE_END, 8, 5),  # one past SUPERSEDED
    ],
)
def test_authentic_but_malformed_body(msg_type: MsgType, offset: int, value: int) -> None:
    example = next(m for m in MESSAGES if m.TYPE is msg_type)
    body = _body(example)
    body[offset] = value
    guard = guard_for(example)
    assert guard.check(forge(msg_type, bytes(body)), T0) is Refusal.MALFORMED
    # Refused without a trace: the same seq with a good body is accepted after.
    assert isinstance(guard.check(forge(msg_type, bytes(_body(example))), T0), Received)


@settings(max_examples=300)
@given(st.sampled_from(list(MsgType)), st.data())
def test_authentic_random_bodies(msg_type: MsgType, data: st.DataObject) -> None:
    body = data.draw(st.binary(min_size=BODY[msg_type].size, max_size=BODY[msg_type].size))
    receiver = Role.GATEWAY if SENDER_OF[msg_type] is Role.PROCESSOR else Role.PROCESSOR
    got = Guard(KEY, receiver, now=T0 - 1).check(forge(msg_type, body), T0)
    assert got is Refusal.MALFORMED or (isinstance(got, Received) and got.message.TYPE is msg_type)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.sampled_from(Role))
def test_fuzz_arbitrary_bytes(data: bytes, receiver: Role) -> None:
    got = Guard(KEY, receiver, now=T0 - 1).check(data, T0)
    assert isinstance(got, Refusal)  # without the key nothing passes


@given(st.sampled_from(MESSAGES), st.binary(max_size=40), st.integers(0, 130))
def test_fuzz_spliced_datagrams(message: Message, junk: bytes, at: int) -> None:
    data = encoder_for(message).encode(message, T0)
    got = guard_for(message).check(data[:at] + junk + data[at + len(junk) :], T0)
    assert isinstance(got, (Refusal, Received))
    if isinstance(got, Received):
        assert got.message == message


# ---- dynamic rule requests -----------------------------------------------------------


def _request(src: Endpoint, dst: Endpoint, ttl: int = 30) -> RuleRequest:
    return RuleRequest(1, FLOW.flow_id, Proto.TCP, src, dst, ttl, RuleMode.REDIRECT, True)


def test_exactness() -> None:
    client, server = FLOW.client, FLOW.server
    assert rule_request_problem(_request(Endpoint(client.address, 0), Endpoint(server.address, 2000))) is None
    assert rule_request_problem(_request(Endpoint(server.address, 20), Endpoint(client.address, 5000))) is None
    for src, dst in [
        (Endpoint(client.address, 0), Endpoint(server.address, 0)),  # destination port must be known
        (Endpoint(ip("0.0.0.0"), 0), Endpoint(server.address, 2000)),
        (Endpoint(client.address, 0), Endpoint(ip("255.255.255.255"), 2000)),
        (Endpoint(client.address, 0), Endpoint(ip("239.1.2.3"), 2000)),
    ]:
        assert rule_request_problem(_request(src, dst)) is RuleRefusal.NOT_EXACT


@pytest.mark.parametrize("ttl, ok", [(0, False), (1, True), (3600, True), (3601, False)])
def test_ttl_limits(ttl: int, ok: bool) -> None:
    request = _request(Endpoint(FLOW.client.address, 0), Endpoint(FLOW.server.address, 2000), ttl)
    assert rule_request_problem(request) is (None if ok else RuleRefusal.BAD_TTL)


def test_third_party() -> None:
    c, s, s_ = FLOW.client.address, FLOW.server.address, FLOW.original_dst.address
    router = ip("203.0.113.1")
    other = ip("192.0.2.99")

    def third(src: IPv4, dst: IPv4, local: tuple[IPv4, ...] = ()) -> bool:
        return names_third_party(_request(Endpoint(src, 0), Endpoint(dst, 2000)), FLOW, local)

    assert not third(c, s) and not third(s, c) and not third(c, s_)
    assert third(c, other) and third(other, s) and third(c, c) and third(s, s)
    assert third(router, s) and not third(router, s, (router,))  # masquerade stands in for C


# ---- key file ------------------------------------------------------------------------


def test_key_is_created_root_only(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "nfgate" / "signalling.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_SIZE
    st_file, st_dir = path.stat(), path.parent.stat()
    assert stat.S_IMODE(st_file.st_mode) == 0o600
    assert stat.S_IMODE(st_dir.st_mode) == 0o700
    assert st_file.st_uid == os.geteuid()
    assert load_or_create_key(path) == key  # loaded, not replaced
    assert os.listdir(path.parent) == ["signalling.key"]  # no temporary file left


def test_key_creation_under_a_tight_umask_is_still_exact(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = tmp_path / "k"
        load_or_create_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_creation_keeps_the_first_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "signalling.key"
    winner = bytes(range(100, 132))
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:
        # Another process links its key in between our check and our link.
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner)
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert load_or_create_key(path) == winner
    assert os.listdir(tmp_path) == ["signalling.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signalling.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    assert isinstance(info.value, NfgateError)
    message = str(info.value)
    assert "\n" not in message and f"mode {mode:04o}" in message and "chmod 600" in message
    assert path.read_bytes() == KEY  # refused, never replaced


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "signalling.key"
    path.write_bytes(bytes(size))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{size} bytes, expected 32"):
        load_or_create_key(path)


def test_key_that_is_a_symlink_or_a_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    real.write_bytes(KEY)
    real.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_key(link)
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the key file to another user")
def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signalling.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        load_or_create_key(path)


def test_key_that_cannot_be_created_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match="signalling key"):
        load_or_create_key(blocker / "signalling.key")


# ---- the document --------------------------------------------------------------------


def test_doc_examples_match_the_codec() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "signalling.md").read_text()
    section = examples.generated_section(doc)
    assert section, "docs/signalling.md lost its generated section markers"
    assert section == examples.render(), "regenerate: python -m firewall.signalling.examples --write"


def test_doc_hex_decodes_to_the_examples() -> None:
    # The doc's bytes are the examples, accepted by a Guard with the example key.
    doc = (Path(__file__).parents[2] / "docs" / "signalling.md").read_text()
    blocks = re.findall(r"```text\n((?:[0-9a-f]+\n)+)```", doc)
    datagrams = [bytes.fromhex("".join(block.split())) for block in blocks]
    assert len(datagrams) == len(MsgType) + examples.EXAMPLE_COPIES - 1 + len(examples.FAMILY6_EXAMPLES)
    expected: dict[MsgType, list[Message]] = {}
    for m in (*MESSAGES, *(m for _, m in examples.FAMILY6_EXAMPLES)):
        expected.setdefault(m.TYPE, []).append(m)
    for data in datagrams:
        msg_type = MsgType(data[1])
        guard = Guard(examples.EXAMPLE_KEY, receiver_of(expected[msg_type][0]), now=examples.EXAMPLE_NOW - 1)
        got = guard.check(data, examples.EXAMPLE_NOW)
        assert isinstance(got, Received) and got.message in expected[msg_type]
        assert got.seq == examples.EXAMPLE_SEQ


# ---- families (issue 17) ----------------------------------------------------------------

V6 = examples.RELAY_FLOW6


def test_family_6_round_trips_every_type_with_addresses() -> None:
    six = [NewFlow(V6), Answer(3, V6), Query(4, Proto.TCP, V6.firewall_side, V6.ag),
           NotFound(5, Proto.TCP, V6.firewall_side, V6.ag),
           RuleRequest(6, V6.flow_id, Proto.UDP, Endpoint(V6.server.address, 0), V6.client, 10, RuleMode.ALLOW, True)]
    for message in six:
        data = encoder_for(message).encode(message, T0)
        assert len(data) == DATAGRAM_SIZE[message.TYPE]  # one size per type, whatever the family
        family_at = {MsgType.NEW_FLOW: 9, MsgType.QUERY: 9, MsgType.NOT_FOUND: 9, MsgType.ANSWER: 17,
                     MsgType.RULE_REQUEST: 17}[message.TYPE]
        assert data[HEADER_SIZE + family_at] == 6
        got = guard_for(message).check(data, T0)
        assert isinstance(got, Received) and got.message == message


def test_ipv4_is_written_ipv4_mapped_in_a_family_4_body() -> None:
    body = _body(NewFlow(examples.SMTP_FLOW))
    assert body[9] == 4
    assert bytes(body[42:58]) == bytes(10) + b"\xff\xff" + ipaddress.IPv4Address("198.51.100.7").packed
    assert bytes(body[132:150]) == bytes(18)  # no SNAT: all zeros


def test_one_message_one_family() -> None:
    v4 = examples.SMTP_FLOW
    with pytest.raises(ValueError, match="one family"):
        FlowInfo(v4.flow_id, Proto.TCP, "g", V6.client, v4.original_dst, v4.server, v4.firewall_side, v4.ag)
    with pytest.raises(ValueError, match="one family"):
        Query(1, Proto.TCP, V6.firewall_side, v4.ag)
    with pytest.raises(ValueError, match="one family"):
        RuleRequest(1, 1, Proto.TCP, V6.client, v4.server, 5, RuleMode.ALLOW, True)
    with pytest.raises(ValueError, match="one family"):
        FlowInfo(v4.flow_id, Proto.TCP, "g", v4.client, v4.original_dst, v4.server, v4.firewall_side, v4.ag,
                 snat=Endpoint(ipaddress.IPv6Address("2001:db8::1"), 1))


def test_a_family_6_rule_for_any_or_many_is_not_exact() -> None:
    for wildcard in ("::", "ff02::1"):
        request = RuleRequest(1, V6.flow_id, Proto.UDP, Endpoint(ipaddress.IPv6Address(wildcard), 0), V6.client, 10,
                              RuleMode.ALLOW, True)
        assert rule_request_problem(request) is RuleRefusal.NOT_EXACT


def test_a_mapped_multicast_snat_is_malformed() -> None:
    body = _body(NewFlow(examples.FTP_FLOW))
    body[132:148] = bytes(10) + b"\xff\xff" + ipaddress.IPv4Address("224.0.0.1").packed
    guard = guard_for(NewFlow(examples.FTP_FLOW))
    assert guard.check(forge(MsgType.NEW_FLOW, bytes(body)), T0) is Refusal.MALFORMED
