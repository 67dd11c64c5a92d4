"""The bench's Python floors (tests/tunnel/floor_tunnel.py) relay as a tunnel must.

`scripts/bench tunnel` puts their figures beside the tunnel's and
`ssh -R`'s; they stand for what Python can do per crossing only if they
carry what the tunnel carries: many connections, each with its bytes
both ways and its half-close, the client's first bytes at the accept, a
client that resets, and a target that refuses. On 127.0.0.1, each floor
(bare epoll, and asyncio's protocols on uvloop) as two processes.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firewall.lab.wait import wait_for
from tests.tunnel.loopback import ThreadedEcho, free_port
from tunnel import keygen

TOP = Path(__file__).resolve().parents[2]
WAIT = 10.0
Floor = tuple[int, ThreadedEcho, list[subprocess.Popen[str]]]  # the public port, the target, the two processes


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while data := client.recv(65536):
            got += data
        return bytes(got)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        return True
    except ConnectionRefusedError:
        return False


@pytest.fixture(params=["epoll", "uvloop"])
def floor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Floor]:
    """(the floor's public port, its echo target, its two processes)."""
    keygen.write_identity(tmp_path / "c.crt", tmp_path / "c.key", "floor")
    echo = ThreadedEcho(WAIT)
    channel, public = free_port(), free_port()
    run = [sys.executable, "-m", "tests.tunnel.floor_tunnel", "--loop", request.param]
    env = {**os.environ, "PYTHONPATH": str(TOP)}
    procs = [subprocess.Popen([*run, "server", "--channel", f"127.0.0.1:{channel}", "--public", f"127.0.0.1:{public}",
                               "--cert", str(tmp_path / "c.crt"), "--key", str(tmp_path / "c.key")],
                              cwd=TOP, env=env, stdout=subprocess.PIPE, text=True)]
    try:
        assert procs[0].stdout is not None and procs[0].stdout.readline().strip() == "ready"
        procs.append(subprocess.Popen([*run, "mediator", "--server", f"127.0.0.1:{channel}",
                                       "--target", f"127.0.0.1:{echo.port}"], cwd=TOP, env=env,
                                      stdout=subprocess.PIPE, text=True))
        assert procs[1].stdout is not None and procs[1].stdout.readline().strip() == "connected"
        wait_for(lambda: _listening(public), timeout=WAIT, what="the floor's public port")
        yield public, echo, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(WAIT)
        echo.close()


def test_a_floor_carries_many_connections_both_ways_with_half_close(floor: Floor) -> None:
    public, _, procs = floor
    for i in range(50):
        payload = os.urandom(1 + i * 997)
        assert _exchange(public, payload) == payload, i
    big = os.urandom(4 << 20)
    assert _exchange(public, big) == big
    assert all(proc.poll() is None for proc in procs)


def test_a_floor_survives_clients_that_reset(floor: Floor) -> None:
    public, _, procs = floor
    for i in range(50):
        client = socket.create_connection(("127.0.0.1", public), timeout=WAIT)
        if i % 2:
            client.sendall(b"request")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    wait_for(lambda: _exchange(public, b"after") == b"after", timeout=WAIT, what="the floor to serve after the resets")
    assert all(proc.poll() is None for proc in procs)
