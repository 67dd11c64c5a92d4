"""firewall.processor.setelem: nf_tables element messages packed with ``struct``, against nft's own.

The golden bytes are what ``nft add element`` (nftables 1.0.6) sent to the
kernel for the same elements, captured with ``strace -x -e sendmsg``: the
payload of the message's NFTA_SET_ELEM_LIST_ELEMENTS. In a netns, the
writer's elements list exactly as nft's do, and the kernel's refusals
(EEXIST, ENOENT) come back as nft's add and delete get them.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

from firewall.lab.topology import parse_topology
from firewall.processor import setelem


def ip(a: str) -> int:
    return int(ipaddress.ip_address(a))


# (set, six, proto, key, value, timeout ms) -> nft's bytes for `add element` (`delete element` without value).
GOLDEN = [
    ("leg_dnat: tcp . 10.0.0.5 . 1000 . 11.0.0.1 . 80 timeout 30s : 12.0.0.1 . 20000",
     False, "tcp", (ip("10.0.0.5"), 1000, ip("11.0.0.1"), 80), (ip("12.0.0.1"), 20000), 30000,
     "3c0001800c00040000000000000075301c00018018000100060000000a00000503e800000b00000100500000"
     "100002800c0001000c0000014e200000"),
    ("legb_snat: udp . 172.31.255.2 . 172.31.254.1 . 40000 timeout 5s : 10.1.2.3 . 5353",
     False, "udp", (ip("172.31.255.2"), ip("172.31.254.1"), 40000), (ip("10.1.2.3"), 5353), 5000,
     "380001800c0004000000000000001388180001801400010011000000ac1fff02ac1ffe019c400000100002800c0001000a01020314e90000"),
    ("leg_snat6: tcp . 2001:db8::1 . 443 . fd00::2 . 65535 timeout 10s : fd00:ffff::1 . 20001",
     True, "tcp", (ip("2001:db8::1"), 443, ip("fd00::2"), 65535), (ip("fd00:ffff::1"), 20001), 10000,
     "600001800c000400000000000000271034000180300001000600000020010db800000000000000000000000101bb0000"
     "fd000000000000000000000000000002ffff00001c00028018000100fd00ffff0000000000000000000000014e210000"),
    ("dnat_0_any: tcp . 192.0.2.1 . 198.51.100.7 . 2121 : 10.0.0.9 . 2121",
     False, "tcp", (ip("192.0.2.1"), ip("198.51.100.7"), 2121), (ip("10.0.0.9"), 2121), None,
     "2c000180180001801400010006000000c0000201c633640708490000100002800c0001000a00000908490000"),
    ("expect_0: udp . 192.0.2.1 . 5000 . 198.51.100.7 . 5353",
     False, "udp", (ip("192.0.2.1"), 5000, ip("198.51.100.7"), 5353), None, None,
     "200001801c0001801800010011000000c000020113880000c633640714e90000"),
    ("allow6_0_any: tcp . 2001:db8::5 . fd00::6 . 22",
     True, "tcp", (ip("2001:db8::5"), ip("fd00::6"), 22), None, None,
     "34000180300001802c0001000600000020010db8000000000000000000000005fd00000000000000000000000000000600160000"),
    ("delete leg_dnat: tcp . 10.0.0.2 . 1000 . 11.0.0.1 . 80",
     False, "tcp", (ip("10.0.0.2"), 1000, ip("11.0.0.1"), 80), None, None,
     "200001801c00018018000100060000000a00000203e800000b00000100500000"),
]


@pytest.mark.parametrize("what, six, proto, key, value, timeout, nft", GOLDEN, ids=[g[0].split(":")[0] for g in GOLDEN])
def test_elements_are_the_bytes_nft_sends(what: str, six: bool, proto: str, key: tuple[int, ...],
                                         value: tuple[int, int] | None, timeout: int | None, nft: str) -> None:
    got = setelem.element(setelem.key_bytes(proto, key, six), None if value is None else setelem.value_bytes(value, six), timeout)
    assert got.hex() == nft


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) of each netlink message in a batch."""
    out, off = [], 0
    while off < len(data):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        out.append((kind, flags, seq, data[off:off + length]))
        off += (length + 3) & ~3
    return out


def test_a_batch_is_nfts_transaction_and_pyroute2_reads_its_messages() -> None:
    """BEGIN, a message per set with nft's flags (add: NLM_F_REQUEST | NLM_F_CREATE, as ``add
    element``, not ``create element``'s NLM_F_EXCL; delete: NLM_F_REQUEST), END; numbered on."""
    dnat = setelem.element(setelem.key_bytes("tcp", (1, 2, 3, 4), False), setelem.value_bytes((5, 6), False), 7000)
    gone = setelem.element(setelem.key_bytes("udp", (1 << 100, 2, 3), True))
    data = setelem.batch([setelem.Change(True, setelem.NFPROTO_IPV4, "nfgate_bind", "leg_dnat", (dnat, dnat)),
                          setelem.Change(False, setelem.NFPROTO_IPV6, "nfgate_bind6", "legb_snat6", (gone,))], 41)
    got = messages(data)
    assert [(kind, flags, seq) for kind, flags, seq, _ in got] == [
        (0x10, 0x001, 41), (0x0A0C, 0x401, 42), (0x0A0E, 0x001, 43), (0x11, 0x001, 44)]
    assert got[0][3][16:] == got[3][3][16:] == bytes.fromhex("0000000a")  # res_id: NFNL_SUBSYS_NFTABLES
    for (_, _, _, raw), family, table, name, elems, timeout in ((got[1], 2, "nfgate_bind", "leg_dnat", [dnat, dnat], 7000),
                                                                (got[2], 10, "nfgate_bind6", "legb_snat6", [gone], None)):
        msg = nft_set_elem_list_msg(raw)
        msg.decode()
        assert msg["nfgen_family"] == family and msg["header"]["length"] == len(raw)
        assert msg.get_attr("NFTA_SET_ELEM_LIST_TABLE") == table and msg.get_attr("NFTA_SET_ELEM_LIST_SET") == name
        decoded = msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS")
        assert len(decoded) == len(elems)
        for elem, raw_elem in zip(decoded, elems):
            key = elem.get_attr("NFTA_SET_ELEM_KEY").get_attr("NFTA_DATA_VALUE")
            assert key in raw_elem and len(key) % 4 == 0
            assert elem.get_attr("NFTA_SET_ELEM_TIMEOUT") == timeout


@given(st.sampled_from(["tcp", "udp"]), st.booleans(), st.booleans(), st.integers(0, 2**128 - 1), st.integers(0, 65535),
       st.integers(0, 2**128 - 1), st.integers(0, 65535), st.integers(1, 2**40))
def test_every_field_sits_in_its_own_register(proto: str, six: bool, exact: bool, src: int, sport: int, dst: int,
                                              dport: int, timeout: int) -> None:
    """pyroute2 decodes any element back to its fields: the protocol in the first byte of its
    register, each port in the first two of its, each address whole, the timeout in ms."""
    width = 16 if six else 4
    src, dst = src % (1 << 8 * width), dst % (1 << 8 * width)
    key = (src, sport, dst, dport) if exact else (src, dst, dport)
    value = (dst, sport)
    msg = nft_set_elem_list_msg(setelem.message(setelem.Change(True, 10 if six else 2, "t", "m", (
        setelem.element(setelem.key_bytes(proto, key, six), setelem.value_bytes(value, six), timeout),)), 1))
    msg.decode()
    (elem,) = msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS")
    raw = elem.get_attr("NFTA_SET_ELEM_KEY").get_attr("NFTA_DATA_VALUE")
    fields = [(1, "B"), (width, "a"), (2, "H"), (width, "a"), (2, "H")] if exact else [(1, "B"), (width, "a"), (width, "a"), (2, "H")]
    out, off = [], 0
    for size, kind in fields:
        chunk = raw[off:off + size]
        assert raw[off + size:off + (size + 3) // 4 * 4] == bytes((4 - size % 4) % 4)
        out.append(int.from_bytes(chunk, "big"))
        off += (size + 3) // 4 * 4
    assert off == len(raw)
    assert out == [setelem.PROTO_NUMBER[proto], *key]
    data = elem.get_attr("NFTA_SET_ELEM_DATA").get_attr("NFTA_DATA_VALUE")
    assert data == dst.to_bytes(width, "big") + sport.to_bytes(2, "big") + bytes(2)
    assert elem.get_attr("NFTA_SET_ELEM_TIMEOUT") == timeout


# -- in a netns, against the kernel ---------------------------------------------------------------

ONE_HOST = parse_topology({"name": "one", "router": "router", "hosts": {"router": {}}, "links": []})

# Runs in the router: the writer's elements, then nft's for the same, each listed; and the refusals.
IN_ROUTER = r"""
import ipaddress, json, subprocess, sys
import nftables
from firewall.config.model import Marks
from firewall.processor import setelem
from firewall.processor.kernel import NatWriter, _change
from firewall.processor.rulebook import KernelOp, KernelRule
from firewall.rules import bind

ip = lambda a: int(ipaddress.ip_address(a))
nft = nftables.Nftables()
assert nft.cmd(bind.render(Marks(), 1))[0] == 0
C, S, G, F = ip("192.0.2.10"), ip("198.51.100.20"), ip("172.31.255.2"), ip("172.31.254.1")
C6, S6, G6, F6 = ip("2001:db8::10"), ip("2001:db8:1::20"), ip("fd00:ffff::2"), ip("fd00:fffe::1")
binding = [("leg_dnat", "tcp", (C, 40000, S, 443), (G, 20000)), ("leg_snat", "tcp", (C, 40000, S, 443), (F, 30000)),
           ("legb_dnat", "tcp", (G, F, 30000), (S, 443)), ("legb_snat", "tcp", (G, F, 30000), (C, 40000)),
           ("leg_dnat", "udp", (C, 5060, S, 5060), (G, 20001)),
           ("leg_dnat6", "udp", (C6, 5000, S6, 53), (G6, 20000)), ("leg_snat6", "udp", (C6, 5000, S6, 53), (F6, 30001)),
           ("legb_dnat6", "udp", (G6, F6, 30001), (S6, 53)), ("legb_snat6", "udp", (G6, F6, 30001), (C6, 5000))]
rules = (KernelRule("expect_0_any", ("tcp", C, S, 2122)), KernelRule("dnat_0_any", ("tcp", C, S, 2122), (G, 2122)),
         KernelRule("allow_dnat_0_any", ("tcp", C, G, 2122)), KernelRule("expect_0", ("udp", C, 5000, S, 5353)),
         KernelRule("expect6_0", ("udp", C6, 5000, S6, 53)), KernelRule("allow6_0_any", ("tcp", C6, S6, 22)))
names = sorted({op[0] for op in binding} | {r.name for r in rules})

def listed():
    out = {}
    for family, table in (("ip", "nfgate_bind"), ("ip6", "nfgate_bind6")):
        doc = json.loads(subprocess.run(["nft", "-j", "list", "table", family, table], capture_output=True, check=True).stdout)
        for item in doc["nftables"]:
            s = item.get("map") or item.get("set")
            if s and s["name"] in names:
                elems = s.get("elem", [])
                for e in elems:  # the time left differs between the two writes
                    (e[0] if isinstance(e, list) else e).get("elem", {}).pop("expires", None)
                out[s["name"]] = elems
    return out

def flush():
    for name in names:
        table = f"{bind.FAMILY6} {bind.TABLE6}" if bind.in_table6(name) else f"{bind.FAMILY} {bind.TABLE}"
        kind = "map" if name.startswith(("leg", "dnat")) else "set"
        assert nft.cmd(f"flush {kind} {table} {name}")[0] == 0, name

w = NatWriter(10)
result = {"write": w.write(binding), "apply": w.apply(KernelOp(1, True, rules))}
mine = listed()
flush()
assert nft.cmd(bind.add_text(binding, 10))[0] == 0
rc, _, err = nft.json_cmd({"nftables": [bind.elements("add", r.name, [bind.element(r.key[0], r.key[1:], r.value, None)])
                                        for r in rules]})
assert rc == 0, err
result["same_as_nft"] = mine == listed()
result["mine"] = mine

# The kernel's answers, as nft's add and delete get them.
sock = setelem.ElementSocket()
def one(add, op, value):
    name, proto, key, _ = op
    six = bind.in_table6(name)
    elem = setelem.element(setelem.key_bytes(proto, key, six), setelem.value_bytes(value, six) if value else None,
                           10000 if add else None)
    return sock.commit([_change(add, name, (elem,))])
op = binding[0]
result["same_value"] = one(True, op, op[3])
result["other_value"] = one(True, op, (G, 20099))
result["delete"] = one(False, op, None)
result["delete_gone"] = one(False, op, None)
# A transaction with one refused message: nothing of it is applied.
result["half"] = sock.commit([_change(True, "leg_snat", (setelem.element(setelem.key_bytes("udp", (C, 1, S, 2), False),
                                                                           setelem.value_bytes((F, 3), False), 10000),)),
                              _change(False, "legb_dnat", (setelem.element(setelem.key_bytes("udp", (G, F, 9), False)),))])
result["half_left"] = [e for e in listed()["leg_snat"] if e[0]["elem"]["val"]["concat"][0] == "udp"]
# The writer's own fallbacks: a clash is replaced alone, a gone element's delete is no error.
assert w.write([binding[1]]) == [True]
result["replaced"] = w.write([("leg_snat", "tcp", (C, 40000, S, 443), (F, 30999))])
w.delete([binding[0], binding[2]])
result["after"] = {k: v for k, v in listed().items() if k in ("leg_dnat", "leg_snat", "legb_dnat")}
print(json.dumps(result))
"""


@pytest.mark.netns
def test_the_writer_s_elements_list_as_nft_s_and_the_kernel_refuses_as_for_nft(lab_factory: Any) -> None:
    lab = lab_factory(ONE_HOST)
    got = json.loads(lab.run("router", [sys.executable, "-c", IN_ROUTER], cwd=Path(__file__).parents[2]).stdout)
    assert got["write"] == [True] * 9 and got["apply"] is True
    assert got["same_as_nft"], got["mine"]
    mine = got["mine"]
    assert [{"elem": {"val": {"concat": ["tcp", "192.0.2.10", 40000, "198.51.100.20", 443]}, "timeout": 10}},
            {"concat": ["172.31.255.2", 20000]}] in mine["leg_dnat"]
    assert mine["legb_snat6"] == [[{"elem": {"val": {"concat": ["udp", "fd00:ffff::2", "fd00:fffe::1", 30001]}, "timeout": 10}},
                                   {"concat": ["2001:db8::10", 5000]}]]
    assert mine["allow6_0_any"] == [{"concat": ["tcp", "2001:db8::10", "2001:db8:1::20", 22]}]
    assert mine["dnat_0_any"] == [[{"concat": ["tcp", "192.0.2.10", "198.51.100.20", 2122]}, {"concat": ["172.31.255.2", 2122]}]]
    assert len(mine["leg_dnat"]) == 2 and len(mine["leg_snat"]) == 1 and len(mine["expect6_0"]) == 1
    # nft's `add element` semantics: the same value again is no error, another is EEXIST; a delete
    # of what is not there is ENOENT.
    assert (got["same_value"], got["other_value"], got["delete"], got["delete_gone"]) == ([0], [17], [0], [2])
    assert got["half"] == [0, 2] and got["half_left"] == []
    assert got["replaced"] == [True]
    after = got["after"]
    assert [e[1] for e in after["leg_snat"]] == [{"concat": ["172.31.254.1", 30999]}]
    assert [e[0]["elem"]["val"]["concat"][0] for e in after["leg_dnat"]] == ["udp"] and after["legb_dnat"] == []


# Runs in the router: a key that an ended binding's element still holds with another value.
CLASH_IN_ROUTER = r"""
import ipaddress, json, time
import nftables
from firewall.config.model import Marks
from firewall.processor.kernel import NatWriter
from firewall.rules import bind

ip = lambda a: int(ipaddress.ip_address(a))
nft = nftables.Nftables()
assert nft.cmd(bind.render(Marks(), 1))[0] == 0
C, S, F = ip("192.0.2.10"), ip("198.51.100.20"), ip("172.31.254.1")
snat = lambda f: ("leg_snat", "tcp", (C, 40000, S, 443), (F, f))
skew = [0.0]
w = NatWriter(10, clock=lambda: time.monotonic() + skew[0])
out = {}
def step(name, ops, writer=w):
    t = time.perf_counter()
    ok = writer.write(ops)
    out[name] = {"ok": ok, "counters": dict(w.counters), "ms": round(1e3 * (time.perf_counter() - t), 3)}
step("first", [snat(30000)])
step("reused", [snat(30001)])       # the same client port again, a new F:f: deleted and added in one transaction
skew[0] = 9.95                      # within HELD_MARGIN of its timeout: not vouched for
step("near_timeout", [snat(30002)])
w.delete([snat(30002)])
step("after_delete", [snat(30003)])  # gone: a delete first would fail the transaction
other = NatWriter(10)               # a successor that did not write it
step("successor", [snat(30004)], other)
out["successor"]["counters"] = dict(other.counters)
rc, text, _ = nft.cmd("list map ip nfgate_bind leg_snat")
out["listed"] = text
print(json.dumps(out))
"""


@pytest.mark.netns
def test_a_key_an_ended_binding_still_holds_is_replaced_in_one_transaction(lab_factory: Any) -> None:
    """nf_tables refuses a transaction whole when one add meets its key with another value, and a
    refused transaction costs an RCU grace period in ``sendmsg`` (the processor stalls): the
    writer deletes what it knows it left under the key in the same transaction. What it cannot
    vouch for (near its timeout, deleted, a predecessor's) still goes through the fallback."""
    lab = lab_factory(ONE_HOST)
    got = json.loads(lab.run("router", [sys.executable, "-c", CLASH_IN_ROUTER], cwd=Path(__file__).parents[2]).stdout)
    assert got["first"]["ok"] == [True] and got["first"]["counters"] == {}
    assert got["reused"]["ok"] == [True] and got["reused"]["counters"] == {"clash_removed": 1}
    # Without destroys (this writer's, as on Linux 6.1) the fallback's add is refused before its delete+add.
    near = {"clash_removed": 1, "refused": 1, "fallback_refused": 1}
    assert got["near_timeout"]["ok"] == [True] and got["near_timeout"]["counters"] == near
    assert got["after_delete"]["ok"] == [True] and got["after_delete"]["counters"] == near  # no delete of what is gone
    assert got["successor"]["ok"] == [True] and got["successor"]["counters"] == {"refused": 1, "fallback_refused": 1}
    assert "172.31.254.1 . 30004" in got["listed"] and got["listed"].count("192.0.2.10") == 1


def test_held_vouches_only_for_what_it_added_until_its_timeout_less_the_margin() -> None:
    from firewall.processor.kernel import HELD_MARGIN, HELD_SLICE, _Held
    held = _Held(10.0)
    held.add("leg_snat", b"k", b"v1", 0.0)
    assert held.clashes("leg_snat", b"k", b"v2", 5.0)
    assert not held.clashes("leg_snat", b"k", b"v1", 5.0)  # the same value: the kernel takes it again
    assert not held.clashes("leg_dnat", b"k", b"v2", 5.0) and not held.clashes("leg_snat", b"x", b"v2", 5.0)
    assert not held.clashes("leg_snat", b"k", b"v2", 10.0 - HELD_MARGIN)
    # Added later in the same slice: vouched for from the slice's start, the safe side.
    held.add("leg_snat", b"j", b"v1", HELD_SLICE / 2)
    assert held.clashes("leg_snat", b"j", b"v2", 9.0) and not held.clashes("leg_snat", b"j", b"v2", 10.0 - HELD_MARGIN)
    held.add("leg_snat", b"k", b"v2", 12.0)  # added again, in a later slice: the latest add decides
    assert held.clashes("leg_snat", b"k", b"v1", 12.5) and not held.clashes("leg_snat", b"k", b"v2", 12.5)
    held.prune(12.5)
    assert len(held) == 1  # the first slice timed out whole
    held.forget("leg_snat", b"k")
    assert not held.clashes("leg_snat", b"k", b"v1", 12.5) and len(held) == 0
    held.prune(30.0)
    assert len(held) == 0


def test_held_is_small_per_element() -> None:
    """A busy router adds thousands of elements a second, each held for ``nat_element`` seconds."""
    import tracemalloc

    from firewall.processor.kernel import _Held
    held = _Held(10.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20000):
            held.add("leg_snat", setelem.key_bytes("tcp", (i, 40000, 2, 443), False),
                     setelem.value_bytes((3, 20000 + i % 40000), False), i / 2000)
        per_element = (tracemalloc.get_traced_memory()[0] - before) / 20000
    finally:
        tracemalloc.stop()
    assert per_element < 200, per_element


def test_a_destroy_is_a_removal_of_its_own_type() -> None:
    gone = setelem.element(setelem.key_bytes("tcp", (1, 2, 3, 4), False))
    data = setelem.batch([setelem.Change(False, setelem.NFPROTO_IPV4, "nfgate_bind", "leg_dnat", (gone,), destroy=True)], 7)
    assert [(kind, flags) for kind, flags, _, _ in messages(data)] == [(0x10, 0x001), (0x0A1E, 0x001), (0x11, 0x001)]


# Runs in the router: removals of what is not there, with destroys (this kernel) and without.
DESTROY_IN_ROUTER = r"""
import ipaddress, json, time
import nftables
from firewall.config.model import Marks
from firewall.processor.kernel import NatWriter
from firewall.processor.rulebook import KernelOp, KernelRule
from firewall.rules import bind

ip = lambda a: int(ipaddress.ip_address(a))
nft = nftables.Nftables()
assert nft.cmd(bind.render(Marks(), 1))[0] == 0
C, S, F, G = ip("192.0.2.10"), ip("198.51.100.20"), ip("172.31.254.1"), ip("172.31.255.2")
out = {}
for destroys in (True, False):
    skew = [0.0]
    w = NatWriter(10, clock=lambda: time.monotonic() + skew[0])
    out[f"probe_{destroys}"] = w.probe_destroy()
    w.destroys = destroys
    snat = lambda f, c=40000 + destroys: ("leg_snat", "tcp", (C, c, S, 443), (F, f))
    assert w.write([snat(30000)]) == [True]
    skew[0] = 9.95  # near its timeout: not vouched for
    assert w.write([snat(30001)]) == [True]
    w.delete([snat(30001), ("legb_dnat", "tcp", (G, F, 39999), (S, 443))])  # the second was never there
    rule = (KernelRule("expect_0", ("udp", C, 5000 + destroys, S, 5353)),)
    removed = [w.apply(KernelOp(1, False, rule))]  # not there either
    out[f"counters_{destroys}"] = dict(w.counters)
    out[f"removed_{destroys}"] = removed
    out[f"left_{destroys}"] = nft.cmd("list map ip nfgate_bind leg_snat")[1].count("192.0.2.10")
    # A successor that does not know who holds a key (its batch is refused): with destroys its
    # fallback replaces the key in one transaction, without it the add is refused first.
    held = ("leg_snat", "tcp", (ip("192.0.2.11"), 41000 + destroys, S, 443), (F, 31000))
    assert w.write([held]) == [True]
    successor = NatWriter(10)
    successor.destroys = destroys
    out[f"successor_{destroys}"] = successor.write([held[:3] + ((F, 31001),)])
    out[f"successor_counters_{destroys}"] = dict(successor.counters)
print(json.dumps(out))
"""


@pytest.mark.netns
def test_with_destroys_no_removal_of_what_timed_out_refuses_a_transaction(lab_factory: Any) -> None:
    """This kernel (6.3+) takes NFT_MSG_DESTROYSETELEM: a key near its timeout is replaced in one
    transaction, and removals of what is gone refuse nothing. Without (Linux 6.1), the same
    calls still succeed, through the fallback."""
    lab = lab_factory(ONE_HOST)
    got = json.loads(lab.run("router", [sys.executable, "-c", DESTROY_IN_ROUTER], cwd=Path(__file__).parents[2]).stdout)
    assert got["probe_True"] is True and got["probe_False"] is True
    assert got["counters_True"] == {"clash_removed": 1}
    assert got["counters_False"] == {"refused": 1, "fallback_refused": 1}  # the near-timeout key: its add, then delete+add
    assert got["removed_True"] == got["removed_False"] == [True]
    assert got["left_True"] == got["left_False"] == 0
    assert got["successor_True"] == got["successor_False"] == [True]
    assert got["successor_counters_True"] == {"refused": 1}
    assert got["successor_counters_False"] == {"refused": 1, "fallback_refused": 1}
