"""RtpCore (gateways/rtp/core.py) as playbooks: flows and datagrams in, verdicts and outputs out."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools

import pytest

from firewall.signalling import Counters, Endpoint, FlowInfo, Proto, RuleEndReason
from gateways.rtp.core import EndFlow, Event, Offload, RequestRule, RtpCore
from gateways.rtp.settings import Policy
from tests.gateways.rtp_packets import bye, rr, rtp, sdes, sr

IP = ipaddress.IPv4Address
C = IP("198.51.100.7")  # the client: the sender outside
T = IP("198.51.100.66")  # a third host
S_ = IP("203.0.113.1")  # the original destination S' (a port forward's address)
S = IP("192.168.1.10")  # the server
G = Endpoint(IP("172.31.255.2"), 20001)
N = 5004

_fids = itertools.count(1)
_fws = itertools.count(1)


def flow(client: ipaddress.IPv4Address = C, cport: int = 40000, dport: int = N) -> FlowInfo:
    fw = Endpoint(IP("172.31.254.0") + next(_fws) % 250 + 1, 1024 + next(_fws))
    return FlowInfo(next(_fids), Proto.UDP, "rtp", Endpoint(client, cport), Endpoint(S_, dport),
                    Endpoint(S, dport), fw, G, None)


class Rig:
    def __init__(self, **policy: object) -> None:
        self.core = RtpCore(dataclasses.replace(Policy(), **policy))  # type: ignore[arg-type]
        self.now = 100.0

    def open(self, info: FlowInfo) -> FlowInfo:
        self.core.flow_opened(info)
        return info

    def up(self, info: FlowInfo, data: bytes) -> str | None:
        return self.core.datagram(info.firewall_side, True, data, self.now)

    def down(self, info: FlowInfo, data: bytes) -> str | None:
        return self.core.datagram(info.firewall_side, False, data, self.now)

    def take(self) -> list[object]:
        out, self.core.outbox[:] = list(self.core.outbox), []
        return out

    def rules(self) -> list[RequestRule]:
        return [o for o in self.take() if isinstance(o, RequestRule)]

    def events(self) -> list[str]:
        return [o.name for o in self.core.outbox if isinstance(o, Event)]


# ---- streams, validation, the adjacent rule ------------------------------------------------------


def test_rtp_first_opens_a_stream_and_asks_for_rtcp_on_n_plus_1_from_the_next_port() -> None:
    r = Rig()
    a = r.open(flow())
    assert r.take() == []  # a flow alone asks for nothing: only a valid datagram does
    assert r.up(a, rtp(1)) is None
    out = r.take()
    assert [o.name for o in out if isinstance(o, Event)] == ["stream.open"]
    (rule,) = [o for o in out if isinstance(o, RequestRule)]
    assert (rule.owner, rule.src, rule.dst, rule.ttl) == (a, Endpoint(C, 40001), Endpoint(S_, N + 1), 30)
    assert r.up(a, rtp(2)) is None and r.take() == []  # asked once
    assert r.core.counters["relayed.rtp"] == 2


def test_an_invalid_first_datagram_opens_nothing_and_asks_for_nothing() -> None:
    r = Rig()
    a = r.open(flow())
    assert r.up(a, rtp(version=1)) == "rtp.version"
    assert r.up(a, rtp()[:8]) == "rtp.truncated"
    assert r.up(a, rtp(pt=72)) == "rtp.payload_type"
    assert r.take() == [] and not r.core.streams
    assert r.core.counters["dropped.rtp.version"] == r.core.counters["dropped.rtp.truncated"] == 1


def test_rtcp_first_on_the_odd_port_opens_the_stream_and_asks_for_n() -> None:
    r = Rig()
    b = r.open(flow(cport=40001, dport=N + 1))
    assert r.up(b, sr() + sdes()) is None
    (rule,) = r.rules()
    assert (rule.owner, rule.src, rule.dst) == (b, Endpoint(C, 40000), Endpoint(S_, N))
    a = r.open(flow(cport=40000))
    assert r.up(a, rtp()) is None
    assert r.events() == ["stream.join"]
    assert r.core.counters["relayed.rtcp"] == 1 and r.core.counters["relayed.rtp"] == 1


def test_the_rtcp_port_takes_only_rtcp() -> None:
    r = Rig()
    b = r.open(flow(cport=40001, dport=N + 1))
    assert r.up(b, rtp()) == "rtcp.first_not_sr_rr"
    assert r.up(b, rr() + bye(1)[:-2]) == "rtcp.length"


def test_rtcp_mux_first_needs_no_second_rule() -> None:
    r = Rig()
    a = r.open(flow())
    assert r.up(a, rr() + sdes()) is None  # RTCP on N: multiplexed (RFC 5761)
    assert r.rules() == []
    assert r.up(a, rtp()) is None
    assert r.rules() == [] and r.core.counters["streams.rtcp_mux"] == 1


def test_rtcp_mux_seen_later_stops_the_rule_from_being_asked_again() -> None:
    r = Rig()
    a = r.open(flow())
    r.up(a, rtp())
    (rule,) = r.rules()
    assert r.up(a, sr()) is None
    assert r.events() == ["rtcp_mux"]
    r.core.rule_ended(rule.token, RuleEndReason.EXPIRED)
    assert r.rules() == []


def test_adjacent_processor_never_asks() -> None:
    r = Rig(adjacent_by_gateway=False)
    r.up(r.open(flow()), rtp())
    r.up(r.open(flow(cport=50001, dport=N + 3)), rr())
    assert r.rules() == [] and len(r.core.streams) == 2


def test_rtcp_source_port_any_asks_for_any_port_and_takes_any_port() -> None:
    r = Rig(rtcp_plus_one=False)
    a = r.open(flow())
    r.up(a, rtp())
    (rule,) = r.rules()
    assert rule.src == Endpoint(C, 0)
    assert r.up(r.open(flow(cport=61000, dport=N + 1)), rr()) is None


def test_no_rule_when_the_next_port_does_not_exist() -> None:
    r = Rig()
    r.up(r.open(flow(cport=65535)), rtp())
    assert r.rules() == [] and r.core.counters["rules.no_source_port"] == 1


# ---- latching ---------------------------------------------------------------------------------------


def test_a_third_host_on_the_streams_ports_is_refused_however_valid() -> None:
    r = Rig()
    a = r.open(flow())
    r.up(a, rtp())
    r.take()
    t_rtp = r.open(flow(client=T, cport=40000))
    t_rtcp = r.open(flow(client=T, cport=40001, dport=N + 1))
    assert r.up(t_rtp, rtp(ssrc=0x11223344)) == "not_latched"
    assert r.up(t_rtp, rtp(2)) == "not_latched"
    assert r.up(t_rtcp, rr()) == "not_latched"
    refusals = [o for o in r.take() if isinstance(o, Event)]
    assert [(e.name, e.fields["reason"]) for e in refusals] == [("refused", "other_address")] * 2  # once a flow
    assert r.core.counters["dropped.not_latched"] == 3 and r.core.counters["flows.refused"] == 2
    assert r.up(a, rtp(2)) is None  # the latched flow goes on


def test_the_other_port_and_a_second_flow_for_a_role_are_refused() -> None:
    r = Rig()
    r.up(r.open(flow()), rtp())
    assert r.up(r.open(flow(cport=40003, dport=N + 1)), rr()) == "not_latched"  # not 40000 + 1
    assert r.up(r.open(flow(cport=40002)), rtp()) == "not_latched"  # a second RTP flow
    reasons = [o.fields["reason"] for o in r.take() if isinstance(o, Event) and o.name == "refused"]
    assert reasons == ["other_port", "role_taken"]
    assert r.up(r.open(flow(cport=40001, dport=N + 1)), rr()) is None


def test_the_server_cannot_speak_first_on_a_flow_no_stream_holds() -> None:
    r = Rig()
    a = r.open(flow())
    assert r.down(a, rtp()) == "not_latched"
    assert r.up(a, rtp()) is None
    assert r.down(a, rtp(ssrc=0x99)) is None


def test_the_port_pair_is_free_again_after_the_stream_ends_and_not_before() -> None:
    r = Rig(no_media_timeout=10.0)
    r.up(r.open(flow()), rtp())
    t = r.open(flow(client=T))
    r.now += 9.9
    r.core.tick(r.now)
    assert r.up(t, rtp()) == "not_latched"
    r.now += 0.1
    r.core.tick(r.now)
    assert r.up(t, rtp()) is None  # a new stream, latched to T from now on
    assert r.core.streams[(S_, N)].client == T


# ---- SSRC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("up", [True, False])
def test_ssrc_change_dropped_per_direction(up: bool) -> None:
    r = Rig(ssrc_change=False)
    a = r.open(flow())
    r.up(a, rtp(ssrc=1))
    r.down(a, rtp(ssrc=2))
    send = r.up if up else r.down
    first = 1 if up else 2
    assert send(a, rtp(ssrc=3)) == "ssrc_changed"
    assert send(a, rtp(ssrc=first)) is None
    other = r.down if up else r.up
    assert other(a, rtp(ssrc=2 if up else 1)) is None  # the other direction keeps its own
    assert r.core.counters["dropped.ssrc_changed"] == 1


def test_ssrc_change_allowed_takes_the_new_one_and_counts_it() -> None:
    r = Rig(ssrc_change=True)
    a = r.open(flow())
    r.up(a, rtp(ssrc=1))
    r.take()
    assert r.up(a, rtp(ssrc=3)) is None
    assert r.events() == ["ssrc.changed"]
    assert r.up(a, rtp(ssrc=3)) is None and r.core.counters["ssrc.changed"] == 1
    assert r.up(a, rtp(ssrc=1)) is None and r.core.counters["ssrc.changed"] == 2


def test_rtcp_ssrcs_are_not_the_rtp_ssrc() -> None:
    r = Rig(ssrc_change=False)
    a = r.open(flow())
    r.up(a, rtp(ssrc=1))
    assert r.up(a, rr(ssrc=77)) is None  # a receiver report of its own SSRC, multiplexed


# ---- limits -------------------------------------------------------------------------------------------


def test_the_rate_limit_at_the_burst_and_one_past_it_per_direction() -> None:
    r = Rig(max_packet_rate=50.0, max_packet_burst=5)
    a = r.open(flow())
    assert [r.up(a, rtp(i)) for i in range(5)] == [None] * 5
    assert r.up(a, rtp(5)) == "rate"
    assert r.down(a, rtp(ssrc=9)) is None  # the other direction has its own bucket
    r.now += 0.019
    assert r.up(a, rtp(6)) == "rate"
    r.now += 0.002  # 1/50 s since the burst: one more
    assert r.up(a, rtp(7)) is None
    assert r.up(a, rtp(8)) == "rate"
    assert r.core.counters["dropped.rate"] == 3


def test_the_rate_counts_rtp_and_rtcp_of_a_stream_together() -> None:
    r = Rig(max_packet_rate=1.0, max_packet_burst=2)
    a = r.open(flow())
    b = r.open(flow(cport=40001, dport=N + 1))
    assert r.up(a, rtp()) is None
    assert r.up(b, rr()) is None
    assert r.up(b, rr()) == "rate"


def test_no_media_ends_the_stream_its_flows_and_its_rule() -> None:
    r = Rig(no_media_timeout=5.0)
    a = r.open(flow())
    r.up(a, rtp())
    (rule,) = r.rules()
    b = r.open(flow(cport=40001, dport=N + 1))
    r.now += 4.0
    assert r.up(b, rr()) is None  # RTCP is not media: it does not keep the stream
    assert r.events() == ["stream.join"]
    r.take()
    r.core.tick(r.now + 0.999)
    assert r.take() == []
    r.now += 1.0
    r.core.tick(r.now)
    out = r.take()
    assert {o.fw for o in out if isinstance(o, EndFlow)} == {a.firewall_side, b.firewall_side}
    (close,) = [o for o in out if isinstance(o, Event)]
    assert (close.name, close.fields["reason"], close.fields["datagrams_up"]) == ("stream.close", "no_media", 2)
    assert r.up(a, rtp(2)) == "stream_ended" and r.up(b, rr()) == "stream_ended"
    r.core.rule_ended(rule.token, RuleEndReason.EXPIRED)
    assert r.rules() == []  # not asked again for a stream that ended
    assert r.core.counters["streams.ended.no_media"] == 1


def test_media_either_way_keeps_the_stream() -> None:
    r = Rig(no_media_timeout=5.0)
    a = r.open(flow())
    r.up(a, rtp())
    for _ in range(3):
        r.now += 4.0
        assert r.down(a, rtp(ssrc=5)) is None
        r.core.tick(r.now)
    assert r.core.streams and r.core.counters["streams.ended.no_media"] == 0


# ---- rules and flow ends ------------------------------------------------------------------------------


def test_an_expired_rule_is_asked_again_a_used_or_refused_one_is_not() -> None:
    r = Rig()
    a = r.open(flow())
    r.up(a, rtp())
    (first,) = r.rules()
    r.core.rule_answered(first.token, True)
    r.core.rule_ended(first.token, RuleEndReason.EXPIRED)
    (second,) = r.rules()
    assert (second.src, second.dst) == (first.src, first.dst) and second.token != first.token
    r.core.rule_ended(second.token, RuleEndReason.USED)
    assert r.rules() == []
    r2 = Rig()
    a2 = r2.open(flow())
    r2.up(a2, rtp())
    (rule,) = r2.rules()
    r2.core.rule_answered(rule.token, False, "rule refused: LIMIT")
    assert r2.events() == ["rule.not_granted"]
    r2.core.rule_ended(rule.token, RuleEndReason.EXPIRED)  # an end for a refused rule changes nothing
    assert r2.rules() == [] and r2.core.counters["rules.not_granted"] == 1


def test_the_rtcp_flow_ending_opens_its_port_again_the_rtp_flow_ending_ends_the_stream() -> None:
    r = Rig()
    a = r.open(flow())
    r.up(a, rtp())
    (rule,) = r.rules()
    b = r.open(flow(cport=40001, dport=N + 1))
    r.up(b, rr())
    r.core.rule_ended(rule.token, RuleEndReason.USED)
    r.core.flow_gone(b.firewall_side, r.now)
    (again,) = r.rules()
    assert again.dst == Endpoint(S_, N + 1)
    r.core.flow_gone(a.firewall_side, r.now)
    out = r.take()
    assert [o.fields["reason"] for o in out if isinstance(o, Event)] == ["flow_end"]
    assert not r.core.streams and not r.core.flows


def test_unknown_flows_are_dropped_and_counted() -> None:
    r = Rig()
    assert r.core.datagram(Endpoint(IP("172.31.254.9"), 9), True, rtp(), 0.0) == "unknown_flow"


# ---- offload ----------------------------------------------------------------------------------------


def offloads(r: Rig) -> list[Endpoint]:
    return [o.fw for o in r.take() if isinstance(o, Offload)]


def test_never_offload_asks_for_nothing_however_long_the_stream() -> None:
    r = Rig(offload=False, offload_after_packets=3, offload_after_seconds=1.0)
    a = r.open(flow())
    for i in range(10):
        r.up(a, rtp(i))
    r.now += 5
    r.core.tick(r.now)
    assert offloads(r) == [] and r.core.counters["offload.requested"] == 0


def test_a_stream_is_validated_at_the_packet_count_and_both_its_flows_go_to_the_kernel() -> None:
    r = Rig(offload=True, offload_after_packets=3, offload_after_seconds=60.0)
    a = r.open(flow())
    b = r.open(flow(cport=40001, dport=N + 1))
    r.up(a, rtp(1))
    r.up(b, rr())
    assert r.up(a, rtp(2)) is None and offloads(r) == []  # 2 valid RTP datagrams: one short
    assert r.down(a, rtp(1, ssrc=9)) is None  # media either way counts
    assert offloads(r) == [a.firewall_side, b.firewall_side]
    assert r.up(a, rtp(3)) is None and offloads(r) == []  # asked once per flow; relayed meanwhile
    assert r.core.counters["streams.validated"] == 1 and r.core.counters["offload.requested"] == 2


def test_a_stream_is_validated_by_age_on_the_tick_but_only_with_media() -> None:
    r = Rig(offload=True, offload_after_packets=1000, offload_after_seconds=2.0)
    b = r.open(flow(cport=40001, dport=N + 1))
    r.up(b, rr())  # RTCP first: a stream without media
    r.now += 3
    r.core.tick(r.now)
    assert offloads(r) == []
    a = r.open(flow())
    assert r.up(a, rtp(1)) is None  # old enough, and now with media: validated on the datagram
    assert offloads(r) == [b.firewall_side, a.firewall_side]
    r2 = Rig(offload=True, offload_after_packets=1000, offload_after_seconds=2.0)
    c = r2.open(flow(dport=N + 2))
    r2.up(c, rtp(1))
    r2.core.tick(r2.now + 1.9)
    assert offloads(r2) == []
    r2.core.tick(r2.now + 2.0)  # no datagram since: the tick validates it
    assert offloads(r2) == [c.firewall_side]


def test_a_flow_that_joins_a_validated_stream_goes_to_the_kernel_after_its_first_datagram() -> None:
    r = Rig(offload=True, offload_after_packets=2)
    a = r.open(flow())
    r.up(a, rtp(1))
    r.up(a, rtp(2))
    assert offloads(r) == [a.firewall_side]
    b = r.open(flow(cport=40001, dport=N + 1))
    assert r.up(b, rr()) is None
    assert offloads(r) == [b.firewall_side]


def test_an_offloaded_stream_keeps_its_latch_has_no_timeout_of_its_own_and_ends_with_the_kernels_report() -> None:
    r = Rig(offload=True, offload_after_packets=2, no_media_timeout=5.0)
    a = r.open(flow())
    b = r.open(flow(cport=40001, dport=N + 1))
    r.up(a, rtp(1))
    r.up(b, rr())
    r.up(a, rtp(2))
    offloads(r)
    r.core.offload_answered(a.firewall_side, True)
    r.core.offload_answered(b.firewall_side, True)
    r.core.flow_gone(a.firewall_side, r.now, offloaded=True)
    r.core.flow_gone(b.firewall_side, r.now, offloaded=True)
    assert [o.name for o in r.take() if isinstance(o, Event)] == ["offloaded", "offloaded"]
    assert r.core.counters["streams.offloaded"] == 1 and r.core.counters["offload.flows"] == 2
    r.now += 60
    r.core.tick(r.now)  # far past no_media_timeout: the kernel carries the media, the gateway sees none
    assert (N & ~1) in {port for _, port in r.core.streams} and r.take() == []
    # A third host on the stream's ports (a new flow: the kernel carries only the exact 5-tuple).
    t = r.open(flow(client=T, cport=40000))
    assert r.up(t, rtp(1)) == "not_latched"
    # RTCP's connection ends first: the stream lives on.
    assert r.core.kernel_ended(Endpoint(C, 40001), Endpoint(S_, N + 1), Counters(3, 3 * 80, 0, 0), r.now)
    assert r.core.streams
    # The RTP connection's end, with conntrack's counters (IP and UDP headers counted: 28 bytes each).
    assert r.core.kernel_ended(Endpoint(C, 40000), Endpoint(S_, N), Counters(100, 100 * 200, 0, 0), r.now)
    (close,) = [o for o in r.take() if isinstance(o, Event) and o.name == "stream.close"]
    assert close.fields["reason"] == "kernel_end" and close.fields["offloaded"] is True
    assert close.fields["datagrams_up"] == 2 + 1 + 3 + 100
    assert close.fields["bytes_up"] == 2 * 172 + len(rr()) + 3 * 52 + 100 * 172
    assert not r.core.streams
    # Not the stream's, or already reported: nothing.
    assert not r.core.kernel_ended(Endpoint(C, 40000), Endpoint(S_, N), None, r.now)


def test_the_latched_client_coming_back_through_the_gateway_takes_its_role_again() -> None:
    r = Rig(offload=True, offload_after_packets=1)
    a = r.open(flow())
    r.up(a, rtp(1))
    offloads(r)
    r.core.flow_gone(a.firewall_side, r.now, offloaded=True)
    other_port = r.open(flow(cport=41000))
    assert r.up(other_port, rtp(1)) == "not_latched"  # the role is the kernel's flow's
    again = r.open(flow())  # the same tuple: its kernel connection ended unreported
    assert r.up(again, rtp(2)) is None
    assert r.core.counters["offload.returned"] == 1
    assert offloads(r) == [again.firewall_side]  # the stream was validated: straight back to the kernel


def test_a_refused_offload_leaves_the_flow_in_the_gateway_and_is_not_asked_again() -> None:
    r = Rig(offload=True, offload_after_packets=1, no_media_timeout=5.0)
    a = r.open(flow())
    r.up(a, rtp(1))
    assert offloads(r) == [a.firewall_side]
    r.core.offload_answered(a.firewall_side, False, "POLICY")
    assert [o.name for o in r.take() if isinstance(o, Event)] == ["offload.refused"]
    assert r.up(a, rtp(2)) is None and offloads(r) == []
    r.now += 5
    r.core.tick(r.now)  # still the gateway's: its own no-media timeout applies
    assert r.core.counters["streams.ended.no_media"] == 1 and r.core.counters["offload.refused"] == 1


def test_an_unreported_offloaded_stream_lets_its_latch_go_after_offload_hold() -> None:
    r = Rig(offload=True, offload_after_packets=1, offload_hold=100.0)
    a = r.open(flow())
    r.up(a, rtp(1))
    r.take()
    r.core.flow_gone(a.firewall_side, r.now, offloaded=True)
    r.core.tick(r.now + 99.9)
    assert r.core.streams
    r.core.tick(r.now + 100)
    assert not r.core.streams and r.core.counters["streams.ended.offload_hold"] == 1
    t = r.open(flow(client=T))
    assert r.up(t, rtp(1)) is None  # the pair is free for a new stream


def test_no_rule_is_asked_for_a_stream_the_kernel_carries() -> None:
    r = Rig(offload=True, offload_after_packets=1)
    a = r.open(flow())
    r.up(a, rtp(1))
    out = r.take()
    (rule,) = [o for o in out if isinstance(o, RequestRule)]
    r.core.rule_answered(rule.token, True)
    r.core.flow_gone(a.firewall_side, r.now, offloaded=True)
    r.core.rule_ended(rule.token, RuleEndReason.FLOW_ENDED)  # the owner's binding went with the offload
    assert r.rules() == []


# ---- IPv6 (issue 17) -------------------------------------------------------------------------------

IP6 = ipaddress.IPv6Address
C6, T6, S6 = IP6("2001:db8:2::10"), IP6("2001:db8:2::66"), IP6("fd00:1::10")
G6 = Endpoint(IP6("fd6e:6667:6174:ff::2"), 20001)


def flow6(client: ipaddress.IPv6Address = C6, cport: int = 40000, dport: int = N) -> FlowInfo:
    """A family 6 flow: every address IPv6, the server's own address as S' (no port forward)."""
    fw = Endpoint(IP6("fd6e:6667:6174:fe::") + next(_fws) % 250, 1024 + next(_fws))
    return FlowInfo(next(_fids), Proto.UDP, "rtp", Endpoint(client, cport), Endpoint(S6, dport),
                    Endpoint(S6, dport), fw, G6, None)


def test_an_ipv6_stream_latches_asks_for_rtcp_and_counts_ipv6_headers_after_its_offload() -> None:
    r = Rig(offload=True, offload_after_packets=2)
    a = r.open(flow6())
    assert r.up(a, rtp(1)) is None
    out = r.take()
    (rule,) = [o for o in out if isinstance(o, RequestRule)]
    assert (rule.src, rule.dst) == (Endpoint(C6, 40001), Endpoint(S6, N + 1))
    (opened,) = [o for o in out if isinstance(o, Event)]
    assert opened.fields["stream"] == f"[{S6}]:{N}"
    t = r.open(flow6(client=T6, cport=40001, dport=N + 1))
    assert r.up(t, rr()) == "not_latched"  # another IPv6 host: refused, other_address
    assert r.up(a, rtp(2)) is None and offloads(r) == [a.firewall_side]
    r.core.offload_answered(a.firewall_side, True)
    r.core.flow_gone(a.firewall_side, r.now, offloaded=True)
    # conntrack's bytes count IPv6's fixed header and UDP's: 48 bytes a datagram.
    assert r.core.kernel_ended(Endpoint(C6, 40000), Endpoint(S6, N), Counters(10, 10 * (48 + 172), 0, 0), r.now)
    (close,) = [o for o in r.take() if isinstance(o, Event) and o.name == "stream.close"]
    assert close.fields["bytes_up"] == 2 * 172 + 10 * 172 and close.fields["stream"] == f"[{S6}]:{N}"
