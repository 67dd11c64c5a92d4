"""Relaying bytes between two TCP legs: one sans-IO core, one asyncio driver.

Every gateway that passes a TCP stream on unchanged or inspected (tcp-relay,
FTP data connections) relays it through this package, so half-close, reset,
idle and limits are decided in one place (STYLE.md, "Relays are sans-IO
too"). The tunnel's published TCP ports take the core alone
(tunnel/publish.py): their leg B is a port on the tunnel's channel, not a
socket the driver could splice into.

- ``core``: ``RelayCore``: events in (``DataReceived``, ``Spliced``,
  ``DataSent``, ``FinReceived``, ``ResetReceived``, ``Tick``, ``Abort``),
  commands out (``SendData``, ``SendSpliced``, ``HalfClose``, ``Close``,
  ``Reset``, ``Done``); ``Limits``; the inspection hook's ``Verdict`` and
  ``Replace``. Its docstring is the theory of operation.
- ``driver``: ``Relay(core, a, b).run(hold)``: the one loop that carries
  the commands out on two non-blocking sockets, with ``os.splice`` through
  a pipe where nothing inspects the bytes and a direction carries bulk
  (``SPLICE_AFTER``); ``reset_socket``.
"""

from __future__ import annotations

from gateways.relay.core import Done, Inspector, Limits, RelayCore, Replace, Side, Verdict
from gateways.relay.driver import Relay, reset_socket

__all__ = ["Done", "Inspector", "Limits", "Relay", "RelayCore", "Replace", "Side", "Verdict", "reset_socket"]
