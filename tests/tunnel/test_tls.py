"""Keys, certificates and pins of the tunnel's TLS channel."""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from firewall.errors import UsageError
from tunnel import keygen, tls


def test_keygen_writes_a_private_key_and_returns_the_certificates_pin(tmp_path: Path) -> None:
    pin = keygen.write_identity(tmp_path / "d" / "s.crt", tmp_path / "d" / "s.key", "srv")
    assert stat.S_IMODE((tmp_path / "d" / "s.key").stat().st_mode) == 0o600
    der = tls.read_pem_certificate(tmp_path / "d" / "s.crt")
    assert pin == "sha256:" + hashlib.sha256(der).hexdigest() == tls.file_pin(tmp_path / "d" / "s.crt")


def test_keygen_never_overwrites_without_force(tmp_path: Path) -> None:
    first = keygen.write_identity(tmp_path / "s.crt", tmp_path / "s.key", "srv")
    with pytest.raises(UsageError, match="exists"):
        keygen.write_identity(tmp_path / "s.crt", tmp_path / "s.key", "srv")
    assert keygen.write_identity(tmp_path / "s.crt", tmp_path / "s.key", "srv", force=True) != first


@pytest.mark.parametrize("form", ["sha256:{h}", "{h}", "{H}", "sha256:{c}", "  {h}\n"])
def test_pins_are_read_in_every_usual_form(form: str) -> None:
    digest = bytes(range(32))
    h = digest.hex()
    text = form.format(h=h, H=h.upper(), c=":".join(h[i : i + 2] for i in range(0, 64, 2)))
    assert tls.parse_pin(text) == digest


@pytest.mark.parametrize("bad", ["", "sha256:", "sha256:" + "ab" * 31, "md5:" + "ab" * 32, "zz" * 32, "ab" * 33])
def test_bad_pins_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a pin"):
        tls.parse_pin(bad)


def test_pin_comparison() -> None:
    der = b"certificate bytes"
    assert tls.pin_matches(der, hashlib.sha256(der).digest())
    assert not tls.pin_matches(der, bytes(32))
    assert not tls.pin_matches(None, hashlib.sha256(der).digest())


def test_missing_or_mismatched_files_are_one_line_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        tls.server_context(tmp_path / "none.crt", tmp_path / "none.key")
    keygen.write_identity(tmp_path / "a.crt", tmp_path / "a.key", "a")
    keygen.write_identity(tmp_path / "b.crt", tmp_path / "b.key", "b")
    with pytest.raises(UsageError, match="not a matching certificate and key"):
        tls.server_context(tmp_path / "a.crt", tmp_path / "b.key")
    (tmp_path / "junk.crt").write_text("junk")
    with pytest.raises(UsageError, match="not a PEM certificate"):
        tls.read_pem_certificate(tmp_path / "junk.crt")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLSocket:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.recv(1)
        except (OSError, ssl.SSLError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    listener.close()
    return client


def test_the_pin_is_the_only_trust_and_tls_is_13(tmp_path: Path) -> None:
    pin = keygen.write_identity(tmp_path / "s.crt", tmp_path / "s.key", "srv")
    other = keygen.write_identity(tmp_path / "o.crt", tmp_path / "o.key", "other")
    client = _handshake(tls.server_context(tmp_path / "s.crt", tmp_path / "s.key"), tls.client_context())
    try:
        assert client.version() == "TLSv1.3"
        tls.check_server_pin(client, tls.parse_pin(pin))
        with pytest.raises(tls.PinMismatch, match="does not match the pin"):
            tls.check_server_pin(client, tls.parse_pin(other))
    finally:
        client.close()
