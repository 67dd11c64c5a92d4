"""The rtp kind's ``[gateway.settings]``: one frozen model, each key with its default and meaning.

docs/config.md ("[gateway.settings] by kind") and docs/rtp.md list the same
keys; ``KIND`` is the kind's declaration (gateways/kind.py), which
``nfgate check`` reads, and the gateway reads its manifest's values with
``RtpSettings.model_validate(manifest.settings)``. ``policy()`` turns the
values into what the core uses; the core never reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from firewall.fields import Choice, Frozen, Int, ListOf, Number, String, fail
from firewall.signalling import RuleMode
from gateways.kind import Kind
from gateways.rtp.parse import payload_type_mask


def _payload_types(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        fail("give at least one payload type")
    try:
        payload_type_mask(value)
    except ValueError as err:  # out of 0-127, or a range that runs backwards
        fail(str(err))
    return value


PayloadTypes = Annotated[
    ListOf(String(r"\d{1,3}(-\d{1,3})?", "a payload type or a range of them (96, 96-127)")),
    AfterValidator(_payload_types),
]


Adjacent = Choice("gateway", "processor")
RtcpSourcePort = Choice("rtp-plus-one", "any")
AllowDrop = Choice("allow", "drop")
OffloadPolicy = Choice("never", "after-validation")


class RtpSettings(Frozen):
    """The rtp keys of ``[gateway.settings]``."""

    adjacent: Adjacent = Field(
        "gateway",
        description="who opens RTCP's port N+1 for an RTP flow on N (and N for RTCP first on N+1): "
                    "gateway: the gateway asks for a REDIRECT rule; processor: the processor adds it itself",
    )
    rtcp_source_port: RtcpSourcePort = Field(
        "rtp-plus-one",
        description="source port of the other flow of a stream: rtp-plus-one: the RTP flow's port + 1 "
                    "(RFC 3550 section 11, RFC 4961); any: any port of the same address (a sender behind NAT)",
    )
    adjacent_rule_ttl: Int(1, 3600) = Field(
        30,
        description="seconds one adjacent-port rule waits for its flow; asked again while the stream lives without it",
    )
    payload_types: PayloadTypes = Field(
        ("0-63", "96-127"),
        description="RTP payload types relayed, as numbers or ranges (RFC 3551; 64-95 clash with RTCP, RFC 5761 section 4)",
    )
    rtcp_feedback: AllowDrop = Field(
        "allow", description="RTCP feedback packets RTPFB and PSFB (205, 206; RFC 4585) in a compound packet",
    )
    ssrc_change: AllowDrop = Field(
        "drop",
        description="an RTP SSRC other than the first in one direction: allow: it becomes the stream's; drop: dropped",
    )
    no_media_timeout: Number(1, 86400) = Field(
        60.0,
        description="seconds without a valid RTP datagram either way before the stream, its flows and its rule end",
    )
    max_packet_rate: Number(1, 1_000_000) = Field(
        500.0,
        description="datagrams per second one stream relays in one direction (RTP and RTCP together)",
    )
    max_packet_burst: Int(1, 1_000_000) = Field(
        100,
        description="datagrams one stream may relay at once in one direction before the rate applies",
    )
    offload: OffloadPolicy = Field(
        "never",
        description="never: every datagram crosses the gateway; after-validation: once validated, each flow of "
                    "the stream is handed to the kernel, exact 5-tuple (OFFLOAD_REQUEST; docs/rtp.md, Offload)",
    )
    offload_after_packets: Int(1, 1_000_000) = Field(
        500, description="valid RTP datagrams a stream relays before it is validated (500: 10 s of 20 ms audio)",
    )
    offload_after_seconds: Number(0.1, 86400) = Field(
        10.0, description="or seconds after the stream opened, with at least one valid RTP datagram",
    )
    offload_hold: Number(1, 86400) = Field(
        3600.0,
        description="seconds an offloaded stream keeps its latch when the end of its kernel connections "
                    "is not reported",
    )
    max_flows: Int(1, 1_000_000) = Field(
        4096,
        description="UDP flows held at once (looked up, in a stream, or refused); a datagram that would start one more is dropped",
    )

    def policy(self) -> "Policy":
        return Policy(
            adjacent_by_gateway=self.adjacent == "gateway",
            rtcp_plus_one=self.rtcp_source_port == "rtp-plus-one",
            adjacent_rule_ttl=self.adjacent_rule_ttl,
            payload_types=payload_type_mask(self.payload_types),
            rtcp_feedback=self.rtcp_feedback == "allow",
            ssrc_change=self.ssrc_change == "allow",
            no_media_timeout=self.no_media_timeout,
            max_packet_rate=self.max_packet_rate,
            max_packet_burst=self.max_packet_burst,
            offload=self.offload == "after-validation",
            offload_after_packets=self.offload_after_packets,
            offload_after_seconds=self.offload_after_seconds,
            offload_hold=self.offload_hold,
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """What ``RtpCore`` decides by: the settings, in the form the datagram path tests fastest."""

    adjacent_by_gateway: bool = True
    rtcp_plus_one: bool = True
    adjacent_rule_ttl: int = 30
    payload_types: int = payload_type_mask(("0-63", "96-127"))
    rtcp_feedback: bool = True
    ssrc_change: bool = False
    no_media_timeout: float = 60.0
    max_packet_rate: float = 500.0
    max_packet_burst: int = 100
    offload: bool = False
    offload_after_packets: int = 500
    offload_after_seconds: float = 10.0
    offload_hold: float = 3600.0


def _adjacent_port(settings: Any) -> int | None:
    """With ``adjacent = "processor"`` the processor opens RTCP's port beside each RTP flow."""
    return 1 if settings.adjacent == "processor" else None


KIND = Kind(
    "rtp", ("udp",), RtpSettings, gateway="gateways.rtp.gateway:RtpGateway.for_gateway",
    # REDIRECT: the adjacent port's flow comes through the gateway too, so RTCP is validated.
    rule_modes=frozenset({RuleMode.REDIRECT}), adjacent_port=_adjacent_port, offload=True,
    ipv6=True,  # RTP and RTCP name no address of the flow (SDP does, and is not this gateway's)
)
