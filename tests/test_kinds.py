"""A gateway kind is one module and one registration line (gateways/kind.py, gateways/kinds.py).

The toy kind below is written to a file of its own, outside the project, and
registered with one line in a fresh interpreter, before anything reads the
registry. Then every part of the router that knows about kinds takes it:
the config (its selectors' protocols, its settings model with defaults and
unknown keys, the JSON Schema), the rule builder, the manifest, the
supervisor, the processor's rule policy, and the gateway's entry point,
which runs with the settings its manifest carries. Nothing in firewall/
changes for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateways.kind import Kind, Registry
from firewall.fields import Frozen
from gateways.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""A toy gateway kind: answers each connection with its greeting."""

import asyncio

from pydantic import Field

from firewall.fields import Frozen, Int, String
from firewall.signalling import RuleMode
from gateways.kind import Kind


class ToySettings(Frozen):
    greeting: String(r"[a-z ]{1,40}", "a few lowercase words") = Field("hello", description="what it says")
    repeat: Int(1, 5) = Field(1, description="how many times")


class ToyGateway:
    def __init__(self, listen, settings):
        self.listen, self.settings, self.server = listen, settings, None

    @classmethod
    def for_gateway(cls, layer, manifest, listen, log):
        return cls(listen, ToySettings.model_validate(manifest.settings))

    async def start(self):
        async def greet(reader, writer):
            writer.write((self.settings.greeting + "\\n").encode() * self.settings.repeat)
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_server(greet, str(self.listen.address), self.listen.port)


KIND = Kind("toy", ("tcp",), ToySettings, gateway="toykind:ToyGateway.for_gateway",
            rule_modes=frozenset({RuleMode.ALLOW}))
'''

CONFIG = """
[zones.wan]
interfaces = ["eth0"]
[zones.lan]
interfaces = ["eth1"]

[[gateway]]
name = "toy-1"
kind = "toy"
[gateway.settings]
greeting = "good morning"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "tcp"
ports = 7007
"""

DRIVER = '''
import asyncio, ipaddress, json, socket, sys
import toykind
from gateways.kinds import KINDS
KINDS.register(toykind.KIND)  # the one registration line

from firewall import manifests, supervisor
from firewall.config import ConfigError, loads, schema
from firewall.rules import build, nft
from firewall.signalling import Endpoint
from tests.firewall.test_processor_core import Rig

config_text = sys.stdin.read()
out = {}
config = loads(config_text)
(gw,) = config.gateways
out["settings"] = [type(gw.settings).__name__, gw.settings.greeting, gw.settings.repeat]
for bad in ('repeat = 9', 'colour = "red"'):
    try:
        loads(config_text.replace('greeting = "good morning"', 'greeting = "good morning"\\n' + bad))
    except ConfigError as err:
        out.setdefault("refused", []).append(str(err).splitlines()[1])
try:
    loads(config_text.replace('proto = "tcp"', 'proto = "udp"'))
except ConfigError as err:
    out["proto"] = str(err).splitlines()[1]
out["schema"] = "toy" in json.dumps(schema())
out["rules"] = "gateway toy-1 (toy)" in nft.render(build(config))
manifest = manifests.manifest_for(config, gw)
out["manifest"] = manifest.settings
out["child"] = [c.argv[-1] for c in supervisor.children_for(config, "x.toml") if c.name == "gateway-toy-1"]
rig = Rig(extra=config_text[config_text.index("[[gateway]]"):])  # a processor core with the toy gateway
out["policy"] = sorted(m.name for m in rig.core.rules._kind["toy-1"].rule_modes)

async def run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = Endpoint(ipaddress.IPv4Address("127.0.0.1"), s.getsockname()[1])
    gateway = KINDS["toy"].entry()(None, manifest, listen, None)
    await gateway.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listen.port)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    gateway.server.close()
    return data.decode()
out["greeting"] = asyncio.run(run())
print(json.dumps(out))
'''


def test_a_toy_kind_is_one_module_and_one_registration_line(tmp_path: Path) -> None:
    (tmp_path / "toykind.py").write_text(textwrap.dedent(TOY_MODULE))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], input=CONFIG, capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["settings"] == ["ToySettings", "good morning", 1]
    assert out["refused"] == [
        "  gateway[0].settings.repeat (line 12): 9 is out of range (1 to 5)",
        "  gateway[0].settings.colour (line 12): unknown key",
    ]
    assert out["proto"].endswith("a toy gateway takes tcp, not udp")
    assert out["schema"] and out["rules"]
    assert out["manifest"] == {"greeting": "good morning", "repeat": 1}
    assert out["child"] == ["/run/nfgate/gateway-toy-1.json"]
    assert out["policy"] == ["ALLOW"]
    assert out["greeting"] == "good morning\n"


class NoSettings(Frozen):
    """A kind that takes no settings."""


def test_the_registry_refuses_a_kind_twice_and_a_malformed_declaration() -> None:
    registry = Registry()
    registry.register(Kind("a", ("tcp",), NoSettings, gateway="m:f"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Kind("a", ("udp",), NoSettings, gateway="m:f"))
    with pytest.raises(ValueError, match="protos must be tcp and/or udp"):
        Kind("b", ("sctp",), NoSettings, gateway="m:f")
    with pytest.raises(ValueError, match="'module:attribute'"):
        Kind("c", ("tcp",), NoSettings, gateway="gateways.tcp_relay")


def test_every_kind_has_an_entry_point_that_loads() -> None:
    for kind in KINDS:
        assert callable(kind.entry()), kind.name
