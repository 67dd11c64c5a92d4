"""Configs that are valid but dangerous: ``nfgate check``'s warnings.

Each warning names the key path it is about and says what would happen.
``nfgate check --strict`` makes any of them exit 2; ``run``, ``reload``
and ``apply`` print them and go on.

- lockout: ``policy.input = "drop"`` and no ``[[rule]]`` that accepts TCP
  to the router: applied over SSH, the session is cut and no new one can
  open.
- a selector wider than its rules: the filter decides what reaches a
  gateway (rules.build, ``admit_*`` chains); a selector whose traffic no
  rule or port forward accepts in full brings the gateway only part of it,
  or nothing.
- IPv6 a gateway cannot take: a selector that takes IPv4 only (one whose
  addresses are IPv4 only; every kind takes IPv6, log-only too,
  ``Gateway.takes_ipv6``) has the IPv6 on its
  ports dropped by the ruleset, counted
  (rules.build._ipv6_drops; never a bypass). A rule or policy that accepts
  that IPv6 says the operator expects it to pass: the warning says it will
  not, and where its drops are counted.
- an HA pair's flows that cannot move (docs/ha.md): with ``[ha]``,
  ``nat.masquerade`` takes the node's own address, not the virtual one, so
  its flows die at a failover; and without ``policy.drop_invalid`` a packet
  that meets the new master before its entry would be NATed as a new flow.
"""

from __future__ import annotations

from dataclasses import dataclass

from firewall.config import Config
from firewall.config.model import ROUTER, FilterRule, Traffic
from firewall.fields import PortRange
from firewall.rules.build import ipv6_counter


@dataclass(frozen=True)
class Hazard:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def hazards(config: Config) -> list[Hazard]:
    return [*_lockout(config), *_selectors(config), *_ha(config)]


def _ha(config: Config) -> list[Hazard]:
    if config.ha is None:
        return []
    out = []
    for zone in config.nat.masquerade:
        out.append(Hazard("nat.masquerade", f"{zone}: with [ha], masquerade takes the node's own address on "
                          f"{zone}'s interface, not the pair's virtual one, so these flows cannot survive a failover "
                          "(their replies go to the failed node): docs/ha.md, \"Addresses\""))
    if not config.policy.drop_invalid:
        out.append(Hazard("policy.drop_invalid", "false with [ha]: a packet that reaches the new master before its "
                          "flow's copied entry would start a fresh, wrongly NATed entry and reset the flow "
                          "(docs/ha.md, \"Traps the proof found\"); set it to true"))
    if config.ha.udp_refresh_all and config.ha.udp_refresh > 0 and not config.gateways:
        out.append(Hazard("ha.udp_refresh_all", "true, and no [[gateway]]: a pair without gateways runs no processor, "
                          "and so nothing refreshes the UDP copies; raise nf_conntrack_udp_timeout and "
                          "nf_conntrack_udp_timeout_stream on both nodes instead (docs/ha.md, \"UDP refresh\")"))
    return out


def _lockout(config: Config) -> list[Hazard]:
    if config.policy.input != "drop":
        return []
    for rule in config.rules:
        if rule.to_zone == ROUTER and rule.action == "accept" and rule.proto in ("tcp", "any"):
            return []
    return [Hazard("policy.input", "drop, and no [[rule]] accepts TCP to the router (to = \"router\"): applied over "
                   "SSH this locks you out; add one, e.g. from = \"lan\", to = \"router\", proto = \"tcp\", ports = 22")]


def _covers(ranges: tuple[PortRange, ...], wanted: tuple[PortRange, ...]) -> bool:
    """Every port of ``wanted`` is in ``ranges`` (empty ``ranges``: every port).
    The ranges of one list never overlap (the config checks it)."""
    if not ranges:
        return True
    return all(sum(len(_meet(r, w)) for r in ranges if r.overlaps(w)) == len(w) for w in wanted)


def _nets_cover(rule: tuple, selector: tuple) -> bool:
    """The rule's addresses hold every address the selector may see (empty: any)."""
    if not rule:
        return True
    return bool(selector) and all(any(n.version == r.version and n.subnet_of(r) for r in rule) for n in selector)


def _meet(a: PortRange, b: PortRange) -> PortRange:
    return PortRange(max(a.first, b.first), min(a.last, b.last))


def _matches(rule: FilterRule, t: Traffic) -> bool:
    return (rule.from_zone, rule.to_zone) == (t.from_zone, t.to_zone) and rule.proto in ("any", t.proto)


def _ipv6_only(rule: FilterRule) -> bool:
    nets = rule.saddr + rule.daddr
    return bool(nets) and all(n.version == 6 for n in nets)


def _selectors(config: Config) -> list[Hazard]:
    out: list[Hazard] = []
    for g, gw in enumerate(config.gateways):
        for i, t in enumerate(gw.traffic):
            if not t.allow:
                out += _admits(config, gw.name, t)
            out += _ipv6(config, gw.name, t, ipv6_counter(g, i), gw.takes_ipv6(t))
    return out


def _admits(config: Config, name: str, t: Traffic) -> list[Hazard]:
    """Whether the filter accepts all of the selector's traffic (rules.build._admit, the same order)."""
    if t.to_zone != ROUTER:
        for f in config.nat.forwards:
            if f.from_zone == t.from_zone and f.proto == t.proto and not f.saddr and _covers((f.ports,), t.ports):
                return []
    for rule in config.rules:
        if not _matches(rule, t) or _ipv6_only(rule):
            continue
        whole = _nets_cover(rule.saddr, t.saddr) and _nets_cover(rule.daddr, t.daddr) and _covers(rule.ports, t.ports)
        if rule.action == "accept" and whole:
            return []
        if rule.action == "accept" or not rule.ports or any(r.overlaps(p) for r in rule.ports for p in t.ports):
            break  # this rule decides part of the traffic first: not all of it is accepted
    policy = config.policy.input if t.to_zone == ROUTER else config.policy.forward
    if policy == "accept":
        return []
    ports = ", ".join(map(str, t.ports))
    return [Hazard(t.source, f"gateway {name} selects {t.proto} {ports} from {t.from_zone} to {t.to_zone}, but no "
                   "[[rule]] or port forward accepts all of it: the filter drops the rest before the gateway sees it "
                   "(`nfgate rules` shows what it admits); add the rule, or allow = true to let the selector admit it")]


def _ipv6(config: Config, name: str, t: Traffic, counter: str, takes: bool) -> list[Hazard]:
    """``takes``: the selector's IPv6 goes through its gateway (``Gateway.takes_ipv6``), an IPv6
    port forward into it included: nothing to warn of."""
    if takes:
        return []  # the rules' and the forwards' IPv6 is relayed like their IPv4
    what = f"IPv6 {t.proto} {', '.join(map(str, t.ports))} from {t.from_zone} to {t.to_zone}"
    why = ("the gateways' own host takes IPv4 only" if config.gateway_link.mode == "host"
           else "this selector takes IPv4 only (its kind, or IPv4 addresses)")
    dropped = (f"{why}, so nfgate drops {what} "
               f"(counted as {counter}, shown by `nfgate status`) rather than let it skip gateway {name}")
    if t.to_zone != ROUTER:
        for f in config.nat.forwards6:
            if f.from_zone == t.from_zone and f.proto == t.proto and any(f.ports.overlaps(p) for p in t.ports):
                return [Hazard(f.source, f"forwards IPv6 {f.proto} {f.ports} to {f.to_addr}, but {dropped} for "
                               f"connections into {t.to_zone} ({t.source}): the forward only works into another zone")]
    for rule in config.rules:
        if not _matches(rule, t):
            continue
        nets = rule.saddr + rule.daddr
        if nets and not any(n.version == 6 for n in nets):
            continue  # an IPv4 rule
        if rule.ports and not any(r.overlaps(p) for r in rule.ports for p in t.ports):
            continue
        if rule.action != "accept":
            return []  # the IPv6 part is dropped or rejected first
        return [Hazard(t.source, f"{rule.source} accepts this traffic over IPv6 too, but {dropped}; give "
                       f"{rule.source} IPv4 addresses to say so")]
    policy = config.policy.input if t.to_zone == ROUTER else config.policy.forward
    if policy == "accept":
        key = "input" if t.to_zone == ROUTER else "forward"
        return [Hazard(t.source, f"policy.{key} = accept would pass this traffic over IPv6 too, but {dropped}")]
    return []
