"""firewall.processor.refresh: the master's refresh of its UDP connections' copies (docs/ha.md, "UDP refresh").

The messages are checked against pyroute2's ctnetlink decoder; the schedule
on plain times; the refresher itself in a network namespace of its own,
against the kernel: it writes each UDP connection's own timeout back, skips
the rest, and an entry destroyed between the dump and its update is not made
again (no NLM_F_CREATE).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import sys
from pathlib import Path

import pytest
from pyroute2.netlink import NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from firewall.processor.refresh import Schedule, dump_request, interval, messages, selection, update_for
from tests.firewall.test_processor_kernel import message

REPO = Path(__file__).resolve().parents[2]
C, W, G, F = "203.0.113.10", "203.0.113.1", "172.31.255.2", "172.31.254.0"


def dumped(proto: int, timeout: int | None, family: int = socket.AF_INET) -> bytes:
    """A dump's entry as the kernel sends it (type IPCTNL_MSG_CT_NEW), with CTA_TIMEOUT."""
    def tup(t: tuple[str, int, str, int]) -> NFCTAttrTuple:
        return NFCTAttrTuple(family=family, saddr=t[0], daddr=t[2], proto=proto, sport=t[1], dport=t[3])

    fields: dict = {"tuple_orig": tup((C, 40000, W, 5004)), "tuple_reply": tup((G, 20002, F, 1024)), "mark": 0x10000}
    if timeout is not None:
        fields["timeout"] = timeout
    msg = nfct_msg.create_from(**fields)
    msg["header"]["type"] = 1 << 8 | 0
    msg["nfgen_family"] = family
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes) -> nfct_msg:
    msg = nfct_msg(data)
    msg.decode()
    return msg


def test_an_update_writes_the_entrys_own_timeout_back_by_its_original_tuple_without_create() -> None:
    data = dumped(17, 27)
    update = update_for(data, 0, len(data), seq=9)
    assert update is not None
    msg = decode(update)
    assert msg["header"]["type"] == 1 << 8 | 0  # ctnetlink, IPCTNL_MSG_CT_NEW
    # NLM_F_REQUEST alone: no NLM_F_CREATE (an entry gone since the dump is not made again),
    # no NLM_F_EXCL (an existing entry is updated), no NLM_F_ACK (only a failure is answered).
    assert msg["header"]["flags"] == NLM_F_REQUEST
    assert not msg["header"]["flags"] & (NLM_F_CREATE | NLM_F_EXCL)
    assert msg["header"]["sequence_number"] == 9
    assert msg["nfgen_family"] == socket.AF_INET
    assert msg.get_attr("CTA_TIMEOUT") == 27
    assert msg.get_attr("CTA_TUPLE_REPLY") is None and msg.get_attr("CTA_MARK") is None  # nothing else changes
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    assert (ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")) == (C, W)
    assert (proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT")) \
        == (17, 40000, 5004)


def test_an_update_keeps_the_zone_and_an_ipv6_family() -> None:
    def tup(t: tuple[str, int, str, int]) -> NFCTAttrTuple:
        return NFCTAttrTuple(family=socket.AF_INET6, saddr=t[0], daddr=t[2], proto=17, sport=t[1], dport=t[3])
    msg = nfct_msg.create_from(tuple_orig=tup(("2001:db8::10", 1, "2001:db8::1", 2)),
                               tuple_reply=tup(("2001:db8::1", 2, "2001:db8::10", 1)), timeout=100, zone=7)
    msg["header"]["type"] = 1 << 8
    msg["nfgen_family"] = socket.AF_INET6
    msg.encode()
    data = bytes(msg.data)
    got = decode(update_for(data, 0, len(data), 1))  # type: ignore[arg-type]
    assert got["nfgen_family"] == socket.AF_INET6 and got.get_attr("CTA_ZONE") == 7 and got.get_attr("CTA_TIMEOUT") == 100
    assert got.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V6_SRC") == "2001:db8::10"


@pytest.mark.parametrize("proto, timeout", [(6, 30), (17, None), (17, 0)])
def test_no_update_for_tcp_for_no_timeout_or_for_an_entry_expiring_now(proto: int, timeout: int | None) -> None:
    data = dumped(proto, timeout)
    assert update_for(data, 0, len(data), 1) is None


def test_an_update_is_read_between_its_bounds_in_a_chunk_of_several() -> None:
    first, second = dumped(6, 300), dumped(17, 12)
    data = first + b"\0" * (-len(first) % 4) + second
    found = [(kind & 0xFF, start, end) for kind, _, start, end in messages(data)]
    assert len(found) == 2
    assert [update_for(data, s, e, 1) is not None for _, s, e in found] == [False, True]
    assert decode(update_for(data, found[1][1], found[1][2], 1)).get_attr("CTA_TIMEOUT") == 12  # type: ignore[arg-type]


def test_a_destroy_event_is_no_dump_entry_but_reads_the_same() -> None:
    """update_for reads attributes only: it is given dump entries, never events (their type is checked by seq)."""
    data = message(17, (C, 1, W, 2), (W, 2, C, 1))
    assert update_for(data, 0, len(data), 1) is None  # no CTA_TIMEOUT in a destroy event


def test_the_dump_asks_the_kernel_for_the_mark_and_udp_only() -> None:
    data = dump_request(socket.AF_INET, 0x40000, 0x50000, seq=3)
    msg = decode(data)
    assert msg["header"]["flags"] == NLM_F_REQUEST | NLM_F_DUMP
    assert msg["header"]["type"] == 1 << 8 | 1  # IPCTNL_MSG_CT_GET
    assert (msg.get_attr("CTA_MARK"), msg.get_attr("CTA_MARK_MASK")) == (0x40000, 0x50000)
    # CTA_FILTER (25): the original tuple's protocol number only; pyroute2 does not know it.
    length, kind = struct.unpack_from("=HH", data, len(data) - 20)
    assert (length, kind & 0x3FFF) == (20, 25)
    assert struct.unpack_from("=I", data, len(data) - 12)[0] == 1 << 3  # CTA_FILTER_F_CTA_PROTO_NUM


def test_the_schedule_runs_only_while_master_first_at_once_then_every_interval() -> None:
    s = Schedule(10.0)
    assert s.decide(0.0, master=False) is False  # a backup stops any pass and starts none
    assert s.decide(5.0, master=True) is True  # master: at once
    assert s.decide(6.0, master=True) is None
    assert s.decide(14.9, master=True) is None
    assert s.decide(15.0, master=True) is True
    assert s.decide(16.0, master=False) is False
    assert s.decide(17.0, master=True) is True  # master again: at once, not 10 s after the last


def test_the_dumps_select_nfgates_flows_each_once_or_every_udp_connection() -> None:
    rewritten, allowed = 0x10000, 0x40000
    (m1, k1), (m2, k2) = selection(rewritten, allowed, every_udp=False)

    def listed(mark: int) -> int:
        return sum(mark & k == m for m, k in ((m1, k1), (m2, k2)))
    assert (listed(rewritten), listed(allowed), listed(rewritten | allowed), listed(0), listed(0x20000)) == (1, 1, 1, 0, 0)
    assert selection(rewritten, allowed, every_udp=True) == [(0, 0)]  # mask 0: every mark


@pytest.mark.parametrize("setting, kernel, expected", [
    (10.0, 30, 10.0),  # the default: a third of the kernel's default
    (20.0, 30, 10.0),  # more than a third: a copy could expire between two passes
    (20.0, 120, 20.0),
    (10.0, 2, 1.0),  # never below a second
    (10.0, None, 10.0),  # the sysctl unreadable: as set
    (0.0, 30, 0.0),  # off
])
def test_the_interval_stays_below_a_third_of_the_kernels_udp_timeout(setting: float, kernel: int | None,
                                                                     expected: float) -> None:
    assert interval(setting, kernel) == expected


# ---- against the kernel, in a namespace of its own -------------------------------------

PROBE = r"""
import json, socket, subprocess, time
from collections import Counter
from firewall.processor.refresh import Refresher

def ct(*args):
    return subprocess.run(["conntrack", *args], check=True, capture_output=True, text=True).stdout

def entry(proto, sport, mark, timeout=20):
    extra = ["--state", "ESTABLISHED"] if proto == "tcp" else []
    ct("-I", "-p", proto, "-s", "10.0.0.1", "-d", "10.0.0.2", "--sport", str(sport), "--dport", "5004",
       "-t", str(timeout), "-m", str(mark), *extra)

def timeouts():
    out = {}
    for line in ct("-L").splitlines():
        f = line.split()
        sport = next(x for x in f if x.startswith("sport=")).split("=")[1]
        out[f"{f[0]}:{sport}"] = int(f[2])
    return out

# conntrackd's view: update events (a listener before the entries exist, nf_conntrack_events = 2).
events = subprocess.Popen(["conntrack", "-E", "-e", "UPDATE", "-o", "timestamp"], stdout=subprocess.PIPE, text=True)
time.sleep(0.5)
entry("udp", 1, 0x10000, timeout=7)  # a bound gateway flow's leg, 7 s left on the master
entry("udp", 2, 0x40000)            # a flow a dynamic rule let the kernel carry
entry("udp", 3, 0x50000)            # offloaded: both bits, refreshed once
entry("udp", 4, 0)                  # not nfgate's
entry("tcp", 5, 0x10000)            # not UDP
entry("udp", 6, 0x10000)            # destroyed between the dump and its update
counters = Counter()
r = Refresher([(0x10000, 0x10000), (0x40000, 0x50000)], counters, families=(socket.AF_INET,))
assert r.begin()
ct("-D", "-p", "udp", "--sport", "6")  # the first chunk is already in the socket
for _ in range(100):
    if not r.busy:
        break
    r.step()
time.sleep(0.3)
r.answers()
events.terminate()
updates = [line for line in events.communicate()[0].splitlines() if "[UPDATE]" in line]
every = Counter()  # ha.udp_refresh_all: every UDP connection, nfgate's or not
r2 = Refresher([(0, 0)], every, families=(socket.AF_INET,))
r2.begin()
for _ in range(100):
    if not r2.busy:
        break
    r2.step()
print(json.dumps({"counters": counters, "timeouts": timeouts(), "events": updates, "every": every}))
"""


@pytest.mark.netns
def test_a_pass_writes_back_each_udp_connections_own_timeout_and_recreates_none(lab_factory, tmp_path: Path) -> None:
    topo = tmp_path / "one.json"
    topo.write_text(json.dumps({"router": "router", "hosts": {"router": {}, "peer": {}}, "links": [
        {"a": {"host": "router", "ifname": "eth0", "addresses": ["10.9.0.1/24"]},
         "b": {"host": "peer", "ifname": "eth0", "addresses": ["10.9.0.2/24"]}}]}))
    lab = lab_factory(topo)
    out = lab.run("router", [sys.executable, "-c", PROBE], cwd=str(REPO), timeout=60).stdout
    got = json.loads(out)
    c = got["counters"]
    assert c["refresh.passes"] == 1
    # Listed: 1, 3 and 6 (rewritten), then 2 (allowed without rewritten); 3 once, 4 and 5 never.
    assert c["refresh.listed"] == 4, c
    assert c["refresh.updated"] == 4 and c["refresh.gone"] == 1, c
    t = got["timeouts"]
    assert "udp:6" not in t, t  # the update found it gone and did not make it again
    assert set(t) == {"udp:1", "udp:2", "udp:3", "udp:4", "tcp:5"}, t
    assert t["udp:1"] <= 7, t  # its own timeout, not the kernel's default or anything longer
    # Each update is an event conntrackd copies to the peer, with the timeout (7 s for 1).
    assert len(got["events"]) == 3, got["events"]
    ones = [int(m.group(1)) for e in got["events"] if (m := re.search(r"udp +17 (\d+) src=\S+ dst=\S+ sport=1 ", e))]
    assert len(ones) == 1 and 5 <= ones[0] <= 7, got["events"]
    assert got["every"]["refresh.listed"] == 4 and got["every"]["refresh.updated"] == 4, got["every"]  # 1-4, not TCP
