"""The benches' stand-ins (tests/firewall/floor.py) relay through nfgate's datapath as tcp-relay does.

basic lab, tests/firewall/run_harness.py's config: ext -> router:8443 ->
tcp-relay -> lan:443, an echo server that prints the peer it saw. Each
stand-in, put in the gateway's place on its socket, carries a connection
end to end, and the server sees the real client (the processor binds the
stand-in's leg B as it does the gateway's); the gateway, given its socket
back, serves again, and its log names only the connections it carried.
The figures of `scripts/bench processor` and `scripts/bench smtp` for the
stand-ins rest on this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.firewall.floor import StandIns
from tests.firewall.run_harness import Running, Server, probe

pytestmark = pytest.mark.netns

EXT, WAN = "203.0.113.10", "203.0.113.1"


def test_each_stand_in_carries_a_connection_and_the_gateway_serves_after(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("basic")
    server = Server(lab, "lan", 443)
    run = Running(lab, tmp_path)
    try:
        stand_ins = StandIns(run.processes()["gateway-relay"]["pid"], tmp_path)
        try:
            for name in ("compiled", "python", "gateway", "compiled"):
                stand_ins.use(name)
                assert probe(lab, "ext", WAN, 8443), name
                assert server.next_peer() == EXT, name
        finally:
            stand_ins.close()
        assert probe(lab, "ext", WAN, 8443)
        assert server.next_peer() == EXT
        # The gateway carried two of the five: its own turn and the one after close().
        assert run.text().count(" relay open ") == 2, run.text()
        assert run.processes()["gateway-relay"]["state"] == "running"
    finally:
        run.stop()
        server.proc.kill()
        server.proc.wait()
