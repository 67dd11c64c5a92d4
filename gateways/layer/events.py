"""One log line per gateway event, as ``key=value`` text or as JSON lines.

A gateway's log is how an operator sees what the seed's transparency hides:
every relayed connection appears with its real client and server, and the
addresses it had on the blind track (DESIGN invariant 10: nothing is lost,
every close says why). Events go through the standard ``logging`` module, so
a test reads them from ``caplog`` and a supervisor from the process's stderr:
each record carries ``event`` (a short name) and ``fields`` (a dict of plain
values), and the two formatters below render the same record either way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from typing import Any, Mapping

from firewall.signalling import Endpoint

LOGGER_NAME = "nfgate.gateways"


def _plain(value: Any) -> Any:
    """A JSON- and text-friendly form of a field value."""
    if isinstance(value, (Endpoint, ipaddress.IPv4Address)):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class EventLog:
    """Emits the events of one gateway process."""

    def __init__(self, gateway: str, logger: logging.Logger | None = None) -> None:
        self.gateway = gateway
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)

    def emit(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        plain = {k: _plain(v) for k, v in fields.items()}
        self.logger.log(level, "%s", event, extra={"event": event, "gateway": self.gateway, "fields": plain})


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2024-01-02T03:04:05.678Z nas-log open client=... server=...``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        event = getattr(record, "event", None)
        if event is None:
            return f"{stamp} {record.getMessage()}"
        fields: Mapping[str, Any] = getattr(record, "fields", {})
        parts = [stamp, getattr(record, "gateway", "-"), event]
        for key, value in fields.items():
            if isinstance(value, Mapping):
                parts += [f"{key}.{k}={_text_value(v)}" for k, v in value.items()]
            else:
                parts.append(f"{key}={_text_value(value)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``gateway``, ``event``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        event = getattr(record, "event", None)
        if event is None:
            doc["message"] = record.getMessage()
        else:
            doc["gateway"] = getattr(record, "gateway", None)
            doc["event"] = event
            for key, value in getattr(record, "fields", {}).items():
                doc.setdefault(key, value)
        return json.dumps(doc, separators=(",", ":"))


def configure(json_lines: bool, stream: Any = None) -> logging.Handler:
    """Send the gateways' events to stderr (or ``stream``), one line each."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
