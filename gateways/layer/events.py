"""One log line per gateway event (the shared format: firewall/eventlog.py).

A gateway's log is how an operator sees what the seed's transparency hides:
every relayed connection appears with its real client and server, and the
addresses it had on the blind track. Records carry ``gateway`` as their
source; a test reads them from ``caplog``, the supervisor from stderr.
"""

from __future__ import annotations

import logging
from typing import Any

from firewall import eventlog

LOGGER_NAME = "nfgate.gateways"


class EventLog(eventlog.EventLog):
    """Emits the events of one gateway process."""

    def __init__(self, gateway: str, logger: logging.Logger | None = None) -> None:
        super().__init__("gateway", gateway, logger if logger is not None else logging.getLogger(LOGGER_NAME))
        self.gateway = gateway


def configure(json_lines: bool, stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Send the gateways' events to stderr (or ``stream``), one line each."""
    return eventlog.configure(LOGGER_NAME, "gateway", json_lines, stream, level)
