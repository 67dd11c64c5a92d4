"""Config problems: what is wrong, at which key path, on which line.

Every TOML file nfgate reads (nfgate.toml, the tunnel's server, mediators
and mediator files) is validated by pydantic models (``firewall.fields``
holds their shared field types). ``problems_of`` turns pydantic's errors
into ``Problem``s with the TOML key path (``gateway[1].traffic[0].ports``)
and today's one-line reasons, so that one run of ``nfgate check`` reports
every problem at once (DESIGN.md invariant 10). Checks across fields that
run after the fields are valid append theirs to the validation context's
``problems`` list (``report``).

Only pydantic and the standard library: the tunnel and the gateways use it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ValidationError

from firewall.errors import UsageError
from firewall.locate import locate


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path} (line {self.line})" if self.line else self.path
        return f"{where}: {self.reason}"


class ConfigError(UsageError):
    """A config that cannot be used; ``problems`` lists every reason."""

    def __init__(self, path: Path | None, problems: list[Problem]):
        self.path = path
        self.problems = problems
        where = str(path) if path else "config"
        lines = [f"{where}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def key_path(loc: Iterable[str | int]) -> str:
    path = ""
    for key in loc:
        path = join(path, key)
    return path or "(top level)"


def kind_of(value: Any) -> str:
    """How a TOML value is named in a reason: 'a string', 'an array'."""
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def problems_of(err: ValidationError, tags: Sequence[str] = ()) -> list[Problem]:
    """pydantic's errors as key paths and reasons.

    ``tags`` are the values of a discriminated union's tag (the gateway
    kinds): pydantic puts the tag in the location after the list index,
    where the TOML has none.
    """
    out = []
    for e in err.errors(include_url=False):
        loc: list[str | int] = []
        for key in e["loc"]:
            if key == "[key]" or (key in tags and loc and isinstance(loc[-1], int)):
                continue  # a dict key's own check; a union's tag
            loc.append(key)
        ctx = e.get("ctx") or {}
        kind, value = e["type"], e.get("input")
        if kind == "nfgate":
            reason = ctx["reason"]
        elif kind == "extra_forbidden":
            reason = "unknown key"
        elif kind == "missing":
            reason = "is required"
        elif kind in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
            reason = f"expected a table, got {kind_of(value)}"
        elif kind in ("tuple_type", "list_type"):
            reason = f"expected an array, got {kind_of(value)}"
        elif kind == "union_tag_invalid":
            loc.append(ctx["discriminator"].strip("'"))
            reason = f"{ctx['tag']!r} is not one of {ctx['expected_tags']}"
        elif kind == "union_tag_not_found":
            loc.append(ctx["discriminator"].strip("'"))
            reason = "is required"
        else:
            reason = e["msg"]
        out.append(Problem(key_path(loc), reason))
    return out


def validate(model: type[BaseModel], doc: Any, context: dict[str, Any], tags: Sequence[str] = ()) -> tuple[Any, list[Problem]]:
    """The model and every problem: the field errors, then what the checks
    across fields reported into ``context["problems"]``."""
    reported: list[Problem] = context.setdefault("problems", [])
    try:
        value = model.model_validate(doc, context=context)
    except ValidationError as err:
        return None, problems_of(err, tags) + reported
    return value, list(reported)


def located(text: str, problems: list[Problem]) -> list[Problem]:
    return [Problem(p.path, p.reason, locate(text, p.path)) for p in problems]


def parse_toml(text: str, path: Path | None) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError(path, [Problem("(toml)", str(err))]) from None
