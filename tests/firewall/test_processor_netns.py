"""The processor in a lab router: real packets through NFQUEUE, the blind track and a stand-in gateway.

The basic lab (ext - router - lan), nfgate applied with the iptables backend
(this kernel has no nft queue), a tcp-relay gateway on wan -> lan tcp 8443
port-forwarded to lan:443 and lan -> wan tcp 9000, an ftp-kind gateway on
wan 2121 (for dynamic rules), the processor for queue 0 and the stand-in
gateway layer of processor_gateway.py. Every wait polls with a bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from scapy.layers.inet import IP, TCP

from firewall.lab.wait import wait_for
from tests.bindtable import dynamic_elements
from tests.firewall.processor_harness import CLIENT, EXT, LAN, WAN, Harness, Server

pytestmark = pytest.mark.netns


@pytest.fixture
def rig(lab_factory: Any, tmp_path: Path) -> Iterator[Harness]:
    lab = lab_factory("basic")
    harness = Harness(lab, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def started(rig: Harness, *processor_args: str) -> Harness:
    rig.start_processor(*processor_args)
    rig.start_gateway()
    return rig


def test_inbound_and_outbound_flows_through_the_gateway(rig: Harness) -> None:
    started(rig)
    https = Server(rig.lab, "lan", 443)
    outside = Server(rig.lab, "ext", 9000)

    # ext -> the router's 8443: relayed to lan:443, which sees the real client.
    assert rig.many("ext", WAN, 8443, 1)["replies"] == 1
    assert https.peers() == [EXT]
    flow = rig.event("flow", gateway="relay")
    assert flow["via"] == "push"
    assert flow["client"].startswith(f"{EXT}:") and flow["original_dst"] == f"{WAN}:8443"
    assert flow["server"] == f"{LAN}:443"
    assert flow["snat"] is None  # a port forward: the server sees the client itself

    # lan -> ext:9000: ext sees the router's address (the processor's SNAT), and
    # the gateway learned lan's private tuple.
    assert rig.many("lan", EXT, 9000, 1)["replies"] == 1
    assert outside.peers() == [WAN]
    flow = rig.event("flow", gateway="relay", server=f"{EXT}:9000")
    assert flow["client"].startswith(f"{LAN}:")
    # ...and the address the processor SNATs it to, which ext saw: NEW_FLOW's snat.
    assert flow["snat"].startswith(f"{WAN}:") and int(flow["snat"].rsplit(":", 1)[1]) >= 61000
    # Invariant 3: conntrack carries both legs of both flows, NATed by the
    # binding table and marked as nfgate's; the processor saw first packets only.
    tracked = rig.conntrack().splitlines()
    mark = "mark=65536"
    leg_a_in = [t for t in tracked if f"dst={WAN} sport=" in t and "dport=8443" in t]
    assert len(leg_a_in) == 1 and "src=172.31.255.2" in leg_a_in[0] and "sport=20000" in leg_a_in[0] and mark in leg_a_in[0], tracked
    leg_b_in = [t for t in tracked if f"src={LAN} dst={EXT} sport=443" in t]
    assert len(leg_b_in) == 1 and "dst=172.31.254." in leg_b_in[0] and mark in leg_b_in[0], tracked
    leg_b_out = [t for t in tracked if f"src={EXT} dst={WAN} sport=9000" in t]  # the reply tuple: W:w, SNAT
    assert len(leg_b_out) == 1 and mark in leg_b_out[0], tracked
    assert rig.counter("queued") <= 4 + 2  # two first packets per flow (one per leg), at most a retransmit or two
    stats = rig.stats()
    assert stats["counters"]["flows.opened"] == 2
    assert stats["counters"]["signalling.copies"] == 6  # 3 copies of each push
    assert stats["counters"].get("verdict.drop", 0) == 0, stats["counters"]


def test_many_concurrent_connections_map_right_and_their_bindings_go(rig: Harness) -> None:
    started(rig)
    https = Server(rig.lab, "lan", 443)
    count = 60
    result = rig.many("ext", WAN, 8443, count)
    assert result == {"connected": count, "replies": count, "errors": []}  # each got its own line back
    assert https.peers(count) == [EXT] * count
    assert len({rig.event("flow")["firewall_side"] for _ in range(count)}) == count  # unique F:f
    # FIN both ways on both legs, then tcp_closing (1 s): every binding and pool entry goes.
    wait_for(lambda: rig.control({"cmd": "flows"}) == [] and rig.stats()["flows"] == 0, timeout=15, interval=0.2,
             what="all bindings to expire")
    stats = rig.stats()
    assert stats["pools"]["firewall_side"]["used"] == 0
    assert stats["counters"]["flows.ended.fin"] == count


def test_traffic_without_a_gateway_never_reaches_the_processor(rig: Harness) -> None:
    started(rig)
    Server(rig.lab, "lan", 80)
    outside = Server(rig.lab, "ext", 9001)
    before = rig.counter("queued")
    assert rig.many("ext", WAN, 8080, 5)["replies"] == 5  # the kernel's port forward
    assert rig.many("lan", EXT, 9001, 5)["replies"] == 5  # the kernel's masquerade
    assert outside.peers(5) == [WAN] * 5
    assert rig.counter("queued") == before


def test_garbage_is_dropped_and_counted_and_service_goes_on(rig: Harness) -> None:
    started(rig)
    Server(rig.lab, "lan", 443)
    before = rig.counter("queued")
    crafted = [
        # conntrack calls these invalid: they never reach the queue.
        IP(src=EXT, dst=WAN) / TCP(sport=33333, dport=8443, flags="S", dataofs=15),  # header past the end
        IP(src=EXT, dst=WAN) / TCP(sport=33335, dport=8443, flags="SF"),  # SYN and FIN
        # conntrack picks a mid-stream ACK up as new (nf_conntrack_tcp_loose): the processor drops it.
        IP(src=EXT, dst=WAN) / TCP(sport=33334, dport=8443, flags="A"),
    ]
    rig.lab.run("ext", [sys.executable, CLIENT, "raw", WAN, *(bytes(p).hex() for p in crafted)])
    wait_for(lambda: rig.counter("drop.not_new_flow") == 1, timeout=5, interval=0.05, what="the crafted packets to be counted")
    assert rig.counter("queued") == before + 1
    assert rig.processor is not None and rig.processor.poll() is None
    assert rig.many("ext", WAN, 8443, 3)["replies"] == 3


def test_a_second_processor_for_the_same_queue_changes_nothing(rig: Harness) -> None:
    """Started beside a running one, it fails in one line before it touches the
    first one's dynamic rules, bindings or queue; the first goes on serving."""
    started(rig)
    Server(rig.lab, "lan", 443)
    Server(rig.lab, "lan", 2121)
    control = rig.lab.popen("ext", [sys.executable, "-u", CLIENT, "hold", WAN, "2121"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ftp = rig.event("flow", gateway="ftp")
    rig.command(cmd="rule", request_id=1, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst=f"{WAN}:50000")
    rig.event("rule_ack", request_id=1)
    rules = rig.dynamic_rules()
    assert len(rules) == 1
    second = rig.lab.run("router", [sys.executable, "-m", "firewall.processor", "--config", rig.config, "--instance", "0",
                                    "--control", rig.tmp / "second.sock"], check=False, timeout=30)
    assert second.returncode == 1
    assert "cannot bind NFQUEUE 0" in second.stderr and "Traceback" not in second.stderr, second.stderr
    assert rig.dynamic_rules() == rules
    assert rig.control({"cmd": "flows"})[0]["flow_id"] == ftp["flow_id"]
    assert rig.many("ext", WAN, 8443, 3)["replies"] == 3
    control.stdin.close()  # type: ignore[union-attr]
    control.wait(timeout=10)


def test_martian_and_own_address_sources_open_nothing(rig: Harness) -> None:
    """Impossible sources are dropped and counted before any binding or signalling."""
    started(rig)
    Server(rig.lab, "lan", 443)
    sources = {"127.0.0.1": "drop.martian", "0.0.0.5": "drop.martian", "224.0.0.9": "drop.martian",
               "240.1.2.3": "drop.martian", WAN: "drop.own_address", "192.168.1.1": "drop.own_address"}
    crafted = [IP(src=src, dst=WAN) / TCP(sport=34000 + i, dport=8443, flags="S") for i, src in enumerate(sources)]
    rig.lab.run("ext", [sys.executable, CLIENT, "raw", WAN, *(bytes(p).hex() for p in crafted)])
    wait_for(lambda: rig.counter("drop.martian") == 4 and rig.counter("drop.own_address") == 2,
             timeout=5, interval=0.05, what="the impossible sources to be counted")
    stats = rig.stats()
    assert stats["counters"].get("flows.opened", 0) == 0 and stats["flows"] == 0
    assert stats["counters"].get("signalling.sent.new_flow", 0) == 0
    assert stats["pools"]["firewall_side"]["used"] == 0


def test_gateway_learns_flows_by_query_when_pushes_are_lost(rig: Harness) -> None:
    started(rig, "--test-skip-pushes")
    https = Server(rig.lab, "lan", 443)
    assert rig.many("ext", WAN, 8443, 3)["replies"] == 3
    assert https.peers(3) == [EXT] * 3
    for _ in range(3):
        assert rig.event("flow")["via"] == "query"
    counters = rig.stats()["counters"]
    assert counters["signalling.push_skipped"] == 3 and counters["queries.answered"] >= 3


def test_spoofed_and_replayed_signalling_is_refused(rig: Harness) -> None:
    started(rig)
    rig.command(cmd="forge")
    rig.command(cmd="replay")
    rig.command(cmd="stale")
    wait_for(lambda: all(rig.counter(f"signalling.refused.{r}") == 1 for r in ("bad_mac", "replay", "stale")),
             timeout=5, interval=0.05, what="the refusals to be counted")
    assert rig.counter("queries.not_found") == 1  # the honest query of "replay", once
    assert rig.events is not None
    events = rig.events

    def answers() -> list[str]:
        return [e for e in (json.loads(line)["event"] for line in events.drain()) if e in ("not_found", "answer")]

    assert wait_for(answers, timeout=5, interval=0.05, what="the answer to the honest query") == ["not_found"]


def test_dynamic_rules_redirect_and_allow_one_flow_each(rig: Harness) -> None:
    started(rig)
    Server(rig.lab, "lan", 2121)
    data = Server(rig.lab, "lan", 50000)
    allowed = Server(rig.lab, "lan", 2122)
    control = rig.lab.popen("ext", [sys.executable, "-u", CLIENT, "hold", WAN, "2121"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ftp = rig.event("flow", gateway="ftp")
    # What `nfgate flows` shows of it: original and translated tuples.
    (listed,) = rig.control({"cmd": "flows"})
    assert (listed["gateway"], listed["client"], listed["original_dst"], listed["server"]) == (
        "ftp", ftp["client"], f"{WAN}:2121", f"{LAN}:2121")
    assert listed["firewall_side"] == ftp["firewall_side"] and listed["proto"] == "tcp"

    # REDIRECT: the client's next connection to the router's 50000 goes into the ftp gateway.
    rig.command(cmd="rule", request_id=1, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst=f"{WAN}:50000")
    ack = rig.event("rule_ack", request_id=1)
    assert [r.split(":")[0] for r in rig.dynamic_rules()] == ["expect_0_any"]  # its first packet; conntrack carries the rest
    assert rig.many("ext", WAN, 50000, 1)["replies"] == 1
    assert data.peers() == [EXT]
    redirected = rig.event("flow", gateway="ftp", server=f"{LAN}:50000")
    assert redirected["original_dst"] == f"{WAN}:50000"
    rig.event("rule_end", rule_id=ack["rule_id"], reason="USED")
    assert rig.refused("ext", WAN, 50000)  # one-shot: the next is the kernel's, which drops it

    # ALLOW: the kernel carries one new flow ext -> lan:2122 (its SYN shows the processor the
    # use), a second connection is dropped, and then the rules are gone.
    rig.lab.run("ext", ["ip", "route", "add", "192.168.1.0/24", "via", WAN])
    rig.command(cmd="rule", request_id=2, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst=f"{LAN}:2122", mode="allow")
    ack = rig.event("rule_ack", request_id=2)
    assert rig.many("ext", LAN, 2122, 1)["replies"] == 1
    assert allowed.peers() == [EXT]
    rig.event("rule_end", rule_id=ack["rule_id"], reason="USED")
    assert rig.refused("ext", LAN, 2122)
    assert rig.counter("drop.rule_used") >= 1
    wait_for(lambda: rig.dynamic_rules() == [], timeout=10, interval=0.1, what="the used rule's kernel rules to go")
    assert rig.refused("ext", LAN, 2122)

    # ALLOW to the router's address (the port forward's, which the client addressed): the
    # kernel translates W:50002 to lan:50002 and carries the flow; nothing is queued for it.
    translated = Server(rig.lab, "lan", 50002)
    rig.command(cmd="rule", request_id=5, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst=f"{WAN}:50002", mode="allow")
    ack = rig.event("rule_ack", request_id=5)
    rules = rig.dynamic_rules()
    assert sorted(r.split(":")[0] for r in rules) == ["allow_dnat_0_any", "dnat_0_any", "expect_0_any"], rules
    (dnat,) = [r for r in rules if r.startswith("dnat_0_any")]
    assert f'"{LAN}"' in dnat and f'"{WAN}"' in dnat and "50002" in dnat
    queued = rig.counter("queued")
    assert rig.many("ext", WAN, 50002, 1)["replies"] == 1
    assert translated.peers() == [EXT]  # the lan server sees the real client
    assert rig.counter("queued") - queued <= 2  # its SYN (a retransmission at most): the kernel carried it
    tracked = [line for line in rig.conntrack().splitlines() if "dport=50002" in line]
    assert any(f"dst={WAN}" in t and f"src={LAN}" in t for t in tracked), tracked  # conntrack's DNAT
    rig.event("rule_end", rule_id=ack["rule_id"], reason="USED")
    assert rig.refused("ext", WAN, 50002)  # one connection: the next SYN is dropped
    wait_for(lambda: rig.dynamic_rules() == [], timeout=10, interval=0.1, what="the DNAT to go with the accept")
    assert rig.refused("ext", WAN, 50002)
    # A router address that stands for no party of the flow is refused.
    rig.command(cmd="rule", request_id=6, flow_id=ftp["flow_id"], src=f"{LAN}:0", dst=f"{WAN}:50003", mode="allow")
    rig.event("rule_refused", request_id=6, reason="THIRD_PARTY")

    # An FTP bounce is refused; a rule still waiting dies with its flow.
    rig.command(cmd="rule", request_id=3, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst="198.51.100.99:25")
    rig.event("rule_refused", request_id=3, reason="THIRD_PARTY")
    rig.command(cmd="rule", request_id=4, flow_id=ftp["flow_id"], src=f"{EXT}:0", dst=f"{WAN}:50001")
    ack = rig.event("rule_ack", request_id=4)
    control.stdin.close()  # type: ignore[union-attr]
    control.wait(timeout=10)
    rig.event("rule_end", rule_id=ack["rule_id"], reason="FLOW_ENDED", timeout=15)

    assert rig.stop_processor() == 0
    assert rig.dynamic_rules() == []  # what the processor installed is gone with it


def test_fail_modes_with_the_processor_stopped(rig: Harness) -> None:
    started(rig)
    https = Server(rig.lab, "lan", 443)
    assert rig.many("ext", WAN, 8443, 1)["replies"] == 1
    assert rig.stop_processor() == 0
    # closed: nobody bound to the queue, the kernel drops the gateway's traffic.
    assert rig.refused("ext", WAN, 8443)
    # open: the queue rules' bypass lets the kernel carry it straight to the server.
    rig.apply("open")
    assert rig.many("ext", WAN, 8443, 1)["replies"] == 1
    assert https.peers(2) == [EXT, EXT]


def test_with_the_real_gateway_layer(rig: Harness) -> None:
    """The same two directions through gateways/ (python -m gateways, tcp-relay)."""
    rig.start_processor()
    rig.start_real_gateway("relay")
    https = Server(rig.lab, "lan", 443)
    outside = Server(rig.lab, "ext", 9000)
    assert rig.many("ext", WAN, 8443, 5)["replies"] == 5
    assert https.peers(5) == [EXT] * 5
    assert rig.many("lan", EXT, 9000, 5)["replies"] == 5
    assert outside.peers(5) == [WAN] * 5
    counters = rig.stats()["counters"]
    assert counters["flows.opened"] == 10 and counters.get("verdict.drop", 0) == 0, counters


def test_dynamic_rule_elements_in_process(lab_factory: Any) -> None:
    """The writer the processor uses for dynamic rules, against the binding table in a lab
    router: a translated ALLOW's elements in one transaction both ways, a removal of what is
    already gone, and a successor's flush of what a predecessor left."""
    lab = lab_factory("basic")
    repo = Path(__file__).parents[2]
    lab.run("router", [sys.executable, "-m", "firewall.cli", "apply", "-c", repo / "examples" / "office.toml", "--backend", "iptables"],
            cwd=repo)
    script = f"""
import ipaddress, json
from firewall.processor.kernel import NatWriter
from firewall.processor.rulebook import KernelOp, KernelRule
ext, wan, lan = (int(ipaddress.IPv4Address(a)) for a in ("{EXT}", "{WAN}", "{LAN}"))
w = NatWriter(10)
unit = (KernelRule("expect_1_any", ("tcp", ext, wan, 2122)),
        KernelRule("dnat_1_any", ("tcp", ext, wan, 2122), (lan, 2122)),
        KernelRule("allow_dnat_1_any", ("tcp", ext, lan, 2122)))
other = (KernelRule("expect_1", ("udp", ext, 5000, wan, 5353)),)
print(json.dumps([w.apply(KernelOp(1, True, unit)), w.apply(KernelOp(2, False, unit)), w.apply(KernelOp(3, False, unit)),
                  w.apply(KernelOp(4, True, unit)),
                  # In one transaction; a removal of what is not there fails it, and each goes alone.
                  w.apply_all([KernelOp(5, True, other), KernelOp(6, False, other), KernelOp(7, True, other)]),
                  w.apply_all([KernelOp(8, False, other), KernelOp(9, False, other)]),
                  # Binding elements in nft's syntax; a key held with another value is replaced alone.
                  w.write([("leg_dnat", "udp", (ext, 5000, wan, 5353), (lan, 53)),
                           ("legb_snat", "udp", (lan, wan, 1024), (ext, 5000))]),
                  w.write([("leg_dnat", "udp", (ext, 5000, wan, 5353), (lan, 54))])]))
"""
    got = lab.run("router", [sys.executable, "-c", script], cwd=repo)
    assert json.loads(got.stdout) == [True, True, True, True, [True, True, True], [True, True], [True, True], [True]]
    maps = json.loads(lab.run("router", ["nft", "-j", "list", "table", "ip", "nfgate_bind"]).stdout)["nftables"]
    elems = {m["map"]["name"]: m["map"].get("elem", []) for m in maps if "map" in m}
    ((key, value),) = elems["leg_dnat"]
    assert key["elem"]["val"]["concat"] == ["udp", EXT, 5000, WAN, 5353] and key["elem"]["timeout"] == 10
    assert value == {"concat": [LAN, 54]}
    assert len(elems["legb_snat"]) == 1
    left = dynamic_elements(lab)
    assert sorted(r.split(":")[0] for r in left) == ["allow_dnat_1_any", "dnat_1_any", "expect_1_any"]
    lab.run("router", [sys.executable, "-c", "from firewall.processor.kernel import NatWriter; NatWriter(10).flush_instance(1)"],
            cwd=repo)
    assert dynamic_elements(lab) == []
