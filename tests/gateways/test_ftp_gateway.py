"""The ftp gateway on loopback, against a fake processor: sessions, rule requests, data connections, limits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import signal
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from firewall import manifests
from firewall.config import load
from firewall.signalling import Endpoint, FlowInfo, Proto, RuleEndReason, RuleMode, RuleRefusal, load_or_create_key
from gateways.ftp import FtpGateway, FtpSettings, Parties, Policy
from gateways.ftp.gateway import parties_of
from gateways.ftp.data import Transfer
from gateways.layer import EventLog
from tests.gateways.fake_processor import FakeProcessor, rig
from tests.gateways.ftp_loopback import PASV_PORT, LineClient, MiniFtp
from tests.gateways.loopback import GATEWAY, fw_socket, run, tcp_connect_from, tcp_server_at, wait_until
from tests.gateways.process import events, exit_of, free_port, next_event, start_gateway, write_config

A = ipaddress.IPv4Address
C = Endpoint(A("203.0.113.10"), 40000)  # the FTP client, outside
W = Endpoint(A("203.0.113.1"), 21)  # the router's port forward
S = Endpoint(A("192.168.1.10"), 21)  # the FTP server, inside
MB = 1 << 20


class World:
    def __init__(self, fake: FakeProcessor, gw: FtpGateway) -> None:
        self.fake = fake
        self.gw = gw
        self.servers: list[asyncio.AbstractServer] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def control(self, ftp: MiniFtp, **flow: Any) -> tuple[LineClient, FlowInfo]:
        """A control connection C -> W:21 -> S:21 through the gateway; returns the client after the greeting."""
        sock, fw = fw_socket(socket.SOCK_STREAM)
        self.servers.append(await tcp_server_at(fw, ftp))
        info = self.fake.new_flow(Proto.TCP, fw, self.gw.listen, gateway="ftp", client=flow.get("client", C),
                                  original_dst=flow.get("original_dst", W), server=flow.get("server", S),
                                  snat=flow.get("snat"))
        reader, writer = await tcp_connect_from(sock, self.gw.listen)
        self.writers.append(writer)
        client = LineClient(reader, writer)
        assert (await client.line()).startswith(b"220")
        return client, info

    async def login(self, ftp: MiniFtp, **flow: Any) -> tuple[LineClient, FlowInfo]:
        client, info = await self.control(ftp, **flow)
        assert (await client.send(b"USER ftp")).startswith(b"331")
        assert (await client.send(b"PASS x")).startswith(b"230")
        return client, info

    async def data(self, src: Endpoint, dst: Endpoint, server: Endpoint, handler: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A data connection src -> dst that the processor redirected to the gateway (its binding pushed)."""
        sock, fw = fw_socket(socket.SOCK_STREAM)
        self.servers.append(await tcp_server_at(fw, handler))
        self.fake.new_flow(Proto.TCP, fw, self.gw.listen, gateway="ftp", client=src, original_dst=dst, server=server)
        reader, writer = await tcp_connect_from(sock, self.gw.listen)
        self.writers.append(writer)
        return reader, writer


@contextlib.asynccontextmanager
async def world(
    settings: FtpSettings = FtpSettings(), query_timeout: float = 0.5, control_ports: frozenset[int] | None = frozenset({21}),
    **kw: Any,
) -> AsyncIterator[World]:
    async with rig(gateway="ftp", query_timeout=query_timeout) as (fake, layer):
        gw = FtpGateway(layer, listen=Endpoint(GATEWAY, 0), settings=settings, log=EventLog("ftp"),
                        control_ports=control_ports, **kw)
        await gw.start()
        w = World(fake, gw)
        try:
            yield w
        finally:
            for writer in w.writers:
                writer.transport.abort()
            await gw.close(grace=1.0)
            for server in w.servers:
                server.close()


@pytest.mark.parametrize("mode", ["allow", "inspect"])
def test_pasv_asks_for_an_exact_one_shot_rule_before_the_client_sees_227(mode: str, log) -> None:
    """Inbound passive: the client is told the router's address. allow: the kernel carries the
    connection (the processor translates W to S), so nothing is expected here; inspect: it comes here."""
    async def main() -> None:
        async with world(FtpSettings(data_channel=mode)) as w:
            server = MiniFtp(S.address)
            w.fake.drop_rule_requests = 1  # the first request is lost; the layer's resend is answered
            client, info = await w.login(server)
            client.writer.write(b"PASV\r\n")
            await wait_until(lambda: w.fake.rule_requests, what="the rule request")
            (_, req), = w.fake.rule_requests
            wanted = RuleMode.ALLOW if mode == "allow" else RuleMode.REDIRECT
            assert (req.flow_id, req.src, req.dst, req.mode, req.one_shot, req.ttl) == (
                info.flow_id, Endpoint(C.address, 0), Endpoint(W.address, PASV_PORT), wanted, True, 15)
            with pytest.raises(asyncio.TimeoutError):
                await client.line(timeout=0.3)  # no 227 yet: the rule is not in place
            assert await client.line(timeout=10) == b"227 Entering Passive Mode (203,0,113,1,195,80)."
            assert w.gw.expected == (mode == "inspect")
            assert await client.send(b"QUIT") == b"221 Goodbye."
            await wait_until(lambda: w.gw.active == 0, what="the session to end")
            assert w.gw.expected == 0  # the session's expectations end with it
            assert server.lines[-2:] == [b"PASV", b"QUIT"]

    run(main())
    assert [e["reason"] for e in events(log, "close")] == ["server_closed"]


def test_passive_data_connection_is_relayed_intact(log) -> None:
    payload = os.urandom(3 * MB + 17)

    async def main() -> None:
        async with world(FtpSettings(data_channel="inspect")) as w:
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"PASV")).startswith(b"227")

            async def ftp_data_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(payload)  # a download: the server writes, then closes
                await writer.drain()
                writer.close()

            dst = Endpoint(W.address, PASV_PORT)
            reader, writer = await w.data(Endpoint(C.address, 40001), dst, Endpoint(S.address, PASV_PORT), ftp_data_server)
            got = await asyncio.wait_for(reader.read(), 20)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert w.gw.expected == 0  # used once
            # A second connection for the same rule is not expected any more: reset.
            r2, _ = await w.data(Endpoint(C.address, 40002), dst, Endpoint(S.address, PASV_PORT), ftp_data_server)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r2.readexactly(1), 5)
            assert w.gw.counters["refused.unexpected_flow"] == 1 and w.gw.counters["data.accepted"] == 1

    run(main())
    (data,) = events(log, "data")
    assert data["to_client"] == len(payload) and data["reason"] == "done" and data["inspect"] is True


def test_allow_mode_expects_nothing_so_a_redirected_data_connection_is_reset() -> None:
    """In allow mode the kernel carries every data connection: one that reaches the gateway anyway
    (nothing asked for it) is not a data connection of the session."""
    async def main() -> None:
        async with world() as w:
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"PASV")).startswith(b"227")
            assert w.fake.rule_requests[-1][1].mode is RuleMode.ALLOW and w.gw.expected == 0
            r, _ = await w.data(Endpoint(C.address, 40001), Endpoint(W.address, PASV_PORT),
                                Endpoint(S.address, PASV_PORT), lambda r, w: None)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 5)
            assert w.gw.counters["refused.unexpected_flow"] == 1 and w.gw.counters["data.accepted"] == 0

    run(main())


def test_a_connection_neither_control_nor_expected_is_reset(log) -> None:
    async def main() -> None:
        async with world() as w:
            client, _ = await w.login(MiniFtp(S.address))
            r, _ = await w.data(Endpoint(C.address, 40002), Endpoint(W.address, 50123), Endpoint(S.address, 50123),
                                lambda r, w: None)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 5)
            assert w.gw.counters["refused.unexpected_flow"] == 1

    run(main())


def test_active_mode_upload_through_inspect_with_a_hook(log) -> None:
    """EPRT inbound in inspect mode: the server's connection comes to the gateway and goes on to the client."""
    payload = os.urandom(MB)
    seen: list[tuple[int, bool]] = []
    transfers: list[Transfer] = []

    def hook(transfer: Transfer):
        transfers.append(transfer)

        def inspect(chunk: bytes, toward_client: bool) -> bool:
            seen.append((len(chunk), toward_client))
            return True

        return inspect

    async def main() -> None:
        async with world(FtpSettings(data_channel="inspect"), hook=hook) as w:
            server = MiniFtp(S.address)
            client, _ = await w.login(server)
            assert await client.send(b"EPRT |1|203.0.113.10|50001|") == b"200 PORT command successful."
            (_, req), = w.fake.rule_requests
            assert (req.src, req.dst, req.mode) == (Endpoint(S.address, 0), Endpoint(C.address, 50001), RuleMode.REDIRECT)
            assert server.lines[-1] == b"EPRT |1|203.0.113.10|50001|"
            received = bytearray()

            async def ftp_client_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                received.extend(await reader.read())  # an upload STOR: the client side receives nothing...
                writer.close()

            # Active mode: the FTP server connects (src S:20) to the client's port; leg B reaches the client.
            reader, writer = await w.data(Endpoint(S.address, 20), Endpoint(C.address, 50001),
                                          Endpoint(C.address, 50001), ftp_client_listener)
            writer.write(payload)
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 10)
            assert received == payload

    run(main())
    assert transfers and transfers[0].direction == "active" and transfers[0].ftp_client == C.address
    assert sum(n for n, toward in seen if toward) == len(payload)  # from the server toward the FTP client


def test_data_mode_active_joins_the_client_and_the_server_connection(log) -> None:
    """data_mode = "active": EPSV reaches the server as PORT to the client's address; two REDIRECTs
    (the server's side replacing earlier rules, then the client's); the client connects first and
    waits, the server's connection joins it, and the bytes cross with no leg B."""
    payload = os.urandom(MB + 3)

    async def main() -> None:
        async with world(FtpSettings(data_mode="active")) as w:
            server = MiniFtp(S.address)
            client, _ = await w.login(server)
            reply = await client.send(b"EPSV")
            assert reply.startswith(b"229 Entering Extended Passive Mode (|||"), reply
            port = int(reply.split(b"|||")[1].split(b"|")[0])
            assert server.lines[-1] == b"PORT 203,0,113,10,%d,%d" % (port >> 8, port & 255)
            requests = [(r.src, r.dst, r.mode, r.replaces) for _, r in w.fake.rule_requests]
            assert requests == [(Endpoint(S.address, 0), Endpoint(C.address, port), RuleMode.REDIRECT, True),
                                (Endpoint(C.address, 0), Endpoint(W.address, port), RuleMode.REDIRECT, False)]

            async def nobody(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.close()  # leg B: never opened for a joined connection

            cr, _ = await w.data(Endpoint(C.address, 40001), Endpoint(W.address, port), Endpoint(S.address, port), nobody)
            await wait_until(lambda: w.gw.counters["expectations.ended.used"] == 1, what="the client's side")
            _, sw = await w.data(Endpoint(S.address, 20), Endpoint(C.address, port), Endpoint(C.address, port), nobody)
            sw.write(payload)
            sw.write_eof()
            assert await asyncio.wait_for(cr.read(), 20) == payload

    run(main())
    (data,) = events(log, "data")
    assert data["translated"] is True and data["to_client"] == len(payload) and data["reason"] == "done"


@pytest.mark.parametrize("what", ["limit", "hook"])
def test_inspect_stops_a_transfer(what: str, log) -> None:
    payload = os.urandom(2 * MB)
    settings = FtpSettings(data_channel="inspect", max_transfer_bytes=MB if what == "limit" else 0)
    hook = (lambda t: (lambda chunk, toward: b"EICAR" not in chunk)) if what == "hook" else None
    if what == "hook":
        payload = payload[:MB] + b"EICAR" + payload[MB:]

    async def main() -> None:
        async with world(settings, hook=hook) as w:
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"EPSV")) == b"229 Entering Extended Passive Mode (|||50000|)"

            async def ftp_data_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    writer.write(payload)
                    await writer.drain()
                    writer.close()

            reader, _ = await w.data(Endpoint(C.address, 40001), Endpoint(W.address, PASV_PORT),
                                     Endpoint(S.address, PASV_PORT), ftp_data_server)
            got = bytearray()
            with pytest.raises(ConnectionResetError):
                while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
                    got += chunk
            assert len(got) < len(payload)

    run(main())
    (data,) = events(log, "data")
    assert data["reason"] == what


def test_refused_rule_gives_425() -> None:
    async def main() -> None:
        async with world() as w:
            w.fake.rule_policy = lambda req: RuleRefusal.THIRD_PARTY
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"PASV")).startswith(b"425 ")
            assert w.gw.expected == 0
            assert (await client.send(b"NOOP")) == b"200 ok"
            assert w.gw.counters["rules.not_granted"] == 1

    run(main())


def test_rule_end_expired_drops_the_expectation() -> None:
    async def main() -> None:
        async with world(FtpSettings(data_channel="inspect")) as w:
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"PASV")).startswith(b"227")
            assert w.gw.expected == 1
            w.fake.end_rule(100, RuleEndReason.EXPIRED)  # the fake numbers its rules from 100
            await wait_until(lambda: w.gw.expected == 0, what="the expectation to go")
            # USED keeps it: the redirected connection may still be on its way.
            assert (await client.send(b"PASV")).startswith(b"227")
            w.fake.end_rule(101, RuleEndReason.USED)
            await wait_until(lambda: w.gw.counters["rules.ended.used"] == 1, what="RULE_END USED")
            assert w.gw.expected == 1

    run(main())


@pytest.mark.parametrize("mode", ["allow", "inspect"])
def test_outbound_active_announces_the_snat_address(mode: str) -> None:
    """The processor says which address it SNATs the session to (NEW_FLOW's snat): the PORT names it,
    and the rule is for it; in allow mode the processor translates it back to the client in the kernel."""
    lan_client = Endpoint(A("192.168.1.10"), 40000)
    ext_server = Endpoint(A("203.0.113.10"), 21)
    router = Endpoint(A("203.0.113.1"), 61000)
    rule_mode = RuleMode.ALLOW if mode == "allow" else RuleMode.REDIRECT

    async def main() -> None:
        async with world(FtpSettings(data_channel=mode)) as w:
            server = MiniFtp(ext_server.address)
            client, _ = await w.login(server, client=lan_client, original_dst=ext_server, server=ext_server,
                                      snat=router)
            assert await client.send(b"PORT 192,168,1,10,195,81") == b"200 PORT command successful."
            assert server.lines[-1] == b"PORT 203,0,113,1,195,81"
            (_, req), = w.fake.rule_requests
            assert (req.src, req.dst, req.mode) == (Endpoint(ext_server.address, 0), Endpoint(router.address, 50001),
                                                    rule_mode)
            assert await client.send(b"PASV") == b"227 Entering Passive Mode (203,0,113,10,195,80)."
            assert w.fake.rule_requests[-1][1].mode is rule_mode
            assert w.gw.expected == (2 if mode == "inspect" else 0)

    run(main())


def test_without_snat_active_mode_announces_the_clients_own_address() -> None:
    """A routed network (no masquerade): the processor signals no snat; the server is told the client itself."""
    lan_client = Endpoint(A("192.168.1.10"), 40000)
    ext_server = Endpoint(A("203.0.113.10"), 21)

    async def main() -> None:
        async with world() as w:
            server = MiniFtp(ext_server.address)
            client, _ = await w.login(server, client=lan_client, original_dst=ext_server, server=ext_server)
            assert await client.send(b"PORT 192,168,1,10,195,81") == b"200 PORT command successful."
            assert server.lines[-1] == b"PORT 192,168,1,10,195,81"
            (_, req), = w.fake.rule_requests
            assert (req.src, req.dst, req.mode) == (Endpoint(ext_server.address, 0), Endpoint(lan_client.address, 50001),
                                                    RuleMode.ALLOW)

    run(main())


def test_bounce_and_garbage_never_reach_the_server() -> None:
    async def main() -> None:
        async with world() as w:
            server = MiniFtp(S.address)
            client, _ = await w.login(server)
            assert (await client.send(b"PORT 198,51,100,99,0,25")).startswith(b"501 ")
            assert (await client.send(b"PORT 203,0,113,10,0,25")).startswith(b"501 ")
            assert (await client.send(b"EPRT |2|::1|5000|")).startswith(b"522 ")
            assert (await client.send(b"AUTH TLS")).startswith(b"534 ")
            assert await client.reply(b"FEAT") == b"211 End"
            assert server.lines == [b"USER ftp", b"PASS x", b"FEAT"]
            assert w.fake.rule_requests == []
            # The bounce and the privileged port were bad commands 1 and 2; EPRT |2| and AUTH are
            # policy, not counted: bad commands 3 to 5 of max_bad_commands = 5 are answered.
            for _ in range(3):
                assert (await client.send(b"XYZ")).startswith(b"500 ")
            assert await client.send(b"XYZ") == b"421 Too many bad commands; closing."
            assert await asyncio.wait_for(client.reader.read(), 5) == b""

    run(main())


def test_processor_flow_end_closes_the_session(log) -> None:
    async def main() -> None:
        async with world() as w:
            client, info = await w.login(MiniFtp(S.address))
            w.fake.end_flow(info)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(client.reader.readexactly(1), 5)
            await wait_until(lambda: w.gw.active == 0, what="the session to end")

    run(main())
    assert [e["reason"] for e in events(log, "close")] == ["flow_end"]


def test_max_sessions_and_unknown_flows(log) -> None:
    async def main() -> None:
        async with world(FtpSettings(max_sessions=1)) as w:
            await w.login(MiniFtp(S.address))
            sock, fw = fw_socket(socket.SOCK_STREAM)
            w.servers.append(await tcp_server_at(fw, MiniFtp(S.address)))
            w.fake.new_flow(Proto.TCP, fw, w.gw.listen, gateway="ftp", client=C, original_dst=W, server=S)
            reader, writer = await tcp_connect_from(sock, w.gw.listen)
            w.writers.append(writer)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            assert w.gw.counters["refused.max_sessions"] == 1

    run(main())


# ---- the gateway process ----------------------------------------------------------------------------


def test_the_ftp_gateway_process(tmp_path: Path) -> None:
    """``python -m gateways`` runs the ftp kind: selector port 8443 is its control port, the settings apply."""

    async def main() -> None:
        fake = FakeProcessor(load_or_create_key(tmp_path / "keys" / "signalling.key"))
        await fake.start()
        assert fake.base_port is not None
        config = write_config(tmp_path, port=fake.base_port, kind="ftp", name="ftp")
        config.write_text(config.read_text() + '\n[gateway.settings]\ndata_channel = "inspect"\ndata_rule_ttl = 7\n')
        proc = await start_gateway(config, "ftp")
        seen: list[dict[str, Any]] = []
        try:
            ready = await next_event(proc, "ready", seen)
            assert ready["kind"] == "ftp"
            fake.layer_address = Endpoint(GATEWAY, fake.base_port)
            listen = Endpoint(GATEWAY, int(ready["listen"].rsplit(":", 1)[1]))
            sock, fw = fw_socket(socket.SOCK_STREAM)
            server = await tcp_server_at(fw, MiniFtp(S.address))
            fake.new_flow(Proto.TCP, fw, listen, gateway="ftp", client=C, original_dst=Endpoint(W.address, 8443), server=S)
            client = LineClient(*await tcp_connect_from(sock, listen))
            assert (await client.line()).startswith(b"220")
            await client.send(b"USER a")
            await client.send(b"PASS b")
            assert await client.send(b"EPSV") == b"229 Entering Extended Passive Mode (|||50000|)"
            (_, req), = fake.rule_requests
            assert (req.mode, req.ttl) == (RuleMode.REDIRECT, 7)  # inspect: redirected even where allow could be
            assert await client.send(b"QUIT") == b"221 Goodbye."
            await next_event(proc, "close", seen)
            proc.send_signal(signal.SIGTERM)
            final = await next_event(proc, "stats", seen)
            assert final["relay"]["sessions.opened"] == 1 and final["relay"]["rule.granted"] == 1
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            server.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            fake.close()

    run(main())


def test_a_content_hook_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port(GATEWAY), kind="ftp", name="ftp")
    config.write_text(config.read_text() + '\n[gateway.settings]\ncontent_hook = "no_such_module:scan"\n')
    returncode, lines = run(exit_of(config, "ftp"))
    assert returncode == 2
    assert len(lines) == 1 and "content_hook 'no_such_module:scan': cannot load it" in lines[0]


def test_settings_make_the_core_policy() -> None:
    s = FtpSettings(allow_commands=("site",), deny_commands=("DELE",), auth_tls="allow")
    policy = Policy.of(s)
    assert "SITE" in policy.allowed and "DELE" not in policy.allowed and policy.auth_tls


def test_the_ftp_gateway_listens_on_g6_when_its_selectors_take_ipv6(tmp_path: Path) -> None:
    """ftp takes IPv6 (issue 17): its manifest names G6, where it accepts on its G:g's port too."""
    cfg = load(write_config(tmp_path, port=free_port(GATEWAY), kind="ftp", name="ftp"))
    gateway = next(g for g in cfg.gateways if g.name == "ftp")
    manifest = manifests.manifest_for(cfg, gateway)
    assert manifest.listen6 == cfg.gateway_link.gateway_address6.ip
    listen = Endpoint(GATEWAY, manifest.listen.port)
    gw = FtpGateway.for_gateway(None, manifest, listen, EventLog("ftp"))  # type: ignore[arg-type]
    assert gw.listen6 == Endpoint(manifest.listen6, listen.port)


def test_parties_from_signalling() -> None:
    """The server sees the client as the processor's SNAT address when signalling gives one, else as itself."""
    forwarded = FlowInfo(1, Proto.TCP, "ftp", C, W, S, Endpoint(A("172.31.254.1"), 1024), Endpoint(GATEWAY, 20000))
    assert parties_of(forwarded) == Parties(C.address, S.address, W.address, C.address)
    lan = Endpoint(A("192.168.1.10"), 40000)
    ext = Endpoint(A("198.51.100.7"), 21)
    routed = FlowInfo(2, Proto.TCP, "ftp", lan, ext, ext, Endpoint(A("172.31.254.1"), 1025), Endpoint(GATEWAY, 20000))
    assert parties_of(routed) == Parties(lan.address, ext.address, ext.address, lan.address)
    masqueraded = FlowInfo(**{**{f: getattr(routed, f) for f in FlowInfo.__dataclass_fields__},
                              "snat": Endpoint(A("203.0.113.1"), 61000)})
    assert parties_of(masqueraded).client_seen_as == A("203.0.113.1")


@pytest.mark.parametrize("extra, reason", [(0, "done"), (1, "limit")])
def test_max_transfer_bytes_at_and_past(extra: int, reason: str, log) -> None:
    limit = 100_000
    payload = os.urandom(limit + extra)

    async def main() -> None:
        async with world(FtpSettings(data_channel="inspect", max_transfer_bytes=limit)) as w:
            client, _ = await w.login(MiniFtp(S.address))
            assert (await client.send(b"EPSV")).startswith(b"229")

            async def ftp_data_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    writer.write(payload)
                    await writer.drain()
                    writer.close()

            reader, _ = await w.data(Endpoint(C.address, 40001), Endpoint(W.address, PASV_PORT),
                                     Endpoint(S.address, PASV_PORT), ftp_data_server)
            got = bytearray()
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
                    got += chunk
            assert (bytes(got) == payload) is (reason == "done")

    run(main())
    (data,) = events(log, "data")
    assert data["reason"] == reason
