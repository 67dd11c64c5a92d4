"""nf_tables set and map elements written with netlink messages of our own: the per-flow path.

Every relayed connection costs the processor one transaction of four
binding elements (``firewall.rules.bind``: leg A's dnat and snat, leg B's
ahead), and a dynamic rule one of its elements. libnftables took 0.21 ms
of CPU for such a transaction (docs/benchmarks.md, "Binding elements over
netlink"), most of it outside the one batch that matters: before each
command it refreshes its cache (about 7 requests and 12 reads listing the
tables and sets), then parses the command. So this module sends what nft
sends, and nothing else:

- one ``sendmsg``: NFNL_MSG_BATCH_BEGIN, one NFT_MSG_NEWSETELEM (or
  NFT_MSG_DELSETELEM) per set, NFNL_MSG_BATCH_END. The kernel applies the
  batch whole or not at all;
- no ack asked, like nft: nfnetlink runs the batch inside ``sendmsg`` and
  queues an error for each refused message before it returns, so one
  non-blocking read right after finds them all, or nothing (done);
- the flags are nft's ``add element`` (NLM_F_CREATE, without NLM_F_EXCL):
  a key that is there with the same value is no error, with another value
  it is EEXIST; a delete of a key that is not there is ENOENT, a destroy
  (NFT_MSG_DESTROYSETELEM, Linux 6.3 and later) of one is no error.

The encoding. pyroute2's message classes (``nft_set_elem_list_msg``)
encode a binding's four elements in about 0.36 ms, more than libnftables'
whole cost, so pyroute2 encodes only the part of a message that does not
change, once per set (``_Head``: the nfgenmsg, the table's and the set's
names), and each element is packed with ``struct`` as nft packs it (the
bytes are checked against nft's own in
tests/firewall/test_processor_setelem.py)::

    NFTA_LIST_ELEM (nested)
      NFTA_SET_ELEM_TIMEOUT   be64 milliseconds   (sets with ``flags timeout``)
      NFTA_SET_ELEM_KEY (nested)
        NFTA_DATA_VALUE       the concatenation, each field in a 4-byte register
      NFTA_SET_ELEM_DATA (nested)                 (maps)
        NFTA_DATA_VALUE       address . port, likewise

A key is ``inet_proto . addr . inet_service . addr . inet_service`` (an
exact tuple), or ``inet_proto . addr . addr . inet_service`` (leg B's
ahead, a dynamic rule's any-port key): the protocol number in the first
byte of its register, a port big-endian in the first two bytes of its.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an error carries the refused message's header only, not its elements
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFT_MSG_DESTROYSETELEM = 30  # a delete that finds nothing is no error (Linux 6.3+)
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_TIMEOUT = 1, 2, 4
NFTA_DATA_VALUE = 1
PROTO_NUMBER = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
READ_BUFFER = 1 << 16
SEND_BUFFER_MARGIN = 2  # a batch larger than the socket's send buffer raises it to this many times its size

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_NLA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_BE64 = struct.Struct("!Q")
_BATCH_BODY = struct.pack("!BBH", 0, 0, NFNL_SUBSYS_NFTABLES)  # nfgenmsg: res_id is the subsystem
_EXACT4 = struct.Struct("!B3xIH2xIH2x")
_ANY4 = struct.Struct("!B3xIIH2x")
_EXACT6 = struct.Struct("!B3x16sH2x16sH2x")
_ANY6 = struct.Struct("!B3x16s16sH2x")
_VALUE4 = struct.Struct("!IH2x")
_VALUE6 = struct.Struct("!16sH2x")
_TIMEOUT_NLA = _NLA.pack(12, NFTA_SET_ELEM_TIMEOUT)


def key_bytes(proto: str, key: tuple[int, ...], six: bool) -> bytes:
    """NFTA_DATA_VALUE of a key: (src, sport, dst, dport), or (src, dst, dport), addresses as ints."""
    p = PROTO_NUMBER[proto]
    if six:
        if len(key) == 4:
            return _EXACT6.pack(p, key[0].to_bytes(16, "big"), key[1], key[2].to_bytes(16, "big"), key[3])
        return _ANY6.pack(p, key[0].to_bytes(16, "big"), key[1].to_bytes(16, "big"), key[2])
    if len(key) == 4:
        return _EXACT4.pack(p, *key)
    return _ANY4.pack(p, *key)


def value_bytes(value: tuple[int, int], six: bool) -> bytes:
    """NFTA_DATA_VALUE of a NAT map's value: (address, port)."""
    if six:
        return _VALUE6.pack(value[0].to_bytes(16, "big"), value[1])
    return _VALUE4.pack(*value)


def _data(kind: int, value: bytes) -> bytes:
    """A nested NFTA_SET_ELEM_KEY or _DATA holding one NFTA_DATA_VALUE (values are 4-byte multiples)."""
    return _NLA.pack(8 + len(value), NLA_F_NESTED | kind) + _NLA.pack(4 + len(value), NFTA_DATA_VALUE) + value


def element(key: bytes, value: bytes | None = None, timeout_ms: int | None = None) -> bytes:
    """One NFTA_LIST_ELEM, its attributes in nft's order: timeout, key, data."""
    body = _data(NFTA_SET_ELEM_KEY, key)
    if timeout_ms is not None:
        body = _TIMEOUT_NLA + _BE64.pack(timeout_ms) + body
    if value is not None:
        body += _data(NFTA_SET_ELEM_DATA, value)
    return _NLA.pack(4 + len(body), NLA_F_NESTED | NFTA_LIST_ELEM) + body


@dataclass(frozen=True, slots=True)
class Change:
    """One message of a transaction: add (or delete) ``elements`` in set or map ``name``."""

    add: bool
    family: int  # NFPROTO_IPV4 or NFPROTO_IPV6
    table: str
    name: str
    elements: tuple[bytes, ...]
    destroy: bool = False  # a removal as NFT_MSG_DESTROYSETELEM: what is not there is no error


class _Head:
    """The unchanging part of a set's messages, after the nlmsghdr, encoded by pyroute2 once:
    the nfgenmsg (the family) and the table's and the set's names."""

    cache: dict[tuple[int, str, str], bytes] = {}

    @classmethod
    def of(cls, family: int, table: str, name: str) -> bytes:
        key = (family, table, name)
        head = cls.cache.get(key)
        if head is None:
            msg = nft_set_elem_list_msg()
            msg["nfgen_family"] = family
            msg["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", table), ("NFTA_SET_ELEM_LIST_SET", name)]
            msg.encode()
            head = cls.cache[key] = bytes(msg.data[_HDR.size:])
        return head


def message(change: Change, seq: int) -> bytes:
    """One NFT_MSG_NEWSETELEM (or _DELSETELEM, _DESTROYSETELEM) with sequence number ``seq``."""
    elems = b"".join(change.elements)
    head = _Head.of(change.family, change.table, change.name)
    size = _HDR.size + len(head) + _NLA.size + len(elems)
    if change.add:
        kind, flags = NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE
    else:
        kind, flags = (NFT_MSG_DESTROYSETELEM if change.destroy else NFT_MSG_DELSETELEM), NLM_F_REQUEST
    return b"".join((_HDR.pack(size, NFNL_SUBSYS_NFTABLES << 8 | kind, flags, seq, 0), head,
                     _NLA.pack(_NLA.size + len(elems), NLA_F_NESTED | NFTA_SET_ELEM_LIST_ELEMENTS), elems))


def batch(changes: list[Change], seq: int) -> bytes:
    """BATCH_BEGIN (``seq``), the changes (``seq`` + 1 ...), BATCH_END: one transaction."""
    parts = [_HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0), _BATCH_BODY]
    for i, change in enumerate(changes, 1):
        parts.append(message(change, (seq + i) & 0xFFFFFFFF))
    end = (seq + len(changes) + 1) & 0xFFFFFFFF
    parts += [_HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0), _BATCH_BODY]
    return b"".join(parts)


class ElementSocket:
    """Transactions of element changes on a netlink socket of its own."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setblocking(False)
        self._sock = sock
        self._sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._buf = bytearray(READ_BUFFER)
        self._seq = 0

    def commit(self, changes: list[Change]) -> list[int]:
        """Apply ``changes`` in one transaction; the errno of each (0: no error of its own).

        The kernel refuses the whole if any is refused: then at least one code is
        not 0. A failed send counts as every change's error.
        """
        if not changes:
            return []
        seq = self._seq = (self._seq + len(changes) + 2) & 0xFFFFFFFF
        data = batch(changes, seq)
        codes = [0] * len(changes)
        try:
            if len(data) > self._sndbuf // SEND_BUFFER_MARGIN:
                self._grow(len(data))
            self._sock.send(data)
        except OSError as err:
            return [err.errno or errno.EIO] * len(changes)
        for at, code in self._errors():
            index = len(changes) if at is None else (at - seq - 1) & 0xFFFFFFFF
            if index < len(changes):
                codes[index] = code
            else:
                # The batch's own BEGIN or END refused, or errors lost: all failed.
                codes = [c or code for c in codes]
        return codes

    def _grow(self, size: int) -> None:
        """A batch larger than the send buffer: raise it, as nft does (SO_SNDBUFFORCE)."""
        want = size * SEND_BUFFER_MARGIN
        self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), want)
        self._sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def _errors(self) -> list[tuple[int | None, int]]:
        """(sequence number, errno) of each error the kernel queued, until none is left;
        (None, ENOBUFS) if some were lost."""
        out: list[tuple[int | None, int]] = []
        buf, view = self._buf, memoryview(self._buf)
        while True:
            try:
                n = self._sock.recv_into(buf)
            except BlockingIOError:
                return out
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    # Errors were lost: which change failed is unknown, so all did.
                    out.append((None, errno.ENOBUFS))
                    continue
                raise
            off = 0
            while off + _HDR.size <= n:
                length, kind, _, seq, _ = _HDR.unpack_from(view, off)
                if length < _HDR.size:
                    break
                if kind == NLMSG_ERROR and length >= _HDR.size + _ERR.size:
                    code = -_ERR.unpack_from(view, off + _HDR.size)[0]
                    if code:
                        out.append((seq, code))
                off += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
