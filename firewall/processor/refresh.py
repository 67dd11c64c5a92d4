"""A pair's master keeps the backup's copies of nfgate's UDP connections alive (docs/ha.md, "UDP refresh").

Why: conntrackd copies a connection when conntrack reports an event about
it. A packet that only pushes a UDP entry's timeout on makes no event, so
the backup's copy of a live UDP flow (RTP: one-way, so never "replied")
times out ``nf_conntrack_udp_timeout`` (30 s) after the last event it
copied, while the master's entry lives on. A failover after that finds no
copy, the new master binds the next datagram as a new flow, and the rtp
gateway refuses it (the stream has its RTP flow already).

What: every ``ha.udp_refresh`` seconds, while its node is master, the
node's first processor lists nfgate's UDP connections (those a processor
bound, and those a dynamic rule let the kernel carry: the ``rewritten`` and
the ``allowed`` conntrack mark; a dump the kernel filters by mark and
protocol), or with ``ha.udp_refresh_all`` every UDP connection, and writes
each one's own timeout back to it: a ctnetlink
IPCTNL_MSG_CT_NEW *without* NLM_F_CREATE, so an update. The kernel reports
an update event, with the timeout, and conntrackd sends it to the backup,
whose copy then expires when the master's would. The value written is what
the master's kernel holds (what the flow's last packet gave it, less the
time since), so an idle flow still ends on time on both nodes, a little
sooner if anything (the kernel reports whole seconds, rounded down). An
entry destroyed between the dump and its update is not made again: the
kernel answers ENOENT, counted as ``refresh.gone``.

How much at once: the dump is read one ``recv`` (one kernel chunk, about
a hundred entries) per wake-up of the processor's loop, and that chunk's
updates go out in one ``send``; the queue's packets are served between
chunks. Every request here is built and read with ``struct``: the update
reuses the dump's own CTA_TUPLE_ORIG (and CTA_ZONE) attribute bytes.

``Refresher`` is the socket side, ``Schedule`` says when a pass starts;
``update_for`` and ``dump_request`` are the pure message work, tested on
crafted bytes.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Iterator

from pyroute2.netlink import NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR

from firewall.processor.kernel import NETLINK_NETFILTER, _attrs, ct_message, nla

IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
CTA_TUPLE_ORIG, CTA_TIMEOUT, CTA_MARK, CTA_ZONE, CTA_MARK_MASK, CTA_FILTER = 1, 7, 8, 18, 21, 25
CTA_TUPLE_PROTO, CTA_PROTO_NUM = 2, 1
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
CTA_FILTER_F_CTA_PROTO_NUM = 1 << 3
NLA_F_NESTED = 0x8000
UDP = 17
_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_BE32 = struct.Struct("!I")
UDP_TIMEOUT_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout")
SOCKET_BUFFER = 4 << 20  # bytes each way: one chunk's updates, and the error answers to them
READS_PER_WAKE = 1  # dump chunks read per wake-up of the loop (about a hundred entries each)
ERROR_READS = 64  # error answers drained per wake-up at most


def dump_request(family: int, mark: int, mask: int, seq: int) -> bytes:
    """A dump of the UDP connections of ``family`` whose mark & ``mask`` == ``mark``, filtered
    in the kernel (CTA_MARK/CTA_MARK_MASK, and CTA_FILTER on the original tuple's protocol)."""
    proto = nla(CTA_TUPLE_ORIG | NLA_F_NESTED, nla(CTA_TUPLE_PROTO | NLA_F_NESTED, nla(CTA_PROTO_NUM, bytes([UDP]))))
    only_udp = nla(CTA_FILTER | NLA_F_NESTED, nla(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", CTA_FILTER_F_CTA_PROTO_NUM))
                    + nla(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", 0)))
    body = nla(CTA_MARK, _BE32.pack(mark)) + nla(CTA_MARK_MASK, _BE32.pack(mask)) + proto + only_udp
    return ct_message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, family, seq, body)


def _proto(data: bytes, where: tuple[int, int]) -> int | None:
    pr = _attrs(data, *where).get(CTA_TUPLE_PROTO)
    if pr is None:
        return None
    num = _attrs(data, *pr).get(CTA_PROTO_NUM)
    return data[num[0]] if num is not None and num[1] > num[0] else None


def update_for(data: bytes, off: int, end: int, seq: int) -> bytes | None:
    """The update that writes one dumped connection's own timeout back to it: its family,
    original tuple and zone as dumped, CTA_TIMEOUT, no NLM_F_CREATE (so an entry gone meanwhile
    is not made again) and no NLM_F_ACK (the kernel answers only a failure). None unless it is a
    UDP connection with a timeout."""
    top = _attrs(data, off + 20, end)  # after nlmsghdr and nfgenmsg
    orig, timeout = top.get(CTA_TUPLE_ORIG), top.get(CTA_TIMEOUT)
    if orig is None or timeout is None or timeout[1] - timeout[0] < 4 or _proto(data, orig) != UDP:
        return None
    seconds = _BE32.unpack_from(data, timeout[0])[0]
    if seconds == 0:
        return None  # expiring now: let it
    body = data[orig[0] - 4:orig[1]] + b"\0" * (-(orig[1] - orig[0]) % 4)
    zone = top.get(CTA_ZONE)
    if zone is not None:
        body += data[zone[0] - 4:zone[1]] + b"\0" * (-(zone[1] - zone[0]) % 4)
    return ct_message(IPCTNL_MSG_CT_NEW, 0, data[off + 16], seq, body + nla(CTA_TIMEOUT, _BE32.pack(seconds)))


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, seq, start, end) of each netlink message in one datagram."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, off)
        if length < 16 or off + length > len(data):
            return
        yield kind, seq, off, off + length
        off += (length + 3) & ~3


def selection(rewritten: int, allowed: int, every_udp: bool) -> list[tuple[int, int]]:
    """The (mark, mask) of each dump of a pass: the flows a processor bound (``rewritten``), then
    those a dynamic rule let the kernel carry alone (``allowed`` without ``rewritten``, so an
    offloaded flow, which has both, is listed once); with ``ha.udp_refresh_all``, every UDP
    connection (mask 0)."""
    if every_udp:
        return [(0, 0)]
    return [(rewritten, rewritten), (allowed, allowed | rewritten)]


def interval(setting: float, udp_timeout: int | None) -> float:
    """The refresh interval to use: ``ha.udp_refresh``, but at most a third of the kernel's
    timeout of an unreplied UDP flow (else a copy could expire between two refreshes)."""
    if setting <= 0 or udp_timeout is None:
        return setting
    return min(setting, max(1.0, udp_timeout / 3))


def udp_timeout() -> int | None:
    """``nf_conntrack_udp_timeout`` of this network namespace, None if unreadable."""
    try:
        return int(UDP_TIMEOUT_SYSCTL.read_text())
    except (OSError, ValueError):
        return None


class Schedule:
    """When a pass starts: as soon as the node is master, then every ``every`` seconds while it
    stays master; a pass under way stops as soon as it is not (a backup's refresh would only copy
    its own entries back to the master)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._next = 0.0

    def decide(self, now: float, master: bool) -> bool | None:
        """True: begin a pass; False: stop any pass under way; None: nothing to do."""
        if not master:
            self._next = now
            return False
        if now < self._next:
            return None
        self._next = now + self.every
        return True


class Refresher:
    """The dumps and updates of one pass, on two netlink sockets of its own: the loop polls
    ``sock`` (the dump's answers) and calls ``step``; ``begin`` starts a pass."""

    def __init__(self, marks: list[tuple[int, int]], counters: Counter[str],
                 families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)) -> None:
        # (family, mark, mask) per dump of a pass, in order.
        self._dumps = [(f, m, k) for f in families for m, k in marks]
        self.sock = self._open()
        self._upd = self._open()
        self._seq = 0
        self._at: int | None = None  # index in _dumps of the dump being read; None between passes
        self._halted = False  # the pass was stopped: its dump is read to its end, nothing updated
        self.counters = counters

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        for opt in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE: root may exceed the [rw]mem_max
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.setblocking(False)
        return sock

    @property
    def busy(self) -> bool:
        return self._at is not None

    def begin(self) -> bool:
        """Start a pass (the first dump); False if one is still under way."""
        if self._at is not None:
            return False
        self.counters["refresh.passes"] += 1
        self._halted = False
        self._start(0)
        return True

    def stop(self) -> None:
        """Update nothing more in the pass under way (the node stepped back). Its dump is read
        to its end all the same: a netlink socket takes no new dump while one runs."""
        if self._at is not None:
            self._halted = True

    def _start(self, at: int) -> None:
        if at >= len(self._dumps) or self._halted:
            self._at = None
            return
        self._at = at
        self._seq += 1
        family, mark, mask = self._dumps[at]
        try:
            self.sock.send(dump_request(family, mark, mask, self._seq))
        except OSError:
            self.counters["refresh.error.dump_request"] += 1
            self._start(at + 1)

    def step(self) -> None:
        """Read one chunk of the dump under way, send its updates in one go, read the kernel's
        answers to earlier updates; start the next dump when this one is done."""
        self.answers()
        for _ in range(READS_PER_WAKE):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as err:
                # ENOBUFS: the kernel dropped part of the dump (it cannot, read a chunk at a time).
                self.counters[f"refresh.error.{errno.errorcode.get(err.errno, err.errno)}"] += 1
                if self._at is not None:
                    self._start(self._at + 1)
                return
            updates = []
            for kind, seq, start, end in messages(data):
                if self._at is None or seq != self._seq:
                    continue  # an answer to a dump given up on
                if kind == NLMSG_DONE or kind == NLMSG_ERROR:
                    if kind == NLMSG_ERROR and struct.unpack_from("=i", data, start + 16)[0]:
                        self.counters["refresh.error.dump"] += 1
                    self._start(self._at + 1)
                    break
                self.counters["refresh.listed"] += 1
                update = None if self._halted else update_for(data, start, end, self._seq)
                if update is not None:
                    updates.append(update)
            if updates:
                try:
                    self._upd.send(b"".join(updates))  # the kernel carries each one out in this call
                    self.counters["refresh.updated"] += len(updates)
                except OSError:
                    self.counters["refresh.error.send"] += 1

    def answers(self) -> None:
        """The kernel's answers to updates: only failures come (no NLM_F_ACK)."""
        for _ in range(ERROR_READS):
            try:
                data = self._upd.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                self.counters["refresh.error.answers_lost"] += 1
                return
            for kind, _, start, _ in messages(data):
                if kind != NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", data, start + 16)[0]
                if code == errno.ENOENT:
                    self.counters["refresh.gone"] += 1  # destroyed since the dump: not made again
                elif code:
                    self.counters[f"refresh.error.{errno.errorcode.get(code, code)}"] += 1

    def close(self) -> None:
        self.sock.close()
        self._upd.close()


