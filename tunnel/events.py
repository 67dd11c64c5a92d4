"""One log line per tunnel event (the shared format: firewall/eventlog.py).

The mediator's owner and the server's operator both need to see what the
tunnel did on their behalf: every refusal of the owner's allow-list, every
session, every publish and relayed connection. Records go to the
``nfgate.tunnel`` logger with ``role`` (server or mediator) as their source,
in the same format as the gateways', so one tool reads both.
"""

from __future__ import annotations

import logging
from typing import Any

from firewall import eventlog

LOGGER_NAME = "nfgate.tunnel"


class EventLog(eventlog.EventLog):
    """Emits the events of one tunnel role (``server`` or ``mediator``)."""

    def __init__(self, role: str, logger: logging.Logger | None = None) -> None:
        super().__init__("role", role, logger if logger is not None else logging.getLogger(LOGGER_NAME))
        self.role = role


def configure(json_lines: bool = False, stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Send the tunnel's events to stderr (or ``stream``), one line each."""
    return eventlog.configure(LOGGER_NAME, "role", json_lines, stream, level)
