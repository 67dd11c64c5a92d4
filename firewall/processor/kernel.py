"""The processor's in-process kernel interfaces: NAT map elements, conntrack, queue counters.

- ``NatWriter`` writes binding elements into the binding table's maps
  (``firewall.rules.bind``), and dynamic rules' elements into its sets,
  in-process, as nf_tables netlink messages of its own (``setelem``): one
  transaction, one ``sendmsg``, for all the elements of a batch of queued
  packets, before their verdicts. ``add`` refuses a key that is already
  there with another value (EEXIST), which a replaced binding's element can
  be until its timeout: then that element is deleted and added again,
  alone. libnftables' JSON API (Debian's python3-nftables) does what is not
  per flow: flushing an instance's sets, checking the table is there.
  The kernel refuses a transaction whole, and a refused one costs an RCU
  grace period inside ``sendmsg`` (6-30 ms here, the processor handling
  nothing meanwhile), so the writer remembers the elements it added
  (``_Held``) and deletes, in the same transaction, one that an ended
  binding left under a key a new one needs: a client that reuses its port
  within ``nat_element``, a reused pool slot.
- ``Conntrack`` answers "is this connection alive?" (a ctnetlink GET),
  deletes a connection (an offloaded flow's legs), lists
  the connections with nfgate's mark (a dump filtered in the kernel, at start
  and after a lost event), has the kernel reap expired connections (``reap``)
  and reads destroy events from a netlink socket of its own that the
  processor's loop polls. A classic BPF filter on that socket
  (``destroy_filter``) keeps other connections' events in the kernel: the
  processor is not woken by the end of a gateway-free connection. A
  request about one connection is packed with ``struct`` as pyroute2
  encodes it (``tuple_request``), a dump's by pyroute2's ctnetlink classes;
  answers and events are read with ``struct`` (``connection``), the
  event's mark checked again first.
- ``queue_counters`` reads the kernel's per-queue drop counters from
  ``/proc/net/netfilter/nfnetlink_queue``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nftables
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from firewall.errors import KernelError
from firewall.processor import setelem
from firewall.processor.core import NatOp
from firewall.processor.rulebook import KernelOp
from firewall.rules import bind
from firewall.signalling import NO_COUNTERS, Counters

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_DESTROY = 3
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2  # the message type of a destroy event
# Conntrack's netlink attributes (linux/netfilter/nfnetlink_conntrack.h), as read here.
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 1, 2, 8, 9, 10
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_IP_V6_SRC, CTA_IP_V6_DST = 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 4, 1, 1
TCP_CONNTRACK_ESTABLISHED = 3  # enum tcp_conntrack: the states after it are a connection's closing
NLA_TYPE_MASK = 0x3FFF
_NLA = struct.Struct("=HH")
_U8, _U16, _U32, _U64 = struct.Struct("!B"), struct.Struct("!H"), struct.Struct("!I"), struct.Struct("!Q")
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
NAT_ATTEMPTS = 3  # tries for one element that collides with an ended binding's
HELD_MARGIN = 0.1  # seconds: our clock against the kernel's on when an element times out (a tick is 4-10 ms)
HELD_SLICE = 1.0  # seconds of adds the writer's record keeps in one dict (it drops a slice whole)
EVENT_BUFFER = 8 << 20  # bytes of kernel buffer for destroy events (SO_RCVBUFFORCE)
REQUEST_TIMEOUT = 2.0  # seconds for conntrack to answer a look-up or a dump's next message
REQUEST_MAX_READS = 1 << 20  # recv() calls for one request: a dump of a million entries fits
EVENT_READ_BATCH = 64  # recv() calls per wake-up, so a storm of events cannot starve packets
QUEUE_PROC = Path("/proc/net/netfilter/nfnetlink_queue")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_PROTO = {6: "tcp", 17: "udp"}


class _Held:
    """The binding elements this writer added that are surely still in the kernel.

    Kept small (a busy router adds thousands a second, each living
    ``nat_element`` seconds): one dict per ``HELD_SLICE`` of adds, from
    ``hash((set, key))`` to ``hash(value)``. An element added in a slice
    that began at t times out in the kernel at t + ``life`` or later (our
    clock is read before the transaction; the kernel's timeout starts after
    it, less up to a tick), so it is vouched for until t + ``life`` -
    ``HELD_MARGIN``. A key held with another value is deleted in the adding
    transaction; one that may have timed out is not (its delete would fail
    the transaction as surely as its add would). Two keys or values with
    one hash would at worst cost a refused transaction, which the writer's
    fallback serves.
    """

    def __init__(self, life: float) -> None:
        self._life = life
        self._slices: deque[tuple[float, dict[int, int]]] = deque()

    def __len__(self) -> int:
        return sum(len(held) for _, held in self._slices)

    def clashes(self, name: str, key: bytes, value: bytes, now: float, sure: bool = True) -> bool:
        """Whether ``key`` is held with another value: surely (``sure``: its delete cannot fail),
        or maybe (it has not been pruned: for a destroy, which finds nothing without an error)."""
        k = hash((name, key))
        for start, held in reversed(self._slices):  # the latest add of a key decides
            v = held.get(k)
            if v is not None:
                return v != hash(value) and (not sure or now < start + self._life - HELD_MARGIN)
        return False

    def add(self, name: str, key: bytes, value: bytes, now: float) -> None:
        """Record an element added by a transaction that began at ``now``."""
        slices = self._slices
        if not slices or now >= slices[-1][0] + HELD_SLICE:
            slices.append((now, {}))
        slices[-1][1][hash((name, key))] = hash(value)

    def forget(self, name: str, key: bytes) -> None:
        k = hash((name, key))
        for _, held in self._slices:
            held.pop(k, None)

    def prune(self, now: float) -> None:
        """Drop the slices whose every element has timed out."""
        slices = self._slices
        while slices and slices[0][0] + HELD_SLICE + self._life <= now:
            slices.popleft()


class NatWriter:
    """Adds binding elements, and dynamic rules' elements, to the binding table, in-process.

    The elements go in as nf_tables netlink messages of our own
    (``setelem``): one ``sendmsg`` a transaction. libnftables stays for what
    is not per flow (flushing an instance's sets, the table check).
    ``counters``: ``clash_removed`` (an ended binding's element deleted in
    the transaction of the one that replaces it), ``refused`` (a transaction
    of binding elements the kernel refused whole, then written element by
    element).
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._nft = nftables.Nftables()
        self._sock = setelem.ElementSocket()
        # Whole seconds, as ``nft add element ... timeout Ns`` (bind.add_text) wrote them.
        self._timeout_ms = max(1, round(timeout)) * 1000
        self._clock = clock
        self._held = _Held(self._timeout_ms / 1000)
        self.counters: Counter[str] = Counter()
        # Removals as NFT_MSG_DESTROYSETELEM (``probe_destroy``): none can then refuse a
        # transaction for an element that timed out meanwhile.
        self.destroys = False

    def _cmd(self, commands: list[dict[str, Any]]) -> tuple[bool, str]:
        rc, _, err = self._nft.json_cmd({"nftables": commands})
        return rc == 0, err

    def _commit(self, changes: list[setelem.Change]) -> bool:
        return not any(self._sock.commit(changes))

    def probe_destroy(self) -> bool:
        """Whether this kernel takes NFT_MSG_DESTROYSETELEM (Linux 6.3+): a destroy of a key
        that cannot be there, in the binding table (which must be loaded). From then on every
        removal is one; an older kernel refuses it (once, at start) and removals stay deletes."""
        self.destroys = self._commit([_change(False, bind.DNAT_MAP, (setelem.element(bytes(20)),), destroy=True)])
        return self.destroys

    def _remove(self, name: str, elems: tuple[bytes, ...]) -> setelem.Change:
        return _change(False, name, elems, destroy=self.destroys)

    @staticmethod
    def _bytes(op: NatOp) -> tuple[str, bytes, bytes]:
        """(map, key, value) of an op as the messages carry them."""
        name, proto, key, value = op
        six = bind.in_table6(name)
        return name, setelem.key_bytes(proto, key, six), setelem.value_bytes(value, six)

    def write(self, ops: list[NatOp]) -> list[bool]:
        """Write every element; True per op that is in the kernel now.

        The batch goes in as one transaction, a message per map, after the
        deletes of what ended bindings still hold under its keys (``_Held``).
        A refusal (a key held by an element this writer does not know of, or
        no longer surely) is retried element by element (``_one``)."""
        if not ops:
            return []
        now = self._clock()
        held = self._held
        held.prune(now)
        adds: dict[str, list[bytes]] = {}
        gone: dict[str, list[bytes]] = {}
        written = [self._bytes(op) for op in ops]
        for name, key, value in written:
            if held.clashes(name, key, value, now, sure=not self.destroys):
                gone.setdefault(name, []).append(setelem.element(key))
            adds.setdefault(name, []).append(setelem.element(key, value, self._timeout_ms))
        changes = [self._remove(name, tuple(elems)) for name, elems in gone.items()]
        changes += [_change(True, name, tuple(elems)) for name, elems in adds.items()]
        if self._commit(changes):
            for name, key, value in written:
                held.add(name, key, value, now)
            if gone:
                self.counters["clash_removed"] += sum(len(elems) for elems in gone.values())
            return [True] * len(ops)
        self.counters["refused"] += 1
        return [self._one(op) for op in ops]

    def _one(self, op: NatOp) -> bool:
        name, key, value = self._bytes(op)
        add = _change(True, name, (setelem.element(key, value, self._timeout_ms),))
        replace = [self._remove(name, (setelem.element(key),)), add]
        for _ in range(NAT_ATTEMPTS):
            now = self._clock()
            # Another value under this key: an ended binding's element, not yet
            # timed out. With destroys (Linux 6.3+) a removal of a key nobody
            # holds is no error, so the key is replaced at once, not after a
            # refused add (each refused transaction is an RCU grace period in
            # sendmsg). With deletes, an element that is just expiring can
            # refuse both the add (EEXIST) and the delete (ENOENT) for a
            # moment: try again.
            if self.destroys:
                done = self._commit(replace)
            else:
                done = self._commit([add])
                if not done:
                    self.counters["fallback_refused"] += 1
                    done = self._commit(replace)
            if done:
                self._held.add(name, key, value, now)
                return True
            self.counters["fallback_refused"] += 1
        return False

    def delete(self, ops: list[NatOp]) -> None:
        """Delete binding elements; one that is gone already (timed out) is no error."""
        if not ops:
            return
        for name, key, _ in map(self._bytes, ops):
            self._held.forget(name, key)
        if self._commit(self._by_map(ops)):
            return
        for op in ops:
            self._commit(self._by_map([op]))

    def _by_map(self, ops: list[NatOp]) -> list[setelem.Change]:
        """Deletes of ``ops``' elements, a message per map."""
        by_name: dict[str, list[bytes]] = {}
        for name, key, _ in map(self._bytes, ops):
            by_name.setdefault(name, []).append(setelem.element(key))
        return [self._remove(name, tuple(elems)) for name, elems in by_name.items()]

    def _rule_changes(self, op: KernelOp) -> list[setelem.Change]:
        """A dynamic rule's elements, a message per set (no timeout: the rulebook removes them)."""
        by_name: dict[str, list[bytes]] = {}
        for r in op.rules:
            six = bind.in_table6(r.name)
            value = setelem.value_bytes(r.value, six) if op.add and r.value is not None else None
            by_name.setdefault(r.name, []).append(setelem.element(setelem.key_bytes(r.key[0], r.key[1:], six), value))
        return [_change(op.add, name, tuple(elems), destroy=self.destroys) for name, elems in by_name.items()]

    def apply(self, op: KernelOp) -> bool:
        """Add or remove a dynamic rule's elements (``rulebook.KernelOp``) in one transaction.

        A removal whose elements are gone already (the ruleset was applied
        again, which empties the sets) is done element by element, and what
        is missing is not an error.
        """
        changes = self._rule_changes(op)
        ok = self._commit(changes)
        if ok or op.add:
            return ok
        for change in changes:
            for elem in change.elements:
                self._commit([self._remove(change.name, (elem,))])
        return True

    def apply_all(self, ops: list[KernelOp]) -> list[bool]:
        """``apply`` for many operations in one transaction, in order; True per op that is
        done. If the kernel refuses the whole (one element clashes, or a removal finds one
        gone), each op is tried alone, so one bad op fails only itself."""
        if len(ops) == 1:
            return [self.apply(ops[0])]
        changes = [change for op in ops for change in self._rule_changes(op)]
        if self._commit(changes):
            return [True] * len(ops)
        return [self.apply(op) for op in ops]

    def flush_instance(self, instance: int) -> None:
        """Empty a processor instance's dynamic sets: what a predecessor left, or ours at exit
        (in the IPv6 table too; a table without them, of an older version, is flushed in IPv4
        alone)."""
        def flush(family: str, table: str, six: bool) -> list[dict[str, Any]]:
            return [{"flush": {"set" if kind != "dnat" else "map": {"family": family, "table": table,
                                                                   "name": bind.dyn_name(kind, instance, wild, six)}}}
                    for kind in bind.DYN_KINDS for wild in (False, True)]
        self._cmd(flush(bind.FAMILY, bind.TABLE, False))
        self._cmd(flush(bind.FAMILY6, bind.TABLE6, True))

    def table_present(self) -> bool:
        return self._cmd([{"list": {"table": {"family": bind.FAMILY, "name": bind.TABLE}}}])[0]


# Classic BPF (linux/filter.h), for the destroy-event socket's filter.
_BPF_LD, _BPF_LDX, _BPF_ALU, _BPF_JMP, _BPF_RET, _BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
_BPF_W, _BPF_B = 0x00, 0x10
_BPF_IMM, _BPF_ABS, _BPF_IND = 0x00, 0x20, 0x40
_BPF_AND, _BPF_JEQ, _BPF_K, _BPF_TAX = 0x50, 0x10, 0x00, 0x00
_SKF_AD_NLATTR = -0x1000 + 12  # A = offset of attribute X at or after offset A (0: none)
_INSN = struct.Struct("=HBBI")
_ACCEPT_ALL = 0x40000  # bytes of the message to keep: all of it


def destroy_filter(mark: int) -> bytes:
    """The destroy-event socket's filter (classic BPF): a destroy event of a connection whose
    mark carries every bit of ``mark`` (nfgate's) passes whole, the kernel keeps the rest.

    The group carries the destroy event of every connection on the router; without
    the filter each woke the processor and was read and dropped in Python, and a
    storm of gateway-free connections could fill the socket's buffer (ENOBUFS, then a
    dump). Each event is a message of its own; CTA_MARK is found with the kernel's
    netlink helper (SKF_AD_NLATTR), wherever it is among the attributes, and a
    connection without a mark has none.
    """
    # The message type's low byte (the ctnetlink command), in host order.
    type_low = 4 if struct.pack("=H", 1)[0] == 1 else 5
    prog = [
        (_BPF_LD | _BPF_B | _BPF_ABS, 0, 0, type_low),
        (_BPF_JMP | _BPF_JEQ | _BPF_K, 0, 9, IPCTNL_MSG_CT_DELETE),  # else refuse (jumps count from the next)
        (_BPF_LD | _BPF_IMM, 0, 0, 16 + 4),  # after nlmsghdr and nfgenmsg
        (_BPF_LDX | _BPF_IMM, 0, 0, CTA_MARK),
        (_BPF_LD | _BPF_W | _BPF_ABS, 0, 0, _SKF_AD_NLATTR & 0xFFFFFFFF),
        (_BPF_JMP | _BPF_JEQ | _BPF_K, 5, 0, 0),  # no mark: refuse
        (_BPF_MISC | _BPF_TAX, 0, 0, 0),
        (_BPF_LD | _BPF_W | _BPF_IND, 0, 0, 4),  # the mark, network order
        (_BPF_ALU | _BPF_AND | _BPF_K, 0, 0, mark),
        (_BPF_JMP | _BPF_JEQ | _BPF_K, 0, 1, mark),  # accept, else refuse
        (_BPF_RET | _BPF_K, 0, 0, _ACCEPT_ALL),
        (_BPF_RET | _BPF_K, 0, 0, 0),
    ]
    return b"".join(_INSN.pack(*insn) for insn in prog)


def _attach(sock: socket.socket, prog: bytes) -> None:
    """SO_ATTACH_FILTER: a ``struct sock_fprog`` pointing at the instructions."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HL", len(prog) // _INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program


def _change(add: bool, name: str, elems: tuple[bytes, ...], destroy: bool = False) -> setelem.Change:
    """A change of set or map ``name`` of the binding tables (the IPv6 one's if it is there);
    a removal as a destroy if ``destroy``."""
    if bind.in_table6(name):
        return setelem.Change(add, setelem.NFPROTO_IPV6, bind.TABLE6, name, elems, destroy)
    return setelem.Change(add, setelem.NFPROTO_IPV4, bind.TABLE, name, elems, destroy)


@dataclass(frozen=True, slots=True)
class Connection:
    """One conntrack entry as the processor needs it."""

    proto: int
    orig: tuple[int, int, int, int]  # src, sport, dst, dport
    reply: tuple[int, int, int, int]
    counters: Counters = NO_COUNTERS  # each direction, with nf_conntrack_acct

    @property
    def packets(self) -> int:
        return self.counters.packets_up + self.counters.packets_down

    @property
    def bytes(self) -> int:
        return self.counters.bytes_up + self.counters.bytes_down


def _attrs(data: bytes, pos: int, end: int) -> dict[int, tuple[int, int]]:
    """The netlink attributes in data[pos:end]: type -> (start, end) of each payload."""
    out = {}
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        out[kind & NLA_TYPE_MASK] = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    return out


def _tuple(data: bytes, where: tuple[int, int] | None) -> tuple[int, tuple[int, int, int, int]] | None:
    """(proto, (src, sport, dst, dport)) of a CTA_TUPLE_* payload; None unless TCP/UDP over
    IPv4 or IPv6 (addresses as ints: an IPv6 flow's are above 2**32)."""
    if where is None:
        return None
    t = _attrs(data, *where)
    ip, pr = t.get(CTA_TUPLE_IP), t.get(CTA_TUPLE_PROTO)
    if ip is None or pr is None:
        return None
    a, p = _attrs(data, *ip), _attrs(data, *pr)
    src, dst = _value(data, a.get(CTA_IP_V4_SRC), _U32), _value(data, a.get(CTA_IP_V4_DST), _U32)
    if src is None and CTA_IP_V6_SRC in a:
        src, dst = _address6(data, a.get(CTA_IP_V6_SRC)), _address6(data, a.get(CTA_IP_V6_DST))
    num = _value(data, p.get(CTA_PROTO_NUM), _U8)
    if src is None or dst is None or num not in _PROTO:
        return None
    sport, dport = _value(data, p.get(CTA_PROTO_SRC_PORT), _U16), _value(data, p.get(CTA_PROTO_DST_PORT), _U16)
    return num, (src, sport or 0, dst, dport or 0)  # type: ignore[return-value]


def _address6(data: bytes, where: tuple[int, int] | None) -> int | None:
    if where is None or where[1] - where[0] < 16:
        return None
    return int.from_bytes(data[where[0]:where[0] + 16], "big")


def _value(data: bytes, where: tuple[int, int] | None, fmt: struct.Struct) -> int | None:
    """An attribute's integer payload; None if absent or too short."""
    if where is None or where[1] - where[0] < fmt.size:
        return None
    return fmt.unpack_from(data, where[0])[0]


def _counters(data: bytes, where: tuple[int, int] | None) -> list[int]:
    if where is None:
        return [0, 0]
    c = _attrs(data, *where)
    return [_value(data, c.get(k), _U64) or 0 for k in (CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES)]


def connection(data: bytes, off: int = 0, end: int | None = None) -> Connection | None:
    """One ctnetlink message (a destroy event or a dump's entry) in data[off:end] as a
    ``Connection``; None unless TCP/UDP over IPv4 or IPv6. Read with ``struct`` where the
    attributes are: pyroute2's decoder costs over ten times more (0.4 ms against
    0.03 ms in the lab router), and a relayed flow ends with two events."""
    top = _attrs(data, off + 16 + 4, len(data) if end is None else end)  # after nlmsghdr, nfgenmsg
    orig = _tuple(data, top.get(CTA_TUPLE_ORIG))
    reply = _tuple(data, top.get(CTA_TUPLE_REPLY))
    if orig is None or reply is None:
        return None
    values = _counters(data, top.get(CTA_COUNTERS_ORIG)) + _counters(data, top.get(CTA_COUNTERS_REPLY))
    return Connection(orig[0], orig[1], reply[1], Counters(*values))


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = 4 + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def ct_message(kind: int, flags: int, family: int, seq: int, body: bytes) -> bytes:
    """A ctnetlink request (NLM_F_REQUEST and ``flags``) of message type ``kind`` for ``family``."""
    data = _NFGEN.pack(family, 0, 0) + body
    return _NLMSG.pack(16 + len(data), NFNL_SUBSYS_CTNETLINK << 8 | kind, NLM_F_REQUEST | flags, seq, 0) + data


def tuple_request(kind: int, flags: int, seq: int, proto: int, src: int, sport: int, dst: int, dport: int) -> bytes:
    """A ctnetlink request (IPCTNL_MSG_CT_GET, _DELETE) for the connection with this original
    tuple, as pyroute2's ``nfct_msg`` encodes it (tests/firewall/test_processor_kernel.py
    checks the bytes), packed with ``struct``: pyroute2's encoder took 0.1 ms a request,
    and the processor asks one for each relayed connection's end. An address above 2**32
    is an IPv6 one."""
    if src > 0xFFFFFFFF or dst > 0xFFFFFFFF:
        family = socket.AF_INET6
        ip = nla(CTA_IP_V6_SRC, src.to_bytes(16, "big")) + nla(CTA_IP_V6_DST, dst.to_bytes(16, "big"))
    else:
        family = socket.AF_INET
        ip = nla(CTA_IP_V4_SRC, _U32.pack(src)) + nla(CTA_IP_V4_DST, _U32.pack(dst))
    ports = nla(CTA_PROTO_NUM, _U8.pack(proto)) + nla(CTA_PROTO_SRC_PORT, _U16.pack(sport)) + nla(CTA_PROTO_DST_PORT, _U16.pack(dport))
    return ct_message(kind, flags, family, seq, nla(CTA_TUPLE_ORIG, nla(CTA_TUPLE_IP, ip) + nla(CTA_TUPLE_PROTO, ports)))


def tcp_state(data: bytes) -> int | None:
    """The TCP state (CTA_PROTOINFO_TCP_STATE) of one ctnetlink message; None if it has none."""
    top = _attrs(data, 16 + 4, len(data))  # after nlmsghdr, nfgenmsg
    info = top.get(CTA_PROTOINFO)
    tcp = _attrs(data, *info).get(CTA_PROTOINFO_TCP) if info else None
    state = _attrs(data, *tcp).get(CTA_PROTOINFO_TCP_STATE) if tcp else None
    return data[state[0]] if state and state[1] > state[0] else None


def _mark_of(data: bytes, off: int, end: int) -> int | None:
    """CTA_MARK of one ctnetlink message, by walking its top-level attributes."""
    pos = off + 16 + 4  # nlmsghdr, nfgenmsg
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return None
        if kind & NLA_TYPE_MASK == CTA_MARK and length >= 8:
            return struct.unpack_from("!I", data, pos + 4)[0]
        pos += (length + 3) & ~3
    return None


class Conntrack:
    """Look-ups, filtered dumps and destroy events; ``mask``/``mark`` select nfgate's connections.

    Requests go out on a netlink socket of this class's own, not through
    pyroute2's synchronous socket API, which runs an event loop per call
    (about 0.5 ms a look-up, 9 ms an empty dump here), which the processor
    would pay once per ended flow and once a second. A look-up or delete is
    packed with ``struct`` (``tuple_request``: pyroute2's encoder alone took
    0.1 ms), a dump's request is encoded by pyroute2.
    """

    def __init__(self, mask: int, mark: int) -> None:
        self.mask = mask
        self.mark = mark
        self._req = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._req.bind((0, 0))
        self._req.settimeout(REQUEST_TIMEOUT)
        self._seq = 0
        self.events: socket.socket | None = None

    def open_events(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, EVENT_BUFFER)
            _attach(sock, destroy_filter(self.mark))  # before the group: no event slips past it
            sock.bind((0, 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)))
        except OSError as err:
            sock.close()
            raise KernelError(f"processor: cannot listen to conntrack events ({err})") from None
        sock.setblocking(False)
        self.events = sock
        return sock

    def _request(self, msg: Any, flags: int, kind: int = IPCTNL_MSG_CT_GET,
                 family: int = socket.AF_INET) -> Iterator[tuple[int, bytes]]:
        """Send one ctnetlink request built by pyroute2 (a GET unless ``kind`` says); yield
        (type, bytes) of each answer until it is done (``_answers``)."""
        self._seq += 1
        msg["header"]["type"] = NFNL_SUBSYS_CTNETLINK << 8 | kind
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = self._seq
        msg["nfgen_family"] = family
        msg.encode()
        self._req.send(msg.data)
        return self._answers(self._seq)

    def _tuple_request(self, kind: int, proto: int, src: int, sport: int, dst: int, dport: int) -> Iterator[tuple[int, bytes]]:
        """One request (with an ack) about the connection with this original tuple (``tuple_request``)."""
        self._seq += 1
        self._req.send(tuple_request(kind, NLM_F_ACK, self._seq, proto, src, sport, dst, dport))
        return self._answers(self._seq)

    def _answers(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, bytes) of each answer to request ``seq`` until it is done.

        A NLMSG_ERROR with code 0 (the ack) or NLMSG_DONE ends it; another
        error code ends it too, yielded as (NLMSG_ERROR, its 4-byte code).
        """
        for _ in range(REQUEST_MAX_READS):
            data = self._req.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, got_seq = struct.unpack_from("=IHHI", data, off)
                if length < 16:
                    return
                body = data[off:off + length]
                off += (length + 3) & ~3
                if got_seq != seq:
                    continue  # an answer to an earlier request that timed out
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    yield kind, body[16:20]
                    return
                yield kind, body
        raise KernelError("processor: conntrack did not finish answering a request")

    def delete(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool:
        """Delete the connection with this original tuple; False if there was none."""
        for kind, body in self._tuple_request(IPCTNL_MSG_CT_DELETE, proto, src, sport, dst, dport):
            if kind == NLMSG_ERROR:
                code = -struct.unpack("=i", body)[0]
                if code == errno.ENOENT:
                    return False
                if code:
                    raise KernelError(f"processor: conntrack delete failed ({os.strerror(code)})")
        return True

    def _get(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bytes | None:
        """Conntrack's answer about the connection with this original tuple; None if it has none."""
        found = None
        for kind, body in self._tuple_request(IPCTNL_MSG_CT_GET, proto, src, sport, dst, dport):
            if kind == NLMSG_ERROR:
                code = -struct.unpack("=i", body)[0]
                if code not in (0, errno.ENOENT):
                    raise KernelError(f"processor: conntrack look-up failed ({os.strerror(code)})")
            else:
                found = body
        return found

    def alive(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool:
        """Whether conntrack has a connection with this original tuple."""
        return self._get(proto, src, sport, dst, dport) is not None

    def closing(self, proto: int, src: int, sport: int, dst: int, dport: int) -> bool:
        """Whether conntrack has a TCP connection with this original tuple that is closing
        or closed (past ESTABLISHED: FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE)."""
        body = self._get(proto, src, sport, dst, dport)
        state = tcp_state(body) if body is not None else None
        return state is not None and state > TCP_CONNTRACK_ESTABLISHED

    def _dump(self, mark: int, mask: int, family: int = socket.AF_INET) -> Iterator[bytes]:
        msg = nfct_msg.create_from(mark=mark, mark_mask=mask)
        for kind, body in self._request(msg, NLM_F_DUMP, family=family):
            if kind == NLMSG_ERROR:
                code = -struct.unpack("=i", body)[0]
                if code:
                    raise KernelError(f"processor: conntrack dump failed ({os.strerror(code)})")
            else:
                yield body

    def ours(self, family: int = socket.AF_INET) -> Iterator[Connection]:
        """Every connection of ``family`` (the dump's, which the kernel filters by) with
        nfgate's mark (likewise): the ``rewritten`` bit, whatever else is set (an offloaded
        flow's connection also carries ``allowed``)."""
        for body in self._dump(self.mark, self.mark, family):
            conn = connection(body)
            if conn is not None:
                yield conn

    def reap(self, passed: int) -> None:
        """Make the kernel destroy expired connections now, so their events come.

        Conntrack removes an expired entry when a packet, its garbage
        collector (which in a quiet table runs up to a minute apart) or a
        dump comes across it; a dump evicts every expired entry it walks
        past, whatever its filter. The filter here (nfgate's two packet-mark
        bits at once, which no connection of nfgate's carries) keeps the
        answer empty: the kernel walks the table, Python reads almost nothing.
        """
        for _ in self._dump(self.mark | passed, self.mask):
            pass

    def destroyed(self) -> tuple[list[Connection], bool]:
        """Destroy events waiting on the socket: (ours, lost) where ``lost`` says
        the kernel dropped events (ENOBUFS): the caller must compare with a dump."""
        assert self.events is not None
        out: list[Connection] = []
        for _ in range(EVENT_READ_BATCH):
            try:
                data = self.events.recv(1 << 16)
            except BlockingIOError:
                return out, False
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    return out, True
                raise
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                end = off + length
                if kind & 0xFF == IPCTNL_MSG_CT_DELETE:
                    mark = _mark_of(data, off, end)
                    if mark is not None and mark & self.mark == self.mark:
                        conn = connection(data, off, end)
                        if conn is not None:
                            out.append(conn)
                off += (length + 3) & ~3
        return out, False

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self._req.close()


class Reaper:
    """``Conntrack.reap`` on a thread of its own, asked for by the processor's loop (``kick``).

    The reap's dump walks the whole conntrack table inside one socket call
    (all of the machine's namespaces share it): about 10 ms for the 262,144
    empty buckets here, 33 ms with 100k connections, growing about 0.23 µs
    a connection. On the loop's thread no packet was handled meanwhile; the
    call holds no GIL, so here the loop goes on. A kick while a reap runs
    asks for one more after it. Its own netlink socket: the loop's requests
    never read its answers.
    """

    def __init__(self, mask: int, mark: int, passed: int, counters: Counter[str],
                 on_error: Callable[[], None]) -> None:
        """``on_error`` is called inside the ``except`` of a failed reap (to count and log it)."""
        self._ct = Conntrack(mask, mark)
        self._passed = passed
        self._counters = counters
        self._on_error = on_error
        for name in ("conntrack.reaps", "conntrack.reap_error"):
            counters[name] += 0  # there before the thread counts: the loop may be iterating the counters
        self._want = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reap", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._want.set()

    def _run(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            if self._stopping:
                return
            try:
                self._ct.reap(self._passed)
            except Exception:  # noqa: BLE001 - bindings then end at the kernel's own pace
                self._on_error()
            else:
                self._counters["conntrack.reaps"] += 1

    def close(self, timeout: float = REQUEST_TIMEOUT + 1) -> None:
        """Stop the thread (after the reap it is in, if any) and close its socket."""
        self._stopping = True
        self._want.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._ct.close()


Listed = Callable[[list[Connection] | None, BaseException | None], None]


class Lister:
    """``Conntrack.ours`` on a thread of its own, for ``{"cmd": "flows"}`` (the
    connections' packet and byte counters).

    The dump walks the machine's whole conntrack table inside one socket
    call, as the reap's does (``Reaper``): 33 ms with 100k connections,
    about a quarter of a second with a million, during which the loop's
    thread handled no queued packet. An operator's ``nfgate flows`` (or a
    script asking every few seconds) must not stall new flows, so ``ask``
    returns at once and the list comes back through ``finish``, which the
    loop calls on its own thread; ``wake`` (from this thread) tells the loop
    to look. Its own netlink socket, as the reaper's.

    Asks of one family while a dump of it waits to start share that dump:
    however fast clients ask (or give up and ask again), at most one dump
    per family runs and one more waits.
    """

    def __init__(self, mask: int, mark: int, wake: Callable[[], None]) -> None:
        self._ct = Conntrack(mask, mark)
        self._wake = wake
        self._lock = threading.Lock()
        self._waiting: dict[int, list[Listed]] = {}  # family -> who asked since its last dump began
        self._jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._done: deque[tuple[Listed, list[Connection] | None, BaseException | None]] = deque()
        self.dumps = 0  # dumps begun
        self._thread = threading.Thread(target=self._run, name="conntrack-list", daemon=True)
        self._thread.start()

    def ask(self, family: int, then: Listed) -> None:
        """List nfgate's connections of ``family``; ``then(connections, None)`` or
        ``then(None, error)`` is called from ``finish``."""
        with self._lock:
            asked = self._waiting.setdefault(family, [])
            asked.append(then)
            if len(asked) > 1:
                return  # its dump is queued already
        self._jobs.put(family)

    def finish(self) -> None:
        """On the loop's thread: hand over what has been listed."""
        while self._done:
            then, connections, error = self._done.popleft()
            then(connections, error)

    def _run(self) -> None:
        while True:
            family = self._jobs.get()
            if family is None:
                return
            with self._lock:
                asked = self._waiting.pop(family, [])  # who asks from now on gets the next dump
            self.dumps += 1
            try:
                listed: tuple[list[Connection] | None, BaseException | None] = (list(self._ct.ours(family)), None)
            except Exception as err:  # noqa: BLE001 - the askers' to report
                listed = (None, err)
            self._done.extend((then, *listed) for then in asked)
            self._wake()

    def close(self, timeout: float = REQUEST_TIMEOUT + 1) -> None:
        """Stop the thread (after the dump it is in, if any) and close its socket."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._ct.close()


def queue_counters(queue: int) -> dict[str, int]:
    """The kernel's counters for one queue: packets it dropped because the queue
    was full (``queue_dropped``) or our socket's buffer was (``user_dropped``)."""
    try:
        lines = QUEUE_PROC.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        f = line.split()
        if len(f) >= 7 and f[0] == str(queue):
            return {"queue.kernel.waiting": int(f[2]), "queue.kernel.dropped_full": int(f[5]), "queue.kernel.dropped_buffer": int(f[6])}
    return {}
