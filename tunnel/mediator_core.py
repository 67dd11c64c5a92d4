"""The mediation system's side of the tunnel, sans-IO.

Theory of operation
-------------------

The mediation system "makes its TCP/UDP/IP interface available to the
terminal 5 via a control server 4" (seed, Figure 1 description). This core
is that system's protocol logic. It never touches a socket or a clock:

1. The I/O layer connects to the server's service port (TLS), then calls
   ``channel_up(now)``; the core answers with HELLO (identity, token, wanted
   service, addresses and netmasks: the seed's initialization).
2. Bytes from the channel go to ``receive_data(bytes, now)``. Each server
   request is checked -- port state table (tunnel/states.py), the owner's
   allow-list ``policy``, the settings' limits -- and either refused at once
   with ERR, or turned into a command (``OpenSocket``, ``ConnectSocket``...)
   for the I/O layer.
3. The I/O layer reports each command's result: ``opened``, ``connected``,
   ``listening`` or ``failed``; the core answers the pending request.
4. What the sockets see goes to ``received``, ``accepted``, ``fin`` and
   ``reset``; the core relays it (seed, "Packet and event relay"). Datagrams
   of a redirected port go over its UDP channel, authenticated.
5. ``tick(now)`` sends the keepalives and detects a dead server;
   ``next_deadline()`` says when to call it next (seed, "Maintain channel").

Every call returns the list of commands and events to carry out, in order.
A missing ``policy`` refuses everything: the server gets NOT_ALLOWED.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from firewall.replay import ReplayWindow
from tunnel.channel import ChannelCore, IdAllocator
from tunnel.commands import (
    AbortSocket, CloseSocket, ConnectSocket, ListenSocket, MediatorOutput,
    KeepaliveLearned, OpenSocket, PauseReading, Ready, Refused, RelayFailed, ResumeReading, SendChannel,
    SendProbe, SendTo, ShutdownSocket, UdpChannelDead, WriteStream,
)
from tunnel.datagrams import (
    Datagram, DatagramError, DatagramType, DropReason, encode_datagram, fits_channel,
    verify_datagram,
)
from tunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from tunnel.frames import (
    MIN_MAX_FRAME_SIZE, UDP_KEY_SIZE, Ack, ClosePort, ConnectPort, Data, Err, EventAccepted,
    EventFin, EventRst, Frame, FrameType, Hello, InitErr, InitOk, IPAddress, IPInterface,
    Keepalive, KeepaliveAck, ListenPort, Opened, OpenPort, Proto, RedirectPort, UdpKey,
    CheckTarget, OpenConnect, OpenStream, STREAM_ID_BASE, WindowUpdate,
)
from tunnel.policy import Op, Policy
from tunnel.settings import MediatorSettings
from tunnel.states import EARLY_STREAM_OPS, MEDIATOR_TRANSITIONS, Local, MediatorState, PortOp, PortState, port_op
from tunnel.lifetime import Probe
from tunnel.window import StreamWindow
from tunnel.wire import endpoint_text


Out = list[MediatorOutput]


@dataclass(frozen=True)
class MediatorIdentity:
    """Who the mediator is and what it has (sent in HELLO)."""

    identity: str
    token: bytes
    service: str
    interfaces: tuple[IPInterface, ...] = ()


def _family_mismatch(local: IPAddress, target: IPAddress) -> str:
    """A socket bound to one family cannot connect to the other (an IPv4-mapped
    address is IPv6 on the wire, so it is refused too: send it as IPv4)."""
    return f"cannot connect from IPv{local.version} address {local} to IPv{target.version} address {target}"


@dataclass(slots=True)
class _Port:
    """One port or connection id, as the mediator sees it."""

    port_id: int
    proto: Proto
    state: PortState
    address: IPAddress  # local address
    port: int  # local port (requested until opened)
    redirect: bool = False
    pending: int = 0  # request id waiting for a socket result
    peer: tuple[IPAddress, int] | None = None  # TCP: the connected private end
    shut: bool = False  # the server's FIN was relayed (no more DATA)
    connect_to: tuple[IPAddress, int] | None = None  # OPEN_CONNECT's target: OPENED comes once connected
    credit: StreamWindow | None = None  # version 3: a connected TCP port's windows
    stream: bool = False  # version 4: opened by OPEN_STREAM, with the server's id
    early: list[bytes] = field(default_factory=list)  # version 4: the server's bytes before we connected
    fin_sent: bool = False  # our EVENT_FIN left (version 4: with ``shut``, the id is released)
    # UDP channel of a redirected port
    send_seq: int = 0
    window: ReplayWindow | None = None
    next_keepalive: float = 0.0
    last_received: float = 0.0


@dataclass
class _Key:
    key_id: int
    key: bytes = field(repr=False)


class MediatorCore(ChannelCore[MediatorState]):
    """The mediation system's protocol state machine (one TCP channel)."""

    def __init__(
        self,
        identity: MediatorIdentity,
        settings: MediatorSettings | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings or MediatorSettings()
        super().__init__(
            MediatorState.CONNECTING, MEDIATOR_TRANSITIONS, MediatorState.CLOSED,
            self.settings.versions, self.settings.max_frame_size,
        )
        self.window_max, self.window_budget = self.settings.stream_window_max, self.settings.stream_window_budget
        self.identity = identity
        self.policy = policy
        self.session_id: int | None = None
        self.dropped: Counter[DropReason] = Counter()
        """Datagrams dropped, by reason (DESIGN.md invariant 10)."""
        self.accepts_refused = 0
        self.late_keepalive_acks = 0
        """Answers to keepalives older than the last ``dead_after`` (ignored)."""
        """Accepted connections closed because ``max_ports`` was reached."""
        self._ports: dict[int, _Port] = {}
        self._redirected: set[int] = set()  # ids of REDIRECTED ports (``_channels``)
        # The lower half of the ids: the upper is the server's (OPEN_STREAM).
        self._port_ids = IdAllocator(1, STREAM_ID_BASE - 1)
        self._request_ids = IdAllocator()
        self._pending: dict[int, int] = {}  # server request id -> port id
        # Our KEEPALIVE ids not yet answered, oldest first; only the last
        # ``dead_after`` are remembered, so the set stays bounded even if a
        # server that sends other frames never answers them.
        self._keepalives: dict[int, None] = {}
        self._hello_id = 0
        self._init_deadline = 0.0
        self._next_keepalive = 0.0
        self._key: _Key | None = None
        # Keepalive discovery (version 3): the probe, its own sequence and
        # replay window on channel 0, and the UDP channels' interval.
        self._probe: Probe | None = None
        self._probe_seq = 0
        self._probe_window = ReplayWindow(self.settings.replay_window)
        self.channel_interval = self.settings.keepalive_interval
        """Seconds between a UDP channel's keepalives: learnt, or the configured interval."""
        self._handlers = {
            FrameType.INIT_OK: self._on_init_ok,
            FrameType.INIT_ERR: self._on_init_err,
            FrameType.OPEN_PORT: self._on_open,
            FrameType.REDIRECT_PORT: self._on_redirect,
            FrameType.CONNECT: self._on_connect,
            FrameType.LISTEN: self._on_listen,
            FrameType.CLOSE: self._on_close,
            FrameType.UDP_KEY: self._on_udp_key,
            FrameType.OPEN_CONNECT: self._on_open_connect,
            FrameType.OPEN_STREAM: self._on_open_stream,
            FrameType.CHECK_TARGET: self._on_check_target,
            FrameType.DATA: self._on_data,
            FrameType.EVENT_FIN: self._on_fin,
            FrameType.EVENT_RST: self._on_rst,
            FrameType.WINDOW_UPDATE: self._on_window_update,
            FrameType.KEEPALIVE: self._on_keepalive,
            FrameType.KEEPALIVE_ACK: self._on_keepalive_ack,
            FrameType.ERR: self._on_err,
            FrameType.BYE: self._on_bye,
        }

    # -- the channel -----------------------------------------------------------

    def channel_up(self, now: float) -> Out:
        """The TCP (TLS) channel to the service port is up: say HELLO."""
        self._move(Local.CHANNEL_UP)
        self._hello_id = self._request_ids.new(())
        self._init_deadline = now + self.settings.init_timeout
        self._last_received = now
        hello = Hello(
            self.settings.versions, self.identity.identity, self.identity.token,
            self.identity.service, self.identity.interfaces,
            round(self.settings.keepalive_interval * 1000), self.settings.max_frame_size,
            request_id=self._hello_id,
        )
        return [self._send(hello)]

    def receive_data(self, data: bytes, now: float) -> Out:
        """Bytes from the TCP channel (any chunking)."""
        if self._state is MediatorState.CONNECTING:
            raise LocalProtocolError("receive_data before channel_up")
        return self._receive(data, now)

    def receive_into(self, nbytes: int, now: float) -> Out:
        if self._state is MediatorState.CONNECTING:
            raise LocalProtocolError("receive_into before channel_up")
        return super().receive_into(nbytes, now)

    def close(
        self, code: ErrorCode = ErrorCode.NORMAL, message: str = ""
    ) -> Out:
        """Close the channel ourselves: BYE, then every socket."""
        return self._close(code, message, send_bye=self._state is not MediatorState.CONNECTING)

    def tick(self, now: float) -> Out:
        """Send the keepalives that are due; close if the server is dead."""
        if self._state is MediatorState.INIT_SENT and now >= self._init_deadline:
            return self._fault(ErrorCode.TIMEOUT, "no INIT_OK in time")
        if self._state is not MediatorState.READY:
            return []
        interval = self.settings.keepalive_interval
        silence = interval * self.settings.dead_after
        if now >= self._last_received + silence:
            return self._fault(ErrorCode.TIMEOUT, f"nothing from the server for {silence:g} s")
        out: Out = []
        if now >= self._next_keepalive:
            request_id = self._request_ids.new(self._keepalives)
            self._keepalives[request_id] = None
            if len(self._keepalives) > self.settings.dead_after:
                del self._keepalives[next(iter(self._keepalives))]
            self._next_keepalive = now + interval
            out.append(self._send(Keepalive(request_id=request_id)))
        channel_silence = self.channel_interval * self.settings.dead_after
        for port in self._channels():
            if now >= port.last_received + channel_silence:
                port.last_received = now
                out.append(UdpChannelDead(port.port_id))
            if now >= port.next_keepalive:
                out.append(self._channel_keepalive(port, now))
        return out + self._probe_tick(now)

    def next_deadline(self, now: float = 0.0) -> float | None:
        """When ``tick`` must be called next (None: no timer running). ``now``
        is not needed: the driver's ``deadline`` is this method itself."""
        if self._state is MediatorState.INIT_SENT:
            return self._init_deadline
        if self._state is not MediatorState.READY:
            return None
        # After every event: no list unless a UDP channel is there.
        settings = self.settings
        at = min(self._next_keepalive, self._last_received + settings.keepalive_interval * settings.dead_after)
        if self._redirected:
            channel_silence = self.channel_interval * settings.dead_after
            for port in self._channels():
                at = min(at, port.next_keepalive, port.last_received + channel_silence)
        if self._probe is not None and self._probe.result is None:  # discovery under way
            probe_at = self._probe.deadline()
            if probe_at is not None and probe_at < at:
                return probe_at
        return at

    # -- replies and refusals --------------------------------------------------

    def _reply(self, frame: Frame) -> Out:
        return [self._send(frame)]

    def _err(self, request: Frame, code: ErrorCode, message: str, port_id: int = 0) -> Out:
        return [self._send(Err(code, port_id, message, request_id=request.request_id))]

    def _allowed(self, op: Op, address: IPAddress, port: int, proto: Proto) -> bool:
        return self.policy is not None and self.policy.check(op, address, port, proto)

    def _refuse(
        self, request_id: int, op: Op, address: IPAddress, port: int, proto: Proto, port_id: int = 0
    ) -> Out:
        message = f"{op.value} {proto.name} {endpoint_text(address, port)} is not allowed"
        return [
            Refused(op, address, port, proto),
            self._send(Err(ErrorCode.NOT_ALLOWED, port_id, message, request_id=request_id)),
        ]

    def _check_request_id(self, request: Frame) -> None:
        if request.request_id in self._pending:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"request id {request.request_id} is still pending"
            )

    # -- handshake ---------------------------------------------------------------

    def _on_init_ok(self, frame: InitOk, now: float) -> Out:
        if frame.request_id != self._hello_id:
            raise ProtocolError(ErrorCode.UNEXPECTED_FRAME, "INIT_OK does not answer our HELLO")
        if frame.version not in self.settings.versions:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION, f"server chose version {frame.version}"
            )
        if frame.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "server's max frame size is too small")
        self._negotiated(frame.version, frame.max_frame_size)
        self.session_id = frame.session_id
        self._next_keepalive = now + self.settings.keepalive_interval
        return [Ready(frame.session_id, frame.version)]

    def _on_init_err(self, frame: InitErr, now: float) -> Out:
        return self._teardown(frame.code, frame.message, by_peer=True)

    # -- requests (seed, "1. Open, redirect, and close port requests") ---------

    def _open(
        self, frame: OpenPort | RedirectPort, proto: Proto, op: Op, redirect: bool
    ) -> Out:
        self._check_request_id(frame)
        if frame.mandatory and frame.port == 0:
            return self._err(frame, ErrorCode.BAD_REQUEST, "a mandatory port needs a number")
        if len(self._ports) >= self.settings.max_ports:
            return self._err(frame, ErrorCode.LIMIT, f"max_ports {self.settings.max_ports} reached")
        if len(self._pending) >= self.settings.max_pending:
            return self._err(frame, ErrorCode.LIMIT, f"max_pending {self.settings.max_pending} reached")
        # Port 0 names no port yet; the assigned one is checked in opened().
        if frame.port != 0 and not self._allowed(op, frame.address, frame.port, proto):
            return self._refuse(frame.request_id, op, frame.address, frame.port, proto)
        port_id = self._port_ids.new(self._ports)
        self._ports[port_id] = _Port(
            port_id, proto, PortState.OPENING, frame.address, frame.port,
            redirect=redirect, pending=frame.request_id,
        )
        self._pending[frame.request_id] = port_id
        return [OpenSocket(port_id, proto, frame.address, frame.port, frame.mandatory, redirect)]

    def _on_open(self, frame: OpenPort, now: float) -> Out:
        return self._open(frame, frame.proto, Op.OPEN, redirect=False)

    def _on_redirect(self, frame: RedirectPort, now: float) -> Out:
        if self._key is None:
            return self._err(frame, ErrorCode.WRONG_STATE, "no UDP_KEY yet: no UDP channel")
        return self._open(frame, Proto.UDP, Op.REDIRECT, redirect=True)

    def _on_open_connect(self, frame: OpenConnect, now: float) -> Out:
        """Version 2: OPEN_PORT (TCP, any port) and CONNECT in one request."""
        return self._open_connect(frame, 0)

    def _on_open_stream(self, frame: OpenStream, now: float) -> Out:
        """Version 4: OPEN_CONNECT on the id the server chose; its DATA, FIN or
        RST may follow at once, before we have connected (``_early``)."""
        if frame.port_id < STREAM_ID_BASE or frame.port_id in self._ports:
            self._check_request_id(frame)
            return self._err(frame, ErrorCode.BAD_REQUEST, f"stream id {frame.port_id} is not the server's or is taken")
        return self._open_connect(frame, frame.port_id)

    def _open_connect(self, frame: OpenConnect | OpenStream, stream_id: int) -> Out:
        self._check_request_id(frame)
        if frame.port == 0:
            return self._err(frame, ErrorCode.BAD_REQUEST, "cannot connect to port 0", stream_id)
        if frame.local.version != frame.address.version:
            return self._err(frame, ErrorCode.BAD_REQUEST, _family_mismatch(frame.local, frame.address), stream_id)
        if len(self._ports) >= self.settings.max_ports:
            return self._err(frame, ErrorCode.LIMIT, f"max_ports {self.settings.max_ports} reached", stream_id)
        if len(self._pending) >= self.settings.max_pending:
            return self._err(frame, ErrorCode.LIMIT, f"max_pending {self.settings.max_pending} reached", stream_id)
        if not self._allowed(Op.CONNECT, frame.address, frame.port, Proto.TCP):
            return self._refuse(frame.request_id, Op.CONNECT, frame.address, frame.port, Proto.TCP, stream_id)
        port_id = stream_id or self._port_ids.new(self._ports)
        self._ports[port_id] = _Port(
            port_id, Proto.TCP, PortState.OPENING, frame.local, 0, pending=frame.request_id,
            connect_to=(frame.address, frame.port), stream=stream_id != 0,
            # A stream's window runs from the request on: the server's first
            # bytes may come before OPENED, and count against it.
            credit=self._window() if stream_id else None,
        )
        self._pending[frame.request_id] = port_id
        return [OpenSocket(port_id, Proto.TCP, frame.local, 0, False, False, connect_to=(frame.address, frame.port))]

    def _on_check_target(self, frame: CheckTarget, now: float) -> Out:
        """Version 2: the allow-list's verdict on a target, nothing opened."""
        op = Op.CONNECT if frame.proto is Proto.TCP else Op.SEND
        if not self._allowed(op, frame.address, frame.port, frame.proto):
            return self._refuse(frame.request_id, op, frame.address, frame.port, frame.proto)
        return self._reply(Ack(request_id=frame.request_id))

    def _port_for(
        self, request: Frame, port_id: int, op: PortOp
    ) -> tuple[_Port | None, Out]:
        """The port ``op`` applies to, or the ERR that refuses it."""
        reply_id = request.request_id
        port = self._ports.get(port_id)
        if port is not None and port.stream and port.connect_to is not None and op in EARLY_STREAM_OPS:
            if op is PortOp.DATA and port.shut:
                message = f"cannot {op.value} stream {port_id} after its FIN"
                return None, [self._send(Err(ErrorCode.WRONG_STATE, port_id, message, request_id=reply_id))]
            return port, []  # version 4: the server's stream exists from its request on
        if port is None or port.state is PortState.OPENING or port.connect_to is not None:
            message = f"no port {port_id}"  # not announced yet (OPENED not sent)
            return None, [self._send(Err(ErrorCode.NO_SUCH_ID, port_id, message, request_id=reply_id))]
        if port_op(port.proto, port.state, op) is None or (op is PortOp.DATA and port.shut):
            message = f"cannot {op.value} {port.proto.name} port {port_id} in {port.state.value}"
            return None, [self._send(Err(ErrorCode.WRONG_STATE, port_id, message, request_id=reply_id))]
        return port, []

    def _on_connect(self, frame: ConnectPort, now: float) -> Out:
        self._check_request_id(frame)
        port, refusal = self._port_for(frame, frame.port_id, PortOp.CONNECT)
        if port is None:
            return refusal
        if frame.port == 0:
            return self._err(frame, ErrorCode.BAD_REQUEST, "cannot connect to port 0", port.port_id)
        if port.address.version != frame.address.version:
            return self._err(frame, ErrorCode.BAD_REQUEST, _family_mismatch(port.address, frame.address), port.port_id)
        if not self._allowed(Op.CONNECT, frame.address, frame.port, Proto.TCP):
            return self._refuse(
                frame.request_id, Op.CONNECT, frame.address, frame.port, Proto.TCP, port.port_id
            )
        if len(self._pending) >= self.settings.max_pending:
            return self._err(frame, ErrorCode.LIMIT, "max_pending reached", port.port_id)
        port.state, port.pending = PortState.CONNECTING, frame.request_id
        port.peer = (frame.address, frame.port)
        self._pending[frame.request_id] = port.port_id
        return [ConnectSocket(port.port_id, frame.address, frame.port)]

    def _on_listen(self, frame: ListenPort, now: float) -> Out:
        self._check_request_id(frame)
        port, refusal = self._port_for(frame, frame.port_id, PortOp.LISTEN)
        if port is None:
            return refusal
        if not self._allowed(Op.LISTEN, port.address, port.port, Proto.TCP):
            return self._refuse(
                frame.request_id, Op.LISTEN, port.address, port.port, Proto.TCP, port.port_id
            )
        if len(self._pending) >= self.settings.max_pending:
            return self._err(frame, ErrorCode.LIMIT, "max_pending reached", port.port_id)
        port.state, port.pending = PortState.LISTEN_PENDING, frame.request_id
        self._pending[frame.request_id] = port.port_id
        return [ListenSocket(port.port_id)]

    def _on_close(self, frame: ClosePort, now: float) -> Out:
        port, refusal = self._port_for(frame, frame.port_id, PortOp.CLOSE)
        if port is None:
            return refusal
        out: Out = []
        if port.pending:
            # The pending CONNECT/LISTEN can no longer succeed: answer it first.
            del self._pending[port.pending]
            cancelled = Err(ErrorCode.CANCELLED, port.port_id, "port closed", request_id=port.pending)
            out.append(self._send(cancelled))
        del self._ports[port.port_id]
        return out + [CloseSocket(port.port_id), self._send(Ack(request_id=frame.request_id))]

    def _on_udp_key(self, frame: UdpKey, now: float) -> Out:
        if len(frame.key) != UDP_KEY_SIZE:
            return self._err(frame, ErrorCode.BAD_REQUEST, f"a UDP key is {UDP_KEY_SIZE} bytes")
        self._key = _Key(frame.key_id, frame.key)
        for port in self._channels():  # a new key starts every channel afresh
            port.send_seq = 0
            port.window = ReplayWindow(self.settings.replay_window)
        self._probe_seq, self._probe_window = 0, ReplayWindow(self.settings.replay_window)
        if self._probe is None and self.settings.keepalive_discovery and (self._version or 0) >= 3:
            self._probe = Probe(self.settings.keepalive_floor, self.settings.keepalive_ceiling, now)
        return [self._send(Ack(request_id=frame.request_id))]

    # -- relay from the server (seed, "2. Packet and event relay") -------------

    def _on_data(self, frame: Data, now: float) -> Out:
        port, refusal = self._port_for(frame, frame.port_id, PortOp.DATA)
        if port is None:
            return refusal
        if port.proto is Proto.TCP:
            if (port.connect_to or port.peer) != (frame.address, frame.port):
                message = "not this connection's peer"
                return self._err(frame, ErrorCode.BAD_REQUEST, message, port.port_id)
            if port.credit is not None and not port.credit.received(len(frame.payload)):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"DATA past port {port.port_id}'s window")
            if port.connect_to is not None:
                # Version 4: before we connected; written once we have (the
                # window bounds it, and the credit goes back as it leaves).
                port.early.append(frame.payload)
                return []
            return [WriteStream(port.port_id, frame.payload)]
        return self._send_to(port, frame.address, frame.port, frame.payload)

    def _send_to(self, port: _Port, address: IPAddress, dport: int, payload: bytes) -> Out:
        if not self._allowed(Op.SEND, address, dport, Proto.UDP):
            return self._refuse(0, Op.SEND, address, dport, Proto.UDP, port.port_id)
        return [SendTo(port.port_id, address, dport, payload)]

    def _on_fin(self, frame: EventFin, now: float) -> Out:
        port, refusal = self._port_for(frame, frame.port_id, PortOp.FIN)
        if port is None:
            return refusal
        if port.shut:
            return self._err(frame, ErrorCode.WRONG_STATE, "FIN already relayed", port.port_id)
        port.shut = True
        if port.connect_to is not None:
            return []  # version 4, before we connected: shut down once we have
        return [ShutdownSocket(port.port_id), *self._both_fins(port)]

    def _on_rst(self, frame: EventRst, now: float) -> Out:
        if self.opens_streams and frame.port_id not in self._ports:
            return []  # version 4: an RST that crossed our own release (or our RST)
        port, refusal = self._port_for(frame, frame.port_id, PortOp.RST)
        if port is None:
            return refusal
        if port.connect_to is not None:
            return self._cancel(port, "reset by the server")
        if self.opens_streams:
            # Version 4: the id is released by the RST itself, no CLOSE.
            del self._ports[port.port_id]
            return [AbortSocket(port.port_id), CloseSocket(port.port_id)]
        port.state, port.credit = PortState.RESET, None
        return [AbortSocket(port.port_id)]

    def _cancel(self, port: _Port, why: str) -> Out:
        """Version 4: the server ended a stream before we connected it: its
        request is answered ERR CANCELLED, the socket and the id go."""
        del self._pending[port.pending]
        del self._ports[port.port_id]
        cancelled = Err(ErrorCode.CANCELLED, port.port_id, why, request_id=port.pending)
        return [CloseSocket(port.port_id), self._send(cancelled)]

    def _both_fins(self, port: _Port) -> Out:
        """Version 4: once both FINs have crossed, the id is released without
        CLOSE (the server does the same on its side): the socket closes
        after what is left of its writes."""
        if not (self.opens_streams and port.shut and port.fin_sent):
            return []
        del self._ports[port.port_id]
        return [CloseSocket(port.port_id)]

    def _on_window_update(self, frame: WindowUpdate, now: float) -> Out:
        port = self._ports.get(frame.port_id)
        if port is None or port.credit is None or port.state is not PortState.CONNECTED:
            return []  # the port ended while the credit was in flight
        sendable = port.credit.granted(frame.increment)
        if sendable is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"WINDOW_UPDATE past port {port.port_id}'s window")
        return self._stream(port, *sendable)

    def _stream(self, port: _Port, data: bytes, changed: bool) -> Out:
        """DATA for what the window lets go, then the reading switch and a FIN held behind it."""
        assert port.peer is not None and port.credit is not None
        out: Out = list(self._data_frames(port.port_id, *port.peer, data, stream=True))
        if changed:
            out.append(PauseReading(port.port_id) if port.credit.paused else ResumeReading(port.port_id))
        if port.credit.fin_held and not port.credit.held:
            port.credit.fin_held = False
            port.fin_sent = True
            out.append(self._send(EventFin(port.port_id)))
            out += self._both_fins(port)
        return out

    def consumed(self, port_id: int, n: int) -> Out:
        """Version 3: ``n`` bytes written to connection ``port_id`` left its
        socket's buffer; the credit goes back to the server in pieces."""
        record = self._live(port_id)
        if record is None or self.closed or record.credit is None or record.state is not PortState.CONNECTED:
            return []
        return self._grant(port_id, record.credit, n)

    def _on_keepalive(self, frame: Keepalive, now: float) -> Out:
        return self._reply(KeepaliveAck(request_id=frame.request_id))

    def _on_keepalive_ack(self, frame: KeepaliveAck, now: float) -> Out:
        if frame.request_id in self._keepalives:
            del self._keepalives[frame.request_id]
            return []
        # Our only requests are HELLO and KEEPALIVE, so an issued id that is
        # not HELLO's is a keepalive we stopped remembering: its answer is
        # late (a busy channel), which proves the server alive, never a
        # protocol error (issue 14 B). An id we never issued is one.
        if frame.request_id != self._hello_id and self._request_ids.issued(frame.request_id):
            self.late_keepalive_acks += 1
            return []
        raise ProtocolError(ErrorCode.UNEXPECTED_FRAME, "KEEPALIVE_ACK for no KEEPALIVE")

    def _on_err(self, frame: Err, now: float) -> Out:
        # Our only requests are HELLO (answered by INIT_*) and KEEPALIVE
        # (answered by KEEPALIVE_ACK): an ERR can only report on a relayed frame.
        if frame.request_id != 0:
            raise ProtocolError(ErrorCode.UNEXPECTED_FRAME, "ERR answers no request of ours")
        return [RelayFailed(frame.port_id, frame.code, frame.message)]

    # -- results of commands -------------------------------------------------------

    def _issued(self, port_id: int) -> bool:
        """Ours from the allocator, or (upper half) a stream id the server chose."""
        return port_id >= STREAM_ID_BASE or self._port_ids.issued(port_id)

    def _result_port(self, port_id: int, *states: PortState) -> _Port | None:
        """The port a socket result is about; None if it was closed since."""
        if not self._issued(port_id):
            raise LocalProtocolError(f"port id {port_id} was never issued")
        port = self._ports.get(port_id)
        if port is not None and port.state not in states:
            raise LocalProtocolError(f"port {port_id} is {port.state.value}, not {states}")
        return port

    def _finish(self, port: _Port, state: PortState) -> int:
        request_id, port.pending, port.state = port.pending, 0, state
        del self._pending[request_id]
        return request_id

    def opened(self, port_id: int, port: int, now: float) -> Out:
        """``OpenSocket(port_id)`` succeeded; ``port`` is the one bound."""
        record = self._result_port(port_id, PortState.OPENING)
        if record is None:
            return [CloseSocket(port_id)]
        if not 0 < port < 65536:
            raise LocalProtocolError(f"bound port {port} out of range")
        op = Op.REDIRECT if record.redirect else Op.OPEN
        if port != record.port and not self._allowed(op, record.address, port, record.proto):
            request_id = self._finish(record, PortState.CLOSED)
            del self._ports[port_id]
            refusal = self._refuse(request_id, op, record.address, port, record.proto)
            return [CloseSocket(port_id), *refusal]
        record.port = port
        if record.connect_to is not None:
            # OPEN_CONNECT: the port is announced only once it is connected.
            record.state, record.peer = PortState.CONNECTING, record.connect_to
            return [ConnectSocket(port_id, *record.connect_to)]
        if not record.redirect:
            request_id = self._finish(record, PortState.OPEN)
            return [self._send(Opened(port_id, port, request_id=request_id))]
        request_id = self._finish(record, PortState.REDIRECTED)
        self._redirected.add(port_id)
        record.window = ReplayWindow(self.settings.replay_window)
        record.last_received = now
        # A first keepalive opens the NAT mapping, so the server learns where
        # the channel comes from before it has anything to send on it.
        return [
            self._send(Opened(port_id, port, request_id=request_id)),
            self._channel_keepalive(record, now),
        ]

    def connected(self, port_id: int) -> Out:
        """``ConnectSocket(port_id)`` succeeded."""
        port = self._result_port(port_id, PortState.CONNECTING)
        if port is None:
            return [CloseSocket(port_id)]
        if self.windowed and port.credit is None:
            port.credit = self._window()
        if port.connect_to is not None:
            port.connect_to = None
            out: Out = []
            if port.early:
                # Version 4: what the server sent before OPENED, to the target
                # first: the OPENED below may wait anyway.
                out.append(WriteStream(port_id, b"".join(port.early)))
                port.early = []
            if port.shut:
                out.append(ShutdownSocket(port_id))
            # Version 4's server relays a stream without waiting for its
            # OPENED: it may leave with the target's first bytes (``hold``).
            out.append(self._send(Opened(port_id, port.port, request_id=self._finish(port, PortState.CONNECTED)),
                                  hold=port.stream))
            return out
        return [self._send(Ack(request_id=self._finish(port, PortState.CONNECTED)))]

    def listening(self, port_id: int) -> Out:
        """``ListenSocket(port_id)`` succeeded."""
        port = self._result_port(port_id, PortState.LISTEN_PENDING)
        if port is None:
            return [CloseSocket(port_id)]
        return [self._send(Ack(request_id=self._finish(port, PortState.LISTENING)))]

    def failed(self, port_id: int, code: ErrorCode, message: str = "") -> Out:
        """A pending Open/Connect/ListenSocket failed with ``code``.

        A failed open forgets the id (the server never learnt it); a failed
        connect or listen leaves the port open and undedicated, so the I/O
        layer must keep (or rebind) its socket on the same address and port.
        """
        port = self._result_port(
            port_id, PortState.OPENING, PortState.CONNECTING, PortState.LISTEN_PENDING
        )
        if port is None:
            return []
        if port.state is PortState.OPENING:
            request_id = self._finish(port, PortState.CLOSED)
            del self._ports[port_id]
            return [self._send(Err(code, 0, message, request_id=request_id))]
        if port.connect_to is not None:
            # OPEN_CONNECT: the server never learnt the id; the socket goes too.
            request_id = self._finish(port, PortState.CLOSED)
            del self._ports[port_id]
            return [CloseSocket(port_id), self._send(Err(code, 0, message, request_id=request_id))]
        port.peer = None
        request_id = self._finish(port, PortState.OPEN)
        return [self._send(Err(code, port_id, message, request_id=request_id))]

    # -- what the sockets see --------------------------------------------------------

    def _windows(self) -> Iterable[StreamWindow]:
        return (port.credit for port in self._ports.values() if port.credit is not None)

    def _live(self, port_id: int) -> _Port | None:
        if not self._issued(port_id):
            raise LocalProtocolError(f"port id {port_id} was never issued")
        return self._ports.get(port_id)

    def received(self, port_id: int, address: IPAddress, port: int, data: bytes) -> Out:
        """``data`` arrived at ``port_id`` from address:port; relay it."""
        record = self._live(port_id)
        if record is None or self.closed:
            return []
        if record.state is PortState.CONNECTED:
            if record.credit is not None:
                return self._stream(record, *record.credit.send(data))
            return list(self._data_frames(port_id, address, port, data, stream=True))
        if record.state is PortState.OPEN and record.proto is Proto.UDP:
            return list(self._data_frames(port_id, address, port, data, stream=False))
        if record.state is PortState.REDIRECTED and self._key is not None and not fits_channel(address, data):
            # Too large for the channel's own bytes around it: a DATA frame (section 11).
            return list(self._data_frames(port_id, address, port, data, stream=False))
        if record.state is PortState.REDIRECTED and self._key is not None and fits_channel(address, data):
            datagram = Datagram(
                DatagramType.DATA, self._key.key_id, port_id, record.send_seq, False,
                address, port, data,
            )
            record.send_seq += 1
            return [SendChannel(port_id, encode_datagram(datagram, self._key.key))]
        raise LocalProtocolError(f"port {port_id} in {record.state.value} cannot receive")

    def accepted(
        self, listen_id: int, address: IPAddress, port: int
    ) -> tuple[int | None, Out]:
        """A private host connected to listening ``listen_id``.

        Returns the new connection's id, or None: then close the new socket
        (the listener was closed meanwhile, or ``max_ports`` is reached).
        """
        listener = self._live(listen_id)
        if listener is None or self.closed:
            return None, []
        if listener.state is not PortState.LISTENING:
            raise LocalProtocolError(f"port {listen_id} is not listening")
        if len(self._ports) >= self.settings.max_ports:
            self.accepts_refused += 1
            return None, []
        conn_id = self._port_ids.new(self._ports)
        self._ports[conn_id] = _Port(
            conn_id, Proto.TCP, PortState.CONNECTED, listener.address, listener.port,
            peer=(address, port), credit=self._window(),
        )
        return conn_id, [self._send(EventAccepted(listen_id, conn_id, address, port))]

    def fin(self, port_id: int) -> Out:
        """The private end of connection ``port_id`` sent FIN (EOF)."""
        record = self._live(port_id)
        if record is None or self.closed or record.state is not PortState.CONNECTED:
            return []
        if record.credit is not None and record.credit.held:
            record.credit.fin_held = True  # after the bytes the window still holds
            return []
        record.fin_sent = True
        return [self._send(EventFin(port_id)), *self._both_fins(record)]

    def reset(self, port_id: int) -> Out:
        """Connection ``port_id`` was reset (RST) or failed."""
        record = self._live(port_id)
        if record is None or self.closed or record.state is not PortState.CONNECTED:
            return []
        if self.opens_streams:
            del self._ports[port_id]  # version 4: the RST releases the id
            return [self._send(EventRst(port_id)), CloseSocket(port_id)]
        record.state, record.credit = PortState.RESET, None
        return [self._send(EventRst(port_id))]

    # -- UDP channels -----------------------------------------------------------------

    def _channels(self) -> list[_Port]:
        """The redirected ports (their UDP channels' timers), from an index:
        ``next_deadline`` runs after every event, and going through every
        port there cost each event time in proportion to the connections
        (``loop_bench --streams``). Ports closed since are dropped here."""
        live = []
        for port_id in list(self._redirected):
            port = self._ports.get(port_id)
            if port is None or port.state is not PortState.REDIRECTED:
                self._redirected.discard(port_id)
            else:
                live.append(port)
        return live

    def _channel_keepalive(self, port: _Port, now: float) -> SendChannel:
        assert self._key is not None  # a redirect is refused without a key
        datagram = Datagram(
            DatagramType.KEEPALIVE, self._key.key_id, port.port_id, port.send_seq, False
        )
        port.send_seq += 1
        port.next_keepalive = now + self.channel_interval
        return SendChannel(port.port_id, encode_datagram(datagram, self._key.key))

    # -- keepalive discovery (tunnel/lifetime.py) -------------------------------------

    def _probe_tick(self, now: float) -> Out:
        probe = self._probe
        if probe is None or probe.result is not None or self._key is None:
            return []
        probe.tick(now)
        if probe.result is not None:
            return self._learned(probe)
        wait_ms = probe.due(now)
        if wait_ms is None:
            return []
        datagram = Datagram(DatagramType.PROBE, self._key.key_id, 0, self._probe_seq, False, wait_ms=wait_ms)
        self._probe_seq += 1
        return [SendProbe(encode_datagram(datagram, self._key.key))]

    def _learned(self, probe: Probe) -> Out:
        assert probe.result is not None
        self.channel_interval = probe.result
        return [KeepaliveLearned(probe.result, probe.survived, probe.lost, probe.probes)]

    def _probe_answer(self, datagram: Datagram, now: float) -> Out:
        probe = self._probe
        if probe is None or datagram.type is not DatagramType.PROBE_ACK:
            raise DatagramError(DropReason.UNEXPECTED_TYPE)
        if not self._probe_window.accept(datagram.seq):
            raise DatagramError(DropReason.REPLAY)
        if probe.result is not None:
            return []
        probe.answered(datagram.wait_ms, now)
        if probe.result is not None:
            return self._learned(probe)
        return self._probe_tick(now)

    @property
    def discovery(self) -> Probe | None:
        """The keepalive discovery of this session, if one runs (or ran)."""
        return self._probe

    def receive_datagram(self, raw: bytes, now: float) -> Out:
        """A datagram from the server on a UDP channel: check it, relay it.

        A datagram that fails a check is dropped and counted in ``dropped``.
        """
        try:
            return self._receive_datagram(raw, now)
        except DatagramError as err:
            self.dropped[err.reason] += 1
            return []

    def _receive_datagram(self, raw: bytes, now: float) -> Out:
        if self._key is None or self._state is not MediatorState.READY:
            raise DatagramError(DropReason.UNKNOWN_KEY)
        datagram = verify_datagram(raw, self._key.key, self._key.key_id, from_server=True)
        if datagram.channel_id == 0:
            return self._probe_answer(datagram, now)
        port = self._ports.get(datagram.channel_id)
        if port is None or port.state is not PortState.REDIRECTED or port.window is None:
            raise DatagramError(DropReason.UNKNOWN_CHANNEL)
        if not port.window.accept(datagram.seq):
            raise DatagramError(DropReason.REPLAY)
        port.last_received = now
        if datagram.type is DatagramType.KEEPALIVE_ACK:
            return []
        if datagram.type is not DatagramType.DATA or datagram.address is None:
            raise DatagramError(DropReason.UNEXPECTED_TYPE)
        return self._send_to(port, datagram.address, datagram.port, datagram.data)

    # -- closing ------------------------------------------------------------------------

    def _release(self) -> Out:
        out: Out = [CloseSocket(port_id) for port_id in sorted(self._ports)]
        self._ports.clear()
        self._pending.clear()
        self._keepalives.clear()
        self._key = None
        return out

    @property
    def ports(self) -> dict[int, tuple[Proto, PortState]]:
        """Live ids: transport and state (for status displays and tests)."""
        return {p.port_id: (p.proto, p.state) for p in self._ports.values()}

