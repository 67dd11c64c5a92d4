"""docs/config.md names every key the loader accepts, with the default the code uses
(the pydantic models' defaults, and the keys their JSON Schema names)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from firewall.config import model
from firewall.config.ha import Ha
from firewall.fields import PortRange
from gateways.kinds import KINDS

DOC = (Path(__file__).parents[2] / "docs" / "config.md").read_text()

SECTIONS = {
    "[processor]": model.Processor,
    "[policy]": model.Policy,
    "[processor.marks]": model.Marks,
    "[processor.timeouts]": model.Timeouts,
    "[processor.pools]": model.Pools,
    "[gateway_link]": model.GatewayLink,
    "[signalling]": model.Signalling,
    "[supervisor]": model.Supervisor,
    "[log]": model.Log,
    "[metrics]": model.Metrics,
    "[ha]": Ha,
}


def section(header: str) -> str:
    start = DOC.index(f"## `{header}`") if f"## `{header}`" in DOC else DOC.index(f"### `{header}`")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end > 0 else None]


def keys(cls: type[BaseModel]) -> dict[str, Any]:
    """TOML key -> default, of the keys a table takes (not its nested tables,
    which have no plain default, nor the refused ones, not in the schema)."""
    schema = cls.model_json_schema(by_alias=True)["properties"]
    out = {}
    for name, f in cls.model_fields.items():
        key = f.alias or name
        if key in schema and f.default is not PydanticUndefined:
            out[key] = f.default
    return out


def documented(text: str) -> dict[str, str]:
    """key -> default cell, from the tables of a section."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", text, re.M)}


@pytest.mark.parametrize("header", SECTIONS)
def test_every_key_and_default_is_documented(header: str) -> None:
    rows = documented(section(header))
    assert keys(SECTIONS[header])
    for key, default in keys(SECTIONS[header]).items():
        assert key in rows, f"{header} {key} is missing from docs/config.md"
        shown = rows[key].strip("`").strip('"')
        if isinstance(default, bool):
            assert shown == str(default).lower()
        elif key in ("mask", "rewritten", "passed", "allowed", "expect"):
            assert int(shown, 16) == default
        elif isinstance(default, tuple):
            assert shown == str(list(default)), (header, key)
        elif isinstance(default, (int, float)):
            assert float(shown) == float(default), (header, key)
        else:
            assert shown == str(default), (header, key)


def test_gateway_settings_are_documented() -> None:
    text = section("[[gateway]]")
    for kind, settings in ((k.name, k.settings) for k in KINDS):
        for key, default in keys(settings).items():
            row = re.search(rf"^\| `{key}` \| `([^`]+)` \|", text[text.index(f"`{kind}`:") :], re.M)
            assert row, f"{kind}.{key} is missing from docs/config.md"
            if isinstance(default, bool):
                assert row.group(1) == str(default).lower(), (kind, key)
            elif isinstance(default, (str, tuple)):
                assert row.group(1) == shown_as(default), (kind, key)
            elif isinstance(default, PortRange):
                assert row.group(1) == f'"{default}"', (kind, key)
            else:
                assert float(row.group(1)) == float(default), (kind, key)


def test_no_gateway_setting_is_documented_that_the_loader_refuses() -> None:
    """The converse: a key removed from a kind (ftp's masquerade_address) leaves its doc row too."""
    text = section("[[gateway]]")
    for kind, settings in ((k.name, k.settings) for k in KINDS):
        schema = keys(settings)
        if not schema:
            continue
        after = text[text.index(f"`{kind}`:") :].splitlines()
        start = next(i for i, line in enumerate(after) if line.startswith("| key |"))
        rows = []
        for line in after[start + 2 :]:
            if not line.startswith("| `"):
                break
            rows.append(line.split("`")[1])
        assert rows and set(rows) <= set(schema), (kind, sorted(set(rows) - set(schema)))


def shown_as(default: str | tuple) -> str:
    """How docs/config.md writes a string or list default: as TOML."""
    if isinstance(default, str):
        return f'"{default}"'
    return "[" + ", ".join(f'"{v}"' for v in default) + "]"
