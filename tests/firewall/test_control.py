"""The one control socket (firewall/control.py): wire format, checks, limits, on a selector loop and on asyncio."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from firewall.control import (
    BadRequest, Command, ControlError, ControlServer, Later, SelectorLoop, ask, flag, parse_request, text,
)


class Target:
    def __init__(self) -> None:
        self.calls = 0


def _refuse(target: Target, args: dict[str, Any]) -> Any:
    raise ControlError(f"cannot {args['what']}", "NOT_ALLOWED")


def _bug(target: Target, args: dict[str, Any]) -> Any:
    raise RuntimeError("a bug")


def _count(target: Target, args: dict[str, Any]) -> int:
    target.calls += 1
    return target.calls


async def _later(target: Target, args: dict[str, Any]) -> str:
    await asyncio.sleep(0.01)
    return f"later {args['what']}"


COMMANDS: dict[str, Command[Target]] = {
    "echo": Command(lambda t, a: {"said": a["what"], "loud": a["loud"]}, {"what": text}, {"loud": (flag, False)}),
    "refuse": Command(_refuse, {"what": text}),
    "bug": Command(_bug),
    "count": Command(_count),
    "later": Command(_later, {"what": text}),
}


@contextmanager
def selector_server(
    path: Path, commands: Mapping[str, Command[Any]] = COMMANDS, target: Any = None, **options: Any,
) -> Iterator[ControlServer[Any]]:
    """A server (of ``Target`` by default) on a selector loop of its own thread, as the processor
    and the supervisor run one."""
    selector = selectors.DefaultSelector()
    server = ControlServer(path, commands, Target() if target is None else target, **options)
    server.open()
    server.attach(SelectorLoop(selector))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, _ in selector.select(0.02):
                key.data(key.fileobj)
            server.expire()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()
        selector.close()


def raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    return json.loads(answer)


def test_commands_are_checked_before_they_run() -> None:
    assert parse_request(COMMANDS, {"cmd": "echo", "what": "hi"})[1] == {"what": "hi", "loud": False}
    for bad, message in (
        ([], "a JSON object"),
        ({"cmd": "nope"}, "unknown command 'nope'"),
        ({"cmd": "echo"}, "missing argument 'what'"),
        ({"cmd": "echo", "what": "hi", "extra": 1}, "unknown argument 'extra'"),
        ({"cmd": "echo", "what": ""}, "non-empty string"),
        ({"cmd": "echo", "what": "hi", "loud": 1}, "true or false"),
    ):
        with pytest.raises(BadRequest, match=message):
            parse_request(COMMANDS, bad)


def test_answers_and_errors_on_a_selector_loop(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    with selector_server(path, request_max=64) as server:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert ask(path, {"cmd": "echo", "what": "hi", "loud": True}) == {"said": "hi", "loud": True}
        with pytest.raises(ControlError) as refused:
            ask(path, {"cmd": "refuse", "what": "that"})
        assert str(refused.value) == "cannot that" and refused.value.code == "NOT_ALLOWED"
        with pytest.raises(ControlError, match="unknown command") as unknown:
            ask(path, {"cmd": "nope"})
        assert unknown.value.code == ""
        with pytest.raises(ControlError, match="internal error"):
            ask(path, {"cmd": "bug"})
        assert ask(path, {"cmd": "count"}) == 1  # the server lived through the bug
        assert raw(path, b"not json\n")["error"].startswith("bad request:")
        assert raw(path, b'{"cmd": "count"}') == {"ok": True, "result": 2}  # EOF ends a request too
        too_long = raw(path, b"x" * 100)
        assert too_long == {"ok": False, "error": "bad request: longer than 64 bytes"}
        assert server.counters == {"requests": 8, "bad_request": 3, "internal_errors": 1}


def test_a_later_answer_comes_when_settled_on_the_loop_and_others_are_answered_meanwhile(tmp_path: Path) -> None:
    """A selector loop's handler returns a ``Later`` (the processor's flows: a dump on a
    thread of its own); the loop settles it some iterations on, and meanwhile serves others."""
    pending: list[tuple[Later, str, int]] = []  # (answer to come, how it ends, the iteration it was asked in)

    def later(target: Target, args: dict[str, Any]) -> Later:
        answer = Later()
        pending.append((answer, args["what"], iterations[0]))
        return answer

    commands: dict[str, Command[Target]] = {**COMMANDS, "slow": Command(later, {"what": text})}
    path = tmp_path / "control.sock"
    selector = selectors.DefaultSelector()
    server = ControlServer(path, commands, Target(), timeout=0.5)
    server.open()
    server.attach(SelectorLoop(selector))
    stop = threading.Event()
    iterations = [0]
    settled_after_drop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, _ in selector.select(0.02):
                key.data(key.fileobj)
            iterations[0] += 1
            for item in [p for p in pending if iterations[0] - p[2] >= 3]:  # a few iterations later
                answer, how, _ = item
                if how == "never" and server.counters["timed_out"] == 0:
                    continue  # settled only once its client has been dropped
                pending.remove(item)
                if how == "fine":
                    answer.done({"listed": 3})
                elif how == "refuse":
                    answer.failed(ControlError("busy", "BUSY"))
                elif how == "bug":
                    answer.failed(RuntimeError("a dump failed"))
                else:
                    answer.done("too late")
                    settled_after_drop.set()
            server.expire()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        never = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        never.connect(str(path))
        never.sendall(b'{"cmd": "slow", "what": "never"}\n')
        assert ask(path, {"cmd": "count"}) == 1  # answered while "never" waits
        assert ask(path, {"cmd": "slow", "what": "fine"}) == {"listed": 3}
        with pytest.raises(ControlError, match="busy") as refused:
            ask(path, {"cmd": "slow", "what": "refuse"})
        assert refused.value.code == "BUSY"
        with pytest.raises(ControlError, match="internal error"):
            ask(path, {"cmd": "slow", "what": "bug"})
        never.settimeout(5)
        assert never.recv(100) == b""  # dropped at its deadline, unanswered
        never.close()
        assert settled_after_drop.wait(5)  # and settling it then was harmless
        assert ask(path, {"cmd": "count"}) == 2
        assert server.counters["timed_out"] == 1 and server.counters["internal_errors"] == 1
    finally:
        stop.set()
        thread.join(5)
        server.close()
        selector.close()


def test_a_silent_client_is_dropped_and_the_count_of_clients_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with selector_server(path, timeout=0.2, max_clients=2) as server:
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for sock in silent:
                sock.connect(str(path))
            deadline = time.monotonic() + 5
            while server.counters["refused"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.counters["refused"] == 1  # the third of max_clients=2
            while server.counters["timed_out"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.counters["timed_out"] == 2
            assert ask(path, {"cmd": "count"}) == 1  # room again
        finally:
            for sock in silent:
                sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to ask as another user")
def test_a_peer_that_is_neither_root_nor_the_servers_user_is_refused() -> None:
    directory = Path(tempfile.mkdtemp(prefix="nfgate-control-"))
    directory.chmod(0o755)
    path = directory / "control.sock"
    client = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        " s.sendall(b'{\"cmd\": \"count\"}\\n'); print(s.recv(4096).decode())"
    )
    try:
        with selector_server(path) as server:
            path.chmod(0o666)  # only the credentials check stands in the way now
            out = subprocess.run(["/usr/bin/python3", "-c", client, str(path)], user=65534, capture_output=True,
                                 text=True, timeout=30)
            root_only = {"ok": False, "error": f"the control socket {path} is root-only"}
            assert json.loads(out.stdout) == root_only, out.stderr
            assert server.counters == {"refused": 1} and server.target.calls == 0
    finally:
        shutil.rmtree(directory)


def test_a_stale_socket_is_replaced_and_close_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        ask(path, {"cmd": "count"})
    with selector_server(path):
        assert ask(path, {"cmd": "count"}) == 1
    assert not path.exists()


def test_an_async_command_is_awaited_on_an_asyncio_loop(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> None:
        server = ControlServer(path, COMMANDS, Target(), timeout=0.2)
        server.open()
        server.attach(asyncio.get_running_loop())
        try:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, ask, path, {"cmd": "later", "what": "on"}) == "later on"
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.connect(str(path))
            for _ in range(100):
                if server.counters["timed_out"]:
                    break
                await asyncio.sleep(0.02)
            silent.close()
            assert server.counters["timed_out"] == 1  # swept without a selector loop's help
        finally:
            server.close()

    asyncio.run(main())
