"""STARTTLS through the smtp gateway with real peers (docs/smtp.md, "STARTTLS modes").

A private Postfix in lan with STARTTLS (a self-signed certificate made
here, ``mx.example.com``), the gateway under `nfgate run` as in
tests/gateways/smtp_netns.py, and TLS clients in ext: Python's smtplib
(``smtp_client.py sendtls``, which checks the certificate it is shown
against a given file and reports its name) and swaks ``--tls``.

- ``terminate``: the client sees the gateway's certificate
  (``gateway.example.com``), Postfix logs a TLS connection from the gateway,
  the mail arrives byte-identical; plaintext pipelined after STARTTLS is
  refused (CVE-2011-0411), plaintext sent after the 220 fails the
  handshake. With ``tls_server_ca`` and ``tls_server_name`` the server's
  certificate is verified: the right name passes, a wrong one gets 421.
- ``passthrough``: the client sees Postfix's own certificate through the
  gateway (only bytes are relayed), the mail arrives, and the gateway logs
  that it no longer inspects.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from firewall.lab.wait import wait_for
from tests.gateways.smtp_netns import LAN, WAN, Postfix, SmtpRunning, client, stored_body

pytestmark = pytest.mark.netns

POSTFIX_TLS = """
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
"""
TERMINATE = 'starttls = "terminate"\ntls_certificate = "gw.pem"\ntls_key = "gw.key"\n'
EHLO = b"EHLO attacker.example.org\r\n"


def certificate(tmp: Path, name: str, cn: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``cn`` (its own CA): (pem, key)."""
    pem, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}",
                    "-keyout", str(key), "-out", str(pem)], check=True, capture_output=True)
    return pem, key


@pytest.fixture(scope="module")
def tls(module_lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    lab = module_lab_factory("basic")
    tmp = tmp_path_factory.mktemp("smtp-tls")
    mx_pem, mx_key = certificate(tmp, "mx", "mx.example.com")
    gw_pem, _ = certificate(tmp, "gw", "gateway.example.com")
    pf = Postfix(lab, "lan", tmp, LAN, "example.com", extra=POSTFIX_TLS.format(cert=mx_pem, key=mx_key))
    try:
        yield SimpleNamespace(lab=lab, tmp=tmp, pf=pf, mx=mx_pem, gw=gw_pem)
    finally:
        pf.stop()


@contextlib.contextmanager
def gateway(t: SimpleNamespace, settings: str) -> Iterator[SmtpRunning]:
    run = SmtpRunning(t.lab, t.tmp, extra=settings)
    try:
        yield run
    finally:
        run.stop()


def message(t: SimpleNamespace, name: str) -> Path:
    path = t.tmp / name
    path.write_bytes(b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: " + name.encode()
                     + b"\r\n\r\n.a line with a dot\r\nGr\xc3\xbc\xc3\x9fe\r\n..\r\nend\r\n")
    return path


def send_tls(t: SimpleNamespace, cafile: Path, msg: Path) -> dict:
    result = client(t.lab, "ext", "sendtls", WAN, str(cafile), "alice@example.org", "bob@example.com", "session", str(msg))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw(t: SimpleNamespace, *steps: bytes) -> str:
    result = client(t.lab, "ext", "raw", WAN, *(s.hex() for s in steps), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["received"]


def arrived(t: SimpleNamespace, msg: Path) -> None:
    """``msg`` is stored, byte-identical but for the trace headers."""
    subject = b"Subject: " + msg.name.encode()
    wait_for(lambda: any(subject in m for m in t.pf.messages()), timeout=30, what=f"{msg.name} at Postfix")
    stored = next(m for m in t.pf.messages() if subject in m)
    assert stored_body(stored) == msg.read_bytes()


def log_has(run: SmtpRunning, *words: str) -> None:
    wait_for(lambda: any(all(w in line for w in words) for line in run.text().splitlines()), timeout=10,
             what=f"a gateway log line with {words}")


def test_terminate_speaks_tls_on_both_legs_and_refuses_plaintext_injection(tls: SimpleNamespace) -> None:
    tls.pf.clear()
    with gateway(tls, TERMINATE) as run:
        msg = message(tls, "terminated")
        out = send_tls(tls, tls.gw, msg)
        assert out["sent"] == 1 and out["peer"] == "gateway.example.com"  # the client's TLS ends at the gateway
        arrived(tls, msg)
        swaks = tls.lab.run("ext", ["swaks", "--server", WAN, "--tls", "--from", "carol@example.org", "--to",
                                    "bob@example.com", "--header", "Subject: swaks-tls", "--body", ".dot\n..two\nplain"],
                            check=False, timeout=60)
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        assert "TLS started" in swaks.stdout
        wait_for(lambda: any(b"swaks-tls" in m for m in tls.pf.messages()), timeout=30, what="swaks' message")
        sw = next(stored_body(m) for m in tls.pf.messages() if b"swaks-tls" in m)
        assert b"\r\n\r\n.dot\r\n..two\r\nplain\r\n" in sw
        # The server leg is TLS too: Postfix says so for each session.
        assert tls.pf.log.read_text().count("TLS connection established from") >= 2
        log_has(run, "tls.started")

        # CVE-2011-0411: a command pipelined behind STARTTLS is never carried into the TLS session.
        piped = raw(tls, EHLO, b"STARTTLS\r\nMAIL FROM:<alice@example.org>\r\n")
        assert "250-STARTTLS" in piped  # offered in terminate mode: the server offers it and a certificate is set
        assert piped.endswith("554 5.5.0 Commands pipelined after STARTTLS; closing\r\n")
        # Plaintext after the 220 is no TLS handshake: the session ends, nothing reaches the server.
        late = raw(tls, EHLO, b"STARTTLS\r\n", b"MAIL FROM:<alice@example.org>\r\n")
        assert late.endswith("220 2.0.0 Ready to start TLS\r\n"), late
        log_has(run, "tls.failed", "leg=client")
    assert tls.pf.count() == 2


def test_terminate_verifies_the_server_when_told_to(tls: SimpleNamespace) -> None:
    tls.pf.clear()
    verified = TERMINATE + 'tls_server_ca = "mx.pem"\ntls_server_name = "{}"\n'
    with gateway(tls, verified.format("mx.example.com")):
        msg = message(tls, "verified")
        assert send_tls(tls, tls.gw, msg)["sent"] == 1
        arrived(tls, msg)
    with gateway(tls, verified.format("other.example.com")) as run:
        got = raw(tls, EHLO, b"STARTTLS\r\n")
        assert got.endswith("421 4.7.0 TLS towards the server failed; closing\r\n"), got
        log_has(run, "tls.failed", "leg=server", "certificate verify failed")
    assert tls.pf.count() == 1


def test_passthrough_relays_bytes_only_after_220(tls: SimpleNamespace) -> None:
    tls.pf.clear()
    with gateway(tls, 'starttls = "passthrough"\n') as run:
        msg = message(tls, "passed-through")
        out = send_tls(tls, tls.mx, msg)
        assert out["peer"] == "mx.example.com"  # Postfix's own certificate, through the gateway
        arrived(tls, msg)
        log_has(run, "tls.passthrough", "inspection=off")
