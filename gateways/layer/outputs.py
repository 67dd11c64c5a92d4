"""What ``LayerCore`` tells its caller to do, as data (STYLE.md: commands are described as data).

The core never does I/O; each call returns a list of these outputs and the
asyncio adapter (``gateways.layer.endpoint``) carries them out: ``Send`` a
datagram, resolve or fail the lookups of a tuple (``FlowKnown``,
``FlowNotKnown``), close the connections that hold a flow (``FlowGone``),
settle rule and offload requests (``RuleAnswered``, ``RuleUnanswered``,
``RuleGone``), and log a flow that only the kernel carried (``LoggedFlowEnded``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from firewall.signalling import Counters, Endpoint, FlowEndReason, FlowInfo, Proto, RuleAck, RuleEndReason, RuleRefused

FlowKey = tuple[Proto, Endpoint, Endpoint]
"""(proto, F:f, G:g): what a gateway sees on accept() or recvfrom(), unique per flow."""


class EndCause(enum.Enum):
    """Why a flow that a connection holds is over."""

    FIN = "fin"  # the processor's FLOW_END reasons
    RST = "rst"
    IDLE = "idle"
    POLICY = "policy"
    REPLACED = "replaced"  # a newer NEW_FLOW took its tuple: the binding is gone
    RESTARTED = "restarted"  # its processor instance restarted: the binding is gone
    OFFLOADED = "offloaded"  # the gateway asked: the kernel carries the flow from here

    @classmethod
    def of(cls, reason: FlowEndReason) -> "EndCause":
        return cls[reason.name]


# ---- outputs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` from the layer's socket to ``to``."""

    to: Endpoint
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowKnown:
    """A lookup of ``key`` succeeded."""

    key: FlowKey
    flow: FlowInfo


@dataclass(frozen=True, slots=True)
class FlowNotKnown:
    """A lookup of ``key`` gave up: close the connection (TCP RST, UDP drop)."""

    key: FlowKey
    why: str


@dataclass(frozen=True, slots=True)
class FlowGone:
    """A flow that a connection holds is over: close that connection. ``moved_from``: the
    flow ids it had before a router pair's takeovers moved it (a connection may hold it
    under any of them; ``LayerCore``, "Takeover")."""

    flow: FlowInfo
    cause: EndCause
    moved_from: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleAnswered:
    """The answer to rule request ``request_id``; ``local`` if refused without asking."""

    request_id: int
    reply: Union[RuleAck, RuleRefused]
    local: bool = False


@dataclass(frozen=True, slots=True)
class RuleUnanswered:
    """Rule request ``request_id`` got no answer after ``MAX_RULE_ATTEMPTS`` sends."""

    request_id: int


@dataclass(frozen=True, slots=True)
class RuleGone:
    """The rule granted to ``request_id`` is over (RULE_END, or forgotten after expiry)."""

    request_id: int
    rule_id: int
    reason: RuleEndReason


@dataclass(frozen=True, slots=True)
class LoggedFlowEnded:
    """A flow the kernel carried without the gateway (log-only) is over: log it.

    ``counters`` are conntrack's (FLOW_END), None when the flow's processor
    instance restarted and nobody will report them.
    """

    flow: FlowInfo
    cause: EndCause
    counters: Counters | None


Output = Union[Send, FlowKnown, FlowNotKnown, FlowGone, RuleAnswered, RuleUnanswered, RuleGone, LoggedFlowEnded]


def flow_key(flow: FlowInfo) -> FlowKey:
    return (flow.proto, flow.firewall_side, flow.ag)


def describe(key: FlowKey) -> str:
    proto, fw, ag = key
    return f"{proto.name.lower()} {fw} -> {ag}"
