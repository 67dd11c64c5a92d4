"""The asyncio mediator and control server end to end, on 127.0.0.1 in one loop."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from firewall.control import ControlError
from tests.tunnel.loopback import TOKEN, WAIT, echo_server, loopback, udp_echo, until
from tunnel import keygen, tls
from tunnel.errors import ErrorCode
from tunnel.frames import Proto
from tunnel.policy import Op, Rule
from tunnel.settings import MediatorSettings


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def _fetch(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = bytearray()
    while data := await asyncio.wait_for(reader.read(1 << 20), WAIT):
        got += data
    writer.close()
    return bytes(got)


def test_tcp_publish_relays_both_ways_with_half_close(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator()
            await lb.session()
            _, target = await echo_server()
            public = 0
            result = await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=(public := _free()),
                                  address="127.0.0.1", port=target)
            assert result["state"] == "published"
            # An idle channel keeps a small TLS read buffer; bulk grows it (and it stays).
            session = lb.server.records["m1"].session
            ssl_protocol = session.transport._ssl_protocol
            assert ssl_protocol.max_size == lb.server.config.tls_idle_read_buffer == 4096
            payload = os.urandom(3_000_000)
            got = await _fetch(public, payload)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert ssl_protocol.max_size == lb.server.config.tls_read_buffer == 262144
            # Both FINs relayed: the port is closed on both ends afterwards.
            await until(lambda: not lb.server.records["m1"].session.core.ports, what="the relay's port to close")
            listing = await lb.ask(cmd="list")
            (pub,) = listing["published"]
            assert pub["counters"]["connections"] == 1 and pub["counters"]["bytes_in"] == len(payload)

    run(main())


def _free() -> int:
    from tests.tunnel.loopback import free_port

    return free_port()


def test_udp_publish_travels_over_the_udp_channel(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator()
            await lb.session()
            echo, target = await udp_echo()
            public = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="udp", public=public, address="127.0.0.1", port=target)
            loop = asyncio.get_running_loop()
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.setblocking(False)
            client.connect(("127.0.0.1", public))
            try:
                for i in range(20):
                    client.send(b"ping %d" % i)
                    data = await asyncio.wait_for(loop.sock_recv(client, 2048), WAIT)
                    assert data == b"ping %d" % i
            finally:
                client.close()
            counters = lb.server.records["m1"].counters
            assert counters["udp_via_channel_out"] == 20 and counters["udp_via_channel_in"] == 20
            assert counters["udp_via_frames_out"] == 0 and counters["udp_via_frames_in"] == 0
            assert len(echo.received) == 20

    run(main())


def test_raw_requests_and_the_owners_refusals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator(allow=(Rule(ipaddress.ip_network("127.0.0.2/32"), ops=frozenset({Op.CONNECT})),))
            await lb.session()
            _, target = await echo_server()
            opened = await lb.ask(cmd="open", mediator="m1", proto="tcp", address="127.0.0.1", port=0)
            assert opened["port_id"] >= 1 and opened["port"] > 0
            with pytest.raises(ControlError) as refused:
                await lb.ask(cmd="connect", mediator="m1", port_id=opened["port_id"], address="127.0.0.1", port=target)
            assert refused.value.code == "NOT_ALLOWED"
            await lb.ask(cmd="close", mediator="m1", port_id=opened["port_id"])

            busy = socket.socket()
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            try:
                with pytest.raises(ControlError) as in_use:
                    await lb.ask(cmd="open", mediator="m1", proto="tcp", address="127.0.0.1", port=taken,
                                 mandatory=True)
                assert in_use.value.code == "PORT_IN_USE"
                desired = await lb.ask(cmd="open", mediator="m1", proto="tcp", address="127.0.0.1", port=taken)
                assert desired["port"] > taken  # "the first free port starting from the number requested"
                with pytest.raises(ControlError) as no_address:
                    await lb.ask(cmd="open", mediator="m1", proto="udp", address="192.0.2.1", port=0)
                assert no_address.value.code == "NO_SUCH_ADDRESS"
            finally:
                busy.close()

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "refused"]
    assert refusals and refusals[0].fields["op"] == "connect" and refusals[0].levelno == logging.WARNING


def test_wrong_token_is_refused_and_never_gets_a_session(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator(token=b"not-the-right-token-at-all")
            await until(lambda: mediator.counters["attempts"] >= 2, what="a retry after AUTH_FAILED")
            assert lb.server.records["m1"].connects == 0
            assert mediator.session_id is None

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())
    ends = [r for r in caplog.records if getattr(r, "event", "") == "session_end"]
    assert ends and ends[0].fields["code"] == "AUTH_FAILED"
    assert "wrong token" in ends[0].fields["reason"]


def test_server_not_matching_the_pin_never_sees_the_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            other = keygen.write_identity(tmp_path / "other.crt", tmp_path / "other.key", "impostor")
            mediator = lb.start_mediator(pin=tls.parse_pin(other))
            await until(lambda: mediator.counters["pin_mismatch"] >= 2, what="two refused handshakes")
            # The mediator hung up right after TLS: the server never got a HELLO.
            assert all(s.core.hello is None for s in lb.server.sessions.values())
            assert lb.server.records["m1"].connects == 0

    run(main())


def test_mediator_reconnects_and_publications_work_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator()
            first = await lb.session()
            _, target = await echo_server()
            public = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
            assert await _fetch(public, b"one") == b"one"
            first.transport.abort()  # the channel breaks under the mediator
            await until(lambda: lb.server.records["m1"].connects == 2, what="the reconnect")
            assert (await lb.session()).session_id != first.session_id
            assert await _fetch(public, b"two") == b"two"
            assert mediator.counters["sessions"] == 2

    run(main())


@pytest.mark.parametrize("versions", [(1, 2, 3), (1, 2, 3, 4)])
def test_a_version_3_mediator_and_a_version_4_one_both_serve_a_publication(
    tmp_path: Path, versions: tuple[int, ...]
) -> None:
    """The server speaks 1 to 4: a mediator of before version 4 gets version 3
    (OPEN_CONNECT, CLOSE); a new one version 4 (OPEN_STREAM, no CLOSE). Either
    way every port is freed on both ends after each connection."""

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator(protocol=MediatorSettings(versions=versions))
            session = await lb.session()
            assert session.core.version == max(versions)
            _, target = await echo_server()
            public = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
            for n in range(5):
                payload = os.urandom(1000 + n * 70_000)
                assert await _fetch(public, payload) == payload
            await until(lambda: not session.core.ports, what="the server's ports to close")
            await until(lambda: mediator.session is not None and not mediator.session.core.ports,
                        what="the mediator's ports to close")
            # No frame crossed a release: nothing came for an id already gone.
            assert lb.server.records["m1"].counters["relay_failed"] == mediator.counters["relay_failed"] == 0

    run(main())


def test_limit_on_connections_resets_the_public_client(tmp_path: Path) -> None:
    mediators = f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["1024-65535"]\nmax_connections = 1\n'

    async def main() -> None:
        async with loopback(tmp_path, mediators) as lb:
            lb.start_mediator()
            await lb.session()
            _, target = await echo_server()
            public = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
            r1, w1 = await asyncio.open_connection("127.0.0.1", public)
            w1.write(b"first")
            assert await asyncio.wait_for(r1.readexactly(5), WAIT) == b"first"
            r2, w2 = await asyncio.open_connection("127.0.0.1", public)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                w2.write(b"second")
                await asyncio.wait_for(r2.readexactly(6), WAIT)
            pub = lb.server.publications[(Proto.TCP, public)]
            assert pub.counters["refused"] == 1
            w1.close()
            w2.close()

    run(main())


def test_bytes_per_second_limit_paces_the_relay(tmp_path: Path) -> None:
    rate = 2_000_000
    mediators = (
        f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["1024-65535"]\n'
        f"bytes_per_second = {rate}\nburst_bytes = 65536\n"
    )

    async def main() -> None:
        async with loopback(tmp_path, mediators) as lb:
            lb.start_mediator()
            await lb.session()
            _, target = await echo_server()
            public = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
            payload = os.urandom(1_000_000)  # 2 MB through the bucket: 1 MB each way
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await _fetch(public, payload) == payload
            elapsed = loop.time() - started
            # (2 MB - burst) / 2 MB/s is 0.97 s; the last reads of each
            # direction (up to 256 KiB) pass before their debt is waited for.
            # Unlimited, this takes about 0.03 s.
            assert 0.6 <= elapsed < 3.0, elapsed

    run(main())


def test_client_certificate_required_by_the_mediators_file(tmp_path: Path) -> None:
    async def main() -> None:
        cert, key = tmp_path / "m1.crt", tmp_path / "m1.key"
        keygen.write_identity(cert, key, "m1")
        mediators = f'[mediator.m1]\ntoken = "{TOKEN}"\nclient_cert = "{cert}"\n'
        async with loopback(tmp_path, mediators) as lb:
            without = lb.start_mediator()
            await until(lambda: without.counters["attempts"] >= 2, what="a refused attempt")
            assert lb.server.records["m1"].connects == 0
            await lb.stop_mediator(without)
            lb.start_mediator(client_cert=cert, client_key=key)
            assert (await lb.session()).identity == "m1"

    run(main())


def test_control_socket_refuses_bad_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            for request, message in (
                ({"cmd": "nope"}, "unknown command"),
                ({"cmd": "open", "mediator": "m1"}, "missing argument"),
                ({"cmd": "list", "extra": 1}, "unknown argument"),
                ({"cmd": "open", "mediator": "m1", "proto": "sctp", "address": "1.2.3.4", "port": 1}, "'tcp' or 'udp'"),
                ({"cmd": "close", "mediator": "m1", "port_id": 1}, "not connected"),
                ({"cmd": "publish", "mediator": "zz", "proto": "tcp", "public": 9, "address": "1.2.3.4", "port": 1},
                 "no mediator"),
            ):
                with pytest.raises(ControlError, match=message):
                    await lb.ask(**request)
            assert (await lb.ask(cmd="list"))["mediators"][0]["state"] == "disconnected"

    run(main())


def test_publish_refusals(tmp_path: Path) -> None:
    mediators = f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["20000-20010"]\n'

    async def main() -> None:
        async with loopback(tmp_path, mediators) as lb:
            with pytest.raises(ControlError, match="may not publish port 30000") as err:
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=30000, address="127.0.0.1", port=80)
            assert err.value.code == "NOT_ALLOWED"
            busy = socket.socket()
            busy.bind(("127.0.0.1", 20005))
            busy.listen()
            try:
                with pytest.raises(ControlError, match="cannot listen on public port 20005"):
                    await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=20005, address="127.0.0.1", port=80)
            finally:
                busy.close()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=20006, address="127.0.0.1", port=80)
            with pytest.raises(ControlError, match="already published"):
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=20006, address="127.0.0.1", port=81)
            await lb.ask(cmd="unpublish", mediator="m1", proto="tcp", public=20006)
            assert not lb.server.publications

    run(main())


def test_a_target_the_mediator_refuses_is_refused_at_publish_time(tmp_path: Path) -> None:
    """Issue 14 G: CHECK_TARGET before the publish, with the mediator's reason;
    a publication made while the mediator was away is checked when it comes."""
    mediators = f'[mediator.m1]\ntoken = "{TOKEN}"\npublish_ports = ["1024-65535"]\n'
    only_10 = (Rule(ipaddress.ip_network("127.0.0.10/32"), ops=frozenset({Op.CONNECT, Op.SEND})),)

    async def main() -> None:
        async with loopback(tmp_path, mediators) as lb:
            early = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="udp", public=early, address="127.0.0.1", port=53)
            lb.start_mediator(allow=only_10)
            await lb.session()
            for proto, port in (("tcp", 80), ("udp", 53)):
                with pytest.raises(ControlError, match=f"refused by the mediator: NOT_ALLOWED: .* 127.0.0.1:{port} is not allowed") as err:
                    await lb.ask(cmd="publish", mediator="m1", proto=proto, public=_free(), address="127.0.0.1", port=port)
                assert err.value.code == "NOT_ALLOWED"
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=_free(), address="127.0.0.10", port=80)
            listing = await until(lambda: lb.server.publications[(Proto.UDP, early)].state.startswith("refused"),
                                  what="the early publication to be checked")
            assert listing

    run(main())


def test_publications_survive_a_server_restart_through_the_state_file(tmp_path: Path) -> None:
    async def main() -> None:
        state = tmp_path / "state" / "publish.json"
        public = _free()
        async with loopback(tmp_path, state_file=state) as lb:
            await lb.ask(cmd="publish", mediator="m1", proto="udp", public=public, address="127.0.0.1", port=9)
        async with loopback(tmp_path, state_file=state) as lb:
            await until(lambda: lb.server.publications.get((Proto.UDP, public)) is not None
                        and lb.server.publications[(Proto.UDP, public)].state == "published", what="the restore")

    run(main())


def test_mediator_stop_sends_bye_normal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with loopback(tmp_path) as lb:
            mediator = lb.start_mediator()
            await lb.session()
            await lb.stop_mediator(mediator)
            await until(lambda: lb.server.records["m1"].session is None, what="the session to end")

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())
    ends = [r for r in caplog.records if getattr(r, "event", "") == "session_end"]
    assert ends[-1].fields["code"] == ErrorCode.NORMAL.name and ends[-1].fields["by_mediator"] is True


def test_a_restored_publication_whose_port_is_taken_is_retried_with_backoff(tmp_path: Path) -> None:
    from tunnel.pacing import BackoffSettings

    async def main() -> None:
        state = tmp_path / "publish.json"
        public = _free()
        fast = BackoffSettings(initial=0.05, maximum=0.2)
        async with loopback(tmp_path, state_file=state, republish=fast) as lb:
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=9)
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", public))
        squatter.listen()
        try:
            async with loopback(tmp_path, state_file=state, republish=fast) as lb:
                pub = lb.server.publications[(Proto.TCP, public)]
                await until(lambda: pub.state.startswith("bind failed"), what="a failed bind")
                squatter.close()
                await until(lambda: pub.state == "published", what="the retry to bind")
        finally:
            squatter.close()

    run(main())


def test_channel_unsent_and_udp_buffer_are_the_configs(tmp_path: Path) -> None:
    """The two socket bounds of section 21 are settings: the server's channel and UDP socket carry the values given."""
    unsent, udp_buffer = 65536, 1 << 20

    async def main() -> None:
        async with loopback(tmp_path, channel_unsent=unsent, udp_buffer=udp_buffer) as lb:
            lb.start_mediator(channel_unsent=32768, udp_buffer=1 << 19)
            session = await lb.session()
            channel = session.transport.get_extra_info("socket")
            assert channel.getsockopt(socket.IPPROTO_TCP, 25) == unsent  # TCP_NOTSENT_LOWAT
            service = lb.server.frontend.udp[4].get_extra_info("socket")
            assert service.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * udp_buffer  # the kernel doubles it

    asyncio.run(main())


async def _echo_published(lb: Any, **changes: Any) -> tuple[Any, int]:
    """m1's session (its config with ``changes``), and a public port published to an echo target through it."""
    lb.start_mediator(**changes)
    session = await lb.session()
    _, target = await echo_server()
    public = _free()
    await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=public, address="127.0.0.1", port=target)
    return session, public


def _held_connect(port: int, payload: bytes) -> socket.socket:
    """Connect and send from the loop's own thread, blocking: the kernel
    completes the handshake and queues the bytes before the server's
    accept can run, as when a request comes with the handshake's last ACK."""
    client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    client.sendall(payload)
    return client


def test_a_client_that_resets_before_the_accept_ends_its_connection_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Clients that connect, send a request (or nothing) and reset, all
    before the server's loop has accepted them (the kernel completed the
    handshakes): each connection ends alone as reset, its mediator port is
    freed, and the channel and the next client are served."""

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            session, public = await _echo_published(lb)
            for i in range(20):  # half with a request, half with nothing before the RST
                client = _held_connect(public, b"GET / HTTP/1.0\r\n\r\n" if i % 2 else b"")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # RST, before the server's loop accepts
            await until(lambda: not session.core.ports, what="every reset client's port to close")
            assert await _fetch(public, b"after") == b"after"
            assert lb.server.records["m1"].session is session
            listing = await lb.ask(cmd="list")
            (pub,) = listing["published"]
            assert pub["counters"]["connections"] == 21

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())
    ends = [r for r in caplog.records if getattr(r, "event", None) == "connection_end"]
    assert len(ends) == 21
    reasons = sorted(r.fields["reason"] for r in ends)  # type: ignore[attr-defined]
    assert reasons == ["client_reset"] * 20 + ["done"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _refusals(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """The server's "refused" lines: client -> reason."""
    return {
        r.fields["client"]: r.fields["reason"]  # type: ignore[attr-defined]
        for r in caplog.records if getattr(r, "event", None) == "refused" and "public" in getattr(r, "fields", {})
    }


def test_a_stream_the_mediator_cannot_connect_resets_its_client_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Version 4: nothing listens at the target. The client's request went
    with the OPEN_STREAM; the mediator's ERR comes back as that client's
    reset and a "refused" line with the mediator's reason, the stream's id
    is free on both ends, and the channel serves the next client."""

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            session, public = await _echo_published(lb)
            closed = _free()
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=(dead := _free()),
                         address="127.0.0.1", port=closed)
            client = _held_connect(dead, b"GET / HTTP/1.0\r\n\r\n")
            name = "127.0.0.1:%d" % client.getsockname()[1]
            await until(lambda: name in _refusals(caplog), what="the refusal")
            assert "CONNECT_FAILED" in _refusals(caplog)[name]
            client.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                assert client.recv(100) == b""  # an RST, not an orderly end
            client.close()
            await until(lambda: not session.core.ports, what="the stream's id to be free")
            assert lb.server.publications[(Proto.TCP, dead)].counters["refused"] == 1
            assert await _fetch(public, b"after") == b"after"
            assert lb.server.records["m1"].session is session

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())


def _silent_target() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that answers no SYN: its accept queue (backlog 0) is full
    with one connection never accepted, so the kernel drops the SYNs of the
    rest, as a firewall that drops would. Returns it and what fills it."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname(), timeout=WAIT)
    return listener, [filler]


def test_a_target_that_never_answers_the_syn_is_refused_at_connect_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The mediator's connect gives up after ``connect_timeout``: the client
    is reset with a "refused" line that says the connect timed out, the
    stream's id is free, and the channel serves the next client. The socket
    that waited is gone from the loop: the mediator keeps serving fresh
    connects on a loop whose descriptors are reused."""

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            session, public = await _echo_published(lb, connect_timeout=0.3, warm_connections=0)
            listener, fillers = _silent_target()
            try:
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=(dead := _free()),
                             address="127.0.0.1", port=listener.getsockname()[1])
                for n in range(3):
                    client = _held_connect(dead, b"GET / HTTP/1.0\r\n\r\n")
                    name = "127.0.0.1:%d" % client.getsockname()[1]
                    await until(lambda: name in _refusals(caplog), what="the refusal")
                    assert "CONNECT_FAILED" in _refusals(caplog)[name] and "timed out" in _refusals(caplog)[name]
                    client.close()
                    await until(lambda: not session.core.ports, what="the stream's id to be free")
                    # A fresh connect after each: the loop has no watcher left on a closed socket.
                    assert await _fetch(public, b"after %d" % n) == b"after %d" % n
            finally:
                listener.close()
                for filler in fillers:
                    filler.close()
            assert lb.server.publications[(Proto.TCP, dead)].counters["refused"] == 3
            assert lb.server.records["m1"].session is session

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())


def test_clients_that_reset_while_the_mediator_connects_leave_no_socket_behind(tmp_path: Path) -> None:
    """The target answers no SYN, and each client resets right after its
    request, while the mediator's connect for it is still pending: the
    stream's RST cancels that connect, its socket is closed (the process
    has no descriptor more than before), and the channel serves the next
    client."""

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            session, public = await _echo_published(lb, connect_timeout=60, warm_connections=0)
            assert await _fetch(public, b"before") == b"before"
            listener, fillers = _silent_target()
            try:
                await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=(dead := _free()),
                             address="127.0.0.1", port=listener.getsockname()[1])
                before = descriptors()
                mediator = lb.mediators[0][0]
                for _ in range(5):
                    client = _held_connect(dead, b"GET / HTTP/1.0\r\n\r\n")
                    await until(lambda: mediator.session is not None and len(mediator.session.ports) == 1,
                                what="the mediator's connect to start")
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                    await until(lambda: not mediator.session.ports and not session.core.ports,
                                what="the stream to close on both ends")
                await until(lambda: descriptors() <= before, what="the connects' sockets to close")
                assert await _fetch(public, b"after") == b"after"
                assert lb.server.records["m1"].session is session
            finally:
                listener.close()
                for filler in fillers:
                    filler.close()

    run(main())


def test_a_client_port_the_allow_list_refuses_reaches_no_target(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """``client_ports = ""`` and no rule to open ports: every stream's client
    port is refused (NOT_ALLOWED), and the target never sees a connection
    for it. Where the allow-list covers the kernel's ephemeral range (by
    default) the mediator connects before the port is checked; here it must
    bind and check first."""
    accepted: list[object] = []

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            lb.start_mediator(client_ports=None, warm_connections=0)
            session = await lb.session()
            target = await asyncio.start_server(lambda r, w: accepted.append(w) or w.close(), "127.0.0.1", 0)
            await lb.ask(cmd="publish", mediator="m1", proto="tcp", public=(public := _free()),
                         address="127.0.0.1", port=target.sockets[0].getsockname()[1])
            for _ in range(3):
                client = _held_connect(public, b"GET / HTTP/1.0\r\n\r\n")
                name = "127.0.0.1:%d" % client.getsockname()[1]
                await until(lambda: name in _refusals(caplog), what="the refusal")
                assert "NOT_ALLOWED" in _refusals(caplog)[name]
                client.close()
            await until(lambda: not session.core.ports, what="the streams' ids to be free")
            assert accepted == []
            target.close()

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())


def test_a_stream_whose_opened_never_comes_is_refused_at_request_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 4: a mediator that never connects the target (nor answers).
    The client is reset after ``request_timeout`` with "no answer"; a client
    that reset before that deadline ended as ``client_reset`` and gets no
    late refusal; both streams are closed on the channel, which stays up."""
    from tunnel import mediator as mediator_module

    monkeypatch.setattr(mediator_module._Session, "_connect", lambda self, out: None)

    async def main() -> None:
        async with loopback(tmp_path, request_timeout=0.5) as lb:
            session, public = await _echo_published(lb)
            gone = _held_connect(public, b"first")
            gone_name = "127.0.0.1:%d" % gone.getsockname()[1]
            await until(lambda: len(session.core.ports) == 1, what="the first stream")
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.close()
            waiting = _held_connect(public, b"second")
            name = "127.0.0.1:%d" % waiting.getsockname()[1]
            await until(lambda: name in _refusals(caplog), what="the refusal at request_timeout")
            assert _refusals(caplog) == {name: "no answer from the mediator in time"}
            waiting.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                waiting.recv(100)
            waiting.close()
            await until(lambda: not session.core.ports, what="both streams to be closed")
            assert lb.server.records["m1"].session is session
            ends = {r.fields["client"]: r.fields["reason"]  # type: ignore[attr-defined]
                    for r in caplog.records if getattr(r, "event", None) == "connection_end"}
            assert ends[gone_name] == "client_reset"

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())


def test_each_connection_has_its_line_before_its_end_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Version 4: a connection's "connection" line waits until what came
    with its OPENED has gone to the client, yet every relayed connection has
    one, before its "connection_end", also one that is over within the
    read its OPENED came in (the echo's bytes and FIN with it)."""

    async def main() -> None:
        async with loopback(tmp_path) as lb:
            _, public = await _echo_published(lb)
            for i in range(20):
                assert await _fetch(public, b"x%d" % i) == b"x%d" % i

    with caplog.at_level(logging.INFO, logger="nfgate.tunnel"):
        run(main())
    lines: dict[str, list[str]] = {}
    for r in caplog.records:
        if getattr(r, "event", None) in ("connection", "connection_end") and "public" in r.fields:  # type: ignore[attr-defined]
            lines.setdefault(r.fields["client"], []).append(r.event)  # type: ignore[attr-defined]
    assert len(lines) == 20
    assert all(events == ["connection", "connection_end"] for events in lines.values()), lines
