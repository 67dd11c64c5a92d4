"""Best-effort line numbers for config key paths.

tomllib gives line numbers only for syntax errors. For a validation problem we
scan the text for the table headers and keys of the path (``gateway[1].traffic[0].ports``
is the key ``ports`` under the second ``[[gateway]]``'s first ``[[gateway.traffic]]``).
Inline tables and dotted keys fall back to the line of the enclosing header;
a path we cannot place gets no line rather than a wrong one.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")
_STEP = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _steps(path: str) -> list[str]:
    """'gateway[1].traffic[0].ports' -> ['gateway[1]', 'traffic[0]', 'ports']"""
    return [m.group(0) for m in _STEP.finditer(path)]


def locate(text: str, path: str) -> int | None:
    steps = _steps(path)
    if not steps:
        return None
    counts: dict[str, int] = {}
    current = ""  # the current table, in path form with indexes
    header_line: dict[str, int] = {}
    key_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            bracket, name = m.group(1), m.group(2)
            parts = [p.strip().strip('"') for p in name.split(".")]
            if bracket == "[[":
                # An array of tables: its index counts within the parent element.
                parent = _resolve(parts[:-1], counts)
                base = f"{parent}.{parts[-1]}" if parent else parts[-1]
                counts[base] = counts.get(base, -1) + 1
                current = f"{base}[{counts[base]}]"
            else:
                current = _resolve(parts, counts)
            header_line.setdefault(current, lineno)
            continue
        k = _KEY.match(line)
        if k:
            key = k.group(1).strip('"')
            full = f"{current}.{key}" if current else key
            key_line.setdefault(full, lineno)
    # Longest prefix of the path that we saw, as a key or as a header.
    for n in range(len(steps), 0, -1):
        prefix = ".".join(steps[:n])
        bare = re.sub(r"\[\d+\]$", "", prefix)
        for candidate in (prefix, bare):
            if candidate in key_line:
                return key_line[candidate]
            if candidate in header_line:
                return header_line[candidate]
    return None


def _resolve(parts: list[str], counts: dict[str, int]) -> str:
    """Give each array-of-tables step in a header its current index."""
    out = ""
    for part in parts:
        base = f"{out}.{part}" if out else part
        out = f"{base}[{counts[base]}]" if base in counts else base
    return out
