"""The SMTP core's vocabulary: its ``Policy`` (limits and hooks) and the outputs it hands its adapter.

``SmtpRelay`` (``core``) is sans-IO; the adapter (``gateway``) carries out
its outputs in order:

- ``ToClient`` / ``ToServer``: bytes for a peer, whole replies and whole
  command lines (so one write per batch: no Nagle stall);
- ``StartTls``: terminate mode: TLS towards the server, then ``reply`` to
  the client and TLS towards it; the core hears ``tls_started`` or
  ``tls_failed``;
- ``Opaque``: passthrough mode after STARTTLS: relay bytes unchanged;
- ``Close``: close both connections, after sending what came before; a
  transaction the server has not seen end (no end-of-data) is thereby
  aborted (RFC 5321 section 3.8);
- ``Event``: something to count and log (a refusal, a message).

Policy hooks (STYLE.md, "Policy is separate from protocol"): a hook takes a
mailbox (``local@domain``, or ``""`` for the null sender) and returns
``None`` to let it pass or a refusal ``Reply``. A missing hook is the safe
default: no sender hook lets every sender pass (the server judges them),
no recipient hook refuses every recipient (nothing is relayed unless the
operator names the domains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from gateways.session import Close, Event
from gateways.smtp.settings import SmtpSettings

_D = SmtpSettings.model_fields


def _d(key: str) -> Any:
    return _D[key].default


@dataclass(frozen=True)
class Reply:
    """A reply the gateway gives itself: code, enhanced status code (RFC 3463), text."""

    code: int
    status: str
    text: str

    def wire(self) -> bytes:
        return f"{self.code} {self.status} {self.text}\r\n".encode()


Hook = Callable[[str], Optional[Reply]]


@dataclass(frozen=True)
class Policy:
    """What the core enforces; ``policy_of(SmtpSettings)`` builds one from the config."""

    starttls: str = _d("starttls")
    tls_available: bool = False  # terminate: a certificate is loaded, so STARTTLS can be offered
    extensions: frozenset[str] = frozenset(_d("extensions"))
    allow_vrfy: bool = _d("allow_vrfy")
    allow_expn: bool = _d("allow_expn")
    max_command_line: int = _d("max_command_line")
    max_text_line: int = _d("max_text_line")
    max_reply_line: int = _d("max_reply_line")
    max_message_size: int = _d("max_message_size")
    max_recipients: int = _d("max_recipients")
    max_messages: int = _d("max_messages")
    max_bad_commands: int = _d("max_bad_commands")
    sender: Hook | None = None
    recipient: Hook | None = None


# ---- outputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToClient:
    data: bytes


@dataclass(frozen=True)
class ToServer:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Terminate mode: handshake with the server, then send ``reply`` to the client and handshake with it."""

    reply: bytes


@dataclass(frozen=True)
class Opaque:
    """Passthrough mode: from now on relay bytes unchanged."""


Output = Union[ToClient, ToServer, StartTls, Opaque, Close, Event]
