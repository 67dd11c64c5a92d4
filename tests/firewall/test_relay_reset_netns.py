"""A server that answers and resets at once, through tcp-relay: the client gets the answer, then the RST.

basic lab: ext 203.0.113.10 -> router 203.0.113.1:8443 -> tcp-relay -> lan
192.168.1.10:443. The server's answer and its RST often reach the gateway's
leg B together, before the relay reads either; the gateway runs on uvloop,
which wakes a reader once for a socket in error, and a relay that read once
per wake-up passed the answer and never the RST: the client's connection
stayed open until the client closed it (gateways/relay/driver.py).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.firewall.run_harness import ANSWER_SERVER, Running

pytestmark = pytest.mark.netns

CONNECTIONS = 20
END_TIMEOUT = 2.0  # seconds a connection gets to end after its answer (a hung one never does)

# Connects COUNT times; prints how many got the answer and then the reset. argv: COUNT TIMEOUT
CLIENT = r"""
import socket, sys
count, timeout = int(sys.argv[1]), float(sys.argv[2])
ended = 0
for _ in range(count):
    with socket.create_connection(("203.0.113.1", 8443), timeout=timeout) as s:
        s.sendall(b"ask")
        got = b""
        try:
            while chunk := s.recv(64):
                got += chunk
        except ConnectionResetError:
            ended += got == b"answer"
        except OSError:
            pass
print(ended, flush=True)
"""


def test_a_server_answer_then_reset_reaches_the_client_as_both(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    server = lab.popen("lan", [sys.executable, "-c", ANSWER_SERVER, "reset"])
    lab.wait_listening("lan", 443)
    run = Running(lab, tmp_path)
    try:
        got = lab.run("ext", [sys.executable, "-c", CLIENT, str(CONNECTIONS), str(END_TIMEOUT)], timeout=90)
        assert int(got.stdout) == CONNECTIONS
    finally:
        run.stop()
        server.send_signal(signal.SIGTERM)
