"""FTP data connections that the processor redirected into the gateway: relayed, and in inspect mode checked.

A data connection reaches the gateway when its rule was a REDIRECT: always
in ``inspect`` mode, and in ``allow`` mode when the kernel cannot carry it as
it is (its destination is the router's address standing in for a party, so
it needs the double NAT of the processor). It is relayed by
``gateways.relay`` like any TCP stream (spliced in the kernel, once it
carries bulk, when no hook looks at it), with two checks in inspect mode (the seed's "Dynamic
changes": "for example in order to check for viruses that might come
embedded in a file transferred over the ftp data channel"):

- ``max_transfer_bytes``: past it both legs are reset, so the peers see an
  aborted transfer (the server answers 426 on the control channel);
- the content hook: ``content_hook = "module:function"`` names a function
  ``hook(transfer: Transfer) -> Inspector | None``; the inspector is called
  with each chunk and whether it flows toward the FTP client, and returns
  False to stop the transfer (both legs reset). A hook that raises stops
  the transfer too: a broken check must not let data through unchecked.

An idle data connection is reset, not closed with a FIN: in stream mode a
FIN ends the file (RFC 959 section 3.4.1), so it would pass off a truncated
file as complete.

The hook is policy and the relay is mechanism (STYLE.md, "Policy is separate
from protocol"): no hook configured means no content check. ``data_core``
puts the settings and the hook's inspector in the relay core's terms.
"""

from __future__ import annotations

import importlib
import ipaddress
from dataclasses import dataclass
from typing import Callable

from firewall.errors import UsageError
from firewall.signalling import FlowInfo
from gateways import relay
from gateways.relay import Limits, RelayCore, Side, Verdict


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


def _names(passive: bool) -> dict[Side, str]:
    """Each leg's FTP party: in passive mode the client connected (leg A), in active mode the server."""
    return {Side.A: "client", Side.B: "server"} if passive else {Side.A: "server", Side.B: "client"}


def data_core(
    now: float, *, passive: bool, max_bytes: int, idle_timeout: float, inspector: Inspector | None
) -> RelayCore:
    """The relay core of one data connection; its legs are named by FTP party (``client_reset``)."""
    inspectors: dict[Side, relay.Inspector] = {}
    if inspector is not None:
        for side, party in _names(passive).items():
            inspectors[side] = _verdicts(inspector, toward_client=party == "server")
    # reset_on_idle: a FIN would end the file (module docstring).
    limits = Limits(idle_timeout=idle_timeout, max_bytes=max_bytes, reset_on_idle=True)
    return RelayCore(limits, now, inspectors=inspectors, names=_names(passive))


def _verdicts(inspector: Inspector, *, toward_client: bool) -> relay.Inspector:
    """The FTP inspector (chunk, toward client) -> bool as the relay core's chunk -> Verdict."""

    def inspect(chunk: bytes) -> Verdict:
        return Verdict.PASS if inspector(chunk, toward_client) else Verdict.CLOSE

    return inspect


def transferred(core: RelayCore, passive: bool) -> tuple[int, int]:
    """(bytes toward the FTP client, bytes toward the FTP server) the core counted."""
    server, client = (Side.B, Side.A) if passive else (Side.A, Side.B)
    return core.received(server), core.received(client)
