"""The one JSON control socket: a root-only unix socket, one request and one answer per connection.

Every long-running nfgate process that an operator can ask something
serves its commands with ``ControlServer`` and is asked with ``ask``.

The wire format. The client connects and sends one JSON object on one line,
``{"cmd": NAME, ...arguments}``; the server sends one JSON line back and
closes: ``{"ok": true, "result": ...}``, or ``{"ok": false, "error": "one
line", "code": "NAME"}`` (``code`` only when there is one: the tunnel's
mediator error codes, say).

Who may ask. The socket is created mode 0600 with the umask set before
``bind``, so there is no window with a wider mode, and each peer's
credentials (SO_PEERCRED) are checked again: root, or the user the server
runs as. What these sockets can do (publish a private service, read every
flow) is what an attacker on the host would want.

Commands are data (STYLE.md, after pyftpdlib's proto_cmds): each names its
required and optional arguments with their converters; one generic check
runs before the handler, and an unknown command or argument, or a missing
one, is refused as ``BadRequest``. A handler answers with its result or
raises ``ControlError`` (the operator's one line, with an optional code).

One server for every loop. ``ControlServer.attach(loop)`` serves on anything
with ``add_reader``/``remove_reader``/``add_writer``/``remove_writer``: an
asyncio event loop as it is (and then a handler may return an awaitable:
the tunnel's requests wait for the mediator), or ``SelectorLoop`` around the
``selectors`` selector of a loop that calls ``key.data(key.fileobj)`` for
each ready key (the processor's, the supervisor's); such a loop calls
``expire(now)`` at least every ``timeout`` seconds, and a handler there may
return a ``Later``, settled on the loop's thread when its work is done (the
processor's flows, listed on a thread of its own: a conntrack dump walks
the whole table). Nothing blocks: a client
that connects and says nothing, or does not read its answer, is dropped
after ``timeout`` seconds, and at most ``max_clients`` are served at once.

Only the standard library: the gateways and the tunnel import it too.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

REQUEST_MAX = 65536  # bytes of one request line; the longest real one is a few hundred
TIMEOUT = 5.0  # seconds a client has to send its request, and to read its answer
MAX_CLIENTS = 16  # connections served at once; more are closed unanswered
BACKLOG = 8

log = logging.getLogger("nfgate.control")

T = TypeVar("T")
Converter = Callable[[Any, str], Any]


class ControlError(Exception):
    """A request that cannot be done: the message is the one line shown, ``code`` an optional name.

    A handler raises it; ``ask`` raises it with what the server answered.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class BadRequest(ControlError):
    """The request is malformed (the client's mistake): not JSON, unknown command or argument."""


@dataclass(frozen=True)
class Command(Generic[T]):
    """One command: ``run(target, args)`` gives the result (or, on an asyncio loop, an awaitable of it)."""

    run: Callable[[T, dict[str, Any]], Any]
    args: Mapping[str, Converter] = field(default_factory=dict)
    optional: Mapping[str, tuple[Converter, Any]] = field(default_factory=dict)  # name: (converter, default)
    help: str = ""


def parse_request(commands: Mapping[str, Command[T]], request: Any) -> tuple[Command[T], dict[str, Any]]:
    """The command and its converted arguments; ``BadRequest`` says what is wrong."""
    if not isinstance(request, dict):
        raise BadRequest("a request is a JSON object")
    name = request.get("cmd")
    command = commands.get(name) if isinstance(name, str) else None
    if command is None:
        raise BadRequest(f"unknown command {name!r} (one of {', '.join(commands)})")
    extra = sorted(set(request) - {"cmd", *command.args, *command.optional})
    if extra:
        raise BadRequest(f"{name}: unknown argument {extra[0]!r}")
    args: dict[str, Any] = {}
    for key, convert in command.args.items():
        if key not in request:
            raise BadRequest(f"{name}: missing argument {key!r}")
        args[key] = convert(request[key], key)
    for key, (convert, default) in command.optional.items():
        args[key] = convert(request[key], key) if key in request else default
    return command, args


# ---- converters every table can use ------------------------------------------------------


def text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


# ---- the server ----------------------------------------------------------------------------


class Loop(Protocol):
    """What ``ControlServer`` needs of an event loop (asyncio's loops have it as they are)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> Any: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_writer(self, fd: int) -> Any: ...


class SelectorLoop:
    """``Loop`` over a ``selectors`` selector whose loop calls ``key.data(key.fileobj)``."""

    def __init__(self, selector: Any) -> None:
        self.selector = selector

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, 1, callback)  # selectors.EVENT_READ

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, 2, callback)  # selectors.EVENT_WRITE

    def remove_reader(self, fd: int) -> None:
        self._forget(fd)

    def remove_writer(self, fd: int) -> None:
        self._forget(fd)

    def _watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        # A control connection only ever waits for one thing at a time.
        data = lambda _fileobj: callback()  # noqa: E731
        try:
            self.selector.modify(fd, events, data)
        except KeyError:
            self.selector.register(fd, events, data)

    def _forget(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except KeyError:
            pass


class Later:
    """A command's answer to come (a selector loop's; an asyncio loop's handler returns
    an awaitable instead). The handler returns it; whoever does the work settles it
    with ``done(result)`` or ``failed(exc)``, on the loop's thread. The client's usual
    ``timeout`` still bounds the wait: one settled after it was dropped is forgotten."""

    __slots__ = ("outcome", "_then")

    def __init__(self) -> None:
        self.outcome: tuple[bool, Any] | None = None  # (ok, the result or the exception)
        self._then: Callable[[tuple[bool, Any]], None] | None = None

    def done(self, result: Any) -> None:
        self._settle((True, result))

    def failed(self, exc: BaseException) -> None:
        self._settle((False, exc))

    def then(self, callback: Callable[[tuple[bool, Any]], None]) -> None:
        """``callback(outcome)`` once settled (now, if it is)."""
        if self.outcome is not None:
            callback(self.outcome)
        else:
            self._then = callback

    def _settle(self, outcome: tuple[bool, Any]) -> None:
        if self.outcome is not None:
            return  # once
        self.outcome = outcome
        callback, self._then = self._then, None
        if callback is not None:
            callback(outcome)


class _Client:
    __slots__ = ("sock", "deadline", "inbox", "outbox", "task", "refusal")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline: float | None = deadline  # None while its command runs
        self.inbox = b""
        self.outbox = b""
        self.task: asyncio.Future[Any] | None = None
        self.refusal: dict[str, Any] | None = None  # the answer, whatever it asks


class ControlServer(Generic[T]):
    """Serves ``commands`` for ``target`` on a root-only unix socket at ``path``."""

    def __init__(
        self,
        path: Path,
        commands: Mapping[str, Command[T]],
        target: T,
        *,
        timeout: float = TIMEOUT,
        max_clients: int = MAX_CLIENTS,
        request_max: int = REQUEST_MAX,
        clock: Callable[[], float] = time.monotonic,
        warn: Callable[..., None] | None = None,
    ) -> None:
        """``warn(event, **fields)``: where a refused peer and a failed command
        are reported (the host's event log; by default the ``nfgate.control``
        logger)."""
        self.path = path
        self.commands = commands
        self.target = target
        self.timeout = timeout
        self.max_clients = max_clients
        self.request_max = request_max
        self.clock = clock
        self._warn = warn or (lambda event, **fields: log.warning("%s %s", event, fields))
        # requests, bad_request, refused (too many, or not root), timed_out,
        # internal_errors, accept_errors
        self.counters: Counter[str] = Counter()
        self._sock: socket.socket | None = None
        self._loop: Loop | None = None
        self._clients: dict[int, _Client] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def open(self) -> None:
        """Bind the socket, mode 0600 from the first instant. OSError as it comes."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # a predecessor's; one server per path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._sock = sock

    def attach(self, loop: Loop) -> None:
        """Serve on ``loop`` (``open`` first). An asyncio loop also gets the timeouts swept."""
        assert self._sock is not None, "open() the control socket before attach()"
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._accept)
        if isinstance(loop, asyncio.AbstractEventLoop):
            self._sweep()

    def close(self) -> None:
        """Stop: every client dropped, the socket closed and removed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                if self.path.is_socket():
                    self.path.unlink()
            except OSError:
                pass

    def expire(self, now: float | None = None) -> None:
        """Drop the clients whose time is up (a selector loop calls this)."""
        now = self.clock() if now is None else now
        for client in [c for c in self._clients.values() if c.deadline is not None and c.deadline <= now]:
            self.counters["timed_out"] += 1
            self._drop(client)

    def answer(self, line: bytes) -> Any:
        """The answer to one request line: a dict, an awaitable of one (an async handler)
        or a ``Later`` (its result, or exception, still to come)."""
        self.counters["requests"] += 1
        try:
            command, args = parse_request(self.commands, json.loads(line or b"null"))
        except ValueError as err:  # not JSON (or not UTF-8)
            self.counters["bad_request"] += 1
            return _failed(BadRequest(f"bad request: {err}"))
        except BadRequest as err:
            self.counters["bad_request"] += 1
            return _failed(err)
        try:
            result = command.run(self.target, args)
        except ControlError as err:
            return _failed(err)
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not take the server down
            return self._internal(exc)
        if isinstance(result, Later):
            return result
        if inspect.isawaitable(result):
            return self._finish(result)
        return {"ok": True, "result": result}

    async def _finish(self, pending: Any) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await pending}
        except ControlError as err:
            return _failed(err)
        except Exception as exc:  # noqa: BLE001 - as in answer()
            return self._internal(exc)

    def _internal(self, exc: Exception) -> dict[str, Any]:
        self.counters["internal_errors"] += 1
        self._warn("control_internal_error", socket=str(self.path), error=repr(exc))
        return _failed(ControlError("internal error (see the log)"))

    # ---- the connections ------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.counters["accept_errors"] += 1  # out of descriptors: the next event retries
            return
        conn.setblocking(False)
        if len(self._clients) >= self.max_clients:
            self.counters["refused"] += 1
            conn.close()
            return
        client = _Client(conn, self.clock() + self.timeout)
        self._clients[conn.fileno()] = client
        uid = peer_uid(conn)
        if uid not in (0, os.geteuid()):
            # Answered once its request is read: closing on an unread
            # request would show the client a broken pipe, not the reason.
            self.counters["refused"] += 1
            self._warn("control_refused", socket=str(self.path), uid=uid)
            client.refusal = _failed(ControlError(f"the control socket {self.path} is root-only"))
        self._loop.add_reader(conn.fileno(), lambda: self._read(client))

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(self.request_max)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.inbox += chunk
        if chunk and b"\n" not in client.inbox and len(client.inbox) <= self.request_max:
            return  # more to come
        assert self._loop is not None
        self._loop.remove_reader(client.sock.fileno())
        if client.refusal is not None:
            self._reply(client, client.refusal)
            return
        if b"\n" not in client.inbox and len(client.inbox) > self.request_max:
            self.counters["requests"] += 1
            self.counters["bad_request"] += 1
            self._reply(client, _failed(BadRequest(f"bad request: longer than {self.request_max} bytes")))
            return
        answer = self.answer(client.inbox.split(b"\n", 1)[0])
        if isinstance(answer, dict):
            self._reply(client, answer)
            return
        if isinstance(answer, Later):
            answer.then(lambda outcome: self._later(client, outcome))  # its deadline still runs
            return
        client.deadline = None  # the command's own timeouts bound it
        client.task = asyncio.ensure_future(answer)
        client.task.add_done_callback(lambda task: self._answered(client, task))

    def _later(self, client: _Client, outcome: tuple[bool, Any]) -> None:
        if self._clients.get(client.sock.fileno()) is not client:
            return  # dropped meanwhile (timed out, or the server closed)
        ok, value = outcome
        if ok:
            self._reply(client, {"ok": True, "result": value})
        elif isinstance(value, ControlError):
            self._reply(client, _failed(value))
        else:
            self._reply(client, self._internal(value))

    def _answered(self, client: _Client, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or self._clients.get(client.sock.fileno()) is not client:
            return  # dropped meanwhile (timed out, or the server closed)
        self._reply(client, task.result())

    def _reply(self, client: _Client, answer: dict[str, Any]) -> None:
        assert self._loop is not None
        client.task = None
        client.outbox = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
        client.deadline = self.clock() + self.timeout
        self._loop.add_writer(client.sock.fileno(), lambda: self._write(client))

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(client.outbox)  # the client is gone: nothing more to send
        client.outbox = client.outbox[sent:]
        if not client.outbox:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is None:
            return
        if client.task is not None:
            client.task.cancel()
        if self._loop is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        client.sock.close()

    def _sweep(self) -> None:
        self.expire()
        loop = self._loop
        assert isinstance(loop, asyncio.AbstractEventLoop)
        self._sweeper = loop.call_later(self.timeout / 2, self._sweep)


def _failed(err: ControlError) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error": str(err)}
    if err.code:
        answer["code"] = err.code
    return answer


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED), or None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


# ---- the client ----------------------------------------------------------------------------


def ask(path: Path, request: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """Send one request to the control socket at ``path``; its result, or ``ControlError``.

    FileNotFoundError, PermissionError, ConnectionRefusedError (a stale
    socket) and TimeoutError come as they are, and ValueError if the answer
    is not JSON, for the caller to turn into its one line.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"null")
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ValueError("the answer is not a control-socket answer")
    if not answer["ok"]:
        raise ControlError(str(answer.get("error", "unknown error")), str(answer.get("code") or ""))
    return answer.get("result")
