"""Error codes of the tunnel protocol, and whose fault an error is.

The seed asks that each request be answered "by an acknowledgement code, or an
error code if the request fails" (seed, "1. Open, redirect, and close port
requests"). ``ErrorCode`` is that code, shared by ERR, INIT_ERR and BYE.

Errors say whose fault they are (STYLE.md, after h11):

- ``ProtocolError``: the *peer* broke the protocol. It carries the code to put
  in the BYE (or INIT_ERR) that answers it. The codec raises nothing else on
  bad input.
- ``LocalProtocolError``: *our* caller misused a core (a bug). It is never
  sent anywhere.
- ``LimitError``: the server's own application asked for more than the
  per-mediator limits allow. It is refused before anything is sent.
- ``RequestRefused``: a request the server made of a mediator failed: the
  mediator answered ERR, or the server refused it before sending (``local``).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """The u16 code carried by ERR, INIT_ERR and BYE (docs/tunnel-protocol.md).

    New codes arrive only with a new protocol version, so a v1 decoder refuses
    a code it does not know.
    """

    NORMAL = 0  # BYE only: an orderly close
    BAD_REQUEST = 1  # a field is malformed or out of range
    UNSUPPORTED_VERSION = 2  # no common version, or a frame in another version
    UNKNOWN_FRAME = 3  # frame type not defined in this version
    FRAME_TOO_LARGE = 4  # over the receiver's max frame size
    UNEXPECTED_FRAME = 5  # frame not allowed in the receiver's state
    AUTH_FAILED = 6  # identity/token refused
    NOT_ALLOWED = 7  # the owner's allow-list refuses it
    PORT_IN_USE = 8  # a mandatory port is taken
    NO_FREE_PORT = 9  # desired port: none free from that number up
    NO_SUCH_ID = 10  # the port id is unknown (or already closed)
    WRONG_STATE = 11  # the port cannot do that now (connect a listener...)
    LIMIT = 12  # a per-mediator or per-host limit is reached
    CONNECT_FAILED = 13  # refused, unreachable or timed out
    NO_SUCH_ADDRESS = 14  # the mediator has no such local address
    CANCELLED = 15  # the port was closed while the request was pending
    TIMEOUT = 16  # dead peer, or no HELLO/INIT reply in time
    INTERNAL = 17  # the answering side failed for a reason of its own


class TunnelError(Exception):
    """Base of the tunnel's errors; ``code`` says what to tell the peer."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code
        self.message = message or code.name


class ProtocolError(TunnelError):
    """The peer sent something the protocol forbids (remote fault).

    The core answers it with BYE(code) and closes the channel: a byte stream
    that broke framing once cannot be trusted to be framed again.
    """


class LocalProtocolError(TunnelError):
    """The caller of a core misused it (a bug on our side; never sent)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)


class LimitError(TunnelError):
    """The server's application asked for more than a mediator may have."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.LIMIT, message)


class RequestRefused(Exception):
    """A request to the mediator failed; ``code`` is the protocol's error name.

    ``local``: the server refused it before sending (the port's state, a
    closed channel), rather than the mediator answering ERR.
    """

    def __init__(self, code: str, message: str, local: bool = False) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.local = local
