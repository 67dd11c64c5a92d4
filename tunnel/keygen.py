"""``nfgate tunnel keygen``: a key and a self-signed certificate, and the pin to give mediators.

The server's key is EC P-256: small, fast handshakes for many mediators. The
certificate is self-signed because nothing but its pin is ever trusted
(tunnel/tls.py); the same command makes a mediator's optional client
certificate.

A module of its own so that only the command line loads ``cryptography``:
the server, the mediator and the gateway processes need only ``ssl``.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firewall.errors import UsageError
from tunnel.tls import fingerprint

DEFAULT_CERT_DAYS = 3650  # a pinned certificate is replaced by re-pinning, not by expiry


def generate(common_name: str, days: int = DEFAULT_CERT_DAYS) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate: (key PEM, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour of slack for a peer whose clock is a little behind.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def write_identity(
    cert_path: Path, key_path: Path, common_name: str, days: int = DEFAULT_CERT_DAYS, force: bool = False
) -> str:
    """Write a new key (mode 0600) and certificate; return the pin.

    Refuses to overwrite either file without ``force``: replacing a pinned
    certificate cuts every mediator off until it is re-pinned.
    """
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise UsageError(f"{path} exists (pass --force to replace it; every mediator must then be re-pinned)")
    if not 1 <= days <= 36500:
        raise UsageError(f"--days {days}: use 1 to 36500")
    key_pem, cert_pem = generate(common_name, days)
    try:
        for path in (cert_path, key_path):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The key is never readable by others, not even between open and chmod.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(key_pem)
        cert_path.write_bytes(cert_pem)
    except OSError as err:
        raise UsageError(f"keygen: {err.filename}: {err.strerror or err}") from None
    return fingerprint(ssl.PEM_cert_to_DER_cert(cert_pem.decode()))
