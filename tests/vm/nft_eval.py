"""A small evaluator of nft JSON rulesets for one UDP/IPv4 datagram.

Used by guest_nft_queue.py (inside the VM) to work out, from the ruleset the
kernel actually loaded (``nft -j list ruleset``), which datagram reaches a
queue statement and which does not, so the test sends packets that prove
the rendered rules rather than guessing. Anything it cannot decide raises
``Unknown`` and the caller skips that rule instead of guessing.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

# The guest's addresses (guest_nft_queue.py builds this topology). The client
# sends from a fixed port, so that rules on sport can be evaluated.
CLIENT_IP = "10.99.0.2"
SERVER_IP = "10.99.1.2"
CLIENT_SPORT = 50000
MAX_QUEUES = 16


class Unknown(Exception):
    """The evaluator cannot decide an expression for the probe datagram."""


@dataclass(frozen=True)
class Datagram:
    iifname: str
    saddr: str
    daddr: str
    sport: int
    dport: int
    mark: int = 0


class Ruleset:
    """The chains, rules (in order) and sets of ``nft -j list ruleset``."""

    def __init__(self, listing: dict) -> None:
        self.chains: dict[tuple, dict] = {}
        self.rules: dict[tuple, list[dict]] = {}
        self.sets: dict[tuple, list] = {}
        for item in listing["nftables"]:
            if "chain" in item:
                c = item["chain"]
                self.chains[(c["family"], c["table"], c["name"])] = c
            elif "rule" in item:
                r = item["rule"]
                self.rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
            elif "set" in item:
                s = item["set"]
                self.sets[(s["family"], s["table"], s["name"])] = s.get("elem", [])

    def base_chains(self, hook: str) -> list[tuple]:
        found = [k for k, c in self.chains.items()
                 if c.get("hook") == hook and c.get("type") == "filter" and k[0] in ("inet", "ip")]
        return sorted(found, key=lambda k: self.chains[k]["prio"])

    def queue_numbers(self) -> list[int]:
        nums: set[int] = set()
        for rules in self.rules.values():
            for r in rules:
                for e in r["expr"]:
                    if "queue" in e:
                        num = e["queue"].get("num", 0)
                        if isinstance(num, dict) and "range" in num:
                            nums.update(range(num["range"][0], num["range"][1] + 1))
                        elif isinstance(num, int):
                            nums.add(num)
        return sorted(nums)[:MAX_QUEUES]

    def ifnames(self, right: object, table: tuple) -> list[str]:
        """The interface names a match on iifname accepts: a literal, a named set or an anonymous one."""
        if isinstance(right, str) and right.startswith("@"):
            return [e for e in self.sets.get((*table, right[1:]), []) if isinstance(e, str)]
        if isinstance(right, str):
            return [right]
        if isinstance(right, dict) and isinstance(right.get("set"), list):
            return [e for e in right["set"] if isinstance(e, str)]
        return []


def _value(left: object, pkt: Datagram) -> object:
    """The datagram's value for the left side of a match."""
    if isinstance(left, dict) and "meta" in left:
        key = left["meta"]["key"]
        values = {"nfproto": "ipv4", "l4proto": "udp", "iifname": pkt.iifname, "mark": pkt.mark,
                  "protocol": "ip"}
        if key in values:
            return values[key]
        raise Unknown(f"meta {key}")
    if isinstance(left, dict) and "payload" in left:
        p = left["payload"]
        proto, field = p.get("protocol"), p.get("field")
        if proto in ("tcp", "sctp", "dccp", "icmp", "udplite"):
            return _NotThisProtocol
        fields = {("udp", "sport"): pkt.sport, ("udp", "dport"): pkt.dport,
                  ("th", "sport"): pkt.sport, ("th", "dport"): pkt.dport,
                  ("ip", "saddr"): ipaddress.IPv4Address(pkt.saddr),
                  ("ip", "daddr"): ipaddress.IPv4Address(pkt.daddr)}
        if (proto, field) in fields:
            return fields[(proto, field)]
        if proto == "ip6":
            return _NotThisProtocol
        raise Unknown(f"payload {proto} {field}")
    if isinstance(left, dict) and "&" in left:
        inner, mask = left["&"]
        value = _value(inner, pkt)
        if value is _NotThisProtocol:
            return value
        if isinstance(value, ipaddress.IPv4Address):
            return ipaddress.IPv4Address(int(value) & int(ipaddress.IPv4Address(mask)))
        if isinstance(value, int) and isinstance(mask, int):
            return value & mask
        raise Unknown(f"bitwise and on {left}")
    if isinstance(left, dict) and "ct" in left and left["ct"].get("key") == "state":
        return "new"
    if isinstance(left, dict) and "ct" in left and left["ct"].get("key") == "status":
        return ""  # a connection's first packet: not confirmed yet, nor NATed
    raise Unknown(f"match on {json.dumps(left)}")


_NotThisProtocol = object()


def _contains(right: object, value: object) -> bool:
    """Whether ``value`` is what ``right`` (literal, prefix, range or anonymous set) names."""
    if isinstance(right, dict) and "set" in right:
        return any(_contains(r, value) for r in right["set"])
    if isinstance(right, list):
        return any(_contains(r, value) for r in right)
    if isinstance(right, dict) and "prefix" in right and isinstance(value, ipaddress.IPv4Address):
        net = ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}", strict=False)
        return value in net
    if isinstance(right, dict) and "range" in right:
        lo, hi = right["range"]
        if isinstance(value, ipaddress.IPv4Address):
            return ipaddress.IPv4Address(lo) <= value <= ipaddress.IPv4Address(hi)
        return lo <= value <= hi
    if isinstance(value, ipaddress.IPv4Address):
        try:
            return value == ipaddress.IPv4Address(right)
        except ValueError:
            return False
    return right == value


def _match(m: dict, pkt: Datagram, rs: Ruleset, table: tuple) -> bool:
    left, right, op = m["left"], m["right"], m.get("op", "==")
    if isinstance(left, dict) and left.get("meta", {}).get("key") == "iifname":
        hit = pkt.iifname in rs.ifnames(right, table)
    else:
        value = _value(left, pkt)
        if value is _NotThisProtocol:
            return False  # nft's implicit protocol dependency fails first
        if isinstance(right, str) and right.startswith("@"):
            raise Unknown(f"lookup in set {right}")
        hit = _contains(right, value)
    if op in ("==", "in"):
        return hit
    if op == "!=":
        return not hit
    raise Unknown(f"match operator {op}")


_IGNORED_STATEMENTS = {"counter", "log", "notrack", "limit", "quota"}


def evaluate(rs: Ruleset, chain: tuple, pkt: Datagram, depth: int = 0) -> tuple[str, object]:
    """The verdict of ``chain`` for ``pkt``, as nft would reach it.

    Returns ("queue", num), ("accept", None), ("drop", None), ("return", None),
    or ("continue", None) when the chain ends without a verdict (for a base
    chain, its policy then applies). A ``jump`` whose target ends or returns
    goes on with the next rule; a ``goto`` then returns from this chain. Raises
    Unknown when an expression is beyond this evaluator.
    """
    if depth > 16:
        raise Unknown("jump depth")
    table = chain[:2]
    for rule in rs.rules.get(chain, []):
        for e in rule["expr"]:
            ((kind, arg),) = e.items()
            if kind == "match":
                if not _match(arg, pkt, rs, table):
                    break  # this rule does not apply: next rule
            elif kind in _IGNORED_STATEMENTS:
                continue
            elif kind == "queue":
                num = arg.get("num", 0)
                if not isinstance(num, int):
                    raise Unknown(f"queue over {num}")
                return "queue", num
            elif kind in ("accept", "drop", "return"):
                return kind, None
            elif kind in ("jump", "goto"):
                verdict = evaluate(rs, (*table, arg["target"]), pkt, depth + 1)
                if verdict[0] not in ("continue", "return"):
                    return verdict
                if kind == "goto":
                    return "return", None
                break  # back from the jump: next rule
            else:
                raise Unknown(f"statement {kind}")
    return "continue", None


@dataclass(frozen=True)
class Probe:
    """The datagram the ruleset queues, and one it does not."""

    iifname: str
    out_ifname: str
    port: int
    queue: int
    nonmatch_port: int
    hook: str
    prio: int
    chain: str
    table: str
    family: str
    handle: int


def _udp_dports(rs: Ruleset) -> list[tuple[tuple, dict, object]]:
    """(base chain, rule, dport right side) for every rule in a prerouting/forward base chain matching udp dport."""
    found = []
    for hook in ("prerouting", "forward"):
        for chain in rs.base_chains(hook):
            for rule in rs.rules.get(chain, []):
                for e in rule["expr"]:
                    m = e.get("match")
                    if m and m.get("op", "==") == "==" and m["left"] == {"payload": {"protocol": "udp", "field": "dport"}}:
                        found.append((chain, rule, m["right"]))
    return found


def _first_port(right: object) -> int | None:
    if isinstance(right, int):
        return right
    if isinstance(right, dict) and "range" in right:
        return right["range"][0]
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        for r in right["set"]:
            if (p := _first_port(r)) is not None:
                return p
    return None


def derive_probe(rs: Ruleset) -> Probe | str:
    """A UDP datagram client->server that the ruleset queues, or the reason none was found."""
    reasons = []
    for chain, rule, right in _udp_dports(rs):
        port = _first_port(right)
        iif_matches = [e["match"]["right"] for e in rule["expr"]
                       if e.get("match", {}).get("left") == {"meta": {"key": "iifname"}}]
        names = rs.ifnames(iif_matches[0], chain[:2]) if iif_matches else ["eth1"]
        if port is None or not names:
            reasons.append(f"{chain[2]}#{rule['handle']}: no port or interface")
            continue
        iif = names[0]
        pkt = Datagram(iif, CLIENT_IP, SERVER_IP, CLIENT_SPORT, port)
        try:
            verdict, num = evaluate(rs, chain, pkt)
        except Unknown as err:
            reasons.append(f"{chain[2]}#{rule['handle']}: {err}")
            continue
        if verdict != "queue":
            reasons.append(f"{chain[2]}#{rule['handle']}: port {port} on {iif} -> {verdict}")
            continue
        nonmatch = _nonmatch_port(rs, chain, iif, port)
        if nonmatch is None:
            reasons.append(f"{chain[2]}#{rule['handle']}: no port that stays out of the queue")
            continue
        c = rs.chains[chain]
        return Probe(iifname=iif, out_ifname=_out_ifname(rs, chain, iif), port=port, queue=num,
                     nonmatch_port=nonmatch, hook=c["hook"], prio=c["prio"], chain=chain[2],
                     table=chain[1], family=chain[0], handle=rule["handle"])
    return "no UDP datagram the ruleset queues: " + ("; ".join(reasons[:6]) or "no udp dport rule")


def _nonmatch_port(rs: Ruleset, chain: tuple, iif: str, port: int) -> int | None:
    """A port the evaluator proves is not queued, and that no rule names as a udp dport."""
    named = [right for _, _, right in _udp_dports(rs)]
    for candidate in range(40000, 40200):
        if candidate == port or any(_contains(r, candidate) for r in named):
            continue
        try:
            verdict, _ = evaluate(rs, chain, Datagram(iif, CLIENT_IP, SERVER_IP, CLIENT_SPORT, candidate))
        except Unknown:
            continue
        if verdict in ("continue", "return", "accept"):
            return candidate
    return None


def _out_ifname(rs: Ruleset, chain: tuple, iif: str) -> str:
    """A name for the router's server-side interface: a member of another interface set if there is one."""
    for key, elems in rs.sets.items():
        if key[:2] == chain[:2] and iif not in elems:
            names = [e for e in elems if isinstance(e, str) and e != iif]
            if names:
                return names[0]
    return "lan0" if iif != "lan0" else "lan1"
