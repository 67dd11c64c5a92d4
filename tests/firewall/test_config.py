"""Config loading and validation: examples load; each kind of mistake gets one
clear problem with its key path (and line); all problems come at once."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from firewall.config import ConfigError, PortRange, load, loads
from firewall.config.model import Marks
from gateways.kinds import KINDS
from firewall.errors import UsageError

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))

BASE = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]
"""


def problems(text: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return [(p.path, p.reason, p.line) for p in info.value.problems]


def line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[nth - 1]


def only(text: str) -> tuple[str, str, int | None]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_load(path: Path) -> None:
    config = load(path)
    assert {"wan", "lan"} <= set(config.zones)


def test_examples_are_the_three_the_docs_promise() -> None:
    assert [p.stem for p in EXAMPLES] == ["home", "mail", "office"]


def test_defaults() -> None:
    config = loads(BASE)
    assert config.policy.input == "drop" and config.policy.forward == "drop"
    assert config.processor.fail_mode == "closed"
    assert config.processor.queues == (0,)
    assert config.gateway_link.router_address == ipaddress.IPv4Interface("172.31.255.1/30")
    assert config.gateways == ()


def test_unknown_key() -> None:
    text = BASE + "\n[policy]\nfail_mode = 'open'\n"
    path, reason, line = only(text)
    assert (path, reason) == ("policy.fail_mode", "unknown key")
    assert line == line_of(text, "fail_mode")


def test_wrong_type() -> None:
    path, reason, _ = only(BASE + "\n[processor]\nfail_mode = 1\n")
    assert path == "processor.fail_mode"
    assert "not one of 'open', 'closed'" in reason
    path, reason, _ = only(BASE + "\n[signalling]\nport = 'x'\n")
    assert (path, reason) == ("signalling.port", "expected an integer, got a string")


def test_overlapping_port_ranges_in_one_list() -> None:
    text = BASE + "\n[[rule]]\nfrom = 'lan'\nto = 'wan'\nproto = 'tcp'\nports = ['1000-2000', 1500]\n"
    path, reason, line = only(text)
    assert path == "rule[0].ports"
    assert reason == "port ranges 1000-2000 and 1500 overlap"
    assert line == line_of(text, "ports =")


GATEWAY = """
[[gateway]]
name = "{name}"
kind = "tcp-relay"
[[gateway.traffic]]
from = "{zone}"
to = "lan"
proto = "tcp"
ports = {ports}
"""


def test_overlapping_gateway_selectors() -> None:
    text = BASE + GATEWAY.format(name="a", zone="wan", ports="'20-30'") + GATEWAY.format(name="b", zone="wan", ports="25")
    path, reason, line = only(text)
    assert path == "gateway[1].traffic[0].ports"
    assert reason.startswith("overlaps gateway[0].traffic[0]")
    assert line == line_of(text, "ports =", nth=2)


def test_gateway_bound_to_missing_zone() -> None:
    text = BASE + GATEWAY.format(name="a", zone="dmz", ports="25")
    path, reason, line = only(text)
    assert path == "gateway[0].traffic[0].from"
    assert reason == "zone 'dmz' does not exist (known: lan, wan)"
    assert line == line_of(text, 'from = "dmz"')


def test_mark_bits_overlapping() -> None:
    text = BASE + "\n[processor.marks]\nrewritten = '0x00010000'\npassed = '0x00030000'\n"
    path, reason, _ = only(text)
    assert path == "processor.marks.passed"
    assert "overlaps rewritten" in reason


def test_mark_outside_mask() -> None:
    text = BASE + "\n[processor.marks]\nmask = '0xff'\nrewritten = '0x100'\npassed = '0x2'\n"
    path, reason, _ = only(text)
    assert path == "processor.marks.rewritten"
    assert "outside mask" in reason


@pytest.mark.parametrize("queues", ["[65536]", "[-1]", "[]", "[1, 1]"])
def test_queue_numbers(queues: str) -> None:
    path, reason, _ = only(BASE + f"\n[processor]\nqueues = {queues}\n")
    assert path.startswith("processor.queues")
    assert any(word in reason for word in ("out of range", "at least one", "appears twice"))


def test_all_problems_at_once() -> None:
    text = "colour = 'red'\n" + BASE + "\n[processor]\nqueues = [70000]\nfail_mode = 'ajar'\n" + GATEWAY.format(
        name="a", zone="dmz", ports="0"
    )
    paths = sorted(p for p, _, _ in problems(text))
    assert paths == sorted(
        ["colour", "processor.queues[0]", "processor.fail_mode", "gateway[0].traffic[0].from", "gateway[0].traffic[0].ports"]
    )


def test_toml_syntax_error_has_line() -> None:
    text = BASE + "\n[policy\n"
    path, reason, _ = only(text)
    assert path == "(toml)"
    assert f"line {line_of(text, '[policy')}" in reason


def test_interface_in_two_zones() -> None:
    path, reason, _ = only('[zones.wan]\ninterfaces = ["eth0"]\n[zones.lan]\ninterfaces = ["eth0"]\n')
    assert path == "zones.lan.interfaces"
    assert "already in zone 'wan'" in reason


def test_zone_name_rules() -> None:
    path, reason, _ = only('[zones.router]\ninterfaces = ["eth0"]\n')
    assert path == "zones.router"
    assert "not 'router'" in reason


def test_gateway_kind_protocol() -> None:
    text = BASE + GATEWAY.replace("tcp-relay", "rtp").format(name="a", zone="wan", ports="5004")
    path, reason, _ = only(text)
    assert path == "gateway[0].traffic[0].proto"
    assert reason == "a rtp gateway takes udp, not tcp"


def test_gateway_settings_are_per_kind() -> None:
    text = BASE + GATEWAY.format(name="a", zone="wan", ports="25") + "[gateway.settings]\nmax_connections = 0\nspeed = 3\n"
    found = problems(text)
    assert ("gateway[0].settings.max_connections", "0 is out of range (1 to 1000000)") in [(p, r) for p, r, _ in found]
    assert ("gateway[0].settings.speed", "unknown key") in [(p, r) for p, r, _ in found]


def test_a_removed_setting_says_what_replaced_it() -> None:
    text = BASE + GATEWAY.format(name="ftp", zone="wan", ports="21").replace("tcp-relay", "ftp")
    text += '[gateway.settings]\nmasquerade_address = "203.0.113.1"\n'
    path, reason, line = only(text)
    assert path == "gateway[0].settings.masquerade_address" and line == line_of(text, "masquerade_address")
    assert reason.startswith("no longer a setting: the processor tells the gateway the address it SNATs")


def test_gateway_listen_ports_default_and_clash() -> None:
    text = BASE + GATEWAY.format(name="a", zone="wan", ports="25") + GATEWAY.format(name="b", zone="wan", ports="26")
    config = loads(text)
    assert [g.listen_port for g in config.gateways] == [20000, 20001]
    clash = text.replace('name = "b"', 'name = "b"\nlisten_port = 20000')
    path, reason, _ = only(clash)
    assert path == "gateway[1].listen_port"


def test_gateway_workers_take_consecutive_ports() -> None:
    """workers = N: worker i listens on listen_port + i and signals on the next signalling port;
    the defaults of the gateways after it move up past its workers."""
    a = GATEWAY.format(name="a", zone="wan", ports="25").replace('kind = "tcp-relay"', 'kind = "tcp-relay"\nworkers = 3')
    text = BASE + a + GATEWAY.format(name="b", zone="wan", ports="26")
    config = loads(text)
    assert [list(g.listen_ports) for g in config.gateways] == [[20000, 20001, 20002], [20003]]
    assert list(config.gateway_signalling_ports("a")) == [7500, 7501, 7502]
    assert config.gateway_signalling_port("a", 2) == 7502 and config.gateway_signalling_port("b") == 7503
    path, reason, _ = only(text.replace('name = "b"', 'name = "b"\nlisten_port = 20002'))
    assert (path, reason) == ("gateway[1].listen_port", "20002 is already used by gateway[0]")
    path, reason, _ = only(text.replace('name = "b"', 'name = "b"\nlisten_port = 7502'))
    assert (path, reason) == ("gateway[1].listen_port", "7502 is a gateway signalling port (7500-7503)")
    path, reason, _ = only(text.replace("workers = 3", "workers = 65"))
    assert path == "gateway[0].workers"
    path, reason, _ = only(text.replace('name = "a"', 'name = "a"\nlisten_port = 65534'))
    assert (path, reason) == ("gateway[0].listen_port", "3 workers need ports up to 65536")


def test_check_and_manifest_name_each_worker(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from firewall.cli import main

    path = tmp_path / "nfgate.toml"
    a = GATEWAY.format(name="a", zone="wan", ports="25").replace('kind = "tcp-relay"', 'kind = "tcp-relay"\nworkers = 2')
    path.write_text(BASE + a + GATEWAY.format(name="b", zone="wan", ports="26"))
    shown = CliRunner().invoke(main, ["check", "-c", str(path)]).output
    assert "gateway a (tcp-relay), 2 workers, ports 20000-20001, 1 selectors" in shown
    assert "gateway b (tcp-relay), port 20002, 1 selectors" in shown
    second = json.loads(CliRunner().invoke(main, ["manifest", "-c", str(path), "a#1"]).output)
    assert (second["worker"], second["workers"], second["listen"]["port"], second["signalling"]["listen"]["port"]) == (
        1, 2, 20001, 7501)
    assert json.loads(CliRunner().invoke(main, ["manifest", "-c", str(path), "a"]).output)["worker"] == 0
    refused = CliRunner().invoke(main, ["manifest", "-c", str(path), "a#2"])
    assert refused.exit_code == 2 and "(configured: a#0, a#1, b)" in refused.output


def test_workers_only_for_kinds_that_allow_them() -> None:
    udp = GATEWAY.format(name="u", zone="wan", ports="53").replace('"tcp-relay"', '"udp-relay"\nworkers = 2')
    path, reason, _ = only(BASE + udp.replace('proto = "tcp"', 'proto = "udp"'))
    assert (path, reason) == ("gateway[0].workers", "a udp-relay gateway runs as one process")
    logger = GATEWAY.format(name="l", zone="wan", ports="25").replace('"tcp-relay"', '"tcp-relay"\nworkers = 2')
    path, reason, _ = only(BASE + logger + '[gateway.settings]\nmode = "log-only"\n')
    assert (path, reason) == ("gateway[0].workers", "a log-only gateway carries no flow: one process logs them all")


def test_port_forward_parsing_and_overlap() -> None:
    text = BASE + (
        "\n[[nat.forward]]\nfrom = 'wan'\nproto = 'tcp'\nport = 8080\nto = '192.168.1.10:80'\n"
        "\n[[nat.forward]]\nfrom = 'wan'\nproto = 'tcp'\nport = '8000-8100'\nto = '192.168.1.11'\n"
    )
    path, reason, _ = only(text)
    assert path == "nat.forward[1].port"
    assert "overlaps nat.forward[0]" in reason
    ok = loads(text.replace("'8000-8100'", "'9000-9100'"))
    assert ok.nat.forwards[0].target_ports == PortRange(80, 80)
    assert ok.nat.forwards[1].target_ports == PortRange(9000, 9100)


FORWARD = "\n[[nat.forward]]\nfrom = 'wan'\nproto = 'tcp'\nport = 8080\nto = '{to}'\n"


@pytest.mark.parametrize("to, addr, port", [
    ("192.168.1.10", "192.168.1.10", None),
    ("192.168.1.10:80", "192.168.1.10", 80),
    ("fd00:1::10", "fd00:1::10", None),
    ("[fd00:1::10]:80", "fd00:1::10", 80),
    ("[fd00:1::10]", "fd00:1::10", None),
])
def test_port_forward_targets_of_both_versions(to: str, addr: str, port: int | None) -> None:
    (f,) = loads(BASE + FORWARD.format(to=to)).nat.forward
    assert (f.to_addr, f.to_port, f.version) == (ipaddress.ip_address(addr), port, ipaddress.ip_address(addr).version)


@pytest.mark.parametrize("to, reason", [
    ("[2001:db8::1]:80x", "'80x' is not a port"),
    ("[2001:db8::1:80", "needs its closing ']'"),
    ("[2001:db8::1]80", "after ']' comes ':port' or nothing"),
    ("[192.168.1.10]:80", "is not an IPv6 address (brackets are for IPv6 with a port)"),
    ("2001:db8::zz", "is not an IPv6 address; with a port, write it as '[fd00:1::10]:80'"),
    ("host.example:80", "'host.example' is not an IPv4 address (an IPv6 one with a port is written"),
])
def test_port_forward_target_errors_say_how_to_write_it(to: str, reason: str) -> None:
    path, got, _ = only(BASE + FORWARD.format(to=to))
    assert path == "nat.forward[0].to" and reason in got, got
    assert "'[2001' is not an IPv4 address" not in got


def test_a_port_forward_per_ip_version_on_one_port() -> None:
    both = BASE + FORWARD.format(to="192.168.1.10:80") + FORWARD.format(to="[fd00:1::10]:80")
    config = loads(both)
    assert [f.version for f in config.nat.forward] == [4, 6]
    # The processor's double NAT stands only in front of IPv4 forwards.
    assert [f.version for f in config.nat.forwards] == [4] and [f.version for f in config.nat.forwards6] == [6]
    path, reason, _ = only(both + FORWARD.format(to="fd00:1::11"))
    assert path == "nat.forward[2].port" and "overlaps nat.forward[1]" in reason
    mixed = BASE + FORWARD.format(to="[fd00:1::10]:80") + "saddr = ['198.51.100.0/24']\n"
    path, reason, _ = only(mixed)
    assert path == "nat.forward[0].saddr" and "the forward is IPv6" in reason


def test_masquerade6_names_zones() -> None:
    assert loads(BASE + "[nat]\nmasquerade6 = ['wan']\n").nat.masquerade6 == ("wan",)
    path, reason, _ = only(BASE + "[nat]\nmasquerade6 = ['dmz']\n")
    assert path == "nat.masquerade6[0]" and "zone 'dmz' does not exist" in reason


def test_pool_must_cover_every_queue() -> None:
    text = BASE + "\n[processor]\nqueues = [0, 1, 2]\n[processor.pools]\nfirewall_side = '172.31.254.0/31'\n"
    path, reason, _ = only(text)
    assert path == "processor.pools.firewall_side"
    assert "fewer than 4 addresses for 3 queues" in reason


def test_pool_size_limit() -> None:
    path, reason, _ = only(BASE + "\n[processor.pools]\nfirewall_side = '10.0.0.0/15'\n")
    assert path == "processor.pools.firewall_side"
    assert "larger than /16" in reason


def test_blind_track_not_in_a_zone() -> None:
    text = BASE.replace('["lan0"]', '["lan0", "nfg-gw0"]')
    path, reason, _ = only(text)
    assert path == "gateway_link.router_if"


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such config file"):
        load(tmp_path / "absent.toml")


def test_no_traceback_from_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from firewall.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + "\n[processor]\nqueues = [70000]\n")
    result = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert result.exit_code == 2
    assert f"processor.queues[0] (line {line_of(bad.read_text(), 'queues')}): 70000 is out of range (0 to 65535)" in result.output
    assert "Traceback" not in result.output


def test_signalling_ports_per_process() -> None:
    text = BASE + GATEWAY.format(name="a", zone="wan", ports="25") + GATEWAY.format(name="b", zone="wan", ports="26")
    config = loads(text + "\n[processor]\nqueues = [3, 4, 5]\n")
    assert [config.processor_signalling_port(i) for i in range(3)] == [7500, 7501, 7502]
    assert [config.gateway_signalling_port(g) for g in ("a", "b")] == [7500, 7501]
    clash = text.replace('name = "b"', 'name = "b"\nlisten_port = 7501')
    path, reason, _ = only(clash)
    assert path == "gateway[1].listen_port"
    assert reason == "7501 is a gateway signalling port (7500-7501)"


TUNNEL = """
[[gateway]]
name = "tunnel"
kind = "tunnel"
[[gateway.traffic]]
from = "wan"
to = "{to}"
proto = "tcp"
ports = 7443
"""


def test_tunnel_gateway_needs_its_service_port_steered() -> None:
    found = problems(BASE + TUNNEL.format(to="router"))
    assert [(p, r) for p, r, _ in found] == [
        ("gateway[0].traffic", "no udp selector brings settings.service_port 7443 to the tunnel gateway")
    ]
    found = problems(BASE + TUNNEL.format(to="lan"))
    assert ("gateway[0].traffic[0].to", "a tunnel gateway terminates its flows: 'to' must be \"router\"") in [
        (p, r) for p, r, _ in found
    ]
    both = BASE + TUNNEL.format(to="router") + '[[gateway.traffic]]\nfrom = "wan"\nto = "router"\nproto = "udp"\nports = 7443\n'
    assert loads(both).gateways[0].kind == "tunnel"


def test_expect_bits_number_the_instances() -> None:
    marks = Marks()
    assert [marks.expect_value(i) for i in range(4)] == [0x00080000, 0x00100000, 0x00180000, 0x00200000]
    spread = Marks(mask=0xFF, rewritten=0x01, passed=0x02, allowed=0x04, expect=0x28)  # two bits, apart
    assert [spread.expect_value(i) for i in range(3)] == [0x08, 0x20, 0x28]


def test_marks_not_given_are_derived_from_the_mask() -> None:
    cfg = loads(BASE + "\n[processor]\nqueues = [0, 1, 2]\n[processor.marks]\nmask = '0x3f000000'\n"
                "rewritten = '0x01000000'\npassed = '0x02000000'\n")
    marks = cfg.processor.marks
    assert (marks.allowed, marks.expect) == (0x04000000, 0x38000000)


def test_too_few_expect_bits_for_the_queues_is_refused() -> None:
    text = BASE + "\n[processor]\nqueues = [0, 1]\n[processor.marks]\nmask = '0x0f'\nrewritten = '0x1'\npassed = '0x2'\n"
    path, reason, _ = only(text)
    assert path == "processor.marks.expect"
    assert "numbers at most 1 processor instances" in reason and "give the mask more bits" in reason


def test_gateway_settings_travel_as_json_and_back() -> None:
    """The manifest carries a gateway's settings as JSON values; the gateway
    validates them with the same model (a removed key is not among them)."""
    text = BASE + GATEWAY.format(name="ftp", zone="wan", ports="21").replace("tcp-relay", "ftp")
    text += '[gateway.settings]\nallow_commands = ["SITE"]\nidle_timeout = 60\n'
    settings = loads(text).gateways[0].settings
    assert settings.allow_commands == ("SITE",) and settings.idle_timeout == 60.0
    assert "masquerade_address" not in settings.model_dump(mode="json")
    for value in [kind.settings() for kind in KINDS] + [settings]:
        assert type(value).model_validate(value.model_dump(mode="json")) == value


def test_exec_refuses_what_has_no_gateway_namespace_to_enter(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from firewall.cli import main

    path = tmp_path / "nfgate.toml"
    path.write_text(BASE + f'\n[supervisor]\ncontrol_socket = "{tmp_path}/control.sock"\n')
    got = CliRunner().invoke(main, ["exec", "-c", str(path), "--", "ss", "-tn"])
    assert got.exit_code == 2 and "no [[gateway]] configured, so no gateway namespace" in got.output, got.output
    path.write_text(BASE + GATEWAY.format(name="a", zone="wan", ports="25")
                    + f'\n[supervisor]\ncontrol_socket = "{tmp_path}/control.sock"\n')
    got = CliRunner().invoke(main, ["exec", "-c", str(path), "--"])
    assert got.exit_code == 2 and "Missing argument 'COMMAND...'" in got.output, got.output
    got = CliRunner().invoke(main, ["exec", "-c", str(path), "--", "ss", "-tn"])  # nothing runs there
    assert got.exit_code == 1 and f"nfgate is not running here (no control socket {tmp_path}/control.sock)" in got.output
