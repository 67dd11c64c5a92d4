"""Load and validate nfgate's TOML config.

- ``model``: the config as frozen pydantic models, which validate the TOML
  too (field types from ``firewall.fields``, defaults written once).
- ``settings``: each gateway kind's protocols and settings model.
- ``load(path)`` / ``loads(text)``: parse, validate, and return a ``Config``, or
  raise ``ConfigError`` carrying every problem at once, each with its key
  path and line (``firewall.problems``, ``firewall.locate``).
- ``schema()``: the JSON Schema of nfgate.toml (``nfgate config schema``).

docs/config.md is the reference for every key; keep it in step with the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from firewall.config.model import MAX_QUEUES, Config, PortRange, bucket_count
from gateways.kinds import KINDS
from firewall.errors import UsageError
from firewall.fields import NAME
from firewall.locate import locate
from firewall.problems import ConfigError, Problem, located, parse_toml, validate

__all__ = [
    "Config", "ConfigError", "MAX_QUEUES", "NAME", "PortRange", "Problem", "bucket_count", "load", "loads",
    "locate", "schema",
]

def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file (give one with --config)") from None
    except PermissionError:
        raise UsageError(f"{path}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason})") from None
    return loads(text, path)


def loads(text: str, path: Path | None = None) -> Config:
    doc = parse_toml(text, path)
    zones = doc.get("zones")
    context: dict[str, Any] = {"zones": tuple(zones) if isinstance(zones, dict) else ()}
    config, problems = validate(Config, doc, context, tags=KINDS.names())
    if problems:
        raise ConfigError(path, located(text, problems))
    return config.model_copy(update={"path": path})


class _TomlDefaults(GenerateJsonSchema):
    """Defaults shown as the TOML writes them: a port range as "1024-65535"."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, PortRange):
            return str(dft)
        return super().encode_default(dft)


def schema() -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) of nfgate.toml, with the TOML's key names."""
    out = {"$schema": GenerateJsonSchema.schema_dialect}
    out.update(Config.model_json_schema(by_alias=True, mode="validation", schema_generator=_TomlDefaults))
    out["title"] = "nfgate.toml"
    return out
