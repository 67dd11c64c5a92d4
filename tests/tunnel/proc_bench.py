"""A new connection's cost in each relay process, without a lab: instructions under callgrind.

    PYTHONPATH=. .venv/bin/python -m tests.tunnel.proc_bench [--relay tunnel|epoll|uvloop] [--exchanges 100,400] [--calls]

Not a test (nothing is asserted): a figure for docs/benchmarks.md. The
relay's two processes (``tunnel``: ``nfgate tunnel server`` and
``mediator``; ``epoll``, ``uvloop``: the Python floors of
tests/tunnel/floor_tunnel.py) run each under valgrind's callgrind on
127.0.0.1; this process plays the echo target (a thread per connection)
and the client, outside valgrind: each exchange is a new connection,
100 bytes, a half-close, their echo. Each count of exchanges is a run of
its own (20 more first, to warm up), and the difference of two runs'
instructions over the difference of their counts is a connection's cost
in each process, the start-up left out: the same whatever else the
machine does, so two versions can be compared on a shared machine (the
two runs are in parallel, one a core). Unlike tests/tunnel/loop_bench.py,
the client is another process, as in the lab: a request comes with the
handshake's last ACK.

``--calls``: the processes run under cProfile instead, and the figure is
their function calls per connection (Python functions and the C functions
they call, as cProfile counts them), with each process's most frequent
ones: where a connection's work is, by name, in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.tunnel.loopback import ThreadedEcho

TOP = Path(__file__).resolve().parents[2]
TOKEN = "proc-bench-token-0123456789"
START = 300.0  # seconds a process may take to be ready under valgrind
PAYLOAD = b"x" * 100
PUBLISH_TRIES = 5  # public ports tried, each free a moment before
TOP_CALLS = 12  # ``--calls``: the most frequent functions shown per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Any, what: str, timeout: float = START) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout:g} s")


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Run:
    """One relay's two processes under callgrind (or cProfile: ``calls``), for ``exchanges`` connections."""

    def __init__(self, relay: str, exchanges: int, directory: Path, calls: bool = False) -> None:
        self.relay, self.exchanges, self.dir, self.calls = relay, exchanges, directory, calls
        self.env = {**os.environ, "PYTHONPATH": str(TOP)}
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, argv: list[Any]) -> subprocess.Popen[str]:
        python, *rest = map(str, argv)
        if self.calls:
            command = [python, "-m", "cProfile", "-o", str(self.dir / f"{name}.prof"), *rest]
        else:
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir / name}.out", python, *rest]
        proc = subprocess.Popen(
            command, cwd=TOP, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs[name] = proc
        return proc

    def cli(self, *args: Any) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "NFGATE_TUNNEL_SOCKET": str(self.dir / "control.sock")}
        return subprocess.run([sys.executable, "-m", "tunnel.cli", *map(str, args)], cwd=TOP, env=env,
                              capture_output=True, text=True, timeout=60)

    def up(self, target: int) -> int:
        """Start both processes; the public port to use."""
        d = self.dir
        pin = self.cli("keygen", "--force", "--cert", d / "s.crt", "--key", d / "s.key")
        if pin.returncode != 0:
            raise RuntimeError(f"keygen: {pin.stderr.strip()}")
        public = free_port()
        if self.relay != "tunnel":
            channel = free_port()
            floor = [sys.executable, "-m", "tests.tunnel.floor_tunnel", "--loop", self.relay]
            server = self.start("server", [*floor, "server", "--channel", f"127.0.0.1:{channel}",
                                           "--public", f"127.0.0.1:{public}", "--cert", d / "s.crt", "--key", d / "s.key"])
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            mediator = self.start("mediator", [*floor, "mediator", "--server", f"127.0.0.1:{channel}",
                                               "--target", f"127.0.0.1:{target}"])
            assert mediator.stdout is not None and mediator.stdout.readline().strip() == "connected"
            return public
        service = free_port()
        (d / "mediators.toml").write_text(f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["1024-65535"]\n')
        (d / "token").write_text(TOKEN + "\n")
        for name in ("mediators.toml", "token"):
            os.chmod(d / name, 0o600)
        (d / "server.toml").write_text(
            f'[server]\nlisten = "127.0.0.1"\nservice_port = {service}\npublic_address = "127.0.0.1"\n'
            f'cert = "{d}/s.crt"\nkey = "{d}/s.key"\nmediators = "{d}/mediators.toml"\n'
            f'control_socket = "{d}/control.sock"\nhandshake_timeout = 120\nrequest_timeout = 60\n'
            "[limits]\nbytes_per_second = 1e12\nburst_bytes = 1e12\n"
        )
        (d / "mediator.toml").write_text(
            f'[mediator]\nidentity = "m1"\ntoken_file = "{d}/token"\nserver = "127.0.0.1"\n'
            f'service_port = {service}\nserver_pin = "{pin.stdout.strip()}"\nchannel_timeout = 120\n'
            "[protocol]\nkeepalive_interval = 60\n"
            f'[[allow]]\nto = "127.0.0.1/32"\nports = [{target}]\nproto = "tcp"\nops = ["connect", "send"]\n'
        )
        self.start("server", [sys.executable, "-m", "tunnel.cli", "server", "-c", d / "server.toml"])
        wait(lambda: (d / "control.sock").exists(), "the tunnel server")
        self.start("mediator", [sys.executable, "-m", "tunnel.cli", "mediator", "-c", d / "mediator.toml"])

        def connected() -> bool:
            listing = self.cli("list", "--json")
            return listing.returncode == 0 and any(m["state"] == "connected" for m in json.loads(listing.stdout)["mediators"])

        wait(connected, "the mediator to connect")
        for _ in range(PUBLISH_TRIES):
            published = self.cli("publish", "m1", "--to", f"127.0.0.1:{target}", "--public", public)
            if published.returncode == 0:
                return public
            if "address already in use" not in published.stderr:
                break
            # ``free_port`` gave an ephemeral port, and a connection of
            # something else on this machine took it since: another one.
            public = free_port()
        raise RuntimeError(f"publish: {published.stderr.strip()}")

    def measure(self, public: int) -> dict[str, Any]:
        wait(lambda: accepts(public), "the public port")
        for _ in range(20 + self.exchanges):
            with socket.create_connection(("127.0.0.1", public), timeout=START) as client:
                client.sendall(PAYLOAD)
                client.shutdown(socket.SHUT_WR)
                got = b""
                while data := client.recv(65536):
                    got += data
            if got != PAYLOAD:
                raise RuntimeError(f"echo through the {self.relay} relay: {got[:40]!r}")
        self.stop()
        totals: dict[str, Any] = {}
        for name in ("server", "mediator"):
            if self.calls:
                # Each function's calls, by file:line(name): the totals, and what to rank.
                stats = pstats.Stats(str(self.dir / f"{name}.prof")).stats  # type: ignore[attr-defined]
                totals[name] = {f"{Path(k[0]).name}:{k[1]}({k[2]})": v[1] for k, v in stats.items()}
                continue
            lines = (self.dir / f"{name}.out").read_text().splitlines()
            totals[name] = int([line for line in lines if line.startswith(("summary", "totals"))][-1].split()[1])
        return totals

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # both end as an exit: callgrind writes its file
        for proc in self.procs.values():
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def one(relay: str, exchanges: int, target: int, calls: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nfgate-procbench-") as tmp:
        run = Run(relay, exchanges, Path(tmp), calls)
        try:
            return run.measure(run.up(target))
        finally:
            run.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", choices=("tunnel", "epoll", "uvloop"), default="tunnel")
    parser.add_argument("--exchanges", default="100,400", help="the two runs' counts of exchanges")
    parser.add_argument("--calls", action="store_true", help="function calls under cProfile, not instructions")
    args = parser.parse_args()
    low, high = sorted(int(n) for n in args.exchanges.split(","))
    echo = ThreadedEcho(START)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda n: one(args.relay, n, echo.port, args.calls), (low, high))
    if args.calls:
        per = {}
        top = {}
        for name in first:
            each = {f: (n - first[name].get(f, 0)) / (high - low) for f, n in second[name].items()}
            per[name] = round(sum(each.values()))
            top[name] = {f: round(n, 2) for f, n in sorted(each.items(), key=lambda i: -i[1])[:TOP_CALLS]}
        print(json.dumps({"relay": args.relay, "exchanges": [low, high], "calls_per_connection": per,
                          "both": sum(per.values()), "most_called": top}, indent=1))
        return 0
    per = {name: round((second[name] - first[name]) / (high - low)) for name in first}
    print(json.dumps({"relay": args.relay, "exchanges": [low, high], "instructions_per_connection": per,
                      "both": sum(per.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
