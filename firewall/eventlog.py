"""One log line per event, as ``key=value`` text or as JSON lines.

Gateways and the tunnel log what an operator must be able to see: every
relayed connection with its real client and server, every refusal, every
close and why (DESIGN invariant 10). Events go through the standard
``logging`` module, so tests read them from ``caplog`` and the supervisor
from the process's stderr: each record carries ``event`` (a short name),
``fields`` (a dict of plain values) and one "source" attribute naming who
speaks (``gateway`` for a gateway process, ``role`` for the tunnel's server
or mediator). The two formatters render the same record either way, so one
tool reads every nfgate log.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from firewall.signalling import Endpoint


# Values that are plain already: most fields of a busy gateway's lines.
_PLAIN = frozenset({str, int, bool, type(None)})


def plain(value: Any) -> Any:
    """A JSON- and text-friendly form of a field value."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (Endpoint, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name if isinstance(value, enum.IntEnum) else value.value
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class EventLog:
    """Emits the events of one speaker: ``source_key`` = ``source`` on each record."""

    def __init__(self, source_key: str, source: str, logger: logging.Logger) -> None:
        self.source_key = source_key
        self.source = source
        self.logger = logger

    def emit(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        values = {k: plain(v) for k, v in fields.items()}
        # Logger.log without its findCaller (a walk up the stack per line):
        # no formatter of ours shows where a line came from, and a gateway
        # logs two lines per connection.
        record = logger.makeRecord(logger.name, level, "", 0, "%s", (event,), None,
                                   extra={"event": event, self.source_key: self.source, "fields": values})
        logger.handle(record)

    def warn(self, event: str, **fields: Any) -> None:
        self.emit(event, logging.WARNING, **fields)


# What makes a text value need quotes: white space (as str.isspace has it), a quote or an equals sign.
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _text_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    text = value if type(value) is str else str(value)
    if not text or _NEEDS_QUOTES.search(text) is not None:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2024-01-02T03:04:05.678Z nas-log open client=... server=...``"""

    def __init__(self, source_key: str) -> None:
        super().__init__()
        self.source_key = source_key
        self._second = -1  # the second whose date and time are in _prefix
        self._prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._prefix}.{int(record.msecs):03d}Z"
        event = getattr(record, "event", None)
        if event is None:
            return f"{stamp} {record.getMessage()}"
        parts = [stamp, getattr(record, self.source_key, "-"), event]
        for key, value in getattr(record, "fields", {}).items():
            if isinstance(value, Mapping):
                parts += [f"{key}.{k}={_text_value(v)}" for k, v in value.items()]
            else:
                parts.append(f"{key}={_text_value(value)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, the source, ``event``, then the fields."""

    def __init__(self, source_key: str) -> None:
        super().__init__()
        self.source_key = source_key

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        event = getattr(record, "event", None)
        if event is None:
            doc["message"] = record.getMessage()
        else:
            doc[self.source_key] = getattr(record, self.source_key, None)
            doc["event"] = event
            for key, value in getattr(record, "fields", {}).items():
                doc.setdefault(key, value)
        return json.dumps(doc, separators=(",", ":"))


def configure(
    logger_name: str, source_key: str, json_lines: bool = False, stream: Any = None, level: int = logging.INFO
) -> logging.Handler:
    """Send one logger's events to stderr (or ``stream``), one line each."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(source_key) if json_lines else TextFormatter(source_key))
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return handler
