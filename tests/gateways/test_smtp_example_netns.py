"""examples/mail.toml runs under `nfgate run` and carries a mail through its smtp gateway (issue 10).

The lab is the basic one with the LAN the example names (10.10.0.0/24, the
mail server at 10.10.0.25); the router's interfaces are already called
wan0 and lan0 as in the example. The example is used as it is, with only
what places a run in a test added: the gateways' namespace, the signalling
key and the control socket (the example leaves them at their defaults under
/etc and /run, which a test must not touch). A private Postfix in lan
receives a mail sent from ext with smtplib through the port forward and
the ``smtp-in`` gateway; it arrives byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from firewall.lab.topology import parse_topology
from tests.gateways.smtp_netns import Postfix, client, stored_body
from tests.firewall.run_harness import Running

pytestmark = pytest.mark.netns

EXAMPLE = Path(__file__).parents[2] / "examples" / "mail.toml"
SERVER = "10.10.0.25"
WAN = "203.0.113.1"

TOPOLOGY = parse_topology({
    "name": "mail",
    "description": "the basic lab with examples/mail.toml's LAN",
    "router": "router",
    "hosts": {"ext": {}, "router": {"forwarding": True}, "lan": {}},
    "links": [
        {"a": {"host": "ext", "ifname": "eth0", "addresses": ["203.0.113.10/24"]},
         "b": {"host": "router", "ifname": "wan0", "addresses": [f"{WAN}/24"]}},
        {"a": {"host": "router", "ifname": "lan0", "addresses": ["10.10.0.1/24"]},
         "b": {"host": "lan", "ifname": "eth0", "addresses": [f"{SERVER}/24"]}},
    ],
    "routes": [{"host": "lan", "to": "default", "via": "10.10.0.1"}],
})

# Where this run lives; the example's own keys are kept (its [signalling] port and copies).
PLACE = """
[gateway_link]
netns = "{gwns}"

[supervisor]
control_socket = "{tmp}/run/control.sock"
"""


def example_config() -> str:
    """examples/mail.toml as a `Running` template: braces escaped, the run's place added."""
    text = EXAMPLE.read_text().replace("{", "{{").replace("}", "}}")
    assert text.count("\n[signalling]\n") == 1
    text = text.replace("\n[signalling]\n", '\n[signalling]\nkey_file = "{tmp}/signalling.key"\n')
    return text + PLACE


def test_examples_mail_toml_carries_a_mail(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(TOPOLOGY)
    pf = Postfix(lab, "lan", tmp_path, SERVER, "example.com")
    try:
        run = Running(lab, tmp_path, config=example_config())
        try:
            msg = tmp_path / "msg"
            msg.write_bytes(b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: example\r\n\r\n"
                            b".through examples/mail.toml\r\n")
            result = client(lab, "ext", "send", WAN, "alice@example.org", "bob@example.com", "each", str(msg))
            assert result.returncode == 0, result.stdout + result.stderr
            assert json.loads(result.stdout.strip().splitlines()[-1])["sent"] == 1
            pf.wait_count(1)
            assert stored_body(pf.messages()[0]) == msg.read_bytes()
            assert "smtp-in open " in run.text()  # through the gateway, not the kernel's forward alone
            # The example relays only to its domains: the gateway says so, not Postfix.
            refused = client(lab, "ext", "send", WAN, "alice@example.org", "eve@elsewhere.net", "each", str(msg))
            assert refused.returncode != 0 and "Relay access denied" in refused.stderr
            assert "refused.recipient" in run.text()
        finally:
            run.stop()
    finally:
        pf.stop()
