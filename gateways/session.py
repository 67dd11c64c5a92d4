"""Outputs every sans-IO gateway session core shares (the FTP and SMTP cores).

Each core returns a list of outputs that its asyncio adapter carries out in
order; besides its own (bytes to a side, a rule request, STARTTLS), every
core may ask to close the session and to count and log an event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Close:
    """Close the session (both legs); ``reason`` goes to the log."""

    reason: str


@dataclass(frozen=True)
class Event:
    """Something to count and log: ``name`` is the counter, ``fields`` the log line's details."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
