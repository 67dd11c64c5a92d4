"""firewall.processor.kernel: ctnetlink messages read with ``struct``, checked against pyroute2's encoder.

The processor reads every destroy event and dump entry of nfgate's
connections itself (``connection``); pyroute2's ctnetlink classes build the
messages here, as the kernel would send them, so the two must agree. The
destroy-event socket's BPF filter (``destroy_filter``) runs in this
kernel on the same messages sent through a datagram socket pair, and in a
netns on conntrack's own events.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from firewall.config.model import Marks
from firewall.lab.topology import parse_topology
from firewall.processor.kernel import Connection, _attach, _mark_of, connection, destroy_filter, tcp_state, tuple_request
from firewall.signalling import Counters


def message(proto: int, orig: tuple[str, int, str, int], reply: tuple[str, int, str, int], *,
            mark: int | None = None, counters: tuple[int, int, int, int] | None = None, family: int = socket.AF_INET) -> bytes:
    def tup(t: tuple[str, int, str, int]) -> NFCTAttrTuple:
        return NFCTAttrTuple(family=family, saddr=t[0], daddr=t[2], proto=proto, sport=t[1], dport=t[3])

    fields: dict[str, Any] = {"tuple_orig": tup(orig), "tuple_reply": tup(reply)}
    if mark is not None:
        fields["mark"] = mark
    if counters is not None:
        fields["counters_orig"] = {"attrs": [["CTA_COUNTERS_PACKETS", counters[0]], ["CTA_COUNTERS_BYTES", counters[1]]]}
        fields["counters_reply"] = {"attrs": [["CTA_COUNTERS_PACKETS", counters[2]], ["CTA_COUNTERS_BYTES", counters[3]]]}
    msg = nfct_msg.create_from(**fields)
    msg["header"]["type"] = 1 << 8 | 2  # ctnetlink, IPCTNL_MSG_CT_DELETE: a destroy event
    msg["nfgen_family"] = family
    msg.encode()
    return bytes(msg.data)


def ints(t: tuple[str, int, str, int]) -> tuple[int, int, int, int]:
    return int(ipaddress.IPv4Address(t[0])), t[1], int(ipaddress.IPv4Address(t[2])), t[3]


C, W, G, F = "203.0.113.10", "203.0.113.1", "172.31.255.2", "172.31.254.0"


def test_a_destroy_event_reads_as_its_connection_with_counters_and_mark() -> None:
    orig, reply = (C, 40000, W, 8443), (G, 20000, F, 1024)
    data = message(6, orig, reply, mark=0x00010007, counters=(10, 600, 20, 1_050_000))
    assert connection(data) == Connection(6, ints(orig), ints(reply), Counters(10, 600, 20, 1_050_000))
    assert _mark_of(data, 0, len(data)) == 0x00010007
    # Without accounting (nf_conntrack_acct = 0) there are no counters: zeros.
    assert connection(message(17, orig, reply)) == Connection(17, ints(orig), ints(reply), Counters(0, 0, 0, 0))


def test_an_ipv6_destroy_event_reads_with_128_bit_addresses() -> None:
    """An IPv6 gateway flow's leg (issue 17): the same decoder, addresses above 2**32."""
    c6, g6, f6 = "2001:db8:2::10", "fd6e:6667:6174:ff::2", "fd6e:6667:6174:fe::"
    orig, reply = (c6, 40000, "fd00:1::10", 9000), (g6, 20000, f6, 1024)
    data = message(6, orig, reply, mark=0x00010000, family=socket.AF_INET6)
    i6 = lambda t: (int(ipaddress.IPv6Address(t[0])), t[1], int(ipaddress.IPv6Address(t[2])), t[3])  # noqa: E731
    assert connection(data) == Connection(6, i6(orig), i6(reply), Counters(0, 0, 0, 0))


def test_a_message_inside_a_buffer_is_read_between_its_bounds() -> None:
    first = message(6, (C, 1, W, 2), (W, 2, C, 1))
    second = message(17, (C, 3, W, 4), (W, 4, C, 3), counters=(1, 2, 3, 4))
    pad = b"\0" * (-len(first) % 4)
    data = first + pad + second
    start = len(first) + len(pad)
    assert connection(data, start, len(data)) == Connection(17, ints((C, 3, W, 4)), ints((W, 4, C, 3)), Counters(1, 2, 3, 4))
    assert connection(data, 0, len(first)).proto == 6  # type: ignore[union-attr]


@pytest.mark.parametrize("proto", [1, 132])  # ICMP, SCTP: not the processor's
def test_other_protocols_are_not_connections(proto: int) -> None:
    assert connection(message(proto, (C, 0, W, 0), (W, 0, C, 0))) is None


def test_truncated_or_empty_messages_are_not_connections() -> None:
    data = message(6, (C, 40000, W, 8443), (W, 8443, C, 40000))
    for cut in (0, 16, 20, 24, len(data) // 2, len(data) - 1):
        assert connection(data[:cut], 0, cut) is None, cut
    assert connection(data, 0, len(data)) is not None


@given(st.binary(max_size=200), st.data())
def test_no_bytes_make_it_raise(data: bytes, draw: Any) -> None:
    """Garbage, and a real message cut or with bytes flipped: a Connection or None, never an exception."""
    connection(data, 0, len(data))  # raises nothing
    real = bytearray(message(6, (C, 40000, W, 8443), (W, 8443, C, 40000), counters=(1, 2, 3, 4)))
    for _ in range(draw.draw(st.integers(0, 8))):
        real[draw.draw(st.integers(0, len(real) - 1))] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(real)))
    got = connection(bytes(real[:cut]), 0, cut)
    assert got is None or isinstance(got, Connection)


# -- the destroy-event socket's filter ------------------------------------------------------------

MARKS = Marks()


def passes(prog: bytes, data: bytes) -> bool:
    """Whether ``data`` gets through ``prog`` attached to the receiving end of a datagram pair:
    the kernel runs the filter on the datagram as it would on a netlink event."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        _attach(b, prog)
        b.setblocking(False)
        a.send(data)
        try:
            return b.recv(1 << 16) == data
        except BlockingIOError:
            return False


@pytest.mark.parametrize("mark, kind, passed", [
    (MARKS.rewritten, 2, True),
    (MARKS.rewritten | MARKS.allowed | 0x01000005, 2, True),  # other bits do not matter
    (MARKS.rewritten, 0, False),  # a new event, not a destroy
    (MARKS.passed, 2, False),
    (MARKS.allowed, 2, False),
    (0x01000000, 2, False),
    (None, 2, False),  # a connection without a mark: the kernel sends no CTA_MARK
])
def test_the_filter_passes_the_destroy_events_of_nfgates_connections_only(mark: int | None, kind: int, passed: bool) -> None:
    data = bytearray(message(6, (C, 40000, W, 443), (G, 20000, F, 30000), mark=mark, counters=(1, 2, 3, 4)))
    data[4] = kind  # the message type's low byte (host order): the ctnetlink command
    assert passes(destroy_filter(MARKS.rewritten), bytes(data)) is passed


@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_the_filter_agrees_with_the_python_check(mark: int, six: bool, counters: bool) -> None:
    """Whatever the mark and wherever CTA_MARK falls (IPv6 tuples, counters before or not),
    the kernel's filter and ``destroyed``'s own check take the same events."""
    if six:
        data = message(17, ("2001:db8::1", 5000, "2001:db8::2", 53), ("2001:db8::2", 53, "2001:db8::1", 5000),
                       mark=mark, counters=(1, 2, 3, 4) if counters else None, family=socket.AF_INET6)
    else:
        data = message(6, (C, 40000, W, 443), (G, 20000, F, 30000), mark=mark, counters=(1, 2, 3, 4) if counters else None)
    ours = mark & MARKS.rewritten == MARKS.rewritten
    assert _mark_of(data, 0, len(data)) == mark
    assert passes(destroy_filter(MARKS.rewritten), data) is ours


ONE_HOST = parse_topology({"name": "one", "router": "router", "hosts": {"router": {}}, "links": []})

# Runs in the router: four conntrack entries, nfgate's mark on two, all flushed; the events that
# reach the processor's socket, and those a socket without the filter sees.
EVENTS = r"""
import json, socket, subprocess
from firewall.config.model import Marks
from firewall.processor.kernel import Conntrack, connection

m = Marks()
ours = Conntrack(m.mask, m.rewritten).open_events()
plain = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
plain.bind((0, 1 << 2))  # the destroy group, unfiltered
plain.setblocking(False)
for src, mark in (("10.0.0.1", m.rewritten), ("10.0.0.2", 0), ("10.0.0.3", m.rewritten | m.allowed), ("10.0.0.4", m.passed)):
    subprocess.run(["conntrack", "-I", "-p", "tcp", "-s", src, "-d", "10.9.9.9", "--sport", "1000", "--dport", "80",
                    "--state", "ESTABLISHED", "-t", "100", "-u", "SEEN_REPLY", "--mark", str(mark)], check=True, capture_output=True)
subprocess.run(["conntrack", "-F"], check=True, capture_output=True)  # the events are queued when it returns

def sources(sock):
    out = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        out.append(str(connection(data).orig[0]))

print(json.dumps({"plain": sources(plain), "ours": sources(ours)}))
"""


@pytest.mark.netns
def test_conntrack_s_destroy_events_reach_the_processor_for_nfgate_s_connections_only(lab_factory: Any) -> None:
    lab = lab_factory(ONE_HOST)
    got = json.loads(lab.run("router", [sys.executable, "-c", EVENTS], cwd=Path(__file__).parents[2]).stdout)
    ip = {str(int(ipaddress.IPv4Address(f"10.0.0.{i}"))): i for i in range(1, 5)}
    assert sorted(ip[a] for a in got["plain"]) == [1, 2, 3, 4]  # all four ended, each with its event
    assert sorted(ip[a] for a in got["ours"]) == [1, 3]


@pytest.mark.parametrize("state", [None, 1, 3, 4, 7, 8])
def test_a_connection_s_tcp_state_is_read_from_its_protoinfo(state: int | None) -> None:
    msg = nfct_msg.create_from(tuple_orig=NFCTAttrTuple(saddr=G, daddr=F, proto=6, sport=51000, dport=1024))
    if state is not None:
        msg["attrs"].append(("CTA_PROTOINFO", {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [
            ("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL", 7), ("CTA_PROTOINFO_TCP_STATE", state)]})]}))
    msg["header"]["type"] = 1 << 8
    msg["nfgen_family"] = socket.AF_INET
    msg.encode()
    assert tcp_state(bytes(msg.data)) == state


def _pyroute2_request(kind: int, seq: int, proto: int, src: int, sport: int, dst: int, dport: int) -> bytes:
    six = src > 0xFFFFFFFF or dst > 0xFFFFFFFF
    family = socket.AF_INET6 if six else socket.AF_INET
    ip = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    tup = NFCTAttrTuple(family=family, saddr=str(ip(src)), daddr=str(ip(dst)), proto=proto, sport=sport, dport=dport)
    msg = nfct_msg.create_from(tuple_orig=tup)
    msg["header"]["type"] = 1 << 8 | kind
    msg["header"]["flags"] = 1 | 4  # NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = family
    msg.encode()
    return bytes(msg.data)


@given(kind=st.sampled_from([1, 2]), seq=st.integers(0, 2**32 - 1), proto=st.sampled_from([6, 17]),
       six=st.booleans(), src=st.integers(0, 2**128 - 1), dst=st.integers(0, 2**128 - 1),
       sport=st.integers(0, 65535), dport=st.integers(0, 65535))
def test_a_tuple_request_is_the_bytes_pyroute2_encodes(kind: int, seq: int, proto: int, six: bool, src: int,
                                                      dst: int, sport: int, dport: int) -> None:
    if six:
        src, dst = src | 1 << 127, dst | 1 << 127  # above 2**32: IPv6
    else:
        src, dst = src & 0xFFFFFFFF, dst & 0xFFFFFFFF
    assert tuple_request(kind, 4, seq, proto, src, sport, dst, dport) == _pyroute2_request(kind, seq, proto, src, sport, dst, dport)


class BlockingReap:
    """A conntrack whose reap waits until released, as the kernel's walk of a large table does."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.threads: list[str] = []
        self.closed = False

    def reap(self, passed: int) -> None:
        import threading

        self.threads.append(threading.current_thread().name)
        self.entered.release()
        assert self.release.acquire(timeout=5)
        if len(self.threads) == 3:
            raise OSError("ENOBUFS")

    def close(self) -> None:
        self.closed = True


def test_the_reap_runs_on_its_own_thread_and_a_kick_meanwhile_asks_for_one_more() -> None:
    """The processor's loop only kicks: the table's walk (tens of ms or more) never blocks it."""
    from collections import Counter

    from firewall.processor.kernel import Reaper

    counters: Counter[str] = Counter()
    errors: list[str] = []

    def on_error() -> None:
        import sys

        counters["conntrack.reap_error"] += 1
        errors.append(repr(sys.exc_info()[1]))

    reaper = Reaper(0xFFFF0000, 0x10000, 0x20000, counters, on_error)
    fake = BlockingReap()
    reaper._ct.close()
    reaper._ct = fake  # type: ignore[assignment]
    assert counters == {"conntrack.reaps": 0, "conntrack.reap_error": 0}
    reaper.kick()  # returns at once, though the reap below blocks
    assert fake.entered.acquire(timeout=5)
    reaper.kick()
    reaper.kick()  # two kicks during a reap: one more reap after it, not two
    fake.release.release()
    assert fake.entered.acquire(timeout=5)
    fake.release.release()
    assert not fake.entered.acquire(timeout=0.3)  # bounded wait: no third reap was asked for
    reaper.kick()  # the third fails: counted, and the thread goes on
    assert fake.entered.acquire(timeout=5)
    fake.release.release()
    reaper.kick()
    assert fake.entered.acquire(timeout=5)
    fake.release.release()
    reaper.close()
    assert fake.closed and fake.threads == ["reap"] * 4
    assert counters == {"conntrack.reaps": 3, "conntrack.reap_error": 1} and errors == ["OSError('ENOBUFS')"]


class BlockingList:
    """A Conntrack whose dump blocks until released (a million connections' walk), then
    lists ``conns`` or fails."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.threads: list[str] = []
        self.fail = False
        self.closed = False

    def ours(self, family: int = socket.AF_INET):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        self.entered.release()
        assert self.release.acquire(timeout=5)
        if self.fail:
            raise OSError("EINTR")
        return iter([f"conn-{family}"])

    def close(self) -> None:
        self.closed = True


def test_flows_are_listed_off_the_loop_and_handed_over_on_it() -> None:
    """``nfgate flows``: the dump (the whole table's walk) runs on the lister's thread; the
    loop's thread asks, goes on, and gets the list from ``finish`` after a wake-up."""
    from firewall.processor.kernel import Lister

    woken = threading.Semaphore(0)
    lister = Lister(0xFFFF0000, 0x10000, wake=woken.release)
    fake = BlockingList()
    lister._ct.close()
    lister._ct = fake  # type: ignore[assignment]
    got: list[tuple[object, object, str]] = []

    def then(conns: object, error: object) -> None:
        got.append((conns, error, threading.current_thread().name))

    lister.ask(socket.AF_INET, then)  # returns at once, though the dump blocks
    assert fake.entered.acquire(timeout=5)
    lister.finish()
    assert got == []  # nothing yet: the loop goes on meanwhile
    fake.release.release()
    assert woken.acquire(timeout=5)
    lister.finish()
    me = threading.current_thread().name
    assert got == [([f"conn-{socket.AF_INET}"], None, me)]  # on the asker's thread
    fake.fail = True
    lister.ask(socket.AF_INET6, then)
    assert fake.entered.acquire(timeout=5)
    fake.release.release()
    assert woken.acquire(timeout=5)
    lister.finish()
    assert got[1][0] is None and repr(got[1][1]) == "OSError('EINTR')" and got[1][2] == me
    # A flood of asks (clients that ask, give up, ask again) while a dump runs: they share
    # one more dump, not one each.
    fake.fail = False
    lister.ask(socket.AF_INET, then)
    assert fake.entered.acquire(timeout=5)  # the third dump runs, blocked
    for _ in range(50):
        lister.ask(socket.AF_INET, then)
    fake.release.release()
    assert fake.entered.acquire(timeout=5)  # the fourth, for all fifty
    fake.release.release()
    for _ in range(100):  # bounded poll
        lister.finish()
        if len(got) == 53:
            break
        woken.acquire(timeout=0.05)
    assert len(got) == 53 and all(g[0] == [f"conn-{socket.AF_INET}"] for g in got[2:])
    assert not fake.entered.acquire(timeout=0.2) and lister.dumps == 4
    lister.close()
    assert fake.closed and fake.threads == ["conntrack-list"] * 4
