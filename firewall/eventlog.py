"""One log line per event, as ``key=value`` text or as JSON lines.

Gateways and the tunnel log what an operator must be able to see: every
relayed connection with its real client and server, every refusal, every
close and why (DESIGN invariant 10). Events go through the standard
``logging`` module, so tests read them from ``caplog`` and the supervisor
from the process's stderr: each record carries ``event`` (a short name),
``fields`` (a dict of plain values) and one "source" attribute naming who
speaks (``gateway`` for a gateway process, ``role`` for the tunnel's server
or mediator). The two formatters render the same record either way, so one
tool reads every nfgate log. While the handler ``configure`` gave an event
logger is its only way out (no other handler, no filter, no propagation),
``EventLog.emit`` writes that handler's very line itself, without a
``LogRecord`` and the module's dispatch: less than half the cost of a line,
and a gateway writes two a connection.

Every line starts with its time (text: ISO 8601 UTC; JSON: ``ts``, Unix
seconds) and carries its level (JSON: ``level``). When stderr is the journal
(systemd sets ``JOURNAL_STREAM`` to its device and inode), each line starts
with the syslog priority as ``<N>`` (sd-daemon(3)), which journald takes as the
entry's priority and strips, so ``journalctl -p warning`` works and a JSON line
stays JSON. In JSON, an event that names a flow's original tuple (``client``
and ``original_dst``, the gateways' open/close events) also carries it as
``src_ip``, ``src_port``, ``dest_ip``, ``dest_port``, as Suricata's eve.json
names them. ``configure_process`` sends every other record of a process (the
supervisor's and processor's lines, a library's warning, an uncaught
exception) the same way, so under ``[log] format = "json"`` every line a
process writes parses.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, cast

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
        handler = _DIRECT.get(logger.name)
        if handler is not None and _direct_ok(logger, handler, level):
            _write_direct(handler, self, event, level, fields)
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


# sd-daemon(3) / syslog(3) priorities of Python's levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: the nearest named level at or above it."""
    for level in sorted(_PRIORITY):
        if levelno <= level:
            return _PRIORITY[level]
    return 2


def to_journal(stream: Any) -> bool:
    """Whether ``stream`` is the journal's stream that systemd connected (``JOURNAL_STREAM``)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _endpoint(text: Any) -> tuple[str, int] | None:
    """``"192.0.2.1:25"`` as (address, port); None for anything else."""
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


class _Formatter(logging.Formatter, abc.ABC):
    def __init__(self, source_key: str, name: str = "", journal: bool = False) -> None:
        super().__init__()
        self.source_key = source_key
        self.name = name  # who speaks in records that are not events ("nfgate run")
        self.journal = journal
        self._second = -1  # the second whose date and time are in _prefix
        self._prefix = ""

    def stamp(self, record: logging.LogRecord) -> str:
        return self.stamp_at(record.created)

    def stamp_at(self, created: float) -> str:
        """``2024-01-02T03:04:05.678Z``; the date and time formatted once a second."""
        second = int(created)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if event is not None and not record.exc_info:
            return self.event_line(record.created, record.levelno, getattr(record, self.source_key, None), event,
                                   getattr(record, "fields", {}))
        line = self.render(record)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line

    def event_line(self, created: float, levelno: int, source: Any, event: str, fields: Mapping[str, Any]) -> str:
        """An event's whole line, the journal's priority prefix included; ``fields`` as given to ``emit``."""
        line = self.render_event(created, levelno, source, event, fields)
        return f"<{priority(levelno)}>{line}" if self.journal else line

    @abc.abstractmethod
    def render(self, record: logging.LogRecord) -> str:
        """The line of a record that is not an event (or has an exception), without the journal's prefix."""

    @abc.abstractmethod
    def render_event(self, created: float, levelno: int, source: Any, event: str, fields: Mapping[str, Any]) -> str:
        """An event's line, without the journal's priority prefix."""


class TextFormatter(_Formatter):
    """``2024-01-02T03:04:05.678Z nas-log open client=... server=...``"""

    def render(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if event is None:
            stamp = self.stamp(record)
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            text = f"{stamp} {self.name}: {level}{record.getMessage()}" if self.name else f"{stamp} {level}{record.getMessage()}"
        else:
            text = self.render_event(record.created, record.levelno, getattr(record, self.source_key, "-"), event,
                                     getattr(record, "fields", {}))
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text

    def render_event(self, created: float, levelno: int, source: Any, event: str, fields: Mapping[str, Any]) -> str:
        parts = [self.stamp_at(created), "-" if source is None else source, event]
        for key, value in fields.items():
            kind = type(value)
            if kind is int:  # most fields of a busy process's lines: no quoting to decide
                parts.append(f"{key}={value}")
                continue
            if kind is str:
                parts.append(f"{key}={value}" if value and _NEEDS_QUOTES.search(value) is None
                             else f"{key}={json.dumps(value)}")
                continue
            value = plain(value)
            if isinstance(value, dict):  # what ``plain`` makes of a Mapping
                parts += [f"{key}.{k}={_text_value(v)}" for k, v in value.items()]
            else:
                parts.append(f"{key}={_text_value(value)}")
        return " ".join(parts)


class JsonFormatter(_Formatter):
    """One JSON object per line: ``ts``, ``level``, the source, ``event``, then the fields."""

    def render(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if event is None:
            doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
            if self.name:
                doc["process"] = self.name
            doc["message"] = record.getMessage()
        else:
            doc = self._event_doc(record.created, record.levelno, getattr(record, self.source_key, None), event,
                                  getattr(record, "fields", {}))
        if record.exc_info:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(doc, separators=(",", ":"))

    def render_event(self, created: float, levelno: int, source: Any, event: str, fields: Mapping[str, Any]) -> str:
        return json.dumps(self._event_doc(created, levelno, source, event, fields), separators=(",", ":"))

    def _event_doc(self, created: float, levelno: int, source: Any, event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {"ts": round(created, 3), "level": logging.getLevelName(levelno).lower(),
                               self.source_key: source, "event": event}
        values = {key: value if type(value) in _PLAIN else plain(value) for key, value in fields.items()}
        for key, value in values.items():
            doc.setdefault(key, value)
        src, dst = _endpoint(values.get("client")), _endpoint(values.get("original_dst"))
        if src is not None and dst is not None:
            doc.setdefault("src_ip", src[0])
            doc.setdefault("src_port", src[1])
            doc.setdefault("dest_ip", dst[0])
            doc.setdefault("dest_port", dst[1])
        return doc


def formatter(source_key: str, json_lines: bool, stream: Any, name: str = "") -> logging.Formatter:
    cls = JsonFormatter if json_lines else TextFormatter
    return cls(source_key, name, journal=to_journal(stream))


def _lean_records() -> None:
    """No formatter here shows a record's process, thread or multiprocessing
    name: let logging not look them up for each record (the logging HOWTO,
    "Optimization"). The process id alone is a getpid system call a line,
    and a gateway writes two lines a connection."""
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False


# The handler ``configure`` gave each event logger: while it is that
# logger's only way out, ``EventLog.emit`` writes the line to its stream
# itself (``_write_direct``).
_DIRECT: dict[str, logging.StreamHandler[Any]] = {}


def _direct_ok(logger: logging.Logger, handler: logging.StreamHandler[Any], level: int) -> bool:
    """Whether a record of ``level`` would reach ``handler`` alone, unfiltered, and nothing else."""
    handlers = logger.handlers
    return (len(handlers) == 1 and handlers[0] is handler and not logger.propagate and not logger.filters
            and not handler.filters and level >= handler.level and isinstance(handler.formatter, _Formatter))


def _write_direct(handler: logging.StreamHandler[Any], log: EventLog, event: str, level: int, fields: Mapping[str, Any]) -> None:
    """The line ``handler`` would write for this event, written without a
    ``LogRecord`` and the logging module's dispatch: half of a line's cost,
    and a process writes two a connection (docs/benchmarks.md, issue 14)."""
    form = cast(_Formatter, handler.formatter)  # ``_direct_ok`` checked it
    line = form.event_line(time.time(), level, log.source, event, fields)
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(line + handler.terminator)
        stream.flush()
    except Exception:
        values = {k: plain(v) for k, v in fields.items()}
        record = log.logger.makeRecord(log.logger.name, level, "", 0, "%s", (event,), None,
                                       extra={"event": event, log.source_key: log.source, "fields": values})
        handler.handleError(record)  # as logging's own emit does: a broken stderr is not the caller's error
    finally:
        handler.release()


def configure(
    logger_name: str, source_key: str, json_lines: bool = False, stream: Any = None, level: int = logging.INFO
) -> logging.Handler:
    """Send one logger's events to stderr (or ``stream``), one line each."""
    _lean_records()
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(source_key, json_lines, stream))
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    _DIRECT[logger_name] = handler
    return handler


def configure_process(name: str, json_lines: bool = False, stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Every record of this process that no event logger takes (the root logger's), and any
    uncaught exception, as one line each with ``name`` as the speaker (``nfgate run``)."""
    _lean_records()
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("source", json_lines, stream, name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a line of this format too

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        logging.getLogger().critical("uncaught exception: %s", value, exc_info=(kind, value, tb))

    sys.excepthook = excepthook
    return handler
