"""One log line per tunnel event, as ``key=value`` text or as JSON lines.

The mediator's owner and the server's operator both need to see what the
tunnel did on their behalf: every refusal of the owner's allow-list, every
session, every publish and relayed connection (DESIGN.md invariant 10:
nothing is lost, every close says why). Events go through the standard
``logging`` module under ``nfgate.tunnel``, so tests read them from
``caplog`` and a supervisor from the process's stderr. The format is the
gateways' (gateways/layer/events.py), so one tool reads both.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "nfgate.tunnel"


def _plain(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name if isinstance(value, enum.IntEnum) else value.value
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class EventLog:
    """Emits the events of one tunnel role (``server`` or ``mediator``)."""

    def __init__(self, role: str, logger: logging.Logger | None = None) -> None:
        self.role = role
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)

    def emit(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        plain = {k: _plain(v) for k, v in fields.items()}
        self.logger.log(level, "%s", event, extra={"event": event, "role": self.role, "fields": plain})

    def warn(self, event: str, **fields: Any) -> None:
        self.emit(event, logging.WARNING, **fields)


def _text_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2024-01-02T03:04:05.678Z mediator ready session=7 version=1``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        event = getattr(record, "event", None)
        if event is None:
            return f"{stamp} {record.getMessage()}"
        parts = [stamp, getattr(record, "role", "-"), event]
        for key, value in getattr(record, "fields", {}).items():
            if isinstance(value, Mapping):
                parts += [f"{key}.{k}={_text_value(v)}" for k, v in value.items()]
            else:
                parts.append(f"{key}={_text_value(value)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``role``, ``event``, fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        event = getattr(record, "event", None)
        if event is None:
            doc["message"] = record.getMessage()
        else:
            doc["role"] = getattr(record, "role", None)
            doc["event"] = event
            for key, value in getattr(record, "fields", {}).items():
                doc.setdefault(key, value)
        return json.dumps(doc, separators=(",", ":"))


def configure(json_lines: bool = False, stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Send the tunnel's events to stderr (or ``stream``), one line each."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return handler
