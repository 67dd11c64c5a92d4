"""The one shape of every ``--json`` output, for ``nfgate`` and its groups.

Every ``--json`` output is one JSON document that carries ``schema_version``
(``JSON_SCHEMA_VERSION``, raised when a key changes meaning or goes away), and
a ``--json`` command that fails prints ``{"schema_version", "error",
"exit_code"}`` (with ``problems`` for a bad config) on stdout, so a script
reads JSON either way. ``nfgate``, ``nfgate lab`` and ``nfgate tunnel`` share
this module, so no command group's JSON differs from another's.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from firewall.errors import NfgateError
from firewall.problems import ConfigError

JSON_SCHEMA_VERSION = 1  # of every --json document (module docstring)


def echo_json(doc: Any) -> None:
    """One --json document, with its schema version; a list goes under ``items``."""
    body = doc if isinstance(doc, dict) else {"items": doc}
    click.echo(json.dumps({"schema_version": JSON_SCHEMA_VERSION, **body}, indent=2))


def json_errors(command: Callable[..., None]) -> Callable[..., None]:
    """With --json, a failure is a JSON document on stdout too (and the same exit code)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except NfgateError as err:
            if not kwargs.get("as_json"):
                raise
            doc: dict[str, Any] = {"error": str(err), "exit_code": err.exit_code}
            if isinstance(err, ConfigError):
                doc["problems"] = [{"path": p.path, "reason": p.reason, "line": p.line} for p in err.problems]
            echo_json(doc)
            sys.exit(err.exit_code)

    return wrapper
