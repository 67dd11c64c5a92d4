"""FTP data connections that the processor redirected into the gateway: relayed, and in inspect mode checked.

A data connection reaches the gateway when its rule was a REDIRECT: always
in ``inspect`` mode, and in ``allow`` mode when the kernel cannot carry it as
it is (its destination is the router's address standing in for a party, so
it needs the double NAT of the processor). ``relay`` copies it both ways,
half-close carried across, like tcp-relay. In inspect mode two checks apply
on the way (the seed's "Dynamic changes": "for example in order to check for
viruses that might come embedded in a file transferred over the ftp data
channel"):

- ``max_transfer_bytes``: past it both legs are reset, so the peers see an
  aborted transfer (the server answers 426 on the control channel);
- the content hook: ``content_hook = "module:function"`` names a function
  ``hook(transfer: Transfer) -> Inspector | None``; the inspector is called
  with each chunk and whether it flows toward the FTP client, and returns
  False to stop the transfer (both legs reset). A hook that raises stops
  the transfer too: a broken check must not let data through unchecked.

The hook is policy and the relay is mechanism (STYLE.md, "Policy is separate
from protocol"): no hook configured means no content check.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
from dataclasses import dataclass
from typing import Callable

from firewall.errors import UsageError
from firewall.signalling import FlowInfo
from gateways.tcp_server import reset

# One read: a quarter MiB keeps the per-chunk Python cost small against the
# bytes moved, and bounds what one connection buffers.
DATA_CHUNK = 1 << 18

CLOSE_FLUSH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Transfer:
    """What a content hook is told about one data connection."""

    direction: str  # "passive": the FTP client connected; "active": the FTP server did
    ftp_client: ipaddress.IPv4Address
    ftp_server: ipaddress.IPv4Address
    flow: FlowInfo  # the data connection's own tuple


Inspector = Callable[[bytes, bool], bool]  # (chunk, toward the FTP client) -> go on
ContentHook = Callable[[Transfer], "Inspector | None"]


def load_hook(path: str) -> ContentHook | None:
    """``module:function`` -> the function; "" -> None. UsageError (one line) if it cannot be found."""
    if not path:
        return None
    module_name, _, name = path.partition(":")
    try:
        hook = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"content_hook {path!r}: cannot load it ({exc})") from None
    if not callable(hook):
        raise UsageError(f"content_hook {path!r} is not callable")
    return hook  # type: ignore[no-any-return]


@dataclass
class Outcome:
    reason: str  # done, limit, hook, client_reset, server_reset, idle, flow_end
    to_client: int = 0
    to_server: int = 0


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    a_is_client: bool,
    max_bytes: int,
    inspector: Inspector | None,
    idle_timeout: float,
    ended: asyncio.Event,
    touch: Callable[[], None],
) -> Outcome:
    """Copy between leg A and leg B until both directions end or a check stops it; close both."""
    outcome = Outcome("done")
    loop = asyncio.get_running_loop()
    last = [loop.time()]

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, toward_client: bool) -> None:
        while True:
            try:
                data = await src.read(DATA_CHUNK)
            except OSError:
                raise _Stop("server_reset" if toward_client else "client_reset") from None
            if not data:
                break
            last[0] = loop.time()
            touch()
            if toward_client:
                outcome.to_client += len(data)
            else:
                outcome.to_server += len(data)
            if max_bytes and outcome.to_client + outcome.to_server > max_bytes:
                raise _Stop("limit")
            if inspector is not None:
                try:
                    go_on = inspector(data, toward_client)
                except Exception:
                    go_on = False
                if not go_on:
                    raise _Stop("hook")
            try:
                dst.write(data)
                await dst.drain()
            except OSError:
                raise _Stop("client_reset" if toward_client else "server_reset") from None
        if dst.can_write_eof():
            with contextlib.suppress(OSError):
                dst.write_eof()

    async def idle() -> None:
        while (remaining := last[0] + idle_timeout - loop.time()) > 0:
            await asyncio.sleep(remaining)
        raise _Stop("idle")

    async def flow_end() -> None:
        await ended.wait()
        raise _Stop("flow_end")

    (a_reader, a_writer), (b_reader, b_writer) = a, b
    # Toward the FTP client: from B to A in passive mode (A is the client), from A to B in active mode.
    copies = {
        asyncio.create_task(copy(a_reader, b_writer, toward_client=not a_is_client)),
        asyncio.create_task(copy(b_reader, a_writer, toward_client=a_is_client)),
    }
    watchers = {asyncio.create_task(idle()), asyncio.create_task(flow_end())}
    pending = copies | watchers
    try:
        while copies & pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, _Stop):
                    outcome.reason = exc.reason
                    raise exc
                if exc is not None:
                    raise exc
    except _Stop:
        reset(a_writer)
        reset(b_writer)
        return outcome
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for w in (a_writer, b_writer):
        w.close()
    for w in (a_writer, b_writer):
        try:
            await asyncio.wait_for(w.wait_closed(), CLOSE_FLUSH_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            w.transport.abort()
    return outcome
