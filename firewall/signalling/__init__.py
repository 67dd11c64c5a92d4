"""Signalling between the packet processor and the gateways' deNAT/reNAT layer.

Pure code, no sockets: bytes and ``now`` go in, bytes, messages and
refusals come out. The asyncio endpoints on either side of the blind track
(UDP, router 172.31.255.1:7500 <-> gateways 172.31.255.2:7500 by default,
``[signalling]`` in the config) carry them. docs/signalling.md is the
specification, with every message in bytes.

Theory of operation (the seed's "Signalling in general", "Out-of-band
signalling" and "Connection identification"; DESIGN invariants 2 and 5):

- The processor NATs a redirected flow twice, so the connection a gateway
  accepts, F:f -> G:g, "does not explicitly reveal ... all required
  information": the original client C:c, what it addressed S':s', and the
  server S:s. The processor tells the deNAT/reNAT layer, "the peer entity of
  the packet processor part regarding signalling", out of band over UDP.
- F:f is unique per flow ("Connection identification": the 4-tuple must be
  unique for each redirected connection), so (proto, F:f, G:g) names a flow
  and is what a gateway asks about. Signalling happens once per flow, not per
  packet.
- Delivery is the seed's hybrid scheme: the processor pushes NEW_FLOW
  spontaneously in ``copies`` redundant copies ("simple redundancy"); a
  gateway that has a connection it cannot place after a bounded wait sends a
  QUERY and the processor answers (ANSWER or NOT_FOUND). FLOW_END tells the
  gateway a binding is gone.
- Signalling runs both ways ("not necessarily unidirectional"): a gateway asks
  for dynamic rules (RULE_REQUEST; the seed's "Dynamic changes in packet
  processing": FTP data, RTCP) and the processor acknowledges, refuses, and
  later ends them; and a gateway that has seen enough of a UDP flow asks
  the processor to hand it to the kernel (OFFLOAD_REQUEST).
- Every datagram is versioned and carries sender id, sequence number,
  timestamp and an HMAC-SHA256 tag; ``Guard`` refuses anything forged,
  altered, stale or replayed, and folds the redundant copies.

Modules:

- ``messages``: the messages as frozen dataclasses, their enums, flow ids,
  and the exactness and third-party rules for dynamic rule requests.
- ``codec``: the byte layouts (as data), the MAC, and ``Encoder``, the
  sending side.
- ``guard``: ``Guard``, the receiving side, and ``Refusal``.
- ``keyfile``: ``load_or_create_key``, the root-only key file.
- ``examples``: the fixed examples in docs/signalling.md and the generator
  of its tables (``python -m firewall.signalling.examples --write``).
"""

from __future__ import annotations

from firewall.signalling.codec import (
    HEADER_SIZE,
    KEY_SIZE,
    MAC_SIZE,
    MAX_COPIES,
    MAX_DATAGRAM,
    MAX_MESSAGE_SIZE,
    VERSION,
    Encoder,
)
from firewall.signalling.guard import MAX_SENDERS, SEQ_WINDOW, Guard, Received, Refusal
from firewall.signalling.keyfile import KeyFileError, load_key, load_or_create_key
from firewall.signalling.messages import (
    MAX_QUERY_ATTEMPTS,
    MAX_RULE_TTL,
    NO_COUNTERS,
    Answer,
    Counters,
    Endpoint,
    FlowEnd,
    FlowEndReason,
    FlowInfo,
    Message,
    MsgType,
    NewFlow,
    NotFound,
    OffloadRequest,
    Proto,
    Query,
    Role,
    RuleAck,
    RuleEnd,
    RuleEndReason,
    RuleMode,
    RuleRefusal,
    RuleRefused,
    RuleRequest,
    first_serial,
    flow_id_node,
    flow_id_queue,
    make_flow_id,
    names_third_party,
    rule_request_problem,
)

__all__ = [
    "HEADER_SIZE", "KEY_SIZE", "MAC_SIZE", "MAX_COPIES", "MAX_DATAGRAM", "MAX_MESSAGE_SIZE",
    "MAX_QUERY_ATTEMPTS", "MAX_RULE_TTL", "MAX_SENDERS", "SEQ_WINDOW", "VERSION",
    "Encoder", "Guard", "Received", "Refusal", "KeyFileError", "load_key", "load_or_create_key",
    "NO_COUNTERS", "Answer", "Counters", "Endpoint", "FlowEnd", "FlowEndReason", "FlowInfo", "Message", "MsgType", "NewFlow",
    "NotFound", "OffloadRequest", "Proto", "Query", "Role", "RuleAck", "RuleEnd", "RuleEndReason", "RuleMode",
    "RuleRefusal", "RuleRefused", "RuleRequest",
    "first_serial", "flow_id_node", "flow_id_queue", "make_flow_id", "names_third_party", "rule_request_problem",
]
