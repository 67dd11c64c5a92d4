"""The rtp kind's ``[gateway.settings]``: one frozen model, each key with its default and meaning.

docs/config.md ("[gateway.settings] by kind") and docs/rtp.md list the same
keys; firewall/config/settings.py mirrors this model for ``nfgate check``,
and the gateway reads its manifest's values with
``RtpSettings.model_validate(manifest.settings)``. ``policy()`` turns the
values into what the core uses; the core never reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateways.rtp.parse import payload_type_mask


class RtpSettings(BaseModel):
    """The rtp keys of ``[gateway.settings]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adjacent: Literal["gateway", "processor"] = Field(
        "gateway",
        description="who opens RTCP's port N+1 for an RTP flow on N (and N for RTCP first on N+1): "
                    "gateway: the gateway asks for a REDIRECT rule; processor: the processor adds it itself",
    )
    rtcp_source_port: Literal["rtp-plus-one", "any"] = Field(
        "rtp-plus-one",
        description="source port of the other flow of a stream: rtp-plus-one: the RTP flow's port + 1 "
                    "(RFC 3550 section 11, RFC 4961); any: any port of the same address (a sender behind NAT)",
    )
    adjacent_rule_ttl: int = Field(
        30, ge=1, le=3600, strict=True,
        description="seconds one adjacent-port rule waits for its flow; asked again while the stream lives without it",
    )
    payload_types: tuple[str, ...] = Field(
        ("0-63", "96-127"),
        description="RTP payload types relayed, as numbers or ranges (RFC 3551; 64-95 clash with RTCP, RFC 5761 section 4)",
    )
    rtcp_feedback: Literal["allow", "drop"] = Field(
        "allow", description="RTCP feedback packets RTPFB and PSFB (205, 206; RFC 4585) in a compound packet",
    )
    ssrc_change: Literal["allow", "drop"] = Field(
        "drop",
        description="an RTP SSRC other than the first in one direction: allow: it becomes the stream's; drop: dropped",
    )
    no_media_timeout: float = Field(
        60.0, ge=1, le=86400, strict=True,
        description="seconds without a valid RTP datagram either way before the stream, its flows and its rule end",
    )
    max_packet_rate: float = Field(
        500.0, ge=1, le=1_000_000, strict=True,
        description="datagrams per second one stream relays in one direction (RTP and RTCP together)",
    )
    max_packet_burst: int = Field(
        100, ge=1, le=1_000_000, strict=True,
        description="datagrams one stream may relay at once in one direction before the rate applies",
    )
    max_flows: int = Field(
        4096, ge=1, le=1_000_000, strict=True,
        description="UDP flows held at once (looked up, in a stream, or refused); a datagram that would start one more is dropped",
    )

    @field_validator("payload_types")
    @classmethod
    def _payload_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one payload type")
        for item in value:
            first, dash, last = item.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise ValueError(f"{item!r} is not a payload type or a range of them (96, 96-127)")
        payload_type_mask(value)  # ValueError: out of 0-127, or first > last
        return value

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
