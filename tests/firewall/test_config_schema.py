"""`nfgate config schema`: the JSON Schema editors check nfgate.toml with.

Every shipped config passes it; a document with an unknown key, a value of
the wrong type, or a setting its gateway kind does not take fails it; and
it speaks the TOML's names, with each key's meaning.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from firewall.cli import main
from tests.firewall.test_config import BASE as CONFIG_BASE
from tests.firewall.test_config import GATEWAY

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "examples").glob("*.toml")) + sorted((ROOT / "examples" / "lab").glob("*.toml"))

# A tcp-relay gateway with a setting: every part the schema describes by kind.
BASE = CONFIG_BASE + GATEWAY.format(name="relay", zone="wan", ports='["8000-8080", 25]') + """[gateway.settings]
max_connections = 10
"""


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    result = CliRunner().invoke(main, ["config", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(validator: Draft202012Validator, text: str) -> list[Any]:
    return list(validator.iter_errors(tomllib.loads(text)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_passes(validator: Draft202012Validator, path: Path) -> None:
    assert list(validator.iter_errors(tomllib.loads(path.read_text()))) == []


def test_the_lab_config_is_among_them() -> None:
    assert ROOT / "examples" / "lab" / "basic.toml" in CONFIGS


def test_a_valid_document_passes(validator: Draft202012Validator) -> None:
    assert errors(validator, BASE) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("[[gateway]]", "colour = 'red'\n[[gateway]]"), "colour"),  # an unknown key, at the top
        (("max_connections = 10", "max_connections = 10\nspeed = 3"), "speed"),  # not a tcp-relay setting
        (("max_connections = 10", "max_connections = 'ten'"), "ten"),  # the wrong type
        (("max_connections = 10", "max_connections = 0"), "0"),  # below its bound
        (("ports = [", "ports = [70000, "), "70000"),
        (("from = \"wan\"", "from_zone = \"wan\""), "from_zone"),  # the TOML's name is 'from'
        (("kind = \"tcp-relay\"", "kind = \"telnet\""), "telnet"),
        (("[zones.lan]", "[zones.LAN]"), "LAN"),
        (("[[gateway]]", "[processor.timeouts]\ntcp_idle = 30\n[[gateway]]"), "tcp_idle"),  # a removed key
    ],
)
def test_an_invalid_document_fails(validator: Draft202012Validator, change: tuple[str, str], where: str) -> None:
    text = BASE.replace(*change, 1)
    assert text != BASE
    found = errors(validator, text)
    assert found and any(where in str(e.message) or where in json.dumps(list(e.path)) for e in found), found


def test_it_names_the_toml_keys_with_their_meaning(validator: Draft202012Validator) -> None:
    schema = validator.schema
    assert {"zones", "policy", "rule", "nat", "processor", "gateway_link", "signalling", "gateway", "supervisor", "log",
            "metrics", "ha"} == set(
        schema["properties"]
    )
    rule = schema["$defs"]["FilterRule"]["properties"]
    assert {"from", "to"} <= set(rule) and not {"from_zone", "to_zone", "source"} & set(rule)
    fail_mode = schema["$defs"]["Processor"]["properties"]["fail_mode"]
    assert fail_mode["enum"] == ["open", "closed"] and fail_mode["default"] == "closed" and fail_mode["description"]
    assert schema["$defs"]["Pools"]["properties"]["snat_ports"]["default"] == "61000-65535"
    settings = schema["$defs"]["FtpSettings"]["properties"]
    assert settings["max_line_length"]["description"].startswith("bytes of one command or reply line")
    assert "masquerade_address" not in settings
