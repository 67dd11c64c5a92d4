"""``nfgate tunnel``: one-line errors, exit codes, and the operator commands against a server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from firewall.control import BadRequest, parse_request
from tests.tunnel.loopback import WAIT, echo_server, loopback
from tunnel.cli import tunnel
from tunnel.operator import COMMANDS

REPO = Path(__file__).parents[2]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(tunnel, [str(a) for a in args])


def test_keygen_pin_and_token(tmp_path: Path) -> None:
    made = invoke("keygen", "--cert", tmp_path / "s.crt", "--key", tmp_path / "s.key", "--name", "t")
    assert made.exit_code == 0 and made.output.startswith("sha256:")
    assert invoke("pin", tmp_path / "s.crt").output == made.output
    again = invoke("keygen", "--cert", tmp_path / "s.crt", "--key", tmp_path / "s.key")
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "--force" in again.output
    tokens = {invoke("token").output.strip() for _ in range(3)}
    assert len(tokens) == 3 and all(len(t) == 43 for t in tokens)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("list", "--socket", "/nonexistent/tunnel.sock"), 1, "no tunnel server is running here"),
        (("publish", "m1", "--to", "10.0.0.1", "--public", "80"), 2, "expected ADDRESS:PORT"),
        (("publish", "m1", "--to", "10.0.0.1:0", "--public", "80"), 2, "the target needs a port"),
        (("open", "m1", "10.0.0.999:80"), 2, "is not an IP address"),
        (("open", "m1", "10.0.0.1:99999"), 2, "is not a port"),
        (("server", "--config", "/nonexistent.toml"), 2, "no such tunnel server config file"),
        (("mediator", "--config", "/nonexistent.toml"), 2, "no such tunnel mediator config file"),
        (("pin", "/etc/hostname"), 2, "not a PEM certificate"),
    ],
)
def test_user_mistakes_are_one_line_and_the_right_exit_code(args: tuple[str, ...], code: int, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.startswith("nfgate: ")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_runs_as_a_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "tunnel.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=30)
    assert proc.returncode == 0 and "publish" in proc.stdout and "Usage: nfgate tunnel" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tunnel.cli", "pin", "/nonexistent"], capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    assert proc.returncode == 2 and proc.stderr == "nfgate: certificate /nonexistent: no such file\n"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A loopback server and mediator on a thread's loop, for the CLI to talk to."""
    state: dict[str, Any] = {}
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator()
            await lb.session()
            _, state["target"] = await echo_server()
            state["socket"] = str(lb.config.control_socket)
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(WAIT)
    yield state
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(WAIT)


def test_operator_commands_against_a_server(running: dict[str, Any]) -> None:
    sock = ("--socket", running["socket"])
    opened = invoke("open", "m1", "127.0.0.1:0", "--json", *sock)
    assert opened.exit_code == 0, opened.output
    port_id = json.loads(opened.output)["port_id"]
    assert invoke("connect", "m1", port_id, f"127.0.0.1:{running['target']}", *sock).output == (
        f"port id {port_id}: connected to 127.0.0.1:{running['target']}\n"
    )
    listing = invoke("list", *sock)
    assert "mediator m1: connected" in listing.output and f"port {port_id}: tcp CONNECTED (raw)" in listing.output
    assert invoke("close", "m1", port_id, *sock).exit_code == 0
    again = invoke("close", "m1", port_id, *sock)
    assert again.exit_code == 1 and again.output == f"nfgate: close: no port {port_id} (or it is closing)\n"
    published = invoke("publish", "m1", "--to", f"127.0.0.1:{running['target']}", "--public", 23456, *sock)
    assert published.output == f"published tcp 23456 -> m1 127.0.0.1:{running['target']}\n"
    assert "published tcp 23456 -> m1" in invoke("list", *sock).output
    assert invoke("unpublish", "m1", "--public", 23456, *sock).output == "unpublished tcp 23456\n"
    gone = invoke("unpublish", "m1", "--public", 23456, *sock)
    assert gone.exit_code == 1 and gone.output == "nfgate: unpublish: tcp port 23456 is not published for m1\n"


def test_every_command_checks_its_arguments() -> None:
    assert set(COMMANDS) == {"list", "open", "redirect", "connect", "listen", "close", "publish", "unpublish"}
    request = {"cmd": "open", "mediator": "m", "proto": "udp", "address": "::1", "port": 0}
    command, args = parse_request(COMMANDS, request)
    assert args["mandatory"] is False and str(args["address"]) == "::1"
    for bad in (
        [], {"cmd": 1}, {"cmd": "open", "mediator": "", "proto": "tcp", "address": "1.2.3.4", "port": 1},
        {"cmd": "connect", "mediator": "m", "port_id": 0, "address": "1.2.3.4", "port": 1},
        {"cmd": "connect", "mediator": "m", "port_id": True, "address": "1.2.3.4", "port": 1},
        {"cmd": "publish", "mediator": "m", "proto": "tcp", "public": 0, "address": "1.2.3.4", "port": 1},
        {"cmd": "open", "mediator": "m", "proto": "tcp", "address": "1.2.3.4", "port": 1, "mandatory": "yes"},
    ):
        with pytest.raises(BadRequest):
            parse_request(COMMANDS, bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": "80"}, "port must be a port number (0 to 65535)"),
        ({"port": 65536}, "port must be a port number (0 to 65535)"),
        ({"proto": "sctp"}, "proto must be 'tcp' or 'udp'"),
        ({"address": "10.0.0.999"}, "address: '10.0.0.999' is not an IP address"),
        ({"mandatory": 1}, "mandatory must be true or false"),
    ],
)
def test_an_argument_refused_says_which_and_why(change: dict[str, object], message: str) -> None:
    request = {"cmd": "open", "mediator": "m", "proto": "tcp", "address": "10.0.0.1", "port": 80, **change}
    with pytest.raises(BadRequest) as info:
        parse_request(COMMANDS, request)
    assert str(info.value) == message


def test_server_without_its_certificate_fails_in_one_line(tmp_path: Path) -> None:
    mediators = tmp_path / "mediators.toml"
    mediators.write_text('[mediator.m1]\ntoken = "0123456789abcdef0123"\n')
    mediators.chmod(0o600)
    config = tmp_path / "server.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1"\nservice_port = 1\ncert = "{tmp_path}/none.crt"\n'
        f'key = "{tmp_path}/none.key"\nmediators = "{mediators}"\ncontrol_socket = "{tmp_path}/c.sock"\n'
    )
    result = invoke("server", "--config", config)
    assert result.exit_code == 2
    assert result.output == f"nfgate: server certificate {tmp_path}/none.crt: no such file (make one with: nfgate tunnel keygen)\n"
    mediators.chmod(0o644)
    unsafe = invoke("server", "--config", config)
    assert unsafe.exit_code == 2 and "gives group or others access" in unsafe.output
