"""The tunnel's state machines, as tables, in one place.

Theory of operation
-------------------

The mediation system (inside the private network) opens the TCP channel to
the server's service port, because behind NAT "a private network terminal
must take the initiative for any communication" (seed, on NAT asymmetry).
From then on the *server* drives: it sends requests, the mediator carries
them out and answers (seed, "Once initialization has been effected...").

Each end has a channel state:

- mediator: CONNECTING -> (channel up, HELLO sent) INIT_SENT -> (INIT_OK)
  READY; INIT_ERR, BYE, a protocol error, a dead peer or a local close lead to
  CLOSED from any state.
- server: WAIT_HELLO -> (HELLO, accepted) READY or (HELLO, refused) CLOSED;
  BYE, a protocol error, a dead peer or a local close lead to CLOSED.

A channel table maps state -> {trigger: next state}. A trigger is either a
received ``FrameType`` or a ``Local`` event. A received frame type that is not
in the current state's row is UNEXPECTED_FRAME, answered by BYE: the table is
also the allow-list of frames (STYLE.md, "unknown commands are denied by
default"). The core moves to the next state *before* it acts on the frame, as
h11 does, so a handler that fails moves on from the new state.

Inside READY, each mediator port has its own small machine (``PORT_OPS``):
a TCP port is "not yet dedicated" when opened, becomes a client port when the
server connects it and a server port when the server makes it listen (seed,
"Make server port"). The table maps (transport, port state) to the requests
allowed on it; anything else is answered ERR WRONG_STATE and the channel
stays up, because it is a refusal, not a framing fault.
"""

from __future__ import annotations

import enum

from tunnel.frames import FrameType
from tunnel.wire import Proto


class _Keyed(enum.Enum):
    """The states and triggers key the tables below, a look-up or more a
    frame. A member is its own only instance, so identity is its hash
    (Enum's own hashes its name in Python code)."""

    __hash__ = object.__hash__


class MediatorState(_Keyed):
    CONNECTING = "CONNECTING"  # no TCP/TLS channel yet
    INIT_SENT = "INIT_SENT"  # HELLO sent, waiting for INIT_OK/INIT_ERR
    READY = "READY"  # serving the server's requests
    CLOSED = "CLOSED"  # final


class ServerState(_Keyed):
    WAIT_HELLO = "WAIT_HELLO"  # channel accepted, HELLO not yet received
    READY = "READY"  # INIT_OK sent; requests may flow
    CLOSED = "CLOSED"  # final


class Local(_Keyed):
    """Triggers that are not received frames."""

    CHANNEL_UP = "channel up"  # the I/O layer connected (and did TLS)
    INIT_ACCEPTED = "init accepted"  # server: HELLO passed every check
    INIT_REFUSED = "init refused"  # server: INIT_ERR sent
    FAULT = "fault"  # protocol error from the peer, or dead peer
    CLOSE = "close"  # local close, or the I/O layer lost the channel


_MEDIATOR_READY_FRAMES = (
    FrameType.OPEN_PORT, FrameType.REDIRECT_PORT, FrameType.CONNECT, FrameType.LISTEN,
    FrameType.CLOSE, FrameType.UDP_KEY, FrameType.DATA, FrameType.EVENT_FIN,
    FrameType.EVENT_RST, FrameType.KEEPALIVE, FrameType.KEEPALIVE_ACK,
    FrameType.ERR,  # request id 0 only: the server could not take a relayed frame
    FrameType.OPEN_CONNECT, FrameType.CHECK_TARGET,  # version 2 (the decoder refuses them in 1)
    FrameType.WINDOW_UPDATE,  # version 3
    FrameType.OPEN_STREAM,  # version 4
)
_SERVER_READY_FRAMES = (
    FrameType.OPENED, FrameType.ACK, FrameType.ERR, FrameType.DATA,
    FrameType.EVENT_ACCEPTED, FrameType.EVENT_FIN, FrameType.EVENT_RST,
    FrameType.KEEPALIVE,  # the server sends no KEEPALIVE, so expects no ACK
    FrameType.WINDOW_UPDATE,  # version 3
)

Trigger = FrameType | Local

MEDIATOR_TRANSITIONS: dict[MediatorState, dict[Trigger, MediatorState]] = {
    MediatorState.CONNECTING: {
        Local.CHANNEL_UP: MediatorState.INIT_SENT,
        Local.CLOSE: MediatorState.CLOSED,
    },
    MediatorState.INIT_SENT: {
        FrameType.INIT_OK: MediatorState.READY,
        FrameType.INIT_ERR: MediatorState.CLOSED,
        FrameType.BYE: MediatorState.CLOSED,
        Local.FAULT: MediatorState.CLOSED,
        Local.CLOSE: MediatorState.CLOSED,
    },
    MediatorState.READY: {
        **{t: MediatorState.READY for t in _MEDIATOR_READY_FRAMES},
        FrameType.BYE: MediatorState.CLOSED,
        Local.FAULT: MediatorState.CLOSED,
        Local.CLOSE: MediatorState.CLOSED,
    },
    MediatorState.CLOSED: {},
}

SERVER_TRANSITIONS: dict[ServerState, dict[Trigger, ServerState]] = {
    ServerState.WAIT_HELLO: {
        FrameType.HELLO: ServerState.WAIT_HELLO,  # checked, then one of:
        Local.INIT_ACCEPTED: ServerState.READY,
        Local.INIT_REFUSED: ServerState.CLOSED,
        FrameType.BYE: ServerState.CLOSED,
        Local.FAULT: ServerState.CLOSED,
        Local.CLOSE: ServerState.CLOSED,
    },
    ServerState.READY: {
        **{t: ServerState.READY for t in _SERVER_READY_FRAMES},
        FrameType.BYE: ServerState.CLOSED,
        Local.FAULT: ServerState.CLOSED,
        Local.CLOSE: ServerState.CLOSED,
    },
    ServerState.CLOSED: {},
}


class PortState(_Keyed):
    """A mediator port's state (the server keeps a mirror of it)."""

    OPENING = "OPENING"  # OpenSocket issued, result pending
    OPEN = "OPEN"  # TCP: not yet dedicated; UDP: datagrams both ways
    REDIRECTED = "REDIRECTED"  # UDP, relayed over a UDP channel
    CONNECTING = "CONNECTING"  # TCP, ConnectSocket pending
    CONNECTED = "CONNECTED"  # TCP client port or accepted connection
    LISTEN_PENDING = "LISTEN_PENDING"  # TCP, ListenSocket pending
    LISTENING = "LISTENING"  # TCP server port
    RESET = "RESET"  # TCP connection reset; only CLOSE is left
    CLOSED = "CLOSED"  # the id is released (never stored)


class PortOp(_Keyed):
    """What the server can ask of an existing port id."""

    CONNECT = "connect"
    LISTEN = "listen"
    CLOSE = "close"
    DATA = "data"
    FIN = "fin"
    RST = "rst"


# (transport, state) -> {op: state after the op is accepted}
PORT_OPS: dict[tuple[Proto, PortState], dict[PortOp, PortState]] = {
    (Proto.TCP, PortState.OPEN): {
        PortOp.CONNECT: PortState.CONNECTING,
        PortOp.LISTEN: PortState.LISTEN_PENDING,
        PortOp.CLOSE: PortState.CLOSED,
    },
    (Proto.TCP, PortState.CONNECTING): {PortOp.CLOSE: PortState.CLOSED},
    (Proto.TCP, PortState.CONNECTED): {
        PortOp.DATA: PortState.CONNECTED,
        PortOp.FIN: PortState.CONNECTED,
        PortOp.RST: PortState.RESET,
        PortOp.CLOSE: PortState.CLOSED,
    },
    (Proto.TCP, PortState.LISTEN_PENDING): {PortOp.CLOSE: PortState.CLOSED},
    (Proto.TCP, PortState.LISTENING): {PortOp.CLOSE: PortState.CLOSED},
    (Proto.TCP, PortState.RESET): {PortOp.CLOSE: PortState.CLOSED},
    (Proto.UDP, PortState.OPEN): {PortOp.DATA: PortState.OPEN, PortOp.CLOSE: PortState.CLOSED},
    (Proto.UDP, PortState.REDIRECTED): {
        PortOp.DATA: PortState.REDIRECTED,
        PortOp.CLOSE: PortState.CLOSED,
    },
}


# Version 4: a stream the server opened (OPEN_STREAM) exists from the
# request on, before the mediator has connected it (OPENING, CONNECTING):
# the server may already send its bytes, its FIN, its RST, or close it.
EARLY_STREAM_OPS = frozenset({PortOp.DATA, PortOp.FIN, PortOp.RST, PortOp.CLOSE})


def port_op(proto: Proto, state: PortState, op: PortOp) -> PortState | None:
    """The port's state after ``op``, or None if ``op`` is not allowed now."""
    return PORT_OPS.get((proto, state), {}).get(op)
