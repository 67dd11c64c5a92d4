"""Gateway events for tests: from ``caplog`` in-process, or as JSON lines from ``python -m gateways``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from firewall import manifests
from firewall.config import load
from firewall.signalling import load_or_create_key
from tests.gateways.loopback import GATEWAY, ROUTER


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every event ``name`` logged in this process so far, in order."""
    return [r.fields for r in caplog.records if getattr(r, "event", None) == name]  # type: ignore[attr-defined]


CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[processor]
queues = [0]

[processor.pools]
firewall_side = "127.0.1.0/24"

[gateway_link]
router_address = "{router}/30"
gateway_address = "{gateway}/30"

[signalling]
port = {port}
key_file = "{key_file}"
query_timeout = 0.1

[[gateway]]
name = "{name}"
kind = "{kind}"
listen_port = {listen_port}

[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "{proto}"
ports = 8443
"""


def free_port(address: ipaddress.IPv4Address, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((str(address), 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, *, port: int, kind: str = "tcp-relay", name: str = "relay", **over: Any) -> Path:
    key_file = tmp_path / "keys" / "signalling.key"
    load_or_create_key(key_file)  # the supervisor makes it first
    fields: dict[str, Any] = dict(
        router=ROUTER,
        gateway=GATEWAY,
        port=port,
        key_file=key_file,
        name=name,
        kind=kind,
        listen_port=free_port(GATEWAY),
        proto="udp" if kind in ("udp-relay", "rtp") else "tcp",
    )
    fields.update(over)
    path = tmp_path / "nfgate.toml"
    path.write_text(CONFIG.format(**fields))
    return path


def write_manifest(config: Path, name: str) -> Path:
    """The manifest of gateway ``name``, as ``nfgate run`` writes it, next to ``config``."""
    cfg = load(config)
    gateway = next(g for g in cfg.gateways if g.name == name)
    path = manifests.manifest_path(config.parent, name)
    # On loopback, outside a gateway namespace: no blind-track IPv6 address to listen on.
    manifests.write(manifests.manifest_for(cfg, gateway).model_copy(update={"listen6": None}), path)
    return path


async def start_gateway(config: Path, name: str = "relay", *, files: int | None = None) -> asyncio.subprocess.Process:
    """``python -m gateways`` for gateway ``name`` of ``config``, given the
    manifest the supervisor would write; ``files``: its soft and hard RLIMIT_NOFILE."""
    return await start_with_manifest(write_manifest(config, name), files=files)


async def start_with_manifest(manifest: Path, *, files: int | None = None) -> asyncio.subprocess.Process:
    """``python -m gateways --manifest manifest --log-json``."""

    def limit_files() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateways", "--manifest", str(manifest), "--log-json",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        preexec_fn=limit_files if files is not None else None,
    )


async def next_event(proc: asyncio.subprocess.Process, name: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read the process's JSON lines until event ``name`` (bounded by the caller's timeout)."""
    assert proc.stderr is not None
    while line := await asyncio.wait_for(proc.stderr.readline(), 20):
        doc = json.loads(line)
        seen.append(doc)
        if doc.get("event") == name:
            return doc
    raise AssertionError(f"the gateway exited before {name!r}; it said: {seen}")


async def exit_of(config: Path, name: str = "relay", *, manifest: Path | None = None) -> tuple[int, list[str]]:
    """Run the gateway process to its exit (killed if it outlives the bound): code, stderr lines.
    ``manifest``: start it with that file as it stands instead of writing one from ``config``."""
    proc = await (start_with_manifest(manifest) if manifest is not None else start_gateway(config, name))
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, err.decode().splitlines()


def foreign_address() -> ipaddress.IPv4Address:
    """A documentation address that is not on this host (the build machines use some of them)."""
    for candidate in ("203.0.113.77", "198.51.100.77", "192.0.2.77", "198.18.77.77"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((candidate, 0))
            except OSError:
                return ipaddress.IPv4Address(candidate)
    pytest.skip("every candidate address is local here")
