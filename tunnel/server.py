"""The control server: sessions, the service port, publications, operator ops.

"The control server 4 ... is able to control said mediation system via a
communications tunnel" (seed, summary); mediators connect to its "single
fixed port", the *service port*, over TCP (the channel) and UDP (one channel
per redirected port). ``TunnelServer`` is the asyncio half around the server
core (tunnel/server_core.py, one ``ServerSession`` per channel):

- **Sessions.** Each TLS connection gets a ``Session`` with a fresh random
  non-zero u32 session id (also its UDP key id, so a datagram's session is
  found with ``peek_key_id`` before it is verified). When a mediator's
  HELLO is accepted, its previous session, if the server had not yet noticed
  it was dead, is closed: the newer one is where the mediator is.
- **Mediator records** (``MediatorRecord``, tunnel/session.py). One per
  identity of the mediators file, living across sessions: limits, the
  bytes/s token bucket, counters, and the publications (the publish state
  is the server's, keyed by identity).
- **Frontends.** How traffic reaches the server: standalone
  (``StandaloneFrontend``: its own TLS listener and UDP socket on the
  service port, and one listener per publication) or as the ``tunnel``
  gateway kind under ``nfgate run`` (tunnel/service.py).
- **Operator operations**: the raw requests and publish/unpublish, called by
  the control socket (tunnel/operator.py). They answer one-line errors.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import hashlib
import ipaddress
import json
import os
import secrets
import ssl
import time
from collections import Counter
from typing import Any, Protocol

from firewall.control import ControlError
from tunnel import tls
from tunnel.aio import address_pair, grow_udp_buffer, limit_unsent, stream, udp_socket
from tunnel.commands import SessionReady
from tunnel.config import MediatorEntry, ServerConfig
from tunnel.datagrams import peek_key_id
from tunnel.errors import ErrorCode, LimitError, RequestRefused
from tunnel.events import EventLog
from tunnel.frames import IPAddress, Proto
from tunnel.pacing import Backoff, TokenBucket
from tunnel.publish import Publication, PublishSpec
from tunnel.session import MediatorRecord, Session
from tunnel.wire import endpoint_text

MAX_SESSION_ID = (1 << 32) - 1


class OperatorError(ControlError):
    """An operator request that cannot be done; the message is the one line shown."""


class Frontend(Protocol):
    """How mediators and public clients reach the server."""

    async def start(self, server: TunnelServer) -> None: ...
    async def bind(self, publication: Publication) -> None: ...
    def send_datagram(self, data: bytes, address: IPAddress, port: int) -> None: ...
    async def close(self) -> None: ...


class ChannelProtocol(asyncio.BufferedProtocol):
    """A TLS channel from a mediator (after the handshake).

    Buffered: TLS decrypts straight into the session's frame decoder
    (``get_buffer``), so relayed bytes are not copied before their frames
    are cut out (docs/tunnel-protocol.md section 21, "Copies");
    ``data_received`` serves a transport that only delivers bytes."""

    def __init__(self, server: TunnelServer, peer: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert stream(transport) is not None
        if not self.server.accept_channel():
            transport.abort()
            return
        limit_unsent(transport, self.server.config.channel_unsent)
        self.session = self.server.new_session(transport, self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.session is None:
            return memoryview(bytearray(max(1, min(sizehint, 4096))))  # closing: read and dropped
        return self.session.read_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.session is not None:
            self._contain(self.session.on_buffer, nbytes)

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self._contain(self.session.on_data, data)

    def _contain(self, call: Any, arg: Any) -> None:
        assert self.session is not None
        try:
            call(arg)
        except Exception as err:  # noqa: BLE001 - ours, not the mediator's: say so, and end the channel cleanly
            self.server.counters["internal_errors"] += 1
            self.session.close(ErrorCode.INTERNAL, f"server error: {err!r}")

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.on_lost("the mediator closed the channel")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.on_lost(f"channel lost: {exc}" if exc else "channel closed")
            self.server.channel_closed()
            self.session = None

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.channel_full(True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.channel_full(False)


class TunnelServer:
    """Sessions, records and publications of one control server."""

    def __init__(
        self, config: ServerConfig, mediators: dict[str, MediatorEntry], frontend: Frontend,
        log: EventLog | None = None,
    ) -> None:
        self.config = config
        self.mediators = mediators
        self.frontend = frontend
        self.log = log or EventLog("server")
        self.counters: Counter[str] = Counter()
        self.sessions: dict[int, Session] = {}
        self.records: dict[str, MediatorRecord] = {}
        self.publications: dict[tuple[Proto, int], Publication] = {}
        self.channels = 0
        self.started = time.time()
        self._client_digests: dict[str, bytes] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self.tls_context: ssl.SSLContext | None = None

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        set_tls_read_buffer(self.config.tls_idle_read_buffer)
        loop = asyncio.get_running_loop()
        for identity, entry in self.mediators.items():
            rate = entry.rate
            bucket = TokenBucket(rate.bytes_per_second, rate.burst_bytes, loop.time())
            self.records[identity] = MediatorRecord(entry, bucket)
            if entry.client_cert is not None:
                self._client_digests[identity] = _digest(tls.read_pem_certificate(entry.client_cert))
        # Made once, so that a missing or mismatched key fails the start with
        # one line, not each mediator's handshake later.
        self.tls_context = self.ssl_context()
        await self.frontend.start(self)
        for spec in self._load_state():
            self._restore(spec)

    def ssl_context(self) -> ssl.SSLContext:
        certs = [e.client_cert for e in self.mediators.values() if e.client_cert is not None]
        return tls.server_context(self.config.cert, self.config.key, certs)

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        for pub in list(self.publications.values()):
            pub.close()
        for session in list(self.sessions.values()):
            session.close(ErrorCode.NORMAL, "server stopping")
        await self.frontend.close()

    def client_cert_digest(self, identity: str) -> bytes | None:
        return self._client_digests.get(identity)

    # -- channels and sessions -------------------------------------------------------------

    def accept_channel(self) -> bool:
        """Room for one more TCP channel? (bounds unauthenticated connections too)."""
        if self.channels >= self.config.max_channels:
            self.counters["channels_refused"] += 1
            return False
        self.channels += 1
        return True

    def channel_closed(self) -> None:
        self.channels = max(0, self.channels - 1)

    def new_session(self, transport: asyncio.Transport, peer: str | None) -> Session:
        if peer is None:
            pair = address_pair(transport.get_extra_info("peername"))
            peer = endpoint_text(*pair) if pair else "-"
        while True:
            session_id = secrets.randbelow(MAX_SESSION_ID) + 1
            if session_id not in self.sessions:
                break
        cert = tls.peer_certificate(transport.get_extra_info("ssl_object"))
        session = Session(self, transport, peer, session_id, cert)
        self.sessions[session_id] = session
        self.counters["channels"] += 1
        session.driver.arm()  # the hello timeout
        return session

    def session_ready(self, session: Session, event: SessionReady) -> None:
        record = self.records[event.identity]
        old = record.session
        if old is not None and old is not session and not old.closed:
            old.close(ErrorCode.NORMAL, "replaced by a new session of the same mediator")
        record.session = session
        session.record = record
        session.core.limits = record.entry.limits
        record.connects += 1
        record.since = time.time()
        record.ready.set()
        self.log.emit(
            "session", mediator=event.identity, session=session.session_id, peer=session.peer,
            service=event.service, interfaces=[str(i) for i in event.interfaces], version=event.version,
        )
        for pub in self.publications.values():
            if pub.spec.identity == event.identity:
                pub.session_ready(session)
                if session.core.pipelines_connect:
                    pub.spawn(self._recheck(pub, session))

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        record = session.record
        if record is not None and record.session is session:
            record.session = None
            record.since = time.time()
            record.ready.clear()

    async def wait_session(self, identity: str, timeout: float) -> Session | None:
        """The mediator's READY session, waiting up to ``timeout`` for one."""
        record = self.records.get(identity)
        if record is None:
            return None
        if record.session is None or record.session.closed:
            try:
                await asyncio.wait_for(record.ready.wait(), timeout)
            except TimeoutError:
                return None
        session = record.session
        return session if session is not None and not session.closed else None

    # -- the service port's UDP side ------------------------------------------------------------

    def service_datagram(self, raw: bytes, source: tuple[IPAddress, int]) -> None:
        """A datagram on the service port: find its session by key id, then verify."""
        key_id = peek_key_id(raw)
        session = self.sessions.get(key_id) if key_id else None
        if session is None:
            # Never answered: unauthenticated UDP must not make a reflector.
            self.counters["datagrams_unknown_key"] += 1
            return
        if session.record is not None:
            session.record.counters["channel_datagrams_in"] += 1
        session.on_datagram(raw, source)

    def send_datagram(self, data: bytes, address: IPAddress, port: int) -> None:
        self.frontend.send_datagram(data, address, port)

    # -- operator: raw requests -------------------------------------------------------------------

    def _session(self, identity: str) -> Session:
        record = self.records.get(identity)
        if record is None:
            raise OperatorError(f"no mediator {identity!r} in {self.config.mediators_file}")
        if record.session is None or record.session.closed:
            raise OperatorError(f"mediator {identity} is not connected")
        return record.session

    async def _ask(self, coro: Any) -> Any:
        try:
            return await coro
        except RequestRefused as err:
            if err.local:
                raise OperatorError(err.message, err.code) from None
            raise OperatorError(f"refused by the mediator: {err}", err.code) from None
        except LimitError as err:
            raise OperatorError(f"over this mediator's limit: {err.message}", "LIMIT") from None
        except TimeoutError:
            why = f"no answer from the mediator in {self.config.request_timeout:g} s"
            raise OperatorError(why, "TIMEOUT") from None

    async def op_open(
        self, identity: str, proto: Proto, address: IPAddress, port: int, mandatory: bool
    ) -> dict[str, Any]:
        session = self._session(identity)
        opened = await self._ask(session.open_port(proto, address, port, mandatory))
        session.raw_ports.add(opened.port_id)
        return {"port_id": opened.port_id, "port": opened.port}

    async def op_redirect(self, identity: str, address: IPAddress, port: int, mandatory: bool) -> dict[str, Any]:
        session = self._session(identity)
        opened = await self._ask(session.redirect_port(address, port, mandatory))
        session.raw_ports.add(opened.port_id)
        return {"port_id": opened.port_id, "port": opened.port}

    async def op_connect(self, identity: str, port_id: int, address: IPAddress, port: int) -> dict[str, Any]:
        await self._ask(self._session(identity).connect(port_id, address, port))
        return {"port_id": port_id}

    async def op_listen(self, identity: str, port_id: int) -> dict[str, Any]:
        await self._ask(self._session(identity).listen(port_id))
        return {"port_id": port_id}

    async def op_close(self, identity: str, port_id: int) -> dict[str, Any]:
        session = self._session(identity)
        owner = session.owners.get(port_id)
        await self._ask(session.close_port(port_id))
        session.raw_ports.discard(port_id)
        if owner is not None:
            owner.on_gone("closed by the operator")
        return {"port_id": port_id}

    # -- operator: publish ----------------------------------------------------------------------

    async def publish(self, spec: PublishSpec) -> dict[str, Any]:
        record = self.records.get(spec.identity)
        if record is None:
            raise OperatorError(f"no mediator {spec.identity!r} in {self.config.mediators_file}")
        if not record.entry.may_publish(spec.public_port):
            allowed = ", ".join(str(r) for r in record.entry.publish_ports) or "none"
            raise OperatorError(
                f"mediator {spec.identity} may not publish port {spec.public_port} (publish_ports: {allowed})",
                "NOT_ALLOWED",
            )
        existing = self.publications.get(spec.key())
        if existing is not None:
            raise OperatorError(
                f"{spec.proto.name.lower()} port {spec.public_port} is already published for {existing.spec.identity}",
                "PORT_IN_USE",
            )
        await self._check_target(record, spec)
        pub = Publication(self, spec)
        try:
            await self.frontend.bind(pub)
        except OSError as err:
            pub.close()
            why = f"cannot listen on public port {spec.public_port}: {err.strerror or err}"
            raise OperatorError(why, "PORT_IN_USE") from None
        pub.state = "published"
        self.publications[spec.key()] = pub
        self._save_state()
        self.log.emit("published", **spec.to_json())
        return pub.describe()

    async def _check_target(self, record: MediatorRecord, spec: PublishSpec) -> None:
        """Issue 14 G: a target the mediator's allow-list refuses is refused at
        publish time, with the mediator's reason (CHECK_TARGET, version 2).
        A mediator that is not connected is asked when it connects
        (``_recheck``)."""
        session = record.session
        if session is None or session.closed:
            return
        try:
            session.local_address_for(spec.target)  # an IPv6 target needs an IPv6 address on the mediator
        except RequestRefused as err:
            raise OperatorError(err.message, err.code) from None
        if not session.core.pipelines_connect:
            return
        await self._ask(session.check_target(spec.proto, spec.target, spec.target_port))

    async def _recheck(self, pub: Publication, session: Session) -> None:
        """A publication made while its mediator was away: ask now, and say so if refused."""
        try:
            session.local_address_for(pub.spec.target)
            await session.check_target(pub.spec.proto, pub.spec.target, pub.spec.target_port)
        except RequestRefused as err:
            if not err.local or err.code == "NO_SUCH_ADDRESS":
                pub.state = f"refused: {err}" if err.local else f"refused by the mediator: {err}"
                self.log.warn("publish_refused", **pub.spec.to_json(), reason=str(err))
                return
        except (LimitError, TimeoutError):
            return
        if pub.state.startswith("refused"):
            pub.state = "published"

    async def unpublish(self, identity: str, proto: Proto, public_port: int) -> dict[str, Any]:
        pub = self.publications.get((proto, public_port))
        if pub is None or pub.spec.identity != identity:
            raise OperatorError(f"{proto.name.lower()} port {public_port} is not published for {identity}")
        del self.publications[(proto, public_port)]
        pub.close()
        self._save_state()
        self.log.emit("unpublished", **pub.spec.to_json())
        return pub.spec.to_json()

    def _restore(self, spec: PublishSpec) -> None:
        """Re-publish a saved publication; if its port will not bind, retry with backoff."""
        pub = Publication(self, spec)
        self.publications[spec.key()] = pub
        backoff = Backoff(self.config.republish)

        async def attempt() -> None:
            while pub.state != "closed":
                try:
                    await self.frontend.bind(pub)
                except OSError as err:
                    delay = backoff.next_delay()
                    pub.state = f"bind failed ({err.strerror or err}); retry in {delay:.1f} s"
                    self.log.warn("publish_retry", **spec.to_json(), reason=str(err), delay=delay)
                    await asyncio.sleep(delay)
                    continue
                pub.state = "published"
                self.log.emit("published", **spec.to_json(), restored=True)
                return

        task = asyncio.get_running_loop().create_task(attempt())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _load_state(self) -> list[PublishSpec]:
        path = self.config.state_file
        if path is None or not path.exists():
            return []
        try:
            items = json.loads(path.read_text())
            specs = [_spec_from_json(item) for item in items]
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.log.warn("state_unreadable", path=str(path), reason=str(err))
            return []
        return [s for s in specs if s.identity in self.records]

    def _save_state(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        data = json.dumps([p.spec.to_json() for p in self.publications.values()], indent=2)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(data + "\n")
            os.replace(tmp, path)  # a crash leaves the old state or the new, never half
        except OSError as err:
            self.log.warn("state_unwritable", path=str(path), reason=str(err))

    # -- operator: list ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        mediators = []
        for identity, record in sorted(self.records.items()):
            session = record.session
            mediators.append({
                "identity": identity,
                "state": "connected" if session is not None and not session.closed else "disconnected",
                "connects": record.connects,
                "since": round(record.since, 3) if record.since else None,
                "publish_ports": [str(r) for r in record.entry.publish_ports],
                "session": session.describe() if session is not None else None,
                "counters": dict(sorted(record.counters.items())),
            })
        frontend = getattr(self.frontend, "describe", None)
        described = frontend() if frontend else {}
        return {
            "service": described.get("service", service_text(self.config)),
            "uptime": round(time.time() - self.started, 1),
            "channels": self.channels,
            "counters": dict(sorted(self.counters.items())),
            "mediators": mediators,
            "published": [p.describe() for p in sorted(self.publications.values(), key=lambda p: p.spec.key())],
            **({"frontend": described} if described else {}),
        }


def service_text(config: ServerConfig) -> str:
    """The service port on each listen address: ``198.51.100.10:7443, [2001:db8::10]:7443``."""
    return ", ".join(endpoint_text(a, config.service_port) for a in config.listen)


def set_tls_read_buffer(size: int) -> None:
    """Size the read buffer every TLS connection this process makes from now on starts with.

    asyncio's SSL protocol allocates ``max_size`` bytes per connection when
    it is made, and keeps them: 256 KiB by default, which was 90% of an idle
    mediator's cost on the server (scripts/bench_tunnel.py). This sets the
    class attribute (a tunnel server process runs nothing else that uses
    TLS) to the idle size; ``grow_tls_read_buffer`` raises one busy
    connection's.
    """
    asyncio.sslproto.SSLProtocol.max_size = size



def _digest(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def _spec_from_json(item: dict[str, Any]) -> PublishSpec:
    host, _, port = str(item["to"]).rpartition(":")
    return PublishSpec(
        str(item["mediator"]), Proto[str(item["proto"]).upper()], int(item["public"]),
        ipaddress.ip_address(host.strip("[]")), int(port),
    )


class _ServiceDatagrams(asyncio.DatagramProtocol):
    def __init__(self, server: TunnelServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        source = address_pair(addr)
        if source is not None:
            self.server.service_datagram(data, source)

    def error_received(self, exc: Exception) -> None:
        # ICMP for a channel whose NAT mapping is gone; the mediator's
        # keepalive will show the new address.
        self.server.counters["datagram_errors"] += 1


class _PublicDatagrams(asyncio.DatagramProtocol):
    def __init__(self, pub: Publication) -> None:
        self.pub = pub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        client = address_pair(addr)
        transport = self.transport
        if client is None or transport is None:
            return
        self.pub.datagram(data, client, lambda payload: transport.sendto(payload, addr))

    def error_received(self, exc: Exception) -> None:
        self.pub.counters["udp_errors"] += 1


class _Sockets:
    """A publication's UDP sockets, one per public address: closed together."""

    def __init__(self, transports: list[asyncio.DatagramTransport]) -> None:
        self.transports = transports

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


class StandaloneFrontend:
    """The server on its own: TLS + UDP on the service port, a listener per publication.

    Each address of ``listen`` (``public_address``) has its own sockets: one
    IPv4 and one IPv6 address make a dual-stack server, and a UDP channel is
    answered from the socket of its family."""

    def __init__(self) -> None:
        self.server: TunnelServer | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.udp: dict[int, asyncio.DatagramTransport] = {}  # by IP version

    async def start(self, server: TunnelServer) -> None:
        self.server = server
        cfg = server.config
        loop = asyncio.get_running_loop()
        context = server.tls_context
        # asyncio makes an IPv6 listener IPv6 only, so 0.0.0.0 and :: share the port.
        self.listener = await loop.create_server(
            lambda: ChannelProtocol(server), [str(a) for a in cfg.listen], cfg.service_port, ssl=context,
            ssl_handshake_timeout=cfg.handshake_timeout, reuse_address=True,
        )
        try:
            for address in cfg.listen:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _ServiceDatagrams(server), sock=udp_socket(address, cfg.service_port),
                )
                grow_udp_buffer(transport, cfg.udp_buffer)
                self.udp[address.version] = transport
        except OSError:
            await self.close()
            raise

    async def bind(self, publication: Publication) -> None:
        assert self.server is not None
        cfg = self.server.config
        loop = asyncio.get_running_loop()
        spec = publication.spec
        if spec.proto is Proto.TCP:
            publication.listener = await loop.create_server(
                publication.tcp_protocol, [str(a) for a in cfg.public_address], spec.public_port,
                reuse_address=True,
            )
            return
        sockets = _Sockets([])
        try:
            for address in cfg.public_address:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _PublicDatagrams(publication), sock=udp_socket(address, spec.public_port),
                )
                grow_udp_buffer(transport, cfg.udp_buffer)
                sockets.transports.append(transport)
        except OSError:
            sockets.close()
            raise
        publication.listener = sockets

    def send_datagram(self, data: bytes, address: IPAddress, port: int) -> None:
        udp = self.udp.get(address.version)
        if udp is not None:
            udp.sendto(data, (str(address), port))
        elif self.server is not None:
            self.server.counters["datagrams_no_socket"] += 1

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for udp in self.udp.values():
            udp.close()
        self.udp.clear()
