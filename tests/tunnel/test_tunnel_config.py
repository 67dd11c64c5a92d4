"""The standalone TOML files: the documented examples load, defaults match the
docs, and every mistake is reported with its key path."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path

import pytest

from firewall.config import ConfigError, PortRange
from firewall.errors import UsageError
from tunnel.config import (
    DEFAULT_CLIENT_PORTS, MediatorConfig, ServerConfig, load_mediator, load_mediators, load_server,
)
from tunnel.policy import Op
from tunnel.frames import Proto

DOC = (Path(__file__).parents[2] / "docs" / "tunnel-protocol.md").read_text()
PIN = "sha256:" + "ab" * 32
TOKEN = "a-token-of-twenty-bytes"


def documented(name: str) -> str:
    match = re.search(rf"<!-- config: {name} -->\n```toml\n(.*?)```", DOC, re.S)
    assert match, name
    return match.group(1)


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_documented_examples_load(tmp_path: Path) -> None:
    server = load_server(_write(tmp_path / "s.toml", documented("server").replace("/etc/nfgate/tunnel/", f"{tmp_path}/")))
    assert server.service_port == 7443 and server.rate.bytes_per_second == 12_500_000
    assert server.publish_ports == (PortRange(8000, 8099),) and server.protocol.max_keepalive_interval == 300
    (tmp_path / "branch-office.crt").write_text("")
    mediators = load_mediators(_write(tmp_path / "m.toml", documented("mediators").replace("/etc/nfgate/tunnel/", f"{tmp_path}/")), server)
    assert mediators["help-desk-1"].may_publish(5060) and not mediators["help-desk-1"].may_publish(8000)
    assert mediators["help-desk-1"].rate.bytes_per_second == 2_000_000
    assert mediators["branch-office"].publish_ports == server.publish_ports  # the server's default
    _write(tmp_path / "token", "x" * 32 + "\n")
    mediator = load_mediator(_write(tmp_path / "med.toml", documented("mediator").replace("/etc/nfgate/tunnel/", f"{tmp_path}/")))
    assert mediator.token == b"x" * 32 and mediator.protocol.keepalive_interval == 2
    assert [(r.network, r.first_port, r.protos, r.ops) for r in mediator.allow] == [
        (ipaddress.ip_network("192.168.1.10/32"), 80, frozenset({Proto.TCP}), frozenset({Op.CONNECT})),
        (ipaddress.ip_network("192.168.1.20/32"), 5060, frozenset({Proto.UDP}), frozenset({Op.SEND})),
    ]


def _doc_table(heading: str, first_key: str) -> dict[str, str]:
    start = DOC.index(heading)
    table_start = DOC.index(f"| `{first_key}` |", start)
    end = DOC.index("\n\n", table_start)
    return dict(re.findall(r"^\| `(\w+)` \| `?([^|`]*)`? \|", DOC[table_start:end], re.M))


def test_server_defaults_are_the_documented_ones() -> None:
    rows = _doc_table("<!-- config: server -->", "listen")
    d = ServerConfig()
    assert (d.listen, d.public_address) == ((ipaddress.ip_address(rows["listen"]),),) * 2
    assert rows["public_address"] == rows["listen"]
    assert rows["cert"] == str(d.cert) and rows["key"] == str(d.key) and rows["mediators"] == str(d.mediators_file)
    assert rows["control_socket"] == str(d.control_socket) and rows["state_file"] == '""' and d.state_file is None
    for key in ("service_port", "request_timeout", "handshake_timeout", "udp_idle_timeout", "channel_wait",
                "udp_queue", "max_channels", "tls_read_buffer", "channel_unsent", "udp_buffer"):
        assert float(rows[key]) == float(getattr(d, key)), key
    assert float(rows["republish_initial"]) == d.republish.initial and float(rows["republish_max"]) == d.republish.maximum
    limits = _doc_table("`[limits]`: the defaults", "max_ports")
    for key in ("max_ports", "max_connections", "max_pending"):
        assert float(limits[key]) == getattr(d.limits, key), key
    assert float(limits["bytes_per_second"]) == d.rate.bytes_per_second
    assert float(limits["burst_bytes"]) == d.rate.burst_bytes


def test_mediator_defaults_are_the_documented_ones() -> None:
    rows = _doc_table("<!-- config: mediator -->", "identity")
    d = MediatorConfig(identity="x", token=b"", server="h", pin=b"")
    assert rows["client_ports"] == f"{DEFAULT_CLIENT_PORTS.first}-{DEFAULT_CLIENT_PORTS.last}"
    for key in ("service_port", "connect_timeout", "channel_timeout", "max_port_probes", "channel_unsent", "udp_buffer"):
        assert float(rows[key]) == float(getattr(d, key)), key
    assert float(rows["reconnect_initial"]) == d.reconnect.initial
    assert float(rows["reconnect_max"]) == d.reconnect.maximum
    assert float(rows["reconnect_stable"]) == d.reconnect.stable_after


def test_every_server_problem_is_reported_with_its_path_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.toml", """
[server]
listen = "not-an-address"
service_port = 70000
cert = "relative.crt"
colour = "blue"

[protocol]
dead_after = 0

[limits]
publish_ports = ["9000-8000"]
""")
    with pytest.raises(ConfigError) as err:
        load_server(path)
    text = str(err.value)
    for expected in (
        "server.listen (line 3): 'not-an-address' is not an IP address",
        "server.service_port (line 4): 70000 is out of range",
        "server.cert (line 5): 'relative.crt' is not an absolute path",
        "server.colour (line 6): unknown key",
        "protocol.dead_after (line 9): 0 is out of range",
        "limits.publish_ports",
    ):
        assert expected in text, text


def test_mediators_file_must_be_root_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.toml", f'[mediator.a]\ntoken = "{TOKEN}"\n', mode=0o644)
    with pytest.raises(UsageError, match="mode 0644 gives group or others access.*chmod 600"):
        load_mediators(path, ServerConfig())
    with pytest.raises(UsageError, match="no such file"):
        load_mediators(tmp_path / "none.toml", ServerConfig())


def test_mediators_file_problems(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.toml", '[mediator."bad name!"]\ntoken = "short"\nmax_ports = -1\nfoo = 1\n')
    with pytest.raises(ConfigError) as err:
        load_mediators(path, ServerConfig())
    text = str(err.value)
    assert "is not an identity" in text and "a token is 16 to 1024 bytes" in text
    assert "max_ports" in text and "foo" in text and "unknown key" in text


def _mediator(tmp_path: Path, body: str, mode: int = 0o600) -> Path:
    return _write(tmp_path / "med.toml", body, mode)


def test_mediator_problems_are_reported_together(tmp_path: Path) -> None:
    path = _mediator(tmp_path, f"""
[mediator]
identity = "m1"
token = "{TOKEN}"
token_file = "/nowhere"
server_pin = "sha256:1234"
client_cert = "/etc/c.crt"

[[allow]]
to = "10.0.0.300/32"
ops = ["dance"]
""")
    with pytest.raises(ConfigError) as err:
        load_mediator(path)
    text = str(err.value)
    for expected in (
        "mediator.token (line 4): give token or token_file, not both",
        "mediator.server (line 2): is required",
        "mediator.server_pin (line 6): 'sha256:1234' is not a pin",
        "client_cert and client_key go together",
        "allow[0].to",
        "allow[0].ops[0]",
    ):
        assert expected in text, text


def test_inline_token_needs_a_root_only_config(tmp_path: Path) -> None:
    path = _mediator(tmp_path, f'[mediator]\nidentity = "m1"\ntoken = "{TOKEN}"\nserver = "h"\nserver_pin = "{PIN}"\n',
                     mode=0o640)
    with pytest.raises(ConfigError, match="an inline token needs a root-only config"):
        load_mediator(path)
    os.chmod(path, 0o600)
    config = load_mediator(path)
    assert config.allow == () and config.client_ports == DEFAULT_CLIENT_PORTS  # no rule: nothing but client ports


def test_token_file_is_checked_and_stripped(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", TOKEN + "\n", mode=0o644)
    body = f'[mediator]\nidentity = "m1"\ntoken_file = "{token}"\nserver = "h"\nserver_pin = "{PIN}"\nclient_ports = ""\n'
    with pytest.raises(ConfigError, match="mode 0644"):
        load_mediator(_mediator(tmp_path, body, mode=0o644))
    os.chmod(token, 0o600)
    config = load_mediator(_mediator(tmp_path, body, mode=0o644))
    assert config.token == TOKEN.encode() and config.client_ports is None


def test_bad_toml_and_missing_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such tunnel server config file"):
        load_server(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"\(toml\)"):
        load_mediator(_mediator(tmp_path, "[mediator\n"))


def test_config_dataclasses_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().service_port = 1  # type: ignore[misc]
