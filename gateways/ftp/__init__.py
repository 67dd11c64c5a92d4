"""The ``ftp`` gateway: FTP with dynamic data-port rules (issue 4, docs/ftp.md).

The seed's own example of "Dynamic changes in packet processing": the
processor redirects only the control connection; the gateway reads the data
ports in it and asks for one exact, one-shot, short-lived rule per data
connection.

- ``parse``: PORT, EPRT, 227 and 229, parsed strictly and written anew;
  command and reply lines; Telnet IAC removal.
- ``commands``: the command table (argument, login, role, help) and the
  default allow-list.
- ``model``: the core's values: ``Parties``, ``Policy``, and its outputs
  (``ToClient``, ``ToServer``, ``RequestRule``, ``Opaque``, ``Close``,
  ``Event``).
- ``core``: ``FtpControl``, the sans-IO control channel: bytes from each peer
  in; bytes out, ``RequestRule``, ``Opaque``, ``Close``, ``Event``.
- ``data``: relaying the data connections redirected into the gateway, with
  inspect mode's size limit and content hook.
- ``gateway``: ``FtpGateway``, the asyncio adapter (one listener for control
  sessions and the data connections they expect); its ``[gateway.settings]``
  are ``FtpSettings`` (gateways/ftp/kind.py, with the kind's declaration).
"""

from gateways.ftp.core import FtpControl
from gateways.ftp.model import DataChannel, Direction, Parties, Policy
from gateways.ftp.gateway import FtpGateway
from gateways.ftp.kind import FtpSettings

__all__ = ["DataChannel", "Direction", "FtpControl", "FtpGateway", "FtpSettings", "Parties", "Policy"]
