"""Flows the kernel carries for a gateway without a binding; the processor reports their end.

Two kinds: a log-only gateway's connections, and an offloaded flow's
connection (its one-shot ALLOW used; docs/datapath.md, "Offload"), whose
end the gateway needs to end its stream (docs/rtp.md).

A gateway whose kind says ``log_only`` (tcp-relay ``mode = "log-only"``;
docs/datapath.md, "Log-only gateways") never relays. The core accepts each
selected connection's first packet unchanged with the ``rewritten`` mark,
so the forward chain admits it and the binding table marks the connection
as nfgate's, and pushes NEW_FLOW with no F:f. This module keeps, by the
connection's original tuple, what that push said (``FlowInfo``), so that:

- conntrack's destroy event (``end``) becomes FLOW_END with the kernel's
  packet and byte counters each way, which the gateway logs;
- a first packet that never made it into conntrack, which makes no event,
  is found by a check ``confirm`` seconds after it opened (``due``);
- lost events are made up by a dump (``resync``);
- after a processor restart, the connections conntrack still carries with
  nfgate's mark are taken back (``adopt``): a connection that is neither leg
  of a binding and that a log-only selector of this instance names. Each
  gets a new flow id and is pushed again (the new instance's flow ids are
  the only ones it can end), and ``nfgate flows`` lists it.

Pure: no sockets, no clock. Whatever must be sent comes back as
``(message, gateway name)`` pairs for the core to send.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from firewall.flows import AgEndpoint
from firewall.packet import TCP
from firewall.processor.policy import Selector
from firewall.signalling import NO_COUNTERS, Counters, Endpoint, FlowEnd, FlowEndReason, FlowInfo, Proto

# Log-only flows tracked at once (about 300 bytes each); beyond, a flow still
# passes, and its gateway is not told (``flows.logged_untracked``).
MAX_LOGGED_FLOWS = 1 << 20

CtKey = tuple[int, int, int, int, int]  # (proto, src, sport, dst, dport): a connection's original tuple
Ending = tuple[FlowEnd, str]  # FLOW_END and the gateway it goes to
NO_ENDPOINT = Endpoint(ipaddress.IPv4Address(0), 0)  # NEW_FLOW's F:f of a flow without a binding
NO_ENDPOINT6 = Endpoint(ipaddress.IPv6Address(0), 0)  # the same, family 6
# Counters by kind (``flows.offloaded`` and ``flows.ended.offloaded`` count the bindings handed over).
_OPENED = {"logged": "flows.logged", "offloaded": "flows.kernel_carried"}
_ENDED = {"logged": "flows.ended.logged", "offloaded": "flows.ended.kernel_carried"}


def flow_info(flow_id: int, key: CtKey, sel: Selector, server: tuple[int, int] | None, g6: int = 0) -> FlowInfo:
    """NEW_FLOW's flow for a log-only connection: no F:f; the server is the port forward's, or its
    destination; an IPv6 one's G is ``g6``."""
    return kernel_flow_info(flow_id, key, sel.ag, server, g6)


def kernel_flow_info(flow_id: int, key: CtKey, ag: AgEndpoint, server: tuple[int, int] | None,
                     g6: int = 0) -> FlowInfo:
    """NEW_FLOW's flow for a connection the kernel carries for gateway ``ag`` (log-only, or
    offloaded): no F:f; the server is where it goes (a port forward's target), or its destination.
    An IPv6 connection's (addresses above 2**32: an offloaded IPv6 flow) is family 6: G is ``g6``."""
    proto, src, sport, dst, dport = key
    s = server or (dst, dport)
    if _six(key):
        ip6 = ipaddress.IPv6Address
        return FlowInfo(flow_id, Proto(proto), ag.name, Endpoint(ip6(src), sport), Endpoint(ip6(dst), dport),
                        Endpoint(ip6(s[0]), s[1]), NO_ENDPOINT6, Endpoint(ip6(g6), ag.port))
    ip = ipaddress.IPv4Address
    return FlowInfo(flow_id, Proto(proto), ag.name, Endpoint(ip(src), sport), Endpoint(ip(dst), dport),
                    Endpoint(ip(s[0]), s[1]), NO_ENDPOINT, Endpoint(ip(ag.addr), ag.port))


def _six(key: CtKey) -> bool:
    """An IPv6 connection's key: the processor keeps IPv6 addresses above 2**32 (``six``)."""
    return key[1] > 0xFFFFFFFF or key[3] > 0xFFFFFFFF


@dataclass(slots=True)
class LoggedFlow:
    info: FlowInfo  # what NEW_FLOW said: flow id, gateway, client, original destination, server, G:g
    created: float  # monotonic seconds
    adopted: bool = False  # taken back from conntrack after a restart
    kind: str = "logged"  # or "offloaded": an offloaded flow's connection, its ALLOW used


class LoggedFlows:
    """The log-only flows of one processor instance (module docstring)."""

    def __init__(self, confirm: float, counters: Counter[str], limit: int = MAX_LOGGED_FLOWS) -> None:
        self._confirm = confirm
        self.counters = counters  # the processor's, shared
        self._limit = limit
        self._flows: dict[CtKey, LoggedFlow] = {}
        self._due: deque[tuple[float, CtKey, int]] = deque()  # (when, key, flow id): confirmation checks

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def items(self) -> Iterable[tuple[CtKey, LoggedFlow]]:
        return self._flows.items()

    @property
    def full(self) -> bool:
        return len(self._flows) >= self._limit

    def replaced(self, key: CtKey) -> list[Ending]:
        """A new connection on the tuple of a logged one (a SYN that ended its TIME-WAIT): the old one ends."""
        old = self._flows.pop(key, None)
        if old is None:
            return []
        self.counters["flows.replaced"] += 1
        return [self._ending(key, old, NO_COUNTERS)]

    def add(self, key: CtKey, info: FlowInfo, now: float, kind: str = "logged") -> None:
        """Track a flow the core just pushed; its confirmation check is due ``confirm`` seconds on."""
        self._flows[key] = LoggedFlow(info, now, kind=kind)
        self._due.append((now + self._confirm, key, info.flow_id))
        self.counters[_OPENED[kind]] += 1

    def end(self, key: CtKey, counters: Counters) -> list[Ending]:
        """Conntrack destroyed the connection ``key``: FLOW_END with its counters, if it is ours."""
        flow = self._flows.pop(key, None)
        return [] if flow is None else [self._ending(key, flow, counters)]

    def due(self, now: float, alive: Callable[..., bool]) -> list[Ending]:
        """The confirmation checks due at ``now``: a flow conntrack never had ends, without counters."""
        out = []
        due = self._due
        while due and due[0][0] <= now:
            _, key, fid = due.popleft()
            flow = self._flows.get(key)
            if flow is not None and flow.info.flow_id == fid and not alive(*key):
                # Its first packet never made it into conntrack: no event will come.
                self.counters["conntrack.never_confirmed"] += 1
                out.append(self._ending(key, self._flows.pop(key), NO_COUNTERS))
        return out

    def resync(self, alive: set[CtKey], six: bool = False) -> list[Ending]:
        """Events were lost: every flow of the dump's family (``six``: the IPv6 dump) whose
        connection is not in ``alive`` ends; the other family's are another dump's."""
        gone = [k for k in self._flows if _six(k) is six and k not in alive]
        return [self._ending(key, self._flows.pop(key), NO_COUNTERS) for key in gone]

    def adopt(self, key: CtKey, info: FlowInfo, now: float) -> bool:
        """Take back a connection conntrack carried across a restart; False if there is no room.
        Already confirmed (it is in conntrack): no check is due."""
        if key in self._flows or self.full:
            return False
        self._flows[key] = LoggedFlow(info, now, adopted=True)
        return True

    def records(self, now: float, wall: float, queue: int, limit: int,
                acct: dict[tuple[int, ...], tuple[int, int]] | None) -> list[dict[str, Any]]:
        """Up to ``limit`` flows as ``nfgate flows`` lists them, beside the bindings: no F:f,
        no leg B; the one connection's packets and bytes from ``acct`` where given."""
        out = []
        for key, flow in itertools.islice(self._flows.items(), max(0, limit)):
            i = flow.info
            rec: dict[str, Any] = {
                "proto": i.proto.name.lower(), "client": str(i.client), "original_dst": str(i.original_dst),
                "server": str(i.server), "firewall_side": None, "gateway": i.gateway, "ag": str(i.ag),
                "ag_eport": None, "snat": None, "state": [flow.kind, "adopted"] if flow.adopted else [flow.kind],
                "flow_id": i.flow_id, "queue": queue, "age": round(now - flow.created, 1),
                "created": round(wall - (now - flow.created), 3),
            }
            if acct is not None:
                rec["leg_a_packets"], rec["leg_a_bytes"] = acct.get(key, (0, 0))
            out.append(rec)
        return out

    def _ending(self, key: CtKey, flow: LoggedFlow, counters: Counters) -> Ending:
        self.counters[_ENDED[flow.kind]] += 1
        reason = FlowEndReason.FIN if key[0] == TCP else FlowEndReason.IDLE
        return FlowEnd(flow.info.flow_id, reason, counters), flow.info.gateway
