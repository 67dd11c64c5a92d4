"""A client that reuses its source port through tcp-relay, with conntrack's default timeouts.

The labs shorten the router's conntrack timeouts (tests/conntrack.py), which hid
this: a client whose server closed first keeps no TIME-WAIT and may connect from
the same port at once, while conntrack still holds the old connection's legs,
leg B in TIME-WAIT (120 s) or, after an RST, CLOSE (10 s). The new leg B's reply
tuple, S:s -> C:c, is the old one's; the processor deletes the closing old leg B
before the new one's verdict (docs/datapath.md, "A client that reuses its
port"). Before it did, about half of such connections were accepted by the
gateway and then hung.

basic lab: ext 203.0.113.10 -> router 203.0.113.1:8443 -> tcp-relay -> lan
192.168.1.10:443. Either the server answers and closes first (the old legs in
TIME-WAIT), or the client resets as soon as it has the answer (the old legs in
CLOSE: conntrack reopens leg A with its NAT, and the next connection comes to the
gateway on the same binding).

When the server closed first, it holds a TIME-WAIT for the client's port too,
which takes the next leg B's SYN as a new connection only if its timestamp is
newer than the last leg B's: the gateway namespace's timestamps come from one
clock (``gateway_link.tcp_timestamps = "monotonic"``), so it never answers one
as an old duplicate, which the gateway's kernel would reset and send again
10-20 ms later (docs/datapath.md, "The server's own TIME-WAIT"). With the
kernel's random offsets each later connection had about even odds of that.
That test starts each connection once the server holds the last one's
TIME-WAIT. A client that connects again within a millisecond of its close
(the first test, "server") met the server before the gateway's FIN on the old
leg B had, while the processor deleted that closing leg B at the new leg A's
verdict, and that FIN_WAIT2 answered the same way; the delete now waits for
the new leg B's verdict (docs/datapath.md). Not asserted here: a few such
answers remain (0-2 in 19, against 0-10 before), a new leg B's SYN in the
same millisecond as the old leg's last segment, whose equal timestamp leaves
the server to judge it by a sequence number the gateway drew at random
(docs/datapath.md, "The server's own TIME-WAIT").
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from firewall.lab.wait import wait_for
from tests.conntrack import fast_conntrack
from tests.firewall.run_harness import ANSWER_SERVER, Running

pytestmark = pytest.mark.netns

# The kernel's own values (Documentation/networking/nf_conntrack-sysctl.rst).
KERNEL_DEFAULTS = {
    "nf_conntrack_tcp_timeout_time_wait": 120,
    "nf_conntrack_tcp_timeout_close": 10,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_tcp_timeout_last_ack": 30,
}
REUSES = 20  # connections from one client port, one after the other
ANSWER_TIMEOUT = 2.0  # seconds a connection gets to answer (a hung one never does)

# Connects from one port COUNT times, the next as soon as the last one has ended; prints how
# many answered in time. "server": waits for the server's close (so keeps no TIME-WAIT);
# "reset": resets at once after the answer (SO_LINGER 0). argv: COUNT PORT TIMEOUT HOW
CLIENT = r"""
import socket, struct, sys
count, port, timeout, how = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
answered = 0
for _ in range(count):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.settimeout(timeout)
    try:
        s.connect(("203.0.113.1", 8443))
        s.sendall(b"ask")
        got = s.recv(64)
        if how == "server":
            while s.recv(64):
                pass
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        answered += got == b"answer"
    except OSError:
        pass
    s.close()
print(answered, flush=True)
"""


def out_resets(pid: int) -> int:
    """The RSTs the TCP of ``pid``'s network namespace has sent (``Tcp: OutRsts``)."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(lines[0], lines[1]))["OutRsts"])


@pytest.mark.parametrize("close", ["server", "reset"])
def test_a_client_reusing_its_port_is_answered_every_time(lab_factory: Any, tmp_path: Path, close: str) -> None:
    lab = lab_factory("basic")
    server = lab.popen("lan", [sys.executable, "-c", ANSWER_SERVER])
    lab.wait_listening("lan", 443)
    run = Running(lab, tmp_path)
    fast_conntrack(lab, **KERNEL_DEFAULTS)  # after the harness shortened them
    try:
        got = lab.run("ext", [sys.executable, "-c", CLIENT, str(REUSES), "45000", str(ANSWER_TIMEOUT), close], timeout=60)
        counters = run.ask("status")["processors"]["processor-0"]["counters"]
        assert int(got.stdout) == REUSES, counters
        # Each later connection met its predecessor's leg B, closing, and it went first.
        assert counters.get("conntrack.closing_leg_b_deleted", 0) >= REUSES - 1, counters
        assert counters.get("drop.leg_b_busy", 0) == 0, counters
    finally:
        run.stop()
        server.send_signal(signal.SIGTERM)


TIME_WAITS = 10  # connections from one port, each once the server holds the last one's TIME-WAIT


def test_the_servers_time_wait_takes_the_gateways_next_connection_from_the_port(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    server = lab.popen("lan", [sys.executable, "-c", ANSWER_SERVER])
    lab.wait_listening("lan", 443)
    run = Running(lab, tmp_path)
    time_wait = ["ss", "-Htn", "state", "time-wait", "( sport = :443 and dport = :45000 )"]
    try:
        gateway = run.processes()["gateway-relay"]["pid"]
        resets = out_resets(gateway)
        for i in range(TIME_WAITS):
            got = lab.run("ext", [sys.executable, "-c", CLIENT, "1", "45000", str(ANSWER_TIMEOUT), "server"], timeout=30)
            assert got.stdout.strip() == "1", (i, got)
            wait_for(lambda: "203.0.113.10:45000" in lab.run("lan", time_wait).stdout, timeout=5,
                     what="the server's TIME-WAIT for the client's port")
        # No leg B's SYN was answered as an old duplicate (the gateway's kernel would have reset it).
        assert out_resets(gateway) == resets
    finally:
        run.stop()
        server.send_signal(signal.SIGTERM)
