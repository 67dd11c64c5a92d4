"""The smtp gateway over IPv6 in the dual lab, with real peers (issue 17).

ext (2001:db8:2::10, and ::11 of the same /64) routes lan's ULA through the
router; a private Postfix in lan (tests/gateways/smtp_netns.py) listens on
both families. The router takes wan -> lan tcp 25 through an smtp gateway:
swaks's message arrives intact and Postfix logs the client's real IPv6
address; so does a message to the router's own IPv6 address through an
IPv6 port forward into the gateway; a smuggling attempt is refused as over
IPv4; and two clients of one /64 are one client to
``max_sessions_per_client``.
"""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.firewall.run_harness import Running
from tests.firewall.test_ipv6_netns import ZONES6, no_tentative_addresses
from tests.gateways.smtp_netns import Postfix, client, stored_body
from tests.labconfig import RUN

pytestmark = pytest.mark.netns

LAN6 = "fd00:1::10"

CONFIG = ZONES6 + """
[[rule]]
name = "mail-in"
from = "wan"
to = "lan"
proto = "tcp"
ports = 25

# The classic inbound deployment over IPv6: ext addresses the router, whose
# forward takes port 25 to the mail server, through the gateway.
[[nat.forward]]
name = "smtp6"
from = "wan"
proto = "tcp"
port = 25
to = "[fd00:1::10]:25"

[processor]
queues = [0]
""" + RUN + """
[[gateway]]
name = "smtp-in"
kind = "smtp"

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 25

[gateway.settings]
recipient_domains = ["example.com"]
max_sessions_per_client = 1
idle_timeout = 5
"""

# Two sessions held open, from two addresses of ext's /64: the greeting each one got.
TWO_FROM_ONE_PREFIX = r"""
import json, socket, sys
socks, got = [], []
for source in ("2001:db8:2::10", "2001:db8:2::11"):
    s = socket.create_connection((sys.argv[1], 25), timeout=10, source_address=(source, 0))
    socks.append(s)
    got.append(s.recv(512).decode())
print(json.dumps(got))
"""


@pytest.fixture(scope="module")
def mail6(module_lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    lab = module_lab_factory("dual")
    no_tentative_addresses(lab)
    lab.run("ext", ["ip", "-6", "route", "add", "fd00:1::/64", "via", "2001:db8:2::1"])
    lab.run("ext", ["ip", "-6", "addr", "add", "2001:db8:2::11/64", "dev", "eth0", "nodad"])
    tmp = tmp_path_factory.mktemp("smtp6")
    inbound = Postfix(lab, "lan", tmp, f"192.168.1.10, [{LAN6}]", "example.com", protocols="all")
    r = SimpleNamespace(lab=lab, tmp=tmp, inbound=inbound, run=None)
    try:
        r.run = Running(lab, tmp, config=CONFIG)
        yield r
    finally:
        if r.run is not None:
            r.run.stop()
        inbound.stop()


def test_swaks_to_postfix_over_ipv6_through_the_gateway(mail6: SimpleNamespace) -> None:
    mail6.inbound.clear()
    swaks = mail6.lab.run("ext", ["swaks", "-6", "--server", LAN6, "--local-interface", "2001:db8:2::10",
                                  "--from", "carol@example.org", "--to", "bob@example.com",
                                  "--pipeline", "--header", "Subject: swaks6", "--body", ".dot line\n..two\nplain"],
                          check=False, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    mail6.inbound.wait_count(1)
    (stored,) = mail6.inbound.messages()
    assert b"Subject: swaks6" in stored and b"\r\n\r\n.dot line\r\n..two\r\nplain\r\n" in stored_body(stored)
    # Postfix saw the client's real IPv6 address, not the router's or the gateway's.
    log = mail6.inbound.log.read_text()
    assert "client=unknown[2001:db8:2::10]" in log, log
    text = mail6.run.text()
    assert wait_for(lambda: "smtp-in open" in mail6.run.text() and "client=[2001:db8:2::10]:" in mail6.run.text(),
                    timeout=5, what="the gateway's open line with the IPv6 client"), text
    counters = mail6.run.ask("status")["processors"]["processor-0"]["counters"]
    assert counters["flows.ipv6.opened"] >= 1, counters


def test_smuggling_over_ipv6_never_makes_a_second_message(mail6: SimpleNamespace) -> None:
    mail6.inbound.clear()
    steps = [b"EHLO attacker.example.org\r\n",
             b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n",
             b"Subject: real\r\n\r\nreal\n.\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
             b"Subject: SMUGGLED\r\n\r\nspoofed\r\n.\r\n"]
    result = client(mail6.lab, "ext", "raw", LAN6, *(s.hex() for s in steps), timeout=60)
    got = json.loads(result.stdout)["received"]
    assert "554 5.6.0 Bare CR or LF in message content; message refused" in got
    wait_for(lambda: "lost connection after DATA" in mail6.inbound.log.read_text(), timeout=10, what="Postfix to see the abort")
    assert mail6.inbound.count() == 0 and "SMUGGLED" not in mail6.inbound.log.read_text()


def test_two_addresses_of_one_prefix_are_one_client(mail6: SimpleNamespace) -> None:
    out = mail6.lab.run("ext", [sys.executable, "-c", TWO_FROM_ONE_PREFIX, LAN6], timeout=30)
    first, second = json.loads(out.stdout)
    assert first.startswith("220") and second.startswith("421 4.7.0 Too many sessions from your address"), (first, second)
    assert wait_for(lambda: "counted_as=2001:db8:2::/64" in mail6.run.text(), timeout=5, what="the refusal's log line")


def test_an_ipv6_port_forward_into_the_gateway(mail6: SimpleNamespace) -> None:
    """ext -> the router's 2001:db8:2::1:25 -> [fd00:1::10]:25: the binding's server is the forward's target."""
    mail6.inbound.clear()
    seen = mail6.inbound.log.read_text().count("client=unknown[2001:db8:2::10]")
    swaks = mail6.lab.run("ext", ["swaks", "-6", "--server", "2001:db8:2::1", "--local-interface", "2001:db8:2::10",
                                  "--from", "carol@example.org", "--to", "bob@example.com", "--header", "Subject: fwd6"],
                          check=False, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    mail6.inbound.wait_count(1)
    assert b"Subject: fwd6" in mail6.inbound.messages()[0]
    log = mail6.inbound.log.read_text()
    assert log.count("client=unknown[2001:db8:2::10]") == seen + 1, log  # the real client, not the router
    assert wait_for(lambda: re.search(r"smtp-in open .*client=\[2001:db8:2::10\]:\d+ original_dst=\[2001:db8:2::1\]:25 "
                                      r"server=\[fd00:1::10\]:25", mail6.run.text()), timeout=5,
                    what="the gateway's open line with the forward's target as the server")
